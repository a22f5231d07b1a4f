//! `/catalog/...`: catalog manifests (list, get, register, pull tickets, chunks, delete, taint,
//! untaint, revoke, claims/roles/tags, metadata, import, import-vm), the reference's pull (image
//! into a VM on this host, see `pds_pull`) and push/pull jobs, and this host's image cache
//! (`/catalog/cache`). Visibility and pullability are decided by `hangar_catalog`; no
//! answer here carries a provider connection string.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use hangar_catalog::{
    Architecture, Catalog, CatalogError, ImportRequest, ImportVmRequest, ListField, Manifest, MetadataUpdate,
    MinimumRequirements, NewManifest, PullTicket,
};
use hangar_core::Access;
use hangar_core::claims::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path, Query};
use crate::{Api, AppState};
use hangar_host::Job;
use hangar_provision::{CatalogImage, ProvisionRequest, Provisioned, Provisioner, PullSource, VmSpec, job_progress};

type R<T> = Result<T, ApiError>;

const LIST: Access = Access::AllOf(&[LIST_CATALOG_MANIFEST]);
const PULL: Access = Access::AllOf(&[PULL_CATALOG_MANIFEST]);
const UPDATE: Access = Access::AllOf(&[UPDATE_CATALOG_MANIFEST]);
const DELETE: Access = Access::AllOf(&[DELETE_CATALOG_MANIFEST]);

pub fn register(api: Api) -> Api {
    api.add(LIST, routes!(list))
        .add(Access::AnyOf(&[CREATE_CATALOG_MANIFEST, PUSH_CATALOG_MANIFEST]), routes!(create))
        .add(Access::AllOf(&[PUSH_CATALOG_MANIFEST]), routes!(push))
        .add(Access::AllOf(&[PUSH_CATALOG_MANIFEST]), routes!(push_async))
        .add(PULL, routes!(pull_ticket))
        .add(PULL, routes!(pull))
        .add(PULL, routes!(pull_async))
        .add(Access::AnyOf(&[IMPORT_CATALOG_MANIFEST, PUSH_CATALOG_MANIFEST]), routes!(import))
        .add(Access::AnyOf(&[IMPORT_CATALOG_MANIFEST, PUSH_CATALOG_MANIFEST]), routes!(import_vm))
        .add(LIST, routes!(get_id))
        .add(DELETE, routes!(delete_id))
        .add(LIST, routes!(get_version))
        .add(DELETE, routes!(delete_version))
        .add(LIST, routes!(get_one))
        .add(DELETE, routes!(delete_one))
        .add(PULL, routes!(download))
        .add(PULL, routes!(chunk))
        .add(PULL, routes!(pack_range))
        .add(UPDATE, routes!(taint))
        .add(UPDATE, routes!(untaint))
        .add(Access::SuperUser, routes!(revoke))
        .add(UPDATE, routes!(add_claims))
        .add(UPDATE, routes!(remove_claims))
        .add(UPDATE, routes!(add_roles))
        .add(UPDATE, routes!(remove_roles))
        .add(UPDATE, routes!(add_tags))
        .add(UPDATE, routes!(remove_tags))
        .add(UPDATE, routes!(metadata))
        .add(UPDATE, routes!(connection))
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        ApiError::from_domain(e)
    }
}

fn catalog(s: &AppState) -> R<&Arc<Catalog>> {
    s.catalog.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The catalog module is not running on this server; add 'catalog' to ENABLED_MODULES",
        )
    })
}

fn arch(a: &str) -> R<Architecture> {
    Ok(hangar_catalog::service::parse_arch(a)?)
}

// ----- bodies ------------------------------------------------------------------------

/// Minimum requirements of a VM made from the image. Memory and disk in MiB.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct CatalogRequirements {
    #[serde(default)]
    pub cpu: u32,
    #[serde(default)]
    pub memory: u64,
    #[serde(default)]
    pub disk: u64,
}

impl From<MinimumRequirements> for CatalogRequirements {
    fn from(r: MinimumRequirements) -> Self {
        CatalogRequirements { cpu: r.cpu, memory: r.memory, disk: r.disk }
    }
}

impl From<CatalogRequirements> for MinimumRequirements {
    fn from(r: CatalogRequirements) -> Self {
        MinimumRequirements { cpu: r.cpu, memory: r.memory, disk: r.disk }
    }
}

/// Where an image's bytes are. Never carries credentials.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogProviderInfo {
    /// `aws-s3`, `minio`, `azure-storage-account`, `artifactory` or `local-storage`.
    #[serde(rename = "type")]
    pub provider_type: String,
    /// Opaque id of the stored connection.
    pub id: String,
}

