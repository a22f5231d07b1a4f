//! Every driver operation against the fake `prlctl`/`prlsrvctl` (real processes, real
//! files, real locks).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Fake, eventually, process_gone};
use hangar_hypervisor::{
    CloneSpec, ConfigChange, CreateSpec, ExecRequest, Hypervisor, HypervisorError, HypervisorKind, PowerOp,
    RegisterSpec, SnapshotOp, VmEvent, VmInfo, VmState,
};
use hangar_parallels::ParallelsDriver;

fn spec(name: &str, image: &std::path::Path) -> CreateSpec {
    CreateSpec {
        name: name.to_string(),
        image: image.to_path_buf(),
        cpus: 3,
        memory_mb: 3072,
        disk_bytes: Some(100 << 30),
        description: "made by a test".to_string(),
        owner: None,
        os: None,
    }
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    ExecRequest::program(argv, Duration::from_secs(30))
}

async fn running_vm(fake: &Fake, d: &ParallelsDriver, name: &str) -> VmInfo {
    let image = fake.make_vm(&format!("{name}-base"));
    let vm = d.create(spec(name, &image)).await.unwrap();
    d.power(&vm.id, PowerOp::Start).await.unwrap()
}

#[tokio::test]
async fn create_list_get_and_configure() {
    let fake = Fake::new();
    let d = fake.driver();
    assert_eq!(d.kind(), HypervisorKind::Parallels);
    let image = fake.make_vm("golden");

    let vm = d.create(spec("ci-1", &image)).await.unwrap();
    assert_eq!(vm.name, "ci-1");
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.cpus, 3);
    assert_eq!(vm.memory_mb, 3072);
    assert_eq!(vm.description, "made by a test");
    assert_eq!(vm.disk_virtual_bytes, 100 << 30);
    assert_eq!(vm.os, "ubuntu");
    assert_eq!(vm.home, fake.vm_home().join("ci-1.pvm"));
    assert!(vm.home.join("config.pvs").is_file());
    assert!(vm.disk_bytes > 0, "the bundle's size on disk is measured");
    assert_eq!(uuid::Uuid::parse_str(&vm.id).unwrap().get_version_num(), 4);

    // The image stays registered and untouched; both are listed.
    let all = d.list().await.unwrap();
    let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
    assert!(names.contains(&"golden") && names.contains(&"ci-1"), "{names:?}");

    assert_eq!(d.get(&vm.id).await.unwrap(), vm);
    assert_eq!(d.get("ci-1").await.unwrap().id, vm.id);
    assert_eq!(d.get(&format!("{{{}}}", vm.id)).await.unwrap().id, vm.id);
    assert!(matches!(d.get("nope").await, Err(HypervisorError::NotFound(n)) if n == "nope"));

    // Same name again: refused before anything is copied.
    assert!(matches!(d.create(spec("ci-1", &image)).await, Err(HypervisorError::AlreadyExists(_))));
    // Not a bundle.
    let not_bundle = fake.dir.path().join("nothing-here");
    assert!(matches!(d.create(spec("ci-2", &not_bundle)).await, Err(HypervisorError::InvalidInput(_))));

    let changed = d
        .configure(&vm.id, ConfigChange { cpus: Some(6), memory_mb: Some(8192), description: Some("new".into()) })
        .await
        .unwrap();
    assert_eq!((changed.cpus, changed.memory_mb, changed.description.as_str()), (6, 8192, "new"));
    // The fake's own view agrees (a separate process reads the state).
    let json = fake.ok(&["list", &vm.id, "-a", "-i", "--json"]);
    assert!(json.contains("\"size\": \"8192Mb\""), "{json}");

    let renamed = d.rename(&vm.id, "ci-renamed").await.unwrap();
    assert_eq!(renamed.name, "ci-renamed");
    assert!(matches!(d.rename(&vm.id, "golden").await, Err(HypervisorError::AlreadyExists(_))));
    assert!(matches!(d.rename(&vm.id, "a/b").await, Err(HypervisorError::InvalidInput(_))));
}

