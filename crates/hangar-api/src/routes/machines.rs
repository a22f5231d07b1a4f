//! `/machines/...`, `/config/hardware` and `/jobs`: the host module's API, in the shapes
//! the reference's clients read (`ID`, `Name`, `State`, `Hardware.memory.size` as
//! `"2048Mb"`, create answering `{id, name, owner, current_state}`, ...), whichever
//! driver runs the VM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use hangar_core::claims::*;
use hangar_core::{Access, Principal};
use hangar_host::{CreateRequest, Host, ImageSource, Job};
use hangar_hypervisor::{CloneSpec, ConfigChange, ExecRequest, PowerOp, RegisterSpec, SnapshotOp, VmInfo};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path, Query};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    let (s, p, upload_raw) = routes!(upload_bytes);
    api.add(Access::AllOf(&[LIST_VM]), routes!(list_machines))
        .add(Access::AllOf(&[CREATE_VM]), routes!(create_machine))
        .add(Access::AllOf(&[CREATE_VM]), routes!(create_machine_async))
        .add(Access::AllOf(&[LIST_VM]), routes!(get_machine))
        .add(Access::AllOf(&[DELETE_VM]), routes!(delete_machine))
        .add(Access::AllOf(&[CREATE_VM]), routes!(register_machine))
        .add(Access::AllOf(&[UPDATE_VM]), routes!(unregister_machine))
        .add(Access::AllOf(&[LIST_VM]), routes!(machine_status))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(start))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(stop))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(kill))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(restart))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(pause))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(resume))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(reset))
        .add(Access::AllOf(&[UPDATE_VM_STATES]), routes!(suspend))
        .add(Access::AllOf(&[UPDATE_VM]), routes!(set_machine))
        .add(Access::AllOf(&[EXECUTE_COMMAND_VM]), routes!(execute))
        .add(Access::AllOf(&[UPDATE_VM]), (s, p, upload_raw.layer(DefaultBodyLimit::max(512 << 20))))
        .add(Access::AllOf(&[UPDATE_VM]), routes!(upload_host_file))
        .add(Access::AllOf(&[UPDATE_VM]), routes!(rename))
        .add(Access::AllOf(&[CREATE_VM]), routes!(clone_machine))
        .add(Access::AnyOf(&[LIST_SNAPSHOT_VM, LIST_OWN_VM_SNAPSHOT]), routes!(list_snapshots))
        .add(Access::AnyOf(&[CREATE_SNAPSHOT_VM, CREATE_OWN_VM_SNAPSHOT]), routes!(create_snapshot))
        .add(Access::AnyOf(&[DELETE_SNAPSHOT_VM, DELETE_OWN_VM_SNAPSHOT]), routes!(delete_snapshot))
        .add(Access::AnyOf(&[DELETE_ALL_SNAPSHOTS_VM, DELETE_ALL_OWN_VM_SNAPSHOTS]), routes!(delete_all_snapshots))
        .add(Access::AnyOf(&[REVERT_SNAPSHOT_VM, REVERT_OWN_VM_SNAPSHOT]), routes!(revert_snapshot))
        .add(Access::AllOf(&[LIST]), routes!(hardware))
        .add(Access::AnyOf(&[JOB_MANAGER_LIST, JOB_MANAGER_LIST_OWN]), routes!(list_jobs))
        .add(Access::AnyOf(&[JOB_MANAGER_LIST, JOB_MANAGER_LIST_OWN]), routes!(get_job))
        .add(Access::AnyOf(&[JOB_MANAGER_DELETE, JOB_MANAGER_LIST_OWN]), routes!(delete_job))
}

fn host(s: &AppState) -> R<&Arc<Host>> {
    s.host.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The host module is not running on this server; see GET /health/system",
        )
    })
}

fn mb(v: u64) -> String {
    format!("{v}Mb")
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmCpu {
    pub cpus: u32,
}
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmMemory {
    /// As the reference prints it: `"2048Mb"`.
    pub size: String,
}
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmDisk {
    pub size: String,
    pub allocated: String,
}
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmHardware {
    pub cpu: VmCpu,
    pub memory: VmMemory,
    pub hdd0: VmDisk,
}

/// A VM in the reference's key names.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Description")]
    pub description: String,
    #[serde(rename = "State")]
    pub state: String,
    #[serde(rename = "OS")]
    pub os: String,
    #[serde(rename = "Home")]
    pub home: String,
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Hardware")]
    pub hardware: VmHardware,
    /// Owner.
    pub user: String,
    /// First IP address, or empty.
    pub internal_ip_address: String,
    pub ip_addresses: Vec<String>,
    pub hypervisor: String,
    pub architecture: String,
}