/// A catalog manifest, with the reference's field names. Timestamps are RFC 3339.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogManifest {
    pub id: String,
    pub catalog_id: String,
    /// `<catalog_id>-<architecture>-<version>`.
    pub name: String,
    pub version: String,
    /// `x86_64` or `arm64`.
    pub architecture: String,
    pub description: String,
    /// VM type: `pvm`, `macvm`, `qemu`, ...
    #[serde(rename = "type")]
    pub vm_type: String,
    pub tags: Vec<String>,
    pub required_roles: Vec<String>,
    pub required_claims: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_requirements: Option<CatalogRequirements>,
    pub provider: CatalogProviderInfo,
    /// Logical size of the image in bytes.
    pub size: u64,
    /// Stored (compressed, deduplicated) size in bytes.
    pub pack_size: u64,
    pub chunk_count: u64,
    pub file_count: u64,
    /// blake3 of the image manifest.
    pub image_hash: String,
    /// User id of who registered it.
    pub owner: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_downloaded_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_downloaded_user: Option<String>,
    pub download_count: u64,
    pub tainted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tainted_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tainted_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taint_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untainted_by: Option<String>,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<String>,
}

impl From<Manifest> for CatalogManifest {
    fn from(m: Manifest) -> Self {
        CatalogManifest {
            id: m.id,
            catalog_id: m.catalog_id,
            name: m.name,
            version: m.version,
            architecture: m.architecture.to_string(),
            description: m.description,
            vm_type: m.vm_type,
            tags: m.tags,
            required_roles: m.required_roles,
            required_claims: m.required_claims,
            minimum_requirements: m.minimum_requirements.map(CatalogRequirements::from),
            provider: CatalogProviderInfo { provider_type: m.provider_type, id: m.provider_id },
            size: m.size,
            pack_size: m.pack_size,
            chunk_count: m.chunk_count,
            file_count: m.file_count,
            image_hash: m.image_hash,
            owner: m.owner,
            created_at: m.created_at,
            updated_at: m.updated_at,
            last_downloaded_at: m.last_downloaded_at,
            last_downloaded_user: m.last_downloaded_user,
            download_count: m.download_count,
            tainted: m.tainted,
            tainted_by: m.tainted_by,
            tainted_at: m.tainted_at,
            taint_reason: m.taint_reason,
            untainted_by: m.untainted_by,
            revoked: m.revoked,
            revoked_by: m.revoked_by,
            revoked_at: m.revoked_at,
            imported_from: m.imported_from,
        }
    }
}

fn many(v: Vec<Manifest>) -> axum::Json<Vec<CatalogManifest>> {
    axum::Json(v.into_iter().map(CatalogManifest::from).collect())
}

/// Register an image whose chunks and image manifest were uploaded to a provider.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogPushRequest {
    pub catalog_id: String,
    pub version: String,
    /// `x86_64` or `arm64` (aliases `amd64`, `aarch64`, `arm` accepted).
    pub architecture: String,
    pub description: Option<String>,
    /// VM type (`pvm`, `macvm`, `qemu`, ...); default `pvm`.
    #[serde(rename = "type", alias = "vm_type")]
    pub vm_type: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub required_roles: Vec<String>,
    #[serde(default)]
    pub required_claims: Vec<String>,
    pub minimum_requirements: Option<CatalogRequirements>,
    /// The provider's connection string (`provider=aws-s3;bucket=...`). Stored
    /// encrypted; never returned.
    pub connection: String,
    /// Replace an existing manifest with the same id, version and architecture.
    #[serde(default)]
    pub overwrite: bool,
}

impl From<CatalogPushRequest> for NewManifest {
    fn from(r: CatalogPushRequest) -> Self {
        NewManifest {
            catalog_id: r.catalog_id,
            version: r.version,
            architecture: r.architecture,
            description: r.description,
            vm_type: r.vm_type,
            tags: r.tags,
            required_roles: r.required_roles,
            required_claims: r.required_claims,
            minimum_requirements: r.minimum_requirements.map(MinimumRequirements::from),
            connection: r.connection,
            overwrite: r.overwrite,
        }
    }
}

/// Which image to pull. `version` defaults to `latest`, `architecture` to the server's.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CatalogPullRequest {
    pub catalog_id: String,
    pub version: Option<String>,
    pub architecture: Option<String>,
}

/// What a puller needs: the manifest, the image manifest, and where to fetch chunks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogPullResponse {
    pub manifest: CatalogManifest,
    /// The image manifest (hangar-image format, self-checking).
    #[schema(value_type = Object)]
    pub image_manifest: Value,
    /// The key the image manifest has in its provider.
    pub manifest_key: String,
    /// Chunk route, relative to the API root, with `{hash}` to fill in.
    pub chunks_path: String,
}

