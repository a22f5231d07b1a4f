//! Parallels Desktop driver for Hangar.
//!
//! [`ParallelsDriver`] implements [`hangar_hypervisor::Hypervisor`] by running `prlctl`
//! and `prlsrvctl` (argv only, never a shell) and parsing their `--json` output with
//! tolerant types. When the agent runs as root, VM-scoped calls run as the VM's owner
//! (`sudo -u OWNER` or setuid, see [`RunAs`]). Live changes come from a long-lived
//! `prlctl monitor-events --json` per host user (restarted with backoff when it dies) plus a
//! periodic reconcile through `list`.
//!
//! The crate also ships `hangar-fake-prlctl`, a test double of both tools that keeps VM
//! state in a folder; the integration tests drive the real driver against it.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod command;
mod events;
pub mod parse;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hangar_hypervisor::{
    CloneSpec, ConfigChange, CreateSpec, ExecOutput, ExecRequest, HostInfo, Hypervisor, HypervisorError,
    HypervisorKind, PowerOp, RegisterSpec, Result, Snapshot, SnapshotOp, VmEvent, VmInfo, VmState,
};
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

pub use command::{Input, Invocation, Output, RunAs, Tool, sh_quote};

use command::Runner;

/// Settings of the Parallels driver.
#[derive(Debug, Clone)]
pub struct ParallelsConfig {
    /// Path of `prlctl` (default `/usr/local/bin/prlctl`).
    pub prlctl: PathBuf,
    /// Path of `prlsrvctl` (default `/usr/local/bin/prlsrvctl`).
    pub prlsrvctl: PathBuf,
    /// `sysctl`, asked for the host's CPU count, memory and CPU name (default `sysctl`,
    /// found on `PATH`; facts it does not answer come from the machine itself).
    pub sysctl: PathBuf,
    /// Deadline of one call (the reference uses 3 minutes).
    pub command_timeout: Duration,
    /// Deadline of an upload (a file or folder streamed through `prlctl exec`).
    pub upload_timeout: Duration,
    /// After a deadline: time between TERM and KILL to the process group.
    pub kill_grace: Duration,
    /// How to run VM-scoped calls as the VM's owner when the agent is root.
    pub run_as: RunAs,
    /// `sudo`, for [`RunAs::Sudo`].
    pub sudo: PathBuf,
    /// Host users whose VMs this agent manages when it runs as root (each gets its own
    /// `list` and `monitor-events`). Empty: the agent's own user, and when root also every
    /// user `prlsrvctl user list` names (as the reference lists every macOS user's VMs).
    pub users: Vec<String>,
    /// Treat the agent as root (or not) instead of asking the OS; for tests.
    pub assume_root: Option<bool>,
    /// Folder for VMs made by `create`; `prlsrvctl info`'s `VM home` when `None`.
    pub vm_dir: Option<PathBuf>,
    /// Extra environment for every call.
    pub env: BTreeMap<String, String>,
    /// Run `prlctl monitor-events` and the reconcile loop (needs a Tokio runtime at
    /// construction).
    pub watch_events: bool,
    /// Read `monitor-events` through a pseudo-terminal, as the reference does, so that
    /// prlctl line-buffers its output.
    pub monitor_pty: bool,
    /// Period of the reconcile through `list` (the reference uses 5 minutes).
    pub reconcile_interval: Duration,
    /// First and longest wait before restarting a dead `monitor-events`.
    pub monitor_backoff: (Duration, Duration),
    /// Concurrent `prlctl exec` calls (macOS guests allow few logins; the reference uses 2).
    pub max_concurrent_exec: usize,
    /// Capacity of the event channel.
    pub event_capacity: usize,
    /// Folder of the helper ledger (`hangar_proc::Ledger`: pid files of the running
    /// `monitor-events`), swept when the driver is made so a monitor a killed agent left
    /// behind is stopped. `None`: no pid files (on Linux the parent-death signal still applies).
    pub run_dir: Option<PathBuf>,
}

impl Default for ParallelsConfig {
    fn default() -> Self {
        ParallelsConfig {
            prlctl: PathBuf::from("/usr/local/bin/prlctl"),
            prlsrvctl: PathBuf::from("/usr/local/bin/prlsrvctl"),
            sysctl: PathBuf::from("sysctl"),
            command_timeout: Duration::from_secs(180),
            upload_timeout: Duration::from_secs(3600),
            kill_grace: Duration::from_secs(2),
            run_as: RunAs::Sudo,
            sudo: PathBuf::from("/usr/bin/sudo"),
            users: Vec::new(),
            assume_root: None,
            vm_dir: None,
            env: BTreeMap::new(),
            watch_events: true,
            monitor_pty: true,
            reconcile_interval: Duration::from_secs(300),
            monitor_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            max_concurrent_exec: 2,
            event_capacity: 1024,
            run_dir: None,
        }
    }
}

impl ParallelsConfig {
    /// Defaults with the tools (`prlctl`, `prlsrvctl`, `sysctl`) found in `dir` (for
    /// example a folder of test symlinks).
    pub fn with_tools_in(dir: &Path) -> Self {
        ParallelsConfig {
            prlctl: dir.join("prlctl"),
            prlsrvctl: dir.join("prlsrvctl"),
            sysctl: dir.join("sysctl"),
            ..Default::default()
        }
    }
}

/// The Parallels Desktop driver.
pub struct ParallelsDriver {
    inner: Arc<Inner>,
    cancel: CancellationToken,
}

pub(crate) struct Inner {
    cfg: ParallelsConfig,
    is_root: bool,
    /// The host user the agent runs as (`root` when root): the `user` of the VMs it lists as
    /// itself, as the reference reports them.
    agent_user: String,
    runner: Runner,
    events: broadcast::Sender<VmEvent>,
    /// Last known VMs, for events: filled by the reconcile and by monitor events.
    known: Mutex<HashMap<String, VmInfo>>,
    /// VM id → owner, learnt from `list`.
    owners: Mutex<HashMap<String, Option<String>>>,
    /// Descriptions of snapshots this driver made (`snapshot-list --json` lacks them).
    snapshot_notes: Mutex<BTreeMap<String, String>>,
    exec_slots: Semaphore,
    /// Pid files of the running monitors (from `cfg.run_dir`).
    ledger: Option<hangar_proc::Ledger>,
}

