//! Placement benchmark: simulated fleets of 100, 1,000 and 5,000 fake hosts, each already
//! running 10 VMs (what the fleet benchmark, `bench/fleet.sh`, runs over HTTP).
//!
//! Prints, per fleet size: placement latency (place + reserve in the ledger, then release;
//! p50/p99/max over many requests) and create throughput through the `Scheduler` with the
//! fake host client and a real JSON store (each create commits the VM record, the host
//! view and an audit entry durably).
//!
//! Run: `cargo bench -p hangar-orchestrator --bench placement` (add `-- quick` for a short
//! run). The last line compares placement p99 at 5,000 hosts with its goal (< 5 ms).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::EventBus;
use hangar_core::audit::Actor;
use hangar_orchestrator::fake::{FakeConnector, FakeHost, FakeHostSpec};
use hangar_orchestrator::placement::{ImageRef, PlacementRequest};
use hangar_orchestrator::*;
use hangar_store::{JsonStore, JsonStoreOptions, Store};

fn spec(i: usize) -> FakeHostSpec {
    let mut s = if i.is_multiple_of(5) {
        FakeHostSpec::mac(8 + (i % 3) as u32 * 4, 32_768 + (i % 4) as u64 * 16_384, 1_000_000)
    } else {
        FakeHostSpec::linux(16 + (i % 4) as u32 * 16, 65_536 + (i % 3) as u64 * 65_536, 2_000_000)
    };
    s.system_reserved = ResourceSet::new(1, 2048, 20_000);
    if i.is_multiple_of(7) {
        s.cached_images = vec![CachedImage {
            catalog_id: "ubuntu".into(),
            version: "24.04".into(),
            architecture: s.architecture.clone(),
        }];
    }
    s
}

/// VMs each host runs before the benchmark starts.
const VMS_PER_HOST: usize = 10;
/// Placement p99 goal at 5,000 hosts (issue 18).
const GOAL_P99: Duration = Duration::from_millis(5);

/// The VMs a host already runs (1 CPU, 1 GiB, 20 GB each).
fn running_vms(host: usize) -> impl Iterator<Item = VmSummary> {
    (0..VMS_PER_HOST).map(move |k| VmSummary {
        id: format!("h{host:05}-vm{k:02}"),
        name: format!("h{host:05}-vm{k:02}"),
        state: if k % 2 == 0 { hangar_hypervisor::VmState::Running } else { hangar_hypervisor::VmState::Stopped },
        os: "linux".into(),
        cpu: 1,
        memory_mb: 1024,
        disk_mb: 20_000,
        owner: Some("bench".into()),
        machine: None,
    })
}

fn requests() -> Vec<PlacementRequest> {
    let mut out = Vec::new();
    for k in 0..16u32 {
        let mac = k.is_multiple_of(4);
        out.push(PlacementRequest {
            resources: ResourceSet::new(1 + k % 8, 1024 * u64::from(1 + k % 16), 0),
            architecture: if mac { "arm64" } else { "x86_64" }.into(),
            os: Some(if mac { Os::Macos } else { Os::Linux }),
            image: (k.is_multiple_of(3)).then(|| ImageRef {
                catalog_id: "ubuntu".into(),
                version: "24.04".into(),
                size_mb: Some(30_000),
            }),
            tags: if k.is_multiple_of(5) { ["rack-a".to_string()].into() } else { Default::default() },
            ..Default::default()
        });
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(n: usize, placements: usize, creates: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(JsonStore::open(dir.path().join("db"), JsonStoreOptions::default()).await.unwrap());
    let bus = EventBus::default();
    let registry =
        Arc::new(HostRegistry::open(store.clone(), dir.path(), bus.clone(), Arc::new(SystemClock)).await.unwrap());
    let connector = FakeConnector::new();
    let sched = Scheduler::new(registry, connector.clone(), bus, SchedulerConfig::default());
    let actor = Actor::system();

    let t = Instant::now();
    let mut regs = Vec::new();
    for i in 0..n {
        let name = format!("h{i:05}");
        let host = FakeHost::new(spec(i));
        for vm in running_vms(i) {
            host.insert_vm(vm);
        }
        connector.add(&format!("http://{name}:8080/api"), host);
        let (sched, actor) = (sched.clone(), actor.clone());
        regs.push(async move {
            let tags = if i.is_multiple_of(2) { ["rack-a".to_string()].into() } else { Default::default() };
            sched
                .register_host(
                    &actor,
                    RegisterHost {
                        name: Some(name.clone()),
                        url: format!("http://{name}:8080"),
                        tags,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        });
    }
    futures::stream::iter(regs).for_each_concurrent(64, |f| f).await;
    let reg_time = t.elapsed();

    // Placement latency: place + reserve, then release (so the fleet does not fill up).
    let reqs = requests();
    let mut lat = Vec::with_capacity(placements);
    let mut placed = 0;
    for i in 0..placements {
        let req = &reqs[i % reqs.len()];
        let t = Instant::now();
        let r = sched.reserve(req);
        lat.push(t.elapsed());
        if let Ok((_, res)) = r {
            placed += 1;
            sched.reservations().release(res.id);
        }
    }
    lat.sort();

    // Create throughput through the Scheduler (fake hosts, durable store).
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..creates {
        let (sched, actor) = (sched.clone(), actor.clone());
        tasks.push(tokio::spawn(async move {
            let req = CreateVm {
                name: format!("vm{i}"),
                image: "ubuntu".into(),
                version: Some("24.04".into()),
                architecture: "x86_64".into(),
                os: Some(Os::Linux),
                cpu: Some(2),
                memory_mb: Some(4096),
                owner: "bench".into(),
                start: true,
                ..Default::default()
            };
            sched.create_vm(Caller::System, &actor, req).await.is_ok()
        }));
        if tasks.len() >= 32 {
            for t in tasks.drain(..) {
                assert!(t.await.unwrap(), "create failed");
            }
        }
    }
    for t in tasks {
        assert!(t.await.unwrap(), "create failed");
    }
    let create_time = t.elapsed();
    store.close().await.unwrap();

    let p99 = pct(&lat, 0.99);
    println!(
        "hosts {n:>5}: placement p50 {:>7.1} us  p99 {:>7.1} us  max {:>7.1} us  ({placed}/{placements} placed) | \
         creates {:>6.0}/s ({creates} in {:.2} s, 32 concurrent) | registration {:.2} s",
        pct(&lat, 0.50).as_secs_f64() * 1e6,
        pct(&lat, 0.99).as_secs_f64() * 1e6,
        lat.last().unwrap().as_secs_f64() * 1e6,
        creates as f64 / create_time.as_secs_f64(),
        create_time.as_secs_f64(),
        reg_time.as_secs_f64(),
    );
    p99
}

use futures::StreamExt;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (placements, creates) = if quick { (500, 200) } else { (5000, 1000) };
    println!(
        "placement benchmark ({placements} placements, {creates} creates per fleet size; {VMS_PER_HOST} VMs on each host)"
    );
    let mut at_5000 = Duration::ZERO;
    for n in [100, 1000, 5000] {
        at_5000 = rt.block_on(run(n, placements, creates));
    }
    println!(
        "placement p99 at 5000 hosts: {:.1} us (goal < {} us): {}",
        at_5000.as_secs_f64() * 1e6,
        GOAL_P99.as_micros(),
        if at_5000 < GOAL_P99 { "met" } else { "MISSED" }
    );
}