fn pull_response(t: PullTicket) -> R<axum::Json<CatalogPullResponse>> {
    let image: Value = serde_json::from_slice(&t.image_manifest)
        .map_err(|e| ApiError::internal(format!("the stored image manifest is not JSON: {e}")))?;
    let m = t.manifest;
    let chunks_path = format!(
        "/catalog/{}/{}/{}/chunks/{{hash}}",
        hangar_catalog::remote::segment(&m.catalog_id),
        hangar_catalog::remote::segment(&m.version),
        m.architecture
    );
    Ok(axum::Json(CatalogPullResponse {
        manifest_key: m.manifest_key.clone(),
        manifest: m.into(),
        image_manifest: image,
        chunks_path,
    }))
}

/// Import a reference catalog entry (`.meta` + `.pdpack`) from a provider.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogImportRequest {
    /// The provider's connection string. Stored encrypted; never returned.
    pub connection: String,
    pub catalog_id: String,
    /// Default `latest`, the reference's default version.
    pub version: Option<String>,
    pub architecture: String,
    /// Key of the `.meta` when not `<catalog_id>/<catalog_id>-<arch>-<version>.meta`.
    pub meta_path: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
}

/// `clean_remote=true` also deletes the image manifests and unshared chunks in storage.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
pub struct DeleteQuery {
    #[serde(default)]
    pub clean_remote: bool,
}

/// Optional body of `taint`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogTaintRequest {
    /// Why, shown to whoever tries to pull it.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CatalogClaimsBody {
    #[serde(default)]
    pub required_claims: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CatalogRolesBody {
    #[serde(default)]
    pub required_roles: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CatalogTagsBody {
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogMetadataBody {
    pub description: Option<String>,
    pub minimum_requirements: Option<CatalogRequirements>,
    #[serde(rename = "type", alias = "vm_type")]
    pub vm_type: Option<String>,
}

/// Parse an optional JSON body (clients send these PATCHes with no body at all).
fn optional_body<T: for<'de> Deserialize<'de> + Default>(b: &Bytes) -> R<T> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("The JSON body has the wrong shape: {e}")))
}

// ----- list and get ------------------------------------------------------------------

/// Every manifest the caller may see, grouped by catalog id: `[{CATALOG_ID: [manifest, ...]}, ...]`.
#[utoipa::path(get, path = "/catalog", tag = "catalog",
    responses((status = 200, body = Vec<BTreeMap<String, Vec<CatalogManifest>>>), (status = 503, body = ApiErrorBody)))]
async fn list(
    State(s): State<AppState>,
    ctx: RequestContext,
) -> R<axum::Json<Vec<BTreeMap<String, Vec<CatalogManifest>>>>> {
    let groups = catalog(&s)?.list_grouped(ctx.caller()?).await?;
    Ok(axum::Json(
        groups
            .into_iter()
            .map(|(id, ms)| BTreeMap::from([(id, ms.into_iter().map(CatalogManifest::from).collect())]))
            .collect(),
    ))
}

/// Every version and architecture of one catalog id.
#[utoipa::path(get, path = "/catalog/{catalog_id}", tag = "catalog", params(("catalog_id" = String, Path)),
    responses((status = 200, body = Vec<CatalogManifest>), (status = 404, body = ApiErrorBody)))]
async fn get_id(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<Vec<CatalogManifest>>> {
    Ok(many(catalog(&s)?.get_id(ctx.caller()?, &id).await?))
}

/// Every architecture of one version; `latest` is the newest pullable version of each.
#[utoipa::path(get, path = "/catalog/{catalog_id}/{version}", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path, description = "A version, or `latest`")),
    responses((status = 200, body = Vec<CatalogManifest>), (status = 404, body = ApiErrorBody)))]
async fn get_version(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version)): Path<(String, String)>,
) -> R<axum::Json<Vec<CatalogManifest>>> {
    Ok(many(catalog(&s)?.get_version(ctx.caller()?, &id, &version).await?))
}

/// One manifest; `latest` resolves to the newest pullable version (semver order, else creation time).
#[utoipa::path(get, path = "/catalog/{catalog_id}/{version}/{architecture}", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path, description = "x86_64 or arm64 (aliases accepted)")),
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn get_one(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
) -> R<axum::Json<CatalogManifest>> {
    Ok(axum::Json(catalog(&s)?.get(ctx.caller()?, &id, &version, arch(&a)?).await?.into()))
}

// ----- register, pull, import --------------------------------------------------------

