//! The reference's answer shapes: a VM answer carries every key of the reference's VM object
//! (its `prlctl list -i --json` keys and its own) with the JSON types its clients decode
//! into, on a Parallels host (the fake prlctl, which prints the real shape) and on a QEMU
//! host (a real guest); `/config/hardware` carries the reference's whole hardware object.
//! The Go clients (Terraform) fail a whole answer on one wrong type: the strict decodes
//! below play them.

#![allow(clippy::unwrap_used)]
#![recursion_limit = "512"]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

/// The reference's VM object, key by key, from the json tags of its Go `ParallelsVM` (and
/// the nested types): "s" text, "i" whole number, "b" boolean, "o" free-form object, "a"
/// array. A key starting with `?` is `omitempty` there (checked for its type when present).
fn reference_vm_keys() -> Value {
    let on_off = |keys: &[&str]| Value::Object(keys.iter().map(|k| (k.to_string(), json!("s"))).collect());
    json!({
        "ID": "s", "?host": "s", "?host_url": "s", "?host_id": "s", "?host_name": "s", "?host_state": "s",
        "?host_external_ip_address": "s", "?internal_ip_address": "s", "user": "s",
        "Name": "s", "Description": "s", "Type": "s", "State": "s", "OS": "s", "Template": "s", "Uptime": "s",
        "Home path": "s", "Home": "s", "Restore Image": "s",
        "GuestTools": {"state": "s", "?version": "s"},
        "Mouse and Keyboard": on_off(&["Smart mouse optimized for games", "Sticky mouse", "Smooth scrolling", "Keyboard optimization mode"]),
        "USB and Bluetooth": on_off(&["Automatic sharing cameras", "Automatic sharing bluetooth", "Automatic sharing smart cards",
            "Automatic sharing gamepads", "Support USB 3.0"]),
        "Startup and Shutdown": {"Autostart": "s", "Autostart delay": "i", "Autostop": "s", "Startup view": "s",
            "On shutdown": "s", "On window close": "s", "Pause idle": "s", "Undo disks": "s"},
        "Optimization": on_off(&["Faster virtual machine", "Hypervisor type", "Adaptive hypervisor", "Disabled Windows logo",
            "Auto compress virtual disks", "Nested virtualization", "PMU virtualization", "Longer battery life",
            "Show battery status", "Resource quota"]),
        "Travel mode": {"Enter condition": "s", "Enter threshold": "i", "Quit condition": "s"},
        "Security": on_off(&["Encrypted", "TPM enabled", "TPM type", "Custom password protection", "Configuration is locked",
            "Protected", "Archived", "Packed"]),
        "Smart Guard": {"enabled": "b"},
        "Modality": {"Opacity (percentage)": "i", "Stay on top": "s", "Show on all spaces ": "s", "Capture mouse clicks": "s"},
        "Fullscreen": on_off(&["Use all displays", "Activate spaces on click", "Optimize for games", "Gamma control", "Scale view mode"]),
        "Coherence": on_off(&["Show Windows systray in Mac menu", "Auto-switch to full screen", "Disable aero", "Hide minimized windows"]),
        "Time Synchronization": {"enabled": "b", "Smart mode": "s", "Interval (in seconds)": "i", "Timezone synchronization disabled": "s"},
        "Expiration": {"enabled": "b"},
        "Boot order": "s", "BIOS type": "s", "EFI Secure boot": "s", "Allow select boot device": "s", "External boot device": "s",
        "SMBIOS settings": on_off(&["BIOS Version", "System serial number", "Board Manufacturer"]),
        "Hardware": {
            "cpu": {"cpus": "i", "auto": "s", "VT-x": "b", "hotplug": "b", "accl": "s", "mode": "s", "type": "s"},
            "memory": {"size": "s", "auto": "s", "hotplug": "b"},
            "video": on_off(&["adapter-type", "size", "3d-acceleration", "vertical-sync", "high-resolution",
                "high-resolution-in-guest", "native-scaling-in-guest", "automatic-video-memory"]),
            "memory_quota": {"auto": "s"},
            "hdd0": {"enabled": "b", "port": "s", "image": "s", "type": "s", "size": "s", "online-compact": "s"},
            "cdrom0": {"enabled": "b", "port": "s", "image": "s", "?state": "s"},
            "usb": {"enabled": "b"},
            "net0": {"enabled": "b", "type": "s", "mac": "s", "card": "s"},
            "sound0": {"enabled": "b", "output": "s", "mixer": "s"}
        },
        "Host Shared Folders": "o",
        "Host defined sharing": "s",
        "Shared Profile": {"enabled": "b"},
        "Shared Applications": {"enabled": "b", "Host-to-guest apps sharing": "s", "Guest-to-host apps sharing": "s",
            "Show guest apps folder in Dock": "s", "Show guest notifications": "s", "Bounce dock icon when app flashes": "s"},
        "SmartMount": {"enabled": "b", "?Removable drives": "s", "?CD/DVD drives": "s", "?Network shares": "s"},
        "Miscellaneous Sharing": {"Shared clipboard": "s", "Shared cloud": "s"},
        "Advanced": on_off(&["VM hostname synchronization", "Public SSH keys synchronization", "Show developer tools",
            "Swipe from edges", "Share host location", "Rosetta Linux"]),
        "Print Management": on_off(&["Synchronize with host printers", "Synchronize default printer", "Show host printer UI"]),
        "Guest Shared Folders": {"enabled": "b", "Automount": "s"},
        "Network": {"Conditioned": "s", "Inbound": {"Bandwidth": "s", "Packet Loss": "s", "Delay": "s"},
            "Outbound": {"Bandwidth": "s", "Packet Loss": "s", "Delay": "s"}, "ipAddresses": "a"}
    })
}

