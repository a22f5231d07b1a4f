//! [`QemuDriver`]: folder-based QEMU VMs behind [`hangar_hypervisor::Hypervisor`].

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::Utc;
use hangar_hypervisor::{HypervisorError, Result, VmEvent, VmInfo, VmState};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cmd;
use crate::config::{QemuConfig, SnapshotBook, VmConfig, files, read_json, write_json};
use crate::procs;
use crate::qga::Qga;
use crate::qmp::{Qmp, QmpEvent};

/// Longest Unix socket path the kernel accepts (108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Room a VM folder name (a UUID) and the longest socket name take under a parent.
const VM_DIR_SUFFIX: usize = 1 + 36 + 1 + 8;

/// One VM the driver knows: its folder plus runtime handles that are rebuilt on demand.
pub(crate) struct Vm {
    pub id: String,
    pub dir: PathBuf,
    pub name: Mutex<String>,
    /// Serializes operations that change the VM.
    pub op: tokio::sync::Mutex<()>,
    pub qmp: tokio::sync::Mutex<Option<Arc<Qmp>>>,
    pub monitor: Mutex<Option<JoinHandle<()>>>,
    pub qga: tokio::sync::Mutex<Option<Qga>>,
    /// Last state reported (events are emitted when it changes).
    pub state: Mutex<VmState>,
    /// A state an operation in progress holds the VM in (`Starting`, `Stopping`, ...).
    pub pinned: Mutex<Option<VmState>>,
    pub ips: Mutex<Vec<IpAddr>>,
}

