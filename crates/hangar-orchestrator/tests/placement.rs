//! Placement: every filter, the "why not" message, scoring and the reservation ledger.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_hypervisor::{HypervisorKind, VmState};
use hangar_orchestrator::placement::{ImageRef, place};
use hangar_orchestrator::*;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc)
}

fn linux_host(id: &str, cpu: u32, mem: u64, disk: u64) -> Host {
    Host {
        architecture: Some("x86_64".into()),
        os: Some(Os::Linux),
        hypervisor: Some(HypervisorKind::Qemu),
        resources: Some(HostResources::from_usage(
            ResourceSet::new(cpu + 1, mem + 1024, disk + 10_000),
            ResourceSet::new(1, 1024, 10_000),
            ResourceSet::default(),
        )),
        state: HostState::Healthy,
        last_seen: Some(t0()),
        ..Host::new(id, format!("name-{id}"), format!("http://{id}:8080/api"), t0())
    }
}

fn mac_host(id: &str) -> Host {
    Host {
        architecture: Some("arm64".into()),
        os: Some(Os::Macos),
        hypervisor: Some(HypervisorKind::Parallels),
        ..linux_host(id, 16, 65_536, 500_000)
    }
}

fn req(cpu: u32, mem: u64) -> PlacementRequest {
    PlacementRequest {
        resources: ResourceSet::new(cpu, mem, 0),
        architecture: "x86_64".into(),
        os: Some(Os::Linux),
        ..Default::default()
    }
}

fn none() -> placement::ReservedByHost {
    Default::default()
}

fn only_reason(r: &PlacementRequest, h: &Host) -> Reason {
    let no = place(r, [h], &none(), Profile::Spread).unwrap_err();
    assert_eq!(no.hosts, 1);
    assert_eq!(no.reasons.len(), 1, "{no}");
    *no.reasons.keys().next().unwrap()
}

#[test]
fn a_fitting_host_is_chosen_with_what_it_needs() {
    let h = linux_host("a", 8, 16_384, 100_000);
    let d = place(&req(2, 4096), [&h], &none(), Profile::Spread).unwrap();
    assert_eq!(d.host_id, "a");
    assert_eq!(d.needs, ResourceSet::new(2, 4096, 0));
    assert!(!d.cached);
}

#[test]
fn every_filter_names_its_reason() {
    let r = req(2, 2048);
    let mut h = linux_host("a", 8, 16_384, 100_000);
    h.enabled = false;
    assert_eq!(only_reason(&r, &h), Reason::Disabled);

    let mut h = linux_host("a", 8, 16_384, 100_000);
    h.state = HostState::Unhealthy;
    assert_eq!(only_reason(&r, &h), Reason::Unhealthy);
    h.state = HostState::Unknown;
    assert_eq!(only_reason(&r, &h), Reason::StateUnknown);

    let mut h = linux_host("a", 8, 16_384, 100_000);
    h.resources = None;
    assert_eq!(only_reason(&r, &h), Reason::NoHardware);

    let h = mac_host("a");
    assert_eq!(only_reason(&r, &h), Reason::Architecture, "x86_64 request on an arm64 Mac");

    let h = linux_host("a", 8, 16_384, 100_000);
    let mut r2 = req(2, 2048);
    r2.hypervisor = Some(HypervisorKind::Parallels);
    assert_eq!(only_reason(&r2, &h), Reason::Platform, "asks for Parallels on a QEMU host");
    let mut r3 = req(2, 2048);
    r3.os = Some(Os::Macos);
    assert_eq!(only_reason(&r3, &h), Reason::Platform, "macOS guest on a Linux host");

    let mut r4 = req(2, 2048);
    r4.tags = ["gpu".to_string()].into();
    assert_eq!(only_reason(&r4, &h), Reason::Tags);

    assert_eq!(only_reason(&req(9, 2048), &h), Reason::Cpu);
    assert_eq!(only_reason(&req(2, 16_385), &h), Reason::Memory);
    let mut r5 = req(2, 2048);
    r5.resources.disk_mb = 100_001;
    assert_eq!(only_reason(&r5, &h), Reason::Disk);

    let mut r6 = req(2, 2048);
    r6.host = Some("other".into());
    assert_eq!(only_reason(&r6, &h), Reason::NotRequested);
    let mut r7 = req(2, 2048);
    r7.exclude.insert("a".into());
    assert_eq!(only_reason(&r7, &h), Reason::Excluded);
}

#[test]
fn pinning_works_by_id_or_name_case_insensitively() {
    let a = linux_host("a", 8, 16_384, 100_000);
    let b = linux_host("b", 8, 16_384, 100_000);
    let mut r = req(1, 1024);
    r.host = Some("NAME-B".into());
    assert_eq!(place(&r, [&a, &b], &none(), Profile::Spread).unwrap().host_id, "b");
    r.host = Some("a".into());
    assert_eq!(place(&r, [&a, &b], &none(), Profile::Spread).unwrap().host_id, "a");
}

