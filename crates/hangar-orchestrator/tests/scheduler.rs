//! The scheduler over fake hosts and a real JSON store: concurrency, queue, failures,
//! health, TTLs.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hangar_core::Classify;
use hangar_hypervisor::VmState;
use hangar_orchestrator::fake::FakeHostSpec;
use hangar_orchestrator::*;

fn assert_not_oversubscribed(fakes: &[Arc<hangar_orchestrator::fake::FakeHost>]) {
    for f in fakes {
        let r = f.resources();
        assert!(r.in_use.fits_in(&r.capacity()), "fake host oversubscribed: {r:?}");
        assert_eq!(f.refused_oversubscription(), 0, "the scheduler sent a VM that did not fit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_creates_for_twenty_slots() {
    let f = fleet(SchedulerConfig::default()).await;
    let mut fakes = Vec::new();
    for i in 0..4 {
        // Room for exactly 5 VMs of 2 CPU / 2 GiB each (CPU is the limit).
        let (_, fake) = f.add_host(&format!("h{i}"), FakeHostSpec::linux(10, 12_288, 500_000)).await;
        fake.set_create_delay(Duration::from_millis(20));
        fakes.push(fake);
    }
    let mut tasks = Vec::new();
    for i in 0..50 {
        let sched = f.sched.clone();
        let actor = f.actor.clone();
        tasks.push(tokio::spawn(async move {
            sched.create_vm(Caller::System, &actor, linux_vm(&format!("vm{i}"), 2, 2048)).await
        }));
    }
    let (mut ok, mut no_capacity) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(OrchestratorError::NoCapacity(no)) => {
                assert_eq!(no.count(Reason::Cpu), 4, "{no}");
                no_capacity += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, no_capacity), (20, 30));
    assert_eq!(fakes.iter().map(|f| f.vms().len()).sum::<usize>(), 20);
    for fake in &fakes {
        assert_eq!(fake.vms().len(), 5, "spread fills every host");
    }
    assert_not_oversubscribed(&fakes);
    assert!(f.sched.reservations().is_empty(), "every reservation released");
    assert_eq!(f.sched.list_vms().await.unwrap().len(), 20);
    // The views count what the hosts run.
    for h in f.sched.registry().list() {
        assert_eq!(h.resources.unwrap().available.cpu, 0);
        assert_eq!(h.vms.len(), 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_requests_get_capacity_as_it_frees_and_the_rest_time_out() {
    let f = fleet(SchedulerConfig::default()).await;
    let (_, fake) = f.add_host("h0", FakeHostSpec::linux(4, 8192, 100_000)).await;
    let a = f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 2, 1024)).await.unwrap();
    let b = f.sched.create_vm(Caller::System, &f.actor, linux_vm("b", 2, 1024)).await.unwrap();
    let waiting = |name: &str, prio| {
        let sched = f.sched.clone();
        let actor = f.actor.clone();
        let mut req = linux_vm(name, 2, 1024);
        req.wait = Some(Duration::from_secs(20));
        req.priority = prio;
        tokio::spawn(async move { sched.create_vm(Caller::System, &actor, req).await })
    };
    let low = waiting("low", 0);
    wait_until(Duration::from_secs(5), "first waiter queued", || f.sched.reservations().waiting() == 1).await;
    let high = waiting("high", 10);
    wait_until(Duration::from_secs(5), "second waiter queued", || f.sched.reservations().waiting() == 2).await;
    f.sched.delete_vm(&f.actor, &a.id).await.unwrap();
    let got = high.await.unwrap().unwrap();
    assert_eq!(got.name, "high", "the higher priority request is served first");
    assert!(!low.is_finished());
    f.sched.delete_vm(&f.actor, &b.id).await.unwrap();
    assert_eq!(low.await.unwrap().unwrap().name, "low");
    assert_not_oversubscribed(std::slice::from_ref(&fake));
    // Nothing frees now: a waiter gives up with the reason.
    let mut req = linux_vm("late", 2, 1024);
    req.wait = Some(Duration::from_millis(100));
    match f.sched.create_vm(Caller::System, &f.actor, req).await {
        Err(e @ OrchestratorError::QueueTimeout { .. }) => {
            assert!(e.to_string().contains("1 lack CPU"), "{e}");
            assert_eq!(e.kind(), hangar_core::ErrorKind::Unavailable);
        }
        other => panic!("expected a queue timeout, got {other:?}"),
    }
    assert_eq!(f.sched.reservations().waiting(), 0);
    assert!(f.sched.reservations().is_empty());
}

#[tokio::test]
async fn failed_create_rolls_back_and_tries_the_next_host() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h0, f0) = f.add_host("h0", FakeHostSpec::linux(16, 32_768, 100_000)).await;
    let (h1, f1) = f.add_host("h1", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    // Spread picks h0 (bigger); it refuses, so h1 gets the VM.
    f0.fail_next_creates(1);
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("x", 2, 1024)).await.unwrap();
    assert_eq!(vm.host_id, h1.id);
    assert_eq!(f1.vms().len(), 1);
    assert!(f.sched.reservations().is_empty());
    // h0 only refused; it stays healthy.
    assert_eq!(f.sched.registry().get(&h0.id).unwrap().state, HostState::Healthy);

    // A host that is down is marked unhealthy, and the VM lands elsewhere.
    f0.set_down(true);
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("y", 2, 1024)).await.unwrap();
    assert_eq!(vm.host_id, h1.id);
    let h0v = f.sched.registry().get(&h0.id).unwrap();
    assert_eq!(h0v.state, HostState::Unhealthy);
    assert!(h0v.last_error.unwrap().contains("connection refused"));

    // Every host fails: the host error comes back and nothing stays held.
    f1.fail_next_creates(5);
    let err = f.sched.create_vm(Caller::System, &f.actor, linux_vm("z", 2, 1024)).await.unwrap_err();
    assert!(matches!(err, OrchestratorError::Host { ref host, .. } if *host == h1.id), "{err}");
    assert!(f.sched.reservations().is_empty());
    let view = f.sched.registry().get(&h1.id).unwrap();
    assert_eq!(view.vms.len(), 2, "the failed VM is not counted");
    assert_eq!(view.resources.unwrap().in_use.cpu, 4);
}

