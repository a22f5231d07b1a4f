//! An in-memory host for tests and benchmarks: a [`FakeHost`] implements [`HostClient`]
//! with real capacity accounting (it refuses a VM that does not fit, and counts such
//! attempts), and a [`FakeConnector`] maps host URLs to fake hosts.
//!
//! Events: [`HostClient::events`] starts with a [`HostEvent::Synced`] and follows every
//! change the fake makes or is told to [`FakeHost::emit`]; taking the host down ends the
//! open streams, like a dropped websocket.
//!
//! Failure injection: [`FakeHost::set_down`] makes every call fail as unreachable;
//! [`FakeHost::fail_next_creates`] makes creations fail; [`FakeHost::set_create_delay`]
//! slows them down.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use hangar_hypervisor::{HypervisorKind, PowerOp, VmState};
use hangar_wire::{ExecuteResponse, Machine, VmCall, VmReply};
use tokio::sync::broadcast;

use crate::client::{HostClient, HostClientError, HostConnector, HostCreateVm, HostEvent, VmOp};
use crate::model::{CachedImage, Host, HostCredentials, HostHardware, HostResources, Os, ResourceSet, VmSummary};
use crate::placement::MAX_MACOS_VMS;

/// What a fake host looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeHostSpec {
    /// `x86_64` or `arm64`.
    pub architecture: String,
    /// Host OS.
    pub os: Os,
    /// Hypervisor.
    pub hypervisor: HypervisorKind,
    /// Machine size.
    pub total: ResourceSet,
    /// Kept for the system.
    pub system_reserved: ResourceSet,
    /// Images in its cache.
    pub cached_images: Vec<CachedImage>,
}

impl FakeHostSpec {
    /// A Linux/QEMU x86_64 host with no system reservation.
    pub fn linux(cpu: u32, memory_mb: u64, disk_mb: u64) -> Self {
        FakeHostSpec {
            architecture: "x86_64".into(),
            os: Os::Linux,
            hypervisor: HypervisorKind::Qemu,
            total: ResourceSet::new(cpu, memory_mb, disk_mb),
            system_reserved: ResourceSet::default(),
            cached_images: Vec::new(),
        }
    }

    /// An Apple-silicon Mac with Parallels.
    pub fn mac(cpu: u32, memory_mb: u64, disk_mb: u64) -> Self {
        FakeHostSpec {
            architecture: "arm64".into(),
            os: Os::Macos,
            hypervisor: HypervisorKind::Parallels,
            total: ResourceSet::new(cpu, memory_mb, disk_mb),
            system_reserved: ResourceSet::default(),
            cached_images: Vec::new(),
        }
    }
}

struct State {
    spec: FakeHostSpec,
    vms: BTreeMap<String, VmSummary>,
    down: bool,
    ping_fails: bool,
    fail_creates: usize,
    create_delay: Duration,
    exec_broken: bool,
}

impl State {
    fn in_use(&self) -> ResourceSet {
        self.vms.values().fold(ResourceSet::default(), |acc, v| {
            let active = v.is_active();
            acc.saturating_add(ResourceSet::new(
                if active { v.cpu } else { 0 },
                if active { v.memory_mb } else { 0 },
                v.disk_mb,
            ))
        })
    }

    fn resources(&self) -> HostResources {
        HostResources::from_usage(self.spec.total, self.spec.system_reserved, self.in_use())
    }
}

/// An in-memory host.
pub struct FakeHost {
    state: Mutex<State>,
    /// `None` ends the open streams.
    events: broadcast::Sender<Option<HostEvent>>,
    streams: AtomicUsize,
    creates: AtomicUsize,
    refused_oversubscription: AtomicUsize,
    execs: AtomicUsize,
}

impl std::fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHost").field("vms", &self.lock().vms.len()).finish()
    }
}

