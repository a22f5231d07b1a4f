//! The hypervisor seam of Hangar.
//!
//! Every driver (QEMU/KVM in `hangar-qemu`, Parallels Desktop in `hangar-parallels`)
//! implements [`Hypervisor`]. The host module talks to a `dyn Hypervisor` only, so it
//! never knows which driver runs a VM. Operations that change a VM's power state are one
//! closed enum, [`PowerOp`]; snapshot operations are [`SnapshotOp`].
//!
//! Types here are driver-neutral. The reference API's JSON shapes (`ID`, `Hardware.cpu.cpus`,
//! `"2048Mb"`, ...) are produced from them by the API layer, not here.
//!
//! Every driver must pass the same [`conformance`] suite, which checks the contract written
//! on [`Hypervisor`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Which hypervisor a driver drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    Qemu,
    Parallels,
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Parallels => "parallels",
        })
    }
}

/// Power state of a VM, as the reference API spells it (`"running"`, `"stopped"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Paused,
    Suspending,
    Suspended,
    Resuming,
    Stopping,
    /// The driver cannot tell (for example the VM's process vanished mid-query).
    Unknown,
}

impl VmState {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Suspending => "suspending",
            VmState::Suspended => "suspended",
            VmState::Resuming => "resuming",
            VmState::Stopping => "stopping",
            VmState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM as a driver sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Stable id (a UUID for both drivers).
    pub id: String,
    pub name: String,
    pub description: String,
    pub state: VmState,
    /// Guest OS family as the driver knows it (`"linux"`, `"macosx"`, `"win-11"`, ...).
    pub os: String,
    /// The folder (QEMU) or bundle (`.pvm`/`.macvm`) that holds the VM.
    pub home: PathBuf,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Size of the VM's disks on the host, in bytes (allocated, not virtual).
    pub disk_bytes: u64,
    /// Virtual size of the main disk, in bytes.
    pub disk_virtual_bytes: u64,
    pub ip_addresses: Vec<IpAddr>,
    /// Owner (a host user for Parallels, a Hangar user for QEMU), when known.
    pub owner: Option<String>,
    pub hypervisor: HypervisorKind,
    /// Architecture of the guest: `x86_64` or `arm64`.
    pub architecture: String,
    pub is_template: bool,
    /// The driver's full report in the reference's keys: the VM's `prlctl list -i --json`
    /// object on Parallels, the same keys with QEMU's values on QEMU (`Uptime`, `GuestTools`,
    /// `Hardware`, ...). The API shapes it into its typed VM answer; empty when unknown.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateSpec {
    pub name: String,
    /// A base image: a qcow2/raw disk (QEMU) or a `.pvm`/`.macvm` bundle (Parallels).
    /// QEMU makes a copy-on-write overlay on it and never writes the base.
    pub image: PathBuf,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Grow the main disk to this virtual size; `None` keeps the image's size.
    pub disk_bytes: Option<u64>,
    pub description: String,
    pub owner: Option<String>,
    pub os: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneSpec {
    pub name: String,
    /// A linked clone shares the source's disk as a read-only base; a full clone copies it.
    pub linked: bool,
    /// Folder to put the clone in; the driver's VM folder when `None`.
    pub destination: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisterSpec {
    pub name: Option<String>,
    pub owner: Option<String>,
    /// Give the VM a new id even if its folder already names one.
    pub regenerate_id: bool,
}

/// Settings that can change on an existing VM. `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigChange {
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub description: Option<String>,
}

/// Every power operation, as one closed enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerOp {
    Start,
    /// ACPI power-down, forced off after `timeout` (or at once when `force`).
    Stop {
        force: bool,
        timeout: Duration,
    },
    /// Immediate power-off.
    Kill,
    Pause,
    Resume,
    /// Save the VM's memory to disk and stop it; `Start` or `Resume` brings it back.
    Suspend,
    Reset,
    Restart,
}

impl PowerOp {
    pub fn name(&self) -> &'static str {
        match self {
            PowerOp::Start => "start",
            PowerOp::Stop { .. } => "stop",
            PowerOp::Kill => "kill",
            PowerOp::Pause => "pause",
            PowerOp::Resume => "resume",
            PowerOp::Suspend => "suspend",
            PowerOp::Reset => "reset",
            PowerOp::Restart => "restart",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub description: String,
    pub created_at: Option<DateTime<Utc>>,
    /// The snapshot the VM currently runs from.
    pub current: bool,
    pub parent: Option<String>,
    /// Power state the snapshot was taken in.
    pub state: VmState,
}

/// Every snapshot operation, as one closed enum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotOp {
    Create { name: String, description: String },
    Delete { snapshot_id: String, delete_children: bool },
    DeleteAll,
    Revert { snapshot_id: String, skip_resume: bool },
}

