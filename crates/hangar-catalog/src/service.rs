//! The catalog service: every catalog operation, authorised against the
//! caller and written together with its audit entry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::Utc;
use hangar_blobstore::{BlobStore, StoreConfig};
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::{Event, EventBus, EventType, Principal};
use hangar_image::manifest::{chunk_key, pack_key};
use hangar_image::{CacheLimits, ChunkCache, ChunkRef, PullOptions};
use hangar_store::{Batch, Store, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{info, instrument, warn};

use crate::arch::Architecture;
use crate::model::{self, *};
use crate::sealer::Sealer;
use crate::version::{self, LATEST};
use crate::{CatalogError, Result};

/// Catalog ids that would clash with fixed routes under `/catalog`.
pub const RESERVED_IDS: &[&str] = &["cache", "push", "pull", "pull-ticket", "import", "import-vm"];

/// Longest catalog id.
pub const MAX_ID_LEN: usize = 128;

/// How many times a read-modify-write is retried when a concurrent writer
/// changed the record in between.
const RETRIES: usize = 8;

/// Where a chunk's stored bytes are: its own object, or a range of a pack.
type ChunkPlace = (String, Option<(u64, u64)>);

/// The chunks of one registered image: (image hash, chunk hash → place).
type ChunkSet = (String, Arc<HashMap<String, ChunkPlace>>);

/// Where the catalog keeps its key and cache.
#[derive(Debug, Clone)]
pub struct CatalogOptions {
    /// The server's data folder: the provider key goes to
    /// `<data_dir>/secrets/catalog-providers.key`.
    pub data_dir: PathBuf,
    /// The host cache (`<cache_dir>/images`, `<cache_dir>/chunks`); default
    /// `<data_dir>/catalog-cache`.
    pub cache_dir: Option<PathBuf>,
    /// Size budget of the chunk cache.
    pub cache_limits: CacheLimits,
    /// Folders a `local-storage` provider given by an API caller (push, import, a new
    /// connection) must lie in, unless the caller is a SUPER_USER (`CATALOG_LOCAL_ROOTS`);
    /// empty: `<data_dir>/catalog`.
    pub local_roots: Vec<PathBuf>,
    /// How long an unused pack stays condemned before the GC of a
    /// `clean_remote` delete removes it (see `hangar_image::gc`).
    pub gc_grace: std::time::Duration,
}

impl CatalogOptions {
    /// Defaults for a data folder.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        CatalogOptions {
            data_dir: data_dir.into(),
            cache_dir: None,
            cache_limits: CacheLimits::default(),
            local_roots: Vec::new(),
            gc_grace: hangar_image::gc::DEFAULT_GRACE,
        }
    }
}

/// `path` made absolute by its nearest existing ancestor's real path (symlinks resolved),
/// the rest appended; `None` when nothing of it resolves.
fn resolve_lexically(path: &Path) -> Option<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return Some(rest.into_iter().rev().fold(real, |p: PathBuf, n| p.join(n)));
        }
        rest.push(existing.file_name()?.to_os_string());
        existing = existing.parent()?.to_path_buf();
    }
}

/// The catalog service. Share it as `Arc<Catalog>`.
pub struct Catalog {
    store: Arc<dyn Store>,
    bus: EventBus,
    sealer: Sealer,
    cache_dir: PathBuf,
    cache_limits: CacheLimits,
    local_roots: Vec<PathBuf>,
    gc_grace: std::time::Duration,
    chunk_cache: tokio::sync::OnceCell<Arc<ChunkCache>>,
    stores: Mutex<HashMap<String, Arc<dyn BlobStore>>>,
    chunk_sets: Mutex<HashMap<String, ChunkSet>>,
    host_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("cache_dir", &self.cache_dir).finish_non_exhaustive()
    }
}

pub(crate) fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| CatalogError::Internal(format!("serialise: {e}")))
}

pub(crate) fn from_value<T: DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| CatalogError::Internal(format!("stored {what} is unreadable: {e}")))
}

/// Checks a catalog id: 1 to 128 of `[A-Za-z0-9._-]`, starting with a letter
/// or digit, not one of [`RESERVED_IDS`].
pub fn validate_catalog_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        return Err(CatalogError::Invalid(format!(
            "catalog id {id:?} is invalid: use 1 to {MAX_ID_LEN} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )));
    }
    if RESERVED_IDS.contains(&id.to_ascii_lowercase().as_str()) {
        return Err(CatalogError::Invalid(format!("catalog id {id:?} is reserved; choose another")));
    }
    Ok(())
}

/// Parses an architecture, as a 400 on failure.
pub fn parse_arch(a: &str) -> Result<Architecture> {
    a.parse().map_err(|e: crate::arch::UnknownArchitecture| CatalogError::Invalid(e.to_string()))
}

/// The record id of an entry.
pub fn record_id(catalog_id: &str, version: &str, arch: Architecture) -> String {
    format!("{}/{version}/{arch}", catalog_id.to_ascii_lowercase())
}

/// Key of an entry's image manifest in its provider.
pub fn manifest_key(catalog_id: &str, version: &str, arch: Architecture) -> String {
    format!("images/{}/{version}/{arch}/manifest.json", catalog_id.to_ascii_lowercase())
}

fn not_found(catalog_id: &str, version: Option<&str>, arch: Option<Architecture>) -> CatalogError {
    let mut what = format!("catalog manifest {catalog_id:?}");
    if let Some(v) = version {
        what.push_str(&format!(" version {v:?}"));
    }
    if let Some(a) = arch {
        what.push_str(&format!(" for {a}"));
    }
    CatalogError::NotFound(format!("{what} not found"))
}

fn check_text(field: &str, v: &str, max: usize) -> Result<()> {
    if v.chars().count() > max || v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(CatalogError::Invalid(format!("{field} must be at most {max} printable characters")));
    }
    Ok(())
}

fn check_vm_type(v: &str) -> Result<String> {
    let v = v.trim().to_ascii_lowercase();
    if v.is_empty() || v.len() > 32 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) {
        return Err(CatalogError::Invalid(format!("vm type {v:?} is invalid (e.g. pvm, macvm, qemu)")));
    }
    Ok(v)
}

fn event_body(m: &Manifest) -> Value {
    json!({"id": m.id, "catalog_id": m.catalog_id, "version": m.version, "architecture": m.architecture})
}

