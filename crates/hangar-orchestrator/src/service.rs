//! The orchestrator's facade for VM work: every operation takes the caller, finds the VM
//! (anywhere in the fleet, or on one named host), decides access with the same rule the
//! host applies ([`hangar_core::vm::authorize`] against the owner recorded when the VM was
//! made), writes the audit entry before it forwards, and forwards the same [`VmCall`] the
//! host's own API takes. The HTTP layer parses, calls one of these and shapes the answer.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::Principal;
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::vm::{VmAction, authorize, owner_for};
use hangar_jobs::{Job, Jobs};
use hangar_store::Batch;
use hangar_wire::{
    CacheCall, CatalogCacheList, FleetMachine, HttpCall, Machine, OrchestratorCreateRequest, OrchestratorCreated,
    PowerDone, RegisterRequest, VmCall, VmReply,
};
use serde_json::json;
use tracing::Instrument;

use crate::error::{OrchestratorError, Result};
use crate::facade::HttpOrchestrator;
use crate::model::{Host, OrchestratedVm, Os, VmSummary};
use crate::placement::Caller;
use crate::scheduler::{CreateProgress, CreateVm};

/// Longest a create may wait for capacity.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(3600);

/// Steps of an orchestrator create job.
const CREATE_STEPS: &[(&str, u32)] = &[("placing", 1), ("creating", 9)];

/// A VM found in the fleet, after the caller was checked.
pub struct Located {
    pub host: Host,
    pub record: Option<OrchestratedVm>,
    /// The VM's id, whether the caller named it by id or by name.
    pub vm_id: String,
}

impl Located {
    fn summary(&self) -> Option<&VmSummary> {
        self.host.vms.iter().find(|v| v.id == self.vm_id)
    }

    /// The Hangar owner: the orchestrator's record, else what the host reported.
    fn owner(&self) -> Option<String> {
        self.record.as_ref().map(|r| r.owner.clone()).or_else(|| self.summary().and_then(|s| s.owner.clone()))
    }
}

/// The one VM named `name` on `hosts`: not found when none, a conflict naming the hosts when
/// VMs of that name are on more than one.
fn by_name(hosts: Vec<Host>, name: &str) -> Result<(Host, String)> {
    let mut found: Vec<(Host, String)> = hosts
        .into_iter()
        .filter_map(|h| {
            let ids: Vec<String> = h.vms.iter().filter(|v| v.name == name).map(|v| v.id.clone()).collect();
            match ids.as_slice() {
                [] => None,
                [id] => Some(Ok((h.clone(), id.clone()))),
                _ => Some(Err(OrchestratorError::Conflict(format!(
                    "{} VMs are named {name:?} on host {}; use the VM's id",
                    ids.len(),
                    h.name
                )))),
            }
        })
        .collect::<Result<_>>()?;
    match found.len() {
        0 => Err(OrchestratorError::not_found("VM", name)),
        1 => Ok(found.remove(0)),
        _ => {
            let names: Vec<String> = found.iter().map(|(h, _)| h.name.clone()).collect();
            Err(OrchestratorError::Conflict(format!(
                "VMs named {name:?} are on hosts {}; use the VM's id or the per-host route",
                names.join(", ")
            )))
        }
    }
}

/// A VM of the fleet as the API shows it: the host's last answer for it (defaults with
/// every key when the host has not answered for it yet), with what the orchestrator knows
/// fresher (state from events, owner from its records) written over it, and the host's keys.
pub fn fleet_machine(h: &Host, vm: &VmSummary, record: Option<&OrchestratedVm>) -> FleetMachine {
    let owner = record.map(|r| r.owner.clone()).or_else(|| vm.owner.clone());
    let mut machine = vm.machine.as_deref().cloned().unwrap_or_default();
    machine.id = vm.id.clone();
    // A claimed warm VM may keep its warm name on a host that renames only stopped VMs:
    // the orchestrator's record has the claim's name.
    let name = record.map(|r| r.name.clone()).filter(|n| !n.is_empty()).unwrap_or_else(|| vm.name.clone());
    machine.name = name.clone();
    machine.state = vm.state.as_str().into();
    machine.os = vm.os.clone();
    machine.hardware.cpu.cpus = vm.cpu;
    machine.hardware.memory.size = hangar_wire::Mb(vm.memory_mb);
    machine.hardware.hdd0.size = hangar_wire::Mb(vm.disk_mb);
    if machine.user.is_empty() {
        machine.user = owner.clone().unwrap_or_default();
    }
    machine.owner = owner;
    FleetMachine {
        machine,
        host_id: h.id.clone(),
        host: h.name.clone(),
        host_name: h.name.clone(),
        host_url: h.url.clone(),
        host_state: h.state.as_str().into(),
        id: vm.id.clone(),
        name,
        state: vm.state.as_str().into(),
        os: vm.os.clone(),
        cpu: vm.cpu,
        memory_mb: vm.memory_mb,
        disk_mb: vm.disk_mb,
        expires_at: record.and_then(|r| r.expires_at),
    }
}

