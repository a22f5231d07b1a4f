//! The conformance suite every [`Hypervisor`] driver must pass.
//!
//! A driver's test calls [`run_all`] with the driver and a [`Setup`] saying what to create
//! VMs from and what the driver can really do, from inside a multi-threaded tokio runtime:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use hangar_hypervisor::{Hypervisor, conformance::{self, Capabilities, Setup}};
//! # async fn demo(driver: Arc<dyn Hypervisor>) {
//! let caps = Capabilities { exec: true, guest_dir: "/tmp".into(), snapshots_restore_guest: true };
//! conformance::run_all(driver, Setup::new("/images/guest", caps)).await;
//! # }
//! ```
//!
//! The suite makes two VMs named `hangar-conformance-<tag> a` and `... b` (the tag is new on
//! every run, so leftovers of a failed run do not collide), boots the first one once, and
//! deletes both at the end. VMs that exist before the run are left alone and only read
//! (`get`, `snapshots`). The cases run in order and build on each other; a failed check
//! panics with the case's name and what went wrong, which fails the test. A panic leaves the
//! suite's VMs behind: the caller's fixture (a temporary VMs root, a fake's state folder)
//! cleans up.
//!
//! What is checked is the contract written on [`Hypervisor`]: unknown VMs answer
//! [`HypervisorError::NotFound`] naming the key; an operation the VM's state does not allow
//! answers [`HypervisorError::InvalidState`] naming that state (power operations are not
//! idempotent); taken names answer [`HypervisorError::AlreadyExists`] and bad ones
//! [`HypervisorError::InvalidInput`], leaving nothing behind; `power` returns the state the
//! operation leads to; and [`Hypervisor::subscribe`] reports `Added`, `Removed`,
//! `StateChanged` and `Updated` for the changes the suite makes. Events may arrive after the
//! method returns: the suite waits for each with a deadline ([`Setup::event_timeout`]). A
//! driver whose event source starts asynchronously (Parallels' `monitor-events`) must be
//! delivering events before `run_all` is called.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::{
    CloneSpec, ConfigChange, CreateSpec, ExecOutput, ExecRequest, Hypervisor, HypervisorError, PowerOp, RegisterSpec,
    Snapshot, SnapshotOp, VmEvent, VmInfo, VmState,
};

/// What a driver can really do, for the cases that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Commands run in a running guest ([`Hypervisor::exec`]) and files can be copied into it
    /// ([`Hypervisor::upload`]). Without it the exec and upload cases are skipped (their
    /// `NotFound` and `InvalidState` checks still run).
    pub exec: bool,
    /// A folder in the guest the suite may write files to (with `exec`), absolute or
    /// relative to where the driver's commands run.
    pub guest_dir: String,
    /// Reverting to a snapshot taken while running restores the guest's files and memory
    /// (a file written after the snapshot is back as it was). Needs `exec`.
    pub snapshots_restore_guest: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities { exec: false, guest_dir: "/tmp".to_string(), snapshots_restore_guest: false }
    }
}

/// What the suite creates VMs from and how long it waits.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The image given to [`CreateSpec::image`].
    pub image: PathBuf,
    /// CPUs and memory of the VMs the suite creates (the configure case changes them and
    /// sets them back before the VM boots).
    pub cpus: u32,
    pub memory_mb: u64,
    pub capabilities: Capabilities,
    /// How long a started guest may take until a command runs in it (with `exec`).
    pub boot_timeout: Duration,
    /// How long an event may take to arrive after the change that causes it.
    pub event_timeout: Duration,
    /// Deadline of the graceful `Stop` (ACPI power-down) the suite asks for.
    pub stop_timeout: Duration,
}

impl Setup {
    /// One CPU, 128 MiB, three minutes to boot, fifteen seconds for an event, one minute
    /// for a graceful stop.
    pub fn new(image: impl Into<PathBuf>, capabilities: Capabilities) -> Setup {
        Setup {
            image: image.into(),
            cpus: 1,
            memory_mb: 128,
            capabilities,
            boot_timeout: Duration::from_secs(180),
            event_timeout: Duration::from_secs(15),
            stop_timeout: Duration::from_secs(60),
        }
    }
}

/// Unwraps a result or panics naming the case and the call.
macro_rules! ok {
    ($case:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => panic!("hypervisor conformance case `{}`: `{}` failed: {err} ({err:?})", $case, stringify!($e)),
        }
    };
}

/// Asserts a condition, naming the case.
macro_rules! check {
    ($case:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!("hypervisor conformance case `{}`: {}", $case, format!($($msg)+));
        }
    };
}

/// Asserts that a call fails with an error matching the pattern, naming the case.
macro_rules! refused {
    ($case:expr, $e:expr, $($pat:pat_param)|+ $(if $guard:expr)?) => {
        match $e {
            Err($($pat)|+) $(if $guard)? => {}
            other => panic!(
                "hypervisor conformance case `{}`: `{}` must fail with {} but gave {}",
                $case,
                stringify!($e),
                stringify!($($pat)|+ $(if $guard)?),
                show(&other)
            ),
        }
    };
}

fn show<T>(r: &Result<T, HypervisorError>) -> String {
    match r {
        Ok(_) => "Ok(..)".to_string(),
        Err(e) => format!("Err({e:?}): {e}"),
    }
}

