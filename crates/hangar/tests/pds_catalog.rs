//! The reference's catalog routes as its clients call them: the Terraform provider's
//! `PUT /catalog/pull {catalog_id, version, machine_name, owner, connection, path,
//! start_after_pull}` (reads `id`), the UI's `/catalog/pull/async` and `/catalog/push/async`
//! (jobs followed at `/jobs/{id}` and over the websocket) and `PUT /catalog/import-vm` of a raw
//! VM archive on the local-storage provider and on S3 (moto, `scripts/test-services.sh start`).
//! VMs are made on the fake Parallels host.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use hangar_catalog::hangar_blobstore::conformance::TestServer;
use hangar_catalog::hangar_image::testimage;
use reqwest::Method;
use serde_json::{Value, json};

fn local_provider(dir: &Path) -> String {
    format!("provider=local-storage;catalog_path={}", dir.display())
}

/// `hangar catalog ARGS...` as the token's user; (success, stdout JSON, stderr).
fn cli(s: &Server, token: &str, home: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(bin())
        .args(["--output", "json", "--url", &s.url])
        .args(args)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", home.join("cli-config"))
        .env("XDG_CACHE_HOME", home.join("cli-cache"))
        .env_remove("HANGAR_URL")
        .env_remove("HANGAR_API_KEY")
        .env_remove("HANGAR_CATALOG_PROVIDER")
        .output()
        .unwrap();
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Push `bundle` as `id` `version` (x86_64) with the CLI.
fn push(s: &Server, token: &str, home: &Path, provider: &str, id: &str, version: &str, bundle: &Path) {
    let b = bundle.display().to_string();
    let (ok, _, err) = cli(
        s,
        token,
        home,
        &[
            "catalog",
            "push",
            "--provider",
            provider,
            "--catalog-id",
            id,
            "--version",
            version,
            "--architecture",
            "amd64",
            "--path",
            &b,
        ],
    );
    assert!(ok, "push {id} {version}: {err}");
}

async fn api(c: &reqwest::Client, s: &Server, m: Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    call(c, m, &s.api(path), &Auth::Bearer(token.into()), body, &[]).await
}

/// A raw PUT with a text body (for bodies that are not JSON).
async fn put_raw(c: &reqwest::Client, s: &Server, path: &str, token: &str, body: &str) -> (u16, Value) {
    let r = c
        .put(s.api(path))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

async fn wait_job(c: &reqwest::Client, s: &Server, token: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (st, j) = api(c, s, Method::GET, &format!("/jobs/{id}"), token, None).await;
        assert_eq!(st, 200, "{j}");
        if j["state"] == "completed" || j["state"] == "failed" {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} did not finish: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn machine(c: &reqwest::Client, s: &Server, token: &str, id: &str) -> (u16, Value) {
    api(c, s, Method::GET, &format!("/machines/{id}"), token, None).await
}

#[tokio::test]
async fn terraform_pull_makes_a_vm_on_this_host_and_answers_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("store"));
    push(&s, &root, dir.path(), &provider, "tf-image", "1.0.0", &fake.images.join("golden.pvm"));

    // The Terraform provider's body, field for field (its `connection` is omitempty).
    let body = json!({"catalog_id": "tf-image", "version": "1.0.0", "machine_name": "tf-vm", "owner": "root",
        "path": "/Users/ci/Parallels", "start_after_pull": true});
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(!id.is_empty(), "{v}");
    assert_eq!(v["machine_id"], id.as_str(), "{v}");
    assert_eq!((v["machine_name"].as_str(), v["catalog_id"].as_str()), (Some("tf-vm"), Some("tf-image")), "{v}");
    assert_eq!((v["version"].as_str(), v["architecture"].as_str()), (Some("1.0.0"), Some("x86_64")), "{v}");
    assert_eq!(v["manifest"]["catalog_id"], "tf-image", "{v}");
    assert!(v["local_cache_path"].as_str().is_some_and(|p| Path::new(p).is_dir()), "{v}");
    // Terraform then reads the VM by that id: it exists, named and running.
    let (st, vm) = machine(&c, &s, &root, &id).await;
    assert_eq!(st, 200, "{vm}");
    assert_eq!((vm["Name"].as_str(), vm["State"].as_str()), (Some("tf-vm"), Some("running")), "{vm}");
    // Without start_after_pull the VM stays stopped; the second pull uses the host cache.
    let body = json!({"catalog_id": "tf-image", "version": "latest", "machine_name": "tf-vm-2"});
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let (_, vm) = machine(&c, &s, &root, v["id"].as_str().unwrap()).await;
    assert_eq!(vm["State"], "stopped", "{vm}");
    // The same name twice is a conflict, not a second VM.
    let body = json!({"catalog_id": "tf-image", "version": "1.0.0", "machine_name": "tf-vm"});
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &root, Some(body)).await;
    assert!(st == 409 || st == 400, "{st} {v}");
    let (_, list) = api(&c, &s, Method::GET, "/machines", &root, None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}

#[tokio::test]
async fn terraform_pull_from_another_catalog_server_with_connection() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let c = client();
    // The catalog server holds the image; this host's own catalog is empty.
    let catalog = Server::start(&dir.path().join("catalog"), &[]);
    let croot = login(&c, &catalog, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("store"));
    push(&catalog, &croot, dir.path(), &provider, "remote-image", "1.0.0", &fake.images.join("golden.pvm"));
    let authority = catalog.url.trim_start_matches("http://").to_string();
    let host = fake.server(&dir.path().join("host"), &[]);
    let root = login(&c, &host, "root", ROOT_PASSWORD).await;

    let body = |name: &str, connection: String| {
        json!({"catalog_id": "remote-image", "version": "1.0.0", "machine_name": name, "owner": "root",
            "connection": connection, "path": "/Users/ci/Parallels", "start_after_pull": true})
    };
    let good = format!("host=http://root:{ROOT_PASSWORD}@{authority}");
    let (st, v) = api(&c, &host, Method::PUT, "/catalog/pull", &root, Some(body("remote-vm", good.clone()))).await;
    assert_eq!(st, 200, "{v}");
    assert!(!v.to_string().contains(ROOT_PASSWORD), "{v}");
    assert_eq!(
        (v["machine_name"].as_str(), v["catalog_id"].as_str()),
        (Some("remote-vm"), Some("remote-image")),
        "{v}"
    );
    let (st, vm) = machine(&c, &host, &root, v["id"].as_str().unwrap()).await;
    assert_eq!((st, vm["Name"].as_str(), vm["State"].as_str()), (200, Some("remote-vm"), Some("running")), "{vm}");
    // The async form through the same connection.
    let (st, job) = api(&c, &host, Method::PUT, "/catalog/pull/async", &root, Some(body("remote-vm-2", good))).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &host, &root, job["id"].as_str().unwrap()).await;
    assert_eq!((j["state"].as_str(), j["progress"].as_f64()), (Some("completed"), Some(100.0)), "{j}");
    assert!(!j.to_string().contains(ROOT_PASSWORD), "{j}");
    // Wrong credentials: a 4xx naming the catalog server, not the password, and no VM.
    let wrong = format!("host=http://root:Not-the-Passw0rd@{authority}");
    let (st, v) = api(&c, &host, Method::PUT, "/catalog/pull", &root, Some(body("remote-vm-3", wrong))).await;
    assert!((400..500).contains(&st), "{st} {v}");
    assert!(v["message"].as_str().unwrap_or("").contains(&authority), "{v}");
    assert!(!v.to_string().contains("Not-the-Passw0rd"), "{v}");
    let (_, list) = api(&c, &host, Method::GET, "/machines", &root, None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}

