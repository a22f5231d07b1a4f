//! Parser tests on fixtures that follow the real output shapes of prlctl/prlsrvctl
//! (reference §8): keys with spaces, `"2048Mb"` sizes, `{uuid}` ids, unknown and missing
//! fields, values of unexpected types and noise around the JSON.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use hangar_hypervisor::{HypervisorKind, VmState};
use hangar_parallels::parse;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn full_vm_list() {
    let vms = parse::vm_list(&fixture("list-info.json")).unwrap();
    assert_eq!(vms.len(), 2);

    let ubuntu = vms[0].to_info(Some("ci".into()), 123);
    assert_eq!(ubuntu.id, "4ebbe3e8-3f1a-4c1e-9a57-8c2f0a1b2c3d");
    assert_eq!(ubuntu.name, "ubuntu-ci");
    assert_eq!(ubuntu.description, "golden image");
    assert_eq!(ubuntu.state, VmState::Running);
    assert_eq!(ubuntu.os, "ubuntu");
    assert_eq!(ubuntu.home, PathBuf::from("/Users/ci/Parallels/ubuntu-ci.pvm"));
    assert_eq!(ubuntu.cpus, 4);
    assert_eq!(ubuntu.memory_mb, 8192);
    assert_eq!(ubuntu.disk_virtual_bytes, 131072u64 << 20);
    assert_eq!(ubuntu.disk_bytes, 123);
    assert_eq!(
        ubuntu.ip_addresses,
        vec!["10.211.55.7".parse::<IpAddr>().unwrap(), "fdb2:2c26:f4e4:0:21c:42ff:fea1:b2c3".parse().unwrap()]
    );
    assert_eq!(ubuntu.owner.as_deref(), Some("ci"));
    assert_eq!(ubuntu.hypervisor, HypervisorKind::Parallels);
    assert_eq!(ubuntu.architecture, "arm64");
    assert!(!ubuntu.is_template);

    // Braced id, no `Home` (only `Home path`), sizes in Gb, no cpu type on an Apple VZ VM.
    let mac = vms[1].to_info(None, 0);
    assert_eq!(mac.id, "9a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d");
    assert_eq!(mac.state, VmState::Suspended);
    assert_eq!(mac.home, PathBuf::from("/Users/ci/Parallels/macos-15.macvm"));
    assert_eq!(mac.memory_mb, 8192);
    assert_eq!(mac.disk_virtual_bytes, 92160u64 << 20);
    assert_eq!(mac.architecture, "arm64");
    assert!(mac.is_template);
    assert!(mac.ip_addresses.is_empty());
}

#[test]
fn odd_vm_list_unknown_missing_and_mistyped_fields() {
    let vms = parse::vm_list(&fixture("list-info-odd.json")).unwrap();
    // The entry without an ID and the non-object are skipped.
    assert_eq!(vms.len(), 2);
    let odd = vms[0].to_info(None, 0);
    assert_eq!(odd.name, "odd");
    assert_eq!(odd.state, VmState::Stopped);
    assert_eq!(odd.cpus, 2, "numeric strings are numbers");
    assert_eq!(odd.memory_mb, 4096, "a bare number is megabytes");
    assert_eq!(odd.disk_virtual_bytes, 0, "a mistyped hdd0 is defaulted");
    assert!(odd.ip_addresses.is_empty(), "a mistyped Network is defaulted");
    assert_eq!(odd.architecture, "x86_64");
    assert_eq!(odd.description, "");

    let bare = vms[1].to_info(None, 0);
    assert_eq!(bare.id, "2a3b4c5d-6e7f-4081-9a2b-3c4d5e6f7a8b");
    assert_eq!(bare.name, "");
    assert_eq!(bare.state, VmState::Unknown);
    assert_eq!(bare.cpus, 0);
    assert_eq!(bare.memory_mb, 0);
    assert_eq!(bare.home, PathBuf::new());
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bad in
        ["", "not json", "[{\"ID\": \"{7d3c\u{1b}[0m\u{fffd} PRL_ERR", "{\"ID\": \"x\"}", "42", "\u{0}\u{1}\u{2}"]
    {
        assert!(parse::vm_list(bad).is_err(), "{bad:?}");
    }
    assert!(parse::server_info("[]").is_err());
    assert!(parse::user_list("{}").is_err());
    assert!(parse::event("[1]").is_err());
    assert!(parse::event("{\"VM ID\": ").is_err());
}

