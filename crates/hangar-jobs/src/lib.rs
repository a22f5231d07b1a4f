//! Jobs: long operations with weighted steps, percent done, ETA, and a final result or
//! error. Every change is published on the event bus (`job_manager`), addressed to the
//! job's owner.
//!
//! Jobs are records in the store (one collection per job set): a job is committed when it
//! starts, before anyone is told its id, and again when it reaches a terminal state
//! (completed or failed). Progress in between lives only in memory and on the bus.
//!
//! Recovery after a crash depends on who else uses the store:
//!
//! * A sole process ([`Jobs::open`], the JSON engine): on open, a job the store still has
//!   as pending or running was cut short by a restart: it is marked failed, with
//!   [`RESTART_ERROR`], and committed.
//! * Several replicas on one database ([`Jobs::open_shared`], through [`runners`]): each
//!   job records its runner (the replica id), each replica keeps a liveness lease, and
//!   only the leader marks failed (with [`RUNNER_LOST_ERROR`]) the unfinished jobs of a
//!   runner whose liveness lease it has seen lapse, in fenced batches; a replica's start
//!   touches no job. Every replica re-reads the set each second ([`Jobs::refresh`]), so
//!   any replica answers for jobs another one runs (their progress between start and
//!   finish stays with their runner).
//!
//! Retention: a finished job is kept for [`RETENTION`] (24 h) after it finished
//! (`updated_at`), then removed from memory and the store. Pruning is lazy: it happens when
//! the set is opened and in the same commit that starts a new job, so an idle server does
//! no work for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeDelta, Utc};
use hangar_core::{Classify, ErrorKind, Event, EventBus, EventType};
use hangar_store::{Batch, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;

/// How long a finished job is kept after it finished.
pub const RETENTION: TimeDelta = TimeDelta::hours(24);

/// The error of a job that was pending or running when the server stopped.
pub const RESTART_ERROR: &str = "The server restarted before the job finished; its outcome is unknown: check the machine list, and start the job again if needed";

/// The error of a job whose runner (another replica) stopped before it finished.
pub const RUNNER_LOST_ERROR: &str = "The replica that ran this job stopped before the job finished; its outcome is unknown: check the machine list, and start the job again if needed";

pub mod runners;

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("Cannot record the job in the store: {0}")]
    Store(#[from] StoreError),
    #[error("Job {0:?} not found")]
    NotFound(String),
    #[error("Job {0} is still running; delete it once it has finished")]
    Running(String),
}

