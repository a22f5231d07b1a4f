//! A VM from a catalog image, in one place: the checks before any work (the VM create rule,
//! the owner, the source and the entry's visibility), the pull through this host's image
//! cache (from this server's catalog, another catalog server by its connection, or one of
//! the caller's catalog managers) and the create on the host, now or as a job of the host
//! (steps `pull` and `create`). The catalog service decides the image access and writes the
//! pull's audit entry; the host service checks the create again and writes its audit entry.

use std::path::PathBuf;
use std::sync::Arc;

use hangar_catalog::hangar_image::{Progress, ProgressFn};
use hangar_catalog::{Architecture, Catalog, CatalogConnection, CatalogError, ManagerOp, Manifest};
use hangar_core::audit::Actor;
use hangar_core::{Classify, ErrorKind, Principal, VmAction, VmDenied};
use hangar_host::{CreateRequest, Host, HostError, ImageSource, Job, JobHandle, JobsError};
use hangar_hypervisor::VmInfo;

/// Why a VM could not be made from a catalog image; each keeps its service's kind (and so
/// its HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Denied(#[from] VmDenied),
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error("the new job vanished")]
    JobVanished,
}

impl Classify for ProvisionError {
    fn kind(&self) -> ErrorKind {
        match self {
            ProvisionError::Catalog(e) => e.kind(),
            ProvisionError::Host(e) => e.kind(),
            ProvisionError::Denied(e) => e.kind(),
            ProvisionError::Jobs(e) => e.kind(),
            ProvisionError::JobVanished => ErrorKind::Internal,
        }
    }
}

pub type Result<T, E = ProvisionError> = std::result::Result<T, E>;

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum PullSource {
    /// This server's catalog (it decides visibility and taint).
    Catalog,
    /// Another catalog server, pulled through its API with the connection's credentials
    /// (that server decides access); never stored, logged or answered.
    Connection(CatalogConnection),
    /// One of the caller's catalog managers, with its stored credentials. `op`: the manager
    /// operation whose claim the caller needs as well (the manager routes check `Pull`).
    Manager { id: String, op: Option<ManagerOp> },
}

/// The catalog image a VM is made from.
#[derive(Debug, Clone)]
pub struct CatalogImage {
    pub catalog_id: String,
    /// A version or `latest`.
    pub version: String,
    pub arch: Architecture,
    pub source: PullSource,
}

/// The VM to make; its image is the pulled folder.
#[derive(Debug, Clone, Default)]
pub struct VmSpec {
    pub name: String,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub disk_bytes: Option<u64>,
    /// The Hangar user the VM is for (only a SUPER_USER names another); the caller otherwise.
    pub owner: Option<String>,
    /// The host account that owns the VM on Parallels hosts.
    pub host_user: Option<String>,
    /// None: `pulled from catalog <id> <version> <arch>`.
    pub description: Option<String>,
    pub start: bool,
}

impl VmSpec {
    /// The host's create request for `image`.
    pub fn create_request(self, image: ImageSource) -> CreateRequest {
        CreateRequest {
            name: self.name,
            image,
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            disk_bytes: self.disk_bytes,
            owner: self.owner,
            host_user: self.host_user,
            description: self.description.unwrap_or_default(),
            start: self.start,
        }
    }
}

/// A VM from a catalog image.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub image: CatalogImage,
    pub vm: VmSpec,
}

/// A request that passed every check that needs no pull: nothing is cached or started yet.
#[derive(Debug)]
pub struct Checked {
    req: ProvisionRequest,
    /// The connection to pull through (a given one or a manager's); none for this catalog.
    remote: Option<CatalogConnection>,
}

/// The pulled image: the manifest when it came from this server's catalog, the catalog id
/// and version it resolved to, and its folder in the host cache.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub manifest: Option<Manifest>,
    pub catalog_id: String,
    pub version: String,
    pub arch: Architecture,
    pub folder: PathBuf,
}

/// The new VM and the image it was made from.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub vm: VmInfo,
    pub image: Pulled,
}

/// Makes VMs on `host` from images of `catalog` (or of the catalog servers it reaches).
#[derive(Clone)]
pub struct Provisioner {
    host: Arc<Host>,
    catalog: Arc<Catalog>,
}

impl Provisioner {
    pub fn new(host: Arc<Host>, catalog: Arc<Catalog>) -> Self {
        Provisioner { host, catalog }
    }

