//! Boot and clone figures for the QEMU driver (run: `bench/qemu-boot.sh`).
//!
//! Prints, from one run on this machine:
//! - create-to-exec-ready through the driver (create, start, guest agent answers, `true` runs);
//! - the same done raw (`qemu-img create` + `qemu-system-x86_64` + agent ping) for comparison;
//! - linked and full clone of a VM whose base is a 10 GiB qcow2 (1 GiB of it written,
//!   the VM's overlay holding 64 MiB of its own), and raw `qemu-img create -b` of the same.
//!
//! TCG always; a KVM column only when the driver's KVM probe succeeds.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hangar_hypervisor::{CloneSpec, CreateSpec, ExecRequest, Hypervisor, PowerOp};
use hangar_qemu::qga::Qga;
use hangar_qemu::{Acceleration, QemuConfig, QemuDriver};

const RUNS: usize = 3;

fn image_dir() -> PathBuf {
    let dir = std::env::var_os("HANGAR_GUEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("set HANGAR_GUEST_IMAGE_DIR (build it with scripts/build-guest-image.sh DIR)"));
    assert!(dir.join("image.json").exists(), "no guest image in {}: run scripts/build-guest-image.sh", dir.display());
    dir
}

fn spec(name: &str, image: &Path) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        image: image.to_path_buf(),
        cpus: 1,
        memory_mb: 128,
        disk_bytes: None,
        description: String::new(),
        owner: None,
        os: None,
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn driver_boot(root: &Path, image: &Path, accel: Acceleration, n: usize) -> Vec<Duration> {
    let mut cfg = QemuConfig::new(root);
    cfg.acceleration = accel;
    let d = QemuDriver::new(cfg).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let vm = d.create(spec(&format!("bench-{i}"), image)).await.unwrap();
        d.power(&vm.id, PowerOp::Start).await.unwrap();
        d.wait_for_agent(&vm.id, Duration::from_secs(180)).await.unwrap();
        let r = d
            .exec(
                &vm.id,
                ExecRequest {
                    argv: vec!["true".into()],
                    shell: false,
                    env: Default::default(),
                    working_dir: None,
                    user: None,
                    timeout: Duration::from_secs(60),
                    stdin: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(r.exit_code, 0);
        out.push(t.elapsed());
        d.power(&vm.id, PowerOp::Kill).await.unwrap();
        d.delete(&vm.id).await.unwrap();
    }
    out
}

async fn raw_boot(dir: &Path, image: &Path, kvm: bool, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let vm = dir.join(format!("raw{i}"));
        std::fs::create_dir_all(&vm).unwrap();
        let disk = vm.join("disk.qcow2");
        let qga = vm.join("qga.sock");
        let t = Instant::now();
        let st = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.join("disk.qcow2"))
            .arg(&disk)
            .status()
            .await
            .unwrap();
        assert!(st.success());
        let accel: &[&str] = if kvm { &["-accel", "kvm", "-cpu", "host"] } else { &["-accel", "tcg"] };
        let mut child = tokio::process::Command::new("qemu-system-x86_64")
            .args(accel)
            .args(["-m", "128", "-smp", "1", "-nodefaults", "-display", "none"])
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args(["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"])
            .args(["-device", "virtio-serial-pci", "-chardev"])
            .arg(format!("socket,id=qga0,path={},server=on,wait=off", qga.display()))
            .args(["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0", "-drive"])
            .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        let mut q = Qga::connect(&qga, deadline).await.unwrap();
        q.call("guest-ping", None, Duration::from_secs(10)).await.unwrap();
        out.push(t.elapsed());
        drop(q);
        let _ = child.kill().await;
    }
    out
}

async fn timed<F: std::future::Future<Output = T>, T>(f: F) -> (T, Duration) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let image = image_dir();
    let scratch = tempfile::Builder::new().prefix("hqb").tempdir_in("/tmp").unwrap();
    let root = scratch.path().join("vms");
    let probe = QemuDriver::new(QemuConfig::new(&root)).await.unwrap();
    let kvm = probe.uses_kvm().await;
    let version = probe.host_info().await.unwrap().version;
    drop(probe);
    println!("hangar-qemu boot benchmark ({version}, {RUNS} runs each, 1 vCPU, 128 MiB, busybox guest)");
    println!();

    let tcg_driver = driver_boot(&root, &image, Acceleration::Tcg, RUNS).await;
    let tcg_raw = raw_boot(scratch.path(), &image, false, RUNS).await;
    let (kvm_driver, kvm_raw) = if kvm {
        let d = driver_boot(&root, &image, Acceleration::Kvm, RUNS).await;
        let r = raw_boot(scratch.path(), &image, true, RUNS).await;
        (secs(median(d)), secs(median(r)))
    } else {
        ("unavailable".to_string(), "unavailable".to_string())
    };
    let all = |v: &[Duration]| v.iter().map(|d| secs(*d)).collect::<Vec<_>>().join(", ");
    println!("{:<44} {:>12} {:>12}   runs (TCG)", "boot to exec-ready (median)", "TCG", "KVM");
    println!(
        "{:<44} {:>12} {:>12}   {}",
        "driver: create + start + agent + exec",
        secs(median(tcg_driver.clone())),
        kvm_driver,
        all(&tcg_driver)
    );
    println!(
        "{:<44} {:>12} {:>12}   {}",
        "raw: qemu-img create + qemu + agent ping",
        secs(median(tcg_raw.clone())),
        kvm_raw,
        all(&tcg_raw)
    );
    println!();

    // Clones of a VM on a sparse 10 GiB base.
    let base = scratch.path().join("base10g.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("10G")
        .status()
        .unwrap();
    assert!(st.success());
    // 1 GiB of real data in the base, 64 MiB of the VM's own changes on top.
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 1G"])
        .arg(&base)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let d = QemuDriver::new(QemuConfig::new(&root)).await.unwrap();
    let (src, create) = timed(d.create(spec("big", &base))).await;
    let src = src.unwrap();
    assert_eq!(src.disk_virtual_bytes, 10 << 30);
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xcd 2G 64M"])
        .arg(src.home.join("disk.qcow2"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let (linked, linked_t) =
        timed(d.clone_vm(&src.id, CloneSpec { name: "big-linked".into(), linked: true, destination: None })).await;
    let linked = linked.unwrap();
    let (full, full_t) =
        timed(d.clone_vm(&src.id, CloneSpec { name: "big-full".into(), linked: false, destination: None })).await;
    let full = full.unwrap();
    let (_, raw_t) = timed(
        tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(scratch.path().join("raw-overlay.qcow2"))
            .status(),
    )
    .await;
    println!("10 GiB qcow2 base (1 GiB written), VM overlay with 64 MiB of its own");
    println!("{:<44} {:>12}", "driver create (overlay)", secs(create));
    println!("{:<44} {:>12}   {} bytes on disk", "driver linked clone", secs(linked_t), linked.disk_bytes);
    println!("{:<44} {:>12}   {} bytes on disk", "driver full clone", secs(full_t), full.disk_bytes);
    println!("{:<44} {:>12}", "raw qemu-img create -b", secs(raw_t));
    for id in [&src.id, &linked.id, &full.id] {
        d.delete(id).await.unwrap();
    }
}
