//! Import of a reference catalog entry: its `<catalog_id>/<name>.meta`
//! (JSON) and `<name>.pdpack` (a tar, or a gzip-compressed tar, of the VM
//! bundle) from any provider, converted to the chunked format in the same
//! provider and registered.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar_blobstore::BlobStore;
use hangar_core::Principal;
use hangar_core::audit::Actor;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tracing::{info, instrument};

use crate::model::{Manifest, MinimumRequirements};
use crate::service::{Catalog, Meta, manifest_key, parse_arch, validate_catalog_id};
use crate::{CatalogError, Result, version};

/// Bytes read from the provider per request while downloading a pack.
const DOWNLOAD_PIECE: u64 = 16 * 1024 * 1024;

/// What to import.
#[derive(Clone, Default, Deserialize)]
pub struct ImportRequest {
    /// Connection string of the provider holding the reference entry.
    pub connection: String,
    /// Catalog id.
    pub catalog_id: String,
    /// Version (the reference's default is `latest`).
    #[serde(default)]
    pub version: Option<String>,
    /// Architecture (aliases accepted).
    pub architecture: String,
    /// Key of the `.meta` file when it is not at
    /// `<catalog_id>/<catalog_id>-<architecture>-<version>.meta`.
    #[serde(default)]
    pub meta_path: Option<String>,
    /// Replace an existing entry.
    #[serde(default)]
    pub overwrite: bool,
}

impl std::fmt::Debug for ImportRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportRequest")
            .field("catalog_id", &self.catalog_id)
            .field("version", &self.version)
            .field("architecture", &self.architecture)
            .field("meta_path", &self.meta_path)
            .field("connection", &"****")
            .finish_non_exhaustive()
    }
}

/// What `import-vm` imports: a raw VM archive (a tar or tar.gz of a
/// `.pvm`/`.macvm` bundle or of a QEMU image folder) at `machine_remote_path`
/// in a provider, registered as a new catalog entry.
#[derive(Clone, Default, Deserialize)]
pub struct ImportVmRequest {
    /// Connection string of the provider holding the archive.
    pub connection: String,
    pub catalog_id: String,
    pub version: String,
    /// Architecture (aliases accepted).
    pub architecture: String,
    /// Key of the archive in the provider.
    pub machine_remote_path: String,
    /// `pvm`, `macvm` or `qemu`; taken from the bundle's extension when absent.
    pub vm_type: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub required_roles: Vec<String>,
    pub required_claims: Vec<String>,
    /// Whether the caller says the archive is gzip-compressed (recorded; the
    /// format is detected from the bytes).
    pub is_compressed: bool,
    /// Replace an existing entry.
    pub force: bool,
}

impl std::fmt::Debug for ImportVmRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportVmRequest")
            .field("catalog_id", &self.catalog_id)
            .field("version", &self.version)
            .field("architecture", &self.architecture)
            .field("machine_remote_path", &self.machine_remote_path)
            .field("connection", &"****")
            .finish_non_exhaustive()
    }
}

/// The VM types an archive may hold.
pub const IMPORT_VM_TYPES: &[&str] = &["pvm", "macvm", "qemu"];

/// The fields of a reference `.meta` we use. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReferenceMeta {
    description: Option<String>,
    #[serde(rename = "type")]
    vm_type: Option<String>,
    tags: Option<Vec<String>>,
    required_roles: Option<Vec<String>>,
    required_claims: Option<Vec<String>>,
    minimum_requirements: Option<Value>,
    pack_path: Option<String>,
    pack_relative_path: Option<String>,
    is_compressed: Option<bool>,
}

fn unprocessable(m: impl Into<String>) -> CatalogError {
    CatalogError::Unprocessable(m.into())
}

fn requirements(v: &Value) -> Option<MinimumRequirements> {
    let num = |k: &str| v.get(k).and_then(|x| x.as_u64().or_else(|| x.as_str().and_then(|s| s.trim().parse().ok())));
    let r = MinimumRequirements {
        cpu: num("cpu").and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
        memory: num("memory").unwrap_or(0),
        disk: num("disk").unwrap_or(0),
    };
    (r != MinimumRequirements::default()).then_some(r)
}

