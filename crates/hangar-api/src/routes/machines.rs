//! VM routes, in the shapes the reference's clients read (`ID`, `Name`, `State`,
//! `Hardware.memory.size` as `"2048Mb"`, ...). Each operation on a VM is one handler,
//! mounted on the host (`/machines/...`) and through the orchestrator
//! (`/orchestrator/machines/...` and `/orchestrator/hosts/{id}/machines/...`, see
//! [`crate::mount`]). A handler parses the request into a [`VmCall`], hands it to the host
//! module or the orchestrator with the caller, and shapes the [`VmReply`]: the services
//! decide access (the one rule of `hangar_core::vm`) and write the audit entries.
//! Also here: creating on a host, `/config/hardware` and `/jobs`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hangar_core::claims::*;
use hangar_core::{Access, Principal, VmAction};
use hangar_host::{Host, ImageSource, Job};
use hangar_hypervisor::{PowerOp, RegisterSpec};
use hangar_orchestrator::HttpOrchestrator;
use hangar_provision::{CatalogImage, ProvisionRequest, Provisioner, PullSource, VmSpec};
use hangar_wire::{
    CloneRequest, CloneResponse, CreateMachineRequest, CreateMachineResponse, CreateSnapshotRequest, ExecuteRequest,
    ExecuteResponse, HardwareResponse, Machine, MachineStatus, RegisterRequest, RenameRequest, Resources,
    RevertRequest, SetRequest, SetResponse, SnapshotDto, UploadRequest, VmCall, VmReply,
};
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Query};
use crate::mount::{At, Places, Where};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    use Places::{Fleet, FleetAndHosts};
    let a = VmAction::access;
    let (s, p, upload_raw) = routes!(upload_bytes);
    api.add_at(a(VmAction::List), FleetAndHosts, routes!(list_machines))
        .add_at(a(VmAction::Get), FleetAndHosts, routes!(get_machine))
        .add_at(a(VmAction::Status), FleetAndHosts, routes!(machine_status))
        .add_at(a(VmAction::Delete), FleetAndHosts, routes!(delete_machine))
        .add_at(a(VmAction::Unregister), FleetAndHosts, routes!(unregister_machine))
        .add_at(a(VmAction::Start), FleetAndHosts, routes!(start))
        .add_at(a(VmAction::Stop), FleetAndHosts, routes!(stop))
        .add_at(a(VmAction::Kill), FleetAndHosts, routes!(kill))
        .add_at(a(VmAction::Restart), FleetAndHosts, routes!(restart))
        .add_at(a(VmAction::Pause), FleetAndHosts, routes!(pause))
        .add_at(a(VmAction::Resume), FleetAndHosts, routes!(resume))
        .add_at(a(VmAction::Reset), FleetAndHosts, routes!(reset))
        .add_at(a(VmAction::Suspend), FleetAndHosts, routes!(suspend))
        .add_at(a(VmAction::Set), FleetAndHosts, routes!(set_machine))
        .add_at(a(VmAction::Execute), FleetAndHosts, routes!(execute))
        .add_at(a(VmAction::Upload), FleetAndHosts, routes!(upload_host_file))
        .add_at(a(VmAction::Rename), FleetAndHosts, routes!(rename))
        .add_at(a(VmAction::Clone), FleetAndHosts, routes!(clone_machine))
        .add_at(a(VmAction::SnapshotList), FleetAndHosts, routes!(list_snapshots))
        .add_at(a(VmAction::SnapshotCreate), FleetAndHosts, routes!(create_snapshot))
        .add_at(a(VmAction::SnapshotDelete), FleetAndHosts, routes!(delete_snapshot))
        .add_at(a(VmAction::SnapshotDeleteAll), FleetAndHosts, routes!(delete_all_snapshots))
        .add_at(a(VmAction::SnapshotRevert), FleetAndHosts, routes!(revert_snapshot))
        .add(a(VmAction::Create), routes!(create_machine))
        .add(a(VmAction::Create), routes!(create_machine_async))
        .add_at(a(VmAction::Register), Places::Hosts, routes!(register_machine))
        .add(a(VmAction::Upload), (s, p, upload_raw.layer(DefaultBodyLimit::max(512 << 20))))
        .add(Access::AllOf(&[LIST]), routes!(hardware))
        .add(Access::Authenticated, routes!(parallels_license))
        .add_at(Access::AnyOf(&[JOB_MANAGER_LIST, JOB_MANAGER_LIST_OWN]), Fleet, routes!(list_jobs))
        .add_at(Access::AnyOf(&[JOB_MANAGER_LIST, JOB_MANAGER_LIST_OWN]), Fleet, routes!(get_job))
        .add_at(Access::AnyOf(&[JOB_MANAGER_DELETE, JOB_MANAGER_LIST_OWN]), Fleet, routes!(delete_job))
        .add_at(Access::AnyOf(&[JOB_MANAGER_DELETE, JOB_MANAGER_LIST_OWN]), Fleet, routes!(cleanup_jobs))
}

