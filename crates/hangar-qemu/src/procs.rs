//! Finding and ending QEMU processes by pid file, checked against `/proc`.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Reads a pid file; `None` when absent or unreadable.
pub(crate) fn read_pid(pid_file: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    text.trim().parse::<i32>().ok().filter(|p| *p > 1)
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `marker`
/// (the VM folder), so a recycled pid is never mistaken for the VM.
pub(crate) fn alive(pid: i32, marker: &Path) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(_) => return false,
    };
    let marker = marker.as_os_str().as_encoded_bytes();
    !marker.is_empty() && cmdline.windows(marker.len()).any(|w| w == marker)
}

/// The live QEMU pid of a VM folder, if any.
pub(crate) fn live_pid(pid_file: &Path, dir: &Path) -> Option<i32> {
    read_pid(pid_file).filter(|pid| alive(*pid, dir))
}

/// Sends SIGKILL; errors (already gone) are ignored.
pub(crate) fn kill_hard(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Waits until the process is gone, up to `within`. Returns whether it is gone.
pub(crate) async fn wait_gone(pid: i32, dir: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !alive(pid, dir) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