impl From<VmInfo> for Machine {
    fn from(v: VmInfo) -> Self {
        let ips: Vec<String> = v.ip_addresses.iter().map(|i| i.to_string()).collect();
        Machine {
            id: v.id,
            name: v.name,
            description: v.description,
            state: v.state.as_str().into(),
            os: v.os,
            home: v.home.display().to_string(),
            kind: if v.is_template { "Template".into() } else { "VM".into() },
            hardware: VmHardware {
                cpu: VmCpu { cpus: v.cpus },
                memory: VmMemory { size: mb(v.memory_mb) },
                hdd0: VmDisk { size: mb(v.disk_virtual_bytes >> 20), allocated: mb(v.disk_bytes >> 20) },
            },
            user: v.owner.unwrap_or_default(),
            internal_ip_address: ips.first().cloned().unwrap_or_default(),
            ip_addresses: ips,
            hypervisor: v.hypervisor.to_string(),
            architecture: v.architecture,
        }
    }
}

/// `X-Filter: <property>=<regex>[,i]`, applied to a list's JSON objects.
fn filter_items(headers: &HeaderMap, items: Vec<Value>) -> R<Vec<Value>> {
    let Some(raw) = headers.get("x-filter") else { return Ok(items) };
    let raw = raw.to_str().map_err(|_| ApiError::bad_request("X-Filter is not valid text"))?;
    let (prop, mut pattern) = raw
        .split_once('=')
        .ok_or_else(|| ApiError::bad_request("X-Filter must be '<property>=<regex>' with an optional ',i'"))?;
    let mut insensitive = false;
    if let Some(p) = pattern.strip_suffix(",i") {
        pattern = p;
        insensitive = true;
    }
    let re = regex::RegexBuilder::new(pattern)
        .case_insensitive(insensitive)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ApiError::bad_request(format!("X-Filter regex: {e}")))?;
    let prop = prop.trim().to_ascii_lowercase();
    Ok(items
        .into_iter()
        .filter(|it| {
            it.as_object()
                .and_then(|o| o.iter().find(|(k, _)| k.to_ascii_lowercase() == prop))
                .map(|(_, v)| match v {
                    Value::String(s) => re.is_match(s),
                    other => re.is_match(&other.to_string()),
                })
                .unwrap_or(false)
        })
        .collect())
}

#[utoipa::path(get, path = "/machines", tag = "machines", params(("X-Filter" = Option<String>, Header, description = "<property>=<regex>[,i]")),
    responses((status = 200, body = Vec<Machine>)))]
async fn list_machines(State(s): State<AppState>, headers: HeaderMap) -> R<axum::Json<Vec<Value>>> {
    let vms = host(&s)?.list().await.map_err(ApiError::from_domain)?;
    let items: Vec<Value> =
        vms.into_iter().map(|v| serde_json::to_value(Machine::from(v)).unwrap_or(Value::Null)).collect();
    Ok(axum::Json(filter_items(&headers, items)?))
}

#[utoipa::path(get, path = "/machines/{id}", tag = "machines", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = Machine), (status = 404, body = ApiErrorBody)))]
async fn get_machine(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Machine>> {
    Ok(axum::Json(host(&s)?.get(&id).await.map_err(ApiError::from_domain)?.into()))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct Specs {
    #[schema(value_type = Option<String>)]
    pub cpu: Option<Value>,
    /// MiB.
    #[schema(value_type = Option<String>)]
    pub memory: Option<Value>,
    /// MiB.
    #[schema(value_type = Option<String>)]
    pub disk: Option<Value>,
}

/// Create a VM: from a local image (`image`, a name in the host's images folder).
/// `catalog_manifest` is accepted once the catalog module runs on this host.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateMachineRequest {
    pub name: String,
    pub owner: Option<String>,
    pub architecture: Option<String>,
    #[serde(default)]
    pub start_on_create: bool,
    pub image: Option<String>,
    pub description: Option<String>,
    pub specs: Option<Specs>,
    #[schema(value_type = Option<Object>)]
    pub catalog_manifest: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub packer_template: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub vagrant_box: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateMachineResponse {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub current_state: String,
}

/// A number that clients send as a number or a string ("2", "2048").
/// Also used by the orchestrator's create.
pub(crate) fn num(v: &Option<Value>, what: &str) -> R<Option<u64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_u64().map(Some).ok_or_else(|| ApiError::bad_request(format!("{what} must be a positive whole number")))
        }
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => {
            s.trim().parse().map(Some).map_err(|_| ApiError::bad_request(format!("{what} {s:?} is not a number")))
        }
        Some(_) => Err(ApiError::bad_request(format!("{what} must be a number"))),
    }
}

