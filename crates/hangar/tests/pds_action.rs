//! The Parallels DevOps GitHub Action's requests, replayed call by call against the real
//! binary (fake `prlctl` hosts), as its client builds them: the base URL is
//! `<schema>://<host>/api`; host mode appends `/v1/` and then a path that starts with `/`
//! (hence `/api/v1//...`), orchestrator mode `/v1/orchestrator` and the path; it sends JSON
//! through axios (`Accept: application/json, text/plain, */*`, an `axios/1.x` user agent), a
//! bearer token from `POST /api/v1/auth/token {email, password}` (it compares `expires_at`
//! with unix seconds) and reads only the fields checked here. Written from reading the
//! action's source; none of its code is here.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const ACCEPT: &str = "application/json, text/plain, */*";
const USER_AGENT: &str = "axios/1.12.2";

/// One request as the action's HTTP client sends it; its PUTs with a `null` body (start,
/// stop) go out with no body at all (`body: None`).
async fn action_call(
    c: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = c.request(method, url).header("Accept", ACCEPT).header("User-Agent", USER_AGENT);
    if let Some(t) = token {
        r = r.header("Authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        r = r.header("Content-Type", "application/json").body(b.to_string());
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// What every operation but `test` does first: the probe, then (for the calls that need one)
/// the login with the `username` input sent as `email`. Answers the token.
async fn action_start(c: &reqwest::Client, base: &str, username: &str, password: &str) -> String {
    let (st, v) = action_call(c, Method::GET, &format!("{base}/health/probe"), None, None).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("OK")), "probe: {v}");
    let (st, v) = action_call(
        c,
        Method::POST,
        &format!("{base}/v1/auth/token"),
        None,
        Some(json!({"email": username, "password": password})),
    )
    .await;
    assert_eq!(st, 200, "login: {v}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(v["expires_at"].as_u64().is_some_and(|e| e > now), "expires_at in unix seconds: {v}");
    v["token"].as_str().unwrap().to_string()
}

/// The fields the action reads of `/health/system` (it fails on anything but a 2xx).
fn check_health(v: &Value) {
    assert!(v["healthy"].is_boolean(), "{v}");
    assert!(v["message"].is_string(), "{v}");
    let services = v["services"].as_array().expect("services");
    assert!(services.iter().all(|s| s["name"].is_string() && s["healthy"].is_boolean()), "{v}");
}

#[tokio::test]
async fn health_check_and_host_mode_first_call() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(&dir.path().join("host"));
    let host = fake.agent(&dir.path().join("host/data"), &[]);
    let c = client();
    let base = format!("{}/api", host.url);

    // health-check: `GET /api/v1//health/system?full=true`, no credential.
    let (st, v) = action_call(&c, Method::GET, &format!("{base}/health/probe"), None, None).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("OK")), "{v}");
    let (st, anon) = action_call(&c, Method::GET, &format!("{base}/v1//health/system?full=true"), None, None).await;
    assert_eq!(st, 200, "{anon}");
    check_health(&anon);
    assert_eq!(anon["healthy"], true, "{anon}");
    // Nothing sensitive for an anonymous caller: no module messages, no store engine.
    let services = anon["services"].as_array().unwrap();
    assert!(services.iter().all(|s| s["message"].as_str().unwrap_or_default().is_empty()), "{anon}");
    assert!(services.iter().any(|s| s["name"] == "store"), "{anon}");
    assert!(!anon.to_string().contains(dir.path().to_str().unwrap()), "no paths: {anon}");

    // A logged-in caller still sees the detail.
    let root = login(&c, &host, "root", ROOT_PASSWORD).await;
    let (st, full) = action_call(&c, Method::GET, &format!("{base}/v1//health/system"), Some(&root), None).await;
    assert_eq!(st, 200, "{full}");
    check_health(&full);
    assert!(full["services"].as_array().unwrap().iter().any(|s| s["name"].as_str().unwrap().starts_with("store (")));
    // A bad credential on the open route is refused, not silently ignored.
    let (st, v) = action_call(&c, Method::GET, &format!("{base}/v1//health/system"), Some("not-a-token"), None).await;
    assert_eq!(st, 401, "{v}");

    // Host mode, every operation but `test`: probe, login, then the licence; it reads `uuid`
    // (compared with "") and `serial` (truthy), and fails on anything but a 2xx.
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    let (st, lic) =
        action_call(&c, Method::GET, &format!("{base}/v1//config/parallels-desktop/license"), Some(&token), None).await;
    assert_eq!(st, 200, "{lic}");
    assert!(lic["uuid"].is_string() && lic["serial"].is_string(), "{lic}");
    assert_eq!(lic["status"], "ACTIVE", "the fake prlsrvctl reports a valid licence: {lic}");
    // The licence needs a login here (the reference's is open).
    let (st, v) =
        action_call(&c, Method::GET, &format!("{base}/v1//config/parallels-desktop/license"), None, None).await;
    assert_eq!(st, 401, "{v}");
}

