//! Property tests of placement: random fleets, random request streams placed concurrently
//! through the ledger; no host ever gets more than its capacity minus the system reservation.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_hypervisor::{HypervisorKind, VmState};
use hangar_orchestrator::placement::{MAX_MACOS_VMS, place};
use hangar_orchestrator::*;
use proptest::prelude::*;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc)
}

#[derive(Debug, Clone)]
struct HostGen {
    cpu: u32,
    mem: u64,
    disk: u64,
    sys: (u32, u64, u64),
    used_pct: u64,
    enabled: bool,
    healthy: bool,
    mac: bool,
    macs_running: usize,
}

fn host_gen() -> impl Strategy<Value = HostGen> {
    (
        1u32..33,
        1u64..65,
        10u64..200,
        (0u32..3, 0u64..3, 0u64..20),
        0u64..100,
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.3),
        0usize..3,
    )
        .prop_map(|(cpu, mem_gb, disk_gb, (sc, sm, sd), used_pct, enabled, healthy, mac, macs_running)| HostGen {
            cpu: cpu + sc,
            mem: mem_gb * 1024 + sm * 1024,
            disk: disk_gb * 1000 + sd * 1000,
            sys: (sc, sm * 1024, sd * 1000),
            used_pct,
            enabled,
            healthy,
            mac,
            macs_running,
        })
}

