//! Hangar's metrics: one process-wide registry of Prometheus series, reached by every crate
//! that records (the API layer, the host module, the orchestrator, the image format, the
//! reverse proxy, the store wrapper in the binary) and encoded by [`encode`] for `/metrics`.
//!
//! The series are declared here, in one place, with their names, units and help texts, so a
//! dashboard (`deploy/grafana/hangar.json`) can rely on them. Label values are bounded: API
//! requests are labelled with the matched route template, never the raw path; hosts by their
//! registry id. Counters and histograms are atomics; a labelled series is looked up under a
//! read lock, so hot paths that must stay lock-free (the reverse proxy's fast lane) use
//! unlabelled handles ([`Metrics::proxy_requests`]).
//!
//! Gauges that describe state another module already holds (hosts, their capacity, cache
//! size) are filled at scrape time by hooks ([`on_scrape`]) rather than on every change.
//! This crate does no IO; it depends only on `prometheus-client`.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s text (OpenMetrics 1.0, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of an API request: method, matched route template, status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: String,
}

/// Labels of an API request's latency: method, matched route template, status class (`2xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLatencyLabels {
    pub method: String,
    pub route: String,
    pub status_class: &'static str,
}

/// One label `outcome` (`ok`, `error`, `placed`, `queued`, `refused`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// One label `direction`: `push` or `pull`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// One label `host`: a host's registry id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