/// The image manifest of an entry, checked against what was registered.
fn parse_image(raw: &[u8], m: &Manifest) -> Result<hangar_image::Manifest> {
    let image = hangar_image::Manifest::from_json(raw)?;
    if image.manifest_hash.as_deref() != Some(m.image_hash.as_str()) {
        return Err(CatalogError::Conflict(format!(
            "the image of {} {} ({}) changed in its provider since it was registered; push it again",
            m.catalog_id, m.version, m.architecture
        )));
    }
    Ok(image)
}

/// Every data chunk of an image with the place of its stored bytes.
fn chunk_places(image: &hangar_image::Manifest) -> HashMap<String, ChunkPlace> {
    let mut out = HashMap::new();
    for (_, _, chunks) in image.files() {
        for c in chunks {
            if let ChunkRef::Data { hash, stored, pack, at, .. } = c {
                let place = match (pack.and_then(|p| image.packs.get(p as usize)), at) {
                    (Some(p), Some(a)) => (pack_key(&p.id), Some((*a, *stored))),
                    _ => (chunk_key(hash), None),
                };
                out.entry(hash.clone()).or_insert(place);
            }
        }
    }
    out
}

/// The store folders holding an image's chunk objects.
fn object_prefixes(image: &hangar_image::Manifest) -> &'static [&'static str] {
    use hangar_image::manifest::{CHUNK_PREFIX, INDEX_PREFIX, PACK_PREFIX};
    if image.is_packed() { &[PACK_PREFIX, INDEX_PREFIX] } else { &[CHUNK_PREFIX] }
}

fn data_chunks(image: &hangar_image::Manifest) -> HashSet<String> {
    image
        .files()
        .flat_map(|(_, _, chunks)| chunks.iter())
        .filter_map(|c| match c {
            ChunkRef::Data { hash, .. } => Some(hash.clone()),
            ChunkRef::Hole { .. } => None,
        })
        .collect()
}

