//! Runner pools in the store (collection `runner_pools`): checked, written with their audit
//! entry in one batch, and read by the warm-pool work (`scheduler/pools.rs`), which keeps
//! each pool's warm VMs.
//!
//! A record is the pool as written plus a generation bumped by every update: warm VMs made
//! under an older generation are recycled (deleted and made again).

use chrono::{DateTime, Utc};
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_store::{Batch, Store, StoreError};
use hangar_wire::{PoolImage, RunnerPool, RunnerPoolStatus, RunnerPoolView};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{OrchestratorError, Result};

/// The store collection of runner pools, keyed by name.
pub const POOLS: &str = "runner_pools";

/// The Hangar owner of a pool's warm VMs until one is claimed (no user can have this name:
/// user names have no `:`).
pub fn service_owner(pool: &str) -> String {
    format!("pool:{pool}")
}

/// A pool as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPool {
    pub pool: RunnerPool,
    pub generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl StoredPool {
    /// The view answered, with `status`.
    pub fn view(self, status: RunnerPoolStatus) -> RunnerPoolView {
        RunnerPoolView {
            pool: self.pool,
            generation: self.generation,
            created_at: self.created_at,
            updated_at: self.updated_at,
            status,
        }
    }
}

fn invalid(m: impl Into<String>) -> OrchestratorError {
    OrchestratorError::Invalid(m.into())
}

/// Checks a pool and returns it normalised (trimmed, architecture canonical, labels and tags
/// deduplicated), or says what is wrong.
pub fn check(mut p: RunnerPool) -> Result<RunnerPool> {
    p.name = p.name.trim().to_string();
    let name_ok = !p.name.is_empty()
        && p.name.len() <= 63
        && p.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !p.name.starts_with('.');
    if !name_ok {
        return Err(invalid(format!(
            "pool name {:?}: use 1 to 63 letters, digits, '-', '_' or '.' (not first)",
            p.name
        )));
    }
    let PoolImage { catalog_id, version, architecture } = &mut p.image;
    *catalog_id = catalog_id.trim().to_string();
    if catalog_id.is_empty() {
        return Err(invalid("image.catalog_id is required"));
    }
    *version = version.trim().to_string();
    if version.is_empty() {
        *version = "latest".into();
    }
    *architecture = crate::model::normalize_arch(architecture.trim())
        .map_err(|e| invalid(format!("image.architecture {architecture:?}: {e}")))?;
    if p.cpus == 0 || p.cpus > 1024 {
        return Err(invalid("cpus must be between 1 and 1024"));
    }
    if p.memory_mb < 256 {
        return Err(invalid("memory_mb must be at least 256"));
    }
    if p.max_vms == 0 || p.max_vms > 10_000 {
        return Err(invalid("max_vms must be between 1 and 10000"));
    }
    if p.warm > p.max_vms {
        return Err(invalid(format!("warm ({}) may not exceed max_vms ({})", p.warm, p.max_vms)));
    }
    if p.job_timeout_secs == 0 {
        return Err(invalid("job_timeout_secs must be at least 1"));
    }
    for list in [&mut p.labels, &mut p.host_tags] {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for l in list.iter().map(|l| l.trim()) {
            if l.is_empty() || l.len() > 100 || l.chars().any(char::is_control) {
                return Err(invalid(format!("label or tag {l:?}: 1 to 100 printable characters")));
            }
            if seen.insert(l.to_ascii_lowercase()) {
                out.push(l.to_string());
            }
        }
        *list = out;
    }
    Ok(p)
}

fn parse(v: serde_json::Value) -> Result<StoredPool> {
    serde_json::from_value(v).map_err(|e| OrchestratorError::Internal(format!("stored runner pool: {e}")))
}

fn value<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| OrchestratorError::Internal(format!("serialise: {e}")))
}

fn audit(actor: &Actor, action: &str, name: &str, detail: serde_json::Value) -> Result<(String, serde_json::Value)> {
    let entry = AuditEntry::new(actor, action, "runner_pool", name, detail);
    Ok((entry.id.clone(), value(&entry)?))
}

/// Every pool, by name.
pub async fn list(store: &dyn Store) -> Result<Vec<StoredPool>> {
    store.list(POOLS).await?.into_iter().map(|r| parse(r.value)).collect()
}

