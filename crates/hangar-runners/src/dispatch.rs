//! The runners service: deliveries in ([`Runners::receive`]), and the leader's loop
//! ([`Runners::spawn`]) that gives each queued job a VM and a runner, watches the runner,
//! and deletes the VM when the job completes, is cancelled, times out or the runner exits.
//!
//! Everything the loop knows is in the store (`runner_jobs`), so a restarted or a new
//! leader carries on where the last one stopped: a job caught while its VM was being taken
//! (`assigning`) is cleaned up and queued again; the runner runs detached in the guest and
//! leaves its exit code in a file the loop reads through exec.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use hangar_core::{Event, EventBus, EventType};
use hangar_store::{Batch, Fence, FencedBatch, Role, Store};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::jobs::{self, JobState, RunnerJob};
use crate::{Delivery, JobAction, PoolSpec, Provider, RunnerError, RunnerVms, VmError, VmRef, WebhookRequest};

/// The service's settings.
#[derive(Debug, Clone)]
pub struct RunnersConfig {
    /// The runner's folder in the guest (with `run.sh`); relative to the guest user's home.
    pub runner_dir: String,
    /// How often runners are checked (and queued jobs retried) without a delivery.
    pub check_interval: Duration,
    /// A runner not listed by the CI service this long after its start is removed.
    pub register_timeout: Duration,
    /// How often the CI service's runner list is compared with Hangar's VMs.
    pub reconcile_every: Duration,
    /// How often missed deliveries are asked for again.
    pub redeliver_every: Duration,
    /// Prefix of runner and VM names (`<prefix>-<job id>`).
    pub name_prefix: String,
    /// Tries to start a runner for a job before it is failed.
    pub max_attempts: u32,
}

impl Default for RunnersConfig {
    fn default() -> Self {
        RunnersConfig {
            runner_dir: "actions-runner".into(),
            check_interval: Duration::from_secs(5),
            register_timeout: Duration::from_secs(600),
            reconcile_every: Duration::from_secs(60),
            redeliver_every: Duration::from_secs(600),
            name_prefix: "hangar-runner".into(),
            max_attempts: 3,
        }
    }
}

/// The answer to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Taken before: nothing changed.
    pub duplicate: bool,
    /// The job, for job deliveries.
    pub job_id: Option<u64>,
    pub state: Option<JobState>,
    /// The delivery's event name.
    pub event: String,
}

/// The running runners service. Cheap to clone.
#[derive(Clone)]
pub struct Runners {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    provider: Arc<dyn Provider>,
    vms: Arc<dyn RunnerVms>,
    bus: EventBus,
    cfg: RunnersConfig,
    wake: Notify,
    /// Jobs a task of this process works on.
    busy: Mutex<HashSet<String>>,
}

/// Removes a job from the busy set when its task ends.
struct BusyGuard(Arc<Inner>, String);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut b) = self.0.busy.lock() {
            b.remove(&self.1);
        }
    }
}

const EXIT_FILE: &str = ".hangar-runner-exit";

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Runners {
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn Provider>,
        vms: Arc<dyn RunnerVms>,
        bus: EventBus,
        cfg: RunnersConfig,
    ) -> Runners {
        Runners {
            inner: Arc::new(Inner { store, provider, vms, bus, cfg, wake: Notify::new(), busy: Default::default() }),
        }
    }

    /// The provider's name (`github`).
    pub fn provider(&self) -> &'static str {
        self.inner.provider.name()
    }

    /// Take a delivery: verified, then its job stored durably before this returns. A replayed
    /// delivery changes nothing; a bad signature is refused before anything is read.
    pub async fn receive(&self, req: &WebhookRequest) -> Result<Received, RunnerError> {
        let inner = &self.inner;
        let ev = match inner.provider.parse(req)? {
            Delivery::Other { event, .. } => {
                return Ok(Received { duplicate: false, job_id: None, state: None, event });
            }
            Delivery::Job(ev) => ev,
        };
        let span =
            tracing::info_span!("runner_delivery", delivery = %ev.delivery_id, job = ev.job_id, action = ?ev.action);
        let stored = jobs::store_delivery(inner.store.as_ref(), inner.provider.name(), &ev).instrument(span).await?;
        if !stored.duplicate {
            let m = hangar_metrics::metrics();
            if stored.new && stored.job.state == JobState::Queued {
                m.runner_job("queued");
            }
            if stored.before != Some(JobState::Running) && stored.job.state == JobState::Running {
                m.runner_job("running");
                if let Some(online) = stored.job.online_at {
                    let secs = (online - stored.job.queued_at).num_milliseconds().max(0) as f64 / 1000.0;
                    m.runner_online(secs);
                }
            }
            publish(&inner.bus, &stored.job, &format!("delivery {:?}", ev.action));
            inner.wake.notify_one();
        }
        Ok(Received {
            duplicate: stored.duplicate,
            job_id: Some(stored.job.job_id),
            state: Some(stored.job.state),
            event: "workflow_job".into(),
        })
    }

    /// Every job record.
    pub async fn jobs(&self) -> Result<Vec<RunnerJob>, RunnerError> {
        jobs::list(self.inner.store.as_ref()).await
    }

    /// Run the leader loop while this replica leads (`role`); ends when `role` closes.
    pub fn spawn(&self, role: watch::Receiver<Role>) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(leader_loop(inner, role))
    }
}

