//! Ephemeral GitHub Actions runners in the server: [`OrchestratorVms`], the
//! `hangar_runners::RunnerVms` seam over the orchestrator's runner pools (claim, exec,
//! delete), and [`start`], which builds the GitHub provider from the settings and runs the
//! dispatcher on the leader.
//!
//! The runners service acts as an internal principal (`runners`, SUPER_USER): its VMs are
//! owned by it, its claims, execs and deletions are audited under the actor `runners`
//! (`via: system`). The JIT configuration travels only in the exec's environment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::audit::Actor;
use hangar_core::{EventBus, Principal};
use hangar_orchestrator::{HttpOrchestrator, OrchestratorError};
use hangar_runners::{ExecResult, PoolSpec, RunnerVms, Secret, VmError, VmRef};
use hangar_store::{Role, Store};
use hangar_wire::{ExecuteRequest, PoolClaim, VmCall, VmReply};
use tokio::sync::watch;

use crate::settings::GithubRunnerSettings;

/// The principal the runners service acts as.
fn runners_principal() -> Principal {
    Principal {
        user_id: "runners".into(),
        username: "runners".into(),
        email: String::new(),
        roles: [hangar_core::claims::SUPER_USER_ROLE.to_string()].into_iter().collect(),
        claims: Default::default(),
        method: hangar_core::principal::AuthMethod::Jwt,
    }
}

/// Runner VMs from the orchestrator's pools.
pub struct OrchestratorVms {
    o: Arc<HttpOrchestrator>,
    p: Principal,
    actor: Actor,
}

impl OrchestratorVms {
    pub fn new(o: Arc<HttpOrchestrator>) -> OrchestratorVms {
        let actor =
            Actor { user_id: "runners".into(), username: "runners".into(), via: "system".into(), ..Default::default() };
        OrchestratorVms { o, p: runners_principal(), actor }
    }
}

fn vm_error(e: OrchestratorError) -> VmError {
    match e {
        OrchestratorError::NotFound { kind, id } if kind == "pool" || kind == "runner pool" => VmError::NoPool(id),
        OrchestratorError::NotFound { id, .. } => VmError::NotFound(id),
        e @ (OrchestratorError::NoCapacity(_)
        | OrchestratorError::QueueTimeout { .. }
        | OrchestratorError::NoCapacityWithin { .. }) => VmError::NoRoom(e.to_string()),
        // The pool at its maximum of VMs.
        OrchestratorError::Conflict(m) if m.contains("maximum") => VmError::NoRoom(m),
        other => VmError::Failed(other.to_string()),
    }
}

fn key(vm: &VmRef) -> &str {
    vm.id.as_deref().unwrap_or(&vm.name)
}

#[async_trait]
impl RunnerVms for OrchestratorVms {
    async fn pools(&self) -> Result<Vec<PoolSpec>, VmError> {
        let pools = self.o.runner_pools().await.map_err(vm_error)?;
        Ok(pools
            .into_iter()
            .map(|v| PoolSpec {
                name: v.pool.name,
                labels: v.pool.labels,
                job_timeout: Duration::from_secs(v.pool.job_timeout_secs),
            })
            .collect())
    }

    async fn claim(&self, pool: &str, name: &str) -> Result<VmRef, VmError> {
        let req = PoolClaim { name: name.to_string(), owner: None, ttl_secs: None };
        let m = self.o.claim_from_pool_as(&self.p, &self.actor, pool, req).await.map_err(vm_error)?;
        Ok(VmRef { name: m.name, id: Some(m.id), host: Some(m.host_id) })
    }

    async fn exec(
        &self,
        vm: &VmRef,
        command: &str,
        env: &BTreeMap<String, Secret>,
        timeout: Duration,
    ) -> Result<ExecResult, VmError> {
        let req = ExecuteRequest {
            command: command.to_string(),
            environment_variables: env.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect(),
            user: None,
            working_directory: None,
            timeout: Some(timeout.as_secs().max(1)),
            use_sudo: false,
            use_ssh: false,
            script: None,
        };
        match self.o.run(&self.p, &self.actor, None, key(vm), VmCall::Execute(req)).await.map_err(vm_error)? {
            VmReply::Exec(r) => Ok(ExecResult { exit_code: r.exit_code, stdout: r.stdout, stderr: r.stderr }),
            _ => Err(VmError::Failed("the host answered the exec with another shape".into())),
        }
    }

    async fn delete(&self, vm: &VmRef) -> Result<(), VmError> {
        match self.o.run(&self.p, &self.actor, None, key(vm), VmCall::Delete { force: true }).await.map_err(vm_error) {
            Ok(_) | Err(VmError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn exists(&self, vm: &VmRef) -> Result<bool, VmError> {
        match self.o.machine(&self.p, None, key(vm)).await.map_err(vm_error) {
            Ok(_) => Ok(true),
            Err(VmError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Start the runners service when GitHub is configured: answers the service for the API
/// (the webhook route) and runs its loop on the leader.
pub fn start(
    settings: Option<&GithubRunnerSettings>,
    store: Arc<dyn Store>,
    bus: EventBus,
    orchestrator: Option<&Arc<HttpOrchestrator>>,
    role: watch::Receiver<Role>,
) -> anyhow::Result<Option<hangar_runners::Runners>> {
    let Some(s) = settings else { return Ok(None) };
    let Some(o) = orchestrator else {
        anyhow::bail!("GITHUB_APP_ID is set, but GitHub runners need the orchestrator module (ENABLED_MODULES)");
    };
    let provider = hangar_runners::github::Github::new(s.github.clone())
        .map_err(|e| anyhow::anyhow!("GitHub runners: {e} (GITHUB_APP_PRIVATE_KEY_FILE)"))?;
    let runners = hangar_runners::Runners::new(
        store,
        Arc::new(provider),
        Arc::new(OrchestratorVms::new(o.clone())),
        bus,
        s.runners.clone(),
    );
    runners.spawn(role);
    tracing::info!(scope = ?s.github.scope, api = %s.github.api_url, "GitHub runners on");
    Ok(Some(runners))
}
