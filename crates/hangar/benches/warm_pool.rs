//! Claim-to-exec-ready time of a VM from a warm runner pool next to a cold create, in the
//! same run, through the real binary: an orchestrator and two fake-Parallels host agents
//! (each with the image in its catalog and host cache). Each round measures, from the
//! request to the first command answered in the VM:
//! - warm: `POST /orchestrator/machines {"pool": ...}` then `PUT .../execute`;
//! - cold: `POST /orchestrator/machines {"catalog_manifest": ...}` (the same image and size)
//!   then `PUT .../execute`.
//!
//! The VM is deleted after each round (not timed) and the next warm round starts once the
//! pool is full again. Prints p50/p90/p99/max of both and the ratio cold/warm.
//! Run: `cargo bench -p hangar --bench warm_pool` (ROUNDS=N, default 30). The fake host has no
//! boot time, so the cold figure is the orchestrator's create path alone; a real guest's boot
//! comes on top of it, never on top of the warm figure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(name: &str, v: &mut [Duration]) -> Duration {
    v.sort();
    println!(
        "{name:<6} n={:<3} p50 {:>8.1} ms  p90 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
        v.len(),
        ms(pct(v, 0.5)),
        ms(pct(v, 0.9)),
        ms(pct(v, 0.99)),
        ms(*v.last().unwrap())
    );
    pct(v, 0.99)
}

async fn exec_ready(c: &reqwest::Client, orch: &Server, auth: &Auth, id: &str) {
    let url = orch.api(&format!("/orchestrator/machines/{id}/execute"));
    let (st, r) = call(c, Method::PUT, &url, auth, Some(json!({"command": "true"})), &[]).await;
    assert_eq!((st, r["exit_code"].as_i64()), (200, Some(0)), "exec in {id}: {r}");
}

async fn delete(c: &reqwest::Client, orch: &Server, auth: &Auth, id: &str) {
    let url = orch.api(&format!("/orchestrator/machines/{id}?force=true"));
    let (st, v) = call(c, Method::DELETE, &url, auth, None, &[]).await;
    assert!(st < 300, "delete {id}: {st} {v}");
}

async fn pool_full(c: &reqwest::Client, orch: &Server, auth: &Auth) {
    wait_for("the pool full again", Duration::from_secs(120), || async {
        let (st, v) = call(c, Method::GET, &orch.api("/runner-pools/bench"), auth, None, &[]).await;
        st == 200 && v["status"]["warm_ready"] == 2 && v["status"]["warm_starting"] == 0
    })
    .await;
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        let fake = FakeParallels::new(&dir.path().join(name));
        fake.size(16, 65536);
        let agent = fake.server(
            &dir.path().join(name).join("data"),
            &[("ENABLED_MODULES", "api,host,catalog"), ("SYSTEM_RESERVED_CPU", "0"), ("SYSTEM_RESERVED_MEMORY", "0")],
        );
        let token = login(&c, &agent, "root", ROOT_PASSWORD).await;
        push_bundle(&agent, &token, &dir.path().join(name), &fake.images.join("golden.pvm"), "bench-image");
        agents.push((fake, agent));
    }
    let orch = Server::start(
        &dir.path().join("orch"),
        &[("ENABLED_MODULES", "api,orchestrator"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")],
    );
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    for (name, (_, agent)) in ["host-a", "host-b"].iter().zip(&agents) {
        let body = json!({"name": name, "host": agent.url,
            "authentication": {"username": "root", "password": ROOT_PASSWORD}});
        let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root, Some(body), &[]).await;
        assert_eq!(st, 201, "register {name}: {v}");
    }
    let image = json!({"catalog_id": "bench-image", "version": "1.0.0", "architecture": "x86_64"});
    let pool = json!({"name": "bench", "labels": ["bench"], "image": image,
        "cpus": 1, "memory_mb": 512, "max_vms": 4, "warm": 2, "job_timeout_secs": 600});
    let (st, v) = call(&c, Method::POST, &orch.api("/runner-pools"), &root, Some(pool), &[]).await;
    assert_eq!(st, 201, "{v}");
    pool_full(&c, &orch, &root).await;

    let machines = orch.api("/orchestrator/machines");
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        // Warm: claim, then the first command.
        pool_full(&c, &orch, &root).await;
        let t = Instant::now();
        let body = json!({"name": format!("warm-{i}"), "pool": "bench", "ttl_seconds": 600});
        let (st, m) = call(&c, Method::POST, &machines, &root, Some(body), &[]).await;
        assert!(st == 200 || st == 201, "claim: {st} {m}");
        let id = m["id"].as_str().unwrap().to_string();
        exec_ready(&c, &orch, &root, &id).await;
        warm.push(t.elapsed());
        delete(&c, &orch, &root, &id).await;

        // Cold: the same image and size created, then the first command.
        let t = Instant::now();
        let body = json!({"name": format!("cold-{i}"), "catalog_manifest": image,
            "specs": {"cpu": 1, "memory": 512}, "start_on_create": true, "ttl_seconds": 600});
        let (st, m) = call(&c, Method::POST, &machines, &root, Some(body), &[]).await;
        assert!(st == 200 || st == 201, "create: {st} {m}");
        let id = m["id"].as_str().unwrap().to_string();
        exec_ready(&c, &orch, &root, &id).await;
        cold.push(t.elapsed());
        delete(&c, &orch, &root, &id).await;
    }
    println!("claim-to-exec-ready, {rounds} rounds each, same run (fake Parallels, 2 hosts):");
    let w = summary("warm", &mut warm);
    let k = summary("cold", &mut cold);
    println!(
        "cold/warm p99 ratio {:.1}x; goal warm p99 < 1000 ms: {}",
        ms(k) / ms(w),
        if w < Duration::from_secs(1) { "met" } else { "NOT met" }
    );
    drop(agents);
}
