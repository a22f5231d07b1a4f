//! The `prlctl` subcommands the driver uses, with the real option names.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::render;
use crate::store::{self, Snap, Store, Vm};
use crate::{Done, Fail, OptSpec, parse_opts};

/// Version string printed by `prlctl --version`.
const VERSION: &str = "prlctl version 26.1.0 (57287)";

pub fn run(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let Some(sub) = args.first() else {
        return Err(Fail::usage("Usage: prlctl <command> [<args>]\nSee 'prlctl --help'."));
    };
    let rest = &args[1..];
    match sub.as_str() {
        "--version" | "-V" => Ok(Done::Out(format!("{VERSION}\n"))),
        "list" => list(store, rest),
        "create" => create(store, rest),
        "clone" => clone(store, rest),
        "register" => register(store, rest),
        "unregister" => unregister(store, rest),
        "delete" => delete(store, rest),
        "start" | "stop" | "pause" | "resume" | "suspend" | "reset" | "restart" => power(store, sub, rest),
        "set" => set(store, rest),
        "snapshot" => snapshot(store, rest),
        "snapshot-list" => snapshot_list(store, rest),
        "snapshot-delete" => snapshot_delete(store, rest),
        "snapshot-switch" => snapshot_switch(store, rest),
        "exec" => exec(store, rest),
        "monitor-events" => monitor_events(store, rest),
        other => Err(Fail::usage(format!("Unknown command: {other}\nSee 'prlctl --help'."))),
    }
}

fn one_vm(opts: &crate::Opts, cmd: &str) -> Result<String, Fail> {
    match opts.pos.as_slice() {
        [vm] => Ok(vm.clone()),
        _ => Err(Fail::usage(format!("Usage: prlctl {cmd} <ID | name> ..."))),
    }
}

fn state_error(verb: &str, vm: &Vm) -> Fail {
    Fail::op(format!(
        "Failed to {verb} the VM: Unable to perform the action because the virtual machine \"{}\" is {}.",
        vm.name, vm.state
    ))
}

fn host_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") { "arm" } else { "x86" }
}

fn new_mac() -> String {
    let u = uuid::Uuid::new_v4();
    let b = u.as_bytes();
    format!("001C42{:02X}{:02X}{:02X}", b[0], b[1], b[2])
}

fn list(store: &Store, args: &[String]) -> Result<Done, Fail> {
    const SPEC: &[OptSpec] = &[
        ("--all", "-a", false),
        ("--info", "-i", false),
        ("--full", "-f", false),
        ("--json", "-j", false),
        ("--no-header", "-H", false),
        ("--template", "-t", false),
    ];
    let opts = parse_opts(args, SPEC)?;
    let lock = store.lock()?;
    let vms: Vec<Vm> = match opts.pos.as_slice() {
        [key] => vec![store.find(&lock, key)?],
        [] => store
            .all(&lock)?
            .into_iter()
            .filter(|vm| vm.template == opts.flag("--template"))
            .filter(|vm| opts.flag("--all") || vm.state != "stopped")
            .collect(),
        _ => {
            return Err(Fail::usage("Usage: prlctl list [<ID | name>] [-a] [-i] [-f] [-j]"));
        }
    };
    drop(lock);
    let json = opts.flag("--json");
    let out = if opts.flag("--info") {
        if json {
            let arr: Vec<_> = vms.iter().map(render::vm_info).collect();
            pretty(&serde_json::Value::Array(arr))?
        } else {
            let mut s = String::new();
            for vm in &vms {
                s.push_str(&format!(
                    "ID: {{{}}}\nName: {}\nDescription: {}\nType: {}\nState: {}\nOS: {}\nHome: {}/\n\n",
                    vm.id,
                    vm.name,
                    vm.description,
                    vm.vm_type,
                    vm.state,
                    vm.os,
                    vm.home.display()
                ));
            }
            s
        }
    } else if json {
        let arr: Vec<_> = vms.iter().map(render::vm_short).collect();
        pretty(&serde_json::Value::Array(arr))?
    } else {
        render::list_table(&vms, !opts.flag("--no-header"))
    };
    Ok(Done::Out(out))
}