pub(crate) fn host(s: &AppState) -> R<&Arc<Host>> {
    s.host.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The host module is not running on this server; see GET /health/system",
        )
    })
}

pub(crate) fn orchestrator(s: &AppState) -> R<&Arc<HttpOrchestrator>> {
    s.orchestrator.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The orchestrator module is not running on this server; see GET /health/system",
        )
    })
}

/// Run `call` where the route was called: on this host, or through the orchestrator.
async fn run(s: &AppState, ctx: &RequestContext, at: &At, call: VmCall) -> R<VmReply> {
    let p = ctx.caller()?;
    let vm = at.vm()?;
    match &at.place {
        Where::Local => host(s)?.run(p, &ctx.actor, vm, call).await.map_err(ApiError::from_domain),
        Where::Fleet(h) => {
            orchestrator(s)?.run(p, &ctx.actor, h.as_deref(), vm, call).await.map_err(ApiError::from_domain)
        }
    }
}

/// The answer: the reply as JSON with `status`, or `status` alone when there is no body.
fn answer(status: StatusCode, reply: VmReply) -> Response {
    match reply {
        VmReply::Done => status.into_response(),
        r => (status, axum::Json(r)).into_response(),
    }
}

async fn call(s: &AppState, ctx: &RequestContext, at: &At, status: StatusCode, c: VmCall) -> R<Response> {
    Ok(answer(status, run(s, ctx, at, c).await?))
}

/// `X-Filter: <property>=<regex>[,i]`, applied to a list's items as JSON objects: the
/// items whose property matches are kept (all of them without the header). Each item is
/// turned into JSON on its own to be matched and then dropped, so a long list is never held
/// as JSON values (a `FleetMachine` as a `Value` takes tens of KB; 10,000 of them took
/// ~430 MB in `bench/fleet.sh`).
fn filter_items<T: serde::Serialize>(headers: &HeaderMap, items: Vec<T>) -> R<Vec<T>> {
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
    let matches = |it: &Value| {
        it.as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.to_ascii_lowercase() == prop))
            .map(|(_, v)| match v {
                Value::String(s) => re.is_match(s),
                other => re.is_match(&other.to_string()),
            })
            .unwrap_or(false)
    };
    Ok(items.into_iter().filter(|it| serde_json::to_value(it).is_ok_and(|v| matches(&v))).collect())
}

/// The VMs: of this host, or (through the orchestrator) of every host the caller may use
/// or of one host, each then with its `host_id`. `X-Filter` narrows the list.
#[utoipa::path(get, path = "/machines", tag = "machines", params(("X-Filter" = Option<String>, Header, description = "<property>=<regex>[,i]")),
    responses((status = 200, body = Vec<Machine>, description = "On the host: `Machine`s; through the orchestrator: `FleetMachine`s")))]