fn publish(bus: &EventBus, job: &RunnerJob, why: &str) {
    bus.publish(Event::new(
        EventType::Runner,
        format!("RUNNER_JOB_{}", job.state.as_str().to_ascii_uppercase()),
        json!({"provider": job.provider, "job_id": job.job_id, "run_id": job.run_id, "repository": job.repository,
            "state": job.state, "reported": job.reported, "pool": job.pool, "runner": job.runner_name,
            "vm": job.vm, "error": job.error, "why": why}),
    ));
}

async fn leader_loop(inner: Arc<Inner>, mut role: watch::Receiver<Role>) {
    let mut last_redeliver: Option<Instant> = None;
    let mut last_reconcile: Option<Instant> = None;
    loop {
        let fence = role.borrow().fence().cloned();
        match fence {
            Some(fence) => {
                if last_redeliver.is_none_or(|t| t.elapsed() >= inner.cfg.redeliver_every) {
                    last_redeliver = Some(Instant::now());
                    if let Err(e) = redeliver(&inner, &fence).await {
                        tracing::warn!(error = %e, "runners: cannot ask for missed deliveries");
                    }
                }
                if let Err(e) = tick(&inner, &fence).await {
                    tracing::warn!(error = %e, "runners: dispatch pass failed");
                }
                if last_reconcile.is_none_or(|t| t.elapsed() >= inner.cfg.reconcile_every) {
                    last_reconcile = Some(Instant::now());
                    if let Err(e) = reconcile(&inner, &fence).await {
                        tracing::warn!(error = %e, "runners: reconcile with the CI service failed");
                    }
                }
            }
            None => {
                last_redeliver = None;
                last_reconcile = None;
            }
        }
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(inner.cfg.check_interval) => {}
            r = role.changed() => if r.is_err() { return },
        }
    }
}

/// One pass over the jobs that are not finished: each gets a task unless one runs already.
async fn tick(inner: &Arc<Inner>, fence: &Fence) -> Result<(), RunnerError> {
    let all = jobs::list(inner.store.as_ref()).await?;
    if all.iter().all(|j| j.state.is_final()) {
        return Ok(());
    }
    let pools = match inner.vms.pools().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "runners: cannot read the pools");
            Vec::new()
        }
    };
    for job in all.into_iter().filter(|j| !j.state.is_final()) {
        let id = job.key();
        {
            let Ok(mut busy) = inner.busy.lock() else { continue };
            if !busy.insert(id.clone()) {
                continue;
            }
        }
        let guard = BusyGuard(inner.clone(), id.clone());
        let pool = match &job.pool {
            Some(name) => pools.iter().find(|p| &p.name == name).cloned(),
            None => pools.iter().find(|p| p.serves(&job.labels)).cloned(),
        };
        let (inner, fence) = (inner.clone(), fence.clone());
        let span = tracing::info_span!("runner_job", job = job.job_id, state = job.state.as_str());
        tokio::spawn(
            async move {
                let _guard = guard;
                if let Err(e) = step(&inner, &fence, job, pool).await {
                    tracing::warn!(error = %e, "runners: job step failed; retried at the next pass");
                }
            }
            .instrument(span),
        );
    }
    Ok(())
}