#[test]
fn required_roles_and_claims_limit_who_may_use_a_host() {
    let mut h = linux_host("a", 8, 16_384, 100_000);
    h.required_roles = ["CI".to_string()].into();
    h.required_claims = ["CREATE_VM".to_string()].into();
    let mut r = req(1, 1024);
    r.caller = Caller::User { super_user: false, roles: ["CI".into()].into(), claims: BTreeSet::new() };
    assert_eq!(only_reason(&r, &h), Reason::NotAllowed);
    r.caller = Caller::User { super_user: false, roles: ["CI".into()].into(), claims: ["CREATE_VM".into()].into() };
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok());
    r.caller = Caller::User { super_user: true, roles: BTreeSet::new(), claims: BTreeSet::new() };
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok(), "super users pass");
    r.caller = Caller::System;
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok());
}

#[test]
fn tags_match_case_insensitively_and_all_are_required() {
    let mut h = linux_host("a", 8, 16_384, 100_000);
    h.tags = ["GPU".to_string(), "fast".to_string()].into();
    let mut r = req(1, 1024);
    r.tags = ["gpu".to_string(), "FAST".to_string()].into();
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok());
    r.tags.insert("arm-build".into());
    assert_eq!(only_reason(&r, &h), Reason::Tags);
}

#[test]
fn two_macos_vms_per_mac_counting_running_vms_and_reservations() {
    let mut h = mac_host("m");
    let mut r = req(2, 4096);
    r.architecture = "arm64".into();
    r.os = Some(Os::Macos);
    let vm = |id: &str, state| VmSummary {
        id: id.into(),
        name: "runner".into(),
        state,
        os: "macosx".into(),
        cpu: 2,
        memory_mb: 4096,
        disk_mb: 0,
        owner: None,
        machine: None,
    };
    h.vms = vec![vm("1", VmState::Running), vm("2", VmState::Stopped)];
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok(), "one running, one stopped: room for one");
    let mut held = none();
    held.insert("m".into(), placement::HostReserved { macos_vms: 1, count: 1, ..Default::default() });
    let no = place(&r, [&h], &held, Profile::Spread).unwrap_err();
    assert_eq!(no.count(Reason::MacosLimit), 1);
    // A VM merely named "mac" is not macOS (the reference's bug).
    h.vms = vec![VmSummary { os: "linux".into(), name: "mac-builder".into(), ..vm("3", VmState::Running) }; 2];
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok());
    // Linux guests on a Mac are not limited.
    h.vms = vec![vm("1", VmState::Running), vm("2", VmState::Running)];
    r.os = Some(Os::Linux);
    assert!(place(&r, [&h], &none(), Profile::Spread).is_ok());
}

#[test]
fn disk_rule_is_3x_on_the_cache_volume_2x_elsewhere_1x_when_cached() {
    let mut h = linux_host("a", 8, 16_384, 30_000);
    let mut r = req(1, 1024);
    r.image = Some(ImageRef { catalog_id: "ubuntu".into(), version: "24.04".into(), size_mb: Some(10_001) });
    assert_eq!(only_reason(&r, &h), Reason::Disk, "3 x 10001 > 30000");
    r.image.as_mut().unwrap().size_mb = Some(10_000);
    assert_eq!(place(&r, [&h], &none(), Profile::Spread).unwrap().needs.disk_mb, 30_000);
    h.cache_on_vm_volume = false;
    r.image.as_mut().unwrap().size_mb = Some(15_000);
    assert_eq!(place(&r, [&h], &none(), Profile::Spread).unwrap().needs.disk_mb, 30_000, "2x");
    r.image.as_mut().unwrap().size_mb = Some(15_001);
    assert_eq!(only_reason(&r, &h), Reason::Disk);
    h.cached_images =
        vec![CachedImage { catalog_id: "ubuntu".into(), version: "24.04".into(), architecture: "x86_64".into() }];
    let d = place(&r, [&h], &none(), Profile::Spread).unwrap();
    assert!(d.cached);
    assert_eq!(d.needs.disk_mb, 15_001, "1x once cached");
}

#[test]
fn why_not_message_groups_hosts_by_reason() {
    let mut hosts = Vec::new();
    for i in 0..3 {
        hosts.push(linux_host(&format!("mem{i}"), 8, 1024, 100_000));
    }
    let mut h = linux_host("sick", 8, 16_384, 100_000);
    h.state = HostState::Unhealthy;
    hosts.push(h);
    for i in 0..2 {
        let mut h = linux_host(&format!("off{i}"), 8, 16_384, 100_000);
        h.enabled = false;
        hosts.push(h);
    }
    let no = place(&req(2, 4096), &hosts, &none(), Profile::Spread).unwrap_err();
    assert_eq!(no.to_string(), "No host can take this VM: 3 lack memory, 2 disabled, 1 unhealthy");
    assert_eq!(no.hosts, 6);
    let empty: Vec<Host> = Vec::new();
    assert_eq!(
        place(&req(1, 1), &empty, &none(), Profile::Spread).unwrap_err().to_string(),
        "No host can take this VM: no hosts are registered"
    );
    let e = OrchestratorError::from(no);
    assert_eq!(hangar_core::Classify::kind(&e), hangar_core::ErrorKind::Unavailable);
}