impl Vm {
    fn new(id: String, dir: PathBuf, name: String) -> Arc<Vm> {
        Arc::new(Vm {
            id,
            dir,
            name: Mutex::new(name),
            op: tokio::sync::Mutex::new(()),
            qmp: tokio::sync::Mutex::new(None),
            monitor: Mutex::new(None),
            qga: tokio::sync::Mutex::new(None),
            state: Mutex::new(VmState::Unknown),
            pinned: Mutex::new(None),
            ips: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn name(&self) -> String {
        self.name.lock().map(|n| n.clone()).unwrap_or_default()
    }

    pub fn live_pid(&self) -> Option<i32> {
        procs::live_pid(&self.path(files::PID), &self.dir)
    }

    pub fn config(&self) -> Result<VmConfig> {
        read_json(&self.path(files::CONFIG))
    }

    fn pinned(&self) -> Option<VmState> {
        self.pinned.lock().ok().and_then(|p| *p)
    }

    /// Drops the QMP and agent sessions (the event monitor ends when QMP closes).
    pub fn detach(&self) {
        if let Ok(mut q) = self.qmp.try_lock() {
            q.take();
        }
        if let Ok(mut g) = self.qga.try_lock() {
            g.take();
        }
    }
}

pub(crate) struct Inner {
    pub cfg: QemuConfig,
    pub events: broadcast::Sender<VmEvent>,
    pub vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Held while names and ids are checked for uniqueness and folders appear or vanish.
    pub registry: tokio::sync::Mutex<()>,
    pub kvm: tokio::sync::OnceCell<bool>,
    pub weak_self: Weak<Inner>,
}

pub(crate) fn invalid(vm: &Vm, operation: &'static str, state: VmState) -> HypervisorError {
    HypervisorError::InvalidState { id: vm.id.clone(), operation, state }
}

/// Maps QMP `query-status` to a power state.
fn map_run_state(status: &str) -> VmState {
    match status {
        "running" | "save-vm" | "restore-vm" => VmState::Running,
        "paused" | "prelaunch" | "debug" | "watchdog" | "suspended" => VmState::Paused,
        "inmigrate" => VmState::Resuming,
        "finish-migrate" | "postmigrate" => VmState::Suspending,
        "shutdown" => VmState::Stopping,
        _ => VmState::Unknown,
    }
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
fn opt_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Quotes a string for `/bin/sh` (QEMU runs `exec:` migration URIs through it).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Inner {
    fn emit(&self, event: VmEvent) {
        tracing::debug!(?event, "vm event");
        let _ = self.events.send(event);
    }

    pub fn all(&self) -> Vec<Arc<Vm>> {
        let mut v: Vec<Arc<Vm>> = self.vms.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        v.sort_by_key(|a| a.name());
        v
    }

    /// Finds a VM by id, then by name.
    pub fn find(&self, key: &str) -> Result<Arc<Vm>> {
        let map = self.vms.lock().map_err(|_| HypervisorError::Unavailable("driver state poisoned".into()))?;
        if let Some(vm) = map.get(key) {
            return Ok(vm.clone());
        }
        map.values().find(|vm| vm.name() == key).cloned().ok_or_else(|| HypervisorError::NotFound(key.to_string()))
    }

    pub fn name_taken(&self, name: &str, except: Option<&str>) -> bool {
        self.vms
            .lock()
            .map(|m| m.values().any(|vm| vm.name() == name && Some(vm.id.as_str()) != except))
            .unwrap_or(false)
    }

    pub fn check_socket_room(&self, parent: &Path) -> Result<()> {
        if parent.as_os_str().len() + VM_DIR_SUFFIX > MAX_SOCKET_PATH {
            return Err(HypervisorError::InvalidInput(format!(
                "{} is too long a path for VM folders: their Unix sockets would exceed {MAX_SOCKET_PATH} bytes",
                parent.display()
            )));
        }
        Ok(())
    }

    // ----- state -------------------------------------------------------------------------

    /// Records a state and emits `StateChanged` when it differs from the last one.
    pub fn set_state(&self, vm: &Vm, new: VmState) {
        let previous = match vm.state.lock() {
            Ok(mut s) => {
                let prev = *s;
                *s = new;
                prev
            }
            Err(_) => return,
        };
        if previous != new && previous != VmState::Unknown {
            self.emit(VmEvent::StateChanged { id: vm.id.clone(), previous, current: new });
        } else if previous != new {
            tracing::debug!(id = %vm.id, %new, "initial state");
        }
    }

    /// Holds the VM in a transitional state while an operation runs.
    pub fn pin(&self, vm: &Vm, state: VmState) {
        if let Ok(mut p) = vm.pinned.lock() {
            *p = Some(state);
        }
        self.set_state(vm, state);
    }

    pub async fn unpin(&self, vm: &Arc<Vm>) {
        if let Ok(mut p) = vm.pinned.lock() {
            *p = None;
        }
        self.refresh(vm).await;
    }

    /// The QMP session of a running VM, attaching (and starting its event monitor) if
    /// there is none yet: this is how VMs left running by an earlier driver are adopted.
    pub fn qmp<'a>(
        &'a self,
        vm: &'a Arc<Vm>,
        timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<Qmp>>> + Send + 'a>> {
        // Boxed with an explicit `Send`: the monitor it spawns calls back into it.
        Box::pin(self.qmp_inner(vm, timeout))
    }

    async fn qmp_inner(&self, vm: &Arc<Vm>, timeout: Duration) -> Result<Arc<Qmp>> {
        let mut slot = vm.qmp.lock().await;
        if let Some(q) = slot.as_ref()
            && !q.is_closed()
        {
            return Ok(q.clone());
        }
        slot.take();
        let (qmp, events) = Qmp::connect(&vm.path(files::QMP), timeout).await?;
        let qmp = Arc::new(qmp);
        *slot = Some(qmp.clone());
        let task = tokio::spawn(monitor(self.weak_self.clone(), Arc::downgrade(vm), events));
        if let Ok(mut m) = vm.monitor.lock()
            && let Some(old) = m.replace(task)
        {
            old.abort();
        }
        Ok(qmp)
    }

    /// The VM's state as the folder and the process say (a pinned state wins).
    pub async fn current_state(&self, vm: &Arc<Vm>) -> VmState {
        if let Some(p) = vm.pinned() {
            return p;
        }
        match vm.live_pid() {
            Some(_) => match self.qmp(vm, Duration::from_secs(3)).await {
                Ok(q) => match q.execute("query-status", None, Duration::from_secs(5)).await {
                    Ok(v) => map_run_state(v.get("status").and_then(Value::as_str).unwrap_or("")),
                    Err(_) if vm.live_pid().is_none() => self.stopped_state(vm),
                    Err(_) => VmState::Unknown,
                },
                Err(_) if vm.live_pid().is_none() => self.stopped_state(vm),
                Err(_) => VmState::Unknown,
            },
            None => self.stopped_state(vm),
        }
    }

    /// State of a VM with no process: suspended when a complete state file exists.
    fn stopped_state(&self, vm: &Vm) -> VmState {
        vm.detach();
        for f in [files::PID, files::QMP, files::QGA] {
            let _ = std::fs::remove_file(vm.path(f));
        }
        if let Ok(mut ips) = vm.ips.lock() {
            ips.clear();
        }
        if vm.path(files::SUSPEND).exists() { VmState::Suspended } else { VmState::Stopped }
    }

    pub async fn refresh(&self, vm: &Arc<Vm>) -> VmState {
        let s = self.current_state(vm).await;
        if vm.pinned().is_none() {
            self.set_state(vm, s);
        }
        s
    }

    // ----- folders -----------------------------------------------------------------------

    fn external_list(&self) -> Vec<PathBuf> {
        read_json::<Vec<PathBuf>>(&self.cfg.vms_root.join(files::EXTERNAL)).unwrap_or_default()
    }

    pub fn set_external(&self, dir: &Path, present: bool) -> Result<()> {
        let mut list = self.external_list();
        list.retain(|p| p != dir);
        if present {
            list.push(dir.to_path_buf());
        }
        write_json(&self.cfg.vms_root.join(files::EXTERNAL), &list)
    }

    pub fn in_root(&self, dir: &Path) -> bool {
        dir.parent() == Some(self.cfg.vms_root.as_path())
    }

    /// Every registered VM folder with its config.
    fn scan(&self) -> Vec<(PathBuf, VmConfig)> {
        let mut dirs = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.cfg.vms_root) {
            for e in rd.flatten() {
                let p = e.path();
                let hidden = e.file_name().to_string_lossy().starts_with('.');
                if !hidden && p.is_dir() && !p.join(files::UNREGISTERED).exists() {
                    dirs.push(p);
                }
            }
        }
        dirs.extend(self.external_list());
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for d in dirs {
            let cfg_path = d.join(files::CONFIG);
            if !cfg_path.exists() {
                continue;
            }
            match read_json::<VmConfig>(&cfg_path) {
                Ok(cfg) => {
                    if seen.insert(cfg.id.clone()) {
                        out.push((d, cfg));
                    } else {
                        tracing::warn!(dir = %d.display(), id = %cfg.id, "duplicate VM id ignored");
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "unreadable vm.json ignored")
                }
            }
        }
        out
    }

    pub fn insert(&self, dir: PathBuf, cfg: &VmConfig) -> Arc<Vm> {
        let vm = Vm::new(cfg.id.clone(), dir, cfg.name.clone());
        if let Ok(mut m) = self.vms.lock() {
            m.insert(cfg.id.clone(), vm.clone());
        }
        vm
    }

    /// Drops every session and monitor (the driver is going away).
    pub fn shutdown(&self) {
        for vm in self.all() {
            vm.detach();
            if let Ok(mut m) = vm.monitor.lock()
                && let Some(h) = m.take()
            {
                h.abort();
            }
        }
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Vm>> {
        let vm = self.vms.lock().ok().and_then(|mut m| m.remove(id));
        if let Some(vm) = &vm {
            vm.detach();
        }
        vm
    }

    /// Re-reads the folders and processes: adds and removes VMs, adopts running ones,
    /// repairs states and refreshes guest IPs.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn reconcile(&self, emit_changes: bool) {
        {
            let _reg = self.registry.lock().await;
            let found = self.scan();
            let ids: BTreeSet<String> = found.iter().map(|(_, c)| c.id.clone()).collect();
            let mut added = Vec::new();
            for (dir, cfg) in &found {
                let known = self.vms.lock().map(|m| m.get(&cfg.id).map(|vm| vm.dir.clone())).ok().flatten();
                match known {
                    Some(d) if &d == dir => {
                        if let Ok(m) = self.vms.lock()
                            && let Some(vm) = m.get(&cfg.id)
                            && let Ok(mut n) = vm.name.lock()
                        {
                            *n = cfg.name.clone();
                        }
                    }
                    _ => {
                        added.push(self.insert(dir.clone(), cfg));
                    }
                }
            }
            let gone: Vec<String> =
                self.vms.lock().map(|m| m.keys().filter(|k| !ids.contains(*k)).cloned().collect()).unwrap_or_default();
            for id in gone {
                self.remove(&id);
                if emit_changes {
                    self.emit(VmEvent::Removed { id });
                }
            }
            if emit_changes {
                for vm in &added {
                    self.refresh(vm).await;
                    if let Ok(info) = self.info(vm).await {
                        self.emit(VmEvent::Added { vm: Box::new(info) });
                    }
                }
            }
        }
        for vm in self.all() {
            let state = self.refresh(&vm).await;
            if state == VmState::Running && vm.pinned().is_none() {
                self.refresh_ips(&vm, Duration::from_millis(1500), true).await;
            }
        }
    }

    /// Asks the guest agent for the guest's addresses; emits `IpChanged` on a change.
    pub async fn refresh_ips(&self, vm: &Arc<Vm>, timeout: Duration, only_if_idle: bool) -> Vec<IpAddr> {
        let result = if only_if_idle {
            match vm.qga.try_lock() {
                Ok(guard) => {
                    self.qga_call_locked(vm, guard, "guest-network-get-interfaces", None, Instant::now() + timeout)
                        .await
                }
                Err(_) => return vm.ips.lock().map(|i| i.clone()).unwrap_or_default(),
            }
        } else {
            self.qga_call(vm, "guest-network-get-interfaces", None, Instant::now() + timeout).await
        };
        let Ok(v) = result else {
            return vm.ips.lock().map(|i| i.clone()).unwrap_or_default();
        };
        let mut ips = Vec::new();
        for iface in v.as_array().into_iter().flatten() {
            if iface.get("name").and_then(Value::as_str) == Some("lo") {
                continue;
            }
            for a in iface.get("ip-addresses").and_then(Value::as_array).into_iter().flatten() {
                if let Some(ip) = a.get("ip-address").and_then(Value::as_str).and_then(|s| s.parse::<IpAddr>().ok()) {
                    let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                    if !ip.is_loopback() && !link_local {
                        ips.push(ip);
                    }
                }
            }
        }
        let changed = match vm.ips.lock() {
            Ok(mut cur) if *cur != ips => {
                *cur = ips.clone();
                true
            }
            _ => false,
        };
        if changed {
            self.emit(VmEvent::IpChanged { id: vm.id.clone(), ip_addresses: ips.clone() });
        }
        ips
    }

    // ----- guest agent -------------------------------------------------------------------

    /// One guest agent command, connecting and syncing first when needed; waits for the
    /// agent (booting guest) until `deadline`.
    pub async fn qga_call(&self, vm: &Arc<Vm>, command: &str, args: Option<Value>, deadline: Instant) -> Result<Value> {
        let guard = vm.qga.lock().await;
        self.qga_call_locked(vm, guard, command, args, deadline).await
    }

    async fn qga_call_locked(
        &self,
        vm: &Arc<Vm>,
        mut guard: tokio::sync::MutexGuard<'_, Option<Qga>>,
        command: &str,
        args: Option<Value>,
        deadline: Instant,
    ) -> Result<Value> {
        if guard.is_none() {
            *guard = Some(Qga::connect(&vm.path(files::QGA), deadline).await?);
        }
        let Some(q) = guard.as_mut() else {
            return Err(HypervisorError::Guest("no agent session".into()));
        };
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(2));
        match q.call(command, args, remaining).await {
            Ok(v) => Ok(v),
            Err(e) => {
                guard.take();
                Err(e)
            }
        }
    }

    // ----- info --------------------------------------------------------------------------

    pub async fn info(&self, vm: &Arc<Vm>) -> Result<VmInfo> {
        let cfg = vm.config()?;
        let state = vm.state.lock().map(|s| *s).unwrap_or(VmState::Unknown);
        let mut disk_bytes = 0;
        let mut disk_virtual_bytes = 0;
        for (i, d) in cfg.disks.iter().enumerate() {
            let p = vm.path(&d.file);
            disk_bytes += crate::config::allocated_size(&p);
            if i == 0 {
                disk_virtual_bytes = crate::config::disk_virtual_size(&p).unwrap_or(0);
            }
        }
        disk_bytes += crate::config::allocated_size(&vm.path(files::SUSPEND));
        let ip_addresses =
            if state == VmState::Running { vm.ips.lock().map(|i| i.clone()).unwrap_or_default() } else { Vec::new() };
        let agent = vm.qga.try_lock().map(|g| g.is_some()).unwrap_or(true);
        let details = reference_details(&cfg, vm, state, agent);
        Ok(VmInfo {
            id: cfg.id,
            name: cfg.name,
            description: cfg.description,
            state,
            os: cfg.os,
            home: vm.dir.clone(),
            cpus: cfg.cpus,
            memory_mb: cfg.memory_mb,
            disk_bytes,
            disk_virtual_bytes,
            ip_addresses,
            owner: cfg.owner,
            hypervisor: hangar_hypervisor::HypervisorKind::Qemu,
            architecture: cfg.architecture,
            is_template: cfg.is_template,
            details,
        })
    }

    pub async fn fresh_info(&self, vm: &Arc<Vm>) -> Result<VmInfo> {
        self.refresh(vm).await;
        self.info(vm).await
    }

    // ----- processes ---------------------------------------------------------------------

    pub async fn kvm(&self) -> bool {
        match self.cfg.acceleration {
            crate::config::Acceleration::Kvm => true,
            crate::config::Acceleration::Tcg => false,
            crate::config::Acceleration::Auto => {
                *self.kvm.get_or_init(|| crate::host::probe_kvm(&self.cfg.qemu_binary, &self.cfg.vms_root)).await
            }
        }
    }

    /// The QEMU command line for a VM.
    pub async fn qemu_args(
        &self,
        vm: &Vm,
        cfg: &VmConfig,
        incoming: bool,
        loadvm: Option<&str>,
        paused: bool,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        push("-name");
        push(&format!("hangar-{}", cfg.id));
        if self.kvm().await {
            push("-accel");
            push("kvm");
            push("-cpu");
            push("host");
        } else {
            push("-accel");
            push("tcg");
        }
        push("-m");
        push(&cfg.memory_mb.to_string());
        push("-smp");
        push(&cfg.cpus.max(1).to_string());
        push("-nodefaults");
        push("-no-user-config");
        push("-display");
        push("none");
        push("-daemonize");
        push("-pidfile");
        push(&vm.path(files::PID).to_string_lossy());
        push("-serial");
        push(&format!("file:{}", opt_escape(&vm.path(files::CONSOLE))));
        push("-qmp");
        push(&format!("unix:{},server=on,wait=off", opt_escape(&vm.path(files::QMP))));
        push("-chardev");
        push(&format!("socket,id=qga0,path={},server=on,wait=off", opt_escape(&vm.path(files::QGA))));
        push("-device");
        push("virtio-serial-pci,id=vser0");
        push("-device");
        push("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0");
        if let Some(br) = &cfg.network.bridge {
            push("-netdev");
            push(&format!("bridge,id=net0,br={br}"));
        } else {
            let mut netdev = String::from("user,id=net0");
            if cfg.network.restrict {
                netdev.push_str(",restrict=on");
            }
            for f in &cfg.network.port_forwards {
                let proto = if f.protocol == "udp" { "udp" } else { "tcp" };
                netdev.push_str(&format!(",hostfwd={proto}:127.0.0.1:{}-:{}", f.host_port, f.guest_port));
            }
            push("-netdev");
            push(&netdev);
        }
        push("-device");
        match &cfg.network.mac {
            Some(mac) => push(&format!("virtio-net-pci,netdev=net0,mac={mac}")),
            None => push("virtio-net-pci,netdev=net0"),
        }
        for d in &cfg.disks {
            push("-drive");
            push(&format!("file={},if=virtio,format={}", opt_escape(&vm.path(&d.file)), d.format));
        }
        if let Some(k) = &cfg.kernel {
            push("-kernel");
            push(&k.to_string_lossy());
        }
        if let Some(i) = &cfg.initrd {
            push("-initrd");
            push(&i.to_string_lossy());
        }
        if let Some(ap) = &cfg.append {
            push("-append");
            push(ap);
        }
        if incoming {
            push("-incoming");
            push(&format!("exec:cat {}", sh_quote(&vm.path(files::SUSPEND).to_string_lossy())));
        }
        if let Some(tag) = loadvm {
            push("-loadvm");
            push(tag);
        }
        if paused {
            push("-S");
        }
        a
    }

    /// Starts QEMU daemonized (its own session, not our child once started) and attaches
    /// QMP. With `incoming`, restores the suspended state and resumes it.
    #[tracing::instrument(level = "info", skip(self, vm), fields(id = %vm.id))]
    pub async fn launch(&self, vm: &Arc<Vm>, incoming: bool, loadvm: Option<&str>, paused: bool) -> Result<()> {
        let cfg = vm.config()?;
        for f in [files::PID, files::QMP, files::QGA] {
            let _ = std::fs::remove_file(vm.path(f));
        }
        vm.detach();
        let args = self.qemu_args(vm, &cfg, incoming, loadvm, paused).await;
        let log_path = vm.path(files::LOG);
        let log = std::fs::File::create(&log_path).map_err(|e| HypervisorError::io(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| HypervisorError::io(&log_path, e))?;
        let shown = format!("{} (daemonize) for VM {}", self.cfg.qemu_binary.display(), vm.id);
        // Deliberately not `hangar_proc::spawn`: the guest outlives the agent (the next one
        // adopts it). QEMU daemonizes, so this child is only the short-lived launcher.
        let mut child = tokio::process::Command::new(&self.cfg.qemu_binary)
            .args(&args)
            .current_dir(&vm.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HypervisorError::CommandFailed {
                command: shown.clone(),
                code: None,
                stderr: e.to_string(),
            })?;
        let status = match tokio::time::timeout(self.cfg.command_timeout, child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(HypervisorError::CommandFailed { command: shown, code: None, stderr: e.to_string() });
            }
            Err(_) => {
                return Err(HypervisorError::Timeout { command: shown, after: self.cfg.command_timeout });
            }
        };
        if !status.success() {
            let stderr = std::fs::read_to_string(&log_path).unwrap_or_default().trim().to_string();
            return Err(HypervisorError::CommandFailed { command: shown, code: status.code(), stderr });
        }
        let qmp = self.qmp(vm, Duration::from_secs(10)).await?;
        if incoming {
            let deadline = Instant::now() + self.cfg.long_timeout;
            loop {
                let st = qmp.execute("query-status", None, Duration::from_secs(10)).await?;
                let status = st.get("status").and_then(Value::as_str).unwrap_or("");
                if status != "inmigrate" {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(HypervisorError::Timeout {
                        command: "restore suspended state".into(),
                        after: self.cfg.long_timeout,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let meta: Value = read_json(&vm.path(files::SUSPEND_META)).unwrap_or(json!({"was_running": true}));
            let was_running = meta.get("was_running").and_then(Value::as_bool).unwrap_or(true);
            let st = qmp.execute("query-status", None, Duration::from_secs(10)).await?;
            if was_running && st.get("running").and_then(Value::as_bool) == Some(false) {
                qmp.execute("cont", None, Duration::from_secs(10)).await?;
            }
            for f in [files::SUSPEND, files::SUSPEND_META] {
                let _ = std::fs::remove_file(vm.path(f));
            }
        }
        Ok(())
    }

    /// Ends QEMU: `quit` over QMP, then SIGKILL if it lingers.
    pub async fn terminate(&self, vm: &Arc<Vm>) {
        let Some(pid) = vm.live_pid() else { return };
        if let Ok(q) = self.qmp(vm, Duration::from_secs(2)).await {
            let _ = q.execute("quit", None, Duration::from_secs(3)).await;
        }
        if !procs::wait_gone(pid, &vm.dir, Duration::from_secs(5)).await {
            tracing::warn!(id = %vm.id, pid, "QEMU ignored quit; killing it");
            procs::kill_hard(pid);
            procs::wait_gone(pid, &vm.dir, Duration::from_secs(5)).await;
        }
        vm.detach();
    }

    pub fn snapshot_book(&self, vm: &Vm) -> SnapshotBook {
        read_json(&vm.path(files::SNAPSHOTS)).unwrap_or_default()
    }

    pub async fn qemu_img(&self, args: &[OsString], timeout: Duration) -> Result<String> {
        Ok(cmd::run(&self.cfg.qemu_img, args, timeout).await?.stdout)
    }

    pub async fn qemu_version(&self) -> Result<String> {
        let out = cmd::run(&self.cfg.qemu_binary, &["--version"], self.cfg.command_timeout).await?;
        Ok(crate::host::parse_version(&out.stdout))
    }
}

/// Follows one VM's QMP events; turns them (and the connection closing when QEMU exits)
/// into state changes.
async fn monitor(inner: Weak<Inner>, vm: Weak<Vm>, mut events: tokio::sync::mpsc::UnboundedReceiver<QmpEvent>) {
    while let Some(ev) = events.recv().await {
        let (Some(inner), Some(vm)) = (inner.upgrade(), vm.upgrade()) else {
            return;
        };
        tracing::debug!(id = %vm.id, event = %ev.event, "QMP event");
        if vm.pinned().is_some() {
            continue;
        }
        match ev.event.as_str() {
            "SHUTDOWN" => inner.set_state(&vm, VmState::Stopping),
            "STOP" | "RESUME" | "RESET" | "POWERDOWN" | "MIGRATION" | "SUSPEND" | "WAKEUP" => {
                // Ask rather than guess: STOP also happens on the way to a shutdown.
                let state = inner.current_state(&vm).await;
                if vm.pinned().is_none() && state != VmState::Unknown {
                    inner.set_state(&vm, state);
                }
            }
            _ => {}
        }
    }
    // The connection closed: QEMU is exiting or was killed.
    let (Some(inner), Some(vm)) = (inner.upgrade(), vm.upgrade()) else {
        return;
    };
    if let Some(pid) = procs::read_pid(&vm.path(files::PID)) {
        procs::wait_gone(pid, &vm.dir, Duration::from_secs(2)).await;
    }
    {
        let mut slot = vm.qmp.lock().await;
        if slot.as_ref().is_some_and(|q| q.is_closed()) {
            slot.take();
        }
    }
    if let Ok(mut g) = vm.qga.try_lock() {
        g.take();
    }
    if vm.pinned().is_none() && vm.live_pid().is_none() {
        let state = inner.stopped_state(&vm);
        inner.set_state(&vm, state);
    }
}

/// Spawns the periodic reconcile.
pub(crate) fn spawn_reconciler(inner: Weak<Inner>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            inner.reconcile(true).await;
        }
    })
}

/// Creates a folder for a new VM atomically: built under a hidden name, renamed at the end.
pub(crate) struct Staging {
    pub tmp: PathBuf,
    pub dest: PathBuf,
    done: bool,
}

impl Staging {
    pub fn new(parent: &Path, id: &str) -> Result<Staging> {
        let tmp = parent.join(format!(".staging-{id}"));
        let dest = parent.join(id);
        std::fs::create_dir_all(&tmp).map_err(|e| HypervisorError::io(&tmp, e))?;
        Ok(Staging { tmp, dest, done: false })
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| HypervisorError::io(&self.dest, e))?;
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Fresh id for a VM.
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Now, for `created_at`.
pub(crate) fn now() -> chrono::DateTime<Utc> {
    Utc::now()
}

/// The reference's VM keys with a QEMU VM's values (the API fits them to the reference's
/// types): `Uptime` from the QEMU process's start, `GuestTools` from the guest agent,
/// `Home path` = the VM's folder, the devices QEMU runs. Settings that only exist in
/// Parallels Desktop read `off` or empty.
fn reference_details(cfg: &VmConfig, vm: &Vm, state: VmState, agent: bool) -> serde_json::Map<String, Value> {
    let home = vm.dir.display().to_string();
    let running = matches!(state, VmState::Running | VmState::Paused);
    let uptime = std::fs::metadata(vm.path(files::PID))
        .and_then(|m| m.modified())
        .ok()
        .filter(|_| running)
        .and_then(|t| t.elapsed().ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let guest_tools = match (running, agent) {
        (true, true) => "installed",
        (true, false) => "possibly_installed",
        (false, _) => "not_running",
    };
    let disk_image = cfg.disks.first().map(|d| vm.path(&d.file).display().to_string()).unwrap_or_default();
    let (net_type, card) = match &cfg.network.bridge {
        Some(_) => ("bridged", "virtio"),
        None => ("user", "virtio"),
    };
    let mac = cfg.network.mac.clone().unwrap_or_default();
    let cpu_type = if cfg.architecture == "arm64" { "arm" } else { "x86" };
    let off = "off";
    let v = json!({
        "Template": if cfg.is_template { "yes" } else { "no" },
        "Uptime": uptime.to_string(),
        "Home path": home,
        "Restore Image": "",
        "GuestTools": {"state": guest_tools},
        "Startup and Shutdown": {"Autostart": off, "Autostart delay": 0, "Autostop": "stop", "Startup view": "headless",
            "On shutdown": "close", "On window close": "keep running", "Pause idle": off, "Undo disks": off},
        "Optimization": {"Hypervisor type": "qemu", "Nested virtualization": off, "Resource quota": "unlimited"},
        "Security": {"Encrypted": off, "TPM enabled": off, "Custom password protection": off,
            "Configuration is locked": off, "Protected": off, "Archived": off, "Packed": off},
        "Time Synchronization": {"enabled": false, "Smart mode": off, "Interval (in seconds)": 0,
            "Timezone synchronization disabled": "on"},
        "Boot order": "hdd0",
        "BIOS type": if cfg.kernel.is_some() { "direct-kernel" } else { "legacy" },
        "EFI Secure boot": off,
        "Allow select boot device": off,
        "Host defined sharing": "none",
        "Miscellaneous Sharing": {"Shared clipboard": off, "Shared cloud": off},
        "Network": {"Conditioned": off},
        "Hardware": {
            "cpu": {"cpus": cfg.cpus, "auto": off, "VT-x": true, "hotplug": false, "accl": "high", "mode": "64", "type": cpu_type},
            "memory": {"size": format!("{}Mb", cfg.memory_mb), "auto": off, "hotplug": false},
            "memory_quota": {"auto": off},
            "hdd0": {"enabled": !disk_image.is_empty(), "port": "virtio:0", "image": disk_image,
                "type": cfg.disks.first().map(|d| d.format.clone()).unwrap_or_default(), "online-compact": off},
            "cdrom0": {"enabled": false, "port": "", "image": ""},
            "usb": {"enabled": false},
            "net0": {"enabled": true, "type": net_type, "mac": mac, "card": card},
            "sound0": {"enabled": false, "output": "", "mixer": ""}
        }
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}
