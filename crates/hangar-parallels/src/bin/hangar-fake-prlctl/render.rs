//! Output in the shapes of the real tools (see the reference's §8: keys with spaces, size
//! strings such as `"2048Mb"`, `{uuid}` ids in snapshot lists).

use serde_json::{Map, Value, json};

use crate::store::Vm;

fn onoff(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// One element of `prlctl list -i --json`.
pub fn vm_info(vm: &Vm) -> Value {
    let home = format!("{}/", vm.home.display());
    let uptime = match (vm.state.as_str(), vm.started_at) {
        ("running" | "paused", Some(t)) => (chrono::Utc::now().timestamp() - t).max(0).to_string(),
        _ => "0".to_string(),
    };
    let macos = vm.vm_type == "APPLE_VZ_VM";
    let mut hardware = json!({
        "cpu": {"cpus": vm.cpus, "auto": "off", "VT-x": true, "hotplug": false, "accl": "high", "mode": "64", "type": vm.arch},
        "memory": {"size": format!("{}Mb", vm.memory_mb), "auto": "off", "hotplug": false},
        "video": {"adapter-type": "parallels", "size": "0Mb", "3d-acceleration": "highest", "vertical-sync": "on",
                  "high-resolution": "off", "high-resolution-in-guest": "off", "native-scaling-in-guest": "off",
                  "automatic-video-memory": "on"},
        "memory_quota": {"auto": "on"},
        "hdd0": {"enabled": true, "port": "sata:0", "image": format!("{}harddisk.hdd", home), "type": "expanded",
                 "size": format!("{}Mb", vm.hdd_mb), "online-compact": "on"},
        "cdrom0": {"enabled": true, "port": "sata:1", "image": "", "state": "disconnected"},
        "usb": {"enabled": true},
        "net0": {"enabled": true, "type": "shared", "mac": vm.mac, "card": "virtio"},
        "sound0": {"enabled": true, "output": "Default", "mixer": "Default"}
    });
    if macos {
        // Apple VZ VMs report fewer devices.
        if let Some(obj) = hardware.as_object_mut() {
            obj.remove("cdrom0");
            obj.remove("memory_quota");
        }
    }
    let mut ips = Vec::new();
    if let Some(ip) = vm.ip() {
        ips.push(json!({"type": "ipv4", "ip": ip}));
    }
    let network = json!({
        "Conditioned": "off",
        "Inbound": {"Bandwidth": "0 Kbps", "Packet Loss": "0 %", "Delay": "0 ms"},
        "Outbound": {"Bandwidth": "0 Kbps", "Packet Loss": "0 %", "Delay": "0 ms"},
        "ipAddresses": ips
    });
    json!({
        "ID": vm.id,
        "Name": vm.name,
        "Description": vm.description,
        "Type": vm.vm_type,
        "State": vm.state,
        "OS": vm.os,
        "Template": if vm.template { "yes" } else { "no" },
        "Uptime": uptime,
        "Home path": format!("{}config.pvs", home),
        "Home": home,
        "Restore Image": "",
        "GuestTools": {"state": if vm.state == "running" { "installed" } else { "possibly_installed" }, "version": "26.1.0-57287"},
        "Mouse and Keyboard": {"Smart mouse optimized for games": "auto", "Sticky mouse": "off", "Smooth scrolling": "on",
                               "Keyboard optimization mode": "auto"},
        "USB and Bluetooth": {"Automatic sharing cameras": "on", "Automatic sharing bluetooth": "off",
                              "Automatic sharing smart cards": "off", "Automatic sharing gamepads": "on", "Support USB 3.0": "on"},
        "Startup and Shutdown": {"Autostart": "off", "Autostart delay": 0, "Autostop": "suspend", "Startup view": "window",
                                 "On shutdown": "window", "On window close": "keep running", "Pause idle": "off", "Undo disks": "off"},
        "Optimization": {"Faster virtual machine": "on", "Hypervisor type": "apple", "Adaptive hypervisor": "off",
                         "Disabled Windows logo": "on", "Auto compress virtual disks": "on", "Nested virtualization": "off",
                         "PMU virtualization": "off", "Longer battery life": "off", "Show battery status": "on",
                         "Resource quota": "unlimited"},
        "Travel mode": {"Enter condition": "never", "Enter threshold": 5, "Quit condition": "never"},
        "Security": {"Encrypted": "off", "TPM enabled": "off", "TPM type": "", "Custom password protection": "off",
                     "Configuration is locked": "off", "Protected": "off", "Archived": "off", "Packed": "off"},
        "Smart Guard": {"enabled": false},
        "Modality": {"Opacity (percentage)": 50, "Stay on top": "on", "Show on all spaces ": "on", "Capture mouse clicks": "on"},
        "Fullscreen": {"Use all displays": "off", "Activate spaces on click": "off", "Optimize for games": "off",
                       "Gamma control": "on", "Scale view mode": "auto"},
        "Coherence": {"Show Windows systray in Mac menu": "on", "Auto-switch to full screen": "on",
                      "Disable aero": "off", "Hide minimized windows": "off"},
        "Time Synchronization": {"enabled": true, "Smart mode": "on", "Interval (in seconds)": 60,
                                 "Timezone synchronization disabled": "off"},
        "Expiration": {"enabled": false},
        "Boot order": "hdd0 cdrom0 usb net0",
        "BIOS type": "efi-arm64",
        "EFI Secure boot": "off",
        "Allow select boot device": "off",
        "External boot device": "",
        "SMBIOS settings": {"BIOS Version": "", "System serial number": "", "Board Manufacturer": "Parallels"},
        "Hardware": hardware,
        "Host Shared Folders": {"enabled": false},
        "Host defined sharing": "All disks",
        "Shared Profile": {"enabled": false},
        "Shared Applications": {"enabled": false},
        "SmartMount": {"enabled": false, "Removable drives": "off", "CD/DVD drives": "off", "Network shares": "off"},
        "Miscellaneous Sharing": {"Shared clipboard": onoff(true), "Shared cloud": onoff(false)},
        "Advanced": {"VM hostname synchronization": "on", "Public SSH keys synchronization": "on",
                     "Show developer tools": "off", "Swipe from edges": "off", "Share host location": "off",
                     "Rosetta Linux": "off"},
        "Print Management": {"Synchronize with host printers": "on", "Synchronize default printer": "on",
                             "Show host printer UI": "off"},
        "Guest Shared Folders": {"enabled": true, "Automount": "on"},
        "Network": network
    })
}

/// One element of `prlctl list [-f] --json` (the short form).
pub fn vm_short(vm: &Vm) -> Value {
    json!({
        "uuid": format!("{{{}}}", vm.id),
        "status": vm.state,
        "ip_configured": vm.ip().unwrap_or_else(|| "-".to_string()),
        "name": vm.name,
    })
}

/// `prlctl snapshot-list <vm> --json`: an object keyed by `"{snapshot-uuid}"`.
pub fn snapshot_list(vm: &Vm) -> Value {
    let mut map = Map::new();
    for snap in &vm.snapshots {
        map.insert(
            format!("{{{}}}", snap.id),
            json!({
                "name": snap.name,
                "date": snap.date,
                "state": snap.state,
                "current": vm.current_snapshot.as_deref() == Some(snap.id.as_str()),
                "parent": snap.parent.as_ref().map(|p| format!("{{{p}}}")).unwrap_or_default(),
            }),
        );
    }
    Value::Object(map)
}

/// Text table of `prlctl list` without `--json`.
pub fn list_table(vms: &[Vm], header: bool) -> String {
    let mut out = String::new();
    if header {
        out.push_str(&format!("{:<38} {:<12} {:<15} {}\n", "UUID", "STATUS", "IP_ADDR", "NAME"));
    }
    for vm in vms {
        out.push_str(&format!(
            "{:<38} {:<12} {:<15} {}\n",
            format!("{{{}}}", vm.id),
            vm.state,
            vm.ip().unwrap_or_else(|| "-".to_string()),
            vm.name
        ));
    }
    out
}
