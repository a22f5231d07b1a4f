//! `/orchestrator/...`: the orchestrator module (reference §1.6 and §6). Hosts are
//! registered with their URL and credentials (credentials are stored sealed and never
//! answered), VMs are placed on the fleet and their operations forwarded to the owning
//! host.
//!
//! Forwarded operations keep the caller's authority: each route declares the same VM
//! claim the host route needs, and the handler checks that the caller may use the VM's
//! host (its required roles and claims) before forwarding with the orchestrator's own
//! credentials.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hangar_core::Access;
use hangar_core::Principal;
use hangar_core::claims::*;
use hangar_host::{Job, Jobs};
use hangar_hypervisor::PowerOp;
use hangar_orchestrator::scheduler::CreateProgress;
use hangar_orchestrator::{
    Caller, CreateVm, Host, HttpOrchestrator, OrchestratorError, Os, RegisterHost, ResourceSet, UpdateHost,
};
use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::routes;

use super::machines::num;
use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path, Query};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

const LIST_HOSTS: Access = Access::AllOf(&[LIST_ORCHESTRATOR_HOSTS]);
const MANAGE_HOSTS: Access = Access::AllOf(&[MANAGE_ORCHESTRATOR_HOSTS]);
const JOBS: Access = Access::AnyOf(&[JOB_MANAGER_LIST, JOB_MANAGER_LIST_OWN]);

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
        .add(Access::AllOf(&[LIST_VM]), routes!(list_machines))
        .add(Access::AllOf(&[CREATE_VM]), routes!(create_machine))
        .add(Access::AllOf(&[CREATE_VM]), routes!(create_machine_async))
        .add(JOBS, routes!(list_jobs))
        .add(JOBS, routes!(get_job))
        .add(Access::AnyOf(&[JOB_MANAGER_DELETE, JOB_MANAGER_LIST_OWN]), routes!(delete_job))
        .add(Access::AllOf(&[LIST_VM]), routes!(get_machine))
        .add(Access::AllOf(&[DELETE_VM]), routes!(delete_machine))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(start))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(stop))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(kill))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(restart))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(pause))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(resume))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(suspend))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(reset))
        .add(Access::AllOf(&[LIST_VM]), routes!(machine_status))
        .add(LIST_HOSTS, routes!(overview_host_resources))
        .add(Access::AllOf(&[EXECUTE_COMMAND_VM]), routes!(execute))
        .add(Access::AllOf(&[UPDATE_VM]), routes!(extend))
        .add(Access::AllOf(&[UPDATE_VM]), routes!(rename))
        .add(Access::AllOf(&[CREATE_VM]), routes!(clone_machine))
        .add(Access::AnyOf(&[LIST_SNAPSHOT_VM, LIST_OWN_VM_SNAPSHOT]), routes!(list_snapshots))
        .add(Access::AnyOf(&[CREATE_SNAPSHOT_VM, CREATE_OWN_VM_SNAPSHOT]), routes!(create_snapshot))
        .add(Access::AnyOf(&[DELETE_SNAPSHOT_VM, DELETE_OWN_VM_SNAPSHOT]), routes!(delete_snapshot))
        .add(Access::AnyOf(&[DELETE_ALL_SNAPSHOTS_VM, DELETE_ALL_OWN_VM_SNAPSHOTS]), routes!(delete_all_snapshots))
        .add(Access::AnyOf(&[REVERT_SNAPSHOT_VM, REVERT_OWN_VM_SNAPSHOT]), routes!(revert_snapshot))
        .add(Access::AllOf(&[LIST_VM]), routes!(host_list_machines))
        .add(Access::AllOf(&[CREATE_VM]), routes!(host_create_machine))
        .add(Access::AllOf(&[CREATE_VM]), routes!(host_create_machine_async))
        .add(Access::AllOf(&[LIST_VM]), routes!(host_get_machine))
        .add(Access::AllOf(&[DELETE_VM]), routes!(host_delete_machine))
        .add(Access::AllOf(&[LIST_VM]), routes!(host_machine_status))
        .add(Access::AllOf(&[EXECUTE_COMMAND_VM]), routes!(host_execute))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_start))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_stop))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_kill))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_restart))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_pause))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_resume))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_suspend))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(host_reset))
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

/// Whether the caller may use `host` (its required roles and claims).
fn check_host_access(p: &Principal, host: &Host) -> R<()> {
    if Caller::from(p).may_use(host) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("Host {} needs roles or claims this caller does not hold", host.name)))
    }
}

