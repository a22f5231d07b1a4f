//! The full life of one VM against a real QEMU guest.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use hangar_hypervisor::{Hypervisor, HypervisorError, PowerOp, SnapshotOp, VmEvent, VmState};

fn state_event(id: &str, to: VmState) -> impl Fn(&VmEvent) -> bool + '_ {
    move |e| matches!(e, VmEvent::StateChanged { id: i, current, .. } if i == id && *current == to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_exec_upload_snapshot_suspend_stop_delete() {
    let _turn = VM_LOCK.lock().await;
    let f = fixture().await;
    let d = &f.driver;
    let mut events = d.subscribe();

    // Create: an overlay on the base, not a copy.
    let vm = d.create(spec("acceptance", &f.image)).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.memory_mb, 128);
    assert!(vm.home.join("vm.json").exists());
    assert!(vm.disk_bytes < 2 * 1024 * 1024, "the overlay should be tiny, got {} bytes", vm.disk_bytes);
    assert_eq!(vm.disk_virtual_bytes, 256 * 1024 * 1024);
    assert!(
        wait_event(&mut events, Duration::from_secs(1), |e| matches!(e, VmEvent::Added { vm: v } if v.id == vm.id))
            .await
            .is_some()
    );
    assert_eq!(d.get("acceptance").await.unwrap().id, vm.id, "get by name");

    // Start: running at once, the agent answers after the boot.
    let started = d.power(&vm.id, PowerOp::Start).await.unwrap();
    assert_eq!(started.state, VmState::Running);
    assert!(wait_event(&mut events, Duration::from_secs(1), state_event(&vm.id, VmState::Running)).await.is_some());
    d.wait_for_agent(&vm.id, BOOT).await.unwrap();

    // Exec: output and exit codes.
    let out = d.exec(&vm.id, req(&["uname", "-a"])).await.unwrap();
    assert_eq!(out.exit_code, 0);
    assert!(out.stdout.starts_with("Linux hangar-guest "), "uname said {:?}", out.stdout);
    let out = d.exec(&vm.id, sh("echo to-out; echo to-err >&2; exit 3")).await.unwrap();
    assert_eq!((out.exit_code, out.stdout.as_str(), out.stderr.as_str()), (3, "to-out\n", "to-err\n"));
    let out = d.exec(&vm.id, req(&["false"])).await.unwrap();
    assert_eq!(out.exit_code, 1);
    let mut r = req(&["sh", "-c", "pwd; echo \"$GREETING\"; cat"]);
    r.env.insert("GREETING".into(), "hello world".into());
    r.working_dir = Some("/data".into());
    r.stdin = Some(b"from-stdin".to_vec());
    let out = d.exec(&vm.id, r).await.unwrap();
    assert_eq!(out.stdout, "/data\nhello world\nfrom-stdin");
    let out = d.exec(&vm.id, req(&["cat", "/data/golden"])).await.unwrap();
    assert_eq!(out.stdout, "golden-v1\n", "the base disk is mounted on /data");

    // Exec timeout: an error, and the guest process is killed.
    let mut r = sh("sleep 97");
    r.timeout = Duration::from_secs(2);
    match d.exec(&vm.id, r).await {
        Err(HypervisorError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let out = run(d, &vm.id, "ps -o args | grep -c '^sleep 97' || true").await;
    assert_eq!(out.stdout.trim(), "0", "the timed-out command still runs");

    // IPs from the agent (user-mode network, DHCP in the guest).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ips = d.ip_addresses(&vm.id, Duration::from_secs(10)).await.unwrap();
        if ips.iter().any(|ip| ip.to_string() == "10.0.2.15") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no DHCP address, got {ips:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Upload a file and read it back.
    let local = f.root.path().join("upload.txt");
    let content: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&local, &content).unwrap();
    d.upload(&vm.id, &local, "/data/upload.txt").await.unwrap();
    let out = run(d, &vm.id, "cat /data/upload.txt").await;
    assert!(out.stdout == content, "uploaded file differs ({} vs {} bytes)", out.stdout.len(), content.len());

    // Snapshot, change the file, revert: the file is back (disk and memory restored).
    run(d, &vm.id, "echo before > /data/state; echo mem-before > /tmp/mem; sync").await;
    let snap = d
        .snapshot(&vm.id, SnapshotOp::Create { name: "first".into(), description: "before change".into() })
        .await
        .unwrap()
        .unwrap();
    let snaps = d.snapshots(&vm.id).await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!((snaps[0].name.as_str(), snaps[0].current, snaps[0].state), ("first", true, VmState::Running));
    run(d, &vm.id, "echo after > /data/state; echo mem-after > /tmp/mem; sync").await;
    d.snapshot(&vm.id, SnapshotOp::Revert { snapshot_id: snap.id.clone(), skip_resume: false }).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().state, VmState::Running);
    let out = run(d, &vm.id, "cat /data/state /tmp/mem").await;
    assert_eq!(out.stdout, "before\nmem-before\n");
    d.snapshot(&vm.id, SnapshotOp::Delete { snapshot_id: snap.id.clone(), delete_children: false }).await.unwrap();
    assert!(d.snapshots(&vm.id).await.unwrap().is_empty());

    // Pause and resume.
    let paused = d.power(&vm.id, PowerOp::Pause).await.unwrap();
    assert_eq!(paused.state, VmState::Paused);
    assert!(wait_event(&mut events, Duration::from_secs(1), state_event(&vm.id, VmState::Paused)).await.is_some());
    match d.exec(&vm.id, req(&["true"])).await {
        Err(HypervisorError::InvalidState { state: VmState::Paused, .. }) => {}
        other => panic!("exec in a paused VM: {other:?}"),
    }
    assert_eq!(d.power(&vm.id, PowerOp::Resume).await.unwrap().state, VmState::Running);

    // Suspend to disk and resume: files and processes survive.
    let out = run(d, &vm.id, "sleep 1000 >/dev/null 2>&1 & echo $!").await;
    let sleeper = out.stdout.trim().to_string();
    let pid_before = d.qemu_pid(&vm.id).unwrap().unwrap();
    let suspended = d.power(&vm.id, PowerOp::Suspend).await.unwrap();
    assert_eq!(suspended.state, VmState::Suspended);
    assert!(wait_event(&mut events, Duration::from_secs(1), state_event(&vm.id, VmState::Suspended)).await.is_some());
    assert!(vm.home.join("suspend.state").exists());
    assert!(!qemu_alive(pid_before, &vm.home), "QEMU still runs after suspend");
    assert_eq!(d.get(&vm.id).await.unwrap().state, VmState::Suspended);
    let resumed = d.power(&vm.id, PowerOp::Resume).await.unwrap();
    assert_eq!(resumed.state, VmState::Running);
    assert!(!vm.home.join("suspend.state").exists());
    let out =
        run(d, &vm.id, &format!("cat /tmp/mem /data/upload.txt | head -n 2; kill -0 {sleeper} && echo alive")).await;
    assert_eq!(out.stdout, "mem-before\nline 0\nalive\n");

    // Stop with ACPI: the guest powers off by itself.
    let stopped = d.power(&vm.id, PowerOp::Stop { force: false, timeout: Duration::from_secs(60) }).await.unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(qemu_processes_under(&vm.home).is_empty());
    assert!(!vm.home.join("qmp.sock").exists());

    // Delete: nothing left.
    d.delete(&vm.id).await.unwrap();
    assert!(!vm.home.exists());
    assert!(d.list().await.unwrap().is_empty());
    assert!(matches!(d.get(&vm.id).await, Err(HypervisorError::NotFound(_))));
    assert!(
        wait_event(&mut events, Duration::from_secs(1), |e| matches!(e, VmEvent::Removed { id } if *id == vm.id))
            .await
            .is_some()
    );
    assert!(qemu_processes_under(f.root.path()).is_empty());
}
