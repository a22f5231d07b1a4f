//! The pid-file ledger of long-lived helpers, swept at start (see the crate docs).

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// One recorded helper, as written to `<pid>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    pid: u32,
    /// The helper leads its own process group (stop the group, not only the pid).
    group: bool,
    /// The command line we started: program, then arguments.
    argv: Vec<String>,
    /// The pid of the process that started the helper: a sweep never stops the helpers of
    /// the process sweeping (a second driver in the same agent must not kill the first's).
    #[serde(default)]
    agent: u32,
}

/// A folder of pid files, one per running long-lived helper.
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

/// A helper's entry in the ledger; removed when dropped.
#[derive(Debug)]
pub struct Recorded {
    path: PathBuf,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What [`Ledger::sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Leftover helpers stopped (their pids).
    pub stopped: Vec<u32>,
    /// Recorded pids now held by another program, or gone: left alone.
    pub left_alone: Vec<u32>,
}

/// A live process's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// Its exact argv (Linux: `/proc/<pid>/cmdline`).
    Argv(Vec<String>),
    /// Its argv joined by spaces (elsewhere: `ps -o command=`).
    Joined(String),
}

impl CommandLine {
    /// Whether this is the command line `argv` we started, or the command a `sudo ... --`
    /// wrapper in `argv` went on to run in the same process (the part after `--`).
    pub fn is(&self, argv: &[String]) -> bool {
        let tail = argv.iter().position(|a| a == "--").map(|i| &argv[i + 1..]).filter(|t| !t.is_empty());
        let candidates = std::iter::once(argv).chain(tail);
        match self {
            CommandLine::Argv(live) => candidates.into_iter().any(|c| c == live.as_slice()),
            CommandLine::Joined(live) => candidates.into_iter().any(|c| c.join(" ") == live.trim_end()),
        }
    }
}

/// The command line of process `pid`, or `None` when it is gone (or a zombie).
pub fn command_line(pid: u32) -> Option<CommandLine> {
    #[cfg(target_os = "linux")]
    {
        command_line_proc(pid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        command_line_ps(pid)
    }
}

/// From `/proc/<pid>/cmdline` (exact; empty for a zombie).
#[cfg(target_os = "linux")]
fn command_line_proc(pid: u32) -> Option<CommandLine> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let raw = raw.strip_suffix(b"\0").unwrap_or(&raw);
    Some(CommandLine::Argv(raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()))
}

/// From `ps -ww -o command= -p <pid>` (macOS; also works with Linux's procps, where the
/// tests run it).
#[cfg_attr(target_os = "linux", allow(dead_code, reason = "the reader of other platforms; tested on Linux"))]
fn command_line_ps(pid: u32) -> Option<CommandLine> {
    let out = std::process::Command::new("ps")
        .args(["-ww", "-o", "command=", "-p", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // A zombie shows as `<defunct>` or in brackets; an exited pid prints nothing.
    if !out.status.success() || text.is_empty() || text.ends_with("<defunct>") {
        return None;
    }
    Some(CommandLine::Joined(text))
}

impl Ledger {
    /// Open (creating, mode 0700) the ledger folder `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Ledger> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Ledger { dir })
    }

    /// The ledger's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Record helper `pid`, started as `argv` (leading its own process group when `group`).
    /// The entry goes when the returned [`Recorded`] is dropped.
    pub fn record(&self, pid: u32, group: bool, argv: Vec<String>) -> io::Result<Recorded> {
        self.record_by(std::process::id(), pid, group, argv)
    }

    /// [`Ledger::record`] on behalf of agent process `agent`.
    fn record_by(&self, agent: u32, pid: u32, group: bool, argv: Vec<String>) -> io::Result<Recorded> {
        let path = self.dir.join(format!("{pid}.json"));
        let tmp = self.dir.join(format!(".{pid}.json.tmp"));
        let body = serde_json::to_vec(&Record { pid, group, argv, agent }).map_err(io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &path)?;
        Ok(Recorded { path })
    }

    /// Stop the helpers an earlier agent recorded and did not remove (it was killed): each
    /// whose pid still runs the command line recorded is killed (`SIGKILL`, its process group
    /// too when it led one); a pid now held by anything else is left alone. Every entry is
    /// removed. Run it at start, before starting new helpers.
    pub fn sweep(&self) -> SweepReport {
        let mut report = SweepReport::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return report };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let record = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            if record.as_ref().is_some_and(|r| r.agent == std::process::id()) {
                // This very process's own helper, still running: not a leftover.
                continue;
            }
            let _ = std::fs::remove_file(&path);
            let Some(record) = record else {
                warn!(file = %path.display(), "ignoring an unreadable helper pid file");
                continue;
            };
            if stop_if_ours(&record) {
                report.stopped.push(record.pid);
            } else {
                report.left_alone.push(record.pid);
            }
        }
        report
    }
}