fn pretty(v: &serde_json::Value) -> Result<String, Fail> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| Fail::internal(e.to_string()))
}

fn create(store: &Store, args: &[String]) -> Result<Done, Fail> {
    const SPEC: &[OptSpec] =
        &[("--ostype", "-o", true), ("--distribution", "-d", true), ("--dst", "", true), ("--no-hdd", "", false)];
    let opts = parse_opts(args, SPEC)?;
    let name = one_vm(&opts, "create")?;
    let (os, vm_type, ext) = match (opts.value("--distribution"), opts.value("--ostype")) {
        (Some(d), _) if d.starts_with("mac") => ("macosx".to_string(), "APPLE_VZ_VM", "macvm"),
        (Some(d), _) => (d.to_string(), "VM", "pvm"),
        (None, Some("macos")) => ("macosx".to_string(), "APPLE_VZ_VM", "macvm"),
        (None, Some("windows")) => ("win-11".to_string(), "VM", "pvm"),
        (None, Some(o)) => (o.to_string(), "VM", "pvm"),
        (None, None) => ("linux".to_string(), "VM", "pvm"),
    };
    let lock = store.lock()?;
    if store.all(&lock)?.iter().any(|vm| vm.name == name) {
        return Err(Fail::op(format!(
            "Failed to create the VM: The virtual machine with the name \"{name}\" already exists."
        )));
    }
    let dst = opts.value("--dst").map(PathBuf::from).unwrap_or_else(|| store.vm_home());
    let home = dst.join(format!("{name}.{ext}"));
    if home.exists() {
        return Err(Fail::op(format!("Failed to create the VM: The directory {} already exists.", home.display())));
    }
    make_bundle(&home)?;
    let macos = vm_type == "APPLE_VZ_VM";
    let vm = Vm {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.clone(),
        description: String::new(),
        os: os.clone(),
        vm_type: vm_type.to_string(),
        state: "stopped".to_string(),
        template: false,
        home,
        cpus: if macos { 4 } else { 2 },
        memory_mb: if macos { 4096 } else { 2048 },
        hdd_mb: if opts.flag("--no-hdd") { 0 } else { 65536 },
        arch: if macos { "arm".to_string() } else { host_arch().to_string() },
        mac: new_mac(),
        source_uuid: uuid::Uuid::new_v4().to_string(),
        linked_parent: None,
        snapshots: Vec::new(),
        current_snapshot: None,
        started_at: None,
        ip_address: None,
    };
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_added", None)?;
    Ok(Done::Out(format!(
        "Creating the virtual machine...\nGenerate the VM configuration for {os}.\nThe VM has been successfully created.\n"
    )))
}

fn make_bundle(home: &Path) -> Result<(), Fail> {
    std::fs::create_dir_all(home.join("harddisk.hdd")).map_err(|e| Fail::io("create the VM bundle", &e))?;
    std::fs::create_dir_all(home.join("guest")).map_err(|e| Fail::io("create the VM bundle", &e))?;
    std::fs::write(
        home.join("harddisk.hdd").join("DiskDescriptor.xml"),
        "<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\"/>\n",
    )
    .map_err(|e| Fail::io("create the VM bundle", &e))
}

