//! The host API's VM bodies (`/machines`, `/config/hardware`), in the reference's shapes.

use std::collections::BTreeMap;

use hangar_hypervisor::{VmInfo, VmState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::units::{Flexible, Mb};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmCpu {
    #[serde(default)]
    pub cpus: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmMemory {
    /// As the reference prints it: `"2048Mb"`.
    #[serde(default)]
    pub size: Mb,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmDisk {
    #[serde(default)]
    pub size: Mb,
    #[serde(default)]
    pub allocated: Mb,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmHardware {
    #[serde(default)]
    pub cpu: VmCpu,
    #[serde(default)]
    pub memory: VmMemory,
    #[serde(default)]
    pub hdd0: VmDisk,
}

/// A VM in the reference's key names (what its clients read), plus Hangar's `owner`.
/// Fields a reference host may leave out read as empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Description", default)]
    pub description: String,
    /// `running`, `stopped`, ... ([`Machine::vm_state`] reads it).
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "OS", default)]
    pub os: String,
    #[serde(rename = "Home", default)]
    pub home: String,
    /// `VM` or `Template`.
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Hardware", default)]
    pub hardware: VmHardware,
    /// The driver's owner: the macOS account on Parallels, the Hangar user on QEMU.
    #[serde(default)]
    pub user: String,
    /// The Hangar user who owns the VM (the one the access rule reads), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// First IP address, or empty.
    #[serde(default)]
    pub internal_ip_address: String,
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    #[serde(default)]
    pub hypervisor: String,
    #[serde(default)]
    pub architecture: String,
}

/// A reference state text as a [`VmState`] (unknown texts are `Unknown`).
pub fn parse_state(s: &str) -> VmState {
    serde_json::from_value(serde_json::Value::String(s.trim().to_ascii_lowercase())).unwrap_or(VmState::Unknown)
}

impl Machine {
    /// A driver's view of a VM, with the Hangar owner when known.
    pub fn from_vm(v: VmInfo, owner: Option<String>) -> Machine {
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
                memory: VmMemory { size: Mb(v.memory_mb) },
                hdd0: VmDisk { size: Mb(v.disk_virtual_bytes >> 20), allocated: Mb(v.disk_bytes >> 20) },
            },
            user: v.owner.unwrap_or_default(),
            owner,
            internal_ip_address: ips.first().cloned().unwrap_or_default(),
            ip_addresses: ips,
            hypervisor: v.hypervisor.to_string(),
            architecture: v.architecture,
        }
    }

    pub fn vm_state(&self) -> VmState {
        parse_state(&self.state)
    }
}

/// `{cpu, memory, disk}`: numbers or numeric strings; memory and disk in MiB.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Specs {
    #[serde(default)]
    pub cpu: Flexible,
    /// MiB.
    #[serde(default)]
    pub memory: Flexible,
    /// MiB.
    #[serde(default)]
    pub disk: Flexible,
}

/// Which catalog image to create a VM from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogManifestRef {
    #[serde(default)]
    pub catalog_id: String,
    /// A version, or `latest` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// The reference's fields this host does not read (connection, ...), kept as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Create a VM from a local image (`image`, a name in the host's images folder) or a
/// catalog image (`catalog_manifest`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateMachineRequest {
    pub name: String,
    /// The reference's owner: on Parallels hosts the macOS account that runs the VM; also
    /// the Hangar owner unless `hangar_owner` says otherwise. Only a SUPER_USER may name
    /// another user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The Hangar user the VM belongs to, without touching the host account (what an
    /// orchestrator sends for the user it creates for). Only a SUPER_USER may name another user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hangar_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default)]
    pub start_on_create: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<Specs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_manifest: Option<CatalogManifestRef>,
    /// The reference's Packer path; refused here (422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub packer_template: Option<serde_json::Value>,
    /// The reference's Vagrant path; refused here (422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub vagrant_box: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateMachineResponse {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub current_state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_name: Option<String>,
    #[serde(default)]
    pub regenerate_source_uuid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub delay_applying_restrictions: bool,
}

/// A VM's power state and first address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineStatus {
    pub id: String,
    pub name: String,
    pub status: String,
    /// The first IP address, or "-" while the guest has none.
    pub ip_configured: String,
    /// The host that runs the VM (answers through the orchestrator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
}