fn forbidden(host: &Host) -> OrchestratorError {
    OrchestratorError::Forbidden(format!("Host {} needs roles or claims this caller does not hold", host.name))
}

impl HttpOrchestrator {
    /// The orchestrator's jobs (async creates).
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// A host (id or name) the caller may use.
    pub fn usable_host(&self, p: &Principal, host: &str) -> Result<Host> {
        let h = self.scheduler.registry().get(host)?;
        if Caller::from(p).may_use(&h) { Ok(h) } else { Err(forbidden(&h)) }
    }

    /// Find VM `vm`, an id or a name (on `host` when given), on a host the caller may use.
    /// An id is looked up first (the orchestrator's records, then every host's VMs); a name
    /// only among the VMs of the hosts the caller may use, and a name that matches VMs on
    /// two of those hosts is a conflict naming them. [`Located::vm_id`] is the VM's id:
    /// what is forwarded.
    pub async fn locate(&self, p: &Principal, host: Option<&str>, vm: &str) -> Result<Located> {
        let caller = Caller::from(p);
        let pinned = host.map(|h| self.usable_host(p, h)).transpose()?;
        let (host, vm_id) = match self.scheduler.host_of(vm).await {
            Ok(id) => {
                let h = match pinned {
                    Some(h) if h.id == id => h,
                    Some(h) => {
                        return Err(OrchestratorError::NotFound { kind: "VM", id: format!("{vm} on host {}", h.name) });
                    }
                    None => self.scheduler.registry().get(&id)?,
                };
                if !caller.may_use(&h) {
                    return Err(forbidden(&h));
                }
                (h, vm.to_string())
            }
            Err(OrchestratorError::NotFound { .. }) => {
                let hosts = match pinned {
                    Some(h) => vec![h],
                    None => self.scheduler.registry().list().into_iter().filter(|h| caller.may_use(h)).collect(),
                };
                by_name(hosts, vm)?
            }
            Err(e) => return Err(e),
        };
        let record = match self.scheduler.vm(&vm_id).await {
            Ok(r) => Some(r),
            Err(OrchestratorError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Located { host, record, vm_id })
    }

    /// [`HttpOrchestrator::locate`], then the access rule for `action`.
    pub async fn authorized(&self, p: &Principal, action: VmAction, host: Option<&str>, vm: &str) -> Result<Located> {
        let found = self.locate(p, host, vm).await?;
        let name = found.summary().map(|s| s.name.clone()).unwrap_or_else(|| vm.to_string());
        authorize(p, action, &name, found.owner().as_deref())?;
        Ok(found)
    }

    async fn audit(&self, actor: &Actor, action: VmAction, vm: &str, host: &Host) -> Result<()> {
        let action = format!("orchestrator.{}", action.audit_action());
        self.commit_audit(AuditEntry::new(actor, &action, "orchestrator_vm", vm, json!({"host": host.id}))).await
    }

    /// A host (id or name) the caller may use, and the orchestrator's client for it.
    fn usable_client(&self, p: &Principal, host: &str) -> Result<(Host, Arc<crate::http_client::HttpHostClient>)> {
        let h = self.usable_host(p, host)?;
        let client = self.host_client(&h.id)?;
        Ok((h, client))
    }

    /// Forward a call to a host the caller may use (its required roles and claims; the
    /// route's own claim was checked by the API), with the orchestrator's stored
    /// credentials. A call that changes something is audited before it is sent.
    pub async fn forward_to_host<T: serde::de::DeserializeOwned>(
        &self,
        p: &Principal,
        host: &str,
        audit: Option<(&Actor, &str)>,
        call: &HttpCall,
    ) -> Result<T> {
        let (h, client) = self.usable_client(p, host)?;
        if let Some((actor, action)) = audit {
            let detail = json!({"method": call.method, "path": call.path});
            self.commit_audit(AuditEntry::new(actor, &format!("orchestrator.{action}"), "host", &h.id, detail)).await?;
        }
        client.send_call(call).await.map_err(|source| OrchestratorError::Host { host: h.id, source })
    }

    /// The catalog cache of a host the caller may use.
    pub async fn host_cache_list(&self, p: &Principal, host: &str) -> Result<CatalogCacheList> {
        let call = CacheCall::List;
        self.forward_to_host(p, host, None, &call.request()).await
    }

    /// Empty a host's catalog cache, or drop one catalog id or one version from it.
    pub async fn host_cache_delete(&self, p: &Principal, actor: &Actor, host: &str, call: &CacheCall) -> Result<()> {
        let _: serde::de::IgnoredAny =
            self.forward_to_host(p, host, Some((actor, call.action())), &call.request()).await?;
        Ok(())
    }

    /// Register an existing VM bundle on a host the caller may use. The owner is the caller
    /// unless a SUPER_USER names another (the host would otherwise record the
    /// orchestrator's own credential user).
    pub async fn register_on_host(
        &self,
        p: &Principal,
        actor: &Actor,
        host: &str,
        mut req: RegisterRequest,
    ) -> Result<Machine> {
        authorize(p, VmAction::Register, req.machine_name.as_deref().unwrap_or_default(), None)?;
        req.owner = Some(owner_for(p, req.owner.as_deref())?);
        let body = serde_json::to_value(&req).map_err(|e| OrchestratorError::Internal(e.to_string()))?;
        let call = HttpCall {
            method: "POST",
            path: "/machines/register".into(),
            body: Some(body),
            timeout: Duration::from_secs(600),
        };
        self.forward_to_host(p, host, Some((actor, "vm.register")), &call).await
    }

    /// Write one audit entry; what it announces happens only if this succeeds.
    async fn commit_audit(&self, entry: AuditEntry) -> Result<()> {
        let value = serde_json::to_value(&entry).map_err(|e| OrchestratorError::Internal(e.to_string()))?;
        self.scheduler.registry().store().commit(Batch::new().put(AUDIT_COLLECTION, &entry.id, value)).await?;
        Ok(())
    }

    /// One VM of the fleet as the orchestrator sees it.
    pub async fn machine(&self, p: &Principal, host: Option<&str>, vm: &str) -> Result<FleetMachine> {
        let found = self.authorized(p, VmAction::Get, host, vm).await?;
        let summary = found.summary().ok_or_else(|| OrchestratorError::not_found("VM", vm))?;
        Ok(fleet_machine(&found.host, summary, found.record.as_ref()))
    }

    /// Every VM on the hosts the caller may use (or on one host).
    pub async fn machines(&self, p: &Principal, host: Option<&str>) -> Result<Vec<FleetMachine>> {
        authorize(p, VmAction::List, "", None)?;
        let hosts = match host {
            Some(h) => vec![self.usable_host(p, h)?],
            None => {
                let caller = Caller::from(p);
                self.scheduler.registry().list().into_iter().filter(|h| caller.may_use(h)).collect()
            }
        };
        let records = self.scheduler.list_vms().await?;
        let by_id: std::collections::HashMap<&str, &OrchestratedVm> =
            records.iter().map(|r| (r.id.as_str(), r)).collect();
        Ok(hosts
            .iter()
            .flat_map(|h| h.vms.iter().map(move |vm| (h, vm)))
            .map(|(h, vm)| fleet_machine(h, vm, by_id.get(vm.id.as_str()).copied()))
            .filter(|m| hangar_core::may_see_vm(p, m.machine.owner.as_deref()))
            .collect())
    }

    /// Run `call` on VM `vm` for `p`: checked, audited, forwarded to its host.
    pub async fn run(
        &self,
        p: &Principal,
        actor: &Actor,
        host: Option<&str>,
        vm: &str,
        call: VmCall,
    ) -> Result<VmReply> {
        let action = call.action();
        let found = self.authorized(p, action, host, vm).await?;
        let vm = found.vm_id.as_str();
        let h = &found.host;
        let span = tracing::info_span!("orchestrator_vm_call", vm, host = %h.id, action = action.name());
        async {
            match call {
                VmCall::Get => {
                    let summary = found.summary().ok_or_else(|| OrchestratorError::not_found("VM", vm))?;
                    Ok(VmReply::Fleet(Box::new(fleet_machine(h, summary, found.record.as_ref()))))
                }
                // The delete and its audit entry are one batch with the record's removal.
                VmCall::Delete { .. } => {
                    self.scheduler.delete_vm(actor, vm).await?;
                    Ok(VmReply::Done)
                }
                VmCall::Power(op) => {
                    self.audit(actor, action, vm, h).await?;
                    self.scheduler.power(vm, op).await?;
                    Ok(VmReply::Power(PowerDone {
                        id: vm.to_string(),
                        operation: op.name().to_string(),
                        host_id: h.id.clone(),
                    }))
                }
                call => {
                    if action.is_change() {
                        self.audit(actor, action, vm, h).await?;
                    }
                    let client = self.host_client(&h.id)?;
                    let reply = client
                        .call(vm, &call)
                        .await
                        .map_err(|source| OrchestratorError::Host { host: h.id.clone(), source })?;
                    // A batch `set` with state operations leaves the VM's record where
                    // `/start` and `/stop` leave it: updated before the answer.
                    if let (VmCall::Set(req), VmReply::Set(done)) = (&call, &reply) {
                        let last = req
                            .operations
                            .iter()
                            .zip(&done.operations)
                            .filter(|(_, r)| r.status == "success" && r.error.is_none())
                            .filter_map(|(o, _)| set_power(o))
                            .next_back();
                        if let Some(op) = last {
                            self.scheduler.note_power(&h.id, vm, op);
                        }
                    }
                    Ok(match reply {
                        VmReply::Status(mut s) => {
                            s.host_id = Some(h.id.clone());
                            VmReply::Status(s)
                        }
                        VmReply::Clone(mut c) => {
                            c.host_id = Some(h.id.clone());
                            VmReply::Clone(c)
                        }
                        other => other,
                    })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Push a VM's expiry back by `by`.
    pub async fn extend(&self, p: &Principal, actor: &Actor, vm: &str, by: Duration) -> Result<OrchestratedVm> {
        let found = self.authorized(p, VmAction::Extend, None, vm).await?;
        self.scheduler.extend(actor, &found.vm_id, by).await
    }

    /// The host to open a tunnel to VM `vm`'s (id or name) `port` through, and the VM's id
    /// (checked and audited).
    pub async fn port_forward(&self, p: &Principal, actor: &Actor, vm: &str, port: u16) -> Result<(Host, String)> {
        if port == 0 {
            return Err(OrchestratorError::Invalid("port must be between 1 and 65535".into()));
        }
        let found = self.authorized(p, VmAction::PortForward, None, vm).await?;
        self.audit(actor, VmAction::PortForward, &found.vm_id, &found.host).await?;
        Ok((found.host, found.vm_id))
    }

    /// The scheduler's request for an API create; `host` (id or name) pins the VM.
    fn create_vm_request(
        &self,
        p: &Principal,
        req: &OrchestratorCreateRequest,
        host: Option<&str>,
    ) -> Result<CreateVm> {
        authorize(p, VmAction::Create, &req.name, None)?;
        if req.pool.is_some() {
            return Err(OrchestratorError::Invalid(
                "a claim from a pool answers at once: use POST /orchestrator/machines, not the async form".into(),
            ));
        }
        let owner = owner_for(p, req.owner.as_deref())?;
        let pinned = match host {
            Some(h) => Some(self.usable_host(p, h)?.id),
            None => req.host.clone(),
        };
        let (image, version) = match (&req.catalog_manifest, &req.image) {
            (Some(m), _) => {
                let id = m.catalog_id.trim();
                if id.is_empty() {
                    return Err(OrchestratorError::Invalid("catalog_manifest.catalog_id is required".into()));
                }
                let version = m.version.as_deref().map(str::trim).filter(|v| !v.is_empty()).unwrap_or("latest");
                (id.to_string(), Some(version.to_string()))
            }
            (None, Some(i)) if !i.trim().is_empty() => (i.clone(), None),
            _ => {
                return Err(OrchestratorError::Invalid(
                    "Say what to create the VM from: image or catalog_manifest".into(),
                ));
            }
        };
        let os = match &req.os {
            Some(t) => {
                Some(Os::parse_lenient(t).ok_or_else(|| OrchestratorError::Invalid(format!("os {t:?} is unknown")))?)
            }
            None => None,
        };
        let (priority, wait) = match (req.queue, req.wait_seconds) {
            (Some(q), _) => (q.priority, Some(q.timeout_seconds)),
            (None, w) => (0, w),
        };
        let specs = req.specs.clone().unwrap_or_default();
        // The host pulls from the server a `connection` names; a catalog manager is this
        // server's own record, which a host cannot read.
        let manifest = req.catalog_manifest.as_ref();
        if manifest.and_then(|m| m.catalog_manager_id.as_deref()).is_some_and(|id| !id.trim().is_empty()) {
            return Err(OrchestratorError::Invalid(
                "catalog_manifest.catalog_manager_id is not supported through the orchestrator; give connection".into(),
            ));
        }
        let catalog_connection = manifest.and_then(|m| m.connection.clone()).filter(|c| !c.expose().trim().is_empty());
        Ok(CreateVm {
            name: req.name.clone(),
            image,
            version,
            architecture: req.architecture.clone().unwrap_or_else(|| "x86_64".into()),
            os,
            cpu: specs.cpu.0.map(|v| v.min(1024) as u32),
            memory_mb: specs.memory.0,
            disk_mb: specs.disk.0,
            tags: req.tags.clone(),
            host: pinned,
            owner,
            start: req.start_on_create,
            ttl: req.ttl_seconds.map(Duration::from_secs),
            priority,
            wait: wait.map(|w| Duration::from_secs(w).min(MAX_QUEUE_WAIT)),
            catalog_connection,
            ..Default::default()
        })
    }

    /// The answer to a create.
    fn created(&self, vm: &OrchestratedVm, start: bool) -> Result<OrchestratorCreated> {
        let host = self.scheduler.registry().get(&vm.host_id)?;
        let state = host
            .vms
            .iter()
            .find(|v| v.id == vm.id)
            .map(|v| v.state.as_str().to_string())
            .unwrap_or_else(|| if start { "running".into() } else { "stopped".into() });
        Ok(OrchestratorCreated {
            id: vm.id.clone(),
            name: vm.name.clone(),
            owner: vm.owner.clone(),
            current_state: state,
            host: host.name,
            host_id: host.id,
            expires_at: vm.expires_at,
        })
    }

    /// Create a VM on the host placement chooses (or on `host`), waiting in the queue when
    /// the request asks to.
    pub async fn create(
        &self,
        p: &Principal,
        actor: &Actor,
        host: Option<&str>,
        req: &OrchestratorCreateRequest,
    ) -> Result<OrchestratorCreated> {
        if let Some(pool) = req.pool.as_deref() {
            if host.is_some() || req.host.is_some() {
                return Err(OrchestratorError::Invalid(
                    "a claim from a pool is placed by the pool; do not name a host".into(),
                ));
            }
            let claim =
                hangar_wire::PoolClaim { name: req.name.clone(), owner: req.owner.clone(), ttl_secs: req.ttl_seconds };
            let m = self.claim_from_pool_as(p, actor, pool, claim).await?;
            return Ok(OrchestratorCreated {
                id: m.id,
                name: m.name,
                owner: m.machine.owner.unwrap_or_default(),
                current_state: m.state,
                host: m.host,
                host_id: m.host_id,
                expires_at: m.expires_at,
            });
        }
        let create = self.create_vm_request(p, req, host)?;
        let wait = create.wait;
        let vm = self.scheduler.create_vm(Caller::from(p), actor, create).await.map_err(|e| within(e, wait))?;
        self.created(&vm, req.start_on_create)
    }

    /// [`HttpOrchestrator::create`] in the background: the job (in the store before this
    /// returns, owned by the caller) shows `queued` → `placing` → `creating on host X`, then
    /// the created VM as its result or the reason it failed.
    pub async fn create_async(
        self: &Arc<Self>,
        p: &Principal,
        actor: &Actor,
        host: Option<&str>,
        req: OrchestratorCreateRequest,
    ) -> Result<Job> {
        let create = self.create_vm_request(p, &req, host)?;
        let handle = self
            .jobs
            .start(&p.user_id, "orchestrator_vm", "create", CREATE_STEPS)
            .await
            .map_err(|e| OrchestratorError::Internal(e.to_string()))?;
        let job =
            self.jobs.get(&handle.id).ok_or_else(|| OrchestratorError::Internal("the new job vanished".into()))?;
        let entry = AuditEntry::new(actor, "orchestrator.vm.create_async", "job", &job.id, json!({"name": req.name}));
        if let Err(e) = self.commit_audit(entry).await {
            handle.fail(format!("The request could not be audited: {e}")).await;
            return Err(e);
        }
        let me = self.clone();
        let caller = Caller::from(p);
        let actor = actor.clone();
        let span = tracing::info_span!("orchestrator_create_job", job = %job.id, vm = %create.name);
        tokio::spawn(
            async move {
                let wait = create.wait;
                let reporter = handle.clone();
                let registry = me.scheduler.registry().clone();
                let progress = move |step: CreateProgress| match step {
                    CreateProgress::Placing { previous_failure: None, .. } => reporter.step(0, 0.0, "placing"),
                    CreateProgress::Placing { attempt, previous_failure: Some(e) } => {
                        reporter.step(0, 0.0, &format!("placing (attempt {attempt}; {e})"))
                    }
                    CreateProgress::Queued { reason, priority } => reporter.step(
                        0,
                        0.0,
                        &format!("queued: waiting for capacity (priority {priority}); now {reason}"),
                    ),
                    CreateProgress::Creating { host_id, .. } => {
                        let name = registry.get(&host_id).map(|h| h.name).unwrap_or_else(|_| host_id.clone());
                        reporter.step(1, 0.0, &format!("creating on host {name}"));
                    }
                };
                let done = me.scheduler.create_vm_reporting(caller, &actor, create, &progress).await;
                match done.map_err(|e| within(e, wait)).and_then(|vm| me.created(&vm, req.start_on_create)) {
                    Ok(v) => handle.complete(serde_json::to_value(v).unwrap_or_default()).await,
                    Err(e) => handle.fail(e.to_string()).await,
                }
            }
            .instrument(span),
        );
        Ok(job)
    }
}

/// A queue timeout names the wait the caller asked for, in seconds.
fn within(e: OrchestratorError, wait: Option<Duration>) -> OrchestratorError {
    match e {
        OrchestratorError::QueueTimeout { last, waited_ms } => {
            let seconds = wait.map(|w| w.as_secs()).unwrap_or(waited_ms / 1000);
            OrchestratorError::NoCapacityWithin { seconds, last }
        }
        e => e,
    }
}

/// The power operation a `set` operation of group `state` stands for (the names the
/// host's batch `set` accepts).
fn set_power(o: &hangar_wire::SetOperation) -> Option<hangar_hypervisor::PowerOp> {
    use hangar_hypervisor::PowerOp;
    if !o.group.eq_ignore_ascii_case("state") {
        return None;
    }
    Some(match o.operation.to_ascii_lowercase().as_str() {
        "start" => PowerOp::Start,
        "stop" => PowerOp::Stop { force: false, timeout: Duration::from_secs(60) },
        "kill" => PowerOp::Kill,
        "pause" => PowerOp::Pause,
        "resume" => PowerOp::Resume,
        "suspend" => PowerOp::Suspend,
        "reset" => PowerOp::Reset,
        "restart" => PowerOp::Restart,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use chrono::Utc;

    use super::*;

    fn host(id: &str, vms: &[(&str, &str)]) -> Host {
        let mut h = Host::new(id, format!("mac-{id}"), format!("http://{id}:3080/api"), Utc::now());
        for (vm_id, name) in vms {
            h.vms.push(VmSummary {
                id: (*vm_id).into(),
                name: (*name).into(),
                state: hangar_hypervisor::VmState::Running,
                os: "ubuntu".into(),
                cpu: 1,
                memory_mb: 1024,
                disk_mb: 1024,
                owner: None,
                machine: None,
            });
        }
        h
    }

    /// A name finds the one VM of that name; none is not found; VMs of that name on two
    /// hosts (or twice on one) are a conflict that names the hosts.
    #[test]
    fn a_name_finds_one_vm_or_names_the_hosts_that_share_it() {
        let a = host("a", &[("v1", "ci-base"), ("v2", "other")]);
        let b = host("b", &[("v3", "ci-base"), ("v4", "solo")]);
        let (h, id) = by_name(vec![a.clone(), b.clone()], "solo").unwrap();
        assert_eq!((h.id.as_str(), id.as_str()), ("b", "v4"));
        let (h, id) = by_name(vec![a.clone()], "ci-base").unwrap();
        assert_eq!((h.id.as_str(), id.as_str()), ("a", "v1"));
        assert!(matches!(by_name(vec![a.clone(), b.clone()], "nope"), Err(OrchestratorError::NotFound { .. })));
        match by_name(vec![a, b], "ci-base") {
            Err(OrchestratorError::Conflict(m)) => assert!(m.contains("mac-a") && m.contains("mac-b"), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let twice = host("c", &[("v5", "dup"), ("v6", "dup")]);
        match by_name(vec![twice], "dup") {
            Err(OrchestratorError::Conflict(m)) => assert!(m.contains("mac-c"), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
}