fn clone(store: &Store, args: &[String]) -> Result<Done, Fail> {
    const SPEC: &[OptSpec] = &[
        ("--name", "-n", true),
        ("--template", "-t", false),
        ("--dst", "", true),
        ("--linked", "", false),
        ("--id", "-i", true),
        ("--regenerate-src-uuid", "", false),
        ("--changesid", "", false),
    ];
    let opts = parse_opts(args, SPEC)?;
    let key = one_vm(&opts, "clone")?;
    let Some(name) = opts.value("--name").map(str::to_string) else {
        return Err(Fail::usage("The --name option is required."));
    };
    let lock = store.lock()?;
    let mut src = store.find(&lock, &key)?;
    if !matches!(src.state.as_str(), "stopped" | "suspended") {
        return Err(state_error("clone", &src));
    }
    if store.all(&lock)?.iter().any(|vm| vm.name == name) {
        return Err(Fail::op(format!(
            "Failed to clone the VM: The virtual machine with the name \"{name}\" already exists."
        )));
    }
    let ext = src.home.extension().and_then(|e| e.to_str()).unwrap_or("pvm").to_string();
    let dst = opts.value("--dst").map(PathBuf::from).unwrap_or_else(|| store.vm_home());
    let home = dst.join(format!("{name}.{ext}"));
    if home.exists() {
        return Err(Fail::op(format!("Failed to clone the VM: The directory {} already exists.", home.display())));
    }
    let linked = opts.flag("--linked");
    if linked {
        // A linked clone hangs off a snapshot of the source; Parallels takes one if needed.
        if let Some(sid) = opts.value("--id") {
            let sid = sid.trim_start_matches('{').trim_end_matches('}');
            if !src.snapshots.iter().any(|s| s.id == sid) {
                return Err(Fail::op(format!(
                    "Failed to clone the VM: The snapshot with ID {{{sid}}} does not exist."
                )));
            }
        } else if src.current_snapshot.is_none() {
            let snap = new_snapshot(&src, "Snapshot for linked clone", "");
            src.current_snapshot = Some(snap.id.clone());
            src.snapshots.push(snap);
            store.save(&lock, &src)?;
            store.event(&lock, &src.id, "vm_snapshots_tree_changed", None)?;
        }
    }
    store::copy_dir(&src.home, &home)?;
    let _ = std::fs::remove_file(home.join("config.pvs"));
    let vm = Vm {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.clone(),
        state: "stopped".to_string(),
        template: opts.flag("--template"),
        home,
        mac: new_mac(),
        source_uuid: if opts.flag("--regenerate-src-uuid") {
            uuid::Uuid::new_v4().to_string()
        } else {
            src.source_uuid.clone()
        },
        linked_parent: linked.then(|| src.id.clone()),
        snapshots: Vec::new(),
        current_snapshot: None,
        started_at: None,
        ip_address: None,
        ..src.clone()
    };
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_added", None)?;
    Ok(Done::Out(format!("Clone the {} VM to the VM {}...\nThe VM has been successfully cloned.\n", src.name, name)))
}

fn register(store: &Store, args: &[String]) -> Result<Done, Fail> {
    const SPEC: &[OptSpec] = &[
        ("--uuid", "", true),
        ("--regenerate-src-uuid", "", false),
        ("--force", "", false),
        ("--delay-applying-restrictions", "", false),
    ];
    let opts = parse_opts(args, SPEC)?;
    let [path] = opts.pos.as_slice() else {
        return Err(Fail::usage("Usage: prlctl register <path> [--uuid <UUID>] [--regenerate-src-uuid] [--force]"));
    };
    let path = PathBuf::from(path.trim_end_matches('/'));
    let path = std::fs::canonicalize(&path).map_err(|_| {
        Fail::op(format!(
            "Failed to register the VM: Unable to parse the virtual machine configuration file {}/config.pvs. The file is corrupted or does not exist.",
            path.display()
        ))
    })?;
    let lock = store.lock()?;
    let mut vm = store::read_bundle(&path)?;
    let registered = store.all(&lock)?;
    if registered.iter().any(|r| r.home == path) {
        return Err(Fail::op(format!(
            "Failed to register the VM: The virtual machine \"{}\" is already registered.",
            path.display()
        )));
    }
    if let Some(uuid) = opts.value("--uuid") {
        let uuid = uuid.trim_start_matches('{').trim_end_matches('}');
        let parsed = uuid::Uuid::parse_str(uuid).map_err(|_| Fail::usage(format!("Invalid UUID: {uuid}")))?;
        vm.id = parsed.to_string();
    }
    if registered.iter().any(|r| r.id == vm.id) {
        return Err(Fail::op(format!(
            "Failed to register the VM: A virtual machine with the same UUID {{{}}} is already registered.",
            vm.id
        )));
    }
    vm.home = path;
    vm.state = "stopped".to_string();
    vm.started_at = None;
    if opts.flag("--regenerate-src-uuid") {
        vm.source_uuid = uuid::Uuid::new_v4().to_string();
    }
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_added", None)?;
    Ok(Done::Out("Register the VM...\nThe VM has been successfully registered.\n".to_string()))
}

