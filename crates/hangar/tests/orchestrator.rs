//! The orchestrator end to end: one orchestrator process and two host-agent processes
//! (each its own data folder, the fake `prlctl` as hypervisor), all on 127.0.0.1. Hosts
//! are registered with credentials (a password for one, an API key for the other), VMs
//! are placed and spread, exec goes through the orchestrator, a full fleet answers "no
//! capacity" with the reason, a host killed with kill -9 turns unhealthy and new VMs go to
//! the other one, and a restarted orchestrator keeps its hosts. A second test covers
//! joining with enrollment tokens (CLI and HTTP), async creation with jobs, the capacity
//! queue and one host's machine routes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

fn orchestrator(data: &Path) -> Server {
    Server::start(
        data,
        &[
            ("ENABLED_MODULES", "api,orchestrator"),
            ("ORCHESTRATOR_CHECK_INTERVAL", "1s"),
            ("ORCHESTRATOR_UNHEALTHY_AFTER", "10s"),
        ],
    )
}

async fn host_state(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str) -> String {
    let (st, v) = call(c, Method::GET, &o.api(&format!("/orchestrator/hosts/{id}")), auth, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v["state"].as_str().unwrap_or_default().to_string()
}

async fn create(c: &reqwest::Client, o: &Server, auth: &Auth, name: &str, memory: u64) -> (u16, Value) {
    call(
        c,
        Method::POST,
        &o.api("/orchestrator/machines"),
        auth,
        Some(json!({"name": name, "image": "golden.pvm", "architecture": "x86_64", "start_on_create": true,
            "specs": {"cpu": "1", "memory": memory.to_string()}})),
        &[],
    )
    .await
}

#[tokio::test]
async fn orchestrator_places_forwards_and_survives_host_loss_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();

    // A first agent tells what the machine offers, so agents A and B can keep room for
    // exactly one 2 GiB VM each (SYSTEM_RESERVED_MEMORY). It joins the fleet at the end,
    // through the CLI with an enrollment token.
    let probe_fake = FakeParallels::new(&dir.path().join("probe"));
    let probe = probe_fake.agent(&dir.path().join("probe/data"), &[]);
    let token = login(&c, &probe, "root", ROOT_PASSWORD).await;
    let (st, hw) = call(&c, Method::GET, &probe.api("/config/hardware"), &Auth::Bearer(token), None, &[]).await;
    assert_eq!(st, 200, "{hw}");
    let total_mem = hw["total"]["memory_size"].as_f64().unwrap() as u64;
    assert!(total_mem > 4096, "the machine reports {total_mem} MiB");
    let reserved_mem = (total_mem - 3072).to_string();
    let reserved = [("SYSTEM_RESERVED_MEMORY", reserved_mem.as_str()), ("SYSTEM_RESERVED_CPU", "0")];

    let fake_a = FakeParallels::new(&dir.path().join("a"));
    let fake_b = FakeParallels::new(&dir.path().join("b"));
    let agent_a = fake_a.agent(&dir.path().join("a/data"), &reserved);
    let mut agent_b = fake_b.agent(&dir.path().join("b/data"), &reserved);
    let mut orch = orchestrator(&dir.path().join("orch"));
    assert!(
        orch.banner.iter().any(|l| l.contains("module orchestrator") && l.contains("running")),
        "{:?}",
        orch.banner
    );

    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    let root_o = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let (user_id, user) = make_user(&c, &orch, &root_o, "plain").await;
    let user = Auth::Bearer(user);
    // The plain user may see every VM (LIST_ALL_VMS) but change none of root's.
    grant_claim(&c, &orch, &root_o, &user_id, "LIST_ALL_VMS").await;

    // Host B is reached with an API key made on B.
    let b_token = login(&c, &agent_b, "root", ROOT_PASSWORD).await;
    let (st, key) = call(
        &c,
        Method::POST,
        &agent_b.api("/auth/api_keys"),
        &Auth::Bearer(b_token),
        Some(json!({"name": "orchestrator"})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{key}");
    let b_key = key["encoded"].as_str().unwrap().to_string();

    // Registration: credentials are stored, never answered.
    let (st, a) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root,
        Some(json!({"name": "host-a", "host": agent_a.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}})), &[]).await;
    assert_eq!(st, 201, "{a}");
    let (st, b) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/hosts"),
        &root,
        Some(json!({"name": "host-b", "url": agent_b.url, "authentication": {"api_key": b_key}})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let (a_id, b_id) = (a["id"].as_str().unwrap().to_string(), b["id"].as_str().unwrap().to_string());
    let (st, hosts) = call(&c, Method::GET, &orch.api("/orchestrator/hosts"), &root, None, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    let text = hosts.to_string();
    assert!(!text.contains(ROOT_PASSWORD) && !text.contains(&b_key), "credentials leaked: {text}");
    assert!(
        hosts.as_array().unwrap().iter().all(|h| h["has_credentials"] == true && h["state"] == "healthy"),
        "{hosts}"
    );
    // Wrong credentials are refused at registration (the host is probed).
    let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root,
        Some(json!({"name": "host-x", "url": agent_a.url, "authentication": {"username": "root", "password": "wrong-password"}})), &[]).await;
    assert!(st >= 400, "{st} {v}");
    // A plain user cannot manage hosts.
    let (st, _) =
        call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &user, Some(json!({"url": agent_a.url})), &[]).await;
    assert_eq!(st, 403);

    // Live hardware and the fleet overview.
    let (st, hw) =
        call(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{a_id}/hardware")), &root, None, &[]).await;
    assert_eq!(st, 200, "{hw}");
    assert_eq!(hw["hypervisor"], "parallels", "the host's own hardware answer: {hw}");
    assert!(hw["total_available"]["logical_cpu_count"].is_u64(), "{hw}");
    let (st, ov) = call(&c, Method::GET, &orch.api("/orchestrator/overview/resources"), &root, None, &[]).await;
    assert_eq!(st, 200, "{ov}");
    let groups = ov.as_array().unwrap();
    assert_eq!(groups.len(), 1, "one CPU type: {ov}");
    assert_eq!(groups[0]["total"]["memory_size"].as_f64().unwrap() as u64, 2 * total_mem, "{ov}");
    assert_eq!(groups[0]["hosts"].as_array().unwrap().len(), 2, "{ov}");

    // Two VMs spread over the two hosts.
    let (st, vm1) = create(&c, &orch, &root, "orch-1", 2048).await;
    assert_eq!(st, 200, "{vm1}");
    assert_eq!((vm1["owner"].as_str(), vm1["current_state"].as_str()), (Some("root"), Some("running")), "{vm1}");
    let (st, vm2) = create(&c, &orch, &root, "orch-2", 2048).await;
    assert_eq!(st, 200, "{vm2}");
    assert_ne!(vm1["host_id"], vm2["host_id"], "spread placement: {vm1} {vm2}");
    let (st, list) = call(&c, Method::GET, &orch.api("/orchestrator/machines/"), &user, None, &[]).await;
    assert_eq!(st, 200);
    let listed: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["ID"].as_str().unwrap().to_string(), v["host_id"].as_str().unwrap().to_string()))
        .collect();
    assert!(listed.contains(&(vm1["id"].as_str().unwrap().into(), vm1["host_id"].as_str().unwrap().into())), "{list}");
    assert!(listed.contains(&(vm2["id"].as_str().unwrap().into(), vm2["host_id"].as_str().unwrap().into())), "{list}");

    // Exec through the orchestrator; a plain user may not.
    let vm1_id = vm1["id"].as_str().unwrap().to_string();
    let (st, out) = call(
        &c,
        Method::PUT,
        &orch.api(&format!("/orchestrator/machines/{vm1_id}/execute")),
        &root,
        Some(json!({"command": "echo via-orchestrator; exit 4"})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["stdout"].as_str().unwrap().trim(), "via-orchestrator");
    assert_eq!(out["exit_code"], 4);
    let (st, _) = call(
        &c,
        Method::PUT,
        &orch.api(&format!("/orchestrator/machines/{vm1_id}/execute")),
        &user,
        Some(json!({"command": "id"})),
        &[],
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) =
        call(&c, Method::PUT, &orch.api(&format!("/orchestrator/machines/{vm1_id}/stop")), &user, None, &[]).await;
    assert_eq!(st, 403);

    // Full fleet: the answer says why, per group of hosts.
    let (st, v) = create(&c, &orch, &root, "orch-3", 2048).await;
    assert!(st == 503 || st == 409, "{st} {v}");
    assert!(v["message"].as_str().unwrap().contains("lack memory"), "{v}");

    // Host B dies: it turns unhealthy within the deadline, and once A has room again the
    // next VM goes to A.
    agent_b.kill9();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if host_state(&c, &orch, &root, &b_id).await == "unhealthy" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "host B still not unhealthy 20 s after kill -9");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(host_state(&c, &orch, &root, &a_id).await, "healthy");
    let on_a = if vm1["host_id"] == a_id.as_str() { vm1["id"].clone() } else { vm2["id"].clone() };
    let (st, v) = call(
        &c,
        Method::DELETE,
        &orch.api(&format!("/orchestrator/machines/{}", on_a.as_str().unwrap())),
        &root,
        None,
        &[],
    )
    .await;
    assert_eq!(st, 202, "{v}");
    let (st, vm4) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &root,
        Some(json!({"name": "orch-4", "image": "golden.pvm", "start_on_create": true, "ttl_seconds": 3600,
            "specs": {"cpu": "1", "memory": "2048"}})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{vm4}");
    assert_eq!(vm4["host_id"], a_id.as_str(), "{vm4}");
    // Its expiry can be pushed back.
    let vm4_id = vm4["id"].as_str().unwrap();
    let expires = |v: &Value| chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let before = expires(&vm4);
    let (st, ext) = call(
        &c,
        Method::PUT,
        &orch.api(&format!("/orchestrator/machines/{vm4_id}/extend")),
        &root,
        Some(json!({"ttl_seconds": 600})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{ext}");
    assert_eq!((expires(&ext) - before).num_seconds(), 600, "{ext}");
    let (st, got) =
        call(&c, Method::GET, &orch.api(&format!("/orchestrator/machines/{vm4_id}")), &user, None, &[]).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!((got["host_id"].as_str(), got["owner"].as_str()), (Some(a_id.as_str()), Some("root")), "{got}");
    let (st, status) =
        call(&c, Method::GET, &orch.api(&format!("/orchestrator/machines/{vm4_id}/status")), &user, None, &[]).await;
    assert_eq!((st, status["status"].as_str()), (200, Some("running")), "{status}");
    let (st, v) =
        call(&c, Method::PUT, &orch.api(&format!("/orchestrator/machines/{vm4_id}/stop")), &root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (_, status) =
        call(&c, Method::GET, &orch.api(&format!("/orchestrator/machines/{vm4_id}/status")), &user, None, &[]).await;
    assert_eq!(status["status"], "stopped", "{status}");

    // A restarted orchestrator keeps its hosts (and their credentials: A still answers).
    assert!(orch.stop().success());
    let orch = orchestrator(&dir.path().join("orch"));
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    let (st, hosts) = call(&c, Method::GET, &orch.api("/orchestrator/hosts"), &root, None, &[]).await;
    assert_eq!(st, 200);
    let mut ids: Vec<&str> = hosts.as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut want = vec![a_id.as_str(), b_id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while host_state(&c, &orch, &root, &a_id).await != "healthy" {
        assert!(tokio::time::Instant::now() < deadline, "host A not healthy again after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The CLI: an enrollment token, a host joining with it (once), list, disable, remove.
    let cfg = dir.path().join("cli");
    let root_token = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let cli = |args: &[&str], env: &[(&str, &str)], stdin: &str| {
        use std::io::Write;
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args)
            .env("HANGAR_CONFIG_DIR", &cfg)
            .env("HANGAR_URL", &orch.url)
            .env("HANGAR_TOKEN", &root_token)
            .env_remove("HANGAR_API_KEY")
            .env_remove("HANGAR_ENROLLMENT_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let json_of = |o: &std::process::Output| -> Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let t = json_of(&cli(&["host", "token", "probe-host", "--ttl", "10m", "--output", "json"], &[], ""));
    let token = t["token"].as_str().unwrap().to_string();
    let validate = format!("/orchestrator/enrollment-token/{token}/validate");
    let (st, v) = call(&c, Method::GET, &orch.api(&validate), &Auth::None, None, &[]).await;
    assert_eq!((st, v["valid"].as_bool(), v["host_name"].as_str()), (200, Some(true), Some("probe-host")), "{v}");
    let join = ["host", "add", &probe.url, "--username", "root", "--secret-stdin", "--disabled", "--output", "json"];
    // Joining needs no user login: the token alone.
    let joined = json_of(&cli(&join, &[("HANGAR_ENROLLMENT_TOKEN", &token), ("HANGAR_TOKEN", "")], ROOT_PASSWORD));
    assert_eq!((joined["name"].as_str(), joined["enabled"].as_bool()), (Some("probe-host"), Some(false)), "{joined}");
    let again = cli(&join, &[("HANGAR_ENROLLMENT_TOKEN", &token), ("HANGAR_TOKEN", "")], ROOT_PASSWORD);
    assert!(!again.status.success(), "a token registers one host only");
    assert!(String::from_utf8_lossy(&again.stderr).contains("401"), "{}", String::from_utf8_lossy(&again.stderr));
    let (_, v) = call(&c, Method::GET, &orch.api(&validate), &Auth::None, None, &[]).await;
    assert_eq!(v["valid"], false, "used up: {v}");
    let list = json_of(&cli(&["host", "list", "--output", "json"], &[], ""));
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let disabled = json_of(&cli(&["host", "disable", "host-a", "--output", "json"], &[], ""));
    assert_eq!(disabled["enabled"], false);
    let (st, v) = create(&c, &orch, &root, "orch-5", 2048).await;
    assert!(st == 503 || st == 409, "every host is disabled or down: {st} {v}");
    assert!(v["message"].as_str().unwrap().contains("disabled"), "{v}");
    let enabled = json_of(&cli(&["host", "enable", "host-a", "--output", "json"], &[], ""));
    assert_eq!(enabled["enabled"], true);
    assert!(cli(&["host", "remove", "probe-host"], &[], "").status.success());
    let list = json_of(&cli(&["host", "list", "--output", "json"], &[], ""));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    drop(agent_a);
    drop(probe);
}

async fn job_of(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str) -> Value {
    let (st, j) = call(c, Method::GET, &o.api(&format!("/orchestrator/jobs/{id}")), auth, None, &[]).await;
    assert_eq!(st, 200, "{j}");
    j
}

/// Waits until the job's state is `state` and its message starts with `message`.
async fn wait_job(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str, state: &str, message: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let j = job_of(c, o, auth, id).await;
        if j["state"] == state && j["message"].as_str().unwrap_or_default().starts_with(message) {
            return j;
        }
        assert!(j["state"] != "failed" || state == "failed", "job failed: {j}");
        assert!(tokio::time::Instant::now() < deadline, "job {id} not {state}/{message:?} after 30 s: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Enrollment with a token (through `hangar agent join`, `hangar host join` and the
/// reference's `POST /orchestrator/hosts` + `X-Enrollment-Token`), tokens refused when
/// used, expired or sent to another route; async creation with jobs; the capacity queue
/// (a timeout, and priority order when VMs are deleted); one host's machine routes.
#[tokio::test]
async fn orchestrator_token_join_queue_async_and_per_host_routes() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake_a = FakeParallels::new(&dir.path().join("a"));
    let fake_b = FakeParallels::new(&dir.path().join("b"));
    let agent_a = fake_a.agent(&dir.path().join("a/data"), &[]);
    let agent_b = fake_b.agent(&dir.path().join("b/data"), &[]);
    let orch = orchestrator(&dir.path().join("orch"));
    let root_t = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let root = Auth::Bearer(root_t.clone());
    let (user_id, user) = make_user(&c, &orch, &root_t, "plain").await;
    let user = Auth::Bearer(user);
    // The plain user may see every VM (LIST_ALL_VMS) but change none of root's.
    grant_claim(&c, &orch, &root_t, &user_id, "LIST_ALL_VMS").await;
    let token_for = |name: &'static str, ttl: u64| {
        let (c, orch, root) = (c.clone(), orch.api("/orchestrator/enrollment-token"), root.clone());
        async move {
            let (st, t) =
                call(&c, Method::POST, &orch, &root, Some(json!({"host_name": name, "ttl_seconds": ttl})), &[]).await;
            assert_eq!(st, 201, "{t}");
            t["token"].as_str().unwrap().to_string()
        }
    };
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args)
            .env("HANGAR_CONFIG_DIR", dir.path().join("cli"))
            .env_remove("HANGAR_URL")
            .env_remove("HANGAR_TOKEN")
            .env_remove("HANGAR_API_KEY")
            .env_remove("HANGAR_ENROLLMENT_TOKEN")
            .env_remove("HANGAR_HOST_API_KEY")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    // `hangar agent join` on host A: logged in to A, it makes an API key there and joins.
    let token_a = token_for("host-a", 600).await;
    let a_login = login(&c, &agent_a, "root", ROOT_PASSWORD).await;
    let join_a = ["agent", "join", "--orchestrator", &orch.url, "--token", &token_a, "--tags", "ci,fast"];
    let out = cli(
        &[&join_a[..], &["--output", "json"]].concat(),
        &[("HANGAR_URL", &agent_a.url), ("HANGAR_TOKEN", &a_login)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let a: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (a["name"].as_str(), a["state"].as_str(), a["has_credentials"].as_bool()),
        (Some("host-a"), Some("healthy"), Some(true)),
        "{a}"
    );
    assert_eq!(a["tags"], json!(["ci", "fast"]), "{a}");
    let a_id = a["id"].as_str().unwrap().to_string();
    let (_, keys) =
        call(&c, Method::GET, &agent_a.api("/auth/api_keys"), &Auth::Bearer(a_login.clone()), None, &[]).await;
    assert!(keys.to_string().contains("orchestrator-host-a"), "the key the orchestrator uses was made on A: {keys}");
    // The same token again: refused, and the CLI says how to get a new one.
    let out = cli(&join_a, &[("HANGAR_URL", &agent_a.url), ("HANGAR_TOKEN", &a_login)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid, expired or already used") && stderr(&out).contains("hangar host token"),
        "{}",
        stderr(&out)
    );
    // `hangar host join` without a login on the host: a clear error, and the token is not used up.
    let token_b = token_for("host-b", 600).await;
    let out = cli(&["host", "join", "--orchestrator", &orch.url, "--token", &token_b, "--url", &agent_b.url], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("hangar login") && stderr(&out).contains("--api-key"), "{}", stderr(&out));
    let validate_b = orch.api(&format!("/orchestrator/enrollment-token/{token_b}/validate"));
    let (_, v) = call(&c, Method::GET, &validate_b, &Auth::None, None, &[]).await;
    assert_eq!(v["valid"], true, "{v}");

    // A token grants nothing but joining: other routes, other methods, or with a user's
    // credential, it is not read.
    let tok = [("X-Enrollment-Token", token_b.as_str())];
    for (m, path) in [
        (Method::GET, "/orchestrator/hosts".to_string()),
        (Method::PUT, format!("/orchestrator/hosts/{a_id}/disable")),
        (Method::DELETE, format!("/orchestrator/hosts/{a_id}")),
        (Method::POST, "/orchestrator/enrollment-token".to_string()),
        (Method::POST, "/orchestrator/hosts/join/x".to_string()),
    ] {
        let (st, v) = call(&c, m.clone(), &orch.api(&path), &Auth::None, Some(json!({"host_name": "x"})), &tok).await;
        assert!(st == 401 || st == 404 || st == 405, "{m} {path} with only a token: {st} {v}");
    }
    let body_b = json!({"host": agent_b.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}});
    let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &user, Some(body_b.clone()), &tok).await;
    assert_eq!(st, 403, "a USER's credential with a token stays a USER: {v}");
    let (_, v) = call(&c, Method::GET, &validate_b, &Auth::None, None, &[]).await;
    assert_eq!(v["valid"], true, "refused requests do not use the token up: {v}");
    // The reference's path: POST /orchestrator/hosts with only the token.
    let (st, b) =
        call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &Auth::None, Some(body_b.clone()), &tok).await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["name"], "host-b", "{b}");
    let b_id = b["id"].as_str().unwrap().to_string();
    // Reused, expired and unknown tokens: 401 with the error body.
    let expiring = token_for("host-c", 1).await;
    let validate_c = orch.api(&format!("/orchestrator/enrollment-token/{expiring}/validate"));
    wait_for("the 1 s token to expire", Duration::from_secs(10), || async {
        call(&c, Method::GET, &validate_c, &Auth::None, None, &[]).await.1["valid"] == false
    })
    .await;
    for t in [token_b.as_str(), expiring.as_str(), "hgt_not-a-token"] {
        let (st, v) = call(
            &c,
            Method::POST,
            &orch.api("/orchestrator/hosts"),
            &Auth::None,
            Some(body_b.clone()),
            &[("X-Enrollment-Token", t)],
        )
        .await;
        assert_eq!((st, v["code"].as_u64()), (401, Some(401)), "{v}");
        assert!(v["message"].as_str().unwrap().contains("enrollment token"), "{v}");
    }
    let (_, hosts) = call(&c, Method::GET, &orch.api("/orchestrator/hosts"), &root, None, &[]).await;
    assert_eq!(hosts.as_array().unwrap().len(), 2, "{hosts}");

    // Each host has room for exactly one VM of `mem` MiB.
    let available = |h: &Value| h["resources"]["available"]["memory_mb"].as_u64().unwrap();
    let (_, a) = call(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{a_id}")), &root, None, &[]).await;
    let (_, b) = call(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{b_id}")), &root, None, &[]).await;
    let mem = available(&a).min(available(&b));
    assert!(mem * 2 > available(&a).max(available(&b)) && mem > 1024, "{a} {b}");
    let spec = |name: &str, extra: Value| {
        let mut v = json!({"name": name, "image": "golden.pvm", "start_on_create": true,
            "specs": {"cpu": "1", "memory": mem.to_string()}});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };

    // One host's machines: create there (no placement), then async placement fills the other.
    let (st, vm1) = call(
        &c,
        Method::POST,
        &orch.api(&format!("/orchestrator/hosts/{a_id}/machines")),
        &root,
        Some(spec("q-1", json!({}))),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{vm1}");
    assert_eq!(vm1["host_id"], a_id.as_str(), "{vm1}");
    let vm1_id = vm1["id"].as_str().unwrap().to_string();
    // The job's progress also reaches the websocket as job_manager events.
    let ws_url = orch.url.replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{ws_url}/api/v1/ws/subscribe?event_types=job_manager&access_token={root_t}"
    ))
    .await
    .unwrap();
    let (st, job) =
        call(&c, Method::POST, &orch.api("/orchestrator/machines/async"), &root, Some(spec("q-2", json!({}))), &[])
            .await;
    assert_eq!(st, 202, "{job}");
    let job2 = job["id"].as_str().unwrap().to_string();
    let j = wait_job(&c, &orch, &root, &job2, "completed", "done").await;
    assert_eq!(j["result"]["host_id"], b_id.as_str(), "{j}");
    assert_eq!(j["progress"].as_f64(), Some(100.0), "{j}");
    let vm2_id = j["result"]["id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|(m, id): &(String, String)| m == "JOB_COMPLETED" && *id == job2) {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("job events arrive").unwrap().unwrap();
        let Ok(text) = msg.to_text() else { continue };
        let Ok(e) = serde_json::from_str::<Value>(text) else { continue };
        seen.push((
            e["message"].as_str().unwrap_or("").to_string(),
            e["body"]["id"].as_str().unwrap_or("").to_string(),
        ));
    }
    assert!(seen.iter().any(|(m, id)| m == "JOB_UPDATED" && *id == job2), "{seen:?}");
    drop(ws);
    // Another caller does not see the job; its owner can forget it once finished.
    let job_url = orch.api(&format!("/orchestrator/jobs/{job2}"));
    let (st, _) = call(&c, Method::GET, &job_url, &user, None, &[]).await;
    assert_eq!(st, 404);
    let (st, _) = call(&c, Method::DELETE, &job_url, &user, None, &[]).await;
    assert_eq!(st, 404);
    let (st, _) = call(&c, Method::DELETE, &job_url, &root, None, &[]).await;
    assert_eq!(st, 202);
    let (st, _) = call(&c, Method::GET, &job_url, &root, None, &[]).await;
    assert_eq!(st, 404);

    // Full: a pinned create has no room either (capacity is still checked), and a queued
    // request with a short timeout gives up clearly.
    let (st, v) = call(
        &c,
        Method::POST,
        &orch.api(&format!("/orchestrator/hosts/{a_id}/machines")),
        &root,
        Some(spec("q-x", json!({}))),
        &[],
    )
    .await;
    assert_eq!(st, 503, "{v}");
    let (st, v) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &root,
        Some(spec("q-x", json!({"queue": {"priority": 0, "timeout_seconds": 1}}))),
        &[],
    )
    .await;
    assert_eq!(st, 503, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("No capacity within 1s") && msg.contains("2 lack"), "{v}");

    // Two requests wait in the queue, the low-priority one first; each deletion serves the
    // highest priority that fits.
    let queued = |name: &'static str, priority: i32| {
        let (c, url, root, body) = (
            c.clone(),
            orch.api("/orchestrator/machines/async"),
            root.clone(),
            spec(name, json!({"queue": {"priority": priority, "timeout_seconds": 120}})),
        );
        async move {
            let (st, job) = call(&c, Method::POST, &url, &root, Some(body), &[]).await;
            assert_eq!(st, 202, "{job}");
            job["id"].as_str().unwrap().to_string()
        }
    };
    let low = queued("q-low", 1).await;
    wait_job(&c, &orch, &root, &low, "running", "queued").await;
    let high = queued("q-high", 5).await;
    let j = wait_job(&c, &orch, &root, &high, "running", "queued").await;
    assert!(j["message"].as_str().unwrap().contains("2 lack"), "the job says why it waits: {j}");
    let (st, v) =
        call(&c, Method::DELETE, &orch.api(&format!("/orchestrator/hosts/{a_id}/machines/{vm1_id}")), &root, None, &[])
            .await;
    assert_eq!(st, 202, "{v}");
    let j = wait_job(&c, &orch, &root, &high, "completed", "done").await;
    assert_eq!(j["result"]["host_id"], a_id.as_str(), "{j}");
    let vm_high = j["result"]["id"].as_str().unwrap().to_string();
    let j = job_of(&c, &orch, &root, &low).await;
    assert!(j["state"] == "running" && j["message"].as_str().unwrap().starts_with("queued"), "low still waits: {j}");
    let (st, v) =
        call(&c, Method::DELETE, &orch.api(&format!("/orchestrator/machines/{vm2_id}")), &root, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    let j = wait_job(&c, &orch, &root, &low, "completed", "done").await;
    assert_eq!(j["result"]["host_id"], b_id.as_str(), "{j}");
    let vm_low = j["result"]["id"].as_str().unwrap().to_string();

    // Snapshots through /orchestrator/machines/{id}/...: a USER may not touch another
    // user's VM's snapshots.
    let vm_url = |id: &str, rest: &str| orch.api(&format!("/orchestrator/machines/{id}{rest}"));
    let snap = json!({"snapshot_name": "s1", "snapshot_description": ""});
    let (st, v) = call(&c, Method::POST, &vm_url(&vm_high, "/snapshots"), &user, Some(snap.clone()), &[]).await;
    assert_eq!(st, 403, "not the USER's VM: {v}");
    let (st, v) = call(&c, Method::POST, &vm_url(&vm_low, "/snapshots"), &user, Some(snap.clone()), &[]).await;
    assert_eq!(st, 403, "not the USER's VM: {v}");
    let (st, v) = call(&c, Method::POST, &vm_url(&vm_low, "/snapshots"), &root, Some(snap.clone()), &[]).await;
    assert_eq!(st, 201, "{v}");
    let (st, list) = call(&c, Method::GET, &vm_url(&vm_low, "/snapshots"), &root, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    assert!(list.to_string().contains("s1"), "{list}");
    let (st, v) = call(&c, Method::DELETE, &vm_url(&vm_low, "/snapshots"), &user, None, &[]).await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(&c, Method::DELETE, &vm_url(&vm_low, "/snapshots"), &root, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    let (_, list) = call(&c, Method::GET, &vm_url(&vm_low, "/snapshots"), &root, None, &[]).await;
    assert!(!list.to_string().contains("s1"), "{list}");

    // One host's machine routes, with the same claims as the cross-host ones.
    let on_a = |rest: &str| orch.api(&format!("/orchestrator/hosts/{a_id}/machines{rest}"));
    let (st, list) = call(&c, Method::GET, &on_a(""), &user, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["ID"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![vm_high.as_str()], "{list}");
    let (st, v) = call(&c, Method::GET, &on_a(&format!("/{vm_high}")), &user, None, &[]).await;
    assert_eq!((st, v["host_id"].as_str()), (200, Some(a_id.as_str())), "{v}");
    let (st, v) =
        call(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{b_id}/machines/{vm_high}")), &root, None, &[])
            .await;
    assert_eq!(st, 404, "a VM of A is not found through B: {v}");
    let (st, out) = call(
        &c,
        Method::PUT,
        &on_a(&format!("/{vm_high}/execute")),
        &root,
        Some(json!({"command": "echo per-host"})),
        &[],
    )
    .await;
    assert_eq!((st, out["stdout"].as_str().map(str::trim)), (200, Some("per-host")), "{out}");
    for (m, rest) in [(Method::PUT, "/execute"), (Method::PUT, "/stop"), (Method::DELETE, "")] {
        let (st, v) =
            call(&c, m.clone(), &on_a(&format!("/{vm_high}{rest}")), &user, Some(json!({"command": "id"})), &[]).await;
        assert_eq!(st, 403, "a USER may not {m} {rest} through the orchestrator: {v}");
    }
    let (st, v) = call(&c, Method::PUT, &on_a(&format!("/{vm_high}/stop")), &root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(&c, Method::GET, &on_a(&format!("/{vm_high}/status")), &user, None, &[]).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("stopped")), "{v}");
    // A stopped VM can be renamed (not by a USER).
    let rename = json!({"new_name": "q-high-renamed"});
    let (st, _) = call(&c, Method::PUT, &vm_url(&vm_high, "/rename"), &user, Some(rename.clone()), &[]).await;
    assert_eq!(st, 403);
    let (st, v) = call(&c, Method::PUT, &vm_url(&vm_high, "/rename"), &root, Some(rename), &[]).await;
    assert_eq!((st, v["Name"].as_str()), (200, Some("q-high-renamed")), "{v}");
    let (st, v) = call(&c, Method::PUT, &on_a(&format!("/{vm_high}/start")), &root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = call(&c, Method::GET, &on_a(&format!("/{vm_high}/status")), &root, None, &[]).await;
    assert_eq!(v["status"], "running", "{v}");
    let (st, _) = call(&c, Method::DELETE, &on_a(&format!("/{vm_high}")), &root, None, &[]).await;
    assert_eq!(st, 202);
    let (_, list) = call(&c, Method::GET, &on_a(""), &root, None, &[]).await;
    assert_eq!(list, json!([]), "{list}");
    drop((agent_a, agent_b));
}

/// Orchestrator jobs are in the store: a job acknowledged with 202 and waiting in the queue
/// (no host registered) when the orchestrator is killed with -9 answers `failed` with the
/// restart message after a restart, never 404; a job that had failed keeps its own error;
/// both read the same after a further graceful restart.
#[tokio::test]
async fn orchestrator_jobs_survive_kill9_and_graceful_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("orch");
    let c = client();
    let mut orch = orchestrator(&data);
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    let spec = |name: &str, timeout: u64| {
        json!({"name": name, "image": "golden.pvm", "specs": {"cpu": "1", "memory": "1024"},
            "queue": {"priority": 0, "timeout_seconds": timeout}})
    };
    let url = orch.api("/orchestrator/machines/async");
    let (st, job) = call(&c, Method::POST, &url, &root, Some(spec("gives-up", 1)), &[]).await;
    assert_eq!(st, 202, "{job}");
    let gave_up = job["id"].as_str().unwrap().to_string();
    let gave_up_job = wait_job(&c, &orch, &root, &gave_up, "failed", "No capacity").await;
    let (st, job) = call(&c, Method::POST, &url, &root, Some(spec("waits", 600)), &[]).await;
    assert_eq!(st, 202, "{job}");
    let waits = job["id"].as_str().unwrap().to_string();
    wait_job(&c, &orch, &root, &waits, "running", "queued").await;
    orch.kill9();

    let mut orch = orchestrator(&data);
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    let cut = job_of(&c, &orch, &root, &waits).await;
    assert_eq!(cut["state"], "failed", "{cut}");
    assert!(cut["error"].as_str().unwrap().contains("server restarted before the job finished"), "{cut}");
    assert_eq!(job_of(&c, &orch, &root, &gave_up).await, gave_up_job, "a failed job keeps its own error");
    let (st, list) = call(&c, Method::GET, &orch.api("/orchestrator/jobs"), &root, None, &[]).await;
    assert_eq!((st, list.as_array().map(Vec::len)), (200, Some(2)), "{list}");
    assert!(orch.stop().success());

    let orch = orchestrator(&data);
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    assert_eq!(job_of(&c, &orch, &root, &waits).await, cut, "the restart marking is stored once");
    assert_eq!(job_of(&c, &orch, &root, &gave_up).await, gave_up_job);
}
