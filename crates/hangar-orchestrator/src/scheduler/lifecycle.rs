//! VM lifecycle: create (validate, place and reserve, create on the chosen host while
//! renewing the reservation, then confirm or roll back and try the next host), power,
//! delete, TTL extension and the reaper.
//!
//! Confirming writes the VM record with its expiry and the audit entry in the same batch
//! as the host view that now counts the VM, then releases the reservation; a failed write
//! deletes the VM again.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_hypervisor::{HypervisorKind, PowerOp, VmState};
use hangar_store::{Batch, Fence, FencedBatch, StoreError};
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use super::shared::Held;
use super::{Scheduler, lock, timed, to_value, view_remove, view_upsert};
use crate::client::{HostClientError, HostCreateVm, VmOp};
use crate::clock;
use crate::error::{OrchestratorError, Result};
use crate::health::Observation;
use crate::model::*;
use crate::placement::Caller;
use crate::reservations::Reservation;

/// A request to create a VM somewhere in the fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateVm {
    /// VM name.
    pub name: String,
    /// Catalog id or local image name.
    pub image: String,
    /// Catalog version.
    pub version: Option<String>,
    /// Image size in MiB, when known (disk rule).
    pub image_size_mb: Option<u64>,
    /// `x86_64` or `arm64` (aliases accepted).
    pub architecture: String,
    /// Guest OS.
    pub os: Option<Os>,
    /// Required hypervisor.
    pub hypervisor: Option<HypervisorKind>,
    /// CPUs (default from the config).
    pub cpu: Option<u32>,
    /// Memory in MiB (default from the config).
    pub memory_mb: Option<u64>,
    /// Disk in MiB.
    pub disk_mb: Option<u64>,
    /// Tags the host must have.
    pub tags: BTreeSet<String>,
    /// Pin to a host (id or name).
    pub host: Option<String>,
    /// The user the VM is for.
    pub owner: String,
    /// Start it once created.
    pub start: bool,
    /// Delete it this long after creation; `None`: the configured default.
    pub ttl: Option<Duration>,
    /// Queue priority (higher first).
    pub priority: i32,
    /// Wait up to this long in the queue when nothing fits; `None`: fail at once.
    pub wait: Option<Duration>,
    /// Another catalog server to pull the image from (`catalog_manifest.connection`),
    /// passed to the host as is; never stored or logged (masked `Debug`).
    pub catalog_connection: Option<hangar_wire::SecretText>,
    /// The runner pool the VM is made for, recorded with it. A warm VM (`warm: true`) never
    /// evicts another warm VM to find room; every other create may (see admission).
    pub pool: Option<PoolMark>,
    /// Hosts placement should not use for this VM (a warm fill spreading over hosts).
    pub avoid: BTreeSet<String>,
}

/// A step of a VM creation, reported while it happens (what an async create job shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateProgress {
    /// Looking for a host (attempt 1, then one more per host that failed the create).
    Placing {
        /// Attempt number, from 1.
        attempt: usize,
        /// Why the previous attempt's host failed the create (from attempt 2).
        previous_failure: Option<String>,
    },
    /// Nothing fits now: the request waits in the queue.
    Queued {
        /// Why nothing fits, per group of hosts.
        reason: String,
        /// The request's queue priority.
        priority: i32,
    },
    /// A host was chosen and capacity reserved on it; the host is creating the VM.
    Creating {
        /// The chosen host.
        host_id: String,
        /// Attempt number, from 1.
        attempt: usize,
    },
}

/// Receives [`CreateProgress`] reports.
pub type ProgressFn<'a> = &'a (dyn Fn(CreateProgress) + Send + Sync);

/// What one reaper pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReapReport {
    /// VMs deleted.
    pub deleted: Vec<String>,
    /// VMs whose deletion failed (id, error); tried again next pass.
    pub failed: Vec<(String, String)>,
    /// VMs left alone because their fenced claim was refused: the record changed
    /// meanwhile, or this replica no longer holds the leader lease.
    pub refused: Vec<String>,
}

/// Marks a VM busy (being deleted or extended) for as long as it lives.
pub(super) struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

/// How long a waiting create queues without the hosts the store found full before it
/// tries them again (see [`Scheduler::create_vm_reporting`]).
const FULL_HOST_ROUND: Duration = Duration::from_secs(1);

