//! Tolerant parsers for `prlctl`/`prlsrvctl` JSON output.
//!
//! Unknown fields are ignored, missing fields take defaults, and a field of the wrong type
//! becomes its default instead of failing the whole document. Only output that is not JSON
//! of the expected outer shape (array / object) is a parse error.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use hangar_hypervisor::{HypervisorKind, Snapshot, VmInfo, VmState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Deserialize `T`, or its default when the value has another shape.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(T::deserialize(v).unwrap_or_default())
}

/// A string from any scalar (numbers and booleans are printed).
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    })
}

/// A number from a number or a numeric string; 0 otherwise.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.trim().parse().unwrap_or(0),
        _ => 0,
    })
}

/// A flag from `true`/`false`, `"yes"`/`"no"`, `"on"`/`"off"`, `"true"`/`"false"`, 1/0.
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => b,
        Value::String(s) => matches!(s.trim().to_ascii_lowercase().as_str(), "yes" | "on" | "true" | "1"),
        Value::Number(n) => n.as_u64().unwrap_or(0) != 0,
        _ => false,
    })
}

/// One VM of `prlctl list -i --json` (only the fields the driver uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlVm {
    #[serde(rename = "ID", deserialize_with = "text")]
    pub id: String,
    #[serde(rename = "Name", deserialize_with = "text")]
    pub name: String,
    #[serde(rename = "Description", deserialize_with = "text")]
    pub description: String,
    #[serde(rename = "Type", deserialize_with = "text")]
    pub vm_type: String,
    #[serde(rename = "State", deserialize_with = "text")]
    pub state: String,
    #[serde(rename = "OS", deserialize_with = "text")]
    pub os: String,
    #[serde(rename = "Template", deserialize_with = "flag")]
    pub template: bool,
    #[serde(rename = "Home", deserialize_with = "text")]
    pub home: String,
    #[serde(rename = "Home path", deserialize_with = "text")]
    pub home_path: String,
    #[serde(rename = "Hardware", deserialize_with = "lenient")]
    pub hardware: PrlHardware,
    #[serde(rename = "Network", deserialize_with = "lenient")]
    pub network: PrlNetwork,
    /// The whole object as prlctl printed it (the API answers its keys).
    #[serde(skip)]
    pub raw: serde_json::Map<String, Value>,
}

/// `Hardware` of a VM.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlHardware {
    #[serde(deserialize_with = "lenient")]
    pub cpu: PrlCpu,
    #[serde(deserialize_with = "lenient")]
    pub memory: PrlSized,
    #[serde(deserialize_with = "lenient")]
    pub hdd0: PrlSized,
}

/// `Hardware.cpu`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlCpu {
    #[serde(deserialize_with = "number")]
    pub cpus: u64,
    #[serde(rename = "type", deserialize_with = "text")]
    pub cpu_type: String,
}

/// A device with a size string (`Hardware.memory`, `Hardware.hdd0`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlSized {
    #[serde(deserialize_with = "text")]
    pub size: String,
}

/// `Network` of a VM.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlNetwork {
    #[serde(rename = "ipAddresses", deserialize_with = "lenient")]
    pub ip_addresses: Vec<PrlIp>,
}

/// One of `Network.ipAddresses`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlIp {
    #[serde(rename = "type", deserialize_with = "text")]
    pub kind: String,
    #[serde(deserialize_with = "text")]
    pub ip: String,
}

/// One snapshot of `prlctl snapshot-list --json` (the map's values).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlSnapshot {
    #[serde(deserialize_with = "text")]
    pub name: String,
    #[serde(deserialize_with = "text")]
    pub date: String,
    #[serde(deserialize_with = "text")]
    pub state: String,
    #[serde(deserialize_with = "flag")]
    pub current: bool,
    #[serde(deserialize_with = "text")]
    pub parent: String,
}

/// `prlsrvctl info --json` (the fields the driver uses).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlServerInfo {
    #[serde(rename = "ID", deserialize_with = "text")]
    pub id: String,
    #[serde(rename = "Hostname", deserialize_with = "text")]
    pub hostname: String,
    #[serde(rename = "OS", deserialize_with = "text")]
    pub os: String,
    #[serde(rename = "Version", deserialize_with = "text")]
    pub version: String,
    #[serde(rename = "VM home", deserialize_with = "text")]
    pub vm_home: String,
    #[serde(rename = "License", deserialize_with = "lenient")]
    pub license: PrlLicense,
    #[serde(rename = "Hardware Id", deserialize_with = "text")]
    pub hardware_id: String,
}

