//! Leader work under the store's leader lease: two in-process replicas (each its own
//! registry, scheduler and lease handle over one store, reaching the same fake host) never
//! both run the leader work across take-overs, and a replica paused past its lease has its
//! fenced writes refused. Tokio's paused time drives the lease; the store is in memory.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hangar_core::EventBus;
use hangar_core::audit::Actor;
use hangar_orchestrator::fake::{FakeConnector, FakeHost, FakeHostSpec};
use hangar_orchestrator::*;
use hangar_store::{FaultyStore, Lease, LeaseConfig, MemoryStore, Role, Store, StoreError};
use tokio::sync::watch;

fn t0() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&chrono::Utc)
}

fn lease_config() -> LeaseConfig {
    LeaseConfig { duration: Duration::from_secs(4), renew_every: Duration::from_secs(1), sole_process: false }
}

struct Replica {
    sched: Scheduler,
}

/// A replica: its own registry (read from the shared store, with the shared sealing key)
/// and scheduler, reaching the one fake host through its own connector.
/// `dir` holds the secrets they share (the key that seals host credentials).
async fn replica(store: Arc<dyn Store>, dir: &std::path::Path, clock: &ManualClock, host: &Arc<FakeHost>) -> Replica {
    let bus = EventBus::new(1024);
    let registry = Arc::new(HostRegistry::open(store, dir, bus.clone(), Arc::new(clock.clone())).await.unwrap());
    let connector = FakeConnector::new();
    connector.add("http://h0:8080/api", host.clone());
    let sched = Scheduler::new(registry, connector, bus, SchedulerConfig::default());
    Replica { sched }
}

fn actor() -> Actor {
    Actor { user_id: "u1".into(), username: "alice".into(), via: "jwt".into(), ..Default::default() }
}

