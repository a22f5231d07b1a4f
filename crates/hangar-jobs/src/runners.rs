//! Who runs which jobs when several replicas share one store, and what happens to the jobs
//! of a replica that died.
//!
//! * Every job a shared set starts records its runner, the replica id ([`Job::runner`]).
//! * Every replica holds a **liveness lease** of its own, `runner.<replica id>` in the
//!   store's lease collection ([`hangar_store::lease`]), renewed every second. A replica
//!   that stops renewing (killed, frozen, cut off from the database) lets it lapse.
//! * The **leader** (whoever holds the leader lease, given to [`JobRunners::pass`] as its
//!   fence) watches the liveness lease of every runner that has unfinished jobs, with the
//!   lease's own rule (no shared clock: unchanged for a whole lease period by the leader's
//!   monotonic clock). When it could take such a lease over, that runner is dead: the
//!   leader takes it, marks the runner's unfinished jobs failed ([`crate::RUNNER_LOST_ERROR`])
//!   in batches fenced by both its leader fence and the runner lease it took, then
//!   deletes the dead runner's lease records (fenced the same way). Jobs that record no
//!   runner (started by a sole process before the store was shared) are recovered at once.
//! * Every replica re-reads its sets each pass ([`crate::Jobs::refresh`]).
//!
//! A sole process (the JSON engine) has none of this: [`JobRunners::sole`] opens sets with
//! [`crate::Jobs::open`], which marks every unfinished job failed at start, and its passes
//! do nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hangar_core::EventBus;
use hangar_store::lease::{LEASES, Lease, LeaseConfig, LeaseTask, Role};
use hangar_store::{Batch, Fence, FencedBatch, Store, StoreError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{Jobs, JobsError};

/// The name of a replica's liveness lease.
pub fn liveness_lease(replica: &str) -> String {
    format!("runner.{replica}")
}

/// What one pass did (on the leader).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Runners found dead, with the number of jobs marked failed for each.
    pub recovered: BTreeMap<String, usize>,
    /// Jobs without a runner marked failed.
    pub orphans: usize,
    /// Runners with unfinished jobs still alive (or not yet watched for a whole period).
    pub watching: BTreeSet<String>,
}

/// The job sets of one process and, with other replicas, its liveness lease and the
/// leader's recovery of dead runners' jobs.
pub struct JobRunners {
    store: Arc<dyn Store>,
    /// This replica's id, when the store is shared.
    me: Option<String>,
    config: LeaseConfig,
    sets: Mutex<Vec<Jobs>>,
    liveness: Mutex<Option<LeaseTask>>,
    /// The leader's watches on other runners' liveness leases, kept between passes.
    watches: Mutex<BTreeMap<String, Arc<Lease>>>,
}

impl JobRunners {
    /// A sole process: sets opened with [`Jobs::open`], no liveness, passes do nothing.
    pub fn sole(store: Arc<dyn Store>) -> JobRunners {
        JobRunners {
            store,
            me: None,
            config: LeaseConfig::default(),
            sets: Mutex::new(Vec::new()),
            liveness: Mutex::new(None),
            watches: Mutex::new(BTreeMap::new()),
        }
    }

    /// The replica `me` on a store other replicas share: takes its liveness lease (timed
    /// by `config`; [`LeaseConfig::default`] in the server) before answering, so no job of
    /// this replica exists without it, and keeps it renewed in a task.
    pub async fn shared(store: Arc<dyn Store>, me: &str, config: LeaseConfig) -> Result<JobRunners, JobsError> {
        let lease = Lease::new(store.clone(), &liveness_lease(me), me, LeaseConfig { sole_process: false, ..config })?;
        if lease.try_acquire().await?.is_none() {
            return Err(JobsError::Store(StoreError::Conflict(format!(
                "the liveness lease {} is held by someone else",
                liveness_lease(me)
            ))));
        }
        let task = Arc::new(lease).spawn();
        Ok(JobRunners {
            store,
            me: Some(me.to_string()),
            config: LeaseConfig { sole_process: false, ..config },
            sets: Mutex::new(Vec::new()),
            liveness: Mutex::new(Some(task)),
            watches: Mutex::new(BTreeMap::new()),
        })
    }

    /// This replica's id when the store is shared.
    pub fn me(&self) -> Option<&str> {
        self.me.as_deref()
    }

