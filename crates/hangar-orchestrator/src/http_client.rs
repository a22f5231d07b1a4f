//! [`HostClient`] and [`HostConnector`] over HTTP: the orchestrator talks to a host
//! agent's own API (`/api/v1/config/hardware`, `/api/v1/machines...`). A host's
//! registered URL includes the API prefix (`http://host:3080/api`, what
//! [`crate::registry::check_url`] makes of a bare `http://host:3080`).
//!
//! Authentication uses the host's stored credentials: with a username and password the
//! client logs in at `/api/v1/auth/token` and sends the bearer token (logging in again
//! once when the host answers 401); with an API key it sends `X-Api-Key`.
//!
//! Events: [`HttpHostClient::events`] subscribes to the host's websocket
//! (`/api/v1/ws/subscribe?event_types=pdfm,catalog_cache,stats`, with the same credentials as
//! the HTTP calls), then reads the whole state once ([`HostEvent::Synced`]: hardware,
//! catalog cache, VM list). After that only events move the view: `VM_ADDED` and
//! `VM_UPDATED` fetch that one VM, `VM_STATE_CHANGED` and `VM_REMOVED` need no call, and
//! after VM or cache changes the host's resources are read once more (debounced; the host
//! pushes no resource events), cache events re-read the cache list. The stream pings the
//! host every [`EVENT_PING_EVERY`] (the reference's `health` ping) and ends when the
//! connection closes, when the host is silent for [`EVENT_SILENCE_LIMIT`], or when the
//! host reports dropped events, so the scheduler marks the host and resyncs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use hangar_hypervisor::HypervisorKind;
use hangar_wire::{HttpCall, VmCall, VmReply};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, instrument};

use crate::client::{HostClient, HostClientError, HostConnector, HostCreateVm, HostEvent, VmOp};
use crate::model::{CachedImage, Host, HostCredentials, HostHardware, HostResources, Os, ResourceSet, VmSummary};
use crate::tunnel::{self, Tunnel, TunnelError};

/// How often the event stream pings the host.
pub const EVENT_PING_EVERY: Duration = Duration::from_secs(2);
/// Silence (no event, no pong) after which the event stream counts as dead.
pub const EVENT_SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// The event stream's websocket read buffer. Events are small JSON texts (a larger one
/// still arrives: the buffer grows for it); tungstenite's default 128 KiB buffer, zero-filled
/// at each read, cost 128 KiB resident per host, 125 MB of an orchestrator's memory at 1,000
/// hosts (`bench/fleet.sh`).
const EVENT_READ_BUFFER: usize = 4 * 1024;
/// Pause after a VM or cache event before the host's resources are read again, so a burst
/// of events costs one read.
const RESOURCES_DEBOUNCE: Duration = Duration::from_millis(200);

/// Makes [`HttpHostClient`]s.
#[derive(Debug, Clone)]
pub struct HttpConnector {
    http: reqwest::Client,
}

impl HttpConnector {
    /// A connector with `timeout` on every request (create calls get no overall timeout
    /// here; the scheduler bounds them).
    pub fn new(connect_timeout: Duration) -> Result<Self, HostClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| HostClientError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpConnector { http })
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
            logins: tokio::sync::Mutex::new(()),
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
    /// One login at a time: requests made together share it.
    logins: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for HttpHostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHostClient").field("base", &self.base).field("credentials", &self.credentials).finish()
    }
}

fn transport(e: reqwest::Error) -> HostClientError {
    // The cause (a refused certificate, a reset) is in the sources only.
    let message = hangar_core::error_chain(&e);
    if e.is_timeout() {
        HostClientError::Timeout(message)
    } else if e.is_connect() || e.is_request() {
        HostClientError::Unreachable(message)
    } else {
        HostClientError::Protocol(message)
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
        s if s.is_client_error() => HostClientError::Refused { status: s.as_u16(), message: msg },
        s if s.is_server_error() && s != StatusCode::INTERNAL_SERVER_ERROR => HostClientError::Unreachable(msg),
        _ => HostClientError::Rejected(msg),
    }
}