/// A host's capacity series: `host` and `kind` (`total`, `reserved`, `used`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapacityLabels {
    pub host: String,
    pub kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn latency_buckets() -> Histogram {
    // 1 ms .. about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn slow_buckets() -> Histogram {
    // 100 ms .. about 27 min: VM creates, image transfers.
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

fn commit_buckets() -> Histogram {
    // 100 µs .. about 3.3 s: one store commit (fsync included).
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Every series Hangar exports.
pub struct Metrics {
    registry: Registry,
    /// `hangar_http_requests_total{method,route,status}`.
    pub http_requests: Family<HttpLabels, Counter>,
    /// `hangar_http_request_duration_seconds{method,route,status_class}`.
    pub http_duration: HistogramFamily<HttpLatencyLabels>,
    /// `hangar_vm_creates_total{outcome}`.
    pub vm_creates: Family<OutcomeLabels, Counter>,
    /// `hangar_vm_create_to_ready_seconds`: from the create request to a VM the driver reports.
    pub vm_create_seconds: Histogram,
    /// `hangar_placement_decisions_total{outcome}`.
    pub placement_decisions: Family<OutcomeLabels, Counter>,
    /// `hangar_placement_duration_seconds`.
    pub placement_seconds: Histogram,
    /// `hangar_placement_queue_depth`.
    pub queue_depth: Gauge,
    /// `hangar_placement_queue_wait_seconds`.
    pub queue_wait_seconds: Histogram,
    /// `hangar_host_up{host}`: 1 when the orchestrator counts the host healthy.
    pub host_up: Family<HostLabels, Gauge>,
    /// `hangar_host_cpu_cores{host,kind}`.
    pub host_cpu: Family<CapacityLabels, FloatGauge>,
    /// `hangar_host_memory_bytes{host,kind}`.
    pub host_memory: Family<CapacityLabels, Gauge>,
    /// `hangar_image_transfer_bytes_total{direction}`.
    pub image_bytes: Family<DirectionLabels, Counter>,
    /// `hangar_image_transfer_duration_seconds{direction}`.
    pub image_seconds: HistogramFamily<DirectionLabels>,
    /// `hangar_image_cache_hits_total`.
    pub cache_hits: Counter,
    /// `hangar_image_cache_misses_total`.
    pub cache_misses: Counter,
    /// `hangar_image_cache_size_bytes`.
    pub cache_size: Gauge,
    /// `hangar_proxy_requests_total`: requests the reverse proxy routed (both lanes).
    pub proxy_requests: Counter,
    /// `hangar_proxy_upstream_errors_total`: requests answered 502/504 for want of an upstream.
    pub proxy_upstream_errors: Counter,
    /// `hangar_store_commit_duration_seconds`.
    pub store_commit_seconds: Histogram,
    /// `hangar_store_commit_errors_total`.
    pub store_commit_errors: Counter,
    /// `hangar_runner_jobs_total{outcome}`: CI jobs entering a state (`queued`, `assigned`,
    /// `running`, `done`, `failed`, `ignored`).
    pub runner_jobs: Family<OutcomeLabels, Counter>,
    /// `hangar_runner_queued_to_online_seconds`: from a job's `queued` delivery to its runner
    /// running it.
    pub runner_online_seconds: Histogram,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_buckets),
            vm_creates: Family::default(),
            vm_create_seconds: slow_buckets(),
            placement_decisions: Family::default(),
            placement_seconds: latency_buckets(),
            queue_depth: Gauge::default(),
            queue_wait_seconds: slow_buckets(),
            host_up: Family::default(),
            host_cpu: Family::default(),
            host_memory: Family::default(),
            image_bytes: Family::default(),
            image_seconds: Family::new_with_constructor(slow_buckets),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_size: Gauge::default(),
            proxy_requests: Counter::default(),
            proxy_upstream_errors: Counter::default(),
            store_commit_seconds: commit_buckets(),
            store_commit_errors: Counter::default(),
            runner_jobs: Family::default(),
            runner_online_seconds: slow_buckets(),
            registry: Registry::default(),
        };
        r.register(
            "hangar_http_requests",
            "API requests by method, matched route and status code",
            m.http_requests.clone(),
        );
        r.register(
            "hangar_http_request_duration_seconds",
            "API request latency by method, matched route and status class",
            m.http_duration.clone(),
        );
        r.register("hangar_vm_creates", "VM creates by outcome", m.vm_creates.clone());
        r.register(
            "hangar_vm_create_to_ready_seconds",
            "Seconds from a VM create request until the driver reports the VM",
            m.vm_create_seconds.clone(),
        );
        r.register(
            "hangar_placement_decisions",
            "Orchestrator placement decisions by outcome",
            m.placement_decisions.clone(),
        );
        r.register(
            "hangar_placement_duration_seconds",
            "Seconds one placement decision took",
            m.placement_seconds.clone(),
        );
        r.register("hangar_placement_queue_depth", "Placement requests waiting for capacity", m.queue_depth.clone());
        r.register(
            "hangar_placement_queue_wait_seconds",
            "Seconds a queued placement request waited",
            m.queue_wait_seconds.clone(),
        );
        r.register("hangar_host_up", "1 when the orchestrator counts the host healthy, else 0", m.host_up.clone());
        r.register("hangar_host_cpu_cores", "A host's CPU cores: total, reserved, used", m.host_cpu.clone());
        r.register("hangar_host_memory_bytes", "A host's memory: total, reserved, used", m.host_memory.clone());
        r.register("hangar_image_transfer_bytes", "Image bytes pushed or pulled", m.image_bytes.clone());
        r.register(
            "hangar_image_transfer_duration_seconds",
            "Seconds one image push or pull took",
            m.image_seconds.clone(),
        );
        r.register("hangar_image_cache_hits", "Catalog image pulls served by the host cache", m.cache_hits.clone());
        r.register(
            "hangar_image_cache_misses",
            "Catalog image pulls the host cache had to fetch",
            m.cache_misses.clone(),
        );
        r.register("hangar_image_cache_size_bytes", "Bytes held by the host image cache", m.cache_size.clone());
        r.register("hangar_proxy_requests", "HTTP requests the reverse proxy routed", m.proxy_requests.clone());
        r.register(
            "hangar_proxy_upstream_errors",
            "Reverse-proxy requests answered 502/504 because the upstream failed",
            m.proxy_upstream_errors.clone(),
        );
        r.register(
            "hangar_store_commit_duration_seconds",
            "Seconds one store commit took, durable write included",
            m.store_commit_seconds.clone(),
        );
        r.register("hangar_store_commit_errors", "Store commits that failed", m.store_commit_errors.clone());
        r.register("hangar_runner_jobs", "CI jobs entering a state, by state", m.runner_jobs.clone());
        r.register(
            "hangar_runner_queued_to_online_seconds",
            "Seconds from a CI job's queued delivery to Hangar's runner running it",
            m.runner_online_seconds.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// A CI job entered `state`.
    pub fn runner_job(&self, state: &'static str) {
        self.runner_jobs.get_or_create(&OutcomeLabels { outcome: state }).inc();
    }

    /// A CI job's runner came online `secs` after the job was queued.
    pub fn runner_online(&self, secs: f64) {
        self.runner_online_seconds.observe(secs);
    }

    /// Count one API request.
    pub fn http_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = HttpLabels { method: method.to_string(), route: route.to_string(), status: status.to_string() };
        self.http_requests.get_or_create(&labels).inc();
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let labels = HttpLatencyLabels { method: labels.method, route: labels.route, status_class: class };
        self.http_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// Count one VM create and, when it succeeded, its duration.
    pub fn vm_created(&self, ok: bool, elapsed: Duration) {
        self.vm_creates.get_or_create(&OutcomeLabels { outcome: if ok { "ok" } else { "error" } }).inc();
        if ok {
            self.vm_create_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// Count one placement decision and its latency.
    pub fn placement(&self, outcome: &'static str, elapsed: Duration) {
        self.placement_decisions.get_or_create(&OutcomeLabels { outcome }).inc();
        self.placement_seconds.observe(elapsed.as_secs_f64());
    }

    /// Count one image transfer (`push` or `pull`) of `bytes` that took `elapsed`.
    pub fn image_transfer(&self, direction: &'static str, bytes: u64, elapsed: Duration) {
        let l = DirectionLabels { direction };
        self.image_bytes.get_or_create(&l).inc_by(bytes);
        self.image_seconds.get_or_create(&l).observe(elapsed.as_secs_f64());
    }

    /// Time one store commit.
    pub fn store_commit(&self, ok: bool, elapsed: Duration) {
        self.store_commit_seconds.observe(elapsed.as_secs_f64());
        if !ok {
            self.store_commit_errors.inc();
        }
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

type Hook = Box<dyn Fn(&Metrics) + Send + Sync>;

fn hooks() -> &'static Mutex<Vec<Hook>> {
    static H: OnceLock<Mutex<Vec<Hook>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(Vec::new()))
}

/// Run `hook` before every scrape, to set gauges from state a module already holds. A hook
/// must be quick and must not block on IO (it runs on the scraping request's task).
pub fn on_scrape(hook: impl Fn(&Metrics) + Send + Sync + 'static) {
    hooks().lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(hook));
}

/// The text exposition of every series (OpenMetrics 1.0 text, [`CONTENT_TYPE`]).
pub fn encode() -> String {
    let m = metrics();
    for h in hooks().lock().unwrap_or_else(|p| p.into_inner()).iter() {
        h(m);
    }
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_encoded_with_units_and_suffixes() {
        let m = metrics();
        m.http_request("GET", "/machines/{id}", 200, Duration::from_millis(3));
        m.proxy_requests.inc();
        m.image_transfer("push", 10, Duration::from_millis(5));
        m.host_cpu.get_or_create(&CapacityLabels { host: "h1".into(), kind: "total" }).set(4.0);
        let text = encode();
        assert!(
            text.contains(r#"hangar_http_requests_total{method="GET",route="/machines/{id}",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("hangar_http_request_duration_seconds_bucket{"), "{text}");
        assert!(text.contains("hangar_proxy_requests_total 1"), "{text}");
        assert!(text.contains(r#"hangar_image_transfer_bytes_total{direction="push"} 10"#), "{text}");
        assert!(text.contains(r#"hangar_host_cpu_cores{host="h1",kind="total"} 4.0"#), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn scrape_hooks_run_before_encoding() {
        on_scrape(|m| {
            m.cache_size.set(1234);
        });
        assert!(encode().contains("hangar_image_cache_size_bytes 1234"));
    }
}
