//! The durable records: `runner_jobs/<provider>-<job id>` (what the CI service said about
//! a job and what Hangar did for it; never a JIT configuration or a token) and
//! `runner_deliveries/<delivery id>` (one per delivery taken, written in the same batch as
//! the job, so a replayed delivery changes nothing).

use chrono::{DateTime, Utc};
use hangar_store::{Batch, Fence, FencedBatch, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{JobAction, JobEvent, RunnerError, VmRef};

/// Store collection of jobs.
pub const JOBS: &str = "runner_jobs";
/// Store collection of the deliveries taken.
pub const DELIVERIES: &str = "runner_deliveries";

/// What Hangar did for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a VM (or for a pool that serves its labels).
    Queued,
    /// A VM is being taken and the runner started (the VM's name is recorded first).
    Assigning,
    /// The runner was started in the VM.
    Assigned,
    /// GitHub says the job runs on Hangar's runner.
    Running,
    /// Finished and cleaned up (the VM deleted).
    Done,
    /// Failed or timed out, cleaned up.
    Failed,
    /// Not Hangar's (no pool serves its labels, or first seen after it had started).
    Ignored,
}

impl JobState {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigning => "assigning",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Ignored => "ignored",
        }
    }

    /// Whether Hangar has nothing more to do for the job.
    pub fn is_final(&self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Ignored)
    }
}

/// One CI job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerJob {
    pub provider: String,
    pub job_id: u64,
    pub run_id: u64,
    pub repository: String,
    pub labels: Vec<String>,
    /// The furthest status the CI service reported.
    pub reported: JobAction,
    #[serde(default)]
    pub conclusion: Option<String>,
    /// The runner the CI service says ran the job.
    #[serde(default)]
    pub reported_runner: Option<String>,
    pub state: JobState,
    #[serde(default)]
    pub pool: Option<String>,
    /// Hangar's runner for the job (also the VM's name).
    #[serde(default)]
    pub runner_name: Option<String>,
    #[serde(default)]
    pub runner_id: Option<u64>,
    #[serde(default)]
    pub vm: Option<VmRef>,
    #[serde(default)]
    pub error: Option<String>,
    /// Runner starts tried.
    #[serde(default)]
    pub attempts: u32,
    pub queued_at: DateTime<Utc>,
    #[serde(default)]
    pub assigned_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub online_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunnerJob {
    /// The record's id.
    pub fn key(&self) -> String {
        key(&self.provider, self.job_id)
    }
}

pub fn key(provider: &str, job_id: u64) -> String {
    format!("{provider}-{job_id}")
}

/// The outcome of storing a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The delivery had been taken before: nothing changed.
    pub duplicate: bool,
    /// The job as stored after the delivery.
    pub job: RunnerJob,
    /// The job's record is new.
    pub new: bool,
    /// The state before this delivery.
    pub before: Option<JobState>,
}

/// What a delivery makes of a job's record.
fn merge(old: Option<RunnerJob>, provider: &str, ev: &JobEvent, now: DateTime<Utc>) -> RunnerJob {
    match old {
        None => RunnerJob {
            provider: provider.to_string(),
            job_id: ev.job_id,
            run_id: ev.run_id,
            repository: ev.repository.clone(),
            labels: ev.labels.clone(),
            reported: ev.action,
            conclusion: ev.conclusion.clone(),
            reported_runner: ev.runner_name.clone(),
            // First seen after it started: another runner has it.
            state: if ev.action <= JobAction::Waiting { JobState::Queued } else { JobState::Ignored },
            pool: None,
            runner_name: None,
            runner_id: None,
            vm: None,
            error: None,
            attempts: 0,
            queued_at: now,
            assigned_at: None,
            online_at: None,
            finished_at: if ev.action == JobAction::Completed { Some(now) } else { None },
        },
        Some(mut j) => {
            // Deliveries may arrive out of order: the job's status only moves forward.
            if ev.action > j.reported {
                j.reported = ev.action;
            }
            if ev.runner_name.is_some() {
                j.reported_runner = ev.runner_name.clone();
            }
            if ev.conclusion.is_some() {
                j.conclusion = ev.conclusion.clone();
            }
            let ours = j.runner_name.is_some() && j.reported_runner == j.runner_name;
            if ev.action == JobAction::InProgress && ours && matches!(j.state, JobState::Assigning | JobState::Assigned)
            {
                j.state = JobState::Running;
                j.online_at.get_or_insert(now);
            }
            j
        }
    }
}