/// Runs every case against `driver`. See the [module documentation](self).
pub async fn run_all(driver: Arc<dyn Hypervisor>, setup: Setup) {
    let mut cx = Cx::new(driver, setup);
    eprintln!("hypervisor conformance ({}): VMs named {:?}", cx.hv.kind(), cx.prefix);

    cx.case("host_info");
    host_info(&cx).await;
    cx.case("unknown_vms");
    unknown_vms(&mut cx).await;
    cx.case("create");
    let a = create(&mut cx).await;
    cx.case("create_refused");
    create_refused(&mut cx, &a).await;
    cx.case("list_and_get");
    list_and_get(&cx, &a).await;
    cx.case("configure_stopped");
    configure_stopped(&mut cx, &a).await;
    cx.case("clone");
    let b = clone(&mut cx, &a).await;
    cx.case("rename");
    let a = rename(&mut cx, &a, &b).await;
    cx.case("unregister_register");
    unregister_register(&mut cx, &b).await;
    cx.case("snapshots_stopped");
    let s1 = snapshots_stopped(&mut cx, &a).await;
    cx.case("start");
    start(&mut cx, &a).await;
    cx.case("refused_while_running");
    refused_while_running(&mut cx, &a).await;
    if cx.setup.capabilities.exec {
        cx.case("exec");
        exec(&mut cx, &a).await;
        cx.case("upload");
        upload(&mut cx, &a).await;
    }
    cx.case("snapshots_running");
    snapshots_running(&mut cx, &a, &s1).await;
    cx.case("pause_resume");
    pause_resume(&mut cx, &a).await;
    cx.case("suspend_resume");
    suspend_resume(&mut cx, &a).await;
    cx.case("stop");
    stop(&mut cx, &a).await;
    cx.case("refused_while_stopped");
    refused_while_stopped(&mut cx, &a).await;
    cx.case("reset_and_kill");
    reset_and_kill(&mut cx, &b).await;
    cx.case("delete");
    delete(&mut cx, &[&b, &a]).await;
    eprintln!("hypervisor conformance ({}): passed in {:.1?}", cx.hv.kind(), cx.started.elapsed());
}

/// What the cases share: the driver, the setup, one event receiver subscribed before the
/// first change, and the prefix of every VM name the suite makes.
struct Cx {
    hv: Arc<dyn Hypervisor>,
    started: Instant,
    setup: Setup,
    events: Events,
    prefix: String,
}

impl Cx {
    fn new(hv: Arc<dyn Hypervisor>, setup: Setup) -> Cx {
        let events = Events { rx: hv.subscribe(), seen: Vec::new(), lagged: 0 };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tag = (nanos as u64 ^ u64::from(std::process::id()).rotate_left(40)) & 0xffff_ffff;
        Cx { hv, started: Instant::now(), setup, events, prefix: format!("hangar-conformance-{tag:08x}") }
    }

    /// Says which case runs (libtest shows it with a failure, or with `--nocapture`).
    fn case(&self, name: &str) {
        eprintln!("hypervisor conformance ({}): case `{name}` at {:.1?}", self.hv.kind(), self.started.elapsed());
    }

    fn name(&self, suffix: &str) -> String {
        format!("{} {suffix}", self.prefix)
    }

    fn spec(&self, name: &str) -> CreateSpec {
        CreateSpec {
            name: name.to_string(),
            image: self.setup.image.clone(),
            cpus: self.setup.cpus,
            memory_mb: self.setup.memory_mb,
            disk_bytes: None,
            description: "made by the hypervisor conformance suite".to_string(),
            owner: None,
            os: None,
        }
    }

    /// The suite's own VMs in `list`, by name.
    async fn ours(&self, case: &str) -> Vec<VmInfo> {
        let mut vms: Vec<VmInfo> =
            ok!(case, self.hv.list().await).into_iter().filter(|v| v.name.starts_with(&self.prefix)).collect();
        vms.sort_by(|x, y| x.name.cmp(&y.name));
        vms
    }

    fn guest_path(&self, file: &str) -> String {
        let dir = self.setup.capabilities.guest_dir.trim_end_matches('/');
        if dir.is_empty() { format!("/{file}") } else { format!("{dir}/{file}") }
    }

    /// Power operation that must succeed and lead to `want`, with the matching event.
    async fn power_to(&mut self, case: &str, vm: &VmInfo, op: PowerOp, want: VmState) -> VmInfo {
        let mark = self.events.mark();
        let got = match self.hv.power(&vm.id, op).await {
            Ok(v) => v,
            Err(e) => panic!("hypervisor conformance case `{case}`: {op:?} on {} failed: {e} ({e:?})", vm.name),
        };
        check!(case, got.id == vm.id, "{op:?} returned another VM: {} instead of {}", got.id, vm.id);
        check!(case, got.state == want, "{op:?} must leave the VM {want}, it returned {}", got.state);
        let now = ok!(case, self.hv.get(&vm.id).await);
        check!(case, now.state == want, "after {op:?} `get` says {}, not {want}", now.state);
        let id = vm.id.clone();
        self.events
            .expect(
                case,
                mark,
                &format!("StateChanged to {want} after {op:?}"),
                self.setup.event_timeout,
                |e| matches!(e, VmEvent::StateChanged { id: i, current, .. } if *i == id && *current == want),
            )
            .await;
        got
    }

