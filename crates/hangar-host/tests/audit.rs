//! A VM change and its audit entry go together: when the store refuses the audit entry,
//! the change is not made (the host answers 503 and the VM is as it was). The host runs on
//! the Parallels driver over the fake `prlctl`; the store is the in-memory engine behind
//! `FaultyStore`, switched to refuse writes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::audit::{AUDIT_COLLECTION, Actor};
use hangar_core::claims::SUPER_USER_ROLE;
use hangar_core::{AuthMethod, Classify, ErrorKind, EventBus, Principal};
use hangar_host::{CreateRequest, DriverChoice, Host, HostConfig, HostError, ImageSource, Jobs};
use hangar_hypervisor::{Hypervisor, PowerOp, VmState};
use hangar_parallels::{ParallelsConfig, ParallelsDriver};
use hangar_store::{FaultyStore, MemoryStore, Store};
use hangar_wire::VmCall;

/// The fake `prlctl`, built next to this test's binary when it is not there yet.
fn fake_prlctl() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let fake = target.join("hangar-fake-prlctl");
    if !fake.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo).args(["build", "-p", "hangar-parallels", "--bin", "hangar-fake-prlctl"]).status();
        assert!(st.unwrap().success(), "building the fake prlctl");
    }
    assert!(fake.exists(), "{} missing", fake.display());
    fake
}

struct Rig {
    _dir: tempfile::TempDir,
    host: Arc<Host>,
    driver: Arc<dyn Hypervisor>,
    store: Arc<FaultyStore>,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (bin, state, images) = (dir.path().join("bin"), dir.path().join("state"), dir.path().join("images"));
    for d in [&bin, &state, &images] {
        std::fs::create_dir_all(d).unwrap();
    }
    let fake = fake_prlctl();
    std::os::unix::fs::symlink(&fake, bin.join("prlctl")).unwrap();
    std::os::unix::fs::symlink(&fake, bin.join("prlsrvctl")).unwrap();
    let prlctl = |args: &[&str]| {
        let out = Command::new(bin.join("prlctl")).args(args).env("FAKE_PRL_STATE_DIR", &state).output().unwrap();
        assert!(out.status.success(), "prlctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    prlctl(&["create", "golden", "--distribution", "ubuntu"]);
    prlctl(&["unregister", "golden"]);
    std::fs::rename(state.join("Parallels/golden.pvm"), images.join("golden.pvm")).unwrap();

    let mut cfg = ParallelsConfig::with_tools_in(&bin);
    cfg.env.insert("FAKE_PRL_STATE_DIR".into(), state.display().to_string());
    cfg.command_timeout = Duration::from_secs(60);
    cfg.watch_events = false;
    cfg.assume_root = Some(false);
    let driver: Arc<dyn Hypervisor> = Arc::new(ParallelsDriver::new(cfg).unwrap());
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
    let dyn_store: Arc<dyn Store> = store.clone();
    let bus = EventBus::new(64);
    let jobs = Jobs::open(dyn_store.clone(), "host_jobs", bus.clone()).await.unwrap();
    let config = HostConfig {
        driver: DriverChoice::Parallels,
        vms_dir: dir.path().join("vms"),
        images_dir: images,
        prlctl: None,
        prlsrvctl: None,
        qemu_binary: None,
        acceleration: Default::default(),
        qemu_bridge: None,
        reserved_cpu: 0,
        reserved_memory_mb: 0,
        reserved_disk_mb: 0,
        upload_root: None,
        helpers_dir: None,
    };
    let host = Host::new(driver.clone(), jobs, dyn_store, bus, config);
    Rig { _dir: dir, host, driver, store }
}

fn root() -> (Principal, Actor) {
    let p = Principal {
        user_id: "u-root".into(),
        username: "root".into(),
        email: "root@localhost".into(),
        roles: [SUPER_USER_ROLE.to_string()].into(),
        claims: Default::default(),
        method: AuthMethod::Jwt,
    };
    let actor =
        Actor { user_id: p.user_id.clone(), username: p.username.clone(), via: "jwt".into(), ..Default::default() };
    (p, actor)
}

fn create(name: &str) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        image: ImageSource::Local("golden.pvm".into()),
        cpus: Some(1),
        memory_mb: Some(512),
        disk_bytes: None,
        owner: None,
        host_user: None,
        description: String::new(),
        start: true,
    }
}

fn refused(e: &HostError) {
    assert!(matches!(e, HostError::Store(_)), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

async fn audit_actions(store: &FaultyStore) -> Vec<String> {
    store
        .list(AUDIT_COLLECTION)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.value["action"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_audit_entry_refuses_the_change() {
    let r = rig().await;
    let (p, actor) = root();
    let vm = r.host.create_for(&p, &actor, create("ci-1")).await.unwrap();
    assert_eq!(vm.state, VmState::Running);
    assert!(audit_actions(&r.store).await.contains(&"vm.create".to_string()));

    r.store.refuse_commits_touching(AUDIT_COLLECTION, true);
    // A power change: refused before the hypervisor is asked; the VM still runs.
    let stop = VmCall::Power(PowerOp::Stop { force: true, timeout: Duration::from_secs(5) });
    refused(&r.host.run(&p, &actor, &vm.id, stop.clone()).await.unwrap_err());
    assert_eq!(r.driver.get(&vm.id).await.unwrap().state, VmState::Running);
    // A delete: the VM is still there.
    refused(&r.host.run(&p, &actor, &vm.id, VmCall::Delete { force: true }).await.unwrap_err());
    assert!(r.driver.get(&vm.id).await.is_ok());
    // A create: the VM made before the owner record and its audit entry were refused is
    // removed again.
    refused(&r.host.create_for(&p, &actor, create("ci-2")).await.unwrap_err());
    let names: Vec<String> = r.driver.list().await.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["ci-1".to_string()]);
    // Reads need no audit entry and still work.
    assert!(r.host.run(&p, &actor, &vm.id, VmCall::Status).await.is_ok());
    assert!(!audit_actions(&r.store).await.iter().any(|a| a == "vm.stop" || a == "vm.delete"));

    // Once the store takes writes again, the same change goes through, audited.
    r.store.heal();
    r.host.run(&p, &actor, &vm.id, stop).await.unwrap();
    assert_eq!(r.driver.get(&vm.id).await.unwrap().state, VmState::Stopped);
    assert!(audit_actions(&r.store).await.contains(&"vm.stop".to_string()));
}