/// One pool and its revision.
pub async fn get(store: &dyn Store, name: &str) -> Result<(StoredPool, u64)> {
    let name = name.trim();
    if hangar_store::validate_key("runner pool", name).is_err() {
        return Err(OrchestratorError::not_found("runner pool", name));
    }
    match store.get(POOLS, name).await? {
        Some(r) => Ok((parse(r.value)?, r.revision)),
        None => Err(OrchestratorError::not_found("runner pool", name)),
    }
}

/// Creates a pool; a pool of that name already is a conflict.
pub async fn create(store: &dyn Store, actor: &Actor, pool: RunnerPool, now: DateTime<Utc>) -> Result<StoredPool> {
    let pool = check(pool)?;
    let stored = StoredPool { pool, generation: 1, created_at: now, updated_at: now };
    let (aid, entry) = audit(actor, "runner_pool.create", &stored.pool.name, value(&stored.pool)?)?;
    let b = Batch::new().require_absent(POOLS, &stored.pool.name).put(POOLS, &stored.pool.name, value(&stored)?).put(
        AUDIT_COLLECTION,
        &aid,
        entry,
    );
    match store.commit(b).await {
        Ok(_) => Ok(stored),
        Err(StoreError::Conflict(_)) => {
            Err(OrchestratorError::Conflict(format!("A runner pool named {:?} exists already", stored.pool.name)))
        }
        Err(e) => Err(e.into()),
    }
}

