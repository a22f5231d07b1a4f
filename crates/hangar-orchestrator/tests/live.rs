//! Live state over fake hosts: event streams that resync at (re)connection, a closed stream
//! marking the host unhealthy at once with its VMs `unknown`, the host rejoining by itself,
//! cache events steering placement, the lightweight health check, and no lost writes when
//! creations run concurrently.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hangar_hypervisor::VmState;
use hangar_orchestrator::fake::FakeHostSpec;
use hangar_orchestrator::*;

fn cached(id: &str, version: &str) -> CachedImage {
    CachedImage { catalog_id: id.into(), version: version.into(), architecture: "x86_64".into() }
}

#[tokio::test]
async fn closed_stream_is_unhealthy_at_once_and_the_host_rejoins_resynced() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, fake) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 2, 1024)).await.unwrap();
    let watcher = f.sched.watch_events(&h.id);
    wait_until(Duration::from_secs(5), "stream open", || f.sched.events_connected(&h.id)).await;

    // The host goes away: its stream closes, which counts at once (the manual clock does
    // not move, so silence detection plays no part).
    fake.set_down(true);
    wait_until(Duration::from_secs(5), "host unhealthy", || {
        f.sched.registry().get(&h.id).unwrap().state == HostState::Unhealthy
    })
    .await;
    let view = f.sched.registry().get(&h.id).unwrap();
    assert!(view.last_error.unwrap().contains("closed"));
    assert_eq!(view.vms.len(), 1);
    assert!(view.vms.iter().all(|v| v.state == VmState::Unknown), "{:?}", view.vms);
    assert!(!f.sched.events_connected(&h.id));

    // Meanwhile the VM is stopped on the host and another one made there locally.
    fake.set_down(false);
    let mut stopped = fake.vms()[0].clone();
    stopped.state = VmState::Stopped;
    fake.insert_vm(stopped);
    fake.insert_vm(VmSummary {
        id: "local-1".into(),
        name: "made-on-the-host".into(),
        state: VmState::Running,
        os: "linux".into(),
        cpu: 1,
        memory_mb: 512,
        disk_mb: 0,
        owner: None,
        machine: None,
    });
    // It rejoins by itself (reconnection with backoff) and its view is resynced.
    wait_until(Duration::from_secs(10), "host healthy again", || {
        f.sched.registry().get(&h.id).unwrap().state == HostState::Healthy
    })
    .await;
    let view = f.sched.registry().get(&h.id).unwrap();
    let states: std::collections::BTreeMap<String, VmState> =
        view.vms.iter().map(|v| (v.id.clone(), v.state)).collect();
    let want: std::collections::BTreeMap<String, VmState> =
        [(vm.id.clone(), VmState::Stopped), ("local-1".to_string(), VmState::Running)].into();
    assert_eq!(states, want);
    assert_eq!(view.resources.unwrap().in_use.cpu, 1, "only the running VM holds CPU");
    assert!(fake.streams_opened() >= 2);
    watcher.abort();
}

#[tokio::test]
async fn events_move_the_view_without_listing() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, fake) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let watcher = f.sched.watch_events(&h.id);
    wait_until(Duration::from_secs(5), "stream open", || f.sched.events_connected(&h.id)).await;
    let vm = VmSummary {
        id: "v1".into(),
        name: "n".into(),
        state: VmState::Running,
        os: "linux".into(),
        cpu: 2,
        memory_mb: 2048,
        disk_mb: 0,
        owner: None,
        machine: None,
    };
    fake.emit(HostEvent::VmChanged { vm: vm.clone() });
    wait_until(Duration::from_secs(5), "VM added", || f.sched.registry().get(&h.id).unwrap().vms.len() == 1).await;
    assert_eq!(f.sched.registry().get(&h.id).unwrap().resources.unwrap().in_use.cpu, 2);
    fake.emit(HostEvent::VmState { id: "v1".into(), state: VmState::Stopped });
    wait_until(Duration::from_secs(5), "VM stopped", || {
        f.sched.registry().get(&h.id).unwrap().vms[0].state == VmState::Stopped
    })
    .await;
    assert_eq!(f.sched.registry().get(&h.id).unwrap().resources.unwrap().in_use.cpu, 0, "a stopped VM frees its CPU");
    // A resource report that predates a VM the orchestrator counts does not undercount it.
    fake.emit(HostEvent::VmState { id: "v1".into(), state: VmState::Running });
    let stale =
        HostResources::from_usage(ResourceSet::new(8, 16_384, 100_000), ResourceSet::default(), ResourceSet::default());
    fake.emit(HostEvent::Resources { resources: stale });
    wait_until(Duration::from_secs(5), "resources applied", || {
        let r = f.sched.registry().get(&h.id).unwrap().resources.unwrap();
        r.total.disk_mb == 100_000 && r.in_use.disk_mb == 0 && r.in_use.cpu == 2
    })
    .await;
    assert_eq!(f.sched.registry().get(&h.id).unwrap().resources.unwrap().available.cpu, 6);
    fake.emit(HostEvent::VmRemoved { id: "v1".into() });
    wait_until(Duration::from_secs(5), "VM removed", || f.sched.registry().get(&h.id).unwrap().vms.is_empty()).await;
    assert_eq!(fake.streams_opened(), 1, "one stream, no reconnection");
    watcher.abort();
}

