//! The fake host's `sysctl`: the hardware facts macOS answers and Parallels Desktop does
//! not (`prlsrvctl info` has no CPU count or memory size; the driver asks `sysctl`, as the
//! reference does).
//!
//! The fake host's hardware is one file, `host.json` at the top of `FAKE_PRL_STATE_DIR`
//! (`{"cpus": 10, "memory_mb": 16384, "cpu_brand": "Apple M2 Pro"}`, every key optional),
//! so every tool of one fake host reports the same machine. Without it (or for a key it
//! lacks) the fake reports the machine it runs on.

use std::path::Path;

use serde::Deserialize;

use crate::{Done, Fail};

/// The fake host's hardware, as `host.json` sets it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    cpus: Option<u32>,
    memory_mb: Option<u64>,
    cpu_brand: Option<String>,
}

/// The hardware the fake host reports.
pub struct Hardware {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub cpu_brand: String,
}

fn machine_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

/// The hardware of the fake host whose state folder is `state` (`None`: the machine's).
pub fn hardware(state: Option<&Path>) -> Result<Hardware, Fail> {
    let file = match state.map(|s| s.join("host.json")) {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(&path).map_err(|e| Fail::io("read host.json", &e))?;
            let f: HostFile = serde_json::from_str(&text)
                .map_err(|e| Fail::internal(format!("sysctl: {} is not a host description: {e}", path.display())))?;
            if f.cpus == Some(0) || f.memory_mb == Some(0) {
                return Err(Fail::internal(format!("sysctl: {}: cpus and memory_mb must be positive", path.display())));
            }
            f
        }
        _ => HostFile::default(),
    };
    Ok(Hardware {
        cpus: file.cpus.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)),
        memory_bytes: file.memory_mb.map_or_else(machine_memory_bytes, |mb| mb << 20),
        cpu_brand: file.cpu_brand.unwrap_or_else(|| "Apple M2 (Hangar fake host)".to_string()),
    })
}

/// `sysctl [-n] NAME...`: one line per name, `NAME: VALUE` (just `VALUE` with `-n`); an
/// unknown name is reported on stderr and makes the exit code 1, as on macOS.
pub fn run(state: Option<&Path>, args: &[String]) -> Result<Done, Fail> {
    let mut values_only = false;
    let mut names = Vec::new();
    for a in args {
        match a.as_str() {
            "-n" => values_only = true,
            s if s.starts_with('-') => return Err(Fail::usage(format!("sysctl: illegal option -- {s}"))),
            s => names.push(s),
        }
    }
    if names.is_empty() {
        return Err(Fail::usage("usage: sysctl [-n] name ..."));
    }
    let hw = hardware(state)?;
    let mut out = String::new();
    let mut unknown = false;
    for name in names {
        let value = match name {
            "hw.ncpu" | "hw.logicalcpu" | "hw.physicalcpu" | "hw.activecpu" | "hw.logicalcpu_max"
            | "hw.physicalcpu_max" => hw.cpus.to_string(),
            "hw.memsize" => hw.memory_bytes.to_string(),
            "machdep.cpu.brand_string" => hw.cpu_brand.clone(),
            other => {
                eprintln!("sysctl: unknown oid '{other}'");
                unknown = true;
                continue;
            }
        };
        if values_only {
            out.push_str(&format!("{value}\n"));
        } else {
            out.push_str(&format!("{name}: {value}\n"));
        }
    }
    if unknown {
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(out.as_bytes());
        let _ = o.flush();
        return Ok(Done::Code(1));
    }
    Ok(Done::Out(out))
}
