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
use hangar_orchestrator::{Host, HttpOrchestrator, RegisterHost, ResourceSet, UpdateHost};
use hangar_wire::{ExtendRequest, OrchestratorCreateRequest, OrchestratorCreated};
use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
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

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> R<T> {
    serde_json::from_value(v).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("Bad {what}: {e}")))
}

fn host_view(h: &Host) -> Value {
    // `Host` holds no credentials; `has_credentials` says whether some are stored.
    let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        // The reference names the URL `host`.
        o.insert("host".into(), json!(h.url));
    }
    v
}

// ----- hosts ---------------------------------------------------------------------------

#[utoipa::path(get, path = "/orchestrator/hosts", tag = "orchestrator", responses((status = 200, body = Vec<Object>)))]
async fn list_hosts(State(s): State<AppState>) -> R<axum::Json<Vec<Value>>> {
    Ok(axum::Json(module(&s)?.scheduler.registry().list().iter().map(host_view).collect()))
}

/// Register a host: `{host|url, name, description, tags, authentication: {username, password} | {api_key}, required_roles, required_claims}`.
///
/// Needs MANAGE_ORCHESTRATOR_HOSTS, or (as in the reference) no credential but a valid
/// single-use `X-Enrollment-Token` header: the host then joins with the token's name and
/// the token is used up in the same write. A bad, used or expired token answers 401.
#[utoipa::path(post, path = "/orchestrator/hosts", tag = "orchestrator", request_body = Object,
    params(("X-Enrollment-Token" = Option<String>, Header, description = "An enrollment token, instead of a user credential")),
    responses((status = 201, body = Object), (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn register_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(body): Json<Value>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let o = module(&s)?;
    let req = register_body(body)?;
    let h = match (&ctx.principal, &ctx.enrollment_token) {
        (Some(_), _) => o.scheduler.register_host(&ctx.actor, req).await,
        // Let through by the enrollment-token rule: the token is checked and consumed here.
        (None, Some(token)) => o.scheduler.join_with_token(token, req).await,
        (None, None) => return Err(ApiError::unauthorized("Authentication required")),
    }
    .map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(host_view(&h))))
}

/// The reference names the URL `host`; accept both.
fn register_body(mut body: Value) -> R<RegisterHost> {
    if let Some(o) = body.as_object_mut()
        && !o.contains_key("url")
        && let Some(h) = o.remove("host")
    {
        o.insert("url".into(), h);
    }
    parse(body, "host registration")
}

/// A host joins with a single-use enrollment token in `X-Enrollment-Token`, without a
/// user login. The body is the same as for `POST /orchestrator/hosts`.
#[utoipa::path(post, path = "/orchestrator/hosts/join", tag = "orchestrator", request_body = Object,
    params(("X-Enrollment-Token" = String, Header, description = "The enrollment token")),
    responses((status = 201, body = Object), (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody)))]
async fn join_host(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let o = module(&s)?;
    let token = headers
        .get("x-enrollment-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("Send the enrollment token in the X-Enrollment-Token header"))?;
    let req = register_body(body)?;
    let h = o.scheduler.join_with_token(token, req).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(host_view(&h))))
}

#[utoipa::path(get, path = "/orchestrator/hosts/{id}", tag = "orchestrator", params(("id" = String, Path, description = "Host id or name")),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn get_host(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Value>> {
    let h = module(&s)?.scheduler.registry().get(&id).map_err(ApiError::from_domain)?;
    Ok(axum::Json(host_view(&h)))
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}", tag = "orchestrator", params(("id" = String, Path)), request_body = Object,
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn update_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(mut body): Json<Value>,
) -> R<axum::Json<Value>> {
    let o = module(&s)?;
    if let Some(m) = body.as_object_mut()
        && !m.contains_key("url")
        && let Some(h) = m.remove("host")
    {
        m.insert("url".into(), h);
    }
    let change: UpdateHost = parse(body, "host update")?;
    let host = o.scheduler.registry().get(&id).map_err(ApiError::from_domain)?;
    let h = o.scheduler.update_host(&ctx.actor, &host.id, change).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(host_view(&h)))
}

#[utoipa::path(delete, path = "/orchestrator/hosts/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_host(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let o = module(&s)?;
    let host = o.scheduler.registry().get(&id).map_err(ApiError::from_domain)?;
    o.scheduler.delete_host(&ctx.actor, &host.id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

async fn set_enabled(s: &AppState, ctx: &RequestContext, id: &str, enabled: bool) -> R<axum::Json<Value>> {
    let o = module(s)?;
    let host = o.scheduler.registry().get(id).map_err(ApiError::from_domain)?;
    let h = o.scheduler.set_host_enabled(&ctx.actor, &host.id, enabled).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(host_view(&h)))
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}/enable", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn enable_host(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<Value>> {
    set_enabled(&s, &ctx, &id, true).await
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}/disable", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn disable_host(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<Value>> {
    set_enabled(&s, &ctx, &id, false).await
}