    /// Runs a command that must succeed (exit code 0) and returns its output.
    async fn run(&self, case: &str, vm: &VmInfo, line: &str) -> ExecOutput {
        let out = ok!(case, self.hv.exec(&vm.id, sh(line)).await);
        check!(case, out.exit_code == 0, "`{line}` in the guest failed: {out:?}");
        out
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest::program(argv, Duration::from_secs(60))
}

fn sh(line: &str) -> ExecRequest {
    let mut r = req(&[line]);
    r.shell = true;
    r
}

fn is_state(e: &HypervisorError, id: &str, state: VmState) -> bool {
    matches!(e, HypervisorError::InvalidState { id: i, state: s, .. } if i == id && *s == state)
}

/// A file on the host for uploads, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(case: &str, cx: &Cx, name: &str, content: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("{}-{name}", cx.prefix));
        if let Err(e) = std::fs::write(&path, content) {
            panic!("hypervisor conformance case `{case}`: cannot write {}: {e}", path.display());
        }
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every event since the suite subscribed, so a case can look for one that came before it
/// started waiting (but after its mark).
struct Events {
    rx: broadcast::Receiver<VmEvent>,
    seen: Vec<VmEvent>,
    lagged: u64,
}

fn brief(e: &VmEvent) -> String {
    match e {
        VmEvent::Added { vm } => format!("Added({} {:?})", vm.id, vm.name),
        VmEvent::Removed { id } => format!("Removed({id})"),
        VmEvent::StateChanged { id, previous, current } => format!("StateChanged({id} {previous}->{current})"),
        VmEvent::IpChanged { id, ip_addresses } => format!("IpChanged({id} {ip_addresses:?})"),
        VmEvent::Updated { vm } => format!("Updated({} {:?} cpus={} mem={})", vm.id, vm.name, vm.cpus, vm.memory_mb),
    }
}

impl Events {
    fn drain(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(e) => self.seen.push(e),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.lagged += n,
                Err(_) => return,
            }
        }
    }

    /// Where the events caused by what follows start.
    fn mark(&mut self) -> usize {
        self.drain();
        self.seen.len()
    }

    /// Waits (up to `within`) for an event after `since` matching `pred`.
    async fn expect(
        &mut self,
        case: &str,
        since: usize,
        what: &str,
        within: Duration,
        pred: impl Fn(&VmEvent) -> bool,
    ) -> VmEvent {
        let deadline = Instant::now() + within;
        let mut i = since;
        loop {
            while i < self.seen.len() {
                if pred(&self.seen[i]) {
                    return self.seen[i].clone();
                }
                i += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let got: Vec<String> = self.seen[since..].iter().map(brief).collect();
                let lag =
                    if self.lagged > 0 { format!(" ({} events lost to lag)", self.lagged) } else { String::new() };
                panic!("hypervisor conformance case `{case}`: no {what} event within {within:?}{lag}; got {got:?}");
            }
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Ok(e)) => self.seen.push(e),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => self.lagged += n,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    panic!("hypervisor conformance case `{case}`: the event channel closed while waiting for {what}")
                }
                Err(_) => {}
            }
        }
    }
}

// ----- cases -------------------------------------------------------------------------------

async fn host_info(cx: &Cx) {
    let case = "host_info";
    let info = ok!(case, cx.hv.host_info().await);
    check!(
        case,
        info.hypervisor == cx.hv.kind(),
        "host_info says {} but kind() says {}",
        info.hypervisor,
        cx.hv.kind()
    );
    check!(case, info.cpu_count >= 1, "cpu_count is {}", info.cpu_count);
    for vm in ok!(case, cx.hv.list().await) {
        check!(case, vm.hypervisor == cx.hv.kind(), "VM {} is listed as {}", vm.id, vm.hypervisor);
    }
}

/// Unknown VMs answer NotFound naming the key, for every method; keys that cannot name a
/// VM answer NotFound or InvalidInput and never resolve to some other VM.
async fn unknown_vms(cx: &mut Cx) {
    let case = "unknown_vms";
    let hv = cx.hv.clone();
    let missing_local = std::env::temp_dir().join(format!("{}-missing", cx.prefix));
    let unknown_id = "0c0ffee0-dead-4bad-8bad-00000000c0de".to_string();
    for key in [unknown_id, cx.name("never made")] {
        let k = key.as_str();
        let named = |e: &HypervisorError| matches!(e, HypervisorError::NotFound(s) if s.contains(k));
        refused!(case, hv.get(k).await, ref e if named(e));
        refused!(case, hv.power(k, PowerOp::Start).await, ref e if named(e));
        refused!(case, hv.power(k, PowerOp::Stop { force: true, timeout: Duration::ZERO }).await, ref e if named(e));
        refused!(case, hv.delete(k).await, ref e if named(e));
        refused!(case, hv.unregister(k).await, ref e if named(e));
        refused!(case, hv.rename(k, &cx.name("renamed")).await, ref e if named(e));
        let change = ConfigChange { description: Some("x".into()), ..ConfigChange::default() };
        refused!(case, hv.configure(k, change).await, ref e if named(e));
        let spec = CloneSpec { name: cx.name("clone of nothing"), linked: false, destination: None };
        refused!(case, hv.clone_vm(k, spec).await, ref e if named(e));
        refused!(case, hv.snapshots(k).await, ref e if named(e));
        let op = SnapshotOp::Create { name: "s".into(), description: String::new() };
        refused!(case, hv.snapshot(k, op).await, ref e if named(e));
        refused!(case, hv.exec(k, req(&["true"])).await, ref e if named(e));
        refused!(case, hv.upload(k, &missing_local, "/tmp/x").await, ref e if named(e));
    }
    // Keys that are no id and no name: refused, not taken for an option, a path or a pattern.
    let long = "x".repeat(1000);
    let odd = ["", " ", "{}", "-a", "--help", "-t", "*", "../..", "a/b", "a\0b", "ünïcødé ✈", long.as_str()];
    for k in odd {
        for r in [hv.get(k).await.map(|v| v.id), hv.snapshots(k).await.map(|s| format!("{} snapshots", s.len()))] {
            match r {
                Err(HypervisorError::NotFound(_) | HypervisorError::InvalidInput(_)) => {}
                Ok(found) => {
                    panic!(
                        "hypervisor conformance case `{case}`: the key {k:?} must name no VM but resolved to {found}"
                    )
                }
                Err(e) => panic!(
                    "hypervisor conformance case `{case}`: the key {k:?} must answer NotFound or InvalidInput, not {e:?}: {e}"
                ),
            }
        }
    }
}

