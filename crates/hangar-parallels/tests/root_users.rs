//! A driver run as root sees every host user's VMs (as the reference's does) and works on a
//! VM as its user; the fake plays `sudo` and keeps one VM list per user.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Fake;
use hangar_hypervisor::{Hypervisor, PowerOp, VmEvent, VmState};
use hangar_parallels::ParallelsDriver;

fn as_user(fake: &Fake, user: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(fake.bin.join("prlctl"))
        .args(args)
        .env("FAKE_PRL_STATE_DIR", &fake.state)
        .env("FAKE_PRL_USER", user)
        .output()
        .unwrap();
    assert!(out.status.success(), "prlctl {args:?} as {user}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn state_of(fake: &Fake, user: &str, name: &str) -> String {
    let list: serde_json::Value =
        serde_json::from_str(&as_user(fake, user, &["list", name, "-a", "-i", "--json"])).unwrap();
    list[0]["State"].as_str().unwrap().to_string()
}

fn root_driver(fake: &Fake, users: &[&str]) -> ParallelsDriver {
    let exe = env!("CARGO_BIN_EXE_hangar-fake-prlctl");
    let sudo = fake.bin.join("sudo");
    if !sudo.exists() {
        std::os::unix::fs::symlink(exe, &sudo).unwrap();
    }
    let mut cfg = fake.config();
    cfg.assume_root = Some(true);
    cfg.sudo = sudo;
    cfg.users = users.iter().map(|u| u.to_string()).collect();
    cfg.command_timeout = Duration::from_secs(60);
    ParallelsDriver::new(cfg).unwrap()
}

#[tokio::test]
async fn root_lists_every_users_vms_and_starts_one_as_its_user() {
    let fake = Fake::new();
    as_user(&fake, "alice", &["create", "alice-vm", "--distribution", "ubuntu"]);
    as_user(&fake, "bob", &["create", "bob-vm", "--distribution", "macosx"]);
    fake.ok(&["create", "root-vm", "--distribution", "ubuntu"]);
    // Each user sees only their own VMs.
    assert!(!as_user(&fake, "alice", &["list", "-a", "--json"]).contains("bob-vm"));

    let d = root_driver(&fake, &[]);
    let mut seen: Vec<(String, Option<String>)> =
        d.list().await.unwrap().into_iter().map(|v| (v.name, v.owner)).collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("alice-vm".to_string(), Some("alice".to_string())),
            ("bob-vm".to_string(), Some("bob".to_string())),
            ("root-vm".to_string(), Some("root".to_string())),
        ],
        "root sees every user's VMs, each with its user (its own as root, as the reference reports them)"
    );
    let root_vm = d.get("root-vm").await.unwrap();
    let inv = d.prlctl_invocation(&["start", &root_vm.id], root_vm.owner.as_deref());
    assert!(inv.program.ends_with("prlctl"), "root's own VMs are not wrapped in sudo: {inv:?}");

    // Found by name without a list first, started as its user (through sudo -u bob).
    let d = root_driver(&fake, &[]);
    let bob = d.get("bob-vm").await.unwrap();
    assert_eq!(bob.owner.as_deref(), Some("bob"));
    let inv = d.prlctl_invocation(&["start", &bob.id], bob.owner.as_deref());
    assert!(inv.program.ends_with("sudo") && inv.args[..4] == ["-n", "-H", "-u", "bob"], "{inv:?}");
    let started = d.power(&bob.id, PowerOp::Start).await.unwrap();
    assert_eq!(started.state, VmState::Running);
    assert_eq!(state_of(&fake, "bob", "bob-vm"), "running", "the VM in bob's own list runs");
    assert_eq!(
        started.details.get("GuestTools").and_then(|g| g.get("state")).and_then(|s| s.as_str()),
        Some("installed")
    );
}

#[tokio::test]
async fn configured_users_limit_what_root_lists_and_a_non_root_agent_sees_its_own() {
    let fake = Fake::new();
    as_user(&fake, "alice", &["create", "alice-vm", "--distribution", "ubuntu"]);
    as_user(&fake, "bob", &["create", "bob-vm", "--distribution", "ubuntu"]);
    fake.ok(&["create", "root-vm", "--distribution", "ubuntu"]);

    let names = |vms: Vec<hangar_hypervisor::VmInfo>| {
        let mut n: Vec<String> = vms.into_iter().map(|v| v.name).collect();
        n.sort();
        n
    };
    let d = root_driver(&fake, &["alice"]);
    assert_eq!(names(d.list().await.unwrap()), vec!["alice-vm"]);
    assert!(d.get("bob-vm").await.is_err(), "bob is not among the configured users");

    let own = fake.driver();
    let mine = own.list().await.unwrap();
    assert!(
        mine.iter().all(|v| v.owner.as_deref().is_some_and(|u| !u.is_empty())),
        "the agent's own user is the VMs' user"
    );
    assert_eq!(names(mine), vec!["root-vm"], "a non-root agent lists its own VMs only");
}

#[tokio::test]
async fn a_listed_vm_carries_prlctls_whole_object() {
    let fake = Fake::new();
    fake.ok(&["create", "full", "--distribution", "ubuntu"]);
    let vm = fake.driver().get("full").await.unwrap();
    for key in
        ["Uptime", "GuestTools", "Home path", "Template", "Startup and Shutdown", "Modality", "Hardware", "Network"]
    {
        assert!(vm.details.contains_key(key), "{key} missing from {:?}", vm.details.keys().collect::<Vec<_>>());
    }
    assert_eq!(vm.details["Modality"]["Show on all spaces "], "on");
}

#[tokio::test]
async fn root_watches_every_users_vms() {
    let fake = Fake::new();
    as_user(&fake, "carol", &["create", "carol-vm", "--distribution", "ubuntu"]);
    let list: serde_json::Value =
        serde_json::from_str(&as_user(&fake, "carol", &["list", "carol-vm", "-a", "-i", "--json"])).unwrap();
    let id = list[0]["ID"].as_str().unwrap().to_string();
    let exe = env!("CARGO_BIN_EXE_hangar-fake-prlctl");
    let sudo = fake.bin.join("sudo");
    std::os::unix::fs::symlink(exe, &sudo).unwrap();
    let mut cfg = fake.config();
    cfg.assume_root = Some(true);
    cfg.sudo = sudo;
    cfg.watch_events = true;
    cfg.reconcile_interval = Duration::from_secs(3600);
    let d = ParallelsDriver::new(cfg).unwrap();
    let mut rx = d.subscribe();

    // carol's own prlctl changes her VM; root's driver hears of it through her monitor.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    'heard: loop {
        assert!(std::time::Instant::now() < deadline, "no event about carol's VM reached the root driver");
        n += 1;
        as_user(&fake, "carol", &["set", "carol-vm", "--description", &format!("probe {n}")]);
        let until = std::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            if matches!(&ev, VmEvent::Updated { vm } | VmEvent::Added { vm } if vm.id == id) {
                break 'heard;
            }
        }
    }
    as_user(&fake, "carol", &["start", "carol-vm"]);
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(VmEvent::StateChanged { id: eid, current, .. }) = rx.recv().await
                && eid == id
            {
                return current;
            }
        }
    })
    .await
    .expect("no StateChanged for carol's VM");
    assert_eq!(got, VmState::Running);
}
