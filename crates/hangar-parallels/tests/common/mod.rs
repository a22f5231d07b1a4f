//! Test harness: a temp folder with `prlctl`/`prlsrvctl`/`sysctl` symlinks to the fake and its
//! state folder, and a driver configured to use them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use hangar_parallels::{ParallelsConfig, ParallelsDriver};

pub struct Fake {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub state: PathBuf,
}

impl Fake {
    pub fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let exe = env!("CARGO_BIN_EXE_hangar-fake-prlctl");
        std::os::unix::fs::symlink(exe, bin.join("prlctl")).unwrap();
        std::os::unix::fs::symlink(exe, bin.join("prlsrvctl")).unwrap();
        std::os::unix::fs::symlink(exe, bin.join("sysctl")).unwrap();
        Fake { dir, bin, state }
    }

    /// Driver settings for this fake, without the event watchers.
    pub fn config(&self) -> ParallelsConfig {
        let mut cfg = ParallelsConfig::with_tools_in(&self.bin);
        cfg.env.insert("FAKE_PRL_STATE_DIR".into(), self.state.display().to_string());
        cfg.command_timeout = Duration::from_secs(60);
        cfg.kill_grace = Duration::from_millis(500);
        cfg.watch_events = false;
        cfg.assume_root = Some(false);
        cfg
    }

    pub fn driver(&self) -> ParallelsDriver {
        ParallelsDriver::new(self.config()).unwrap()
    }

    /// VM folder of the fake (like `~/Parallels`).
    pub fn vm_home(&self) -> PathBuf {
        self.state.join("Parallels")
    }

    /// Run the fake `prlctl` as a separate process, as another tool on the host would.
    pub fn prlctl(&self, args: &[&str]) -> Output {
        std::process::Command::new(self.bin.join("prlctl"))
            .args(args)
            .env("FAKE_PRL_STATE_DIR", &self.state)
            .output()
            .unwrap()
    }

    /// `prlctl ARGS` that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.prlctl(args);
        assert!(out.status.success(), "prlctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Make a VM with the fake directly (a "golden image" to build from).
    pub fn make_vm(&self, name: &str) -> PathBuf {
        self.ok(&["create", name, "--distribution", "ubuntu"]);
        self.vm_home().join(format!("{name}.pvm"))
    }
}

/// Wait for `cond` with a deadline.
pub async fn eventually<F: FnMut() -> bool>(what: &str, timeout: Duration, mut cond: F) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process is gone (or a zombie nobody has reaped yet: it no longer runs).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