impl Catalog {
    /// Opens the catalog on a store. Creates the provider key on first use.
    pub fn new(store: Arc<dyn Store>, bus: EventBus, options: CatalogOptions) -> Result<Self> {
        let sealer = Sealer::load_or_create(&options.data_dir.join("secrets").join("catalog-providers.key"))?;
        let cache_dir = options.cache_dir.clone().unwrap_or_else(|| options.data_dir.join("catalog-cache"));
        let local_roots = match options.local_roots.is_empty() {
            true => vec![options.data_dir.join("catalog")],
            false => options.local_roots.clone(),
        };
        // `hangar_image_cache_size_bytes` from the first scrape on, not only after a change.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = store.clone();
            rt.spawn(async move { note_cache_size(&store).await });
        }
        Ok(Catalog {
            store,
            bus,
            sealer,
            cache_dir,
            cache_limits: options.cache_limits,
            local_roots,
            gc_grace: options.gc_grace,
            chunk_cache: tokio::sync::OnceCell::new(),
            stores: Mutex::new(HashMap::new()),
            chunk_sets: Mutex::new(HashMap::new()),
            host_locks: Mutex::new(HashMap::new()),
        })
    }

    /// The host cache folder.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    fn publish(&self, message: &str, m: &Manifest, actor: &Actor) {
        let mut e = Event::new(EventType::CatalogCache, message, event_body(m));
        // Restricted entries are announced to their actor only, so the stream
        // does not reveal them to others.
        if !(m.required_roles.is_empty() && m.required_claims.is_empty()) {
            e = e.for_user(actor.user_id.clone());
        }
        self.bus.publish(e);
    }

    pub(crate) fn audit(batch: Batch, actor: &Actor, action: &str, target: &str, detail: Value) -> Result<Batch> {
        let entry = AuditEntry::new(actor, action, "catalog_manifest", target, detail);
        Ok(batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?))
    }

    // ----- reading ---------------------------------------------------------------

    async fn all(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for r in self.store.list(MANIFESTS).await? {
            out.push(from_value(r.value, "catalog manifest")?);
        }
        Ok(out)
    }

    pub(crate) async fn load(&self, id: &str) -> Result<Option<(Manifest, u64)>> {
        match self.store.get(MANIFESTS, id).await? {
            Some(r) => Ok(Some((from_value(r.value, "catalog manifest")?, r.revision))),
            None => Ok(None),
        }
    }

    /// Every entry the caller may see, sorted by catalog id, then newest
    /// version first, then architecture.
    #[instrument(skip_all, fields(user = %p.username))]
    pub async fn list(&self, p: &Principal) -> Result<Vec<Manifest>> {
        let mut v: Vec<Manifest> = self.all().await?.into_iter().filter(|m| m.visible_to(p)).collect();
        // A total order (sorting with a partial one may panic): id, then newest first by
        // (semver, creation time, name), then architecture.
        v.sort_by_cached_key(|m| {
            (
                m.catalog_id.to_ascii_lowercase(),
                std::cmp::Reverse(version::sort_key(&m.version, m.created_at)),
                m.architecture,
            )
        });
        Ok(v)
    }

    /// [`Catalog::list`] grouped by catalog id, in the reference's shape.
    pub async fn list_grouped(&self, p: &Principal) -> Result<Vec<(String, Vec<Manifest>)>> {
        let mut groups: Vec<(String, Vec<Manifest>)> = Vec::new();
        for m in self.list(p).await? {
            match groups.last_mut() {
                Some((id, ms)) if id.eq_ignore_ascii_case(&m.catalog_id) => ms.push(m),
                _ => groups.push((m.catalog_id.clone(), vec![m])),
            }
        }
        Ok(groups)
    }

    /// Every visible version and architecture of one catalog id.
    pub async fn get_id(&self, p: &Principal, catalog_id: &str) -> Result<Vec<Manifest>> {
        let v: Vec<Manifest> =
            self.list(p).await?.into_iter().filter(|m| m.catalog_id.eq_ignore_ascii_case(catalog_id)).collect();
        if v.is_empty() {
            return Err(not_found(catalog_id, None, None));
        }
        Ok(v)
    }

    /// Every visible architecture of one version (`latest` resolves per
    /// architecture).
    pub async fn get_version(&self, p: &Principal, catalog_id: &str, version: &str) -> Result<Vec<Manifest>> {
        let all = self.get_id(p, catalog_id).await?;
        let exact: Vec<Manifest> = all.iter().filter(|m| m.version == version).cloned().collect();
        if !exact.is_empty() || version != LATEST {
            if exact.is_empty() {
                return Err(not_found(catalog_id, Some(version), None));
            }
            return Ok(exact);
        }
        let mut out = Vec::new();
        for arch in Architecture::ALL {
            let candidates: Vec<Manifest> = all.iter().filter(|m| m.architecture == arch).cloned().collect();
            if let Ok(m) = Self::pick(catalog_id, arch, candidates) {
                out.push(m);
            }
        }
        if out.is_empty() {
            return Err(not_found(catalog_id, Some(version), None));
        }
        Ok(out)
    }

    /// The newest pullable of `candidates` (same id and architecture).
    fn pick(catalog_id: &str, arch: Architecture, candidates: Vec<Manifest>) -> Result<Manifest> {
        if let Some(m) = candidates.iter().find(|m| m.version == LATEST) {
            return Ok(m.clone());
        }
        let pullable: Vec<&Manifest> = candidates.iter().filter(|m| m.unpullable_reason().is_none()).collect();
        if let Some(i) = version::pick_latest(&pullable, |m| (m.version.as_str(), m.created_at)) {
            return Ok(pullable[i].clone());
        }
        if let Some(i) = version::pick_latest(&candidates, |m| (m.version.as_str(), m.created_at)) {
            return Err(CatalogError::Conflict(format!(
                "no pullable version of {catalog_id:?} for {arch}: the newest, {}",
                candidates[i].unpullable_reason().unwrap_or_default()
            )));
        }
        Err(not_found(catalog_id, Some(LATEST), Some(arch)))
    }

    /// One entry, with `latest` resolved to the newest pullable version.
    #[instrument(skip(self, p), fields(user = %p.username))]
    pub async fn get(&self, p: &Principal, catalog_id: &str, version: &str, arch: Architecture) -> Result<Manifest> {
        if let Some((m, _)) = self.load(&record_id(catalog_id, version, arch)).await? {
            if m.visible_to(p) {
                return Ok(m);
            }
            return Err(not_found(catalog_id, Some(version), Some(arch)));
        }
        if version != LATEST {
            return Err(not_found(catalog_id, Some(version), Some(arch)));
        }
        let candidates: Vec<Manifest> = self
            .all()
            .await?
            .into_iter()
            .filter(|m| m.catalog_id.eq_ignore_ascii_case(catalog_id) && m.architecture == arch && m.visible_to(p))
            .collect();
        Self::pick(catalog_id, arch, candidates)
    }

    // ----- providers -------------------------------------------------------------

    /// Parses a connection string and opens its store. Errors never show
    /// secret values. A connection given by an API caller (`caller`) is checked first:
    /// a `local-storage` folder must lie in the configured roots unless the caller is a
    /// SUPER_USER, before anything is read or created there.
    pub(crate) fn open_connection(
        &self,
        caller: Option<&Principal>,
        connection: &str,
    ) -> Result<(StoreConfig, Arc<dyn BlobStore>)> {
        let config: StoreConfig =
            connection.parse().map_err(|e| CatalogError::Invalid(format!("provider connection: {e}")))?;
        if let (Some(p), StoreConfig::Local(local)) = (caller, &config)
            && !p.is_super_user()
        {
            self.check_local_root(&local.catalog_path)?;
        }
        let store = hangar_blobstore::open(&config)?;
        Ok((config, store))
    }

    /// The local-storage roots API callers' folders must lie in (`CATALOG_LOCAL_ROOTS`).
    pub fn local_roots(&self) -> &[PathBuf] {
        &self.local_roots
    }

    /// Refuses a local-storage folder outside [`Catalog::local_roots`] (a relative one,
    /// one with `..`, or one that leaves a root through a symlink included).
    fn check_local_root(&self, folder: &Path) -> Result<()> {
        let roots: Vec<String> = self.local_roots.iter().map(|r| r.display().to_string()).collect();
        let refuse = |why: &str| {
            CatalogError::Forbidden(format!(
                "local-storage catalog_path {} {why}: give a folder inside {} (CATALOG_LOCAL_ROOTS), or use another provider",
                folder.display(),
                roots.join(", ")
            ))
        };
        if !folder.is_absolute() || folder.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(refuse("is not an absolute path without '..'"));
        }
        let real = resolve_lexically(folder).ok_or_else(|| refuse("cannot be resolved"))?;
        let inside = self.local_roots.iter().filter_map(|r| resolve_lexically(r)).any(|r| real.starts_with(&r));
        if inside { Ok(()) } else { Err(refuse("is outside the local-storage roots")) }
    }

    /// The opened store of a provider record.
    async fn provider_store(&self, provider_id: &str) -> Result<Arc<dyn BlobStore>> {
        if let Ok(map) = self.stores.lock()
            && let Some(s) = map.get(provider_id)
        {
            return Ok(s.clone());
        }
        let rec = self
            .store
            .get(PROVIDERS, provider_id)
            .await?
            .ok_or_else(|| CatalogError::Internal(format!("provider record {provider_id} is missing")))?;
        let p: StoredProvider = from_value(rec.value, "catalog provider")?;
        let connection = self.sealer.open(&p.id, &p.sealed)?;
        let (_, store) = self.open_connection(None, &connection)?;
        if let Ok(mut map) = self.stores.lock() {
            map.insert(provider_id.to_string(), store.clone());
        }
        Ok(store)
    }

    // ----- registering -----------------------------------------------------------

    /// Registers an image already pushed to a provider (its chunks, and its
    /// image manifest at [`manifest_key`]). Checks that the image manifest is
    /// there and valid and that every chunk it uses is present.
    #[instrument(skip_all, fields(user = %p.username, catalog_id = %input.catalog_id, version = %input.version))]
    pub async fn register(&self, p: &Principal, actor: &Actor, input: NewManifest) -> Result<Manifest> {
        let arch = parse_arch(&input.architecture)?;
        validate_catalog_id(&input.catalog_id)?;
        version::validate_version(&input.version).map_err(CatalogError::Invalid)?;
        let (config, store) = self.open_connection(Some(p), &input.connection)?;
        let key = manifest_key(&input.catalog_id, &input.version, arch);
        let raw = match store.get(&key).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(CatalogError::Unprocessable(format!(
                    "there is no image manifest at {key:?} in the {} provider: push the image first (hangar catalog push uploads it, then registers it)",
                    config.provider()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let image = hangar_image::Manifest::from_json(&raw)?;
        let mut present: HashSet<String> = HashSet::new();
        for prefix in object_prefixes(&image) {
            present.extend(store.list(prefix).await?.into_iter().map(|o| o.key));
        }
        let needed = image.object_keys();
        let missing: Vec<&String> = needed.iter().filter(|k| !present.contains(*k)).collect();
        if let Some(first) = missing.first() {
            let what = if image.is_packed() { "pack objects" } else { "chunks" };
            return Err(CatalogError::Unprocessable(format!(
                "{} of the image's {} {what} are missing from the provider (e.g. {first}); push the image again",
                missing.len(),
                needed.len()
            )));
        }
        let meta = Meta {
            description: input.description.unwrap_or_default(),
            vm_type: input.vm_type,
            tags: input.tags,
            required_roles: input.required_roles,
            required_claims: input.required_claims,
            minimum_requirements: input.minimum_requirements,
            imported_from: None,
        };
        let m = self
            .insert(
                p,
                actor,
                &input.catalog_id,
                &input.version,
                arch,
                &input.connection,
                &config,
                image,
                meta,
                input.overwrite,
                "push",
            )
            .await?;
        info!(id = %m.id, size = m.size, "catalog manifest registered");
        Ok(m)
    }

    /// Writes a new (or replacing) entry with its provider record.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn insert(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        connection: &str,
        config: &StoreConfig,
        image: hangar_image::Manifest,
        meta: Meta,
        overwrite: bool,
        how: &str,
    ) -> Result<Manifest> {
        check_text("description", &meta.description, 4096)?;
        let tags = model::normalise_names("tag", &meta.tags, false).map_err(CatalogError::Invalid)?;
        let roles = model::normalise_names("role", &meta.required_roles, true).map_err(CatalogError::Invalid)?;
        let claims = model::normalise_names("claim", &meta.required_claims, true).map_err(CatalogError::Invalid)?;
        let vm_type = match meta.vm_type.as_deref() {
            Some(v) if !v.trim().is_empty() => check_vm_type(v)?,
            _ => "pvm".to_string(),
        };
        let id = record_id(catalog_id, version, arch);
        let provider_id = self.sealer.provider_id(connection);
        let existing = self.load(&id).await?;
        let now = Utc::now();
        let mut batch = Batch::new();
        let mut m = Manifest {
            id: id.clone(),
            catalog_id: catalog_id.to_string(),
            name: format!("{catalog_id}-{arch}-{version}"),
            version: version.to_string(),
            architecture: arch,
            description: meta.description,
            vm_type,
            tags,
            required_roles: roles,
            required_claims: claims,
            minimum_requirements: meta.minimum_requirements,
            provider_id: provider_id.clone(),
            provider_type: config.provider().to_string(),
            manifest_key: manifest_key(catalog_id, version, arch),
            image_hash: image
                .manifest_hash
                .clone()
                .ok_or_else(|| CatalogError::Internal("image manifest without its hash".into()))?,
            size: image.total_size,
            pack_size: image.stored_size,
            chunk_count: image.unique_chunks,
            file_count: image.files().count() as u64,
            owner: p.user_id.clone(),
            created_at: now,
            updated_at: now,
            last_downloaded_at: None,
            last_downloaded_user: None,
            download_count: 0,
            tainted: false,
            tainted_by: None,
            tainted_at: None,
            taint_reason: None,
            untainted_by: None,
            revoked: false,
            revoked_by: None,
            revoked_at: None,
            imported_from: meta.imported_from,
        };
        match existing {
            Some((old, rev)) => {
                if !overwrite {
                    return Err(CatalogError::Conflict(format!(
                        "{catalog_id} {version} ({arch}) is already in the catalog; push with overwrite to replace it, or choose another version"
                    )));
                }
                if !old.visible_to(p) {
                    return Err(CatalogError::Conflict(format!(
                        "{catalog_id} {version} ({arch}) exists and you may not replace it"
                    )));
                }
                if old.revoked {
                    return Err(CatalogError::Conflict(format!(
                        "{catalog_id} {version} ({arch}) was revoked; a revoked version cannot be replaced, choose another version"
                    )));
                }
                // Keep the history and the taint an administrator set.
                m.catalog_id = old.catalog_id.clone();
                m.created_at = old.created_at;
                m.download_count = old.download_count;
                m.last_downloaded_at = old.last_downloaded_at;
                m.last_downloaded_user = old.last_downloaded_user.clone();
                m.tainted = old.tainted;
                m.tainted_by = old.tainted_by.clone();
                m.tainted_at = old.tainted_at;
                m.taint_reason = old.taint_reason.clone();
                m.untainted_by = old.untainted_by.clone();
                batch = batch.require_revision(MANIFESTS, &id, rev);
            }
            None => batch = batch.require_absent(MANIFESTS, &id),
        }
        if self.store.get(PROVIDERS, &provider_id).await?.is_none() {
            let sp = StoredProvider {
                id: provider_id.clone(),
                provider_type: config.provider().to_string(),
                sealed: self.sealer.seal(&provider_id, connection)?,
                created_at: now,
            };
            batch = batch.put(PROVIDERS, &provider_id, to_value(&sp)?);
        }
        batch = batch.put(MANIFESTS, &id, to_value(&m)?);
        let action = format!("catalog.manifest.{how}");
        let detail = json!({
            "catalog_id": m.catalog_id, "version": m.version, "architecture": m.architecture,
            "provider_type": m.provider_type, "provider_id": m.provider_id, "size": m.size,
            "image_hash": m.image_hash, "replaced": batch.conditions.iter().any(|c| matches!(c, hangar_store::Condition::Revision { .. })),
        });
        batch = Self::audit(batch, actor, &action, &id, detail)?;
        self.store.commit(batch).await.map_err(|e| match e {
            StoreError::Conflict(_) => CatalogError::Conflict(format!(
                "{catalog_id} {version} ({arch}) was changed by someone else at the same time; try again"
            )),
            other => other.into(),
        })?;
        if let Ok(mut sets) = self.chunk_sets.lock() {
            sets.remove(&id);
        }
        let message = if how == "import" { "CATALOG_MANIFEST_IMPORTED" } else { "CATALOG_MANIFEST_PUSHED" };
        self.publish(message, &m, actor);
        Ok(m)
    }

    // ----- changing --------------------------------------------------------------

    /// Read-modify-write of one visible entry (exact version), retried when a
    /// concurrent writer got in between. `f` returns the audit detail.
    #[allow(clippy::too_many_arguments)]
    async fn modify<F>(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        action: &str,
        event: &str,
        f: F,
    ) -> Result<Manifest>
    where
        F: Fn(&mut Manifest) -> Result<Value>,
    {
        let id = record_id(catalog_id, version, arch);
        for _ in 0..RETRIES {
            let Some((mut m, rev)) = self.load(&id).await? else {
                return Err(not_found(catalog_id, Some(version), Some(arch)));
            };
            if !m.visible_to(p) {
                return Err(not_found(catalog_id, Some(version), Some(arch)));
            }
            let detail = f(&mut m)?;
            m.updated_at = Utc::now();
            let batch = Batch::new().require_revision(MANIFESTS, &id, rev).put(MANIFESTS, &id, to_value(&m)?);
            let batch = Self::audit(batch, actor, action, &id, detail)?;
            match self.store.commit(batch).await {
                Ok(_) => {
                    self.publish(event, &m, actor);
                    return Ok(m);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CatalogError::Conflict(format!("{id} is being changed by others; try again")))
    }

    /// Marks a version unpullable until untainted.
    pub async fn taint(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        reason: Option<String>,
    ) -> Result<Manifest> {
        if let Some(r) = &reason {
            check_text("reason", r, 1024)?;
        }
        self.modify(p, actor, catalog_id, version, arch, "catalog.manifest.taint", "CATALOG_MANIFEST_TAINTED", |m| {
            m.tainted = true;
            m.tainted_by = Some(p.username.clone());
            m.tainted_at = Some(Utc::now());
            m.taint_reason = reason.clone();
            Ok(json!({"reason": reason}))
        })
        .await
    }

    /// Makes a tainted version pullable again (a revoked one stays revoked).
    pub async fn untaint(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
    ) -> Result<Manifest> {
        self.modify(
            p,
            actor,
            catalog_id,
            version,
            arch,
            "catalog.manifest.untaint",
            "CATALOG_MANIFEST_UNTAINTED",
            |m| {
                let was = m.tainted;
                m.tainted = false;
                m.taint_reason = None;
                m.untainted_by = Some(p.username.clone());
                Ok(json!({"was_tainted": was}))
            },
        )
        .await
    }

    /// Revokes a version for good.
    pub async fn revoke(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
    ) -> Result<Manifest> {
        self.modify(p, actor, catalog_id, version, arch, "catalog.manifest.revoke", "CATALOG_MANIFEST_REVOKED", |m| {
            if m.revoked {
                return Err(CatalogError::Conflict(format!(
                    "{} {} ({}) is already revoked",
                    m.catalog_id, m.version, m.architecture
                )));
            }
            m.revoked = true;
            m.revoked_by = Some(p.username.clone());
            m.revoked_at = Some(Utc::now());
            Ok(json!({}))
        })
        .await
    }

    /// Adds (`add`) or removes values of a list field.
    #[allow(clippy::too_many_arguments)]
    pub async fn patch_list(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        field: ListField,
        add: bool,
        values: &[String],
    ) -> Result<Manifest> {
        let upper = field != ListField::Tags;
        let kind = match field {
            ListField::Tags => "tag",
            ListField::Roles => "role",
            ListField::Claims => "claim",
        };
        let values = model::normalise_names(kind, values, upper).map_err(CatalogError::Invalid)?;
        if values.is_empty() {
            return Err(CatalogError::Invalid(format!("give at least one {kind}")));
        }
        let action = format!("catalog.manifest.{}.{}", field.as_str(), if add { "add" } else { "remove" });
        self.modify(p, actor, catalog_id, version, arch, &action, "CATALOG_MANIFEST_UPDATED", |m| {
            let list = match field {
                ListField::Tags => &mut m.tags,
                ListField::Roles => &mut m.required_roles,
                ListField::Claims => &mut m.required_claims,
            };
            for v in &values {
                if add {
                    if !list.contains(v) {
                        list.push(v.clone());
                    }
                } else {
                    list.retain(|x| x != v);
                }
            }
            list.sort();
            Ok(json!({ "values": values }))
        })
        .await
    }

    /// Replaces the provider connection of an entry (rotated keys, a moved
    /// endpoint). The new connection must reach the same image: its manifest at
    /// the entry's key with the registered hash.
    #[instrument(skip_all, fields(user = %p.username, catalog_id, version))]
    pub async fn set_connection(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        connection: &str,
    ) -> Result<Manifest> {
        let current = self.get(p, catalog_id, version, arch).await?;
        if current.version != version {
            return Err(not_found(catalog_id, Some(version), Some(arch)));
        }
        let (config, store) = self.open_connection(Some(p), connection)?;
        let raw = store.get(&current.manifest_key).await.map_err(|e| {
            if e.is_not_found() {
                CatalogError::Unprocessable(format!(
                    "the new connection does not reach the image of {catalog_id} {version} ({arch}): nothing at {:?}",
                    current.manifest_key
                ))
            } else {
                e.into()
            }
        })?;
        parse_image(&raw, &current).map_err(|_| {
            CatalogError::Unprocessable("the new connection reaches a different image than the one registered".into())
        })?;
        let provider_id = self.sealer.provider_id(connection);
        if self.store.get(PROVIDERS, &provider_id).await?.is_none() {
            let sp = StoredProvider {
                id: provider_id.clone(),
                provider_type: config.provider().to_string(),
                sealed: self.sealer.seal(&provider_id, connection)?,
                created_at: Utc::now(),
            };
            let batch = Batch::new().put(PROVIDERS, &provider_id, to_value(&sp)?);
            let batch = Self::audit(
                batch,
                actor,
                "catalog.provider.add",
                &provider_id,
                json!({"provider_type": sp.provider_type}),
            )?;
            self.store.commit(batch).await?;
        }
        let kind = config.provider().to_string();
        let m = self
            .modify(
                p,
                actor,
                catalog_id,
                version,
                arch,
                "catalog.manifest.connection",
                "CATALOG_MANIFEST_UPDATED",
                |m| {
                    let old = std::mem::replace(&mut m.provider_id, provider_id.clone());
                    m.provider_type = kind.clone();
                    Ok(json!({"old_provider_id": old, "provider_id": provider_id, "provider_type": kind}))
                },
            )
            .await?;
        if let Ok(mut sets) = self.chunk_sets.lock() {
            sets.remove(&m.id);
        }
        Ok(m)
    }

    /// Changes description, minimum requirements or VM type.
    pub async fn update_metadata(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        upd: MetadataUpdate,
    ) -> Result<Manifest> {
        if let Some(d) = &upd.description {
            check_text("description", d, 4096)?;
        }
        let vm_type = upd.vm_type.as_deref().map(check_vm_type).transpose()?;
        self.modify(p, actor, catalog_id, version, arch, "catalog.manifest.metadata", "CATALOG_MANIFEST_UPDATED", |m| {
            let mut changed = Vec::new();
            if let Some(d) = &upd.description {
                m.description = d.clone();
                changed.push("description");
            }
            if let Some(r) = upd.minimum_requirements {
                m.minimum_requirements = Some(r);
                changed.push("minimum_requirements");
            }
            if let Some(t) = &vm_type {
                m.vm_type = t.clone();
                changed.push("vm_type");
            }
            Ok(json!({ "changed": changed }))
        })
        .await
    }

    /// Deletes the visible entries of an id, optionally of one version and
    /// architecture. With `clean_remote`, also deletes their image manifests
    /// and the chunks no remaining entry of the same provider uses. Returns
    /// the deleted entries.
    #[instrument(skip(self, p, actor), fields(user = %p.username))]
    pub async fn delete(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: Option<&str>,
        arch: Option<Architecture>,
        clean_remote: bool,
    ) -> Result<Vec<Manifest>> {
        let mut records = Vec::new();
        for r in self.store.list(MANIFESTS).await? {
            let m: Manifest = from_value(r.value, "catalog manifest")?;
            if m.catalog_id.eq_ignore_ascii_case(catalog_id)
                && version.is_none_or(|v| v == m.version)
                && arch.is_none_or(|a| a == m.architecture)
                && m.visible_to(p)
            {
                records.push((m, r.revision));
            }
        }
        if records.is_empty() {
            return Err(not_found(catalog_id, version, arch));
        }
        let mut batch = Batch::new();
        for (m, rev) in &records {
            batch = batch.require_revision(MANIFESTS, &m.id, *rev).delete(MANIFESTS, &m.id);
            batch = Self::audit(
                batch,
                actor,
                "catalog.manifest.delete",
                &m.id,
                json!({"catalog_id": m.catalog_id, "version": m.version, "architecture": m.architecture, "clean_remote": clean_remote}),
            )?;
        }
        self.store.commit(batch).await.map_err(|e| match e {
            StoreError::Conflict(_) => CatalogError::Conflict("the entries changed while deleting; try again".into()),
            other => other.into(),
        })?;
        let deleted: Vec<Manifest> = records.into_iter().map(|(m, _)| m).collect();
        for m in &deleted {
            if let Ok(mut sets) = self.chunk_sets.lock() {
                sets.remove(&m.id);
            }
            self.publish("CATALOG_MANIFEST_DELETED", m, actor);
        }
        if clean_remote {
            self.clean_remote(&deleted).await?;
        }
        Ok(deleted)
    }

    /// Deletes the provider objects of deleted entries that nothing else uses.
    async fn clean_remote(&self, deleted: &[Manifest]) -> Result<()> {
        let remaining = self.all().await?;
        let mut by_provider: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
        for m in deleted {
            by_provider.entry(m.provider_id.as_str()).or_default().push(m);
        }
        for (provider_id, gone) in by_provider {
            let store = self.provider_store(provider_id).await?;
            // Chunks still used by remaining entries of this provider. If one
            // cannot be read, keep every chunk: a leak beats a broken image.
            let mut keep = HashSet::new();
            let mut keep_images = Vec::new();
            let mut keep_all = false;
            for m in remaining.iter().filter(|m| m.provider_id == provider_id) {
                match store.get(&m.manifest_key).await.map_err(CatalogError::from).and_then(|raw| parse_image(&raw, m))
                {
                    Ok(image) => {
                        keep.extend(data_chunks(&image));
                        keep_images.push(image);
                    }
                    Err(e) => {
                        warn!(id = %m.id, error = %e, "cannot read a remaining image; keeping all chunks");
                        keep_all = true;
                    }
                }
            }
            let mut removed = 0u64;
            for m in gone {
                if remaining.iter().any(|r| r.provider_id == provider_id && r.manifest_key == m.manifest_key) {
                    continue;
                }
                let image = match store.get(&m.manifest_key).await {
                    Ok(raw) => hangar_image::Manifest::from_json(&raw).ok(),
                    Err(_) => None,
                };
                store.delete(&m.manifest_key).await?;
                removed += 1;
                if let (Some(image), false) = (image, keep_all)
                    && !image.is_packed()
                {
                    for h in data_chunks(&image) {
                        if keep.insert(h.clone()) {
                            store.delete(&chunk_key(&h)).await?;
                            removed += 1;
                        }
                    }
                }
            }
            // Packs: condemned now, deleted by a later run after the grace period
            // (hangar_image::gc), so a push running at the same time is safe.
            if !keep_all {
                let gc = hangar_image::GcOptions { grace: self.gc_grace, ..Default::default() };
                let report = hangar_image::collect_garbage(store.clone(), &keep_images, gc).await?;
                removed += report.deleted;
            }
            info!(provider_id, removed, "cleaned remote objects");
        }
        Ok(())
    }

    // ----- pulling ---------------------------------------------------------------

    /// Resolves an entry for download: visible, not tainted or revoked;
    /// counts the download. Returns the entry and its image manifest.
    #[instrument(skip(self, p, actor), fields(user = %p.username))]
    pub async fn pull(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
    ) -> Result<PullTicket> {
        let m = self.get(p, catalog_id, version, arch).await?;
        if let Some(why) = m.unpullable_reason() {
            return Err(CatalogError::Conflict(why));
        }
        let store = self.provider_store(&m.provider_id).await?;
        let raw = store.get(&m.manifest_key).await.map_err(|e| {
            if e.is_not_found() {
                CatalogError::Conflict(format!(
                    "the image of {} {} ({}) is missing from its provider; push it again",
                    m.catalog_id, m.version, m.architecture
                ))
            } else {
                e.into()
            }
        })?;
        let image = parse_image(&raw, &m)?;
        self.remember_chunks(&m, &image);
        let username = p.username.clone();
        let m = self
            .modify(
                p,
                actor,
                &m.catalog_id,
                &m.version,
                arch,
                "catalog.manifest.pull",
                "CATALOG_MANIFEST_PULLED",
                |rec| {
                    if let Some(why) = rec.unpullable_reason() {
                        return Err(CatalogError::Conflict(why));
                    }
                    rec.download_count += 1;
                    rec.last_downloaded_at = Some(Utc::now());
                    rec.last_downloaded_user = Some(username.clone());
                    Ok(json!({"version": rec.version, "download_count": rec.download_count}))
                },
            )
            .await?;
        Ok(PullTicket { manifest: m, image_manifest: raw })
    }

    fn remember_chunks(&self, m: &Manifest, image: &hangar_image::Manifest) -> Arc<HashMap<String, ChunkPlace>> {
        let set = Arc::new(chunk_places(image));
        if let Ok(mut sets) = self.chunk_sets.lock() {
            if sets.len() >= 256 {
                sets.clear();
            }
            sets.insert(m.id.clone(), (m.image_hash.clone(), set.clone()));
        }
        set
    }

    /// An entry a caller may pull, its provider and the places of its image's chunks.
    async fn pullable_chunks(
        &self,
        p: &Principal,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
    ) -> Result<(Manifest, Arc<dyn BlobStore>, Arc<HashMap<String, ChunkPlace>>)> {
        let m = self.get(p, catalog_id, version, arch).await?;
        if let Some(why) = m.unpullable_reason() {
            return Err(CatalogError::Conflict(why));
        }
        let store = self.provider_store(&m.provider_id).await?;
        let known = self
            .chunk_sets
            .lock()
            .ok()
            .and_then(|s| s.get(&m.id).filter(|(h, _)| *h == m.image_hash).map(|(_, set)| set.clone()));
        let set = match known {
            Some(s) => s,
            None => {
                let raw = store.get(&m.manifest_key).await?;
                let image = parse_image(&raw, &m)?;
                self.remember_chunks(&m, &image)
            }
        };
        Ok((m, store, set))
    }

    /// The stored (zstd) bytes of one chunk of an entry, for a caller that
    /// may pull it. Only chunks the entry's image uses are served.
    #[instrument(skip(self, p), fields(user = %p.username))]
    pub async fn read_chunk(
        &self,
        p: &Principal,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        hash: &str,
    ) -> Result<Bytes> {
        if !is_hex_hash(hash) {
            return Err(CatalogError::Invalid(format!("{hash:?} is not a chunk hash (64 lower-case hex digits)")));
        }
        let (m, store, set) = self.pullable_chunks(p, catalog_id, version, arch).await?;
        let Some((key, range)) = set.get(hash) else {
            return Err(CatalogError::NotFound(format!("chunk {hash} is not part of {} {}", m.catalog_id, m.version)));
        };
        let got = match range {
            Some((at, stored)) => store.get_range(key, *at..*at + *stored).await,
            None => store.get(key).await,
        };
        match got {
            Ok(b) => Ok(b),
            Err(e) if e.is_not_found() => Err(CatalogError::Conflict(format!(
                "chunk {hash} of {} {} is missing from its provider; push the image again",
                m.catalog_id, m.version
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes `range` of pack `pack` (format 2) for a caller that may pull the entry, as a
    /// pull from another server asks for them (neighbouring chunks in one range). Only the
    /// entry's own chunks are served: bytes of the range that belong to no chunk of its
    /// image (a gap between two, or another image's chunk sharing the pack) are zeros.
    #[instrument(skip(self, p), fields(user = %p.username))]
    pub async fn read_pack_range(
        &self,
        p: &Principal,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        pack: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        if !is_hex_hash(pack) {
            return Err(CatalogError::Invalid(format!("{pack:?} is not a pack id (64 lower-case hex digits)")));
        }
        if range.end <= range.start || range.end - range.start > hangar_image::MAX_RANGE {
            return Err(CatalogError::Invalid(format!(
                "a pack range must hold 1 to {} bytes",
                hangar_image::MAX_RANGE
            )));
        }
        let (m, store, set) = self.pullable_chunks(p, catalog_id, version, arch).await?;
        let key = hangar_image::manifest::pack_key(pack);
        let mut spans: Vec<(u64, u64)> = set
            .values()
            .filter(|(k, _)| *k == key)
            .filter_map(|(_, r)| *r)
            .map(|(at, stored)| (at, at + stored))
            .filter(|(s, e)| *e > range.start && *s < range.end)
            .collect();
        if spans.is_empty() {
            return Err(CatalogError::NotFound(format!(
                "pack {pack} holds no chunk of {} {} in that range",
                m.catalog_id, m.version
            )));
        }
        let got = match store.get_range(&key, range.clone()).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(CatalogError::Conflict(format!(
                    "pack {pack} of {} {} is missing from its provider; push the image again",
                    m.catalog_id, m.version
                )));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Bytes::from(only_spans(&got, range.start, &mut spans)))
    }

    // ----- host cache ------------------------------------------------------------

    pub(crate) async fn chunk_cache(&self) -> Result<Arc<ChunkCache>> {
        let dir = self.cache_dir.join("chunks");
        let limits = self.cache_limits;
        self.chunk_cache
            .get_or_try_init(|| async move {
                let c = tokio::task::spawn_blocking(move || ChunkCache::open(dir, limits))
                    .await
                    .map_err(|e| CatalogError::Internal(e.to_string()))??;
                Ok::<_, CatalogError>(Arc::new(c))
            })
            .await
            .cloned()
    }

    pub(crate) fn host_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.host_locks.lock() {
            Ok(mut m) => m.entry(id.to_string()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// For the host module: resolves and authorises an entry for `p` (as a
    /// pull: visible, pullable, counted), makes sure this host's cache holds
    /// its image (pulling only missing chunks), and returns the image folder.
    /// The folder is shared: copy or clone it, do not modify it.
    #[instrument(skip(self, p, actor), fields(user = %p.username))]
    pub async fn pull_to_host(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
    ) -> Result<PathBuf> {
        Ok(self.pull_to_host_with(p, actor, catalog_id, version, arch, None).await?.1)
    }

    /// [`Catalog::pull_to_host`], reporting the transfer to `progress` and
    /// answering the resolved manifest with the image folder.
    #[instrument(skip(self, p, actor, progress), fields(user = %p.username))]
    pub async fn pull_to_host_with(
        &self,
        p: &Principal,
        actor: &Actor,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
        progress: Option<hangar_image::ProgressFn>,
    ) -> Result<(Manifest, PathBuf)> {
        let ticket = self.pull(p, actor, catalog_id, version, arch).await?;
        let m = ticket.manifest;
        let lock = self.host_lock(&m.id);
        let _held = lock.lock().await;
        let now = Utc::now();
        if let Some(rec) = self.store.get(CACHE_ITEMS, &m.id).await? {
            let mut item: CacheItem = from_value(rec.value, "cache item")?;
            if item.image_hash == m.image_hash && Path::new(&item.path).is_dir() {
                item.last_used_at = now;
                item.used_count += 1;
                let batch = Batch::new().put(CACHE_ITEMS, &m.id, to_value(&item)?);
                let batch = Self::audit(batch, actor, "catalog.cache.use", &m.id, json!({"version": m.version}))?;
                self.store.commit(batch).await?;
                hangar_metrics::metrics().cache_hits.inc();
                return Ok((m, PathBuf::from(item.path)));
            }
        }
        hangar_metrics::metrics().cache_misses.inc();
        let folder = self
            .cache_dir
            .join("images")
            .join(m.catalog_id.to_ascii_lowercase())
            .join(&m.version)
            .join(m.architecture.as_str());
        let dest = folder.join(&m.image_hash[..m.image_hash.len().min(16)]);
        if dest.exists() {
            remove_dir(&dest).await?;
        }
        std::fs::create_dir_all(&folder)
            .map_err(|e| CatalogError::Internal(format!("cannot create {}: {e}", folder.display())))?;
        let store = self.provider_store(&m.provider_id).await?;
        let opts = PullOptions { concurrency: 8, cache: Some(self.chunk_cache().await?), progress };
        hangar_image::pull(store, &m.manifest_key, &dest, &opts).await?;
        // Older builds of this entry are no longer needed.
        if let Ok(rd) = std::fs::read_dir(&folder) {
            for e in rd.flatten() {
                if e.path() != dest {
                    let _ = remove_dir(&e.path()).await;
                }
            }
        }
        let item = CacheItem {
            id: m.id.clone(),
            catalog_id: m.catalog_id.clone(),
            version: m.version.clone(),
            architecture: m.architecture,
            image_hash: m.image_hash.clone(),
            path: dest.display().to_string(),
            size: m.size,
            cached_at: now,
            last_used_at: now,
            used_count: 1,
        };
        let batch = Batch::new().put(CACHE_ITEMS, &m.id, to_value(&item)?);
        let batch =
            Self::audit(batch, actor, "catalog.cache.add", &m.id, json!({"version": m.version, "size": m.size}))?;
        self.store.commit(batch).await?;
        self.publish("CATALOG_CACHE_ADDED", &m, actor);
        self.note_cache_size().await;
        Ok((m, dest))
    }

    /// `hangar_image_cache_size_bytes`, after the cache changed.
    async fn note_cache_size(&self) {
        note_cache_size(&self.store).await
    }

    /// The images in this host's cache.
    pub async fn cache_list(&self) -> Result<Vec<CacheItem>> {
        let mut out = Vec::new();
        for r in self.store.list(CACHE_ITEMS).await? {
            out.push(from_value(r.value, "cache item")?);
        }
        Ok(out)
    }

    /// Removes cached images: all, those of one catalog id, or of one
    /// version of it. Returns how many were removed.
    #[instrument(skip(self, actor))]
    pub async fn cache_delete(&self, actor: &Actor, catalog_id: Option<&str>, version: Option<&str>) -> Result<usize> {
        let items: Vec<CacheItem> = self
            .cache_list()
            .await?
            .into_iter()
            .filter(|i| {
                catalog_id.is_none_or(|c| i.catalog_id.eq_ignore_ascii_case(c))
                    && version.is_none_or(|v| v == i.version)
            })
            .collect();
        if items.is_empty() {
            if let Some(c) = catalog_id {
                return Err(CatalogError::NotFound(match version {
                    Some(v) => format!("{c:?} version {v:?} is not in this host's cache"),
                    None => format!("{c:?} is not in this host's cache"),
                }));
            }
            return Ok(0);
        }
        let mut batch = Batch::new();
        for i in &items {
            let _held = self.host_lock(&i.id).lock_owned().await;
            remove_dir(Path::new(&i.path)).await?;
            batch = batch.delete(CACHE_ITEMS, &i.id);
        }
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let entry = AuditEntry::new(
            actor,
            "catalog.cache.delete",
            "catalog_cache",
            catalog_id.unwrap_or("*"),
            json!({"items": ids}),
        );
        batch = batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?);
        self.store.commit(batch).await?;
        self.bus.publish(Event::new(
            EventType::CatalogCache,
            "CATALOG_CACHE_DELETED",
            json!({"catalog_id": catalog_id, "version": version, "count": items.len()}),
        ));
        self.note_cache_size().await;
        Ok(items.len())
    }
}

/// Set `hangar_image_cache_size_bytes` to the size of the images the host cache records.
async fn note_cache_size(store: &Arc<dyn Store>) {
    let Ok(records) = store.list(CACHE_ITEMS).await else { return };
    let bytes: u64 =
        records.into_iter().filter_map(|r| from_value::<CacheItem>(r.value, "cache item").ok()).map(|i| i.size).sum();
    hangar_metrics::metrics().cache_size.set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// Metadata of a new entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub description: String,
    pub vm_type: Option<String>,
    pub tags: Vec<String>,
    pub required_roles: Vec<String>,
    pub required_claims: Vec<String>,
    pub minimum_requirements: Option<MinimumRequirements>,
    pub imported_from: Option<String>,
}

pub(crate) async fn remove_dir(p: &Path) -> Result<()> {
    let p = p.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CatalogError::Internal(format!("cannot remove {}: {e}", p.display()))),
    })
    .await
    .map_err(|e| CatalogError::Internal(e.to_string()))?
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `bytes` (read from offset `start`) with every byte outside `spans` (absolute
/// `[start, end)` ranges) set to zero.
fn only_spans(bytes: &[u8], start: u64, spans: &mut [(u64, u64)]) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    let end = start + bytes.len() as u64;
    spans.sort_unstable();
    for &(s, e) in spans.iter() {
        let (s, e) = (s.max(start), e.min(end));
        if s < e {
            let (a, b) = ((s - start) as usize, (e - start) as usize);
            out[a..b].copy_from_slice(&bytes[a..b]);
        }
    }
    out
}

#[cfg(test)]
mod pack_range_tests {
    #[test]
    fn a_pack_range_keeps_only_the_entrys_chunks() {
        let bytes: Vec<u8> = (1..=10).collect();
        // Read from offset 100: chunks at [100, 103) and [105, 107), one past the end.
        let out = super::only_spans(&bytes, 100, &mut [(105, 107), (100, 103), (109, 120)]);
        assert_eq!(out, vec![1, 2, 3, 0, 0, 6, 7, 0, 0, 10]);
        assert!(super::is_hex_hash(&"a".repeat(64)) && !super::is_hex_hash(&"A".repeat(64)));
    }
}