/// Move one job on.
async fn step(inner: &Arc<Inner>, fence: &Fence, job: RunnerJob, pool: Option<PoolSpec>) -> Result<(), RunnerError> {
    let id = job.key();
    match job.state {
        JobState::Queued => {
            if job.reported == JobAction::Completed {
                // Cancelled (or run elsewhere) before it got a VM.
                return finish(inner, fence, &id, JobState::Ignored, Some("completed before it got a runner")).await;
            }
            match pool {
                Some(pool) => assign(inner, fence, job, pool).await,
                None => Ok(()),
            }
        }
        JobState::Assigning => {
            // A task that was taking a VM for it ended with its process: undo, then queue again.
            cleanup(inner, &job).await?;
            let again = job.reported < JobAction::InProgress && job.attempts < inner.cfg.max_attempts;
            let written = jobs::update(inner.store.as_ref(), fence, &id, |j| {
                if j.state != JobState::Assigning {
                    return false;
                }
                if again {
                    j.state = JobState::Queued;
                    j.runner_id = None;
                    j.vm = None;
                    j.error = Some("the runner's start was interrupted; queued again".into());
                } else {
                    j.state = JobState::Failed;
                    j.finished_at = Some(Utc::now());
                    j.error = Some("the runner's start was interrupted".into());
                }
                true
            })
            .await?;
            if let Some(j) = written {
                if j.state == JobState::Failed {
                    hangar_metrics::metrics().runner_job("failed");
                }
                publish(&inner.bus, &j, "recovered an interrupted start");
            }
            Ok(())
        }
        JobState::Assigned | JobState::Running => watch_runner(inner, fence, job, pool).await,
        JobState::Done | JobState::Failed | JobState::Ignored => Ok(()),
    }
}

/// Give a queued job a VM and a runner.
async fn assign(inner: &Arc<Inner>, fence: &Fence, job: RunnerJob, pool: PoolSpec) -> Result<(), RunnerError> {
    let id = job.key();
    let name = format!("{}-{}", inner.cfg.name_prefix, job.job_id);
    // The VM's name goes to the store before the VM is asked for, so a crash in between
    // leaves a name to clean up by.
    let Some(job) = jobs::update(inner.store.as_ref(), fence, &id, |j| {
        if j.state != JobState::Queued || j.reported == JobAction::Completed {
            return false;
        }
        j.state = JobState::Assigning;
        j.pool = Some(pool.name.clone());
        j.runner_name = Some(name.clone());
        j.vm = Some(VmRef { name: name.clone(), id: None, host: None });
        j.assigned_at = Some(Utc::now());
        j.attempts += 1;
        true
    })
    .await?
    else {
        return Ok(());
    };
    hangar_metrics::metrics().runner_job("assigned");
    publish(&inner.bus, &job, "taking a VM");
    match start_runner(inner, fence, &job, &pool, &name).await {
        Ok(()) => Ok(()),
        Err(RunnerError::Vm(VmError::NoRoom(why))) => {
            // Not the job's fault: it waits for room without using up a try.
            tracing::info!(job = job.job_id, %why, "runners: no room for the job's VM yet");
            jobs::update(inner.store.as_ref(), fence, &id, |j| {
                if j.state != JobState::Assigning {
                    return false;
                }
                j.state = JobState::Queued;
                j.attempts = j.attempts.saturating_sub(1);
                j.vm = None;
                j.error = Some(format!("waiting for room: {why}"));
                true
            })
            .await?;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, job = job.job_id, "runners: cannot start the job's runner");
            let fresh = jobs::read(inner.store.as_ref(), &id).await?.map(|(j, _)| j).unwrap_or(job);
            cleanup(inner, &fresh).await?;
            let again = fresh.attempts < inner.cfg.max_attempts && fresh.reported < JobAction::InProgress;
            let reason = e.to_string();
            let written = jobs::update(inner.store.as_ref(), fence, &id, |j| {
                if j.state.is_final() {
                    return false;
                }
                j.error = Some(reason.clone());
                j.vm = None;
                j.runner_id = None;
                if again {
                    j.state = JobState::Queued;
                } else {
                    j.state = JobState::Failed;
                    j.finished_at = Some(Utc::now());
                }
                true
            })
            .await?;
            if let Some(j) = written {
                if j.state == JobState::Failed {
                    hangar_metrics::metrics().runner_job("failed");
                }
                publish(&inner.bus, &j, "the runner could not start");
            }
            Ok(())
        }
    }
}

/// The guest's runner folder as a shell word.
fn runner_dir(cfg: &RunnersConfig) -> String {
    if cfg.runner_dir.starts_with('/') {
        sh_quote(&cfg.runner_dir)
    } else {
        format!("\"$HOME\"/{}", sh_quote(&cfg.runner_dir))
    }
}