fn build(i: usize, g: &HostGen) -> Host {
    let total = ResourceSet::new(g.cpu, g.mem, g.disk);
    let sys = ResourceSet::new(g.sys.0, g.sys.1, g.sys.2);
    let cap = total.saturating_sub(sys);
    let mut vms = Vec::new();
    if g.mac {
        for k in 0..g.macs_running {
            vms.push(VmSummary {
                id: format!("pre{i}-{k}"),
                name: "pre".into(),
                state: VmState::Running,
                os: "macosx".into(),
                cpu: 0,
                memory_mb: 0,
                disk_mb: 0,
                owner: None,
                machine: None,
            });
        }
    }
    let in_use = ResourceSet::new(
        (u64::from(cap.cpu) * g.used_pct / 100) as u32,
        cap.memory_mb * g.used_pct / 100,
        cap.disk_mb * g.used_pct / 100,
    );
    Host {
        enabled: g.enabled,
        architecture: Some(if g.mac { "arm64" } else { "x86_64" }.into()),
        os: Some(if g.mac { Os::Macos } else { Os::Linux }),
        hypervisor: Some(if g.mac { HypervisorKind::Parallels } else { HypervisorKind::Qemu }),
        resources: Some(HostResources::from_usage(total, sys, in_use)),
        state: if g.healthy { HostState::Healthy } else { HostState::Unhealthy },
        last_seen: Some(t0()),
        vms,
        ..Host::new(format!("host-{i:03}"), format!("h{i}"), format!("http://h{i}/api"), t0())
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Confirm,
    Fail,
    Hold,
}

fn request_gen() -> impl Strategy<Value = (PlacementRequest, Outcome)> {
    (1u32..9, 1u64..17, 0u64..40, 0u8..3, prop_oneof![Just(Outcome::Confirm), Just(Outcome::Fail), Just(Outcome::Hold)])
        .prop_map(|(cpu, mem_gb, disk_gb, kind, outcome)| {
            let (arch, os) = match kind {
                0 => ("x86_64", Os::Linux),
                1 => ("arm64", Os::Linux),
                _ => ("arm64", Os::Macos),
            };
            (
                PlacementRequest {
                    resources: ResourceSet::new(cpu, mem_gb * 1024, disk_gb * 1000),
                    architecture: arch.into(),
                    os: Some(os),
                    ..Default::default()
                },
                outcome,
            )
        })
}

/// Checks, with hosts and ledger frozen, that nothing is oversubscribed.
fn check_invariant(hosts: &RwLock<Vec<Host>>, ledger: &Reservations) {
    let hosts = hosts.read().unwrap();
    ledger.inspect(|held| {
        for h in hosts.iter() {
            let r = h.resources.unwrap();
            let held_here = held.get(&h.id).copied().unwrap_or_default();
            let committed = r.in_use.saturating_add(held_here.resources);
            assert!(
                committed.fits_in(&r.capacity()),
                "host {} oversubscribed: in use {:?} + reserved {:?} > capacity {:?}",
                h.id,
                r.in_use,
                held_here.resources,
                r.capacity()
            );
            assert!(h.running_macos_vms() + held_here.macos_vms <= MAX_MACOS_VMS.max(h.running_macos_vms()));
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn concurrent_placements_never_oversubscribe(
        gens in prop::collection::vec(host_gen(), 1..24),
        requests in prop::collection::vec(request_gen(), 1..80),
        pack in any::<bool>(),
    ) {
        let profile = if pack { Profile::Pack } else { Profile::Spread };
        let hosts: Arc<RwLock<Vec<Host>>> = Arc::new(RwLock::new(gens.iter().enumerate().map(|(i, g)| build(i, g)).collect()));
        let ledger = Arc::new(Reservations::new(Arc::new(ManualClock::new(t0())), Duration::from_secs(600)));
        let chunks: Vec<Vec<(PlacementRequest, Outcome)>> = requests.chunks(requests.len().div_ceil(4)).map(<[_]>::to_vec).collect();
        let mut threads = Vec::new();
        for chunk in chunks {
            let (hosts, ledger) = (hosts.clone(), ledger.clone());
            threads.push(std::thread::spawn(move || {
                for (n, (req, outcome)) in chunk.into_iter().enumerate() {
                    let granted = {
                        let hs = hosts.read().unwrap();
                        ledger.reserve(&req, hs.iter(), profile)
                    };
                    if let Ok((d, r)) = granted {
                        {
                            let hs = hosts.read().unwrap();
                            let h = hs.iter().find(|h| h.id == d.host_id).unwrap();
                            assert!(h.enabled && h.state == HostState::Healthy, "placed on an unusable host");
                            assert_eq!(h.architecture.as_deref(), Some(req.architecture.as_str()));
                            if req.os == Some(Os::Macos) {
                                assert_eq!(h.os, Some(Os::Macos));
                            }
                        }
                        match outcome {
                            Outcome::Confirm => {
                                {
                                    let mut hs = hosts.write().unwrap();
                                    let h = hs.iter_mut().find(|h| h.id == d.host_id).unwrap();
                                    h.resources.as_mut().unwrap().add_vm(d.needs);
                                    h.vms.push(VmSummary {
                                        id: format!("{}-{n}", d.host_id),
                                        name: "vm".into(),
                                        state: VmState::Running,
                                        os: req.os.unwrap().as_str().into(),
                                        cpu: d.needs.cpu,
                                        memory_mb: d.needs.memory_mb,
                                        disk_mb: d.needs.disk_mb,
                                        owner: None,
                                        machine: None,
                                    });
                                    // Released while the view is locked, so the checker never
                                    // sees the VM counted twice (a safe over-estimate anyway).
                                    ledger.release(r.id);
                                }
                            }
                            Outcome::Fail => {
                                ledger.release(r.id);
                            }
                            Outcome::Hold => {}
                        }
                    }
                    check_invariant(&hosts, &ledger);
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        check_invariant(&hosts, &ledger);
        // macOS limit, counting what is held and what runs.
        let hs = hosts.read().unwrap();
        for h in hs.iter() {
            let before = gens[h.id[5..].parse::<usize>().unwrap()].macs_running;
            let now = h.running_macos_vms() + ledger.held_on(&h.id).macos_vms;
            prop_assert!(now <= MAX_MACOS_VMS.max(before), "host {} has {now} macOS VMs", h.id);
        }
    }

    #[test]
    fn placement_is_deterministic_and_explains_every_host(
        gens in prop::collection::vec(host_gen(), 0..30),
        (req, _) in request_gen(),
        rot in 0usize..30,
        pack in any::<bool>(),
    ) {
        let profile = if pack { Profile::Pack } else { Profile::Spread };
        let hosts: Vec<Host> = gens.iter().enumerate().map(|(i, g)| build(i, g)).collect();
        let mut rotated = hosts.clone();
        if !rotated.is_empty() {
            let k = rot % rotated.len();
            rotated.rotate_left(k);
            rotated.reverse();
        }
        let held = Default::default();
        let a = place(&req, &hosts, &held, profile);
        let b = place(&req, &rotated, &held, profile);
        prop_assert_eq!(&a, &b, "host order changed the decision");
        match a {
            Ok(d) => {
                // No feasible host is strictly better by the profile.
                for h in &hosts {
                    if let Ok((_, load)) = placement::check_host(&req, h, Default::default()) {
                        match profile {
                            Profile::Spread => prop_assert!(load >= d.load_ppm),
                            Profile::Pack => prop_assert!(load <= d.load_ppm),
                        }
                    }
                }
            }
            Err(no) => {
                prop_assert_eq!(no.hosts, hosts.len());
                prop_assert_eq!(no.reasons.values().sum::<usize>(), hosts.len(), "every host has a reason");
            }
        }
    }
}