/// A host's machine, as the orchestrator keeps it: the summary placement reads, and the
/// host's whole answer for the orchestrator's own VM answers.
fn summary(m: hangar_wire::Machine) -> VmSummary {
    VmSummary {
        state: m.vm_state(),
        id: m.id.clone(),
        name: m.name.clone(),
        os: m.os.clone(),
        cpu: m.hardware.cpu.cpus,
        memory_mb: m.hardware.memory.size.0,
        disk_mb: m.hardware.hdd0.size.0,
        owner: m.owner.clone(),
        machine: Some(std::sync::Arc::new(m)),
    }
}

/// A host's machine list as summaries, in a vector of its own size. (`collect()` would
/// reuse the list's allocation in place, sized for the much larger `Machine`s: each host
/// view then kept about 3.3 KB per VM unused, 33 MB at 1,000 hosts of 10 VMs,
/// `bench/fleet.sh` under heaptrack.)
fn summaries(items: Vec<hangar_wire::Machine>) -> Vec<VmSummary> {
    let mut out = Vec::with_capacity(items.len());
    out.extend(items.into_iter().map(summary));
    out
}

fn resource_set(r: &hangar_wire::Resources) -> ResourceSet {
    ResourceSet::new(r.logical_cpu_count, r.memory_size.max(0.0) as u64, r.disk_size.max(0.0) as u64)
}

fn typed<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, HostClientError> {
    serde_json::from_value(v).map_err(|e| HostClientError::Protocol(format!("{what}: {e}")))
}