/// Register a pushed image (its chunks and image manifest must already be in the provider).
#[utoipa::path(post, path = "/catalog", tag = "catalog", request_body = CatalogPushRequest,
    responses((status = 201, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn create(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CatalogPushRequest>,
) -> R<(StatusCode, axum::Json<CatalogManifest>)> {
    let m = catalog(&s)?.register(ctx.caller()?, &ctx.actor, req.into()).await?;
    Ok((StatusCode::CREATED, axum::Json(m.into())))
}

/// Register a pushed image; what `hangar catalog push` calls after uploading the chunks.
#[utoipa::path(post, path = "/catalog/push", tag = "catalog", request_body = CatalogPushRequest,
    responses((status = 201, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn push(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CatalogPushRequest>,
) -> R<(StatusCode, axum::Json<CatalogManifest>)> {
    let m = catalog(&s)?.register(ctx.caller()?, &ctx.actor, req.into()).await?;
    Ok((StatusCode::CREATED, axum::Json(m.into())))
}

/// Resolve an image for download and count the download: what `hangar catalog pull` and a
/// remote puller call to fetch the chunks themselves. Tainted or revoked versions answer 409.
#[utoipa::path(put, path = "/catalog/pull-ticket", tag = "catalog", request_body = CatalogPullRequest,
    responses((status = 200, body = CatalogPullResponse), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn pull_ticket(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CatalogPullRequest>,
) -> R<axum::Json<CatalogPullResponse>> {
    let a = match req.architecture.as_deref() {
        Some(a) => arch(a)?,
        None => Architecture::host().ok_or_else(|| ApiError::bad_request("Give the architecture"))?,
    };
    let version = req.version.unwrap_or_else(|| hangar_catalog::version::LATEST.into());
    pull_response(catalog(&s)?.pull(ctx.caller()?, &ctx.actor, &req.catalog_id, &version, a).await?)
}

/// The same as `PUT /catalog/pull-ticket` for one manifest (the reference's download route).
#[utoipa::path(get, path = "/catalog/{catalog_id}/{version}/{architecture}/download", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogPullResponse), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn download(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
) -> R<axum::Json<CatalogPullResponse>> {
    pull_response(catalog(&s)?.pull(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?).await?)
}

/// The stored (zstd) bytes of one chunk of an image, for a caller who may pull it.
#[utoipa::path(get, path = "/catalog/{catalog_id}/{version}/{architecture}/chunks/{hash}", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path), ("hash" = String, Path, description = "blake3 of the uncompressed chunk")),
    responses((status = 200, description = "The chunk", content_type = "application/octet-stream"), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn chunk(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a, hash)): Path<(String, String, String, String)>,
) -> R<Response> {
    let bytes = catalog(&s)?.read_chunk(ctx.caller()?, &id, &version, arch(&a)?, &hash).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// One byte range of a pack (format 2) of an image, for a caller who may pull it: what a
/// pull from another server asks for. `Range: bytes=FIRST-LAST` is required (at most 8 MiB);
/// bytes of the range that belong to no chunk of this image are zeros.
#[utoipa::path(get, path = "/catalog/{catalog_id}/{version}/{architecture}/packs/{pack}", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path), ("pack" = String, Path, description = "The pack's id"),
        ("Range" = String, Header, description = "bytes=FIRST-LAST")),
    responses((status = 206, description = "The bytes", content_type = "application/octet-stream"), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn pack_range(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a, pack)): Path<(String, String, String, String)>,
    headers: axum::http::HeaderMap,
) -> R<Response> {
    let range =
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(parse_range).ok_or_else(|| {
            ApiError::bad_request("Send the header Range: bytes=FIRST-LAST (one range, at most 8 MiB)")
        })?;
    let (first, last) = (range.start, range.end - 1);
    let bytes = catalog(&s)?.read_pack_range(ctx.caller()?, &id, &version, arch(&a)?, &pack, range).await?;
    let last = last.min(first + (bytes.len() as u64).saturating_sub(1));
    let content_range = format!("bytes {first}-{last}/*");
    Ok((
        StatusCode::PARTIAL_CONTENT,
        [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_RANGE, content_range)],
        bytes,
    )
        .into_response())
}

/// `bytes=FIRST-LAST` (inclusive) as `FIRST..LAST + 1`.
fn parse_range(v: &str) -> Option<std::ops::Range<u64>> {
    let (first, last) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (last >= first && last < u64::MAX).then(|| first..last + 1)
}

/// Import a reference catalog entry (`<id>/<name>.meta` and its `.pdpack`, tar or tar.gz)
/// from any provider, converting it to the chunked format in the same provider.
#[utoipa::path(put, path = "/catalog/import", tag = "catalog", request_body = CatalogImportRequest,
    responses((status = 201, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn import(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(b): Json<CatalogImportRequest>,
) -> R<(StatusCode, axum::Json<CatalogManifest>)> {
    let req = ImportRequest {
        connection: b.connection,
        catalog_id: b.catalog_id,
        version: b.version,
        architecture: b.architecture,
        meta_path: b.meta_path,
        overwrite: b.overwrite,
    };
    let m = catalog(&s)?.import(ctx.caller()?, &ctx.actor, req).await?;
    Ok((StatusCode::CREATED, axum::Json(m.into())))
}

// ----- the reference's pull, push jobs and import-vm -------------------------------------

/// Parse a body the way the reference does: anything unreadable is a 400.
pub(super) fn pds_body<T: for<'de> Deserialize<'de>>(b: &Bytes) -> R<T> {
    serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("The body is not a valid request: {e}")))
}

/// The reference's pull: put a catalog image into a new VM on this host. `connection` names
/// another catalog server; empty means this server's catalog.
#[derive(Clone, Deserialize, ToSchema)]
pub struct PdsPullRequest {
    pub catalog_id: String,
    /// Default `latest`.
    pub version: Option<String>,
    /// Default: this host's architecture.
    pub architecture: Option<String>,
    /// Who the VM is for: the caller unless a SUPER_USER names another (on Parallels hosts
    /// also the macOS account that owns it).
    pub owner: Option<String>,
    /// The new VM's name (required).
    pub machine_name: Option<String>,
    /// The reference's destination folder; Hangar puts the VM in the host's VM folder.
    pub path: Option<String>,
    /// Another catalog server (`host=[scheme://]user:password@host:port` or
    /// `host=api_key@host`), pulled through its API with these credentials (it decides
    /// access); never stored, logged or answered.
    pub connection: Option<String>,
    #[serde(default)]
    pub start_after_pull: bool,
    /// Accepted and ignored (the reference's provider hints, job id and telemetry tag).
    #[serde(default)]
    pub provider_metadata: Option<BTreeMap<String, String>>,
    pub job_id: Option<String>,
    pub client: Option<String>,
}

/// The reference's pull answer: `id` and `machine_id` are the new VM's id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PdsPullResponse {
    pub id: String,
    pub machine_id: String,
    pub catalog_id: String,
    pub version: String,
    pub architecture: String,
    /// The VM's folder or bundle on the host.
    pub local_path: String,
    pub machine_name: String,
    /// The manifest, when the image came from this server's catalog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<CatalogManifest>,
    /// The image's folder in this host's catalog cache.
    pub local_cache_path: String,
}

