//! `/catalog-managers/...`: per-user remote catalogs (reference §1.5). CRUD, and every
//! route of the remote catalog (`/catalog-managers/{id}/catalog/...`: list, get, register,
//! delete, download, taint, untaint, revoke, claims/roles/tags, connection, metadata, push,
//! import, import-vm) forwarded with the manager's own credentials (never the caller's
//! identity), bodies as the local catalog routes' types, answers parsed into the local
//! answer types (so nothing else a remote sends, e.g. provider secrets, passes through).
//! `PUT .../catalog/pull[/async]` pulls from the manager's catalog onto this host and makes
//! the VM, as the local pull does with a `connection`.
//! `hangar_catalog::managers` decides access (manager and claim), seals the credentials and audits.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use hangar_catalog::{Catalog, CatalogManagerInput, CatalogManagerView};
use hangar_core::Access;
use hangar_core::claims::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;

use axum::body::Bytes;
use hangar_catalog::{ManagerOp, RemoteCall, RemoteMethod};
use hangar_host::Job;
use serde::de::DeserializeOwned;

use super::catalog::{
    CatalogClaimsBody, CatalogConnectionRequest, CatalogImportRequest, CatalogManifest, CatalogMetadataBody,
    CatalogPullResponse, CatalogPushRequest, CatalogRolesBody, CatalogTagsBody, DeleteQuery, ImportVmBody,
    ImportVmResponse, PdsPullRequest, PdsPullResponse, PdsPushRequest,
};
use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::Query;
use crate::extract::{Json, Path};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

const LIST: Access = Access::AnyOf(&[CATALOG_MANAGER_LIST, CATALOG_MANAGER_LIST_OWN]);
const CREATE: Access = Access::AnyOf(&[CATALOG_MANAGER_CREATE, CATALOG_MANAGER_CREATE_OWN]);
const UPDATE: Access = Access::AnyOf(&[CATALOG_MANAGER_UPDATE, CATALOG_MANAGER_UPDATE_OWN]);
const DELETE: Access = Access::AnyOf(&[CATALOG_MANAGER_DELETE, CATALOG_MANAGER_DELETE_OWN]);
const REMOTE_UPDATE: Access = Access::AnyOf(ManagerOp::Update.claims());
const REMOTE_LIST: Access = Access::AnyOf(ManagerOp::List.claims());
const REMOTE_CREATE: Access = Access::AnyOf(ManagerOp::Create.claims());
const REMOTE_DELETE: Access = Access::AnyOf(ManagerOp::Delete.claims());
const REMOTE_PULL: Access = Access::AnyOf(ManagerOp::Pull.claims());
const REMOTE_PUSH: Access = Access::AnyOf(ManagerOp::Push.claims());
const REMOTE_IMPORT: Access = Access::AnyOf(ManagerOp::Import.claims());

pub fn register(api: Api) -> Api {
    api.add(LIST, routes!(list_managers))
        .add(CREATE, routes!(create_manager))
        .add(LIST, routes!(get_manager))
        .add(UPDATE, routes!(update_manager))
        .add(DELETE, routes!(delete_manager))
        .add(REMOTE_LIST, routes!(remote_list))
        .add(REMOTE_LIST, routes!(remote_get_id))
        .add(REMOTE_LIST, routes!(remote_get_version))
        .add(REMOTE_LIST, routes!(remote_get_one))
        .add(REMOTE_UPDATE, routes!(remote_taint))
        .add(REMOTE_UPDATE, routes!(remote_untaint))
        .add(REMOTE_CREATE, routes!(remote_create))
        .add(REMOTE_DELETE, routes!(remote_delete_id))
        .add(REMOTE_DELETE, routes!(remote_delete_version))
        .add(REMOTE_DELETE, routes!(remote_delete_one))
        .add(REMOTE_PULL, routes!(remote_download))
        .add(REMOTE_UPDATE, routes!(remote_revoke))
        .add(REMOTE_UPDATE, routes!(remote_add_claims))
        .add(REMOTE_UPDATE, routes!(remote_remove_claims))
        .add(REMOTE_UPDATE, routes!(remote_add_roles))
        .add(REMOTE_UPDATE, routes!(remote_remove_roles))
        .add(REMOTE_UPDATE, routes!(remote_add_tags))
        .add(REMOTE_UPDATE, routes!(remote_remove_tags))
        .add(REMOTE_UPDATE, routes!(remote_connection))
        .add(REMOTE_UPDATE, routes!(remote_metadata))
        .add(REMOTE_PUSH, routes!(remote_push))
        .add(REMOTE_PUSH, routes!(remote_push_async))
        .add(REMOTE_IMPORT, routes!(remote_import))
        .add(REMOTE_IMPORT, routes!(remote_import_vm))
        .add(REMOTE_PULL, routes!(remote_pull))
        .add(REMOTE_PULL, routes!(remote_pull_async))
}