/// Orchestrator mode: `stop`, `start`, `run` and `delete` by `machine_name`, after the VM was made
/// through the orchestrator; then `DELETE /jobs/cleanup`.
#[tokio::test]
async fn orchestrator_mode_start_stop_delete_by_machine_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let OneHostFleet { fake: _, agent, orch, root } = one_host_fleet(&c, dir.path(), "api,orchestrator").await;
    let root = Auth::Bearer(root);
    let (st, made) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines"),
        &root,
        Some(json!({"name": "ci-base", "image": "golden.pvm", "architecture": "x86_64", "start_on_create": true,
            "specs": {"cpu": "1", "memory": "1024"}})),
        &[],
    )
    .await;
    assert!(st == 200 || st == 201, "{st} {made}");
    let vm_id = made["id"].as_str().unwrap().to_string();

    let base = format!("{}/api", orch.url);
    let o = format!("{base}/v1/orchestrator");
    // health-check in orchestrator mode still uses the host-style URL.
    let (st, v) = action_call(&c, Method::GET, &format!("{base}/v1//health/system?full=true"), None, None).await;
    assert_eq!(st, 200, "{v}");
    check_health(&v);

    let status = |token: String| {
        let (c, url) = (c.clone(), format!("{o}/machines/ci-base/status"));
        async move {
            let (st, v) = action_call(&c, Method::GET, &url, Some(&token), None).await;
            assert_eq!(st, 200, "status by name: {v}");
            v["status"].as_str().unwrap().to_string()
        }
    };

    // stop: status, then `PUT .../machines/ci-base/stop` with no body when it is running.
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    assert_eq!(status(token.clone()).await, "running");
    let (st, v) = action_call(&c, Method::PUT, &format!("{o}/machines/ci-base/stop"), Some(&token), None).await;
    assert!((200..300).contains(&st), "stop by name: {st} {v}");
    assert_eq!(v["id"], vm_id.as_str(), "the forwarded call used the VM's id: {v}");
    assert_eq!(status(token.clone()).await, "stopped");

    // start: status, then `PUT .../machines/ci-base/start` when it is stopped.
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    assert_eq!(status(token.clone()).await, "stopped");
    let (st, v) = action_call(&c, Method::PUT, &format!("{o}/machines/ci-base/start"), Some(&token), None).await;
    assert!((200..300).contains(&st), "start by name: {st} {v}");
    assert_eq!(status(token.clone()).await, "running");

    // run: `GET .../machines/ci-base` (reads `State`, and `OS` to pick the check command),
    // `PUT .../execute {command: 'echo "ready"'}` until `exit_code` is 0, `GET .../status`
    // (reads `ip_configured`; it carries on when there is none), then one execute per line of
    // the script, reading `exit_code`, `stdout` and `stderr` (any stderr fails the step).
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    let (st, m) = action_call(&c, Method::GET, &format!("{o}/machines/ci-base"), Some(&token), None).await;
    assert_eq!(st, 200, "get by name: {m}");
    assert_eq!(m["State"], "running", "{m}");
    assert!(m["OS"].as_str().is_some_and(|os| !os.starts_with("win")), "{m}");
    let execute = format!("{o}/machines/ci-base/execute");
    let (st, v) =
        action_call(&c, Method::PUT, &execute, Some(&token), Some(json!({"command": "echo \"ready\""}))).await;
    assert_eq!((st, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
    let (st, v) = action_call(&c, Method::GET, &format!("{o}/machines/ci-base/status"), Some(&token), None).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["ip_configured"].is_string(), "{v}");
    let (st, v) = action_call(&c, Method::PUT, &execute, Some(&token), Some(json!({"command": "echo hello"}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["stdout"].as_str().map(str::trim), Some("hello"), "{v}");
    assert_eq!(v["stderr"].as_str(), Some(""), "{v}");

    // delete: status, stop when not stopped, then `DELETE .../machines/ci-base`.
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    assert_ne!(status(token.clone()).await, "stopped");
    let (st, v) = action_call(&c, Method::PUT, &format!("{o}/machines/ci-base/stop"), Some(&token), None).await;
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, v) = action_call(&c, Method::DELETE, &format!("{o}/machines/ci-base"), Some(&token), None).await;
    assert!((200..300).contains(&st), "delete by name: {st} {v}");
    let (st, v) = action_call(&c, Method::GET, &format!("{o}/machines/ci-base/status"), Some(&token), None).await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = action_call(&c, Method::GET, &format!("{o}/machines/{vm_id}"), Some(&token), None).await;
    assert_eq!(st, 404, "gone by id too: {v}");

    // DELETE /jobs/cleanup (and the orchestrator's): 200, finished jobs gone, running ones kept.
    let (st, job) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/machines/async"),
        &root,
        Some(json!({"name": "ci-job", "image": "golden.pvm", "architecture": "x86_64",
            "specs": {"cpu": "1", "memory": "1024"}})),
        &[],
    )
    .await;
    assert_eq!(st, 202, "{job}");
    let job_id = job["id"].as_str().unwrap().to_string();
    wait_for("the async create finishes", std::time::Duration::from_secs(60), || {
        let (c, url, root) = (c.clone(), orch.api(&format!("/orchestrator/jobs/{job_id}")), root.clone());
        async move {
            let (_, j) = call(&c, Method::GET, &url, &root, None, &[]).await;
            j["state"] == "completed" || j["state"] == "failed"
        }
    })
    .await;
    let (st, v) = call(&c, Method::DELETE, &orch.api("/orchestrator/jobs/cleanup"), &root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(&c, Method::GET, &orch.api(&format!("/orchestrator/jobs/{job_id}")), &root, None, &[]).await;
    assert_eq!(st, 404, "the finished job is gone: {v}");
    let host_root = Auth::Bearer(login(&c, &agent, "root", ROOT_PASSWORD).await);
    let (st, v) = call(&c, Method::DELETE, &agent.api("/jobs/cleanup"), &host_root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
}

/// Host mode on a QEMU host: the licence call (the first call of every host-mode operation)
/// answers 200 with a body the action reads without failing, saying no licence applies.
#[tokio::test]
async fn host_mode_first_call_on_a_qemu_host() {
    let dir = tempfile::tempdir().unwrap();
    let vms = dir.path().join("vms");
    let s = Server::start(
        &dir.path().join("d"),
        &[
            ("ENABLED_MODULES", "api,host"),
            ("HYPERVISOR", "qemu"),
            ("QEMU_ACCELERATION", "tcg"),
            ("HOST_VMS_FOLDER", vms.to_str().unwrap()),
        ],
    );
    let c = client();
    let base = format!("{}/api", s.url);
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    let (st, lic) =
        action_call(&c, Method::GET, &format!("{base}/v1//config/parallels-desktop/license"), Some(&token), None).await;
    assert_eq!(st, 200, "{lic}");
    assert_eq!(lic["uuid"], "", "{lic}");
    assert!(lic["serial"].is_string(), "{lic}");
    assert_eq!(lic["status"], "NOT_APPLICABLE", "{lic}");
    assert!(lic["edition"].as_str().unwrap().contains("qemu"), "{lic}");
}

/// A `machine_name` that names VMs on two hosts the caller may use is a 409 naming both
/// hosts; the per-host route still finds each by name.
#[tokio::test]
async fn a_name_on_two_hosts_is_a_conflict_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let orch = Server::start(&dir.path().join("orch"), &[("ENABLED_MODULES", "api,orchestrator")]);
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    let mut agents = Vec::new();
    let mut host_ids = Vec::new();
    for name in ["mac-a", "mac-b"] {
        let fake = FakeParallels::new(&dir.path().join(name));
        fake.prlctl(&["create", "dup", "--distribution", "ubuntu"]);
        let agent = fake.agent(&dir.path().join(name).join("data"), &[]);
        let (st, h) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root,
            Some(json!({"name": name, "host": agent.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}})), &[]).await;
        assert_eq!(st, 201, "{h}");
        host_ids.push(h["id"].as_str().unwrap().to_string());
        agents.push((fake, agent));
    }
    wait_for("both hosts' VMs are known", std::time::Duration::from_secs(30), || {
        let (c, url, root) = (c.clone(), orch.api("/orchestrator/machines"), root.clone());
        async move {
            let (_, v) = call(&c, Method::GET, &url, &root, None, &[]).await;
            v.as_array().is_some_and(|a| a.iter().filter(|m| m["Name"] == "dup").count() == 2)
        }
    })
    .await;
    let token = action_start(&c, &format!("{}/api", orch.url), "root", ROOT_PASSWORD).await;
    let url = format!("{}/api/v1/orchestrator/machines/dup/status", orch.url);
    let (st, v) = action_call(&c, Method::GET, &url, Some(&token), None).await;
    assert_eq!(st, 409, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("mac-a") && msg.contains("mac-b"), "{v}");
    assert_eq!(v["code"], 409, "the action reads code and message: {v}");
    for id in &host_ids {
        let url = format!("{}/api/v1/orchestrator/hosts/{id}/machines/dup/status", orch.url);
        let (st, v) = action_call(&c, Method::GET, &url, Some(&token), None).await;
        assert_eq!(st, 200, "{v}");
        assert!(v["status"].is_string(), "{v}");
    }
}