/// Parse a pull body into the provisioning request (`manager`: pulling through that catalog
/// manager, so a `connection` in the body is refused).
pub(super) fn pds_pull_request(b: PdsPullRequest, manager: Option<String>) -> R<ProvisionRequest> {
    let field = |v: Option<String>| v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let catalog_id = b.catalog_id.trim().to_string();
    if catalog_id.is_empty() {
        return Err(ApiError::bad_request("catalog_id is required"));
    }
    let name = field(b.machine_name).ok_or_else(|| {
        ApiError::bad_request(
            "machine_name is required (for a download ticket without a VM, use PUT /catalog/pull-ticket)",
        )
    })?;
    let source = match (b.connection.as_deref().map(str::trim).filter(|c| !c.is_empty()), manager) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("connection is not allowed when pulling through a catalog manager"));
        }
        (Some(text), None) => PullSource::Connection(hangar_catalog::CatalogConnection::parse(text)?),
        (None, Some(id)) => PullSource::Manager { id, op: Some(hangar_catalog::ManagerOp::Pull) },
        (None, None) => PullSource::Catalog,
    };
    let arch = match field(b.architecture) {
        Some(a) => arch(&a)?,
        None => Architecture::host().ok_or_else(|| ApiError::bad_request("Give the architecture"))?,
    };
    let version = field(b.version).unwrap_or_else(|| hangar_catalog::version::LATEST.into());
    let owner = field(b.owner);
    let vm = VmSpec { name, owner: owner.clone(), host_user: owner, start: b.start_after_pull, ..VmSpec::default() };
    Ok(ProvisionRequest { image: CatalogImage { catalog_id, version, arch, source }, vm })
}

/// The pull answer for a VM made from a catalog image.
fn pds_pull_answer(done: Provisioned) -> PdsPullResponse {
    let (vm, image) = (done.vm, done.image);
    PdsPullResponse {
        id: vm.id.clone(),
        machine_id: vm.id,
        catalog_id: image.catalog_id,
        version: image.version,
        architecture: image.arch.to_string(),
        local_path: vm.home.display().to_string(),
        machine_name: vm.name,
        manifest: image.manifest.map(CatalogManifest::from),
        local_cache_path: image.folder.display().to_string(),
    }
}

/// The provisioning service of this host (needs the host and catalog modules).
fn provisioner(s: &AppState) -> R<Provisioner> {
    let host = super::machines::host(s)?.clone();
    Ok(Provisioner::new(host, catalog(s)?.clone()))
}

