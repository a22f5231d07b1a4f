//! Shared pieces of the QEMU driver tests: the guest image, a driver on a temporary VMs
//! root, and a guard that kills every QEMU started there, even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hangar_hypervisor::{CreateSpec, ExecOutput, ExecRequest, Hypervisor, VmEvent, VmInfo};
use hangar_qemu::{QemuConfig, QemuDriver};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// Boots under TCG on 2 busy cores can take a while: deadlines are generous.
pub const BOOT: Duration = Duration::from_secs(180);

/// Tests that boot guests take turns: 2 cores do not run many TCG guests well.
pub static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The guest image built by `scripts/build-guest-image.sh`, from `HANGAR_GUEST_IMAGE_DIR`.
pub fn guest_image() -> PathBuf {
    let dir = std::env::var_os("HANGAR_GUEST_IMAGE_DIR").unwrap_or_else(|| {
        panic!(
            "HANGAR_GUEST_IMAGE_DIR is not set. Build the test guest with \
             `scripts/build-guest-image.sh DIR` (it also installs QEMU) and set HANGAR_GUEST_IMAGE_DIR=DIR"
        )
    });
    let dir = PathBuf::from(dir);
    for f in ["image.json", "vmlinuz", "initrd.img", "disk.qcow2"] {
        assert!(
            dir.join(f).exists(),
            "{} has no {f}: run `scripts/build-guest-image.sh {}` first",
            dir.display(),
            dir.display()
        );
    }
    assert!(
        which("qemu-system-x86_64") && which("qemu-img"),
        "qemu-system-x86_64 or qemu-img is missing: run `scripts/build-guest-image.sh {}`",
        dir.display()
    );
    dir
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file())).unwrap_or(false)
}

/// Kills every QEMU whose pid file lies under the given folders when dropped.
pub struct QemuGuard {
    pub dirs: Vec<PathBuf>,
}

impl QemuGuard {
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for root in &self.dirs {
            let Ok(rd) = std::fs::read_dir(root) else {
                continue;
            };
            for e in rd.flatten() {
                let dir = e.path();
                if let Some(pid) =
                    std::fs::read_to_string(dir.join("qemu.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok())
                    && qemu_alive(pid, &dir)
                {
                    out.push(pid);
                }
            }
        }
        out
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Whether a live, non-zombie process with this pid mentions `dir` on its command line.
pub fn qemu_alive(pid: i32, dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).unwrap_or("Z");
    if state == "Z" || state == "X" {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let marker = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(marker.len()).any(|w| w == marker)
}

/// QEMU processes anywhere on the machine whose command line mentions `root`.
pub fn qemu_processes_under(root: &Path) -> Vec<i32> {
    let marker = root.as_os_str().as_encoded_bytes().to_vec();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let is_qemu = cmdline.windows(11).any(|w| w == b"qemu-system");
        if is_qemu && cmdline.windows(marker.len()).any(|w| w == marker.as_slice()) && qemu_alive(pid, root) {
            out.push(pid);
        }
    }
    out
}

pub struct Fixture {
    pub root: tempfile::TempDir,
    pub image: PathBuf,
    pub driver: Arc<QemuDriver>,
    pub guard: QemuGuard,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A driver on a fresh VMs root (short path: Unix socket paths are limited).
pub async fn fixture() -> Fixture {
    init_tracing();
    let image = guest_image();
    let root = tempfile::Builder::new().prefix("hq").tempdir_in("/tmp").unwrap();
    let driver = Arc::new(QemuDriver::new(config(root.path())).await.unwrap());
    let guard = QemuGuard { dirs: vec![std::fs::canonicalize(root.path()).unwrap()] };
    Fixture { root, image, driver, guard }
}

pub fn config(root: &Path) -> QemuConfig {
    let mut cfg = QemuConfig::new(root);
    cfg.reconcile_interval = Duration::from_millis(500);
    cfg
}

pub fn spec(name: &str, image: &Path) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        image: image.to_path_buf(),
        cpus: 1,
        memory_mb: 128,
        disk_bytes: None,
        description: format!("test VM {name}"),
        owner: Some("tester".into()),
        os: None,
    }
}

pub fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest::program(argv, Duration::from_secs(60))
}

pub fn sh(cmd: &str) -> ExecRequest {
    let mut r = req(&[cmd]);
    r.shell = true;
    r
}

/// Runs a shell command and insists on exit code 0.
pub async fn run(d: &QemuDriver, vm: &str, cmd: &str) -> ExecOutput {
    let out = d.exec(vm, sh(cmd)).await.unwrap();
    assert_eq!(out.exit_code, 0, "`{cmd}` failed: {out:?}");
    out
}

/// Creates and starts a VM and waits until its guest agent answers.
pub async fn boot(d: &QemuDriver, name: &str, image: &Path) -> VmInfo {
    let vm = d.create(spec(name, image)).await.unwrap();
    d.power(&vm.id, hangar_hypervisor::PowerOp::Start).await.unwrap();
    d.wait_for_agent(&vm.id, BOOT).await.unwrap();
    d.get(&vm.id).await.unwrap()
}

/// Waits for an event matching `pred`, up to `within`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<VmEvent>,
    within: Duration,
    pred: impl Fn(&VmEvent) -> bool,
) -> Option<VmEvent> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) if pred(&ev) => return Some(ev),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}