/// A command to run inside the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments. Drivers do not go through a shell unless `shell` is set.
    pub argv: Vec<String>,
    /// Run `argv[0]` as a shell command line (`/bin/sh -c` on Unix guests, `cmd /c` on Windows).
    pub shell: bool,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub timeout: Duration,
    /// Bytes to feed to the command's standard input.
    pub stdin: Option<Vec<u8>>,
}

impl ExecRequest {
    /// Run a program with these arguments: no shell, no extra environment, the guest's
    /// default user and folder, no input, within `timeout`.
    pub fn program(argv: &[&str], timeout: Duration) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            shell: false,
            env: BTreeMap::new(),
            working_dir: None,
            user: None,
            timeout,
            stdin: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// Facts about the host and its hypervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hypervisor: HypervisorKind,
    /// Version string of the hypervisor (`"QEMU 10.0.2"`, `"26.1.0-57287"`).
    pub version: String,
    /// How guests are accelerated: `"kvm"`, `"tcg"`, `"hvf"` (Parallels on Apple silicon), ...
    pub acceleration: String,
    pub architecture: String,
    pub cpu_count: u32,
    pub cpu_brand: String,
    pub memory_bytes: u64,
    /// Free and total bytes on the disk that holds the VMs.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub os_name: String,
    pub os_version: String,
    pub licensed: bool,
}

/// A change the driver observed, from QMP events, `prlctl monitor-events` or a reconcile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmEvent {
    Added { vm: Box<VmInfo> },
    Removed { id: String },
    StateChanged { id: String, previous: VmState, current: VmState },
    IpChanged { id: String, ip_addresses: Vec<IpAddr> },
    Updated { vm: Box<VmInfo> },
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("No VM named or with id {0:?}")]
    NotFound(String),
    #[error("Cannot {operation} VM {id}: it is {state}")]
    InvalidState { id: String, operation: &'static str, state: VmState },
    #[error("A VM named {0:?} already exists")]
    AlreadyExists(String),
    #[error("Invalid request: {0}")]
    InvalidInput(String),
    #[error("Not supported by the {driver} driver: {what}")]
    Unsupported { driver: HypervisorKind, what: String },
    #[error("`{command}` did not finish within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("`{command}` failed with exit code {code:?}: {stderr}")]
    CommandFailed { command: String, code: Option<i32>, stderr: String },
    #[error("Cannot parse the output of `{command}`: {message}")]
    Parse { command: String, message: String },
    #[error("Guest agent: {0}")]
    Guest(String),
    #[error("Hypervisor unavailable: {0}")]
    Unavailable(String),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HypervisorError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        HypervisorError::Io { path: path.as_ref().to_path_buf(), source }
    }
}

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

pub mod conformance;

