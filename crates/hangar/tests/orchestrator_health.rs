//! The orchestrator's live view of a host, end to end: one orchestrator process and one
//! host agent (fake `prlctl`) on 127.0.0.1. The orchestrator's periodic check is set to
//! 30 s, so everything seen sooner comes from the host's event stream: a VM made and
//! stopped on the host shows up within about 2 s, a host killed with kill -9 is unhealthy
//! with all its VMs `unknown` within 10 s, and, restarted on the same port and data, it
//! rejoins by itself with its VMs' real states.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// The agent of `fake` with its data in `data`, listening on `port` (0: any).
fn agent_on(fake: &FakeParallels, data: &Path, port: u16) -> Server {
    let prlctl = fake.tools.join("prlctl");
    let images = fake.images.to_str().unwrap().to_string();
    let settings = [
        ("ENABLED_MODULES", "api,host"),
        ("HYPERVISOR", "parallels"),
        ("PRLCTL_PATH", prlctl.to_str().unwrap()),
        ("HOST_IMAGES_FOLDER", images.as_str()),
    ];
    let env = [("FAKE_PRL_STATE_DIR", fake.state.to_str().unwrap())];
    Server::launch(None, ("127.0.0.1", port), data, &settings, true, &env)
}

async fn host_view(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str) -> Value {
    let (st, v) = call(c, Method::GET, &o.api(&format!("/orchestrator/hosts/{id}")), auth, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// The VMs of host `id` as the orchestrator lists them: (VM id, state).
async fn listed(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str) -> Vec<(String, String)> {
    let (st, v) = call(c, Method::GET, &o.api("/orchestrator/machines/"), auth, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["host_id"] == id)
        .map(|m| {
            (m["ID"].as_str().unwrap_or_default().to_string(), m["State"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

#[tokio::test]
async fn host_events_drive_the_view_and_a_killed_host_is_unknown_until_it_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(&dir.path().join("a"));
    let data = dir.path().join("a/data");
    let mut agent = agent_on(&fake, &data, 0);
    let port: u16 = agent.url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let orch = Server::start(
        &dir.path().join("orch"),
        &[
            ("ENABLED_MODULES", "api,orchestrator"),
            ("ORCHESTRATOR_CHECK_INTERVAL", "30s"),
            ("ORCHESTRATOR_UNHEALTHY_AFTER", "10s"),
        ],
    );
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    let on_agent = Auth::Bearer(login(&c, &agent, "root", ROOT_PASSWORD).await);

    let (st, h) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/hosts"),
        &root,
        Some(json!({"name": "host-a", "host": agent.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{h}");
    let id = h["id"].as_str().unwrap().to_string();
    assert_eq!(h["state"], "healthy", "{h}");

    // A VM made on the host itself, behind the orchestrator's back, appears there within
    // about 2 s (no full listing runs in that time: the check interval is 30 s).
    let (st, vm) = call(
        &c,
        Method::POST,
        &agent.api("/machines"),
        &on_agent,
        Some(json!({"name": "local-1", "image": "golden.pvm", "start_on_create": true,
            "specs": {"cpu": "1", "memory": "512"}})),
        &[],
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {vm}");
    let vm_id = vm["id"].as_str().or(vm["ID"].as_str()).unwrap().to_string();
    let want_running = vec![(vm_id.clone(), "running".to_string())];
    wait_for("the host's new VM in the orchestrator", Duration::from_millis(2500), || async {
        listed(&c, &orch, &root, &id).await == want_running
    })
    .await;
    // Its power changes follow the same way.
    let (st, v) = call(&c, Method::PUT, &agent.api(&format!("/machines/{vm_id}/stop")), &on_agent, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let want_stopped = vec![(vm_id.clone(), "stopped".to_string())];
    wait_for("the stop seen by the orchestrator", Duration::from_millis(2500), || async {
        listed(&c, &orch, &root, &id).await == want_stopped
    })
    .await;
    let (st, v) = call(&c, Method::PUT, &agent.api(&format!("/machines/{vm_id}/start")), &on_agent, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    wait_for("the start seen by the orchestrator", Duration::from_millis(2500), || async {
        listed(&c, &orch, &root, &id).await == want_running
    })
    .await;

    // kill -9: unhealthy, and every VM of the host `unknown`, within 10 s.
    agent.kill9();
    let killed = Instant::now();
    let want_unknown = vec![(vm_id.clone(), "unknown".to_string())];
    wait_for("host unhealthy with its VMs unknown", Duration::from_secs(10), || async {
        host_view(&c, &orch, &root, &id).await["state"] == "unhealthy"
            && listed(&c, &orch, &root, &id).await == want_unknown
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "seen after {took:?}");
    let (st, v) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &root,
        Some(json!({"name": "while-down", "image": "golden.pvm", "specs": {"cpu": "1", "memory": "512"}})),
        &[],
    )
    .await;
    assert!(st == 503 || st == 409, "nothing is placed on an unhealthy host: {st} {v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("unhealthy"), "{v}");

    // Back on the same port with the same data: it rejoins by itself, VMs resynced.
    let agent = agent_on(&fake, &data, port);
    assert_eq!(agent.url.rsplit(':').next().unwrap().trim_end_matches('/'), port.to_string());
    wait_for("host healthy again with its VMs' real states", Duration::from_secs(15), || async {
        host_view(&c, &orch, &root, &id).await["state"] == "healthy"
            && listed(&c, &orch, &root, &id).await == want_running
    })
    .await;
    // Events flow again: the VM stopped on the host frees its CPU, and the orchestrator
    // places a new VM there.
    let on_agent = Auth::Bearer(login(&c, &agent, "root", ROOT_PASSWORD).await);
    let (st, v) = call(&c, Method::PUT, &agent.api(&format!("/machines/{vm_id}/stop")), &on_agent, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    wait_for("the stop after the rejoin", Duration::from_millis(2500), || async {
        listed(&c, &orch, &root, &id).await == want_stopped
    })
    .await;
    let (st, v) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &root,
        Some(json!({"name": "after-rejoin", "image": "golden.pvm", "specs": {"cpu": "1", "memory": "512"}})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "placed on the host that came back: {v}");
    assert_eq!(v["host_id"], id.as_str(), "{v}");
    drop(agent);
}