/// A catalog manager to create, or the fields to change (absent ones are kept; a
/// credential sent empty or as `********` keeps the stored one).
#[derive(Clone, Default, Deserialize, ToSchema)]
pub struct CatalogManagerRequest {
    pub name: Option<String>,
    /// The catalog server: `http(s)://host[:port]`.
    pub url: Option<String>,
    pub internal: Option<bool>,
    pub active: Option<bool>,
    /// `password` (username + password) or `api_key`.
    pub authentication_method: Option<String>,
    pub username: Option<String>,
    /// Stored encrypted; never answered.
    pub password: Option<String>,
    /// Stored encrypted; never answered.
    pub api_key: Option<String>,
    /// Visible to (and usable by) every user holding `required_claims`.
    pub global: Option<bool>,
    pub required_claims: Option<Vec<String>>,
}

impl std::fmt::Debug for CatalogManagerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogManagerRequest")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl From<CatalogManagerRequest> for CatalogManagerInput {
    fn from(r: CatalogManagerRequest) -> Self {
        CatalogManagerInput {
            name: r.name,
            url: r.url,
            internal: r.internal,
            active: r.active,
            authentication_method: r.authentication_method,
            username: r.username,
            password: r.password,
            api_key: r.api_key,
            global: r.global,
            required_claims: r.required_claims,
        }
    }
}

/// A catalog manager. `username`, `password` and `api_key` are `********` when set.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogManagerResponse {
    pub id: String,
    pub name: String,
    pub url: String,
    pub internal: bool,
    pub active: bool,
    pub authentication_method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    pub global: bool,
    pub required_claims: Vec<String>,
    pub owner_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<CatalogManagerView> for CatalogManagerResponse {
    fn from(v: CatalogManagerView) -> Self {
        CatalogManagerResponse {
            id: v.id,
            name: v.name,
            url: v.url,
            internal: v.internal,
            active: v.active,
            authentication_method: v.authentication_method,
            username: v.username,
            password: v.password,
            api_key: v.api_key,
            global: v.global,
            required_claims: v.required_claims,
            owner_id: v.owner_id,
            created_at: v.created_at,
            updated_at: v.updated_at,
        }
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

/// The managers the caller may see: all with `CATALOG_MANAGER_LIST`, else its own and
/// the global ones whose required claims it holds.
#[utoipa::path(get, path = "/catalog-managers", tag = "catalog-managers",
    responses((status = 200, body = Vec<CatalogManagerResponse>)))]
async fn list_managers(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<Vec<CatalogManagerResponse>>> {
    let list = catalog(&s)?.managers_list(ctx.caller()?).await?;
    Ok(axum::Json(list.into_iter().map(Into::into).collect()))
}

/// Register a catalog manager owned by the caller (global or internal ones need
/// `CATALOG_MANAGER_CREATE`).
#[utoipa::path(post, path = "/catalog-managers", tag = "catalog-managers", request_body = CatalogManagerRequest,
    responses((status = 200, body = CatalogManagerResponse), (status = 400, body = ApiErrorBody), (status = 403, body = ApiErrorBody)))]
