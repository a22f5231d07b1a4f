//! Host facts and the KVM probe.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The probe guest's code, loaded at 0x7c00 (GNU as, `as --32` and
/// `ld -m elf_i386 -Ttext 0x7c00 --oformat binary`):
///
/// ```text
/// .code16: cli; zero ds/es/ss; sp = 0x7c00; lgdt gdt_desc; cr0.PE = 1; ljmp $0x08, pm32
/// .code32: ds/es/ss = 0x10; zero 12 KiB at 0x1000; PML4[0] = 0x2003; PDPT[0] = 0x3003;
///          PD[0] = 0x83 (2 MiB identity page); cr4.PAE; cr3 = 0x1000; EFER.LME (rdmsr/wrmsr
///          0xC0000080); cr0.PG; lidt null_idt; ljmp $0x18, lm64
/// .code64: ecx = 20,000,000; 1: dec ecx; jnz 1b; out 'O', 'K', '\n' to 0x3f8; int3
///          (a triple fault: with -no-reboot QEMU exits); hlt
/// gdt: null, 32-bit code 0x00CF9A000000FFFF, data 0x00CF92000000FFFF,
///      64-bit code 0x00AF9A000000FFFF; null_idt: limit 0; gdt_desc
/// ```
///
/// Long mode with paging and a busy loop: what a Linux guest needs from the CPU, and time
/// enough (a few ms under working KVM, ~0.1 s under TCG) to tell a KVM that runs guest code
/// at native speed from one that traps every instruction.
const PROBE_CODE: &[u8] = &[
    0xFA, 0x31, 0xC0, 0x8E, 0xD8, 0x8E, 0xC0, 0x8E, 0xD0, 0xBC, 0x00, 0x7C, 0x0F, 0x01, 0x16, 0xCE, 0x7C, 0x0F, 0x20,
    0xC0, 0x66, 0x83, 0xC8, 0x01, 0x0F, 0x22, 0xC0, 0xEA, 0x20, 0x7C, 0x08, 0x00, 0x66, 0xB8, 0x10, 0x00, 0x8E, 0xD8,
    0x8E, 0xC0, 0x8E, 0xD0, 0xBF, 0x00, 0x10, 0x00, 0x00, 0x31, 0xC0, 0xB9, 0x00, 0x0C, 0x00, 0x00, 0xF3, 0xAB, 0xC7,
    0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, 0xC7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03, 0x30, 0x00, 0x00,
    0xC7, 0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00, 0x00, 0x0F, 0x20, 0xE0, 0x83, 0xC8, 0x20, 0x0F, 0x22, 0xE0,
    0xB8, 0x00, 0x10, 0x00, 0x00, 0x0F, 0x22, 0xD8, 0xB9, 0x80, 0x00, 0x00, 0xC0, 0x0F, 0x32, 0x0D, 0x00, 0x01, 0x00,
    0x00, 0x0F, 0x30, 0x0F, 0x20, 0xC0, 0x0D, 0x00, 0x00, 0x00, 0x80, 0x0F, 0x22, 0xC0, 0x0F, 0x01, 0x1D, 0xC8, 0x7C,
    0x00, 0x00, 0xEA, 0x8E, 0x7C, 0x00, 0x00, 0x18, 0x00, 0xB9, 0x00, 0x2D, 0x31, 0x01, 0xFF, 0xC9, 0x75, 0xFC, 0x66,
    0xBA, 0xF8, 0x03, 0xB0, 0x4F, 0xEE, 0xB0, 0x4B, 0xEE, 0xB0, 0x0A, 0xEE, 0xCC, 0xF4, 0xEB, 0xFD, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92,
    0xCF, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xAF, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x25, 0x00, 0xA8,
    0x7C,
];

/// A 512-byte boot sector of [`PROBE_CODE`].
fn probe_boot_sector() -> Vec<u8> {
    let mut img = vec![0u8; 512];
    img[..PROBE_CODE.len()].copy_from_slice(PROBE_CODE);
    img[510] = 0x55;
    img[511] = 0xAA;
    img
}