#[tokio::test]
async fn failed_create_leaves_nothing_behind() {
    let fake = Fake::new();
    let d = fake.driver();
    let image = fake.make_vm("golden");
    // 0 < cpus but more than the fake accepts: `set` fails after `register`.
    let mut bad = spec("too-big", &image);
    bad.cpus = 1000;
    let err = d.create(bad).await.unwrap_err();
    assert!(
        matches!(err, HypervisorError::CommandFailed { ref command, .. } if command.starts_with("prlctl set")),
        "{err}"
    );
    let folder = fake.vm_home().join("too-big.pvm");
    eventually("cleanup of the half-made VM", Duration::from_secs(10), || {
        !folder.exists() && !fake.ok(&["list", "-a", "--json"]).contains(&format!("\"{}\"", "too-big"))
    })
    .await;
    assert_eq!(d.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn power_cycle_and_invalid_states() {
    let fake = Fake::new();
    let d = fake.driver();
    let vm = running_vm(&fake, &d, "pw").await;
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.ip_addresses.len(), 1, "a running VM reports its IP");

    // Invalid states are refused with the current state named.
    match d.power(&vm.id, PowerOp::Start).await {
        Err(HypervisorError::InvalidState { operation: "start", state: VmState::Running, id }) => assert_eq!(id, vm.id),
        other => panic!("expected InvalidState, got {other:?}"),
    }
    let err = d.delete(&vm.id).await.unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidState { operation: "delete", state: VmState::Running, .. }), "{err}");
    assert!(err.to_string().contains("running"));
    assert!(matches!(
        d.configure(&vm.id, ConfigChange { cpus: Some(1), ..Default::default() }).await,
        Err(HypervisorError::InvalidState { operation: "configure", state: VmState::Running, .. })
    ));
    assert!(matches!(d.rename(&vm.id, "x").await, Err(HypervisorError::InvalidState { operation: "rename", .. })));
    // A description can change while running.
    let described =
        d.configure(&vm.id, ConfigChange { description: Some("busy".into()), ..Default::default() }).await.unwrap();
    assert_eq!(described.description, "busy");

    let steps: &[(PowerOp, VmState)] = &[
        (PowerOp::Pause, VmState::Paused),
        (PowerOp::Resume, VmState::Running),
        (PowerOp::Suspend, VmState::Suspended),
        (PowerOp::Start, VmState::Running),
        (PowerOp::Reset, VmState::Running),
        (PowerOp::Restart, VmState::Running),
        (PowerOp::Suspend, VmState::Suspended),
        (PowerOp::Resume, VmState::Running),
        (PowerOp::Stop { force: false, timeout: Duration::from_secs(30) }, VmState::Stopped),
        (PowerOp::Start, VmState::Running),
        (PowerOp::Kill, VmState::Stopped),
        (PowerOp::Start, VmState::Running),
        (PowerOp::Suspend, VmState::Suspended),
        (PowerOp::Stop { force: true, timeout: Duration::ZERO }, VmState::Stopped),
    ];
    for (op, want) in steps {
        let got = d.power(&vm.id, *op).await.unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert_eq!(got.state, *want, "after {op:?}");
        // The fake, asked separately, agrees.
        let short = fake.ok(&["list", &vm.id, "-a", "--json"]);
        assert!(short.contains(&format!("\"status\": \"{}\"", want.as_str())), "{op:?}: {short}");
    }
    assert!(d.get(&vm.id).await.unwrap().ip_addresses.is_empty(), "a stopped VM has no IP");
    for op in [PowerOp::Pause, PowerOp::Resume, PowerOp::Suspend, PowerOp::Reset, PowerOp::Restart, PowerOp::Kill] {
        assert!(
            matches!(d.power(&vm.id, op).await, Err(HypervisorError::InvalidState { state: VmState::Stopped, .. })),
            "{op:?} on a stopped VM"
        );
    }
    assert!(matches!(d.power("missing", PowerOp::Start).await, Err(HypervisorError::NotFound(_))));
}

