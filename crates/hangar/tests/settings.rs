//! Settings are checked whole at start: a bad value stops `hangar serve` before it opens
//! anything, even when the module the key belongs to is off, and every problem is named.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin;

#[test]
fn a_typo_in_an_off_modules_key_stops_serve_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(bin())
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--port", "0", "--set", "API_HOST=127.0.0.1"])
        .env_remove("HANGAR_CONFIG")
        .env("ENABLED_MODULES", "api")
        .env("QEMU_ACCELERATION", "kvmm")
        .env("ORCHESTRATOR_PLACEMENT", "spred")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "hangar serve kept running with QEMU_ACCELERATION=kvmm; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "exit {status}; stderr: {err}");
    assert!(
        err.contains("QEMU_ACCELERATION=\"kvmm\" (from the environment)") && err.contains("auto, kvm or tcg"),
        "{err}"
    );
    // Every problem at once, not only the first.
    assert!(err.contains("ORCHESTRATOR_PLACEMENT=\"spred\"") && err.contains("spread or pack"), "{err}");
    // Nothing was started: no banner, not even the data folder.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    assert!(!data.exists(), "the data folder was created before the settings were checked");
}
