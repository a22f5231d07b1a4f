//! A fleet simulator for benchmarks: one process that plays many host agents, so an
//! orchestrator's memory, CPU, event fan-in and placement can be measured at scale without
//! a process (or a machine) per host.
//!
//! Each simulated host listens on its own loopback port (one listener per host, as real
//! hosts are separate `host:port` origins: the orchestrator keeps one connection pool entry,
//! one event websocket and one health probe per host) and serves the part of a host agent's
//! API the orchestrator uses (`crates/hangar-orchestrator/src/http_client.rs`), every body
//! a `hangar-wire` type (the same the API serves and the orchestrator reads, login and
//! errors included):
//!
//! - `POST /api/v1/auth/token` (`root` and the host's password) and `X-Api-Key` (or the key
//!   as a bearer) on every other route but `/health/probe`;
//! - `GET /api/v1/config/hardware`, `GET /api/v1/catalog/cache` (empty),
//!   `GET|POST /api/v1/machines`, `GET|DELETE /api/v1/machines/{id}`,
//!   `PUT /api/v1/machines/{id}/{start|stop|...}`, `GET /api/v1/health/probe`;
//! - `GET /api/v1/ws/subscribe`: the event envelope of `hangar_core::events::Event`
//!   (`CLIENT_SUBSCRIBED`, then `pdfm` `VM_ADDED`/`VM_STATE_CHANGED`/`VM_REMOVED`), a
//!   `health` `pong` for each client ping, `EVENTS_DROPPED` when a reader falls behind.
//!
//! VMs are whole `hangar_wire::Machine` objects (every reference key), so the orchestrator
//! keeps what it would keep for a real host. [`Fleet::change_states`] flips random VMs
//! between `running` and `stopped` at a given rate; [`SimHost::set_state`] is the one place
//! a state changes and its event is sent. The orchestrator side (registration, readiness,
//! lag probes, creates, `/proc` samples) is in [`measure`].

pub mod measure;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hangar_core::events::{Event, EventType};
use hangar_hypervisor::{HypervisorKind, VmInfo, VmState};
use hangar_wire::{
    ApiErrorBody, CatalogCacheList, CreateMachineRequest, CreateMachineResponse, HardwareResponse, LoginRequest,
    Machine, MachineStatus, Probe, Resources, TokenResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// The user name a simulated host accepts at `/auth/token`.
pub const USERNAME: &str = "root";
/// Events a host keeps for a slow reader before it reports `EVENTS_DROPPED`.
const EVENT_BUFFER: usize = 1024;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("Cannot listen on {addr}: {source} (choose another --base-port, or 0 for any free port)")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("The orchestrator: {0}")]
    Orchestrator(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The fleet's shape.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// How many hosts.
    pub hosts: usize,
    /// VMs each host starts with.
    pub vms_per_host: usize,
    /// Host `i` listens on `base_port + i`; 0 takes any free port for each.
    pub base_port: u16,
    /// Host names are `{prefix}-{i:05}`.
    pub name_prefix: String,
    /// Each host's size.
    pub host_cpus: u32,
    pub host_memory_mb: u64,
    pub host_disk_mb: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            hosts: 1000,
            vms_per_host: 10,
            base_port: 0,
            name_prefix: "sim".into(),
            host_cpus: 64,
            host_memory_mb: 262_144,
            host_disk_mb: 4_000_000,
        }
    }
}

/// A small xorshift generator: enough to pick VMs, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Seeded from a fresh UUID.
    pub fn random() -> Rng {
        Rng::new(uuid::Uuid::new_v4().as_u64_pair().0)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One simulated VM.
#[derive(Debug, Clone)]
struct SimVm {
    machine: Machine,
    /// A lag probe owns it: the background changes leave it alone.
    pinned: bool,
}

/// `VM_STATE_CHANGED`'s body, as a host agent sends it.
#[derive(Debug, Serialize)]
struct StateChanged<'a> {
    vm_id: &'a str,
    previous_state: &'a str,
    current_state: &'a str,
}

/// `VM_ADDED`'s and `VM_REMOVED`'s body (the orchestrator reads `vm_id`).
#[derive(Debug, Serialize)]
struct VmRef<'a> {
    vm_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// `CLIENT_SUBSCRIBED`'s body.
#[derive(Debug, Serialize)]
struct Subscribed {
    client_id: String,
    event_types: Vec<&'static str>,
    user: &'static str,
}