#[tokio::test]
async fn pull_refusals_are_4xx_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("store"));
    push(&s, &root, dir.path(), &provider, "golden", "1.0.0", &fake.images.join("golden.pvm"));
    let (uid, user) = make_user(&c, &s, &root, "puller").await;
    let ok = json!({"catalog_id": "golden", "version": "1.0.0", "machine_name": "u-vm"});

    // No PULL_CATALOG_MANIFEST: 403 on both forms.
    for path in ["/catalog/pull", "/catalog/pull/async"] {
        let (st, v) = api(&c, &s, Method::PUT, path, &user, Some(ok.clone())).await;
        assert_eq!((st, v["code"].as_u64()), (403, Some(403)), "{path}: {v}");
    }
    let grant = |claim: &'static str| {
        let (c, s, root, uid) = (c.clone(), &s, root.clone(), uid.clone());
        async move {
            let (st, v) =
                api(&c, s, Method::POST, &format!("/auth/users/{uid}/claims"), &root, Some(json!({"name": claim})))
                    .await;
            assert_eq!(st, 201, "{v}");
        }
    };
    grant("PULL_CATALOG_MANIFEST").await;
    // PULL_CATALOG_MANIFEST without the VM create rule (CREATE_VM): still 403.
    for path in ["/catalog/pull", "/catalog/pull/async"] {
        let (st, v) = api(&c, &s, Method::PUT, path, &user, Some(ok.clone())).await;
        assert_eq!((st, v["code"].as_u64()), (403, Some(403)), "{path}: {v}");
    }
    grant("CREATE_VM").await;
    for path in ["/catalog/pull", "/catalog/pull/async"] {
        // A VM for someone else: only a SUPER_USER may name another owner.
        let body = json!({"catalog_id": "golden", "version": "1.0.0", "machine_name": "u-vm", "owner": "root"});
        let (st, v) = api(&c, &s, Method::PUT, path, &user, Some(body)).await;
        assert_eq!(st, 403, "{path}: {v}");
        // Unknown catalog id or version.
        let (st, v) = api(
            &c,
            &s,
            Method::PUT,
            path,
            &user,
            Some(json!({"catalog_id": "nothing", "version": "1.0.0", "machine_name": "u-vm"})),
        )
        .await;
        assert_eq!((st, v["code"].as_u64()), (404, Some(404)), "{path}: {v}");
        let (st, v) = api(
            &c,
            &s,
            Method::PUT,
            path,
            &user,
            Some(json!({"catalog_id": "golden", "version": "7.0.0", "machine_name": "u-vm"})),
        )
        .await;
        assert_eq!(st, 404, "{path}: {v}");
        // Bad bodies: missing machine_name or catalog_id, wrong types, not JSON, bad architecture.
        for bad in [
            json!({"catalog_id": "golden", "version": "1.0.0"}),
            json!({"version": "1.0.0", "machine_name": "u-vm"}),
            json!({"catalog_id": "golden", "machine_name": 7}),
            json!({"catalog_id": "golden", "machine_name": "u-vm", "architecture": "mips"}),
        ] {
            let (st, v) = api(&c, &s, Method::PUT, path, &user, Some(bad.clone())).await;
            assert_eq!((st, v["code"].as_u64()), (400, Some(400)), "{path} {bad}: {v}");
        }
        let (st, v) = put_raw(&c, &s, path, &user, "{not json").await;
        assert_eq!(st, 400, "{path}: {v}");
        // A malformed catalog server connection: 400, without repeating it.
        let body = json!({"catalog_id": "golden", "machine_name": "u-vm", "connection": "host=nothing-Secr3t"});
        let (st, v) = api(&c, &s, Method::PUT, path, &user, Some(body)).await;
        assert_eq!(st, 400, "{path}: {v}");
        assert!(!v.to_string().contains("Secr3t"), "the connection is not echoed: {v}");
    }
    // None of that made a VM or filled the cache.
    let (_, list) = api(&c, &s, Method::GET, "/machines", &root, None).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    let (_, cache) = api(&c, &s, Method::GET, "/catalog/cache", &root, None).await;
    assert_eq!(cache["manifests"].as_array().map(Vec::len), Some(0), "{cache}");
    // An image behind a claim the user lacks is not found for them.
    let (st, v) = api(&c, &s, Method::POST, "/auth/claims", &root, Some(json!({"name": "TEAM_X"}))).await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = api(
        &c,
        &s,
        Method::PATCH,
        "/catalog/golden/1.0.0/x86_64/claims",
        &root,
        Some(json!({"required_claims": ["TEAM_X"]})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &user, Some(ok.clone())).await;
    assert_eq!(st, 404, "{v}");
    // The user's own VM once the claim is lifted.
    let (st, v) = api(
        &c,
        &s,
        Method::DELETE,
        "/catalog/golden/1.0.0/x86_64/claims",
        &root,
        Some(json!({"required_claims": ["TEAM_X"]})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &user, Some(ok)).await;
    assert_eq!(st, 200, "{v}");
    let (st, vm) = machine(&c, &s, &user, v["id"].as_str().unwrap()).await;
    assert_eq!(st, 200, "the puller sees its VM: {vm}");

    // A server without the host module: 503 naming it.
    let s2 = Server::start(&dir.path().join("catalog-only"), &[("ENABLED_MODULES", "api,catalog")]);
    let root2 = login(&c, &s2, "root", ROOT_PASSWORD).await;
    let pull = json!({"catalog_id": "golden", "machine_name": "x"});
    let push = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64", "connection": provider});
    for (m, path, body) in [
        (Method::PUT, "/catalog/pull", pull.clone()),
        (Method::PUT, "/catalog/pull/async", pull),
        (Method::POST, "/catalog/push/async", push),
    ] {
        let (st, v) = api(&c, &s2, m.clone(), path, &root2, Some(body)).await;
        assert_eq!(st, 503, "{m} {path}: {v}");
        assert!(v["message"].as_str().unwrap_or("").contains("host module"), "{v}");
    }
}

#[tokio::test]
async fn async_pull_and_push_are_jobs_with_progress_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("store"));
    push(&s, &root, dir.path(), &provider, "golden", "1.0.0", &fake.images.join("golden.pvm"));
    let ws_url = s.url.replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{ws_url}/api/v1/ws/subscribe?event_types=job_manager&access_token={root}"
    ))
    .await
    .unwrap();

    // The UI's pull/async: 202 with the job; the job reaches 100 with the pull answer.
    let body =
        json!({"catalog_id": "golden", "version": "1.0.0", "machine_name": "async-vm", "start_after_pull": true});
    let (st, job) = api(&c, &s, Method::PUT, "/catalog/pull/async", &root, Some(body)).await;
    assert_eq!(st, 202, "{job}");
    assert_eq!((job["job_type"].as_str(), job["job_operation"].as_str()), (Some("catalog"), Some("pull")), "{job}");
    let pull_job = job["id"].as_str().unwrap().to_string();
    let j = wait_job(&c, &s, &root, &pull_job).await;
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(j["progress"].as_f64(), Some(100.0), "{j}");
    let vm_id = j["result"]["id"].as_str().unwrap().to_string();
    assert_eq!(j["result"]["machine_name"], "async-vm", "{j}");
    let (st, vm) = machine(&c, &s, &root, &vm_id).await;
    assert_eq!((st, vm["Name"].as_str(), vm["State"].as_str()), (200, Some("async-vm"), Some("running")), "{vm}");

    // push/async: register an image whose chunks are in the provider (the entry was deleted
    // without cleaning the provider, so its image is still there).
    let (st, v) = api(&c, &s, Method::DELETE, "/catalog/golden/1.0.0/x86_64", &root, None).await;
    assert_eq!(st, 202, "{v}");
    let body = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64", "connection": provider,
        "description": "again"});
    let (st, job) = api(&c, &s, Method::POST, "/catalog/push/async", &root, Some(body)).await;
    assert_eq!(st, 202, "{job}");
    assert_eq!(job["job_operation"], "push", "{job}");
    let push_job = job["id"].as_str().unwrap().to_string();
    let j = wait_job(&c, &s, &root, &push_job).await;
    assert_eq!((j["state"].as_str(), j["progress"].as_f64()), (Some("completed"), Some(100.0)), "{j}");
    assert_eq!(j["result"]["description"], "again", "{j}");
    assert!(!j.to_string().contains("catalog_path="), "no connection string in the job: {j}");
    let (st, m) = api(&c, &s, Method::GET, "/catalog/golden/1.0.0/x86_64", &root, None).await;
    assert_eq!((st, m["description"].as_str()), (200, Some("again")), "{m}");
    // A push of an image that is not in the provider fails as a job, with the reason.
    let body = json!({"catalog_id": "golden", "version": "9.9.9", "architecture": "x86_64", "connection": provider});
    let (st, job) = api(&c, &s, Method::POST, "/catalog/push/async", &root, Some(body)).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &s, &root, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()), "{j}");
    // The UI's push/async with the reference's body: a VM folder on this server, chunked into
    // the provider; progress reaches 100 and the entry can be pulled into a VM.
    let golden = fake.images.join("golden.pvm");
    let body = json!({"local_path": golden.display().to_string(), "catalog_id": "server-pushed", "description": "from the UI",
        "version": "2.0.0", "architecture": "x86_64", "connection": provider, "compress": true, "compress_level": "best_speed",
        "override_existing": false, "required_roles": [], "required_claims": [], "tags": ["ui"],
        "minimum_requirements": {"cpu": 2, "memory": 2048, "disk": 20000}});
    let (st, job) = api(&c, &s, Method::POST, "/catalog/push/async", &root, Some(body)).await;
    assert_eq!(st, 202, "{job}");
    let local_job = job["id"].as_str().unwrap().to_string();
    let j = wait_job(&c, &s, &root, &local_job).await;
    assert_eq!((j["state"].as_str(), j["progress"].as_f64()), (Some("completed"), Some(100.0)), "{j}");
    assert_eq!((j["result"]["type"].as_str(), j["result"]["tags"].clone()), (Some("pvm"), json!(["ui"])), "{j}");
    assert_eq!(j["result"]["minimum_requirements"], json!({"cpu": 2, "memory": 2048, "disk": 20000}), "{j}");
    let body = json!({"catalog_id": "server-pushed", "version": "2.0.0", "machine_name": "from-ui-push"});
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    // A caller who is not a SUPER_USER may not push a server folder outside CATALOG_LOCAL_ROOTS.
    let (uid, user) = make_user(&c, &s, &root, "pusher").await;
    let (st, v) = api(
        &c,
        &s,
        Method::POST,
        &format!("/auth/users/{uid}/claims"),
        &root,
        Some(json!({"name": "PUSH_CATALOG_MANIFEST"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let body = json!({"local_path": "/etc", "catalog_id": "exfil", "version": "1", "architecture": "x86_64",
        "connection": provider});
    let (st, job) = api(&c, &s, Method::POST, "/catalog/push/async", &user, Some(body)).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &s, &user, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap_or("").contains("CATALOG_LOCAL_ROOTS"), "{j}");
    let (st, _) = api(&c, &s, Method::GET, "/catalog/exfil", &root, None).await;
    assert_eq!(st, 404);
    // Bad push body: 400 before a job.
    let (st, v) = put_raw(&c, &s, "/catalog/pull/async", &root, "[]").await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = api(&c, &s, Method::POST, "/catalog/push/async", &root, Some(json!({"catalog_id": "x"}))).await;
    assert_eq!(st, 400, "{v}");

    // Both jobs' progress reached the websocket.
    let mut seen: Vec<(String, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(seen.iter().any(|(m, id)| m == "JOB_COMPLETED" && *id == pull_job)
        && seen.iter().any(|(m, id)| m == "JOB_COMPLETED" && *id == push_job)
        && seen.iter().any(|(m, id)| m == "JOB_COMPLETED" && *id == local_job))
    {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("job events arrive").unwrap().unwrap();
        let Ok(text) = msg.to_text() else { continue };
        let Ok(e) = serde_json::from_str::<Value>(text) else { continue };
        seen.push((
            e["message"].as_str().unwrap_or("").to_string(),
            e["body"]["id"].as_str().unwrap_or("").to_string(),
        ));
    }
    assert!(seen.iter().any(|(m, id)| m == "JOB_UPDATED" && *id == pull_job), "{seen:?}");
}

/// A tar.gz (or tar) of `Agent.pvm` made with the system tar; returns its bytes and the
/// bundle's fingerprint.
type Fingerprint = std::collections::BTreeMap<String, String>;

fn archive(dir: &Path, gzip: bool) -> (Vec<u8>, Fingerprint) {
    let src = dir.join(format!("src-{gzip}"));
    std::fs::create_dir_all(&src).unwrap();
    let bundle = src.join("Agent.pvm");
    testimage::generate(&bundle, 2 << 20, 11).unwrap();
    let out = dir.join(format!("agent-{gzip}.tar"));
    let st = Command::new("tar")
        .arg(if gzip { "-czf" } else { "-cf" })
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg("Agent.pvm")
        .status()
        .unwrap();
    assert!(st.success(), "tar failed");
    (std::fs::read(&out).unwrap(), testimage::fingerprint(&bundle).unwrap())
}

/// import-vm of `key` in `provider`, then the CLI pulls it back bit-identical.
#[allow(clippy::too_many_arguments)]
async fn import_and_check(
    c: &reqwest::Client,
    s: &Server,
    root: &str,
    home: &Path,
    provider: &str,
    key: &str,
    id: &str,
    fingerprint: &Fingerprint,
) {
    // The reference's ImportVmRequest, field for field.
    let body = json!({"catalog_id": id, "version": "1.0", "architecture": "arm64", "connection": provider,
        "description": "raw import", "is_compressed": true, "type": "pvm", "size": 2, "force": false,
        "machine_remote_path": key, "tags": ["raw"], "required_claims": [], "required_roles": []});
    let (st, v) = api(c, s, Method::PUT, "/catalog/import-vm", root, Some(body.clone())).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], v["manifest"]["id"], "{v}");
    assert_eq!(v["machine_name"], format!("{id}-arm64-1.0").as_str(), "{v}");
    assert_eq!((v["manifest"]["type"].as_str(), v["manifest"]["tags"].clone()), (Some("pvm"), json!(["raw"])), "{v}");
    assert!(!v.to_string().contains("secret_key") && !v.to_string().contains("catalog_path"), "{v}");
    // Again without force: 409; with force: replaced.
    let (st, v) = api(c, s, Method::PUT, "/catalog/import-vm", root, Some(body.clone())).await;
    assert_eq!(st, 409, "{v}");
    let mut forced = body;
    forced["force"] = json!(true);
    let (st, v) = api(c, s, Method::PUT, "/catalog/import-vm", root, Some(forced)).await;
    assert_eq!(st, 200, "{v}");
    let dest = home.join(format!("pulled-{id}"));
    let d = dest.display().to_string();
    let (ok, _, err) = cli(
        s,
        root,
        home,
        &[
            "catalog",
            "pull",
            "--catalog-id",
            id,
            "--version",
            "1.0",
            "--architecture",
            "arm64",
            "--destination",
            &d,
            "--machine-name",
            "agent",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(&testimage::fingerprint(&dest.join("agent")).unwrap(), fingerprint);
}

#[tokio::test]
async fn import_vm_of_a_raw_archive_on_local_storage() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let store = dir.path().join("store");
    std::fs::create_dir_all(store.join("raw")).unwrap();
    let provider = local_provider(&store);
    let (gz, fp) = archive(dir.path(), true);
    std::fs::write(store.join("raw/agent.tar.gz"), &gz).unwrap();
    import_and_check(&c, &s, &root, dir.path(), &provider, "raw/agent.tar.gz", "raw-agent", &fp).await;
    // A plain tar works too, with the type taken from the bundle.
    let (tar, fp2) = archive(dir.path(), false);
    std::fs::write(store.join("raw/agent.tar"), &tar).unwrap();
    assert_eq!(fp, fp2);
    let body = json!({"catalog_id": "raw-tar", "version": "2", "architecture": "x86_64", "connection": provider,
        "machine_remote_path": "raw/agent.tar", "size": 2});
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/import-vm", &root, Some(body)).await;
    assert_eq!((st, v["manifest"]["type"].as_str()), (200, Some("pvm")), "{v}");

    // Refusals.
    let base = json!({"catalog_id": "bad", "version": "1", "architecture": "x86_64", "connection": provider,
        "machine_remote_path": "raw/agent.tar.gz", "size": 2});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, want) in [
        (with("connection", json!("provider=ftp;host=example")), 400),
        (with("type", json!("vhdx")), 400),
        (with("architecture", json!("mips")), 400),
        (with("machine_remote_path", json!("")), 400),
        (with("machine_remote_path", json!("../etc/passwd")), 400),
        (with("version", json!("")), 400),
        (with("catalog_id", json!(7)), 400),
        (with("machine_remote_path", json!("raw/missing.tar.gz")), 404u16),
    ] {
        let (st, v) = api(&c, &s, Method::PUT, "/catalog/import-vm", &root, Some(body.clone())).await;
        assert_eq!((st, v["code"].as_u64()), (want, Some(u64::from(want))), "{body}: {v}");
    }
    let (st, v) = put_raw(&c, &s, "/catalog/import-vm", &root, "not json").await;
    assert_eq!(st, 400, "{v}");
    // Not an archive: 422, and nothing registered.
    std::fs::write(store.join("raw/junk.bin"), b"this is not a tar file at all, not even close".repeat(20)).unwrap();
    let (st, v) =
        api(&c, &s, Method::PUT, "/catalog/import-vm", &root, Some(with("machine_remote_path", json!("raw/junk.bin"))))
            .await;
    assert_eq!(st, 422, "{v}");
    let (st, _) = api(&c, &s, Method::GET, "/catalog/bad", &root, None).await;
    assert_eq!(st, 404);
    // A user without PUSH/IMPORT_CATALOG_MANIFEST: 403.
    let (_, user) = make_user(&c, &s, &root, "importer").await;
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/import-vm", &user, Some(base)).await;
    assert_eq!(st, 403, "{v}");
}

#[tokio::test]
async fn import_vm_of_a_raw_archive_on_s3() {
    let cs = TestServer::S3.connection_string().unwrap_or_else(|| {
        panic!(
            "HANGAR_TEST_S3_ENDPOINT is not set: this test needs the S3 test server; run `eval \"$(scripts/test-services.sh start)\"` first (CI does)"
        )
    });
    let provider = format!("{cs};prefix=pds-import-{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (gz, fp) = archive(dir.path(), true);
    let store = hangar_catalog::hangar_blobstore::open_connection_string(&provider).unwrap();
    store.put("uploads/agent.tar.gz", gz.into()).await.unwrap();
    import_and_check(&c, &s, &root, dir.path(), &provider, "uploads/agent.tar.gz", "s3-agent", &fp).await;
    let body = json!({"catalog_id": "s3-missing", "version": "1", "architecture": "x86_64", "connection": provider,
        "machine_remote_path": "uploads/none.tar.gz", "size": 2});
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/import-vm", &root, Some(body)).await;
    assert_eq!(st, 404, "{v}");
}