/// `License` of `prlsrvctl info`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlLicense {
    #[serde(deserialize_with = "text")]
    pub state: String,
}

/// One user of `prlsrvctl user list --json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlUser {
    #[serde(rename = "NAME", deserialize_with = "text")]
    pub name: String,
    #[serde(rename = "MNG_SETTINGS", deserialize_with = "text")]
    pub manage_settings: String,
    #[serde(rename = "DEF_VM_HOME", deserialize_with = "text")]
    pub default_vm_home: String,
}

/// One line of `prlctl monitor-events --json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlEvent {
    #[serde(rename = "Timestamp", deserialize_with = "text")]
    pub timestamp: String,
    #[serde(rename = "VM ID", deserialize_with = "text")]
    pub vm_id: String,
    #[serde(rename = "Event name", deserialize_with = "text")]
    pub name: String,
    #[serde(rename = "Additional info", deserialize_with = "lenient")]
    pub info: PrlEventInfo,
}

/// `Additional info` of an event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrlEventInfo {
    #[serde(rename = "Vm state name", deserialize_with = "text")]
    pub vm_state_name: String,
}

/// Parse JSON from a tool's stdout. Like other prlctl clients, tolerate noise printed
/// before or after the document (warnings, a trailing prompt).
pub fn json_document(out: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(out) {
        Ok(v) => Ok(v),
        Err(first) => {
            let start = out.find(['[', '{']);
            let end = out.rfind([']', '}']);
            if let (Some(s), Some(e)) = (start, end)
                && s < e
                && let Ok(v) = serde_json::from_str::<Value>(&out[s..=e])
            {
                return Ok(v);
            }
            Err(first.to_string())
        }
    }
}

/// `prlctl list -i --json`: an array of VMs. Elements without an `ID` are skipped.
pub fn vm_list(out: &str) -> Result<Vec<PrlVm>, String> {
    match json_document(out)? {
        Value::Array(items) => Ok(items
            .into_iter()
            .filter_map(|v| {
                let mut vm = PrlVm::deserialize(&v).ok()?;
                if let Value::Object(raw) = v {
                    vm.raw = raw;
                }
                Some(vm)
            })
            .filter(|vm| !trim_id(&vm.id).is_empty())
            .collect()),
        other => Err(format!("expected a JSON array of VMs, got {}", kind(&other))),
    }
}

/// `prlctl snapshot-list --json`: an object keyed by `"{uuid}"`. Empty output (no
/// snapshots) is an empty list.
pub fn snapshot_map(out: &str) -> Result<Vec<(String, PrlSnapshot)>, String> {
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    match json_document(out)? {
        Value::Object(map) => Ok(map
            .into_iter()
            .filter_map(|(k, v)| PrlSnapshot::deserialize(v).ok().map(|s| (trim_id(&k).to_string(), s)))
            .filter(|(k, _)| !k.is_empty())
            .collect()),
        other => Err(format!("expected a JSON object of snapshots, got {}", kind(&other))),
    }
}

/// `prlsrvctl info --json`.
pub fn server_info(out: &str) -> Result<PrlServerInfo, String> {
    match json_document(out)? {
        v @ Value::Object(_) => PrlServerInfo::deserialize(v).map_err(|e| e.to_string()),
        other => Err(format!("expected a JSON object, got {}", kind(&other))),
    }
}

/// `prlsrvctl user list --json`.
pub fn user_list(out: &str) -> Result<Vec<PrlUser>, String> {
    match json_document(out)? {
        Value::Array(items) => Ok(items.into_iter().filter_map(|v| PrlUser::deserialize(v).ok()).collect()),
        other => Err(format!("expected a JSON array of users, got {}", kind(&other))),
    }
}

/// One `monitor-events --json` line.
pub fn event(line: &str) -> Result<PrlEvent, String> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err(format!("expected a JSON object, got {}", kind(&v)));
    }
    PrlEvent::deserialize(v).map_err(|e| e.to_string())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `{uuid}` → `uuid`.
