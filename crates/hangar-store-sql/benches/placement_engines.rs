//! Placement at 5,000 simulated hosts on each engine in one run: JSON (a data folder under
//! the target directory, one process, no cross-replica hold), PostgreSQL and MariaDB (the
//! servers of `scripts/test-services.sh`; the scheduler shares the store as a replica does,
//! so every placement commits its hold into the host's capacity record with a revision
//! condition). `bench/placement-engines.sh` starts the servers and runs this.
//!
//! Per engine: 5,000 fake hosts (`hangar_orchestrator::fake`) registered in the
//! orchestrator's scheduler, one re-read of the fleet from the store (what every replica
//! does each tick), then
//!
//! * **placement**: N placements one after another, each the decision (in memory) plus, on
//!   a shared store, its durable hold (the capacity record commit, checked against the
//!   store's VM records and holds); the hold is released after the clock stops;
//! * **create**: N creates one after another through the scheduler (placement, hold, the
//!   fake host's create, the VM record, the hold's removal), and the same with 16 at once.
//!
//! It prints p50/p99 per engine and the ratio of each p99 to JSON's.
//! `-- quick` runs fewer placements.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hangar_core::EventBus;
use hangar_core::audit::Actor;
use hangar_orchestrator::fake::{FakeConnector, FakeHost, FakeHostSpec};
use hangar_orchestrator::placement::PlacementRequest;
use hangar_orchestrator::{
    Caller, CreateVm, HostRegistry, Os, RegisterHost, ResourceSet, Scheduler, SchedulerConfig, SystemClock,
};
use hangar_store::{JsonStore, JsonStoreOptions, Store};

const HOSTS: usize = 5_000;

fn spec(i: usize) -> FakeHostSpec {
    let mut s = if i.is_multiple_of(5) {
        FakeHostSpec::mac(8 + (i % 3) as u32 * 4, 32_768 + (i % 4) as u64 * 16_384, 1_000_000)
    } else {
        FakeHostSpec::linux(16 + (i % 4) as u32 * 16, 65_536 + (i % 3) as u64 * 65_536, 2_000_000)
    };
    s.system_reserved = ResourceSet::new(1, 2048, 20_000);
    s
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn create(i: usize) -> CreateVm {
    CreateVm {
        name: format!("vm{i}"),
        image: "ubuntu".into(),
        version: Some("24.04".into()),
        architecture: "x86_64".into(),
        os: Some(Os::Linux),
        cpu: Some(2),
        memory_mb: Some(4096),
        owner: "bench".into(),
        ..Default::default()
    }
}

struct Row {
    engine: &'static str,
    registration: Duration,
    placement: Vec<Duration>,
    create: Vec<Duration>,
    create16: Vec<Duration>,
    create16_per_sec: f64,
}

async fn run(engine: &'static str, store: Arc<dyn Store>, dir: &std::path::Path, n: usize) -> Row {
    let bus = EventBus::default();
    let registry = Arc::new(HostRegistry::open(store.clone(), dir, bus.clone(), Arc::new(SystemClock)).await.unwrap());
    let connector = FakeConnector::new();
    let sched = Scheduler::new(registry, connector.clone(), bus, SchedulerConfig::default());
    if store.shared() {
        sched.share_store("bench-replica");
    }
    let actor = Actor::system();

    let t = Instant::now();
    let mut regs = Vec::new();
    for i in 0..HOSTS {
        let name = format!("h{i:05}");
        connector.add(&format!("http://{name}:8080/api"), FakeHost::new(spec(i)));
        let (sched, actor) = (sched.clone(), actor.clone());
        regs.push(async move {
            let req =
                RegisterHost { name: Some(name.clone()), url: format!("http://{name}:8080"), ..Default::default() };
            sched.register_host(&actor, req).await.unwrap();
        });
    }
    futures::stream::iter(regs).for_each_concurrent(64, |f| f).await;
    sched.refresh_shared().await.unwrap();
    let registration = t.elapsed();

    // Placement with its hold: one at a time.
    let mut placement = Vec::with_capacity(n);
    for i in 0..n {
        let req = PlacementRequest {
            resources: ResourceSet::new(1 + (i % 4) as u32, 1024 << (i % 3), 0),
            architecture: "x86_64".into(),
            os: Some(Os::Linux),
            ..Default::default()
        };
        let t = Instant::now();
        let held = sched.place_and_hold(&req).await.unwrap();
        placement.push(t.elapsed());
        sched.release_hold(held).await;
    }
    placement.sort();

    // Creates through the scheduler: one at a time, then 16 at once.
    let mut create_lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        sched.create_vm(Caller::System, &actor, create(i)).await.unwrap();
        create_lat.push(t.elapsed());
    }
    create_lat.sort();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (sched, actor) = (sched.clone(), actor.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            for k in 0..n / 16 {
                let t = Instant::now();
                sched.create_vm(Caller::System, &actor, create(n + w * n + k)).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut create16 = Vec::new();
    while let Some(done) = tasks.join_next().await {
        create16.extend(done.unwrap());
    }
    let create16_per_sec = create16.len() as f64 / started.elapsed().as_secs_f64();
    create16.sort();
    store.close().await.unwrap();
    Row { engine, registration, placement, create: create_lat, create16, create16_per_sec }
}

fn env_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set: run bench/placement-engines.sh, or `scripts/test-services.sh start` and \
             `eval \"$(scripts/test-services.sh env)\"` first"
        ),
    }
}