/// Parse and check a pull (every refusal before any work), then pull and create now or as a
/// job of this host whose `result` is the pull answer.
pub(super) async fn pds_pull(
    s: &AppState,
    ctx: &RequestContext,
    body: &Bytes,
    manager: Option<String>,
    as_job: bool,
) -> R<Response> {
    let b: PdsPullRequest = pds_body(body)?;
    let provisioner = provisioner(s)?;
    let p = ctx.caller()?;
    let checked = provisioner.check(p, pds_pull_request(b, manager)?).await.map_err(ApiError::from_domain)?;
    if !as_job {
        let done = provisioner.run(p, &ctx.actor, checked, None).await.map_err(ApiError::from_domain)?;
        return Ok(axum::Json(pds_pull_answer(done)).into_response());
    }
    let answer = |r: Result<Provisioned, hangar_provision::ProvisionError>| {
        r.map(|done| serde_json::to_value(pds_pull_answer(done)).unwrap_or_default())
            .map_err(|e| ApiError::from_domain(e).message)
    };
    let job = provisioner.start_job(p, &ctx.actor, checked, answer).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::ACCEPTED, axum::Json(job)).into_response())
}

/// The reference's pull: the image goes through this host's cache into a new VM named
/// `machine_name`, owned as on any create, started when `start_after_pull`. Needs
/// PULL_CATALOG_MANIFEST and the VM create rule; needs the host module (503 otherwise).
#[utoipa::path(put, path = "/catalog/pull", tag = "catalog", request_body = PdsPullRequest,
    responses((status = 200, body = PdsPullResponse), (status = 400, body = ApiErrorBody), (status = 403, body = ApiErrorBody),
        (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn pull(State(s): State<AppState>, ctx: RequestContext, body: Bytes) -> R<Response> {
    pds_pull(&s, &ctx, &body, None, false).await
}

/// `PUT /catalog/pull` as a job of this host (steps `pull` and `create`); the finished job's
/// `result` is the pull answer. Refusals (400, 403, 404, 503) come before the job.
#[utoipa::path(put, path = "/catalog/pull/async", tag = "catalog", request_body = PdsPullRequest,
    responses((status = 202, body = Job, description = "The job; follow it at /jobs/{id}"), (status = 400, body = ApiErrorBody),
        (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn pull_async(State(s): State<AppState>, ctx: RequestContext, body: Bytes) -> R<Response> {
    pds_pull(&s, &ctx, &body, None, true).await
}

/// `POST /catalog/push/async`: Hangar's push body (register an image already in the provider),
/// or the reference's with `local_path` (a VM folder on this server, chunked into the provider
/// first). The reference's compression fields are accepted and not needed (chunks are zstd).
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct PdsPushRequest {
    pub catalog_id: String,
    pub version: String,
    /// `x86_64` or `arm64` (aliases accepted).
    pub architecture: String,
    pub description: Option<String>,
    #[serde(rename = "type", alias = "vm_type")]
    pub vm_type: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub required_roles: Vec<String>,
    #[serde(default)]
    pub required_claims: Vec<String>,
    pub minimum_requirements: Option<CatalogRequirements>,
    /// The provider's connection string. Stored encrypted; never returned.
    pub connection: String,
    /// Replace an existing entry (the reference's `override_existing`).
    #[serde(default, alias = "override_existing")]
    pub overwrite: bool,
    /// A VM folder on this server to push (absolute; inside `CATALOG_LOCAL_ROOTS` unless the
    /// caller is a SUPER_USER).
    pub local_path: Option<String>,
    pub compress: Option<bool>,
    pub compress_level: Option<String>,
    pub compress_pack: Option<bool>,
    pub compress_pack_level: Option<i64>,
    pub uuid: Option<String>,
    pub pack_size: Option<i64>,
}

/// `POST /catalog/push` as a job of this host, or the reference's server-side push of
/// `local_path`; the finished job's `result` is the manifest.
#[utoipa::path(post, path = "/catalog/push/async", tag = "catalog", request_body = PdsPushRequest,
    responses((status = 202, body = Job, description = "The job; follow it at /jobs/{id}"), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn push_async(State(s): State<AppState>, ctx: RequestContext, body: Bytes) -> R<(StatusCode, axum::Json<Job>)> {
    let b: PdsPushRequest = pds_body(&body)?;
    let catalog = catalog(&s)?.clone();
    let jobs = super::machines::host(&s)?.jobs.clone();
    let p = ctx.caller()?.clone();
    let local = b.local_path.as_deref().map(str::trim).filter(|l| !l.is_empty()).map(std::path::PathBuf::from);
    let input = NewManifest {
        catalog_id: b.catalog_id,
        version: b.version,
        architecture: b.architecture,
        description: b.description,
        vm_type: b.vm_type,
        tags: b.tags,
        required_roles: b.required_roles,
        required_claims: b.required_claims,
        minimum_requirements: b.minimum_requirements.map(MinimumRequirements::from),
        connection: b.connection,
        overwrite: b.overwrite,
    };
    let handle = jobs.start(&p.user_id, "catalog", "push", &[("push", 1)]).await.map_err(ApiError::from_domain)?;
    let job = jobs.get(&handle.id).ok_or_else(|| ApiError::internal("the new job vanished"))?;
    let actor = ctx.actor.clone();
    tokio::spawn(async move {
        let done = match local {
            Some(path) => {
                handle.step(0, 0.0, "pushing the VM folder");
                let progress = job_progress(&handle, 0, "pushing the VM folder");
                catalog.push_local(&p, &actor, input, &path, Some(progress)).await
            }
            None => {
                handle.step(0, 0.0, "registering the image");
                catalog.register(&p, &actor, input).await
            }
        };
        match done {
            Ok(m) => handle.complete(serde_json::to_value(CatalogManifest::from(m)).unwrap_or_default()).await,
            Err(e) => handle.fail(e.to_string()).await,
        }
    });
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

/// The reference's import of a raw VM archive that sits in a storage provider.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct ImportVmBody {
    /// The provider's connection string. Stored encrypted; never returned.
    pub connection: String,
    pub catalog_id: String,
    pub version: String,
    pub architecture: String,
    /// Key of the archive (a tar or tar.gz of a `.pvm`/`.macvm` bundle or a QEMU image folder).
    pub machine_remote_path: String,
    /// `pvm`, `macvm` or `qemu`; default: from the bundle's extension, else `pvm`.
    #[serde(rename = "type")]
    pub vm_type: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub is_compressed: bool,
    /// The reference's size in MB; accepted and not needed (the archive is measured).
    pub size: Option<i64>,
    /// Replace an existing entry.
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub required_roles: Vec<String>,
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Accepted and ignored.
    pub provider_metadata: Option<BTreeMap<String, String>>,
}

/// The reference's import-vm answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImportVmResponse {
    /// The new manifest's id.
    pub id: String,
    /// Where the archive was read, in its provider.
    pub local_path: String,
    /// The manifest's name (`<catalog_id>-<architecture>-<version>`).
    pub machine_name: String,
    pub manifest: CatalogManifest,
}

/// Import a raw VM archive from a provider as a new catalog entry (converted to the chunked
/// format in the same provider). Unknown provider, bad type or key: 400; no such object: 404;
/// entry exists without `force`: 409; unreadable archive: 422.
#[utoipa::path(put, path = "/catalog/import-vm", tag = "catalog", request_body = ImportVmBody,
    responses((status = 200, body = ImportVmResponse), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn import_vm(State(s): State<AppState>, ctx: RequestContext, body: Bytes) -> R<axum::Json<ImportVmResponse>> {
    let b: ImportVmBody = pds_body(&body)?;
    let local_path = b.machine_remote_path.clone();
    let req = ImportVmRequest {
        connection: b.connection,
        catalog_id: b.catalog_id,
        version: b.version,
        architecture: b.architecture,
        machine_remote_path: b.machine_remote_path,
        vm_type: b.vm_type,
        description: b.description,
        tags: b.tags,
        required_roles: b.required_roles,
        required_claims: b.required_claims,
        is_compressed: b.is_compressed,
        force: b.force,
    };
    let m = catalog(&s)?.import_vm(ctx.caller()?, &ctx.actor, req).await?;
    Ok(axum::Json(ImportVmResponse { id: m.id.clone(), local_path, machine_name: m.name.clone(), manifest: m.into() }))
}

// ----- delete ------------------------------------------------------------------------

/// Delete every version of a catalog id the caller may see.
#[utoipa::path(delete, path = "/catalog/{catalog_id}", tag = "catalog", params(("catalog_id" = String, Path), DeleteQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_id(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> R<StatusCode> {
    catalog(&s)?.delete(ctx.caller()?, &ctx.actor, &id, None, None, q.clean_remote).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Delete every architecture of one version.
#[utoipa::path(delete, path = "/catalog/{catalog_id}/{version}", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), DeleteQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_version(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> R<StatusCode> {
    catalog(&s)?.delete(ctx.caller()?, &ctx.actor, &id, Some(&version), None, q.clean_remote).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Delete one manifest.
#[utoipa::path(delete, path = "/catalog/{catalog_id}/{version}/{architecture}", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path), DeleteQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_one(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> R<StatusCode> {
    catalog(&s)?.delete(ctx.caller()?, &ctx.actor, &id, Some(&version), Some(arch(&a)?), q.clean_remote).await?;
    Ok(StatusCode::ACCEPTED)
}

// ----- taint, untaint, revoke --------------------------------------------------------

/// Make a version unpullable until it is untainted. Body optional: `{reason}`.
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/taint", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body(content = Option<CatalogTaintRequest>),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody)))]
async fn taint(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
    body: Bytes,
) -> R<axum::Json<CatalogManifest>> {
    let req: CatalogTaintRequest = optional_body(&body)?;
    Ok(axum::Json(catalog(&s)?.taint(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?, req.reason).await?.into()))
}

/// Make a tainted version pullable again (a revoked one stays revoked).
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/untaint", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody)))]
async fn untaint(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
) -> R<axum::Json<CatalogManifest>> {
    Ok(axum::Json(catalog(&s)?.untaint(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?).await?.into()))
}

/// Revoke a version for good: it can never be pulled or replaced again.
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/revoke", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn revoke(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
) -> R<axum::Json<CatalogManifest>> {
    Ok(axum::Json(catalog(&s)?.revoke(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?).await?.into()))
}

// ----- claims, roles, tags, metadata -------------------------------------------------

async fn patch(
    s: &AppState,
    ctx: &RequestContext,
    (id, version, a): (String, String, String),
    field: ListField,
    add: bool,
    values: Vec<String>,
) -> R<axum::Json<CatalogManifest>> {
    let m = catalog(s)?.patch_list(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?, field, add, &values).await?;
    Ok(axum::Json(m.into()))
}

/// Add required claims: a caller must hold all of them to see or pull the manifest.
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/claims", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogClaimsBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn add_claims(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(p): Path<(String, String, String)>,
    Json(b): Json<CatalogClaimsBody>,
) -> R<axum::Json<CatalogManifest>> {
    patch(&s, &ctx, p, ListField::Claims, true, b.required_claims).await
}

/// Remove required claims.
#[utoipa::path(delete, path = "/catalog/{catalog_id}/{version}/{architecture}/claims", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogClaimsBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn remove_claims(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(p): Path<(String, String, String)>,
    Json(b): Json<CatalogClaimsBody>,
) -> R<axum::Json<CatalogManifest>> {
    patch(&s, &ctx, p, ListField::Claims, false, b.required_claims).await
}

/// Add required roles: a caller must hold all of them to see or pull the manifest.
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/roles", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogRolesBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn add_roles(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(p): Path<(String, String, String)>,
    Json(b): Json<CatalogRolesBody>,
) -> R<axum::Json<CatalogManifest>> {
    patch(&s, &ctx, p, ListField::Roles, true, b.required_roles).await
}

