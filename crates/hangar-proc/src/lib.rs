//! Helper processes the agent starts for itself die with it.
//!
//! The host agent runs tools as child processes: the Parallels driver's long-lived
//! `prlctl monitor-events --json` (one per host user) and its `prlctl`/`prlsrvctl`/`sysctl`
//! calls, the QEMU driver's `qemu-img` calls and KVM probe. None of them may outlive the
//! agent. (QEMU guests are not helpers: they are daemonized on purpose and adopted by the
//! next agent; they are not started through this crate.)
//!
//! Every helper is started with [`spawn`] (or [`spawn_recorded`] for long-lived ones), the
//! one place that does so. Two mechanisms, which cover each other:
//!
//! * **Parent-death signal (Linux).** The child sets `PR_SET_PDEATHSIG` to `SIGKILL` before
//!   `exec`, so the kernel kills it when the agent dies, also by `SIGKILL`. The signal fires
//!   when the *thread* that forked the child exits, not the process: Tokio's blocking
//!   threads end after a while idle, and a worker that ran `block_in_place` becomes one. So
//!   every fork happens on one thread, `hangar-spawner`, started at the first spawn and never
//!   ended. The child also checks, after `prctl`, that its parent is still the agent: if the
//!   agent died between `fork` and `prctl` the signal would never come, and the child exits
//!   instead of running. Set `HANGAR_TEST_NO_DEATH_SIGNAL=1` in the agent's environment to
//!   leave the signal out (tests use it to exercise the ledger alone, as on macOS).
//! * **The ledger (every platform).** [`Ledger`] keeps one small file per long-lived helper in
//!   the data folder (`<data>/run/helpers/<pid>.json`: the pid, whether it leads its own
//!   process group, and the command line we started), written after the spawn and removed
//!   when the helper is reaped. At start, [`Ledger::sweep`] reads what a killed agent left:
//!   a running process whose command line is still what we started is stopped (with its
//!   process group when it led one); any other process (the pid was reused) is left alone.
//!   macOS has no parent-death signal, so there the ledger is what stops an earlier agent's
//!   monitors; on Linux it catches a helper that escaped the signal.
//!
//! Short calls are not recorded: they carry deadlines, and on Linux the signal covers them.
//!
//! `spawn` consumes the command (so file descriptors it holds, such as the slave side of a
//! pseudo-terminal, are closed once the child has them) and needs a Tokio runtime.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;

mod death;
mod ledger;

pub use ledger::{CommandLine, Ledger, Recorded, SweepReport, command_line};

/// Environment variable that, set to `1` in the agent's environment, leaves out the
/// parent-death signal (for tests of the ledger on Linux).
pub const NO_DEATH_SIGNAL_ENV: &str = "HANGAR_TEST_NO_DEATH_SIGNAL";

/// Whether children get the parent-death signal (read once per process).
pub fn death_signal_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(NO_DEATH_SIGNAL_ENV).map(|v| v.trim() != "1").unwrap_or(true))
}

/// One request to the spawner thread.
struct Job {
    cmd: Command,
    handle: Handle,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The spawner thread's queue; `None` when the thread could not be started.
fn spawner() -> Option<&'static mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let started = std::thread::Builder::new().name("hangar-spawner".to_string()).spawn(move || {
                // The sender lives in a static, so this loop ends only with the process.
                while let Ok(job) = rx.recv() {
                    let Job { mut cmd, handle, reply } = job;
                    let res = {
                        let _entered = handle.enter();
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()))
                            .unwrap_or_else(|_| Err(io::Error::other("spawning the command panicked")))
                    };
                    drop(cmd);
                    let _ = reply.send(res);
                }
            });
            match started {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!(%e, "cannot start the spawner thread; helpers are spawned from the calling thread");
                    None
                }
            }
        })
        .as_ref()
}

/// Spawn `cmd` as a helper of this process: on Linux it is killed when the agent dies
/// (see the crate docs). The command is consumed; configure stdio, groups and
/// `kill_on_drop` before. Needs a Tokio runtime (the child is registered with it).
pub fn spawn(mut cmd: Command) -> io::Result<Child> {
    if death_signal_enabled() {
        death::arm(&mut cmd);
    }
    let handle = Handle::try_current().map_err(|e| io::Error::other(format!("no Tokio runtime: {e}")))?;
    let Some(queue) = spawner() else {
        return cmd.spawn();
    };
    let (reply, answer) = mpsc::sync_channel(1);
    queue.send(Job { cmd, handle, reply }).map_err(|_| io::Error::other("the spawner thread has stopped"))?;
    answer.recv().map_err(|_| io::Error::other("the spawner thread has stopped"))?
}

/// The command line `cmd` will run (program, then arguments), as recorded in the ledger.
pub fn argv_of(cmd: &Command) -> Vec<String> {
    let std = cmd.as_std();
    std::iter::once(std.get_program()).chain(std.get_args()).map(|a| a.to_string_lossy().into_owned()).collect()
}

/// [`spawn`] a long-lived helper and record it in `ledger` until the returned [`Recorded`]
/// is dropped (drop it after the child is reaped). `own_group`: the command was set to lead
/// its own process group (`process_group(0)`), so a sweep stops the whole group.
pub fn spawn_recorded(cmd: Command, ledger: &Ledger, own_group: bool) -> io::Result<(Child, Recorded)> {
    let argv = argv_of(&cmd);
    let mut child = spawn(cmd)?;
    let Some(pid) = child.id() else {
        return Err(io::Error::other("the helper exited before it could be recorded"));
    };
    match ledger.record(pid, own_group, argv) {
        Ok(rec) => Ok((child, rec)),
        Err(e) => {
            let _ = child.start_kill();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spawns_and_reaps_a_helper() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello"]).stdout(Stdio::piped()).kill_on_drop(true);
        let out = spawn(cmd).unwrap().wait_with_output().await.unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_not_a_panic() {
        let cmd = Command::new("/nonexistent/hangar-proc-test-program");
        let err = spawn(cmd).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn argv_is_program_then_arguments() {
        let mut cmd = Command::new("/usr/bin/prlctl");
        cmd.args(["monitor-events", "--json"]);
        assert_eq!(argv_of(&cmd), ["/usr/bin/prlctl", "monitor-events", "--json"]);
    }
}