async fn create(cx: &mut Cx) -> VmInfo {
    let case = "create";
    let before = cx.ours(case).await;
    check!(case, before.is_empty(), "VMs of this run exist before it made any: {before:?}");
    let mark = cx.events.mark();
    let spec = cx.spec(&cx.name("a"));
    let vm = ok!(case, cx.hv.create(spec.clone()).await);
    check!(case, !vm.id.is_empty(), "the new VM has an empty id");
    check!(case, vm.name == spec.name, "name {:?}, asked for {:?}", vm.name, spec.name);
    check!(case, vm.cpus == spec.cpus, "cpus {}, asked for {}", vm.cpus, spec.cpus);
    check!(case, vm.memory_mb == spec.memory_mb, "memory {} MiB, asked for {}", vm.memory_mb, spec.memory_mb);
    check!(case, vm.description == spec.description, "description {:?}", vm.description);
    check!(case, vm.state == VmState::Stopped, "a new VM must be stopped, it is {}", vm.state);
    check!(case, vm.hypervisor == cx.hv.kind(), "hypervisor {}", vm.hypervisor);
    check!(case, vm.home.exists(), "the VM's home {} does not exist", vm.home.display());
    let id = vm.id.clone();
    cx.events
        .expect(case, mark, "Added", cx.setup.event_timeout, |e| matches!(e, VmEvent::Added { vm } if vm.id == id))
        .await;
    vm
}

/// Taken and bad names, bad resources and a missing image are refused and leave nothing.
async fn create_refused(cx: &mut Cx, a: &VmInfo) {
    let case = "create_refused";
    let hv = cx.hv.clone();
    refused!(case, hv.create(cx.spec(&a.name)).await, HypervisorError::AlreadyExists(_));
    for bad in ["", "   ", "a/b"] {
        let name = if bad.trim().is_empty() { bad.to_string() } else { cx.name(bad) };
        refused!(case, hv.create(cx.spec(&name)).await, HypervisorError::InvalidInput(_));
    }
    let mut s = cx.spec(&cx.name("zero cpus"));
    s.cpus = 0;
    refused!(case, hv.create(s).await, HypervisorError::InvalidInput(_));
    let mut s = cx.spec(&cx.name("zero memory"));
    s.memory_mb = 0;
    refused!(case, hv.create(s).await, HypervisorError::InvalidInput(_));
    let mut s = cx.spec(&cx.name("no image"));
    s.image = std::env::temp_dir().join(format!("{}-no-such-image", cx.prefix));
    refused!(case, hv.create(s).await, HypervisorError::InvalidInput(_) | HypervisorError::NotFound(_));
    let ours: Vec<String> = cx.ours(case).await.into_iter().map(|v| v.name).collect();
    check!(case, ours == vec![a.name.clone()], "refused creates left VMs behind: {ours:?}");
}

/// `list` and `get` by id and by name agree on the VM.
async fn list_and_get(cx: &Cx, a: &VmInfo) {
    let case = "list_and_get";
    let listed: Vec<VmInfo> = ok!(case, cx.hv.list().await).into_iter().filter(|v| v.id == a.id).collect();
    check!(case, listed.len() == 1, "list must hold the VM once, it holds it {} times", listed.len());
    let by_id = ok!(case, cx.hv.get(&a.id).await);
    let by_name = ok!(case, cx.hv.get(&a.name).await);
    for (how, v) in [("list", &listed[0]), ("get by id", &by_id), ("get by name", &by_name)] {
        let same = v.id == a.id
            && v.name == a.name
            && v.cpus == a.cpus
            && v.memory_mb == a.memory_mb
            && v.description == a.description
            && v.state == a.state
            && v.home == a.home
            && v.hypervisor == a.hypervisor;
        check!(case, same, "{how} disagrees with what create returned:\n{v:?}\nvs\n{a:?}");
    }
}

async fn configure_stopped(cx: &mut Cx, a: &VmInfo) {
    let case = "configure_stopped";
    let (cpus, memory_mb) = (cx.setup.cpus + 1, cx.setup.memory_mb + 64);
    let mark = cx.events.mark();
    let change = ConfigChange { cpus: Some(cpus), memory_mb: Some(memory_mb), description: Some("changed".into()) };
    let got = ok!(case, cx.hv.configure(&a.id, change).await);
    check!(
        case,
        (got.cpus, got.memory_mb, got.description.as_str()) == (cpus, memory_mb, "changed"),
        "configure returned cpus={} memory={} description={:?}",
        got.cpus,
        got.memory_mb,
        got.description
    );
    let now = ok!(case, cx.hv.get(&a.id).await);
    check!(case, (now.cpus, now.memory_mb) == (cpus, memory_mb), "get after configure: {now:?}");
    let id = a.id.clone();
    cx.events
        .expect(
            case,
            mark,
            "Updated with the new CPUs",
            cx.setup.event_timeout,
            |e| matches!(e, VmEvent::Updated { vm } if vm.id == id && vm.cpus == cpus && vm.memory_mb == memory_mb),
        )
        .await;
    // `None` leaves a field alone.
    let back = ConfigChange { cpus: Some(cx.setup.cpus), memory_mb: Some(cx.setup.memory_mb), description: None };
    let got = ok!(case, cx.hv.configure(&a.id, back).await);
    check!(
        case,
        (got.cpus, got.memory_mb, got.description.as_str()) == (cx.setup.cpus, cx.setup.memory_mb, "changed"),
        "configure back returned cpus={} memory={} description={:?}",
        got.cpus,
        got.memory_mb,
        got.description
    );
    let got = ok!(case, cx.hv.configure(&a.id, ConfigChange::default()).await);
    check!(case, got.cpus == cx.setup.cpus && got.description == "changed", "an empty change changed {got:?}");
    refused!(
        case,
        cx.hv.configure(&a.id, ConfigChange { cpus: Some(0), ..ConfigChange::default() }).await,
        HypervisorError::InvalidInput(_)
    );
    refused!(
        case,
        cx.hv.configure(&a.id, ConfigChange { memory_mb: Some(0), ..ConfigChange::default() }).await,
        HypervisorError::InvalidInput(_)
    );
}

