//! Warm pools through the real binary: an orchestrator and two fake-Parallels host agents
//! (each serving the pool's catalog image from its own catalog). A pool with two warm VMs
//! fills (one per host); `POST /orchestrator/machines {"pool": ...}` answers at once with a
//! warm VM renamed and owned by the caller; exec works in it through the orchestrator; the
//! pool refills; deleting the pool deletes its warm VMs and keeps the claimed one.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

async fn pool_status(c: &reqwest::Client, orch: &Server, auth: &Auth) -> Value {
    let (st, v) = call(c, Method::GET, &orch.api("/runner-pools/linux"), auth, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn wait_ready(c: &reqwest::Client, orch: &Server, auth: &Auth, ready: u64) {
    wait_for(&format!("{ready} warm VMs ready"), Duration::from_secs(120), || async {
        let v = pool_status(c, orch, auth).await;
        v["status"]["warm_ready"] == ready && v["status"]["warm_starting"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_pool_fills_on_two_hosts_a_claim_answers_a_renamed_vm_of_the_caller_and_the_pool_refills() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut agents = Vec::new();
    let mut fakes = Vec::new(); // kept alive with their agents
    for name in ["a", "b"] {
        let fake = FakeParallels::new(&dir.path().join(name));
        let agent = fake.server(
            &dir.path().join(name).join("data"),
            &[
                ("ENABLED_MODULES", "api,host,catalog"),
                ("SYSTEM_RESERVED_CPU", "0"),
                ("SYSTEM_RESERVED_MEMORY", "0"),
                ("SYSTEM_RESERVED_DISK", "0"),
            ],
        );
        let token = login(&c, &agent, "root", ROOT_PASSWORD).await;
        push_bundle(&agent, &token, &dir.path().join(name), &fake.images.join("golden.pvm"), "ci-image");
        fakes.push(fake);
        agents.push(agent);
    }
    let orch = Server::start(
        &dir.path().join("orch"),
        &[("ENABLED_MODULES", "api,orchestrator"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")],
    );
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    for (name, agent) in ["host-a", "host-b"].iter().zip(&agents) {
        let body = json!({"name": name, "host": agent.url,
            "authentication": {"username": "root", "password": ROOT_PASSWORD}});
        let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root, Some(body), &[]).await;
        assert_eq!(st, 201, "register {name}: {v}");
    }

    // A plain user may claim (CREATE_VM) and run commands (EXECUTE_COMMAND_VM), not manage pools.
    let (alice_id, alice) = make_user(&c, &orch, root_token(&root), "alice").await;
    for claim in ["CREATE_VM", "EXECUTE_COMMAND_VM"] {
        let url = orch.api(&format!("/auth/users/{alice_id}/claims"));
        let (st, v) = call(&c, Method::POST, &url, &root, Some(json!({"name": claim})), &[]).await;
        assert_eq!(st, 201, "grant {claim}: {v}");
    }
    let alice = Auth::Bearer(alice);
    let pool = json!({"name": "linux", "labels": ["linux-x64"],
        "image": {"catalog_id": "ci-image", "architecture": "amd64"},
        "cpus": 1, "memory_mb": 512, "max_vms": 3, "warm": 2, "job_timeout_secs": 600});
    let (st, v) = call(&c, Method::POST, &orch.api("/runner-pools"), &alice, Some(pool.clone()), &[]).await;
    assert_eq!(st, 403, "RUNNER_POOLS_WRITE is needed: {v}");
    let (st, v) = call(&c, Method::POST, &orch.api("/runner-pools"), &root, Some(pool), &[]).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["image"]["version"], "latest", "{v}");

    // Two warm VMs, booted and exec-ready, one on each host, owned by the pool.
    wait_ready(&c, &orch, &root, 2).await;
    let (_, vms) = call(&c, Method::GET, &orch.api("/orchestrator/machines"), &root, None, &[]).await;
    let warm: Vec<&Value> = vms.as_array().unwrap().iter().collect();
    assert_eq!(warm.len(), 2, "{vms:#}");
    let mut hosts: Vec<&str> = warm.iter().map(|v| v["host_id"].as_str().unwrap()).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 2, "spread over both hosts: {vms:#}");
    assert!(warm.iter().all(|v| v["owner"] == "pool:linux" && v["state"] == "running"), "{vms:#}");

    // The claim answers a warm VM at once: renamed, owned by alice, TTL started.
    let started = std::time::Instant::now();
    let (st, made) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &alice,
        Some(json!({"name": "job-1", "pool": "linux", "ttl_seconds": 300})),
        &[],
    )
    .await;
    let took = started.elapsed();
    assert!(st == 200 || st == 201, "{st} {made}");
    assert_eq!((&made["name"], &made["owner"]), (&json!("job-1"), &json!("alice")), "{made}");
    assert!(made["expires_at"].is_string(), "{made}");
    let vm_id = made["id"].as_str().unwrap().to_string();
    assert!(warm.iter().any(|v| v["id"] == vm_id.as_str()), "a warm VM was taken: {made}\n{}", orch.log());
    eprintln!("warm claim answered in {} ms", took.as_millis());

    // Renamed on its host too, and alice may run a command in it through the orchestrator.
    let (st, m) = call(&c, Method::GET, &orch.api(&format!("/orchestrator/machines/{vm_id}")), &alice, None, &[]).await;
    assert_eq!((st, &m["Name"], &m["owner"]), (200, &json!("job-1"), &json!("alice")), "{m}");
    let exec = orch.api(&format!("/orchestrator/machines/{vm_id}/execute"));
    let (st, r) = call(&c, Method::PUT, &exec, &alice, Some(json!({"command": "echo hello"})), &[]).await;
    assert_eq!((st, r["exit_code"].as_i64()), (200, Some(0)), "{r}");
    assert_eq!(r["stdout"].as_str().map(str::trim), Some("hello"), "{r}");
    let mut on_hosts = Vec::new();
    for agent in &agents {
        let token = Auth::Bearer(login(&c, agent, "root", ROOT_PASSWORD).await);
        let (st, m) = call(&c, Method::GET, &agent.api(&format!("/machines/{vm_id}")), &token, None, &[]).await;
        if st == 200 {
            on_hosts.push(m["Name"].clone());
        }
    }
    // Parallels renames only stopped VMs: the running VM keeps its warm name on its host,
    // and the orchestrator (above) shows the claim's name from its record.
    assert_eq!(on_hosts.len(), 1, "the claimed VM runs on exactly one host: {on_hosts:?}");

    // The pool refills behind the claim: 2 warm + 1 claimed = max_vms.
    wait_ready(&c, &orch, &root, 2).await;
    assert_eq!(pool_status(&c, &orch, &root).await["status"]["claimed"], 1);

    // Deleting the pool deletes its warm VMs; the claimed one stays with alice.
    let (st, v) = call(&c, Method::DELETE, &orch.api("/runner-pools/linux"), &root, None, &[]).await;
    assert_eq!(st, 204, "{v}");
    wait_for("the warm VMs are deleted", Duration::from_secs(60), || async {
        let (_, vms) = call(&c, Method::GET, &orch.api("/orchestrator/machines"), &root, None, &[]).await;
        let ids: Vec<&str> = vms.as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
        ids == [vm_id.as_str()]
    })
    .await;
    let (st, audit) = call(&c, Method::GET, &orch.api("/audit"), &root, None, &[]).await;
    assert_eq!(st, 200, "{audit}");
    assert!(audit.to_string().contains("orchestrator.pool.claim"), "the claim is audited");
}

fn root_token(a: &Auth) -> &str {
    match a {
        Auth::Bearer(t) => t,
        _ => unreachable!(),
    }
}