/// Host mode, on a Parallels host that also serves its catalog: `pull` (create from the
/// catalog with the action's connection string), `clone` of the pulled VM, `stop` and `start`
/// (host mode sends `GET .../stop|start`), `run` and `delete`, each through
/// `/api/v1//machines...` as the action builds its URLs.
#[tokio::test]
async fn host_mode_pull_clone_stop_start_run_delete() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let bundle = fake.images.join("golden.pvm");
    let s = fake.server(&dir.path().join("data"), &[("ENABLED_MODULES", "api,host,catalog")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    push_bundle(&s, &root, dir.path(), &bundle, "ci-image");

    let base = format!("{}/api", s.url);
    let h = format!("{base}/v1/");
    let authority = s.url.trim_start_matches("http://");

    // pull: `base_image: http://root:<password>@<host>/amd64/ci-image/1.0.0`, parsed by the
    // action into the connection `host=http://root:<password>@<host>:<port>`.
    let token = action_start(&c, &base, "root", ROOT_PASSWORD).await;
    let name = "ci-image_6f1c2f6e-2d7b-4a53-9f57-1f0e4b7c9a10";
    let body = json!({"name": name, "architecture": "amd64", "start_on_create": true,
        "catalog_manifest": {"catalog_id": "ci-image", "version": "1.0.0",
            "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}"),
            "specs": {"cpu": "1", "memory": "1024"}}});
    let (st, made) = action_call(&c, Method::POST, &format!("{h}/machines"), Some(&token), Some(body)).await;
    assert!((200..300).contains(&st), "pull: {st} {made}");
    let vm_id = made["id"].as_str().expect("id").to_string();
    assert!(made["host"].is_string() || made["host"].is_null(), "{made}");
    assert_eq!(made["current_state"], "running", "{made}");

    let status = |who: String| {
        let (c, url, token) = (c.clone(), format!("{h}/machines/{who}/status"), token.clone());
        async move {
            let (st, v) = action_call(&c, Method::GET, &url, Some(&token), None).await;
            assert_eq!(st, 200, "status: {v}");
            v["status"].as_str().unwrap().to_string()
        }
    };

    // stop, then start: host mode sends GET, reads the status answer. The base is cloned
    // while stopped, as a CI base VM is (Parallels refuses to clone a running VM).
    assert_eq!(status(name.to_string()).await, "running");
    let (st, v) = action_call(&c, Method::GET, &format!("{h}/machines/{name}/stop"), Some(&token), None).await;
    assert_eq!(st, 200, "GET stop: {v}");
    assert_eq!(status(name.to_string()).await, "stopped");
    // clone: `PUT /api/v1//machines/<base_vm>/clone {clone_name}`, reads `id` and `status`.
    let clone_name = format!("{name}_clone");
    let (st, cloned) = action_call(
        &c,
        Method::PUT,
        &format!("{h}/machines/{name}/clone"),
        Some(&token),
        Some(json!({"clone_name": clone_name})),
    )
    .await;
    assert!((200..300).contains(&st), "clone: {st} {cloned}");
    let clone_id = cloned["id"].as_str().expect("clone id").to_string();
    assert_ne!(clone_id, vm_id);
    assert!(cloned["status"].is_string(), "{cloned}");

    let (st, v) = action_call(&c, Method::GET, &format!("{h}/machines/{vm_id}/start"), Some(&token), None).await;
    assert_eq!(st, 200, "GET start: {v}");
    assert_eq!(status(vm_id.clone()).await, "running");

    // run on the clone: start it, wait for `echo "ready"`, then the script's lines.
    let (st, v) = action_call(&c, Method::GET, &format!("{h}/machines/{clone_name}/start"), Some(&token), None).await;
    assert_eq!(st, 200, "{v}");
    let (st, m) = action_call(&c, Method::GET, &format!("{h}/machines/{clone_name}"), Some(&token), None).await;
    assert_eq!((st, m["State"].as_str()), (200, Some("running")), "{m}");
    assert!(m["OS"].is_string(), "{m}");
    let execute = format!("{h}/machines/{clone_name}/execute");
    let (st, v) =
        action_call(&c, Method::PUT, &execute, Some(&token), Some(json!({"command": "echo \"ready\""}))).await;
    assert_eq!((st, v["exit_code"].as_i64()), (200, Some(0)), "{v}");
    let (st, v) = action_call(&c, Method::PUT, &execute, Some(&token), Some(json!({"command": "echo built"}))).await;
    assert_eq!((st, v["exit_code"].as_i64(), v["stderr"].as_str()), (200, Some(0), Some("")), "{v}");
    assert_eq!(v["stdout"].as_str().map(str::trim), Some("built"), "{v}");

    // A state change by GET still needs the right to change that VM: a plain user's GET stop
    // of root's VM is refused and the VM keeps running.
    let (_, plain) = make_user(&c, &s, &root, "plain").await;
    let (st, v) = action_call(&c, Method::GET, &format!("{h}/machines/{vm_id}/stop"), Some(&plain), None).await;
    assert!(st == 403 || st == 404, "{st} {v}");
    assert_eq!(status(vm_id.clone()).await, "running");

    // delete both: status, GET stop when not stopped, DELETE by name.
    for who in [clone_name.as_str(), name] {
        if status(who.to_string()).await != "stopped" {
            let (st, v) = action_call(&c, Method::GET, &format!("{h}/machines/{who}/stop"), Some(&token), None).await;
            assert_eq!(st, 200, "{v}");
        }
        let (st, v) = action_call(&c, Method::DELETE, &format!("{h}/machines/{who}"), Some(&token), None).await;
        assert!((200..300).contains(&st), "delete {who}: {st} {v}");
        let (st, v) = action_call(&c, Method::GET, &format!("{h}/machines/{who}/status"), Some(&token), None).await;
        assert_eq!(st, 404, "{v}");
    }
}