/// The host of a VM, after checking the caller may use it.
async fn vm_host(o: &HttpOrchestrator, p: &Principal, vm_id: &str) -> R<Host> {
    let host_id = o.scheduler.host_of(vm_id).await.map_err(ApiError::from_domain)?;
    let host = o.scheduler.registry().get(&host_id).map_err(ApiError::from_domain)?;
    check_host_access(p, &host)?;
    Ok(host)
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

fn vm_view(
    h: &Host,
    vm: &hangar_orchestrator::VmSummary,
    record: Option<&hangar_orchestrator::OrchestratedVm>,
) -> Value {
    let owner = record.map(|r| r.owner.clone());
    // The reference's key names (what clients read), then Hangar's.
    json!({
        "ID": vm.id, "Name": vm.name, "State": vm.state, "OS": vm.os, "user": owner.clone().unwrap_or_default(),
        "Hardware": {"cpu": {"cpus": vm.cpu}, "memory": {"size": format!("{}Mb", vm.memory_mb)},
            "hdd0": {"size": format!("{}Mb", vm.disk_mb)}},
        "internal_ip_address": "",
        "id": vm.id, "name": vm.name, "state": vm.state, "os": vm.os,
        "cpu": vm.cpu, "memory_mb": vm.memory_mb, "disk_mb": vm.disk_mb,
        "host_id": h.id, "host": h.name, "host_state": h.state,
        "owner": owner,
        "expires_at": record.and_then(|r| r.expires_at),
    })
}

/// Every VM on every host the caller may use, each with its `host_id`.
#[utoipa::path(get, path = "/orchestrator/machines", tag = "orchestrator", responses((status = 200, body = Vec<Object>)))]
async fn list_machines(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<Vec<Value>>> {
    let o = module(&s)?;
    let caller = Caller::from(ctx.caller()?);
    let records = o.scheduler.list_vms().await.map_err(ApiError::from_domain)?;
    let mut out = Vec::new();
    for h in o.scheduler.registry().list() {
        if !caller.may_use(&h) {
            continue;
        }
        for vm in &h.vms {
            out.push(vm_view(&h, vm, records.iter().find(|r| r.id == vm.id)));
        }
    }
    Ok(axum::Json(out))
}

#[utoipa::path(get, path = "/orchestrator/machines/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn get_machine(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<Value>> {
    let host = vm_host(module(&s)?, ctx.caller()?, &id).await?;
    machine_on(&s, host, &id).await
}

async fn machine_on(s: &AppState, host: Host, id: &str) -> R<axum::Json<Value>> {
    let o = module(s)?;
    let record = o.scheduler.vm(id).await.ok();
    let vm = host.vms.iter().find(|v| v.id == id).ok_or_else(|| ApiError::not_found(format!("VM {id:?} not found")))?;
    Ok(axum::Json(vm_view(&host, vm, record.as_ref())))
}

/// Wait for capacity instead of failing at once when no host can take the VM.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
pub struct QueueRequest {
    /// Higher is served first (then arrival order). Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Give up after this many seconds (at most 3600): 503 "No capacity within Ns" with
    /// the reasons per group of hosts.
    pub timeout_seconds: u64,
}

/// Longest a request may wait for capacity.
const MAX_QUEUE_WAIT: u64 = 3600;

/// Create a VM somewhere in the fleet, in the host API's shape plus placement hints.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OrchestratorCreateRequest {
    pub name: String,
    pub owner: Option<String>,
    pub architecture: Option<String>,
    #[serde(default)]
    pub start_on_create: bool,
    /// A local image name on the hosts.
    pub image: Option<String>,
    /// `{catalog_id, version}`.
    #[schema(value_type = Option<Object>)]
    pub catalog_manifest: Option<Value>,
    pub specs: Option<super::machines::Specs>,
    /// Guest OS (`macos`, `linux`, `windows`), for the macOS limit.
    pub os: Option<String>,
    /// Tags the host must all have.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Pin to one host (id or name).
    pub host: Option<String>,
    /// Delete the VM this many seconds after creation.
    pub ttl_seconds: Option<u64>,
    /// Wait for capacity in the queue (priority and timeout).
    pub queue: Option<QueueRequest>,
    /// Wait up to this many seconds for capacity (priority 0); `queue` takes precedence.
    pub wait_seconds: Option<u64>,
}

