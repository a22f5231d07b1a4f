//! Facts that need no guest boot.

#![allow(clippy::unwrap_used)]

mod common;

use hangar_hypervisor::{Hypervisor, HypervisorKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_info_reports_qemu_and_its_acceleration() {
    let f = common::fixture().await;
    let info = f.driver.host_info().await.unwrap();
    assert_eq!(info.hypervisor, HypervisorKind::Qemu);
    assert!(info.version.starts_with("QEMU "), "{}", info.version);
    assert!(info.acceleration == "kvm" || info.acceleration == "tcg");
    assert_eq!(info.acceleration == "kvm", f.driver.uses_kvm().await);
    if !std::path::Path::new("/dev/kvm").exists() {
        assert_eq!(info.acceleration, "tcg");
    }
    assert!(info.cpu_count >= 1 && info.memory_bytes > 0 && info.disk_total_bytes > 0);
}

#[test]
fn a_missing_image_names_the_build_script() {
    let missing = std::env::temp_dir().join("hangar-no-such-image");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "host_info_reports_qemu_and_its_acceleration", "--nocapture"])
        .env("HANGAR_GUEST_IMAGE_DIR", &missing)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the test must fail without the image");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("scripts/build-guest-image.sh"), "{text}");
}