/// The one trait every hypervisor driver implements.
///
/// `vm` arguments accept an id or a name. Every method is cancel-safe at the driver's
/// own boundaries: a dropped future never leaves a half-written VM folder registered.
///
/// The contract every driver keeps (checked by [`conformance::run_all`]):
///
/// - A `vm` that names no VM answers [`HypervisorError::NotFound`] with the key in it, from
///   every method. A key that cannot be an id or a name (empty, with a NUL) may answer
///   [`HypervisorError::InvalidInput`] instead; a key is never read as anything but an id or
///   a name (not as a command-line option, a pattern or a path).
/// - An operation the VM's current state does not allow answers
///   [`HypervisorError::InvalidState`] with that state and changes nothing. Power operations
///   are not idempotent: `Start` on a running VM or `Stop` on a stopped one is refused, not
///   ignored.
/// - Names are unique per driver: `create`, `clone_vm`, `rename` and `register` to a name in
///   use answer [`HypervisorError::AlreadyExists`]; an empty or blank name, or one with `/`,
///   answers [`HypervisorError::InvalidInput`]. A refused call leaves no VM behind.
/// - Every change the driver makes shows on [`Hypervisor::subscribe`], possibly shortly after
///   the method returns: `Added` for `create`, `clone_vm` and `register`; `Removed` for
///   `delete` and `unregister`; `StateChanged` for power operations; `Updated` for `rename`
///   and `configure`.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    fn kind(&self) -> HypervisorKind;
    async fn host_info(&self) -> Result<HostInfo>;
    async fn list(&self) -> Result<Vec<VmInfo>>;
    async fn get(&self, vm: &str) -> Result<VmInfo>;
    /// Create a stopped VM with the spec's name, CPUs, memory and description. Zero CPUs or
    /// memory, or an image that does not exist, answer [`HypervisorError::InvalidInput`].
    async fn create(&self, spec: CreateSpec) -> Result<VmInfo>;
    /// Clone a stopped VM: the clone is stopped, has a new id, its own home and the source's
    /// CPUs and memory.
    async fn clone_vm(&self, vm: &str, spec: CloneSpec) -> Result<VmInfo>;
    /// Adopt an existing VM folder or bundle. A VM unregistered from this driver comes back
    /// with its id (unless `regenerate_id`); an already registered one is
    /// [`HypervisorError::AlreadyExists`]; a path that does not exist or holds no VM is
    /// [`HypervisorError::InvalidInput`].
    async fn register(&self, path: &Path, spec: RegisterSpec) -> Result<VmInfo>;
    /// Forget a stopped VM without deleting its files.
    async fn unregister(&self, vm: &str) -> Result<()>;
    /// Delete a stopped VM and its files.
    async fn delete(&self, vm: &str) -> Result<()>;
    /// Run a power operation and return the VM as it is after it: `Start`, `Resume`,
    /// `Reset` and `Restart` leave it running, `Stop` and `Kill` stopped, `Pause` paused,
    /// `Suspend` suspended. `Start` needs a stopped or suspended VM, `Resume` a paused or
    /// suspended one, `Pause` and `Restart` a running one, `Stop`, `Kill`, `Suspend` and
    /// `Reset` a running or paused one; `Kill` also stops a suspended VM, dropping its saved
    /// state. Anything else is [`HypervisorError::InvalidState`].
    async fn power(&self, vm: &str, op: PowerOp) -> Result<VmInfo>;
    /// Rename a stopped VM. Its own name is no change and succeeds.
    async fn rename(&self, vm: &str, new_name: &str) -> Result<VmInfo>;
    /// Change CPUs and memory (only while stopped; zero is
    /// [`HypervisorError::InvalidInput`]) and the description (at any time).
    async fn configure(&self, vm: &str, change: ConfigChange) -> Result<VmInfo>;
    async fn snapshots(&self, vm: &str) -> Result<Vec<Snapshot>>;
    /// Returns the created snapshot for `Create`, `None` otherwise.
    ///
    /// A created snapshot is the current one, its parent the snapshot that was current.
    /// `Revert` makes the snapshot current; after a snapshot taken while stopped the VM is
    /// stopped, after one taken while running it runs (is paused with `skip_resume`). `Delete` without
    /// `delete_children` gives the children the deleted snapshot's parent. An unknown
    /// snapshot id answers [`HypervisorError::NotFound`].
    async fn snapshot(&self, vm: &str, op: SnapshotOp) -> Result<Option<Snapshot>>;
    /// Run a command in the running guest. The command's own exit code is in the output, not
    /// an error; an empty `argv` is [`HypervisorError::InvalidInput`].
    async fn exec(&self, vm: &str, req: ExecRequest) -> Result<ExecOutput>;
    /// Copy a file from the host's disk into the running guest.
    async fn upload(&self, vm: &str, local: &Path, remote: &str) -> Result<()>;
    /// Live changes. Each call gets its own receiver; a lagging receiver loses old events
    /// (and should reconcile with `list`).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<VmEvent>;
}

impl hangar_core::Classify for HypervisorError {
    fn kind(&self) -> hangar_core::ErrorKind {
        use hangar_core::ErrorKind as K;
        match self {
            HypervisorError::NotFound(_) => K::NotFound,
            HypervisorError::InvalidState { .. } | HypervisorError::AlreadyExists(_) => K::Conflict,
            HypervisorError::InvalidInput(_) => K::BadRequest,
            HypervisorError::Unsupported { .. } => K::Unprocessable,
            HypervisorError::Timeout { .. } | HypervisorError::Unavailable(_) | HypervisorError::Guest(_) => {
                K::Unavailable
            }
            HypervisorError::CommandFailed { .. } | HypervisorError::Parse { .. } | HypervisorError::Io { .. } => {
                K::Internal
            }
        }
    }
}