/// Pull the image a `catalog_manifest` names through the host cache (the catalog module
/// checks the caller's access and the manifest's taint), or take the local `image`.
async fn image_source(s: &AppState, ctx: &RequestContext, req: &CreateMachineRequest) -> R<ImageSource> {
    if let Some(m) = &req.catalog_manifest {
        let catalog = s.catalog.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "catalog_manifest needs the catalog module on this server, which is not running; use image",
            )
        })?;
        let field = |k: &str| m.get(k).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
        let id = field("catalog_id").ok_or_else(|| ApiError::bad_request("catalog_manifest.catalog_id is required"))?;
        let version = field("version").unwrap_or("latest");
        let arch_text = field("architecture").or(req.architecture.as_deref()).unwrap_or("x86_64");
        let arch: hangar_catalog::Architecture = arch_text.parse().map_err(|_| {
            ApiError::bad_request(format!("architecture {arch_text:?} is unknown; use x86_64 or arm64"))
        })?;
        let folder =
            catalog.pull_to_host(ctx.caller()?, &ctx.actor, id, version, arch).await.map_err(ApiError::from_domain)?;
        return Ok(ImageSource::Folder(folder));
    }
    let image = req.image.clone().ok_or_else(|| {
        ApiError::bad_request("Say what to create the VM from: image (a local image name) or catalog_manifest")
    })?;
    Ok(ImageSource::Local(image))
}

fn create_request(p: &Principal, req: CreateMachineRequest, image: ImageSource) -> R<CreateRequest> {
    if req.packer_template.is_some() || req.vagrant_box.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "packer_template and vagrant_box are not supported; use image or catalog_manifest",
        ));
    }
    if let Some(a) = &req.architecture {
        let a = a.to_ascii_lowercase();
        if !["x86_64", "amd64", "arm64", "aarch64", "arm", ""].contains(&a.as_str()) {
            return Err(ApiError::bad_request(format!("architecture {a:?} is unknown; use x86_64 or arm64")));
        }
    }
    let specs = req.specs.as_ref();
    let explicit = req.owner.clone().filter(|o| !o.is_empty());
    let owner = match req.owner.filter(|o| !o.is_empty()) {
        Some(o) if o != p.username && !p.is_super_user() => {
            return Err(ApiError::forbidden("Only a SUPER_USER can create a VM for another owner"));
        }
        Some(o) => o,
        None => p.username.clone(),
    };
    Ok(CreateRequest {
        name: req.name,
        image,
        cpus: num(&specs.and_then(|s| s.cpu.clone()), "specs.cpu")?.map(|v| v.min(1024) as u32),
        memory_mb: num(&specs.and_then(|s| s.memory.clone()), "specs.memory")?,
        disk_bytes: num(&specs.and_then(|s| s.disk.clone()), "specs.disk")?.map(|m| m.saturating_mul(1 << 20)),
        owner,
        host_user: explicit,
        description: req.description.unwrap_or_default(),
        start: req.start_on_create,
    })
}

#[utoipa::path(post, path = "/machines", tag = "machines", request_body = CreateMachineRequest,
    responses((status = 200, body = CreateMachineResponse), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn create_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateMachineRequest>,
) -> R<axum::Json<CreateMachineResponse>> {
    let h = host(&s)?;
    let image = image_source(&s, &ctx, &req).await?;
    let req = create_request(ctx.caller()?, req, image)?;
    let owner = req.owner.clone();
    let vm = h.create(req, None).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.create", "vm", &vm.id, json!({"name": vm.name})).await;
    Ok(axum::Json(CreateMachineResponse { id: vm.id, name: vm.name, owner, current_state: vm.state.as_str().into() }))
}

#[utoipa::path(post, path = "/machines/async", tag = "machines", request_body = CreateMachineRequest,
    responses((status = 202, body = Object, description = "The job; follow it at /jobs/{id}")))]