/// How long the probe guest may take to print: working KVM answers in well under a second
/// (QEMU's start included); a KVM slower than TCG at running the loop is not used.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Whether KVM really runs guest code here: boots a one-sector guest with
/// `-accel kvm -cpu host` (the CPU model the driver uses with KVM) that enters long mode,
/// runs a short busy loop and prints, and waits [`PROBE_DEADLINE`] for its serial output.
/// On hosts whose KVM cannot run stock guests (for example a nested PVM backend) QEMU
/// aborts or the guest never prints; on hosts whose KVM runs guest code far slower than
/// TCG (seen on a CI machine: Linux guests stall in early boot) the loop does not finish in
/// time. Either way the answer is `false` and guests run on TCG.
#[tracing::instrument(level = "info", skip(scratch))]
pub(crate) async fn probe_kvm(qemu: &Path, scratch: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        tracing::info!("no /dev/kvm: using TCG");
        return false;
    }
    let img = scratch.join(format!(".kvm-probe-{}.img", uuid::Uuid::new_v4()));
    if std::fs::write(&img, probe_boot_sector()).is_err() {
        return false;
    }
    let drive = format!("file={},format=raw,if=ide", img.display());
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-cpu", "host", "-machine", "pc", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio", "-drive", &drive])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // A helper, not a guest: it dies with the agent.
    let child = hangar_proc::spawn(cmd);
    let ok = match child {
        Ok(mut child) => {
            let mut out = child.stdout.take();
            let read = async {
                let mut seen = Vec::new();
                let mut buf = [0u8; 64];
                if let Some(o) = out.as_mut() {
                    loop {
                        match o.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => {
                                seen.extend_from_slice(&buf[..n]);
                                if seen.windows(2).any(|w| w == b"OK") {
                                    return true;
                                }
                            }
                        }
                    }
                }
                false
            };
            let ok = tokio::time::timeout(PROBE_DEADLINE, read).await.unwrap_or(false);
            let _ = child.kill().await;
            ok
        }
        Err(_) => false,
    };
    let _ = std::fs::remove_file(&img);
    tracing::info!(kvm = ok, "KVM probe finished");
    ok
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub(crate) fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The CPU's model name from `/proc/cpuinfo`.
pub(crate) fn cpu_brand() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// `(NAME, VERSION_ID)` from `/etc/os-release`.
pub(crate) fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (field("NAME"), field("VERSION_ID"))
}

/// Total and free bytes of the filesystem holding `path`.
pub(crate) fn disk_space(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        }
        Err(_) => (0, 0),
    }
}

/// `"QEMU 7.2.22"` from `qemu-system-x86_64 --version` output.
pub(crate) fn parse_version(out: &str) -> String {
    out.lines()
        .next()
        .and_then(|l| l.split("version ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| format!("QEMU {v}"))
        .unwrap_or_else(|| "QEMU (unknown version)".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_qemu_version_line() {
        let out = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright";
        assert_eq!(parse_version(out), "QEMU 7.2.22");
        assert_eq!(parse_version("garbage"), "QEMU (unknown version)");
    }

    /// The probe guest's code works: under TCG it reaches long mode, runs its loop, prints
    /// and ends QEMU (triple fault with -no-reboot), in a few seconds at most.
    #[tokio::test]
    async fn the_probe_guest_prints_ok_under_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("probe.img");
        std::fs::write(&img, probe_boot_sector()).unwrap();
        let drive = format!("file={},format=raw,if=ide", img.display());
        let run = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-machine", "pc", "-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-serial", "stdio", "-drive", &drive])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), run).await.expect("QEMU ended").unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n");
    }

    #[test]
    fn boot_sector_is_bootable() {
        let s = probe_boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        // The loop count (20,000,000 = 0x01312D00) and the serial port, where the listing says.
        assert!(s.windows(5).any(|w| w == [0xB9, 0x00, 0x2D, 0x31, 0x01]));
        assert!(s.windows(4).any(|w| w == [0x66, 0xBA, 0xF8, 0x03]));
    }
}