async fn sql_store(admin: &str) -> Arc<dyn Store> {
    let url = hangar_store_sql::testing::create_database(admin, "hangar_bench").await.expect("a bench database");
    let options = hangar_store_sql::SqlOptions { max_connections: 16, ..Default::default() };
    hangar_store_sql::open(&url, options).await.expect("open the bench database")
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let n = if quick { 200 } else { 1000 };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let pg = env_url("HANGAR_TEST_POSTGRES_URL");
        let my = env_url("HANGAR_TEST_MYSQL_URL");
        let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        println!(
            "Placement at {HOSTS} simulated hosts per engine: {n} placements (decision + cross-replica hold commit on \
             the SQL engines), {n} creates one at a time, {n} creates 16 at once"
        );
        let mut rows = Vec::new();
        for engine in ["json", "postgres", "mariadb"] {
            let dir = base.path().join(engine);
            std::fs::create_dir_all(&dir).unwrap();
            let store: Arc<dyn Store> = match engine {
                "json" => Arc::new(JsonStore::open(dir.join("db"), JsonStoreOptions::default()).await.unwrap()),
                "postgres" => sql_store(&pg).await,
                _ => sql_store(&my).await,
            };
            let row = run(engine, store, &dir, n).await;
            println!(
                "  {engine}: registered {HOSTS} hosts in {:.1} s, placement p99 {}",
                row.registration.as_secs_f64(),
                ms(pct(&row.placement, 0.99))
            );
            rows.push(row);
        }
        println!(
            "{:<9} {:>11} {:>11} {:>9} {:>11} {:>11} {:>9} {:>13} {:>11}",
            "engine",
            "place p50",
            "place p99",
            "vs json",
            "create p50",
            "create p99",
            "vs json",
            "16x create/s",
            "16x p99"
        );
        let json = rows.iter().find(|r| r.engine == "json").map(|r| (pct(&r.placement, 0.99), pct(&r.create, 0.99)));
        for r in &rows {
            let ratio = |mine: Duration, base: Option<Duration>| {
                base.map(|b| format!("{:.1}x", mine.as_secs_f64() / b.as_secs_f64().max(1e-9))).unwrap_or_default()
            };
            let (p99, c99) = (pct(&r.placement, 0.99), pct(&r.create, 0.99));
            println!(
                "{:<9} {:>11} {:>11} {:>9} {:>11} {:>11} {:>9} {:>13.0} {:>11}",
                r.engine,
                ms(pct(&r.placement, 0.50)),
                ms(p99),
                ratio(p99, json.map(|j| j.0)),
                ms(pct(&r.create, 0.50)),
                ms(c99),
                ratio(c99, json.map(|j| j.1)),
                r.create16_per_sec,
                ms(pct(&r.create16, 0.99)),
            );
        }
    });
}