/// Replaces pool `name` (the body's name must be the same); the generation moves on, so
/// its warm VMs are made again. An unchanged pool is not written.
pub async fn update(
    store: &dyn Store,
    actor: &Actor,
    name: &str,
    pool: RunnerPool,
    now: DateTime<Utc>,
) -> Result<StoredPool> {
    let pool = check(pool)?;
    let (old, rev) = get(store, name).await?;
    if pool.name != old.pool.name {
        return Err(invalid(format!(
            "a pool cannot be renamed ({:?} to {:?}); create another",
            old.pool.name, pool.name
        )));
    }
    if pool == old.pool {
        return Ok(old);
    }
    let stored = StoredPool { pool, generation: old.generation + 1, created_at: old.created_at, updated_at: now };
    let (aid, entry) = audit(actor, "runner_pool.update", &stored.pool.name, value(&stored.pool)?)?;
    let b = Batch::new()
        .require_revision(POOLS, &stored.pool.name, rev)
        .put(POOLS, &stored.pool.name, value(&stored)?)
        .put(AUDIT_COLLECTION, &aid, entry);
    match store.commit(b).await {
        Ok(_) => Ok(stored),
        Err(StoreError::Conflict(_)) => {
            Err(OrchestratorError::Conflict(format!("Runner pool {name:?} changed meanwhile; try again")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes a pool (its warm VMs go at the next pass of the warm-pool work; claimed VMs stay
/// with their users).
pub async fn delete(store: &dyn Store, actor: &Actor, name: &str) -> Result<StoredPool> {
    let (old, rev) = get(store, name).await?;
    let (aid, entry) = audit(actor, "runner_pool.delete", &old.pool.name, json!({}))?;
    let b = Batch::new().require_revision(POOLS, &old.pool.name, rev).delete(POOLS, &old.pool.name).put(
        AUDIT_COLLECTION,
        &aid,
        entry,
    );
    match store.commit(b).await {
        Ok(_) => Ok(old),
        Err(StoreError::Conflict(_)) => {
            Err(OrchestratorError::Conflict(format!("Runner pool {name:?} changed meanwhile; try again")))
        }
        Err(e) => Err(e.into()),
    }
}

/// What applying a list of pools (the config file) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Applies pools from configuration: each is created, or updated when it differs (the file
/// wins over API edits of the same pool at every start); pools the file does not name are
/// left alone. Every pool is checked before any is written.
pub async fn apply(store: &dyn Store, actor: &Actor, pools: Vec<RunnerPool>, now: DateTime<Utc>) -> Result<Applied> {
    let mut checked = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for p in pools {
        let p = check(p)?;
        if !names.insert(p.name.clone()) {
            return Err(invalid(format!("runner pool {:?} is named twice", p.name)));
        }
        checked.push(p);
    }
    let mut out = Applied::default();
    for p in checked {
        let name = p.name.clone();
        match get(store, &name).await {
            Ok((old, _)) if old.pool == p => out.unchanged.push(name),
            Ok(_) => {
                update(store, actor, &name, p, now).await?;
                out.updated.push(name);
            }
            Err(OrchestratorError::NotFound { .. }) => match create(store, actor, p, now).await {
                Ok(_) => out.created.push(name),
                // Another replica applied the same file at the same moment.
                Err(OrchestratorError::Conflict(_)) => out.unchanged.push(name),
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

// ----- the facade's pool methods ---------------------------------------------------------

impl crate::facade::HttpOrchestrator {
    /// Every runner pool with its status.
    pub async fn runner_pools(&self) -> Result<Vec<RunnerPoolView>> {
        let mut out = Vec::new();
        for p in list(self.scheduler.registry().store().as_ref()).await? {
            let status = self.scheduler.pool_status(&p).await?;
            out.push(p.view(status));
        }
        Ok(out)
    }

    /// One runner pool with its status.
    pub async fn runner_pool(&self, name: &str) -> Result<RunnerPoolView> {
        let (p, _) = get(self.scheduler.registry().store().as_ref(), name).await?;
        let status = self.scheduler.pool_status(&p).await?;
        Ok(p.view(status))
    }

    /// Creates a runner pool (audited); its warm VMs start at once.
    pub async fn create_runner_pool(&self, actor: &Actor, pool: RunnerPool) -> Result<RunnerPoolView> {
        let now = self.scheduler.registry().clock().now();
        let p = create(self.scheduler.registry().store().as_ref(), actor, pool, now).await?;
        self.scheduler.wake_pools();
        let status = self.scheduler.pool_status(&p).await?;
        Ok(p.view(status))
    }

    /// Replaces a runner pool (audited); warm VMs of the old definition are recycled.
    pub async fn update_runner_pool(&self, actor: &Actor, name: &str, pool: RunnerPool) -> Result<RunnerPoolView> {
        let now = self.scheduler.registry().clock().now();
        let p = update(self.scheduler.registry().store().as_ref(), actor, name, pool, now).await?;
        self.scheduler.wake_pools();
        let status = self.scheduler.pool_status(&p).await?;
        Ok(p.view(status))
    }

    /// Deletes a runner pool (audited); its warm VMs are deleted, claimed ones stay.
    pub async fn delete_runner_pool(&self, actor: &Actor, name: &str) -> Result<()> {
        delete(self.scheduler.registry().store().as_ref(), actor, name).await?;
        self.scheduler.wake_pools();
        Ok(())
    }

    /// Applies pools from configuration (see [`apply`]).
    pub async fn apply_runner_pools(&self, actor: &Actor, pools: Vec<RunnerPool>) -> Result<Applied> {
        let now = self.scheduler.registry().clock().now();
        let applied = apply(self.scheduler.registry().store().as_ref(), actor, pools, now).await?;
        self.scheduler.wake_pools();
        Ok(applied)
    }

    /// Sets how pool images' `latest` is resolved (the catalog module of this server).
    pub fn set_image_versions(&self, v: std::sync::Arc<dyn crate::scheduler::ImageVersions>) {
        self.scheduler.set_image_versions(v);
    }

    /// Takes a VM from runner pool `pool` for `p`: a warm, exec-ready VM at once (renamed,
    /// owner set under the create rule, TTL started, audited), else a new one through normal
    /// placement once it is exec-ready. The audit entry names `p` (see
    /// [`HttpOrchestrator::claim_from_pool_as`] to give the request's actor).
    ///
    /// [`HttpOrchestrator::claim_from_pool_as`]: crate::facade::HttpOrchestrator::claim_from_pool_as
    pub async fn claim_from_pool(
        &self,
        p: &hangar_core::Principal,
        pool: &str,
        req: hangar_wire::PoolClaim,
    ) -> Result<hangar_wire::FleetMachine> {
        let actor = Actor {
            user_id: p.user_id.clone(),
            username: p.username.clone(),
            via: "pool_claim".into(),
            ..Default::default()
        };
        self.claim_from_pool_as(p, &actor, pool, req).await
    }

    /// [`HttpOrchestrator::claim_from_pool`] with the request's actor.
    ///
    /// [`HttpOrchestrator::claim_from_pool`]: crate::facade::HttpOrchestrator::claim_from_pool
    pub async fn claim_from_pool_as(
        &self,
        p: &hangar_core::Principal,
        actor: &Actor,
        pool: &str,
        req: hangar_wire::PoolClaim,
    ) -> Result<hangar_wire::FleetMachine> {
        use hangar_core::vm::{VmAction, authorize, owner_for};
        authorize(p, VmAction::Create, &req.name, None)?;
        let owner = owner_for(p, req.owner.as_deref())?;
        let caller = crate::placement::Caller::from(p);
        let ttl = req.ttl_secs.map(std::time::Duration::from_secs);
        let span = tracing::info_span!("pool_claim", pool, vm = %req.name);
        let vm = tracing::Instrument::instrument(
            self.scheduler.claim_from_pool(caller, actor, pool, &req.name, &owner, ttl),
            span,
        )
        .await?;
        let host = self.scheduler.registry().get(&vm.host_id)?;
        let summary = host.vms.iter().find(|v| v.id == vm.id).cloned().unwrap_or_else(|| crate::model::VmSummary {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: hangar_hypervisor::VmState::Running,
            os: vm.os.as_str().into(),
            cpu: vm.resources.cpu,
            memory_mb: vm.resources.memory_mb,
            disk_mb: vm.resources.disk_mb,
            owner: Some(vm.owner.clone()),
            machine: None,
        });
        Ok(crate::service::fleet_machine(&host, &summary, Some(&vm)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pool(name: &str) -> RunnerPool {
        RunnerPool {
            name: name.into(),
            labels: vec!["linux".into(), "Linux".into()],
            image: PoolImage { catalog_id: "ubuntu".into(), version: "latest".into(), architecture: "amd64".into() },
            cpus: 2,
            memory_mb: 2048,
            host_tags: vec![],
            max_vms: 4,
            warm: 2,
            job_timeout_secs: 600,
        }
    }

    #[test]
    fn a_pool_is_normalised_or_refused_with_the_reason() {
        let p = check(pool(" linux ")).unwrap();
        assert_eq!((p.name.as_str(), p.image.architecture.as_str(), p.labels.len()), ("linux", "x86_64", 1));
        for (bad, word) in [
            (RunnerPool { name: "a/b".into(), ..pool("x") }, "pool name"),
            (RunnerPool { warm: 5, ..pool("x") }, "max_vms"),
            (RunnerPool { cpus: 0, ..pool("x") }, "cpus"),
            (RunnerPool { max_vms: 0, warm: 0, ..pool("x") }, "max_vms"),
        ] {
            let e = check(bad).unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
        let mut p = pool("x");
        p.image.architecture = "sparc".into();
        assert!(check(p).unwrap_err().to_string().contains("architecture"));
    }

    #[tokio::test]
    async fn crud_is_audited_and_apply_is_idempotent() {
        let store = hangar_store::MemoryStore::new();
        let actor = Actor::system();
        let now = Utc::now();
        create(&store, &actor, pool("a"), now).await.unwrap();
        assert!(matches!(create(&store, &actor, pool("a"), now).await, Err(OrchestratorError::Conflict(_))));
        let u = update(&store, &actor, "a", RunnerPool { warm: 1, ..pool("a") }, now).await.unwrap();
        assert_eq!(u.generation, 2);
        let same = update(&store, &actor, "a", RunnerPool { warm: 1, ..pool("a") }, now).await.unwrap();
        assert_eq!(same.generation, 2, "an unchanged pool keeps its generation");
        let applied = apply(&store, &actor, vec![pool("a"), pool("b")], now).await.unwrap();
        assert_eq!((applied.updated, applied.created), (vec!["a".to_string()], vec!["b".to_string()]));
        let again = apply(&store, &actor, vec![pool("a"), pool("b")], now).await.unwrap();
        assert_eq!(again.unchanged.len(), 2);
        delete(&store, &actor, "b").await.unwrap();
        assert_eq!(list(&store).await.unwrap().len(), 1);
        let audits = store.list(AUDIT_COLLECTION).await.unwrap();
        assert_eq!(audits.len(), 5, "create, update, apply's update and create, delete");
    }
}
