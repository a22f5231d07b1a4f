//! Warm pools: keep each runner pool's `warm` VMs created, booted and exec-ready, hand one
//! out at once on a claim, and make room for real requests by evicting warm VMs.
//!
//! * **Fill** (leader work, [`Scheduler::pools_pass`] every tick and after every claim):
//!   for each pool, VMs are created through normal placement (host tags, cached image first,
//!   spread, avoiding hosts that already hold one of the pool's warm VMs while others can
//!   take one), owned by the pool's service owner (`pool:<name>`), never expiring, and
//!   marked warm in their record ([`PoolMark`]); a no-op exec (`true`) is retried until it
//!   succeeds, then the record is marked ready (a fenced write). `max_vms` caps warm +
//!   claimed + being made.
//! * **Recycle**: warm VMs made for an older generation of the pool (it was edited), or from
//!   another image version than the one `latest` resolves to now ([`ImageVersions`]), and
//!   warm VMs of deleted pools are deleted (fenced); the fill makes new ones.
//! * **Claim** ([`Scheduler::claim_from_pool`]): a ready warm VM is rewritten in one batch
//!   with its audit entry (new name, owner, expiry, no longer warm), renamed on its host and
//!   answered; without one, a VM is created cold through normal placement (it may evict)
//!   and answered once exec-ready.
//! * **Eviction** (admission): a real create that finds no room deletes warm VMs on a host
//!   that would then fit it and places again ([`Scheduler::evict_warm_for`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_store::{Batch, FencedBatch, StoreError};
use hangar_wire::{ExecuteRequest, PoolImage, RenameRequest, RunnerPoolStatus, VmCall, VmReply};
use serde_json::json;
use tracing::{debug, info, warn};

use super::{Scheduler, lock, to_value, view_remove, view_upsert};
use crate::error::{OrchestratorError, Result};
use crate::model::*;
use crate::placement::{Caller, PlacementRequest, check_host};
use crate::pools::{self, StoredPool, service_owner};
use crate::scheduler::CreateVm;

/// How long a new pool VM may take to answer a no-op exec.
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Resolves a pool image's version (`latest`) to the version a new VM is made from.
#[async_trait]
pub trait ImageVersions: Send + Sync + 'static {
    /// The concrete version `image` stands for now, or why it cannot be resolved.
    async fn resolve(&self, image: &PoolImage) -> std::result::Result<String, String>;
}

/// Takes the version as written (`latest` stays `latest`): without a catalog to ask, a
/// pool recycles on edits only.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsWritten;

#[async_trait]
impl ImageVersions for AsWritten {
    async fn resolve(&self, image: &PoolImage) -> std::result::Result<String, String> {
        Ok(image.version.clone())
    }
}

/// The warm-pool state of one process.
pub(crate) struct PoolsState {
    versions: Mutex<Arc<dyn ImageVersions>>,
    /// Fills in flight per pool.
    starting: Mutex<HashMap<String, u32>>,
    /// VMs whose readiness is being checked.
    checking: Mutex<HashSet<String>>,
    /// The last fill error per pool.
    errors: Mutex<HashMap<String, String>>,
    /// The version each pool resolved to at the last pass.
    resolved: Mutex<HashMap<String, String>>,
    wake: tokio::sync::Notify,
}

impl Default for PoolsState {
    fn default() -> Self {
        PoolsState {
            versions: Mutex::new(Arc::new(AsWritten)),
            starting: Mutex::default(),
            checking: Mutex::default(),
            errors: Mutex::default(),
            resolved: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        }
    }
}

/// What one pass of the warm-pool work did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolPass {
    /// Fills started (VM creations).
    pub started: usize,
    /// Warm VMs deleted (edited or deleted pool, image version moved).
    pub recycled: Vec<String>,
}

fn mark(vm: &OrchestratedVm) -> Option<&PoolMark> {
    vm.pool.as_ref()
}