#[tokio::test]
async fn cache_events_steer_placement() {
    let f = fleet(SchedulerConfig::default()).await;
    let (a, _) = f.add_host("a", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let mut big = FakeHostSpec::linux(32, 65_536, 100_000);
    big.cached_images = vec![cached("ubuntu", "22.04")];
    let (b, fake_b) = f.add_host("b", big).await;
    let _wa = f.sched.watch_events(&a.id);
    let wb = f.sched.watch_events(&b.id);
    wait_until(Duration::from_secs(5), "streams open", || {
        f.sched.events_connected(&a.id) && f.sched.events_connected(&b.id)
    })
    .await;
    let req = |s: &Scheduler| {
        let mut r = s.placement_request(&linux_vm("x", 2, 2048), Caller::System).unwrap();
        r.os = Some(Os::Linux);
        r
    };
    // Host b is bigger, so spread picks it; host a caches nothing, b an older version.
    let (d, r) = f.sched.reserve(&req(&f.sched)).unwrap();
    f.sched.reservations().release(r.id);
    assert_eq!((d.host_id.as_str(), d.cached), (b.id.as_str(), false));
    // Now host a caches the requested image: it comes first although it is smaller.
    let fake_a = f.connector.host(&url("a")).unwrap();
    fake_a.set_cached_images(vec![cached("ubuntu", "24.04")]);
    wait_until(Duration::from_secs(5), "cache event applied", || {
        f.sched.registry().get(&a.id).unwrap().cached_images == vec![cached("ubuntu", "24.04")]
    })
    .await;
    let (d, r) = f.sched.reserve(&req(&f.sched)).unwrap();
    f.sched.reservations().release(r.id);
    assert_eq!((d.host_id.as_str(), d.cached), (a.id.as_str(), true));
    // The cache list is resynced when a stream reopens, too.
    fake_b.set_cached_images(vec![cached("ubuntu", "24.04")]);
    fake_b.set_down(true);
    wait_until(Duration::from_secs(5), "b down", || {
        f.sched.registry().get(&b.id).unwrap().state == HostState::Unhealthy
    })
    .await;
    fake_b.set_down(false);
    wait_until(Duration::from_secs(10), "b back", || {
        f.sched.registry().get(&b.id).unwrap().state == HostState::Healthy
    })
    .await;
    assert_eq!(f.sched.registry().get(&b.id).unwrap().cached_images, vec![cached("ubuntu", "24.04")]);
    let (d, _) = f.sched.reserve(&req(&f.sched)).unwrap();
    assert_eq!(d.host_id, b.id, "both cache it: spread decides again");
    wb.abort();
}

#[tokio::test]
async fn health_check_pings_connected_hosts_and_a_failed_ping_reopens_the_stream() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, fake) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let watcher = f.sched.watch_events(&h.id);
    wait_until(Duration::from_secs(5), "stream open", || f.sched.events_connected(&h.id)).await;
    // Pings keep a quiet host healthy past the silence threshold.
    for _ in 0..3 {
        f.clock.advance(Duration::from_secs(6));
        f.sched.check_all().await;
        assert!(f.sched.tick().await.is_empty(), "a pinged host is not silent");
    }
    assert_eq!(f.sched.registry().get(&h.id).unwrap().state, HostState::Healthy);
    let before = fake.streams_opened();
    // A host whose connection hangs (its stream stays open but says nothing) fails its
    // ping: unhealthy at once, and its stream is reopened and resynced.
    fake.set_ping_fails(true);
    f.sched.check_all().await;
    let view = f.sched.registry().get(&h.id).unwrap();
    assert_eq!(view.state, HostState::Unhealthy);
    assert!(view.last_error.unwrap().contains("health check"));
    wait_until(Duration::from_secs(5), "stream reopened", || fake.streams_opened() > before).await;
    fake.set_ping_fails(false);
    wait_until(Duration::from_secs(10), "healthy again", || {
        f.sched.registry().get(&h.id).unwrap().state == HostState::Healthy
    })
    .await;
    assert!(fake.streams_opened() > before);
    watcher.abort();
}

#[test]
fn reconnection_backs_off_with_jitter_up_to_the_cap() {
    for attempt in 0..40 {
        let d = scheduler::reconnect_delay(attempt);
        let base = Duration::from_millis(250).saturating_mul(1 << attempt.min(16)).min(scheduler::RECONNECT_CAP);
        assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?} outside [{:?}, {base:?}]", base / 2);
    }
    let many: std::collections::HashSet<Duration> = (0..50).map(|_| scheduler::reconnect_delay(10)).collect();
    assert!(many.len() > 10, "jitter varies the delay: {many:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_are_all_durable() {
    let f = fleet(SchedulerConfig::default()).await;
    for i in 0..4 {
        f.add_host(&format!("h{i}"), FakeHostSpec::linux(64, 262_144, 1_000_000)).await;
    }
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (sched, actor) = (f.sched.clone(), f.actor.clone());
        tasks.push(tokio::spawn(async move {
            sched.create_vm(Caller::System, &actor, linux_vm(&format!("vm{i}"), 1, 512)).await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().id);
    }
    // Every acknowledged creation is in the store (a reopened store sees it).
    f.store.close().await.unwrap();
    let store = Arc::new(
        hangar_store::JsonStore::open(f.dir.path().join("db"), hangar_store::JsonStoreOptions::default())
            .await
            .unwrap(),
    );
    use hangar_store::Store;
    let stored: std::collections::HashSet<String> = store.list(VMS).await.unwrap().into_iter().map(|r| r.id).collect();
    for id in &ids {
        assert!(stored.contains(id), "VM {id} acknowledged but not stored");
    }
    assert_eq!(stored.len(), 100);
    // The views count every VM.
    let counted: usize = f.sched.registry().list().iter().map(|h| h.vms.len()).sum();
    assert_eq!(counted, 100);
}
