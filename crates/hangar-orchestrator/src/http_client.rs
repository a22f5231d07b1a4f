//! [`HostClient`] and [`HostConnector`] over HTTP: the orchestrator talks to a host
//! agent's own API (`/api/v1/config/hardware`, `/api/v1/machines...`). A host's
//! registered URL includes the API prefix (`http://host:3080/api`, what
//! [`crate::registry::check_url`] makes of a bare `http://host:3080`).
//!
//! Authentication uses the host's stored credentials: with a username and password the
//! client logs in at `/api/v1/auth/token` and sends the bearer token (logging in again
//! once when the host answers 401); with an API key it sends `X-Api-Key`.
//!
//! Events: the host's websocket is not read yet; [`HttpHostClient::events`] polls the VM
//! list and the hardware every [`HttpConnector::poll_interval`] and ends at the first
//! failure, which is what the scheduler needs to notice a host going away.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use hangar_hypervisor::{HypervisorKind, PowerOp, VmState};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, instrument};

use crate::client::{HostClient, HostClientError, HostConnector, HostCreateVm, HostEvent, VmOp};
use crate::model::{Host, HostCredentials, HostHardware, HostResources, Os, ResourceSet, VmSummary};

/// Makes [`HttpHostClient`]s.
#[derive(Debug, Clone)]
pub struct HttpConnector {
    http: reqwest::Client,
    /// How often the polling event stream looks at the host.
    pub poll_interval: Duration,
}

impl HttpConnector {
    /// A connector with `timeout` on every request (create calls get no overall timeout
    /// here; the scheduler bounds them).
    pub fn new(connect_timeout: Duration) -> Result<Self, HostClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| HostClientError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpConnector { http, poll_interval: Duration::from_secs(2) })
    }

    /// A concrete client for `url` (for operations the [`HostClient`] seam lacks, like exec).
    pub fn client_for(&self, url: &str, credentials: Option<HostCredentials>) -> Arc<HttpHostClient> {
        // Registered URLs carry the API prefix (`http://h:3080/api`); accept `.../api/v1` too.
        let trimmed = url.trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        Arc::new(HttpHostClient {
            http: self.http.clone(),
            base,
            credentials,
            token: Mutex::new(None),
            poll_interval: self.poll_interval,
        })
    }
}

#[async_trait]
impl HostConnector for HttpConnector {
    async fn connect(
        &self,
        host: &Host,
        credentials: Option<HostCredentials>,
    ) -> Result<Arc<dyn HostClient>, HostClientError> {
        Ok(self.client_for(&host.url, credentials))
    }

    async fn probe(
        &self,
        url: &str,
        credentials: Option<HostCredentials>,
    ) -> Result<Arc<dyn HostClient>, HostClientError> {
        Ok(self.client_for(url, credentials))
    }
}

/// One host agent reached over HTTP.
pub struct HttpHostClient {
    http: reqwest::Client,
    base: String,
    credentials: Option<HostCredentials>,
    token: Mutex<Option<String>>,
    poll_interval: Duration,
}

impl std::fmt::Debug for HttpHostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHostClient").field("base", &self.base).field("credentials", &self.credentials).finish()
    }
}

fn transport(e: reqwest::Error) -> HostClientError {
    if e.is_timeout() {
        HostClientError::Timeout(e.to_string())
    } else if e.is_connect() || e.is_request() {
        HostClientError::Unreachable(e.to_string())
    } else {
        HostClientError::Protocol(e.to_string())
    }
}

/// The message of an error body (`{"message": ...}`), or the raw text.
fn message_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.chars().take(500).collect())
}

fn status_error(status: StatusCode, body: &str) -> HostClientError {
    let msg = format!("{} {}", status.as_u16(), message_of(body));
    match status {
        StatusCode::NOT_FOUND => HostClientError::NotFound(msg),
        s if s.is_server_error() && s != StatusCode::INTERNAL_SERVER_ERROR => HostClientError::Unreachable(msg),
        _ => HostClientError::Rejected(msg),
    }
}

/// `"2048Mb"`, `"2 GB"`, `2048` → MiB.
fn parse_mb(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_f64().map(|f| f.max(0.0) as u64).unwrap_or(0),
        Value::String(s) => {
            let t = s.trim().to_ascii_lowercase();
            let digits: String = t.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let n: f64 = digits.parse().unwrap_or(0.0);
            let unit = t[digits.len()..].trim();
            let f = if unit.starts_with('g') {
                1024.0
            } else if unit.starts_with('t') {
                1024.0 * 1024.0
            } else {
                1.0
            };
            (n * f).max(0.0) as u64
        }
        _ => 0,
    }
}

#[derive(Deserialize)]
struct Res {
    #[serde(default)]
    logical_cpu_count: u32,
    #[serde(default)]
    memory_size: f64,
    #[serde(default)]
    disk_size: f64,
}

impl Res {
    fn set(&self) -> ResourceSet {
        ResourceSet::new(self.logical_cpu_count, self.memory_size.max(0.0) as u64, self.disk_size.max(0.0) as u64)
    }
}