async fn create_manager(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CatalogManagerRequest>,
) -> R<axum::Json<CatalogManagerResponse>> {
    let v = catalog(&s)?.manager_create(ctx.caller()?, &ctx.actor, &req.into()).await?;
    Ok(axum::Json(v.into()))
}

#[utoipa::path(get, path = "/catalog-managers/{id}", tag = "catalog-managers", params(("id" = String, Path)),
    responses((status = 200, body = CatalogManagerResponse), (status = 404, body = ApiErrorBody)))]
async fn get_manager(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<CatalogManagerResponse>> {
    Ok(axum::Json(catalog(&s)?.manager_get(ctx.caller()?, &id).await?.into()))
}

/// Change a manager (its owner, or `CATALOG_MANAGER_UPDATE`).
#[utoipa::path(put, path = "/catalog-managers/{id}", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = CatalogManagerRequest,
    responses((status = 200, body = CatalogManagerResponse), (status = 400, body = ApiErrorBody), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn update_manager(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<CatalogManagerRequest>,
) -> R<axum::Json<CatalogManagerResponse>> {
    let v = catalog(&s)?.manager_update(ctx.caller()?, &ctx.actor, &id, &req.into()).await?;
    Ok(axum::Json(v.into()))
}

/// Remove a manager (its owner, or `CATALOG_MANAGER_DELETE`).
#[utoipa::path(delete, path = "/catalog-managers/{id}", tag = "catalog-managers", params(("id" = String, Path)),
    responses((status = 200, description = "Removed"), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn delete_manager(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    catalog(&s)?.manager_delete(ctx.caller()?, &ctx.actor, &id).await?;
    Ok(StatusCode::OK)
}

// ----- the remote catalog, read through the manager ----------------------------------

async fn remote<T: serde::de::DeserializeOwned>(s: &AppState, ctx: &RequestContext, id: &str, path: &str) -> R<T> {
    let v = catalog(s)?.manager_get_json(ctx.caller()?, id, path).await?;
    serde_json::from_value(v).map_err(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("catalog manager {id}: the catalog server's answer: {e}"))
    })
}

fn seg(s: &str) -> String {
    hangar_catalog::remote::segment(s).to_string()
}

/// The remote catalog's manifests (what the manager's user may see there).
#[utoipa::path(get, path = "/catalog-managers/{id}/catalog", tag = "catalog-managers", params(("id" = String, Path)),
    responses((status = 200, body = Vec<BTreeMap<String, Vec<CatalogManifest>>>), (status = 404, body = ApiErrorBody)))]
async fn remote_list(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<Vec<BTreeMap<String, Vec<CatalogManifest>>>>> {
    Ok(axum::Json(remote(&s, &ctx, &id, "/catalog").await?))
}

#[utoipa::path(get, path = "/catalog-managers/{id}/catalog/{catalog_id}", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path)),
    responses((status = 200, body = Vec<CatalogManifest>), (status = 404, body = ApiErrorBody)))]
async fn remote_get_id(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid)): Path<(String, String)>,
) -> R<axum::Json<Vec<CatalogManifest>>> {
    Ok(axum::Json(remote(&s, &ctx, &id, &format!("/catalog/{}", seg(&cid))).await?))
}

#[utoipa::path(get, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = Vec<CatalogManifest>), (status = 404, body = ApiErrorBody)))]
async fn remote_get_version(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version)): Path<(String, String, String)>,
) -> R<axum::Json<Vec<CatalogManifest>>> {
    let path = format!("/catalog/{}/{}", seg(&cid), seg(&version));
    Ok(axum::Json(remote(&s, &ctx, &id, &path).await?))
}

