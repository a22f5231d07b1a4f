//! `/catalog-managers/...`: per-user remote catalogs (reference §1.5). CRUD, and the read
//! routes of the remote catalog (`/catalog-managers/{id}/catalog[/{id}[/{version}[/{arch}]]]`)
//! and its taint/untaint forwarded with the manager's own credentials (never the caller's identity).
//! `hangar_catalog::managers` decides access, seals the credentials and audits.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use hangar_catalog::{Catalog, CatalogManagerInput, CatalogManagerView};
use hangar_core::Access;
use hangar_core::claims::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;

use super::catalog::CatalogManifest;
use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

const LIST: Access = Access::AnyOf(&[CATALOG_MANAGER_LIST, CATALOG_MANAGER_LIST_OWN]);
const CREATE: Access = Access::AnyOf(&[CATALOG_MANAGER_CREATE, CATALOG_MANAGER_CREATE_OWN]);
const UPDATE: Access = Access::AnyOf(&[CATALOG_MANAGER_UPDATE, CATALOG_MANAGER_UPDATE_OWN]);
const DELETE: Access = Access::AnyOf(&[CATALOG_MANAGER_DELETE, CATALOG_MANAGER_DELETE_OWN]);
const REMOTE_UPDATE: Access = Access::AnyOf(&[UPDATE_CATALOG_MANIFEST, CATALOG_MANAGER_UPDATE_CATALOG_MANIFEST_OWN]);
const REMOTE_LIST: Access = Access::AnyOf(&[LIST_CATALOG_MANIFEST, CATALOG_MANAGER_LIST_CATALOG_MANIFEST_OWN]);

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

async fn remote_patch(s: &AppState, ctx: &RequestContext, id: &str, path: &str) -> R<CatalogManifest> {
    let v = catalog(s)?.manager_patch_json(ctx.caller()?, &ctx.actor, id, path).await?;
    serde_json::from_value(v).map_err(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("catalog manager {id}: the catalog server's answer: {e}"))
    })
}

/// Taint a version on the remote catalog (as the manager's user there).
#[utoipa::path(patch, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}/taint", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_taint(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<axum::Json<CatalogManifest>> {
    let path = format!("/catalog/{}/{}/{}/taint", seg(&cid), seg(&version), seg(&a));
    Ok(axum::Json(remote_patch(&s, &ctx, &id, &path).await?))
}

/// Untaint a version on the remote catalog (as the manager's user there).
#[utoipa::path(patch, path = "/catalog-managers/{id}/catalog/{catalog_id}/{version}/{architecture}/untaint", tag = "catalog-managers",
    params(("id" = String, Path), ("catalog_id" = String, Path), ("version" = String, Path), ("architecture" = String, Path)),
    responses((status = 200, body = CatalogManifest), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn remote_untaint(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, cid, version, a)): Path<(String, String, String, String)>,
) -> R<axum::Json<CatalogManifest>> {
    let path = format!("/catalog/{}/{}/{}/untaint", seg(&cid), seg(&version), seg(&a));
    Ok(axum::Json(remote_patch(&s, &ctx, &id, &path).await?))
}
