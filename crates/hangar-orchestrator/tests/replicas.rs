//! Several replicas over one store place exactly: two in-process replicas (each its own
//! registry, ledger and scheduler over one store, reaching the same fake hosts), creating
//! at once, place exactly as many VMs as one replica alone, and no host is ever asked for
//! more than it has. The store is in memory; the replicas share it as they share a SQL
//! database.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hangar_core::EventBus;
use hangar_core::audit::Actor;
use hangar_orchestrator::fake::{FakeConnector, FakeHost, FakeHostSpec};
use hangar_orchestrator::*;
use hangar_store::{Lease, LeaseConfig, MemoryStore, Role, Store};
use tokio::sync::watch;

const URLS: [&str; 2] = ["http://h0:8080", "http://h1:8080"];

fn t0() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&chrono::Utc)
}

fn actor() -> Actor {
    Actor { user_id: "u1".into(), username: "alice".into(), via: "jwt".into(), ..Default::default() }
}

fn hosts() -> Vec<Arc<FakeHost>> {
    URLS.iter().map(|_| FakeHost::new(FakeHostSpec::linux(4, 8_192, 1_000_000))).collect()
}

async fn scheduler(
    store: Arc<dyn Store>,
    dir: &std::path::Path,
    clock: &ManualClock,
    hosts: &[Arc<FakeHost>],
) -> Scheduler {
    let bus = EventBus::new(1024);
    let registry = Arc::new(HostRegistry::open(store, dir, bus.clone(), Arc::new(clock.clone())).await.unwrap());
    let connector = FakeConnector::new();
    for (url, host) in URLS.iter().zip(hosts) {
        connector.add(&format!("{url}/api"), host.clone());
    }
    Scheduler::new(registry, connector, bus, SchedulerConfig::default())
}

async fn register_all(sched: &Scheduler) -> Vec<Host> {
    let mut out = Vec::new();
    for (i, url) in URLS.iter().enumerate() {
        let req = RegisterHost {
            name: Some(format!("h{i}")),
            url: (*url).into(),
            credentials: Some(HostCredentials::Basic { username: "admin".into(), password: "pw".into() }),
            ..Default::default()
        };
        out.push(sched.register_host(&actor(), req).await.unwrap());
    }
    out
}

fn vm(name: String) -> CreateVm {
    CreateVm {
        name,
        image: "ubuntu".into(),
        version: Some("24.04".into()),
        architecture: "amd64".into(),
        os: Some(Os::Linux),
        cpu: Some(1),
        memory_mb: Some(2_048),
        owner: "u1".into(),
        start: true,
        ..Default::default()
    }
}

