//! The host module's API over both drivers: the Parallels driver against the fake
//! `prlctl` (fast, every run), and the QEMU driver booting the real test guest.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

async fn wait_job(c: &reqwest::Client, s: &Server, auth: &Auth, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (st, j) = call(c, Method::GET, &s.api(&format!("/jobs/{id}")), auth, None, &[]).await;
        assert_eq!(st, 200, "{j}");
        if j["state"] == "completed" || j["state"] == "failed" {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} did not finish: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn machines_api_over_the_parallels_driver() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    assert!(s.banner.iter().any(|l| l.contains("module host") && l.contains("running")), "{:?}", s.banner);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let (viewer_id, user) = make_user(&c, &s, &root, "viewer").await;
    let ua = Auth::Bearer(user);
    // A plain user sees its own VMs only; the viewer may see every VM (not change them).
    let (st, list) = call(&c, Method::GET, &s.api("/machines"), &ua, None, &[]).await;
    assert_eq!((st, list.as_array().map(Vec::len)), (200, Some(0)), "{list}");
    let url = s.api(&format!("/auth/users/{viewer_id}/claims"));
    let (st, v) = call(&c, Method::POST, &url, &ra, Some(json!({"name": "LIST_ALL_VMS"})), &[]).await;
    assert_eq!(st, 201, "{v}");

    // Events: VM state changes reach the websocket.
    let ws_url = s.url.replace("http://", "ws://");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{ws_url}/api/v1/ws/subscribe?event_types=pdfm&access_token={root}"))
            .await
            .unwrap();

    let (st, v) = call(&c, Method::POST, &s.api("/machines"), &ra, Some(json!({"name": "ci-1", "image": "golden.pvm", "start_on_create": true, "specs": {"cpu": "2", "memory": "2048"}})), &[]).await;
    assert_eq!(st, 200, "create: {v}");
    assert_eq!(v["name"], "ci-1");
    assert_eq!(v["current_state"], "running");
    assert_eq!(v["owner"], "root");
    let id = v["id"].as_str().unwrap().to_string();

    let (st, list) = call(&c, Method::GET, &s.api("/machines"), &ua, None, &[]).await;
    assert_eq!(st, 200);
    let vm = list.as_array().unwrap().iter().find(|m| m["ID"] == id.as_str()).expect("listed").clone();
    assert_eq!(vm["Hardware"]["memory"]["size"], "2048Mb");
    assert_eq!(vm["Hardware"]["cpu"]["cpus"], 2);
    assert_eq!(vm["State"], "running");
    assert_eq!(vm["hypervisor"], "parallels");
    let (_, filtered) = call(&c, Method::GET, &s.api("/machines"), &ua, None, &[("X-Filter", "name=^CI-,i")]).await;
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let (_, none) = call(&c, Method::GET, &s.api("/machines"), &ua, None, &[("X-Filter", "name=^nothing$")]).await;
    assert_eq!(none.as_array().unwrap().len(), 0);
    let (st, _) = call(&c, Method::GET, &s.api("/machines"), &ua, None, &[("X-Filter", "name=(")]).await;
    assert_eq!(st, 400);

    // A plain user may look but not touch.
    let (st, _) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/stop")), &ua, None, &[]).await;
    assert_eq!(st, 403);
    let (st, _) =
        call(&c, Method::PUT, &s.api(&format!("/machines/{id}/execute")), &ua, Some(json!({"command": "id"})), &[])
            .await;
    assert_eq!(st, 403);

    // Exec: output, exit code and environment come back.
    let (st, out) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/execute")), &ra, Some(json!({"command": "echo hello $GREETING; echo oops >&2; exit 3", "environment_variables": {"GREETING": "world"}})), &[]).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["stdout"].as_str().unwrap().trim(), "hello world");
    assert_eq!(out["stderr"].as_str().unwrap().trim(), "oops");

    // State machine: pause, pause again is a 409 naming the state, resume, stop.
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/pause")), &ra, None, &[]).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("paused")), "{v}");
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/pause")), &ra, None, &[]).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("paused"), "{v}");
    let (st, _) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/resume")), &ra, None, &[]).await;
    assert_eq!(st, 200);
    // The reference's batch form.
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/set")), &ra, Some(json!({"operations": [{"group": "state", "operation": "stop", "value": ""}, {"group": "cpu", "operation": "set", "value": "4"}, {"group": "bogus", "operation": "x"}]})), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["operations"][0]["status"], "success", "{v}");
    assert_eq!(v["operations"][1]["status"], "success", "{v}");
    assert_eq!(v["operations"][2]["status"], "error");
    let (_, vm) = call(&c, Method::GET, &s.api(&format!("/machines/{id}")), &ra, None, &[]).await;
    assert_eq!((vm["State"].as_str(), vm["Hardware"]["cpu"]["cpus"].as_u64()), (Some("stopped"), Some(4)));
    let (st, v) = call(&c, Method::GET, &s.api(&format!("/machines/{id}/status")), &ra, None, &[]).await;
    assert_eq!((st, v["status"].as_str(), v["ip_configured"].as_str()), (200, Some("stopped"), Some("-")));

    // The event stream saw the changes.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|(m, b): &(String, Value)| m == "VM_STATE_CHANGED" && b["current_state"] == "stopped") {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("pdfm events arrive").unwrap().unwrap();
        let e: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        seen.push((e["message"].as_str().unwrap_or("").to_string(), e["body"].clone()));
    }

    // Snapshots, clone, rename.
    let (st, snap) = call(
        &c,
        Method::POST,
        &s.api(&format!("/machines/{id}/snapshots")),
        &ra,
        Some(json!({"snapshot_name": "before"})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    let (_, snaps) = call(&c, Method::GET, &s.api(&format!("/machines/{id}/snapshots")), &ra, None, &[]).await;
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    let (st, cl) = call(
        &c,
        Method::PUT,
        &s.api(&format!("/machines/{id}/clone")),
        &ra,
        Some(json!({"clone_name": "ci-1-copy"})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{cl}");
    let (st, _) = call(
        &c,
        Method::PUT,
        &s.api(&format!("/machines/{}/rename", cl["id"].as_str().unwrap())),
        &ra,
        Some(json!({"new_name": "ci-2"})),
        &[],
    )
    .await;
    assert_eq!(st, 200);
    let (st, v) =
        call(&c, Method::PUT, &s.api(&format!("/machines/{id}/rename")), &ra, Some(json!({"new_name": "ci-2"})), &[])
            .await;
    assert_eq!(st, 409, "name taken: {v}");

    // Async create reports progress and its result through a job.
    let (st, job) = call(
        &c,
        Method::POST,
        &s.api("/machines/async"),
        &ra,
        Some(json!({"name": "ci-async", "image": "golden.pvm"})),
        &[],
    )
    .await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &s, &ra, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(j["progress"].as_f64(), Some(100.0));
    assert_eq!(j["result"]["name"], "ci-async");
    // Another user's job is invisible.
    let (st, _) =
        call(&c, Method::GET, &s.api(&format!("/jobs/{}", job["id"].as_str().unwrap())), &ua, None, &[]).await;
    assert_eq!(st, 404);

    // Hardware, bad requests, delete.
    let (st, hw) = call(&c, Method::GET, &s.api("/config/hardware"), &ra, None, &[]).await;
    assert_eq!(st, 200, "{hw}");
    assert!(hw["total"]["logical_cpu_count"].as_u64().unwrap() > 0);
    assert_eq!(hw["hypervisor"], "parallels");
    let (st, _) =
        call(&c, Method::POST, &s.api("/machines"), &ra, Some(json!({"name": "x", "image": "../etc"})), &[]).await;
    assert_eq!(st, 400);
    let (st, _) =
        call(&c, Method::POST, &s.api("/machines"), &ra, Some(json!({"name": "x", "image": "missing"})), &[]).await;
    assert_eq!(st, 404);
    let (st, _) =
        call(&c, Method::POST, &s.api("/machines"), &ra, Some(json!({"name": "bad/name", "image": "golden.pvm"})), &[])
            .await;
    assert_eq!(st, 400);
    let (st, _) = call(&c, Method::DELETE, &s.api(&format!("/machines/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 202);
    let (st, v) = call(&c, Method::GET, &s.api(&format!("/machines/{id}")), &ra, None, &[]).await;
    assert_eq!((st, v["code"].as_u64()), (404, Some(404)));
}

/// An async create acknowledged with 202, then kill -9 while its job runs (the fake
/// `prlctl register` hangs): after a restart on the same data folder the job answers 200,
/// `failed` with the restart message, to its owner only, and the next create works.
#[tokio::test]
async fn an_acknowledged_job_survives_kill9_as_failed_by_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let data = dir.path().join("data");
    let mut s = fake.server_env(&data, &[], &[("FAKE_PRL_HANG", "register")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    make_user(&c, &s, &root, "viewer").await;
    let body = json!({"name": "ci-cut", "image": "golden.pvm"});
    let (st, job) = call(&c, Method::POST, &s.api("/machines/async"), &ra, Some(body), &[]).await;
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Kill while the job runs: its driver call hangs.
    let hung = fake.state.join("hung-pids");
    wait_for("the create to hang in prlctl register", Duration::from_secs(30), || async {
        std::fs::read_dir(&hung).map(|mut d| d.next().is_some()).unwrap_or(false)
    })
    .await;
    let (st, j) = call(&c, Method::GET, &s.api(&format!("/jobs/{id}")), &ra, None, &[]).await;
    assert_eq!((st, j["state"].as_str()), (200, Some("running")), "{j}");
    s.kill9();
    fake.kill_hung();

    let s = fake.server(&data, &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root);
    let (st, j) = call(&c, Method::GET, &s.api(&format!("/jobs/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 200, "the acknowledged job is known after kill -9: {j}");
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("server restarted before the job finished"), "{j}");
    assert_eq!(j["message"], j["error"], "{j}");
    let (_, list) = call(&c, Method::GET, &s.api("/jobs"), &ra, None, &[]).await;
    assert!(list.as_array().unwrap().iter().any(|j| j["id"] == id.as_str()), "{list}");
    // Still its owner's alone.
    let ua = Auth::Bearer(login(&c, &s, "viewer", USER_PASSWORD).await);
    let (st, _) = call(&c, Method::GET, &s.api(&format!("/jobs/{id}")), &ua, None, &[]).await;
    assert_eq!(st, 404);
    // The server works on: a new async create completes.
    let body = json!({"name": "ci-after", "image": "golden.pvm"});
    let (st, job) = call(&c, Method::POST, &s.api("/machines/async"), &ra, Some(body), &[]).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &s, &ra, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "completed", "{j}");
}

/// A completed job and a failed one survive a graceful restart with their result and error;
/// a deleted job stays deleted.
#[tokio::test]
async fn finished_jobs_survive_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let data = dir.path().join("data");
    let mut s = fake.server(&data, &[]);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let mut ids = Vec::new();
    for body in [
        json!({"name": "ci-kept", "image": "golden.pvm", "start_on_create": true}),
        json!({"name": "ci-kept", "image": "golden.pvm"}),
        json!({"name": "ci-gone", "image": "golden.pvm"}),
    ] {
        let (st, job) = call(&c, Method::POST, &s.api("/machines/async"), &ra, Some(body), &[]).await;
        assert_eq!(st, 202, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        wait_job(&c, &s, &ra, &id).await;
        ids.push(id);
    }
    let (_, done) = call(&c, Method::GET, &s.api(&format!("/jobs/{}", ids[0])), &ra, None, &[]).await;
    assert_eq!(
        (done["state"].as_str(), done["result"]["current_state"].as_str()),
        (Some("completed"), Some("running"))
    );
    let (_, failed) = call(&c, Method::GET, &s.api(&format!("/jobs/{}", ids[1])), &ra, None, &[]).await;
    assert_eq!(failed["state"], "failed", "the name is taken: {failed}");
    let (st, _) = call(&c, Method::DELETE, &s.api(&format!("/jobs/{}", ids[2])), &ra, None, &[]).await;
    assert_eq!(st, 202);
    assert!(s.stop().success());

    let s = fake.server(&data, &[]);
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, j) = call(&c, Method::GET, &s.api(&format!("/jobs/{}", ids[0])), &ra, None, &[]).await;
    assert_eq!(st, 200, "{j}");
    assert_eq!(j, done, "the completed job is as it was");
    let (st, j) = call(&c, Method::GET, &s.api(&format!("/jobs/{}", ids[1])), &ra, None, &[]).await;
    assert_eq!((st, &j), (200, &failed), "the failed job keeps its own error");
    let (st, _) = call(&c, Method::GET, &s.api(&format!("/jobs/{}", ids[2])), &ra, None, &[]).await;
    assert_eq!(st, 404, "a deleted job stays deleted");
}

fn guest_image() -> PathBuf {
    let dir = std::env::var("HANGAR_GUEST_IMAGE_DIR").unwrap_or_else(|_| {
        panic!("HANGAR_GUEST_IMAGE_DIR is not set: build the test guest with scripts/build-guest-image.sh DIR (scripts/test.sh does it)")
    });
    let p = PathBuf::from(dir);
    assert!(p.join("image.json").is_file(), "{} holds no test guest; run scripts/build-guest-image.sh", p.display());
    p
}

async fn exec(c: &reqwest::Client, s: &Server, a: &Auth, id: &str, cmd: &str) -> (u16, Value) {
    call(
        c,
        Method::PUT,
        &s.api(&format!("/machines/{id}/execute")),
        a,
        Some(json!({"command": cmd, "timeout": 30})),
        &[],
    )
    .await
}

#[tokio::test]
async fn machines_api_boots_a_real_qemu_guest() {
    let image = guest_image();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::os::unix::fs::symlink(&image, images.join("test-guest")).unwrap();
    let data = dir.path().join("d");
    let vms = dir.path().join("vms");
    let settings = [
        ("HYPERVISOR", "qemu"),
        ("QEMU_ACCELERATION", "tcg"),
        ("HOST_IMAGES_FOLDER", images.to_str().unwrap()),
        ("HOST_VMS_FOLDER", vms.to_str().unwrap()),
    ];
    let mut s = Server::start(&data, &settings);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root);
    let (st, v) = call(&c, Method::POST, &s.api("/machines"), &ra, Some(json!({"name": "guest-1", "image": "test-guest", "start_on_create": true, "specs": {"cpu": 1, "memory": 128}})), &[]).await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // Wait for the guest agent, as the GitHub Action does: exec until it answers.
    let c2 = c.clone();
    let (s_url, ra2, id2) = (s.api(&format!("/machines/{id}/execute")), ra.clone(), id.clone());
    wait_for("the guest agent", Duration::from_secs(240), || {
        let (c2, u, a) = (c2.clone(), s_url.clone(), ra2.clone());
        async move {
            call(&c2, Method::PUT, &u, &a, Some(json!({"command": "true", "timeout": 5})), &[]).await.1["exit_code"]
                == 0
        }
    })
    .await;
    let _ = id2;
    let (st, out) = exec(&c, &s, &ra, &id, "uname -a").await;
    assert_eq!((st, out["exit_code"].as_i64()), (200, Some(0)), "{out}");
    assert!(out["stdout"].as_str().unwrap().contains("Linux"), "{out}");
    let (_, out) = exec(&c, &s, &ra, &id, "exit 42").await;
    assert_eq!(out["exit_code"], 42);
    // kill -9 of the agent while the VM runs: the restarted agent adopts it, once.
    exec(&c, &s, &ra, &id, "echo survivor > /data/mark").await;
    s.kill9();
    let s = Server::start(&data, &settings);
    let (st, list) = call(&c, Method::GET, &s.api("/machines"), &ra, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    let mine: Vec<&Value> = list.as_array().unwrap().iter().filter(|m| m["ID"] == id.as_str()).collect();
    assert_eq!(mine.len(), 1, "adopted exactly once: {list}");
    assert_eq!(mine[0]["State"], "running");
    let (_, out) = exec(&c, &s, &ra, &id, "cat /data/mark").await;
    assert_eq!(out["stdout"].as_str().map(str::trim), Some("survivor"), "{out}");
    // Upload bytes and read them back.
    let payload = "uploaded through hangar\n";
    let r = c
        .put(s.api(&format!("/machines/{id}/files?remote_path=/data/up.txt")))
        .bearer_auth(match &ra {
            Auth::Bearer(t) => t,
            _ => unreachable!(),
        })
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    let (_, out) = exec(&c, &s, &ra, &id, "cat /data/up.txt").await;
    assert_eq!(out["stdout"], payload);
    // Snapshot, change, revert, check.
    let (st, snap) = call(
        &c,
        Method::POST,
        &s.api(&format!("/machines/{id}/snapshots")),
        &ra,
        Some(json!({"snapshot_name": "clean"})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{snap}");
    exec(&c, &s, &ra, &id, "echo changed > /data/up.txt && sync").await;
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api(&format!("/machines/{id}/snapshots/{}/revert", snap["id"].as_str().unwrap())),
        &ra,
        None,
        &[],
    )
    .await;
    assert_eq!(st, 202, "{v}");
    let (_, out) = exec(&c, &s, &ra, &id, "cat /data/up.txt").await;
    assert_eq!(out["stdout"], payload, "revert restored the file");
    // Suspend and resume keep the guest's state.
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/suspend")), &ra, None, &[]).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("suspended")), "{v}");
    let (st, v) =
        call(&c, Method::PUT, &s.api(&format!("/machines/{id}/execute")), &ra, Some(json!({"command": "true"})), &[])
            .await;
    assert_eq!(st, 409, "exec on a suspended VM: {v}");
    let (st, _) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/resume")), &ra, None, &[]).await;
    assert_eq!(st, 200);
    let (_, out) = exec(&c, &s, &ra, &id, "cat /data/up.txt").await;
    assert_eq!(out["stdout"], payload);
    // Stop (ACPI), delete: nothing left behind.
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/stop")), &ra, None, &[]).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("stopped")), "{v}");
    let (st, _) = call(&c, Method::DELETE, &s.api(&format!("/machines/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 202);
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM files left: {left:?}");
    let pattern = format!("qemu-system.*{}", vms.display());
    let procs = std::process::Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
    assert!(procs.stdout.is_empty(), "qemu processes left: {}", String::from_utf8_lossy(&procs.stdout));
}

#[test]
fn vm_cli_drives_the_host_module() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let cfg = dir.path().join("cli");
    let cli = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(bin())
            .args(args)
            .env("HANGAR_CONFIG_DIR", &cfg)
            .env_remove("HANGAR_URL")
            .env_remove("HANGAR_TOKEN")
            .env_remove("HANGAR_API_KEY")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(cli(&["login", "--url", &s.url, "--username", "root", "--password-stdin"], ROOT_PASSWORD).status.success());
    let out = cli(&["vm", "create", "cli-vm", "--image", "golden.pvm", "--start", "--output", "json"], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["name"], "cli-vm");
    assert_eq!(created["current_state"], "running");
    let out = cli(&["vm", "exec", "cli-vm", "echo from-guest; exit 7"], "");
    assert_eq!(out.status.code(), Some(7), "exec passes the exit code through");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from-guest");
    let out = cli(&["vm", "list", "--output", "json", "--filter", "Name=^cli-"], "");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let out = cli(&["vm", "pause", "no-such-vm"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    assert!(cli(&["vm", "stop", "cli-vm", "--force"], "").status.success());
    assert!(cli(&["vm", "delete", "cli-vm"], "").status.success());
}

#[tokio::test]
async fn a_vm_is_created_from_a_catalog_image_through_the_host_cache() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let bundle = fake.images.join("golden.pvm");
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    // Push the bundle to a local-folder provider with the CLI.
    push_bundle(&s, &root, dir.path(), &bundle, "golden");
    // The reference clients' create body, `connection` included (here naming this server).
    let connection = format!("host=http://root:{ROOT_PASSWORD}@{}", s.url.trim_start_matches("http://"));
    let body = |name: &str| json!({"name": name, "architecture": "x86_64", "start_on_create": true, "catalog_manifest": {"catalog_id": "golden", "version": "latest", "connection": connection}});
    let (st, v) = call(&c, Method::POST, &s.api("/machines"), &ra, Some(body("from-catalog-1")), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["current_state"], "running");
    let (st, v) = call(&c, Method::POST, &s.api("/machines"), &ra, Some(body("from-catalog-2")), &[]).await;
    assert_eq!(st, 200, "second VM from the cached image: {v}");
    // A tainted image makes no VM.
    let (st, v) = call(&c, Method::PATCH, &s.api("/catalog/golden/1.0.0/x86_64/taint"), &ra, None, &[]).await;
    assert!(st < 300, "taint: {st} {v}");
    let (st, v) = call(&c, Method::POST, &s.api("/machines"), &ra, Some(body("from-catalog-3")), &[]).await;
    assert!(st == 409 || st == 404, "a tainted image is not pulled: {st} {v}");
    let (_, list) = call(&c, Method::GET, &s.api("/machines"), &ra, None, &[]).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}
