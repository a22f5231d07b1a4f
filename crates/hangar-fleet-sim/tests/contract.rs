//! The simulated hosts answer the orchestrator's own host client (`HttpConnector`, the one
//! `hangar serve` uses) as a host agent does: hardware, VM list, probe, both credentials
//! (API key and login), the event stream (resync, state changes, adds, removes, pongs), creates
//! and deletes; wrong credentials are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use hangar_fleet_sim::{Fleet, Rng, SimConfig, USERNAME};
use hangar_hypervisor::VmState;
use hangar_orchestrator::{
    HostClient, HostClientError, HostCreateVm, HostCredentials, HostEvent, HttpConnector, Os, VmOp,
};

fn small() -> SimConfig {
    SimConfig { hosts: 2, vms_per_host: 3, ..SimConfig::default() }
}

/// The next event that is not a heartbeat or a resource refresh, within 10 s.
async fn next_change(s: &mut BoxStream<'static, HostEvent>) -> HostEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e =
            tokio::time::timeout_at(deadline, s.next()).await.expect("no event within 10 s").expect("the stream ended");
        if !matches!(e, HostEvent::Heartbeat | HostEvent::Resources { .. }) {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_client_reads_a_simulated_host() {
    let fleet = Fleet::start(&small()).await.unwrap();
    assert_eq!(fleet.vm_count(), 6);
    let connector = HttpConnector::new(Duration::from_secs(5)).unwrap();
    let h = &fleet.hosts[1];
    for creds in [
        HostCredentials::ApiKey { api_key: h.api_key.clone() },
        HostCredentials::Basic { username: USERNAME.into(), password: h.password.clone() },
    ] {
        let c = connector.client_for(&h.url, Some(creds));
        let hw = c.hardware().await.unwrap();
        assert_eq!((hw.architecture.as_str(), hw.os), ("x86_64", Os::Linux));
        assert_eq!(hw.resources.total.cpu, 64);
        assert_eq!(hw.resources.in_use.cpu, 6, "three VMs of 2 CPUs");
        let vms = c.list_vms().await.unwrap();
        assert_eq!(vms.len(), 3);
        let ids: Vec<String> = vms.iter().map(|v| v.id.clone()).collect();
        assert_eq!(ids, h.vm_ids());
        assert!(vms.iter().all(|v| v.machine.is_some() && v.cpu == 2 && v.memory_mb == 4096));
        c.ping().await.unwrap();
    }

    // Wrong credentials: refused (the key of the other host, a wrong password).
    let other = connector.client_for(&h.url, Some(HostCredentials::ApiKey { api_key: fleet.hosts[0].api_key.clone() }));
    let e = other.list_vms().await.unwrap_err();
    assert!(matches!(e, HostClientError::Refused { status: 401, .. }), "{e:?}");
    let bad = connector
        .client_for(&h.url, Some(HostCredentials::Basic { username: USERNAME.into(), password: "not-it-1A!".into() }));
    assert!(bad.list_vms().await.is_err());
    assert!(fleet.hosts[0].state_of("no-such-vm").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_carries_every_change() {
    let fleet = Fleet::start(&small()).await.unwrap();
    let h = fleet.hosts[0].clone();
    let connector = HttpConnector::new(Duration::from_secs(5)).unwrap();
    let c = connector.client_for(&h.url, Some(HostCredentials::ApiKey { api_key: h.api_key.clone() }));
    let mut events = c.events().await.unwrap();
    match next_change(&mut events).await {
        HostEvent::Synced { vms, .. } => assert_eq!(vms.len(), 3),
        other => panic!("a resync first, not {other:?}"),
    }
    assert_eq!(h.subscribers(), 1);

    // A state change made on the host arrives as that VM's new state.
    let mut rng = Rng::new(7);
    let (vm, from) = h.pin_random(&mut rng).unwrap();
    let to = hangar_fleet_sim::next_state(from);
    assert!(h.set_state(&vm, to));
    match next_change(&mut events).await {
        HostEvent::VmState { id, state } => assert_eq!((id.as_str(), state), (vm.as_str(), to)),
        other => panic!("a state change, not {other:?}"),
    }
    h.unpin(&vm);

    // A create through the client: answered with the VM, announced as a change.
    let made = c
        .create_vm(HostCreateVm {
            name: "made-1".into(),
            image: "sim-image".into(),
            version: None,
            architecture: "x86_64".into(),
            os: Os::Linux,
            cpu: 1,
            memory_mb: 1024,
            disk_mb: None,
            owner: "alice".into(),
            start: true,
            catalog_connection: None,
        })
        .await
        .unwrap();
    assert_eq!((made.name.as_str(), made.state, made.owner.as_deref()), ("made-1", VmState::Running, Some("alice")));
    match next_change(&mut events).await {
        HostEvent::VmChanged { vm } => assert_eq!(vm.id, made.id),
        other => panic!("the new VM, not {other:?}"),
    }
    // A power operation and a delete.
    c.vm_op(&made.id, VmOp::Power { power: hangar_wire::PowerOp::Kill }).await.unwrap();
    match next_change(&mut events).await {
        HostEvent::VmState { id, state } => assert_eq!((id.as_str(), state), (made.id.as_str(), VmState::Stopped)),
        other => panic!("the kill, not {other:?}"),
    }
    c.vm_op(&made.id, VmOp::Delete { force: true }).await.unwrap();
    match next_change(&mut events).await {
        HostEvent::VmRemoved { id } => assert_eq!(id, made.id),
        other => panic!("the delete, not {other:?}"),
    }
    assert!(matches!(c.vm_op(&made.id, VmOp::Delete { force: true }).await, Err(HostClientError::NotFound(_))));

    // Background changes reach the stream too; the stream stays open past the client's
    // silence limit because pings are answered.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let changes = async {
        let n = fleet.change_states(50.0, &stop).await;
        assert!(n > 0);
    };
    let watch = async {
        let mut seen = 0;
        let until = tokio::time::Instant::now()
            + hangar_orchestrator::http_client::EVENT_SILENCE_LIMIT
            + Duration::from_secs(1);
        while tokio::time::Instant::now() < until {
            if let HostEvent::VmState { .. } = next_change(&mut events).await {
                seen += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        seen
    };
    let (_, seen) = tokio::join!(changes, watch);
    assert!(seen > 10, "only {seen} state changes arrived");
}