async fn register(sched: &Scheduler) -> Host {
    sched
        .register_host(
            &actor(),
            RegisterHost {
                name: Some("h0".into()),
                url: "http://h0:8080".into(),
                credentials: Some(HostCredentials::Basic { username: "admin".into(), password: "pw".into() }),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

fn vm(name: &str, ttl: Option<Duration>) -> CreateVm {
    CreateVm {
        name: name.into(),
        image: "ubuntu".into(),
        version: Some("24.04".into()),
        architecture: "amd64".into(),
        os: Some(Os::Linux),
        cpu: Some(1),
        memory_mb: Some(512),
        owner: "u1".into(),
        start: true,
        ttl,
        ..Default::default()
    }
}

/// Waits (in paused time) until `f` holds, failing after `deadline` of virtual time.
async fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn leads(s: &Scheduler) -> bool {
    matches!(s.leadership(), Leadership::Leader(_))
}

#[tokio::test(start_paused = true)]
async fn two_replicas_never_both_run_leader_work_across_takeovers() {
    let shared: Arc<dyn Store> = Arc::new(MemoryStore::new());
    // Each replica reaches the store through its own switch, to cut it off alone.
    let (store_a, store_b) = (Arc::new(FaultyStore::new(shared.clone())), Arc::new(FaultyStore::new(shared.clone())));
    let clock = ManualClock::new(t0());
    let secrets = tempfile::tempdir().unwrap();
    let host = FakeHost::new(FakeHostSpec::linux(8, 16_384, 100_000));
    let a = replica(store_a.clone(), secrets.path(), &clock, &host).await;
    register(&a.sched).await;
    let b = replica(store_b.clone(), secrets.path(), &clock, &host).await;
    assert_eq!(b.sched.registry().len(), 1, "the second replica reads the host from the store");

    let lease_a = Arc::new(Lease::new(store_a.clone(), "leader", "replica-a", lease_config()).unwrap());
    let lease_b = Arc::new(Lease::new(store_b.clone(), "leader", "replica-b", lease_config()).unwrap());
    let (task_a, task_b) = (lease_a.spawn(), lease_b.spawn());
    let every = BackgroundIntervals {
        tick: Duration::from_millis(500),
        check: Duration::from_millis(500),
        reap: Duration::from_secs(2),
    };
    let _work_a = a.sched.lead(every, task_a.role());
    let _work_b = b.sched.lead(every, task_b.role());

    // A counter of replicas running leader work, fed by each replica's role changes, and a
    // sampler of the schedulers' own state: neither may ever see two.
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    for mut role in [task_a.role(), task_b.role()] {
        let (running, most) = (running.clone(), most.clone());
        tokio::spawn(async move {
            let mut leading = false;
            loop {
                let now = role.borrow_and_update().fence().is_some();
                if now != leading {
                    if now {
                        let n = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                    } else {
                        running.fetch_sub(1, Ordering::SeqCst);
                    }
                    leading = now;
                }
                if role.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let both = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (sa, sb, both) = (a.sched.clone(), b.sched.clone(), both.clone());
        tokio::spawn(async move {
            loop {
                if leads(&sa) && leads(&sb) {
                    both.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let limit = Duration::from_secs(60);
    wait_until(limit, "one replica leads", || leads(&a.sched) || leads(&b.sched)).await;
    let mut tokens = Vec::new();
    // Three take-overs: cut the leader off the store, the other takes over; then heal.
    for _ in 0..3 {
        let (leader, leader_store, other) =
            if leads(&a.sched) { (&a.sched, &store_a, &b.sched) } else { (&b.sched, &store_b, &a.sched) };
        tokens.push(leader.leadership().fence().unwrap().token());
        leader_store.refuse_commits(true);
        wait_until(limit, "the cut-off leader stops", || !leads(leader)).await;
        wait_until(limit, "the other replica takes over", || leads(other)).await;
        leader_store.heal();
        // The healed ex-leader stays a follower while the new leader renews.
        tokio::time::sleep(lease_config().duration * 2).await;
        assert!(!leads(leader) && leads(other), "a renewed lease moved");
    }
    sampler.abort();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "fencing tokens grow: {tokens:?}");
    assert_eq!(most.load(Ordering::SeqCst), 1, "at most one replica ran leader work at a time");
    assert_eq!(both.load(Ordering::SeqCst), 0, "the schedulers were never both leading");
    task_a.shutdown().await;
    task_b.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_replica_paused_past_its_lease_has_its_fenced_writes_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(t0());
    let secrets = tempfile::tempdir().unwrap();
    let host = FakeHost::new(FakeHostSpec::linux(8, 16_384, 100_000));
    let a = replica(store.clone(), secrets.path(), &clock, &host).await;
    let h = register(&a.sched).await;
    let b = replica(store.clone(), secrets.path(), &clock, &host).await;
    let short = a.sched.create_vm(Caller::System, &actor(), vm("short", Some(Duration::from_secs(60)))).await.unwrap();

    // A leads. Its role stays "leader" from here on, as for a process that was paused (it
    // never saw its lease go): its lease task is not running.
    let lease_a = Lease::new(store.clone(), "leader", "replica-a", lease_config()).unwrap();
    let fence_a = lease_a.try_acquire().await.unwrap().unwrap();
    let (_role_a, role_rx_a) = watch::channel(Role::Leader(fence_a.clone()));
    let every = BackgroundIntervals {
        tick: Duration::from_secs(3600),
        check: Duration::from_secs(3600),
        reap: Duration::from_secs(3600),
    };
    let _work_a = a.sched.lead(every, role_rx_a);
    wait_until(Duration::from_secs(5), "A leads", || leads(&a.sched)).await;

    // B watches the lease unchanged for a whole period and takes it over.
    let lease_b = Lease::new(store.clone(), "leader", "replica-b", lease_config()).unwrap();
    assert!(lease_b.try_acquire().await.unwrap().is_none());
    tokio::time::advance(lease_config().duration).await;
    let fence_b = lease_b.try_acquire().await.unwrap().expect("B takes over an unrenewed lease");
    assert!(fence_b.token() > fence_a.token());
    assert!(leads(&a.sched), "the paused ex-leader still believes it leads");

    // A resumes: its reaper claims the expired VM with its fence and is refused, before its
    // host is asked anything.
    clock.advance(Duration::from_secs(120));
    let report = a.sched.reap().await.unwrap();
    assert!(report.deleted.is_empty(), "{report:?}");
    assert_eq!(report.refused, vec![short.id.clone()]);
    assert_eq!(host.vms().len(), 1, "the host was not asked to delete");
    assert!(a.sched.vm(&short.id).await.is_ok(), "the record is still there");
    // Its health status write (a host going unhealthy) is refused too.
    host.set_down(true);
    let check = a.sched.check_host(&h.id).await;
    assert!(
        matches!(check, Err(OrchestratorError::Store(StoreError::Conflict(_)))),
        "the ex-leader's health write landed: {check:?}"
    );
    host.set_down(false);
    // And its enrollment-token purge.
    let purge = a.sched.registry().purge_expired_tokens_fenced(Some(&fence_a)).await;
    assert!(purge.is_ok(), "nothing to purge writes nothing: {purge:?}");

    // B, the real leader, reaps it.
    let (_role_b, role_rx_b) = watch::channel(Role::Leader(fence_b));
    let _work_b = b.sched.lead(every, role_rx_b);
    wait_until(Duration::from_secs(5), "B leads", || leads(&b.sched)).await;
    // B's leader work follows the host's events: it hears from it.
    wait_until(Duration::from_secs(30), "B sees the host healthy", || {
        b.sched.registry().get(&h.id).unwrap().state == HostState::Healthy
    })
    .await;
    let report = b.sched.reap().await.unwrap();
    assert_eq!(report.deleted, vec![short.id.clone()], "{report:?}");
    assert!(host.vms().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_follower_writes_no_health_status() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(t0());
    let secrets = tempfile::tempdir().unwrap();
    let host = FakeHost::new(FakeHostSpec::linux(8, 16_384, 100_000));
    let a = replica(store.clone(), secrets.path(), &clock, &host).await;
    let h = register(&a.sched).await;
    let before = store.get("orchestrator_hosts", &h.id).await.unwrap().map(|r| r.revision);
    let (_role, rx) = watch::channel(Role::Follower);
    let every = BackgroundIntervals {
        tick: Duration::from_millis(100),
        check: Duration::from_millis(100),
        reap: Duration::from_millis(100),
    };
    let _work = a.sched.lead(every, rx);
    host.set_down(true);
    // The follower's own check sees the host down in memory, but writes nothing.
    a.sched.check_host(&h.id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(store.get("orchestrator_hosts", &h.id).await.unwrap().map(|r| r.revision), before);
    assert_eq!(a.sched.leadership(), Leadership::Follower);
}
