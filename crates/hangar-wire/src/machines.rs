//! The host API's VM bodies (`/machines`, `/config/hardware`), in the reference's shapes.

use std::collections::BTreeMap;

use hangar_hypervisor::{VmInfo, VmState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::units::{Flexible, Mb};

// ----- the reference's VM object (`prlctl list -i --json` plus its own keys) ---------------
//
// Every key the reference's answer carries, with the JSON type its clients decode into: a
// Go client (Terraform) fails the whole answer on a wrong type, so a key is never left out
// and never changes type. Texts that prlctl prints as `on`/`off` stay texts.

/// `Hardware.cpu`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineCpu {
    pub cpus: u32,
    pub auto: String,
    #[serde(rename = "VT-x")]
    pub vt_x: bool,
    pub hotplug: bool,
    pub accl: String,
    pub mode: String,
    /// `arm`, `x86`, ...
    #[serde(rename = "type")]
    pub cpu_type: String,
}

/// `Hardware.memory`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineMemory {
    /// `"2048Mb"`.
    pub size: Mb,
    pub auto: String,
    pub hotplug: bool,
}

/// `Hardware.video`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineVideo {
    #[serde(rename = "adapter-type")]
    pub adapter_type: String,
    pub size: String,
    #[serde(rename = "3d-acceleration")]
    pub acceleration_3d: String,
    #[serde(rename = "vertical-sync")]
    pub vertical_sync: String,
    #[serde(rename = "high-resolution")]
    pub high_resolution: String,
    #[serde(rename = "high-resolution-in-guest")]
    pub high_resolution_in_guest: String,
    #[serde(rename = "native-scaling-in-guest")]
    pub native_scaling_in_guest: String,
    #[serde(rename = "automatic-video-memory")]
    pub automatic_video_memory: String,
}

/// `Hardware.memory_quota`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineMemoryQuota {
    pub auto: String,
}

/// `Hardware.hdd0`, plus Hangar's `allocated` (the space the disk takes on the host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineDisk {
    pub enabled: bool,
    pub port: String,
    pub image: String,
    #[serde(rename = "type")]
    pub disk_type: String,
    /// Virtual size, `"65536Mb"`.
    pub size: Mb,
    #[serde(rename = "online-compact")]
    pub online_compact: String,
    pub allocated: Mb,
}

/// `Hardware.cdrom0`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineCdrom {
    pub enabled: bool,
    pub port: String,
    pub image: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub state: String,
}

/// Blocks that only say whether something is on (`usb`, `Smart Guard`, `Expiration`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineEnabled {
    pub enabled: bool,
}

/// `Hardware.net0`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineNet {
    pub enabled: bool,
    /// `shared`, `bridged`, `user` (QEMU's user-mode network), ...
    #[serde(rename = "type")]
    pub net_type: String,
    pub mac: String,
    pub card: String,
}

/// `Hardware.sound0`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineSound {
    pub enabled: bool,
    pub output: String,
    pub mixer: String,
}

/// `Hardware` of a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineHardware {
    pub cpu: MachineCpu,
    pub memory: MachineMemory,
    pub video: MachineVideo,
    pub memory_quota: MachineMemoryQuota,
    pub hdd0: MachineDisk,
    pub cdrom0: MachineCdrom,
    pub usb: MachineEnabled,
    pub net0: MachineNet,
    pub sound0: MachineSound,
}