    /// Every check before any work, in this order: the manager (claim, visibility, active),
    /// the VM create rule (claim), the VM name, the owner, and for this catalog the entry's
    /// visibility; so a refused request neither fills the cache nor starts a job.
    pub async fn check(&self, p: &Principal, req: ProvisionRequest) -> Result<Checked> {
        let remote = match &req.image.source {
            PullSource::Catalog => None,
            PullSource::Connection(conn) => Some(conn.clone()),
            PullSource::Manager { id, op: Some(op) } => Some(self.catalog.manager_connection_for(p, id, *op).await?),
            PullSource::Manager { id, op: None } => Some(self.catalog.manager_connection(p, id).await?),
        };
        hangar_core::vm::authorize(p, VmAction::Create, &req.vm.name, None)?;
        hangar_host::check_name(&req.vm.name)?;
        hangar_core::vm::owner_for(p, req.vm.owner.as_deref())?;
        if remote.is_none() {
            let i = &req.image;
            self.catalog.get(p, &i.catalog_id, &i.version, i.arch).await?;
        }
        Ok(Checked { req, remote })
    }

    /// Pull the image through the host cache (step 0 of `job` follows the chunk transfer).
    async fn pull(&self, p: &Principal, actor: &Actor, c: &Checked, job: Option<&JobHandle>) -> Result<Pulled> {
        let i = &c.req.image;
        let progress = job.map(|j| job_progress(j, 0, "pulling the image"));
        if let Some(j) = job {
            j.step(0, 0.0, "pulling the image");
        }
        let (manifest, folder) = match &c.remote {
            Some(conn) => {
                (None, self.catalog.pull_remote_to_host(p, actor, conn, &i.catalog_id, &i.version, i.arch).await?)
            }
            None => {
                let (m, folder) =
                    self.catalog.pull_to_host_with(p, actor, &i.catalog_id, &i.version, i.arch, progress).await?;
                (Some(m), folder)
            }
        };
        let (catalog_id, version) = match &manifest {
            Some(m) => (m.catalog_id.clone(), m.version.clone()),
            None => (i.catalog_id.clone(), i.version.clone()),
        };
        Ok(Pulled { manifest, catalog_id, version, arch: i.arch, folder })
    }

    fn create_request(spec: VmSpec, image: &Pulled) -> CreateRequest {
        let description = spec
            .description
            .clone()
            .unwrap_or_else(|| format!("pulled from catalog {} {} {}", image.catalog_id, image.version, image.arch));
        VmSpec { description: Some(description), ..spec }.create_request(ImageSource::Folder(image.folder.clone()))
    }

    /// Pull the image through the host cache, then create the VM from it (the host service
    /// checks access and owner again and writes the audit entry) and optionally start it.
    /// With a job, step 0 follows the chunk transfer and step 1 the VM creation.
    pub async fn run(&self, p: &Principal, actor: &Actor, c: Checked, job: Option<&JobHandle>) -> Result<Provisioned> {
        let image = self.pull(p, actor, &c, job).await?;
        if let Some(j) = job {
            j.step(1, 0.0, "creating the VM");
        }
        let vm = self.host.create_for(p, actor, Self::create_request(c.req.vm, &image)).await?;
        Ok(Provisioned { vm, image })
    }

    /// [`Provisioner::run`] as a job of the host (type `catalog`, operation `pull`, steps
    /// `pull` and `create`); `answer` turns the outcome into the job's result or its error.
    pub async fn start_job<F>(&self, p: &Principal, actor: &Actor, c: Checked, answer: F) -> Result<Job>
    where
        F: FnOnce(Result<Provisioned>) -> Result<serde_json::Value, String> + Send + 'static,
    {
        let jobs = self.host.jobs.clone();
        let handle = jobs.start(&p.user_id, "catalog", "pull", &[("pull", 9), ("create", 1)]).await?;
        let job = jobs.get(&handle.id).ok_or(ProvisionError::JobVanished)?;
        let (this, p, actor) = (self.clone(), p.clone(), actor.clone());
        tokio::spawn(async move {
            match answer(this.run(&p, &actor, c, Some(&handle)).await) {
                Ok(done) => handle.complete(done).await,
                Err(e) => handle.fail(e).await,
            }
        });
        Ok(job)
    }

    /// Pull the image now, then create the VM as the host's own create job
    /// ([`Host::create_async_for`]).
    pub async fn pull_then_create_job(&self, p: &Principal, actor: &Actor, c: Checked) -> Result<Job> {
        let image = self.pull(p, actor, &c, None).await?;
        Ok(self.host.create_async_for(p, actor, Self::create_request(c.req.vm, &image)).await?)
    }
}

/// A progress callback that moves `step` of job `j` (whole percents, below 100 until the
/// step ends).
pub fn job_progress(j: &JobHandle, step: usize, message: &'static str) -> ProgressFn {
    let j = j.clone();
    let last = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    Arc::new(move |pr: &Progress| {
        let pct = (pr.bytes_done.saturating_mul(100)).checked_div(pr.bytes_total).unwrap_or(0).min(99);
        if last.swap(pct, std::sync::atomic::Ordering::Relaxed) != pct {
            j.step(step, pct as f64, message);
        }
    })
}
