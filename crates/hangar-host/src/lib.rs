//! The host module: the VMs of one host.
//!
//! [`Host`] wraps one `dyn Hypervisor` (QEMU or Parallels, chosen by [`open_driver`]) and
//! adds what the API needs on top of a driver: VM ownership, local images by name, async
//! creation as a [`jobs::Job`] with weighted steps, host hardware with the system
//! reservation, and the translation of driver events into `pdfm` events on the bus.
//! It knows nothing about HTTP.

pub mod commands;
/// The job machinery (its own crate, shared with the orchestrator).
pub use hangar_jobs as jobs;
pub mod owners;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::audit::Actor;
use hangar_core::vm::{VmAction, authorize, owner_for};
use hangar_core::{Classify, ErrorKind, Event, EventBus, EventType, Principal};
use hangar_hypervisor::{
    CreateSpec, ExecRequest, HostInfo, Hypervisor, HypervisorError, HypervisorKind, PowerOp, RegisterSpec, VmEvent,
    VmInfo, VmState,
};
use serde::Serialize;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

pub use commands::SetOp;
pub use hangar_jobs::{Job, JobHandle, JobState, Jobs, JobsError};
pub use owners::Owners;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Jobs(#[from] JobsError),
    /// The store refused a write (an audit entry or an owner record): the change is not made.
    #[error("The change was not made: {0}")]
    Store(#[from] hangar_store::StoreError),
    /// Well-formed but not something this host does.
    #[error("{0}")]
    Unsupported(String),
    /// The VM's state does not allow the request.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl Classify for HostError {
    fn kind(&self) -> ErrorKind {
        match self {
            HostError::Hypervisor(e) => e.kind(),
            HostError::Invalid(_) => ErrorKind::BadRequest,
            HostError::NotFound(_) => ErrorKind::NotFound,
            HostError::Forbidden(_) => ErrorKind::Forbidden,
            HostError::Unavailable(_) => ErrorKind::Unavailable,
            HostError::Jobs(e) => e.kind(),
            HostError::Store(hangar_store::StoreError::Conflict(_)) => ErrorKind::Conflict,
            // The change was refused before it was made: retrying later may work.
            HostError::Store(_) => ErrorKind::Unavailable,
            HostError::Unsupported(_) => ErrorKind::Unprocessable,
            HostError::Conflict(_) => ErrorKind::Conflict,
            HostError::Internal(_) => ErrorKind::Internal,
        }
    }
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;

/// The one rule for a VM key (an id or a name) given by a caller, checked before any
/// driver sees it: 1 to 255 characters, no control character (NUL included), no `/` or
/// `\\`, and not starting with `-` (a driver's tool would read it as an option).
pub fn check_vm_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 255
        && !key.starts_with('-')
        && !key.chars().any(|c| c.is_control() || c == '/' || c == '\\');
    if ok {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "VM id or name {:?} is invalid: give a VM's id or name (1 to 255 characters, no control characters, '/' or '\\', not starting with '-')",
            key.chars().take(64).collect::<String>()
        )))
    }
}

/// Which driver to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    Auto,
    Qemu,
    Parallels,
}

impl std::str::FromStr for DriverChoice {
    type Err = HostError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(DriverChoice::Auto),
            "qemu" | "kvm" => Ok(DriverChoice::Qemu),
            "parallels" | "prlctl" => Ok(DriverChoice::Parallels),
            other => Err(HostError::Invalid(format!("HYPERVISOR={other:?}: use auto, qemu or parallels"))),
        }
    }
}

/// How the QEMU driver accelerates guests (`QEMU_ACCELERATION`: auto, kvm or tcg).
pub use hangar_qemu::Acceleration;