impl Drop for ParallelsDriver {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The allowed states of an operation, as an `InvalidState` check.
fn require(vm: &VmInfo, operation: &'static str, allowed: &[VmState]) -> Result<()> {
    if allowed.contains(&vm.state) {
        Ok(())
    } else {
        Err(HypervisorError::InvalidState { id: vm.id.clone(), operation, state: vm.state })
    }
}

fn is_not_found(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("could not be found")
        || s.contains("is not registered")
        || s.contains("unable to find the virtual machine")
}

fn validate_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.contains('/') || name.contains('\0') || name.len() > 255 {
        return Err(HypervisorError::InvalidInput(format!("invalid VM name {name:?}")));
    }
    Ok(())
}

/// Allocated size of a bundle on the host (0 when unreadable).
fn dir_size(path: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                use std::os::unix::fs::MetadataExt;
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, user: &str) -> Result<()> {
    let entry = nix::unistd::User::from_name(user)
        .map_err(|e| HypervisorError::Unavailable(format!("cannot look up host user {user:?}: {e}")))?
        .ok_or_else(|| HypervisorError::InvalidInput(format!("no host user named {user:?}")))?;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &p,
            Some(entry.uid),
            Some(entry.gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| HypervisorError::io(&p, std::io::Error::from(e)))?;
        if p.is_dir() && !p.is_symlink() {
            for child in std::fs::read_dir(&p).map_err(|e| HypervisorError::io(&p, e))?.flatten() {
                stack.push(child.path());
            }
        }
    }
    Ok(())
}

/// Removes a half-made VM (unregisters it, deletes its folder) unless disarmed; runs on
/// error and when the `create` future is dropped.
struct CreateCleanup {
    inner: Arc<Inner>,
    folder: Option<PathBuf>,
    registered: Option<(String, Option<String>)>,
}

impl CreateCleanup {
    fn disarm(&mut self) {
        self.folder = None;
        self.registered = None;
    }
}

impl Drop for CreateCleanup {
    fn drop(&mut self) {
        let (folder, registered) = (self.folder.take(), self.registered.take());
        if folder.is_none() && registered.is_none() {
            return;
        }
        let inner = self.inner.clone();
        let work = async move {
            if let Some((id, owner)) = registered
                && let Err(e) = inner.prlctl(owner.as_deref(), &["unregister", &id]).await
            {
                warn!(%id, %e, "cleanup of a failed create: unregister failed");
            }
            if let Some(folder) = folder
                && let Err(e) = tokio::fs::remove_dir_all(&folder).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(folder = %folder.display(), %e, "cleanup of a failed create: cannot remove the folder");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(work);
            }
            Err(_) => warn!("cleanup of a failed create skipped: no runtime"),
        }
    }
}