impl FakeHost {
    /// A running, empty host.
    pub fn new(spec: FakeHostSpec) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        Arc::new(FakeHost {
            state: Mutex::new(State {
                spec,
                vms: BTreeMap::new(),
                down: false,
                ping_fails: false,
                fail_creates: 0,
                create_delay: Duration::ZERO,
                exec_broken: false,
            }),
            events,
            streams: AtomicUsize::new(0),
            creates: AtomicUsize::new(0),
            refused_oversubscription: AtomicUsize::new(0),
            execs: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every call fail as unreachable (`true`) or answer again.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
        if down {
            let _ = self.events.send(None);
        }
    }

    /// Make health checks ([`HostClient::ping`]) time out while everything else works (a
    /// host whose connection hangs).
    pub fn set_ping_fails(&self, fails: bool) {
        self.lock().ping_fails = fails;
    }

    /// Replace the images in the host's cache (and tell the event streams).
    pub fn set_cached_images(&self, images: Vec<CachedImage>) {
        self.lock().spec.cached_images = images.clone();
        self.emit(HostEvent::CacheChanged { images });
    }

    /// Event streams opened so far.
    pub fn streams_opened(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Make the next `n` creations fail.
    pub fn fail_next_creates(&self, n: usize) {
        self.lock().fail_creates = n;
    }

    /// Make each creation take this long.
    pub fn set_create_delay(&self, d: Duration) {
        self.lock().create_delay = d;
    }

    /// Make execs in its VMs fail (`true`: guests not booted yet) or succeed again.
    pub fn set_exec_broken(&self, broken: bool) {
        self.lock().exec_broken = broken;
    }

    /// Exec calls answered so far.
    pub fn execs(&self) -> usize {
        self.execs.load(Ordering::SeqCst)
    }

    /// Its VMs.
    pub fn vms(&self) -> Vec<VmSummary> {
        self.lock().vms.values().cloned().collect()
    }

    /// Its resources as it would report them.
    pub fn resources(&self) -> HostResources {
        self.lock().resources()
    }

    /// Successful creations so far.
    pub fn creates(&self) -> usize {
        self.creates.load(Ordering::SeqCst)
    }

    /// Creations refused because they would have oversubscribed the host.
    pub fn refused_oversubscription(&self) -> usize {
        self.refused_oversubscription.load(Ordering::SeqCst)
    }

    /// Push an event to subscribers of [`HostClient::events`].
    pub fn emit(&self, event: HostEvent) {
        let _ = self.events.send(Some(event));
    }

    /// Add a VM behind the orchestrator's back (as if made locally on the host).
    pub fn insert_vm(&self, vm: VmSummary) {
        self.lock().vms.insert(vm.id.clone(), vm);
    }

    fn check_up(&self) -> Result<(), HostClientError> {
        if self.lock().down {
            Err(HostClientError::Unreachable("connection refused (fake host is down)".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl HostClient for FakeHost {
    async fn hardware(&self) -> Result<HostHardware, HostClientError> {
        self.check_up()?;
        let s = self.lock();
        Ok(HostHardware {
            architecture: s.spec.architecture.clone(),
            os: s.spec.os,
            hypervisor: s.spec.hypervisor,
            resources: s.resources(),
            cached_images: s.spec.cached_images.clone(),
            cache_on_vm_volume: true,
            details: Default::default(),
        })
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>, HostClientError> {
        self.check_up()?;
        Ok(self.vms())
    }

    async fn create_vm(&self, req: HostCreateVm) -> Result<VmSummary, HostClientError> {
        self.check_up()?;
        let delay = self.lock().create_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.lock();
        if s.down {
            return Err(HostClientError::Unreachable("connection reset (fake host went down)".into()));
        }
        if s.fail_creates > 0 {
            s.fail_creates -= 1;
            return Err(HostClientError::Rejected("injected failure".into()));
        }
        let vm = VmSummary {
            id: uuid::Uuid::new_v4().to_string(),
            name: req.name,
            state: if req.start { VmState::Running } else { VmState::Stopped },
            os: req.os.as_str().to_string(),
            cpu: req.cpu,
            memory_mb: req.memory_mb,
            disk_mb: req.disk_mb.unwrap_or(0),
            owner: Some(req.owner.clone()),
            machine: None,
        };
        let avail = s.resources().available;
        let needs = ResourceSet::new(
            if vm.is_active() { vm.cpu } else { 0 },
            if vm.is_active() { vm.memory_mb } else { 0 },
            vm.disk_mb,
        );
        let macs = s.vms.values().filter(|v| v.is_active() && v.is_macos()).count();
        if !needs.fits_in(&avail) || (vm.is_macos() && vm.is_active() && macs >= MAX_MACOS_VMS) {
            self.refused_oversubscription.fetch_add(1, Ordering::SeqCst);
            return Err(HostClientError::Rejected(format!("not enough room: need {needs:?}, have {avail:?}")));
        }
        s.vms.insert(vm.id.clone(), vm.clone());
        drop(s);
        self.creates.fetch_add(1, Ordering::SeqCst);
        self.emit(HostEvent::VmChanged { vm: vm.clone() });
        Ok(vm)
    }

    async fn vm_op(&self, id: &str, op: VmOp) -> Result<(), HostClientError> {
        self.check_up()?;
        let mut s = self.lock();
        let Some(vm) = s.vms.get_mut(id) else {
            return Err(HostClientError::NotFound(format!("no VM {id}")));
        };
        match op {
            VmOp::Delete { force } => {
                if vm.is_active() && !force {
                    return Err(HostClientError::Rejected(format!("VM {id} is running")));
                }
                s.vms.remove(id);
                drop(s);
                self.emit(HostEvent::VmRemoved { id: id.to_string() });
            }
            VmOp::Power { power } => {
                vm.state = match power {
                    PowerOp::Start | PowerOp::Resume | PowerOp::Reset | PowerOp::Restart => VmState::Running,
                    PowerOp::Stop { .. } | PowerOp::Kill => VmState::Stopped,
                    PowerOp::Pause => VmState::Paused,
                    PowerOp::Suspend => VmState::Suspended,
                };
                let vm = vm.clone();
                drop(s);
                self.emit(HostEvent::VmChanged { vm });
            }
        }
        Ok(())
    }

    async fn events(&self) -> Result<BoxStream<'static, HostEvent>, HostClientError> {
        self.check_up()?;
        // Subscribe first, then read the state: no change falls between the two.
        let rx = self.events.subscribe();
        let synced = HostEvent::Synced { hardware: Box::new(self.hardware().await?), vms: self.list_vms().await? };
        self.streams.fetch_add(1, Ordering::SeqCst);
        // `None` (host down), lost events (lagged) and a closed channel all end the stream,
        // so the reader resyncs.
        let rest = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.ok().flatten().map(|e| (e, rx)) });
        Ok(Box::pin(futures::stream::once(async move { synced }).chain(rest)))
    }

    /// Exec (exit 0 in a running VM unless [`FakeHost::set_exec_broken`]), rename and get;
    /// other calls are refused.
    async fn vm_call(&self, id: &str, call: &VmCall) -> Result<VmReply, HostClientError> {
        self.check_up()?;
        let mut s = self.lock();
        let broken = s.exec_broken;
        let Some(vm) = s.vms.get_mut(id) else {
            return Err(HostClientError::NotFound(format!("no VM {id}")));
        };
        match call {
            VmCall::Execute(_) => {
                self.execs.fetch_add(1, Ordering::SeqCst);
                let ok = vm.state == VmState::Running && !broken;
                Ok(VmReply::Exec(ExecuteResponse {
                    stdout: String::new(),
                    stderr: if ok { String::new() } else { "guest not ready".into() },
                    exit_code: if ok { 0 } else { 1 },
                    error: None,
                }))
            }
            VmCall::Rename(r) => {
                vm.name = r.new_name.clone();
                let vm = vm.clone();
                drop(s);
                self.emit(HostEvent::VmChanged { vm });
                Ok(VmReply::Done)
            }
            VmCall::Get => Ok(VmReply::Machine(Box::new(Machine {
                id: vm.id.clone(),
                name: vm.name.clone(),
                state: vm.state.as_str().into(),
                ..Machine::default()
            }))),
            other => Err(HostClientError::Rejected(format!("the fake host does not run {:?}", other.action()))),
        }
    }

    async fn ping(&self) -> Result<(), HostClientError> {
        self.check_up()?;
        if self.lock().ping_fails {
            return Err(HostClientError::Timeout("health check (fake host hangs)".into()));
        }
        Ok(())
    }
}

/// Maps host URLs to fake hosts.
#[derive(Default)]
pub struct FakeConnector {
    hosts: Mutex<HashMap<String, Arc<FakeHost>>>,
    credentials: Mutex<HashMap<String, Option<HostCredentials>>>,
    connects: AtomicUsize,
}

impl std::fmt::Debug for FakeConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeConnector").finish_non_exhaustive()
    }
}

impl FakeConnector {
    /// An empty connector.
    pub fn new() -> Arc<Self> {
        Arc::new(FakeConnector::default())
    }

    /// Serve `host` at `url` (as normalised by the registry, e.g. `http://h1:8080/api`).
    pub fn add(&self, url: &str, host: Arc<FakeHost>) {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).insert(url.to_string(), host);
    }

    /// The fake host at `url`.
    pub fn host(&self, url: &str) -> Option<Arc<FakeHost>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).get(url).cloned()
    }

    /// The credentials the last connection to `url` carried.
    pub fn credentials_used(&self, url: &str) -> Option<Option<HostCredentials>> {
        self.credentials.lock().unwrap_or_else(|e| e.into_inner()).get(url).cloned()
    }

    /// Connections made so far.
    pub fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }

    fn lookup(&self, url: &str, credentials: Option<HostCredentials>) -> Result<Arc<dyn HostClient>, HostClientError> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.credentials.lock().unwrap_or_else(|e| e.into_inner()).insert(url.to_string(), credentials);
        match self.host(url) {
            Some(h) => Ok(h),
            None => Err(HostClientError::Unreachable(format!("no fake host at {url}"))),
        }
    }
}

#[async_trait]
impl HostConnector for FakeConnector {
    async fn connect(
        &self,
        host: &Host,
        credentials: Option<HostCredentials>,
    ) -> Result<Arc<dyn HostClient>, HostClientError> {
        self.lookup(&host.url, credentials)
    }

    async fn probe(
        &self,
        url: &str,
        credentials: Option<HostCredentials>,
    ) -> Result<Arc<dyn HostClient>, HostClientError> {
        self.lookup(url, credentials)
    }
}