async fn start_runner(
    inner: &Arc<Inner>,
    fence: &Fence,
    job: &RunnerJob,
    pool: &PoolSpec,
    name: &str,
) -> Result<(), RunnerError> {
    let id = job.key();
    let vm = inner.vms.claim(&pool.name, name).await?;
    let vm2 = vm.clone();
    jobs::update(inner.store.as_ref(), fence, &id, |j| {
        j.vm = Some(vm2.clone());
        true
    })
    .await?;
    let config = inner.provider.runner_config(name, &job.labels).await?;
    let runner_id = config.runner_id;
    jobs::update(inner.store.as_ref(), fence, &id, |j| {
        j.runner_id = Some(runner_id);
        true
    })
    .await?;
    // The runner runs detached (its job outlives this call) and leaves its exit code for
    // `watch_runner`. The configuration reaches it only through the exec's environment.
    let dir = runner_dir(&inner.cfg);
    let line = format!(
        "cd {dir} && rm -f {EXIT_FILE} && (nohup sh -c './run.sh; echo $? > {EXIT_FILE}' > .hangar-runner.log 2>&1 < /dev/null &)"
    );
    let env = BTreeMap::from([(inner.provider.config_env().to_string(), config.config)]);
    let out = inner.vms.exec(&vm, &line, &env, Duration::from_secs(120)).await?;
    if out.exit_code != 0 {
        return Err(RunnerError::Vm(VmError::Failed(format!(
            "starting the runner exited with {}: {}",
            out.exit_code,
            out.stderr.trim()
        ))));
    }
    let written = jobs::update(inner.store.as_ref(), fence, &id, |j| {
        if j.state != JobState::Assigning {
            return false;
        }
        j.state = JobState::Assigned;
        j.error = None;
        true
    })
    .await?;
    if let Some(j) = written {
        publish(&inner.bus, &j, "runner started");
    }
    tracing::info!(job = job.job_id, vm = %vm.name, pool = %pool.name, "runner started");
    Ok(())
}

/// A started runner: its VM goes when the job completed on it, when the pool's job timeout
/// passed, when the runner exited, or when the VM is gone.
async fn watch_runner(
    inner: &Arc<Inner>,
    fence: &Fence,
    job: RunnerJob,
    pool: Option<PoolSpec>,
) -> Result<(), RunnerError> {
    let id = job.key();
    let ours = job.reported_runner.is_none() || job.reported_runner == job.runner_name;
    if job.reported == JobAction::Completed && ours {
        let failed = job.conclusion.as_deref().is_some_and(|c| c != "success" && c != "skipped" && c != "neutral");
        let why = format!("job completed ({})", job.conclusion.as_deref().unwrap_or("no conclusion"));
        cleanup(inner, &job).await?;
        return finish(inner, fence, &id, if failed { JobState::Failed } else { JobState::Done }, Some(&why)).await;
    }
    let timeout = pool.map(|p| p.job_timeout).unwrap_or(Duration::from_secs(3600));
    let started = job.assigned_at.unwrap_or(job.queued_at);
    if Utc::now() - started > chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX) {
        cleanup(inner, &job).await?;
        return finish(inner, fence, &id, JobState::Failed, Some("timed out (the pool's job timeout)")).await;
    }
    let Some(vm) = &job.vm else {
        return finish(inner, fence, &id, JobState::Failed, Some("no VM recorded")).await;
    };
    if !inner.vms.exists(vm).await? {
        cleanup(inner, &job).await?;
        return finish(inner, fence, &id, JobState::Failed, Some("the VM is gone")).await;
    }
    let check = format!("cat {}/{EXIT_FILE}", runner_dir(&inner.cfg));
    let out = inner.vms.exec(vm, &check, &BTreeMap::new(), Duration::from_secs(60)).await?;
    if out.exit_code == 0
        && let Ok(code) = out.stdout.trim().parse::<i32>()
    {
        cleanup(inner, &job).await?;
        let (state, why) = if code == 0 {
            (JobState::Done, "the runner exited".to_string())
        } else {
            (JobState::Failed, format!("the runner exited with {code}"))
        };
        return finish(inner, fence, &id, state, Some(&why)).await;
    }
    Ok(())
}