#[tokio::test]
async fn health_follows_silence_failures_and_heartbeats() {
    let f = fleet(SchedulerConfig::default()).await;
    let mut events = f.bus.subscribe();
    let (h, fake) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    assert_eq!(h.state, HostState::Healthy, "registration probes the host");
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 2, 1024)).await.unwrap();

    f.clock.advance(Duration::from_secs(9));
    assert!(f.sched.tick().await.is_empty());
    f.clock.advance(Duration::from_secs(2));
    let t = f.sched.tick().await;
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].1.from, t[0].1.to), (HostState::Healthy, HostState::Unhealthy));
    let view = f.sched.registry().get(&h.id).unwrap();
    assert_eq!(view.state, HostState::Unhealthy);
    assert!(view.vms.iter().all(|v| v.state == VmState::Unknown), "VMs of a silent host are unknown");
    let err = f.sched.create_vm(Caller::System, &f.actor, linux_vm("b", 1, 512)).await.unwrap_err();
    assert!(err.to_string().contains("1 unhealthy"), "{err}");

    // The state is persisted, and an event says so.
    let mut saw = Vec::new();
    while let Ok(e) = events.try_recv() {
        if e.message == "HOST_HEALTH_UPDATE" {
            saw.push(e.body["state"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(saw, ["healthy", "unhealthy"]);

    // A heartbeat brings it back and refreshes the VM list.
    f.sched.handle_event(&h.id, HostEvent::Heartbeat).await.unwrap();
    assert_eq!(f.sched.registry().get(&h.id).unwrap().state, HostState::Healthy);
    wait_until(Duration::from_secs(5), "VM states refreshed", || {
        f.sched.registry().get(&h.id).unwrap().vms.iter().all(|v| v.state == VmState::Running)
    })
    .await;
    assert_eq!(f.sched.registry().get(&h.id).unwrap().vms[0].id, vm.id);

    // A failed check is immediate and carries the error.
    fake.set_down(true);
    let view = f.sched.check_host(&h.id).await.unwrap();
    assert_eq!(view.state, HostState::Unhealthy);
    assert!(view.last_error.unwrap().contains("connection refused"));
    fake.set_down(false);
    assert_eq!(f.sched.check_host(&h.id).await.unwrap().state, HostState::Healthy);
}

#[tokio::test]
async fn event_stream_updates_the_view() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, fake) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let watcher = f.sched.watch_events(&h.id);
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 4, 4096)).await.unwrap();
    assert_eq!(f.sched.registry().get(&h.id).unwrap().resources.unwrap().in_use.cpu, 4);
    // The VM is stopped on the host behind the orchestrator's back: its CPU is freed.
    wait_until(Duration::from_secs(5), "watcher connected", || f.connector.connects() >= 1).await;
    let mut stopped = fake.vms()[0].clone();
    stopped.state = VmState::Stopped;
    // Events may race with the subscription; emit until the view follows.
    wait_until(Duration::from_secs(5), "stop event applied", || {
        fake.emit(HostEvent::VmChanged { vm: stopped.clone() });
        f.sched.registry().get(&h.id).unwrap().resources.unwrap().in_use.cpu == 0
    })
    .await;
    wait_until(Duration::from_secs(5), "removal applied", || {
        fake.emit(HostEvent::VmRemoved { id: vm.id.clone() });
        f.sched.registry().get(&h.id).unwrap().vms.is_empty()
    })
    .await;
    let r = f.sched.registry().get(&h.id).unwrap().resources.unwrap();
    assert_eq!(r.in_use, ResourceSet::default(), "removing twice does not undercount");
    watcher.abort();
}