async fn create_machine_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateMachineRequest>,
) -> R<(StatusCode, axum::Json<Job>)> {
    let h = host(&s)?;
    let p = ctx.caller()?;
    let image = image_source(&s, &ctx, &req).await?;
    let req = create_request(p, req, image)?;
    // The job belongs to the caller (by user id), whatever the VM's owner.
    let handle = h.create_async_for(&p.user_id, req).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.create_async", "job", &handle.id, json!({})).await;
    let job = h.jobs.get(&handle.id).ok_or_else(|| ApiError::internal("job vanished"))?;
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ForceQuery {
    /// Kill a running VM first / power off without ACPI.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(delete, path = "/machines/{id}", tag = "machines", params(("id" = String, Path), ForceQuery),
    responses((status = 202), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(q): Query<ForceQuery>,
) -> R<StatusCode> {
    let h = host(&s)?;
    let vm = h.get(&id).await.map_err(ApiError::from_domain)?;
    h.delete(&vm.id, q.force).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.delete", "vm", &vm.id, json!({"name": vm.name})).await;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RegisterRequest {
    pub path: String,
    pub owner: Option<String>,
    pub machine_name: Option<String>,
    #[serde(default)]
    pub regenerate_source_uuid: bool,
    pub uuid: Option<String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub delay_applying_restrictions: bool,
}

#[utoipa::path(post, path = "/machines/register", tag = "machines", request_body = RegisterRequest, responses((status = 200, body = Machine)))]
async fn register_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<RegisterRequest>,
) -> R<axum::Json<Machine>> {
    let h = host(&s)?;
    let p = ctx.caller()?;
    let path = std::path::PathBuf::from(&req.path);
    if !path.is_absolute() || req.path.contains("..") {
        return Err(ApiError::bad_request("path must be an absolute path without '..'"));
    }
    let spec = RegisterSpec {
        name: req.machine_name,
        owner: Some(req.owner.unwrap_or_else(|| p.username.clone())),
        regenerate_id: req.regenerate_source_uuid,
    };
    let vm = h.register(&path, spec).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.register", "vm", &vm.id, json!({"path": req.path})).await;
    Ok(axum::Json(vm.into()))
}

#[utoipa::path(post, path = "/machines/{id}/unregister", tag = "machines", params(("id" = String, Path)), responses((status = 202)))]
async fn unregister_machine(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let h = host(&s)?;
    let vm = h.get(&id).await.map_err(ApiError::from_domain)?;
    h.unregister(&vm.id).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.unregister", "vm", &vm.id, json!({})).await;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachineStatus {
    pub id: String,
    pub name: String,
    pub status: String,
    /// The first IP address, or "-" while the guest has none.
    pub ip_configured: String,
}

#[utoipa::path(get, path = "/machines/{id}/status", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn machine_status(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<MachineStatus>> {
    let vm = host(&s)?.get(&id).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(MachineStatus {
        id: vm.id,
        name: vm.name,
        status: vm.state.as_str().into(),
        ip_configured: vm.ip_addresses.first().map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
    }))
}

async fn power(s: &AppState, ctx: &RequestContext, id: &str, op: PowerOp) -> R<axum::Json<MachineStatus>> {
    let h = host(s)?;
    let vm = h.power(id, op).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, &format!("vm.{}", op.name()), "vm", &vm.id, json!({})).await;
    Ok(axum::Json(MachineStatus {
        id: vm.id,
        name: vm.name,
        status: vm.state.as_str().into(),
        ip_configured: vm.ip_addresses.first().map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
    }))
}

#[utoipa::path(put, path = "/machines/{id}/start", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus), (status = 409, body = ApiErrorBody)))]
async fn start(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Start).await
}

#[utoipa::path(put, path = "/machines/{id}/stop", tag = "machines", params(("id" = String, Path), ForceQuery), responses((status = 200, body = MachineStatus), (status = 409, body = ApiErrorBody)))]
async fn stop(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(q): Query<ForceQuery>,
) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Stop { force: q.force, timeout: Duration::from_secs(60) }).await
}

#[utoipa::path(put, path = "/machines/{id}/kill", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn kill(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Kill).await
}

#[utoipa::path(put, path = "/machines/{id}/restart", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn restart(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Restart).await
}

#[utoipa::path(put, path = "/machines/{id}/pause", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn pause(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Pause).await
}

#[utoipa::path(put, path = "/machines/{id}/resume", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn resume(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Resume).await
}

#[utoipa::path(put, path = "/machines/{id}/reset", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn reset(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Reset).await
}

