//! `/runner-pools`: runner pools and their warm VMs (the orchestrator's
//! `hangar_orchestrator::pools`). Reading needs RUNNER_POOLS_READ, changing
//! RUNNER_POOLS_WRITE; a claim is `POST /orchestrator/machines` with `pool` (the create
//! rule applies).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use hangar_core::Access;
use hangar_core::claims::{RUNNER_POOLS_READ, RUNNER_POOLS_WRITE};
use hangar_orchestrator::HttpOrchestrator;
use hangar_wire::{RunnerPool, RunnerPoolView};
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

const READ: Access = Access::AllOf(&[RUNNER_POOLS_READ]);
const WRITE: Access = Access::AllOf(&[RUNNER_POOLS_WRITE]);

pub fn register(api: Api) -> Api {
    api.add(READ, routes!(list_pools))
        .add(WRITE, routes!(create_pool))
        .add(READ, routes!(get_pool))
        .add(WRITE, routes!(update_pool))
        .add(WRITE, routes!(delete_pool))
}

fn module(s: &AppState) -> R<&Arc<HttpOrchestrator>> {
    s.orchestrator.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Runner pools need the orchestrator module, which is not running on this server; see GET /health/system",
        )
    })
}

/// Every runner pool with its warm VMs counted.
#[utoipa::path(get, path = "/runner-pools", tag = "runner-pools", responses((status = 200, body = Vec<RunnerPoolView>)))]
async fn list_pools(State(s): State<AppState>) -> R<axum::Json<Vec<RunnerPoolView>>> {
    Ok(axum::Json(module(&s)?.runner_pools().await.map_err(ApiError::from_domain)?))
}

/// Create a runner pool; its warm VMs start at once (on the leader).
#[utoipa::path(post, path = "/runner-pools", tag = "runner-pools", request_body = RunnerPool,
    responses((status = 201, body = RunnerPoolView), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn create_pool(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(pool): Json<RunnerPool>,
) -> R<(StatusCode, axum::Json<RunnerPoolView>)> {
    let v = module(&s)?.create_runner_pool(&ctx.actor, pool).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(v)))
}

/// One runner pool with its status.
#[utoipa::path(get, path = "/runner-pools/{name}", tag = "runner-pools", params(("name" = String, Path)),
    responses((status = 200, body = RunnerPoolView), (status = 404, body = ApiErrorBody)))]
async fn get_pool(State(s): State<AppState>, Path(name): Path<String>) -> R<axum::Json<RunnerPoolView>> {
    Ok(axum::Json(module(&s)?.runner_pool(&name).await.map_err(ApiError::from_domain)?))
}

/// Replace a runner pool (same name). Its warm VMs are recycled: made again to the new
/// definition.
#[utoipa::path(put, path = "/runner-pools/{name}", tag = "runner-pools", params(("name" = String, Path)), request_body = RunnerPool,
    responses((status = 200, body = RunnerPoolView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody)))]
async fn update_pool(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(name): Path<String>,
    Json(pool): Json<RunnerPool>,
) -> R<axum::Json<RunnerPoolView>> {
    let v = module(&s)?.update_runner_pool(&ctx.actor, &name, pool).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(v))
}

/// Delete a runner pool: its warm VMs are deleted; VMs claimed from it stay with their users.
#[utoipa::path(delete, path = "/runner-pools/{name}", tag = "runner-pools", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiErrorBody)))]
async fn delete_pool(State(s): State<AppState>, ctx: RequestContext, Path(name): Path<String>) -> R<StatusCode> {
    module(&s)?.delete_runner_pool(&ctx.actor, &name).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::NO_CONTENT)
}