pub fn trim_id(id: &str) -> &str {
    id.trim().trim_start_matches('{').trim_end_matches('}')
}

/// The id of a created snapshot from `prlctl snapshot`'s text (the first `{...}`).
pub fn created_snapshot_id(out: &str) -> Option<String> {
    let start = out.find('{')?;
    let end = start + out[start..].find('}')?;
    let id = out[start + 1..end].trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Size strings such as `"2048Mb"`, `"64Gb"`, `"512 KB"`, `"1.5Gb"` to bytes. A bare
/// number is taken as megabytes (Parallels' unit for memory and disks).
pub fn size_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    if !num.is_finite() || num < 0.0 {
        return None;
    }
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" if unit.is_empty() => 1 << 20,
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    let bytes = num * mult as f64;
    (bytes <= u64::MAX as f64).then_some(bytes as u64)
}

/// Parallels state names to [`VmState`].
pub fn vm_state(s: &str) -> VmState {
    match s.trim().to_ascii_lowercase().as_str() {
        "running" => VmState::Running,
        "stopped" | "poweroff" | "powered off" => VmState::Stopped,
        "paused" | "pausing" => VmState::Paused,
        "suspended" => VmState::Suspended,
        "suspending" => VmState::Suspending,
        "starting" | "resetting" | "restarting" => VmState::Starting,
        "stopping" => VmState::Stopping,
        "resuming" | "continuing" | "restoring" => VmState::Resuming,
        _ => VmState::Unknown,
    }
}

fn architecture(cpu_type: &str, vm_type: &str) -> String {
    match cpu_type.trim().to_ascii_lowercase().as_str() {
        "arm" | "arm64" | "aarch64" => "arm64".to_string(),
        "x86" | "x86_64" | "x64" | "amd64" | "intel" | "i386" => "x86_64".to_string(),
        _ if vm_type == "APPLE_VZ_VM" => "arm64".to_string(),
        _ if std::env::consts::ARCH == "aarch64" => "arm64".to_string(),
        _ => "x86_64".to_string(),
    }
}

impl PrlVm {
    /// The bundle folder: `Home`, or the folder of `Home path` (`.../config.pvs`).
    pub fn home_dir(&self) -> PathBuf {
        let home = self.home.trim();
        if !home.is_empty() {
            return PathBuf::from(home.trim_end_matches('/'));
        }
        let path = PathBuf::from(self.home_path.trim());
        if path.file_name().and_then(|n| n.to_str()) == Some("config.pvs") {
            path.parent().map(PathBuf::from).unwrap_or_default()
        } else {
            path
        }
    }

    /// Driver-neutral view. `disk_bytes` is measured on the host by the caller.
    pub fn to_info(&self, owner: Option<String>, disk_bytes: u64) -> VmInfo {
        let ip_addresses = self
            .network
            .ip_addresses
            .iter()
            .filter_map(|a| a.ip.trim().split('/').next().and_then(|ip| ip.parse::<IpAddr>().ok()))
            .collect();
        VmInfo {
            id: trim_id(&self.id).to_string(),
            name: self.name.clone(),
            description: self.description.clone(),
            state: vm_state(&self.state),
            os: self.os.clone(),
            home: self.home_dir(),
            cpus: u32::try_from(self.hardware.cpu.cpus).unwrap_or(u32::MAX),
            memory_mb: size_bytes(&self.hardware.memory.size).unwrap_or(0) >> 20,
            disk_bytes,
            disk_virtual_bytes: size_bytes(&self.hardware.hdd0.size).unwrap_or(0),
            ip_addresses,
            owner,
            hypervisor: HypervisorKind::Parallels,
            architecture: architecture(&self.hardware.cpu.cpu_type, &self.vm_type),
            is_template: self.template,
            details: self.raw.clone(),
        }
    }
}

/// Snapshot dates are printed in the host's local time (`YYYY-MM-DD HH:MM:SS`).
pub fn snapshot_date(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").ok()?;
    chrono::Local.from_local_datetime(&naive).earliest().map(|d| d.with_timezone(&Utc))
}