#[utoipa::path(put, path = "/machines/{id}/suspend", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn suspend(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<MachineStatus>> {
    power(&s, &ctx, &id, PowerOp::Suspend).await
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SetOption {
    pub flag: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SetOperation {
    pub group: String,
    pub operation: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub options: Vec<SetOption>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SetRequest {
    #[serde(default)]
    pub owner: Option<String>,
    pub operations: Vec<SetOperation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetResult {
    pub group: String,
    pub operation: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetResponse {
    pub operations: Vec<SetResult>,
}

/// Batch changes: `state` (start, stop, pause, resume, suspend, reset, restart, kill),
/// `cpu set N`, `memory set MiB`, `machine rename NAME`, `machine clone NAME`,
/// `machine description TEXT`. Each operation reports its own status.
#[utoipa::path(put, path = "/machines/{id}/set", tag = "machines", params(("id" = String, Path)), request_body = SetRequest, responses((status = 200, body = SetResponse)))]
async fn set_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<SetRequest>,
) -> R<axum::Json<SetResponse>> {
    let h = host(&s)?;
    let vm = h.get(&id).await.map_err(ApiError::from_domain)?;
    if req.operations.len() > 64 {
        return Err(ApiError::bad_request("at most 64 operations per request"));
    }
    let mut out = Vec::new();
    for op in req.operations {
        let g = op.group.to_ascii_lowercase();
        let o = op.operation.to_ascii_lowercase();
        let r: Result<(), ApiError> = async {
            match (g.as_str(), o.as_str()) {
                ("state", state) => {
                    let p = match state {
                        "start" => PowerOp::Start,
                        "stop" => PowerOp::Stop {
                            force: op.flags.iter().any(|f| f == "force"),
                            timeout: Duration::from_secs(60),
                        },
                        "kill" => PowerOp::Kill,
                        "pause" => PowerOp::Pause,
                        "resume" => PowerOp::Resume,
                        "suspend" => PowerOp::Suspend,
                        "reset" => PowerOp::Reset,
                        "restart" => PowerOp::Restart,
                        other => return Err(ApiError::bad_request(format!("unknown state operation {other:?}"))),
                    };
                    h.power(&vm.id, p).await.map(|_| ()).map_err(ApiError::from_domain)
                }
                ("cpu", "set") => {
                    let n: u32 = op
                        .value
                        .trim()
                        .parse()
                        .map_err(|_| ApiError::bad_request(format!("cpu value {:?} is not a number", op.value)))?;
                    h.configure(&vm.id, ConfigChange { cpus: Some(n), ..Default::default() })
                        .await
                        .map(|_| ())
                        .map_err(ApiError::from_domain)
                }
                ("memory", "set") => {
                    let n: u64 = op.value.trim().trim_end_matches(['M', 'b', 'B']).parse().map_err(|_| {
                        ApiError::bad_request(format!("memory value {:?} is not a number of MiB", op.value))
                    })?;
                    h.configure(&vm.id, ConfigChange { memory_mb: Some(n), ..Default::default() })
                        .await
                        .map(|_| ())
                        .map_err(ApiError::from_domain)
                }
                ("machine", "rename") => h.rename(&vm.id, &op.value).await.map(|_| ()).map_err(ApiError::from_domain),
                ("machine", "description") | ("machine", "set-description") => h
                    .configure(&vm.id, ConfigChange { description: Some(op.value.clone()), ..Default::default() })
                    .await
                    .map(|_| ())
                    .map_err(ApiError::from_domain),
                ("machine", "clone") => {
                    let dst = op.options.iter().find(|o| o.flag == "dst").map(|o| std::path::PathBuf::from(&o.value));
                    h.clone_vm(
                        &vm.id,
                        CloneSpec {
                            name: op.value.clone(),
                            linked: op.flags.iter().any(|f| f == "linked"),
                            destination: dst,
                        },
                    )
                    .await
                    .map(|_| ())
                    .map_err(ApiError::from_domain)
                }
                (g, o) => {
                    Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("operation {g} {o} is not supported")))
                }
            }
        }
        .await;
        out.push(SetResult {
            group: op.group,
            operation: op.operation,
            status: if r.is_ok() { "success".into() } else { "error".into() },
            error: r.err().map(|e| e.message),
        });
    }
    let _ = s.identity.record(&ctx.actor, "vm.set", "vm", &vm.id, json!({"operations": out.len()})).await;
    Ok(axum::Json(SetResponse { operations: out }))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ExecuteRequest {
    /// A shell command line, run with /bin/sh -c (cmd /c on Windows guests).
    pub command: String,
    #[serde(default)]
    pub environment_variables: BTreeMap<String, String>,
    pub user: Option<String>,
    pub working_directory: Option<String>,
    /// Seconds; default 300.
    pub timeout: Option<u64>,
    #[serde(default)]
    pub use_sudo: bool,
    #[serde(default)]
    pub use_ssh: bool,
    #[schema(value_type = Option<Object>)]
    pub script: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecuteResponse {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[utoipa::path(put, path = "/machines/{id}/execute", tag = "machines", params(("id" = String, Path)), request_body = ExecuteRequest,
    responses((status = 200, body = ExecuteResponse), (status = 409, body = ApiErrorBody, description = "The VM is not running")))]
async fn execute(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<ExecuteRequest>,
) -> R<axum::Json<ExecuteResponse>> {
    let h = host(&s)?;
    if req.command.trim().is_empty() {
        return Err(ApiError::bad_request("command is empty"));
    }
    if req.use_ssh || req.script.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "use_ssh and script are not supported; send the command line in command",
        ));
    }
    let command =
        if req.use_sudo { format!("sudo -n -- /bin/sh -c {}", shell_quote(&req.command)) } else { req.command.clone() };
    let er = ExecRequest {
        argv: vec![command],
        shell: true,
        env: req.environment_variables,
        working_dir: req.working_directory,
        user: req.user,
        timeout: Duration::from_secs(req.timeout.unwrap_or(300).clamp(1, 24 * 3600)),
        stdin: None,
    };
    let vm = h.get(&id).await.map_err(ApiError::from_domain)?;
    let out = h.exec(&vm.id, er).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.execute", "vm", &vm.id, json!({"exit_code": out.exit_code})).await;
    Ok(axum::Json(ExecuteResponse { stdout: out.stdout, stderr: out.stderr, exit_code: out.exit_code, error: None }))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadQuery {
    /// Destination path inside the guest.
    pub remote_path: String,
}

/// Upload the request body into the guest at `remote_path` (up to 512 MiB).
#[utoipa::path(put, path = "/machines/{id}/files", tag = "machines", params(("id" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 204), (status = 409, body = ApiErrorBody)))]
async fn upload_bytes(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> R<StatusCode> {
    let h = host(&s)?;
    if q.remote_path.is_empty() || q.remote_path.contains('\0') {
        return Err(ApiError::bad_request("remote_path is empty or invalid"));
    }
    let vm = h.get(&id).await.map_err(ApiError::from_domain)?;
    let tmp = std::env::temp_dir().join(format!("hangar-upload-{}", uuid::Uuid::new_v4()));
    tokio::fs::write(&tmp, &body).await.map_err(|e| ApiError::internal(format!("cannot stage the upload: {e}")))?;
    let r = h.upload(&vm.id, &tmp, &q.remote_path).await;
    let _ = tokio::fs::remove_file(&tmp).await;
    r.map_err(ApiError::from_domain)?;
    let _ = s
        .identity
        .record(&ctx.actor, "vm.upload", "vm", &vm.id, json!({"remote_path": q.remote_path, "bytes": body.len()}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UploadRequest {
    /// A file on the host, inside the host's upload folder (HOST_UPLOAD_FOLDER).
    pub path: String,
    pub remote_path: String,
}

/// The reference's upload: copy a file that is already on the host into the guest.
#[utoipa::path(post, path = "/machines/{id}/upload", tag = "machines", params(("id" = String, Path)), request_body = UploadRequest,
    responses((status = 204), (status = 403, body = ApiErrorBody, description = "Outside the upload folder, or host-path uploads disabled")))]
async fn upload_host_file(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<UploadRequest>,
) -> R<StatusCode> {
    let h = host(&s)?;
    let vm = h.get(&id).await.map_err(ApiError::from_domain)?;
    h.upload_host_path(&vm.id, std::path::Path::new(&req.path), &req.remote_path)
        .await
        .map_err(ApiError::from_domain)?;
    let _ = s
        .identity
        .record(&ctx.actor, "vm.upload", "vm", &vm.id, json!({"path": req.path, "remote_path": req.remote_path}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RenameRequest {
    pub new_name: String,
    pub description: Option<String>,
}

#[utoipa::path(put, path = "/machines/{id}/rename", tag = "machines", params(("id" = String, Path)), request_body = RenameRequest, responses((status = 200, body = Machine)))]
async fn rename(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<RenameRequest>,
) -> R<axum::Json<Machine>> {
    let h = host(&s)?;
    let mut vm = h.rename(&id, &req.new_name).await.map_err(ApiError::from_domain)?;
    if let Some(d) = req.description {
        vm = h
            .configure(&vm.id, ConfigChange { description: Some(d), ..Default::default() })
            .await
            .map_err(ApiError::from_domain)?;
    }
    let _ = s.identity.record(&ctx.actor, "vm.rename", "vm", &vm.id, json!({"name": vm.name})).await;
    Ok(axum::Json(vm.into()))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CloneRequest {
    pub clone_name: String,
    pub destination_path: Option<String>,
    /// A linked clone shares the source's disk; default false (full copy).
    #[serde(default)]
    pub linked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloneResponse {
    pub id: String,
    pub name: String,
    pub status: String,
}

#[utoipa::path(put, path = "/machines/{id}/clone", tag = "machines", params(("id" = String, Path)), request_body = CloneRequest, responses((status = 200, body = CloneResponse)))]
async fn clone_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<CloneRequest>,
) -> R<axum::Json<CloneResponse>> {
    let h = host(&s)?;
    if req.destination_path.as_deref().is_some_and(|d| !d.starts_with('/') || d.contains("..")) {
        return Err(ApiError::bad_request("destination_path must be an absolute path without '..'"));
    }
    let spec =
        CloneSpec { name: req.clone_name, linked: req.linked, destination: req.destination_path.map(Into::into) };
    let vm = h.clone_vm(&id, spec).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.clone", "vm", &vm.id, json!({"source": id})).await;
    Ok(axum::Json(CloneResponse { id: vm.id, name: vm.name, status: vm.state.as_str().into() }))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotDto {
    pub id: String,
    pub name: String,
    pub description: String,
    pub date: Option<chrono::DateTime<chrono::Utc>>,
    pub current: bool,
    pub parent: Option<String>,
    pub state: String,
}

impl From<hangar_hypervisor::Snapshot> for SnapshotDto {
    fn from(s: hangar_hypervisor::Snapshot) -> Self {
        SnapshotDto {
            id: s.id,
            name: s.name,
            description: s.description,
            date: s.created_at,
            current: s.current,
            parent: s.parent,
            state: s.state.as_str().into(),
        }
    }
}

/// Callers holding only the `*_OWN_*` snapshot claim may touch only their own VMs.
async fn vm_for_snapshots(s: &AppState, p: &Principal, id: &str, all_claim: &str) -> R<VmInfo> {
    let vm = host(s)?.get(id).await.map_err(ApiError::from_domain)?;
    if !p.has_claim(all_claim) && vm.owner.as_deref() != Some(p.username.as_str()) {
        return Err(ApiError::forbidden(format!("VM {} is not yours; this needs {all_claim}", vm.name)));
    }
    Ok(vm)
}

#[utoipa::path(get, path = "/machines/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)), responses((status = 200, body = Vec<SnapshotDto>)))]
async fn list_snapshots(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<Vec<SnapshotDto>>> {
    let vm = vm_for_snapshots(&s, ctx.caller()?, &id, LIST_SNAPSHOT_VM).await?;
    let list = host(&s)?.snapshots(&vm.id).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(list.into_iter().map(Into::into).collect()))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    pub snapshot_name: String,
    #[serde(default)]
    pub snapshot_description: String,
}

#[utoipa::path(post, path = "/machines/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)), request_body = CreateSnapshotRequest, responses((status = 201, body = SnapshotDto)))]
async fn create_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<CreateSnapshotRequest>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let vm = vm_for_snapshots(&s, ctx.caller()?, &id, CREATE_SNAPSHOT_VM).await?;
    if req.snapshot_name.trim().is_empty() || req.snapshot_name.len() > 200 {
        return Err(ApiError::bad_request("snapshot_name must be 1 to 200 characters"));
    }
    let snap = host(&s)?
        .snapshot(&vm.id, SnapshotOp::Create { name: req.snapshot_name, description: req.snapshot_description })
        .await
        .map_err(ApiError::from_domain)?;
    let body = snap.map(|s| serde_json::to_value(SnapshotDto::from(s)).unwrap_or(Value::Null)).unwrap_or(Value::Null);
    let _ = s.identity.record(&ctx.actor, "vm.snapshot.create", "vm", &vm.id, json!({})).await;
    Ok((StatusCode::CREATED, axum::Json(body)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DeleteSnapshotQuery {
    #[serde(default)]
    pub delete_children: bool,
}

#[utoipa::path(delete, path = "/machines/{id}/snapshots/{snapshot_id}", tag = "snapshots", params(("id" = String, Path), ("snapshot_id" = String, Path), DeleteSnapshotQuery), responses((status = 202)))]
async fn delete_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, sid)): Path<(String, String)>,
    Query(q): Query<DeleteSnapshotQuery>,
) -> R<StatusCode> {
    let vm = vm_for_snapshots(&s, ctx.caller()?, &id, DELETE_SNAPSHOT_VM).await?;
    host(&s)?
        .snapshot(&vm.id, SnapshotOp::Delete { snapshot_id: sid, delete_children: q.delete_children })
        .await
        .map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.snapshot.delete", "vm", &vm.id, json!({})).await;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(delete, path = "/machines/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)), responses((status = 202)))]
async fn delete_all_snapshots(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let vm = vm_for_snapshots(&s, ctx.caller()?, &id, DELETE_ALL_SNAPSHOTS_VM).await?;
    host(&s)?.snapshot(&vm.id, SnapshotOp::DeleteAll).await.map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.snapshot.delete_all", "vm", &vm.id, json!({})).await;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RevertRequest {
    #[serde(default)]
    pub skip_resume: bool,
}

#[utoipa::path(post, path = "/machines/{id}/snapshots/{snapshot_id}/revert", tag = "snapshots", params(("id" = String, Path), ("snapshot_id" = String, Path)), request_body = RevertRequest, responses((status = 202)))]
async fn revert_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, sid)): Path<(String, String)>,
    body: Bytes,
) -> R<StatusCode> {
    let vm = vm_for_snapshots(&s, ctx.caller()?, &id, REVERT_SNAPSHOT_VM).await?;
    let skip = if body.iter().all(|b| b.is_ascii_whitespace()) {
        false
    } else {
        serde_json::from_slice::<RevertRequest>(&body)
            .map_err(|e| ApiError::bad_request(format!("The body is not a revert request: {e}")))?
            .skip_resume
    };
    host(&s)?
        .snapshot(&vm.id, SnapshotOp::Revert { snapshot_id: sid, skip_resume: skip })
        .await
        .map_err(ApiError::from_domain)?;
    let _ = s.identity.record(&ctx.actor, "vm.snapshot.revert", "vm", &vm.id, json!({})).await;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub logical_cpu_count: u32,
    /// MiB.
    pub memory_size: f64,
    /// MiB.
    pub disk_size: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HardwareResponse {
    pub cpu_type: String,
    pub cpu_brand: String,
    pub devops_version: String,
    pub os_name: String,
    pub os_version: String,
    pub hypervisor: String,
    pub hypervisor_version: String,
    pub acceleration: String,
    pub parallels_desktop_version: String,
    pub parallels_desktop_licensed: bool,
    pub total: Resources,
    pub system_reserved: Resources,
    pub total_in_use: Resources,
    pub total_reserved: Resources,
    pub total_available: Resources,
    pub running_vms: usize,
    pub mac_vms_running: usize,
    pub enabled_modules: Vec<String>,
}

/// Host hardware: total, system-reserved, in-use and available cpu, memory and disk.
#[utoipa::path(get, path = "/config/hardware", tag = "config", responses((status = 200, body = HardwareResponse)))]
async fn hardware(State(s): State<AppState>) -> R<axum::Json<HardwareResponse>> {
    let h = host(&s)?;
    let hw = h.hardware().await.map_err(ApiError::from_domain)?;
    let res = |c: u32, m: u64, d: u64| Resources { logical_cpu_count: c, memory_size: m as f64, disk_size: d as f64 };
    let is_prl = hw.info.hypervisor == hangar_hypervisor::HypervisorKind::Parallels;
    Ok(axum::Json(HardwareResponse {
        cpu_type: hw.info.architecture.clone(),
        cpu_brand: hw.info.cpu_brand.clone(),
        devops_version: s.info.version.clone(),
        os_name: hw.info.os_name.clone(),
        os_version: hw.info.os_version.clone(),
        hypervisor: hw.info.hypervisor.to_string(),
        hypervisor_version: hw.info.version.clone(),
        acceleration: hw.info.acceleration.clone(),
        parallels_desktop_version: if is_prl { hw.info.version.clone() } else { String::new() },
        parallels_desktop_licensed: is_prl && hw.info.licensed,
        total: res(hw.total_cpu, hw.total_memory_mb, hw.total_disk_mb),
        system_reserved: res(hw.reserved_cpu, hw.reserved_memory_mb, hw.reserved_disk_mb),
        total_in_use: res(hw.in_use_cpu, hw.in_use_memory_mb, hw.in_use_disk_mb),
        total_reserved: res(
            hw.reserved_cpu + hw.in_use_cpu,
            hw.reserved_memory_mb + hw.in_use_memory_mb,
            hw.reserved_disk_mb + hw.in_use_disk_mb,
        ),
        total_available: res(hw.available_cpu, hw.available_memory_mb, hw.available_disk_mb),
        running_vms: hw.running_vms,
        mac_vms_running: hw.mac_vms_running,
        enabled_modules: s.info.modules.iter().filter(|m| m.enabled).map(|m| m.name.clone()).collect(),
    }))
}

/// Whether a caller may see a job (host or orchestrator): its own, or all with JOB_MANAGER_LIST.
pub(crate) fn job_visible(p: &Principal, j: &Job) -> bool {
    p.has_claim(JOB_MANAGER_LIST) || j.owner == p.user_id
}

#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = Vec<Object>)))]
async fn list_jobs(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<Vec<Job>>> {
    let p = ctx.caller()?;
    let h = host(&s)?;
    Ok(axum::Json(h.jobs.list(None).into_iter().filter(|j| job_visible(p, j)).collect()))
}

#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn get_job(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<Job>> {
    let p = ctx.caller()?;
    let h = host(&s)?;
    h.jobs
        .get(&id)
        .filter(|j| job_visible(p, j))
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("Job {id:?} not found")))
}

#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 202), (status = 409, body = ApiErrorBody)))]
async fn delete_job(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    let p = ctx.caller()?;
    let h = host(&s)?;
    let j = h
        .jobs
        .get(&id)
        .filter(|j| job_visible(p, j))
        .ok_or_else(|| ApiError::not_found(format!("Job {id:?} not found")))?;
    h.jobs.remove(&j.id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}
