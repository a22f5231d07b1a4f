//! Jobs: long operations with weighted steps, percent done, ETA, and a final result or
//! error. Every change is published on the event bus (`job_manager`), addressed to the
//! job's owner.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use hangar_core::{Event, EventBus, EventType};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobStep {
    pub name: String,
    pub weight: u32,
    pub state: JobState,
    /// 0..=100 within the step.
    pub current_percentage: f64,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
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
}

/// All jobs of this process.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Mutex<BTreeMap<String, Job>>>,
    bus: EventBus,
}

/// A handle to update one job.
#[derive(Clone)]
pub struct JobHandle {
    jobs: Jobs,
    pub id: String,
}

impl Jobs {
    pub fn new(bus: EventBus) -> Self {
        Jobs { inner: Arc::default(), bus }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a job with the given `(step name, weight)` list.
    pub fn start(&self, owner: &str, job_type: &str, operation: &str, steps: &[(&str, u32)]) -> JobHandle {
        let now = Utc::now();
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
        };
        let id = job.id.clone();
        self.lock().insert(id.clone(), job.clone());
        self.publish(&job, "JOB_CREATED");
        JobHandle { jobs: self.clone(), id }
    }

    fn publish(&self, job: &Job, message: &str) {
        let body = serde_json::to_value(job).unwrap_or(Value::Null);
        self.bus.publish(Event::new(EventType::JobManager, message, body).for_user(job.owner.clone()));
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().get(id).cloned()
    }

    /// Jobs of one owner, or all when `owner` is `None`.
    pub fn list(&self, owner: Option<&str>) -> Vec<Job> {
        self.lock().values().filter(|j| owner.is_none_or(|o| j.owner == o)).cloned().collect()
    }

    /// Remove a finished job. `Err` names why not.
    pub fn remove(&self, id: &str) -> Result<(), &'static str> {
        let mut m = self.lock();
        match m.get(id) {
            None => Err("not found"),
            Some(j) if matches!(j.state, JobState::Pending | JobState::Running) => Err("still running"),
            Some(_) => {
                m.remove(id);
                Ok(())
            }
        }
    }

    fn update(&self, id: &str, message: &str, f: impl FnOnce(&mut Job)) {
        let snapshot = {
            let mut m = self.lock();
            let Some(job) = m.get_mut(id) else { return };
            f(job);
            let total: u32 = job.steps.iter().map(|s| s.weight).sum();
            let done: f64 = job.steps.iter().map(|s| s.weight as f64 * s.current_percentage / 100.0).sum();
            job.progress = if total == 0 { 0.0 } else { (done * 100.0 / total as f64).clamp(0.0, 100.0) };
            let elapsed = (Utc::now() - job.created_at).num_milliseconds().max(1) as f64 / 1000.0;
            job.eta_seconds = (job.progress > 0.0 && job.progress < 100.0)
                .then(|| (elapsed * (100.0 - job.progress) / job.progress).round() as u64);
            job.updated_at = Utc::now();
            job.clone()
        };
        self.publish(&snapshot, message);
    }
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

    pub fn complete(&self, result: Value) {
        self.jobs.update(&self.id, "JOB_COMPLETED", |j| {
            j.state = JobState::Completed;
            for s in &mut j.steps {
                s.state = JobState::Completed;
                s.current_percentage = 100.0;
            }
            j.result = Some(result);
            j.message = "done".into();
        });
    }

    pub fn fail(&self, error: String) {
        self.jobs.update(&self.id, "JOB_FAILED", |j| {
            j.state = JobState::Failed;
            for s in &mut j.steps {
                if s.state == JobState::Running {
                    s.state = JobState::Failed;
                }
            }
            j.message = error.clone();
            j.error = Some(error);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_weighted_and_finishes_at_100() {
        let jobs = Jobs::new(EventBus::default());
        let h = jobs.start("u", "vm", "create", &[("copy", 3), ("boot", 1)]);
        h.step(0, 50.0, "copying");
        let j = jobs.get(&h.id).unwrap();
        assert!((j.progress - 37.5).abs() < 0.01, "{}", j.progress);
        h.step(1, 0.0, "booting");
        assert!((jobs.get(&h.id).unwrap().progress - 75.0).abs() < 0.01);
        assert_eq!(jobs.remove(&h.id), Err("still running"));
        h.complete(serde_json::json!({"id": "x"}));
        let j = jobs.get(&h.id).unwrap();
        assert_eq!((j.state, j.progress as u32), (JobState::Completed, 100));
        assert_eq!(jobs.list(Some("other")).len(), 0);
        assert!(jobs.remove(&h.id).is_ok());
    }
}
