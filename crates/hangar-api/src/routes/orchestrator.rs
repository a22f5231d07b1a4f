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
use hangar_hypervisor::PowerOp;
use hangar_orchestrator::{Caller, CreateVm, Host, HttpOrchestrator, Os, RegisterHost, ResourceSet, UpdateHost};
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
#[utoipa::path(post, path = "/orchestrator/hosts", tag = "orchestrator", request_body = Object,
    responses((status = 201, body = Object), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn register_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(body): Json<Value>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let o = module(&s)?;
    let req = register_body(body)?;
    let h = o.scheduler.register_host(&ctx.actor, req).await.map_err(ApiError::from_domain)?;
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
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    let record = o.scheduler.vm(&id).await.ok();
    let vm = host.vms.iter().find(|v| v.id == id).ok_or_else(|| ApiError::not_found(format!("VM {id:?} not found")))?;
    Ok(axum::Json(vm_view(&host, vm, record.as_ref())))
}

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
    /// Wait up to this many seconds for capacity instead of failing at once.
    pub wait_seconds: Option<u64>,
}

/// Create a VM on the host placement chooses. Answers `{id, name, owner, current_state, host, host_id}`;
/// 503 with the per-group reasons when no host can take it.
#[utoipa::path(post, path = "/orchestrator/machines", tag = "orchestrator", request_body = OrchestratorCreateRequest,
    responses((status = 200, body = Object), (status = 400, body = ApiErrorBody), (status = 503, body = ApiErrorBody, description = "No host can take the VM")))]
async fn create_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<OrchestratorCreateRequest>,
) -> R<axum::Json<Value>> {
    let o = module(&s)?;
    let p = ctx.caller()?;
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
    let specs = req.specs.as_ref();
    let create = CreateVm {
        name: req.name.clone(),
        image,
        version,
        architecture: req.architecture.clone().unwrap_or_else(|| "x86_64".into()),
        os,
        cpu: num(&specs.and_then(|s| s.cpu.clone()), "specs.cpu")?.map(|v| v.min(1024) as u32),
        memory_mb: num(&specs.and_then(|s| s.memory.clone()), "specs.memory")?,
        disk_mb: num(&specs.and_then(|s| s.disk.clone()), "specs.disk")?,
        tags: req.tags.clone(),
        host: req.host.clone(),
        owner: owner.clone(),
        start: req.start_on_create,
        ttl: req.ttl_seconds.map(Duration::from_secs),
        wait: req.wait_seconds.map(|w| Duration::from_secs(w.min(3600))),
        ..Default::default()
    };
    let vm = o.scheduler.create_vm(Caller::from(p), &ctx.actor, create).await.map_err(ApiError::from_domain)?;
    let host = o.scheduler.registry().get(&vm.host_id).map_err(ApiError::from_domain)?;
    let state = host
        .vms
        .iter()
        .find(|v| v.id == vm.id)
        .map(|v| v.state.as_str().to_string())
        .unwrap_or_else(|| if req.start_on_create { "running".into() } else { "stopped".into() });
    Ok(axum::Json(json!({
        "id": vm.id, "name": vm.name, "owner": vm.owner, "current_state": state,
        "host": host.name, "host_id": host.id, "expires_at": vm.expires_at,
    })))
}

#[utoipa::path(delete, path = "/orchestrator/machines/{id}", tag = "orchestrator", params(("id" = String, Path)),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_machine(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let o = module(&s)?;
    vm_host(o, ctx.caller()?, &id).await?;
    o.scheduler.delete_vm(&ctx.actor, &id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

async fn power(s: &AppState, ctx: &RequestContext, id: &str, op: PowerOp) -> R<axum::Json<Value>> {
    let o = module(s)?;
    let host = vm_host(o, ctx.caller()?, id).await?;
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
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
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
    let o = module(&s)?;
    let host = vm_host(o, ctx.caller()?, &id).await?;
    let client = o.host_client(&host.id).map_err(ApiError::from_domain)?;
    let timeout = body.get("timeout").and_then(Value::as_u64).unwrap_or(300).clamp(1, 24 * 3600) + 30;
    let out = client.execute(&id, body, Duration::from_secs(timeout)).await.map_err(|source| {
        ApiError::from_domain(hangar_orchestrator::OrchestratorError::Host { host: host.id.clone(), source })
    })?;
    let _ = s.identity.record(&ctx.actor, "orchestrator.vm.execute", "vm", &id, json!({"host": host.id})).await;
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