#[tokio::test]
async fn exec_passes_env_stdin_workdir_and_exit_code() {
    let fake = Fake::new();
    let d = fake.driver();
    let vm = running_vm(&fake, &d, "ex").await;

    let mut req = exec_req(&["sh", "-c", "echo \"out:$GREETING\"; echo err >&2; exit 7"]);
    req.env.insert("GREETING".into(), "hello world 'quoted'".into());
    let out = d.exec(&vm.id, req).await.unwrap();
    assert_eq!(out.stdout, "out:hello world 'quoted'\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.exit_code, 7);

    // Arguments with spaces and shell characters arrive as single words.
    let out = d.exec(&vm.id, exec_req(&["printf", "[%s]", "a b", "$HOME", "*", ";"])).await.unwrap();
    assert_eq!(out.stdout, "[a b][$HOME][*][;]");
    assert_eq!(out.exit_code, 0);

    let mut shell = exec_req(&["echo one two | wc -w"]);
    shell.shell = true;
    assert_eq!(d.exec(&vm.id, shell).await.unwrap().stdout.trim(), "2");

    let mut stdin = exec_req(&["tr", "a-z", "A-Z"]);
    stdin.stdin = Some(b"from stdin".to_vec());
    assert_eq!(d.exec(&vm.id, stdin).await.unwrap().stdout, "FROM STDIN");

    let mut wd = exec_req(&["pwd"]);
    wd.working_dir = Some("/".into());
    assert_eq!(d.exec(&vm.id, wd).await.unwrap().stdout, "/\n");

    // The guest's environment is its own, not the agent's.
    let out = d.exec(&vm.id, exec_req(&["sh", "-c", "echo ${FAKE_PRL_STATE_DIR:-unset}"])).await.unwrap();
    assert_eq!(out.stdout, "unset\n");

    assert!(matches!(d.exec(&vm.id, exec_req(&[])).await, Err(HypervisorError::InvalidInput(_))));
    d.power(&vm.id, PowerOp::Kill).await.unwrap();
    assert!(matches!(
        d.exec(&vm.id, exec_req(&["true"])).await,
        Err(HypervisorError::InvalidState { operation: "exec", state: VmState::Stopped, .. })
    ));
}

#[tokio::test]
async fn upload_files_and_folders() {
    let fake = Fake::new();
    let d = fake.driver();
    let vm = running_vm(&fake, &d, "up").await;
    let local = fake.dir.path().join("payload.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();

    d.upload(&vm.id, &local, "incoming/nested/payload.bin").await.unwrap();
    let out = d.exec(&vm.id, exec_req(&["wc", "-c", "incoming/nested/payload.bin"])).await.unwrap();
    assert_eq!(out.stdout.split_whitespace().next(), Some("200000"));
    assert_eq!(std::fs::read(vm.home.join("guest/incoming/nested/payload.bin")).unwrap(), data);

    d.upload(&vm.id, &local, "into-dir/").await.unwrap();
    assert!(vm.home.join("guest/into-dir/payload.bin").is_file());

    let folder = fake.dir.path().join("tree");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::write(folder.join("a.txt"), "A").unwrap();
    std::fs::write(folder.join("sub/b.txt"), "B").unwrap();
    d.upload(&vm.id, &folder, "copied tree").await.unwrap();
    let out = d.exec(&vm.id, exec_req(&["cat", "copied tree/a.txt", "copied tree/sub/b.txt"])).await.unwrap();
    assert_eq!(out.stdout, "AB");

    assert!(matches!(d.upload(&vm.id, &fake.dir.path().join("missing"), "x").await, Err(HypervisorError::Io { .. })));
    d.power(&vm.id, PowerOp::Kill).await.unwrap();
    assert!(matches!(
        d.upload(&vm.id, &local, "x").await,
        Err(HypervisorError::InvalidState { operation: "upload", .. })
    ));
}

#[tokio::test]
async fn snapshots_create_list_revert_delete() {
    let fake = Fake::new();
    let d = fake.driver();
    let image = fake.make_vm("snap-base");
    let vm = d.create(spec("snap", &image)).await.unwrap();
    assert!(d.snapshots(&vm.id).await.unwrap().is_empty());

    let s1 = d
        .snapshot(&vm.id, SnapshotOp::Create { name: "cold".into(), description: "stopped state".into() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (s1.name.as_str(), s1.description.as_str(), s1.state, s1.current),
        ("cold", "stopped state", VmState::Stopped, true)
    );
    assert!(s1.created_at.is_some());
    d.power(&vm.id, PowerOp::Start).await.unwrap();
    let s2 = d
        .snapshot(&vm.id, SnapshotOp::Create { name: "warm".into(), description: String::new() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s2.parent.as_deref(), Some(s1.id.as_str()));
    assert_eq!(s2.state, VmState::Running);

    let list = d.snapshots(&vm.id).await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().find(|s| s.id == s2.id).unwrap().current);
    assert!(!list.iter().find(|s| s.id == s1.id).unwrap().current);

    // Reverting to a stopped-state snapshot stops the VM.
    d.snapshot(&vm.id, SnapshotOp::Revert { snapshot_id: s1.id.clone(), skip_resume: false }).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().state, VmState::Stopped);
    assert!(d.snapshots(&vm.id).await.unwrap().iter().find(|s| s.id == s1.id).unwrap().current);
    // Reverting to a running snapshot with skip_resume leaves it paused.
    d.snapshot(&vm.id, SnapshotOp::Revert { snapshot_id: format!("{{{}}}", s2.id), skip_resume: true }).await.unwrap();
    assert_eq!(d.get(&vm.id).await.unwrap().state, VmState::Paused);

    assert!(matches!(
        d.snapshot(&vm.id, SnapshotOp::Revert { snapshot_id: "nope".into(), skip_resume: false }).await,
        Err(HypervisorError::NotFound(_))
    ));
    // Deleting the parent without children keeps the child (re-parented).
    d.snapshot(&vm.id, SnapshotOp::Delete { snapshot_id: s1.id.clone(), delete_children: false }).await.unwrap();
    let left = d.snapshots(&vm.id).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, s2.id);
    assert_eq!(left[0].parent, None);

    let s3 =
        d.snapshot(&vm.id, SnapshotOp::Create { name: "c".into(), description: String::new() }).await.unwrap().unwrap();
    assert_eq!(s3.parent.as_deref(), Some(s2.id.as_str()));
    d.snapshot(&vm.id, SnapshotOp::Create { name: "d".into(), description: String::new() }).await.unwrap();
    d.snapshot(&vm.id, SnapshotOp::DeleteAll).await.unwrap();
    assert!(d.snapshots(&vm.id).await.unwrap().is_empty());
    assert!(matches!(
        d.snapshot(&vm.id, SnapshotOp::Delete { snapshot_id: s3.id, delete_children: true }).await,
        Err(HypervisorError::NotFound(_))
    ));
}

#[tokio::test]
async fn clone_linked_and_full() {
    let fake = Fake::new();
    let d = fake.driver();
    let image = fake.make_vm("tmpl-base");
    let src = d.create(spec("src", &image)).await.unwrap();
    std::fs::write(src.home.join("guest/marker"), "from the source").unwrap();

    let full = d.clone_vm(&src.id, CloneSpec { name: "full".into(), linked: false, destination: None }).await.unwrap();
    assert_ne!(full.id, src.id);
    assert_eq!(full.state, VmState::Stopped);
    assert_eq!((full.cpus, full.memory_mb), (src.cpus, src.memory_mb));
    assert_eq!(std::fs::read_to_string(full.home.join("guest/marker")).unwrap(), "from the source");
    assert!(d.snapshots(&src.id).await.unwrap().is_empty(), "a full clone needs no snapshot");

    let dst = fake.dir.path().join("elsewhere");
    std::fs::create_dir_all(&dst).unwrap();
    let linked = d
        .clone_vm(&src.name, CloneSpec { name: "linked".into(), linked: true, destination: Some(dst.clone()) })
        .await
        .unwrap();
    assert_eq!(linked.home, dst.join("linked.pvm"));
    // Parallels hangs a linked clone off a snapshot of the source, taking one if needed.
    assert_eq!(d.snapshots(&src.id).await.unwrap().len(), 1);

    assert!(matches!(
        d.clone_vm(&src.id, CloneSpec { name: "full".into(), linked: false, destination: None }).await,
        Err(HypervisorError::AlreadyExists(_))
    ));
    d.power(&src.id, PowerOp::Start).await.unwrap();
    assert!(matches!(
        d.clone_vm(&src.id, CloneSpec { name: "hot".into(), linked: false, destination: None }).await,
        Err(HypervisorError::InvalidState { operation: "clone", state: VmState::Running, .. })
    ));
    assert_eq!(d.list().await.unwrap().len(), 4);
}

#[tokio::test]
async fn register_unregister_delete() {
    let fake = Fake::new();
    let d = fake.driver();
    let image = fake.make_vm("reg-base");
    let vm = d.create(spec("reg", &image)).await.unwrap();

    d.unregister(&vm.id).await.unwrap();
    assert!(matches!(d.get(&vm.id).await, Err(HypervisorError::NotFound(_))));
    assert!(vm.home.join("config.pvs").is_file(), "unregister keeps the files");

    let back = d.register(&vm.home, RegisterSpec::default()).await.unwrap();
    assert_eq!(back.id, vm.id, "the bundle keeps its id");
    assert_eq!(back.name, "reg");
    assert!(matches!(d.register(&vm.home, RegisterSpec::default()).await, Err(HypervisorError::AlreadyExists(_))));

    d.unregister("reg").await.unwrap();
    let renamed = d
        .register(&vm.home, RegisterSpec { name: Some("reg-2".into()), owner: None, regenerate_id: true })
        .await
        .unwrap();
    assert_ne!(renamed.id, vm.id);
    assert_eq!(renamed.name, "reg-2");
    assert!(matches!(
        d.register(&fake.dir.path().join("no-bundle"), RegisterSpec::default()).await,
        Err(HypervisorError::InvalidInput(_))
    ));

    d.power(&renamed.id, PowerOp::Start).await.unwrap();
    assert!(matches!(
        d.unregister(&renamed.id).await,
        Err(HypervisorError::InvalidState { operation: "unregister", .. })
    ));
    d.power(&renamed.id, PowerOp::Kill).await.unwrap();
    d.delete(&renamed.id).await.unwrap();
    assert!(!vm.home.exists(), "delete removes the bundle");
    assert!(matches!(d.get(&renamed.id).await, Err(HypervisorError::NotFound(_))));
    assert!(matches!(d.delete(&renamed.id).await, Err(HypervisorError::NotFound(_))));
}

#[tokio::test]
async fn host_info_and_users() {
    let fake = Fake::new();
    let d = fake.driver();
    let host = d.host_info().await.unwrap();
    assert_eq!(host.hypervisor, HypervisorKind::Parallels);
    assert_eq!(host.version, "26.1.0-57287");
    assert!(host.licensed);
    assert_eq!(host.os_version, "15.5");
    assert!(host.cpu_count >= 1);
    assert!(host.memory_bytes > 0);
    assert!(host.disk_total_bytes >= host.disk_free_bytes && host.disk_total_bytes > 0);
    let users = d.users().await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].default_vm_home, fake.vm_home().display().to_string());
}