#[utoipa::path(get, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody)))]
async fn remote_get_one(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<axum::Json<CatalogManifest>> {
    let path = format!("/catalog/{}/{}/{}", seg(&cid), seg(&version), seg(&a));
    Ok(axum::Json(remote(&s, &ctx, &id, &path).await?))
}

// ----- the remote catalog, changed through the manager ------------------------------

/// Forwards one call to the manager's catalog and parses the answer as `T` (the local
/// route's answer type), relaying the remote's success status.
async fn forward<T: DeserializeOwned>(
    s: &AppState,
    ctx: &RequestContext,
    id: &str,
    op: ManagerOp,
    method: RemoteMethod,
    path: &str,
    body: Option<serde_json::Value>,
) -> R<(StatusCode, axum::Json<T>)> {
    let call = RemoteCall { op, method, path, body };
    let f = catalog(s)?.manager_forward(ctx.caller()?, &ctx.actor, id, call).await?;
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::OK);
    let v = f.body.unwrap_or(serde_json::Value::Null);
    let t = serde_json::from_value(v).map_err(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("catalog manager {id}: the catalog server's answer: {e}"))
    })?;
    Ok((status, axum::Json(t)))
}

/// [`forward`] for a call whose answer has no body (delete).
async fn forward_empty(
    s: &AppState,
    ctx: &RequestContext,
    id: &str,
    op: ManagerOp,
    method: RemoteMethod,
    path: &str,
) -> R<StatusCode> {
    let call = RemoteCall { op, method, path, body: None };
    let f = catalog(s)?.manager_forward(ctx.caller()?, &ctx.actor, id, call).await?;
    Ok(StatusCode::from_u16(f.status).unwrap_or(StatusCode::OK))
}

fn json_of<T: Serialize>(b: &T) -> R<serde_json::Value> {
    serde_json::to_value(b).map_err(|e| ApiError::internal(format!("the request body: {e}")))
}

fn one_path(cid: &str, version: &str, a: &str, tail: &str) -> String {
    format!("/catalog/{}/{}/{}{tail}", seg(cid), seg(version), seg(a))
}

type Manifest = (StatusCode, axum::Json<CatalogManifest>);

/// Taint a version on the remote catalog (as the manager's user there).
#[utoipa::path(patch, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}/taint", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_taint(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<Manifest> {
    let path = one_path(&cid, &version, &a, "/taint");
    forward(&s, &ctx, &id, ManagerOp::Update, RemoteMethod::Patch, &path, None).await
}

/// Untaint a version on the remote catalog (as the manager's user there).
#[utoipa::path(patch, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}/untaint", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_untaint(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<Manifest> {
    let path = one_path(&cid, &version, &a, "/untaint");
    forward(&s, &ctx, &id, ManagerOp::Update, RemoteMethod::Patch, &path, None).await
}

/// Revoke a version on the remote catalog (the manager's user must be allowed to there).
#[utoipa::path(patch, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}/revoke", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_revoke(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<Manifest> {
    let path = one_path(&cid, &version, &a, "/revoke");
    forward(&s, &ctx, &id, ManagerOp::Update, RemoteMethod::Patch, &path, None).await
}