/// `EVENTS_DROPPED`'s body.
#[derive(Debug, Serialize)]
struct Dropped {
    dropped: u64,
}

/// A client's ping (`{"type":"health","message":"ping"}`).
#[derive(Debug, Deserialize)]
struct Ping {
    message: Option<String>,
}

/// One simulated host agent.
pub struct SimHost {
    pub index: usize,
    pub name: String,
    /// The API base the orchestrator registers (`http://127.0.0.1:port/api`).
    pub url: String,
    /// The `X-Api-Key` it accepts.
    pub api_key: String,
    /// `root`'s password at `/auth/token`.
    pub password: String,
    total: Resources,
    tokens: Mutex<HashSet<String>>,
    vms: Mutex<BTreeMap<String, SimVm>>,
    events: broadcast::Sender<Utf8Bytes>,
    next_vm: AtomicU64,
    /// Events sent (every kind), for the report.
    pub sent: AtomicU64,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost").field("name", &self.name).field("url", &self.url).finish()
    }
}

/// A VM as a QEMU host agent would list it (every reference key, through
/// [`Machine::from_vm`]).
fn machine(
    host: usize,
    n: u64,
    name: &str,
    state: VmState,
    cpus: u32,
    memory_mb: u64,
    owner: Option<String>,
) -> Machine {
    let ip = IpAddr::V4(Ipv4Addr::new(10, (host >> 8) as u8, (host & 0xff) as u8, (n % 250) as u8 + 2));
    let info = VmInfo {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
        description: String::new(),
        state,
        os: "ubuntu".into(),
        home: PathBuf::from(format!("/var/lib/hangar/vms/{name}")),
        cpus,
        memory_mb,
        disk_bytes: 6 << 30,
        disk_virtual_bytes: 64 << 30,
        ip_addresses: vec![ip],
        owner: Some("ci".into()),
        hypervisor: HypervisorKind::Qemu,
        architecture: "x86_64".into(),
        is_template: false,
        details: serde_json::Map::new(),
    };
    Machine::from_vm(info, owner)
}

fn event_text(e: &Event) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(e).unwrap_or_default())
}

fn body<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn toggled(s: VmState) -> VmState {
    if s == VmState::Running { VmState::Stopped } else { VmState::Running }
}

impl SimHost {
    fn new(index: usize, name: String, url: String, cfg: &SimConfig) -> SimHost {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let host = SimHost {
            index,
            name,
            url,
            api_key: format!("sim{}", uuid::Uuid::new_v4().simple()),
            password: format!("Sim-{}", uuid::Uuid::new_v4().simple()),
            total: Resources::new(cfg.host_cpus, cfg.host_memory_mb, cfg.host_disk_mb),
            tokens: Mutex::new(HashSet::new()),
            vms: Mutex::new(BTreeMap::new()),
            events,
            next_vm: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        };
        {
            let mut vms = lock(&host.vms);
            for _ in 0..cfg.vms_per_host {
                let n = host.next_vm.fetch_add(1, Ordering::Relaxed);
                let state = if n.is_multiple_of(2) { VmState::Running } else { VmState::Stopped };
                let m = machine(index, n, &format!("{}-vm{n:03}", host.name), state, 2, 4096, None);
                vms.insert(m.id.clone(), SimVm { machine: m, pinned: false });
            }
        }
        host
    }