/// The host's CPUs, memory and CPU name come from `sysctl` (as the reference asks them);
/// the fake host's size is its `host.json`, and every tool of the fake reports it.
#[tokio::test]
async fn host_hardware_comes_from_sysctl_and_the_fake_host_has_the_size_it_is_given() {
    let fake = Fake::new();
    let machine_cpus = std::thread::available_parallelism().unwrap().get() as u32;
    let d = fake.driver();
    assert_eq!(d.host_info().await.unwrap().cpu_count, machine_cpus, "without host.json: the machine's");
    std::fs::write(fake.state.join("host.json"), r#"{"cpus": 37, "memory_mb": 98304, "cpu_brand": "Apple M9 Ultra"}"#)
        .unwrap();
    let host = d.host_info().await.unwrap();
    assert_eq!((host.cpu_count, host.memory_bytes), (37, 98304 << 20));
    assert_eq!(host.cpu_brand, "Apple M9 Ultra");
    // The fake's sysctl says the same to anyone who asks, as macOS's does.
    let out = std::process::Command::new(fake.bin.join("sysctl"))
        .args(["-n", "hw.ncpu", "hw.memsize"])
        .env("FAKE_PRL_STATE_DIR", &fake.state)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("37\n{}\n", 98304u64 << 20));
    let out = std::process::Command::new(fake.bin.join("sysctl"))
        .args(["hw.ncpu", "kern.nope"])
        .env("FAKE_PRL_STATE_DIR", &fake.state)
        .output()
        .unwrap();
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(1), "hw.ncpu: 37\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown oid 'kern.nope'"));
    // A host whose sysctl does not answer (or is missing) reports the machine it runs on.
    let mut cfg = fake.config();
    cfg.sysctl = fake.dir.path().join("no-such-sysctl");
    let host = ParallelsDriver::new(cfg).unwrap().host_info().await.unwrap();
    assert_eq!(host.cpu_count, machine_cpus);
    assert!(host.memory_bytes > 0 && host.memory_bytes != 98304 << 20);
}