impl Classify for JobsError {
    fn kind(&self) -> ErrorKind {
        match self {
            JobsError::NotFound(_) => ErrorKind::NotFound,
            JobsError::Running(_) | JobsError::Store(StoreError::Conflict(_)) => ErrorKind::Conflict,
            JobsError::Store(StoreError::Closed) => ErrorKind::Unavailable,
            JobsError::Store(_) => ErrorKind::Internal,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStep {
    pub name: String,
    pub weight: u32,
    pub state: JobState,
    /// 0..=100 within the step.
    pub current_percentage: f64,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub owner: String,
    pub job_type: String,
    pub job_operation: String,
    pub state: JobState,
    /// 0..=100 over all steps, by weight.
    pub progress: f64,
    pub message: String,
    pub steps: Vec<JobStep>,
    /// Seconds left, estimated from the progress so far.
    pub eta_seconds: Option<u64>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The replica that runs the job, when several replicas share the store (absent for a
    /// sole process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

/// One set of jobs (the host's, or the orchestrator's), kept in one store collection.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Mutex<BTreeMap<String, Job>>>,
    store: Arc<dyn Store>,
    collection: String,
    bus: EventBus,
    /// This replica's id when several replicas share the store; `None`: a sole process.
    runner: Option<String>,
}

/// A handle to update one job.
#[derive(Clone)]
pub struct JobHandle {
    jobs: Jobs,
    pub id: String,
}

/// Recompute progress, ETA and `updated_at` after a change.
fn refresh(job: &mut Job, now: DateTime<Utc>) {
    let total: u32 = job.steps.iter().map(|s| s.weight).sum();
    let done: f64 = job.steps.iter().map(|s| s.weight as f64 * s.current_percentage / 100.0).sum();
    job.progress = if total == 0 { 0.0 } else { (done * 100.0 / total as f64).clamp(0.0, 100.0) };
    let elapsed = (now - job.created_at).num_milliseconds().max(1) as f64 / 1000.0;
    job.eta_seconds = (job.progress > 0.0 && job.progress < 100.0)
        .then(|| (elapsed * (100.0 - job.progress) / job.progress).round() as u64);
    job.updated_at = now;
}

fn to_value(job: &Job) -> Value {
    serde_json::to_value(job).unwrap_or(Value::Null)
}

impl Jobs {
    /// Open the job set kept in `collection`: load it, mark the jobs a restart cut short as
    /// failed, drop the expired ones, and commit both before answering.
    pub async fn open(store: Arc<dyn Store>, collection: &str, bus: EventBus) -> Result<Jobs, JobsError> {
        Self::open_at(store, collection, bus, Utc::now()).await
    }

    async fn open_at(
        store: Arc<dyn Store>,
        collection: &str,
        bus: EventBus,
        now: DateTime<Utc>,
    ) -> Result<Jobs, JobsError> {
        let mut map = BTreeMap::new();
        let mut batch = Batch::new();
        for record in store.list(collection).await? {
            let mut job: Job = match serde_json::from_value(record.value) {
                Ok(j) => j,
                Err(e) => {
                    warn!(collection, id = %record.id, error = %e, "unreadable job record removed");
                    batch = batch.delete(collection, &record.id);
                    continue;
                }
            };
            if !job.state.is_finished() {
                job.state = JobState::Failed;
                for s in &mut job.steps {
                    if s.state == JobState::Running {
                        s.state = JobState::Failed;
                    }
                }
                job.message = RESTART_ERROR.into();
                job.error = Some(RESTART_ERROR.into());
                job.eta_seconds = None;
                job.updated_at = now;
                batch = batch.put(collection, &record.id, to_value(&job));
            }
            map.insert(record.id, job);
        }
        let expired = expired(&map, now);
        for id in &expired {
            map.remove(id);
            batch = batch.delete(collection, id);
        }
        if !batch.is_empty() {
            store.commit(batch).await?;
        }
        Ok(Jobs { inner: Arc::new(Mutex::new(map)), store, collection: collection.into(), bus, runner: None })
    }

    /// Open the job set kept in `collection` on a store other replicas share, as the
    /// replica `runner`: load it and drop the expired jobs, but mark nothing failed (other
    /// replicas may be running the unfinished ones; the leader recovers a dead runner's,
    /// see [`runners`]). Jobs this set starts record `runner`.
    pub async fn open_shared(
        store: Arc<dyn Store>,
        collection: &str,
        bus: EventBus,
        runner: &str,
    ) -> Result<Jobs, JobsError> {
        hangar_store::validate_key("runner id", runner)?;
        let now = Utc::now();
        let mut map = BTreeMap::new();
        for record in store.list(collection).await? {
            match serde_json::from_value::<Job>(record.value) {
                Ok(job) => {
                    map.insert(record.id, job);
                }
                Err(e) => warn!(collection, id = %record.id, error = %e, "unreadable job record left alone"),
            }
        }
        let expired = expired(&map, now);
        if !expired.is_empty() {
            let batch = expired.iter().fold(Batch::new(), |b, id| b.delete(collection, id));
            store.commit(batch).await?;
            for id in &expired {
                map.remove(id);
            }
        }
        Ok(Jobs {
            inner: Arc::new(Mutex::new(map)),
            store,
            collection: collection.into(),
            bus,
            runner: Some(runner.to_string()),
        })
    }

    /// The store collection of this set.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// This replica's id when the set is shared with other replicas.
    pub fn runner(&self) -> Option<&str> {
        self.runner.as_deref()
    }

    /// Takes in what the store says now (a shared set: other replicas' jobs, their
    /// outcomes, removals). This replica's own unfinished jobs keep their live progress
    /// unless the store says they finished (the leader marked them failed, or they
    /// finished); its own jobs missing from the store stay while unfinished (a start's
    /// commit may have raced with the read). A sole process has nothing to take in.
    pub async fn refresh(&self) -> Result<(), JobsError> {
        let Some(me) = self.runner.clone() else { return Ok(()) };
        let mut stored = BTreeMap::new();
        for record in self.store.list(&self.collection).await? {
            if let Ok(job) = serde_json::from_value::<Job>(record.value) {
                stored.insert(record.id, job);
            }
        }
        let mut m = self.lock();
        m.retain(|id, job| {
            stored.contains_key(id) || (job.runner.as_deref() == Some(me.as_str()) && !job.state.is_finished())
        });
        for (id, job) in stored {
            match m.get(&id) {
                Some(mine) if mine.runner.as_deref() == Some(me.as_str()) && !job.state.is_finished() => {}
                // This replica finished it; the store will say so once its commit is read.
                Some(mine) if mine.runner.as_deref() == Some(me.as_str()) && mine.state.is_finished() => {}
                _ => {
                    m.insert(id, job);
                }
            }
        }
        Ok(())
    }

    /// Marks failed, with [`RUNNER_LOST_ERROR`], every unfinished job of this set the store
    /// records as run by `runner` (`None`: jobs that record no runner), in one batch that
    /// requires each job unchanged since it was read and is passed through `guard` (the
    /// fences of the leader doing it). Answers the jobs marked. [`JobsError::Store`] with a
    /// conflict: something changed meanwhile (nothing was written; try again).
    pub async fn recover(
        &self,
        runner: Option<&str>,
        guard: impl FnOnce(Batch) -> Batch,
    ) -> Result<Vec<Job>, JobsError> {
        let now = Utc::now();
        let mut batch = Batch::new();
        let mut marked = Vec::new();
        for record in self.store.list(&self.collection).await? {
            let Ok(mut job) = serde_json::from_value::<Job>(record.value) else { continue };
            if job.state.is_finished() || job.runner.as_deref() != runner {
                continue;
            }
            job.state = JobState::Failed;
            for s in &mut job.steps {
                if s.state == JobState::Running {
                    s.state = JobState::Failed;
                }
            }
            job.message = RUNNER_LOST_ERROR.into();
            job.error = Some(RUNNER_LOST_ERROR.into());
            job.eta_seconds = None;
            job.updated_at = now;
            batch = batch.require_revision(&self.collection, &record.id, record.revision).put(
                &self.collection,
                &record.id,
                to_value(&job),
            );
            marked.push(job);
        }
        if marked.is_empty() {
            return Ok(marked);
        }
        self.store.commit(guard(batch)).await?;
        {
            let mut m = self.lock();
            for job in &marked {
                m.insert(job.id.clone(), job.clone());
            }
        }
        for job in &marked {
            warn!(collection = %self.collection, job = %job.id, runner = ?runner, "job of a stopped replica marked failed");
            self.publish(job, "JOB_FAILED");
        }
        Ok(marked)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a job with the given `(step name, weight)` list. When this returns `Ok`, the
    /// job is in the store (with the expired jobs removed in the same commit).
    pub async fn start(
        &self,
        owner: &str,
        job_type: &str,
        operation: &str,
        steps: &[(&str, u32)],
    ) -> Result<JobHandle, JobsError> {
        self.start_at(owner, job_type, operation, steps, Utc::now()).await
    }

    async fn start_at(
        &self,
        owner: &str,
        job_type: &str,
        operation: &str,
        steps: &[(&str, u32)],
        now: DateTime<Utc>,
    ) -> Result<JobHandle, JobsError> {
        let job = Job {
            id: uuid::Uuid::now_v7().to_string(),
            owner: owner.into(),
            job_type: job_type.into(),
            job_operation: operation.into(),
            state: JobState::Pending,
            progress: 0.0,
            message: String::new(),
            steps: steps
                .iter()
                .map(|(n, w)| JobStep {
                    name: n.to_string(),
                    weight: (*w).max(1),
                    state: JobState::Pending,
                    current_percentage: 0.0,
                    message: String::new(),
                })
                .collect(),
            eta_seconds: None,
            result: None,
            error: None,
            created_at: now,
            updated_at: now,
            runner: self.runner.clone(),
        };
        let expired = expired(&self.lock(), now);
        let mut batch =
            Batch::new().require_absent(&self.collection, &job.id).put(&self.collection, &job.id, to_value(&job));
        for id in &expired {
            batch = batch.delete(&self.collection, id);
        }
        self.store.commit(batch).await?;
        let id = job.id.clone();
        {
            let mut m = self.lock();
            for e in &expired {
                m.remove(e);
            }
            m.insert(id.clone(), job.clone());
        }
        self.publish(&job, "JOB_CREATED");
        Ok(JobHandle { jobs: self.clone(), id })
    }

    fn publish(&self, job: &Job, message: &str) {
        self.bus.publish(Event::new(EventType::JobManager, message, to_value(job)).for_user(job.owner.clone()));
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().get(id).cloned()
    }

    /// Jobs of one owner, or all when `owner` is `None`.
    pub fn list(&self, owner: Option<&str>) -> Vec<Job> {
        self.lock().values().filter(|j| owner.is_none_or(|o| j.owner == o)).cloned().collect()
    }

    /// The jobs `p` may see ([`hangar_core::vm::may_see_job`]).
    pub fn list_for(&self, p: &hangar_core::Principal) -> Vec<Job> {
        self.lock().values().filter(|j| hangar_core::vm::may_see_job(p, &j.owner)).cloned().collect()
    }

    /// One job, if `p` may see it (a job it may not see is not found).
    pub fn get_for(&self, p: &hangar_core::Principal, id: &str) -> Result<Job, JobsError> {
        self.get(id).filter(|j| hangar_core::vm::may_see_job(p, &j.owner)).ok_or_else(|| JobsError::NotFound(id.into()))
    }

    /// Remove a finished job if `p` may ([`hangar_core::vm::may_delete_job`]); one it may
    /// not delete is not found.
    pub async fn remove_for(&self, p: &hangar_core::Principal, id: &str) -> Result<(), JobsError> {
        let job = self.get(id).filter(|j| hangar_core::vm::may_delete_job(p, &j.owner));
        let job = job.ok_or_else(|| JobsError::NotFound(id.into()))?;
        self.remove(&job.id).await
    }

    /// Remove every finished job `p` may delete ([`hangar_core::vm::may_delete_job`]): its
    /// own, or all with `JOB_MANAGER_DELETE`, in one batch. Running jobs stay. Answers how
    /// many went.
    pub async fn cleanup_for(&self, p: &hangar_core::Principal) -> Result<usize, JobsError> {
        let ids: Vec<String> = self
            .lock()
            .values()
            .filter(|j| j.state.is_finished() && hangar_core::vm::may_delete_job(p, &j.owner))
            .map(|j| j.id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let batch = ids.iter().fold(Batch::new(), |b, id| b.delete(&self.collection, id));
        self.store.commit(batch).await?;
        let mut m = self.lock();
        for id in &ids {
            m.remove(id);
        }
        Ok(ids.len())
    }

    /// Remove a finished job, from memory and the store.
    pub async fn remove(&self, id: &str) -> Result<(), JobsError> {
        match self.lock().get(id) {
            None => return Err(JobsError::NotFound(id.into())),
            Some(j) if !j.state.is_finished() => return Err(JobsError::Running(id.into())),
            Some(_) => {}
        }
        self.store.commit(Batch::new().delete(&self.collection, id)).await?;
        self.lock().remove(id);
        Ok(())
    }

    /// A progress change: memory and the bus only. Ignored once the job has finished.
    fn update(&self, id: &str, message: &str, f: impl FnOnce(&mut Job)) {
        let snapshot = {
            let mut m = self.lock();
            let Some(job) = m.get_mut(id) else { return };
            if job.state.is_finished() {
                return;
            }
            f(job);
            refresh(job, Utc::now());
            job.clone()
        };
        self.publish(&snapshot, message);
    }

    /// A terminal change: committed to the store first, then shown and published. A
    /// failed commit is logged and the change still shown: the job then reads as cut short
    /// by a restart after the next start.
    async fn finish(&self, id: &str, message: &str, f: impl FnOnce(&mut Job)) {
        let snapshot = {
            let m = self.lock();
            let Some(job) = m.get(id) else { return };
            if job.state.is_finished() {
                return;
            }
            let mut job = job.clone();
            f(&mut job);
            refresh(&mut job, Utc::now());
            job
        };
        if let Err(e) = self.store.commit(Batch::new().put(&self.collection, id, to_value(&snapshot))).await {
            warn!(job = id, error = %e, "the job's final state was not stored; after a restart it reads as interrupted");
        }
        self.lock().insert(id.to_string(), snapshot.clone());
        self.publish(&snapshot, message);
    }
}

/// Finished jobs that finished more than [`RETENTION`] before `now`.
fn expired(map: &BTreeMap<String, Job>, now: DateTime<Utc>) -> Vec<String> {
    map.values().filter(|j| j.state.is_finished() && now - j.updated_at > RETENTION).map(|j| j.id.clone()).collect()
}

impl JobHandle {
    /// Step `index` is at `percent`.
    pub fn step(&self, index: usize, percent: f64, message: &str) {
        self.jobs.update(&self.id, "JOB_UPDATED", |j| {
            j.state = JobState::Running;
            j.message = message.into();
            for (i, s) in j.steps.iter_mut().enumerate() {
                if i < index {
                    s.state = JobState::Completed;
                    s.current_percentage = 100.0;
                } else if i == index {
                    s.state = if percent >= 100.0 { JobState::Completed } else { JobState::Running };
                    s.current_percentage = percent.clamp(0.0, 100.0);
                    s.message = message.into();
                }
            }
        });
    }

    /// The job succeeded with `result`; committed before it is shown.
    pub async fn complete(&self, result: Value) {
        self.jobs
            .finish(&self.id, "JOB_COMPLETED", |j| {
                j.state = JobState::Completed;
                for s in &mut j.steps {
                    s.state = JobState::Completed;
                    s.current_percentage = 100.0;
                }
                j.result = Some(result);
                j.message = "done".into();
            })
            .await;
    }

    /// The job failed with `error`; committed before it is shown.
    pub async fn fail(&self, error: String) {
        self.jobs
            .finish(&self.id, "JOB_FAILED", |j| {
                j.state = JobState::Failed;
                for s in &mut j.steps {
                    if s.state == JobState::Running {
                        s.state = JobState::Failed;
                    }
                }
                j.message = error.clone();
                j.error = Some(error);
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_store::{JsonStore, JsonStoreOptions};

    async fn store(dir: &std::path::Path) -> Arc<dyn Store> {
        Arc::new(JsonStore::open(dir.join("db"), JsonStoreOptions::default()).await.unwrap())
    }

    const C: &str = "test_jobs";

    #[tokio::test]
    async fn progress_is_weighted_and_finishes_at_100() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(store(dir.path()).await, C, EventBus::default()).await.unwrap();
        let h = jobs.start("u", "vm", "create", &[("copy", 3), ("boot", 1)]).await.unwrap();
        h.step(0, 50.0, "copying");
        let j = jobs.get(&h.id).unwrap();
        assert!((j.progress - 37.5).abs() < 0.01, "{}", j.progress);
        h.step(1, 0.0, "booting");
        assert!((jobs.get(&h.id).unwrap().progress - 75.0).abs() < 0.01);
        assert!(matches!(jobs.remove(&h.id).await, Err(JobsError::Running(_))));
        h.complete(serde_json::json!({"id": "x"})).await;
        let j = jobs.get(&h.id).unwrap();
        assert_eq!((j.state, j.progress as u32), (JobState::Completed, 100));
        // A late progress report does not reopen a finished job.
        h.step(1, 10.0, "late");
        assert_eq!(jobs.get(&h.id).unwrap().state, JobState::Completed);
        assert_eq!(jobs.list(Some("other")).len(), 0);
        jobs.remove(&h.id).await.unwrap();
        assert!(matches!(jobs.remove(&h.id).await, Err(JobsError::NotFound(_))));
    }

    /// Started and finished jobs are in the store; progress is not; a reopen marks the
    /// unfinished ones failed with the restart error, and that is stored too.
    #[tokio::test]
    async fn a_reopen_marks_unfinished_jobs_failed_and_keeps_finished_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let jobs = Jobs::open(s.clone(), C, EventBus::default()).await.unwrap();
        let done = jobs.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
        done.complete(serde_json::json!({"id": "vm-1"})).await;
        let failed = jobs.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
        failed.fail("no space".into()).await;
        let running = jobs.start("v", "vm", "create", &[("a", 1), ("b", 1)]).await.unwrap();
        running.step(0, 40.0, "copying");
        let pending = jobs.start("v", "vm", "create", &[("a", 1)]).await.unwrap();
        // Progress is not committed.
        let stored: Job = serde_json::from_value(s.get(C, &running.id).await.unwrap().unwrap().value).unwrap();
        assert_eq!((stored.state, stored.progress as u32), (JobState::Pending, 0));
        drop(jobs);

        let again = Jobs::open(s.clone(), C, EventBus::default()).await.unwrap();
        let j = again.get(&done.id).unwrap();
        assert_eq!((j.state, j.result.clone()), (JobState::Completed, Some(serde_json::json!({"id": "vm-1"}))));
        assert_eq!(again.get(&failed.id).unwrap().error.as_deref(), Some("no space"));
        for id in [&running.id, &pending.id] {
            let j = again.get(id).unwrap();
            assert_eq!((j.state, j.error.as_deref(), j.owner.as_str()), (JobState::Failed, Some(RESTART_ERROR), "v"));
            let stored: Job = serde_json::from_value(s.get(C, id).await.unwrap().unwrap().value).unwrap();
            assert_eq!(stored.state, JobState::Failed, "the marking is committed");
        }
        // A removed job is gone from the store as well.
        again.remove(&done.id).await.unwrap();
        assert!(s.get(C, &done.id).await.unwrap().is_none());
        let third = Jobs::open(s, C, EventBus::default()).await.unwrap();
        assert!(third.get(&done.id).is_none());
        assert_eq!(third.list(None).len(), 3);
    }

    fn finished(id: &str, state: JobState, at: DateTime<Utc>) -> Job {
        Job {
            id: id.into(),
            owner: "u".into(),
            job_type: "vm".into(),
            job_operation: "create".into(),
            state,
            progress: 100.0,
            message: String::new(),
            steps: vec![],
            eta_seconds: None,
            result: None,
            error: None,
            created_at: at,
            updated_at: at,
            runner: None,
        }
    }

    /// A finished job goes once it finished more than RETENTION ago: when a job starts and
    /// when the set opens; younger finished jobs and unfinished ones of any age stay.
    #[tokio::test]
    async fn finished_jobs_expire_after_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let t0 = Utc::now() - TimeDelta::days(30);
        let young_at = t0 + TimeDelta::hours(20);
        let seed = Batch::new().put(C, "old", to_value(&finished("old", JobState::Completed, t0))).put(
            C,
            "young",
            to_value(&finished("young", JobState::Failed, young_at)),
        );
        s.commit(seed).await.unwrap();
        let jobs = Jobs::open_at(s.clone(), C, EventBus::default(), t0 + TimeDelta::hours(1)).await.unwrap();
        assert_eq!(jobs.list(None).len(), 2);
        let long = jobs.start_at("u", "vm", "create", &[("a", 1)], t0).await.unwrap();

        // At exactly the retention, the old job stays.
        jobs.start_at("u", "vm", "create", &[("a", 1)], t0 + RETENTION).await.unwrap();
        assert!(jobs.get("old").is_some());
        // Past it, the next start removes it from memory and the store, and only it.
        jobs.start_at("u", "vm", "create", &[("a", 1)], t0 + RETENTION + TimeDelta::seconds(1)).await.unwrap();
        assert!(jobs.get("old").is_none(), "expired in memory");
        assert!(s.get(C, "old").await.unwrap().is_none(), "expired in the store");
        assert!(jobs.get("young").is_some());
        assert!(jobs.get(&long.id).is_some(), "an unfinished job never expires");
        assert_eq!(jobs.list(None).len(), 4);

        // Opening prunes too; the jobs a restart cut short count as finished at the open.
        let later = young_at + RETENTION + TimeDelta::seconds(1);
        let reopened = Jobs::open_at(s.clone(), C, EventBus::default(), later).await.unwrap();
        assert!(reopened.get("young").is_none());
        assert!(s.get(C, "young").await.unwrap().is_none());
        let j = reopened.get(&long.id).unwrap();
        assert_eq!((j.state, j.updated_at), (JobState::Failed, later));
        assert_eq!(reopened.list(None).len(), 3);
    }
    fn principal(id: &str, claims: &[&str]) -> hangar_core::Principal {
        hangar_core::Principal {
            user_id: id.into(),
            username: id.into(),
            email: format!("{id}@x"),
            roles: Default::default(),
            claims: claims.iter().map(|c| c.to_string()).collect(),
            method: hangar_core::AuthMethod::Jwt,
        }
    }

    /// Cleanup removes the caller's finished jobs (all finished ones with JOB_MANAGER_DELETE),
    /// from memory and the store; running jobs and other owners' jobs stay.
    #[tokio::test]
    async fn cleanup_removes_the_finished_jobs_the_caller_may_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).await;
        let jobs = Jobs::open(s.clone(), C, EventBus::default()).await.unwrap();
        let mine = jobs.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
        mine.complete(serde_json::json!({})).await;
        let mine_failed = jobs.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
        mine_failed.fail("x".into()).await;
        let mine_running = jobs.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
        let theirs = jobs.start("v", "vm", "create", &[("a", 1)]).await.unwrap();
        theirs.complete(serde_json::json!({})).await;

        assert_eq!(jobs.cleanup_for(&principal("u", &[])).await.unwrap(), 2);
        assert!(jobs.get(&mine.id).is_none() && jobs.get(&mine_failed.id).is_none());
        assert!(s.get(C, &mine.id).await.unwrap().is_none(), "gone from the store");
        assert!(jobs.get(&mine_running.id).is_some(), "a running job stays");
        assert!(jobs.get(&theirs.id).is_some(), "another owner's job stays");
        assert_eq!(jobs.cleanup_for(&principal("u", &[])).await.unwrap(), 0);

        let admin = principal("w", &[hangar_core::claims::JOB_MANAGER_DELETE]);
        assert_eq!(jobs.cleanup_for(&admin).await.unwrap(), 1);
        assert!(jobs.get(&theirs.id).is_none());
        assert_eq!(jobs.list(None).len(), 1);
    }
}