fn unregister(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--clean-src-uuid", "", false)])?;
    let key = one_vm(&opts, "unregister")?;
    let lock = store.lock()?;
    let mut vm = store.find(&lock, &key)?;
    if matches!(vm.state.as_str(), "running" | "paused") {
        return Err(state_error("unregister", &vm));
    }
    if opts.flag("--clean-src-uuid") {
        vm.source_uuid = String::new();
    }
    store.save(&lock, &vm)?;
    store.remove(&lock, &vm.id)?;
    store.event(&lock, &vm.id, "vm_unregistered", None)?;
    Ok(Done::Out("Unregistering the VM...\nThe VM has been successfully unregistered.\n".to_string()))
}

fn delete(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[])?;
    let key = one_vm(&opts, "delete")?;
    let lock = store.lock()?;
    let vm = store.find(&lock, &key)?;
    if vm.state != "stopped" {
        return Err(state_error("delete", &vm));
    }
    store.remove(&lock, &vm.id)?;
    if vm.home.exists() {
        std::fs::remove_dir_all(&vm.home).map_err(|e| Fail::io("remove the VM files", &e))?;
    }
    store.event(&lock, &vm.id, "vm_deleted", None)?;
    Ok(Done::Out("Removing the VM...\nThe VM has been successfully removed.\n".to_string()))
}

fn power(store: &Store, sub: &str, args: &[String]) -> Result<Done, Fail> {
    let spec: &[OptSpec] = if sub == "stop" { &[("--kill", "", false), ("--drop-state", "", false)] } else { &[] };
    let opts = parse_opts(args, spec)?;
    let key = one_vm(&opts, sub)?;
    let lock = store.lock()?;
    let mut vm = store.find(&lock, &key)?;
    let (allowed, next, progress, done): (&[&str], &str, &str, &str) = match sub {
        "start" => (&["stopped", "suspended"], "running", "Starting", "started"),
        "stop" if opts.flag("--drop-state") => (&["suspended"], "stopped", "Stopping", "stopped"),
        "stop" => (&["running", "paused"], "stopped", "Stopping", "stopped"),
        "pause" => (&["running"], "paused", "Pausing", "paused"),
        "resume" => (&["paused", "suspended"], "running", "Resuming", "resumed"),
        "suspend" => (&["running", "paused"], "suspended", "Suspending", "suspended"),
        "reset" => (&["running", "paused"], "running", "Resetting", "reset"),
        _ => (&["running"], "running", "Restarting", "restarted"),
    };
    if !allowed.contains(&vm.state.as_str()) {
        return Err(state_error(sub, &vm));
    }
    let previous = std::mem::replace(&mut vm.state, next.to_string());
    match next {
        "running" if previous == "stopped" || sub == "restart" || sub == "reset" => {
            vm.started_at = Some(chrono::Utc::now().timestamp());
        }
        "stopped" => vm.started_at = None,
        _ => {}
    }
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_state_changed", Some(next))?;
    Ok(Done::Out(format!("{progress} the VM...\nThe VM has been successfully {done}.\n")))
}