fn is_warm_of(vm: &OrchestratedVm, pool: &str) -> bool {
    mark(vm).is_some_and(|m| m.warm && m.pool == pool)
}

/// Decrements a pool's in-flight count when a fill ends, however it ends.
struct Starting {
    sched: Scheduler,
    pool: String,
}

impl Drop for Starting {
    fn drop(&mut self) {
        let mut s = lock(&self.sched.inner.pools.starting);
        if let Some(n) = s.get_mut(&self.pool) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(&self.pool);
            }
        }
    }
}

impl Scheduler {
    /// Sets how pool images' versions are resolved (the catalog's `latest`).
    pub fn set_image_versions(&self, v: Arc<dyn ImageVersions>) {
        *lock(&self.inner.pools.versions) = v;
    }

    fn versions(&self) -> Arc<dyn ImageVersions> {
        lock(&self.inner.pools.versions).clone()
    }

    /// Runs the warm-pool work soon (after a claim, an edit).
    pub fn wake_pools(&self) {
        self.inner.pools.wake.notify_one();
    }

    /// The warm-pool loop (leader work): a pass every `every` and whenever woken.
    pub(super) async fn run_pools(&self, every: Duration) {
        loop {
            if let Err(e) = self.pools_pass().await {
                warn!(error = %e, "warm-pool pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.inner.pools.wake.notified() => {}
            }
        }
    }

    /// One pass: recycle warm VMs that no longer match their pool, check the readiness of
    /// those not ready yet, and start the fills each pool lacks.
    pub async fn pools_pass(&self) -> Result<PoolPass> {
        let store = self.inner.registry.store().clone();
        let pools: BTreeMap<String, StoredPool> =
            pools::list(store.as_ref()).await?.into_iter().map(|p| (p.pool.name.clone(), p)).collect();
        let mut resolved: HashMap<String, String> = HashMap::new();
        let versions = self.versions();
        for (name, p) in &pools {
            match versions.resolve(&p.pool.image).await {
                Ok(v) => {
                    resolved.insert(name.clone(), v);
                }
                Err(e) => {
                    lock(&self.inner.pools.errors)
                        .insert(name.clone(), format!("cannot resolve the image version: {e}"));
                }
            }
        }
        *lock(&self.inner.pools.resolved) = resolved.clone();
        let mut pass = PoolPass::default();
        let records = self.list_vms().await?;
        let fence = self.fence();
        let mut live: Vec<&OrchestratedVm> = Vec::new();
        for vm in &records {
            let Some(m) = mark(vm) else { continue };
            if !m.warm {
                continue;
            }
            let stale = match pools.get(&m.pool) {
                None => true,
                Some(p) => m.generation != p.generation || resolved.get(&m.pool).is_some_and(|v| *v != m.version),
            };
            if stale {
                let Ok(_busy) = self.busy(&vm.id) else { continue };
                match self.delete_inner(&Actor::system(), &vm.id, "orchestrator.pool.recycle", fence.as_ref()).await {
                    Ok(()) => {
                        info!(vm = %vm.id, pool = %m.pool, "warm VM recycled");
                        pass.recycled.push(vm.id.clone());
                    }
                    Err(e) => warn!(vm = %vm.id, pool = %m.pool, error = %e, "cannot recycle a warm VM"),
                }
                continue;
            }
            live.push(vm);
            if !m.ready && lock(&self.inner.pools.checking).insert(vm.id.clone()) {
                let me = self.clone();
                let (id, host) = (vm.id.clone(), vm.host_id.clone());
                tokio::spawn(async move {
                    if me.wait_ready(&host, &id, READY_TIMEOUT).await.is_ok() {
                        me.mark_ready(&id).await;
                    }
                    lock(&me.inner.pools.checking).remove(&id);
                });
            }
        }
        for (name, p) in &pools {
            let Some(version) = resolved.get(name) else { continue };
            let warm: Vec<&&OrchestratedVm> = live.iter().filter(|v| is_warm_of(v, name)).collect();
            let claimed = records.iter().filter(|v| mark(v).is_some_and(|m| !m.warm && m.pool == *name)).count();
            let starting = lock(&self.inner.pools.starting).get(name).copied().unwrap_or(0) as usize;
            let want_warm = (p.pool.warm as usize).saturating_sub(warm.len() + starting);
            let room = (p.pool.max_vms as usize).saturating_sub(warm.len() + claimed + starting);
            let n = want_warm.min(room);
            if n == 0 {
                if warm.len() + starting >= p.pool.warm as usize {
                    lock(&self.inner.pools.errors).remove(name);
                }
                continue;
            }
            let avoid: BTreeSet<String> = warm.iter().map(|v| v.host_id.clone()).collect();
            *lock(&self.inner.pools.starting).entry(name.clone()).or_default() += n as u32;
            for _ in 0..n {
                let me = self.clone();
                let (p, version, avoid) = (p.clone(), version.clone(), avoid.clone());
                let guard = Starting { sched: self.clone(), pool: name.clone() };
                tokio::spawn(async move { me.fill_one(p, version, avoid, guard).await });
                pass.started += 1;
            }
        }
        Ok(pass)
    }

    fn pool_create(&self, p: &StoredPool, version: &str, name: String, owner: String, warm: bool) -> CreateVm {
        CreateVm {
            name,
            image: p.pool.image.catalog_id.clone(),
            version: Some(version.to_string()),
            architecture: p.pool.image.architecture.clone(),
            cpu: Some(p.pool.cpus),
            memory_mb: Some(p.pool.memory_mb),
            tags: p.pool.host_tags.iter().cloned().collect(),
            owner,
            start: true,
            pool: Some(PoolMark {
                pool: p.pool.name.clone(),
                warm,
                ready: false,
                generation: p.generation,
                version: version.to_string(),
            }),
            ..Default::default()
        }
    }

    /// Makes one warm VM of pool `p` and waits until it is exec-ready. `starting` counts it
    /// as being made until its record exists.
    async fn fill_one(&self, p: StoredPool, version: String, avoid: BTreeSet<String>, starting: Starting) {
        let pool = p.pool.name.clone();
        let short = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{pool}-warm-{}", &short[..8]);
        let mut req = self.pool_create(&p, &version, name, service_owner(&pool), true);
        req.avoid = avoid;
        let actor = Actor::system();
        let mut made = self.create_vm(Caller::System, &actor, req.clone()).await;
        if matches!(made, Err(OrchestratorError::NoCapacity(_))) && !req.avoid.is_empty() {
            req.avoid.clear();
            made = self.create_vm(Caller::System, &actor, req).await;
        }
        if let Ok(vm) = &made {
            lock(&self.inner.pools.checking).insert(vm.id.clone());
        }
        drop(starting);
        let vm = match made {
            Ok(vm) => vm,
            Err(e) => {
                debug!(pool = %pool, error = %e, "warm fill failed");
                lock(&self.inner.pools.errors).insert(pool, e.to_string());
                return;
            }
        };
        match self.wait_ready(&vm.host_id, &vm.id, READY_TIMEOUT).await {
            Ok(()) => {
                self.mark_ready(&vm.id).await;
                lock(&self.inner.pools.errors).remove(&pool);
            }
            Err(e) => {
                lock(&self.inner.pools.errors)
                    .insert(pool.clone(), format!("VM {} never became exec-ready: {e}", vm.id));
            }
        }
        lock(&self.inner.pools.checking).remove(&vm.id);
    }

    /// Runs a no-op in the VM until it succeeds (the guest booted and answers exec), giving
    /// up after `limit`.
    pub async fn wait_ready(&self, host_id: &str, vm_id: &str, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        let call = VmCall::Execute(ExecuteRequest {
            command: "true".into(),
            environment_variables: Default::default(),
            user: None,
            working_directory: None,
            timeout: Some(10),
            use_sudo: false,
            use_ssh: false,
            script: None,
        });
        let mut pause = Duration::from_millis(50);
        loop {
            let last = match self.client(host_id).await {
                Ok(c) => match c.vm_call(vm_id, &call).await {
                    Ok(VmReply::Exec(r)) if r.exit_code == 0 && r.error.is_none() => return Ok(()),
                    Ok(other) => format!("the no-op answered {other:?}"),
                    // The VM went: no point waiting.
                    Err(e @ crate::client::HostClientError::NotFound(_)) => {
                        return Err(OrchestratorError::Host { host: host_id.to_string(), source: e });
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() + pause > deadline {
                return Err(OrchestratorError::Conflict(format!("VM {vm_id} is not exec-ready: {last}")));
            }
            // A retry with backoff while the guest boots (not a synchronisation).
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Marks a warm VM's record ready (a fenced write, leader work).
    async fn mark_ready(&self, vm_id: &str) {
        let Ok(_busy) = self.busy(vm_id) else { return };
        let Ok(Some((mut vm, rev))) = self.vm_record(vm_id).await else { return };
        let Some(m) = vm.pool.as_mut() else { return };
        if !m.warm || m.ready {
            return;
        }
        m.ready = true;
        let pool = m.pool.clone();
        let Ok(v) = to_value(&vm) else { return };
        let b = Batch::new().require_revision(VMS, vm_id, rev).put(VMS, vm_id, v).fenced_by(self.fence().as_ref());
        match self.inner.registry.store().commit(b).await {
            Ok(_) => {
                info!(vm = %vm_id, pool = %pool, "warm VM ready");
                let body = json!({"vm_id": vm_id, "pool": pool, "host_id": vm.host_id});
                self.publish_vm("POOL_VM_READY", Some(&vm.owner), body);
            }
            Err(e) => debug!(vm = %vm_id, error = %e, "cannot mark a warm VM ready"),
        }
    }

    /// The live state of pool `p`.
    pub async fn pool_status(&self, p: &StoredPool) -> Result<RunnerPoolStatus> {
        let name = &p.pool.name;
        let records = self.list_vms().await?;
        let mut s = RunnerPoolStatus::default();
        for vm in &records {
            match mark(vm) {
                Some(m) if m.pool == *name && m.warm && m.ready => s.warm_ready += 1,
                Some(m) if m.pool == *name && m.warm => s.warm_starting += 1,
                Some(m) if m.pool == *name => s.claimed += 1,
                _ => {}
            }
        }
        s.warm_starting += lock(&self.inner.pools.starting).get(name).copied().unwrap_or(0);
        s.resolved_version = lock(&self.inner.pools.resolved).get(name).cloned();
        s.last_error = lock(&self.inner.pools.errors).get(name).cloned();
        Ok(s)
    }

    /// Takes a VM of pool `pool` for `owner`, named `name`, deleted `ttl` after the claim
    /// (default: the pool's job timeout): a ready warm VM at once, else a new one once it is
    /// exec-ready. `caller` limits the hosts (their required roles and claims).
    pub async fn claim_from_pool(
        &self,
        caller: Caller,
        actor: &Actor,
        pool: &str,
        name: &str,
        owner: &str,
        ttl: Option<Duration>,
    ) -> Result<OrchestratedVm> {
        let name = name.trim();
        if name.is_empty() || name.len() > 100 {
            return Err(OrchestratorError::Invalid("a VM needs a name of 1 to 100 characters".into()));
        }
        let store = self.inner.registry.store().clone();
        let (p, _) = pools::get(store.as_ref(), pool).await?;
        let ttl = ttl.unwrap_or(Duration::from_secs(p.pool.job_timeout_secs));
        if let Some(max) = self.inner.config.max_vm_ttl
            && ttl > max
        {
            return Err(OrchestratorError::Invalid(format!("the TTL may be at most {} s", max.as_secs())));
        }
        let resolved = lock(&self.inner.pools.resolved).get(&p.pool.name).cloned();
        let records = self.list_vms().await?;
        let mut ready: Vec<&OrchestratedVm> = records
            .iter()
            .filter(|v| {
                mark(v).is_some_and(|m| {
                    m.pool == p.pool.name
                        && m.warm
                        && m.ready
                        && m.generation == p.generation
                        && resolved.as_ref().is_none_or(|r| *r == m.version)
                })
            })
            .filter(|v| self.inner.registry.get(&v.host_id).is_ok_and(|h| caller.may_use(&h)))
            .collect();
        ready.sort_by_key(|v| v.created_at);
        for candidate in ready {
            match self.take_warm(actor, &candidate.id, name, owner, ttl).await {
                Ok(Some(vm)) => {
                    self.wake_pools();
                    return Ok(vm);
                }
                Ok(None) => continue,
                Err(e) => {
                    warn!(vm = %candidate.id, error = %e, "claim of a warm VM failed; trying another");
                    continue;
                }
            }
        }
        // None warm: a new one through normal placement, within max_vms.
        let count = records.iter().filter(|v| mark(v).is_some_and(|m| m.pool == p.pool.name)).count()
            + lock(&self.inner.pools.starting).get(&p.pool.name).copied().unwrap_or(0) as usize;
        if count >= p.pool.max_vms as usize {
            return Err(OrchestratorError::Conflict(format!(
                "Runner pool {:?} has its maximum of {} VMs and none is warm; try again later",
                p.pool.name, p.pool.max_vms
            )));
        }
        let version = resolved.unwrap_or_else(|| p.pool.image.version.clone());
        let mut req = self.pool_create(&p, &version, name.to_string(), owner.to_string(), false);
        req.ttl = Some(ttl);
        let vm = self.create_vm(caller, actor, req).await?;
        self.wake_pools();
        if let Err(e) = self.wait_ready(&vm.host_id, &vm.id, READY_TIMEOUT).await {
            let _ = self.delete_vm(&Actor::system(), &vm.id).await;
            return Err(e);
        }
        Ok(vm)
    }

    /// Claims warm VM `id` if it is still warm and ready: its record (new name, owner,
    /// expiry, no longer warm) and the audit entry in one batch, then the rename on its host.
    /// `None`: someone else took it first.
    async fn take_warm(
        &self,
        actor: &Actor,
        id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<OrchestratedVm>> {
        let Ok(busy) = self.busy(id) else { return Ok(None) };
        let Some((mut vm, rev)) = self.vm_record(id).await? else { return Ok(None) };
        let Some(m) = vm.pool.as_mut() else { return Ok(None) };
        if !(m.warm && m.ready) {
            return Ok(None);
        }
        m.warm = false;
        let pool = m.pool.clone();
        let now = self.inner.clock.now();
        let old_name = std::mem::replace(&mut vm.name, name.to_string());
        vm.owner = owner.to_string();
        vm.expires_at = Some(crate::clock::add(now, ttl));
        let detail = json!({"vm_id": id, "pool": pool, "name": name, "owner": owner, "expires_at": vm.expires_at});
        let entry = AuditEntry::new(actor, "orchestrator.pool.claim", "orchestrator_vm", id, detail);
        let b = Batch::new().require_revision(VMS, id, rev).put(VMS, id, to_value(&vm)?).put(
            AUDIT_COLLECTION,
            &entry.id,
            to_value(&entry)?,
        );
        match self.inner.registry.store().commit(b).await {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        if old_name != name {
            let call = VmCall::Rename(RenameRequest { new_name: name.to_string(), description: None });
            let renamed = match self.client(&vm.host_id).await {
                Ok(c) => c
                    .vm_call(id, &call)
                    .await
                    .map(drop)
                    .map_err(|source| OrchestratorError::Host { host: vm.host_id.clone(), source }),
                Err(e) => Err(e),
            };
            match renamed {
                Ok(()) => {}
                // The host's hypervisor renames only stopped VMs (Parallels): the claim stands,
                // the VM keeps its warm name on the host and the orchestrator shows the
                // claim's name (from its record).
                Err(OrchestratorError::Host {
                    source: crate::client::HostClientError::Refused { status: 409, message },
                    ..
                }) => {
                    info!(vm = %id, %message, "the host keeps the warm VM's name; the claim's name is the orchestrator's");
                }
                Err(e) => {
                    drop(busy);
                    warn!(vm = %id, error = %e, "cannot rename the claimed VM; deleting it");
                    let _ = self.delete_vm(&Actor::system(), id).await;
                    return Err(e);
                }
            }
        }
        let (new_name, new_owner) = (vm.name.clone(), vm.owner.clone());
        self.inner.registry.update_in_memory(&vm.host_id, |h| {
            if let Some(s) = h.vms.iter().find(|v| v.id == id).cloned() {
                let machine = s.machine.clone().map(|m| {
                    let mut m = (*m).clone();
                    m.name = new_name.clone();
                    Arc::new(m)
                });
                view_upsert(h, VmSummary { name: new_name, owner: Some(new_owner), machine, ..s });
            }
        });
        info!(vm = %id, pool = %pool, "warm VM claimed");
        let body = json!({"vm_id": id, "pool": pool, "host_id": vm.host_id, "name": name});
        self.publish_vm("POOL_VM_CLAIMED", Some(&vm.owner), body);
        Ok(Some(vm))
    }

    /// Whether any host view holds a VM owned by a pool's service owner (a warm VM, or one
    /// claimed whose host still reports the pool as its owner).
    pub(super) fn has_warm_vms(&self) -> bool {
        self.inner.registry.with_hosts(|hosts| {
            let mut any = false;
            for h in hosts {
                any |= h.vms.iter().any(|v| v.owner.as_deref().is_some_and(|o| o.starts_with("pool:")));
            }
            any
        })
    }

    /// Deletes warm VMs on one host where the request would then fit (the fewest, not yet
    /// ready first). `false`: no host would fit even without its warm VMs.
    pub async fn evict_warm_for(&self, req: &PlacementRequest) -> Result<bool> {
        let mut by_host: BTreeMap<String, Vec<OrchestratedVm>> = BTreeMap::new();
        for vm in self.list_vms().await? {
            if mark(&vm).is_some_and(|m| m.warm) {
                by_host.entry(vm.host_id.clone()).or_default().push(vm);
            }
        }
        for (host_id, mut vms) in by_host {
            let Ok(mut h) = self.inner.registry.get(&host_id) else { continue };
            let reserved = self.inner.ledger.held_on(&host_id);
            vms.sort_by_key(|v| (mark(v).is_some_and(|m| m.ready), v.created_at));
            let mut chosen = Vec::new();
            for vm in vms {
                view_remove(&mut h, &vm.id);
                chosen.push(vm.id);
                if check_host(req, &h, reserved).is_ok() {
                    let mut evicted = 0;
                    for id in &chosen {
                        let Ok(_busy) = self.busy(id) else { continue };
                        match self.delete_inner(&Actor::system(), id, "orchestrator.pool.evict", None).await {
                            Ok(()) => {
                                info!(vm = %id, host = %host_id, "warm VM evicted for a request");
                                // A warm VM: the pool's, not a user's.
                                let body = json!({"vm_id": id, "host_id": host_id});
                                self.publish_vm("POOL_VM_EVICTED", None, body);
                                evicted += 1;
                            }
                            Err(e) => warn!(vm = %id, error = %e, "cannot evict a warm VM"),
                        }
                    }
                    self.wake_pools();
                    return Ok(evicted > 0);
                }
            }
        }
        Ok(false)
    }
}
