//! On-disk formats (`vm.json`, `image.json`, `snapshots.json`) and the driver's settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_hypervisor::{HypervisorError, Result};
use serde::{Deserialize, Serialize};

/// File names inside a VM folder.
pub mod files {
    /// The VM's configuration.
    pub const CONFIG: &str = "vm.json";
    /// The main disk: a qcow2 overlay on a read-only base (or a standalone copy).
    pub const DISK: &str = "disk.qcow2";
    /// QMP socket of the running QEMU.
    pub const QMP: &str = "qmp.sock";
    /// Guest agent socket of the running QEMU.
    pub const QGA: &str = "qga.sock";
    /// Pid of the running QEMU.
    pub const PID: &str = "qemu.pid";
    /// QEMU's own error output.
    pub const LOG: &str = "qemu.log";
    /// The guest's serial console.
    pub const CONSOLE: &str = "console.log";
    /// Saved memory and device state of a suspended VM.
    pub const SUSPEND: &str = "suspend.state";
    /// The suspend file while it is being written.
    pub const SUSPEND_PARTIAL: &str = "suspend.state.partial";
    /// Facts about the suspended VM (was it running).
    pub const SUSPEND_META: &str = "suspend.json";
    /// Snapshot descriptions and tree; the snapshots themselves live inside the qcow2.
    pub const SNAPSHOTS: &str = "snapshots.json";
    /// Marks a folder under the VMs root as unregistered (kept, not listed).
    pub const UNREGISTERED: &str = ".hangar-unregistered";
    /// List of registered VM folders outside the VMs root (in the VMs root).
    pub const EXTERNAL: &str = ".hangar-external.json";
}

/// How to accelerate guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Acceleration {
    /// Use KVM when a real probe boots guest code under it, TCG otherwise.
    #[default]
    Auto,
    /// Always KVM (`-accel kvm -cpu host`).
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// Settings of a [`crate::QemuDriver`].
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Folder that holds one sub-folder per VM.
    pub vms_root: PathBuf,
    /// `qemu-system-x86_64` (looked up on `PATH` when not absolute).
    pub qemu_binary: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    pub acceleration: Acceleration,
    /// How often the driver re-reads the folders and processes to repair drift.
    pub reconcile_interval: Duration,
    /// Timeout for `qemu-img` and other short external commands.
    pub command_timeout: Duration,
    /// Timeout for long operations: suspend, savevm/loadvm, full clones.
    pub long_timeout: Duration,
    /// Bridge that new VMs' NICs join (through `qemu-bridge-helper`, which must allow it in
    /// `/etc/qemu/bridge.conf`); the guests then get their addresses from whatever DHCP
    /// server serves that bridge. `None`: user-mode networking (no inbound reach).
    pub bridge: Option<String>,
}

impl QemuConfig {
    /// Defaults for a VMs root: binaries from `PATH`, automatic acceleration, reconcile
    /// every 5 s.
    pub fn new(vms_root: impl Into<PathBuf>) -> Self {
        QemuConfig {
            vms_root: vms_root.into(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            acceleration: Acceleration::Auto,
            reconcile_interval: Duration::from_secs(5),
            command_timeout: Duration::from_secs(60),
            long_timeout: Duration::from_secs(600),
            bridge: None,
        }
    }
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// File name inside the VM folder.
    pub file: String,
    /// `qcow2` (overlays and clones are always qcow2).
    pub format: String,
    /// The read-only base this overlay sits on, if any.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// Format of `base` (`qcow2` or `raw`).
    #[serde(default)]
    pub base_format: Option<String>,
}

/// A host port forwarded to the guest (host side bound to 127.0.0.1 only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortForward {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub host_port: u16,
    pub guest_port: u16,
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// User-mode networking with `restrict=on`: the guest reaches nothing outside.
    /// Turn it off only inside a network namespace with no route out.
    pub restrict: bool,
    /// Ignored when `bridge` is set.
    #[serde(default)]
    pub port_forwards: Vec<PortForward>,
    /// The NIC joins this bridge instead of user-mode networking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The NIC's MAC address (unique per VM, so VMs sharing a bridge do not clash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A locally administered unicast MAC (QEMU's 52:54:00 prefix) derived from a VM id.
pub fn mac_for(id: &str) -> String {
    let h = blake3::hash(id.as_bytes());
    let b = h.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// A bridge name QEMU's helper accepts (Linux interface names: 1–15 characters, no `/`,
/// whitespace or `,`).
pub fn valid_bridge_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig { restrict: true, port_forwards: Vec::new(), bridge: None, mac: None }
    }
}

/// `vm.json`: everything needed to run a VM, owned by the VM folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: Option<String>,
    #[serde(default = "default_os")]
    pub os: String,
    #[serde(default = "default_arch")]
    pub architecture: String,
    #[serde(default)]
    pub owner: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub is_template: bool,
}

fn default_os() -> String {
    "linux".into()
}

fn default_arch() -> String {
    "x86_64".into()
}

/// `image.json` next to a base disk: how to boot it (see `scripts/build-guest-image.sh`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageDescriptor {
    pub disk: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub append: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
}

/// Metadata of one internal snapshot; the qcow2 holds the data under tag `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub parent: Option<String>,
    /// Taken while running (memory saved) or stopped (disk only).
    pub with_memory: bool,
}

/// `snapshots.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBook {
    #[serde(default)]
    pub snapshots: Vec<SnapshotMeta>,
    #[serde(default)]
    pub current: Option<String>,
}

/// Reads and parses a JSON file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| HypervisorError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| HypervisorError::Parse { command: format!("read {}", path.display()), message: e.to_string() })
}

/// Writes JSON atomically (temporary file, then rename).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| HypervisorError::Parse { command: format!("write {}", path.display()), message: e.to_string() })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| HypervisorError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HypervisorError::io(path, e))
}

/// Virtual size of a disk image: from the qcow2 header, or the file length for raw.
pub(crate) fn disk_virtual_size(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut header = [0u8; 32];
    if f.read_exact(&mut header).is_ok() && header[..4] == [b'Q', b'F', b'I', 0xfb] {
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[24..32]);
        return Some(u64::from_be_bytes(size));
    }
    f.metadata().ok().map(|m| m.len())
}

/// Bytes a file really occupies on the host.
pub(crate) fn allocated_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}