/// The images of a `GET /catalog/cache` answer (`{"manifests": [{catalog_id, version,
/// architecture, ...}]}`), architectures normalised, sorted and without duplicates.
fn cache_list(v: &Value) -> Vec<CachedImage> {
    let mut out: Vec<CachedImage> = v
        .get("manifests")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|m| {
                    let field = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    let (catalog_id, version, arch) = (field("catalog_id"), field("version"), field("architecture"));
                    if catalog_id.is_empty() {
                        return None;
                    }
                    let architecture = crate::model::normalize_arch(&arch).unwrap_or(arch);
                    Some(CachedImage { catalog_id, version, architecture })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

impl HttpHostClient {
    /// The host's base URL (with the API prefix, without `/v1`).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn cached_token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The bearer token: the cached one, or a new login when there is none or `fresh` asks
    /// for one (the cached one was refused). A caller that waited for another's login takes
    /// its token, so requests made together log in once.
    async fn bearer(&self, username: &str, password: &str, fresh: bool) -> Result<String, HostClientError> {
        let before = self.cached_token();
        if !fresh && let Some(t) = &before {
            return Ok(t.clone());
        }
        let _one = self.logins.lock().await;
        if let Some(t) = self.cached_token().filter(|t| before.as_ref() != Some(t)) {
            return Ok(t);
        }
        self.login(username, password).await
    }

    async fn login(&self, username: &str, password: &str) -> Result<String, HostClientError> {
        let url = format!("{}/v1/auth/token", self.base);
        let resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(30))
            .json(&hangar_wire::LoginRequest::password(username, password))
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = resp.text().await.map_err(transport)?;
        if !status.is_success() {
            return Err(HostClientError::Rejected(format!("login refused: {}", status_error(status, &body))));
        }
        let token = serde_json::from_str::<hangar_wire::TokenResponse>(&body)
            .map(|t| t.token)
            .map_err(|e| HostClientError::Protocol(format!("the host's login answer is not a token: {e}")))?;
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
        close: bool,
    ) -> Result<(StatusCode, String), HostClientError> {
        let url = format!("{}/v1{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url).timeout(timeout);
        if close {
            req = req.header(reqwest::header::CONNECTION, "close");
        }
        match &self.credentials {
            Some(HostCredentials::ApiKey { api_key }) => req = req.header("X-Api-Key", api_key),
            Some(HostCredentials::Basic { username, password }) => {
                req = req.bearer_auth(self.bearer(username, password, fresh_login).await?);
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

    /// Sends a request (logging in again once if a bearer token is refused) and returns the
    /// answer's text when its status is a success.
    async fn send(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        close: bool,
    ) -> Result<String, HostClientError> {
        let (mut status, mut text) = self.send_once(method, path, body, timeout, false, close).await?;
        if status == StatusCode::UNAUTHORIZED && matches!(self.credentials, Some(HostCredentials::Basic { .. })) {
            debug!("token refused; logging in again");
            (status, text) = self.send_once(method, path, body, timeout, true, close).await?;
        }
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        Ok(text)
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
        self.request_with(method, path, body, timeout, false).await
    }

    /// [`HttpHostClient::request`], on a connection closed after the answer when `close`: for
    /// large answers (a host's VM list), so the read buffer they grow does not stay with a
    /// pooled connection (~32 KB per host, 31 MB at 1,000 hosts in `bench/fleet.sh`).
    async fn request_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
        close: bool,
    ) -> Result<Value, HostClientError> {
        let text = self.send(&method, path, body.as_ref(), timeout, close).await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| HostClientError::Protocol(format!("{path}: bad JSON: {e}")))
    }

    /// Sends a typed call (its body a shared type) and reads the answer as `T` (use
    /// `serde::de::IgnoredAny` for an answer without a body).
    pub async fn send_call<T: serde::de::DeserializeOwned>(&self, call: &HttpCall) -> Result<T, HostClientError> {
        let method = Method::from_bytes(call.method.as_bytes())
            .map_err(|e| HostClientError::Protocol(format!("bad method {}: {e}", call.method)))?;
        let v = self.request(method, &call.path, call.body.clone(), call.timeout).await?;
        typed(&call.path, v)
    }

    /// Runs one VM call on the host (the same call the host's own API takes) and reads the
    /// answer back as the same reply.
    #[instrument(skip(self, call), fields(host = %self.base, action = call.action().name()))]
    pub async fn call(&self, vm_id: &str, call: &VmCall) -> Result<VmReply, HostClientError> {
        let http = call.request(vm_id);
        let method = Method::from_bytes(http.method.as_bytes())
            .map_err(|e| HostClientError::Protocol(format!("bad method {}: {e}", http.method)))?;
        let v = self.request(method, &http.path, http.body, http.timeout).await?;
        let body = serde_json::to_vec(&v).map_err(|e| HostClientError::Protocol(e.to_string()))?;
        let body: &[u8] = if v.is_null() { b"" } else { &body };
        call.read_reply(body).map_err(|e| HostClientError::Protocol(format!("{}: {e}", http.path)))
    }

    /// A second client for the same host, sharing the connection pool and token.
    fn duplicate(&self) -> HttpHostClient {
        HttpHostClient {
            http: self.http.clone(),
            base: self.base.clone(),
            credentials: self.credentials.clone(),
            token: Mutex::new(self.cached_token()),
            logins: tokio::sync::Mutex::new(()),
        }
    }

    /// The host's own recent log (`/logs`, plain text, one entry per line).
    pub async fn logs(&self) -> Result<hangar_wire::events::LogLines, HostClientError> {
        // Closed after the answer, as the VM list: a log is a large answer.
        let text = self.send(&Method::GET, "/logs", None, Duration::from_secs(30), true).await?;
        Ok(hangar_wire::events::LogLines::from_text(&text))
    }

    /// The host's live log (`/logs/stream`): each new line, until the receiver is dropped or
    /// the host ends the stream.
    pub async fn log_lines(&self) -> Result<tokio::sync::mpsc::Receiver<String>, HostClientError> {
        let url =
            tunnel::ws_url(&self.base, "/v1/logs/stream").map_err(|e| HostClientError::Protocol(e.to_string()))?;
        let mut fresh = false;
        let mut ws = loop {
            let headers = self.auth_headers(fresh).await?;
            let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            match tunnel::connect(&url, &refs).await {
                Ok(ws) => break ws,
                Err(TunnelError::Refused { status: 401, .. })
                    if !fresh && matches!(self.credentials, Some(HostCredentials::Basic { .. })) =>
                {
                    fresh = true;
                }
                Err(TunnelError::Refused { status, message }) => {
                    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                    return Err(status_error(code, &json!({ "message": message }).to_string()));
                }
                Err(e) => return Err(HostClientError::Unreachable(e.to_string())),
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            if tx.send(t.to_string()).await.is_err() {
                                break;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
            let _ = ws.close(None).await;
        });
        Ok(rx)
    }

    /// The host's own `/config/hardware` answer.
    pub async fn hardware_response(&self) -> Result<hangar_wire::HardwareResponse, HostClientError> {
        let v = self.request(Method::GET, "/config/hardware", None, Duration::from_secs(30)).await?;
        typed("hardware answer", v)
    }

    /// Hardware and resources, without the cache list.
    async fn hardware_only(&self) -> Result<HostHardware, HostClientError> {
        let hw = self.hardware_response().await?;
        let os = Os::parse_lenient(&hw.os_name).unwrap_or(Os::Linux);
        let hypervisor = if hw.hypervisor.to_ascii_lowercase().contains("parallels") {
            HypervisorKind::Parallels
        } else {
            HypervisorKind::Qemu
        };
        let architecture = crate::model::normalize_arch(&hw.cpu_type).unwrap_or_else(|_| "x86_64".to_string());
        let resources = HostResources {
            total: resource_set(&hw.total),
            system_reserved: resource_set(&hw.system_reserved),
            in_use: resource_set(&hw.total_in_use),
            available: resource_set(&hw.total_available),
        };
        let details = crate::model::HostDetails::from_hardware(&hw);
        Ok(HostHardware {
            architecture,
            os,
            hypervisor,
            resources,
            cached_images: vec![],
            cache_on_vm_volume: true,
            details,
        })
    }

    /// The catalog images in the host's cache (`GET /catalog/cache`); empty when the host
    /// runs no catalog module or does not let these credentials read its cache.
    pub async fn cached_images(&self) -> Vec<CachedImage> {
        match self.request(Method::GET, "/catalog/cache", None, Duration::from_secs(30)).await {
            Ok(v) => cache_list(&v),
            Err(e) => {
                debug!(host = %self.base, error = %e, "no catalog cache list");
                Vec::new()
            }
        }
    }

    /// The authentication headers for a websocket upgrade.
    async fn auth_headers(&self, fresh_login: bool) -> Result<Vec<(&'static str, String)>, HostClientError> {
        Ok(match &self.credentials {
            Some(HostCredentials::ApiKey { api_key }) => vec![("X-Api-Key", api_key.clone())],
            Some(HostCredentials::Basic { username, password }) => {
                vec![("Authorization", format!("Bearer {}", self.bearer(username, password, fresh_login).await?))]
            }
            None => vec![],
        })
    }

    /// Opens the host's event websocket: VM and cache events, or VM events only when the
    /// credentials may not read the cache; logs in again once when the token is refused.
    #[instrument(skip(self), fields(host = %self.base))]
    async fn subscribe(&self) -> Result<Tunnel, HostClientError> {
        let mut fresh = false;
        let mut types = "pdfm,catalog_cache,stats";
        loop {
            let url = tunnel::ws_url(&self.base, &format!("/v1/ws/subscribe?event_types={types}"))
                .map_err(|e| HostClientError::Protocol(e.to_string()))?;
            let headers = self.auth_headers(fresh).await?;
            let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let config = WebSocketConfig::default().read_buffer_size(EVENT_READ_BUFFER);
            match tunnel::connect_with(&url, &refs, Some(config)).await {
                Ok(ws) => return Ok(ws),
                Err(TunnelError::Refused { status: 401, .. })
                    if !fresh && matches!(self.credentials, Some(HostCredentials::Basic { .. })) =>
                {
                    fresh = true;
                }
                Err(TunnelError::Refused { status: 403, .. }) if types != "pdfm,stats" => types = "pdfm,stats",
                Err(TunnelError::Refused { status, message }) => {
                    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                    return Err(status_error(code, &json!({ "message": message }).to_string()));
                }
                Err(e @ TunnelError::Connect { .. }) => return Err(HostClientError::Unreachable(e.to_string())),
                Err(e @ TunnelError::Tls { .. }) => return Err(HostClientError::Unreachable(e.to_string())),
                Err(e) => return Err(HostClientError::Protocol(e.to_string())),
            }
        }
    }

    /// One VM as the host shows it.
    pub async fn machine(&self, vm_id: &str) -> Result<hangar_wire::Machine, HostClientError> {
        match self.call(vm_id, &VmCall::Get).await? {
            VmReply::Machine(m) => Ok(*m),
            other => Err(HostClientError::Protocol(format!("a machine was expected, not {other:?}"))),
        }
    }
}

#[async_trait]
impl HostClient for HttpHostClient {
    async fn hardware(&self) -> Result<HostHardware, HostClientError> {
        let mut hw = self.hardware_only().await?;
        hw.cached_images = self.cached_images().await;
        Ok(hw)
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>, HostClientError> {
        let v = self.request_with(Method::GET, "/machines", None, Duration::from_secs(30), true).await?;
        let items: Vec<hangar_wire::Machine> = typed("machine list", v)?;
        Ok(summaries(items))
    }

    async fn create_vm(&self, req: HostCreateVm) -> Result<VmSummary, HostClientError> {
        // The Hangar owner goes as `hangar_owner`: on a host `owner` names the OS account the
        // VM runs as (Parallels), not a Hangar user. The host records it, so the VM has the
        // same owner on the host's own routes as through the orchestrator.
        let catalog = req.version.as_ref().map(|v| hangar_wire::CatalogManifestRef {
            catalog_id: req.image.clone(),
            version: Some(v.clone()),
            architecture: Some(req.architecture.clone()),
            connection: req.catalog_connection.clone(),
            catalog_manager_id: None,
            other: Default::default(),
        });
        let body = hangar_wire::CreateMachineRequest {
            name: req.name.clone(),
            hangar_owner: Some(req.owner.clone()),
            architecture: Some(req.architecture.clone()),
            start_on_create: req.start,
            image: catalog.is_none().then(|| req.image.clone()),
            catalog_manifest: catalog,
            specs: Some(hangar_wire::Specs {
                cpu: hangar_wire::Flexible(Some(u64::from(req.cpu))),
                memory: hangar_wire::Flexible(Some(req.memory_mb)),
                disk: hangar_wire::Flexible(req.disk_mb),
            }),
            ..Default::default()
        };
        let body = serde_json::to_value(&body).map_err(|e| HostClientError::Protocol(e.to_string()))?;
        let created = self.request(Method::POST, "/machines", Some(body), Duration::from_secs(3600)).await?;
        let created: hangar_wire::CreateMachineResponse = typed("create answer", created)?;
        Ok(summary(self.machine(&created.id).await?))
    }

    async fn vm_op(&self, id: &str, op: VmOp) -> Result<(), HostClientError> {
        let call = match op {
            VmOp::Power { power } => VmCall::Power(power),
            VmOp::Delete { force } => VmCall::Delete { force },
        };
        self.call(id, &call).await.map(drop)
    }

    async fn events(&self) -> Result<BoxStream<'static, HostEvent>, HostClientError> {
        // Subscribe first, then read the state: no change falls between the two.
        let ws = self.subscribe().await?;
        let me = self.duplicate();
        let synced = HostEvent::Synced { hardware: Box::new(me.hardware().await?), vms: me.list_vms().await? };
        let mut ping = tokio::time::interval(EVENT_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let follow = Follow {
            client: me,
            ws,
            pending: VecDeque::from([synced]),
            ping,
            last_heard: tokio::time::Instant::now(),
            resources_due: None,
        };
        Ok(Box::pin(futures::stream::unfold(follow, |mut f| async move {
            let e = f.next().await?;
            Some((e, f))
        })))
    }

    async fn ping(&self) -> Result<(), HostClientError> {
        self.request(Method::GET, "/health/probe", None, Duration::from_secs(10)).await.map(|_| ())
    }

    async fn vm_call(&self, id: &str, call: &VmCall) -> Result<VmReply, HostClientError> {
        self.call(id, call).await
    }
}

/// The reference's event envelope (the fields the orchestrator reads).
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    body: Value,
}

/// An open event stream being read.
struct Follow {
    client: HttpHostClient,
    ws: Tunnel,
    pending: VecDeque<HostEvent>,
    ping: tokio::time::Interval,
    last_heard: tokio::time::Instant,
    resources_due: Option<tokio::time::Instant>,
}

impl Follow {
    /// The next event, or `None` when the stream is over.
    async fn next(&mut self) -> Option<HostEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            let due = self.resources_due;
            tokio::select! {
                msg = self.ws.next() => {
                    self.last_heard = tokio::time::Instant::now();
                    match msg {
                        Some(Ok(Message::Text(t))) => self.on_text(t.as_str()).await?,
                        Some(Ok(Message::Close(frame))) => {
                            debug!(host = %self.client.base, ?frame, "event stream closed by the host");
                            return None;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            debug!(host = %self.client.base, error = %e, "event stream failed");
                            return None;
                        }
                        None => return None,
                    }
                }
                _ = self.ping.tick() => {
                    if self.last_heard.elapsed() > EVENT_SILENCE_LIMIT {
                        debug!(host = %self.client.base, "event stream silent; giving up on it");
                        return None;
                    }
                    let ping = Message::Text(r#"{"type":"health","message":"ping"}"#.into());
                    if self.ws.send(ping).await.is_err() {
                        return None;
                    }
                }
                _ = async { match due { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    self.resources_due = None;
                    match self.client.hardware_only().await {
                        Ok(hw) => self.pending.push_back(HostEvent::Resources { resources: hw.resources }),
                        Err(e) if e.is_host_down() => return None,
                        Err(e) => debug!(host = %self.client.base, error = %e, "cannot read resources"),
                    }
                }
            }
        }
    }

    fn resources_changed(&mut self) {
        if self.resources_due.is_none() {
            self.resources_due = Some(tokio::time::Instant::now() + RESOURCES_DEBOUNCE);
        }
    }

    /// Turns one message into events; `None` ends the stream.
    async fn on_text(&mut self, text: &str) -> Option<()> {
        let Ok(e) = serde_json::from_str::<Envelope>(text) else {
            debug!(host = %self.client.base, "unreadable event ignored");
            return Some(());
        };
        let vm_id = e.body.get("vm_id").and_then(Value::as_str).unwrap_or_default().to_string();
        match (e.event_type.as_str(), e.message.as_str()) {
            ("pdfm", "VM_ADDED" | "VM_UPDATED") if !vm_id.is_empty() => {
                match self.client.machine(&vm_id).await {
                    Ok(m) => self.pending.push_back(HostEvent::VmChanged { vm: summary(m) }),
                    Err(HostClientError::NotFound(_)) => self.pending.push_back(HostEvent::VmRemoved { id: vm_id }),
                    Err(e) if e.is_host_down() => return None,
                    Err(e) => debug!(host = %self.client.base, vm = %vm_id, error = %e, "cannot read a changed VM"),
                }
                self.resources_changed();
            }
            ("pdfm", "VM_STATE_CHANGED") if !vm_id.is_empty() => {
                let state = e.body.get("current_state").and_then(Value::as_str).unwrap_or_default();
                let state = hangar_wire::parse_state(state);
                self.pending.push_back(HostEvent::VmState { id: vm_id, state });
                self.resources_changed();
            }
            ("pdfm", "VM_REMOVED") if !vm_id.is_empty() => {
                self.pending.push_back(HostEvent::VmRemoved { id: vm_id });
                self.resources_changed();
            }
            ("stats", "System Stats") => self.pending.push_back(HostEvent::Stats { stats: e.body }),
            ("catalog_cache", _) => {
                let images = self.client.cached_images().await;
                self.pending.push_back(HostEvent::CacheChanged { images });
                self.resources_changed();
            }
            // The host's buffer overflowed: what was lost can only be recovered by a resync.
            ("global", "EVENTS_DROPPED") => {
                debug!(host = %self.client.base, "the host dropped events; resyncing");
                return None;
            }
            _ => self.pending.push_back(HostEvent::Heartbeat),
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use hangar_hypervisor::VmState;

    use super::*;

    #[test]
    fn machines_map_to_summaries() {
        let v = json!({"ID": "a1", "Name": "n", "State": "running", "OS": "ubuntu", "owner": "alice",
            "Hardware": {"cpu": {"cpus": 2}, "memory": {"size": "1024Mb"}, "hdd0": {"size": "8192Mb", "allocated": "1Mb"}}});
        let s = summary(typed("machine", v).unwrap());
        assert_eq!((s.cpu, s.memory_mb, s.disk_mb, s.state), (2, 1024, 8192, VmState::Running));
        assert_eq!(s.owner.as_deref(), Some("alice"));
        assert_eq!(s.machine.as_ref().map(|m| m.hardware.hdd0.allocated.0), Some(1), "the whole answer is kept");
        assert!(typed::<hangar_wire::Machine>("machine", json!({"Name": "no id"})).is_err());
    }

    #[test]
    fn a_machine_list_keeps_no_room_sized_for_machines() {
        let items: Vec<hangar_wire::Machine> = (0..10)
            .map(|i| {
                typed("machine", json!({"ID": format!("vm{i}"), "Name": format!("n{i}"), "State": "stopped"})).unwrap()
            })
            .collect();
        let s = summaries(items);
        assert_eq!(s.len(), 10);
        assert_eq!(s.capacity(), 10, "no capacity left over from the Machine list");
        assert_eq!(s[3].id, "vm3");
    }
}