#[derive(Deserialize)]
struct Hardware {
    #[serde(default)]
    cpu_type: String,
    #[serde(default)]
    os_name: String,
    #[serde(default)]
    hypervisor: String,
    total: Res,
    system_reserved: Res,
    total_in_use: Res,
    total_available: Res,
}

fn vm_from(v: &Value) -> Option<VmSummary> {
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let id = field("ID");
    if id.is_empty() {
        return None;
    }
    let hw = v.get("Hardware");
    let cpu = hw.and_then(|h| h.pointer("/cpu/cpus")).and_then(Value::as_u64).unwrap_or(0) as u32;
    let memory_mb = hw.and_then(|h| h.pointer("/memory/size")).map(parse_mb).unwrap_or(0);
    let disk_mb = hw.and_then(|h| h.pointer("/hdd0/size")).map(parse_mb).unwrap_or(0);
    let state: VmState = serde_json::from_value(json!(field("State").to_ascii_lowercase())).unwrap_or(VmState::Unknown);
    Some(VmSummary { id, name: field("Name"), state, os: field("OS"), cpu, memory_mb, disk_mb })
}

fn power_path(op: PowerOp) -> (&'static str, Option<String>) {
    match op {
        PowerOp::Start => ("start", None),
        PowerOp::Stop { force, .. } => ("stop", force.then(|| "force=true".to_string())),
        PowerOp::Kill => ("kill", None),
        PowerOp::Pause => ("pause", None),
        PowerOp::Resume => ("resume", None),
        PowerOp::Suspend => ("suspend", None),
        PowerOp::Reset => ("reset", None),
        PowerOp::Restart => ("restart", None),
    }
}

impl HttpHostClient {
    /// The host's base URL (with the API prefix, without `/v1`).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn cached_token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn login(&self, username: &str, password: &str) -> Result<String, HostClientError> {
        let url = format!("{}/v1/auth/token", self.base);
        let resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(30))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = resp.text().await.map_err(transport)?;
        if !status.is_success() {
            return Err(HostClientError::Rejected(format!("login refused: {}", status_error(status, &body))));
        }
        let token = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| HostClientError::Protocol("login answer has no token".into()))?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        fresh_login: bool,
    ) -> Result<(StatusCode, String), HostClientError> {
        let url = format!("{}/v1{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url).timeout(timeout);
        match &self.credentials {
            Some(HostCredentials::ApiKey { api_key }) => req = req.header("X-Api-Key", api_key),
            Some(HostCredentials::Basic { username, password }) => {
                let token = match (fresh_login, self.cached_token()) {
                    (false, Some(t)) => t,
                    _ => self.login(username, password).await?,
                };
                req = req.bearer_auth(token);
            }
            None => {}
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transport)?;
        Ok((status, text))
    }

    /// Sends a request to `{base}/v1{path}` and returns the JSON answer.
    #[instrument(skip(self, body), fields(host = %self.base))]
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, HostClientError> {
        let (mut status, mut text) = self.send_once(&method, path, body.as_ref(), timeout, false).await?;
        if status == StatusCode::UNAUTHORIZED && matches!(self.credentials, Some(HostCredentials::Basic { .. })) {
            debug!("token refused; logging in again");
            (status, text) = self.send_once(&method, path, body.as_ref(), timeout, true).await?;
        }
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| HostClientError::Protocol(format!("{path}: bad JSON: {e}")))
    }

    /// Runs a command in a VM (`PUT /machines/{id}/execute`), returning the host's answer.
    pub async fn execute(&self, vm_id: &str, body: Value, timeout: Duration) -> Result<Value, HostClientError> {
        self.request(Method::PUT, &format!("/machines/{vm_id}/execute"), Some(body), timeout).await
    }

    /// One VM as the host shows it (its full JSON).
    pub async fn machine(&self, vm_id: &str) -> Result<Value, HostClientError> {
        self.request(Method::GET, &format!("/machines/{vm_id}"), None, Duration::from_secs(30)).await
    }
}