#[tokio::test]
async fn garbled_output_is_a_parse_error_naming_the_command() {
    let fake = Fake::new();
    let image = fake.make_vm("g");
    let ok = fake.driver();
    let vm = ok.create(spec("garble", &image)).await.unwrap();

    let mut cfg = fake.config();
    cfg.env.insert("FAKE_PRL_GARBLE".into(), "list,snapshot-list,info".into());
    let d = ParallelsDriver::new(cfg).unwrap();
    match d.list().await {
        Err(HypervisorError::Parse { command, message }) => {
            assert_eq!(command, "prlctl list -a -i --json");
            assert!(!message.is_empty());
        }
        other => panic!("expected Parse, got {other:?}"),
    }
    match d.get(&vm.id).await {
        Err(HypervisorError::Parse { command, .. }) => {
            assert_eq!(command, format!("prlctl list {} -a -i --json", vm.id))
        }
        other => panic!("expected Parse, got {other:?}"),
    }
    match d.host_info().await {
        Err(e @ HypervisorError::Parse { .. }) => {
            assert!(e.to_string().contains("prlsrvctl info --json"), "{e}")
        }
        other => panic!("expected Parse, got {other:?}"),
    }

    let mut cfg = fake.config();
    cfg.env.insert("FAKE_PRL_GARBLE".into(), "snapshot-list,snapshot".into());
    let d = ParallelsDriver::new(cfg).unwrap();
    assert!(
        matches!(d.snapshots(&vm.id).await, Err(HypervisorError::Parse { command, .. }) if command.starts_with("prlctl snapshot-list"))
    );
    assert!(matches!(
        d.snapshot(&vm.id, SnapshotOp::Create { name: "x".into(), description: String::new() }).await,
        Err(HypervisorError::Parse { command, .. }) if command.starts_with("prlctl snapshot ")
    ));
}