    fn emit(&self, e: &Event) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        // No subscriber yet is fine: the orchestrator resyncs when it connects.
        let _ = self.events.send(event_text(e));
    }

    /// How many event streams are open on this host.
    pub fn subscribers(&self) -> usize {
        self.events.receiver_count()
    }

    /// The ids of this host's VMs.
    pub fn vm_ids(&self) -> Vec<String> {
        lock(&self.vms).keys().cloned().collect()
    }

    /// A VM's current state.
    pub fn state_of(&self, vm_id: &str) -> Option<VmState> {
        lock(&self.vms).get(vm_id).map(|v| v.machine.vm_state())
    }

    /// Sets a VM's state and sends `VM_STATE_CHANGED` (under the lock, so events leave in
    /// the order the changes were made). False when there is no such VM.
    pub fn set_state(&self, vm_id: &str, state: VmState) -> bool {
        let mut vms = lock(&self.vms);
        let Some(vm) = vms.get_mut(vm_id) else { return false };
        let previous = vm.machine.vm_state();
        vm.machine.state = state.as_str().into();
        let e = Event::new(
            EventType::Pdfm,
            "VM_STATE_CHANGED",
            body(&StateChanged { vm_id, previous_state: previous.as_str(), current_state: state.as_str() }),
        );
        self.emit(&e);
        true
    }

    /// Pins a random VM that is not pinned yet (for a lag probe) and returns its id and
    /// current state.
    pub fn pin_random(&self, rng: &mut Rng) -> Option<(String, VmState)> {
        let mut vms = lock(&self.vms);
        let free = vms.values().filter(|v| !v.pinned).count();
        if free == 0 {
            return None;
        }
        let k = rng.below(free);
        let vm = vms.values_mut().filter(|v| !v.pinned).nth(k)?;
        vm.pinned = true;
        Some((vm.machine.id.clone(), vm.machine.vm_state()))
    }

    /// Gives a pinned VM back to the background changes.
    pub fn unpin(&self, vm_id: &str) {
        if let Some(v) = lock(&self.vms).get_mut(vm_id) {
            v.pinned = false;
        }
    }

    /// Flips a random unpinned VM between running and stopped.
    fn flip_random(&self, rng: &mut Rng) -> bool {
        let mut vms = lock(&self.vms);
        let free = vms.values().filter(|v| !v.pinned).count();
        if free == 0 {
            return false;
        }
        let k = rng.below(free);
        let Some(vm) = vms.values_mut().filter(|v| !v.pinned).nth(k) else { return false };
        let previous = vm.machine.vm_state();
        let state = toggled(previous);
        vm.machine.state = state.as_str().into();
        let e = Event::new(
            EventType::Pdfm,
            "VM_STATE_CHANGED",
            body(&StateChanged {
                vm_id: &vm.machine.id,
                previous_state: previous.as_str(),
                current_state: state.as_str(),
            }),
        );
        self.emit(&e);
        true
    }

    fn hardware(&self) -> HardwareResponse {
        let vms = lock(&self.vms);
        let (mut cpu, mut mem, mut disk, mut running) = (0u32, 0u64, 0u64, 0usize);
        for v in vms.values() {
            cpu += v.machine.hardware.cpu.cpus;
            mem += v.machine.hardware.memory.size.0;
            disk += v.machine.hardware.hdd0.size.0;
            running += usize::from(v.machine.vm_state() == VmState::Running);
        }
        drop(vms);
        let reserved = Resources::new(2, 4096, 50_000);
        let in_use = Resources::new(cpu, mem, disk);
        let available = Resources::new(
            self.total.logical_cpu_count.saturating_sub(reserved.logical_cpu_count + cpu),
            (self.total.memory_size - reserved.memory_size - mem as f64).max(0.0) as u64,
            (self.total.disk_size - reserved.disk_size - disk as f64).max(0.0) as u64,
        );
        HardwareResponse {
            cpu_type: "x86_64".into(),
            cpu_brand: "Simulated CPU".into(),
            devops_version: env!("CARGO_PKG_VERSION").into(),
            os_name: "linux".into(),
            os_version: "6.1".into(),
            hypervisor: "qemu".into(),
            hypervisor_version: "9.2".into(),
            acceleration: "kvm".into(),
            external_ip_address: "127.0.0.1".into(),
            total: self.total.clone(),
            system_reserved: reserved,
            total_in_use: in_use,
            total_reserved: Resources::default(),
            total_available: available,
            running_vms: running,
            enabled_modules: vec!["api".into(), "host".into()],
            ..Default::default()
        }
    }
}

/// An error answer in Hangar's shape.
fn error(status: StatusCode, slug: &str, message: impl Into<String>) -> Response {
    let b = ApiErrorBody { code: status.as_u16(), error: slug.into(), message: message.into(), request_id: None };
    (status, Json(b)).into_response()
}

fn bad_json(e: &JsonRejection) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", format!("The body is not valid: {}", e.body_text()))
}

fn not_found(vm: &str) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", format!("VM {vm} not found"))
}

type Host = State<Arc<SimHost>>;

async fn authenticate(State(h): Host, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok =
        key.is_some_and(|k| k == h.api_key) || bearer.is_some_and(|t| t == h.api_key || lock(&h.tokens).contains(t));
    if ok {
        next.run(req).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required: send 'Authorization: Bearer <token>' (from POST /api/v1/auth/token) or 'X-Api-Key'",
        )
    }
}