#[tokio::test]
async fn expired_vms_are_reaped_unless_extended() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, fake) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let mut req = linux_vm("short", 2, 1024);
    req.ttl = Some(Duration::from_secs(60));
    let short = f.sched.create_vm(Caller::System, &f.actor, req).await.unwrap();
    let keep = f.sched.create_vm(Caller::System, &f.actor, linux_vm("forever", 2, 1024)).await.unwrap();
    assert_eq!(short.expires_at, Some(t0() + chrono::Duration::seconds(60)));
    assert_eq!(keep.expires_at, None);

    f.clock.advance(Duration::from_secs(59));
    assert!(f.sched.reap().await.unwrap().deleted.is_empty());
    let ext = f.sched.extend(&f.actor, &short.id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(ext.expires_at, Some(t0() + chrono::Duration::seconds(180)));
    f.clock.advance(Duration::from_secs(100));
    assert!(f.sched.reap().await.unwrap().deleted.is_empty(), "extended");
    assert_eq!(fake.vms().len(), 2);

    // Host down when it expires: reported, kept, retried later.
    f.clock.advance(Duration::from_secs(30));
    fake.set_down(true);
    f.sched.check_host(&h.id).await.unwrap();
    let r = f.sched.reap().await.unwrap();
    assert!(r.deleted.is_empty());
    assert_eq!(r.failed.len(), 1);
    assert!(f.sched.vm(&short.id).await.unwrap().last_error.is_some());
    fake.set_down(false);
    f.sched.check_host(&h.id).await.unwrap();
    let r = f.sched.reap().await.unwrap();
    assert_eq!(r.deleted, vec![short.id.clone()]);
    assert_eq!(fake.vms().len(), 1);
    assert_eq!(fake.vms()[0].id, keep.id);
    assert!(matches!(f.sched.vm(&short.id).await, Err(OrchestratorError::NotFound { .. })));
    assert_eq!(f.sched.registry().get(&h.id).unwrap().resources.unwrap().in_use.cpu, 2, "capacity back");
    assert!(f.sched.reap().await.unwrap().deleted.is_empty(), "nothing more to reap");
}

#[tokio::test]
async fn ttl_limits_are_enforced() {
    let cfg = SchedulerConfig {
        default_vm_ttl: Some(Duration::from_secs(3600)),
        max_vm_ttl: Some(Duration::from_secs(7200)),
        ..Default::default()
    };
    let f = fleet(cfg).await;
    f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let vm = f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 1, 512)).await.unwrap();
    assert_eq!(vm.expires_at, Some(t0() + chrono::Duration::seconds(3600)), "default TTL");
    let mut req = linux_vm("b", 1, 512);
    req.ttl = Some(Duration::from_secs(7201));
    assert!(matches!(f.sched.create_vm(Caller::System, &f.actor, req).await, Err(OrchestratorError::Invalid(_))));
    assert!(matches!(
        f.sched.extend(&f.actor, &vm.id, Duration::from_secs(7200)).await,
        Err(OrchestratorError::Invalid(_))
    ));
    assert!(f.sched.extend(&f.actor, &vm.id, Duration::from_secs(3600)).await.is_ok());
}

#[tokio::test]
async fn disabled_and_deleted_hosts_take_no_vms() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, _) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    f.sched.set_host_enabled(&f.actor, "H0", false).await.unwrap();
    let err = f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 1, 512)).await.unwrap_err();
    assert!(err.to_string().ends_with("1 disabled"), "{err}");
    f.sched.set_host_enabled(&f.actor, &h.id, true).await.unwrap();
    assert!(f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 1, 512)).await.is_ok());
    f.sched.delete_host(&f.actor, &h.id).await.unwrap();
    let err = f.sched.create_vm(Caller::System, &f.actor, linux_vm("b", 1, 512)).await.unwrap_err();
    assert!(err.to_string().contains("no hosts are registered"), "{err}");
}

#[tokio::test]
async fn registration_fails_when_the_host_does_not_answer_and_names_are_unique() {
    let f = fleet(SchedulerConfig::default()).await;
    let err = f
        .sched
        .register_host(&f.actor, RegisterHost { url: "http://nowhere:8080".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(matches!(err, OrchestratorError::Host { .. }), "{err}");
    assert!(f.sched.registry().is_empty());
    f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    let fake = hangar_orchestrator::fake::FakeHost::new(FakeHostSpec::linux(8, 16_384, 100_000));
    f.connector.add(&url("other"), fake);
    let err = f
        .sched
        .register_host(
            &f.actor,
            RegisterHost { name: Some("H0".into()), url: "http://other:8080".into(), ..Default::default() },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), hangar_core::ErrorKind::Conflict, "{err}");
    for bad in ["ftp://x", "http://u:p@x", "not a url", "http://x/?q=1"] {
        let e = f.sched.register_host(&f.actor, RegisterHost { url: bad.into(), ..Default::default() }).await;
        assert!(matches!(e, Err(OrchestratorError::Invalid(_))), "{bad}: {e:?}");
    }
}