#[async_trait]
impl HostClient for HttpHostClient {
    async fn hardware(&self) -> Result<HostHardware, HostClientError> {
        let v = self.request(Method::GET, "/config/hardware", None, Duration::from_secs(30)).await?;
        let hw: Hardware =
            serde_json::from_value(v).map_err(|e| HostClientError::Protocol(format!("hardware answer: {e}")))?;
        let os = Os::parse_lenient(&hw.os_name).unwrap_or(Os::Linux);
        let hypervisor = if hw.hypervisor.to_ascii_lowercase().contains("parallels") {
            HypervisorKind::Parallels
        } else {
            HypervisorKind::Qemu
        };
        let architecture = crate::model::normalize_arch(&hw.cpu_type).unwrap_or_else(|_| "x86_64".to_string());
        let resources = HostResources {
            total: hw.total.set(),
            system_reserved: hw.system_reserved.set(),
            in_use: hw.total_in_use.set(),
            available: hw.total_available.set(),
        };
        Ok(HostHardware { architecture, os, hypervisor, resources, cached_images: vec![], cache_on_vm_volume: true })
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>, HostClientError> {
        let v = self.request(Method::GET, "/machines", None, Duration::from_secs(30)).await?;
        let items = v.as_array().ok_or_else(|| HostClientError::Protocol("machine list is not an array".into()))?;
        Ok(items.iter().filter_map(vm_from).collect())
    }

    async fn create_vm(&self, req: HostCreateVm) -> Result<VmSummary, HostClientError> {
        let mut specs = json!({"cpu": req.cpu.to_string(), "memory": req.memory_mb.to_string()});
        if let Some(d) = req.disk_mb {
            specs["disk"] = json!(d.to_string());
        }
        let mut body = json!({
            "name": req.name,
            "owner": req.owner,
            "architecture": req.architecture,
            "start_on_create": req.start,
            "specs": specs,
        });
        match &req.version {
            Some(v) => {
                body["catalog_manifest"] =
                    json!({"catalog_id": req.image, "version": v, "architecture": req.architecture})
            }
            None => body["image"] = json!(req.image),
        }
        let created = self.request(Method::POST, "/machines", Some(body), Duration::from_secs(3600)).await?;
        let id = created
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| HostClientError::Protocol("create answer has no id".into()))?
            .to_string();
        let full = self.machine(&id).await?;
        vm_from(&full).ok_or_else(|| HostClientError::Protocol("created VM has no ID".into()))
    }

    async fn vm_op(&self, id: &str, op: VmOp) -> Result<(), HostClientError> {
        let t = Duration::from_secs(600);
        match op {
            VmOp::Power { power } => {
                let (verb, query) = power_path(power);
                let path = match query {
                    Some(q) => format!("/machines/{id}/{verb}?{q}"),
                    None => format!("/machines/{id}/{verb}"),
                };
                self.request(Method::PUT, &path, None, t).await?;
            }
            VmOp::Delete { force } => {
                let path = if force { format!("/machines/{id}?force=true") } else { format!("/machines/{id}") };
                self.request(Method::DELETE, &path, None, t).await?;
            }
        }
        Ok(())
    }

    async fn events(&self) -> Result<BoxStream<'static, HostEvent>, HostClientError> {
        // Prove the host answers before handing out a stream.
        self.hardware().await?;
        let me = HttpHostClient {
            http: self.http.clone(),
            base: self.base.clone(),
            credentials: self.credentials.clone(),
            token: Mutex::new(self.cached_token()),
            poll_interval: self.poll_interval,
        };
        let stream = futures::stream::unfold((me, Vec::<HostEvent>::new()), |(me, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop() {
                    return Some((e, (me, pending)));
                }
                tokio::time::sleep(me.poll_interval).await;
                let hw = me.hardware().await.ok()?;
                let vms = me.list_vms().await.ok()?;
                pending.push(HostEvent::Heartbeat);
                pending.push(HostEvent::Resources { resources: hw.resources });
                pending.extend(vms.into_iter().map(|vm| HostEvent::VmChanged { vm }));
            }
        });
        Ok(Box::pin(stream))
    }
}

/// The orchestrator as a running service: the scheduler over HTTP hosts, the connector
/// (for operations outside the [`HostClient`] seam, like exec) and its background tasks.
pub struct HttpOrchestrator {
    /// The scheduler.
    pub scheduler: crate::Scheduler,
    /// The connector the scheduler uses.
    pub connector: HttpConnector,
    _background: crate::scheduler::Background,
}

impl std::fmt::Debug for HttpOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOrchestrator").field("scheduler", &self.scheduler).finish()
    }
}

impl HttpOrchestrator {
    /// Starts the scheduler's background work (health ticks, host checks, the reaper); it
    /// stops when this value is dropped.
    pub fn start(scheduler: crate::Scheduler, connector: HttpConnector, every: crate::BackgroundIntervals) -> Self {
        let background = scheduler.spawn_background(every);
        HttpOrchestrator { scheduler, connector, _background: background }
    }

    /// A client for a registered host, with its stored credentials.
    pub fn host_client(&self, host_id: &str) -> crate::Result<Arc<HttpHostClient>> {
        let registry = self.scheduler.registry();
        let host = registry.get(host_id)?;
        let creds = registry.credentials(&host.id)?;
        Ok(self.connector.client_for(&host.url, creds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_the_host_prints_them() {
        assert_eq!(parse_mb(&json!("2048Mb")), 2048);
        assert_eq!(parse_mb(&json!("2 GB")), 2048);
        assert_eq!(parse_mb(&json!(512)), 512);
        assert_eq!(parse_mb(&json!("junk")), 0);
    }

    #[test]
    fn machines_map_to_summaries() {
        let v = json!({"ID": "a1", "Name": "n", "State": "running", "OS": "ubuntu",
            "Hardware": {"cpu": {"cpus": 2}, "memory": {"size": "1024Mb"}, "hdd0": {"size": "8192Mb", "allocated": "1Mb"}}});
        let s = vm_from(&v).unwrap();
        assert_eq!((s.cpu, s.memory_mb, s.disk_mb, s.state), (2, 1024, 8192, VmState::Running));
        assert!(vm_from(&json!({"Name": "no id"})).is_none());
    }
}
