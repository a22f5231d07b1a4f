//! Ephemeral CI runners: one fresh VM per CI job.
//!
//! Two seams keep this crate free of HTTP frameworks and of the orchestrator:
//! - [`Provider`]: a CI service (GitHub Actions here, in [`github`]; GitLab or Buildkite
//!   would implement the same trait): it verifies and reads webhook deliveries, hands out a
//!   just-in-time runner configuration, lists and removes runners, and asks for missed
//!   deliveries again.
//! - [`RunnerVms`]: where VMs come from (the binary implements it over the orchestrator's
//!   pools): take a VM of a pool, run a command in it, delete it, tell whether it exists.
//!
//! [`Runners`] is the running service: [`Runners::receive`] stores each delivery's job in
//! `runner_jobs` before the webhook is answered ([`jobs`]), and [`Runners::run`] is the
//! dispatcher and reconcile loop that runs on the leader only, with fenced writes
//! ([`dispatch`]).

pub mod dispatch;
pub mod github;
pub mod jobs;
pub mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::{Classify, ErrorKind};

pub use dispatch::{Runners, RunnersConfig};
pub use jobs::{JobState, RunnerJob};

/// A secret text (a JIT runner configuration, a token): never printed by `Debug` or
/// `Display`, never serialised.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

/// A pool as the dispatcher needs it: the labels it serves and how long a job may hold a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub labels: Vec<String>,
    pub job_timeout: Duration,
}

impl PoolSpec {
    /// Whether a job asking for `job_labels` (`runs-on`) runs on this pool: every label of
    /// the job is one of the pool's or `self-hosted`, and at least one is the pool's
    /// (compared without case, as GitHub does).
    pub fn serves(&self, job_labels: &[String]) -> bool {
        let mine = |l: &String| self.labels.iter().any(|p| p.eq_ignore_ascii_case(l));
        !job_labels.is_empty()
            && job_labels.iter().all(|l| l.eq_ignore_ascii_case("self-hosted") || mine(l))
            && job_labels.iter().any(mine)
    }
}

/// A VM given to a runner, by its name (unique; the orchestrator finds a VM by id or name).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// What a command run in a VM gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A failure of a [`RunnerVms`] call.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM {0} not found")]
    NotFound(String),
    #[error("Runner pool {0} not found")]
    NoPool(String),
    /// No room now (no capacity, or the pool at its maximum): the job waits, its tries are
    /// not counted.
    #[error("No room for a runner VM now: {0}")]
    NoRoom(String),
    #[error("{0}")]
    Failed(String),
}

/// Where runner VMs come from. Implemented by the binary over the orchestrator.
#[async_trait]
pub trait RunnerVms: Send + Sync + 'static {
    /// The pools runners may use now.
    async fn pools(&self) -> Result<Vec<PoolSpec>, VmError>;
    /// Take a VM of `pool` named `name`, booted and exec-ready.
    async fn claim(&self, pool: &str, name: &str) -> Result<VmRef, VmError>;
    /// Run `command` (a shell line) in the VM with `env` in its environment. The values of
    /// `env` are secrets: an implementation passes them to the guest only, never to a log,
    /// the audit log or a record.
    async fn exec(
        &self,
        vm: &VmRef,
        command: &str,
        env: &BTreeMap<String, Secret>,
        timeout: Duration,
    ) -> Result<ExecResult, VmError>;
    /// Delete the VM; one that is already gone answers `Ok`.
    async fn delete(&self, vm: &VmRef) -> Result<(), VmError>;
    /// Whether the VM still exists.
    async fn exists(&self, vm: &VmRef) -> Result<bool, VmError>;
}

/// One webhook request as the HTTP layer received it.
#[derive(Debug, Clone, Default)]
pub struct WebhookRequest {
    /// Header names lowercase.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl WebhookRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What a job's delivery says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobAction {
    Queued,
    Waiting,
    InProgress,
    Completed,
}