#[tokio::test]
async fn hanging_command_times_out_and_leaves_no_process() {
    let fake = Fake::new();
    let mut cfg = fake.config();
    cfg.env.insert("FAKE_PRL_HANG".into(), "list".into());
    let timeout = Duration::from_millis(1500);
    cfg.command_timeout = timeout;
    cfg.kill_grace = Duration::from_millis(300);
    let d = ParallelsDriver::new(cfg).unwrap();

    let start = Instant::now();
    let err = d.list().await.unwrap_err();
    let took = start.elapsed();
    match &err {
        HypervisorError::Timeout { command, after } => {
            assert_eq!(command, "prlctl list -a -i --json");
            assert_eq!(*after, timeout);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(took >= timeout, "returned early: {took:?}");
    assert!(took < timeout + Duration::from_secs(2), "took {took:?}");

    // The fake and the child it started in its process group are all gone.
    let pids: Vec<u32> = std::fs::read_dir(fake.state.join("hung-pids"))
        .expect("the hung fake recorded its pids")
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "the fake and its child: {pids:?}");
    eventually("the hung processes to die", Duration::from_secs(5), || pids.iter().all(|p| process_gone(*p))).await;
}

#[tokio::test]
async fn concurrent_invocations_are_safe() {
    let fake = Fake::new();
    let d = fake.driver();
    let image = fake.make_vm("par-base");
    let creates = (0..6).map(|i| d.create(spec(&format!("par-{i}"), &image)));
    let made = futures_join(creates).await;
    for r in &made {
        assert!(r.is_ok(), "{r:?}");
    }
    let vm = made[0].as_ref().unwrap().clone();
    let sets = (0..8).map(|i| {
        let d = &d;
        let id = vm.id.clone();
        async move { d.configure(&id, ConfigChange { description: Some(format!("d{i}")), ..Default::default() }).await }
    });
    for r in futures_join(sets).await {
        r.unwrap();
    }
    assert_eq!(d.list().await.unwrap().len(), 7);
    assert!(d.get(&vm.id).await.unwrap().description.starts_with('d'));
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.collect();
    let mut out = Vec::new();
    // Poll all concurrently on this task.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

#[tokio::test]
async fn monitor_events_deliver_changes_made_by_other_invocations() {
    let fake = Fake::new();
    fake.make_vm("watched");
    let id = {
        let json = fake.ok(&["list", "watched", "-a", "-i", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v[0]["ID"].as_str().unwrap().to_string()
    };
    let mut cfg = fake.config();
    cfg.watch_events = true;
    cfg.reconcile_interval = Duration::from_secs(3600);
    let d = ParallelsDriver::new(cfg).unwrap();
    let mut rx = d.subscribe();

    // Wait until the monitor is live: poke the VM until an event about it arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    'ready: loop {
        assert!(Instant::now() < deadline, "monitor-events never delivered an event");
        n += 1;
        fake.ok(&["set", "watched", "--description", &format!("probe {n}")]);
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            if matches!(&ev, VmEvent::Updated { vm } | VmEvent::Added { vm } if vm.id == id) {
                break 'ready;
            }
        }
    }

    // A state change by a separate prlctl arrives within a second.
    let start = Instant::now();
    fake.ok(&["start", &id]);
    let got = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match rx.recv().await {
                Ok(VmEvent::StateChanged { id: eid, previous, current }) if eid == id => return (previous, current),
                Ok(_) => continue,
                Err(e) => panic!("event channel: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no StateChanged within 1s (waited {:?})", start.elapsed()));
    assert_eq!(got, (VmState::Stopped, VmState::Running));

    // Removal too.
    fake.ok(&["stop", &id, "--kill"]);
    fake.ok(&["unregister", &id]);
    let removed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(VmEvent::Removed { id: eid }) = rx.recv().await
                && eid == id
            {
                return;
            }
        }
    })
    .await;
    assert!(removed.is_ok(), "no Removed event");
}