async fn list_machines(State(s): State<AppState>, ctx: RequestContext, at: At, headers: HeaderMap) -> R<Response> {
    let p = ctx.caller()?;
    Ok(match &at.place {
        Where::Local => {
            let items = host(&s)?.machines(p).await.map_err(ApiError::from_domain)?;
            axum::Json(filter_items(&headers, items)?).into_response()
        }
        Where::Fleet(h) => {
            let items = orchestrator(&s)?.machines(p, h.as_deref()).await.map_err(ApiError::from_domain)?;
            axum::Json(filter_items(&headers, items)?).into_response()
        }
    })
}

#[utoipa::path(get, path = "/machines/{id}", tag = "machines", params(("id" = String, Path, description = "VM id or name")),
    responses((status = 200, body = Machine, description = "On the host: a `Machine`; through the orchestrator: a `FleetMachine`"), (status = 404, body = ApiErrorBody)))]
async fn get_machine(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::Get).await
}

#[utoipa::path(get, path = "/machines/{id}/status", tag = "machines", params(("id" = String, Path)), responses((status = 200, body = MachineStatus)))]
async fn machine_status(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::Status).await
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
    at: At,
    Query(q): Query<ForceQuery>,
) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::ACCEPTED, VmCall::Delete { force: q.force }).await
}

#[utoipa::path(post, path = "/machines/{id}/unregister", tag = "machines", params(("id" = String, Path)), responses((status = 202)))]
async fn unregister_machine(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::ACCEPTED, VmCall::Unregister).await
}

async fn power(s: &AppState, ctx: &RequestContext, at: &At, op: PowerOp) -> R<Response> {
    call(s, ctx, at, StatusCode::OK, VmCall::Power(op)).await
}

/// Start the VM. Also answers `GET`, which the reference's GitHub Action (host mode)
/// and Jenkins plugin send (the reference answered them 405).
#[utoipa::path(method(put, get), path = "/machines/{id}/start", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`"), (status = 409, body = ApiErrorBody)))]
async fn start(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Start).await
}

/// Stop the VM. Also answers `GET`, which the reference's GitHub Action (host mode)
/// and Jenkins plugin send (the reference answered them 405).
#[utoipa::path(method(put, get), path = "/machines/{id}/stop", tag = "machines", params(("id" = String, Path), ForceQuery),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`"), (status = 409, body = ApiErrorBody)))]
async fn stop(State(s): State<AppState>, ctx: RequestContext, at: At, Query(q): Query<ForceQuery>) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Stop { force: q.force, timeout: Duration::from_secs(60) }).await
}

#[utoipa::path(put, path = "/machines/{id}/kill", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`")))]
async fn kill(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Kill).await
}

#[utoipa::path(put, path = "/machines/{id}/restart", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`")))]
async fn restart(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Restart).await
}

#[utoipa::path(put, path = "/machines/{id}/pause", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`")))]
async fn pause(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Pause).await
}

#[utoipa::path(put, path = "/machines/{id}/resume", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`")))]
async fn resume(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Resume).await
}

#[utoipa::path(put, path = "/machines/{id}/reset", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`")))]
async fn reset(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Reset).await
}

#[utoipa::path(put, path = "/machines/{id}/suspend", tag = "machines", params(("id" = String, Path)),
    responses((status = 200, body = MachineStatus, description = "On the host: the VM's status; through the orchestrator: `PowerDone`")))]
async fn suspend(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    power(&s, &ctx, &at, PowerOp::Suspend).await
}

/// Batch changes: `state` (start, stop, pause, resume, suspend, reset, restart, kill),
/// `cpu set N`, `memory set MiB`, `machine rename NAME`, `machine clone NAME`,
/// `machine description TEXT`. Each operation reports its own status.
#[utoipa::path(put, path = "/machines/{id}/set", tag = "machines", params(("id" = String, Path)), request_body = SetRequest, responses((status = 200, body = SetResponse)))]
async fn set_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<SetRequest>,
) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::Set(req)).await
}

#[utoipa::path(put, path = "/machines/{id}/execute", tag = "machines", params(("id" = String, Path)), request_body = ExecuteRequest,
    responses((status = 200, body = ExecuteResponse), (status = 409, body = ApiErrorBody, description = "The VM is not running")))]