async fn clone(cx: &mut Cx, a: &VmInfo) -> VmInfo {
    let case = "clone";
    let source = ok!(case, cx.hv.get(&a.id).await);
    let mark = cx.events.mark();
    let spec = CloneSpec { name: cx.name("b"), linked: false, destination: None };
    let b = ok!(case, cx.hv.clone_vm(&a.id, spec.clone()).await);
    check!(case, b.id != a.id && !b.id.is_empty(), "the clone must get a new id, it has {:?}", b.id);
    check!(case, b.name == spec.name, "the clone is named {:?}, not {:?}", b.name, spec.name);
    check!(case, b.state == VmState::Stopped, "the clone must be stopped, it is {}", b.state);
    check!(
        case,
        (b.cpus, b.memory_mb) == (source.cpus, source.memory_mb),
        "the clone has cpus={} memory={}, the source cpus={} memory={}",
        b.cpus,
        b.memory_mb,
        source.cpus,
        source.memory_mb
    );
    check!(case, b.home != a.home && b.home.exists(), "the clone's home {} must be its own", b.home.display());
    let ids: Vec<String> = cx.ours(case).await.into_iter().map(|v| v.id).collect();
    check!(case, ids.contains(&a.id) && ids.contains(&b.id) && ids.len() == 2, "list after clone: {ids:?}");
    check!(case, ok!(case, cx.hv.get(&b.name).await).id == b.id, "get by the clone's name finds another VM");
    let after = ok!(case, cx.hv.get(&a.id).await);
    check!(case, after.name == a.name && after.state == VmState::Stopped, "cloning changed the source: {after:?}");
    let id = b.id.clone();
    cx.events
        .expect(
            case,
            mark,
            "Added for the clone",
            cx.setup.event_timeout,
            |e| matches!(e, VmEvent::Added { vm } if vm.id == id),
        )
        .await;
    refused!(
        case,
        cx.hv.clone_vm(&a.id, CloneSpec { name: a.name.clone(), linked: false, destination: None }).await,
        HypervisorError::AlreadyExists(_)
    );
    refused!(
        case,
        cx.hv.clone_vm(&a.id, CloneSpec { name: cx.name("x/y"), linked: false, destination: None }).await,
        HypervisorError::InvalidInput(_)
    );
    check!(case, cx.ours(case).await.len() == 2, "refused clones left VMs behind");
    b
}

/// Rename a stopped VM: found by the new name only; taken and bad names refused.
async fn rename(cx: &mut Cx, a: &VmInfo, b: &VmInfo) -> VmInfo {
    let case = "rename";
    let new_name = cx.name("a renamed");
    let mark = cx.events.mark();
    let got = ok!(case, cx.hv.rename(&a.id, &new_name).await);
    check!(case, got.id == a.id && got.name == new_name, "rename returned {:?} {:?}", got.id, got.name);
    check!(case, ok!(case, cx.hv.get(&new_name).await).id == a.id, "get by the new name finds another VM");
    refused!(case, cx.hv.get(&a.name).await, HypervisorError::NotFound(_));
    let id = a.id.clone();
    let wanted = new_name.clone();
    cx.events
        .expect(
            case,
            mark,
            "Updated with the new name",
            cx.setup.event_timeout,
            |e| matches!(e, VmEvent::Updated { vm } if vm.id == id && vm.name == wanted),
        )
        .await;
    refused!(case, cx.hv.rename(&a.id, &b.name).await, HypervisorError::AlreadyExists(_));
    refused!(case, cx.hv.rename(&a.id, "").await, HypervisorError::InvalidInput(_));
    refused!(case, cx.hv.rename(&a.id, &cx.name("a/b")).await, HypervisorError::InvalidInput(_));
    // Its own name is no change.
    let same = ok!(case, cx.hv.rename(&new_name, &new_name).await);
    check!(case, same.id == a.id && same.name == new_name, "renaming to its own name gave {same:?}");
    let now = ok!(case, cx.hv.get(&b.id).await);
    check!(case, now.name == b.name, "a refused rename changed the other VM: {now:?}");
    got
}

/// Unregister keeps the files; register brings the VM back with its id.
async fn unregister_register(cx: &mut Cx, b: &VmInfo) {
    let case = "unregister_register";
    let mark = cx.events.mark();
    ok!(case, cx.hv.unregister(&b.id).await);
    refused!(case, cx.hv.get(&b.id).await, HypervisorError::NotFound(_));
    check!(case, !cx.ours(case).await.iter().any(|v| v.id == b.id), "an unregistered VM is still listed");
    check!(case, b.home.exists(), "unregister must keep the VM's files ({})", b.home.display());
    let id = b.id.clone();
    cx.events
        .expect(
            case,
            mark,
            "Removed after unregister",
            cx.setup.event_timeout,
            |e| matches!(e, VmEvent::Removed { id: i } if *i == id),
        )
        .await;
    let mark = cx.events.mark();
    let back = ok!(case, cx.hv.register(&b.home, RegisterSpec::default()).await);
    check!(case, back.id == b.id && back.name == b.name, "register gave back {:?} {:?}", back.id, back.name);
    check!(case, ok!(case, cx.hv.get(&b.name).await).id == b.id, "get by name after register");
    cx.events
        .expect(
            case,
            mark,
            "Added after register",
            cx.setup.event_timeout,
            |e| matches!(e, VmEvent::Added { vm } if vm.id == id),
        )
        .await;
    refused!(case, cx.hv.register(&b.home, RegisterSpec::default()).await, HypervisorError::AlreadyExists(_));
    // A folder that does not exist, or holds no VM, is the caller's mistake.
    let missing = std::env::temp_dir().join(format!("{}-no-such-vm", cx.prefix));
    refused!(case, cx.hv.register(&missing, RegisterSpec::default()).await, HypervisorError::InvalidInput(_));
    let empty = std::env::temp_dir().join(format!("{}-empty", cx.prefix));
    if let Err(e) = std::fs::create_dir_all(&empty) {
        panic!("hypervisor conformance case `{case}`: cannot make {}: {e}", empty.display());
    }
    let r = cx.hv.register(&empty, RegisterSpec::default()).await;
    let _ = std::fs::remove_dir_all(&empty);
    refused!(case, r, HypervisorError::InvalidInput(_));
    check!(case, cx.ours(case).await.len() == 2, "refused registers added VMs");
}

