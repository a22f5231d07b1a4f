//! `/metrics` on the real binary: who may scrape it (401 without a credential, 403 for a
//! plain user, 200 for the METRICS_READER role's API key and on the `METRICS_PORT`
//! listener), that the text parses with a Prometheus exposition parser, and that the series
//! the Grafana dashboard (`deploy/grafana/hangar.json`) reads exist and move after a VM
//! create from the catalog (fake Parallels host), catalog pushes, proxied requests and an
//! orchestrator placement.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// One scrape, parsed by the Prometheus project's OpenMetrics parser
/// (`scripts/parse-metrics.py`, Debian's python3-prometheus-client): (sample name, sorted
/// labels) -> value, histograms as their `_bucket`, `_count` and `_sum` samples.
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    families: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        use std::io::Write;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/parse-metrics.py");
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run /usr/bin/python3 (scripts/test.sh installs python3-prometheus-client)");
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the exposition does not parse: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut scrape = Scrape::default();
        for f in doc["families"].as_array().unwrap() {
            scrape.families.insert(f["name"].as_str().unwrap().to_string());
            for smp in f["samples"].as_array().unwrap() {
                let mut labels: Vec<(String, String)> = smp["labels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                labels.sort();
                scrape
                    .samples
                    .insert((smp["name"].as_str().unwrap().to_string(), labels), smp["value"].as_f64().unwrap());
            }
        }
        scrape
    }

    /// The sum of every sample of `name` whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| n == name && with.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, v)| *v)
            .sum()
    }

    fn has(&self, name: &str, with: &[(&str, &str)]) -> bool {
        self.samples
            .keys()
            .any(|(n, l)| n == name && with.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
    }

    /// Names of the samples that have a value, and of their families.
    fn names(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.samples.keys().map(|(n, _)| n.clone()).collect();
        out.extend(
            self.families.iter().filter(|f| out.iter().any(|n| n.starts_with(f.as_str()))).cloned().collect::<Vec<_>>(),
        );
        out
    }

    fn labels_of(&self, name: &str, key: &str) -> BTreeSet<String> {
        self.samples
            .keys()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, l)| l.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()))
            .collect()
    }
}

async fn scrape(c: &reqwest::Client, url: &str, auth: &Auth) -> Scrape {
    let mut r = c.get(url);
    match auth {
        Auth::None => {}
        Auth::Bearer(t) => r = r.bearer_auth(t),
        Auth::ApiKey(k) => r = r.header("X-Api-Key", k),
    }
    let resp = r.send().await.unwrap();
    assert_eq!(resp.status(), 200, "scrape {url}");
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "content type {ct}");
    Scrape::parse(&resp.text().await.unwrap())
}

/// The address of the `METRICS_PORT` listener from the console banner.
fn metrics_listener(s: &Server) -> String {
    s.banner
        .iter()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("listening on ")?;
            let url = rest.split_whitespace().next()?;
            url.ends_with("/metrics").then(|| url.to_string())
        })
        .unwrap_or_else(|| panic!("no metrics listener in the banner: {:?}", s.banner))
}

async fn api(c: &reqwest::Client, s: &Server, m: Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    call(c, m, &s.api(path), &Auth::Bearer(token.into()), body, &[]).await
}

