//! The QEMU driver passes the hypervisor conformance suite on a real guest (one boot).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hangar_hypervisor::Hypervisor;
use hangar_hypervisor::conformance::{self, Capabilities, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_driver_passes_conformance() {
    let _turn = VM_LOCK.lock().await;
    let f = fixture().await;
    let caps = Capabilities {
        // Commands and uploads go through the QEMU guest agent.
        exec: true,
        // The guest's root is in memory: a memory snapshot restores it.
        guest_dir: "/tmp".into(),
        snapshots_restore_guest: true,
    };
    let mut setup = Setup::new(&f.image, caps);
    setup.cpus = 1;
    setup.memory_mb = 128;
    setup.boot_timeout = BOOT;
    setup.stop_timeout = Duration::from_secs(60);
    conformance::run_all(f.driver.clone() as Arc<dyn Hypervisor>, setup).await;
    assert!(qemu_processes_under(f.root.path()).is_empty(), "QEMU still runs after the suite");
}
