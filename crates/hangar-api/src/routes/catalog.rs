//! `/catalog/...`: catalog manifests (list, get, register, pull, chunks, delete, taint,
//! untaint, revoke, claims/roles/tags, metadata, import) and this host's image cache
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
    Architecture, CacheItem, Catalog, CatalogError, ImportRequest, ListField, Manifest, MetadataUpdate,
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

type R<T> = Result<T, ApiError>;

const LIST: Access = Access::AllOf(&[LIST_CATALOG_MANIFEST]);
const PULL: Access = Access::AllOf(&[PULL_CATALOG_MANIFEST]);
const UPDATE: Access = Access::AllOf(&[UPDATE_CATALOG_MANIFEST]);
const DELETE: Access = Access::AllOf(&[DELETE_CATALOG_MANIFEST]);

pub fn register(api: Api) -> Api {
    api.add(LIST, routes!(list))
        .add(Access::AnyOf(&[CREATE_CATALOG_MANIFEST, PUSH_CATALOG_MANIFEST]), routes!(create))
        .add(Access::AllOf(&[PUSH_CATALOG_MANIFEST]), routes!(push))
        .add(PULL, routes!(pull))
        .add(Access::AnyOf(&[IMPORT_CATALOG_MANIFEST, PUSH_CATALOG_MANIFEST]), routes!(import))
        .add(Access::AllOf(&[LIST_CACHE]), routes!(cache_list))
        .add(Access::AllOf(&[DELETE_ALL_CACHE]), routes!(cache_delete_all))
        .add(Access::AllOf(&[DELET_CACHE_ITEM]), routes!(cache_delete_id))
        .add(Access::AllOf(&[DELET_CACHE_ITEM]), routes!(cache_delete_version))
        .add(LIST, routes!(get_id))
        .add(DELETE, routes!(delete_id))
        .add(LIST, routes!(get_version))
        .add(DELETE, routes!(delete_version))
        .add(LIST, routes!(get_one))
        .add(DELETE, routes!(delete_one))
        .add(PULL, routes!(download))
        .add(PULL, routes!(chunk))
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
#[derive(Clone, Deserialize, ToSchema)]
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
#[derive(Clone, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CatalogClaimsBody {
    #[serde(default)]
    pub required_claims: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CatalogRolesBody {
    #[serde(default)]
    pub required_roles: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CatalogTagsBody {
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CatalogMetadataBody {
    pub description: Option<String>,
    pub minimum_requirements: Option<CatalogRequirements>,
    #[serde(rename = "type", alias = "vm_type")]
    pub vm_type: Option<String>,
}

/// An image in this host's cache.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CachedImage {
    pub id: String,
    pub catalog_id: String,
    pub version: String,
    pub architecture: String,
    pub image_hash: String,
    pub path: String,
    pub size: u64,
    pub cached_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub used_count: u64,
}

impl From<CacheItem> for CachedImage {
    fn from(i: CacheItem) -> Self {
        CachedImage {
            id: i.id,
            catalog_id: i.catalog_id,
            version: i.version,
            architecture: i.architecture.to_string(),
            image_hash: i.image_hash,
            path: i.path,
            size: i.size,
            cached_at: i.cached_at,
            last_used_at: i.last_used_at,
            used_count: i.used_count,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogCacheList {
    pub total_size: u64,
    pub manifests: Vec<CachedImage>,
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

/// Resolve an image for download and count the download. Tainted or revoked versions answer 409.
#[utoipa::path(put, path = "/catalog/pull", tag = "catalog", request_body = CatalogPullRequest,
    responses((status = 200, body = CatalogPullResponse), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn pull(
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

/// The same as `PUT /catalog/pull` for one manifest (the reference's download route).
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
#[derive(Clone, Deserialize, ToSchema)]
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

// ----- host cache --------------------------------------------------------------------

/// The images in this host's catalog cache.
#[utoipa::path(get, path = "/catalog/cache", tag = "catalog-cache", responses((status = 200, body = CatalogCacheList)))]
async fn cache_list(State(s): State<AppState>) -> R<axum::Json<CatalogCacheList>> {
    let items = catalog(&s)?.cache_list().await?;
    let total_size = items.iter().map(|i| i.size).sum();
    Ok(axum::Json(CatalogCacheList { total_size, manifests: items.into_iter().map(CachedImage::from).collect() }))
}

/// Empty this host's catalog cache.
#[utoipa::path(delete, path = "/catalog/cache", tag = "catalog-cache", responses((status = 202)))]
async fn cache_delete_all(State(s): State<AppState>, ctx: RequestContext) -> R<StatusCode> {
    catalog(&s)?.cache_delete(&ctx.actor, None, None).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Remove every cached version of a catalog id.
#[utoipa::path(delete, path = "/catalog/cache/{catalog_id}", tag = "catalog-cache", params(("catalog_id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn cache_delete_id(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    catalog(&s)?.cache_delete(&ctx.actor, Some(&id), None).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Remove one cached version.
#[utoipa::path(delete, path = "/catalog/cache/{catalog_id}/{version}", tag = "catalog-cache",
    params(("catalog_id" = String, Path), ("version" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn cache_delete_version(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, version)): Path<(String, String)>,
) -> R<StatusCode> {
    catalog(&s)?.cache_delete(&ctx.actor, Some(&id), Some(&version)).await?;
    Ok(StatusCode::ACCEPTED)
}