impl Inner {
    fn str_args(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    /// The host users to enumerate: the configured ones when root, else the agent's own.
    pub(crate) fn scopes(&self) -> Vec<Option<String>> {
        if self.is_root && self.cfg.run_as != RunAs::Never && !self.cfg.users.is_empty() {
            self.cfg.users.iter().cloned().map(Some).collect()
        } else {
            vec![None]
        }
    }

    /// The host users whose VMs `list` and `get` look at: the configured ones; else, when
    /// the agent runs as root, the agent's own and every user Parallels Desktop knows
    /// (`prlsrvctl user list`), so that a root agent sees every macOS user's VMs as the
    /// reference does (it lists `dscl . /Users` and runs `prlctl list` as each of them).
    pub(crate) async fn list_scopes(&self) -> Vec<Option<String>> {
        if !(self.is_root && self.cfg.run_as != RunAs::Never && self.cfg.users.is_empty()) {
            return self.scopes();
        }
        let mut out = vec![None];
        let args = Self::str_args(&["user", "list", "--json"]);
        let listed = match self.call(Tool::Prlsrvctl, None, args, None, self.cfg.command_timeout, "user list").await {
            Ok((_, o)) => parse::user_list(&o.stdout),
            Err(e) => Err(e.to_string()),
        };
        match listed {
            Ok(users) => {
                for u in users {
                    // `NAME` is `user@host`; system accounts are skipped, as the reference does.
                    let name = u.name.split('@').next().unwrap_or_default().trim().to_string();
                    let system = name.is_empty()
                        || name == "root"
                        || name.starts_with('_')
                        || name.starts_with("daemon")
                        || name.starts_with("nobody");
                    if !system && !out.contains(&Some(name.clone())) {
                        out.push(Some(name));
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list the host's Parallels users; listing the agent's own VMs only"),
        }
        out
    }

    pub(crate) fn invocation(&self, tool: Tool, args: Vec<String>, owner: Option<&str>) -> Invocation {
        let path = match tool {
            Tool::Prlctl => &self.cfg.prlctl,
            Tool::Prlsrvctl => &self.cfg.prlsrvctl,
        };
        Invocation::build(tool, path, args, owner, self.cfg.run_as, self.is_root, &self.cfg.sudo)
    }

    /// Run and require exit code 0; a not-found message becomes `NotFound(subject)`.
    async fn call(
        &self,
        tool: Tool,
        owner: Option<&str>,
        args: Vec<String>,
        input: Option<Input>,
        timeout: Duration,
        subject: &str,
    ) -> Result<(Invocation, Output)> {
        let inv = self.invocation(tool, args, owner);
        let out = self.runner.run(&inv, input, timeout).await?;
        if out.code == Some(0) {
            return Ok((inv, out));
        }
        if is_not_found(&out.stderr) {
            return Err(HypervisorError::NotFound(subject.to_string()));
        }
        if out.stderr.to_ascii_lowercase().contains("already exists")
            || out.stderr.to_ascii_lowercase().contains("is already registered")
        {
            return Err(HypervisorError::AlreadyExists(subject.to_string()));
        }
        Err(HypervisorError::CommandFailed {
            command: inv.to_string(),
            code: out.code,
            stderr: out.stderr.trim().to_string(),
        })
    }

    async fn prlctl(&self, owner: Option<&str>, args: &[&str]) -> Result<(Invocation, Output)> {
        let subject = args.get(1).copied().unwrap_or_default().to_string();
        self.call(Tool::Prlctl, owner, Self::str_args(args), None, self.cfg.command_timeout, &subject).await
    }

    /// `prlctl list [<vm>] -a -i [-t] --json` as `owner`.
    async fn list_raw(&self, owner: Option<&str>, key: Option<&str>, templates: bool) -> Result<Vec<VmInfo>> {
        let mut args = vec!["list"];
        if let Some(vm) = key {
            args.push(vm);
        }
        args.extend(["-a", "-i"]);
        if templates {
            args.push("-t");
        }
        args.push("--json");
        let (inv, out) = self.prlctl(owner, &args).await.map_err(|e| match (e, key) {
            (HypervisorError::NotFound(_), Some(vm)) => HypervisorError::NotFound(vm.to_string()),
            (e, _) => e,
        })?;
        let vms = parse::vm_list(&out.stdout)
            .map_err(|message| HypervisorError::Parse { command: inv.to_string(), message })?;
        let mut infos = Vec::with_capacity(vms.len());
        for vm in vms {
            // The bulk list may omit `Home`; the single-VM form has it.
            let vm = if vm.home_dir().as_os_str().is_empty() && key.is_none() {
                let (inv1, out1) = self.prlctl(owner, &["list", parse::trim_id(&vm.id), "-a", "-i", "--json"]).await?;
                parse::vm_list(&out1.stdout)
                    .map_err(|message| HypervisorError::Parse { command: inv1.to_string(), message })?
                    .into_iter()
                    .next()
                    .unwrap_or(vm)
            } else {
                vm
            };
            let home = vm.home_dir();
            let size = if home.as_os_str().is_empty() {
                0
            } else {
                tokio::task::spawn_blocking(move || dir_size(&home)).await.unwrap_or(0)
            };
            // A VM listed as the agent itself belongs to the agent's user (the reference's
            // `user`); calls for it still run as the agent (`root` is never wrapped).
            let user = owner.map(str::to_string).or_else(|| Some(self.agent_user.clone()).filter(|u| !u.is_empty()));
            let info = vm.to_info(user, size);
            if let Ok(mut owners) = self.owners.lock() {
                owners.insert(info.id.clone(), owner.map(str::to_string));
            }
            infos.push(info);
        }
        Ok(infos)
    }

    pub(crate) async fn list(&self) -> Result<Vec<VmInfo>> {
        let mut all: Vec<VmInfo> = Vec::new();
        for scope in self.list_scopes().await {
            for templates in [false, true] {
                for vm in self.list_raw(scope.as_deref(), None, templates).await? {
                    // A VM two users can see is listed once, under the first.
                    if !all.iter().any(|v| v.id.eq_ignore_ascii_case(&vm.id)) {
                        all.push(vm);
                    }
                }
            }
        }
        Ok(all)
    }

    pub(crate) async fn get(&self, vm: &str) -> Result<VmInfo> {
        let key = parse::trim_id(vm);
        if key.is_empty() {
            return Err(HypervisorError::InvalidInput("empty VM id or name".to_string()));
        }
        if key.contains('\0') {
            return Err(HypervisorError::InvalidInput(format!("VM id or name {vm:?} contains a NUL byte")));
        }
        if key.starts_with('-') {
            // `prlctl list <key>` would take it for an option (`-a` lists every VM): match
            // it against the names in the full list instead.
            return self
                .list()
                .await?
                .into_iter()
                .find(|v| v.name == key)
                .ok_or_else(|| HypervisorError::NotFound(vm.to_string()));
        }
        let mut scopes = self.list_scopes().await;
        let cached = self.owners.lock().ok().and_then(|o| o.get(key).cloned());
        if let Some(owner) = cached
            && let Some(pos) = scopes.iter().position(|s| *s == owner)
        {
            scopes.swap(0, pos);
        }
        for scope in scopes {
            match self.list_raw(scope.as_deref(), Some(key), false).await {
                Ok(mut vms) if !vms.is_empty() => return Ok(vms.swap_remove(0)),
                Ok(_) | Err(HypervisorError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(HypervisorError::NotFound(vm.to_string()))
    }

    async fn find_by_name(&self, name: &str) -> Result<Option<VmInfo>> {
        Ok(self.list().await?.into_iter().find(|v| v.name == name))
    }

    async fn snapshot_list(&self, vm: &VmInfo) -> Result<Vec<Snapshot>> {
        let (inv, out) = self.prlctl(vm.owner.as_deref(), &["snapshot-list", &vm.id, "--json"]).await?;
        let entries = parse::snapshot_map(&out.stdout)
            .map_err(|message| HypervisorError::Parse { command: inv.to_string(), message })?;
        let notes = self.snapshot_notes.lock().map(|n| n.clone()).unwrap_or_default();
        Ok(parse::snapshots(entries, &notes))
    }

    /// Run a power command; if prlctl refuses, report the state it refused in.
    async fn power_call(
        &self,
        vm: &VmInfo,
        op: &'static str,
        args: &[&str],
        allowed: &[VmState],
        timeout: Duration,
    ) -> Result<()> {
        let res = self.call(Tool::Prlctl, vm.owner.as_deref(), Self::str_args(args), None, timeout, &vm.id).await;
        match res {
            Ok(_) => Ok(()),
            Err(HypervisorError::CommandFailed { command, code, stderr }) => {
                let now = self.get(&vm.id).await?;
                if allowed.contains(&now.state) {
                    Err(HypervisorError::CommandFailed { command, code, stderr })
                } else {
                    Err(HypervisorError::InvalidState { id: now.id, operation: op, state: now.state })
                }
            }
            Err(e) => Err(e),
        }
    }
}

impl ParallelsDriver {
    /// Make a driver. With `watch_events` (the default) and inside a Tokio runtime, this
    /// starts `prlctl monitor-events` and the reconcile loop; they stop when the driver is
    /// dropped.
    pub fn new(cfg: ParallelsConfig) -> Result<Self> {
        if cfg.command_timeout.is_zero() {
            return Err(HypervisorError::InvalidInput("command_timeout must be positive".to_string()));
        }
        let is_root = cfg.assume_root.unwrap_or_else(|| nix::unistd::geteuid().is_root());
        let agent_user = if is_root {
            "root".to_string()
        } else {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_default()
        };
        let ledger = match &cfg.run_dir {
            Some(dir) => {
                let ledger = hangar_proc::Ledger::open(dir).map_err(|e| HypervisorError::io(dir, e))?;
                let swept = ledger.sweep();
                if !swept.stopped.is_empty() {
                    warn!(pids = ?swept.stopped, "stopped prlctl helpers an earlier run left behind");
                }
                Some(ledger)
            }
            None => None,
        };
        let (events, _) = broadcast::channel(cfg.event_capacity.max(16));
        let inner = Arc::new(Inner {
            ledger,
            runner: Runner { env: cfg.env.clone(), kill_grace: cfg.kill_grace },
            exec_slots: Semaphore::new(cfg.max_concurrent_exec.max(1)),
            cfg,
            is_root,
            agent_user,
            events,
            known: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            snapshot_notes: Mutex::new(BTreeMap::new()),
        });
        let cancel = CancellationToken::new();
        if inner.cfg.watch_events {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => events::spawn(&handle, inner.clone(), cancel.clone()),
                Err(_) => warn!("no Tokio runtime: Parallels events are not watched"),
            }
        }
        Ok(ParallelsDriver { inner, cancel })
    }

    /// The driver's settings.
    pub fn config(&self) -> &ParallelsConfig {
        &self.inner.cfg
    }

    /// The invocation the driver would spawn for `prlctl ARGS` as `owner` (for inspection).
    pub fn prlctl_invocation(&self, args: &[&str], owner: Option<&str>) -> Invocation {
        self.inner.invocation(Tool::Prlctl, Inner::str_args(args), owner)
    }

    /// `prlsrvctl user list --json`: host users known to Parallels Desktop.
    pub async fn users(&self) -> Result<Vec<parse::PrlUser>> {
        let (inv, out) = self
            .inner
            .call(
                Tool::Prlsrvctl,
                None,
                Inner::str_args(&["user", "list", "--json"]),
                None,
                self.inner.cfg.command_timeout,
                "user list",
            )
            .await?;
        parse::user_list(&out.stdout).map_err(|message| HypervisorError::Parse { command: inv.to_string(), message })
    }

    async fn server_info(&self, owner: Option<&str>) -> Result<parse::PrlServerInfo> {
        let (inv, out) = self
            .inner
            .call(
                Tool::Prlsrvctl,
                owner,
                Inner::str_args(&["info", "--json"]),
                None,
                self.inner.cfg.command_timeout,
                "info",
            )
            .await?;
        parse::server_info(&out.stdout).map_err(|message| HypervisorError::Parse { command: inv.to_string(), message })
    }

    fn guest_is_windows(vm: &VmInfo) -> bool {
        vm.os.to_ascii_lowercase().starts_with("win")
    }

    /// Build the single command line handed to `prlctl exec` for a Unix guest. prlctl runs
    /// it through the guest's shell, so every word is quoted.
    pub fn unix_command_line(req: &ExecRequest) -> Result<String> {
        let Some(first) = req.argv.first() else {
            return Err(HypervisorError::InvalidInput("empty command".to_string()));
        };
        for key in req.env.keys() {
            let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(HypervisorError::InvalidInput(format!("invalid environment variable name {key:?}")));
            }
        }
        let program: Vec<String> = if req.shell {
            let mut words = vec!["/bin/sh".to_string(), "-c".to_string(), sh_quote(first)];
            words.extend(req.argv[1..].iter().map(|a| sh_quote(a)));
            words
        } else {
            req.argv.iter().map(|a| sh_quote(a)).collect()
        };
        let mut words: Vec<String> = Vec::new();
        if let Some(user) = &req.user {
            words.extend(["sudo", "-n", "-H", "-u"].map(String::from));
            words.push(sh_quote(user));
            words.push("--".to_string());
        }
        if !req.env.is_empty() {
            words.push("env".to_string());
            words.extend(req.env.iter().map(|(k, v)| sh_quote(&format!("{k}={v}"))));
        }
        words.extend(program);
        let line = words.join(" ");
        Ok(match &req.working_dir {
            Some(dir) => format!("cd {} && exec {line}", sh_quote(dir)),
            None => line,
        })
    }

    fn windows_command_line(req: &ExecRequest) -> Result<String> {
        if !req.env.is_empty() || req.working_dir.is_some() || req.user.is_some() {
            return Err(HypervisorError::Unsupported {
                driver: HypervisorKind::Parallels,
                what: "environment, working folder or user for commands in Windows guests".to_string(),
            });
        }
        let Some(first) = req.argv.first() else {
            return Err(HypervisorError::InvalidInput("empty command".to_string()));
        };
        if req.shell {
            return Ok(format!("cmd /c {first}"));
        }
        Ok(req
            .argv
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains([' ', '\t', '"']) {
                    format!("\"{}\"", a.replace('"', "\\\""))
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// `prlctl exec` with a prepared command line; the guest's exit code is returned, not
    /// treated as an error, unless prlctl itself reports a failure.
    async fn exec_line(&self, vm: &VmInfo, line: String, input: Option<Input>, timeout: Duration) -> Result<Output> {
        let _slot = self
            .inner
            .exec_slots
            .acquire()
            .await
            .map_err(|_| HypervisorError::Unavailable("driver shutting down".to_string()))?;
        let inv =
            self.inner.invocation(Tool::Prlctl, vec!["exec".to_string(), vm.id.clone(), line], vm.owner.as_deref());
        let out = self.inner.runner.run(&inv, input, timeout).await?;
        if out.code == Some(255) && out.stderr.trim_start().starts_with("Failed to") {
            if is_not_found(&out.stderr) {
                return Err(HypervisorError::NotFound(vm.id.clone()));
            }
            let now = self.inner.get(&vm.id).await?;
            if now.state != VmState::Running {
                return Err(HypervisorError::InvalidState { id: now.id, operation: "exec", state: now.state });
            }
            return Err(HypervisorError::CommandFailed {
                command: inv.to_string(),
                code: out.code,
                stderr: out.stderr.trim().to_string(),
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl Hypervisor for ParallelsDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Parallels
    }

    async fn host_info(&self) -> Result<HostInfo> {
        async {
            let info = self.server_info(None).await?;
            let (os_name, os_version) = parse::os_name_version(&info.os);
            let vm_home = if info.vm_home.is_empty() { PathBuf::from("/") } else { PathBuf::from(&info.vm_home) };
            // The block counts are u32 on macOS and u64 on Linux.
            #[allow(clippy::unnecessary_cast)]
            let (disk_total_bytes, disk_free_bytes) = match nix::sys::statvfs::statvfs(&vm_home) {
                Ok(s) => {
                    let frag = s.fragment_size() as u64;
                    (s.blocks() as u64 * frag, s.blocks_available() as u64 * frag)
                }
                Err(_) => (0, 0),
            };
            let host = host::facts(&self.inner.cfg.sysctl, &self.inner.cfg.env).await;
            Ok(HostInfo {
                hypervisor: HypervisorKind::Parallels,
                version: parse::version_number(&info.version),
                acceleration: "hvf".to_string(),
                architecture: if std::env::consts::ARCH == "aarch64" { "arm64" } else { std::env::consts::ARCH }
                    .to_string(),
                cpu_count: host.cpu_count,
                cpu_brand: host.cpu_brand,
                memory_bytes: host.memory_bytes,
                disk_total_bytes,
                disk_free_bytes,
                os_name,
                os_version,
                licensed: info.license.state.eq_ignore_ascii_case("valid"),
            })
        }
        .instrument(info_span!("parallels.host_info"))
        .await
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        self.inner.list().instrument(info_span!("parallels.list")).await
    }

    async fn get(&self, vm: &str) -> Result<VmInfo> {
        self.inner.get(vm).instrument(info_span!("parallels.get", vm)).await
    }

    async fn create(&self, spec: CreateSpec) -> Result<VmInfo> {
        let span = info_span!("parallels.create", name = %spec.name);
        async move {
            validate_name(&spec.name)?;
            if spec.cpus == 0 || spec.memory_mb == 0 {
                return Err(HypervisorError::InvalidInput("cpus and memory must be positive".to_string()));
            }
            if !spec.image.join("config.pvs").is_file() {
                return Err(HypervisorError::InvalidInput(format!(
                    "{} is not a Parallels bundle (no config.pvs)",
                    spec.image.display()
                )));
            }
            if self.inner.find_by_name(&spec.name).await?.is_some() {
                return Err(HypervisorError::AlreadyExists(spec.name.clone()));
            }
            let owner = spec.owner.as_deref();
            let dir = match &self.inner.cfg.vm_dir {
                Some(d) => d.clone(),
                None => PathBuf::from(self.server_info(owner).await?.vm_home),
            };
            let ext = spec.image.extension().and_then(|e| e.to_str()).filter(|e| *e == "macvm").unwrap_or("pvm");
            let folder = dir.join(format!("{}.{ext}", spec.name));
            if folder.exists() {
                return Err(HypervisorError::AlreadyExists(spec.name.clone()));
            }
            let mut cleanup =
                CreateCleanup { inner: self.inner.clone(), folder: Some(folder.clone()), registered: None };
            {
                let (from, to) = (spec.image.clone(), folder.clone());
                tokio::task::spawn_blocking(move || copy_tree(&from, &to))
                    .await
                    .map_err(|e| HypervisorError::Unavailable(format!("copy task failed: {e}")))?
                    .map_err(|e| HypervisorError::io(&folder, e))?;
            }
            if let Some(user) = owner
                && self.inner.is_root
                && self.inner.cfg.run_as != RunAs::Never
            {
                let (f, u) = (folder.clone(), user.to_string());
                tokio::task::spawn_blocking(move || chown_tree(&f, &u))
                    .await
                    .map_err(|e| HypervisorError::Unavailable(format!("chown task failed: {e}")))??;
            }
            let id = uuid::Uuid::new_v4().to_string();
            let folder_s = folder.display().to_string();
            self.inner.prlctl(owner, &["register", &folder_s, "--uuid", &id, "--regenerate-src-uuid"]).await?;
            cleanup.registered = Some((id.clone(), spec.owner.clone()));
            let cpus = spec.cpus.to_string();
            let mem = spec.memory_mb.to_string();
            self.inner
                .prlctl(
                    owner,
                    &[
                        "set",
                        &id,
                        "--name",
                        &spec.name,
                        "--cpus",
                        &cpus,
                        "--memsize",
                        &mem,
                        "--description",
                        &spec.description,
                    ],
                )
                .await?;
            if let Some(bytes) = spec.disk_bytes {
                let mb = bytes.div_ceil(1 << 20).to_string();
                self.inner.prlctl(owner, &["set", &id, "--device-set", "hdd0", "--size", &mb]).await?;
            }
            if let Some(os) = &spec.os {
                tracing::debug!(%os, "the guest OS comes from the bundle; the requested OS is not applied");
            }
            let info = self.inner.get(&id).await?;
            cleanup.disarm();
            Ok(info)
        }
        .instrument(span)
        .await
    }

    async fn clone_vm(&self, vm: &str, spec: CloneSpec) -> Result<VmInfo> {
        let span = info_span!("parallels.clone", vm, name = %spec.name, linked = spec.linked);
        async move {
            validate_name(&spec.name)?;
            let src = self.inner.get(vm).await?;
            require(&src, "clone", &[VmState::Stopped, VmState::Suspended])?;
            if self.inner.find_by_name(&spec.name).await?.is_some() {
                return Err(HypervisorError::AlreadyExists(spec.name.clone()));
            }
            let mut args = vec!["clone".to_string(), src.id.clone(), "--name".to_string(), spec.name.clone()];
            if spec.linked {
                args.push("--linked".to_string());
            }
            if let Some(dst) = &spec.destination {
                args.push("--dst".to_string());
                args.push(dst.display().to_string());
            }
            self.inner
                .call(Tool::Prlctl, src.owner.as_deref(), args, None, self.inner.cfg.command_timeout, &spec.name)
                .await?;
            self.inner.get(&spec.name).await
        }
        .instrument(span)
        .await
    }

    async fn register(&self, path: &Path, spec: RegisterSpec) -> Result<VmInfo> {
        let span = info_span!("parallels.register", path = %path.display());
        async move {
            if !path.join("config.pvs").is_file() {
                return Err(HypervisorError::InvalidInput(format!("{} is not a Parallels bundle", path.display())));
            }
            if let Some(name) = &spec.name {
                validate_name(name)?;
                if self.inner.find_by_name(name).await?.is_some() {
                    return Err(HypervisorError::AlreadyExists(name.clone()));
                }
            }
            let owner = spec.owner.as_deref();
            let path_s = path.display().to_string();
            let mut args = vec!["register".to_string(), path_s.clone()];
            let new_id = spec.regenerate_id.then(|| uuid::Uuid::new_v4().to_string());
            if let Some(id) = &new_id {
                args.extend(["--uuid".to_string(), id.clone(), "--regenerate-src-uuid".to_string()]);
            }
            self.inner.call(Tool::Prlctl, owner, args, None, self.inner.cfg.command_timeout, &path_s).await?;
            let info = match new_id {
                Some(id) => self.inner.get(&id).await?,
                None => {
                    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                    self.inner
                        .list()
                        .await?
                        .into_iter()
                        .find(|v| std::fs::canonicalize(&v.home).unwrap_or_else(|_| v.home.clone()) == want)
                        .ok_or_else(|| HypervisorError::NotFound(path_s.clone()))?
                }
            };
            match &spec.name {
                Some(name) if *name != info.name => {
                    self.inner.prlctl(info.owner.as_deref(), &["set", &info.id, "--name", name]).await?;
                    self.inner.get(&info.id).await
                }
                _ => Ok(info),
            }
        }
        .instrument(span)
        .await
    }

    async fn unregister(&self, vm: &str) -> Result<()> {
        async {
            let info = self.inner.get(vm).await?;
            require(&info, "unregister", &[VmState::Stopped, VmState::Suspended, VmState::Unknown])?;
            self.inner.prlctl(info.owner.as_deref(), &["unregister", &info.id]).await?;
            Ok(())
        }
        .instrument(info_span!("parallels.unregister", vm))
        .await
    }

    async fn delete(&self, vm: &str) -> Result<()> {
        async {
            let info = self.inner.get(vm).await?;
            require(&info, "delete", &[VmState::Stopped, VmState::Unknown])?;
            self.inner
                .power_call(&info, "delete", &["delete", &info.id], &[VmState::Stopped], self.inner.cfg.command_timeout)
                .await
        }
        .instrument(info_span!("parallels.delete", vm))
        .await
    }

    async fn power(&self, vm: &str, op: PowerOp) -> Result<VmInfo> {
        let span = info_span!("parallels.power", vm, op = op.name());
        async move {
            use VmState::*;
            let info = self.inner.get(vm).await?;
            let id = info.id.as_str();
            let t = self.inner.cfg.command_timeout;
            let run = |name: &'static str, args: Vec<&'static str>, allowed: &'static [VmState], timeout: Duration| {
                let info = &info;
                async move {
                    require(info, name, allowed)?;
                    let mut full = vec![args[0], id];
                    full.extend(&args[1..]);
                    self.inner.power_call(info, name, &full, allowed, timeout).await
                }
            };
            match op {
                PowerOp::Start => run("start", vec!["start"], &[Stopped, Suspended], t).await?,
                PowerOp::Stop { force, timeout } => match info.state {
                    Suspended => run("stop", vec!["stop", "--drop-state"], &[Suspended], t).await?,
                    _ if force => run("stop", vec!["stop", "--kill"], &[Running, Paused], t).await?,
                    _ => {
                        let graceful = if timeout.is_zero() { t } else { timeout };
                        match run("stop", vec!["stop"], &[Running, Paused], graceful).await {
                            Ok(()) => {}
                            Err(HypervisorError::Timeout { .. }) => {
                                warn!(vm = id, "graceful stop timed out; killing");
                                let now = self.inner.get(id).await?;
                                if now.state != Stopped {
                                    self.inner
                                        .power_call(&now, "stop", &["stop", id, "--kill"], &[Running, Paused], t)
                                        .await?;
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    }
                },
                PowerOp::Kill => match info.state {
                    Suspended => run("kill", vec!["stop", "--drop-state"], &[Suspended], t).await?,
                    _ => run("kill", vec!["stop", "--kill"], &[Running, Paused], t).await?,
                },
                PowerOp::Pause => run("pause", vec!["pause"], &[Running], t).await?,
                PowerOp::Resume => run("resume", vec!["resume"], &[Paused, Suspended], t).await?,
                PowerOp::Suspend => run("suspend", vec!["suspend"], &[Running, Paused], t).await?,
                PowerOp::Reset => run("reset", vec!["reset"], &[Running, Paused], t).await?,
                PowerOp::Restart => run("restart", vec!["restart"], &[Running], t).await?,
            }
            self.inner.get(id).await
        }
        .instrument(span)
        .await
    }

    async fn rename(&self, vm: &str, new_name: &str) -> Result<VmInfo> {
        async {
            validate_name(new_name)?;
            let info = self.inner.get(vm).await?;
            require(&info, "rename", &[VmState::Stopped])?;
            if info.name == new_name {
                return Ok(info);
            }
            if self.inner.find_by_name(new_name).await?.is_some() {
                return Err(HypervisorError::AlreadyExists(new_name.to_string()));
            }
            self.inner
                .call(
                    Tool::Prlctl,
                    info.owner.as_deref(),
                    Inner::str_args(&["set", &info.id, "--name", new_name]),
                    None,
                    self.inner.cfg.command_timeout,
                    new_name,
                )
                .await?;
            self.inner.get(&info.id).await
        }
        .instrument(info_span!("parallels.rename", vm, new_name))
        .await
    }

    async fn configure(&self, vm: &str, change: ConfigChange) -> Result<VmInfo> {
        async {
            let info = self.inner.get(vm).await?;
            if change.cpus.is_some() || change.memory_mb.is_some() {
                require(&info, "configure", &[VmState::Stopped])?;
            }
            if change.cpus == Some(0) || change.memory_mb == Some(0) {
                return Err(HypervisorError::InvalidInput("cpus and memory must be positive".to_string()));
            }
            let mut args = vec!["set".to_string(), info.id.clone()];
            if let Some(c) = change.cpus {
                args.extend(["--cpus".to_string(), c.to_string()]);
            }
            if let Some(m) = change.memory_mb {
                args.extend(["--memsize".to_string(), m.to_string()]);
            }
            if let Some(d) = &change.description {
                args.extend(["--description".to_string(), d.clone()]);
            }
            if args.len() == 2 {
                return Ok(info);
            }
            let str_args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.inner
                .power_call(&info, "configure", &str_args, &[VmState::Stopped], self.inner.cfg.command_timeout)
                .await?;
            self.inner.get(&info.id).await
        }
        .instrument(info_span!("parallels.configure", vm))
        .await
    }

    async fn snapshots(&self, vm: &str) -> Result<Vec<Snapshot>> {
        async {
            let info = self.inner.get(vm).await?;
            self.inner.snapshot_list(&info).await
        }
        .instrument(info_span!("parallels.snapshots", vm))
        .await
    }

    async fn snapshot(&self, vm: &str, op: SnapshotOp) -> Result<Option<Snapshot>> {
        let span = info_span!("parallels.snapshot", vm);
        async move {
            let info = self.inner.get(vm).await?;
            let owner = info.owner.as_deref();
            match op {
                SnapshotOp::Create { name, description } => {
                    let mut args = vec!["snapshot", info.id.as_str()];
                    if !name.is_empty() {
                        args.extend(["--name", name.as_str()]);
                    }
                    if !description.is_empty() {
                        args.extend(["--description", description.as_str()]);
                    }
                    let (inv, out) = self.inner.prlctl(owner, &args).await?;
                    let sid = parse::created_snapshot_id(&out.stdout).ok_or_else(|| HypervisorError::Parse {
                        command: inv.to_string(),
                        message: "no {snapshot id} in the output".to_string(),
                    })?;
                    if let Ok(mut notes) = self.inner.snapshot_notes.lock() {
                        notes.insert(sid.clone(), description.clone());
                    }
                    let snap = self
                        .inner
                        .snapshot_list(&info)
                        .await?
                        .into_iter()
                        .find(|s| s.id.eq_ignore_ascii_case(&sid))
                        .ok_or_else(|| HypervisorError::NotFound(sid.clone()))?;
                    Ok(Some(snap))
                }
                SnapshotOp::Delete { snapshot_id, delete_children } => {
                    let sid = parse::trim_id(&snapshot_id).to_string();
                    let snaps = self.inner.snapshot_list(&info).await?;
                    if !snaps.iter().any(|s| s.id.eq_ignore_ascii_case(&sid)) {
                        return Err(HypervisorError::NotFound(snapshot_id));
                    }
                    let mut args = vec!["snapshot-delete", info.id.as_str(), "--id", sid.as_str()];
                    if delete_children {
                        args.push("--children");
                    }
                    self.inner.prlctl(owner, &args).await?;
                    Ok(None)
                }
                SnapshotOp::DeleteAll => {
                    let snaps = self.inner.snapshot_list(&info).await?;
                    let ids: Vec<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
                    for root in snaps.iter().filter(|s| s.parent.as_deref().is_none_or(|p| !ids.contains(&p))) {
                        self.inner
                            .prlctl(owner, &["snapshot-delete", &info.id, "--id", &root.id, "--children"])
                            .await?;
                    }
                    Ok(None)
                }
                SnapshotOp::Revert { snapshot_id, skip_resume } => {
                    let sid = parse::trim_id(&snapshot_id).to_string();
                    let snaps = self.inner.snapshot_list(&info).await?;
                    if !snaps.iter().any(|s| s.id.eq_ignore_ascii_case(&sid)) {
                        return Err(HypervisorError::NotFound(snapshot_id));
                    }
                    let mut args = vec!["snapshot-switch", info.id.as_str(), "--id", sid.as_str()];
                    if skip_resume {
                        args.push("--skip-resume");
                    }
                    self.inner.prlctl(owner, &args).await?;
                    Ok(None)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn exec(&self, vm: &str, req: ExecRequest) -> Result<ExecOutput> {
        let span = info_span!("parallels.exec", vm);
        async move {
            let info = self.inner.get(vm).await?;
            require(&info, "exec", &[VmState::Running])?;
            let line = if Self::guest_is_windows(&info) {
                Self::windows_command_line(&req)?
            } else {
                Self::unix_command_line(&req)?
            };
            let timeout = if req.timeout.is_zero() { self.inner.cfg.command_timeout } else { req.timeout };
            let out = self.exec_line(&info, line, req.stdin.clone().map(Input::Bytes), timeout).await?;
            Ok(ExecOutput { stdout: out.stdout, stderr: out.stderr, exit_code: out.code.unwrap_or(-1) })
        }
        .instrument(span)
        .await
    }

    async fn upload(&self, vm: &str, local: &Path, remote: &str) -> Result<()> {
        let span = info_span!("parallels.upload", vm, local = %local.display(), remote);
        async move {
            if remote.is_empty() {
                return Err(HypervisorError::InvalidInput("empty remote path".to_string()));
            }
            let info = self.inner.get(vm).await?;
            require(&info, "upload", &[VmState::Running])?;
            if Self::guest_is_windows(&info) {
                return Err(HypervisorError::Unsupported {
                    driver: HypervisorKind::Parallels,
                    what: "uploads into Windows guests".to_string(),
                });
            }
            let meta = tokio::fs::metadata(local).await.map_err(|e| HypervisorError::io(local, e))?;
            let timeout = self.inner.cfg.upload_timeout;
            let out = if meta.is_dir() {
                // Stream a tar of the folder into `tar x` in the guest.
                let archive =
                    tempfile::NamedTempFile::new().map_err(|e| HypervisorError::io(std::env::temp_dir(), e))?;
                let (src, file) =
                    (local.to_path_buf(), archive.reopen().map_err(|e| HypervisorError::io(archive.path(), e))?);
                tokio::task::spawn_blocking(move || {
                    let mut builder = tar::Builder::new(file);
                    builder.follow_symlinks(false);
                    builder.append_dir_all(".", &src)?;
                    builder.into_inner().map(|_| ())
                })
                .await
                .map_err(|e| HypervisorError::Unavailable(format!("tar task failed: {e}")))?
                .map_err(|e| HypervisorError::io(local, e))?;
                let q = sh_quote(remote);
                let line = format!("mkdir -p {q} && tar xf - -C {q}");
                self.exec_line(&info, line, Some(Input::File(archive.path().to_path_buf())), timeout).await?
            } else {
                let target = if remote.ends_with('/') {
                    let name = local.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                        HypervisorError::InvalidInput(format!("{} has no file name", local.display()))
                    })?;
                    format!("{remote}{name}")
                } else {
                    remote.to_string()
                };
                let q = sh_quote(&target);
                let line = format!("mkdir -p \"$(dirname {q})\" && cat > {q}");
                self.exec_line(&info, line, Some(Input::File(local.to_path_buf())), timeout).await?
            };
            if out.code != Some(0) {
                return Err(HypervisorError::Guest(format!(
                    "upload to {remote} failed with exit code {:?}: {}",
                    out.code,
                    out.stderr.trim()
                )));
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.inner.events.subscribe()
    }
}

mod host {
    //! Host facts prlsrvctl does not report: the reference asks `sysctl` (`hw.ncpu`,
    //! `hw.memsize`, `machdep.cpu.brand_string`). Every fact `sysctl` does not answer (a
    //! Linux `sysctl` knows no `hw.*`) comes from the machine itself; the fake host's
    //! `sysctl` answers them all, so tests can give a fake host any size.

    use std::collections::BTreeMap;
    use std::path::Path;

    pub struct Facts {
        pub cpu_count: u32,
        pub cpu_brand: String,
        pub memory_bytes: u64,
    }

    const NAMES: [&str; 3] = ["hw.ncpu", "hw.memsize", "machdep.cpu.brand_string"];

    /// `sysctl NAME...` once: the `name: value` lines it printed (it prints the names it
    /// knows even when it fails on others).
    async fn sysctl(path: &Path, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut cmd = tokio::process::Command::new(path);
        cmd.args(NAMES)
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let Some(child) = hangar_proc::spawn(cmd).ok() else { return BTreeMap::new() };
        let Ok(Ok(out)) = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output()).await
        else {
            return BTreeMap::new();
        };
        parse(&String::from_utf8_lossy(&out.stdout))
    }

    pub(crate) fn parse(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, v)| NAMES.contains(&k.trim()) && !v.trim().is_empty())
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    pub async fn facts(sysctl_path: &Path, env: &BTreeMap<String, String>) -> Facts {
        let asked = sysctl(sysctl_path, env).await;
        let cpu_count = asked
            .get("hw.ncpu")
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
        let memory_bytes = match asked.get("hw.memsize").and_then(|v| v.parse::<u64>().ok()).filter(|n| *n > 0) {
            Some(m) => m,
            None => {
                let meminfo = tokio::fs::read_to_string("/proc/meminfo").await.unwrap_or_default();
                meminfo
                    .lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
                    .map(|kb| kb * 1024)
                    .unwrap_or(0)
            }
        };
        let cpu_brand = match asked.get("machdep.cpu.brand_string") {
            Some(b) => b.clone(),
            None => {
                let cpuinfo = tokio::fs::read_to_string("/proc/cpuinfo").await.unwrap_or_default();
                cpuinfo
                    .lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default()
            }
        };
        Facts { cpu_count, cpu_brand, memory_bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest::program(argv, Duration::from_secs(5))
    }

    #[test]
    fn exec_lines_quote_every_word() {
        assert_eq!(
            ParallelsDriver::unix_command_line(&req(&["echo", "a b", "it's"])).unwrap(),
            "echo 'a b' 'it'\\''s'"
        );
        let mut r = req(&["echo $X | tr a b"]);
        r.shell = true;
        r.env.insert("X".into(), "v w".into());
        r.working_dir = Some("/tmp/x y".into());
        r.user = Some("ci".into());
        assert_eq!(
            ParallelsDriver::unix_command_line(&r).unwrap(),
            "cd '/tmp/x y' && exec sudo -n -H -u ci -- env 'X=v w' /bin/sh -c 'echo $X | tr a b'"
        );
        let mut bad = req(&["true"]);
        bad.env.insert("A B".into(), "1".into());
        assert!(matches!(ParallelsDriver::unix_command_line(&bad), Err(HypervisorError::InvalidInput(_))));
        assert!(matches!(ParallelsDriver::unix_command_line(&req(&[])), Err(HypervisorError::InvalidInput(_))));
    }

    #[test]
    fn windows_lines() {
        assert_eq!(
            ParallelsDriver::windows_command_line(&req(&["dir", "C:\\Program Files"])).unwrap(),
            "dir \"C:\\Program Files\""
        );
        let mut r = req(&["set"]);
        r.env.insert("A".into(), "1".into());
        assert!(matches!(ParallelsDriver::windows_command_line(&r), Err(HypervisorError::Unsupported { .. })));
    }

    #[test]
    fn driver_builds_sudo_invocations_for_owned_vms_when_root() {
        let cfg = ParallelsConfig { assume_root: Some(true), watch_events: false, ..ParallelsConfig::default() };
        let d = ParallelsDriver::new(cfg).unwrap();
        let inv = d.prlctl_invocation(&["stop", "abc", "--kill"], Some("alice"));
        assert_eq!(inv.program, PathBuf::from("/usr/bin/sudo"));
        assert_eq!(
            inv.args,
            ["-n", "-H", "-u", "alice", "--", "/usr/local/bin/prlctl", "stop", "abc", "--kill"]
                .map(String::from)
                .to_vec()
        );
        let cfg = ParallelsConfig { assume_root: Some(false), watch_events: false, ..ParallelsConfig::default() };
        let d = ParallelsDriver::new(cfg).unwrap();
        let inv = d.prlctl_invocation(&["stop", "abc"], Some("alice"));
        assert_eq!(inv.program, PathBuf::from("/usr/local/bin/prlctl"));
    }
}
