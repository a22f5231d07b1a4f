//! Warm pools at the service level: the scheduler over fake hosts and a `MemoryStore`, its
//! warm-pool pass run by hand (the leader loop runs the same pass every tick).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{linux_vm, t0, url};
use hangar_core::EventBus;
use hangar_core::audit::{AUDIT_COLLECTION, Actor};
use hangar_orchestrator::fake::{FakeConnector, FakeHost, FakeHostSpec};
use hangar_orchestrator::pools::{self, service_owner};
use hangar_orchestrator::*;
use hangar_store::{MemoryStore, Store};
use hangar_wire::{PoolImage, RunnerPool};

struct Fleet {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    connector: Arc<FakeConnector>,
    sched: Scheduler,
    actor: Actor,
}

async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(t0());
    let bus = EventBus::new(4096);
    let registry = Arc::new(HostRegistry::open(store.clone(), dir.path(), bus.clone(), Arc::new(clock)).await.unwrap());
    let connector = FakeConnector::new();
    let sched = Scheduler::new(registry, connector.clone(), bus, SchedulerConfig::default());
    let actor = Actor { user_id: "u1".into(), username: "alice".into(), via: "jwt".into(), ..Default::default() };
    Fleet { _dir: dir, store, connector, sched, actor }
}

impl Fleet {
    async fn add_host(&self, name: &str, spec: FakeHostSpec) -> Arc<FakeHost> {
        let fake = FakeHost::new(spec);
        self.connector.add(&url(name), fake.clone());
        let req = RegisterHost { name: Some(name.into()), url: format!("http://{name}:8080"), ..Default::default() };
        self.sched.register_host(&self.actor, req).await.unwrap();
        fake
    }

    async fn status(&self, pool: &str) -> hangar_wire::RunnerPoolStatus {
        let (p, _) = pools::get(self.store.as_ref(), pool).await.unwrap();
        self.sched.pool_status(&p).await.unwrap()
    }

    /// Runs passes until the pool shows `ready` warm VMs and none starting.
    async fn filled(&self, pool: &str, ready: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.sched.pools_pass().await.unwrap();
            let s = self.status(pool).await;
            if s.warm_ready == ready && s.warm_starting == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "pool {pool} never had {ready} ready warm VMs: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn warm_records(&self, pool: &str) -> Vec<OrchestratedVm> {
        let all = self.sched.list_vms().await.unwrap();
        all.into_iter().filter(|v| v.pool.as_ref().is_some_and(|m| m.warm && m.pool == pool)).collect()
    }
}

fn pool(name: &str, warm: u32, max_vms: u32) -> RunnerPool {
    RunnerPool {
        name: name.into(),
        labels: vec![name.into()],
        image: PoolImage { catalog_id: "ubuntu".into(), version: "latest".into(), architecture: "amd64".into() },
        cpus: 1,
        memory_mb: 1024,
        host_tags: vec![],
        max_vms,
        warm,
        job_timeout_secs: 600,
    }
}

/// A catalog whose `latest` the test moves.
struct Moving(Mutex<String>);