#[tokio::test]
async fn reconcile_reports_drift() {
    let fake = Fake::new();
    fake.make_vm("drift");
    let mut cfg = fake.config();
    cfg.watch_events = true;
    // No live monitor (`monitor-events` hangs silently): only the reconcile sees changes.
    cfg.env.insert("FAKE_PRL_HANG".into(), "monitor-events".into());
    cfg.reconcile_interval = Duration::from_millis(200);
    let d = ParallelsDriver::new(cfg).unwrap();
    let mut rx = d.subscribe();

    // The first reconcile seeds silently; wait until one reports a change we make.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    'primed: loop {
        assert!(Instant::now() < deadline, "the reconcile never reported a change");
        n += 1;
        fake.ok(&["set", "drift", "--description", &format!("probe {n}")]);
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            if matches!(&ev, VmEvent::Updated { vm } if vm.name == "drift" && vm.description == format!("probe {n}")) {
                break 'primed;
            }
        }
    }

    fake.ok(&["start", "drift"]);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(until.into(), rx.recv())
            .await
            .expect("no StateChanged from the reconcile")
            .unwrap();
        if matches!(ev, VmEvent::StateChanged { previous: VmState::Stopped, current: VmState::Running, .. }) {
            break;
        }
    }
    fake.make_vm("newcomer");
    loop {
        let ev = tokio::time::timeout_at(until.into(), rx.recv()).await.expect("no Added for the newcomer").unwrap();
        if matches!(&ev, VmEvent::Added { vm } if vm.name == "newcomer") {
            break;
        }
    }
    fake.ok(&["delete", "newcomer"]);
    loop {
        let ev = tokio::time::timeout_at(until.into(), rx.recv()).await.expect("no Removed for the newcomer").unwrap();
        if matches!(ev, VmEvent::Removed { .. }) {
            break;
        }
    }
}

#[tokio::test]
async fn dead_monitor_is_restarted_with_backoff() {
    let fake = Fake::new();
    let log = fake.dir.path().join("calls.log");
    let mut cfg = fake.config();
    cfg.watch_events = true;
    cfg.reconcile_interval = Duration::from_secs(3600);
    cfg.monitor_backoff = (Duration::from_millis(50), Duration::from_millis(400));
    // Each `monitor-events` prints garbage and exits at once.
    cfg.env.insert("FAKE_PRL_GARBLE".into(), "monitor-events".into());
    cfg.env.insert("FAKE_PRL_LOG".into(), log.display().to_string());
    let started = Instant::now();
    let d = ParallelsDriver::new(cfg).unwrap();
    let count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("prlctl monitor-events --json"))
            .count()
    };
    eventually("monitor-events to be restarted 4 times", Duration::from_secs(20), || count() >= 4).await;
    // Backoff doubles from 50 ms: the fourth start comes at least 50+100+200 ms after the first.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(350), "4 starts in {took:?}: no backoff");
    drop(d);
}
