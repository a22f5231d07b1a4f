//! The wire's own readers: sizes (`"2048Mb"`), numbers sent as strings, and whole machines
//! from JSON of any shape, as an orchestrator reads them from a host it does not trust.

use hangar_fuzz::{answers, json, text};
use hangar_wire::{CreateMachineRequest, Flexible, HardwareResponse, Machine, Mb, VmCall, VmReply};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "ID",
    "Name",
    "State",
    "Hardware",
    "cpu",
    "cpus",
    "memory",
    "size",
    "hdd0",
    "allocated",
    "owner",
    "user",
    "ip_addresses",
    "total",
    "logical_cpu_count",
    "memory_size",
    "disk_size",
    "specs",
    "catalog_manifest",
    "catalog_id",
    "version",
    "name",
    "stdout",
    "exit_code",
    "operations",
    "group",
    "status",
];

proptest! {
    #[test]
    fn sizes_and_numbers(t in text()) {
        answers("Mb and Flexible", move || {
            if let Some(mb) = Mb::parse(&t) {
                // What parses prints back as something that parses to the same size.
                assert_eq!(Mb::parse(&mb.to_string()), Some(mb), "{t:?}");
            }
            let _ = serde_json::from_value::<Flexible>(serde_json::Value::String(t));
        });
    }

    #[test]
    fn bodies_of_any_shape(v in json(KEYS)) {
        answers("the wire's bodies", move || {
            if let Ok(m) = serde_json::from_value::<Machine>(v.clone()) {
                let again: Machine = serde_json::from_value(serde_json::to_value(&m).unwrap_or_default())
                    .unwrap_or_else(|e| panic!("a machine read back fails: {e}"));
                assert_eq!(again, m);
            }
            let _ = serde_json::from_value::<HardwareResponse>(v.clone());
            let _ = serde_json::from_value::<CreateMachineRequest>(v.clone());
            let body = v.to_string();
            for call in [VmCall::Get, VmCall::Status, VmCall::SnapshotList, VmCall::Delete { force: false }] {
                let _: Result<VmReply, _> = call.read_reply(body.as_bytes());
            }
        });
    }
}
