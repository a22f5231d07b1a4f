//! The [`Hypervisor`] operations of [`QemuDriver`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hangar_hypervisor::{
    CloneSpec, ConfigChange, CreateSpec, ExecOutput, ExecRequest, HostInfo, Hypervisor, HypervisorError,
    HypervisorKind, PowerOp, RegisterSpec, Result, Snapshot, SnapshotOp, VmEvent, VmInfo, VmState,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::QemuDriver;
use crate::config::{DiskConfig, ImageDescriptor, SnapshotMeta, VmConfig, files, read_json, write_json};
use crate::driver::{Inner, Staging, Vm, invalid, new_id, now};
use crate::procs;

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

fn validate_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 200 || name.contains('/') || name.chars().any(char::is_control) {
        return Err(HypervisorError::InvalidInput(format!("invalid VM name {name:?}")));
    }
    Ok(())
}

fn validate_resources(cpus: Option<u32>, memory_mb: Option<u64>) -> Result<()> {
    if let Some(c) = cpus
        && !(1..=255).contains(&c)
    {
        return Err(HypervisorError::InvalidInput(format!("cpus must be 1..=255, not {c}")));
    }
    if let Some(m) = memory_mb
        && !(16..=16 * 1024 * 1024).contains(&m)
    {
        return Err(HypervisorError::InvalidInput(format!("memory must be 16 MiB or more, not {m} MiB")));
    }
    Ok(())
}

/// A path the caller gave that does not exist is their mistake ([`HypervisorError::InvalidInput`]),
/// any other failure to read it an I/O error.
fn missing_or_io(path: &Path, e: std::io::Error, what: &str) -> HypervisorError {
    if e.kind() == std::io::ErrorKind::NotFound {
        HypervisorError::InvalidInput(format!("{what} {} does not exist", path.display()))
    } else {
        HypervisorError::io(path, e)
    }
}

/// What a create spec's `image` resolves to: the base disk and how to boot it.
struct ResolvedImage {
    disk: PathBuf,
    descriptor: Option<ImageDescriptor>,
}

/// `image` may be a folder with `image.json`, a disk with an `image.json` beside it that
/// names it, or a bare disk.
fn resolve_image(image: &Path) -> Result<ResolvedImage> {
    let image = std::fs::canonicalize(image).map_err(|e| missing_or_io(image, e, "image"))?;
    if image.is_dir() {
        if !image.join("image.json").is_file() {
            return Err(HypervisorError::InvalidInput(format!(
                "image {} is a folder without image.json (give a disk, or a folder made by scripts/build-guest-image.sh)",
                image.display()
            )));
        }
        let d: ImageDescriptor = read_json(&image.join("image.json"))?;
        return Ok(ResolvedImage { disk: image.join(&d.disk), descriptor: Some(d) });
    }
    let beside = image.parent().map(|p| p.join("image.json"));
    if let Some(b) = beside
        && b.exists()
        && let Ok(d) = read_json::<ImageDescriptor>(&b)
        && image.file_name().map(|f| f.to_string_lossy() == d.disk).unwrap_or(false)
    {
        return Ok(ResolvedImage { disk: image, descriptor: Some(d) });
    }
    Ok(ResolvedImage { disk: image, descriptor: None })
}