/// Turn `snapshot-list` entries into [`Snapshot`]s, oldest first. `descriptions` fills in
/// what the JSON list does not carry.
pub fn snapshots(entries: Vec<(String, PrlSnapshot)>, descriptions: &BTreeMap<String, String>) -> Vec<Snapshot> {
    let mut out: Vec<Snapshot> = entries
        .into_iter()
        .map(|(id, s)| {
            let parent = trim_id(&s.parent);
            Snapshot {
                description: descriptions.get(&id).cloned().unwrap_or_default(),
                created_at: snapshot_date(&s.date),
                current: s.current,
                parent: (!parent.is_empty()).then(|| parent.to_string()),
                state: vm_state(&s.state),
                name: s.name,
                id,
            }
        })
        .collect();
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
    out
}

/// `"Desktop 26.1.0-57287"` → `"26.1.0-57287"`.
pub fn version_number(v: &str) -> String {
    v.split_whitespace().find(|w| w.starts_with(|c: char| c.is_ascii_digit())).unwrap_or(v.trim()).to_string()
}

/// `"Mac OS X 15.5(24F74)"` → (`"Mac OS X"`, `"15.5"`).
pub fn os_name_version(os: &str) -> (String, String) {
    let words: Vec<&str> = os.split_whitespace().collect();
    match words.iter().position(|w| w.starts_with(|c: char| c.is_ascii_digit())) {
        Some(i) => {
            let version = words[i].split('(').next().unwrap_or(words[i]).to_string();
            (words[..i].join(" "), version)
        }
        None => (os.trim().to_string(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_bytes("2048Mb"), Some(2048 << 20));
        assert_eq!(size_bytes("65536Mb"), Some(65536u64 << 20));
        assert_eq!(size_bytes("64Gb"), Some(64u64 << 30));
        assert_eq!(size_bytes("1.5Gb"), Some(3 << 29));
        assert_eq!(size_bytes("512 KB"), Some(512 << 10));
        assert_eq!(size_bytes("100b"), Some(100));
        assert_eq!(size_bytes("4096"), Some(4096 << 20));
        assert_eq!(size_bytes("2TiB"), Some(2u64 << 40));
        assert_eq!(size_bytes(""), None);
        assert_eq!(size_bytes("lots"), None);
        assert_eq!(size_bytes("12Xb"), None);
    }

    #[test]
    fn states() {
        assert_eq!(vm_state("running"), VmState::Running);
        assert_eq!(vm_state("Stopped"), VmState::Stopped);
        assert_eq!(vm_state("poweroff"), VmState::Stopped);
        assert_eq!(vm_state("paused"), VmState::Paused);
        assert_eq!(vm_state("suspended"), VmState::Suspended);
        assert_eq!(vm_state("suspending"), VmState::Suspending);
        assert_eq!(vm_state("resuming"), VmState::Resuming);
        assert_eq!(vm_state("invalid"), VmState::Unknown);
        assert_eq!(vm_state(""), VmState::Unknown);
    }

    #[test]
    fn snapshot_ids_from_text() {
        assert_eq!(
            created_snapshot_id("Creating the snapshot...\nThe snapshot with id {0dc70c48-9688-435e-9ce4-7770f75c16bb} has been successfully created.\n")
                .as_deref(),
            Some("0dc70c48-9688-435e-9ce4-7770f75c16bb")
        );
        assert_eq!(created_snapshot_id("no id here"), None);
        assert_eq!(created_snapshot_id("{}"), None);
    }

    #[test]
    fn versions_and_os() {
        assert_eq!(version_number("Desktop 26.1.0-57287"), "26.1.0-57287");
        assert_eq!(version_number("19.1.0-54729"), "19.1.0-54729");
        assert_eq!(os_name_version("Mac OS X 15.5(24F74)"), ("Mac OS X".to_string(), "15.5".to_string()));
        assert_eq!(os_name_version("macOS"), ("macOS".to_string(), String::new()));
    }

    #[test]
    fn noise_around_json_is_tolerated_but_garbage_is_not() {
        assert!(vm_list("Warning: something\n[]\n").is_ok());
        assert!(vm_list("[{\"ID\": \"{7d3c\u{fffd} PRL_ERR").is_err());
        assert!(vm_list("{}").is_err());
        assert!(snapshot_map("").is_ok_and(|v| v.is_empty()));
        assert!(snapshot_map("[1,2]").is_err());
    }
}
