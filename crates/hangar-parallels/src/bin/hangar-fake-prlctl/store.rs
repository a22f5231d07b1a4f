//! The fake's on-disk state: one JSON file per registered VM under `vms/`, the VM bundles
//! (`<name>.pvm` / `<name>.macvm`) with a `config.pvs` that `register` reads back, an
//! append-only event log that `monitor-events` tails, and one lock file that serialises
//! every invocation that reads or changes state.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Fail;

/// A snapshot as the fake keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snap {
    pub id: String,
    pub name: String,
    pub description: String,
    /// `"YYYY-MM-DD HH:MM:SS"`, as `snapshot-list --json` prints it.
    pub date: String,
    /// The VM state the snapshot was taken in, spelled as prlctl's snapshot list does
    /// (`poweroff`, `running`, `paused`, `suspended`).
    pub state: String,
    pub parent: Option<String>,
}

/// A VM as the fake keeps it (configuration plus runtime state).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    /// UUID without braces.
    pub id: String,
    pub name: String,
    pub description: String,
    /// Guest OS as prlctl prints `OS` (`ubuntu`, `macosx`, `win-11`, ...).
    pub os: String,
    /// `VM` or `APPLE_VZ_VM`.
    pub vm_type: String,
    pub state: String,
    pub template: bool,
    /// The bundle folder.
    pub home: PathBuf,
    pub cpus: u32,
    pub memory_mb: u64,
    pub hdd_mb: u64,
    /// `arm` or `x86`.
    pub arch: String,
    pub mac: String,
    pub source_uuid: String,
    pub linked_parent: Option<String>,
    pub snapshots: Vec<Snap>,
    pub current_snapshot: Option<String>,
    /// Unix seconds of the last start, for `Uptime`.
    pub started_at: Option<i64>,
    /// Tests: the IPv4 address to report while the VM runs instead of the derived
    /// `10.211.55.x` (set `"ip_address": "127.0.0.1"` in the VM's record to reach a
    /// service on the test machine as if it ran in the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
}

impl Vm {
    /// The guest's stand-in root: `exec` runs commands with this as working directory.
    pub fn guest_dir(&self) -> PathBuf {
        self.home.join("guest")
    }

    /// IPv4 address the fake reports while the VM runs.
    pub fn ip(&self) -> Option<String> {
        if self.state != "running" {
            return None;
        }
        if let Some(ip) = &self.ip_address {
            return Some(ip.clone());
        }
        let n = self.id.bytes().fold(0u32, |acc, b| acc.wrapping_mul(31).wrapping_add(u32::from(b)));
        Some(format!("10.211.55.{}", 2 + n % 250))
    }
}

/// The state folder (`FAKE_PRL_STATE_DIR`).
pub struct Store {
    pub root: PathBuf,
}

/// An exclusive hold on the state folder, released on drop.
pub struct Locked {
    _file: File,
}

impl Store {
    pub fn open(root: PathBuf) -> Result<Self, Fail> {
        fs::create_dir_all(root.join("vms")).map_err(|e| Fail::io("create the state folder", &e))?;
        fs::create_dir_all(root.join("Parallels")).map_err(|e| Fail::io("create the VM folder", &e))?;
        Ok(Store { root })
    }

    /// Default folder for new VMs, like `~/Parallels`.
    pub fn vm_home(&self) -> PathBuf {
        self.root.join("Parallels")
    }

    pub fn events_path(&self) -> PathBuf {
        self.root.join("events.ndjson")
    }