async fn execute(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<ExecuteRequest>,
) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::Execute(req)).await
}

/// The reference's upload: copy a file that is already on the host into the guest.
#[utoipa::path(post, path = "/machines/{id}/upload", tag = "machines", params(("id" = String, Path)), request_body = UploadRequest,
    responses((status = 204), (status = 403, body = ApiErrorBody, description = "Outside the upload folder, or host-path uploads disabled")))]
async fn upload_host_file(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<UploadRequest>,
) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::NO_CONTENT, VmCall::Upload(req)).await
}

#[utoipa::path(put, path = "/machines/{id}/rename", tag = "machines", params(("id" = String, Path)), request_body = RenameRequest, responses((status = 200, body = Machine)))]
async fn rename(State(s): State<AppState>, ctx: RequestContext, at: At, Json(req): Json<RenameRequest>) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::Rename(req)).await
}

/// Clone a VM on its host; the clone is made stopped and belongs to the caller.
#[utoipa::path(put, path = "/machines/{id}/clone", tag = "machines", params(("id" = String, Path)), request_body = CloneRequest, responses((status = 200, body = CloneResponse)))]
async fn clone_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<CloneRequest>,
) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::Clone(req)).await
}

#[utoipa::path(get, path = "/machines/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)), responses((status = 200, body = Vec<SnapshotDto>)))]
async fn list_snapshots(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::OK, VmCall::SnapshotList).await
}

#[utoipa::path(post, path = "/machines/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)), request_body = CreateSnapshotRequest,
    responses((status = 201, body = Option<SnapshotDto>)))]
async fn create_snapshot(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<CreateSnapshotRequest>,
) -> R<Response> {
    let reply = run(&s, &ctx, &at, VmCall::SnapshotCreate(req)).await?;
    // `null` when the driver made the snapshot without describing it (as before).
    Ok((StatusCode::CREATED, axum::Json(reply)).into_response())
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
    at: At,
    Query(q): Query<DeleteSnapshotQuery>,
) -> R<Response> {
    let snapshot_id = at.param("snapshot_id")?.to_string();
    let c = VmCall::SnapshotDelete { snapshot_id, delete_children: q.delete_children };
    call(&s, &ctx, &at, StatusCode::ACCEPTED, c).await
}

