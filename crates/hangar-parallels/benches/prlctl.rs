//! Figures for the Parallels driver: parser throughput on `prlctl list -i --json` output,
//! and per-operation latency of the driver against the fake `prlctl` (dominated by process
//! spawn; real prlctl adds its own dispatcher round trip). Prints, asserts nothing.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hangar_hypervisor::Hypervisor;
use hangar_parallels::{ParallelsConfig, ParallelsDriver, parse};

fn main() {
    let fixture =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/list-info.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&fixture).unwrap();
    let one = v[0].clone();
    let many: Vec<serde_json::Value> = (0..200)
        .map(|i| {
            let mut vm = one.clone();
            vm["ID"] = serde_json::Value::String(format!("00000000-0000-4000-8000-{i:012}"));
            vm
        })
        .collect();
    let text = serde_json::to_string_pretty(&many).unwrap();
    let rounds = 50;
    let start = Instant::now();
    for _ in 0..rounds {
        let vms = parse::vm_list(&text).unwrap();
        assert_eq!(vms.len(), 200);
        let infos: Vec<_> = vms.iter().map(|v| v.to_info(None, 0)).collect();
        std::hint::black_box(infos);
    }
    let per = start.elapsed() / rounds;
    println!(
        "parse `list -i --json`, 200 VMs ({} KiB): {:?} per document, {:.1} MiB/s",
        text.len() / 1024,
        per,
        text.len() as f64 / per.as_secs_f64() / (1 << 20) as f64
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = env!("CARGO_BIN_EXE_hangar-fake-prlctl");
        std::os::unix::fs::symlink(exe, bin.join("prlctl")).unwrap();
        std::os::unix::fs::symlink(exe, bin.join("prlsrvctl")).unwrap();
        let mut cfg = ParallelsConfig::with_tools_in(&bin);
        cfg.env.insert("FAKE_PRL_STATE_DIR".into(), state.display().to_string());
        cfg.watch_events = false;
        cfg.assume_root = Some(false);
        let d = ParallelsDriver::new(cfg).unwrap();
        for i in 0..20 {
            let out = std::process::Command::new(bin.join("prlctl"))
                .args(["create", &format!("bench-{i}"), "-d", "ubuntu"])
                .env("FAKE_PRL_STATE_DIR", &state)
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let time = |label: &str, n: u32, took: Duration| println!("{label}: {:?} per call ({n} calls)", took / n);
        let n = 50;
        let t = Instant::now();
        for _ in 0..n {
            d.get("bench-3").await.unwrap();
        }
        time("driver.get (1 prlctl list <vm> -i) vs fake", n, t.elapsed());
        let t = Instant::now();
        for _ in 0..n {
            assert_eq!(d.list().await.unwrap().len(), 20);
        }
        time("driver.list, 20 VMs (2 prlctl calls + bundle sizes) vs fake", n, t.elapsed());
        d.power("bench-3", hangar_hypervisor::PowerOp::Start).await.unwrap();
        let req = hangar_hypervisor::ExecRequest {
            argv: vec!["true".into()],
            shell: false,
            env: Default::default(),
            working_dir: None,
            user: None,
            timeout: Duration::from_secs(10),
            stdin: None,
        };
        let t = Instant::now();
        for _ in 0..n {
            d.exec("bench-3", req.clone()).await.unwrap();
        }
        time("driver.exec `true` (get + prlctl exec) vs fake", n, t.elapsed());
    });
}