/// Remove required roles.
#[utoipa::path(delete, path = "/catalog/{catalog_id}/{version}/{architecture}/roles", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogRolesBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn remove_roles(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(p): Path<(String, String, String)>,
    Json(b): Json<CatalogRolesBody>,
) -> R<axum::Json<CatalogManifest>> {
    patch(&s, &ctx, p, ListField::Roles, false, b.required_roles).await
}

/// Add tags.
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/tags", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogTagsBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn add_tags(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(p): Path<(String, String, String)>,
    Json(b): Json<CatalogTagsBody>,
) -> R<axum::Json<CatalogManifest>> {
    patch(&s, &ctx, p, ListField::Tags, true, b.tags).await
}

/// Remove tags.
#[utoipa::path(delete, path = "/catalog/{catalog_id}/{version}/{architecture}/tags", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogTagsBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn remove_tags(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(p): Path<(String, String, String)>,
    Json(b): Json<CatalogTagsBody>,
) -> R<axum::Json<CatalogManifest>> {
    patch(&s, &ctx, p, ListField::Tags, false, b.tags).await
}

/// Change the description, minimum requirements or VM type.
#[utoipa::path(put, path = "/catalog/{catalog_id}/{version}/{architecture}/metadata", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogMetadataBody,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn metadata(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
    Json(b): Json<CatalogMetadataBody>,
) -> R<axum::Json<CatalogManifest>> {
    let upd = MetadataUpdate {
        description: b.description,
        minimum_requirements: b.minimum_requirements.map(MinimumRequirements::from),
        vm_type: b.vm_type,
    };
    Ok(axum::Json(catalog(&s)?.update_metadata(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?, upd).await?.into()))
}

/// A new provider connection string for a manifest.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogConnectionRequest {
    /// Stored encrypted; never returned. Must reach the same image.
    pub connection: String,
}

/// Replace the provider connection (rotated keys, moved endpoint); it must reach the same image.
#[utoipa::path(patch, path = "/catalog/{catalog_id}/{version}/{architecture}/connection", tag = "catalog",
    params(("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)), request_body = CatalogConnectionRequest,
    responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn connection(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version, a)): Path<(String, String, String)>,
    Json(b): Json<CatalogConnectionRequest>,
) -> R<axum::Json<CatalogManifest>> {
    let m = catalog(&s)?.set_connection(ctx.caller()?, &ctx.actor, &id, &version, arch(&a)?, &b.connection).await?;
    Ok(axum::Json(m.into()))
}

// The host cache routes (`/catalog/cache`, `/cache`) are in `routes::cache`.
