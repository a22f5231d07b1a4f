//! `/orchestrator/...`: the orchestrator module (reference §1.6 and §6). Hosts are
//! registered with their URL and credentials (credentials are stored sealed and never
//! answered), VMs are placed on the fleet and their operations forwarded to the owning
//! host.
//!
//! The operations on one VM are the host's routes mounted here too (`routes::machines`);
//! the orchestrator's facade (`hangar_orchestrator::service`) checks the caller (the VM's
//! host's required roles and claims, and the same VM rule as the host) before it forwards
//! with its own credentials.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hangar_core::claims::*;
use hangar_core::{Access, VmAction};
use hangar_host::Job;
use hangar_orchestrator::{HostView, HttpOrchestrator, OrchestratedVm, RegisterHost, UpdateHost};
use hangar_wire::{
    CpuTypeResources, EnrollmentTokenCheck, EnrollmentTokenIssued, EnrollmentTokenRequest, ExtendRequest,
    HardwareResponse, HostResourcesOverview, OrchestratorCreateRequest, OrchestratorCreated,
};
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path};
use crate::mount::At;
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

const LIST_HOSTS: Access = Access::AllOf(&[LIST_ORCHESTRATOR_HOSTS]);
const MANAGE_HOSTS: Access = Access::AllOf(&[MANAGE_ORCHESTRATOR_HOSTS]);

pub fn register(api: Api) -> Api {
    api.add(LIST_HOSTS, routes!(list_hosts))
        .add(MANAGE_HOSTS, routes!(register_host))
        .add(Access::Public, routes!(join_host))
        .add(LIST_HOSTS, routes!(get_host))
        .add(MANAGE_HOSTS, routes!(update_host))
        .add(MANAGE_HOSTS, routes!(delete_host))
        .add(MANAGE_HOSTS, routes!(enable_host))
        .add(MANAGE_HOSTS, routes!(disable_host))
        .add(LIST_HOSTS, routes!(host_hardware))
        .add(MANAGE_HOSTS, routes!(create_token))
        .add(Access::Public, routes!(validate_token))
        .add(LIST_HOSTS, routes!(overview_resources))
        .add(LIST_HOSTS, routes!(overview_host_resources))
        .add_with_host(VmAction::Create.access(), routes!(create_machine))
        .add_with_host(VmAction::Create.access(), routes!(create_machine_async))
        .add(VmAction::Extend.access(), routes!(extend))
}

fn module(s: &AppState) -> R<&Arc<HttpOrchestrator>> {
    s.orchestrator.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The orchestrator module is not running on this server; see GET /health/system",
        )
    })
}

// ----- hosts ---------------------------------------------------------------------------

#[utoipa::path(get, path = "/orchestrator/hosts", tag = "orchestrator", responses((status = 200, body = Vec<HostView>)))]
async fn list_hosts(State(s): State<AppState>) -> R<axum::Json<Vec<HostView>>> {
    Ok(axum::Json(module(&s)?.hosts()))
}

/// Register a host: `{host|url, name, description, tags, authentication: {username, password} | {api_key}, required_roles, required_claims}`.
///
/// Needs MANAGE_ORCHESTRATOR_HOSTS, or (as in the reference) no credential but a valid
/// single-use `X-Enrollment-Token` header: the host then joins with the token's name and
/// the token is used up in the same write. A bad, used or expired token answers 401.
#[utoipa::path(post, path = "/orchestrator/hosts", tag = "orchestrator", request_body = RegisterHost,
    params(("X-Enrollment-Token" = Option<String>, Header, description = "An enrollment token, instead of a user credential")),
    responses((status = 201, body = HostView), (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn register_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<RegisterHost>,
) -> R<(StatusCode, axum::Json<HostView>)> {
    let o = module(&s)?;
    let h = match (&ctx.principal, &ctx.enrollment_token) {
        (Some(_), _) => o.register_host(&ctx.actor, req).await,
        // Let through by the enrollment-token rule: the token is checked and consumed here.
        (None, Some(token)) => o.join_host(token, req).await,
        (None, None) => return Err(ApiError::unauthorized("Authentication required")),
    }
    .map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(h)))
}

/// A host joins with a single-use enrollment token in `X-Enrollment-Token`, without a
/// user login. The body is the same as for `POST /orchestrator/hosts`.
#[utoipa::path(post, path = "/orchestrator/hosts/join", tag = "orchestrator", request_body = RegisterHost,
    params(("X-Enrollment-Token" = String, Header, description = "The enrollment token")),
    responses((status = 201, body = HostView), (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody)))]
async fn join_host(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<RegisterHost>,
) -> R<(StatusCode, axum::Json<HostView>)> {
    let o = module(&s)?;
    let token = headers
        .get("x-enrollment-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("Send the enrollment token in the X-Enrollment-Token header"))?;
    let h = o.join_host(token, req).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(h)))
}

#[utoipa::path(get, path = "/orchestrator/hosts/{id}", tag = "orchestrator", params(("id" = String, Path, description = "Host id or name")),
    responses((status = 200, body = HostView), (status = 404, body = ApiErrorBody)))]
async fn get_host(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<HostView>> {
    Ok(axum::Json(module(&s)?.host(&id).map_err(ApiError::from_domain)?))
}

/// Change a host: the fields given replace the old ones (`host` is accepted for `url`,
/// `authentication` for `credentials`).
#[utoipa::path(put, path = "/orchestrator/hosts/{id}", tag = "orchestrator", params(("id" = String, Path)), request_body = UpdateHost,
    responses((status = 200, body = HostView), (status = 404, body = ApiErrorBody)))]
