//! The orchestrator side of a fleet benchmark: register the simulated hosts, wait until the
//! orchestrator shows them healthy with every VM, then measure event-to-state lag (a probe
//! changes a VM's state on its simulated host and polls `GET /orchestrator/machines/{id}`
//! until the orchestrator shows it), creates through `POST /orchestrator/machines`, and the
//! orchestrator process's memory and CPU from `/proc`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hangar_orchestrator::{HostState, HostView};
use hangar_wire::{FleetMachine, Flexible, OrchestratorCreateRequest, OrchestratorCreated, Specs};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::{Fleet, Rng, SimError, SimHost, USERNAME, next_state};

/// How the orchestrator is to authenticate to the simulated hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostAuth {
    /// `X-Api-Key` with each host's key.
    ApiKey,
    /// `root` and each host's password (the orchestrator logs in at `/auth/token`).
    Password,
}

/// `POST /orchestrator/hosts`: what `hangar_orchestrator::RegisterHost` reads (that type
/// only deserialises, so its credentials can never be printed back; the test below checks
/// this body reads as one).
#[derive(Debug, Serialize)]
pub struct Registration<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub description: &'a str,
    pub authentication: Credential<'a>,
}

/// The credentials of a [`Registration`], in `HostCredentials`' untagged shapes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Credential<'a> {
    ApiKey { api_key: &'a str },
    Basic { username: &'a str, password: &'a str },
}

impl<'a> Registration<'a> {
    pub fn of(h: &'a SimHost, auth: HostAuth) -> Registration<'a> {
        let authentication = match auth {
            HostAuth::ApiKey => Credential::ApiKey { api_key: &h.api_key },
            HostAuth::Password => Credential::Basic { username: USERNAME, password: &h.password },
        };
        Registration { name: &h.name, host: &h.url, description: "hangar-fleet-sim", authentication }
    }
}

/// An orchestrator reached over HTTP with an API key.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    http: reqwest::Client,
    /// `http://host:port/api/v1`.
    api: String,
    key: String,
}

/// p50, p99, max and count of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<Duration>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort();
        let at = |p: f64| {
            let i = ((v.len() as f64 - 1.0) * p).round() as usize;
            v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
        };
        Percentiles { n: v.len(), p50_ms: at(0.50), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// A process's memory and CPU time, from `/proc/<pid>/status` and `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcSample {
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// utime + stime, in clock ticks (100 a second on Linux).
    pub cpu_ticks: u64,
    pub threads: u64,
}

/// Clock ticks a second (`getconf CLK_TCK`; 100 on every Linux the bench runs on).
pub const CLK_TCK: f64 = 100.0;

impl ProcSample {
    pub fn read(pid: u32) -> Result<ProcSample, SimError> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces, inside parentheses).
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(ProcSample {
            rss_kb: field("VmRSS:"),
            hwm_kb: field("VmHWM:"),
            cpu_ticks: n(11) + n(12),
            threads: field("Threads:"),
        })
    }
}

/// What [`Orchestrator::wait_ready`] saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub hosts_healthy: usize,
    pub vms_listed: usize,
    pub seconds: f64,
    /// The orchestrator's VmRSS once every host was healthy with every VM, before the first
    /// whole machine list (which costs the orchestrator far more than its steady state; the
    /// allocator may keep that memory afterwards). With a process id only.
    #[serde(default)]
    pub rss_kb_before_list: Option<u64>,
}

/// Lag probes' results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lag {
    pub lag: Percentiles,
    /// Probes whose change the orchestrator did not show within the deadline.
    pub missed: u64,
    /// Polls sent.
    pub polls: u64,
}

/// Creates' results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Creates {
    pub latency: Percentiles,
    pub failed: usize,
    pub first_error: Option<String>,
    pub concurrency: usize,
}

fn err(what: &str, e: impl std::fmt::Display) -> SimError {
    SimError::Orchestrator(format!("{what}: {e}"))
}