async fn login(State(h): Host, req: Result<Json<LoginRequest>, JsonRejection>) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_json(&e),
    };
    let user = req.username.as_deref().or(req.email.as_deref());
    if user != Some(USERNAME) || req.password.as_deref() != Some(h.password.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "Invalid username or password");
    }
    let token = format!("{}.{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    lock(&h.tokens).insert(token.clone());
    let expires_at = (chrono::Utc::now() + chrono::Duration::hours(12)).timestamp();
    Json(TokenResponse { token, email: format!("{USERNAME}@{}", h.name), expires_at }).into_response()
}

async fn probe() -> Json<Probe> {
    Json(Probe { status: "OK".into() })
}

async fn hardware(State(h): Host) -> Json<HardwareResponse> {
    Json(h.hardware())
}

async fn cache() -> Json<CatalogCacheList> {
    Json(CatalogCacheList { total_size: 0, manifests: Vec::new() })
}

async fn list(State(h): Host) -> Json<Vec<Machine>> {
    Json(lock(&h.vms).values().map(|v| v.machine.clone()).collect())
}

async fn one(State(h): Host, Path(id): Path<String>) -> Response {
    match lock(&h.vms).get(&id) {
        Some(v) => Json(v.machine.clone()).into_response(),
        None => not_found(&id),
    }
}

async fn create(State(h): Host, req: Result<Json<CreateMachineRequest>, JsonRejection>) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_json(&e),
    };
    if req.name.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_request", "A VM needs a name");
    }
    let specs = req.specs.clone().unwrap_or_default();
    let cpus = specs.cpu.0.unwrap_or(2).clamp(1, 256) as u32;
    let memory = specs.memory.0.unwrap_or(4096).max(256);
    let state = if req.start_on_create { VmState::Running } else { VmState::Stopped };
    let owner = req.hangar_owner.clone().or(req.owner.clone());
    let n = h.next_vm.fetch_add(1, Ordering::Relaxed);
    let m = machine(h.index, n, &req.name, state, cpus, memory, owner.clone());
    let answer = CreateMachineResponse {
        id: m.id.clone(),
        name: m.name.clone(),
        owner: owner.unwrap_or_default(),
        current_state: state.as_str().into(),
    };
    let mut vms = lock(&h.vms);
    if vms.values().any(|v| v.machine.name == req.name) {
        return error(StatusCode::CONFLICT, "conflict", format!("A VM named {:?} already exists", req.name));
    }
    let e = Event::new(EventType::Pdfm, "VM_ADDED", body(&VmRef { vm_id: &m.id, name: Some(&m.name) }));
    vms.insert(m.id.clone(), SimVm { machine: m, pinned: false });
    h.emit(&e);
    drop(vms);
    Json(answer).into_response()
}

async fn delete(State(h): Host, Path(id): Path<String>) -> Response {
    let mut vms = lock(&h.vms);
    if vms.remove(&id).is_none() {
        return not_found(&id);
    }
    h.emit(&Event::new(EventType::Pdfm, "VM_REMOVED", body(&VmRef { vm_id: &id, name: None })));
    StatusCode::ACCEPTED.into_response()
}

async fn power(State(h): Host, Path((id, verb)): Path<(String, String)>) -> Response {
    let state = match verb.as_str() {
        "start" | "restart" | "reset" | "resume" => VmState::Running,
        "stop" | "kill" => VmState::Stopped,
        "pause" => VmState::Paused,
        "suspend" => VmState::Suspended,
        other => return error(StatusCode::NOT_FOUND, "not_found", format!("No operation {other:?}")),
    };
    if !h.set_state(&id, state) {
        return not_found(&id);
    }
    let name = lock(&h.vms).get(&id).map(|v| v.machine.name.clone()).unwrap_or_default();
    Json(MachineStatus { id, name, status: state.as_str().into(), ip_configured: "-".into(), host_id: None })
        .into_response()
}

async fn subscribe(State(h): Host, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| stream(h, socket))
}