async fn update_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(change): Json<UpdateHost>,
) -> R<axum::Json<HostView>> {
    let h = module(&s)?.update_host(&ctx.actor, &id, change).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(h))
}

#[utoipa::path(delete, path = "/orchestrator/hosts/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_host(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    module(&s)?.delete_host(&ctx.actor, &id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

async fn set_enabled(s: &AppState, ctx: &RequestContext, id: &str, enabled: bool) -> R<axum::Json<HostView>> {
    let h = module(s)?.set_host_enabled(&ctx.actor, id, enabled).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(h))
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}/enable", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ApiErrorBody)))]
async fn enable_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<HostView>> {
    set_enabled(&s, &ctx, &id, true).await
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}/disable", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ApiErrorBody)))]
async fn disable_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<HostView>> {
    set_enabled(&s, &ctx, &id, false).await
}

/// The host's own `/config/hardware` answer, read from the host now (what the Terraform
/// provider reads).
#[utoipa::path(get, path = "/orchestrator/hosts/{id}/hardware", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = HardwareResponse), (status = 404, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn host_hardware(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<HardwareResponse>> {
    Ok(axum::Json(module(&s)?.host_hardware(&id).await.map_err(ApiError::from_domain)?))
}

/// A single-use enrollment token; the token itself is answered only here.
#[utoipa::path(post, path = "/orchestrator/enrollment-token", tag = "orchestrator", request_body = EnrollmentTokenRequest,
    responses((status = 201, body = EnrollmentTokenIssued), (status = 400, body = ApiErrorBody)))]
async fn create_token(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<EnrollmentTokenRequest>,
) -> R<(StatusCode, axum::Json<EnrollmentTokenIssued>)> {
    let issued = module(&s)?.create_enrollment_token(&ctx.actor, &req).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(issued)))
}

/// Whether an enrollment token is valid now (it is not used up by the check).
#[utoipa::path(get, path = "/orchestrator/enrollment-token/{token}/validate", tag = "orchestrator", params(("token" = String, Path)),
    responses((status = 200, body = EnrollmentTokenCheck)))]
async fn validate_token(State(s): State<AppState>, Path(token): Path<String>) -> R<axum::Json<EnrollmentTokenCheck>> {
    Ok(axum::Json(module(&s)?.check_enrollment_token(&token).await))
}

/// Resources summed across hosts per CPU type (the reference's list of system usages),
/// each entry with its host ids.
#[utoipa::path(get, path = "/orchestrator/overview/resources", tag = "orchestrator", responses((status = 200, body = Vec<CpuTypeResources>)))]
async fn overview_resources(State(s): State<AppState>) -> R<axum::Json<Vec<CpuTypeResources>>> {
    Ok(axum::Json(module(&s)?.resource_overview()))
}

/// One host's resources, as the orchestrator last saw them.
#[utoipa::path(get, path = "/orchestrator/overview/{id}/resources", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = HostResourcesOverview), (status = 404, body = ApiErrorBody)))]
async fn overview_host_resources(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> R<axum::Json<HostResourcesOverview>> {
    Ok(axum::Json(module(&s)?.host_resources(&id).map_err(ApiError::from_domain)?))
}

// ----- machines ------------------------------------------------------------------------
//
// The operations on one VM are mounted here by `routes::machines` (one handler for the
// host and the orchestrator paths). What only the orchestrator does stays here: creating
// somewhere in the fleet (or on one named host) and extending a VM's lifetime.

/// Create a VM on the host placement chooses (or, at `/orchestrator/hosts/{id}/machines`,
/// on that host: no placement, but its capacity is still reserved, so a full host answers
/// 503 or the request waits with `queue`). 503 with the per-group reasons when no host can
/// take it.
#[utoipa::path(post, path = "/orchestrator/machines", tag = "orchestrator", request_body = OrchestratorCreateRequest,
    responses((status = 200, body = OrchestratorCreated), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody, description = "No host can take the VM")))]
async fn create_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<axum::Json<OrchestratorCreated>> {
    let created =
        module(&s)?.create(ctx.caller()?, &ctx.actor, at.place.host(), &req).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(created))
}

/// Create a VM in the background: answers 202 with a job at once; follow it at
/// `/orchestrator/jobs/{id}` or on the websocket (`job_manager` events). Its message goes
/// `queued` → `placing` → `creating on host X` → `done`, or the job fails with the reason.
#[utoipa::path(post, path = "/orchestrator/machines/async", tag = "orchestrator", request_body = OrchestratorCreateRequest,
    responses((status = 202, body = Job, description = "The job; follow it at /orchestrator/jobs/{id}"), (status = 400, body = ApiErrorBody)))]
async fn create_machine_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<(StatusCode, axum::Json<Job>)> {
    let job = module(&s)?
        .create_async(ctx.caller()?, &ctx.actor, at.place.host(), req)
        .await
        .map_err(ApiError::from_domain)?;
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

/// Push a VM's expiry back.
#[utoipa::path(put, path = "/orchestrator/machines/{id}/extend", tag = "orchestrator", params(("id" = String, Path)), request_body = ExtendRequest,
    responses((status = 200, body = OrchestratedVm), (status = 404, body = ApiErrorBody)))]
async fn extend(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<ExtendRequest>,
) -> R<axum::Json<OrchestratedVm>> {
    let vm = module(&s)?
        .extend(ctx.caller()?, &ctx.actor, &id, Duration::from_secs(req.ttl_seconds))
        .await
        .map_err(ApiError::from_domain)?;
    Ok(axum::Json(vm))
}