/// Store one job delivery: the job's record and the delivery's, in one batch whose
/// conditions make a replay (same delivery id) change nothing and two deliveries of one job
/// at once both land, one after the other.
pub async fn store_delivery(store: &dyn Store, provider: &str, ev: &JobEvent) -> Result<Stored, RunnerError> {
    let id = key(provider, ev.job_id);
    let delivery = format!("{provider}-{}", ev.delivery_id);
    for _ in 0..10 {
        if store.get(DELIVERIES, &delivery).await?.is_some() {
            let job = read(store, &id).await?.map(|(j, _)| j);
            if let Some(job) = job {
                return Ok(Stored { duplicate: true, before: Some(job.state), job, new: false });
            }
        }
        let old = read(store, &id).await?;
        let before = old.as_ref().map(|(j, _)| j.state);
        let revision = old.as_ref().map(|(_, r)| *r);
        let job = merge(old.map(|(j, _)| j), provider, ev, Utc::now());
        let mut batch = Batch::new()
            .require_absent(DELIVERIES, &delivery)
            .put(DELIVERIES, &delivery, json!({"job": id, "at": Utc::now()}))
            .put(JOBS, &id, serde_json::to_value(&job).map_err(|e| RunnerError::Invalid(e.to_string()))?);
        batch = match revision {
            Some(r) => batch.require_revision(JOBS, &id, r),
            None => batch.require_absent(JOBS, &id),
        };
        match store.commit(batch).await {
            Ok(_) => return Ok(Stored { duplicate: false, new: before.is_none(), before, job }),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(RunnerError::Store(StoreError::Conflict(format!("job {id} kept changing"))))
}

/// A job's record and its revision.
pub async fn read(store: &dyn Store, id: &str) -> Result<Option<(RunnerJob, u64)>, RunnerError> {
    match store.get(JOBS, id).await? {
        Some(r) => {
            let j = serde_json::from_value(r.value)
                .map_err(|e| RunnerError::Invalid(format!("runner job {id} is unreadable: {e}")))?;
            Ok(Some((j, r.revision)))
        }
        None => Ok(None),
    }
}

/// Every job.
pub async fn list(store: &dyn Store) -> Result<Vec<RunnerJob>, RunnerError> {
    Ok(store.list(JOBS).await?.into_iter().filter_map(|r| serde_json::from_value(r.value).ok()).collect())
}

/// Whether a delivery was taken.
pub async fn delivery_known(store: &dyn Store, provider: &str, delivery_id: &str) -> Result<bool, RunnerError> {
    Ok(store.get(DELIVERIES, &format!("{provider}-{delivery_id}")).await?.is_some())
}

/// Change a job with `f` under the leader's fence, re-reading it when a delivery changed it
/// meanwhile. Answers the job as written, or `None` when `f` declines (answers `false`).
pub async fn update(
    store: &dyn Store,
    fence: &Fence,
    id: &str,
    mut f: impl FnMut(&mut RunnerJob) -> bool,
) -> Result<Option<RunnerJob>, RunnerError> {
    for _ in 0..10 {
        let Some((mut job, revision)) = read(store, id).await? else { return Ok(None) };
        if !f(&mut job) {
            return Ok(None);
        }
        let value = serde_json::to_value(&job).map_err(|e| RunnerError::Invalid(e.to_string()))?;
        let batch = Batch::new().require_revision(JOBS, id, revision).put(JOBS, id, value).fenced(fence);
        match store.commit(batch).await {
            Ok(_) => return Ok(Some(job)),
            Err(StoreError::Conflict(_)) => {
                // A delivery changed the job, or this replica lost the lease: read again
                // (a lost lease fails again and ends here).
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(RunnerError::Store(StoreError::Conflict(format!("job {id}: the write kept being refused"))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(action: JobAction, delivery: &str) -> JobEvent {
        JobEvent {
            delivery_id: delivery.into(),
            job_id: 7,
            run_id: 1,
            action,
            labels: vec!["self-hosted".into(), "x".into()],
            repository: "o/r".into(),
            runner_name: None,
            conclusion: None,
        }
    }

    #[tokio::test]
    async fn a_replayed_delivery_changes_nothing_and_status_only_moves_forward() {
        let store = hangar_store::MemoryStore::new();
        let a = store_delivery(&store, "github", &ev(JobAction::Queued, "d1")).await.unwrap();
        assert!(a.new && !a.duplicate);
        let b = store_delivery(&store, "github", &ev(JobAction::Queued, "d1")).await.unwrap();
        assert!(b.duplicate);
        let c = store_delivery(&store, "github", &ev(JobAction::Completed, "d2")).await.unwrap();
        assert_eq!(c.job.reported, JobAction::Completed);
        let d = store_delivery(&store, "github", &ev(JobAction::InProgress, "d3")).await.unwrap();
        assert_eq!(d.job.reported, JobAction::Completed, "a late in_progress does not move it back");
        assert_eq!(list(&store).await.unwrap().len(), 1);
        assert_eq!(store.list(DELIVERIES).await.unwrap().len(), 3);
    }
}
