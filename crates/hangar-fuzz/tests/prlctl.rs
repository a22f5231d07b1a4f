//! `prlctl`/`prlsrvctl` output: any text, JSON of any shape with the real key names, and
//! mutated real outputs (the fixtures of the driver's tests) give a value or an error,
//! never a panic or a hang.

use hangar_fuzz::{answers, json, mutated, text};
use hangar_parallels::parse;
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "ID",
    "Name",
    "State",
    "Home",
    "OS",
    "Type",
    "Hardware",
    "cpu",
    "cpus",
    "memory",
    "size",
    "hdd0",
    "Description",
    "Snapshots",
    "current",
    "parent",
    "date",
    "state",
    "name",
    "Network",
    "ip",
    "Guest Tools",
    "Owner",
    "user",
    "Version",
    "License",
    "Hostname",
    "status",
    "vm_uuid",
    "event_name",
    "event_type",
    "additional_info",
];

const SAMPLES: &[&str] = &[
    include_str!("../../hangar-parallels/tests/fixtures/list-info.json"),
    include_str!("../../hangar-parallels/tests/fixtures/list-info-odd.json"),
    include_str!("../../hangar-parallels/tests/fixtures/snapshot-list.json"),
    include_str!("../../hangar-parallels/tests/fixtures/prlsrvctl-info.json"),
    include_str!("../../hangar-parallels/tests/fixtures/prlsrvctl-user-list.json"),
    include_str!("../../hangar-parallels/tests/fixtures/monitor-events.ndjson"),
    include_str!("../../hangar-parallels/tests/fixtures/snapshot-create.txt"),
];

fn every_parser(out: String) {
    answers("the prlctl parsers", move || {
        let _ = parse::json_document(&out);
        let _ = parse::vm_list(&out);
        let _ = parse::snapshot_map(&out);
        let _ = parse::server_info(&out);
        let _ = parse::user_list(&out);
        for line in out.lines() {
            let _ = parse::event(line);
        }
        let _ = parse::trim_id(&out);
        let _ = parse::created_snapshot_id(&out);
        let _ = parse::size_bytes(&out);
        let _ = parse::vm_state(&out);
    });
}

proptest! {
    #[test]
    fn any_text(out in text()) {
        every_parser(out);
    }

    #[test]
    fn any_json_with_prlctl_keys(v in json(KEYS)) {
        every_parser(v.to_string());
        every_parser(serde_json::Value::Array(vec![v]).to_string());
    }

    #[test]
    fn mutated_real_outputs(out in (0..SAMPLES.len()).prop_flat_map(|i| mutated(SAMPLES[i]))) {
        every_parser(out);
    }
}
