//! `/user/configs`: per-user key/value settings (reference §1.2). Any authenticated caller
//! keeps its own; `hangar_identity::user_configs` decides, checks types and audits.

use axum::extract::State;
use axum::http::StatusCode;
use hangar_core::Access;
use hangar_identity::{NewUserConfig, UserConfig, UserConfigUpdate, Written};
use hangar_wire::events::{UserConfigRequest, UserConfigResponse, UserConfigUpdateRequest};
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    api.add(Access::Authenticated, routes!(list_configs, create_config))
        .add(Access::Authenticated, routes!(get_config, update_config, delete_config))
}

fn view(c: UserConfig) -> UserConfigResponse {
    UserConfigResponse {
        id: c.id,
        user_id: c.user_id,
        slug: c.slug,
        name: c.name,
        kind: c.kind.as_str().to_string(),
        value: c.value,
        created_at: Some(c.created_at.to_rfc3339()),
        updated_at: Some(c.updated_at.to_rfc3339()),
    }
}

fn status(w: Written) -> StatusCode {
    match w {
        Written::Created => StatusCode::CREATED,
        Written::Updated => StatusCode::OK,
    }
}

/// The caller's configs.
#[utoipa::path(get, path = "/user/configs", tag = "user_configs", responses((status = 200, body = Vec<UserConfigResponse>)))]
async fn list_configs(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<Vec<UserConfigResponse>>> {
    Ok(axum::Json(s.identity.list_user_configs(ctx.caller()?).await?.into_iter().map(view).collect()))
}

/// Create a config, or replace the caller's config with the same slug (200 then). The value
/// must be of the config's type (`bool`: true or false, `int`, `json`).
#[utoipa::path(post, path = "/user/configs", tag = "user_configs", request_body = UserConfigRequest,
    responses((status = 201, body = UserConfigResponse), (status = 200, description = "Replaced the config with this slug", body = UserConfigResponse), (status = 400, body = ApiErrorBody)))]
async fn create_config(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<UserConfigRequest>,
) -> R<(StatusCode, axum::Json<UserConfigResponse>)> {
    let input = NewUserConfig { slug: req.slug, name: req.name, kind: req.kind, value: req.value };
    let (c, w) = s.identity.put_user_config(ctx.caller()?, &ctx.actor, input).await?;
    Ok((status(w), axum::Json(view(c))))
}

/// One of the caller's configs, by id or slug.
#[utoipa::path(get, path = "/user/configs/{id}", tag = "user_configs", params(("id" = String, Path, description = "Config id or slug")),
    responses((status = 200, body = UserConfigResponse), (status = 404, body = ApiErrorBody)))]
async fn get_config(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<UserConfigResponse>> {
    Ok(axum::Json(view(s.identity.get_user_config(ctx.caller()?, &id).await?)))
}

/// Change one of the caller's configs (only the fields given); an unknown slug creates it (201).
#[utoipa::path(put, path = "/user/configs/{id}", tag = "user_configs", params(("id" = String, Path, description = "Config id or slug")),
    request_body = UserConfigUpdateRequest,
    responses((status = 200, body = UserConfigResponse), (status = 201, description = "Created under this slug", body = UserConfigResponse), (status = 400, body = ApiErrorBody)))]
async fn update_config(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<UserConfigUpdateRequest>,
) -> R<(StatusCode, axum::Json<UserConfigResponse>)> {
    let upd = UserConfigUpdate { name: req.name, kind: req.kind, value: req.value };
    let (c, w) = s.identity.update_user_config(ctx.caller()?, &ctx.actor, &id, upd).await?;
    Ok((status(w), axum::Json(view(c))))
}

/// Delete one of the caller's configs.
#[utoipa::path(delete, path = "/user/configs/{id}", tag = "user_configs", params(("id" = String, Path, description = "Config id or slug")),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_config(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    s.identity.delete_user_config(ctx.caller()?, &ctx.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}