/// The host's own `/config/hardware` answer, read from the host now (what the Terraform
/// provider reads).
#[utoipa::path(get, path = "/orchestrator/hosts/{id}/hardware", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn host_hardware(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Value>> {
    let o = module(&s)?;
    let host = o.scheduler.registry().get(&id).map_err(ApiError::from_domain)?;
    let client = o.host_client(&host.id).map_err(ApiError::from_domain)?;
    let hw =
        client.request(Method::GET, "/config/hardware", None, Duration::from_secs(30)).await.map_err(|source| {
            ApiError::from_domain(hangar_orchestrator::OrchestratorError::Host { host: host.id.clone(), source })
        })?;
    Ok(axum::Json(hw))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// Name the joining host gets.
    pub host_name: String,
    /// Lifetime in minutes (the reference's field; default 15).
    pub ttl_minutes: Option<u64>,
    /// Lifetime in seconds (takes precedence over `ttl_minutes`).
    pub ttl_seconds: Option<u64>,
}

/// A single-use enrollment token; the token itself is answered only here.
#[utoipa::path(post, path = "/orchestrator/enrollment-token", tag = "orchestrator", request_body = TokenRequest,
    responses((status = 201, body = Object), (status = 400, body = ApiErrorBody)))]
async fn create_token(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<TokenRequest>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let o = module(&s)?;
    let issued = o
        .scheduler
        .registry()
        .create_enrollment_token(
            &ctx.actor,
            &req.host_name,
            req.ttl_seconds.or(req.ttl_minutes.map(|m| m.saturating_mul(60))).map(Duration::from_secs),
        )
        .await
        .map_err(ApiError::from_domain)?;
    let info = issued.info;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"token": issued.token, "id": info.id, "host_name": info.host_name,
            "created_at": info.created_at, "expires_at": info.expires_at})),
    ))
}

fn usage(r: ResourceSet) -> Value {
    json!({"logical_cpu_count": r.cpu, "memory_size": r.memory_mb as f64, "disk_size": r.disk_mb as f64})
}

/// Whether an enrollment token is valid now (it is not used up by the check).
#[utoipa::path(get, path = "/orchestrator/enrollment-token/{token}/validate", tag = "orchestrator", params(("token" = String, Path)),
    responses((status = 200, body = Object)))]
async fn validate_token(State(s): State<AppState>, Path(token): Path<String>) -> R<axum::Json<Value>> {
    let o = module(&s)?;
    Ok(axum::Json(match o.scheduler.registry().validate_enrollment_token(&token).await {
        Ok(info) => json!({"valid": true, "host_name": info.host_name, "expires_at": info.expires_at}),
        Err(_) => json!({"valid": false}),
    }))
}

/// Resources summed across hosts per CPU type (the reference's list of system usages),
/// each entry with its host ids.
#[utoipa::path(get, path = "/orchestrator/overview/resources", tag = "orchestrator", responses((status = 200, body = Vec<Object>)))]
async fn overview_resources(State(s): State<AppState>) -> R<axum::Json<Vec<Value>>> {
    let o = module(&s)?;
    let mut groups: std::collections::BTreeMap<String, ([ResourceSet; 4], Vec<String>)> = Default::default();
    for h in o.scheduler.registry().list() {
        let Some(r) = &h.resources else { continue };
        let arch = h.architecture.clone().unwrap_or_else(|| "unknown".into());
        let (sum, ids) = groups.entry(arch).or_default();
        for (acc, v) in sum.iter_mut().zip([r.total, r.system_reserved, r.in_use, r.available]) {
            *acc = acc.saturating_add(v);
        }
        ids.push(h.id.clone());
    }
    Ok(axum::Json(
        groups
            .into_iter()
            .map(|(cpu_type, ([total, reserved, in_use, available], host_ids))| {
                json!({
                    "cpu_type": cpu_type, "total": usage(total), "system_reserved": usage(reserved),
                    "total_in_use": usage(in_use), "total_reserved": usage(reserved.saturating_add(in_use)),
                    "total_available": usage(available), "hosts": host_ids,
                })
            })
            .collect(),
    ))
}

/// One host's resources, as the orchestrator last saw them.
#[utoipa::path(get, path = "/orchestrator/overview/{id}/resources", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn overview_host_resources(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Value>> {
    let h = module(&s)?.scheduler.registry().get(&id).map_err(ApiError::from_domain)?;
    let r = h.resources.unwrap_or_default();
    Ok(axum::Json(json!({
        "host_id": h.id, "cpu_type": h.architecture, "state": h.state,
        "total": usage(r.total), "system_reserved": usage(r.system_reserved), "total_in_use": usage(r.in_use),
        "total_reserved": usage(r.system_reserved.saturating_add(r.in_use)), "total_available": usage(r.available),
    })))
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
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn extend(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<ExtendRequest>,
) -> R<axum::Json<Value>> {
    let vm = module(&s)?
        .extend(ctx.caller()?, &ctx.actor, &id, Duration::from_secs(req.ttl_seconds))
        .await
        .map_err(ApiError::from_domain)?;
    Ok(axum::Json(serde_json::to_value(vm).unwrap_or(Value::Null)))
}
