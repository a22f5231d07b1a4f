//! Readiness of a replica's store, for load balancers: the store answers a cheap read
//! within a short deadline, and its migrations are done. The answer is cached for a short
//! while and computed by one caller at a time, so probes, however many, cost the database
//! at most one read per cache period; a store that stops answering makes the replica
//! not-ready after at most the deadline, and a store that comes back makes it ready again
//! at the next check, with no restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::Store;

/// The collection and id read by the check (a point read of a record that need not exist).
const PROBE: (&str, &str) = (crate::lease::LEASES, "readiness-probe");

/// Timings of the readiness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadinessConfig {
    /// Longest wait for the store's answer.
    pub deadline: Duration,
    /// How long an answer is reused.
    pub cache_for: Duration,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig { deadline: Duration::from_secs(2), cache_for: Duration::from_secs(1) }
    }
}

/// One readiness answer: ready when every check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyReport {
    pub ready: bool,
    /// Check name (`store`, `migrations`) to whether it passed.
    pub checks: BTreeMap<&'static str, bool>,
}

/// The readiness check of one replica's store. See the [module documentation](self).
pub struct Readiness {
    store: Arc<dyn Store>,
    config: ReadinessConfig,
    migrated: AtomicBool,
    cached: Mutex<Option<(Instant, ReadyReport)>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("engine", &self.store.engine()).field("config", &self.config).finish()
    }
}

impl Readiness {
    /// The check of `store`; `migrated` says whether its schema migrations are done (the
    /// server opens the store, migrations included, before it serves).
    pub fn new(store: Arc<dyn Store>, config: ReadinessConfig, migrated: bool) -> Readiness {
        Readiness { store, config, migrated: AtomicBool::new(migrated), cached: Mutex::new(None) }
    }

    /// Records whether the store's migrations are done.
    pub fn set_migrated(&self, done: bool) {
        self.migrated.store(done, Ordering::SeqCst);
    }

    /// The answer: the cached one while it is fresh, else a new check (at most
    /// [`ReadinessConfig::deadline`] long; concurrent callers wait for it and share it).
    pub async fn check(&self) -> ReadyReport {
        let mut cached = self.cached.lock().await;
        if let Some((at, report)) = cached.as_ref()
            && at.elapsed() < self.config.cache_for
        {
            return report.clone();
        }
        let store = match tokio::time::timeout(self.config.deadline, self.store.get(PROBE.0, PROBE.1)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: the store refused a read");
                false
            }
            Err(_) => {
                tracing::warn!(
                    deadline_ms = self.config.deadline.as_millis() as u64,
                    "readiness: the store did not answer"
                );
                false
            }
        };
        let migrations = self.migrated.load(Ordering::SeqCst);
        let checks = BTreeMap::from([("store", store), ("migrations", migrations)]);
        let report = ReadyReport { ready: checks.values().all(|ok| *ok), checks };
        // Cached from the end of the check, so a slow store is not asked again at once.
        *cached = Some((Instant::now(), report.clone()));
        report
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{FaultyStore, MemoryStore, Reads};

    fn setup() -> (Arc<FaultyStore>, Readiness) {
        let faulty = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
        let ready = Readiness::new(faulty.clone(), ReadinessConfig::default(), true);
        (faulty, ready)
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_stops_answering_makes_it_not_ready_until_it_answers_again() {
        let (faulty, ready) = setup();
        assert!(ready.check().await.ready);
        faulty.set_reads(Reads::Hang);
        // Cached for a second: the hung store is not asked yet.
        assert!(ready.check().await.ready);
        tokio::time::advance(ReadinessConfig::default().cache_for).await;
        let started = Instant::now();
        let report = ready.check().await;
        assert!(!report.ready && !report.checks["store"] && report.checks["migrations"], "{report:?}");
        assert!(started.elapsed() <= ReadinessConfig::default().deadline, "the check waits at most its deadline");
        // Refused reads too.
        faulty.set_reads(Reads::Refuse);
        tokio::time::advance(ReadinessConfig::default().cache_for).await;
        assert!(!ready.check().await.ready);
        // The store comes back: ready again once the cached answer is stale, no restart.
        faulty.heal();
        assert!(!ready.check().await.ready, "cached");
        tokio::time::advance(ReadinessConfig::default().cache_for).await;
        assert!(ready.check().await.ready);
    }

    #[tokio::test(start_paused = true)]
    async fn migrations_not_done_is_not_ready() {
        let (_faulty, ready) = setup();
        ready.set_migrated(false);
        let report = ready.check().await;
        assert!(!report.ready && report.checks["store"] && !report.checks["migrations"], "{report:?}");
        ready.set_migrated(true);
        tokio::time::advance(ReadinessConfig::default().cache_for).await;
        assert!(ready.check().await.ready);
    }
}
