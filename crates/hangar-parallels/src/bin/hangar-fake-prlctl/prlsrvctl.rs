//! The `prlsrvctl` subcommands the driver uses.

use serde_json::json;

use crate::store::Store;
use crate::{Done, Fail, parse_opts};

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn user() -> String {
    match std::env::var("FAKE_PRL_USER") {
        Ok(u) if !u.is_empty() => u,
        _ => std::env::var("USER").unwrap_or_else(|_| "root".to_string()),
    }
}

/// Users of the list: the caller; for root also every host user with a state folder
/// (Parallels Desktop lists all its users to root).
fn users(store: &Store) -> Vec<(String, std::path::PathBuf)> {
    let mut out = vec![(user(), store.vm_home())];
    if crate::current_user() == "root"
        && let Ok(dir) = std::fs::read_dir(store.root.join("users"))
    {
        let mut names: Vec<String> = dir.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect();
        names.sort();
        for name in names {
            let home = crate::user_state(&store.root, &name).join("Parallels");
            out.push((name, home));
        }
    }
    out
}

pub fn run(store: &Store, args: &[String]) -> Result<Done, Fail> {
    match args.first().map(String::as_str) {
        Some("info") => info(store, &args[1..]),
        Some("user") if args.get(1).map(String::as_str) == Some("list") => user_list(store, &args[2..]),
        Some(other) => Err(Fail::usage(format!("Unknown command: {other}\nSee 'prlsrvctl --help'."))),
        None => Err(Fail::usage("Usage: prlsrvctl <command> [<args>]")),
    }
}

fn info(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--json", "-j", false), ("--license", "", false)])?;
    let json = opts.flag("--json");
    if opts.flag("--license") {
        let v = json!({
            "status": "ACTIVE",
            "serial": "XXXXXX-XXXXXX-XXXXXX-XXXXXX-XXXXXX",
            "expiration": "12/31/2099 00:00:00",
            "main_period_ends_at": "12/31/2099 00:00:00",
            "grace_period_ends_at": "01/30/2100 00:00:00",
            "cpu_total": 32,
            "max_memory": 131072,
            "edition": "Business",
            "is_trial": "no",
            "is_volume": "no",
            "deferred_activation": "no",
            "uuid": "3c0a8f0e-6b8a-4e4e-9d0b-2a1f6c4d5e6f"
        });
        return Ok(Done::Out(if json { format!("{v:#}\n") } else { "License: state=\"valid\"\n".to_string() }));
    }
    let host = hostname();
    let v = json!({
        "ID": "{5b1e0c5a-7f6e-4c3b-9a2d-1e0f9c8b7a6d}",
        "Hostname": host,
        "OS": "Mac OS X 15.5(24F74)",
        "Version": "Desktop 26.1.0-57287",
        "Build flags": "",
        "Started as service": "off",
        "VM home": store.vm_home(),
        "Memory limit": {"mode": "auto"},
        "Minimal security level": "low",
        "Manage settings for new users": "allow",
        "CEP mechanism": "on",
        "Verbose log": "off",
        "Log rotation": "on",
        "External device auto connect": "ask",
        "Web portal domain": "my.parallels.com",
        "Host ID": "5b1e0c5a-7f6e-4c3b-9a2d-1e0f9c8b7a6d",
        "Allow attach screenshots": "on",
        "Custom password protection": "off",
        "Preferences are locked": "off",
        "Disable deleting report archive": "off",
        "Add serial port output to report": "off",
        "License": {"state": "valid", "key": "XXXXXX-XXXXXX-XXXXXX-XXXXXX-XXXXXX", "restricted": "false"},
        "Hardware Id": "{2d7b4b2e-0c1f-5a6e-8d3c-4b5a69788f90}",
        "Signed In": "yes",
        "Hardware info": {
            "/dev/disk0": {"name": "APPLE SSD AP0512Z", "type": "hdd"},
            "/dev/disk0s2": {"name": "Macintosh HD", "type": "hdd-part"},
            "/dev/tty.Bluetooth-Incoming-Port": {"name": "Bluetooth-Incoming-Port", "type": "serial"}
        }
    });
    if json {
        Ok(Done::Out(format!("{v:#}\n")))
    } else {
        Ok(Done::Out(format!(
            "ID: {}\nHostname: {host}\nVersion: Desktop 26.1.0-57287\nVM home: {}\nLicense: state=\"valid\"\n",
            v["ID"].as_str().unwrap_or(""),
            store.vm_home().display()
        )))
    }
}

fn user_list(store: &Store, args: &[String]) -> Result<Done, Fail> {
    let opts = parse_opts(args, &[("--json", "-j", false)])?;
    let host = hostname();
    let users = users(store);
    if opts.flag("--json") {
        let v: Vec<_> = users
            .iter()
            .map(|(name, home)| json!({ "NAME": format!("{name}@{host}"), "MNG_SETTINGS": "allow", "DEF_VM_HOME": home }))
            .collect();
        Ok(Done::Out(format!("{:#}\n", serde_json::Value::Array(v))))
    } else {
        let mut out = format!("{:<30} {:<12} {}\n", "NAME", "MNG_SETTINGS", "DEF_VM_HOME");
        for (name, home) in &users {
            out.push_str(&format!("{:<30} {:<12} {}\n", format!("{name}@{host}"), "allow", home.display()));
        }
        Ok(Done::Out(out))
    }
}