async fn stream(h: Arc<SimHost>, mut socket: WebSocket) {
    let mut rx = h.events.subscribe();
    let hello = Event::new(
        EventType::Global,
        "CLIENT_SUBSCRIBED",
        body(&Subscribed {
            client_id: uuid::Uuid::now_v7().to_string(),
            event_types: vec!["global", "pdfm", "catalog_cache", "stats"],
            user: USERNAME,
        }),
    );
    if socket.send(Message::Text(event_text(&hello))).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Ok(text) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let warn = Event::new(EventType::Global, "EVENTS_DROPPED", body(&Dropped { dropped: n }));
                    if socket.send(Message::Text(event_text(&warn))).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    if serde_json::from_str::<Ping>(t.as_str()).ok().and_then(|p| p.message).as_deref() == Some("ping") {
                        let pong = Event::new(EventType::Health, "pong", serde_json::Value::Null);
                        if socket.send(Message::Text(event_text(&pong))).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The host agent's routes, for one simulated host.
pub fn router(h: Arc<SimHost>) -> Router {
    let guarded = Router::new()
        .route("/config/hardware", get(hardware))
        .route("/catalog/cache", get(cache))
        .route("/machines", get(list).post(create))
        .route("/machines/{id}", get(one).delete(delete))
        .route("/machines/{id}/{verb}", put(power))
        .route("/ws/subscribe", get(subscribe))
        .route_layer(middleware::from_fn_with_state(h.clone(), authenticate));
    let open = Router::new().route("/auth/token", post(login)).route("/health/probe", get(probe));
    Router::new().nest("/api/v1", guarded.merge(open)).with_state(h)
}

/// The running fleet.
pub struct Fleet {
    pub hosts: Vec<Arc<SimHost>>,
    servers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("hosts", &self.hosts.len()).finish()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl Fleet {
    /// Binds every host's listener on 127.0.0.1 and starts serving.
    pub async fn start(cfg: &SimConfig) -> Result<Fleet, SimError> {
        let mut hosts = Vec::with_capacity(cfg.hosts);
        let mut servers = Vec::with_capacity(cfg.hosts);
        for i in 0..cfg.hosts {
            let port = if cfg.base_port == 0 {
                0
            } else {
                u16::try_from(usize::from(cfg.base_port) + i).map_err(|_| {
                    SimError::Io(std::io::Error::other(format!(
                        "--base-port {} + {} hosts runs past port 65535",
                        cfg.base_port, cfg.hosts
                    )))
                })?
            };
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| SimError::Listen { addr, source })?;
            let bound = listener.local_addr()?;
            let name = format!("{}-{i:05}", cfg.name_prefix);
            let host = Arc::new(SimHost::new(i, name, format!("http://{bound}/api"), cfg));
            let app = router(host.clone());
            servers.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(error = %e, "a simulated host stopped serving");
                }
            }));
            hosts.push(host);
        }
        Ok(Fleet { hosts, servers })
    }

    /// Every VM of the fleet.
    pub fn vm_count(&self) -> usize {
        self.hosts.iter().map(|h| lock(&h.vms).len()).sum()
    }

    /// Events sent by every host so far.
    pub fn events_sent(&self) -> u64 {
        self.hosts.iter().map(|h| h.sent.load(Ordering::Relaxed)).sum()
    }

    /// Open event streams over the fleet.
    pub fn subscribers(&self) -> usize {
        self.hosts.iter().map(|h| h.subscribers()).sum()
    }

    /// Pins a random VM of a random host: the host, the VM's id and its state.
    pub fn pin_random(&self, rng: &mut Rng) -> Option<(Arc<SimHost>, String, VmState)> {
        if self.hosts.is_empty() {
            return None;
        }
        let h = self.hosts[rng.below(self.hosts.len())].clone();
        let (id, state) = h.pin_random(rng)?;
        Some((h, id, state))
    }

    /// Flips random VMs between running and stopped, `per_second` changes a second over
    /// the whole fleet, until `stop` is set; returns how many it made.
    pub async fn change_states(&self, per_second: f64, stop: &AtomicBool) -> u64 {
        let mut rng = Rng::random();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let start = tokio::time::Instant::now();
        let mut made = 0u64;
        if per_second <= 0.0 || self.hosts.is_empty() {
            return 0;
        }
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let due = (start.elapsed().as_secs_f64() * per_second) as u64;
            while made < due {
                let h = &self.hosts[rng.below(self.hosts.len())];
                h.flip_random(&mut rng);
                made += 1;
            }
        }
        made
    }
}

/// The state a probe moves a VM to.
pub fn next_state(s: VmState) -> VmState {
    toggled(s)
}
