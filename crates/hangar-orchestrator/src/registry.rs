//! The host registry: hosts in the store (collection [`HOSTS`]), credentials sealed beside
//! them, an in-memory copy for placement, and single-use enrollment tokens.
//!
//! Every configuration change is written together with its audit entry in one batch.
//! Runtime status (health, resources, VMs) is kept in memory and written when it matters
//! (state transitions, refreshes, confirmed VMs), not on every heartbeat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::{Event, EventBus, EventType};
use hangar_store::{Batch, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, instrument, warn};

use crate::clock::{self, Clock};
use crate::error::{OrchestratorError, Result};
use crate::model::*;
use crate::placement::PlacementIndex;
use crate::sealer::Sealer;

/// Default lifetime of an enrollment token (the reference's 15 minutes).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest lifetime an enrollment token may have.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const TOKEN_PREFIX: &str = "hgr_enroll_";
const MAX_TAGS: usize = 64;

/// A host as stored: the view plus its sealed credentials.
#[derive(Serialize, Deserialize)]
struct StoredHost {
    #[serde(flatten)]
    host: Host,
    #[serde(default)]
    sealed_credentials: Option<String>,
}

struct Cached {
    host: Host,
    revision: u64,
    sealed: Option<String>,
}

/// An enrollment token as stored (keyed by the hash of the secret) and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    /// First characters of the token's hash, to tell tokens apart in lists and logs.
    pub id: String,
    /// Name the joining host gets unless it asks for another.
    pub host_name: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// Who made it (user id).
    pub created_by: String,
}

/// A freshly made enrollment token. The secret is shown once and never stored.
#[derive(Clone)]
pub struct IssuedToken {
    /// The secret to hand to the joining host.
    pub token: String,
    /// What is stored about it.
    pub info: EnrollmentToken,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").field("token", &"<redacted>").field("info", &self.info).finish()
    }
}

fn token_key(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| OrchestratorError::Internal(format!("serialise: {e}")))
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| OrchestratorError::Internal(format!("stored {what} is unreadable: {e}")))
}

fn audit(batch: Batch, actor: &Actor, action: &str, target_id: &str, detail: Value) -> Result<Batch> {
    let entry = AuditEntry::new(actor, action, "orchestrator_host", target_id, detail);
    Ok(batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?))
}