#[async_trait]
impl ImageVersions for Moving {
    async fn resolve(&self, image: &PoolImage) -> Result<String, String> {
        if image.version == "latest" { Ok(self.0.lock().unwrap().clone()) } else { Ok(image.version.clone()) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_fills_spread_a_claim_takes_one_at_once_and_it_refills_within_max_vms() {
    let f = fleet().await;
    let a = f.add_host("a", FakeHostSpec::linux(8, 16_384, 500_000)).await;
    let b = f.add_host("b", FakeHostSpec::linux(8, 16_384, 500_000)).await;
    pools::create(f.store.as_ref(), &f.actor, pool("linux", 2, 3), t0()).await.unwrap();
    f.filled("linux", 2).await;
    assert_eq!((a.vms().len(), b.vms().len()), (1, 1), "spread over both hosts");
    for vm in a.vms().into_iter().chain(b.vms()) {
        assert_eq!(vm.owner.as_deref(), Some(service_owner("linux").as_str()));
        assert_eq!(vm.state, hangar_hypervisor::VmState::Running);
    }
    let warm = f.warm_records("linux").await;
    assert!(warm.iter().all(|v| v.expires_at.is_none() && v.pool.as_ref().unwrap().ready), "{warm:?}");
    assert!(a.execs() + b.execs() >= 2, "each warm VM answered a no-op exec");

    // A claim takes a warm VM at once: renamed, owned by the caller, TTL started, audited.
    let creates = a.creates() + b.creates();
    let vm = f
        .sched
        .claim_from_pool(Caller::System, &f.actor, "linux", "job-1", "alice", Some(Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(a.creates() + b.creates(), creates, "no VM was created for the claim");
    assert!(warm.iter().any(|w| w.id == vm.id), "a warm VM was taken");
    assert_eq!((vm.name.as_str(), vm.owner.as_str()), ("job-1", "alice"));
    assert_eq!(vm.expires_at, Some(t0() + chrono::Duration::seconds(120)));
    let on_host = a.vms().into_iter().chain(b.vms()).find(|v| v.id == vm.id).unwrap();
    assert_eq!(on_host.name, "job-1", "renamed on its host");
    let view = f.sched.registry().get(&vm.host_id).unwrap();
    assert_eq!(view.vms.iter().find(|v| v.id == vm.id).unwrap().owner.as_deref(), Some("alice"));
    let audits = f.store.list(AUDIT_COLLECTION).await.unwrap();
    assert!(audits.iter().any(|r| r.value["action"] == "orchestrator.pool.claim" && r.value["target_id"] == vm.id));
    assert_eq!(f.status("linux").await.claimed, 1);

    // A replacement starts behind it: 2 warm + 1 claimed = max_vms 3.
    f.filled("linux", 2).await;
    // Another claim leaves 1 warm + 2 claimed; the pool stays at max_vms, so no refill.
    f.sched.claim_from_pool(Caller::System, &f.actor, "linux", "job-2", "alice", None).await.unwrap();
    f.filled("linux", 1).await;
    assert_eq!(f.sched.list_vms().await.unwrap().len(), 3, "max_vms caps warm + claimed");
    // The last warm one, then none: at max_vms a claim is refused rather than over the cap.
    f.sched.claim_from_pool(Caller::System, &f.actor, "linux", "job-3", "alice", None).await.unwrap();
    let e = f.sched.claim_from_pool(Caller::System, &f.actor, "linux", "job-4", "alice", None).await.unwrap_err();
    assert!(matches!(e, OrchestratorError::Conflict(ref m) if m.contains("maximum of 3")), "{e}");
    // Deleting a claimed VM makes room: a cold claim creates one and answers once exec-ready.
    f.sched.delete_vm(&f.actor, &vm.id).await.unwrap();
    let cold = f.sched.claim_from_pool(Caller::System, &f.actor, "linux", "job-5", "alice", None).await.unwrap();
    assert_eq!((cold.name.as_str(), cold.owner.as_str()), ("job-5", "alice"));
    assert!(!cold.pool.as_ref().unwrap().warm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_full_of_warm_vms_still_admits_a_real_create() {
    let f = fleet().await;
    let a = f.add_host("a", FakeHostSpec::linux(4, 8192, 500_000)).await;
    pools::create(f.store.as_ref(), &f.actor, pool("linux", 4, 4), t0()).await.unwrap();
    f.filled("linux", 4).await;
    assert_eq!(a.resources().available.cpu, 0, "the warm VMs fill the host");
    // Without warm VMs to evict this would be "no capacity"; two warm VMs make room.
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("real", 2, 2048)).await.unwrap();
    assert_eq!(vm.host_id, f.sched.registry().get("a").unwrap().id);
    assert_eq!(f.warm_records("linux").await.len(), 2, "only as many warm VMs as needed were evicted");
    assert_eq!(a.refused_oversubscription(), 0);
    let audits = f.store.list(AUDIT_COLLECTION).await.unwrap();
    assert_eq!(audits.iter().filter(|r| r.value["action"] == "orchestrator.pool.evict").count(), 2);
    // The pool cannot refill over the real VM: its fills fail for room and evict nothing.
    f.sched.pools_pass().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.status("linux").await.warm_starting > 0 {
        assert!(Instant::now() < deadline, "the fills never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f.sched.vm(&vm.id).await.is_ok(), "the real VM stays");
    assert!(f.status("linux").await.last_error.is_some_and(|e| e.contains("No host")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_vms_are_recycled_when_latest_moves_when_the_pool_is_edited_and_when_it_is_deleted() {
    let f = fleet().await;
    let a = f.add_host("a", FakeHostSpec::linux(8, 16_384, 500_000)).await;
    let catalog = Arc::new(Moving(Mutex::new("1.0.0".into())));
    f.sched.set_image_versions(catalog.clone());
    pools::create(f.store.as_ref(), &f.actor, pool("linux", 2, 4), t0()).await.unwrap();
    f.filled("linux", 2).await;
    let first: Vec<String> = f.warm_records("linux").await.into_iter().map(|v| v.id).collect();
    assert!(f.warm_records("linux").await.iter().all(|v| v.pool.as_ref().unwrap().version == "1.0.0"));
    assert_eq!(f.status("linux").await.resolved_version.as_deref(), Some("1.0.0"));
    // A claimed VM is the user's: recycling leaves it alone.
    let claimed = f.sched.claim_from_pool(Caller::System, &f.actor, "linux", "job", "alice", None).await.unwrap();
    f.filled("linux", 2).await;

    *catalog.0.lock().unwrap() = "1.1.0".into();
    let pass = f.sched.pools_pass().await.unwrap();
    assert_eq!(pass.recycled.len(), 2, "{pass:?}");
    f.filled("linux", 2).await;
    let second = f.warm_records("linux").await;
    assert!(second.iter().all(|v| v.pool.as_ref().unwrap().version == "1.1.0" && !first.contains(&v.id)));
    assert!(f.sched.vm(&claimed.id).await.is_ok(), "the claimed VM stays");

    // An edit (more memory) recycles too: the new warm VMs have the new size.
    let edited = RunnerPool { memory_mb: 2048, ..pool("linux", 2, 4) };
    pools::update(f.store.as_ref(), &f.actor, "linux", edited, t0()).await.unwrap();
    let pass = f.sched.pools_pass().await.unwrap();
    assert_eq!(pass.recycled.len(), 2, "{pass:?}");
    f.filled("linux", 2).await;
    for v in f.warm_records("linux").await {
        assert_eq!((v.resources.memory_mb, v.pool.unwrap().generation), (2048, 2));
    }

    // Deleting the pool deletes its warm VMs; the claimed one stays with its user.
    pools::delete(f.store.as_ref(), &f.actor, "linux").await.unwrap();
    let pass = f.sched.pools_pass().await.unwrap();
    assert_eq!((pass.recycled.len(), pass.started), (2, 0));
    assert_eq!(a.vms().iter().map(|v| v.id.clone()).collect::<Vec<_>>(), vec![claimed.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_vm_is_claimable_only_once_its_no_op_exec_succeeds() {
    let f = fleet().await;
    let a = f.add_host("a", FakeHostSpec::linux(8, 16_384, 500_000)).await;
    a.set_exec_broken(true);
    pools::create(f.store.as_ref(), &f.actor, pool("linux", 1, 2), t0()).await.unwrap();
    f.sched.pools_pass().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.execs() < 2 {
        assert!(Instant::now() < deadline, "the readiness check never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = f.status("linux").await;
    assert_eq!((s.warm_ready, s.warm_starting), (0, 1), "booting, not ready: {s:?}");
    a.set_exec_broken(false);
    f.filled("linux", 1).await;
}
