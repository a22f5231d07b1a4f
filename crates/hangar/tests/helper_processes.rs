//! No helper process outlives the host agent (issue 19): a host agent on the Parallels driver
//! killed with SIGKILL five times, restarted each time, leaves exactly one
//! `prlctl monitor-events` running (the last agent's), and none once it is stopped.
//!
//! Run twice: as shipped (on Linux the parent-death signal kills the monitor with the agent),
//! and with the signal left out (`HANGAR_TEST_NO_DEATH_SIGNAL=1`), where only the pid-file
//! ledger in the data folder stops the monitor a killed agent left, as on macOS.
//!
//! Monitors are counted by their command line: the fake `prlctl` inside this test's own temp
//! folder, so concurrent tests cannot disturb the count.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{FakeParallels, Server};

/// A running `monitor-events` of the fake prlctl under `tools`: its pid and parent pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Monitor {
    pid: u32,
    ppid: u32,
}

fn monitors(tools: &Path) -> Vec<Monitor> {
    let prlctl = tools.join("prlctl").display().to_string();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let argv: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        // The driver runs `<tools>/prlctl monitor-events --json` (or the same behind `sudo --`).
        let is_monitor = argv.iter().any(|a| a == &prlctl) && argv.iter().any(|a| a == "monitor-events");
        if !is_monitor {
            continue;
        }
        // /proc/<pid>/stat: `pid (comm) state ppid ...`; comm may hold spaces, so split after `)`.
        let ppid = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok()))
            .unwrap_or(0);
        found.push(Monitor { pid, ppid });
    }
    found
}

/// Wait (deadline 30 s) until `cond` holds for the monitors under `tools`; return them.
fn wait_monitors(tools: &Path, what: &str, cond: impl Fn(&[Monitor]) -> bool) -> Vec<Monitor> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = monitors(tools);
        if cond(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: monitors now {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agent(fake: &FakeParallels, data: &Path, env: &[(&str, &str)]) -> Server {
    fake.server_env(data, &[("ENABLED_MODULES", "api,host")], env)
}

fn kill_five_times_then_stop(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let data = dir.path().join("data");
    assert!(monitors(&fake.tools).is_empty());

    let mut server = agent(&fake, &data, env);
    for round in 1..=5 {
        let pid = server.child.id();
        wait_monitors(&fake.tools, &format!("round {round}: the agent's monitor"), |m| m.iter().any(|m| m.ppid == pid));
        server.kill9();
        server = agent(&fake, &data, env);
    }
    // The last agent's monitor, and nothing else: earlier monitors died with their agent
    // (the parent-death signal) or were stopped by this one at start (the ledger).
    let pid = server.child.id();
    let last =
        wait_monitors(&fake.tools, "exactly one monitor, the last agent's", |m| m.len() == 1 && m[0].ppid == pid);
    assert_eq!(last.len(), 1);

    let status = server.stop();
    assert!(status.success(), "the agent did not stop cleanly: {status}; log: {}", server.log());
    wait_monitors(&fake.tools, "no monitor after a clean stop", |m| m.is_empty());
    let helpers = data.join("run").join("helpers");
    let left: Vec<_> =
        std::fs::read_dir(&helpers).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "pid files left in {}: {left:?}", helpers.display());
}

#[test]
fn a_killed_agent_leaves_no_event_monitor_behind() {
    kill_five_times_then_stop(&[]);
}

#[test]
fn without_the_death_signal_the_ledger_stops_what_a_killed_agent_left() {
    kill_five_times_then_stop(&[("HANGAR_TEST_NO_DEATH_SIGNAL", "1")]);
}