#[test]
fn cached_hosts_first_then_profile_then_host_id() {
    let big = linux_host("b-big", 32, 65_536, 100_000);
    let small = linux_host("a-small", 8, 16_384, 100_000);
    let r = req(2, 4096);
    assert_eq!(place(&r, [&small, &big], &none(), Profile::Spread).unwrap().host_id, "b-big", "least loaded");
    assert_eq!(place(&r, [&small, &big], &none(), Profile::Pack).unwrap().host_id, "a-small", "most loaded");
    // Ties go to the smallest id, whatever the order given.
    let c = linux_host("c", 8, 16_384, 100_000);
    let a = linux_host("a", 8, 16_384, 100_000);
    assert_eq!(place(&r, [&c, &a], &none(), Profile::Spread).unwrap().host_id, "a");
    assert_eq!(place(&r, [&c, &a], &none(), Profile::Pack).unwrap().host_id, "a");
    // A host caching the image wins over a less loaded one.
    let mut cached = small.clone();
    cached.cached_images =
        vec![CachedImage { catalog_id: "img".into(), version: "1".into(), architecture: "x86_64".into() }];
    let mut r2 = r.clone();
    r2.image = Some(ImageRef { catalog_id: "img".into(), version: "1".into(), size_mb: None });
    let d = place(&r2, [&big, &cached], &none(), Profile::Spread).unwrap();
    assert_eq!((d.host_id.as_str(), d.cached), ("a-small", true));
}

#[test]
fn reservations_count_against_free_capacity() {
    let h = linux_host("a", 8, 16_384, 100_000);
    let mut held = none();
    held.insert("a".into(), placement::HostReserved { resources: ResourceSet::new(7, 0, 0), macos_vms: 0, count: 1 });
    assert_eq!(place(&req(2, 1024), [&h], &held, Profile::Spread).unwrap_err().count(Reason::Cpu), 1);
    assert!(place(&req(1, 1024), [&h], &held, Profile::Spread).is_ok());
}

#[test]
fn ledger_reserves_releases_and_lapses() {
    let clock = ManualClock::new(t0());
    let ledger = Reservations::new(Arc::new(clock.clone()), Duration::from_secs(60));
    let hosts = vec![linux_host("a", 4, 8192, 100_000)];
    let (d1, r1) = ledger.reserve(&req(2, 4096), &hosts, Profile::Spread).unwrap();
    let (_, r2) = ledger.reserve(&req(2, 4096), &hosts, Profile::Spread).unwrap();
    assert_eq!(d1.host_id, "a");
    let no = ledger.reserve(&req(1, 1), &hosts, Profile::Spread).unwrap_err();
    assert_eq!(no.count(Reason::Cpu), 1, "{no}");
    assert_eq!(ledger.held_on("a").resources, ResourceSet::new(4, 8192, 0));
    assert_eq!(ledger.release(r1.id).map(|r| r.id), Some(r1.id));
    assert!(ledger.release(r1.id).is_none(), "release is idempotent");
    assert!(ledger.reserve(&req(2, 4096), &hosts, Profile::Spread).is_ok());
    // Renewal moves the expiry; without it, reservations lapse after the TTL.
    clock.advance(Duration::from_secs(50));
    assert!(ledger.renew(r2.id));
    clock.advance(Duration::from_secs(20));
    assert_eq!(ledger.purge_expired(), 1, "the unrenewed one lapsed");
    assert_eq!(ledger.len(), 1);
    clock.advance(Duration::from_secs(60));
    assert_eq!(ledger.purge_expired(), 1);
    assert!(ledger.is_empty());
    assert_eq!(ledger.held_on("a"), Default::default());
}

#[tokio::test]
async fn queue_serves_by_priority_and_times_out_without_holding_capacity() {
    let ledger = Reservations::new(Arc::new(ManualClock::new(t0())), Duration::from_secs(600));
    let hosts = vec![linux_host("a", 2, 8192, 100_000)];
    let (_, big) = ledger.reserve(&req(2, 1024), &hosts, Profile::Spread).unwrap();
    let (_, low) = ledger.reserve_or_enqueue(&req(2, 1024), &hosts, Profile::Spread, 1).unwrap_err();
    let (_, high) = ledger.reserve_or_enqueue(&req(2, 1024), &hosts, Profile::Spread, 5).unwrap_err();
    assert_eq!(ledger.waiting(), 2);
    assert_eq!(ledger.drain(&hosts, Profile::Spread), 0, "nothing freed yet");
    ledger.release(big.id);
    assert_eq!(ledger.drain(&hosts, Profile::Spread), 1);
    let got = ledger.wait(high, Duration::from_secs(5)).await;
    assert!(got.is_some(), "the higher priority waiter is served first");
    assert!(ledger.wait(low, Duration::from_millis(50)).await.is_none(), "the other one times out");
    assert_eq!(ledger.waiting(), 0);
    assert_eq!(ledger.len(), 1, "only the served waiter holds capacity");
}