/// Register a pushed image on the remote catalog (`POST /catalog` there).
#[utoipa::path(post, path = "/catalog-managers/{id}/catalog", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = CatalogPushRequest,
    responses((status = 201, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_create(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(b): Json<CatalogPushRequest>,
) -> R<Manifest> {
    forward(&s, &ctx, &id, ManagerOp::Create, RemoteMethod::Post, "/catalog", Some(json_of(&b)?)).await
}

/// Register a pushed image on the remote catalog (`POST /catalog/push` there).
#[utoipa::path(post, path = "/catalog-managers/{id}/catalog/push", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = CatalogPushRequest,
    responses((status = 201, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_push(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(b): Json<CatalogPushRequest>,
) -> R<Manifest> {
    forward(&s, &ctx, &id, ManagerOp::Push, RemoteMethod::Post, "/catalog/push", Some(json_of(&b)?)).await
}

/// `POST .../catalog/push` as a job of this host; the finished job's `result` is the remote
/// manifest. A `local_path` (a VM folder here to chunk into the provider first) is not
/// supported through a manager yet: 400.
#[utoipa::path(post, path = "/catalog-managers/{id}/catalog/push/async", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = PdsPushRequest,
    responses((status = 202, body = Job, description = "The job; follow it at /jobs/{id}"), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn remote_push_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    body: Bytes,
) -> R<(StatusCode, axum::Json<Job>)> {
    let b: PdsPushRequest = super::catalog::pds_body(&body)?;
    if b.local_path.as_deref().is_some_and(|l| !l.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "local_path is not supported through a catalog manager; push the folder with the CLI, then register it here",
        ));
    }
    let req = CatalogPushRequest {
        catalog_id: b.catalog_id,
        version: b.version,
        architecture: b.architecture,
        description: b.description,
        vm_type: b.vm_type,
        tags: b.tags,
        required_roles: b.required_roles,
        required_claims: b.required_claims,
        minimum_requirements: b.minimum_requirements,
        connection: b.connection,
        overwrite: b.overwrite,
    };
    let body = json_of(&req)?;
    let cat = catalog(&s)?.clone();
    let p = ctx.caller()?.clone();
    // The manager and the claim are checked before the job starts.
    cat.manager_get(&p, &id).await?;
    if !ManagerOp::Push.claims().iter().any(|c| p.has_claim(c)) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "pushing through a catalog manager needs a push claim"));
    }
    let jobs = super::machines::host(&s)?.jobs.clone();
    let handle = jobs.start(&p.user_id, "catalog", "push", &[("push", 1)]).await.map_err(ApiError::from_domain)?;
    let job = jobs.get(&handle.id).ok_or_else(|| ApiError::internal("the new job vanished"))?;
    let actor = ctx.actor.clone();
    tokio::spawn(async move {
        handle.step(0, 0.0, "registering the image on the catalog manager");
        let call =
            RemoteCall { op: ManagerOp::Push, method: RemoteMethod::Post, path: "/catalog/push", body: Some(body) };
        match cat.manager_forward(&p, &actor, &id, call).await {
            Ok(f) => handle.complete(f.body.unwrap_or_default()).await,
            Err(e) => handle.fail(e.to_string()).await,
        }
    });
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

/// Import a reference catalog entry into the remote catalog (`PUT /catalog/import` there).
#[utoipa::path(put, path = "/catalog-managers/{id}/catalog/import", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = CatalogImportRequest,
    responses((status = 201, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_import(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(b): Json<CatalogImportRequest>,
) -> R<Manifest> {
    forward(&s, &ctx, &id, ManagerOp::Import, RemoteMethod::Put, "/catalog/import", Some(json_of(&b)?)).await
}

/// Import a raw VM archive into the remote catalog (`PUT /catalog/import-vm` there).
#[utoipa::path(put, path = "/catalog-managers/{id}/catalog/import-vm", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = ImportVmBody,
    responses((status = 200, body = ImportVmResponse), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_import_vm(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    body: Bytes,
) -> R<(StatusCode, axum::Json<ImportVmResponse>)> {
    let b: ImportVmBody = super::catalog::pds_body(&body)?;
    forward(&s, &ctx, &id, ManagerOp::Import, RemoteMethod::Put, "/catalog/import-vm", Some(json_of(&b)?)).await
}

fn with_query(path: String, q: &DeleteQuery) -> String {
    if q.clean_remote { format!("{path}?clean_remote=true") } else { path }
}

/// Delete every version of a catalog id on the remote catalog.
#[utoipa::path(delete, path = "/catalog-managers/{id}/catalog/{catalog_id}", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), DeleteQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_delete_id(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> R<StatusCode> {
    let path = with_query(format!("/catalog/{}", seg(&cid)), &q);
    forward_empty(&s, &ctx, &id, ManagerOp::Delete, RemoteMethod::Delete, &path).await
}

/// Delete every architecture of one version on the remote catalog.
#[utoipa::path(delete, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), DeleteQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_delete_version(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version)): Path<(String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> R<StatusCode> {
    let path = with_query(format!("/catalog/{}/{}", seg(&cid), seg(&version)), &q);
    forward_empty(&s, &ctx, &id, ManagerOp::Delete, RemoteMethod::Delete, &path).await
}

/// Delete one manifest on the remote catalog.
#[utoipa::path(delete, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path), DeleteQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_delete_one(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
    Query(q): Query<DeleteQuery>,
) -> R<StatusCode> {
    let path = with_query(one_path(&cid, &version, &a, ""), &q);
    forward_empty(&s, &ctx, &id, ManagerOp::Delete, RemoteMethod::Delete, &path).await
}