/// Settings of the host module.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub driver: DriverChoice,
    /// Folder of QEMU VMs.
    pub vms_dir: PathBuf,
    /// Folder of local images, each a sub-folder addressed by name in create requests.
    pub images_dir: PathBuf,
    pub prlctl: Option<PathBuf>,
    pub prlsrvctl: Option<PathBuf>,
    pub qemu_binary: Option<PathBuf>,
    /// `QEMU_ACCELERATION`.
    pub acceleration: Acceleration,
    /// Bridge QEMU VMs join (`QEMU_NETWORK_BRIDGE`); `None` is user-mode networking.
    pub qemu_bridge: Option<String>,
    /// `SYSTEM_RESERVED_CPU`, `_MEMORY` (MiB), `_DISK` (MiB).
    pub reserved_cpu: u32,
    pub reserved_memory_mb: u64,
    pub reserved_disk_mb: u64,
    /// Folder whose files `POST /machines/{id}/upload {path}` may copy into guests;
    /// `None` disables host-path uploads.
    pub upload_root: Option<PathBuf>,
    /// Folder of the pid files of the driver's long-lived helpers (`<data>/run/helpers`),
    /// swept at start so helpers a killed agent left behind are stopped (`hangar_proc`).
    pub helpers_dir: Option<PathBuf>,
}

fn on_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(bin)).find(|f| f.is_file()))
}

/// Open the configured driver. `Auto` takes Parallels when `prlctl` is found, QEMU when
/// `qemu-system-x86_64` is, and fails naming what is missing otherwise.
pub async fn open_driver(cfg: &HostConfig) -> Result<Arc<dyn Hypervisor>> {
    let prlctl = cfg.prlctl.clone().or_else(|| on_path("prlctl"));
    let qemu = cfg.qemu_binary.clone().or_else(|| on_path("qemu-system-x86_64"));
    let choice = match cfg.driver {
        DriverChoice::Auto if prlctl.is_some() => DriverChoice::Parallels,
        DriverChoice::Auto if qemu.is_some() => DriverChoice::Qemu,
        DriverChoice::Auto => {
            return Err(HostError::Unavailable(
                "no hypervisor found: neither prlctl (Parallels Desktop) nor qemu-system-x86_64 is on PATH".into(),
            ));
        }
        c => c,
    };
    match choice {
        DriverChoice::Parallels => {
            let prlctl = prlctl.ok_or_else(|| {
                HostError::Unavailable("HYPERVISOR=parallels but prlctl is not found; set PRLCTL_PATH".into())
            })?;
            let d =
                hangar_parallels::ParallelsDriver::new(parallels_config(cfg, prlctl)).map_err(HostError::Hypervisor)?;
            Ok(Arc::new(d))
        }
        _ => {
            let mut qc = hangar_qemu::QemuConfig::new(&cfg.vms_dir);
            if let Some(q) = qemu {
                qc.qemu_binary = q;
            }
            qc.acceleration = cfg.acceleration;
            qc.bridge = cfg.qemu_bridge.clone();
            std::fs::create_dir_all(&cfg.vms_dir)
                .map_err(|e| HostError::Unavailable(format!("cannot create {}: {e}", cfg.vms_dir.display())))?;
            let d = hangar_qemu::QemuDriver::new(qc).await.map_err(HostError::Hypervisor)?;
            Ok(Arc::new(d))
        }
    }
}

/// The Parallels driver's settings for `prlctl` at `prlctl`.
fn parallels_config(cfg: &HostConfig, prlctl: PathBuf) -> hangar_parallels::ParallelsConfig {
    let prlsrvctl = cfg.prlsrvctl.clone().or_else(|| prlctl.parent().map(|d| d.join("prlsrvctl"))).unwrap_or_default();
    hangar_parallels::ParallelsConfig { prlctl, prlsrvctl, run_dir: cfg.helpers_dir.clone(), ..Default::default() }
}

/// What to create a VM from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A local image by name (a folder in the images folder).
    Local(String),
    /// A folder prepared by another module (e.g. the catalog's host cache).
    Folder(PathBuf),
}

/// A create request, after the API parsed it.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub image: ImageSource,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub disk_bytes: Option<u64>,
    /// The Hangar user the VM is for, when the caller names one (only a SUPER_USER may
    /// name another user); the caller otherwise. Shown as its `user` on QEMU hosts.
    pub owner: Option<String>,
    /// The host account that owns the VM on Parallels hosts (a macOS user); only when the
    /// request names one explicitly.
    pub host_user: Option<String>,
    pub description: String,
    pub start: bool,
}