/// A snapshot of a stopped VM: listed as current, reverted to, unknown ids refused.
async fn snapshots_stopped(cx: &mut Cx, a: &VmInfo) -> Snapshot {
    let case = "snapshots_stopped";
    let hv = cx.hv.clone();
    let none = ok!(case, hv.snapshots(&a.id).await);
    check!(case, none.is_empty(), "a new VM has snapshots: {none:?}");
    let op = SnapshotOp::Create { name: "cold".into(), description: "taken while stopped".into() };
    let Some(s1) = ok!(case, hv.snapshot(&a.id, op).await) else {
        panic!("hypervisor conformance case `{case}`: snapshot Create must return the snapshot")
    };
    check!(
        case,
        s1.name == "cold" && s1.description == "taken while stopped" && s1.current && s1.state == VmState::Stopped,
        "created {s1:?}"
    );
    check!(case, !s1.id.is_empty() && s1.created_at.is_some(), "created {s1:?}");
    let list = ok!(case, hv.snapshots(&a.name).await);
    check!(case, list.len() == 1 && list[0].id == s1.id && list[0].current, "snapshots after create: {list:?}");
    let revert = SnapshotOp::Revert { snapshot_id: s1.id.clone(), skip_resume: false };
    check!(case, ok!(case, hv.snapshot(&a.id, revert).await).is_none(), "Revert must return None");
    let now = ok!(case, hv.get(&a.id).await);
    check!(case, now.state == VmState::Stopped, "reverting to a stopped snapshot left the VM {}", now.state);
    let list = ok!(case, hv.snapshots(&a.id).await);
    check!(case, list.iter().any(|s| s.id == s1.id && s.current), "the reverted-to snapshot must be current: {list:?}");
    let unknown = "0c0ffee0-dead-4bad-8bad-0000000005a9".to_string();
    refused!(
        case,
        hv.snapshot(&a.id, SnapshotOp::Revert { snapshot_id: unknown.clone(), skip_resume: false }).await,
        HypervisorError::NotFound(_)
    );
    refused!(
        case,
        hv.snapshot(&a.id, SnapshotOp::Delete { snapshot_id: unknown, delete_children: false }).await,
        HypervisorError::NotFound(_)
    );
    check!(case, ok!(case, hv.snapshots(&a.id).await).len() == 1, "refused snapshot operations changed the list");
    s1
}

async fn start(cx: &mut Cx, a: &VmInfo) {
    let case = "start";
    cx.power_to(case, a, PowerOp::Start, VmState::Running).await;
    if cx.setup.capabilities.exec {
        // The guest boots: wait until a command runs in it.
        let deadline = Instant::now() + cx.setup.boot_timeout;
        loop {
            let mut r = req(&["true"]);
            r.timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            match cx.hv.exec(&a.id, r).await {
                Ok(out) if out.exit_code == 0 => break,
                Ok(out) => panic!("hypervisor conformance case `{case}`: `true` in the guest gave {out:?}"),
                Err(_) if Instant::now() < deadline => {
                    // Not a synchronisation: a pause between polls of a booting guest.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!(
                    "hypervisor conformance case `{case}`: no command ran in the guest within {:?}: {e}",
                    cx.setup.boot_timeout
                ),
            }
        }
    }
}

/// Operations a running VM does not allow are refused with its state; the description
/// can change at any time.
async fn refused_while_running(cx: &mut Cx, a: &VmInfo) {
    let case = "refused_while_running";
    let hv = cx.hv.clone();
    let id = a.id.as_str();
    let running = |e: &HypervisorError| is_state(e, id, VmState::Running);
    refused!(case, hv.power(id, PowerOp::Start).await, ref e if running(e));
    refused!(case, hv.power(id, PowerOp::Resume).await, ref e if running(e));
    refused!(case, hv.delete(id).await, ref e if running(e));
    refused!(case, hv.unregister(id).await, ref e if running(e));
    refused!(case, hv.rename(id, &cx.name("hot rename")).await, ref e if running(e));
    refused!(case, hv.configure(id, ConfigChange { cpus: Some(cx.setup.cpus + 1), ..ConfigChange::default() }).await,
        ref e if running(e));
    refused!(case, hv.configure(id, ConfigChange { memory_mb: Some(cx.setup.memory_mb + 64), ..ConfigChange::default() }).await,
        ref e if running(e));
    refused!(case, hv.clone_vm(id, CloneSpec { name: cx.name("hot clone"), linked: false, destination: None }).await,
        ref e if running(e));
    let got = ok!(
        case,
        hv.configure(id, ConfigChange { description: Some("running".into()), ..ConfigChange::default() }).await
    );
    check!(case, got.description == "running" && got.state == VmState::Running, "configure description: {got:?}");
    let now = ok!(case, hv.get(id).await);
    check!(
        case,
        now.state == VmState::Running && now.name == a.name && now.cpus == cx.setup.cpus,
        "refused operations changed the VM: {now:?}"
    );
    check!(case, cx.ours(case).await.len() == 2, "refused operations added or removed VMs");
}