#[utoipa::path(delete, path = "/machines/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)), responses((status = 202)))]
async fn delete_all_snapshots(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<Response> {
    call(&s, &ctx, &at, StatusCode::ACCEPTED, VmCall::SnapshotDeleteAll).await
}

/// The body is optional (`{skip_resume}`).
#[utoipa::path(post, path = "/machines/{id}/snapshots/{snapshot_id}/revert", tag = "snapshots", params(("id" = String, Path), ("snapshot_id" = String, Path)), request_body = RevertRequest, responses((status = 202)))]
async fn revert_snapshot(State(s): State<AppState>, ctx: RequestContext, at: At, body: Bytes) -> R<Response> {
    let request = if body.iter().all(|b| b.is_ascii_whitespace()) {
        RevertRequest::default()
    } else {
        serde_json::from_slice::<RevertRequest>(&body)
            .map_err(|e| ApiError::bad_request(format!("The body is not a revert request: {e}")))?
    };
    let snapshot_id = at.param("snapshot_id")?.to_string();
    call(&s, &ctx, &at, StatusCode::ACCEPTED, VmCall::SnapshotRevert { snapshot_id, request }).await
}

// ----- creating on this host -----------------------------------------------------------

/// What a VM is made from: a catalog image (pulled through the host cache by
/// `hangar_provision`, the catalog module deciding the caller's access and the manifest's
/// taint) or a local image.
enum ImageFrom {
    Catalog(Provisioner, CatalogImage),
    Local(String),
}

/// Parse what to create the VM from: the image a `catalog_manifest` names, or the local `image`.
fn image_from(s: &AppState, h: &Arc<Host>, req: &CreateMachineRequest) -> R<ImageFrom> {
    if let Some(m) = &req.catalog_manifest {
        let catalog = s.catalog.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "catalog_manifest needs the catalog module on this server, which is not running; use image",
            )
        })?;
        let catalog_id = m.catalog_id.trim().to_string();
        if catalog_id.is_empty() {
            return Err(ApiError::bad_request("catalog_manifest.catalog_id is required"));
        }
        let field = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        let version = field(&m.version).unwrap_or_else(|| "latest".into());
        let arch_text = field(&m.architecture).or_else(|| field(&req.architecture)).unwrap_or_else(|| "x86_64".into());
        let arch: hangar_core::Architecture =
            arch_text.parse().map_err(|e: hangar_core::UnknownArchitecture| ApiError::bad_request(e.to_string()))?;
        // A `connection` names another catalog server: pull through its API with the
        // connection's credentials (that server decides access); else this server's catalog.
        // `catalog_manager_id` names one of the caller's catalog managers, whose stored
        // credentials are used.
        let connection = m.connection.as_ref().map(|c| c.expose().trim()).filter(|c| !c.is_empty());
        let source = match (connection, field(&m.catalog_manager_id)) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("connection and catalog_manager_id cannot both be provided"));
            }
            (Some(text), None) => {
                PullSource::Connection(hangar_catalog::CatalogConnection::parse(text).map_err(ApiError::from_domain)?)
            }
            (None, Some(id)) => PullSource::Manager { id, op: None },
            (None, None) => PullSource::Catalog,
        };
        let provisioner = Provisioner::new(h.clone(), catalog.clone());
        return Ok(ImageFrom::Catalog(provisioner, CatalogImage { catalog_id, version, arch, source }));
    }
    let image = req.image.clone().ok_or_else(|| {
        ApiError::bad_request("Say what to create the VM from: image (a local image name) or catalog_manifest")
    })?;
    Ok(ImageFrom::Local(image))
}

fn vm_spec(req: CreateMachineRequest) -> R<VmSpec> {
    if req.packer_template.is_some() || req.vagrant_box.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "packer_template and vagrant_box are not supported; use image or catalog_manifest",
        ));
    }
    if let Some(a) = req.architecture.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
        a.parse::<hangar_core::Architecture>()
            .map_err(|e: hangar_core::UnknownArchitecture| ApiError::bad_request(e.to_string()))?;
    }
    let specs = req.specs.unwrap_or_default();
    let host_user = req.owner.clone().filter(|o| !o.is_empty());
    Ok(VmSpec {
        name: req.name,
        cpus: specs.cpu.0.map(|v| v.min(1024) as u32),
        memory_mb: specs.memory.0,
        disk_bytes: specs.disk.0.map(|m| m.saturating_mul(1 << 20)),
        owner: req.hangar_owner.filter(|o| !o.is_empty()).or(req.owner),
        host_user,
        description: Some(req.description.unwrap_or_default()),
        start: req.start_on_create,
    })
}

fn owner_of(p: &Principal, spec: &VmSpec) -> String {
    spec.owner.clone().filter(|o| !o.trim().is_empty()).unwrap_or_else(|| p.username.clone())
}

#[utoipa::path(post, path = "/machines", tag = "machines", request_body = CreateMachineRequest,
    responses((status = 200, body = CreateMachineResponse), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn create_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateMachineRequest>,
) -> R<axum::Json<CreateMachineResponse>> {
    let h = host(&s)?;
    let p = ctx.caller()?;
    let from = image_from(&s, h, &req)?;
    let vm = vm_spec(req)?;
    let owner = owner_of(p, &vm);
    let vm = match from {
        ImageFrom::Local(image) => h
            .create_for(p, &ctx.actor, vm.create_request(ImageSource::Local(image)))
            .await
            .map_err(ApiError::from_domain)?,
        ImageFrom::Catalog(provisioner, image) => {
            let checked = provisioner.check(p, ProvisionRequest { image, vm }).await.map_err(ApiError::from_domain)?;
            provisioner.run(p, &ctx.actor, checked, None).await.map_err(ApiError::from_domain)?.vm
        }
    };
    Ok(axum::Json(CreateMachineResponse { id: vm.id, name: vm.name, owner, current_state: vm.state.as_str().into() }))
}