/// Every difference between `answer` and the `shape` (missing keys, wrong types), as
/// `path: problem` lines.
fn shape_problems(shape: &Value, answer: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(keys) = shape else { return };
    for (raw_key, want) in keys {
        let (optional, key) = match raw_key.strip_prefix('?') {
            Some(k) => (true, k),
            None => (false, raw_key.as_str()),
        };
        let here = format!("{path}.{key}");
        let Some(got) = answer.get(key) else {
            if !optional {
                out.push(format!("{here}: missing"));
            }
            continue;
        };
        let ok = match want {
            Value::Object(_) => {
                shape_problems(want, got, &here, out);
                got.is_object()
            }
            Value::String(t) => match t.as_str() {
                "s" => got.is_string(),
                "i" => got.is_i64() || got.is_u64(),
                "b" => got.is_boolean(),
                "o" => got.is_object(),
                "a" => got.is_array(),
                _ => false,
            },
            _ => false,
        };
        if !ok {
            out.push(format!("{here}: expected {want}, got {got}"));
        }
    }
}

fn assert_reference_vm(answer: &Value, what: &str) {
    let mut problems = Vec::new();
    shape_problems(&reference_vm_keys(), answer, "", &mut problems);
    assert!(problems.is_empty(), "{what} differs from the reference's VM object:\n{}\n{answer:#}", problems.join("\n"));
    // Terraform reads these, with Go's types.
    let vm: TerraformVm =
        serde_json::from_value(answer.clone()).unwrap_or_else(|e| panic!("{what}: Go-like decode: {e}"));
    assert!(!vm.id.is_empty() && !vm.name.is_empty());
    assert!(vm.hardware.memory.size.ends_with("Mb"), "{}", vm.hardware.memory.size);
    assert!(vm.hardware.cpu.cpus > 0);
}

// ----- the Terraform provider's types (what its Go client decodes into) ---------------------
// A wrong JSON type fails the decode, as Go's json.Unmarshal fails the whole answer.

#[derive(Deserialize)]
struct TfEnabled {
    #[serde(default)]
    #[allow(dead_code)]
    enabled: bool,
}

#[derive(Deserialize)]
struct TfCpu {
    cpus: i64,
    #[serde(rename = "VT-x", default)]
    #[allow(dead_code)]
    vt_x: bool,
}

