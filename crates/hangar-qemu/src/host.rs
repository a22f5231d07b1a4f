//! Host facts and the KVM probe.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// A 512-byte boot sector that writes `OK\n` to COM1 and halts.
fn probe_boot_sector() -> Vec<u8> {
    // mov dx,0x3f8; mov al,'O'; out dx,al; mov al,'K'; out dx,al; mov al,10; out dx,al; hlt; jmp $-1
    let code: [u8; 15] = [0xBA, 0xF8, 0x03, 0xB0, b'O', 0xEE, 0xB0, b'K', 0xEE, 0xB0, 0x0A, 0xEE, 0xF4, 0xEB, 0xFD];
    let mut img = vec![0u8; 512];
    img[..code.len()].copy_from_slice(&code);
    img[510] = 0x55;
    img[511] = 0xAA;
    img
}

/// Whether KVM really runs guest code here: boots a one-sector guest with
/// `-accel kvm -cpu host` (the CPU model the driver uses with KVM) and waits for its
/// serial output. On hosts whose KVM cannot run stock guests (for example a nested
/// PVM backend) QEMU aborts or the guest never prints, and the answer is `false`.
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
            let ok = tokio::time::timeout(Duration::from_secs(10), read).await.unwrap_or(false);
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
mod tests {
    use super::*;

    #[test]
    fn parses_the_qemu_version_line() {
        let out = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright";
        assert_eq!(parse_version(out), "QEMU 7.2.22");
        assert_eq!(parse_version("garbage"), "QEMU (unknown version)");
    }

    #[test]
    fn boot_sector_is_bootable() {
        let s = probe_boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }
}