fn parse_mb(v: &str) -> Result<u64, Fail> {
    let t = v.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix('g') {
        (n.to_string(), 1024)
    } else if let Some(n) = lower.strip_suffix('m') {
        (n.to_string(), 1)
    } else {
        (lower.clone(), 1)
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| Fail::usage(format!("Invalid size: {t}")))
}

fn set(store: &Store, args: &[String]) -> Result<Done, Fail> {
    const SPEC: &[OptSpec] = &[
        ("--name", "", true),
        ("--description", "", true),
        ("--cpus", "", true),
        ("--memsize", "", true),
        ("--device-set", "", true),
        ("--size", "", true),
    ];
    let opts = parse_opts(args, SPEC)?;
    let key = one_vm(&opts, "set")?;
    let lock = store.lock()?;
    let mut vm = store.find(&lock, &key)?;
    let mut out = String::from("Configure the VM...\n");
    if let Some(name) = opts.value("--name") {
        if name.is_empty() {
            return Err(Fail::usage("The VM name cannot be empty."));
        }
        if store.all(&lock)?.iter().any(|o| o.name == name && o.id != vm.id) {
            return Err(Fail::op(format!(
                "Failed to configure the VM: The virtual machine with the name \"{name}\" already exists."
            )));
        }
        vm.name = name.to_string();
        out.push_str(&format!("Set name: {name}\n"));
    }
    if let Some(d) = opts.value("--description") {
        vm.description = d.to_string();
        out.push_str(&format!("Set description: {d}\n"));
    }
    let hw_change = opts.value("--cpus").is_some() || opts.value("--memsize").is_some();
    if hw_change && vm.state != "stopped" {
        return Err(state_error("configure", &vm));
    }
    if let Some(c) = opts.value("--cpus") {
        let n: u32 = c.parse().map_err(|_| Fail::usage(format!("Invalid number of CPUs: {c}")))?;
        if n == 0 || n > 32 {
            return Err(Fail::op(format!("Failed to configure the VM: Invalid number of CPUs: {n}.")));
        }
        vm.cpus = n;
        out.push_str(&format!("Set cpus({n}): {n}\n"));
    }
    if let Some(m) = opts.value("--memsize") {
        let mb = parse_mb(m)?;
        if mb < 128 {
            return Err(Fail::op(format!("Failed to configure the VM: Invalid memory size: {mb}Mb.")));
        }
        vm.memory_mb = mb;
        out.push_str(&format!("Set the memsize parameter to {mb}Mb.\n"));
    }
    match (opts.value("--device-set"), opts.value("--size")) {
        (Some("hdd0"), Some(size)) => {
            if vm.state != "stopped" {
                return Err(state_error("configure", &vm));
            }
            let mb = parse_mb(size)?;
            if mb < vm.hdd_mb {
                return Err(Fail::op("Failed to configure the VM: The disk cannot be shrunk.".to_string()));
            }
            vm.hdd_mb = mb;
            out.push_str(&format!("Configure hdd0 (+) sata:0 image='{}harddisk.hdd' {mb}Mb\n", vm.home.display()));
        }
        (Some(dev), Some(_)) => {
            return Err(Fail::op(format!("Failed to configure the VM: The device {dev} does not exist.")));
        }
        (None, Some(_)) => return Err(Fail::usage("The --size option requires --device-set.")),
        (Some(_), None) => {}
        (None, None) => {}
    }
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_config_changed", None)?;
    out.push_str("\nThe VM has been successfully configured.\n");
    Ok(Done::Out(out))
}

fn snapshot_state(vm_state: &str) -> &'static str {
    match vm_state {
        "running" => "running",
        "paused" => "paused",
        "suspended" => "suspended",
        _ => "poweroff",
    }
}

fn new_snapshot(vm: &Vm, name: &str, description: &str) -> Snap {
    Snap {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
        description: description.to_string(),
        date: chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string(),
        state: snapshot_state(&vm.state).to_string(),
        parent: vm.current_snapshot.clone(),
    }
}

