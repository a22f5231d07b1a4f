//! Several VMs at once, adoption by a new driver, external kills, state errors, clones,
//! stopped snapshots, register/unregister.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hangar_hypervisor::{
    CloneSpec, ConfigChange, Hypervisor, HypervisorError, PowerOp, RegisterSpec, SnapshotOp, VmEvent, VmState,
};
use hangar_qemu::QemuDriver;

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, HypervisorError>, expected: VmState) {
    match r {
        Err(HypervisorError::InvalidState { state, .. }) if state == expected => {}
        other => panic!("expected InvalidState({expected}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_vms_start_in_parallel_and_each_answers() {
    let _turn = VM_LOCK.lock().await;
    let f = fixture().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        let d = f.driver.clone();
        let image = f.image.clone();
        tasks.spawn(async move {
            let name = format!("par-{i}");
            let vm = boot(&d, &name, &image).await;
            let out = run(&d, &vm.id, &format!("echo {name} > /data/me; cat /data/me /data/golden")).await;
            assert_eq!(out.stdout, format!("{name}\ngolden-v1\n"));
            vm.id
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.push(r.unwrap());
    }
    let list = f.driver.list().await.unwrap();
    assert_eq!(list.len(), 4);
    assert!(list.iter().all(|v| v.state == VmState::Running));
    // Each VM writes its own overlay: none sees another's file.
    for id in &ids {
        let name = f.driver.get(id).await.unwrap().name;
        let out = run(&f.driver, id, "cat /data/me").await;
        assert_eq!(out.stdout.trim(), name);
    }
    assert_eq!(f.guard.pids().len(), 4);
    for id in &ids {
        f.driver.power(id, PowerOp::Kill).await.unwrap();
        f.driver.delete(id).await.unwrap();
    }
    assert!(qemu_processes_under(f.root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_driver_adopts_running_vms_and_notices_external_kills() {
    let _turn = VM_LOCK.lock().await;
    let f = fixture().await;
    let a = boot(&f.driver, "adopt-a", &f.image).await;
    let b = boot(&f.driver, "adopt-b", &f.image).await;
    run(&f.driver, &a.id, "echo kept > /tmp/kept").await;
    let pid_a = f.driver.qemu_pid(&a.id).unwrap().unwrap();
    let pid_b = f.driver.qemu_pid(&b.id).unwrap().unwrap();

    // QEMU is daemonized: not our child, not in our session.
    let stat = std::fs::read_to_string(format!("/proc/{pid_a}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let (ppid, sid): (i32, i32) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
    assert_ne!(ppid as u32, std::process::id(), "QEMU is a child of the agent");
    assert_ne!(sid, nix::unistd::getsid(None).unwrap().as_raw(), "QEMU shares the agent's session");

    // The agent goes away; a new one on the same folder takes over.
    let root = f.root.path().to_path_buf();
    drop(f.driver);
    let d = Arc::new(QemuDriver::new(config(&root)).await.unwrap());
    let list = d.list().await.unwrap();
    assert_eq!(list.len(), 2, "each VM exactly once: {list:?}");
    let mut names: Vec<_> = list.iter().map(|v| (v.name.clone(), v.state)).collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(names, vec![("adopt-a".into(), VmState::Running), ("adopt-b".into(), VmState::Running)]);
    assert_eq!(d.qemu_pid(&a.id).unwrap(), Some(pid_a), "adopted, not restarted");
    let out = run(&d, &a.id, "cat /tmp/kept").await;
    assert_eq!(out.stdout, "kept\n");
    run(&d, &b.id, "true").await;

    // A VM killed behind the driver's back shows as stopped, with an event, within a second.
    let mut events = d.subscribe();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_b), nix::sys::signal::Signal::SIGKILL).unwrap();
    let ev = wait_event(
        &mut events,
        Duration::from_secs(1),
        |e| matches!(e, VmEvent::StateChanged { id, current: VmState::Stopped, .. } if *id == b.id),
    )
    .await;
    assert!(ev.is_some(), "no StateChanged to stopped within 1 s of the kill");
    assert_eq!(d.get(&b.id).await.unwrap().state, VmState::Stopped);
    assert_eq!(d.list().await.unwrap().len(), 2);

    d.power(&a.id, PowerOp::Kill).await.unwrap();
    for id in [&a.id, &b.id] {
        d.delete(id).await.unwrap();
    }
    assert!(qemu_processes_under(&root).is_empty());
    assert!(d.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_the_state_forbids_are_refused_with_the_state() {
    let _turn = VM_LOCK.lock().await;
    let f = fixture().await;
    let d = &f.driver;
    let vm = d.create(spec("states", &f.image)).await.unwrap();
    assert_invalid(d.power(&vm.id, PowerOp::Pause).await, VmState::Stopped);
    assert_invalid(d.power(&vm.id, PowerOp::Resume).await, VmState::Stopped);
    assert_invalid(d.power(&vm.id, PowerOp::Suspend).await, VmState::Stopped);
    assert_invalid(d.power(&vm.id, PowerOp::Kill).await, VmState::Stopped);
    assert_invalid(
        d.power(&vm.id, PowerOp::Stop { force: false, timeout: Duration::from_secs(1) }).await,
        VmState::Stopped,
    );
    assert_invalid(d.exec(&vm.id, req(&["true"])).await, VmState::Stopped);
    let err = d.power(&vm.id, PowerOp::Pause).await.unwrap_err().to_string();
    assert!(err.contains("stopped"), "the message names the state: {err}");

    // Stopped: configuration changes are allowed.
    let changed = d
        .configure(&vm.id, ConfigChange { cpus: Some(2), memory_mb: Some(160), description: Some("changed".into()) })
        .await
        .unwrap();
    assert_eq!((changed.cpus, changed.memory_mb, changed.description.as_str()), (2, 160, "changed"));
    assert!(matches!(
        d.configure(&vm.id, ConfigChange { cpus: Some(0), ..Default::default() }).await,
        Err(HypervisorError::InvalidInput(_))
    ));
    let other = d.create(spec("other", &f.image)).await.unwrap();
    assert!(matches!(d.rename(&vm.id, "other").await, Err(HypervisorError::AlreadyExists(_))));
    assert!(matches!(d.create(spec("other", &f.image)).await, Err(HypervisorError::AlreadyExists(_))));
    assert_eq!(d.rename(&vm.id, "states-renamed").await.unwrap().name, "states-renamed");

    d.power(&vm.id, PowerOp::Start).await.unwrap();
    assert_invalid(d.power(&vm.id, PowerOp::Start).await, VmState::Running);
    assert_invalid(d.power(&vm.id, PowerOp::Resume).await, VmState::Running);
    assert_invalid(
        d.configure(&vm.id, ConfigChange { memory_mb: Some(256), ..Default::default() }).await,
        VmState::Running,
    );
    assert_invalid(d.rename(&vm.id, "nope").await, VmState::Running);
    assert_invalid(d.delete(&vm.id).await, VmState::Running);
    assert_invalid(
        d.clone_vm(&vm.id, CloneSpec { name: "c".into(), linked: true, destination: None }).await,
        VmState::Running,
    );
    // The description may change at any time.
    let info =
        d.configure(&vm.id, ConfigChange { description: Some("live".into()), ..Default::default() }).await.unwrap();
    assert_eq!(info.description, "live");
    d.power(&vm.id, PowerOp::Pause).await.unwrap();
    assert_invalid(d.power(&vm.id, PowerOp::Pause).await, VmState::Paused);
    d.power(&vm.id, PowerOp::Kill).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().state, VmState::Stopped);
    d.delete(&vm.id).await.unwrap();
    d.delete(&other.id).await.unwrap();
    assert!(qemu_processes_under(f.root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_snapshots_while_stopped_and_register() {
    let _turn = VM_LOCK.lock().await;
    let f = fixture().await;
    let d = &f.driver;
    let src = boot(d, "source", &f.image).await;
    run(d, &src.id, "echo from-source > /data/mark; sync").await;
    d.power(&src.id, PowerOp::Stop { force: false, timeout: Duration::from_secs(60) }).await.unwrap();

    // Disk-only snapshots while stopped.
    let s1 = d
        .snapshot(&src.id, SnapshotOp::Create { name: "cold".into(), description: String::new() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s1.state, VmState::Stopped);
    let s2 = d
        .snapshot(&src.id, SnapshotOp::Create { name: "cold2".into(), description: String::new() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s2.parent.as_deref(), Some(s1.id.as_str()));
    assert_eq!(d.snapshots(&src.id).await.unwrap().len(), 2);
    d.snapshot(&src.id, SnapshotOp::Delete { snapshot_id: s1.id.clone(), delete_children: true }).await.unwrap();
    assert!(d.snapshots(&src.id).await.unwrap().is_empty(), "children go with their parent");
    assert!(matches!(
        d.snapshot(&src.id, SnapshotOp::Delete { snapshot_id: "nope".into(), delete_children: false }).await,
        Err(HypervisorError::NotFound(_))
    ));

    // A linked clone keeps the base; a full clone stands alone. Both carry the source's data.
    let linked =
        d.clone_vm(&src.id, CloneSpec { name: "linked".into(), linked: true, destination: None }).await.unwrap();
    let full = d.clone_vm(&src.id, CloneSpec { name: "full".into(), linked: false, destination: None }).await.unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(linked.home.join("vm.json")).unwrap()).unwrap();
    assert!(cfg["disks"][0]["base"].as_str().unwrap().ends_with("disk.qcow2"));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(full.home.join("vm.json")).unwrap()).unwrap();
    assert!(cfg["disks"][0]["base"].is_null());
    assert!(linked.disk_bytes < full.disk_bytes, "linked {} vs full {}", linked.disk_bytes, full.disk_bytes);
    d.power(&linked.id, PowerOp::Start).await.unwrap();
    d.wait_for_agent(&linked.id, BOOT).await.unwrap();
    let out = run(d, &linked.id, "cat /data/mark /data/golden").await;
    assert_eq!(out.stdout, "from-source\ngolden-v1\n");
    d.power(&linked.id, PowerOp::Kill).await.unwrap();

    // Unregister keeps the files; register brings the VM back.
    d.unregister(&full.id).await.unwrap();
    assert!(full.home.join("disk.qcow2").exists());
    assert!(matches!(d.get(&full.id).await, Err(HypervisorError::NotFound(_))));
    let again = QemuDriver::new(config(f.root.path())).await.unwrap();
    assert!(again.get(&full.id).await.is_err(), "an unregistered VM stays unregistered for a new driver");
    drop(again);
    let back = d
        .register(
            &full.home,
            RegisterSpec { name: Some("full-again".into()), owner: Some("someone".into()), regenerate_id: false },
        )
        .await
        .unwrap();
    assert_eq!(
        (back.id.as_str(), back.name.as_str(), back.owner.as_deref()),
        (full.id.as_str(), "full-again", Some("someone"))
    );
    assert!(matches!(d.register(&full.home, RegisterSpec::default()).await, Err(HypervisorError::AlreadyExists(_))));

    for id in [&src.id, &linked.id, &full.id] {
        d.delete(id).await.unwrap();
    }
    assert!(d.list().await.unwrap().is_empty());
    assert!(qemu_processes_under(f.root.path()).is_empty());
}