/// The scheduler's create request for an API request; `pinned` (a host id) overrides the
/// body's `host`.
fn create_request(p: &Principal, req: &OrchestratorCreateRequest, pinned: Option<String>) -> R<CreateVm> {
    let owner = match req.owner.clone().filter(|o| !o.is_empty()) {
        Some(o) if o != p.username && !p.is_super_user() => {
            return Err(ApiError::forbidden("Only a SUPER_USER can create a VM for another owner"));
        }
        Some(o) => o,
        None => p.username.clone(),
    };
    let (image, version) = match (&req.catalog_manifest, &req.image) {
        (Some(m), _) => {
            let field = |k: &str| m.get(k).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
            let id =
                field("catalog_id").ok_or_else(|| ApiError::bad_request("catalog_manifest.catalog_id is required"))?;
            (id.to_string(), Some(field("version").unwrap_or("latest").to_string()))
        }
        (None, Some(i)) if !i.trim().is_empty() => (i.clone(), None),
        _ => return Err(ApiError::bad_request("Say what to create the VM from: image or catalog_manifest")),
    };
    let os = match &req.os {
        Some(t) => Some(Os::parse_lenient(t).ok_or_else(|| ApiError::bad_request(format!("os {t:?} is unknown")))?),
        None => None,
    };
    let (priority, wait) = match (req.queue, req.wait_seconds) {
        (Some(q), _) => (q.priority, Some(q.timeout_seconds)),
        (None, w) => (0, w),
    };
    let specs = req.specs.as_ref();
    Ok(CreateVm {
        name: req.name.clone(),
        image,
        version,
        architecture: req.architecture.clone().unwrap_or_else(|| "x86_64".into()),
        os,
        cpu: num(&specs.and_then(|s| s.cpu.clone()), "specs.cpu")?.map(|v| v.min(1024) as u32),
        memory_mb: num(&specs.and_then(|s| s.memory.clone()), "specs.memory")?,
        disk_mb: num(&specs.and_then(|s| s.disk.clone()), "specs.disk")?,
        tags: req.tags.clone(),
        host: pinned.or_else(|| req.host.clone()),
        owner,
        start: req.start_on_create,
        ttl: req.ttl_seconds.map(Duration::from_secs),
        priority,
        wait: wait.map(|w| Duration::from_secs(w.min(MAX_QUEUE_WAIT))),
        ..Default::default()
    })
}

/// A create failure as the API answers it: a queue timeout names the wait in seconds.
fn create_error(e: OrchestratorError, wait: Option<Duration>) -> ApiError {
    match e {
        OrchestratorError::QueueTimeout { last, waited_ms } => {
            let secs = wait.map(|w| w.as_secs()).unwrap_or(waited_ms / 1000);
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("No capacity within {secs}s: {last}"))
        }
        e => ApiError::from_domain(e),
    }
}

/// The answer to a create: `{id, name, owner, current_state, host, host_id, expires_at}`.
fn created_view(o: &HttpOrchestrator, vm: &hangar_orchestrator::OrchestratedVm, start: bool) -> R<Value> {
    let host = o.scheduler.registry().get(&vm.host_id).map_err(ApiError::from_domain)?;
    let state = host
        .vms
        .iter()
        .find(|v| v.id == vm.id)
        .map(|v| v.state.as_str().to_string())
        .unwrap_or_else(|| if start { "running".into() } else { "stopped".into() });
    Ok(json!({
        "id": vm.id, "name": vm.name, "owner": vm.owner, "current_state": state,
        "host": host.name, "host_id": host.id, "expires_at": vm.expires_at,
    }))
}

async fn create_sync(
    s: &AppState,
    ctx: &RequestContext,
    req: &OrchestratorCreateRequest,
    pinned: Option<String>,
) -> R<axum::Json<Value>> {
    let o = module(s)?;
    let p = ctx.caller()?;
    let create = create_request(p, req, pinned)?;
    let wait = create.wait;
    let vm = o.scheduler.create_vm(Caller::from(p), &ctx.actor, create).await.map_err(|e| create_error(e, wait))?;
    Ok(axum::Json(created_view(o, &vm, req.start_on_create)?))
}

/// Create a VM on the host placement chooses. Answers `{id, name, owner, current_state, host, host_id}`;
/// 503 with the per-group reasons when no host can take it (after waiting in the queue
/// when the body has `queue: {priority, timeout_seconds}`).
#[utoipa::path(post, path = "/orchestrator/machines", tag = "orchestrator", request_body = OrchestratorCreateRequest,
    responses((status = 200, body = Object), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody, description = "No host can take the VM")))]
async fn create_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<axum::Json<Value>> {
    create_sync(&s, &ctx, &req, None).await
}

// ----- async creation: jobs ------------------------------------------------------------