impl MachineStatus {
    pub fn of(vm: &VmInfo) -> MachineStatus {
        MachineStatus {
            id: vm.id.clone(),
            name: vm.name.clone(),
            status: vm.state.as_str().into(),
            ip_configured: vm.ip_addresses.first().map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            host_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetOption {
    pub flag: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetOperation {
    pub group: String,
    pub operation: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub options: Vec<SetOption>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Sent back by some reference clients; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub operations: Vec<SetOperation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetResult {
    pub group: String,
    pub operation: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SetResponse {
    pub operations: Vec<SetResult>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecuteRequest {
    /// A shell command line, run with /bin/sh -c (cmd /c on Windows guests).
    pub command: String,
    #[serde(default)]
    pub environment_variables: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Seconds; default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub use_sudo: bool,
    #[serde(default)]
    pub use_ssh: bool,
    /// The reference's script form; refused here (422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub script: Option<serde_json::Value>,
}

impl ExecuteRequest {
    /// The command's time limit: `timeout` seconds (default 300), between 1 s and a day.
    pub fn time_limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout.unwrap_or(300).clamp(1, 24 * 3600))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecuteResponse {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UploadRequest {
    /// A file on the host, inside the host's upload folder (HOST_UPLOAD_FOLDER).
    pub path: String,
    pub remote_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RenameRequest {
    pub new_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloneRequest {
    pub clone_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_path: Option<String>,
    /// A linked clone shares the source's disk; default false (full copy).
    #[serde(default)]
    pub linked: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloneResponse {
    pub id: String,
    pub name: String,
    pub status: String,
    /// The host that holds the clone (answers through the orchestrator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    pub snapshot_name: String,
    #[serde(default)]
    pub snapshot_description: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RevertRequest {
    #[serde(default)]
    pub skip_resume: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    #[serde(default)]
    pub logical_cpu_count: u32,
    /// MiB.
    #[serde(default)]
    pub memory_size: f64,
    /// MiB.
    #[serde(default)]
    pub disk_size: f64,
}

impl Resources {
    pub fn new(cpu: u32, memory_mb: u64, disk_mb: u64) -> Resources {
        Resources { logical_cpu_count: cpu, memory_size: memory_mb as f64, disk_size: disk_mb as f64 }
    }
}

/// `GET /config/hardware`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HardwareResponse {
    #[serde(default)]
    pub cpu_type: String,
    #[serde(default)]
    pub cpu_brand: String,
    #[serde(default)]
    pub devops_version: String,
    #[serde(default)]
    pub os_name: String,
    #[serde(default)]
    pub os_version: String,
    #[serde(default)]
    pub hypervisor: String,
    #[serde(default)]
    pub hypervisor_version: String,
    #[serde(default)]
    pub acceleration: String,
    #[serde(default)]
    pub parallels_desktop_version: String,
    #[serde(default)]
    pub parallels_desktop_licensed: bool,
    pub total: Resources,
    pub system_reserved: Resources,
    pub total_in_use: Resources,
    #[serde(default)]
    pub total_reserved: Resources,
    pub total_available: Resources,
    #[serde(default)]
    pub running_vms: usize,
    #[serde(default)]
    pub mac_vms_running: usize,
    #[serde(default)]
    pub enabled_modules: Vec<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_reference_machine_reads_and_prints_back_the_same() {
        let reference = json!({"ID": "a1", "Name": "n", "Description": "", "State": "running", "OS": "ubuntu",
            "Home": "/vms/n.pvm", "Type": "VM",
            "Hardware": {"cpu": {"cpus": 2}, "memory": {"size": "1024Mb"}, "hdd0": {"size": "8192Mb", "allocated": "1Mb"}},
            "user": "ci", "internal_ip_address": "10.0.0.2", "ip_addresses": ["10.0.0.2"],
            "hypervisor": "parallels", "architecture": "arm64"});
        let m: Machine = serde_json::from_value(reference.clone()).unwrap();
        assert_eq!(m.hardware.memory.size, Mb(1024));
        assert_eq!(m.vm_state(), VmState::Running);
        assert_eq!(serde_json::to_value(&m).unwrap(), reference);
    }

    #[test]
    fn a_sparse_machine_from_another_host_still_reads() {
        let m: Machine = serde_json::from_value(json!({"ID": "x", "State": "Stopped",
            "Hardware": {"memory": {"size": "2 GB"}}}))
        .unwrap();
        assert_eq!((m.hardware.memory.size, m.vm_state()), (Mb(2048), VmState::Stopped));
        assert!(serde_json::from_value::<Machine>(json!({"Name": "no id"})).is_err());
    }

    #[test]
    fn create_requests_round_trip_with_string_or_number_specs() {
        let sent = json!({"name": "ci-1", "image": "golden.pvm", "start_on_create": true,
            "specs": {"cpu": "2", "memory": 2048},
            "catalog_manifest": {"catalog_id": "base", "version": "1.0", "connection": "x"}});
        let r: CreateMachineRequest = serde_json::from_value(sent).unwrap();
        let specs = r.specs.clone().unwrap();
        assert_eq!((specs.cpu, specs.memory, specs.disk), (Flexible(Some(2)), Flexible(Some(2048)), Flexible(None)));
        assert_eq!(r.catalog_manifest.as_ref().unwrap().other.get("connection"), Some(&json!("x")));
        let again: CreateMachineRequest = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn hardware_round_trips() {
        let hw = HardwareResponse {
            cpu_type: "x86_64".into(),
            total: Resources::new(8, 16384, 100_000),
            ..Default::default()
        };
        let v = serde_json::to_value(&hw).unwrap();
        assert_eq!(v["total"], json!({"logical_cpu_count": 8, "memory_size": 16384.0, "disk_size": 100000.0}));
        assert_eq!(serde_json::from_value::<HardwareResponse>(v).unwrap(), hw);
    }
}

/// `GET /config/parallels-desktop/license`: the reference's licence object. On a Parallels
/// host `status` is `ACTIVE` when `prlsrvctl info` reports a valid licence, else `INACTIVE`;
/// on a host with another hypervisor it is `NOT_APPLICABLE` and `edition` says why. The
/// licence key and serial are never sent (`serial` and `uuid` stay empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ParallelsDesktopLicense {
    pub status: String,
    pub serial: String,
    pub expiration: String,
    pub main_period_ends_at: String,
    pub grace_period_ends_at: String,
    pub cpu_total: u64,
    pub max_memory: u64,
    pub edition: String,
    pub is_trial: String,
    pub is_volume: String,
    pub advanced_restrictions: String,
    pub deferred_activation: String,
    pub uuid: String,
}