impl QemuDriver {
    fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl Inner {
    async fn image_info(&self, path: &Path) -> Result<Value> {
        let out = self
            .qemu_img(
                &[os("info"), os("-U"), os("--output=json"), path.as_os_str().to_owned()],
                self.cfg.command_timeout,
            )
            .await?;
        serde_json::from_str(&out).map_err(|e| HypervisorError::Parse {
            command: format!("qemu-img info {}", path.display()),
            message: e.to_string(),
        })
    }

    async fn state_for_op(&self, vm: &Arc<Vm>) -> VmState {
        self.refresh(vm).await
    }

    fn put_config(&self, vm: &Vm, cfg: &VmConfig) -> Result<()> {
        write_json(&vm.path(files::CONFIG), cfg)?;
        if let Ok(mut n) = vm.name.lock() {
            *n = cfg.name.clone();
        }
        Ok(())
    }

    async fn emit_updated(&self, vm: &Arc<Vm>) -> Result<VmInfo> {
        let info = self.fresh_info(vm).await?;
        let _ = self.events.send(VmEvent::Updated { vm: Box::new(info.clone()) });
        Ok(info)
    }

    // ----- power -------------------------------------------------------------------------

    async fn start(&self, vm: &Arc<Vm>, op: &'static str) -> Result<()> {
        let state = self.state_for_op(vm).await;
        let incoming = match state {
            VmState::Stopped => false,
            VmState::Suspended => true,
            s => return Err(invalid(vm, op, s)),
        };
        self.pin(vm, if incoming { VmState::Resuming } else { VmState::Starting });
        let r = self.launch(vm, incoming, None, false).await;
        if r.is_err() {
            self.terminate(vm).await;
        }
        self.unpin(vm).await;
        r
    }

    async fn stop(&self, vm: &Arc<Vm>, timeout: Duration) -> Result<()> {
        let state = self.state_for_op(vm).await;
        if !matches!(state, VmState::Running | VmState::Paused | VmState::Starting | VmState::Unknown)
            || vm.live_pid().is_none()
        {
            return Err(invalid(vm, "stop", state));
        }
        self.pin(vm, VmState::Stopping);
        let pid = vm.live_pid();
        let graceful = async {
            let q = self.qmp(vm, Duration::from_secs(3)).await?;
            if state == VmState::Paused {
                q.execute("cont", None, Duration::from_secs(5)).await?;
            }
            q.execute("system_powerdown", None, Duration::from_secs(5)).await?;
            Ok::<_, HypervisorError>(())
        };
        if let Err(e) = graceful.await {
            tracing::warn!(id = %vm.id, error = %e, "ACPI power-down failed; killing");
        } else if let Some(pid) = pid
            && !procs::wait_gone(pid, &vm.dir, timeout).await
        {
            tracing::info!(id = %vm.id, "guest ignored the power button; forcing off");
        }
        self.terminate(vm).await;
        self.unpin(vm).await;
        Ok(())
    }

    async fn kill(&self, vm: &Arc<Vm>) -> Result<()> {
        let state = self.state_for_op(vm).await;
        if vm.live_pid().is_some() {
            self.pin(vm, VmState::Stopping);
            self.terminate(vm).await;
            self.unpin(vm).await;
            return Ok(());
        }
        if state == VmState::Suspended {
            for f in [files::SUSPEND, files::SUSPEND_META] {
                let _ = std::fs::remove_file(vm.path(f));
            }
            self.refresh(vm).await;
            return Ok(());
        }
        Err(invalid(vm, "kill", state))
    }

    async fn simple_qmp(&self, vm: &Arc<Vm>, op: &'static str, allowed: &[VmState], command: &str) -> Result<()> {
        let state = self.state_for_op(vm).await;
        if !allowed.contains(&state) {
            return Err(invalid(vm, op, state));
        }
        let q = self.qmp(vm, Duration::from_secs(3)).await?;
        q.execute(command, None, Duration::from_secs(10)).await?;
        self.refresh(vm).await;
        Ok(())
    }

    async fn suspend(&self, vm: &Arc<Vm>) -> Result<()> {
        let state = self.state_for_op(vm).await;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(invalid(vm, "suspend", state));
        }
        self.pin(vm, VmState::Suspending);
        let r = self.suspend_pinned(vm, state == VmState::Running).await;
        self.unpin(vm).await;
        r
    }