/// The orchestrator's jobs (kept in the store, opened with the module).
fn jobs_of(s: &AppState) -> R<&Jobs> {
    module(s)?;
    s.orchestrator_jobs.as_ref().ok_or_else(|| ApiError::internal("the orchestrator runs without its job set"))
}

/// Steps of an orchestrator create job.
const CREATE_STEPS: &[(&str, u32)] = &[("placing", 1), ("creating", 9)];

/// Starts a create in the background and answers its job (202).
async fn create_async(
    s: &AppState,
    ctx: &RequestContext,
    req: &OrchestratorCreateRequest,
    pinned: Option<String>,
) -> R<(StatusCode, axum::Json<Job>)> {
    let o = module(s)?.clone();
    let p = ctx.caller()?;
    let create = create_request(p, req, pinned)?;
    let jobs = jobs_of(s)?;
    // The job belongs to the caller (by user id), whatever the VM's owner; it is in the
    // store before the 202 goes out.
    let handle =
        jobs.start(&p.user_id, "orchestrator_vm", "create", CREATE_STEPS).await.map_err(ApiError::from_domain)?;
    let job = jobs.get(&handle.id).ok_or_else(|| ApiError::internal("job vanished"))?;
    let _ = s
        .identity
        .record(&ctx.actor, "orchestrator.vm.create_async", "job", &handle.id, json!({"name": req.name}))
        .await;
    let caller = Caller::from(p);
    let actor = ctx.actor.clone();
    let start = req.start_on_create;
    let span = tracing::info_span!("orchestrator_create_job", job = %handle.id, vm = %create.name);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let wait = create.wait;
            let reporter = handle.clone();
            let registry = o.scheduler.registry().clone();
            let progress = move |step: CreateProgress| match step {
                CreateProgress::Placing { previous_failure: None, .. } => reporter.step(0, 0.0, "placing"),
                CreateProgress::Placing { attempt, previous_failure: Some(e) } => {
                    reporter.step(0, 0.0, &format!("placing (attempt {attempt}; {e})"))
                }
                CreateProgress::Queued { reason, priority } => {
                    reporter.step(0, 0.0, &format!("queued: waiting for capacity (priority {priority}); now {reason}"))
                }
                CreateProgress::Creating { host_id, .. } => {
                    let name = registry.get(&host_id).map(|h| h.name).unwrap_or_else(|_| host_id.clone());
                    reporter.step(1, 0.0, &format!("creating on host {name}"));
                }
            };
            match o.scheduler.create_vm_reporting(caller, &actor, create, &progress).await {
                Ok(vm) => match created_view(&o, &vm, start) {
                    Ok(v) => handle.complete(v).await,
                    Err(e) => handle.fail(e.message).await,
                },
                Err(e) => handle.fail(create_error(e, wait).message).await,
            }
        },
        span,
    ));
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

/// Create a VM in the background: answers 202 with a job at once; follow it at
/// `/orchestrator/jobs/{id}` or on the websocket (`job_manager` events). Its message goes
/// `queued` → `placing` → `creating on host X` → `done`, or the job fails with the reason.
#[utoipa::path(post, path = "/orchestrator/machines/async", tag = "orchestrator", request_body = OrchestratorCreateRequest,
    responses((status = 202, body = Object, description = "The job; follow it at /orchestrator/jobs/{id}"), (status = 400, body = ApiErrorBody)))]
async fn create_machine_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<(StatusCode, axum::Json<Job>)> {
    create_async(&s, &ctx, &req, None).await
}

use super::machines::job_visible;

/// The orchestrator's jobs the caller may see (its own, or all with JOB_MANAGER_LIST).
#[utoipa::path(get, path = "/orchestrator/jobs", tag = "orchestrator", responses((status = 200, body = Vec<Object>)))]
async fn list_jobs(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<Vec<Job>>> {
    let p = ctx.caller()?;
    Ok(axum::Json(jobs_of(&s)?.list(None).into_iter().filter(|j| job_visible(p, j)).collect()))
}

/// One orchestrator job: state, progress, message, and the created VM as `result`.
#[utoipa::path(get, path = "/orchestrator/jobs/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn get_job(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<Job>> {
    let p = ctx.caller()?;
    jobs_of(&s)?
        .get(&id)
        .filter(|j| job_visible(p, j))
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("Job {id:?} not found")))
}