/// Commands in the guest: argv words arrive whole, exit codes, stdout and stderr apart,
/// stdin, environment and working folder.
async fn exec(cx: &mut Cx, a: &VmInfo) {
    let case = "exec";
    let hv = cx.hv.clone();
    let out = ok!(case, hv.exec(&a.id, req(&["printf", "%s|", "a b", "it's", "$HOME", "*", ";"])).await);
    check!(case, (out.exit_code, out.stdout.as_str()) == (0, "a b|it's|$HOME|*|;|"), "printf gave {out:?}");
    let out = ok!(case, hv.exec(&a.name, sh("echo to-out; echo to-err >&2; exit 3")).await);
    check!(
        case,
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()) == (3, "to-out\n", "to-err\n"),
        "a shell line gave {out:?}"
    );
    let out = ok!(case, hv.exec(&a.id, req(&["false"])).await);
    check!(case, out.exit_code == 1, "`false` gave {out:?}");
    let mut r = req(&["cat"]);
    r.stdin = Some(b"from stdin\nline 2".to_vec());
    let out = ok!(case, hv.exec(&a.id, r).await);
    check!(case, out.stdout == "from stdin\nline 2", "stdin came back as {out:?}");
    let mut r = req(&["sh", "-c", "echo \"$CONFORMANCE_GREETING\""]);
    r.env.insert("CONFORMANCE_GREETING".into(), "hello 'world'".into());
    let out = ok!(case, hv.exec(&a.id, r).await);
    check!(case, out.stdout == "hello 'world'\n", "the environment gave {out:?}");
    let mut r = req(&["pwd"]);
    r.working_dir = Some("/".into());
    let out = ok!(case, hv.exec(&a.id, r).await);
    check!(case, out.stdout == "/\n", "pwd in / gave {out:?}");
    refused!(case, hv.exec(&a.id, req(&[])).await, HypervisorError::InvalidInput(_));
}

/// A file copied into the guest reads back the same.
async fn upload(cx: &mut Cx, a: &VmInfo) {
    let case = "upload";
    let content: String = (0..5000).map(|i| format!("line {i} of the conformance upload\n")).collect();
    let scratch = Scratch::new(case, cx, "upload.txt", &content);
    let local = scratch.0.as_path();
    let remote = cx.guest_path("hangar-conformance-upload.txt");
    ok!(case, cx.hv.upload(&a.id, local, &remote).await);
    let out = cx.run(case, a, &format!("cat '{remote}'")).await;
    check!(
        case,
        out.stdout == content,
        "the uploaded file reads back {} bytes, not {}",
        out.stdout.len(),
        content.len()
    );
    let missing = local.with_extension("missing");
    refused!(
        case,
        cx.hv.upload(&a.id, &missing, &remote).await,
        HypervisorError::Io { .. } | HypervisorError::InvalidInput(_) | HypervisorError::NotFound(_)
    );
    refused!(case, cx.hv.upload(&a.id, local, "").await, HypervisorError::InvalidInput(_));
}

/// A snapshot of a running VM: its parent is the current one, reverting leaves the VM
/// running (and, when the driver restores guests, the guest as it was); deleting a parent
/// keeps its child; DeleteAll empties the list.
async fn snapshots_running(cx: &mut Cx, a: &VmInfo, s1: &Snapshot) {
    let case = "snapshots_running";
    let hv = cx.hv.clone();
    let restore = cx.setup.capabilities.exec && cx.setup.capabilities.snapshots_restore_guest;
    let marker = cx.guest_path("hangar-conformance-marker");
    if restore {
        cx.run(case, a, &format!("echo before > '{marker}'; sync")).await;
    }
    let op = SnapshotOp::Create { name: "warm".into(), description: String::new() };
    let Some(s2) = ok!(case, hv.snapshot(&a.id, op).await) else {
        panic!("hypervisor conformance case `{case}`: snapshot Create must return the snapshot")
    };
    check!(case, s2.name == "warm" && s2.current && s2.state == VmState::Running, "created {s2:?}");
    check!(case, s2.parent.as_deref() == Some(s1.id.as_str()), "the new snapshot's parent must be {}: {s2:?}", s1.id);
    check!(case, ok!(case, hv.get(&a.id).await).state == VmState::Running, "taking a snapshot stopped the VM");
    let list = ok!(case, hv.snapshots(&a.id).await);
    let current: Vec<&str> = list.iter().filter(|s| s.current).map(|s| s.id.as_str()).collect();
    check!(case, list.len() == 2 && current == vec![s2.id.as_str()], "snapshots: {list:?}");
    if restore {
        cx.run(case, a, &format!("echo after > '{marker}'; sync")).await;
    }
    let revert = SnapshotOp::Revert { snapshot_id: s2.id.clone(), skip_resume: false };
    check!(case, ok!(case, hv.snapshot(&a.id, revert).await).is_none(), "Revert must return None");
    let now = ok!(case, hv.get(&a.id).await);
    check!(case, now.state == VmState::Running, "reverting to a running snapshot left the VM {}", now.state);
    let list = ok!(case, hv.snapshots(&a.id).await);
    check!(case, list.iter().any(|s| s.id == s2.id && s.current), "the reverted-to snapshot must be current: {list:?}");
    if restore {
        let out = cx.run(case, a, &format!("cat '{marker}'")).await;
        check!(case, out.stdout == "before\n", "after the revert the guest's file holds {:?}", out.stdout);
    }
    let del = SnapshotOp::Delete { snapshot_id: s1.id.clone(), delete_children: false };
    check!(case, ok!(case, hv.snapshot(&a.id, del).await).is_none(), "Delete must return None");
    let list = ok!(case, hv.snapshots(&a.id).await);
    check!(
        case,
        list.len() == 1 && list[0].id == s2.id && list[0].parent.is_none(),
        "deleting the parent alone must keep its child, re-parented: {list:?}"
    );
    ok!(case, hv.snapshot(&a.id, SnapshotOp::DeleteAll).await);
    let list = ok!(case, hv.snapshots(&a.id).await);
    check!(case, list.is_empty(), "snapshots after DeleteAll: {list:?}");
    check!(case, ok!(case, hv.get(&a.id).await).state == VmState::Running, "deleting snapshots stopped the VM");
}

