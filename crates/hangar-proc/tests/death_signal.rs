//! A helper dies with the process that spawned it, even when the thread that asked for the
//! spawn has ended long before (Linux: the parent-death signal, armed on the spawner thread).
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hangar_proc::{CommandLine, command_line};

const MIDDLE_ENV: &str = "HANGAR_PROC_TEST_MIDDLE";

/// Kills a pid on drop, so a failing test leaves no `sleep` behind.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn is_our_sleep(pid: u32, marker: &str) -> bool {
    matches!(command_line(pid), Some(CommandLine::Argv(a)) if a.iter().any(|x| x == marker))
}

/// Played by this test binary run again: spawns `sleep` through the helper from a thread
/// that then ends, prints the sleep's pid and waits for its standard input to close.
#[test]
fn middle() {
    let Ok(marker) = std::env::var(MIDDLE_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = rt.handle().clone();
    let pid = std::thread::spawn(move || {
        let _entered = handle.enter();
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.args(["1000", &marker]).stdin(Stdio::null());
        let child = hangar_proc::spawn(cmd).unwrap();
        let pid = child.id().unwrap();
        std::mem::forget(child);
        pid
    })
    .join()
    .unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nHANGAR_PROC_PID={pid}").unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_helper_dies_with_its_parent_not_with_the_thread_that_asked() {
    if std::env::var(MIDDLE_ENV).is_ok() {
        return;
    }
    // `sleep 1000 <marker>`: GNU sleep adds up its arguments, so give it a number.
    let marker = format!("0.{}", std::process::id());
    let mut middle = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "middle", "--nocapture", "--test-threads=1"])
        .env(MIDDLE_ENV, &marker)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(middle.stdout.take().unwrap()).lines();
    let pid: u32 = loop {
        let line = lines.next().expect("the middle process printed no pid").unwrap();
        // libtest prints `test middle ... ` first, on the same line.
        if let Some((_, p)) = line.split_once("HANGAR_PROC_PID=") {
            break p.trim().parse().unwrap();
        }
    };
    let _cleanup = KillOnDrop(pid);
    assert!(is_our_sleep(pid, &marker), "the helper died when the thread that spawned it ended");

    middle.kill().unwrap();
    middle.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_our_sleep(pid, &marker) {
        assert!(Instant::now() < deadline, "the helper outlived its parent");
        std::thread::yield_now();
    }
}