#[derive(Deserialize)]
struct TfMemory {
    size: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfHardware {
    cpu: TfCpu,
    memory: TfMemory,
    hdd0: TfHdd,
    usb: TfEnabled,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfHdd {
    enabled: bool,
    size: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfStartup {
    #[serde(rename = "Autostart delay")]
    delay: i64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfModality {
    #[serde(rename = "Opacity (percentage)")]
    opacity: i64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TerraformVm {
    user: String,
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    host_id: String,
    #[serde(default)]
    internal_ip_address: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: String,
    #[serde(rename = "Template")]
    template: String,
    #[serde(rename = "Uptime")]
    uptime: String,
    #[serde(rename = "Home path")]
    home_path: String,
    #[serde(rename = "Hardware")]
    hardware: TfHardware,
    #[serde(rename = "Startup and Shutdown")]
    startup: TfStartup,
    #[serde(rename = "Modality")]
    modality: TfModality,
    #[serde(rename = "Host Shared Folders")]
    host_shared_folders: TfEnabled,
    #[serde(rename = "SmartMount")]
    smart_mount: TfEnabled,
    #[serde(rename = "Smart Guard")]
    smart_guard: TfEnabled,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfUsageItem {
    #[serde(default)]
    physical_cpu_count: i64,
    logical_cpu_count: i64,
    memory_size: f64,
    disk_count: f64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfProxyHost {
    #[serde(default)]
    id: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfReverseProxy {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    hosts: Vec<TfProxyHost>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TerraformHardware {
    cpu_type: String,
    cpu_brand: String,
    devops_version: String,
    os_name: String,
    os_version: String,
    #[serde(default)]
    parallels_desktop_version: String,
    #[serde(default)]
    parallels_desktop_licensed: bool,
    #[serde(default)]
    external_ip_address: String,
    is_reverse_proxy_enabled: bool,
    reverse_proxy: Option<TfReverseProxy>,
    system_reserved: TfUsageItem,
    total: TfUsageItem,
    total_available: TfUsageItem,
    total_in_use: TfUsageItem,
    total_reserved: TfUsageItem,
    #[serde(default)]
    enabled_modules: Vec<String>,
}

/// `/config/hardware`: the keys the VS Code extension and Terraform read, with their types.
fn assert_reference_hardware(hw: &Value, what: &str) {
    for key in ["cpu_type", "cpu_brand", "devops_version", "os_name", "os_version"] {
        assert!(hw[key].is_string(), "{what}: {key} in {hw:#}");
    }
    assert!(hw["is_reverse_proxy_enabled"].is_boolean(), "{what}: is_reverse_proxy_enabled in {hw:#}");
    assert!(
        hw["reverse_proxy"].is_object() && hw["reverse_proxy"]["hosts"].is_array(),
        "{what}: reverse_proxy in {hw:#}"
    );
    assert!(hw["enabled_modules"].is_array(), "{what}: enabled_modules");
    for block in ["system_reserved", "total", "total_available", "total_in_use", "total_reserved"] {
        let b = &hw[block];
        assert!(b["logical_cpu_count"].is_u64(), "{what}: {block}.logical_cpu_count in {hw:#}");
        assert!(b["memory_size"].is_number(), "{what}: {block}.memory_size");
        assert!(b["disk_count"].is_number(), "{what}: {block}.disk_count (the reference's name) in {hw:#}");
    }
    let decoded: TerraformHardware = serde_json::from_value(hw.clone())
        .unwrap_or_else(|e| panic!("{what}: Go-like decode of /config/hardware: {e}"));
    assert!(decoded.total.logical_cpu_count > 0 && decoded.total.memory_size > 0.0, "{what}: {hw:#}");
    assert!(decoded.enabled_modules.iter().any(|m| m == "host"), "{what}: {:?}", decoded.enabled_modules);
}

async fn get(c: &reqwest::Client, s: &Server, a: &Auth, path: &str) -> Value {
    let (st, v) = call(c, Method::GET, &s.api(path), a, None, &[]).await;
    assert_eq!(st, 200, "GET {path}: {v}");
    v
}

#[tokio::test]
async fn a_parallels_vm_answer_carries_every_reference_key_with_its_type() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.agent(&dir.path().join("d"), &[("ENABLED_MODULES", "api,host,reverse_proxy")]);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/machines"),
        &ra,
        Some(json!({"name": "shape-1", "image": "golden.pvm", "start_on_create": true})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();

    let one = get(&c, &s, &ra, &format!("/machines/{id}")).await;
    assert_reference_vm(&one, "GET /machines/{id} (Parallels)");
    // What prlctl printed is passed through; what Hangar measured wins.
    assert_eq!(one["Modality"]["Show on all spaces "], "on");
    assert_eq!(one["Startup and Shutdown"]["Autostop"], "suspend");
    assert_eq!(one["GuestTools"]["state"], "installed");
    assert_eq!(one["Template"], "no");
    assert!(one["Home path"].as_str().unwrap().ends_with("shape-1.pvm/config.pvs"), "{}", one["Home path"]);
    assert_eq!(one["State"], "running");
    assert!(one["user"].as_str().is_some_and(|u| !u.is_empty()), "the host user the VM runs as: {}", one["user"]);
    assert!(!one["internal_ip_address"].as_str().unwrap().is_empty());
    assert_eq!(one["Network"]["ipAddresses"][0]["ip"], one["internal_ip_address"]);

    let all = get(&c, &s, &ra, "/machines").await;
    let listed = all.as_array().unwrap().iter().find(|m| m["ID"] == id.as_str()).expect("listed");
    assert_reference_vm(listed, "GET /machines (Parallels)");

    let hw = get(&c, &s, &ra, "/config/hardware").await;
    assert_reference_hardware(&hw, "Parallels host");
    assert!(hw["parallels_desktop_version"].as_str().is_some_and(|v| !v.is_empty()), "{hw:#}");
    assert_eq!(hw["total_in_use"]["logical_cpu_count"], one["Hardware"]["cpu"]["cpus"], "{hw:#}");
}

#[tokio::test]
async fn config_hardware_reports_the_reverse_proxy_hosts_without_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.agent(&dir.path().join("d"), &[("ENABLED_MODULES", "api,host,reverse_proxy")]);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let hw = get(&c, &s, &ra, "/config/hardware").await;
    assert_reference_hardware(&hw, "before any proxy host");
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/reverse-proxy/hosts"),
        &ra,
        Some(json!({"host": "127.0.0.1", "port": "0", "tcp_route": {"target_host": "127.0.0.1", "target_port": "9"}})),
        &[],
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let hw = get(&c, &s, &ra, "/config/hardware").await;
    assert_reference_hardware(&hw, "with a proxy host");
    assert_eq!(hw["is_reverse_proxy_enabled"], hw["reverse_proxy"]["enabled"]);
    let hosts = hw["reverse_proxy"]["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{hw:#}");
    assert!(hosts[0]["port"].is_string(), "ports are texts, as the reference's: {hw:#}");
    assert!(!hw.to_string().contains("PRIVATE KEY"));
    assert_eq!(hosts[0]["tls"]["key"], "", "{hw:#}");
}

/// Every key of the host's answer `host`, found in `fleet` with the same JSON type, as
/// `path: problem` lines.
fn type_differences(host: &Value, fleet: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(keys) = host else { return };
    for (key, want) in keys {
        let here = format!("{path}.{key}");
        let kind = |v: &Value| match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_f64() => "float",
            Value::Number(_) => "integer",
            Value::String(_) => "text",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        match fleet.get(key) {
            None => out.push(format!("{here}: missing (the host answers {want})")),
            Some(got) if kind(got) != kind(want) => {
                out.push(format!("{here}: {} where the host answers {}", kind(got), kind(want)))
            }
            Some(got) => type_differences(want, got, &here, out),
        }
    }
}

/// Through the orchestrator (fleet-wide and per-host, list and get) a VM is the host's whole
/// VM object, key by key with the host's types, plus `host_id` naming the registered host
/// (which the VS Code extension puts in the per-host unregister path), `host` and
/// `host_state`.
#[tokio::test]
async fn an_orchestrator_vm_answer_is_the_hosts_with_its_host_keys() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let OneHostFleet { fake: _, agent, orch, root } = one_host_fleet(&c, dir.path(), "api,orchestrator").await;
    let root = Auth::Bearer(root);
    let hosts = get(&c, &orch, &root, "/orchestrator/hosts").await;
    let host_id = hosts[0]["id"].as_str().expect("the registered host's id").to_string();
    let host_name = hosts[0]["name"].as_str().unwrap().to_string();
    let (st, made) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &root,
        Some(json!({"name": "fleet-shape", "image": "golden.pvm", "architecture": "x86_64", "start_on_create": true,
            "specs": {"cpu": "1", "memory": "1024"}})),
        &[],
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {made}");
    let id = made["id"].as_str().unwrap().to_string();
    assert_eq!(made["host_id"], host_id.as_str());

    let on_host = Auth::Bearer(login(&c, &agent, "root", ROOT_PASSWORD).await);
    let host_answer = get(&c, &agent, &on_host, &format!("/machines/{id}")).await;
    assert_reference_vm(&host_answer, "the host's own answer");

    let check = |v: &Value, what: &str| {
        assert_reference_vm(v, what);
        let mut problems = Vec::new();
        type_differences(&host_answer, v, "", &mut problems);
        assert!(problems.is_empty(), "{what} differs from the host's answer:\n{}\n{v:#}", problems.join("\n"));
        assert_eq!(v["host_id"], host_id.as_str(), "{what}: host_id names the registered host");
        assert_eq!(v["host"], host_name.as_str(), "{what}");
        assert_eq!(v["host_state"], "healthy", "{what}");
        assert_eq!(v["ID"], id.as_str(), "{what}");
        // The host's values, not defaults in its shape.
        for key in ["Home path", "Template", "user", "internal_ip_address", "Type"] {
            assert_eq!(v[key], host_answer[key], "{what}: {key}");
        }
        assert_eq!(v["GuestTools"], host_answer["GuestTools"], "{what}");
        assert_eq!(v["Modality"]["Show on all spaces "], "on", "{what}");
        assert_eq!(v["Hardware"]["cpu"]["cpus"], host_answer["Hardware"]["cpu"]["cpus"], "{what}");
        assert_eq!(v["State"], "running", "{what}");
    };
    let listed = |all: Value, what: &str| {
        all.as_array()
            .unwrap_or_else(|| panic!("{what}: {all}"))
            .iter()
            .find(|m| m["ID"] == id.as_str())
            .unwrap_or_else(|| panic!("{what} does not list {id}: {all:#}"))
            .clone()
    };
    let fleet_list = listed(get(&c, &orch, &root, "/orchestrator/machines").await, "GET /orchestrator/machines");
    check(&fleet_list, "GET /orchestrator/machines");
    check(&get(&c, &orch, &root, &format!("/orchestrator/machines/{id}")).await, "GET /orchestrator/machines/{id}");
    let per_host = format!("/orchestrator/hosts/{host_id}/machines");
    check(
        &listed(get(&c, &orch, &root, &per_host).await, "the per-host list"),
        "GET /orchestrator/hosts/{id}/machines",
    );
    check(&get(&c, &orch, &root, &format!("{per_host}/{id}")).await, "GET /orchestrator/hosts/{id}/machines/{vm_id}");

    // The VS Code extension: stop, then unregister on `vm.host_id` from the fleet list.
    let (st, v) =
        call(&c, Method::PUT, &orch.api(&format!("/orchestrator/machines/{id}/stop")), &root, None, &[]).await;
    assert!((200..300).contains(&st), "stop: {st} {v}");
    let unregister =
        format!("/orchestrator/hosts/{}/machines/{id}/unregister", fleet_list["host_id"].as_str().unwrap());
    let (st, v) =
        call(&c, Method::POST, &orch.api(&unregister), &root, Some(json!({"id": id, "clean_source_uuid": true})), &[])
            .await;
    assert!((200..300).contains(&st), "POST {unregister}: {st} {v}");
    let (st, v) = call(&c, Method::GET, &agent.api(&format!("/machines/{id}")), &on_host, None, &[]).await;
    assert_eq!(st, 404, "the host no longer has the VM: {v}");
    let url = orch.api("/orchestrator/machines");
    wait_for("the orchestrator to drop the unregistered VM", Duration::from_secs(30), || {
        let (c, url, a, id) = (c.clone(), url.clone(), root.clone(), id.clone());
        async move {
            let (st, v) = call(&c, Method::GET, &url, &a, None, &[]).await;
            st == 200 && v.as_array().is_some_and(|all| all.iter().all(|m| m["ID"] != id.as_str()))
        }
    })
    .await;
}

fn guest_image() -> PathBuf {
    let dir = std::env::var("HANGAR_GUEST_IMAGE_DIR").unwrap_or_else(|_| {
        panic!("HANGAR_GUEST_IMAGE_DIR is not set: build the test guest with scripts/build-guest-image.sh DIR (scripts/test.sh does it)")
    });
    let p = PathBuf::from(dir);
    assert!(p.join("image.json").is_file(), "{} holds no test guest; run scripts/build-guest-image.sh", p.display());
    p
}

#[tokio::test]
async fn a_qemu_vm_answer_carries_the_same_keys_with_qemus_values() {
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::os::unix::fs::symlink(&image, images.join("test-guest")).unwrap();
    let vms = dir.path().join("vms");
    let settings = [
        ("HYPERVISOR", "qemu"),
        ("QEMU_ACCELERATION", "tcg"),
        ("HOST_IMAGES_FOLDER", images.to_str().unwrap()),
        ("HOST_VMS_FOLDER", vms.to_str().unwrap()),
    ];
    let s = Server::start(&dir.path().join("d"), &settings);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/machines"),
        &ra,
        Some(json!({"name": "shape-q", "image": "test-guest", "specs": {"cpu": 1, "memory": 128}})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();

    let stopped = get(&c, &s, &ra, &format!("/machines/{id}")).await;
    assert_reference_vm(&stopped, "a stopped QEMU VM");
    assert_eq!(stopped["Uptime"], "0");
    assert_eq!(stopped["Template"], "no");
    assert_eq!(stopped["Type"], "VM");
    assert_eq!(stopped["Home path"], stopped["Home"], "a QEMU VM's Home path is its folder");
    assert!(stopped["Home"].as_str().unwrap().starts_with(vms.to_str().unwrap()), "{}", stopped["Home"]);
    assert_eq!(stopped["Hardware"]["memory"]["size"], "128Mb");
    assert_eq!(stopped["Hardware"]["cpu"]["cpus"], 1);
    assert_eq!(stopped["Hardware"]["net0"]["type"], "user");
    assert!(stopped["Hardware"]["hdd0"]["image"].as_str().unwrap().starts_with(stopped["Home"].as_str().unwrap()));
    assert_eq!(stopped["GuestTools"]["state"], "not_running");

    let hw = get(&c, &s, &ra, "/config/hardware").await;
    assert_reference_hardware(&hw, "QEMU host");
    assert_eq!(hw["parallels_desktop_licensed"], false);

    // Running: an uptime that grows and the guest agent as its tools.
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/start")), &ra, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let exec_url = s.api(&format!("/machines/{id}/execute"));
    wait_for("the guest agent", Duration::from_secs(240), || {
        let (c, u, a) = (c.clone(), exec_url.clone(), ra.clone());
        async move {
            call(&c, Method::PUT, &u, &a, Some(json!({"command": "true", "timeout": 5})), &[]).await.1["exit_code"] == 0
        }
    })
    .await;
    let url = format!("/machines/{id}");
    wait_for("a non-zero uptime", Duration::from_secs(30), || {
        let (c, s2, a, url) = (c.clone(), &s, ra.clone(), url.clone());
        async move { get(&c, s2, &a, &url).await["Uptime"] != "0" }
    })
    .await;
    let running = get(&c, &s, &ra, &url).await;
    assert_reference_vm(&running, "a running QEMU VM");
    assert_eq!(running["GuestTools"]["state"], "installed");
    assert!(running["Uptime"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    let (st, _) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/stop")), &ra, None, &[]).await;
    assert_eq!(st, 200);
}
