//! The scheduler: the shared core the orchestrator's concerns hang off. One [`Scheduler`]
//! (cheap to clone) holds the host registry, the connector, the clock, the event bus and
//! the configuration; each concern adds its methods and owns its part of the state:
//!
//! * `fleet`: registration, host clients, health (observations, ticks, checks);
//! * `events`: one event-stream follower per host, with reconnection and backoff;
//! * `admission`: placement requests, reservations and the waiting queue;
//! * `lifecycle`: VM create (place, reserve, create, confirm or roll back), power,
//!   delete, TTL extension and the reaper.
//!
//! Leader work: with several replicas over one store, the loops that must run once (silence
//! ticks, host checks and event-stream followers, the enrollment-token purge, the TTL
//! reaper) run only on the holder of the store's leader lease ([`Scheduler::lead`]), and
//! the writes they make carry its [`Fence`]: host health status writes, the token purge
//! and every write of the reaper. The reservation ledger's expiry and the queue's service
//! are in-memory and run on every replica. Without a lease ([`Leadership::Sole`], the
//! default) everything runs unfenced, as a single process.
//!
//! The host view counts a VM's CPU and memory while it is active and its disk always, like
//! the hosts themselves; every change to a host's VM list goes through one pair of helpers
//! (`view_upsert`, `view_remove`) so the counts stay consistent.

mod admission;
mod events;
mod fleet;
mod lifecycle;
mod metrics;
mod pools;
mod shared;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hangar_core::{Event, EventBus, EventType};
use hangar_store::{Fence, Role};
use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinHandle;
use tracing::warn;

pub use events::{RECONNECT_CAP, reconnect_delay};
pub use lifecycle::{CreateProgress, CreateVm, ProgressFn, ReapReport};
pub use pools::{AsWritten, ImageVersions, PoolPass, READY_TIMEOUT};
pub use shared::CAPACITY;

use crate::client::{HostClient, HostClientError, HostConnector};
use crate::clock::Clock;
use crate::error::{OrchestratorError, Result};
use crate::health::{HealthConfig, HostHealth};
use crate::model::*;
use crate::placement::Profile;
use crate::registry::HostRegistry;
use crate::reservations::Reservations;

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

/// Whether this scheduler runs the fleet's leader work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Leadership {
    /// No lease: the only process (tests, tools). Leader work runs, unfenced.
    #[default]
    Sole,
    /// This replica holds the leader lease: leader work runs and its writes carry the fence.
    Leader(Fence),
    /// Another replica leads: no leader work, and health observations are not written.
    Follower,
}