#[utoipa::path(delete, path = "/orchestrator/machines/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_machine(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    vm_host(module(&s)?, ctx.caller()?, &id).await?;
    module(&s)?.scheduler.delete_vm(&ctx.actor, &id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

async fn power(s: &AppState, ctx: &RequestContext, id: &str, op: PowerOp) -> R<axum::Json<Value>> {
    let host = vm_host(module(s)?, ctx.caller()?, id).await?;
    power_on(s, ctx, host, id, op).await
}

/// Forwards a power operation to `host`, which the caller was checked to may use.
async fn power_on(s: &AppState, ctx: &RequestContext, host: Host, id: &str, op: PowerOp) -> R<axum::Json<Value>> {
    let o = module(s)?;
    o.scheduler.power(id, op).await.map_err(ApiError::from_domain)?;
    let _ = s
        .identity
        .record(&ctx.actor, "orchestrator.vm.power", "vm", id, json!({"op": op.name(), "host": host.id}))
        .await;
    Ok(axum::Json(json!({"id": id, "operation": op.name(), "host_id": host.id})))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ForceQuery {
    #[serde(default)]
    pub force: bool,
}

macro_rules! power_route {
    ($fn:ident, $path:literal, $op:expr) => {
        #[utoipa::path(put, path = $path, tag = "orchestrator", params(("id" = String, Path)),
                                    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
        async fn $fn(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<Value>> {
            power(&s, &ctx, &id, $op).await
        }
    };
}

power_route!(start, "/orchestrator/machines/{id}/start", PowerOp::Start);
power_route!(kill, "/orchestrator/machines/{id}/kill", PowerOp::Kill);
power_route!(restart, "/orchestrator/machines/{id}/restart", PowerOp::Restart);
power_route!(pause, "/orchestrator/machines/{id}/pause", PowerOp::Pause);
power_route!(resume, "/orchestrator/machines/{id}/resume", PowerOp::Resume);
power_route!(suspend, "/orchestrator/machines/{id}/suspend", PowerOp::Suspend);
power_route!(reset, "/orchestrator/machines/{id}/reset", PowerOp::Reset);

/// The VM's status, read from its host now (the host's `/machines/{id}/status` answer).
#[utoipa::path(get, path = "/orchestrator/machines/{id}/status", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn machine_status(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<Value>> {
    let host = vm_host(module(&s)?, ctx.caller()?, &id).await?;
    status_on(&s, host, &id).await
}

/// The VM's status read from `host` now.
async fn status_on(s: &AppState, host: Host, id: &str) -> R<axum::Json<Value>> {
    let o = module(s)?;
    let client = o.host_client(&host.id).map_err(ApiError::from_domain)?;
    let path = format!("/machines/{}/status", id.replace('/', "%2F"));
    let mut v = client.request(Method::GET, &path, None, Duration::from_secs(30)).await.map_err(|source| {
        ApiError::from_domain(hangar_orchestrator::OrchestratorError::Host { host: host.id.clone(), source })
    })?;
    if let Some(m) = v.as_object_mut() {
        m.insert("host_id".into(), json!(host.id));
    }
    Ok(axum::Json(v))
}

#[utoipa::path(put, path = "/orchestrator/machines/{id}/stop", tag = "orchestrator", params(("id" = String, Path), ForceQuery),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn stop(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(q): Query<ForceQuery>,
) -> R<axum::Json<Value>> {
    power(&s, &ctx, &id, PowerOp::Stop { force: q.force, timeout: Duration::from_secs(60) }).await
}

/// Run a command in the VM, on its host (the body is the host's execute body).
#[utoipa::path(put, path = "/orchestrator/machines/{id}/execute", tag = "orchestrator", params(("id" = String, Path)), request_body = Object,
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn execute(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let host = vm_host(module(&s)?, ctx.caller()?, &id).await?;
    execute_on(&s, &ctx, host, &id, body).await
}

/// Runs a command in the VM on `host`.
async fn execute_on(s: &AppState, ctx: &RequestContext, host: Host, id: &str, body: Value) -> R<axum::Json<Value>> {
    let o = module(s)?;
    let client = o.host_client(&host.id).map_err(ApiError::from_domain)?;
    let timeout = body.get("timeout").and_then(Value::as_u64).unwrap_or(300).clamp(1, 24 * 3600) + 30;
    let out = client.execute(id, body, Duration::from_secs(timeout)).await.map_err(|source| {
        ApiError::from_domain(hangar_orchestrator::OrchestratorError::Host { host: host.id.clone(), source })
    })?;
    let _ = s.identity.record(&ctx.actor, "orchestrator.vm.execute", "vm", id, json!({"host": host.id})).await;
    Ok(axum::Json(out))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ExtendRequest {
    /// Push the expiry back by this many seconds.
    pub ttl_seconds: u64,
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
    let o = module(&s)?;
    vm_host(o, ctx.caller()?, &id).await?;
    let vm = o
        .scheduler
        .extend(&ctx.actor, &id, Duration::from_secs(req.ttl_seconds))
        .await
        .map_err(ApiError::from_domain)?;
    Ok(axum::Json(serde_json::to_value(vm).unwrap_or(Value::Null)))
}

/// Forget a finished job (409 while it runs).
#[utoipa::path(delete, path = "/orchestrator/jobs/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_job(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let p = ctx.caller()?;
    let jobs = jobs_of(&s)?;
    let j = jobs
        .get(&id)
        .filter(|j| job_visible(p, j) || p.has_claim(JOB_MANAGER_DELETE))
        .ok_or_else(|| ApiError::not_found(format!("Job {id:?} not found")))?;
    jobs.remove(&j.id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

// ----- one host's machines -------------------------------------------------------------
//
// `/orchestrator/hosts/{id}/machines/...`: the same operations on a named host, with the
// same claims as the cross-host routes and the same check that the caller may use the
// host. A VM that is not on that host is a 404.

/// The host (id or name), after checking the caller may use it.
fn usable_host(o: &HttpOrchestrator, p: &Principal, id: &str) -> R<Host> {
    let host = o.scheduler.registry().get(id).map_err(ApiError::from_domain)?;
    check_host_access(p, &host)?;
    Ok(host)
}

/// The host, after checking the caller may use it and that `vm_id` lives on it.
async fn host_vm(s: &AppState, ctx: &RequestContext, host_id: &str, vm_id: &str) -> R<Host> {
    let o = module(s)?;
    let host = usable_host(o, ctx.caller()?, host_id)?;
    match o.scheduler.host_of(vm_id).await {
        Ok(h) if h == host.id => Ok(host),
        Ok(_) | Err(OrchestratorError::NotFound { .. }) => {
            Err(ApiError::not_found(format!("VM {vm_id:?} not found on host {}", host.name)))
        }
        Err(e) => Err(ApiError::from_domain(e)),
    }
}

/// The VMs of one host.
#[utoipa::path(get, path = "/orchestrator/hosts/{id}/machines", tag = "orchestrator", params(("id" = String, Path, description = "Host id or name")),
    responses((status = 200, body = Vec<Object>), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn host_list_machines(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<Vec<Value>>> {
    let o = module(&s)?;
    let host = usable_host(o, ctx.caller()?, &id)?;
    let records = o.scheduler.list_vms().await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(host.vms.iter().map(|vm| vm_view(&host, vm, records.iter().find(|r| r.id == vm.id))).collect()))
}

/// Create a VM on this host: no placement, but its capacity is still reserved, so a full
/// host answers 503 (or the request waits with `queue`).
#[utoipa::path(post, path = "/orchestrator/hosts/{id}/machines", tag = "orchestrator", params(("id" = String, Path)),
    request_body = OrchestratorCreateRequest,
    responses((status = 200, body = Object), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn host_create_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<axum::Json<Value>> {
    let host = usable_host(module(&s)?, ctx.caller()?, &id)?;
    create_sync(&s, &ctx, &req, Some(host.id)).await
}

/// [`host_create_machine`] in the background: 202 with a job.
#[utoipa::path(post, path = "/orchestrator/hosts/{id}/machines/async", tag = "orchestrator", params(("id" = String, Path)),
    request_body = OrchestratorCreateRequest,
    responses((status = 202, body = Object), (status = 400, body = ApiErrorBody)))]
async fn host_create_machine_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<(StatusCode, axum::Json<Job>)> {
    let host = usable_host(module(&s)?, ctx.caller()?, &id)?;
    create_async(&s, &ctx, &req, Some(host.id)).await
}

#[utoipa::path(get, path = "/orchestrator/hosts/{id}/machines/{vm_id}", tag = "orchestrator",
    params(("id" = String, Path), ("vm_id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn host_get_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, vm_id)): Path<(String, String)>,
) -> R<axum::Json<Value>> {
    let host = host_vm(&s, &ctx, &id, &vm_id).await?;
    machine_on(&s, host, &vm_id).await
}

#[utoipa::path(delete, path = "/orchestrator/hosts/{id}/machines/{vm_id}", tag = "orchestrator",
    params(("id" = String, Path), ("vm_id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn host_delete_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, vm_id)): Path<(String, String)>,
) -> R<StatusCode> {
    host_vm(&s, &ctx, &id, &vm_id).await?;
    module(&s)?.scheduler.delete_vm(&ctx.actor, &vm_id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/orchestrator/hosts/{id}/machines/{vm_id}/status", tag = "orchestrator",
    params(("id" = String, Path), ("vm_id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn host_machine_status(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, vm_id)): Path<(String, String)>,
) -> R<axum::Json<Value>> {
    let host = host_vm(&s, &ctx, &id, &vm_id).await?;
    status_on(&s, host, &vm_id).await
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}/machines/{vm_id}/execute", tag = "orchestrator",
    params(("id" = String, Path), ("vm_id" = String, Path)), request_body = Object,
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn host_execute(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, vm_id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let host = host_vm(&s, &ctx, &id, &vm_id).await?;
    execute_on(&s, &ctx, host, &vm_id, body).await
}

#[utoipa::path(put, path = "/orchestrator/hosts/{id}/machines/{vm_id}/stop", tag = "orchestrator",
    params(("id" = String, Path), ("vm_id" = String, Path), ForceQuery),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn host_stop(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, vm_id)): Path<(String, String)>,
    Query(q): Query<ForceQuery>,
) -> R<axum::Json<Value>> {
    let host = host_vm(&s, &ctx, &id, &vm_id).await?;
    power_on(&s, &ctx, host, &vm_id, PowerOp::Stop { force: q.force, timeout: Duration::from_secs(60) }).await
}

macro_rules! host_power_route {
    ($fn:ident, $path:literal, $op:expr) => {
        #[utoipa::path(put, path = $path, tag = "orchestrator", params(("id" = String, Path), ("vm_id" = String, Path)),
                                    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
        async fn $fn(
            State(s): State<AppState>,
            ctx: RequestContext,
            Path((id, vm_id)): Path<(String, String)>,
        ) -> R<axum::Json<Value>> {
            let host = host_vm(&s, &ctx, &id, &vm_id).await?;
            power_on(&s, &ctx, host, &vm_id, $op).await
        }
    };
}

host_power_route!(host_start, "/orchestrator/hosts/{id}/machines/{vm_id}/start", PowerOp::Start);
host_power_route!(host_kill, "/orchestrator/hosts/{id}/machines/{vm_id}/kill", PowerOp::Kill);
host_power_route!(host_restart, "/orchestrator/hosts/{id}/machines/{vm_id}/restart", PowerOp::Restart);
host_power_route!(host_pause, "/orchestrator/hosts/{id}/machines/{vm_id}/pause", PowerOp::Pause);
host_power_route!(host_resume, "/orchestrator/hosts/{id}/machines/{vm_id}/resume", PowerOp::Resume);
host_power_route!(host_suspend, "/orchestrator/hosts/{id}/machines/{vm_id}/suspend", PowerOp::Suspend);
host_power_route!(host_reset, "/orchestrator/hosts/{id}/machines/{vm_id}/reset", PowerOp::Reset);

// ----- rename, clone, snapshots (forwarded as they are) ------------------------------------

#[allow(clippy::too_many_arguments)]
/// Forwards a request about VM `id` to `host` with the orchestrator's credentials (the
/// caller was checked first) and records it in the audit log.
async fn forward(
    s: &AppState,
    ctx: &RequestContext,
    host: &Host,
    method: Method,
    path: &str,
    body: Option<Value>,
    action: &str,
    id: &str,
) -> R<Value> {
    let o = module(s)?;
    let client = o.host_client(&host.id).map_err(ApiError::from_domain)?;
    let v = client.request(method, path, body, Duration::from_secs(300)).await.map_err(|source| {
        ApiError::from_domain(hangar_orchestrator::OrchestratorError::Host { host: host.id.clone(), source })
    })?;
    let _ = s.identity.record(&ctx.actor, action, "vm", id, json!({"host": host.id})).await;
    Ok(v)
}

fn vm_path(id: &str, rest: &str) -> String {
    format!("/machines/{}{rest}", seg(id))
}

/// A caller holding only the `*_OWN_*` claim may touch only VMs it owns (as recorded by
/// the orchestrator when it created them).
async fn check_own(o: &HttpOrchestrator, p: &Principal, id: &str, all_claim: &str) -> R<()> {
    if p.has_claim(all_claim) {
        return Ok(());
    }
    match o.scheduler.vm(id).await {
        Ok(vm) if vm.owner == p.username => Ok(()),
        _ => Err(ApiError::forbidden(format!("VM {id} is not yours; this needs {all_claim}"))),
    }
}

/// Rename a VM on its host (the host's `/machines/{id}/rename` body).
#[utoipa::path(put, path = "/orchestrator/machines/{id}/rename", tag = "orchestrator", params(("id" = String, Path)),
    request_body = super::machines::RenameRequest, responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn rename(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let host = vm_host(module(&s)?, ctx.caller()?, &id).await?;
    let v = forward(&s, &ctx, &host, Method::PUT, &vm_path(&id, "/rename"), Some(body), "orchestrator.vm.rename", &id)
        .await?;
    Ok(axum::Json(v))
}

/// Clone a VM on its host (the host's `/machines/{id}/clone` body). The clone is made
/// stopped, on the same host.
#[utoipa::path(put, path = "/orchestrator/machines/{id}/clone", tag = "orchestrator", params(("id" = String, Path)),
    request_body = super::machines::CloneRequest, responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn clone_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let host = vm_host(module(&s)?, ctx.caller()?, &id).await?;
    let mut v =
        forward(&s, &ctx, &host, Method::PUT, &vm_path(&id, "/clone"), Some(body), "orchestrator.vm.clone", &id)
            .await?;
    if let Some(m) = v.as_object_mut() {
        m.insert("host_id".into(), json!(host.id));
    }
    Ok(axum::Json(v))
}

#[utoipa::path(get, path = "/orchestrator/machines/{id}/snapshots", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Object>), (status = 404, body = ApiErrorBody)))]
async fn list_snapshots(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<Value>> {
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    check_own(o, ctx.caller()?, &id, LIST_SNAPSHOT_VM).await?;
    let client = o.host_client(&host.id).map_err(ApiError::from_domain)?;
    let v = client.request(Method::GET, &vm_path(&id, "/snapshots"), None, Duration::from_secs(60)).await.map_err(
        |source| ApiError::from_domain(hangar_orchestrator::OrchestratorError::Host { host: host.id.clone(), source }),
    )?;
    Ok(axum::Json(v))
}

#[utoipa::path(post, path = "/orchestrator/machines/{id}/snapshots", tag = "orchestrator", params(("id" = String, Path)),
    request_body = super::machines::CreateSnapshotRequest, responses((status = 201, body = Object), (status = 404, body = ApiErrorBody)))]
async fn create_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    check_own(o, ctx.caller()?, &id, CREATE_SNAPSHOT_VM).await?;
    let v = forward(
        &s,
        &ctx,
        &host,
        Method::POST,
        &vm_path(&id, "/snapshots"),
        Some(body),
        "orchestrator.vm.snapshot",
        &id,
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(v)))
}

#[utoipa::path(delete, path = "/orchestrator/machines/{id}/snapshots/{snapshot_id}", tag = "orchestrator",
    params(("id" = String, Path), ("snapshot_id" = String, Path), super::machines::DeleteSnapshotQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, snapshot)): Path<(String, String)>,
    Query(q): Query<super::machines::DeleteSnapshotQuery>,
) -> R<StatusCode> {
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    check_own(o, ctx.caller()?, &id, DELETE_SNAPSHOT_VM).await?;
    let path = vm_path(&id, &format!("/snapshots/{}?delete_children={}", seg(&snapshot), q.delete_children));
    forward(&s, &ctx, &host, Method::DELETE, &path, None, "orchestrator.vm.snapshot.delete", &id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(delete, path = "/orchestrator/machines/{id}/snapshots", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_all_snapshots(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    check_own(o, ctx.caller()?, &id, DELETE_ALL_SNAPSHOTS_VM).await?;
    forward(
        &s,
        &ctx,
        &host,
        Method::DELETE,
        &vm_path(&id, "/snapshots"),
        None,
        "orchestrator.vm.snapshot.delete_all",
        &id,
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/orchestrator/machines/{id}/snapshots/{snapshot_id}/revert", tag = "orchestrator",
    params(("id" = String, Path), ("snapshot_id" = String, Path)), request_body = super::machines::RevertRequest,
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn revert_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, snapshot)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R<StatusCode> {
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    check_own(o, ctx.caller()?, &id, REVERT_SNAPSHOT_VM).await?;
    let path = vm_path(&id, &format!("/snapshots/{}/revert", seg(&snapshot)));
    let body = if body.iter().all(|b| b.is_ascii_whitespace()) {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("The body is not JSON: {e}")))?
    };
    forward(&s, &ctx, &host, Method::POST, &path, Some(body), "orchestrator.vm.snapshot.revert", &id).await?;
    Ok(StatusCode::ACCEPTED)
}

use hangar_core::path_segment as seg;