#[test]
fn snapshot_list_keyed_by_braced_ids() {
    let entries = parse::snapshot_map(&fixture("snapshot-list.json")).unwrap();
    let mut notes = BTreeMap::new();
    notes.insert("5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b".to_string(), "made by hangar".to_string());
    let snaps = parse::snapshots(entries, &notes);
    assert_eq!(snaps.len(), 3);
    // Undated first (None sorts first), then oldest to newest.
    let odd = &snaps[0];
    assert_eq!(odd.id, "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee");
    assert!(odd.current, "\"yes\" is true");
    assert_eq!(odd.created_at, None);
    assert_eq!(odd.state, VmState::Unknown);

    let root = &snaps[1];
    assert_eq!(root.id, "0dc70c48-9688-435e-9ce4-7770f75c16bb");
    assert_eq!(root.name, "clean install");
    assert_eq!(root.parent, None);
    assert_eq!(root.state, VmState::Stopped, "poweroff is stopped");
    assert!(!root.current);
    assert!(root.created_at.is_some());

    let child = &snaps[2];
    assert_eq!(child.parent.as_deref(), Some("0dc70c48-9688-435e-9ce4-7770f75c16bb"));
    assert_eq!(child.state, VmState::Running);
    assert!(child.current);
    assert_eq!(child.description, "made by hangar");
    assert!(child.created_at > root.created_at);
}

#[test]
fn snapshot_create_text() {
    assert_eq!(
        parse::created_snapshot_id(&fixture("snapshot-create.txt")).as_deref(),
        Some("5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b")
    );
}

#[test]
fn server_info_and_users() {
    let info = parse::server_info(&fixture("prlsrvctl-info.json")).unwrap();
    assert_eq!(parse::version_number(&info.version), "26.1.0-57287");
    assert_eq!(info.vm_home, "/Users/ci/Parallels");
    assert_eq!(info.license.state, "valid");
    assert_eq!(info.hostname, "mac-mini-07.local");
    assert_eq!(info.hardware_id, "{2d7b4b2e-0c1f-5a6e-8d3c-4b5a69788f90}");
    assert_eq!(parse::os_name_version(&info.os), ("Mac OS X".to_string(), "15.5".to_string()));

    let unlicensed = parse::server_info(&fixture("prlsrvctl-info-unlicensed.json")).unwrap();
    assert_eq!(unlicensed.license.state, "invalid");
    assert_eq!(unlicensed.vm_home, "");

    let users = parse::user_list(&fixture("prlsrvctl-user-list.json")).unwrap();
    assert_eq!(users.len(), 3);
    assert_eq!(users[0].name, "ci@mac-mini-07.local");
    assert_eq!(users[1].default_vm_home, "/Users/build/Parallels");
    assert_eq!(users[1].manage_settings, "deny");
    assert_eq!(users[2].default_vm_home, "");
}

#[test]
fn monitor_event_lines() {
    let text = fixture("monitor-events.ndjson");
    let events: Vec<_> = text.lines().map(|l| parse::event(l).unwrap()).collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[0].name, "vm_state_changed");
    assert_eq!(parse::trim_id(&events[0].vm_id), "4ebbe3e8-3f1a-4c1e-9a57-8c2f0a1b2c3d");
    assert_eq!(parse::vm_state(&events[0].info.vm_state_name), VmState::Running);
    assert_eq!(events[1].name, "vm_config_changed");
    assert_eq!(events[1].info.vm_state_name, "");
    assert_eq!(events[2].name, "vm_unregistered");
    assert_eq!(events[3].timestamp, "2025-03-02 10:00:04");
}