/// Delete a job's VM and its runner at the CI service (both may be gone already).
async fn cleanup(inner: &Arc<Inner>, job: &RunnerJob) -> Result<(), RunnerError> {
    if let Some(vm) = &job.vm {
        match inner.vms.delete(vm).await {
            Ok(()) | Err(VmError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(rid) = job.runner_id.filter(|r| *r != 0)
        && let Err(e) = inner.provider.remove_runner(rid).await
    {
        tracing::warn!(error = %e, runner = rid, "runners: cannot remove the runner; the reconcile pass retries");
    }
    Ok(())
}

/// Record a job's end.
async fn finish(
    inner: &Arc<Inner>,
    fence: &Fence,
    id: &str,
    state: JobState,
    why: Option<&str>,
) -> Result<(), RunnerError> {
    let written = jobs::update(inner.store.as_ref(), fence, id, |j| {
        if j.state.is_final() {
            return false;
        }
        j.state = state;
        j.finished_at = Some(Utc::now());
        if state != JobState::Done {
            j.error = why.map(String::from);
        }
        true
    })
    .await?;
    if let Some(j) = written {
        hangar_metrics::metrics().runner_job(match state {
            JobState::Done => "done",
            JobState::Ignored => "ignored",
            _ => "failed",
        });
        tracing::info!(job = j.job_id, state = state.as_str(), why, "runner job finished");
        publish(&inner.bus, &j, why.unwrap_or(""));
    }
    Ok(())
}

/// Runners the CI service lists under Hangar's prefix that no unfinished job holds are
/// removed; a job whose runner was never listed within the registration timeout loses its VM.
async fn reconcile(inner: &Arc<Inner>, fence: &Fence) -> Result<(), RunnerError> {
    let remote = inner.provider.runners().await?;
    let all = jobs::list(inner.store.as_ref()).await?;
    let prefix = format!("{}-", inner.cfg.name_prefix);
    for r in remote.iter().filter(|r| r.name.starts_with(&prefix)) {
        let held = all.iter().any(|j| !j.state.is_final() && j.runner_name.as_deref() == Some(r.name.as_str()));
        if !held && !r.busy {
            tracing::info!(runner = %r.name, "runners: removing a runner no VM backs");
            inner.provider.remove_runner(r.id).await?;
        }
    }
    let deadline = chrono::Duration::from_std(inner.cfg.register_timeout).unwrap_or(chrono::Duration::MAX);
    for j in all.iter().filter(|j| j.state == JobState::Assigned && j.reported < JobAction::InProgress) {
        let listed = remote.iter().any(|r| Some(r.name.as_str()) == j.runner_name.as_deref());
        let old = j.assigned_at.is_some_and(|a| Utc::now() - a > deadline);
        let busy = inner.busy.lock().map(|b| b.contains(&j.key())).unwrap_or(true);
        if old && !listed && !busy {
            cleanup(inner, j).await?;
            finish(inner, fence, &j.key(), JobState::Failed, Some("the runner never registered")).await?;
        }
    }
    // Delivery records older than GitHub keeps deliveries (3 days) are no longer needed.
    let cutoff = Utc::now() - chrono::Duration::days(4);
    let mut batch = Batch::new();
    for r in inner.store.list(jobs::DELIVERIES).await? {
        let at = r.value["at"].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
        if at.is_some_and(|a| a < cutoff) {
            batch = batch.delete(jobs::DELIVERIES, &r.id);
        }
    }
    if !batch.is_empty() {
        inner.store.commit(batch.fenced(fence)).await?;
    }
    Ok(())
}

/// Ask the CI service for the deliveries that failed since the last pass (Hangar down).
async fn redeliver(inner: &Arc<Inner>, fence: &Fence) -> Result<(), RunnerError> {
    const STATE: &str = "runner_state";
    let key = format!("{}-redeliver", inner.provider.name());
    let now = Utc::now();
    let since = match inner.store.get(STATE, &key).await? {
        Some(r) => r.value["checked_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&Utc) - chrono::Duration::minutes(5)),
        None => None,
    }
    .unwrap_or(now - chrono::Duration::days(1));
    let prefix = format!("{}-", inner.provider.name());
    let known: HashSet<String> = inner
        .store
        .list(jobs::DELIVERIES)
        .await?
        .into_iter()
        .filter_map(|r| r.id.strip_prefix(&prefix).map(String::from))
        .collect();
    let asked = inner.provider.redeliver_missed(since, &known).await?;
    if asked > 0 {
        tracing::info!(asked, "runners: asked for missed deliveries again");
    }
    inner.store.commit(Batch::new().put(STATE, &key, json!({"checked_at": now})).fenced(fence)).await?;
    Ok(())
}
