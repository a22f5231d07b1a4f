//! The scheduler service: registry + health + placement + reservations + host clients.
//!
//! Creating a VM: validate, place and reserve (optionally waiting in the queue), call the
//! chosen host's [`HostClient::create_vm`] while renewing the reservation, then confirm
//! (the host view counts the VM, the VM record with its expiry is written with an audit
//! entry, the reservation is released) or roll back (release, mark the host if it is down,
//! try the next host up to [`SchedulerConfig::create_attempts`] times).
//!
//! The host view counts a VM's CPU and memory while it is active and its disk always, like
//! the hosts themselves; every change to a host's VM list goes through one pair of helpers
//! so the counts stay consistent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::{Event, EventBus, EventType};
use hangar_hypervisor::{HypervisorKind, PowerOp, VmState};
use hangar_store::{Batch, StoreError};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, instrument, warn};

use crate::client::{HostClient, HostClientError, HostConnector, HostCreateVm, HostEvent, VmOp};
use crate::clock::{self, Clock};
use crate::error::{OrchestratorError, Result};
use crate::health::{HealthConfig, HostHealth, Observation, Transition};
use crate::model::*;
use crate::placement::{Caller, ImageRef, NoCapacity, PlacementRequest, Profile};
use crate::registry::{HostRegistry, check_url};
use crate::reservations::{Granted, Reservation, Reservations};

/// How the scheduler behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Spread or pack.
    pub profile: Profile,
    /// How long a reservation holds without renewal.
    pub reservation_ttl: Duration,
    /// Hosts tried per create before giving up.
    pub create_attempts: usize,
    /// Health thresholds.
    pub health: HealthConfig,
    /// Timeout of hardware, list and VM operation calls.
    pub call_timeout: Duration,
    /// Timeout of one create call on a host (image pulls can be long).
    pub create_timeout: Duration,
    /// TTL of VMs whose request names none; `None`: they never expire.
    pub default_vm_ttl: Option<Duration>,
    /// Longest TTL (and extension) allowed; `None`: no limit.
    pub max_vm_ttl: Option<Duration>,
    /// CPUs when the request names none (the reference's 2).
    pub default_cpu: u32,
    /// Memory when the request names none (the reference's 2048 MiB).
    pub default_memory_mb: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            profile: Profile::Spread,
            reservation_ttl: Duration::from_secs(600),
            create_attempts: 3,
            health: HealthConfig::default(),
            call_timeout: Duration::from_secs(10),
            create_timeout: Duration::from_secs(3600),
            default_vm_ttl: None,
            max_vm_ttl: None,
            default_cpu: 2,
            default_memory_mb: 2048,
        }
    }
}

/// A request to create a VM somewhere in the fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateVm {
    /// VM name.
    pub name: String,
    /// Catalog id or local image name.
    pub image: String,
    /// Catalog version.
    pub version: Option<String>,
    /// Image size in MiB, when known (disk rule).
    pub image_size_mb: Option<u64>,
    /// `x86_64` or `arm64` (aliases accepted).
    pub architecture: String,
    /// Guest OS.
    pub os: Option<Os>,
    /// Required hypervisor.
    pub hypervisor: Option<HypervisorKind>,
    /// CPUs (default from the config).
    pub cpu: Option<u32>,
    /// Memory in MiB (default from the config).
    pub memory_mb: Option<u64>,
    /// Disk in MiB.
    pub disk_mb: Option<u64>,
    /// Tags the host must have.
    pub tags: BTreeSet<String>,
    /// Pin to a host (id or name).
    pub host: Option<String>,
    /// The user the VM is for.
    pub owner: String,
    /// Start it once created.
    pub start: bool,
    /// Delete it this long after creation; `None`: the configured default.
    pub ttl: Option<Duration>,
    /// Queue priority (higher first).
    pub priority: i32,
    /// Wait up to this long in the queue when nothing fits; `None`: fail at once.
    pub wait: Option<Duration>,
}

/// A step of a VM creation, reported while it happens (what an async create job shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateProgress {
    /// Looking for a host (attempt 1, then one more per host that failed the create).
    Placing {
        /// Attempt number, from 1.
        attempt: usize,
        /// Why the previous attempt's host failed the create (from attempt 2).
        previous_failure: Option<String>,
    },
    /// Nothing fits now: the request waits in the queue.
    Queued {
        /// Why nothing fits, per group of hosts.
        reason: String,
        /// The request's queue priority.
        priority: i32,
    },
    /// A host was chosen and capacity reserved on it; the host is creating the VM.
    Creating {
        /// The chosen host.
        host_id: String,
        /// Attempt number, from 1.
        attempt: usize,
    },
}

/// Receives [`CreateProgress`] reports.
pub type ProgressFn<'a> = &'a (dyn Fn(CreateProgress) + Send + Sync);

/// What one reaper pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReapReport {
    /// VMs deleted.
    pub deleted: Vec<String>,
    /// VMs whose deletion failed (id, error); tried again next pass.
    pub failed: Vec<(String, String)>,
}

/// Intervals of the background loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundIntervals {
    /// Silence detection, reservation expiry and queue service.
    pub tick: Duration,
    /// Lightweight health check of every host whose event stream is up (a ping, no
    /// listing), and start of event streams for hosts that have none. Hosts whose stream is
    /// down are checked by its reconnection attempts instead.
    pub check: Duration,
    /// VM TTL reaper.
    pub reap: Duration,
}

impl Default for BackgroundIntervals {
    fn default() -> Self {
        BackgroundIntervals {
            tick: Duration::from_secs(1),
            check: Duration::from_secs(2),
            reap: Duration::from_secs(30),
        }
    }
}

/// Background tasks; dropping this stops them (the event streams included).
#[derive(Debug)]
pub struct Background {
    handles: Vec<JoinHandle<()>>,
    scheduler: Option<Scheduler>,
}

impl Drop for Background {
    fn drop(&mut self) {
        for h in &self.handles {
            h.abort();
        }
        if let Some(s) = &self.scheduler {
            s.stop_watchers();
        }
    }
}