fn snapshot(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--name", "-n", true), ("--description", "-d", true)])?;
    let key = one_vm(&opts, "snapshot")?;
    let lock = store.lock()?;
    let mut vm = store.find(&lock, &key)?;
    let default_name = format!("Snapshot {}", vm.snapshots.len() + 1);
    let snap =
        new_snapshot(&vm, opts.value("--name").unwrap_or(&default_name), opts.value("--description").unwrap_or(""));
    let id = snap.id.clone();
    vm.current_snapshot = Some(id.clone());
    vm.snapshots.push(snap);
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_snapshots_tree_changed", None)?;
    Ok(Done::Out(format!("Creating the snapshot...\nThe snapshot with id {{{id}}} has been successfully created.\n")))
}

fn snapshot_list(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--json", "-j", false), ("--tree", "-t", false), ("--id", "-i", true)])?;
    let key = one_vm(&opts, "snapshot-list")?;
    let lock = store.lock()?;
    let vm = store.find(&lock, &key)?;
    drop(lock);
    if opts.flag("--json") {
        return Ok(Done::Out(pretty(&render::snapshot_list(&vm))?));
    }
    let mut out = format!("{:<40} {}\n", "PARENT_SNAPSHOT_ID", "SNAPSHOT_ID");
    for s in &vm.snapshots {
        let cur = if vm.current_snapshot.as_deref() == Some(s.id.as_str()) { "*" } else { " " };
        let parent = s.parent.as_ref().map(|p| format!("{{{p}}}")).unwrap_or_default();
        out.push_str(&format!("{parent:<40}{cur}{{{}}}\n", s.id));
    }
    Ok(Done::Out(out))
}

fn find_snap<'a>(vm: &'a Vm, sid: &str) -> Result<&'a Snap, Fail> {
    let sid = sid.trim_start_matches('{').trim_end_matches('}');
    vm.snapshots
        .iter()
        .find(|s| s.id.eq_ignore_ascii_case(sid))
        .ok_or_else(|| Fail::op(format!("Failed to find the snapshot: The snapshot with ID {{{sid}}} does not exist.")))
}

fn snapshot_delete(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--id", "-i", true), ("--children", "-c", false)])?;
    let key = one_vm(&opts, "snapshot-delete")?;
    let Some(sid) = opts.value("--id") else {
        return Err(Fail::usage("The --id option is required."));
    };
    let lock = store.lock()?;
    let mut vm = store.find(&lock, &key)?;
    let snap = find_snap(&vm, sid)?.clone();
    let mut doomed = vec![snap.id.clone()];
    if opts.flag("--children") {
        let mut i = 0;
        while i < doomed.len() {
            let parent = doomed[i].clone();
            doomed.extend(vm.snapshots.iter().filter(|s| s.parent.as_deref() == Some(&parent)).map(|s| s.id.clone()));
            i += 1;
        }
    } else {
        for s in vm.snapshots.iter_mut() {
            if s.parent.as_deref() == Some(snap.id.as_str()) {
                s.parent = snap.parent.clone();
            }
        }
    }
    if let Some(cur) = vm.current_snapshot.clone()
        && doomed.contains(&cur)
    {
        vm.current_snapshot = snap.parent.clone();
    }
    vm.snapshots.retain(|s| !doomed.contains(&s.id));
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_snapshots_tree_changed", None)?;
    Ok(Done::Out("Deleting the snapshot...\nThe snapshot has been successfully deleted.\n".to_string()))
}