    fn sets(&self) -> Vec<Jobs> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Opens the job set kept in `collection` ([`Jobs::open`] for a sole process,
    /// [`Jobs::open_shared`] otherwise) and keeps it for the passes.
    pub async fn open(&self, collection: &str, bus: EventBus) -> Result<Jobs, JobsError> {
        let jobs = match &self.me {
            None => Jobs::open(self.store.clone(), collection, bus).await?,
            Some(me) => Jobs::open_shared(self.store.clone(), collection, bus, me).await?,
        };
        self.sets.lock().unwrap_or_else(PoisonError::into_inner).push(jobs.clone());
        Ok(jobs)
    }

    /// One pass: re-read every set; with `leader` (this replica holds the leader lease, with
    /// this fence) also recover the jobs of runners found dead. Nothing for a sole process.
    pub async fn pass(&self, leader: Option<&Fence>) -> Result<PassReport, JobsError> {
        let mut report = PassReport::default();
        let Some(me) = self.me.clone() else { return Ok(report) };
        let sets = self.sets();
        for set in &sets {
            set.refresh().await?;
        }
        let Some(fence) = leader else {
            // A follower keeps no watches: a new leader watches for a whole period itself.
            self.watches.lock().unwrap_or_else(PoisonError::into_inner).clear();
            return Ok(report);
        };
        // Runners with unfinished jobs, and runners whose liveness lease is still recorded
        // (a dead replica's records go once seen dead, jobs or not).
        let mut runners: BTreeSet<Option<String>> = BTreeSet::new();
        for set in &sets {
            for job in set.list(None) {
                if !job.state.is_finished() {
                    runners.insert(job.runner.clone());
                }
            }
        }
        for record in self.store.list(LEASES).await? {
            if let Some(r) = record.id.strip_prefix("runner.")
                && !r.ends_with(".beat")
            {
                runners.insert(Some(r.to_string()));
            }
        }
        runners.remove(&Some(me.clone()));
        // Watches of runners that are gone from the store.
        self.watches.lock().unwrap_or_else(PoisonError::into_inner).retain(|r, _| runners.contains(&Some(r.clone())));
        for runner in runners {
            match runner {
                None => {
                    for set in &sets {
                        report.orphans += set.recover(None, |b| b.fenced(fence)).await?.len();
                    }
                }
                Some(runner) => match self.recover_if_dead(&sets, &runner, fence).await {
                    Ok(Some(n)) => {
                        report.recovered.insert(runner, n);
                    }
                    Ok(None) => {
                        report.watching.insert(runner);
                    }
                    Err(e) => {
                        debug!(%runner, error = %e, "recovery of a runner's jobs not done this pass");
                        report.watching.insert(runner);
                    }
                },
            }
        }
        Ok(report)
    }

    /// `Some(jobs marked)` when `runner`'s liveness lease lapsed (and its jobs were marked
    /// and its lease records deleted), `None` while it is alive or still being watched.
    async fn recover_if_dead(&self, sets: &[Jobs], runner: &str, fence: &Fence) -> Result<Option<usize>, JobsError> {
        let watch = {
            let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
            match watches.get(runner) {
                Some(w) => w.clone(),
                None => {
                    let w =
                        Arc::new(Lease::new(self.store.clone(), &liveness_lease(runner), fence.holder(), self.config)?);
                    watches.insert(runner.to_string(), w.clone());
                    w
                }
            }
        };
        let Some(taken) = watch.try_acquire().await? else { return Ok(None) };
        let mut marked = 0;
        for set in sets {
            marked += set.recover(Some(runner), |b| b.fenced(fence).fenced(&taken)).await?.len();
        }
        let name = liveness_lease(runner);
        let forget = Batch::new().delete(LEASES, &name).delete(LEASES, &format!("{name}.beat"));
        match self.store.commit(forget.fenced(fence).fenced(&taken)).await {
            Ok(_) => {}
            Err(StoreError::Conflict(detail)) => debug!(%runner, %detail, "a dead runner's lease records changed"),
            Err(e) => return Err(e.into()),
        }
        self.watches.lock().unwrap_or_else(PoisonError::into_inner).remove(runner);
        info!(%runner, marked, "replica found stopped: its unfinished jobs are marked failed");
        Ok(Some(marked))
    }

    /// Runs a pass every `every`, as leader while `role` says so. The task ends when the
    /// role's sender goes (the lease stopped).
    pub fn spawn(self: Arc<Self>, mut role: watch::Receiver<Role>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if self.me.is_none() {
                return;
            }
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = role.changed() => if changed.is_err() { return },
                }
                let fence = role.borrow().fence().cloned();
                if let Err(e) = self.pass(fence.as_ref()).await {
                    warn!(error = %e, "job sets not re-read this pass");
                }
            }
        })
    }

    /// Stops this replica's liveness lease, releasing it (the leader then recovers at once
    /// whatever jobs this replica leaves unfinished).
    pub async fn shutdown(&self) {
        let task = self.liveness.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            task.shutdown().await;
        }
    }
}