/// Longest pause between two attempts to reopen a host's event stream.
pub const RECONNECT_CAP: Duration = Duration::from_secs(5);
const RECONNECT_FIRST: Duration = Duration::from_millis(250);

/// The pause before reconnection attempt `attempt` (0-based): 250 ms doubling up to
/// [`RECONNECT_CAP`], each multiplied by a random factor in [0.5, 1) so hosts that went
/// away together do not all come back at the same instant.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let base = RECONNECT_FIRST.saturating_mul(1u32 << attempt.min(16)).min(RECONNECT_CAP);
    let mut b = [0u8; 2];
    let r = if aws_lc_rs::rand::fill(&mut b).is_ok() { u16::from_le_bytes(b) } else { u16::MAX / 2 };
    base.mul_f64(0.5 + f64::from(r) / f64::from(u16::MAX) / 2.0)
}

/// One host's event-stream follower.
struct Watcher {
    task: tokio::task::AbortHandle,
    /// The stream is open (its first resync applied).
    connected: Arc<AtomicBool>,
    /// Ends the current stream (a failed health check) so it is reopened and resynced.
    reset: Arc<tokio::sync::Notify>,
}

fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| OrchestratorError::Internal(format!("serialise: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a VM counts for on its host: CPU and memory while active, disk always.
fn accounted(vm: &VmSummary) -> ResourceSet {
    let active = vm.is_active();
    ResourceSet::new(if active { vm.cpu } else { 0 }, if active { vm.memory_mb } else { 0 }, vm.disk_mb)
}

/// Adds or replaces a VM in a host view, adjusting its counts.
fn view_upsert(h: &mut Host, vm: VmSummary) {
    let new = accounted(&vm);
    let old = match h.vms.iter_mut().find(|v| v.id == vm.id) {
        Some(slot) => Some(accounted(&std::mem::replace(slot, vm))),
        None => {
            h.vms.push(vm);
            None
        }
    };
    if let Some(r) = h.resources.as_mut() {
        if let Some(old) = old {
            r.remove_vm(old);
        }
        r.add_vm(new);
    }
}

/// Removes a VM from a host view, adjusting its counts; a VM not listed changes nothing.
fn view_remove(h: &mut Host, id: &str) -> Option<VmSummary> {
    let pos = h.vms.iter().position(|v| v.id == id)?;
    let vm = h.vms.remove(pos);
    if let Some(r) = h.resources.as_mut() {
        r.remove_vm(accounted(&vm));
    }
    Some(vm)
}

struct Inner {
    registry: Arc<HostRegistry>,
    ledger: Reservations,
    connector: Arc<dyn HostConnector>,
    clock: Arc<dyn Clock>,
    bus: EventBus,
    config: SchedulerConfig,
    clients: Mutex<HashMap<String, Arc<dyn HostClient>>>,
    health: Mutex<HashMap<String, HostHealth>>,
    busy_vms: Mutex<HashSet<String>>,
    /// VMs confirmed per host, with a sequence number, so a refresh that started before a
    /// confirmation does not drop the VM from the counts.
    recent: Mutex<HashMap<String, Vec<(u64, VmSummary)>>>,
    seq: AtomicU64,
    /// Event-stream followers per host.
    watchers: Mutex<HashMap<String, Watcher>>,
    /// The background runs: new hosts get a follower at once.
    following: AtomicBool,
}

/// The scheduler. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("hosts", &self.inner.registry.len())
            .field("reservations", &self.inner.ledger.len())
            .finish()
    }
}

/// Marks a VM busy (being deleted or extended) for as long as it lives.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

impl Scheduler {
    /// A scheduler over `registry`, reaching hosts through `connector`.
    pub fn new(
        registry: Arc<HostRegistry>,
        connector: Arc<dyn HostConnector>,
        bus: EventBus,
        config: SchedulerConfig,
    ) -> Self {
        let clock = registry.clock().clone();
        let now = clock.now();
        let health = registry.ids().into_iter().map(|id| (id, HostHealth::new(now, config.health))).collect();
        Scheduler {
            inner: Arc::new(Inner {
                ledger: Reservations::new(clock.clone(), config.reservation_ttl),
                registry,
                connector,
                clock,
                bus,
                config,
                clients: Mutex::new(HashMap::new()),
                health: Mutex::new(health),
                busy_vms: Mutex::new(HashSet::new()),
                recent: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(1),
                watchers: Mutex::new(HashMap::new()),
                following: AtomicBool::new(false),
            }),
        }
    }

    /// The host registry.
    pub fn registry(&self) -> &Arc<HostRegistry> {
        &self.inner.registry
    }

    /// The reservation ledger.
    pub fn reservations(&self) -> &Reservations {
        &self.inner.ledger
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }

    fn publish(&self, message: &str, body: Value) {
        self.inner.bus.publish(Event::new(EventType::Orchestrator, message, body));
    }