impl Orchestrator {
    /// `url` is the server's root (`http://127.0.0.1:8080`); `api_key` an `X-Api-Key` value
    /// of a user who may register hosts, list and create VMs.
    pub fn new(url: &str, api_key: &str) -> Result<Orchestrator, SimError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| err("cannot build the HTTP client", e))?;
        let root = url.trim_end_matches('/');
        let root = root.strip_suffix("/api/v1").or_else(|| root.strip_suffix("/api")).unwrap_or(root);
        Ok(Orchestrator { http, api: format!("{root}/api/v1"), key: api_key.to_string() })
    }

    async fn call<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, SimError> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.api)).header("X-Api-Key", &self.key);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| err(&format!("{method} {path}"), e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let text: String = text.chars().take(300).collect();
            return Err(err(&format!("{method} {path}"), format!("{status} {text}")));
        }
        resp.json::<T>().await.map_err(|e| err(&format!("{method} {path}: the answer"), e))
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, SimError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// Registers every host (`concurrency` at a time); returns their ids.
    pub async fn register(&self, fleet: &Fleet, auth: HostAuth, concurrency: usize) -> Result<Vec<String>, SimError> {
        let results: Vec<Result<String, SimError>> = futures::stream::iter(fleet.hosts.iter())
            .map(|h| async move {
                let v: HostView =
                    self.call(Method::POST, "/orchestrator/hosts", Some(&Registration::of(h, auth))).await?;
                Ok(v.view.id)
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The orchestrator's view of the simulated hosts (`GET /orchestrator/hosts`): (healthy
    /// hosts, VMs in their views).
    pub async fn census(&self, fleet: &Fleet) -> Result<(usize, usize), SimError> {
        let names: HashSet<&str> = fleet.hosts.iter().map(|h| h.name.as_str()).collect();
        let hosts: Vec<HostView> = self.get("/orchestrator/hosts").await?;
        let ours = hosts.iter().filter(|h| names.contains(h.view.name.as_str()));
        let (mut healthy, mut vms) = (0, 0);
        for h in ours {
            healthy += usize::from(h.view.state == HostState::Healthy);
            vms += h.view.vms.len();
        }
        Ok((healthy, vms))
    }

    /// How many VMs of the simulated hosts `GET /orchestrator/machines` lists (the whole
    /// fleet's answer, every VM with every key).
    pub async fn listed(&self, fleet: &Fleet) -> Result<usize, SimError> {
        let names: HashSet<&str> = fleet.hosts.iter().map(|h| h.name.as_str()).collect();
        let vms: Vec<FleetMachine> = self.get("/orchestrator/machines").await?;
        Ok(vms.iter().filter(|m| names.contains(m.host.as_str())).count())
    }

    /// Waits (polling the host list once a second, at most `timeout`) until every simulated
    /// host is healthy with every VM in its view, then checks once that the machine list
    /// holds every VM (polled on the host list: the whole machine list costs the
    /// orchestrator a copy of every VM per call).
    /// With `pid`, samples the orchestrator's VmRSS just before that list.
    pub async fn wait_ready(&self, fleet: &Fleet, timeout: Duration, pid: Option<u32>) -> Result<Ready, SimError> {
        let start = Instant::now();
        let want = (fleet.hosts.len(), fleet.vm_count());
        let mut rss_kb_before_list = None;
        loop {
            let seen = self.census(fleet).await?;
            if seen.0 >= want.0 && seen.1 >= want.1 {
                if rss_kb_before_list.is_none() {
                    rss_kb_before_list = pid.and_then(|p| ProcSample::read(p).ok()).map(|s| s.rss_kb);
                }
                let listed = self.listed(fleet).await?;
                if listed >= want.1 {
                    return Ok(Ready {
                        hosts_healthy: seen.0,
                        vms_listed: listed,
                        seconds: start.elapsed().as_secs_f64(),
                        rss_kb_before_list,
                    });
                }
            }
            if start.elapsed() > timeout {
                return Err(SimError::Orchestrator(format!(
                    "after {timeout:?}: {} of {} hosts healthy, {} of {} VMs in their views",
                    seen.0, want.0, seen.1, want.1
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One lag probe: flips a pinned VM on its host, then polls the orchestrator's view of it
    /// every `poll` until it shows the new state (`None` after `deadline`).
    async fn probe(
        &self,
        host: &SimHost,
        vm: &str,
        from: hangar_hypervisor::VmState,
        poll: Duration,
        deadline: Duration,
        polls: &AtomicU64,
    ) -> Option<Duration> {
        let target = next_state(from);
        let t0 = Instant::now();
        host.set_state(vm, target);
        let path = format!("/orchestrator/machines/{vm}");
        loop {
            polls.fetch_add(1, Ordering::Relaxed);
            if let Ok(m) = self.get::<FleetMachine>(&path).await
                && m.state == target.as_str()
            {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > deadline {
                return None;
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Runs `probers` lag probers until `stop` is set, each probing a random VM, then
    /// pausing `pause`.
    pub async fn lag_probes(
        &self,
        fleet: &Fleet,
        probers: usize,
        poll: Duration,
        pause: Duration,
        stop: &AtomicBool,
    ) -> Lag {
        let polls = AtomicU64::new(0);
        let missed = AtomicU64::new(0);
        let runs = (0..probers.max(1)).map(|_| async {
            let mut rng = Rng::random();
            let mut got = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some((host, vm, from)) = fleet.pin_random(&mut rng) {
                    match self.probe(&host, &vm, from, poll, Duration::from_secs(10), &polls).await {
                        Some(d) => got.push(d),
                        None => {
                            missed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    host.unpin(&vm);
                }
                tokio::time::sleep(pause).await;
            }
            got
        });
        let all: Vec<Duration> = futures::future::join_all(runs).await.into_iter().flatten().collect();
        Lag { lag: Percentiles::of(all), missed: missed.load(Ordering::Relaxed), polls: polls.load(Ordering::Relaxed) }
    }

    /// `n` creates through `POST /orchestrator/machines`, `concurrency` at a time, each
    /// timed from request to answer (placement, the host's create and the orchestrator's
    /// durable record).
    pub async fn creates(&self, n: usize, concurrency: usize, tag: &str) -> Creates {
        let results: Vec<Result<Duration, SimError>> = futures::stream::iter(0..n)
            .map(|i| async move {
                let req = OrchestratorCreateRequest {
                    name: format!("{tag}-{i:05}"),
                    architecture: Some("x86_64".into()),
                    start_on_create: true,
                    image: Some("sim-image".into()),
                    specs: Some(Specs { cpu: Flexible(Some(1)), memory: Flexible(Some(1024)), disk: Flexible(None) }),
                    os: Some("linux".into()),
                    ..Default::default()
                };
                let t = Instant::now();
                let _: OrchestratorCreated = self.call(Method::POST, "/orchestrator/machines", Some(&req)).await?;
                Ok(t.elapsed())
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut ok = Vec::new();
        let mut failed = 0;
        let mut first_error = None;
        for r in results {
            match r {
                Ok(d) => ok.push(d),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        Creates { latency: Percentiles::of(ok), failed, first_error, concurrency }
    }

    /// Whether the orchestrator answers its liveness probe.
    pub async fn alive(&self) -> bool {
        matches!(
            self.http.get(format!("{}/health/probe", self.api)).send().await.map(|r| r.status()),
            Ok(StatusCode::OK)
        )
    }
}

/// Samples `pid` every `every` until `stop` is set: the largest VmRSS seen.
pub async fn watch_rss(pid: u32, every: Duration, stop: Arc<AtomicBool>) -> u64 {
    let mut max = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(s) = ProcSample::read(pid) {
            max = max.max(s.rss_kb);
        }
        tokio::time::sleep(every).await;
    }
    max
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use hangar_orchestrator::{HostCredentials, RegisterHost};

    use super::*;

    #[test]
    fn a_registration_reads_as_the_orchestrators_register_host() {
        for (auth, want) in [
            (Credential::ApiKey { api_key: "k1" }, HostCredentials::ApiKey { api_key: "k1".into() }),
            (
                Credential::Basic { username: "root", password: "pw" },
                HostCredentials::Basic { username: "root".into(), password: "pw".into() },
            ),
        ] {
            let r =
                Registration { name: "sim-1", host: "http://127.0.0.1:1/api", description: "d", authentication: auth };
            let read: RegisterHost = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
            assert_eq!(read.name.as_deref(), Some("sim-1"));
            assert_eq!(read.url, "http://127.0.0.1:1/api");
            assert_eq!(read.credentials, Some(want));
        }
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(v);
        assert_eq!((p.n, p.p50_ms.round(), p.p99_ms.round(), p.max_ms.round()), (100, 51.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(Vec::new()).n, 0);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = ProcSample::read(std::process::id()).unwrap();
        assert!(s.rss_kb > 0 && s.hwm_kb >= s.rss_kb && s.threads >= 1, "{s:?}");
    }
}