impl Leadership {
    /// The fence leader work's writes carry (none when [`Leadership::Sole`]).
    pub fn fence(&self) -> Option<&Fence> {
        match self {
            Leadership::Leader(f) => Some(f),
            Leadership::Sole | Leadership::Follower => None,
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
    // Shared by every concern.
    registry: Arc<HostRegistry>,
    connector: Arc<dyn HostConnector>,
    clock: Arc<dyn Clock>,
    bus: EventBus,
    config: SchedulerConfig,
    // fleet.rs: host clients (cached until the host changes) and health machines.
    clients: Mutex<HashMap<String, Arc<dyn HostClient>>>,
    health: Mutex<HashMap<String, HostHealth>>,
    /// VMs confirmed per host, with a sequence number, so a refresh that started before a
    /// confirmation does not drop the VM from the counts (written by lifecycle.rs).
    recent: Mutex<HashMap<String, Vec<(u64, VmSummary)>>>,
    seq: AtomicU64,
    // events.rs: event-stream followers per host.
    watchers: Mutex<HashMap<String, events::Watcher>>,
    /// The background runs: new hosts get a follower at once.
    following: AtomicBool,
    // admission.rs: the reservation ledger and its queue.
    ledger: Reservations,
    // lifecycle.rs: VMs being deleted or extended.
    busy_vms: Mutex<HashSet<String>>,
    /// Whether leader work runs here, and its fence.
    leadership: Mutex<Leadership>,
    // shared.rs: set when other replicas share the store.
    shared: std::sync::OnceLock<shared::Shared>,
    // pools.rs: warm pools (fills in flight, readiness checks, version resolution).
    pools: pools::PoolsState,
}

/// A [`Scheduler`] that may be gone.
pub(crate) struct WeakScheduler(std::sync::Weak<Inner>);

impl WeakScheduler {
    pub(crate) fn upgrade(&self) -> Option<Scheduler> {
        self.0.upgrade().map(|inner| Scheduler { inner })
    }
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
                leadership: Mutex::new(Leadership::Sole),
                shared: std::sync::OnceLock::new(),
                pools: pools::PoolsState::default(),
            }),
        }
    }

    /// A handle that does not keep the scheduler alive (held by the metrics scrape hook).
    pub(crate) fn downgrade(&self) -> WeakScheduler {
        WeakScheduler(Arc::downgrade(&self.inner))
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

    /// Publishes an event about a VM owned by `owner` (`None`: no recorded owner): only who
    /// may see that VM receives it.
    fn publish_vm(&self, message: &str, owner: Option<&str>, body: Value) {
        let e = Event::new(EventType::Orchestrator, message, body).about_vm(owner.map(str::to_string));
        self.inner.bus.publish(e);
    }

    /// Whether this scheduler runs leader work now.
    pub fn leadership(&self) -> Leadership {
        lock(&self.inner.leadership).clone()
    }

    fn set_leadership(&self, l: Leadership) {
        *lock(&self.inner.leadership) = l;
    }

    /// The fence leader work's writes carry now.
    pub(crate) fn fence(&self) -> Option<Fence> {
        lock(&self.inner.leadership).fence().cloned()
    }

    /// Runs the background work under a leader lease: the in-memory loop (reservation
    /// expiry, queue service) always, and the leader work ([`Scheduler::spawn_background`]'s
    /// loops, their writes fenced) only while `role` says this replica leads: started when
    /// it acquires the lease, stopped (event streams included) as soon as it loses it or
    /// its renewal is overdue. A new fence (the lease taken again) restarts the leader work.
    /// Dropping the returned value stops everything.
    pub fn lead(&self, every: BackgroundIntervals, mut role: tokio::sync::watch::Receiver<Role>) -> Background {
        self.set_leadership(Leadership::Follower);
        let me = self.clone();
        let local = tokio::spawn(async move {
            let mut i = tokio::time::interval(every.tick);
            loop {
                i.tick().await;
                me.inner.ledger.purge_expired();
                if let Err(e) = me.refresh_shared().await {
                    warn!(error = %e, "cannot re-read the fleet from the store");
                }
                me.drain();
            }
        });
        let me = self.clone();
        let supervisor = tokio::spawn(async move {
            let mut work: Option<Background> = None;
            loop {
                let now = role.borrow_and_update().clone();
                match now {
                    Role::Leader(fence) => {
                        if me.fence().as_ref() != Some(&fence) {
                            // Stop the work of an earlier holding before starting anew.
                            me.set_leadership(Leadership::Follower);
                            drop(work.take());
                            me.set_leadership(Leadership::Leader(fence.clone()));
                            // Silence counts from now: a new leader heard nothing before.
                            let now = me.inner.clock.now();
                            for h in lock(&me.inner.health).values_mut() {
                                h.rewatch(now);
                            }
                            tracing::info!(token = fence.token(), "leader work starts");
                            work = Some(me.spawn_leader_work(every));
                        }
                    }
                    Role::Follower => {
                        me.set_leadership(Leadership::Follower);
                        if work.take().is_some() {
                            tracing::info!("leader work stopped");
                            // What it saw of the hosts last (maybe after a pause, refused
                            // by the fence) gives way to what the store holds.
                            me.resync_shared();
                        }
                    }
                }
                if role.changed().await.is_err() {
                    break;
                }
            }
            me.set_leadership(Leadership::Follower);
            drop(work);
        });
        // Followers take in the VM state changes the leader hears from the hosts.
        let me = self.clone();
        let mut events = self.inner.bus.subscribe();
        let relayed = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => me.take_relayed_state(&e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Background { handles: vec![local, supervisor, relayed], scheduler: Some(self.clone()) }
    }

    /// Starts the background loops: ticks (silence, reservation expiry, queue), host checks
    /// and the reaper. Dropping the returned value stops them.
    pub fn spawn_background(&self, every: BackgroundIntervals) -> Background {
        self.set_leadership(Leadership::Sole);
        self.spawn_leader_work(every)
    }

    fn spawn_leader_work(&self, every: BackgroundIntervals) -> Background {
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
                let _ = me.inner.registry.purge_expired_tokens_fenced(me.fence().as_ref()).await;
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
        let me = self.clone();
        handles.push(tokio::spawn(async move { me.run_pools(every.tick).await }));
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