/// Kill the recorded helper if its pid still runs what we started. `true` when killed.
fn stop_if_ours(record: &Record) -> bool {
    let Ok(raw) = i32::try_from(record.pid) else { return false };
    // Never this process, init, or a pid that names a group or everyone.
    if raw <= 1 || record.pid == std::process::id() {
        return false;
    }
    let pid = Pid::from_raw(raw);
    match command_line(record.pid) {
        Some(live) if live.is(&record.argv) => {
            let leads_group = record.group && getpgid(Some(pid)).is_ok_and(|g| g == pid);
            let res = if leads_group { killpg(pid, Signal::SIGKILL) } else { kill(pid, Signal::SIGKILL) };
            match res {
                Ok(()) => {
                    warn!(pid = record.pid, command = %record.argv.join(" "), "stopped a helper an earlier run left behind");
                    true
                }
                Err(e) => {
                    warn!(pid = record.pid, %e, "cannot stop a helper an earlier run left behind");
                    false
                }
            }
        }
        Some(_) => {
            info!(pid = record.pid, "a recorded helper's pid now runs another program; left alone");
            false
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The pid of an agent that ran before this one (killed): not this process.
    const EARLIER_AGENT: u32 = 0;

    #[test]
    fn this_process_own_running_helper_is_neither_stopped_nor_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("helpers")).unwrap();
        let (child, argv) = sleeper();
        let _rec = ledger.record(child.0.id(), true, argv).unwrap();
        // A second driver of the same agent opening the ledger sweeps it.
        let report = ledger.sweep();
        assert!(report.stopped.is_empty(), "{report:?}");
        assert!(command_line(child.0.id()).is_some(), "the agent's own live helper was stopped");
        assert_eq!(std::fs::read_dir(ledger.dir()).unwrap().count(), 1, "its entry is kept");
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A process started plainly, in its own group, as a killed agent's monitor is left;
    /// killed on drop so a failing test leaves nothing behind.
    struct Sleeper(Child);

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper() -> (Sleeper, Vec<String>) {
        use std::os::unix::process::CommandExt;
        let argv = args(&["sleep", "1000"]);
        let child = Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).process_group(0).spawn().unwrap();
        // Until it has exec'd, the child shows this test's command line: wait for `sleep`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !command_line(child.id()).is_some_and(|c| c.is(&argv)) {
            assert!(Instant::now() < deadline, "sleep did not start");
            std::thread::yield_now();
        }
        (Sleeper(child), argv)
    }

    fn wait_exit(child: &mut Sleeper) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.0.try_wait() {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    #[test]
    fn a_leftover_running_what_we_started_is_stopped_and_its_entry_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("helpers")).unwrap();
        let (mut child, argv) = sleeper();
        let rec = ledger.record_by(EARLIER_AGENT, child.0.id(), true, argv).unwrap();
        std::mem::forget(rec); // the agent was killed: nothing removed the entry
        let report = ledger.sweep();
        assert_eq!(report.stopped, vec![child.0.id()]);
        assert!(wait_exit(&mut child), "the leftover was not stopped");
        assert_eq!(std::fs::read_dir(ledger.dir()).unwrap().count(), 0, "entries are removed");
    }

    #[test]
    fn a_pid_running_something_else_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("helpers")).unwrap();
        let (child, _) = sleeper();
        let rec = ledger.record_by(
            EARLIER_AGENT,
            child.0.id(),
            true,
            args(&["/usr/local/bin/prlctl", "monitor-events", "--json"]),
        );
        std::mem::forget(rec.unwrap());
        let report = ledger.sweep();
        assert_eq!(report.left_alone, vec![child.0.id()]);
        assert!(report.stopped.is_empty());
        assert!(command_line(child.0.id()).is_some(), "a process that is not ours was stopped");
    }

    #[test]
    fn a_dropped_entry_is_removed_and_a_gone_pid_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("helpers")).unwrap();
        drop(ledger.record(4_000_000, false, args(&["x"])).unwrap());
        assert_eq!(std::fs::read_dir(ledger.dir()).unwrap().count(), 0);
        std::mem::forget(ledger.record_by(EARLIER_AGENT, 4_000_001, false, args(&["x"])).unwrap());
        std::fs::write(ledger.dir().join("garbage.json"), "{").unwrap();
        let report = ledger.sweep();
        assert_eq!(report.left_alone, vec![4_000_001]);
        assert_eq!(std::fs::read_dir(ledger.dir()).unwrap().count(), 0);
    }

    #[test]
    fn matching_rules() {
        let started = args(&["/usr/bin/sudo", "-n", "-u", "alice", "--", "/usr/local/bin/prlctl", "monitor-events"]);
        assert!(CommandLine::Argv(started.clone()).is(&started));
        assert!(CommandLine::Argv(args(&["/usr/local/bin/prlctl", "monitor-events"])).is(&started));
        assert!(!CommandLine::Argv(args(&["/usr/local/bin/prlctl"])).is(&started));
        assert!(!CommandLine::Argv(args(&["monitor-events"])).is(&started));
        assert!(CommandLine::Joined("/usr/local/bin/prlctl monitor-events\n".into()).is(&started));
        assert!(!CommandLine::Joined("vim /usr/local/bin/prlctl monitor-events".into()).is(&started));
        // `--` at the end names no command.
        assert!(!CommandLine::Argv(vec![]).is(&args(&["x", "--"])));
    }

    /// The reader macOS uses, run here through procps.
    #[test]
    fn the_ps_reader_reads_a_live_command_line() {
        let (child, argv) = sleeper();
        let pid = child.0.id();
        let live = command_line_ps(pid).expect("ps names the process");
        assert!(live.is(&argv), "{live:?} vs {argv:?}");
        drop(child);
        assert_eq!(command_line_ps(pid), None);
    }
}