async fn pause_resume(cx: &mut Cx, a: &VmInfo) {
    let case = "pause_resume";
    cx.power_to(case, a, PowerOp::Pause, VmState::Paused).await;
    let paused = |e: &HypervisorError| is_state(e, &a.id, VmState::Paused);
    refused!(case, cx.hv.power(&a.id, PowerOp::Pause).await, ref e if paused(e));
    refused!(case, cx.hv.power(&a.id, PowerOp::Start).await, ref e if paused(e));
    if cx.setup.capabilities.exec {
        refused!(case, cx.hv.exec(&a.id, req(&["true"])).await, ref e if paused(e));
    }
    cx.power_to(case, a, PowerOp::Resume, VmState::Running).await;
    if cx.setup.capabilities.exec {
        cx.run(case, a, "true").await;
    }
}

async fn suspend_resume(cx: &mut Cx, a: &VmInfo) {
    let case = "suspend_resume";
    cx.power_to(case, a, PowerOp::Suspend, VmState::Suspended).await;
    let suspended = |e: &HypervisorError| is_state(e, &a.id, VmState::Suspended);
    refused!(case, cx.hv.power(&a.id, PowerOp::Suspend).await, ref e if suspended(e));
    refused!(case, cx.hv.power(&a.id, PowerOp::Pause).await, ref e if suspended(e));
    if cx.setup.capabilities.exec {
        refused!(case, cx.hv.exec(&a.id, req(&["true"])).await, ref e if suspended(e));
    }
    cx.power_to(case, a, PowerOp::Resume, VmState::Running).await;
    if cx.setup.capabilities.exec {
        let out = cx.run(case, a, "echo alive").await;
        check!(case, out.stdout == "alive\n", "after resume the guest said {out:?}");
    }
}

async fn stop(cx: &mut Cx, a: &VmInfo) {
    let case = "stop";
    let op = PowerOp::Stop { force: false, timeout: cx.setup.stop_timeout };
    let got = cx.power_to(case, a, op, VmState::Stopped).await;
    check!(case, got.ip_addresses.is_empty(), "a stopped VM reports addresses {:?}", got.ip_addresses);
}

/// Every power operation but Start is refused on a stopped VM, naming its state.
async fn refused_while_stopped(cx: &mut Cx, a: &VmInfo) {
    let case = "refused_while_stopped";
    let hv = cx.hv.clone();
    let ops = [
        PowerOp::Stop { force: false, timeout: Duration::from_secs(5) },
        PowerOp::Stop { force: true, timeout: Duration::ZERO },
        PowerOp::Kill,
        PowerOp::Pause,
        PowerOp::Resume,
        PowerOp::Suspend,
        PowerOp::Reset,
        PowerOp::Restart,
    ];
    for op in ops {
        match hv.power(&a.id, op).await {
            Err(ref e) if is_state(e, &a.id, VmState::Stopped) => {}
            other => panic!(
                "hypervisor conformance case `{case}`: {op:?} on a stopped VM must fail with InvalidState(stopped), gave {}",
                show(&other)
            ),
        }
    }
    if cx.setup.capabilities.exec {
        let stopped = |e: &HypervisorError| is_state(e, &a.id, VmState::Stopped);
        refused!(case, hv.exec(&a.id, req(&["true"])).await, ref e if stopped(e));
        let scratch = Scratch::new(case, cx, "small.txt", "small\n");
        refused!(case, hv.upload(&a.id, &scratch.0, &cx.guest_path("x")).await, ref e if stopped(e));
    }
    let now = ok!(case, hv.get(&a.id).await);
    check!(case, now.state == VmState::Stopped, "refused operations left the VM {}", now.state);
}

/// Reset keeps a VM running; Kill stops it at once (on the second VM, without waiting for
/// its guest).
async fn reset_and_kill(cx: &mut Cx, b: &VmInfo) {
    let case = "reset_and_kill";
    cx.power_to(case, b, PowerOp::Start, VmState::Running).await;
    let got = ok!(case, cx.hv.power(&b.id, PowerOp::Reset).await);
    check!(case, got.state == VmState::Running, "Reset must leave the VM running, it returned {}", got.state);
    cx.power_to(case, b, PowerOp::Kill, VmState::Stopped).await;
}

/// Delete removes the VM from the list, its files, and answers NotFound after.
async fn delete(cx: &mut Cx, vms: &[&VmInfo]) {
    let case = "delete";
    for vm in vms {
        let mark = cx.events.mark();
        ok!(case, cx.hv.delete(&vm.id).await);
        check!(case, !cx.ours(case).await.iter().any(|v| v.id == vm.id), "a deleted VM is still listed");
        refused!(case, cx.hv.get(&vm.id).await, HypervisorError::NotFound(_));
        refused!(case, cx.hv.get(&vm.name).await, HypervisorError::NotFound(_));
        refused!(case, cx.hv.delete(&vm.id).await, HypervisorError::NotFound(_));
        check!(case, !vm.home.exists(), "delete must remove the VM's files, {} is still there", vm.home.display());
        let id = vm.id.clone();
        cx.events
            .expect(
                case,
                mark,
                "Removed",
                cx.setup.event_timeout,
                |e| matches!(e, VmEvent::Removed { id: i } if *i == id),
            )
            .await;
    }
    let left = cx.ours(case).await;
    check!(case, left.is_empty(), "VMs of the suite are left: {left:?}");
}