async fn wait_job(c: &reqwest::Client, s: &Server, token: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (st, j) = api(c, s, Method::GET, &format!("/jobs/{id}"), token, None).await;
        assert_eq!(st, 200, "{j}");
        if j["state"] == "completed" || j["state"] == "failed" {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} did not finish: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A user holding only the roles USER and METRICS_READER, and an API key of theirs.
async fn metrics_key(c: &reqwest::Client, s: &Server, root: &str) -> String {
    let (uid, token) = make_user(c, s, root, "prometheus").await;
    let (st, v) =
        api(c, s, Method::POST, &format!("/auth/users/{uid}/roles"), root, Some(json!({"name": "METRICS_READER"})))
            .await;
    assert_eq!(st, 201, "{v}");
    let (st, k) = api(c, s, Method::POST, "/auth/api_keys", &token, Some(json!({"name": "scraper"}))).await;
    assert_eq!(st, 201, "{k}");
    k["encoded"].as_str().unwrap().to_string()
}

/// Every `hangar_*` name in the dashboard's queries.
fn dashboard_metric_names() -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/hangar.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if (k == "expr" || k == "query")
                        && let Some(s) = v.as_str()
                    {
                        out.push(s.to_string());
                    }
                    walk(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&doc, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has its panels: {exprs:?}");
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("hangar_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test]
async fn metrics_are_guarded_parse_and_move_with_the_work_done() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(dir.path());
    let mut s = fake.server(&dir.path().join("data"), &[("METRICS_PORT", "0")]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let open_url = metrics_listener(&s);
    assert!(open_url.starts_with("http://127.0.0.1:"), "the metrics listener is on loopback: {open_url}");
    let root_url = format!("{}/metrics", s.url);

    // Who may scrape: nobody without a credential, not a plain user, the role's API key.
    for url in [&root_url, &s.api("/metrics")] {
        let (st, v) = call(&c, Method::GET, url, &Auth::None, None, &[]).await;
        assert_eq!(st, 401, "{url}: {v}");
    }
    let (_, user) = make_user(&c, &s, &root, "plain").await;
    let (st, v) = call(&c, Method::GET, &root_url, &Auth::Bearer(user.clone()), None, &[]).await;
    assert_eq!(st, 403, "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("METRICS_READ"), "{v}");
    let raw_key = metrics_key(&c, &s, &root).await;
    let key = Auth::ApiKey(raw_key.clone());
    let before = scrape(&c, &root_url, &key).await;
    // The same key as a bearer token (what a Prometheus ServiceMonitor can send).
    let _ = scrape(&c, &root_url, &Auth::Bearer(raw_key.clone())).await;
    let (st, v) = call(&c, Method::GET, &root_url, &Auth::Bearer(format!("{raw_key}x")), None, &[]).await;
    assert_eq!(st, 401, "a damaged key as a bearer token: {v}");
    let _ = scrape(&c, &s.api("/metrics"), &key).await;
    let _ = scrape(&c, &root_url, &Auth::Bearer(root.clone())).await;
    // The metrics listener serves /metrics alone, without a credential.
    let _ = scrape(&c, &open_url, &Auth::None).await;
    let other = open_url.replace("/metrics", "/api/v1/health/probe");
    assert_eq!(c.get(&other).send().await.unwrap().status(), 404, "the metrics listener serves nothing else");
    assert!(before.has("hangar_http_requests_total", &[("route", "/auth/token"), ("status", "200")]));
    assert!(before.has("hangar_http_requests_total", &[("route", "/metrics"), ("status", "403")]));

    // A catalog push the server chunks itself from a folder of its own, then the same image
    // with the CLI (its chunks are in the provider already; registered through POST
    // /catalog/push).
    let provider = format!("provider=local-storage;catalog_path={}", dir.path().join("store").display());
    let body = json!({"local_path": fake.images.join("golden.pvm").display().to_string(), "catalog_id": "server-pushed",
        "version": "2.0.0", "architecture": "x86_64", "connection": provider});
    let (st, job) = api(&c, &s, Method::POST, "/catalog/push/async", &root, Some(body)).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &s, &root, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "completed", "{j}");
    push_bundle(&s, &root, dir.path(), &fake.images.join("golden.pvm"), "golden");

    // VMs from the catalog: the first pull fills the host cache, the second is a hit.
    let mut vm_ids = Vec::new();
    for name in ["metrics-vm-1", "metrics-vm-2"] {
        let body = json!({"catalog_id": "golden", "version": "1.0.0", "machine_name": name});
        let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &root, Some(body)).await;
        assert_eq!(st, 200, "{v}");
        vm_ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (st, v) = api(&c, &s, Method::GET, &format!("/machines/{}", vm_ids[0]), &root, None).await;
    assert_eq!(st, 200, "{v}");

    // The reverse proxy: one request forwarded, one whose upstream is down (502).
    let (up, _) = echo_upstream().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let body = json!({"name": "web", "host": "127.0.0.1", "port": "0", "http_routes": [
        {"path": "/up", "target_host": "127.0.0.1", "target_port": up.to_string()},
        {"path": "/down", "target_host": "127.0.0.1", "target_port": closed_port.to_string()}]});
    let (st, h) = api(&c, &s, Method::POST, "/reverse-proxy/hosts", &root, Some(body)).await;
    assert_eq!(st, 201, "{h}");
    let addr = h["listener"]["local_address"].as_str().expect("the listener runs").to_string();
    assert_eq!(c.get(format!("http://{addr}/up/x")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(format!("http://{addr}/down/x")).send().await.unwrap().status(), 502);

    let after = scrape(&c, &open_url, &Auth::None).await;
    let moved = |name: &str, with: &[(&str, &str)], by: f64| {
        let (a, b) = (before.sum(name, with), after.sum(name, with));
        assert!(b - a >= by, "{name}{with:?} moved from {a} to {b}, expected at least +{by}");
    };
    moved("hangar_http_requests_total", &[("route", "/catalog/push"), ("status", "201")], 1.0);
    moved("hangar_http_requests_total", &[("route", "/machines/{id}"), ("status", "200")], 1.0);
    moved("hangar_http_request_duration_seconds_count", &[("route", "/catalog/pull"), ("status_class", "2xx")], 2.0);
    moved("hangar_vm_creates_total", &[("outcome", "ok")], 2.0);
    moved("hangar_vm_create_to_ready_seconds_count", &[], 2.0);
    moved("hangar_image_transfer_bytes_total", &[("direction", "push")], 1.0);
    moved("hangar_image_transfer_duration_seconds_count", &[("direction", "push")], 1.0);
    moved("hangar_image_transfer_duration_seconds_count", &[("direction", "pull")], 1.0);
    moved("hangar_image_transfer_bytes_total", &[("direction", "pull")], 1.0);
    moved("hangar_image_cache_misses_total", &[], 1.0);
    moved("hangar_image_cache_hits_total", &[], 1.0);
    moved("hangar_proxy_requests_total", &[], 2.0);
    moved("hangar_proxy_upstream_errors_total", &[], 1.0);
    moved("hangar_store_commit_duration_seconds_count", &[], 5.0);
    assert!(after.sum("hangar_image_cache_size_bytes", &[]) > 0.0, "the cache holds the image");
    // Route labels are templates: no VM id, user id or other raw path in them.
    for route in after.labels_of("hangar_http_requests_total", "route") {
        assert!(vm_ids.iter().all(|id| !route.contains(id.as_str())), "a raw path as a label: {route}");
        assert!(route == "unmatched" || route.starts_with('/'), "{route}");
    }

    // A restarted server reports the cache it holds from its first scrapes on.
    assert!(s.stop().success());
    let s = fake.server(&dir.path().join("data"), &[("METRICS_PORT", "0")]);
    let url = metrics_listener(&s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while scrape(&c, &url, &Auth::None).await.sum("hangar_image_cache_size_bytes", &[]) <= 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the cache size stays 0 after a restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The orchestrator: a placement onto its one host, whose health and capacity are series.
    let fleet = one_host_fleet(&c, &dir.path().join("fleet"), "api,orchestrator").await;
    let (st, h) =
        call(&c, Method::GET, &fleet.orch.api("/orchestrator/hosts"), &Auth::Bearer(fleet.root.clone()), None, &[])
            .await;
    assert_eq!(st, 200, "{h}");
    let host_id = h[0]["id"].as_str().unwrap().to_string();
    let orch_url = format!("{}/metrics", fleet.orch.url);
    let orch_root = Auth::Bearer(fleet.root.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let orch_before = loop {
        let m = scrape(&c, &orch_url, &orch_root).await;
        if m.sum("hangar_host_up", &[("host", &host_id)]) == 1.0 && m.has("hangar_host_cpu_cores", &[("kind", "total")])
        {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "the host never showed as up with its capacity: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let body = json!({"name": "placed-vm", "image": "golden.pvm", "architecture": "x86_64",
        "specs": {"cpu": "1", "memory": "512"}});
    let (st, v) = call(&c, Method::POST, &fleet.orch.api("/orchestrator/machines"), &orch_root, Some(body), &[]).await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let orch_after = scrape(&c, &orch_url, &orch_root).await;
    let placed = |m: &Scrape| m.sum("hangar_placement_decisions_total", &[("outcome", "placed")]);
    assert!(placed(&orch_after) > placed(&orch_before), "a placement was counted");
    assert!(
        orch_after.sum("hangar_placement_duration_seconds_count", &[])
            > orch_before.sum("hangar_placement_duration_seconds_count", &[])
    );
    for kind in ["total", "reserved", "used"] {
        assert!(orch_after.has("hangar_host_cpu_cores", &[("host", &host_id), ("kind", kind)]), "cpu {kind}");
        assert!(orch_after.has("hangar_host_memory_bytes", &[("host", &host_id), ("kind", kind)]), "memory {kind}");
    }
    assert!(orch_after.sum("hangar_host_memory_bytes", &[("host", &host_id), ("kind", "total")]) > 1e8);
    assert!(orch_after.has("hangar_placement_queue_depth", &[]));

    // Every series the dashboard queries is exported.
    let mut exported = after.names();
    exported.extend(orch_after.names());
    let wanted = dashboard_metric_names();
    let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "the dashboard reads series no scrape has: {missing:?}; exported: {exported:?}");
}