/// Checks a host name: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn check_name(name: &str) -> Result<String> {
    let n = name.trim();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !n.starts_with('.');
    if !ok {
        return Err(OrchestratorError::Invalid(format!(
            "host name {name:?} is invalid: use 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(n.to_string())
}

/// Checks and normalises a host URL: `http` or `https`, a host name, no credentials, query
/// or fragment; an empty path becomes `/api` (the reference's default prefix); no trailing
/// slash.
pub fn check_url(raw: &str) -> Result<String> {
    let bad = |why: &str| OrchestratorError::Invalid(format!("host URL {raw:?} is invalid: {why}"));
    let mut u = url::Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad("use http:// or https://"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad("put credentials in the authentication field, not in the URL"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("it must not have a query or fragment"));
    }
    if u.path() == "/" || u.path().is_empty() {
        u.set_path("/api");
    }
    Ok(u.as_str().trim_end_matches('/').to_string())
}

fn check_tags(tags: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    if tags.len() > MAX_TAGS {
        return Err(OrchestratorError::Invalid(format!("a host has at most {MAX_TAGS} tags")));
    }
    let mut out = BTreeSet::new();
    for t in tags {
        let t = t.trim();
        if t.is_empty() || t.len() > 64 || t.chars().any(char::is_control) {
            return Err(OrchestratorError::Invalid(format!("tag {t:?} is invalid: use 1 to 64 printable characters")));
        }
        out.insert(t.to_string());
    }
    Ok(out)
}

fn check_text(field: &str, v: &str, max: usize) -> Result<()> {
    if v.chars().count() > max || v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(OrchestratorError::Invalid(format!("{field} must be at most {max} printable characters")));
    }
    Ok(())
}

fn check_credentials(c: &HostCredentials) -> Result<()> {
    let ok = match c {
        HostCredentials::Basic { username, password } => !username.is_empty() && !password.is_empty(),
        HostCredentials::ApiKey { api_key } => !api_key.is_empty(),
    };
    if ok { Ok(()) } else { Err(OrchestratorError::Invalid("host credentials must not be empty".into())) }
}

/// The host registry. Share it behind an `Arc`.
pub struct HostRegistry {
    store: Arc<dyn Store>,
    sealer: Sealer,
    bus: EventBus,
    clock: Arc<dyn Clock>,
    cache: RwLock<BTreeMap<String, Cached>>,
    /// Compact snapshots of the cached views for placement, changed only while the cache's
    /// write lock is held (lock order: cache, then index), so they follow the views exactly.
    index: RwLock<PlacementIndex>,
    /// Serialises writes, so check-then-write sequences (unique names) are atomic here;
    /// store conditions guard against anything else.
    write: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for HostRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegistry").field("hosts", &self.read().len()).finish()
    }
}

impl HostRegistry {
    /// Opens the registry: loads the sealing key from `<data_dir>/secrets/` (making it on
    /// first use) and every stored host. Hosts start in state `unknown` until heard from.
    #[instrument(skip_all)]
    pub async fn open(
        store: Arc<dyn Store>,
        data_dir: &std::path::Path,
        bus: EventBus,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let sealer = Sealer::load_or_create(data_dir)?;
        let mut cache = BTreeMap::new();
        for rec in store.list(HOSTS).await? {
            let stored: StoredHost = from_value(rec.value, "host")?;
            let mut host = stored.host;
            // Nothing is known until the host is heard from again (its event stream resyncs
            // the view): the stored VMs are shown, but in state `unknown`.
            host.state = HostState::Unknown;
            for vm in &mut host.vms {
                vm.state = hangar_hypervisor::VmState::Unknown;
            }
            cache.insert(host.id.clone(), Cached { host, revision: rec.revision, sealed: stored.sealed_credentials });
        }
        info!(hosts = cache.len(), "host registry opened");
        let index = RwLock::new(PlacementIndex::build(cache.values().map(|c| &c.host)));
        Ok(HostRegistry {
            store,
            sealer,
            bus,
            clock,
            cache: RwLock::new(cache),
            index,
            write: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Cached>> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_cache(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Cached>> {
        self.cache.write().unwrap_or_else(|e| e.into_inner())
    }

    fn index_write(&self) -> RwLockWriteGuard<'_, PlacementIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, message: &str, body: Value) {
        self.bus.publish(Event::new(EventType::Orchestrator, message, body));
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Every host, in id order.
    pub fn list(&self) -> Vec<Host> {
        self.read().values().map(|c| c.host.clone()).collect()
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no host is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Host ids, in order.
    pub fn ids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// A host by id or (case-insensitive) name.
    pub fn get(&self, id_or_name: &str) -> Result<Host> {
        let cache = self.read();
        if let Some(c) = cache.get(id_or_name) {
            return Ok(c.host.clone());
        }
        cache
            .values()
            .find(|c| c.host.name.eq_ignore_ascii_case(id_or_name))
            .map(|c| c.host.clone())
            .ok_or_else(|| OrchestratorError::not_found("host", id_or_name))
    }

    /// Runs `f` over every host (id order) without copying them. Do not call back into the
    /// registry's writers from `f`.
    pub fn with_hosts<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &Host>) -> R) -> R {
        let cache = self.read();
        let mut it = cache.values().map(|c| &c.host);
        f(&mut it)
    }

    /// Runs `f` with a cloneable iterator over every host (for placement with a queue).
    pub fn with_host_slice<R>(&self, f: impl FnOnce(&[&Host]) -> R) -> R {
        let cache = self.read();
        let hosts: Vec<&Host> = cache.values().map(|c| &c.host).collect();
        f(&hosts)
    }

    /// Runs `f` with the placement index (a compact snapshot of every host, in step with
    /// the views). Do not call back into the registry's writers from `f`.
    pub fn with_placement<R>(&self, f: impl FnOnce(&PlacementIndex) -> R) -> R {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        f(&index)
    }

    /// The host's credentials, opened. Only for building a host client.
    pub fn credentials(&self, id: &str) -> Result<Option<HostCredentials>> {
        let sealed = {
            let cache = self.read();
            let c = cache.get(id).ok_or_else(|| OrchestratorError::not_found("host", id))?;
            c.sealed.clone()
        };
        sealed.map(|s| self.sealer.open(id, &s)).transpose()
    }

    fn check_unique(&self, name: &str, url: &str, except: Option<&str>) -> Result<()> {
        for c in self.read().values() {
            if Some(c.host.id.as_str()) == except {
                continue;
            }
            if c.host.name.eq_ignore_ascii_case(name) {
                return Err(OrchestratorError::Conflict(format!("a host named {name:?} is already registered")));
            }
            if c.host.url == url {
                return Err(OrchestratorError::Conflict(format!(
                    "host {} is already registered with URL {url}",
                    c.host.name
                )));
            }
        }
        Ok(())
    }

    fn build_host(&self, req: &RegisterHost, default_name: Option<&str>, hw: Option<&HostHardware>) -> Result<Host> {
        let url = check_url(&req.url)?;
        let name = match (&req.name, default_name) {
            (Some(n), _) if !n.trim().is_empty() => check_name(n)?,
            (_, Some(n)) => check_name(n)?,
            _ => {
                let h = url::Url::parse(&url).ok().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_default();
                check_name(&h)?
            }
        };
        check_text("description", &req.description, 1024)?;
        if let Some(c) = &req.credentials {
            check_credentials(c)?;
        }
        let now = self.clock.now();
        let mut host = Host {
            description: req.description.clone(),
            tags: check_tags(&req.tags)?,
            enabled: !req.disabled,
            required_roles: req.required_roles.clone(),
            required_claims: req.required_claims.clone(),
            has_credentials: req.credentials.is_some(),
            ..Host::new(uuid::Uuid::now_v7().to_string(), name, url, now)
        };
        if let Some(hw) = hw {
            host.apply_hardware(hw);
        }
        Ok(host)
    }

    fn stored_value(&self, host: &Host, sealed: &Option<String>) -> Result<Value> {
        to_value(&StoredHost { host: host.clone(), sealed_credentials: sealed.clone() })
    }

    /// Registers a host (with what it reported about itself, when it was probed).
    #[instrument(skip(self, actor, req, hw), fields(url = %req.url))]
    pub async fn register(&self, actor: &Actor, req: RegisterHost, hw: Option<HostHardware>) -> Result<Host> {
        let host = self.build_host(&req, None, hw.as_ref())?;
        let _g = self.write.lock().await;
        self.insert_host(actor, host, req.credentials.as_ref(), Batch::new(), "orchestrator.host.register").await
    }

    async fn insert_host(
        &self,
        actor: &Actor,
        host: Host,
        creds: Option<&HostCredentials>,
        batch: Batch,
        action: &str,
    ) -> Result<Host> {
        self.check_unique(&host.name, &host.url, None)?;
        let sealed = creds.map(|c| self.sealer.seal(&host.id, c)).transpose()?;
        let batch = batch.require_absent(HOSTS, &host.id).put(HOSTS, &host.id, self.stored_value(&host, &sealed)?);
        let batch = audit(
            batch,
            actor,
            action,
            &host.id,
            json!({"name": host.name, "url": host.url, "tags": host.tags, "has_credentials": host.has_credentials}),
        )?;
        let committed = self.store.commit(batch).await?;
        {
            let mut cache = self.write_cache();
            cache.insert(host.id.clone(), Cached { host: host.clone(), revision: committed.revision, sealed });
            self.index_write().upsert(&host);
        }
        info!(host = %host.id, name = %host.name, "host registered");
        self.publish("HOST_REGISTERED", json!({"host_id": host.id, "name": host.name}));
        Ok(host)
    }

    /// Changes a host's configuration.
    #[instrument(skip(self, actor, change))]
    pub async fn update(&self, actor: &Actor, id: &str, change: UpdateHost) -> Result<Host> {
        let _g = self.write.lock().await;
        let (mut host, revision, mut sealed) = {
            let cache = self.read();
            let c = cache.get(id).ok_or_else(|| OrchestratorError::not_found("host", id))?;
            (c.host.clone(), c.revision, c.sealed.clone())
        };
        let mut changed = Vec::new();
        if let Some(n) = &change.name {
            host.name = check_name(n)?;
            changed.push("name");
        }
        if let Some(u) = &change.url {
            host.url = check_url(u)?;
            changed.push("url");
        }
        if let Some(d) = &change.description {
            check_text("description", d, 1024)?;
            host.description = d.clone();
            changed.push("description");
        }
        if let Some(t) = &change.tags {
            host.tags = check_tags(t)?;
            changed.push("tags");
        }
        if let Some(r) = &change.required_roles {
            host.required_roles = r.clone();
            changed.push("required_roles");
        }
        if let Some(c) = &change.required_claims {
            host.required_claims = c.clone();
            changed.push("required_claims");
        }
        if let Some(c) = &change.credentials {
            check_credentials(c)?;
            sealed = Some(self.sealer.seal(&host.id, c)?);
            host.has_credentials = true;
            changed.push("credentials");
        }
        self.check_unique(&host.name, &host.url, Some(id))?;
        host.updated_at = self.clock.now();
        let batch =
            Batch::new().require_revision(HOSTS, id, revision).put(HOSTS, id, self.stored_value(&host, &sealed)?);
        let batch = audit(batch, actor, "orchestrator.host.update", id, json!({"changed": changed}))?;
        let committed = self.store.commit(batch).await?;
        {
            let mut cache = self.write_cache();
            if let Some(c) = cache.get_mut(id) {
                // Keep runtime status that changed meanwhile; take the new configuration.
                let status = c.host.clone();
                host.state = status.state;
                host.last_seen = status.last_seen;
                host.last_error = status.last_error;
                host.vms = status.vms;
                host.resources = status.resources;
                host.cached_images = status.cached_images;
                c.host = host.clone();
                c.revision = committed.revision;
                c.sealed = sealed;
                self.index_write().upsert(&c.host);
            }
        }
        self.publish("HOST_UPDATED", json!({"host_id": id, "changed": changed}));
        Ok(host)
    }

    /// Takes a host in (`true`) or out of scheduling.
    #[instrument(skip(self, actor))]
    pub async fn set_enabled(&self, actor: &Actor, id: &str, enabled: bool) -> Result<Host> {
        let action = if enabled { "orchestrator.host.enable" } else { "orchestrator.host.disable" };
        let host = self
            .persist_status(id, Batch::new(), Some((actor, action, json!({"enabled": enabled}))), |h| {
                h.enabled = enabled
            })
            .await?;
        self.publish(if enabled { "HOST_ENABLED" } else { "HOST_DISABLED" }, json!({"host_id": id, "name": host.name}));
        Ok(host)
    }

    /// Unregisters a host.
    #[instrument(skip(self, actor))]
    pub async fn delete(&self, actor: &Actor, id: &str) -> Result<Host> {
        let _g = self.write.lock().await;
        let (host, revision) = {
            let cache = self.read();
            let c = cache.get(id).ok_or_else(|| OrchestratorError::not_found("host", id))?;
            (c.host.clone(), c.revision)
        };
        let batch = Batch::new().require_revision(HOSTS, id, revision).delete(HOSTS, id);
        let batch = audit(batch, actor, "orchestrator.host.delete", id, json!({"name": host.name}))?;
        self.store.commit(batch).await?;
        {
            let mut cache = self.write_cache();
            cache.remove(id);
            self.index_write().remove(id);
        }
        info!(host = %id, "host unregistered");
        self.publish("HOST_REMOVED", json!({"host_id": id, "name": host.name}));
        Ok(host)
    }

    /// Brings the cached hosts in step with the store, for a replica sharing it with others:
    /// hosts registered elsewhere are added, hosts unregistered elsewhere removed, and a host
    /// whose record another replica rewrote takes the stored configuration and revision.
    /// A cached host keeps its VM list and resources (fresher here than the stored snapshot);
    /// with `keep_runtime` (this replica follows the hosts itself: the leader) its health too,
    /// otherwise the stored health, which the leader writes at each transition, replaces it. Returns the ids of hosts added or
    /// changed. `everything`: take every record, changed or not (a replica's first sync: its
    /// views were opened in state `unknown`).
    pub async fn sync_from_store(&self, keep_runtime: bool, everything: bool) -> Result<Vec<String>> {
        let _g = self.write.lock().await;
        let records = self.store.list(HOSTS).await?;
        let mut changed = Vec::new();
        let mut cache = self.write_cache();
        let mut index = self.index_write();
        let stored: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let gone: Vec<String> = cache.keys().filter(|id| !stored.contains(id.as_str())).cloned().collect();
        for id in gone {
            cache.remove(&id);
            index.remove(&id);
        }
        for rec in records {
            if !everything && cache.get(&rec.id).is_some_and(|c| c.revision == rec.revision) {
                continue;
            }
            let stored: StoredHost = match from_value(rec.value, "host") {
                Ok(s) => s,
                Err(e) => {
                    warn!(host = %rec.id, error = %e, "unreadable host record skipped");
                    continue;
                }
            };
            let mut host = stored.host;
            if let Some(c) = cache.get(&rec.id) {
                // The VM list this replica keeps (followed from the host by the leader, kept
                // by each replica's own creations and the VM records it reads) is fresher than
                // the stored one, a snapshot from the leader's last transition.
                let status = &c.host;
                host.vms = status.vms.clone();
                host.resources = status.resources;
                host.cached_images = status.cached_images.clone();
                if keep_runtime {
                    host.state = status.state;
                    host.last_seen = status.last_seen;
                    host.last_error = status.last_error.clone();
                }
            }
            index.upsert(&host);
            changed.push(rec.id.clone());
            cache.insert(rec.id, Cached { host, revision: rec.revision, sealed: stored.sealed_credentials });
        }
        Ok(changed)
    }

    /// Changes a host's runtime status in memory only (last seen, VM states), in place
    /// (the view is not copied). Returns `false` when the host is gone.
    pub fn update_in_memory(&self, id: &str, f: impl FnOnce(&mut Host)) -> bool {
        let mut cache = self.write_cache();
        let Some(c) = cache.get_mut(id) else { return false };
        f(&mut c.host);
        self.index_write().upsert(&c.host);
        true
    }

    /// Commits `extra` writes with an optional audit entry, then changes the host's
    /// runtime status in memory, without rewriting the host record and without the registry's
    /// write gate. For per-VM records (creations, deletions): the host's VM list and
    /// resources are runtime status that every (re)connection resyncs from the host, so
    /// they need not be durable, while `extra` is acknowledged only once it is. Concurrent
    /// callers are grouped into one durable write by the store.
    pub async fn commit_with_status(
        &self,
        id: &str,
        extra: Batch,
        audit_entry: Option<(&Actor, &str, Value)>,
        f: impl FnOnce(&mut Host),
    ) -> Result<()> {
        let mut batch = extra;
        if let Some((actor, action, detail)) = audit_entry {
            batch = audit(batch, actor, action, id, detail)?;
        }
        if !self.read().contains_key(id) {
            return Err(OrchestratorError::not_found("host", id));
        }
        self.store.commit(batch).await?;
        // Committed: a host unregistered meanwhile has no view left to change.
        self.update_in_memory(id, f);
        Ok(())
    }

    /// Changes a host (in memory first, so concurrent in-memory updates are not lost) and
    /// writes it, with `extra` writes and an optional audit entry, in one batch.
    pub async fn persist_status(
        &self,
        id: &str,
        extra: Batch,
        audit_entry: Option<(&Actor, &str, Value)>,
        f: impl FnOnce(&mut Host),
    ) -> Result<Host> {
        let _g = self.write.lock().await;
        let now = self.clock.now();
        let (host, revision, sealed) = {
            let mut cache = self.write_cache();
            let c = cache.get_mut(id).ok_or_else(|| OrchestratorError::not_found("host", id))?;
            f(&mut c.host);
            c.host.updated_at = now;
            self.index_write().upsert(&c.host);
            (c.host.clone(), c.revision, c.sealed.clone())
        };
        let mut batch = extra;
        batch = batch.require_revision(HOSTS, id, revision).put(HOSTS, id, self.stored_value(&host, &sealed)?);
        if let Some((actor, action, detail)) = audit_entry {
            batch = audit(batch, actor, action, id, detail)?;
        }
        let committed = self.store.commit(batch).await?;
        if let Some(c) = self.write_cache().get_mut(id) {
            c.revision = committed.revision;
        }
        Ok(host)
    }

    // ----- enrollment tokens ---------------------------------------------------------

    /// Makes a single-use enrollment token for a host to join with. Only its hash is stored.
    #[instrument(skip(self, actor))]
    pub async fn create_enrollment_token(
        &self,
        actor: &Actor,
        host_name: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedToken> {
        let host_name = check_name(host_name)?;
        let ttl = ttl.unwrap_or(DEFAULT_TOKEN_TTL);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(OrchestratorError::Invalid(format!(
                "an enrollment token lives between 1 s and {} h",
                MAX_TOKEN_TTL.as_secs() / 3600
            )));
        }
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| OrchestratorError::Internal("no randomness".into()))?;
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let key = token_key(&token);
        let now = self.clock.now();
        let info = EnrollmentToken {
            id: key[..12].to_string(),
            host_name,
            created_at: now,
            expires_at: clock::add(now, ttl),
            created_by: actor.user_id.clone(),
        };
        let batch = Batch::new().require_absent(ENROLLMENT_TOKENS, &key).put(ENROLLMENT_TOKENS, &key, to_value(&info)?);
        let entry = AuditEntry::new(
            actor,
            "orchestrator.enrollment_token.create",
            "enrollment_token",
            &info.id,
            json!({"host_name": info.host_name, "expires_at": info.expires_at}),
        );
        let batch = batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?);
        self.store.commit(batch).await?;
        Ok(IssuedToken { token, info })
    }

    async fn lookup_token(&self, token: &str) -> Result<(String, EnrollmentToken, u64)> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return Err(OrchestratorError::InvalidToken);
        }
        let key = token_key(token);
        let rec = self.store.get(ENROLLMENT_TOKENS, &key).await?.ok_or(OrchestratorError::InvalidToken)?;
        let info: EnrollmentToken = from_value(rec.value, "enrollment token")?;
        if info.expires_at <= self.clock.now() {
            return Err(OrchestratorError::InvalidToken);
        }
        Ok((key, info, rec.revision))
    }

    /// Checks a token without using it.
    pub async fn validate_enrollment_token(&self, token: &str) -> Result<EnrollmentToken> {
        Ok(self.lookup_token(token).await?.1)
    }

    /// Registers a host with an enrollment token, consuming the token in the same atomic
    /// batch (conditioned on the token record's revision), so one token registers at most
    /// one host even when several joins race.
    #[instrument(skip_all, fields(url = %req.url))]
    pub async fn register_with_token(&self, token: &str, req: RegisterHost, hw: Option<HostHardware>) -> Result<Host> {
        let (key, info, revision) = self.lookup_token(token).await?;
        let host = self.build_host(&req, Some(&info.host_name), hw.as_ref())?;
        let actor = Actor {
            user_id: info.created_by.clone(),
            username: format!("enrollment:{}", info.id),
            via: format!("enrollment_token:{}", info.id),
            ..Default::default()
        };
        let batch = Batch::new().require_revision(ENROLLMENT_TOKENS, &key, revision).delete(ENROLLMENT_TOKENS, &key);
        let _g = self.write.lock().await;
        // Re-read under the write gate so a token already used here answers "invalid token"
        // rather than a name clash; the revision condition in the batch is the real guard.
        match self.store.get(ENROLLMENT_TOKENS, &key).await? {
            Some(rec) if rec.revision == revision => {}
            _ => return Err(OrchestratorError::InvalidToken),
        }
        match self.insert_host(&actor, host, req.credentials.as_ref(), batch, "orchestrator.host.join").await {
            Err(OrchestratorError::Store(StoreError::Conflict(_))) => {
                warn!(token = %info.id, "enrollment token used twice; second join refused");
                Err(OrchestratorError::InvalidToken)
            }
            other => other,
        }
    }

    /// Removes expired enrollment tokens; returns how many.
    pub async fn purge_expired_tokens(&self) -> Result<usize> {
        self.purge_expired_tokens_fenced(None).await
    }

    /// [`HostRegistry::purge_expired_tokens`] as leader work: the batch carries `fence`.
    pub async fn purge_expired_tokens_fenced(&self, fence: Option<&hangar_store::Fence>) -> Result<usize> {
        let now = self.clock.now();
        let mut batch = Batch::new();
        let mut n = 0;
        for rec in self.store.list(ENROLLMENT_TOKENS).await? {
            let info: EnrollmentToken = from_value(rec.value, "enrollment token")?;
            if info.expires_at <= now {
                batch =
                    batch.require_revision(ENROLLMENT_TOKENS, &rec.id, rec.revision).delete(ENROLLMENT_TOKENS, &rec.id);
                n += 1;
            }
        }
        if n > 0 {
            self.store.commit(hangar_store::FencedBatch::fenced_by(batch, fence)).await?;
        }
        Ok(n)
    }
}