fn snapshot_switch(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--id", "-i", true), ("--skip-resume", "", false)])?;
    let key = one_vm(&opts, "snapshot-switch")?;
    let Some(sid) = opts.value("--id") else {
        return Err(Fail::usage("The --id option is required."));
    };
    let lock = store.lock()?;
    let mut vm = store.find(&lock, &key)?;
    let snap = find_snap(&vm, sid)?.clone();
    let next = match snap.state.as_str() {
        "running" if opts.flag("--skip-resume") => "paused",
        "running" => "running",
        "paused" => "paused",
        "suspended" => "suspended",
        _ => "stopped",
    };
    let previous = std::mem::replace(&mut vm.state, next.to_string());
    vm.current_snapshot = Some(snap.id.clone());
    vm.started_at = (next == "running" || next == "paused").then(|| chrono::Utc::now().timestamp());
    store.save(&lock, &vm)?;
    store.event(&lock, &vm.id, "vm_snapshots_tree_changed", None)?;
    if previous != next {
        store.event(&lock, &vm.id, "vm_state_changed", Some(next))?;
    }
    Ok(Done::Out("Switch to the snapshot...\nThe VM has been successfully switched.\n".to_string()))
}

/// `prlctl exec <vm> [--current-user] <command> [args...]`: the command runs through the
/// guest's shell (one argument: as a command line; several: joined with spaces). Here the
/// "guest" is the host, with the VM bundle's `guest/` folder as working directory, a clean
/// environment, and stdin/stdout/stderr and the exit code passed through.
fn exec(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let Some(key) = args.first() else {
        return Err(Fail::usage("Usage: prlctl exec <ID | name> [--current-user] <command> [arg ...]"));
    };
    let mut i = 1;
    while let Some(a) = args.get(i) {
        match a.as_str() {
            "--current-user" | "--resolve-paths" => i += 1,
            _ => break,
        }
    }
    let command = &args[i..];
    if command.is_empty() {
        return Err(Fail::usage("Usage: prlctl exec <ID | name> [--current-user] <command> [arg ...]"));
    }
    let lock = store.lock()?;
    let vm = store.find(&lock, key)?;
    drop(lock);
    if vm.state != "running" {
        return Err(Fail::op(format!(
            "Failed to execute the command: The virtual machine \"{}\" is not running.",
            vm.name
        )));
    }
    let guest = vm.guest_dir();
    std::fs::create_dir_all(&guest).map_err(|e| Fail::io("prepare the guest", &e))?;
    let line = command.join(" ");
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&line)
        .current_dir(&guest)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &guest)
        .env("LANG", "C.UTF-8")
        .status()
        .map_err(|e| Fail::io("execute the command", &e))?;
    let code = match status.code() {
        Some(c) => u8::try_from(c & 0xff).unwrap_or(255),
        None => {
            use std::os::unix::process::ExitStatusExt;
            u8::try_from(128 + status.signal().unwrap_or(0)).unwrap_or(255)
        }
    };
    Ok(Done::Code(code))
}

/// `prlctl monitor-events [--json]`: stream the events other invocations append.
fn monitor_events(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--json", "-j", false)])?;
    let json = opts.flag("--json");
    let path = store.events_path();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(|e| Fail::io("open the event log", &e))?;
    let mut pos = file.seek(SeekFrom::End(0)).map_err(|e| Fail::io("read the event log", &e))?;
    let mut pending = String::new();
    let stdout = std::io::stdout();
    loop {
        let len = file.metadata().map(|m| m.len()).unwrap_or(pos);
        if len > pos {
            file.seek(SeekFrom::Start(pos)).map_err(|e| Fail::io("read the event log", &e))?;
            let mut buf = String::new();
            let n = file.read_to_string(&mut buf).map_err(|e| Fail::io("read the event log", &e))?;
            pos += n as u64;
            pending.push_str(&buf);
            while let Some(nl) = pending.find('\n') {
                let line: String = pending.drain(..=nl).collect();
                let line = line.trim_end();
                if line.is_empty() {
                    continue;
                }
                let text = if json {
                    format!("{line}\n")
                } else {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                    format!(
                        "Event: {} VM: {}\n",
                        v["Event name"].as_str().unwrap_or(""),
                        v["VM ID"].as_str().unwrap_or("")
                    )
                };
                let mut out = stdout.lock();
                if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
                    return Ok(Done::Code(0));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
