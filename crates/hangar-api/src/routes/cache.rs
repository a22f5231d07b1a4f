//! A host's catalog image cache: `/catalog/cache` and its alias `/cache` (the reference
//! serves both), each also per host through the orchestrator
//! (`/orchestrator/hosts/{id}/catalog/cache...`, `/orchestrator/hosts/{id}/cache...`). One
//! handler serves the local and the per-host form ([`At`]); through the orchestrator the
//! caller must also be allowed on the host (its required roles and claims), and the host is
//! called with the orchestrator's own stored credentials. Deletes answer 202, as the
//! reference does (the VS Code extension expects it).
//!
//! The reference guards its per-host cache routes with the claim `SUPER_USER` (a role name,
//! which no claim list holds: a bug); these take the cache claims, as the local routes do.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use hangar_catalog::{CacheItem, Catalog};
use hangar_core::Access;
use hangar_core::claims::*;
use hangar_wire::cache::{CacheCall, CachedImage, CatalogCacheList};
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::mount::{At, Places};
use crate::routes::machines::orchestrator;
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    let list = Access::AllOf(&[LIST_CACHE]);
    let all = Access::AllOf(&[DELETE_ALL_CACHE]);
    let item = Access::AllOf(&[DELET_CACHE_ITEM]);
    api.add_at(list, Places::Hosts, routes!(cache_list))
        .add_at(all, Places::Hosts, routes!(cache_delete_all))
        .add_at(item, Places::Hosts, routes!(cache_delete_id))
        .add_at(item, Places::Hosts, routes!(cache_delete_version))
        .add_at(list, Places::Hosts, routes!(cache_list_alias))
        .add_at(all, Places::Hosts, routes!(cache_delete_all_alias))
        .add_at(item, Places::Hosts, routes!(cache_delete_id_alias))
        .add_at(item, Places::Hosts, routes!(cache_delete_version_alias))
}

fn catalog(s: &AppState) -> R<&Arc<Catalog>> {
    s.catalog.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The catalog module is not running on this server; add 'catalog' to ENABLED_MODULES",
        )
    })
}

fn cached_image(i: CacheItem) -> CachedImage {
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

async fn list(s: &AppState, ctx: &RequestContext, at: &At) -> R<axum::Json<CatalogCacheList>> {
    if let Some(host) = at.place.host() {
        let l = orchestrator(s)?.host_cache_list(ctx.caller()?, host).await.map_err(ApiError::from_domain)?;
        return Ok(axum::Json(l));
    }
    let items = catalog(s)?.cache_list().await?;
    let total_size = items.iter().map(|i| i.size).sum();
    Ok(axum::Json(CatalogCacheList { total_size, manifests: items.into_iter().map(cached_image).collect() }))
}

async fn delete(s: &AppState, ctx: &RequestContext, at: &At, with_id: bool, with_version: bool) -> R<StatusCode> {
    let id = if with_id { Some(at.param("catalog_id")?.to_string()) } else { None };
    let version = if with_version { Some(at.param("version")?.to_string()) } else { None };
    if let Some(host) = at.place.host() {
        let call = CacheCall::Delete { catalog_id: id, version };
        orchestrator(s)?
            .host_cache_delete(ctx.caller()?, &ctx.actor, host, &call)
            .await
            .map_err(ApiError::from_domain)?;
    } else {
        catalog(s)?.cache_delete(&ctx.actor, id.as_deref(), version.as_deref()).await?;
    }
    Ok(StatusCode::ACCEPTED)
}

/// The images in this host's catalog cache.
#[utoipa::path(get, path = "/catalog/cache", tag = "catalog-cache", responses((status = 200, body = CatalogCacheList)))]
async fn cache_list(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<CatalogCacheList>> {
    list(&s, &ctx, &at).await
}

/// Empty this host's catalog cache.
#[utoipa::path(delete, path = "/catalog/cache", tag = "catalog-cache", responses((status = 202)))]
async fn cache_delete_all(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    delete(&s, &ctx, &at, false, false).await
}

/// Remove every cached version of a catalog id.
#[utoipa::path(delete, path = "/catalog/cache/{catalog_id}", tag = "catalog-cache", params(("catalog_id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn cache_delete_id(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    delete(&s, &ctx, &at, true, false).await
}

/// Remove one cached version.
#[utoipa::path(delete, path = "/catalog/cache/{catalog_id}/{version}", tag = "catalog-cache",
    params(("catalog_id" = String, Path), ("version" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn cache_delete_version(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    delete(&s, &ctx, &at, true, true).await
}

/// The images in this host's catalog cache (the reference's `/cache` alias).
#[utoipa::path(get, path = "/cache", tag = "catalog-cache", responses((status = 200, body = CatalogCacheList)))]
async fn cache_list_alias(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<CatalogCacheList>> {
    list(&s, &ctx, &at).await
}

/// Empty this host's catalog cache (the reference's `/cache` alias).
#[utoipa::path(delete, path = "/cache", tag = "catalog-cache", responses((status = 202)))]
async fn cache_delete_all_alias(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    delete(&s, &ctx, &at, false, false).await
}

/// Remove every cached version of a catalog id (the reference's `/cache` alias).
#[utoipa::path(delete, path = "/cache/{catalog_id}", tag = "catalog-cache", params(("catalog_id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn cache_delete_id_alias(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    delete(&s, &ctx, &at, true, false).await
}

/// Remove one cached version (the reference's `/cache` alias).
#[utoipa::path(delete, path = "/cache/{catalog_id}/{version}", tag = "catalog-cache",
    params(("catalog_id" = String, Path), ("version" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn cache_delete_version_alias(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    delete(&s, &ctx, &at, true, true).await
}