/// A job event of a delivery, provider-neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub delivery_id: String,
    pub job_id: u64,
    pub run_id: u64,
    pub action: JobAction,
    pub labels: Vec<String>,
    /// `owner/name`.
    pub repository: String,
    pub runner_name: Option<String>,
    pub conclusion: Option<String>,
}

/// A verified delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Job(JobEvent),
    /// A delivery of another kind (a `ping`, ...): verified, answered, not stored.
    Other {
        delivery_id: String,
        event: String,
    },
}

/// A runner the CI service knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRunner {
    pub id: u64,
    pub name: String,
    pub online: bool,
    pub busy: bool,
}

/// A just-in-time runner configuration: the runner's id at the CI service and the secret
/// configuration the runner starts with.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub runner_id: u64,
    pub config: Secret,
}

/// A CI service runners are started for.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `github`, ...
    fn name(&self) -> &'static str;
    /// The environment variable the runner reads its JIT configuration from in the guest.
    fn config_env(&self) -> &'static str;
    /// Verify a delivery's signature and read it.
    fn parse(&self, req: &WebhookRequest) -> Result<Delivery, RunnerError>;
    /// A one-use runner configuration for a runner named `name` with `labels`.
    async fn runner_config(&self, name: &str, labels: &[String]) -> Result<RunnerConfig, RunnerError>;
    /// Every runner of the configured scope.
    async fn runners(&self) -> Result<Vec<RemoteRunner>, RunnerError>;
    /// Remove a runner; one already gone answers `Ok`.
    async fn remove_runner(&self, id: u64) -> Result<(), RunnerError>;
    /// Ask again for the job deliveries that failed since `since` (Hangar was down) and
    /// whose ids `known` does not hold; answers how many were asked for.
    async fn redeliver_missed(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        known: &std::collections::HashSet<String>,
    ) -> Result<usize, RunnerError>;
}

/// Errors of the runners service.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A delivery without a valid signature.
    #[error("The webhook signature is missing or wrong (X-Hub-Signature-256 with the configured secret)")]
    BadSignature,
    #[error("{0}")]
    Invalid(String),
    #[error("GitHub answered {status} to {what}: {message}")]
    Api { what: String, status: u16, message: String },
    #[error("GitHub rate limit: {0}")]
    RateLimited(String),
    #[error("Cannot reach the CI service: {0}")]
    Transport(String),
    #[error("GitHub App authentication: {0}")]
    Auth(String),
    #[error("Store: {0}")]
    Store(#[from] hangar_store::StoreError),
    #[error("VM: {0}")]
    Vm(#[from] VmError),
}

impl Classify for RunnerError {
    fn kind(&self) -> ErrorKind {
        match self {
            RunnerError::BadSignature => ErrorKind::Unauthenticated,
            RunnerError::Invalid(_) => ErrorKind::BadRequest,
            // A store that refuses the write: GitHub redelivers on a 5xx.
            RunnerError::Store(_) => ErrorKind::Unavailable,
            RunnerError::RateLimited(_) => ErrorKind::TooManyRequests,
            _ => ErrorKind::Unavailable,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_serves_jobs_whose_labels_it_has() {
        let p = PoolSpec { name: "p".into(), labels: vec!["macos-14".into()], job_timeout: Duration::from_secs(1) };
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(p.serves(&l(&["self-hosted", "macos-14"])));
        assert!(p.serves(&l(&["MacOS-14"])));
        assert!(!p.serves(&l(&["self-hosted"])), "needs one of the pool's own labels");
        assert!(!p.serves(&l(&["self-hosted", "macos-14", "gpu"])));
        assert!(!p.serves(&l(&["ubuntu-latest"])));
        assert!(!p.serves(&[]));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("abc");
        assert!(!format!("{s:?}").contains("abc"));
        assert_eq!(s.expose(), "abc");
    }
}
