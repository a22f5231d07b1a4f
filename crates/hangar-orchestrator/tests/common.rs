//! Shared set-up: a JSON store in a temporary folder, a manual clock, fake hosts.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hangar_core::EventBus;
use hangar_core::audit::Actor;
use hangar_orchestrator::fake::{FakeConnector, FakeHost, FakeHostSpec};
use hangar_orchestrator::*;
use hangar_store::{JsonStore, JsonStoreOptions, Store};

pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc)
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub clock: ManualClock,
    pub bus: EventBus,
    pub connector: Arc<FakeConnector>,
    pub sched: Scheduler,
    pub actor: Actor,
}

pub async fn fleet(config: SchedulerConfig) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(JsonStore::open(dir.path().join("db"), JsonStoreOptions::default()).await.unwrap());
    let clock = ManualClock::new(t0());
    let bus = EventBus::new(4096);
    let registry =
        Arc::new(HostRegistry::open(store.clone(), dir.path(), bus.clone(), Arc::new(clock.clone())).await.unwrap());
    let connector = FakeConnector::new();
    let sched = Scheduler::new(registry, connector.clone(), bus.clone(), config);
    let actor = Actor { user_id: "u1".into(), username: "alice".into(), via: "jwt".into(), ..Default::default() };
    Fleet { dir, store, clock, bus, connector, sched, actor }
}

pub fn url(name: &str) -> String {
    format!("http://{name}:8080/api")
}

impl Fleet {
    /// Serves a fake host and registers it through the scheduler.
    pub async fn add_host(&self, name: &str, spec: FakeHostSpec) -> (Host, Arc<FakeHost>) {
        let fake = FakeHost::new(spec);
        self.connector.add(&url(name), fake.clone());
        let host = self
            .sched
            .register_host(
                &self.actor,
                RegisterHost {
                    name: Some(name.into()),
                    url: format!("http://{name}:8080"),
                    credentials: Some(HostCredentials::Basic {
                        username: "admin".into(),
                        password: format!("pw-{name}"),
                    }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        (host, fake)
    }
}

pub fn linux_vm(name: &str, cpu: u32, memory_mb: u64) -> CreateVm {
    CreateVm {
        name: name.into(),
        image: "ubuntu".into(),
        version: Some("24.04".into()),
        architecture: "amd64".into(),
        os: Some(Os::Linux),
        cpu: Some(cpu),
        memory_mb: Some(memory_mb),
        owner: "u1".into(),
        start: true,
        ..Default::default()
    }
}

/// Waits until `f` holds, failing after `deadline`.
pub async fn wait_until(deadline: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