/// The remote catalog's download answer (manifest, image manifest, chunk route), as the local
/// download route answers it: no provider connection or credential, and it needs a pull claim
/// as the local route does.
#[utoipa::path(get, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}/download", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogPullResponse), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_download(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<(StatusCode, axum::Json<CatalogPullResponse>)> {
    let path = one_path(&cid, &version, &a, "/download");
    forward(&s, &ctx, &id, ManagerOp::Pull, RemoteMethod::Get, &path, None).await
}

macro_rules! list_route {
    ($name:ident, $method:ident, $verb:expr, $tail:literal, $body:ty, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path($method, path = concat!("/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}", $tail), tag = "catalog-managers",
            params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
            request_body = $body,
            responses((status = 200, body = CatalogManifest), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
        async fn $name(
            State(s): State<AppState>,
            ctx: RequestContext,
            Path((id, cid, version, a)): Path<(String, String, String, String)>,
            Json(b): Json<$body>,
        ) -> R<Manifest> {
            let path = one_path(&cid, &version, &a, $tail);
            forward(&s, &ctx, &id, ManagerOp::Update, $verb, &path, Some(json_of(&b)?)).await
        }
    };
}

list_route!(
    remote_add_claims,
    patch,
    RemoteMethod::Patch,
    "/claims",
    CatalogClaimsBody,
    "Add required claims on the remote catalog."
);
list_route!(
    remote_remove_claims,
    delete,
    RemoteMethod::Delete,
    "/claims",
    CatalogClaimsBody,
    "Remove required claims on the remote catalog."
);
list_route!(
    remote_add_roles,
    patch,
    RemoteMethod::Patch,
    "/roles",
    CatalogRolesBody,
    "Add required roles on the remote catalog."
);
list_route!(
    remote_remove_roles,
    delete,
    RemoteMethod::Delete,
    "/roles",
    CatalogRolesBody,
    "Remove required roles on the remote catalog."
);
list_route!(remote_add_tags, patch, RemoteMethod::Patch, "/tags", CatalogTagsBody, "Add tags on the remote catalog.");
list_route!(
    remote_remove_tags,
    delete,
    RemoteMethod::Delete,
    "/tags",
    CatalogTagsBody,
    "Remove tags on the remote catalog."
);
list_route!(
    remote_connection,
    patch,
    RemoteMethod::Patch,
    "/connection",
    CatalogConnectionRequest,
    "Replace the provider connection of a manifest on the remote catalog (never answered)."
);
list_route!(
    remote_metadata,
    put,
    RemoteMethod::Put,
    "/metadata",
    CatalogMetadataBody,
    "Change the description, minimum requirements or VM type on the remote catalog."
);

/// The reference's pull through a manager: the image comes from the manager's catalog (with
/// its credentials) through this host's cache into a new VM here, as `PUT /catalog/pull`
/// does with a `connection` (which is refused here: 400).
#[utoipa::path(put, path = "/catalog-managers/{id}/catalog/pull", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = PdsPullRequest,
    responses((status = 200, body = PdsPullResponse), (status = 400, body = ApiErrorBody), (status = 403, body = ApiErrorBody),
        (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn remote_pull(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    body: Bytes,
) -> R<Response> {
    super::catalog::pds_pull(&s, &ctx, &body, Some(id), false).await
}

/// `PUT .../catalog/pull` as a job of this host; the finished job's `result` is the pull answer.
#[utoipa::path(put, path = "/catalog-managers/{id}/catalog/pull/async", tag = "catalog-managers", params(("id" = String, Path)),
    request_body = PdsPullRequest,
    responses((status = 202, body = Job, description = "The job; follow it at /jobs/{id}"), (status = 400, body = ApiErrorBody),
        (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn remote_pull_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    body: Bytes,
) -> R<Response> {
    super::catalog::pds_pull(&s, &ctx, &body, Some(id), true).await
}