/// With other replicas on the store, how long a create that may not wait still tries
/// while the room it lacks is held by creations in flight, or was judged on a read the
/// store has since corrected (see [`Scheduler::create_vm_reporting`]).
const SETTLE_BEFORE_REFUSING: Duration = Duration::from_secs(5);

/// The pause between two of those tries.
const SETTLE_POLL: Duration = Duration::from_millis(100);

impl Scheduler {
    pub(super) fn busy(&self, vm_id: &str) -> Result<BusyGuard<'_>> {
        if !lock(&self.inner.busy_vms).insert(vm_id.to_string()) {
            return Err(OrchestratorError::Conflict(format!("VM {vm_id} is being changed or deleted; try again")));
        }
        Ok(BusyGuard { set: &self.inner.busy_vms, id: vm_id.to_string() })
    }

    /// Creates a VM on a host the scheduler chooses (or on the pinned host, whose capacity
    /// is still reserved). With [`CreateVm::wait`], a request nothing fits waits in the queue
    /// (by [`CreateVm::priority`], then arrival) until capacity frees or the wait ends.
    pub async fn create_vm(&self, caller: Caller, actor: &Actor, req: CreateVm) -> Result<OrchestratedVm> {
        self.create_vm_reporting(caller, actor, req, &|_| {}).await
    }

    /// [`Scheduler::create_vm`], reporting each step to `progress`.
    #[instrument(skip(self, caller, actor, req, progress), fields(vm = %req.name))]
    pub async fn create_vm_reporting(
        &self,
        caller: Caller,
        actor: &Actor,
        req: CreateVm,
        progress: ProgressFn<'_>,
    ) -> Result<OrchestratedVm> {
        if req.name.trim().is_empty() || req.name.len() > 100 {
            return Err(OrchestratorError::Invalid("a VM needs a name of 1 to 100 characters".into()));
        }
        // A warm VM waits for its claim, which starts its TTL.
        let warm = req.pool.as_ref().is_some_and(|m| m.warm);
        let ttl = if warm { None } else { req.ttl.or(self.inner.config.default_vm_ttl) };
        if let (Some(ttl), Some(max)) = (ttl, self.inner.config.max_vm_ttl)
            && ttl > max
        {
            return Err(OrchestratorError::Invalid(format!("the TTL may be at most {} s", max.as_secs())));
        }
        let os = req.os.unwrap_or(Os::Linux);
        let mut preq = self.placement_request(&req, caller)?;
        preq.os = Some(os);
        preq.exclude.extend(req.avoid.iter().cloned());
        let may_evict = req.pool.as_ref().is_none_or(|m| !m.warm);
        // Hosts the store found full for this request (this replica's picture of them was
        // behind): skipped while another host fits. A waiting request that finds every
        // other host full too waits in the queue for them for a round of
        // [`FULL_HOST_ROUND`], then tries the full hosts again (their room frees as any
        // other's, and this replica's picture catches up on its next re-read): the queue
        // never keeps a host out for good.
        let mut full: BTreeSet<String> = BTreeSet::new();
        let deadline = req.wait.filter(|w| !w.is_zero()).map(|w| std::time::Instant::now() + w);
        let wait_left = || deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let mut last: Option<(String, HostClientError)> = None;
        // A create that may not wait is refused for room only once the room it lacks is
        // not merely held by creations in flight (here or, through the store, on other
        // replicas): a hold may yet fail, and a replica's picture may count a VM both as
        // its record and as the hold that made it until its next read of the store.
        let settle_until = std::time::Instant::now() + SETTLE_BEFORE_REFUSING;
        for attempt in 1..=self.inner.config.create_attempts.max(1) {
            progress(CreateProgress::Placing {
                attempt,
                previous_failure: last.as_ref().map(|(host, e)| format!("host {host}: {e}")),
            });
            let mut races = 0;
            let (decision, reservation) = loop {
                let decided_at = self.shared_epoch();
                let elsewhere = (!full.is_empty()).then(|| {
                    let mut r = preq.clone();
                    r.exclude.extend(full.iter().cloned());
                    r
                });
                let granted = match (elsewhere, wait_left()) {
                    (Some(r), Some(left)) if !left.is_zero() => {
                        let round = left.min(FULL_HOST_ROUND);
                        match self.reserve_or_wait(&r, req.priority, Some(round), progress, may_evict).await {
                            Err(OrchestratorError::QueueTimeout { .. }) if left > round => {
                                full.clear();
                                races = 0;
                                continue;
                            }
                            other => other,
                        }
                    }
                    (Some(r), _) => self.reserve_or_wait(&r, req.priority, None, progress, may_evict).await,
                    (None, left) => self.reserve_or_wait(&preq, req.priority, left, progress, may_evict).await,
                };
                let (decision, reservation) = match granted {
                    Ok(g) => g,
                    Err(OrchestratorError::NoCapacity(_))
                        if deadline.is_none()
                            && self.shares_store()
                            && (!full.is_empty() || !self.inner.ledger.is_empty())
                            && std::time::Instant::now() < settle_until =>
                    {
                        tokio::time::sleep(SETTLE_POLL).await;
                        full.clear();
                        races = 0;
                        continue;
                    }
                    Err(e) => {
                        return Err(match (e, last) {
                            (OrchestratorError::NoCapacity(_), Some((host, source))) => {
                                OrchestratorError::Host { host, source }
                            }
                            (e, _) => e,
                        });
                    }
                };
                // With other replicas on the store: the hold must also win the host's
                // capacity record, or the host is re-read and placement runs again.
                match self.hold_in_store(&decision, &reservation, decided_at).await {
                    Ok(Held::Yes) => break (decision, reservation),
                    Ok(again) => {
                        self.inner.ledger.release(reservation.id);
                        if again == Held::Full {
                            full.insert(decision.host_id.clone());
                        }
                        races += 1;
                        if races >= 64 {
                            return Err(super::shared::contended(&decision.host_id));
                        }
                    }
                    Err(e) => {
                        self.inner.ledger.release(reservation.id);
                        return Err(e);
                    }
                }
            };
            debug!(attempt, host = %decision.host_id, "placed");
            progress(CreateProgress::Creating { host_id: decision.host_id.clone(), attempt });
            match self.create_on(&decision.host_id, &reservation, &req, os).await {
                Ok(vm) => return self.confirm(actor, &decision.host_id, reservation, vm, &req, os, ttl).await,
                Err(e) => {
                    self.inner.ledger.release(reservation.id);
                    self.drop_hold(&decision.host_id, reservation.id).await;
                    self.drain();
                    warn!(host = %decision.host_id, error = %e, attempt, "create failed; trying another host");
                    let source = match e {
                        OrchestratorError::Host { source, .. } => source,
                        other => return Err(other),
                    };
                    if source.is_host_down() {
                        lock(&self.inner.clients).remove(&decision.host_id);
                        let _ = self.observe(&decision.host_id, Observation::CheckFailed(source.to_string())).await;
                    }
                    preq.exclude.insert(decision.host_id.clone());
                    last = Some((decision.host_id, source));
                }
            }
        }
        let (host, source) =
            last.ok_or_else(|| OrchestratorError::Internal("create gave up without an attempt".into()))?;
        Err(OrchestratorError::Host { host, source })
    }

    async fn create_on(&self, host_id: &str, reservation: &Reservation, req: &CreateVm, os: Os) -> Result<VmSummary> {
        let client = self.client(host_id).await?;
        let call = HostCreateVm {
            name: req.name.clone(),
            image: req.image.clone(),
            version: req.version.clone(),
            architecture: normalize_arch(&req.architecture)?,
            os,
            cpu: reservation.resources.cpu,
            memory_mb: reservation.resources.memory_mb,
            disk_mb: req.disk_mb,
            owner: req.owner.clone(),
            start: req.start,
            catalog_connection: req.catalog_connection.clone(),
        };
        let create = timed(self.inner.config.create_timeout, "create VM", client.create_vm(call));
        tokio::pin!(create);
        // Keep the reservation alive while the host works (image pulls can be long).
        let renew_every = (self.inner.config.reservation_ttl / 3).max(Duration::from_millis(100));
        let mut renew = tokio::time::interval(renew_every);
        renew.tick().await;
        loop {
            tokio::select! {
                r = &mut create => return r.map_err(|source| OrchestratorError::Host { host: host_id.to_string(), source }),
                _ = renew.tick() => { self.inner.ledger.renew(reservation.id); }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn confirm(
        &self,
        actor: &Actor,
        host_id: &str,
        reservation: Reservation,
        mut vm: VmSummary,
        req: &CreateVm,
        os: Os,
        ttl: Option<Duration>,
    ) -> Result<OrchestratedVm> {
        let now = self.inner.clock.now();
        vm.disk_mb = vm.disk_mb.max(req.image_size_mb.unwrap_or(0));
        let record = OrchestratedVm {
            id: vm.id.clone(),
            name: vm.name.clone(),
            host_id: host_id.to_string(),
            owner: req.owner.clone(),
            os,
            resources: vm.resources(),
            created_at: now,
            expires_at: ttl.map(|t| clock::add(now, t)),
            last_error: None,
            pool: req.pool.clone(),
        };
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst);
        lock(&self.inner.recent).entry(host_id.to_string()).or_default().push((seq, vm.clone()));
        let extra = Batch::new().require_absent(VMS, &record.id).put(VMS, &record.id, to_value(&record)?);
        let detail =
            json!({"vm_id": record.id, "name": record.name, "owner": record.owner, "expires_at": record.expires_at});
        let written = self
            .inner
            .registry
            .commit_with_status(host_id, extra, Some((actor, "orchestrator.vm.create", detail)), |h| {
                view_upsert(h, vm.clone())
            })
            .await;
        // The view counts the VM now (or the rollback below removes it): release the hold,
        // in the store too once the VM's record is there (other replicas count it from then).
        self.inner.ledger.release(reservation.id);
        self.drop_hold(host_id, reservation.id).await;
        if let Err(e) = written {
            warn!(host = %host_id, vm = %record.id, error = %e, "cannot record the new VM; deleting it");
            if let Ok(c) = self.client(host_id).await {
                let _ = timed(
                    self.inner.config.call_timeout,
                    "delete VM",
                    c.vm_op(&record.id, VmOp::Delete { force: true }),
                )
                .await;
            }
            self.inner.registry.update_in_memory(host_id, |h| {
                view_remove(h, &record.id);
            });
            self.drain();
            return Err(e);
        }
        info!(host = %host_id, vm = %record.id, "VM created");
        self.publish_vm(
            "VM_CREATED",
            Some(&record.owner),
            json!({"vm_id": record.id, "host_id": host_id, "name": record.name, "expires_at": record.expires_at}),
        );
        Ok(record)
    }

    /// VMs created through the orchestrator.
    pub async fn list_vms(&self) -> Result<Vec<OrchestratedVm>> {
        let mut out = Vec::new();
        for rec in self.inner.registry.store().list(VMS).await? {
            out.push(
                serde_json::from_value(rec.value)
                    .map_err(|e| OrchestratorError::Internal(format!("stored VM: {e}")))?,
            );
        }
        Ok(out)
    }

    pub(super) async fn vm_record(&self, id: &str) -> Result<Option<(OrchestratedVm, u64)>> {
        match self.inner.registry.store().get(VMS, id).await? {
            Some(rec) => Ok(Some((
                serde_json::from_value(rec.value)
                    .map_err(|e| OrchestratorError::Internal(format!("stored VM: {e}")))?,
                rec.revision,
            ))),
            None => Ok(None),
        }
    }

    /// One VM created through the orchestrator.
    pub async fn vm(&self, id: &str) -> Result<OrchestratedVm> {
        Ok(self.vm_record(id).await?.ok_or_else(|| OrchestratorError::not_found("VM", id))?.0)
    }

    /// The host a VM lives on: from its record, or from the host views for VMs made
    /// elsewhere.
    pub async fn host_of(&self, vm_id: &str) -> Result<String> {
        if let Some((r, _)) = self.vm_record(vm_id).await? {
            return Ok(r.host_id);
        }
        self.inner
            .registry
            .with_hosts(|hosts| {
                for h in hosts {
                    if h.vms.iter().any(|v| v.id == vm_id) {
                        return Some(h.id.clone());
                    }
                }
                None
            })
            .ok_or_else(|| OrchestratorError::not_found("VM", vm_id))
    }

    /// Forwards a power operation to the VM's host and updates the view.
    pub async fn power(&self, vm_id: &str, op: PowerOp) -> Result<()> {
        let host_id = self.host_of(vm_id).await?;
        let client = self.client(&host_id).await?;
        timed(self.inner.config.call_timeout, "VM operation", client.vm_op(vm_id, VmOp::Power { power: op }))
            .await
            .map_err(|source| OrchestratorError::Host { host: host_id.clone(), source })?;
        self.note_power(&host_id, vm_id, op);
        Ok(())
    }

    /// Records in the host's view the state a power operation that the host has just
    /// carried out leaves the VM in (its event confirms it a moment later), so a read
    /// right after the answer shows it.
    pub fn note_power(&self, host_id: &str, vm_id: &str, op: PowerOp) {
        let state = match op {
            PowerOp::Start | PowerOp::Resume | PowerOp::Reset | PowerOp::Restart => VmState::Running,
            PowerOp::Stop { .. } | PowerOp::Kill => VmState::Stopped,
            PowerOp::Pause => VmState::Paused,
            PowerOp::Suspend => VmState::Suspended,
        };
        self.inner.registry.update_in_memory(host_id, |h| {
            if let Some(vm) = h.vms.iter().find(|v| v.id == vm_id).cloned() {
                view_upsert(h, VmSummary { state, ..vm });
            }
        });
        self.drain();
    }

    /// Deletes a VM on its host, then its record with the audit entry (the batch carries
    /// `fence` when leader work deletes it).
    pub(super) async fn delete_inner(
        &self,
        actor: &Actor,
        vm_id: &str,
        action: &str,
        fence: Option<&Fence>,
    ) -> Result<()> {
        let record = self.vm_record(vm_id).await?;
        let host_id = match &record {
            Some((r, _)) => r.host_id.clone(),
            None => self.host_of(vm_id).await?,
        };
        let owner = match &record {
            Some((r, _)) => Some(r.owner.clone()),
            None => self
                .inner
                .registry
                .get(&host_id)
                .ok()
                .and_then(|h| h.vms.iter().find(|v| v.id == vm_id).and_then(|v| v.owner.clone())),
        };
        let client = self.client(&host_id).await?;
        match timed(self.inner.config.call_timeout, "delete VM", client.vm_op(vm_id, VmOp::Delete { force: true }))
            .await
        {
            Ok(()) | Err(HostClientError::NotFound(_)) => {}
            Err(source) => return Err(OrchestratorError::Host { host: host_id, source }),
        }
        let mut extra = Batch::new().fenced_by(fence);
        if let Some((_, rev)) = &record {
            extra = extra.require_revision(VMS, vm_id, *rev).delete(VMS, vm_id);
        }
        let detail = json!({"vm_id": vm_id});
        let r = self
            .inner
            .registry
            .commit_with_status(&host_id, extra, Some((actor, action, detail)), |h| {
                view_remove(h, vm_id);
            })
            .await;
        self.drain();
        match r {
            Ok(_) => {}
            // The host is gone: still drop the record.
            Err(OrchestratorError::NotFound { .. }) => {
                if let Some((_, rev)) = record {
                    let b = Batch::new().fenced_by(fence).require_revision(VMS, vm_id, rev).delete(VMS, vm_id);
                    let entry = AuditEntry::new(actor, action, "orchestrator_vm", vm_id, json!({}));
                    self.inner.registry.store().commit(b.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?)).await?;
                }
            }
            Err(e) => return Err(e),
        }
        self.publish_vm("VM_DELETED", owner.as_deref(), json!({"vm_id": vm_id, "host_id": host_id, "action": action}));
        Ok(())
    }

    /// Deletes a VM on its host (stopping it first) and forgets it.
    #[instrument(skip(self, actor))]
    pub async fn delete_vm(&self, actor: &Actor, vm_id: &str) -> Result<()> {
        let _busy = self.busy(vm_id)?;
        self.delete_inner(actor, vm_id, "orchestrator.vm.delete", None).await
    }

    /// Pushes a VM's expiry back by `by` (from its current expiry, or from now if that is
    /// already past). A VM without expiry keeps none.
    #[instrument(skip(self, actor))]
    pub async fn extend(&self, actor: &Actor, vm_id: &str, by: Duration) -> Result<OrchestratedVm> {
        let _busy = self.busy(vm_id)?;
        let (mut vm, rev) = self.vm_record(vm_id).await?.ok_or_else(|| OrchestratorError::not_found("VM", vm_id))?;
        let now = self.inner.clock.now();
        let Some(current) = vm.expires_at else { return Ok(vm) };
        let new = clock::add(current.max(now), by);
        if let Some(max) = self.inner.config.max_vm_ttl
            && new > clock::add(now, max)
        {
            return Err(OrchestratorError::Invalid(format!("a VM may live at most {} s from now", max.as_secs())));
        }
        vm.expires_at = Some(new);
        let entry =
            AuditEntry::new(actor, "orchestrator.vm.extend", "orchestrator_vm", vm_id, json!({"expires_at": new}));
        let batch = Batch::new().require_revision(VMS, vm_id, rev).put(VMS, vm_id, to_value(&vm)?).put(
            AUDIT_COLLECTION,
            &entry.id,
            to_value(&entry)?,
        );
        match self.inner.registry.store().commit(batch).await {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(OrchestratorError::Conflict(format!("VM {vm_id} changed meanwhile; try again")));
            }
            Err(e) => return Err(e.into()),
        }
        self.publish_vm("VM_TTL_EXTENDED", Some(&vm.owner), json!({"vm_id": vm_id, "expires_at": new}));
        Ok(vm)
    }

    /// Deletes every VM whose expiry has passed. VMs on unhealthy hosts, and deletions that
    /// fail, are reported and tried again on the next pass.
    ///
    /// Leader work: while leading under a lease, each VM is first claimed with a fenced
    /// write of its record (before its host is asked to delete it), and the record's
    /// deletion and error notes carry the fence too, so a paused ex-leader deletes nothing
    /// once another replica leads.
    #[instrument(skip(self))]
    pub async fn reap(&self) -> Result<ReapReport> {
        let now: DateTime<Utc> = self.inner.clock.now();
        let mut report = ReapReport::default();
        let actor = Actor::system();
        let fence = self.fence();
        for vm in self.list_vms().await? {
            if vm.expires_at.is_none_or(|e| e > now) {
                continue;
            }
            let Ok(_busy) = self.busy(&vm.id) else { continue };
            // Re-read: an extension may have landed since the list.
            let (record, rev) = match self.vm_record(&vm.id).await? {
                Some((r, rev)) if r.expires_at.is_some_and(|e| e <= now) => (r, rev),
                _ => continue,
            };
            if let Some(f) = &fence {
                let claim = Batch::new().require_revision(VMS, &vm.id, rev).put(VMS, &vm.id, to_value(&record)?);
                match self.inner.registry.store().commit(claim.fenced(f)).await {
                    Ok(_) => {}
                    Err(StoreError::Conflict(_)) => {
                        warn!(vm = %vm.id, "expired VM not reaped: it changed meanwhile, or this replica no longer leads");
                        report.refused.push(vm.id.clone());
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let healthy = self.inner.registry.get(&vm.host_id).map(|h| h.state == HostState::Healthy);
            let result = match healthy {
                Ok(false) => Err(OrchestratorError::Conflict(format!("host {} is not healthy", vm.host_id))),
                _ => self.delete_inner(&actor, &vm.id, "orchestrator.vm.expire", fence.as_ref()).await,
            };
            match result {
                Ok(()) => {
                    info!(vm = %vm.id, host = %vm.host_id, "expired VM deleted");
                    self.publish_vm("VM_EXPIRED", Some(&vm.owner), json!({"vm_id": vm.id, "host_id": vm.host_id}));
                    report.deleted.push(vm.id);
                }
                Err(e) => {
                    warn!(vm = %vm.id, error = %e, "cannot delete expired VM; will retry");
                    report.failed.push((vm.id.clone(), e.to_string()));
                    if let Ok(Some((mut r, rev))) = self.vm_record(&vm.id).await {
                        r.last_error = Some(e.to_string());
                        if let Ok(v) = to_value(&r) {
                            let _ = self
                                .inner
                                .registry
                                .store()
                                .commit(
                                    Batch::new()
                                        .require_revision(VMS, &vm.id, rev)
                                        .put(VMS, &vm.id, v)
                                        .fenced_by(fence.as_ref()),
                                )
                                .await;
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}