/// `GuestTools`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineGuestTools {
    /// `installed`, `possibly_installed`, `not_installed`, ...
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineMouseKeyboard {
    #[serde(rename = "Smart mouse optimized for games")]
    pub smart_mouse: String,
    #[serde(rename = "Sticky mouse")]
    pub sticky_mouse: String,
    #[serde(rename = "Smooth scrolling")]
    pub smooth_scrolling: String,
    #[serde(rename = "Keyboard optimization mode")]
    pub keyboard_optimization: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineUsbBluetooth {
    #[serde(rename = "Automatic sharing cameras")]
    pub cameras: String,
    #[serde(rename = "Automatic sharing bluetooth")]
    pub bluetooth: String,
    #[serde(rename = "Automatic sharing smart cards")]
    pub smart_cards: String,
    #[serde(rename = "Automatic sharing gamepads")]
    pub gamepads: String,
    #[serde(rename = "Support USB 3.0")]
    pub usb3: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineStartup {
    #[serde(rename = "Autostart")]
    pub autostart: String,
    /// Seconds (a number).
    #[serde(rename = "Autostart delay")]
    pub autostart_delay: i64,
    #[serde(rename = "Autostop")]
    pub autostop: String,
    #[serde(rename = "Startup view")]
    pub startup_view: String,
    #[serde(rename = "On shutdown")]
    pub on_shutdown: String,
    #[serde(rename = "On window close")]
    pub on_window_close: String,
    #[serde(rename = "Pause idle")]
    pub pause_idle: String,
    #[serde(rename = "Undo disks")]
    pub undo_disks: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineOptimization {
    #[serde(rename = "Faster virtual machine")]
    pub faster_vm: String,
    #[serde(rename = "Hypervisor type")]
    pub hypervisor_type: String,
    #[serde(rename = "Adaptive hypervisor")]
    pub adaptive_hypervisor: String,
    #[serde(rename = "Disabled Windows logo")]
    pub disabled_windows_logo: String,
    #[serde(rename = "Auto compress virtual disks")]
    pub auto_compress: String,
    #[serde(rename = "Nested virtualization")]
    pub nested_virtualization: String,
    #[serde(rename = "PMU virtualization")]
    pub pmu_virtualization: String,
    #[serde(rename = "Longer battery life")]
    pub longer_battery_life: String,
    #[serde(rename = "Show battery status")]
    pub show_battery_status: String,
    #[serde(rename = "Resource quota")]
    pub resource_quota: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineTravelMode {
    #[serde(rename = "Enter condition")]
    pub enter_condition: String,
    #[serde(rename = "Enter threshold")]
    pub enter_threshold: i64,
    #[serde(rename = "Quit condition")]
    pub quit_condition: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineSecurity {
    #[serde(rename = "Encrypted")]
    pub encrypted: String,
    #[serde(rename = "TPM enabled")]
    pub tpm_enabled: String,
    #[serde(rename = "TPM type")]
    pub tpm_type: String,
    #[serde(rename = "Custom password protection")]
    pub custom_password_protection: String,
    #[serde(rename = "Configuration is locked")]
    pub configuration_locked: String,
    #[serde(rename = "Protected")]
    pub protected: String,
    #[serde(rename = "Archived")]
    pub archived: String,
    #[serde(rename = "Packed")]
    pub packed: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineModality {
    #[serde(rename = "Opacity (percentage)")]
    pub opacity_percentage: i64,
    #[serde(rename = "Stay on top")]
    pub stay_on_top: String,
    /// The trailing space is prlctl's (and so the reference's).
    #[serde(rename = "Show on all spaces ")]
    pub show_on_all_spaces: String,
    #[serde(rename = "Capture mouse clicks")]
    pub capture_mouse_clicks: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineFullscreen {
    #[serde(rename = "Use all displays")]
    pub use_all_displays: String,
    #[serde(rename = "Activate spaces on click")]
    pub activate_spaces_on_click: String,
    #[serde(rename = "Optimize for games")]
    pub optimize_for_games: String,
    #[serde(rename = "Gamma control")]
    pub gamma_control: String,
    #[serde(rename = "Scale view mode")]
    pub scale_view_mode: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineCoherence {
    #[serde(rename = "Show Windows systray in Mac menu")]
    pub systray_in_mac_menu: String,
    #[serde(rename = "Auto-switch to full screen")]
    pub auto_switch_full_screen: String,
    #[serde(rename = "Disable aero")]
    pub disable_aero: String,
    #[serde(rename = "Hide minimized windows")]
    pub hide_minimized_windows: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineTimeSync {
    pub enabled: bool,
    #[serde(rename = "Smart mode")]
    pub smart_mode: String,
    #[serde(rename = "Interval (in seconds)")]
    pub interval_seconds: i64,
    #[serde(rename = "Timezone synchronization disabled")]
    pub timezone_sync_disabled: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineSmbios {
    #[serde(rename = "BIOS Version")]
    pub bios_version: String,
    #[serde(rename = "System serial number")]
    pub system_serial_number: String,
    #[serde(rename = "Board Manufacturer")]
    pub board_manufacturer: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineSharedApps {
    pub enabled: bool,
    #[serde(rename = "Host-to-guest apps sharing")]
    pub host_to_guest: String,
    #[serde(rename = "Guest-to-host apps sharing")]
    pub guest_to_host: String,
    #[serde(rename = "Show guest apps folder in Dock")]
    pub guest_apps_in_dock: String,
    #[serde(rename = "Show guest notifications")]
    pub guest_notifications: String,
    #[serde(rename = "Bounce dock icon when app flashes")]
    pub bounce_dock_icon: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineSmartMount {
    pub enabled: bool,
    #[serde(rename = "Removable drives", skip_serializing_if = "String::is_empty")]
    pub removable_drives: String,
    #[serde(rename = "CD/DVD drives", skip_serializing_if = "String::is_empty")]
    pub cd_dvd_drives: String,
    #[serde(rename = "Network shares", skip_serializing_if = "String::is_empty")]
    pub network_shares: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineMiscSharing {
    #[serde(rename = "Shared clipboard")]
    pub shared_clipboard: String,
    #[serde(rename = "Shared cloud")]
    pub shared_cloud: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineAdvanced {
    #[serde(rename = "VM hostname synchronization")]
    pub hostname_sync: String,
    #[serde(rename = "Public SSH keys synchronization")]
    pub ssh_keys_sync: String,
    #[serde(rename = "Show developer tools")]
    pub developer_tools: String,
    #[serde(rename = "Swipe from edges")]
    pub swipe_from_edges: String,
    #[serde(rename = "Share host location")]
    pub share_host_location: String,
    #[serde(rename = "Rosetta Linux")]
    pub rosetta_linux: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachinePrintManagement {
    #[serde(rename = "Synchronize with host printers")]
    pub sync_host_printers: String,
    #[serde(rename = "Synchronize default printer")]
    pub sync_default_printer: String,
    #[serde(rename = "Show host printer UI")]
    pub show_host_printer_ui: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineGuestSharedFolders {
    pub enabled: bool,
    #[serde(rename = "Automount")]
    pub automount: String,
}

/// `Network.Inbound` / `Network.Outbound`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineNetworkBound {
    #[serde(rename = "Bandwidth")]
    pub bandwidth: String,
    #[serde(rename = "Packet Loss")]
    pub packet_loss: String,
    #[serde(rename = "Delay")]
    pub delay: String,
}

/// One of `Network.ipAddresses`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineIp {
    /// `ipv4` or `ipv6`.
    #[serde(rename = "type")]
    pub ip_type: String,
    pub ip: String,
}

/// `Network`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineNetwork {
    #[serde(rename = "Conditioned")]
    pub conditioned: String,
    #[serde(rename = "Inbound")]
    pub inbound: MachineNetworkBound,
    #[serde(rename = "Outbound")]
    pub outbound: MachineNetworkBound,
    #[serde(rename = "ipAddresses")]
    pub ip_addresses: Vec<MachineIp>,
}

/// The reference's VM keys beyond the ones [`Machine`] names itself: what `prlctl list -i
/// --json` prints for a Parallels VM, and the same keys with QEMU's values for a QEMU VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MachineDetails {
    /// `yes` or `no` (a text, as prlctl prints it).
    #[serde(rename = "Template")]
    pub template: String,
    /// Seconds since the VM started, as a text (`"0"` when it is not running).
    #[serde(rename = "Uptime")]
    pub uptime: String,
    /// The VM's configuration file: `<bundle>/config.pvs`, or a QEMU VM's folder.
    #[serde(rename = "Home path")]
    pub home_path: String,
    #[serde(rename = "Restore Image")]
    pub restore_image: String,
    #[serde(rename = "GuestTools")]
    pub guest_tools: MachineGuestTools,
    #[serde(rename = "Mouse and Keyboard")]
    pub mouse_and_keyboard: MachineMouseKeyboard,
    #[serde(rename = "USB and Bluetooth")]
    pub usb_and_bluetooth: MachineUsbBluetooth,
    #[serde(rename = "Startup and Shutdown")]
    pub startup_and_shutdown: MachineStartup,
    #[serde(rename = "Optimization")]
    pub optimization: MachineOptimization,
    #[serde(rename = "Travel mode")]
    pub travel_mode: MachineTravelMode,
    #[serde(rename = "Security")]
    pub security: MachineSecurity,
    #[serde(rename = "Smart Guard")]
    pub smart_guard: MachineEnabled,
    #[serde(rename = "Modality")]
    pub modality: MachineModality,
    #[serde(rename = "Fullscreen")]
    pub fullscreen: MachineFullscreen,
    #[serde(rename = "Coherence")]
    pub coherence: MachineCoherence,
    #[serde(rename = "Time Synchronization")]
    pub time_synchronization: MachineTimeSync,
    #[serde(rename = "Expiration")]
    pub expiration: MachineEnabled,
    #[serde(rename = "Boot order")]
    pub boot_order: String,
    #[serde(rename = "BIOS type")]
    pub bios_type: String,
    #[serde(rename = "EFI Secure boot")]
    pub efi_secure_boot: String,
    #[serde(rename = "Allow select boot device")]
    pub allow_select_boot_device: String,
    #[serde(rename = "External boot device")]
    pub external_boot_device: String,
    #[serde(rename = "SMBIOS settings")]
    pub smbios_settings: MachineSmbios,
    /// Shared folders by name (prlctl's free-form object).
    #[serde(rename = "Host Shared Folders")]
    #[schema(value_type = Object)]
    pub host_shared_folders: BTreeMap<String, Value>,
    #[serde(rename = "Host defined sharing")]
    pub host_defined_sharing: String,
    #[serde(rename = "Shared Profile")]
    pub shared_profile: MachineEnabled,
    #[serde(rename = "Shared Applications")]
    pub shared_applications: MachineSharedApps,
    #[serde(rename = "SmartMount")]
    pub smart_mount: MachineSmartMount,
    #[serde(rename = "Miscellaneous Sharing")]
    pub miscellaneous_sharing: MachineMiscSharing,
    #[serde(rename = "Advanced")]
    pub advanced: MachineAdvanced,
    #[serde(rename = "Print Management")]
    pub print_management: MachinePrintManagement,
    #[serde(rename = "Guest Shared Folders")]
    pub guest_shared_folders: MachineGuestSharedFolders,
    #[serde(rename = "Network")]
    pub network: MachineNetwork,
}

/// Fit `raw` (a driver's report) onto the shape of `template` (a default value's JSON):
/// every key of the template is kept, a value of another JSON type is converted when it
/// can be (`2` → `"2"`, `"2"` → `2`, `"yes"` → `true`) and otherwise replaced by the
/// template's, and keys the template does not know are dropped. An empty template object
/// (a free-form map) or array takes `raw` as it is.
fn conform(template: &Value, raw: &Value) -> Value {
    match (template, raw) {
        (Value::Object(t), Value::Object(r)) if t.is_empty() => Value::Object(r.clone()),
        (Value::Object(t), Value::Object(r)) => Value::Object(
            t.iter()
                .map(|(k, tv)| (k.clone(), r.get(k).map(|rv| conform(tv, rv)).unwrap_or_else(|| tv.clone())))
                .collect(),
        ),
        (Value::String(_), Value::String(_)) | (Value::Bool(_), Value::Bool(_)) => raw.clone(),
        (Value::String(_), Value::Number(n)) => Value::String(n.to_string()),
        (Value::String(_), Value::Bool(b)) => Value::String(if *b { "yes" } else { "no" }.into()),
        (Value::Number(_), Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Value::from)
            .unwrap_or_else(|| template.clone()),
        (Value::Number(_), Value::String(s)) => {
            s.trim().parse::<i64>().map(Value::from).unwrap_or_else(|_| template.clone())
        }
        (Value::Bool(_), Value::String(s)) => {
            Value::Bool(matches!(s.trim().to_ascii_lowercase().as_str(), "yes" | "on" | "true" | "1" | "enabled"))
        }
        (Value::Bool(_), Value::Number(n)) => Value::Bool(n.as_f64().unwrap_or(0.0) != 0.0),
        (Value::Array(_), Value::Array(_)) | (Value::Null, _) => raw.clone(),
        _ => template.clone(),
    }
}

/// `T` from a driver's report, fitted onto `T`'s own shape first; `T::default()` when even
/// that does not decode.
fn conformed<T: Serialize + serde::de::DeserializeOwned + Default>(raw: &Value) -> T {
    let template = serde_json::to_value(T::default()).unwrap_or(Value::Null);
    serde_json::from_value(conform(&template, raw)).unwrap_or_default()
}

/// A VM in the reference's key names and types (what its clients read: every key of its
/// `ParallelsVM`), plus Hangar's `owner`, `ip_addresses`, `hypervisor` and `architecture`.
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
    /// `VM`, `APPLE_VZ_VM` (Parallels) or `QEMU`.
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Hardware", default)]
    pub hardware: MachineHardware,
    /// The reference's other keys (`Template`, `Uptime`, `Home path`, `GuestTools`, ...).
    #[serde(flatten)]
    pub details: MachineDetails,
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
    /// A driver's view of a VM, with the Hangar owner when known. The driver's report
    /// (`VmInfo::details`) fills the reference's keys; what Hangar measured itself (state,
    /// sizes, addresses, template flag) wins over it.
    pub fn from_vm(v: VmInfo, owner: Option<String>) -> Machine {
        let ips: Vec<String> = v.ip_addresses.iter().map(|i| i.to_string()).collect();
        let raw = Value::Object(v.details.clone());
        let mut hardware: MachineHardware = conformed(raw.get("Hardware").unwrap_or(&Value::Null));
        hardware.cpu.cpus = v.cpus;
        hardware.memory.size = Mb(v.memory_mb);
        hardware.hdd0.size = Mb(v.disk_virtual_bytes >> 20);
        hardware.hdd0.allocated = Mb(v.disk_bytes >> 20);
        let mut details: MachineDetails = conformed(&raw);
        // Free-form, but the clients decode it as `{enabled: bool}`: that key is always a boolean.
        let shared = details.host_shared_folders.get("enabled").cloned().unwrap_or(Value::Bool(false));
        details.host_shared_folders.insert("enabled".into(), conform(&Value::Bool(false), &shared));
        details.template = if v.is_template { "yes" } else { "no" }.into();
        let home = v.home.display().to_string();
        if details.home_path.is_empty() {
            details.home_path = home.clone();
        }
        if details.uptime.is_empty() {
            details.uptime = "0".into();
        }
        if details.network.ip_addresses.is_empty() {
            details.network.ip_addresses = v
                .ip_addresses
                .iter()
                .map(|ip| MachineIp { ip_type: if ip.is_ipv4() { "ipv4" } else { "ipv6" }.into(), ip: ip.to_string() })
                .collect();
        }
        let kind = match raw.get("Type").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => t.to_string(),
            _ if v.is_template => "Template".into(),
            _ => "VM".into(),
        };
        Machine {
            id: v.id,
            name: v.name,
            description: v.description,
            state: v.state.as_str().into(),
            os: v.os,
            home,
            kind,
            hardware,
            details,
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

/// A secret sent as text (a connection string with credentials): serialised as the plain
/// string it is, but `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"****\"")
    }
}

impl SecretText {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
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
    /// Another catalog server to pull from: `host=[scheme://]user:password@host:port` or
    /// `host=<api_key>@host` (the reference's catalog API connection). Never logged or stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<SecretText>,
    /// A catalog manager (`/catalog-managers`) of the caller to pull from, instead of a
    /// `connection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_manager_id: Option<String>,
    /// The reference's fields this host does not read, kept as sent.
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

/// One resource block of `/config/hardware` (the reference's `SystemUsageItem`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_cpu_count: Option<i64>,
    #[serde(default)]
    pub logical_cpu_count: u32,
    /// MiB.
    #[serde(default)]
    pub memory_size: f64,
    /// MiB. The reference names it `disk_count`; Hangar hosts before it said `disk_size`.
    #[serde(default, rename = "disk_count", alias = "disk_size")]
    pub disk_size: f64,
    /// Names of the running macOS VMs (the reference's, in `total_in_use`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac_vms_running: Vec<String>,
}

impl Resources {
    pub fn new(cpu: u32, memory_mb: u64, disk_mb: u64) -> Resources {
        Resources {
            logical_cpu_count: cpu,
            memory_size: memory_mb as f64,
            disk_size: disk_mb as f64,
            ..Default::default()
        }
    }
}

/// `reverse_proxy` of `/config/hardware`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HardwareReverseProxy {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub host: String,
    /// A text, as the reference has it.
    #[serde(default)]
    pub port: String,
    /// The proxy hosts, as `GET /reverse-proxy/hosts` answers them.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub hosts: Vec<Value>,
}

/// `GET /config/hardware`: the reference's `SystemUsageResponse`, plus Hangar's
/// `hypervisor`, `hypervisor_version`, `acceleration` and `running_vms`.
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
    #[serde(default)]
    pub external_ip_address: String,
    #[serde(default)]
    pub is_reverse_proxy_enabled: bool,
    #[serde(default)]
    pub is_log_streaming_enabled: bool,
    #[serde(default)]
    pub reverse_proxy: HardwareReverseProxy,
    pub total: Resources,
    pub system_reserved: Resources,
    pub total_in_use: Resources,
    #[serde(default)]
    pub total_reserved: Resources,
    pub total_available: Resources,
    #[serde(default)]
    pub running_vms: usize,
    /// How many macOS VMs run (their names are in `total_in_use.mac_vms_running`).
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
    fn a_reference_machine_reads_and_prints_back_its_keys_and_values() {
        let reference = json!({"ID": "a1", "Name": "n", "Description": "", "State": "running", "OS": "ubuntu",
            "Home": "/vms/n.pvm", "Type": "VM", "Template": "no", "Uptime": "12", "Home path": "/vms/n.pvm/config.pvs",
            "Hardware": {"cpu": {"cpus": 2}, "memory": {"size": "1024Mb"}, "hdd0": {"size": "8192Mb", "allocated": "1Mb"}},
            "Startup and Shutdown": {"Autostart delay": 5},
            "user": "ci", "internal_ip_address": "10.0.0.2", "ip_addresses": ["10.0.0.2"],
            "hypervisor": "parallels", "architecture": "arm64"});
        let m: Machine = serde_json::from_value(reference.clone()).unwrap();
        assert_eq!(m.hardware.memory.size, Mb(1024));
        assert_eq!(m.vm_state(), VmState::Running);
        let printed = serde_json::to_value(&m).unwrap();
        for (k, v) in reference.as_object().unwrap() {
            if k != "Hardware" && k != "Startup and Shutdown" {
                assert_eq!(&printed[k], v, "{k}");
            }
        }
        assert_eq!(printed["Hardware"]["hdd0"]["size"], json!("8192Mb"));
        assert_eq!(printed["Startup and Shutdown"]["Autostart delay"], json!(5));
        assert_eq!(serde_json::from_value::<Machine>(printed).unwrap(), m);
    }

    #[test]
    fn every_reference_key_is_printed_with_its_type_even_from_an_empty_report() {
        let m = Machine::from_vm(bare_vm(), None);
        let v = serde_json::to_value(&m).unwrap();
        for key in [
            "Template",
            "Uptime",
            "Home path",
            "Restore Image",
            "GuestTools",
            "Mouse and Keyboard",
            "Startup and Shutdown",
            "Travel mode",
            "Smart Guard",
            "Modality",
            "Time Synchronization",
            "SMBIOS settings",
            "Host Shared Folders",
            "Shared Applications",
            "SmartMount",
            "Print Management",
            "Guest Shared Folders",
            "Network",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["Modality"]["Show on all spaces "], json!(""));
        assert_eq!(v["Host Shared Folders"], json!({"enabled": false}));
        assert!(v["Modality"]["Opacity (percentage)"].is_i64());
        assert!(v["Hardware"]["cpu"]["cpus"].is_u64());
        assert!(v["Hardware"]["cpu"]["VT-x"].is_boolean());
        assert_eq!((v["Template"].as_str(), v["Home path"].as_str()), (Some("no"), Some("/vms/x")));
        assert_eq!(v["Network"]["ipAddresses"], json!([{"type": "ipv4", "ip": "10.0.0.9"}]));
    }

    fn bare_vm() -> VmInfo {
        VmInfo {
            id: "x".into(),
            name: "x".into(),
            description: String::new(),
            state: VmState::Running,
            os: "ubuntu".into(),
            home: "/vms/x".into(),
            cpus: 2,
            memory_mb: 2048,
            disk_bytes: 1 << 30,
            disk_virtual_bytes: 8 << 30,
            ip_addresses: vec!["10.0.0.9".parse().unwrap()],
            owner: Some("ci".into()),
            hypervisor: hangar_hypervisor::HypervisorKind::Qemu,
            architecture: "x86_64".into(),
            is_template: false,
            details: serde_json::Map::new(),
        }
    }

    #[test]
    fn a_driver_report_of_the_wrong_types_is_fitted_to_the_reference_types() {
        let mut vm = bare_vm();
        let report = json!({"Uptime": 42, "Template": "yes",
            "Startup and Shutdown": {"Autostart delay": "7", "Autostart": true},
            "Modality": {"Opacity (percentage)": "not a number"},
            "Hardware": {"cpu": {"cpus": "9", "VT-x": "on", "type": "arm"}, "net0": {"mac": "001C42", "enabled": 1}},
            "Host Shared Folders": {"enabled": "on", "home": {"path": "/Users/x"}}, "Unknown key": 1});
        vm.details = report.as_object().unwrap().clone();
        let v = serde_json::to_value(Machine::from_vm(vm, None)).unwrap();
        assert_eq!(v["Uptime"], json!("42"));
        assert_eq!(v["Template"], json!("no"), "the driver's template flag wins");
        assert_eq!(v["Startup and Shutdown"]["Autostart delay"], json!(7));
        assert_eq!(v["Startup and Shutdown"]["Autostart"], json!("yes"));
        assert_eq!(v["Modality"]["Opacity (percentage)"], json!(0));
        assert_eq!(v["Hardware"]["cpu"]["cpus"], json!(2), "measured cpus win");
        assert_eq!((&v["Hardware"]["cpu"]["VT-x"], &v["Hardware"]["cpu"]["type"]), (&json!(true), &json!("arm")));
        assert_eq!(v["Hardware"]["net0"], json!({"enabled": true, "type": "", "mac": "001C42", "card": ""}));
        assert_eq!(v["Host Shared Folders"], json!({"enabled": true, "home": {"path": "/Users/x"}}));
        assert!(v.get("Unknown key").is_none());
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
        let m = r.catalog_manifest.as_ref().unwrap();
        assert_eq!(m.connection.as_ref().map(SecretText::expose), Some("x"));
        assert!(!format!("{r:?}").contains("\"x\""));
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
        assert_eq!(v["total"], json!({"logical_cpu_count": 8, "memory_size": 16384.0, "disk_count": 100000.0}));
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