    /// Take the state lock (blocks until other invocations release it).
    pub fn lock(&self) -> Result<Locked, Fail> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))
            .map_err(|e| Fail::io("open the lock file", &e))?;
        file.lock().map_err(|e| Fail::io("lock the state folder", &e))?;
        Ok(Locked { _file: file })
    }

    pub fn all(&self, _lock: &Locked) -> Result<Vec<Vm>, Fail> {
        let mut vms = Vec::new();
        let dir = fs::read_dir(self.root.join("vms")).map_err(|e| Fail::io("read the state folder", &e))?;
        for entry in dir {
            let entry = entry.map_err(|e| Fail::io("read the state folder", &e))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(|e| Fail::io("read a VM record", &e))?;
            let vm: Vm = serde_json::from_str(&text)
                .map_err(|e| Fail::internal(format!("corrupt VM record {}: {e}", path.display())))?;
            vms.push(vm);
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    /// Find a registered VM by id (with or without braces) or by name.
    pub fn find(&self, lock: &Locked, key: &str) -> Result<Vm, Fail> {
        let key_id = key.trim_start_matches('{').trim_end_matches('}');
        self.all(lock)?
            .into_iter()
            .find(|vm| vm.id.eq_ignore_ascii_case(key_id) || vm.name == key)
            .ok_or_else(Fail::not_found)
    }

    /// Write the VM record and its bundle's `config.pvs`.
    pub fn save(&self, _lock: &Locked, vm: &Vm) -> Result<(), Fail> {
        let text = serde_json::to_string_pretty(vm).map_err(|e| Fail::internal(e.to_string()))?;
        write_atomic(&self.root.join("vms").join(format!("{}.json", vm.id)), text.as_bytes())?;
        if vm.home.is_dir() {
            write_atomic(&vm.home.join("config.pvs"), text.as_bytes())?;
        }
        Ok(())
    }

    /// Forget a VM (its bundle stays).
    pub fn remove(&self, _lock: &Locked, id: &str) -> Result<(), Fail> {
        let path = self.root.join("vms").join(format!("{id}.json"));
        fs::remove_file(path).map_err(|e| Fail::io("remove a VM record", &e))
    }

    /// Append one event for `monitor-events` (NDJSON, the real field names).
    pub fn event(&self, _lock: &Locked, vm_id: &str, name: &str, state: Option<&str>) -> Result<(), Fail> {
        let mut event = serde_json::json!({
            "Timestamp": chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string(),
            "VM ID": format!("{{{vm_id}}}"),
            "Event name": name,
        });
        if let Some(state) = state {
            event["Additional info"] = serde_json::json!({ "Vm state name": state });
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.events_path())
            .map_err(|e| Fail::io("open the event log", &e))?;
        let line = format!("{event}\n");
        file.write_all(line.as_bytes()).map_err(|e| Fail::io("write the event log", &e))
    }
}

/// Read a bundle's `config.pvs` (as written by [`Store::save`]).
pub fn read_bundle(path: &Path) -> Result<Vm, Fail> {
    let config = path.join("config.pvs");
    let text = fs::read_to_string(&config).map_err(|_| {
        Fail::op(format!(
            "Failed to register the VM: Unable to parse the virtual machine configuration file {}. The file is corrupted or does not exist.",
            config.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|_| {
        Fail::op(format!(
            "Failed to register the VM: Unable to parse the virtual machine configuration file {}. The file is corrupted or does not exist.",
            config.display()
        ))
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, bytes).map_err(|e| Fail::io("write state", &e))?;
    fs::rename(&tmp, path).map_err(|e| Fail::io("write state", &e))
}

/// Recursive copy of a bundle folder.
pub fn copy_dir(from: &Path, to: &Path) -> Result<(), Fail> {
    fs::create_dir_all(to).map_err(|e| Fail::io("create the bundle", &e))?;
    for entry in fs::read_dir(from).map_err(|e| Fail::io("read the bundle", &e))? {
        let entry = entry.map_err(|e| Fail::io("read the bundle", &e))?;
        let kind = entry.file_type().map_err(|e| Fail::io("read the bundle", &e))?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(entry.path()).map_err(|e| Fail::io("read the bundle", &e))?;
            std::os::unix::fs::symlink(target, &dest).map_err(|e| Fail::io("copy the bundle", &e))?;
        } else {
            fs::copy(entry.path(), &dest).map_err(|e| Fail::io("copy the bundle", &e))?;
        }
    }
    Ok(())
}
