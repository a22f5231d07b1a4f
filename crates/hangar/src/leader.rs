//! This replica's leader lease (`hangar_store::lease`), run for the whole server: the
//! orchestrator's leader work follows its role, `/health/system` shows who leads, and every
//! change of leader this replica sees is published as a `LEADER_CHANGED` `system` event.
//!
//! On the JSON engine the data folder's lock already guarantees one process, so the lease
//! is taken at once at every start and never renewed (`LeaseConfig::sole_process`).

use std::sync::Arc;

use hangar_core::{Event, EventBus, EventType};
use hangar_jobs::runners::JobRunners;
use hangar_store::lease::{self, Lease, LeaseConfig, LeaseHolder, LeaseTask, Role};
use hangar_store::{Readiness, ReadinessConfig, Store};
use serde_json::json;
use tokio::sync::watch;

/// The name of the lease whose holder runs the leader work.
pub const LEADER_LEASE: &str = "leader";

/// How often the job sets are re-read (and, on the leader, dead runners' jobs recovered).
pub const JOBS_PASS: std::time::Duration = std::time::Duration::from_secs(1);

/// The job sets of this process: on a store other replicas share, this replica's liveness
/// lease (`runner.<replica id>`) and the leader's recovery of dead replicas' jobs
/// (`hangar_jobs::runners`); on a sole process's store, today's rule (unfinished jobs
/// fail at start).
pub async fn job_runners(store: Arc<dyn Store>, leadership: &Leadership) -> anyhow::Result<JobRunners> {
    if !store.shared() {
        return Ok(JobRunners::sole(store));
    }
    JobRunners::shared(store, leadership.id(), LeaseConfig::default())
        .await
        .map_err(|e| anyhow::anyhow!("job runner liveness lease: {e}"))
}

/// The running lease of this replica.
pub struct Leadership {
    id: String,
    task: LeaseTask,
}

/// Starts the lease over `store`; publishes `LEADER_CHANGED` on `bus` at every change of
/// holder this replica sees.
pub fn start(store: Arc<dyn Store>, bus: EventBus) -> anyhow::Result<Leadership> {
    let id = lease::replica_id();
    let config = LeaseConfig { sole_process: !store.shared(), ..LeaseConfig::default() };
    let lease = Lease::new(store, LEADER_LEASE, &id, config).map_err(|e| anyhow::anyhow!("leader lease: {e}"))?;
    let task = Arc::new(lease).spawn();
    let mut leader = task.leader();
    let me = id.clone();
    tokio::spawn(async move {
        while leader.changed().await.is_ok() {
            let holder = leader.borrow_and_update().clone();
            let leading = holder.as_ref().is_some_and(|h| h.holder == me);
            tracing::info!(leader = ?holder.as_ref().map(|h| &h.holder), token = ?holder.as_ref().map(|h| h.token), leading, "leader changed");
            bus.publish(Event::new(
                EventType::System,
                "LEADER_CHANGED",
                json!({
                    "leader": holder.as_ref().map(|h| &h.holder),
                    "token": holder.as_ref().map(|h| h.token),
                    "since": holder.as_ref().map(|h| h.since),
                    "replica": me,
                    "leading": leading,
                }),
            ));
        }
    });
    Ok(Leadership { id, task })
}

impl Leadership {
    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this replica leads, and its fence.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.task.role()
    }

    /// Who leads, as this replica last saw it.
    pub fn leader(&self) -> watch::Receiver<Option<LeaseHolder>> {
        self.task.leader()
    }

    /// What the API serves about this replica: readiness of `store` (opened, so its
    /// migrations are done) and who leads.
    pub fn replica(&self, store: Arc<dyn Store>) -> hangar_api::Replica {
        hangar_api::Replica {
            id: self.id().to_string(),
            readiness: Arc::new(Readiness::new(store, ReadinessConfig::default(), true)),
            leader: self.leader(),
        }
    }

    /// Stops the leader work's lease, releasing it so another replica takes over at once.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_sole_process_leads_at_once_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            hangar_store::JsonStore::open(dir.path(), hangar_store::JsonStoreOptions::default()).await.unwrap(),
        );
        let bus = EventBus::new(64);
        let mut events = bus.subscribe();
        let leadership = start(store.clone(), bus).unwrap();
        let mut role = leadership.role();
        let fence = tokio::time::timeout(std::time::Duration::from_secs(10), role.wait_for(|r| r.fence().is_some()))
            .await
            .unwrap()
            .unwrap()
            .fence()
            .cloned()
            .unwrap();
        assert_eq!(fence.holder(), leadership.id());
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
        assert_eq!(event.message, "LEADER_CHANGED");
        assert_eq!(event.body["leader"], json!(leadership.id()));
        assert_eq!(event.body["leading"], json!(true));
        leadership.shutdown().await;
        store.close().await.unwrap();
    }
}