/// Last path segment of a reference path (`/x/y/name.pdpack` -> `name.pdpack`).
fn basename(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

async fn download(store: &Arc<dyn BlobStore>, key: &str, to: &Path, missing_is_not_found: bool) -> Result<u64> {
    let size = match store.head(key).await? {
        Some(h) => h.size,
        None if missing_is_not_found => {
            return Err(CatalogError::NotFound(format!("there is no object at {key:?} in the provider")));
        }
        None => return Err(unprocessable(format!("the pack {key:?} named by the .meta is not in the provider"))),
    };
    let mut f = tokio::fs::File::create(to)
        .await
        .map_err(|e| CatalogError::Internal(format!("cannot create {}: {e}", to.display())))?;
    let mut at = 0u64;
    while at < size {
        let end = (at + DOWNLOAD_PIECE).min(size);
        let piece = store.get_range(key, at..end).await?;
        if piece.is_empty() {
            return Err(CatalogError::Provider(format!("{key}: empty read at {at}")));
        }
        f.write_all(&piece).await.map_err(|e| CatalogError::Internal(format!("write {}: {e}", to.display())))?;
        at += piece.len() as u64;
    }
    f.sync_all().await.map_err(|e| CatalogError::Internal(format!("sync {}: {e}", to.display())))?;
    Ok(size)
}

/// Unpacks a tar or tar.gz (detected by its magic bytes) into `dest`, then
/// returns the image folder: `dest`, or the single `.pvm`/`.macvm` folder in
/// it (the reference's "clean and flatten"), with its VM type.
fn unpack(pack: &Path, dest: &Path) -> Result<(PathBuf, Option<String>)> {
    use std::io::Read;
    let bad = |e: std::io::Error| unprocessable(format!("the pack is not a readable tar or tar.gz: {e}"));
    let mut f = std::fs::File::open(pack).map_err(|e| CatalogError::Internal(format!("open pack: {e}")))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(bad)?;
    let f = std::fs::File::open(pack).map_err(|e| CatalogError::Internal(format!("open pack: {e}")))?;
    let reader: Box<dyn Read> =
        if n == 2 && magic == [0x1f, 0x8b] { Box::new(flate2::read::GzDecoder::new(f)) } else { Box::new(f) };
    std::fs::create_dir_all(dest).map_err(|e| CatalogError::Internal(format!("create {}: {e}", dest.display())))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    // `unpack` refuses entries that would land outside `dest`.
    archive.unpack(dest).map_err(bad)?;
    let entries: Vec<PathBuf> = std::fs::read_dir(dest)
        .map_err(|e| CatalogError::Internal(format!("read {}: {e}", dest.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if entries.is_empty() {
        return Err(unprocessable("the pack is empty"));
    }
    if let [only] = entries.as_slice()
        && only.is_dir()
        && let Some(ext) = only.extension().and_then(|e| e.to_str())
        && (ext == "pvm" || ext == "macvm")
    {
        let t = ext.to_string();
        return Ok((only.clone(), Some(t)));
    }
    Ok((dest.to_path_buf(), None))
}

impl Catalog {
    /// Imports a reference catalog entry (see the module docs): downloads
    /// and unpacks its pack, pushes it in the chunked format to the same
    /// provider and registers it with the `.meta`'s description, tags,
    /// roles, claims and minimum requirements.
    #[instrument(skip_all, fields(user = %p.username, catalog_id = %req.catalog_id))]
    pub async fn import(&self, p: &Principal, actor: &Actor, req: ImportRequest) -> Result<Manifest> {
        validate_catalog_id(&req.catalog_id)?;
        let arch = parse_arch(&req.architecture)?;
        let version = req.version.clone().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| version::LATEST.into());
        version::validate_version(&version).map_err(CatalogError::Invalid)?;
        let (config, store) = self.open_connection(Some(p), &req.connection)?;
        let name = format!("{}-{arch}-{version}", req.catalog_id);
        let meta_key = match &req.meta_path {
            Some(k) => k.trim_matches('/').to_string(),
            None => format!("{}/{name}.meta", req.catalog_id),
        };
        hangar_blobstore::validate_key(&meta_key)?;
        let raw = store.get(&meta_key).await.map_err(|e| {
            if e.is_not_found() {
                unprocessable(format!(
                    "there is no reference entry at {meta_key:?} in the {} provider",
                    config.provider()
                ))
            } else {
                e.into()
            }
        })?;
        let meta: ReferenceMeta = serde_json::from_slice(&raw)
            .map_err(|e| unprocessable(format!("{meta_key} is not a reference catalog .meta: {e}")))?;
        let pack_name = meta
            .pack_path
            .as_deref()
            .or(meta.pack_relative_path.as_deref())
            .map(basename)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{name}.pdpack"));
        let folder = meta_key.rsplit_once('/').map(|(d, _)| d.to_string());
        let pack_key = match folder {
            Some(d) => format!("{d}/{pack_name}"),
            None => pack_name,
        };
        hangar_blobstore::validate_key(&pack_key)?;

        let (image, bundle_type) = self.convert_pack(&store, &pack_key, &req.catalog_id, &version, arch, false).await?;
        let m = Meta {
            description: meta.description.unwrap_or_default(),
            vm_type: meta.vm_type.or(bundle_type),
            tags: meta.tags.unwrap_or_default(),
            required_roles: meta.required_roles.unwrap_or_default(),
            required_claims: meta.required_claims.unwrap_or_default(),
            minimum_requirements: meta.minimum_requirements.as_ref().and_then(requirements),
            imported_from: Some(format!(
                "{}:{meta_key}{}",
                config.provider(),
                if meta.is_compressed == Some(true) { " (compressed)" } else { "" }
            )),
        };
        self.insert(
            p,
            actor,
            &req.catalog_id,
            &version,
            arch,
            &req.connection,
            &config,
            image,
            m,
            req.overwrite,
            "import",
        )
        .await
    }

    /// Imports a raw VM archive (see [`ImportVmRequest`]): converts it to the
    /// chunked format in the same provider and registers it, audited as
    /// `catalog.import-vm`. A missing object is a 404; a bad type, key or
    /// connection a 400; an unreadable archive a 422.
    #[instrument(skip_all, fields(user = %p.username, catalog_id = %req.catalog_id))]
    pub async fn import_vm(&self, p: &Principal, actor: &Actor, req: ImportVmRequest) -> Result<Manifest> {
        validate_catalog_id(&req.catalog_id)?;
        let arch = parse_arch(&req.architecture)?;
        let version = req.version.trim().to_string();
        if version.is_empty() {
            return Err(CatalogError::Invalid("version is required".into()));
        }
        version::validate_version(&version).map_err(CatalogError::Invalid)?;
        let vm_type = match req.vm_type.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) if IMPORT_VM_TYPES.contains(&t.to_ascii_lowercase().as_str()) => Some(t.to_ascii_lowercase()),
            Some(t) => {
                return Err(CatalogError::Invalid(format!(
                    "type {t:?} is not a VM type this catalog imports; use one of {}",
                    IMPORT_VM_TYPES.join(", ")
                )));
            }
            None => None,
        };
        let key = req.machine_remote_path.trim().trim_matches('/').to_string();
        if key.is_empty() {
            return Err(CatalogError::Invalid("machine_remote_path is required".into()));
        }
        hangar_blobstore::validate_key(&key)?;
        let (config, store) = self.open_connection(Some(p), &req.connection)?;
        if !req.force && self.load(&crate::service::record_id(&req.catalog_id, &version, arch)).await?.is_some() {
            return Err(CatalogError::Conflict(format!(
                "{} {version} {arch} is already in the catalog; set force to replace it",
                req.catalog_id
            )));
        }
        let (image, bundle_type) = self.convert_pack(&store, &key, &req.catalog_id, &version, arch, true).await?;
        let m = Meta {
            description: req.description.unwrap_or_default(),
            vm_type: vm_type.or(bundle_type),
            tags: req.tags,
            required_roles: req.required_roles,
            required_claims: req.required_claims,
            minimum_requirements: None,
            imported_from: Some(format!(
                "{}:{key}{}",
                config.provider(),
                if req.is_compressed { " (compressed)" } else { "" }
            )),
        };
        self.insert(
            p,
            actor,
            &req.catalog_id,
            &version,
            arch,
            &req.connection,
            &config,
            image,
            m,
            req.force,
            "import-vm",
        )
        .await
    }

    /// The reference's server-side push: chunks the VM folder `local_path` on
    /// this server into the provider and registers it (audited as `push`).
    /// `local_path` must be an absolute folder without `..`; a caller who is
    /// not a SUPER_USER may only push from inside `CATALOG_LOCAL_ROOTS` (403
    /// otherwise), so the route cannot copy arbitrary host files out.
    #[instrument(skip_all, fields(user = %p.username, catalog_id = %input.catalog_id))]
    pub async fn push_local(
        &self,
        p: &Principal,
        actor: &Actor,
        input: crate::NewManifest,
        local_path: &Path,
        progress: Option<hangar_image::ProgressFn>,
    ) -> Result<Manifest> {
        let arch = parse_arch(&input.architecture)?;
        validate_catalog_id(&input.catalog_id)?;
        version::validate_version(&input.version).map_err(CatalogError::Invalid)?;
        if !local_path.is_absolute() || local_path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(CatalogError::Invalid("local_path must be an absolute path without '..'".into()));
        }
        if !p.is_super_user() {
            let inside = self.local_roots().iter().any(|r| local_path.starts_with(r));
            if !inside {
                return Err(CatalogError::Forbidden(format!(
                    "local_path {} is outside the folders this server pushes from (CATALOG_LOCAL_ROOTS); only a SUPER_USER may push from elsewhere",
                    local_path.display()
                )));
            }
        }
        if !local_path.is_dir() {
            return Err(CatalogError::NotFound(format!("there is no folder {} on this server", local_path.display())));
        }
        let (config, store) = self.open_connection(Some(p), &input.connection)?;
        let key = manifest_key(&input.catalog_id, &input.version, arch);
        let opts = hangar_image::PushOptions { progress, ..Default::default() };
        let report = hangar_image::push(store.clone(), local_path, &key, &opts).await?;
        info!(chunks = report.chunks_uploaded, "local folder pushed");
        let image = hangar_image::Manifest::from_json(&store.get(&key).await?)?;
        let bundle_type = local_path
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| *e == "pvm" || *e == "macvm")
            .map(str::to_string);
        let m = Meta {
            description: input.description.unwrap_or_default(),
            vm_type: input.vm_type.or(bundle_type),
            tags: input.tags,
            required_roles: input.required_roles,
            required_claims: input.required_claims,
            minimum_requirements: input.minimum_requirements,
            imported_from: None,
        };
        self.insert(
            p,
            actor,
            &input.catalog_id,
            &input.version,
            arch,
            &input.connection,
            &config,
            image,
            m,
            input.overwrite,
            "push",
        )
        .await
    }

    /// Downloads the tar or tar.gz at `pack_key`, unpacks it, pushes it in the
    /// chunked format to the same provider and returns the stored image
    /// manifest and the bundle's VM type (from a single `.pvm`/`.macvm` folder).
    /// A missing object is a 404 when `missing_is_not_found`, else a 422.
    async fn convert_pack(
        &self,
        store: &Arc<dyn BlobStore>,
        pack_key: &str,
        catalog_id: &str,
        version: &str,
        arch: crate::Architecture,
        missing_is_not_found: bool,
    ) -> Result<(hangar_image::Manifest, Option<String>)> {
        let work_root = self.cache_dir().join("import-tmp");
        std::fs::create_dir_all(&work_root)
            .map_err(|e| CatalogError::Internal(format!("cannot create {}: {e}", work_root.display())))?;
        let work = tempfile_dir(&work_root)?;
        let pack_file = work.path().join("pack");
        let pack_size = download(store, pack_key, &pack_file, missing_is_not_found).await?;
        let unpack_dir = work.path().join("image");
        let (source, bundle_type) = {
            let (pf, ud) = (pack_file.clone(), unpack_dir.clone());
            tokio::task::spawn_blocking(move || unpack(&pf, &ud))
                .await
                .map_err(|e| CatalogError::Internal(e.to_string()))??
        };
        let _ = std::fs::remove_file(&pack_file);
        let key = manifest_key(catalog_id, version, arch);
        let report = hangar_image::push(store.clone(), &source, &key, &hangar_image::PushOptions::default()).await?;
        info!(pack_key, pack_size, chunks = report.chunks_uploaded, "pack converted");
        // Read back what was written: the registered hash is the stored manifest's.
        let image = hangar_image::Manifest::from_json(&store.get(&key).await?)?;
        Ok((image, bundle_type))
    }
}

/// A temp folder under `root`, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir(root: &Path) -> Result<TempDir> {
    let p = root.join(uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir(&p).map_err(|e| CatalogError::Internal(format!("cannot create {}: {e}", p.display())))?;
    Ok(TempDir(p))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reference_requirements_are_read_leniently() {
        let r = requirements(&serde_json::json!({"cpu": 2, "memory": "4096", "disk": 20000})).unwrap();
        assert_eq!(r, MinimumRequirements { cpu: 2, memory: 4096, disk: 20000 });
        assert_eq!(requirements(&serde_json::json!({})), None);
        assert_eq!(basename("/a/b/x.pdpack"), "x.pdpack");
        assert_eq!(basename("x.pdpack"), "x.pdpack");
    }
}