    fn busy(&self, vm_id: &str) -> Result<BusyGuard<'_>> {
        if !lock(&self.inner.busy_vms).insert(vm_id.to_string()) {
            return Err(OrchestratorError::Conflict(format!("VM {vm_id} is being changed or deleted; try again")));
        }
        Ok(BusyGuard { set: &self.inner.busy_vms, id: vm_id.to_string() })
    }

    // ----- hosts ---------------------------------------------------------------------

    /// A client for a host (cached until the host changes).
    pub async fn client(&self, host_id: &str) -> Result<Arc<dyn HostClient>> {
        if let Some(c) = lock(&self.inner.clients).get(host_id) {
            return Ok(c.clone());
        }
        let host = self.inner.registry.get(host_id)?;
        let creds = self.inner.registry.credentials(&host.id)?;
        let c = self
            .inner
            .connector
            .connect(&host, creds)
            .await
            .map_err(|source| OrchestratorError::Host { host: host.id.clone(), source })?;
        lock(&self.inner.clients).insert(host.id.clone(), c.clone());
        Ok(c)
    }

    fn forget_host(&self, host_id: &str) {
        lock(&self.inner.clients).remove(host_id);
        lock(&self.inner.recent).remove(host_id);
    }

    async fn probe(&self, url: &str, creds: Option<HostCredentials>) -> Result<(HostHardware, Vec<VmSummary>)> {
        let url = check_url(url)?;
        let host_err = |source| OrchestratorError::Host { host: url.clone(), source };
        let client = self.inner.connector.probe(&url, creds).await.map_err(host_err)?;
        let t = self.inner.config.call_timeout;
        let hw = timed(t, "hardware", client.hardware()).await.map_err(host_err)?;
        let vms = timed(t, "list VMs", client.list_vms()).await.map_err(host_err)?;
        Ok((hw, vms))
    }

    async fn adopt(&self, host: Host, vms: Vec<VmSummary>) -> Result<Host> {
        let now = self.inner.clock.now();
        lock(&self.inner.health).insert(host.id.clone(), HostHealth::new(now, self.inner.config.health));
        let t = self.apply_observation(&host.id, Observation::CheckSucceeded)?;
        let host = self.inner.registry.persist_status(&host.id, Batch::new(), None, |h| h.vms = vms).await?;
        if let Some(t) = &t {
            self.announce(&host, t);
        }
        if self.inner.following.load(Ordering::SeqCst) {
            drop(self.watch_events(&host.id));
        }
        Ok(host)
    }

    /// Registers a host after checking that it answers (the reference fails registration
    /// when the host's hardware cannot be read).
    #[instrument(skip(self, actor, req), fields(url = %req.url))]
    pub async fn register_host(&self, actor: &Actor, req: RegisterHost) -> Result<Host> {
        let (hw, vms) = self.probe(&req.url, req.credentials.clone()).await?;
        let host = self.inner.registry.register(actor, req, Some(hw)).await?;
        self.adopt(host, vms).await
    }

    /// Registers a host with a single-use enrollment token (the agent's `join`).
    #[instrument(skip_all, fields(url = %req.url))]
    pub async fn join_with_token(&self, token: &str, req: RegisterHost) -> Result<Host> {
        self.inner.registry.validate_enrollment_token(token).await?;
        let (hw, vms) = self.probe(&req.url, req.credentials.clone()).await?;
        let host = self.inner.registry.register_with_token(token, req, Some(hw)).await?;
        self.adopt(host, vms).await
    }

    /// Changes a host's configuration.
    pub async fn update_host(&self, actor: &Actor, id: &str, change: UpdateHost) -> Result<Host> {
        let h = self.inner.registry.update(actor, id, change).await?;
        lock(&self.inner.clients).remove(&h.id);
        self.restart_watcher(&h.id);
        self.drain();
        Ok(h)
    }

    /// Takes a host in or out of scheduling.
    pub async fn set_host_enabled(&self, actor: &Actor, id: &str, enabled: bool) -> Result<Host> {
        let id = self.inner.registry.get(id)?.id;
        let h = self.inner.registry.set_enabled(actor, &id, enabled).await?;
        self.drain();
        Ok(h)
    }

    /// Unregisters a host. Its VMs are not touched.
    pub async fn delete_host(&self, actor: &Actor, id: &str) -> Result<Host> {
        let id = self.inner.registry.get(id)?.id;
        let h = self.inner.registry.delete(actor, &id).await?;
        self.forget_host(&id);
        if let Some(w) = lock(&self.inner.watchers).remove(&id) {
            w.task.abort();
        }
        lock(&self.inner.health).remove(&id);
        Ok(h)
    }

    // ----- health ----------------------------------------------------------------------

    /// Feeds an observation about a host into its health machine. On a transition the new
    /// state is written, `HOST_HEALTH_UPDATE` is published, the VMs of a host that went
    /// unhealthy become `unknown`, and a host that came back is offered to waiting requests.
    pub async fn observe(&self, host_id: &str, obs: Observation) -> Result<Option<Transition>> {
        let transition = self.apply_observation(host_id, obs)?;
        if let Some(t) = &transition {
            let host = self.inner.registry.persist_status(host_id, Batch::new(), None, |_| {}).await?;
            self.announce(&host, t);
        }
        Ok(transition)
    }

    /// The in-memory half of [`Scheduler::observe`]: feeds the machine and updates the view.
    fn apply_observation(&self, host_id: &str, obs: Observation) -> Result<Option<Transition>> {
        let now = self.inner.clock.now();
        let mut health = lock(&self.inner.health);
        let h = health.entry(host_id.to_string()).or_insert_with(|| HostHealth::new(now, self.inner.config.health));
        let t = h.observe(now, obs);
        let (state, last_seen, last_error) = (h.state(), h.last_seen(), h.last_error().map(str::to_string));
        // Applied in memory under the health lock, so views follow the machine's order.
        let found = self.inner.registry.update_in_memory(host_id, |host| {
            host.state = state;
            host.last_seen = last_seen;
            host.last_error = last_error;
            if state != HostState::Healthy {
                for vm in &mut host.vms {
                    vm.state = VmState::Unknown;
                }
            }
        });
        if !found {
            health.remove(host_id);
            return Err(OrchestratorError::not_found("host", host_id));
        }
        Ok(t)
    }

    /// Publishes a transition (after it was written) and serves waiters if the host is back.
    fn announce(&self, host: &Host, t: &Transition) {
        info!(host = %host.id, from = %t.from, to = %t.to, reason = ?t.reason, "host health changed");
        self.publish(
            "HOST_HEALTH_UPDATE",
            json!({
                "host_id": host.id,
                "name": host.name,
                "state": t.to,
                "previous": t.from,
                "last_seen": host.last_seen,
                "reason": t.reason,
            }),
        );
        if t.to == HostState::Healthy {
            self.drain();
        }
    }

    /// Runs silence detection over every host.
    pub async fn tick(&self) -> Vec<(String, Transition)> {
        let mut out = Vec::new();
        for id in self.inner.registry.ids() {
            if let Ok(Some(t)) = self.observe(&id, Observation::Tick).await {
                out.push((id, t));
            }
        }
        self.inner.ledger.purge_expired();
        self.drain();
        out
    }

    /// Reads a host's hardware and VMs; success refreshes its view and marks it healthy,
    /// failure marks it unhealthy with the error. (A full resync on demand; the event
    /// stream resyncs by itself at each (re)connection.)
    #[instrument(skip(self))]
    pub async fn check_host(&self, host_id: &str) -> Result<Host> {
        let started_at = self.inner.seq.load(Ordering::SeqCst);
        let client = match self.client(host_id).await {
            Ok(c) => c,
            Err(OrchestratorError::Host { source, .. }) => {
                self.observe(host_id, Observation::CheckFailed(source.to_string())).await?;
                return self.inner.registry.get(host_id);
            }
            Err(e) => return Err(e),
        };
        let t = self.inner.config.call_timeout;
        let answer = async { Ok::<_, HostClientError>((client.hardware().await?, client.list_vms().await?)) };
        match timed(t, "hardware and VM list", answer).await {
            Ok((hw, vms)) => {
                self.apply_sync(host_id, &hw, vms, started_at);
                self.observe(host_id, Observation::CheckSucceeded).await?;
                self.drain();
                self.inner.registry.get(host_id)
            }
            Err(e) => {
                if e.is_host_down() {
                    lock(&self.inner.clients).remove(host_id);
                }
                self.observe(host_id, Observation::CheckFailed(e.to_string())).await?;
                self.inner.registry.get(host_id)
            }
        }
    }

    /// Replaces a host's view with a full read of it (started when the VM sequence was at
    /// `started_at`), keeping VMs confirmed since then that the read may predate.
    fn apply_sync(&self, host_id: &str, hw: &HostHardware, vms: Vec<VmSummary>, started_at: u64) {
        let recent: Vec<VmSummary> = {
            let mut recent = lock(&self.inner.recent);
            let list = recent.entry(host_id.to_string()).or_default();
            list.retain(|(seq, _)| *seq >= started_at);
            list.iter().map(|(_, vm)| vm.clone()).collect()
        };
        self.inner.registry.update_in_memory(host_id, |h| {
            h.apply_hardware(hw);
            h.vms = vms;
            for vm in recent {
                if !h.vms.iter().any(|v| v.id == vm.id) {
                    view_upsert(h, vm);
                }
            }
            h.resources = h.resources.map(|r| r.covering(&h.vms));
        });
    }

    /// The lightweight health check of every host: hosts whose event stream is up are
    /// pinged (a failure counts against the host and reopens its stream); hosts whose
    /// stream is down are left to its reconnection attempts, which are their check; hosts
    /// without a stream follower (no background running) get a full [`Scheduler::check_host`].
    pub async fn check_all(&self) {
        let ids = self.inner.registry.ids();
        let timeout = self.inner.config.call_timeout.min(Duration::from_secs(3));
        futures::stream::iter(ids)
            .for_each_concurrent(64, |id| async move {
                let watcher = lock(&self.inner.watchers)
                    .get(&id)
                    .map(|w| (w.connected.clone(), w.reset.clone(), w.task.is_finished()));
                let (connected, reset) = match watcher {
                    Some((c, r, false)) => (c, r),
                    Some((_, _, true)) => return,
                    None => {
                        if let Err(e) = self.check_host(&id).await {
                            debug!(host = %id, error = %e, "host check");
                        }
                        return;
                    }
                };
                if !connected.load(Ordering::SeqCst) {
                    return;
                }
                let client = match self.client(&id).await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(host = %id, error = %e, "health check: no client");
                        return;
                    }
                };
                let result = timed(timeout, "health check", client.ping()).await;
                // The stream may have closed meanwhile: it reported that itself.
                if !connected.load(Ordering::SeqCst) {
                    return;
                }
                let healthy = self.inner.registry.get(&id).map(|h| h.state == HostState::Healthy).unwrap_or(false);
                match result {
                    // A healthy host stays so; an unhealthy one comes back through a resync.
                    Ok(()) if healthy => {
                        let _ = self.observe(&id, Observation::Heartbeat).await;
                    }
                    Ok(()) => reset.notify_one(),
                    Err(e) => {
                        let _ = self.observe(&id, Observation::CheckFailed(format!("health check: {e}"))).await;
                        reset.notify_one();
                    }
                }
            })
            .await;
    }

    /// Applies one event pushed by a host.
    pub async fn handle_event(&self, host_id: &str, event: HostEvent) -> Result<()> {
        let now = self.inner.seq.load(Ordering::SeqCst);
        self.apply_event(host_id, event, now).await
    }

    /// [`Scheduler::handle_event`] for a stream opened when the VM sequence was at `since`.
    async fn apply_event(&self, host_id: &str, event: HostEvent, since: u64) -> Result<()> {
        let mut freed = false;
        let synced = matches!(event, HostEvent::Synced { .. });
        match event {
            HostEvent::Heartbeat => {}
            HostEvent::VmChanged { vm } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| view_upsert(h, vm));
            }
            HostEvent::VmState { id, state } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| {
                    if let Some(vm) = h.vms.iter().find(|v| v.id == id).cloned() {
                        view_upsert(h, VmSummary { state, ..vm });
                    }
                });
            }
            HostEvent::VmRemoved { id } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| {
                    view_remove(h, &id);
                });
            }
            HostEvent::Resources { resources } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| h.resources = Some(resources.covering(&h.vms)));
            }
            HostEvent::CacheChanged { images } => {
                self.inner.registry.update_in_memory(host_id, |h| h.cached_images = images);
            }
            HostEvent::Synced { hardware, vms } => {
                freed = true;
                self.apply_sync(host_id, &hardware, vms, since);
            }
        }
        // Heard from: healthy (after the view changed, so a host coming back shows its
        // VMs' real states, never `unknown` ones, once healthy).
        let t = self.observe(host_id, Observation::Heartbeat).await?;
        if freed {
            self.drain();
        }
        if !synced && t.is_some_and(|t| t.from == HostState::Unhealthy) {
            // Back without a resync (silence ended while the stream stayed open): the VM
            // list is stale; refresh it in the background.
            let me = self.clone();
            let id = host_id.to_string();
            tokio::spawn(async move {
                let _ = me.check_host(&id).await;
            });
        }
        Ok(())
    }

    /// Follows a host's event stream until the host is unregistered: each (re)connection
    /// starts with a full resync, a closed stream counts at once as a failed check, and
    /// reconnection attempts back off ([`reconnect_delay`], at most [`RECONNECT_CAP`]).
    /// Replaces an earlier follower of the same host.
    pub fn watch_events(&self, host_id: &str) -> JoinHandle<()> {
        let connected = Arc::new(AtomicBool::new(false));
        let reset = Arc::new(tokio::sync::Notify::new());
        let me = self.clone();
        let id = host_id.to_string();
        let (c, r) = (connected.clone(), reset.clone());
        let handle = tokio::spawn(
            async move { me.follow(&id, &c, &r).await }.instrument(tracing::info_span!("host_events", host = %host_id)),
        );
        let old = lock(&self.inner.watchers)
            .insert(host_id.to_string(), Watcher { task: handle.abort_handle(), connected, reset });
        if let Some(old) = old {
            old.task.abort();
        }
        handle
    }

    async fn follow(&self, id: &str, connected: &AtomicBool, reset: &tokio::sync::Notify) {
        let mut attempt = 0u32;
        loop {
            if self.inner.registry.get(id).is_err() {
                return;
            }
            let since = self.inner.seq.load(Ordering::SeqCst);
            let opened = match self.client(id).await {
                Ok(c) => timed(self.inner.config.call_timeout, "opening the event stream", c.events()).await,
                Err(OrchestratorError::Host { source, .. }) => Err(source),
                Err(OrchestratorError::NotFound { .. }) => return,
                Err(e) => Err(HostClientError::Protocol(e.to_string())),
            };
            match opened {
                Ok(mut stream) => {
                    debug!(host = %id, "event stream open");
                    attempt = 0;
                    let why = loop {
                        tokio::select! {
                            e = stream.next() => match e {
                                Some(e) => {
                                    match self.apply_event(id, e, since).await {
                                        Ok(()) => connected.store(true, Ordering::SeqCst),
                                        Err(OrchestratorError::NotFound { .. }) => return,
                                        Err(e) => debug!(host = %id, error = %e, "event not applied"),
                                    }
                                }
                                None => break "the host's event stream closed".to_string(),
                            },
                            _ = reset.notified() => break "the host failed a health check".to_string(),
                        }
                    };
                    connected.store(false, Ordering::SeqCst);
                    lock(&self.inner.clients).remove(id);
                    debug!(host = %id, reason = %why, "event stream ended");
                    let _ = self.observe(id, Observation::CheckFailed(why)).await;
                }
                Err(e) => {
                    if e.is_host_down() {
                        lock(&self.inner.clients).remove(id);
                    }
                    let _ = self.observe(id, Observation::CheckFailed(e.to_string())).await;
                }
            }
            tokio::time::sleep(reconnect_delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// Starts event-stream followers for hosts that have none and stops those of hosts
    /// that are gone.
    fn watch_all(&self) {
        let ids: HashSet<String> = self.inner.registry.ids().into_iter().collect();
        let missing: Vec<String> = {
            let mut w = lock(&self.inner.watchers);
            w.retain(|id, watcher| {
                let keep = ids.contains(id) && !watcher.task.is_finished();
                if !keep {
                    watcher.task.abort();
                }
                keep
            });
            ids.iter().filter(|id| !w.contains_key(*id)).cloned().collect()
        };
        for id in missing {
            drop(self.watch_events(&id));
        }
    }

    /// Reopens a host's event stream (after its URL or credentials changed).
    fn restart_watcher(&self, host_id: &str) {
        if let Some(w) = lock(&self.inner.watchers).get(host_id) {
            w.reset.notify_one();
        }
    }

    /// Stops every event-stream follower.
    fn stop_watchers(&self) {
        self.inner.following.store(false, Ordering::SeqCst);
        for (_, w) in lock(&self.inner.watchers).drain() {
            w.task.abort();
        }
    }

    /// Whether a host's event stream is open.
    pub fn events_connected(&self, host_id: &str) -> bool {
        lock(&self.inner.watchers).get(host_id).is_some_and(|w| w.connected.load(Ordering::SeqCst))
    }

    // ----- placement ----------------------------------------------------------------------

    /// Builds the placement request for a create request.
    pub fn placement_request(&self, req: &CreateVm, caller: Caller) -> Result<PlacementRequest> {
        let cfg = &self.inner.config;
        let cpu = req.cpu.unwrap_or(cfg.default_cpu);
        let memory_mb = req.memory_mb.unwrap_or(cfg.default_memory_mb);
        if cpu == 0 || memory_mb == 0 {
            return Err(OrchestratorError::Invalid("a VM needs at least 1 CPU and 1 MiB of memory".into()));
        }
        let image = (!req.image.is_empty()).then(|| ImageRef {
            catalog_id: req.image.clone(),
            version: req.version.clone().unwrap_or_default(),
            size_mb: req.image_size_mb,
        });
        Ok(PlacementRequest {
            resources: ResourceSet::new(cpu, memory_mb, req.disk_mb.unwrap_or(0)),
            architecture: normalize_arch(&req.architecture)?,
            os: req.os,
            hypervisor: req.hypervisor,
            image,
            tags: req.tags.clone(),
            host: req.host.clone(),
            caller,
            exclude: BTreeSet::new(),
        })
    }

    /// Serves waiting requests that fit now.
    pub fn drain(&self) -> usize {
        if self.inner.ledger.waiting() == 0 {
            return 0;
        }
        let profile = self.inner.config.profile;
        self.inner.registry.with_placement(|index| self.inner.ledger.drain_indexed(index, profile))
    }

    /// Places and reserves without creating anything (what `create_vm` does first).
    pub fn reserve(&self, req: &PlacementRequest) -> std::result::Result<Granted, NoCapacity> {
        let profile = self.inner.config.profile;
        self.inner.registry.with_placement(|index| self.inner.ledger.reserve_indexed(req, index, profile))
    }

    async fn reserve_or_wait(
        &self,
        req: &PlacementRequest,
        priority: i32,
        wait: Option<Duration>,
        progress: ProgressFn<'_>,
    ) -> Result<Granted> {
        let Some(wait) = wait.filter(|w| !w.is_zero()) else {
            return Ok(self.reserve(req)?);
        };
        let profile = self.inner.config.profile;
        let queued = self
            .inner
            .registry
            .with_placement(|index| self.inner.ledger.reserve_or_enqueue_indexed(req, index, profile, priority));
        match queued {
            Ok(g) => Ok(g),
            Err((no, ticket)) => {
                debug!(reason = %no, priority, "request queued");
                progress(CreateProgress::Queued { reason: no.to_string(), priority });
                let started = Instant::now();
                match self.inner.ledger.wait(ticket, wait).await {
                    Some(g) => Ok(g),
                    // Room may have appeared at the very end: one last try.
                    None => self.reserve(req).map_err(|last| OrchestratorError::QueueTimeout {
                        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        last,
                    }),
                }
            }
        }
    }

    // ----- VMs ---------------------------------------------------------------------------

    /// Creates a VM on a host the scheduler chooses (or on the pinned host, whose capacity
    /// is still reserved). With [`CreateVm::wait`], a request nothing fits waits in the queue
    /// (by [`CreateVm::priority`], then arrival) until capacity frees or the wait ends.
    pub async fn create_vm(&self, caller: Caller, actor: &Actor, req: CreateVm) -> Result<OrchestratedVm> {
        self.create_vm_reporting(caller, actor, req, &|_| {}).await
    }

    /// [`Scheduler::create_vm`], reporting each step to `progress`.
    #[instrument(skip(self, caller, actor, req, progress), fields(vm = %req.name))]
    pub async fn create_vm_reporting(
        &self,
        caller: Caller,
        actor: &Actor,
        req: CreateVm,
        progress: ProgressFn<'_>,
    ) -> Result<OrchestratedVm> {
        if req.name.trim().is_empty() || req.name.len() > 100 {
            return Err(OrchestratorError::Invalid("a VM needs a name of 1 to 100 characters".into()));
        }
        let ttl = req.ttl.or(self.inner.config.default_vm_ttl);
        if let (Some(ttl), Some(max)) = (ttl, self.inner.config.max_vm_ttl)
            && ttl > max
        {
            return Err(OrchestratorError::Invalid(format!("the TTL may be at most {} s", max.as_secs())));
        }
        let os = req.os.unwrap_or(Os::Linux);
        let mut preq = self.placement_request(&req, caller)?;
        preq.os = Some(os);
        let mut last: Option<(String, HostClientError)> = None;
        for attempt in 1..=self.inner.config.create_attempts.max(1) {
            progress(CreateProgress::Placing {
                attempt,
                previous_failure: last.as_ref().map(|(host, e)| format!("host {host}: {e}")),
            });
            let (decision, reservation) = match self.reserve_or_wait(&preq, req.priority, req.wait, progress).await {
                Ok(g) => g,
                Err(e) => {
                    return Err(match (e, last) {
                        (OrchestratorError::NoCapacity(_), Some((host, source))) => {
                            OrchestratorError::Host { host, source }
                        }
                        (e, _) => e,
                    });
                }
            };
            debug!(attempt, host = %decision.host_id, "placed");
            progress(CreateProgress::Creating { host_id: decision.host_id.clone(), attempt });
            match self.create_on(&decision.host_id, &reservation, &req, os).await {
                Ok(vm) => return self.confirm(actor, &decision.host_id, reservation, vm, &req, os, ttl).await,
                Err(e) => {
                    self.inner.ledger.release(reservation.id);
                    self.drain();
                    warn!(host = %decision.host_id, error = %e, attempt, "create failed; trying another host");
                    let source = match e {
                        OrchestratorError::Host { source, .. } => source,
                        other => return Err(other),
                    };
                    if source.is_host_down() {
                        lock(&self.inner.clients).remove(&decision.host_id);
                        let _ = self.observe(&decision.host_id, Observation::CheckFailed(source.to_string())).await;
                    }
                    preq.exclude.insert(decision.host_id.clone());
                    last = Some((decision.host_id, source));
                }
            }
        }
        let (host, source) =
            last.ok_or_else(|| OrchestratorError::Internal("create gave up without an attempt".into()))?;
        Err(OrchestratorError::Host { host, source })
    }

    async fn create_on(&self, host_id: &str, reservation: &Reservation, req: &CreateVm, os: Os) -> Result<VmSummary> {
        let client = self.client(host_id).await?;
        let call = HostCreateVm {
            name: req.name.clone(),
            image: req.image.clone(),
            version: req.version.clone(),
            architecture: normalize_arch(&req.architecture)?,
            os,
            cpu: reservation.resources.cpu,
            memory_mb: reservation.resources.memory_mb,
            disk_mb: req.disk_mb,
            owner: req.owner.clone(),
            start: req.start,
        };
        let create = timed(self.inner.config.create_timeout, "create VM", client.create_vm(call));
        tokio::pin!(create);
        // Keep the reservation alive while the host works (image pulls can be long).
        let renew_every = (self.inner.config.reservation_ttl / 3).max(Duration::from_millis(100));
        let mut renew = tokio::time::interval(renew_every);
        renew.tick().await;
        loop {
            tokio::select! {
                r = &mut create => return r.map_err(|source| OrchestratorError::Host { host: host_id.to_string(), source }),
                _ = renew.tick() => { self.inner.ledger.renew(reservation.id); }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn confirm(
        &self,
        actor: &Actor,
        host_id: &str,
        reservation: Reservation,
        mut vm: VmSummary,
        req: &CreateVm,
        os: Os,
        ttl: Option<Duration>,
    ) -> Result<OrchestratedVm> {
        let now = self.inner.clock.now();
        vm.disk_mb = vm.disk_mb.max(req.image_size_mb.unwrap_or(0));
        let record = OrchestratedVm {
            id: vm.id.clone(),
            name: vm.name.clone(),
            host_id: host_id.to_string(),
            owner: req.owner.clone(),
            os,
            resources: vm.resources(),
            created_at: now,
            expires_at: ttl.map(|t| clock::add(now, t)),
            last_error: None,
        };
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst);
        lock(&self.inner.recent).entry(host_id.to_string()).or_default().push((seq, vm.clone()));
        let extra = Batch::new().require_absent(VMS, &record.id).put(VMS, &record.id, to_value(&record)?);
        let detail =
            json!({"vm_id": record.id, "name": record.name, "owner": record.owner, "expires_at": record.expires_at});
        let written = self
            .inner
            .registry
            .commit_with_status(host_id, extra, Some((actor, "orchestrator.vm.create", detail)), |h| {
                view_upsert(h, vm.clone())
            })
            .await;
        // The view counts the VM now (or the rollback below removes it): release the hold.
        self.inner.ledger.release(reservation.id);
        if let Err(e) = written {
            warn!(host = %host_id, vm = %record.id, error = %e, "cannot record the new VM; deleting it");
            if let Ok(c) = self.client(host_id).await {
                let _ = timed(
                    self.inner.config.call_timeout,
                    "delete VM",
                    c.vm_op(&record.id, VmOp::Delete { force: true }),
                )
                .await;
            }
            self.inner.registry.update_in_memory(host_id, |h| {
                view_remove(h, &record.id);
            });
            self.drain();
            return Err(e);
        }
        info!(host = %host_id, vm = %record.id, "VM created");
        self.publish(
            "VM_CREATED",
            json!({"vm_id": record.id, "host_id": host_id, "name": record.name, "expires_at": record.expires_at}),
        );
        Ok(record)
    }

    /// VMs created through the orchestrator.
    pub async fn list_vms(&self) -> Result<Vec<OrchestratedVm>> {
        let mut out = Vec::new();
        for rec in self.inner.registry.store().list(VMS).await? {
            out.push(
                serde_json::from_value(rec.value)
                    .map_err(|e| OrchestratorError::Internal(format!("stored VM: {e}")))?,
            );
        }
        Ok(out)
    }

    async fn vm_record(&self, id: &str) -> Result<Option<(OrchestratedVm, u64)>> {
        match self.inner.registry.store().get(VMS, id).await? {
            Some(rec) => Ok(Some((
                serde_json::from_value(rec.value)
                    .map_err(|e| OrchestratorError::Internal(format!("stored VM: {e}")))?,
                rec.revision,
            ))),
            None => Ok(None),
        }
    }

    /// One VM created through the orchestrator.
    pub async fn vm(&self, id: &str) -> Result<OrchestratedVm> {
        Ok(self.vm_record(id).await?.ok_or_else(|| OrchestratorError::not_found("VM", id))?.0)
    }

    /// The host a VM lives on: from its record, or from the host views for VMs made
    /// elsewhere.
    pub async fn host_of(&self, vm_id: &str) -> Result<String> {
        if let Some((r, _)) = self.vm_record(vm_id).await? {
            return Ok(r.host_id);
        }
        self.inner
            .registry
            .with_hosts(|hosts| {
                for h in hosts {
                    if h.vms.iter().any(|v| v.id == vm_id) {
                        return Some(h.id.clone());
                    }
                }
                None
            })
            .ok_or_else(|| OrchestratorError::not_found("VM", vm_id))
    }

    /// Forwards a power operation to the VM's host and updates the view.
    pub async fn power(&self, vm_id: &str, op: PowerOp) -> Result<()> {
        let host_id = self.host_of(vm_id).await?;
        let client = self.client(&host_id).await?;
        timed(self.inner.config.call_timeout, "VM operation", client.vm_op(vm_id, VmOp::Power { power: op }))
            .await
            .map_err(|source| OrchestratorError::Host { host: host_id.clone(), source })?;
        let state = match op {
            PowerOp::Start | PowerOp::Resume | PowerOp::Reset | PowerOp::Restart => VmState::Running,
            PowerOp::Stop { .. } | PowerOp::Kill => VmState::Stopped,
            PowerOp::Pause => VmState::Paused,
            PowerOp::Suspend => VmState::Suspended,
        };
        self.inner.registry.update_in_memory(&host_id, |h| {
            if let Some(vm) = h.vms.iter().find(|v| v.id == vm_id).cloned() {
                view_upsert(h, VmSummary { state, ..vm });
            }
        });
        self.drain();
        Ok(())
    }

    async fn delete_inner(&self, actor: &Actor, vm_id: &str, action: &str) -> Result<()> {
        let record = self.vm_record(vm_id).await?;
        let host_id = match &record {
            Some((r, _)) => r.host_id.clone(),
            None => self.host_of(vm_id).await?,
        };
        let client = self.client(&host_id).await?;
        match timed(self.inner.config.call_timeout, "delete VM", client.vm_op(vm_id, VmOp::Delete { force: true }))
            .await
        {
            Ok(()) | Err(HostClientError::NotFound(_)) => {}
            Err(source) => return Err(OrchestratorError::Host { host: host_id, source }),
        }
        let mut extra = Batch::new();
        if let Some((_, rev)) = &record {
            extra = extra.require_revision(VMS, vm_id, *rev).delete(VMS, vm_id);
        }
        let detail = json!({"vm_id": vm_id});
        let r = self
            .inner
            .registry
            .commit_with_status(&host_id, extra, Some((actor, action, detail)), |h| {
                view_remove(h, vm_id);
            })
            .await;
        self.drain();
        match r {
            Ok(_) => {}
            // The host is gone: still drop the record.
            Err(OrchestratorError::NotFound { .. }) => {
                if let Some((_, rev)) = record {
                    let b = Batch::new().require_revision(VMS, vm_id, rev).delete(VMS, vm_id);
                    let entry = AuditEntry::new(actor, action, "orchestrator_vm", vm_id, json!({}));
                    self.inner.registry.store().commit(b.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?)).await?;
                }
            }
            Err(e) => return Err(e),
        }
        self.publish("VM_DELETED", json!({"vm_id": vm_id, "host_id": host_id, "action": action}));
        Ok(())
    }

    /// Deletes a VM on its host (stopping it first) and forgets it.
    #[instrument(skip(self, actor))]
    pub async fn delete_vm(&self, actor: &Actor, vm_id: &str) -> Result<()> {
        let _busy = self.busy(vm_id)?;
        self.delete_inner(actor, vm_id, "orchestrator.vm.delete").await
    }

    /// Pushes a VM's expiry back by `by` (from its current expiry, or from now if that is
    /// already past). A VM without expiry keeps none.
    #[instrument(skip(self, actor))]
    pub async fn extend(&self, actor: &Actor, vm_id: &str, by: Duration) -> Result<OrchestratedVm> {
        let _busy = self.busy(vm_id)?;
        let (mut vm, rev) = self.vm_record(vm_id).await?.ok_or_else(|| OrchestratorError::not_found("VM", vm_id))?;
        let now = self.inner.clock.now();
        let Some(current) = vm.expires_at else { return Ok(vm) };
        let new = clock::add(current.max(now), by);
        if let Some(max) = self.inner.config.max_vm_ttl
            && new > clock::add(now, max)
        {
            return Err(OrchestratorError::Invalid(format!("a VM may live at most {} s from now", max.as_secs())));
        }
        vm.expires_at = Some(new);
        let entry =
            AuditEntry::new(actor, "orchestrator.vm.extend", "orchestrator_vm", vm_id, json!({"expires_at": new}));
        let batch = Batch::new().require_revision(VMS, vm_id, rev).put(VMS, vm_id, to_value(&vm)?).put(
            AUDIT_COLLECTION,
            &entry.id,
            to_value(&entry)?,
        );
        match self.inner.registry.store().commit(batch).await {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(OrchestratorError::Conflict(format!("VM {vm_id} changed meanwhile; try again")));
            }
            Err(e) => return Err(e.into()),
        }
        self.publish("VM_TTL_EXTENDED", json!({"vm_id": vm_id, "expires_at": new}));
        Ok(vm)
    }

    /// Deletes every VM whose expiry has passed. VMs on unhealthy hosts, and deletions that
    /// fail, are reported and tried again on the next pass.
    #[instrument(skip(self))]
    pub async fn reap(&self) -> Result<ReapReport> {
        let now: DateTime<Utc> = self.inner.clock.now();
        let mut report = ReapReport::default();
        let actor = Actor::system();
        for vm in self.list_vms().await? {
            if vm.expires_at.is_none_or(|e| e > now) {
                continue;
            }
            let Ok(_busy) = self.busy(&vm.id) else { continue };
            // Re-read: an extension may have landed since the list.
            match self.vm_record(&vm.id).await? {
                Some((r, _)) if r.expires_at.is_some_and(|e| e <= now) => {}
                _ => continue,
            }
            let healthy = self.inner.registry.get(&vm.host_id).map(|h| h.state == HostState::Healthy);
            let result = match healthy {
                Ok(false) => Err(OrchestratorError::Conflict(format!("host {} is not healthy", vm.host_id))),
                _ => self.delete_inner(&actor, &vm.id, "orchestrator.vm.expire").await,
            };
            match result {
                Ok(()) => {
                    info!(vm = %vm.id, host = %vm.host_id, "expired VM deleted");
                    self.publish("VM_EXPIRED", json!({"vm_id": vm.id, "host_id": vm.host_id}));
                    report.deleted.push(vm.id);
                }
                Err(e) => {
                    warn!(vm = %vm.id, error = %e, "cannot delete expired VM; will retry");
                    report.failed.push((vm.id.clone(), e.to_string()));
                    if let Ok(Some((mut r, rev))) = self.vm_record(&vm.id).await {
                        r.last_error = Some(e.to_string());
                        if let Ok(v) = to_value(&r) {
                            let _ = self
                                .inner
                                .registry
                                .store()
                                .commit(Batch::new().require_revision(VMS, &vm.id, rev).put(VMS, &vm.id, v))
                                .await;
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Starts the background loops: ticks (silence, reservation expiry, queue), host checks
    /// and the reaper. Dropping the returned value stops them.
    pub fn spawn_background(&self, every: BackgroundIntervals) -> Background {
        self.inner.following.store(true, Ordering::SeqCst);
        let mut handles = Vec::new();
        let me = self.clone();
        handles.push(tokio::spawn(async move {
            let mut i = tokio::time::interval(every.tick);
            loop {
                i.tick().await;
                me.tick().await;
            }
        }));
        let me = self.clone();
        handles.push(tokio::spawn(async move {
            let mut i = tokio::time::interval(every.check);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                i.tick().await;
                me.watch_all();
                me.check_all().await;
                let _ = me.inner.registry.purge_expired_tokens().await;
            }
        }));
        let me = self.clone();
        handles.push(tokio::spawn(async move {
            let mut i = tokio::time::interval(every.reap);
            loop {
                i.tick().await;
                if let Err(e) = me.reap().await {
                    warn!(error = %e, "reaper pass failed");
                }
            }
        }));
        Background { handles, scheduler: Some(self.clone()) }
    }
}

async fn timed<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<T, HostClientError>>,
) -> std::result::Result<T, HostClientError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(HostClientError::Timeout(format!("{what} took longer than {} ms", limit.as_millis()))),
    }
}