/// Host hardware with the system reservation and what VMs use.
#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    pub info: HostInfo,
    pub total_cpu: u32,
    pub total_memory_mb: u64,
    pub total_disk_mb: u64,
    pub reserved_cpu: u32,
    pub reserved_memory_mb: u64,
    pub reserved_disk_mb: u64,
    pub in_use_cpu: u32,
    pub in_use_memory_mb: u64,
    pub in_use_disk_mb: u64,
    pub available_cpu: u32,
    pub available_memory_mb: u64,
    pub available_disk_mb: u64,
    pub running_vms: usize,
    pub mac_vms_running: usize,
}

/// The host module.
pub struct Host {
    hv: Arc<dyn Hypervisor>,
    pub jobs: Jobs,
    owners: Owners,
    config: HostConfig,
}

/// Whether `name` may name a new VM (the check a create makes before any work).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c))
        && !name.starts_with('.')
        && name.trim() == name;
    if ok {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "VM name {name:?} is invalid: use 1 to 100 letters, digits, spaces, '-', '_' or '.'"
        )))
    }
}

impl Host {
    /// Wrap a driver and start forwarding its events to the bus. `jobs` is the host's job
    /// set, opened on the store ([`Jobs::open`]).
    /// `store` keeps the VMs' owner records and the audit entries of VM changes.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        jobs: Jobs,
        store: Arc<dyn hangar_store::Store>,
        bus: EventBus,
        config: HostConfig,
    ) -> Arc<Host> {
        let owners = Owners::new(store);
        let host = Arc::new(Host { hv: hv.clone(), jobs, owners: owners.clone(), config });
        let mut rx = hv.subscribe();
        tokio::spawn(async move {
            // Owners recorded so far, so a VM's last events (its removal, after which its
            // record goes) still reach its owner.
            let mut known: HashMap<String, String> = HashMap::new();
            loop {
                match rx.recv().await {
                    // Each event is about one VM: it reaches only who may see that VM.
                    Ok(e) => {
                        let owner = owners.event_owner(&e, &mut known).await;
                        bus.publish(translate(&e).about_vm(owner));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(dropped = n, "VM events dropped; the driver's reconcile repairs the view");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        host
    }

    pub fn driver(&self) -> &Arc<dyn Hypervisor> {
        &self.hv
    }

    pub fn kind(&self) -> HypervisorKind {
        self.hv.kind()
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>> {
        Ok(self.hv.list().await?)
    }

    pub async fn get(&self, vm: &str) -> Result<VmInfo> {
        check_vm_key(vm)?;
        Ok(self.hv.get(vm).await?)
    }

    fn image_path(&self, source: &ImageSource) -> Result<PathBuf> {
        match source {
            ImageSource::Folder(p) => Ok(p.clone()),
            ImageSource::Local(name) => {
                let ok = !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && !name.starts_with('.');
                if !ok {
                    return Err(HostError::Invalid(format!("image name {name:?} is invalid")));
                }
                let p = self.config.images_dir.join(name);
                if !p.exists() {
                    let known = self.local_images().join(", ");
                    return Err(HostError::NotFound(format!(
                        "no local image {name:?} in {}; known images: {}",
                        self.config.images_dir.display(),
                        if known.is_empty() { "none" } else { &known }
                    )));
                }
                Ok(p)
            }
        }
    }

    /// Names of the local images.
    pub fn local_images(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.config.images_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Create (and optionally start) a VM for `p`, audited as `actor`. The owner is the
    /// caller unless it names another one (only a SUPER_USER may); the owner record and
    /// the audit entry are one batch, written once the VM exists (a refused write removes
    /// the VM again and fails the create).
    pub async fn create_for(&self, p: &Principal, actor: &Actor, req: CreateRequest) -> Result<VmInfo> {
        let owner = self.check_create(p, &req)?;
        self.create(req, owner, actor, None).await
    }

    /// The owner a create gets, after every check that needs no IO.
    fn check_create(&self, p: &Principal, req: &CreateRequest) -> Result<String> {
        authorize(p, VmAction::Create, &req.name, None)?;
        check_name(&req.name)?;
        self.image_path(&req.image)?;
        Ok(owner_for(p, req.owner.as_deref())?)
    }

    async fn create(
        &self,
        req: CreateRequest,
        owner: String,
        actor: &Actor,
        job: Option<&JobHandle>,
    ) -> Result<VmInfo> {
        let image = self.image_path(&req.image)?;
        let span = info_span!("vm_create", name = %req.name, owner = %owner);
        let started = std::time::Instant::now();
        let created = async {
            if let Some(j) = job {
                j.step(0, 0.0, "creating the VM");
            }
            let spec = CreateSpec {
                name: req.name.clone(),
                image,
                cpus: req.cpus.unwrap_or(2).clamp(1, 256),
                memory_mb: req.memory_mb.unwrap_or(2048).clamp(64, 1 << 20),
                disk_bytes: req.disk_bytes,
                description: req.description.clone(),
                owner: match self.hv.kind() {
                    HypervisorKind::Qemu => Some(owner.clone()),
                    HypervisorKind::Parallels => req.host_user.clone(),
                },
                os: None,
            };
            let mut vm = self.hv.create(spec).await?;
            info!(id = %vm.id, "VM created");
            self.record_new_vm(actor, "vm.create", &vm, &owner, json!({"name": vm.name, "owner": owner})).await?;
            if let Some(j) = job {
                j.step(0, 100.0, "created");
            }
            if req.start {
                if let Some(j) = job {
                    j.step(1, 0.0, "starting");
                }
                vm = self.hv.power(&vm.id, PowerOp::Start).await?;
                if let Some(j) = job {
                    j.step(1, 100.0, "started");
                }
            }
            Ok(vm)
        }
        .instrument(span)
        .await;
        // `hangar_vm_creates_total` and `hangar_vm_create_to_ready_seconds`: until the VM
        // exists, is recorded and (when asked) started.
        hangar_metrics::metrics().vm_created(created.is_ok(), started.elapsed());
        created
    }

    /// [`Host::create_for`] in the background; the job carries progress and the result.
    /// The job is in the store when this returns and belongs to the caller, whatever the
    /// VM's owner.
    pub async fn create_async_for(self: &Arc<Self>, p: &Principal, actor: &Actor, req: CreateRequest) -> Result<Job> {
        let owner = self.check_create(p, &req)?;
        let handle = self.jobs.start(&p.user_id, "virtual_machine", "create", &[("create", 3), ("start", 1)]).await?;
        let job = self.jobs.get(&handle.id).ok_or_else(|| HostError::Internal("the new job vanished".into()))?;
        let host = self.clone();
        let actor = actor.clone();
        tokio::spawn(async move {
            match host.create(req, owner.clone(), &actor, Some(&handle)).await {
                Ok(vm) => {
                    let done = hangar_wire::CreateMachineResponse {
                        id: vm.id,
                        name: vm.name,
                        owner,
                        current_state: vm.state.as_str().into(),
                    };
                    handle.complete(serde_json::to_value(done).unwrap_or_default()).await
                }
                Err(e) => handle.fail(e.to_string()).await,
            }
        });
        Ok(job)
    }

    /// Register an existing VM bundle for `p`: the create rules apply (the owner is the
    /// caller unless a SUPER_USER names another).
    pub async fn register_for(
        &self,
        p: &Principal,
        actor: &Actor,
        path: &Path,
        mut spec: RegisterSpec,
    ) -> Result<VmInfo> {
        authorize(p, VmAction::Register, &path.display().to_string(), None)?;
        if !path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(HostError::Invalid("path must be an absolute path without '..'".into()));
        }
        let owner = owner_for(p, spec.owner.as_deref())?;
        let path = &self.in_vm_folders(path, "path", true).await?;
        if self.hv.kind() == HypervisorKind::Qemu {
            spec.owner = Some(owner.clone());
        }
        self.audit(actor, "vm.register", &path.display().to_string(), json!({"path": path, "owner": owner})).await?;
        let vm = self.hv.register(path, spec).await?;
        self.record_new_vm(actor, "vm.registered", &vm, &owner, json!({"path": path})).await?;
        Ok(vm)
    }

    /// The folders VM bundles may live in, as callers name them (register paths, clone
    /// destinations): `HOST_VMS_FOLDER` and, on Parallels, each Parallels user's VM home
    /// (`prlsrvctl user list`: `DEF_VM_HOME`). The images folder is not one of them: its
    /// bundles are the images VMs are made from. Only folders that exist, resolved.
    pub async fn vm_folders(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.config.vms_dir.clone()];
        if self.hv.kind() == HypervisorKind::Parallels {
            let prlctl = self.config.prlctl.clone().or_else(|| on_path("prlctl"));
            if let Some(prlctl) = prlctl {
                let mut pc = parallels_config(&self.config, prlctl);
                pc.watch_events = false;
                // A short-lived driver for one listing: it starts no helper, so it keeps no ledger.
                pc.run_dir = None;
                match hangar_parallels::ParallelsDriver::new(pc) {
                    Ok(d) => match d.users().await {
                        Ok(users) => dirs.extend(
                            users
                                .into_iter()
                                .filter(|u| !u.default_vm_home.is_empty())
                                .map(|u| u.default_vm_home.into()),
                        ),
                        Err(e) => warn!(error = %e, "the Parallels users' VM homes are unknown"),
                    },
                    Err(e) => warn!(error = %e, "the Parallels users' VM homes are unknown"),
                }
            }
        }
        let mut out: Vec<PathBuf> = dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// `path` (absolute, without `..`) resolved, when it lies inside one of the
    /// [`Host::vm_folders`] (strictly inside for a bundle; a folder bundles go into may be
    /// a VM folder itself); a path that does not exist yet is resolved through its nearest
    /// existing ancestor. `what` names the request field in the error.
    pub(crate) async fn in_vm_folders(&self, path: &Path, what: &str, bundle: bool) -> Result<PathBuf> {
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        let real = loop {
            match std::fs::canonicalize(&existing) {
                Ok(r) => break r,
                Err(_) => match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name);
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(HostError::Invalid(format!("{what} {} cannot be resolved", path.display()))),
                },
            }
        };
        let real = rest.into_iter().rev().fold(real, |p, n| p.join(n));
        let folders = self.vm_folders().await;
        if folders.iter().any(|f| real.starts_with(f) && (real != *f || !bundle)) {
            return Ok(real);
        }
        let list: Vec<String> = folders.iter().map(|f| f.display().to_string()).collect();
        Err(HostError::Forbidden(format!(
            "{what} {} is outside this host's VM folders ({}); give a path inside one of them (HOST_VMS_FOLDER, or a Parallels user's VM home)",
            path.display(),
            if list.is_empty() { "none found".to_string() } else { list.join(", ") }
        )))
    }

    /// A host path confined to the upload folder, so the API cannot read arbitrary host
    /// files.
    fn confined_upload(&self, path: &Path) -> Result<PathBuf> {
        let root = self.config.upload_root.as_ref().ok_or_else(|| {
            HostError::Forbidden("uploads from host paths are disabled; set HOST_UPLOAD_FOLDER, or send the bytes with PUT /machines/{id}/files".into())
        })?;
        let root =
            std::fs::canonicalize(root).map_err(|e| HostError::Unavailable(format!("HOST_UPLOAD_FOLDER: {e}")))?;
        let real = std::fs::canonicalize(path)
            .map_err(|_| HostError::NotFound(format!("{} does not exist on the host", path.display())))?;
        if !real.starts_with(&root) {
            return Err(HostError::Forbidden(format!(
                "{} is outside the upload folder {}",
                path.display(),
                root.display()
            )));
        }
        Ok(real)
    }

    /// The Parallels Desktop licence in the reference's shape, from the driver's host facts
    /// (`prlsrvctl info` on Parallels). A host with another hypervisor answers
    /// `NOT_APPLICABLE` rather than failing, so clients that ask first carry on.
    pub async fn license(&self) -> Result<hangar_wire::ParallelsDesktopLicense> {
        let info = self.hv.host_info().await?;
        Ok(match info.hypervisor {
            HypervisorKind::Parallels => hangar_wire::ParallelsDesktopLicense {
                status: if info.licensed { "ACTIVE" } else { "INACTIVE" }.into(),
                edition: format!("Parallels Desktop {}", info.version),
                ..Default::default()
            },
            other => hangar_wire::ParallelsDesktopLicense {
                status: "NOT_APPLICABLE".into(),
                edition: format!("None: this host runs {other}, not Parallels Desktop"),
                ..Default::default()
            },
        })
    }

    /// Hardware, reservation, use and availability.
    pub async fn hardware(&self) -> Result<Hardware> {
        let info = self.hv.host_info().await?;
        let vms = self.hv.list().await?;
        let running: Vec<&VmInfo> =
            vms.iter().filter(|v| matches!(v.state, VmState::Running | VmState::Paused | VmState::Starting)).collect();
        let in_use_cpu: u32 = running.iter().map(|v| v.cpus).sum();
        let in_use_memory_mb: u64 = running.iter().map(|v| v.memory_mb).sum();
        let in_use_disk_mb: u64 = vms.iter().map(|v| v.disk_bytes / (1 << 20)).sum();
        let total_memory_mb = info.memory_bytes / (1 << 20);
        let total_disk_mb = info.disk_total_bytes / (1 << 20);
        let c = &self.config;
        Ok(Hardware {
            total_cpu: info.cpu_count,
            total_memory_mb,
            total_disk_mb,
            reserved_cpu: c.reserved_cpu,
            reserved_memory_mb: c.reserved_memory_mb,
            reserved_disk_mb: c.reserved_disk_mb,
            in_use_cpu,
            in_use_memory_mb,
            in_use_disk_mb,
            available_cpu: info.cpu_count.saturating_sub(c.reserved_cpu).saturating_sub(in_use_cpu),
            available_memory_mb: total_memory_mb.saturating_sub(c.reserved_memory_mb).saturating_sub(in_use_memory_mb),
            available_disk_mb: (info.disk_free_bytes / (1 << 20)).saturating_sub(c.reserved_disk_mb),
            running_vms: running.len(),
            mac_vms_running: running.iter().filter(|v| v.os.to_ascii_lowercase().contains("mac")).count(),
            info,
        })
    }

    /// Wait until the VM's guest answers a trivial command, up to `timeout`.
    pub async fn wait_ready(&self, vm: &str, timeout: Duration) -> Result<()> {
        check_vm_key(vm)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let req = ExecRequest::program(&["true"], Duration::from_secs(5));
            match self.hv.exec(vm, req).await {
                Ok(o) if o.exit_code == 0 => return Ok(()),
                Err(HypervisorError::NotFound(n)) => return Err(HostError::Hypervisor(HypervisorError::NotFound(n))),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HostError::Unavailable(format!("VM {vm} did not answer within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A driver event as a reference-style `pdfm` event.
pub fn translate(e: &VmEvent) -> Event {
    match e {
        VmEvent::Added { vm } => Event::new(
            EventType::Pdfm,
            "VM_ADDED",
            json!({"vm_id": vm.id, "name": vm.name, "new_vm": {"ID": vm.id, "Name": vm.name, "State": vm.state.as_str()}}),
        ),
        VmEvent::Removed { id } => Event::new(EventType::Pdfm, "VM_REMOVED", json!({"vm_id": id})),
        VmEvent::StateChanged { id, previous, current } => Event::new(
            EventType::Pdfm,
            "VM_STATE_CHANGED",
            json!({"vm_id": id, "previous_state": previous.as_str(), "current_state": current.as_str()}),
        ),
        VmEvent::IpChanged { id, ip_addresses } => {
            Event::new(EventType::Pdfm, "VM_IP_CHANGED", json!({"vm_id": id, "ip_addresses": ip_addresses}))
        }
        VmEvent::Updated { vm } => Event::new(
            EventType::Pdfm,
            "VM_UPDATED",
            json!({"vm_id": vm.id, "name": vm.name, "state": vm.state.as_str()}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::check_vm_key;

    #[test]
    fn vm_keys_a_tool_could_misread_are_refused() {
        for ok in ["{4f2a1c3e-0000-4000-8000-000000000001}", "ubuntu-22.04", "macOS 14 (Sonoma)", "a-b", "x"] {
            assert!(check_vm_key(ok).is_ok(), "{ok:?}");
        }
        let long = "a".repeat(256);
        for bad in ["", "-a", "--help", "-", "a\0b", "\0", "a\nb", "a/b", "..\\x", long.as_str()] {
            assert!(check_vm_key(bad).is_err(), "{bad:?}");
        }
    }
}