async fn wait_until(deadline: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What keeps two replicas' background work running.
type Work = (scheduler::Background, scheduler::Background, watch::Sender<Role>, watch::Sender<Role>);

/// Two replicas over `store`: A registers the hosts and leads (it follows them), B follows
/// and reads the fleet from the store; returned once B sees both hosts healthy.
async fn two_replicas(
    store: &Arc<dyn Store>,
    secrets: &std::path::Path,
    clock: &ManualClock,
    fleet: &[Arc<FakeHost>],
) -> (Scheduler, Scheduler, Work) {
    let a = scheduler(store.clone(), secrets, clock, fleet).await;
    let registered = register_all(&a).await;
    let b = scheduler(store.clone(), secrets, clock, fleet).await;
    a.share_store("replica-a");
    b.share_store("replica-b");
    assert!(a.shares_store() && b.shares_store());
    let lease = Lease::new(
        store.clone(),
        "leader",
        "replica-a",
        LeaseConfig { duration: Duration::from_secs(30), renew_every: Duration::from_secs(1), sole_process: false },
    )
    .unwrap();
    let fence = lease.try_acquire().await.unwrap().unwrap();
    let (lead_a, rx_a) = watch::channel(Role::Leader(fence));
    let (lead_b, rx_b) = watch::channel(Role::Follower);
    let every = BackgroundIntervals {
        tick: Duration::from_millis(50),
        check: Duration::from_millis(200),
        reap: Duration::from_secs(3600),
    };
    let work_a = a.lead(every, rx_a);
    let work_b = b.lead(every, rx_b);
    wait_until(Duration::from_secs(10), "the follower sees both hosts healthy", async || {
        registered.iter().all(|h| b.registry().get(&h.id).is_ok_and(|v| v.state == HostState::Healthy))
    })
    .await;
    (a, b, (work_a, work_b, lead_a, lead_b))
}

/// How many of these VMs one replica alone places on the hosts, one after the other.
async fn room_for_one_replica() -> usize {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let secrets = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let fleet = hosts();
    let s = scheduler(store, secrets.path(), &clock, &fleet).await;
    register_all(&s).await;
    let mut n = 0;
    while s.create_vm(Caller::System, &actor(), vm(format!("solo-{n}"))).await.is_ok() {
        n += 1;
        assert!(n < 1000, "no end to the room");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_creating_at_once_never_oversubscribe() {
    let room = room_for_one_replica().await;
    assert!(room >= 4, "the fleet holds a few VMs: {room}");

    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let secrets = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let fleet = hosts();
    for h in &fleet {
        // Creations overlap: each takes a while on the host.
        h.set_create_delay(Duration::from_millis(20));
    }
    let (a, b, _work) = two_replicas(&store, secrets.path(), &clock, &fleet).await;

    let wanted = room * 2;
    let mut tasks = Vec::new();
    for i in 0..wanted {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { s.create_vm(Caller::System, &actor(), vm(format!("vm-{i}"))).await }));
    }
    let mut created = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(v) => created.push(v),
            Err(OrchestratorError::NoCapacity(_)) => refused += 1,
            Err(e) => panic!("a create failed otherwise than for room: {e}"),
        }
    }
    assert_eq!(created.len(), room, "exactly the room of one replica; {refused} refused");
    assert_eq!(refused, wanted - room);
    let on_hosts: usize = fleet.iter().map(|h| h.vms().len()).sum();
    assert_eq!(on_hosts, room, "the hosts hold exactly the VMs acknowledged");
    let asked_too_much: usize = fleet.iter().map(|h| h.refused_oversubscription()).sum();
    assert_eq!(asked_too_much, 0, "no host was asked for more than it has");
    // Both replicas list every VM, and every hold was given back.
    assert_eq!(a.list_vms().await.unwrap().len(), room);
    assert_eq!(b.list_vms().await.unwrap().len(), room);
    for rec in store.list(CAPACITY).await.unwrap() {
        let holds = rec.value.get("holds").and_then(|h| h.as_object()).map_or(0, |h| h.len());
        assert_eq!(holds, 0, "a hold was left on {}: {}", rec.id, rec.value);
    }
}

/// A create that may not wait is not refused for room that another replica's creation
/// holds when that creation then fails: it is placed once the hold is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_held_by_a_failing_creation_on_another_replica_is_not_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let secrets = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let fleet = hosts();
    let (a, b, _work) = two_replicas(&store, secrets.path(), &clock, &fleet).await;
    let whole_host = |name: &str| CreateVm { cpu: Some(4), ..vm(name.into()) };
    // One host filled: the other has room for one whole-host VM.
    a.create_vm(Caller::System, &actor(), whole_host("filler")).await.unwrap();
    for h in &fleet {
        h.set_create_delay(Duration::from_millis(400));
        h.fail_next_creates(1);
    }
    let doomed = {
        let a = a.clone();
        tokio::spawn(async move { a.create_vm(Caller::System, &actor(), whole_host("doomed")).await })
    };
    // A's hold on the free host is in the store before B asks.
    let store_ = store.clone();
    wait_until(Duration::from_secs(10), "replica A's hold in the store", async || {
        store_.list(CAPACITY).await.unwrap().iter().any(|r| r.value["holds"].as_object().is_some_and(|h| !h.is_empty()))
    })
    .await;
    let second = b.create_vm(Caller::System, &actor(), whole_host("second")).await;
    let second = second.expect("placed once the failed creation's hold went, not refused for its room");
    assert!(doomed.await.unwrap().is_err(), "the host failed the first creation");
    let on_hosts: Vec<String> = fleet.iter().flat_map(|h| h.vms()).map(|v| v.name).collect();
    assert!(on_hosts.contains(&second.name) && on_hosts.len() == 2, "{on_hosts:?}");
}