#[utoipa::path(post, path = "/machines/async", tag = "machines", request_body = CreateMachineRequest,
    responses((status = 202, body = Job, description = "The job; follow it at /jobs/{id}")))]
async fn create_machine_async(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateMachineRequest>,
) -> R<(StatusCode, axum::Json<Job>)> {
    let h = host(&s)?;
    let p = ctx.caller()?;
    let from = image_from(&s, h, &req)?;
    let vm = vm_spec(req)?;
    let job = match from {
        ImageFrom::Local(image) => h
            .create_async_for(p, &ctx.actor, vm.create_request(ImageSource::Local(image)))
            .await
            .map_err(ApiError::from_domain)?,
        ImageFrom::Catalog(provisioner, image) => {
            let checked = provisioner.check(p, ProvisionRequest { image, vm }).await.map_err(ApiError::from_domain)?;
            provisioner.pull_then_create_job(p, &ctx.actor, checked).await.map_err(ApiError::from_domain)?
        }
    };
    Ok((StatusCode::ACCEPTED, axum::Json(job)))
}

/// Register an existing VM bundle; the owner is the caller unless a SUPER_USER names another.
/// Also per host through the orchestrator (`/orchestrator/hosts/{id}/machines/register`).
#[utoipa::path(post, path = "/machines/register", tag = "machines", request_body = RegisterRequest, responses((status = 200, body = Machine)))]
async fn register_machine(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(req): Json<RegisterRequest>,
) -> R<axum::Json<Machine>> {
    if let Some(on) = at.place.host() {
        let m = orchestrator(&s)?.register_on_host(ctx.caller()?, &ctx.actor, on, req).await;
        return m.map(axum::Json).map_err(ApiError::from_domain);
    }
    let h = host(&s)?;
    let spec = RegisterSpec { name: req.machine_name, owner: req.owner, regenerate_id: req.regenerate_source_uuid };
    let path = std::path::PathBuf::from(&req.path);
    let vm = h.register_for(ctx.caller()?, &ctx.actor, &path, spec).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(h.machine(vm).await.map_err(ApiError::from_domain)?))
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
    at: At,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> R<StatusCode> {
    host(&s)?
        .upload_bytes(ctx.caller()?, &ctx.actor, at.vm()?, &body, &q.remote_path)
        .await
        .map_err(ApiError::from_domain)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The Parallels Desktop licence (the reference's shape; key and serial never sent). A host
/// that runs QEMU answers status `NOT_APPLICABLE`. Unlike the reference, it needs a login.
#[utoipa::path(get, path = "/config/parallels-desktop/license", tag = "config", responses((status = 200, body = hangar_wire::ParallelsDesktopLicense)))]
async fn parallels_license(State(s): State<AppState>) -> R<axum::Json<hangar_wire::ParallelsDesktopLicense>> {
    Ok(axum::Json(host(&s)?.license().await.map_err(ApiError::from_domain)?))
}

/// The reverse_proxy module's state as `/config/hardware` reports it (disabled and empty
/// when the module does not run).
async fn hardware_reverse_proxy(s: &AppState) -> R<hangar_wire::HardwareReverseProxy> {
    let Some(m) = s.reverse_proxy.as_ref() else {
        return Ok(hangar_wire::HardwareReverseProxy::default());
    };
    let cfg = m.config().await.map_err(ApiError::from_domain)?;
    Ok(hangar_wire::HardwareReverseProxy {
        enabled: cfg.enabled,
        host: cfg.host.clone(),
        port: cfg.port.map(|p| p.to_string()).unwrap_or_default(),
        // The private key (PEM or path) is never answered, as on `/reverse-proxy/hosts`.
        hosts: cfg
            .hosts
            .into_iter()
            .filter_map(|mut h| {
                h.tls.key = String::new();
                let mut v = serde_json::to_value(h).ok()?;
                ports_as_text(&mut v);
                Some(v)
            })
            .collect(),
    })
}

/// The reference's proxy hosts carry `port` and `target_port` as texts (a Go client decodes
/// them into strings and fails on a number).
fn ports_as_text(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                if (k == "port" || k == "target_port") && item.is_number() {
                    *item = Value::String(item.to_string());
                } else if (k == "port" || k == "target_port") && item.is_null() {
                    *item = Value::String(String::new());
                } else {
                    ports_as_text(item);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(ports_as_text),
        _ => {}
    }
}

/// Host hardware: total, system-reserved, in-use and available cpu, memory and disk, in
/// the reference's `SystemUsageResponse` keys (`disk_count`, `is_reverse_proxy_enabled`,
/// `reverse_proxy`, ...) on both drivers.
#[utoipa::path(get, path = "/config/hardware", tag = "config", responses((status = 200, body = HardwareResponse)))]
async fn hardware(State(s): State<AppState>) -> R<axum::Json<HardwareResponse>> {
    let h = host(&s)?;
    let hw = h.hardware().await.map_err(ApiError::from_domain)?;
    let is_prl = hw.info.hypervisor == hangar_hypervisor::HypervisorKind::Parallels;
    let reverse_proxy = hardware_reverse_proxy(&s).await?;
    Ok(axum::Json(HardwareResponse {
        external_ip_address: String::new(),
        is_reverse_proxy_enabled: reverse_proxy.enabled,
        is_log_streaming_enabled: true,
        reverse_proxy,
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
        total: Resources::new(hw.total_cpu, hw.total_memory_mb, hw.total_disk_mb),
        system_reserved: Resources::new(hw.reserved_cpu, hw.reserved_memory_mb, hw.reserved_disk_mb),
        total_in_use: Resources::new(hw.in_use_cpu, hw.in_use_memory_mb, hw.in_use_disk_mb),
        total_reserved: Resources::new(
            hw.reserved_cpu + hw.in_use_cpu,
            hw.reserved_memory_mb + hw.in_use_memory_mb,
            hw.reserved_disk_mb + hw.in_use_disk_mb,
        ),
        total_available: Resources::new(hw.available_cpu, hw.available_memory_mb, hw.available_disk_mb),
        running_vms: hw.running_vms,
        mac_vms_running: hw.mac_vms_running,
        enabled_modules: s.info.modules.iter().filter(|m| m.enabled).map(|m| m.name.clone()).collect(),
    }))
}

// ----- jobs (the host's, or the orchestrator's) ------------------------------------------

fn jobs_at<'a>(s: &'a AppState, at: &At) -> R<&'a hangar_host::Jobs> {
    Ok(match at.place {
        Where::Local => &host(s)?.jobs,
        Where::Fleet(_) => orchestrator(s)?.jobs(),
    })
}

/// The jobs the caller may see: its own, or all with JOB_MANAGER_LIST.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = Vec<Job>)))]
async fn list_jobs(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<Vec<Job>>> {
    Ok(axum::Json(jobs_at(&s, &at)?.list_for(ctx.caller()?)))
}

/// One job: state, progress, message, and the result (the created VM).
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, body = Job), (status = 404, body = ApiErrorBody)))]
async fn get_job(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<Job>> {
    Ok(axum::Json(jobs_at(&s, &at)?.get_for(ctx.caller()?, at.param("id")?).map_err(ApiError::from_domain)?))
}

/// Forget a finished job (409 while it runs): one's own, or any with JOB_MANAGER_DELETE.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 202), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_job(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    jobs_at(&s, &at)?.remove_for(ctx.caller()?, at.param("id")?).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

/// Forget every finished job the caller may delete: its own, or all with JOB_MANAGER_DELETE.
/// Running jobs stay. 200 with no body, as the reference answers.
#[utoipa::path(delete, path = "/jobs/cleanup", tag = "jobs", responses((status = 200, description = "Finished jobs removed")))]
async fn cleanup_jobs(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    jobs_at(&s, &at)?.cleanup_for(ctx.caller()?).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::OK)
}
