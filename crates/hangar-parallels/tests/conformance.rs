//! The Parallels driver passes the hypervisor conformance suite against the fake
//! `prlctl`/`prlsrvctl` (real processes, real files), once with its events from
//! `prlctl monitor-events` and once from the periodic reconcile alone.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Fake;
use hangar_hypervisor::conformance::{self, Capabilities, Setup};
use hangar_hypervisor::{Hypervisor, VmEvent};
use hangar_parallels::ParallelsDriver;

/// Where the driver's events come from.
#[derive(Clone, Copy)]
enum Source {
    /// `prlctl monitor-events`; the reconcile only seeds what the driver knows.
    Monitor,
    /// The reconcile every 200 ms; `monitor-events` hangs silently.
    Reconcile,
}

/// A driver on the fake with its event watchers on, returned once they deliver: a VM made
/// by the fake directly is poked until the driver reports the change.
async fn watching_driver(fake: &Fake, source: Source) -> ParallelsDriver {
    fake.make_vm("conformance-probe");
    let mut cfg = fake.config();
    cfg.watch_events = true;
    match source {
        Source::Monitor => cfg.reconcile_interval = Duration::from_secs(3600),
        Source::Reconcile => {
            cfg.reconcile_interval = Duration::from_millis(200);
            cfg.env.insert("FAKE_PRL_HANG".into(), "monitor-events".into());
        }
    }
    let d = ParallelsDriver::new(cfg).unwrap();
    let mut rx = d.subscribe();
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1.. {
        assert!(Instant::now() < deadline, "the driver never delivered an event");
        let description = format!("probe {n}");
        fake.ok(&["set", "conformance-probe", "--description", &description]);
        let until = Instant::now() + Duration::from_millis(1000);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            if matches!(&ev, VmEvent::Updated { vm } if vm.name == "conformance-probe" && vm.description == description)
            {
                return d;
            }
        }
    }
    unreachable!()
}

async fn passes_conformance(source: Source) {
    let fake = Fake::new();
    // The golden image the suite creates from: a bundle the fake made (and registered, so the
    // suite also runs next to VMs it did not make).
    let image = fake.make_vm("conformance-golden");
    let driver = watching_driver(&fake, source).await;
    let caps = Capabilities {
        // The fake runs guest commands on the host, in the bundle's `guest/` folder.
        exec: true,
        guest_dir: ".".into(),
        // Its snapshots record states, not guest files.
        snapshots_restore_guest: false,
    };
    let mut setup = Setup::new(image, caps);
    setup.cpus = 2;
    setup.memory_mb = 1024;
    setup.boot_timeout = Duration::from_secs(30);
    conformance::run_all(Arc::new(driver) as Arc<dyn Hypervisor>, setup).await;
    // The VMs that were there before are untouched.
    let out = fake.ok(&["list", "-a", "--json"]);
    assert!(out.contains("conformance-golden") && out.contains("conformance-probe"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallels_driver_passes_conformance() {
    passes_conformance(Source::Monitor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallels_driver_passes_conformance_with_reconcile_events_only() {
    passes_conformance(Source::Reconcile).await;
}