    async fn suspend_pinned(&self, vm: &Arc<Vm>, was_running: bool) -> Result<()> {
        let q = self.qmp(vm, Duration::from_secs(3)).await?;
        let partial = vm.path(files::SUSPEND_PARTIAL);
        let _ = std::fs::remove_file(&partial);
        if was_running {
            q.execute("stop", None, Duration::from_secs(10)).await?;
        }
        q.execute("migrate-set-parameters", Some(json!({"max-bandwidth": 1u64 << 40})), Duration::from_secs(10))
            .await?;
        let uri = format!("exec:cat > '{}'", partial.to_string_lossy().replace('\'', r"'\''"));
        q.execute("migrate", Some(json!({ "uri": uri })), Duration::from_secs(10)).await?;
        let deadline = Instant::now() + self.cfg.long_timeout;
        loop {
            let st = q.execute("query-migrate", None, Duration::from_secs(10)).await?;
            match st.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = st.get("error-desc").and_then(Value::as_str).unwrap_or("unknown").to_string();
                    if was_running {
                        let _ = q.execute("cont", None, Duration::from_secs(10)).await;
                    }
                    return Err(HypervisorError::CommandFailed {
                        command: "qmp migrate (suspend)".into(),
                        code: None,
                        stderr: why,
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = q.execute("migrate_cancel", None, Duration::from_secs(10)).await;
                return Err(HypervisorError::Timeout {
                    command: "qmp migrate (suspend)".into(),
                    after: self.cfg.long_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        write_json(&vm.path(files::SUSPEND_META), &json!({ "was_running": was_running, "suspended_at": now() }))?;
        std::fs::rename(&partial, vm.path(files::SUSPEND)).map_err(|e| HypervisorError::io(&partial, e))?;
        self.terminate(vm).await;
        Ok(())
    }

    // ----- snapshots ---------------------------------------------------------------------

    async fn list_snapshots(&self, vm: &Arc<Vm>) -> Result<Vec<Snapshot>> {
        let cfg = vm.config()?;
        let disk = vm.path(&cfg.disks.first().map(|d| d.file.clone()).unwrap_or_else(|| files::DISK.into()));
        let info = self.image_info(&disk).await?;
        let book = self.snapshot_book(vm);
        let mut out = Vec::new();
        for s in info.get("snapshots").and_then(Value::as_array).into_iter().flatten() {
            let tag = s.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let with_memory = s.get("vm-state-size").and_then(Value::as_u64).unwrap_or(0) > 0;
            let meta = book.snapshots.iter().find(|m| m.id == tag);
            let created_at = meta.map(|m| m.created_at).or_else(|| {
                s.get("date-sec").and_then(Value::as_i64).and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            });
            out.push(Snapshot {
                id: tag.clone(),
                name: meta.map(|m| m.name.clone()).unwrap_or_else(|| tag.clone()),
                description: meta.map(|m| m.description.clone()).unwrap_or_default(),
                created_at,
                current: book.current.as_deref() == Some(tag.as_str()),
                parent: meta.and_then(|m| m.parent.clone()),
                state: if with_memory { VmState::Running } else { VmState::Stopped },
            });
        }
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }

    fn disk_path(&self, vm: &Vm) -> Result<PathBuf> {
        let cfg = vm.config()?;
        Ok(vm.path(&cfg.disks.first().map(|d| d.file.clone()).unwrap_or_else(|| files::DISK.into())))
    }

    async fn hmp_checked(&self, vm: &Arc<Vm>, line: &str) -> Result<()> {
        let q = self.qmp(vm, Duration::from_secs(3)).await?;
        let out = q.hmp(line, self.cfg.long_timeout).await?;
        let out = out.trim();
        if out.to_ascii_lowercase().contains("error") {
            return Err(HypervisorError::CommandFailed {
                command: format!("hmp {line}"),
                code: None,
                stderr: out.to_string(),
            });
        }
        Ok(())
    }

    async fn create_snapshot(&self, vm: &Arc<Vm>, name: String, description: String) -> Result<Snapshot> {
        let state = self.state_for_op(vm).await;
        let id = new_id();
        let with_memory = match state {
            VmState::Running | VmState::Paused => {
                self.pin(vm, state);
                let r = self.hmp_checked(vm, &format!("savevm {id}")).await;
                self.unpin(vm).await;
                r?;
                true
            }
            VmState::Stopped => {
                let disk = self.disk_path(vm)?;
                self.qemu_img(&[os("snapshot"), os("-c"), os(&id), disk.into_os_string()], self.cfg.long_timeout)
                    .await?;
                false
            }
            s => return Err(invalid(vm, "snapshot", s)),
        };
        let mut book = self.snapshot_book(vm);
        let meta = SnapshotMeta {
            id: id.clone(),
            name,
            description,
            created_at: now(),
            parent: book.current.clone(),
            with_memory,
        };
        book.snapshots.push(meta.clone());
        book.current = Some(id.clone());
        write_json(&vm.path(files::SNAPSHOTS), &book)?;
        Ok(Snapshot {
            id,
            name: meta.name,
            description: meta.description,
            created_at: Some(meta.created_at),
            current: true,
            parent: meta.parent,
            state: if with_memory { VmState::Running } else { VmState::Stopped },
        })
    }

    async fn delete_snapshots(&self, vm: &Arc<Vm>, ids: Vec<String>) -> Result<()> {
        let state = self.state_for_op(vm).await;
        for id in &ids {
            match state {
                VmState::Running | VmState::Paused => self.hmp_checked(vm, &format!("delvm {id}")).await?,
                VmState::Stopped | VmState::Suspended => {
                    let disk = self.disk_path(vm)?;
                    self.qemu_img(&[os("snapshot"), os("-d"), os(id), disk.into_os_string()], self.cfg.long_timeout)
                        .await?;
                }
                s => return Err(invalid(vm, "delete a snapshot of", s)),
            }
        }
        let mut book = self.snapshot_book(vm);
        for id in &ids {
            let parent = book.snapshots.iter().find(|m| &m.id == id).and_then(|m| m.parent.clone());
            for m in book.snapshots.iter_mut() {
                if m.parent.as_deref() == Some(id.as_str()) {
                    m.parent = parent.clone();
                }
            }
            if book.current.as_deref() == Some(id.as_str()) {
                book.current = parent;
            }
            book.snapshots.retain(|m| &m.id != id);
        }
        write_json(&vm.path(files::SNAPSHOTS), &book)
    }

    async fn revert(&self, vm: &Arc<Vm>, id: &str, skip_resume: bool) -> Result<()> {
        let snaps = self.list_snapshots(vm).await?;
        let snap =
            snaps.iter().find(|s| s.id == id).ok_or_else(|| HypervisorError::NotFound(format!("snapshot {id}")))?;
        let with_memory = snap.state == VmState::Running;
        let mut state = self.state_for_op(vm).await;
        if !matches!(state, VmState::Running | VmState::Paused | VmState::Stopped | VmState::Suspended) {
            return Err(invalid(vm, "revert", state));
        }
        if state == VmState::Suspended {
            for f in [files::SUSPEND, files::SUSPEND_META] {
                let _ = std::fs::remove_file(vm.path(f));
            }
            state = VmState::Stopped;
        }
        if with_memory {
            self.pin(vm, state);
            let r = async {
                match state {
                    VmState::Running | VmState::Paused => {
                        let q = self.qmp(vm, Duration::from_secs(3)).await?;
                        if state == VmState::Running {
                            q.execute("stop", None, Duration::from_secs(10)).await?;
                        }
                        self.hmp_checked(vm, &format!("loadvm {id}")).await?;
                        if !skip_resume {
                            q.execute("cont", None, Duration::from_secs(10)).await?;
                        }
                        Ok(())
                    }
                    _ => self.launch(vm, false, Some(id), skip_resume).await,
                }
            }
            .await;
            // The agent session may hold answers from before the revert.
            vm.qga.lock().await.take();
            self.unpin(vm).await;
            r?;
        } else {
            if vm.live_pid().is_some() {
                self.pin(vm, VmState::Stopping);
                self.terminate(vm).await;
                self.unpin(vm).await;
            }
            let disk = self.disk_path(vm)?;
            self.qemu_img(&[os("snapshot"), os("-a"), os(id), disk.into_os_string()], self.cfg.long_timeout).await?;
        }
        let mut book = self.snapshot_book(vm);
        book.current = Some(id.to_string());
        write_json(&vm.path(files::SNAPSHOTS), &book)
    }

    // ----- guest -------------------------------------------------------------------------

    async fn exec(&self, vm: &Arc<Vm>, req: ExecRequest) -> Result<ExecOutput> {
        let state = self.refresh(vm).await;
        if state != VmState::Running {
            return Err(invalid(vm, "execute a command in", state));
        }
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(HypervisorError::InvalidInput("empty command".into()));
        }
        if let Some(u) = &req.user
            && u != "root"
        {
            return Err(HypervisorError::Unsupported {
                driver: HypervisorKind::Qemu,
                what: format!("running commands as user {u:?} (only root)"),
            });
        }
        let shown = req.argv.join(" ");
        let mut argv: Vec<String> = if req.shell {
            let mut v = vec!["/bin/sh".to_string(), "-c".to_string(), req.argv[0].clone(), "sh".to_string()];
            v.extend(req.argv[1..].iter().cloned());
            v
        } else {
            req.argv.clone()
        };
        if !req.env.is_empty() {
            let mut v = vec!["/usr/bin/env".to_string()];
            v.extend(req.env.iter().map(|(k, val)| format!("{k}={val}")));
            v.extend(argv);
            argv = v;
        }
        if let Some(dir) = &req.working_dir {
            let mut v = vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                r#"cd -- "$1" || exit 127; shift; exec "$@""#.to_string(),
                "hangar-exec".to_string(),
                dir.clone(),
            ];
            v.extend(argv);
            argv = v;
        }
        let deadline = Instant::now() + req.timeout;
        let mut args = json!({ "path": argv[0], "arg": argv[1..], "capture-output": true });
        if let Some(input) = &req.stdin {
            args["input-data"] = json!(B64.encode(input));
        }
        let started = self.qga_call(vm, "guest-exec", Some(args), deadline).await?;
        let pid = started
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| HypervisorError::Guest(format!("guest-exec returned no pid: {started}")))?;
        let mut pause = Duration::from_millis(20);
        loop {
            if Instant::now() >= deadline {
                tracing::info!(id = %vm.id, pid, "exec timed out; killing the guest process");
                let kill = json!({ "path": "/bin/kill", "arg": ["-9", pid.to_string()], "capture-output": false });
                let _ = self.qga_call(vm, "guest-exec", Some(kill), Instant::now() + Duration::from_secs(5)).await;
                return Err(HypervisorError::Timeout { command: shown, after: req.timeout });
            }
            let st = self.qga_call(vm, "guest-exec-status", Some(json!({ "pid": pid })), deadline).await;
            let st = match st {
                Ok(v) => v,
                Err(HypervisorError::Timeout { .. }) => continue,
                Err(e) => return Err(e),
            };
            if st.get("exited").and_then(Value::as_bool) == Some(true) {
                let decode = |k: &str| {
                    st.get(k)
                        .and_then(Value::as_str)
                        .and_then(|s| B64.decode(s).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                let exit_code =
                    match (st.get("exitcode").and_then(Value::as_i64), st.get("signal").and_then(Value::as_i64)) {
                        (Some(c), _) => c as i32,
                        (None, Some(sig)) => 128 + sig as i32,
                        (None, None) => -1,
                    };
                return Ok(ExecOutput { stdout: decode("out-data"), stderr: decode("err-data"), exit_code });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    async fn run_checked(&self, vm: &Arc<Vm>, argv: &[&str]) -> Result<()> {
        let req = ExecRequest::program(argv, Duration::from_secs(60));
        let out = self.exec(vm, req).await?;
        if out.exit_code != 0 {
            return Err(HypervisorError::Guest(format!(
                "`{}` exited with {}: {}",
                argv.join(" "),
                out.exit_code,
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    async fn upload_file(&self, vm: &Arc<Vm>, local: &Path, remote: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncReadExt;
        let step = Duration::from_secs(60);
        let handle = self
            .qga_call(vm, "guest-file-open", Some(json!({ "path": remote, "mode": "w" })), Instant::now() + step)
            .await?;
        let handle =
            handle.as_i64().ok_or_else(|| HypervisorError::Guest(format!("guest-file-open returned {handle}")))?;
        let mut file = tokio::fs::File::open(local).await.map_err(|e| HypervisorError::io(local, e))?;
        let mut buf = vec![0u8; 256 * 1024];
        let result = async {
            loop {
                let n = file.read(&mut buf).await.map_err(|e| HypervisorError::io(local, e))?;
                if n == 0 {
                    break;
                }
                let args = json!({ "handle": handle, "buf-b64": B64.encode(&buf[..n]) });
                self.qga_call(vm, "guest-file-write", Some(args), Instant::now() + step).await?;
            }
            Ok::<_, HypervisorError>(())
        }
        .await;
        let closed =
            self.qga_call(vm, "guest-file-close", Some(json!({ "handle": handle })), Instant::now() + step).await;
        result?;
        closed?;
        let mode = std::fs::metadata(local).map_err(|e| HypervisorError::io(local, e))?.permissions().mode();
        if mode & 0o111 != 0 {
            self.run_checked(vm, &["chmod", &format!("{:o}", mode & 0o7777), remote]).await?;
        }
        Ok(())
    }

    fn upload_tree<'a>(
        &'a self,
        vm: &'a Arc<Vm>,
        local: &'a Path,
        remote: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let meta = std::fs::symlink_metadata(local).map_err(|e| HypervisorError::io(local, e))?;
            if meta.is_dir() {
                self.run_checked(vm, &["mkdir", "-p", remote]).await?;
                let mut entries: Vec<_> = std::fs::read_dir(local)
                    .map_err(|e| HypervisorError::io(local, e))?
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                entries.sort();
                for e in entries {
                    let Some(name) = e.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                        continue;
                    };
                    let child = format!("{}/{}", remote.trim_end_matches('/'), name);
                    self.upload_tree(vm, &e, &child).await?;
                }
                Ok(())
            } else if meta.is_file() {
                self.upload_file(vm, local, remote).await
            } else {
                tracing::warn!(path = %local.display(), "skipping a file that is neither regular nor a folder");
                Ok(())
            }
        })
    }
}

#[async_trait]
impl Hypervisor for QemuDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn host_info(&self) -> Result<HostInfo> {
        let inner = self.inner();
        let version = inner.qemu_version().await?;
        let kvm = inner.kvm().await;
        let (disk_total_bytes, disk_free_bytes) = crate::host::disk_space(&inner.cfg.vms_root);
        let (os_name, os_version) = crate::host::os_release();
        Ok(HostInfo {
            hypervisor: HypervisorKind::Qemu,
            version,
            acceleration: if kvm { "kvm".into() } else { "tcg".into() },
            architecture: std::env::consts::ARCH.into(),
            cpu_count: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            cpu_brand: crate::host::cpu_brand(),
            memory_bytes: crate::host::memory_bytes(),
            disk_total_bytes,
            disk_free_bytes,
            os_name,
            os_version,
            licensed: true,
        })
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn list(&self) -> Result<Vec<VmInfo>> {
        let inner = self.inner();
        let mut out = Vec::new();
        for vm in inner.all() {
            inner.refresh(&vm).await;
            match inner.info(&vm).await {
                Ok(i) => out.push(i),
                Err(e) => tracing::warn!(id = %vm.id, error = %e, "cannot describe VM"),
            }
        }
        Ok(out)
    }

    async fn get(&self, vm: &str) -> Result<VmInfo> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        inner.fresh_info(&vm).await
    }

    #[tracing::instrument(level = "info", skip(self, spec), fields(name = %spec.name))]
    async fn create(&self, spec: CreateSpec) -> Result<VmInfo> {
        let inner = self.inner();
        validate_name(&spec.name)?;
        validate_resources(Some(spec.cpus), Some(spec.memory_mb))?;
        let image = resolve_image(&spec.image)?;
        let info = inner.image_info(&image.disk).await?;
        let format = info.get("format").and_then(Value::as_str).unwrap_or("raw").to_string();
        let base_size = info.get("virtual-size").and_then(Value::as_u64).unwrap_or(0);
        if let Some(size) = spec.disk_bytes
            && size < base_size
        {
            return Err(HypervisorError::InvalidInput(format!(
                "disk size {size} is smaller than the image's {base_size} bytes"
            )));
        }
        let _reg = inner.registry.lock().await;
        if inner.name_taken(&spec.name, None) {
            return Err(HypervisorError::AlreadyExists(spec.name));
        }
        let id = new_id();
        let staging = Staging::new(&inner.cfg.vms_root, &id)?;
        let mut args = vec![
            os("create"),
            os("-q"),
            os("-f"),
            os("qcow2"),
            os("-F"),
            os(&format),
            os("-b"),
            image.disk.clone().into_os_string(),
            staging.tmp.join(files::DISK).into_os_string(),
        ];
        if let Some(size) = spec.disk_bytes {
            args.push(os(size.to_string()));
        }
        inner.qemu_img(&args, inner.cfg.command_timeout).await?;
        let desc = image.descriptor.as_ref();
        let base_dir = image.disk.parent().map(Path::to_path_buf).unwrap_or_default();
        let cfg = VmConfig {
            id: id.clone(),
            name: spec.name.clone(),
            description: spec.description,
            cpus: spec.cpus,
            memory_mb: spec.memory_mb,
            disks: vec![DiskConfig {
                file: files::DISK.into(),
                format: "qcow2".into(),
                base: Some(image.disk.clone()),
                base_format: Some(format),
            }],
            kernel: desc.and_then(|d| d.kernel.as_ref()).map(|k| base_dir.join(k)),
            initrd: desc.and_then(|d| d.initrd.as_ref()).map(|k| base_dir.join(k)),
            append: desc.and_then(|d| d.append.clone()),
            os: spec.os.or_else(|| desc.and_then(|d| d.os.clone())).unwrap_or_else(|| "linux".into()),
            architecture: desc.and_then(|d| d.architecture.clone()).unwrap_or_else(|| "x86_64".into()),
            owner: spec.owner,
            created_at: now(),
            network: crate::config::NetworkConfig {
                mac: inner.cfg.bridge.as_ref().map(|_| crate::config::mac_for(&id)),
                bridge: inner.cfg.bridge.clone(),
                ..Default::default()
            },
            is_template: false,
        };
        write_json(&staging.tmp.join(files::CONFIG), &cfg)?;
        let dir = staging.commit()?;
        let vm = inner.insert(dir, &cfg);
        let info = inner.fresh_info(&vm).await?;
        let _ = inner.events.send(VmEvent::Added { vm: Box::new(info.clone()) });
        Ok(info)
    }

    #[tracing::instrument(level = "info", skip(self, spec), fields(name = %spec.name, linked = spec.linked))]
    async fn clone_vm(&self, vm: &str, spec: CloneSpec) -> Result<VmInfo> {
        let inner = self.inner();
        validate_name(&spec.name)?;
        let src = inner.find(vm)?;
        let _op = src.op.lock().await;
        let state = inner.refresh(&src).await;
        if state != VmState::Stopped {
            return Err(invalid(&src, "clone", state));
        }
        let src_cfg = src.config()?;
        let parent = match &spec.destination {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| HypervisorError::io(d, e))?;
                std::fs::canonicalize(d).map_err(|e| HypervisorError::io(d, e))?
            }
            None => inner.cfg.vms_root.clone(),
        };
        inner.check_socket_room(&parent)?;
        let _reg = inner.registry.lock().await;
        if inner.name_taken(&spec.name, None) {
            return Err(HypervisorError::AlreadyExists(spec.name));
        }
        let id = new_id();
        let staging = Staging::new(&parent, &id)?;
        let mut disks = Vec::new();
        for d in &src_cfg.disks {
            let from = src.path(&d.file);
            let to = staging.tmp.join(&d.file);
            let mut args = vec![os("convert"), os("-q"), os("-f"), os(&d.format), os("-O"), os("qcow2")];
            let mut base = None;
            if spec.linked
                && let Some(b) = &d.base
            {
                // Copy only this VM's own changes, on the same read-only base.
                let fmt = d.base_format.clone().unwrap_or_else(|| "qcow2".into());
                args.extend([os("-B"), b.clone().into_os_string(), os("-F"), os(&fmt)]);
                base = Some((b.clone(), fmt));
            }
            args.extend([from.into_os_string(), to.into_os_string()]);
            inner.qemu_img(&args, inner.cfg.long_timeout).await?;
            disks.push(DiskConfig {
                file: d.file.clone(),
                format: "qcow2".into(),
                base_format: base.as_ref().map(|b| b.1.clone()),
                base: base.map(|b| b.0),
            });
        }
        let mut network = src_cfg.network.clone();
        if network.mac.is_some() {
            network.mac = Some(crate::config::mac_for(&id));
        }
        let cfg = VmConfig {
            id: id.clone(),
            name: spec.name.clone(),
            disks,
            created_at: now(),
            is_template: false,
            network,
            ..src_cfg
        };
        write_json(&staging.tmp.join(files::CONFIG), &cfg)?;
        let dir = staging.commit()?;
        if !inner.in_root(&dir) {
            inner.set_external(&dir, true)?;
        }
        let vm = inner.insert(dir, &cfg);
        let info = inner.fresh_info(&vm).await?;
        let _ = inner.events.send(VmEvent::Added { vm: Box::new(info.clone()) });
        Ok(info)
    }

    #[tracing::instrument(level = "info", skip(self, spec))]
    async fn register(&self, path: &Path, spec: RegisterSpec) -> Result<VmInfo> {
        let inner = self.inner();
        let dir = std::fs::canonicalize(path).map_err(|e| missing_or_io(path, e, "VM folder"))?;
        let cfg_path = dir.join(files::CONFIG);
        if !cfg_path.is_file() {
            return Err(HypervisorError::InvalidInput(format!(
                "{} is not a VM folder (it has no {})",
                dir.display(),
                files::CONFIG
            )));
        }
        let mut cfg: VmConfig = read_json(&cfg_path)?;
        if let Some(parent) = dir.parent() {
            inner.check_socket_room(parent)?;
        }
        let _reg = inner.registry.lock().await;
        if inner.all().iter().any(|vm| vm.dir == dir) {
            return Err(HypervisorError::AlreadyExists(dir.display().to_string()));
        }
        if let Some(n) = spec.name {
            validate_name(&n)?;
            cfg.name = n;
        }
        if inner.name_taken(&cfg.name, None) {
            return Err(HypervisorError::AlreadyExists(cfg.name));
        }
        if spec.regenerate_id || inner.find(&cfg.id).is_ok() {
            cfg.id = new_id();
            if cfg.network.mac.is_some() {
                cfg.network.mac = Some(crate::config::mac_for(&cfg.id));
            }
        }
        if spec.owner.is_some() {
            cfg.owner = spec.owner;
        }
        write_json(&cfg_path, &cfg)?;
        let _ = std::fs::remove_file(dir.join(files::UNREGISTERED));
        if !inner.in_root(&dir) {
            inner.set_external(&dir, true)?;
        }
        let vm = inner.insert(dir, &cfg);
        let info = inner.fresh_info(&vm).await?;
        let _ = inner.events.send(VmEvent::Added { vm: Box::new(info.clone()) });
        Ok(info)
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn unregister(&self, vm: &str) -> Result<()> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        let _op = vm.op.lock().await;
        let state = inner.refresh(&vm).await;
        if !matches!(state, VmState::Stopped | VmState::Suspended) {
            return Err(invalid(&vm, "unregister", state));
        }
        let _reg = inner.registry.lock().await;
        if inner.in_root(&vm.dir) {
            let marker = vm.path(files::UNREGISTERED);
            std::fs::write(&marker, b"").map_err(|e| HypervisorError::io(&marker, e))?;
        } else {
            inner.set_external(&vm.dir, false)?;
        }
        inner.remove(&vm.id);
        let _ = inner.events.send(VmEvent::Removed { id: vm.id.clone() });
        Ok(())
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn delete(&self, vm: &str) -> Result<()> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        let _op = vm.op.lock().await;
        let state = inner.refresh(&vm).await;
        if !matches!(state, VmState::Stopped | VmState::Suspended) || vm.live_pid().is_some() {
            return Err(invalid(&vm, "delete", state));
        }
        let _reg = inner.registry.lock().await;
        inner.remove(&vm.id);
        if !inner.in_root(&vm.dir) {
            inner.set_external(&vm.dir, false)?;
        }
        std::fs::remove_dir_all(&vm.dir).map_err(|e| HypervisorError::io(&vm.dir, e))?;
        let _ = inner.events.send(VmEvent::Removed { id: vm.id.clone() });
        Ok(())
    }

    #[tracing::instrument(level = "info", skip(self), fields(op = op.name()))]
    async fn power(&self, vm: &str, op: PowerOp) -> Result<VmInfo> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        let _op = vm.op.lock().await;
        match op {
            PowerOp::Start => inner.start(&vm, "start").await?,
            PowerOp::Stop { force: true, .. } | PowerOp::Kill => inner.kill(&vm).await?,
            PowerOp::Stop { force: false, timeout } => inner.stop(&vm, timeout).await?,
            PowerOp::Pause => inner.simple_qmp(&vm, "pause", &[VmState::Running], "stop").await?,
            PowerOp::Resume => {
                if inner.refresh(&vm).await == VmState::Suspended {
                    inner.start(&vm, "resume").await?
                } else {
                    inner.simple_qmp(&vm, "resume", &[VmState::Paused], "cont").await?
                }
            }
            PowerOp::Suspend => inner.suspend(&vm).await?,
            PowerOp::Reset => {
                inner.simple_qmp(&vm, "reset", &[VmState::Running, VmState::Paused], "system_reset").await?;
                vm.qga.lock().await.take();
            }
            PowerOp::Restart => {
                let state = inner.refresh(&vm).await;
                if state != VmState::Running {
                    return Err(invalid(&vm, "restart", state));
                }
                inner.stop(&vm, Duration::from_secs(60)).await?;
                inner.start(&vm, "restart").await?;
            }
        }
        inner.fresh_info(&vm).await
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn rename(&self, vm: &str, new_name: &str) -> Result<VmInfo> {
        let inner = self.inner();
        validate_name(new_name)?;
        let vm = inner.find(vm)?;
        let _op = vm.op.lock().await;
        let state = inner.refresh(&vm).await;
        if !matches!(state, VmState::Stopped | VmState::Suspended) {
            return Err(invalid(&vm, "rename", state));
        }
        let _reg = inner.registry.lock().await;
        if inner.name_taken(new_name, Some(&vm.id)) {
            return Err(HypervisorError::AlreadyExists(new_name.to_string()));
        }
        let mut cfg = vm.config()?;
        cfg.name = new_name.to_string();
        inner.put_config(&vm, &cfg)?;
        drop(_reg);
        inner.emit_updated(&vm).await
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn configure(&self, vm: &str, change: ConfigChange) -> Result<VmInfo> {
        let inner = self.inner();
        validate_resources(change.cpus, change.memory_mb)?;
        let vm = inner.find(vm)?;
        let _op = vm.op.lock().await;
        let state = inner.refresh(&vm).await;
        if (change.cpus.is_some() || change.memory_mb.is_some()) && state != VmState::Stopped {
            return Err(invalid(&vm, "change the CPUs or memory of", state));
        }
        let mut cfg = vm.config()?;
        if let Some(c) = change.cpus {
            cfg.cpus = c;
        }
        if let Some(m) = change.memory_mb {
            cfg.memory_mb = m;
        }
        if let Some(d) = change.description {
            cfg.description = d;
        }
        inner.put_config(&vm, &cfg)?;
        inner.emit_updated(&vm).await
    }

    async fn snapshots(&self, vm: &str) -> Result<Vec<Snapshot>> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        inner.list_snapshots(&vm).await
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn snapshot(&self, vm: &str, op: SnapshotOp) -> Result<Option<Snapshot>> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        let _op = vm.op.lock().await;
        match op {
            SnapshotOp::Create { name, description } => inner.create_snapshot(&vm, name, description).await.map(Some),
            SnapshotOp::Delete { snapshot_id, delete_children } => {
                let existing = inner.list_snapshots(&vm).await?;
                if !existing.iter().any(|s| s.id == snapshot_id) {
                    return Err(HypervisorError::NotFound(format!("snapshot {snapshot_id}")));
                }
                let mut ids = vec![snapshot_id.clone()];
                if delete_children {
                    let book = inner.snapshot_book(&vm);
                    let mut i = 0;
                    while i < ids.len() {
                        let p = ids[i].clone();
                        ids.extend(
                            book.snapshots
                                .iter()
                                .filter(|m| m.parent.as_deref() == Some(p.as_str()))
                                .map(|m| m.id.clone()),
                        );
                        i += 1;
                    }
                }
                inner.delete_snapshots(&vm, ids).await.map(|_| None)
            }
            SnapshotOp::DeleteAll => {
                let ids = inner.list_snapshots(&vm).await?.into_iter().map(|s| s.id).collect();
                inner.delete_snapshots(&vm, ids).await.map(|_| None)
            }
            SnapshotOp::Revert { snapshot_id, skip_resume } => {
                inner.revert(&vm, &snapshot_id, skip_resume).await.map(|_| None)
            }
        }
    }

    #[tracing::instrument(level = "info", skip(self, req), fields(argv = ?req.argv))]
    async fn exec(&self, vm: &str, req: ExecRequest) -> Result<ExecOutput> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        inner.exec(&vm, req).await
    }

    #[tracing::instrument(level = "info", skip(self))]
    async fn upload(&self, vm: &str, local: &Path, remote: &str) -> Result<()> {
        let inner = self.inner();
        let vm = inner.find(vm)?;
        let state = inner.refresh(&vm).await;
        if state != VmState::Running {
            return Err(invalid(&vm, "upload to", state));
        }
        if remote.is_empty() {
            return Err(HypervisorError::InvalidInput("empty remote path".into()));
        }
        inner.upload_tree(&vm, local, remote).await
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<VmEvent> {
        self.inner().events.subscribe()
    }
}
