//! PDS drop-in: `catalog_manifest.connection` on VM create (reference §1.3, §5.2; the
//! GitHub Action's pull). Two real servers: a catalog server holding an image, and a
//! host server (fake Parallels) whose own catalog is empty; the host pulls through the
//! catalog server's API with the connection's credentials.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// Pushes `bundle` to `s` as `golden 1.0.0 x86_64` with the CLI (local-folder provider).
fn push_golden(s: &Server, token: &str, dir: &Path, bundle: &Path) {
    let provider = format!("provider=local-storage;catalog_path={}", dir.join("store").display());
    let out = std::process::Command::new(bin())
        .args(["--output", "json", "--url", &s.url, "catalog", "push", "--provider", &provider])
        .args(["--catalog-id", "golden", "--version", "1.0.0", "--architecture", "amd64", "--path"])
        .arg(bundle)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", dir.join("cli"))
        .env("XDG_CACHE_HOME", dir.join("cli-cache"))
        .env_remove("HANGAR_URL")
        .env_remove("HANGAR_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir` whose bytes contain `needle`.
fn grep(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_vm_is_created_on_a_host_from_another_catalog_server_named_by_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    // The catalog server, with the image and a user the host will log in as.
    let fake = FakeParallels::new(dir.path());
    let catalog = Server::start(&dir.path().join("catalog-data"), &[]);
    let croot = login(&c, &catalog, "root", ROOT_PASSWORD).await;
    push_golden(&catalog, &croot, dir.path(), &fake.images.join("golden.pvm"));
    std::fs::remove_dir_all(fake.images.join("golden.pvm")).unwrap();
    let (uid, _) = make_user(&c, &catalog, &croot, "puller").await;
    let claim = Some(json!({"name": "PULL_CATALOG_MANIFEST"}));
    let url = catalog.api(&format!("/auth/users/{uid}/claims"));
    let (st, v) = call(&c, Method::POST, &url, &Auth::Bearer(croot.clone()), claim, &[]).await;
    assert_eq!(st, 201, "{v}");
    let authority = catalog.url.trim_start_matches("http://").to_string();

    // The host server: its own catalog has nothing, and it has no local image either.
    let host_data = dir.path().join("host-data");
    let host = fake.server(&host_data, &[]);
    let hroot = login(&c, &host, "root", ROOT_PASSWORD).await;
    let ha = Auth::Bearer(hroot.clone());
    let (st, v) = call(&c, Method::GET, &host.api("/catalog"), &ha, None, &[]).await;
    assert_eq!((st, v.as_array().map(Vec::len)), (200, Some(0)), "{v}");

    let body = |name: &str, connection: String| {
        json!({"name": name, "architecture": "x86_64", "start_on_create": true,
            "catalog_manifest": {"catalog_id": "golden", "version": "1.0.0", "connection": connection}})
    };
    let good = format!("host=http://puller:{USER_PASSWORD}@{authority}");

    // As the GitHub Action sends it (host mode: `/api/v1//machines`).
    let url = format!("{}/api/v1//machines", host.url);
    let (st, made) = call(&c, Method::POST, &url, &ha, Some(body("remote-1", good.clone())), &[]).await;
    assert_eq!(st, 200, "create through the connection: {made}");
    assert_eq!(made["current_state"], "running", "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    let (st, got) = call(&c, Method::GET, &host.api(&format!("/machines/{id}")), &ha, None, &[]).await;
    assert_eq!(st, 200, "{got}");
    // The image is in the host cache now; a second VM comes from it.
    let (st, made) =
        call(&c, Method::POST, &host.api("/machines"), &ha, Some(body("remote-2", good.clone())), &[]).await;
    assert_eq!(st, 200, "second create: {made}");
    let (_, list) = call(&c, Method::GET, &host.api("/machines"), &ha, None, &[]).await;
    let names: Vec<&str> = list.as_array().unwrap().iter().filter_map(|m| m["Name"].as_str()).collect();
    assert!(names.contains(&"remote-1") && names.contains(&"remote-2"), "{list}");
    // The catalog server counted the pulls as `puller`'s.
    let (st, m) =
        call(&c, Method::GET, &catalog.api("/catalog/golden/1.0.0/x86_64"), &Auth::Bearer(croot.clone()), None, &[])
            .await;
    assert_eq!(st, 200, "{m}");

    // A wrong password: a clear 4xx that names the catalog server, and no VM.
    let wrong = format!("host=http://puller:not-the-password@{authority}");
    let (st, v) = call(&c, Method::POST, &host.api("/machines"), &ha, Some(body("remote-3", wrong)), &[]).await;
    assert!((400..500).contains(&st), "wrong password: {st} {v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&authority), "the error names the catalog server: {v}");
    assert!(!msg.contains("not-the-password"), "{v}");
    assert_eq!(v["code"], json!(st), "{v}");
    // A malformed connection: 400.
    let (st, v) =
        call(&c, Method::POST, &host.api("/machines"), &ha, Some(body("remote-4", "host=nothing".into())), &[]).await;
    assert_eq!(st, 400, "{v}");
    // An image the catalog server does not have: 404 naming it.
    let mut missing = body("remote-5", good.clone());
    missing["catalog_manifest"]["catalog_id"] = json!("nope");
    let (st, v) = call(&c, Method::POST, &host.api("/machines"), &ha, Some(missing), &[]).await;
    assert_eq!(st, 404, "{v}");
    let (_, list) = call(&c, Method::GET, &host.api("/machines"), &ha, None, &[]).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "no VM from a failed pull: {list}");

    // A catalog manager on the host with the same credentials: browse the remote catalog
    // through it, and create a VM naming it by `catalog_manager_id`.
    let mgr = json!({"name": "central", "url": catalog.url, "authentication_method": "password",
        "username": "puller", "password": USER_PASSWORD});
    let (st, m) = call(&c, Method::POST, &host.api("/catalog-managers"), &ha, Some(mgr), &[]).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!((m["password"].as_str(), m["username"].as_str()), (Some("********"), Some("********")), "{m}");
    let mid = m["id"].as_str().unwrap().to_string();
    let (st, list) =
        call(&c, Method::GET, &host.api(&format!("/catalog-managers/{mid}/catalog")), &ha, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    assert!(list.as_array().unwrap().iter().any(|g| g.get("golden").is_some()), "{list}");
    let path = format!("/catalog-managers/{mid}/catalog/golden/1.0.0/x86_64");
    let (st, one) = call(&c, Method::GET, &host.api(&path), &ha, None, &[]).await;
    assert_eq!((st, one["version"].as_str()), (200, Some("1.0.0")), "{one}");
    let by_manager = json!({"name": "remote-6", "architecture": "x86_64", "start_on_create": false,
        "catalog_manifest": {"catalog_id": "golden", "version": "1.0.0", "catalog_manager_id": mid}});
    let (st, made) = call(&c, Method::POST, &host.api("/machines"), &ha, Some(by_manager), &[]).await;
    assert_eq!(st, 200, "create through a catalog manager: {made}");
    let both = json!({"name": "remote-7", "catalog_manifest": {"catalog_id": "golden", "catalog_manager_id": mid, "connection": good}});
    let (st, v) = call(&c, Method::POST, &host.api("/machines"), &ha, Some(both), &[]).await;
    assert_eq!(st, 400, "{v}");

    // Taint through a manager: the remote decides, as the manager's user there.
    let taint = format!("/catalog-managers/{mid}/catalog/golden/1.0.0/x86_64/taint");
    let (st, v) = call(&c, Method::PATCH, &host.api(&taint), &ha, None, &[]).await;
    assert_eq!(st, 422, "puller may not taint on the catalog server: {v}");
    assert!(v["message"].as_str().unwrap_or_default().contains(&authority), "{v}");
    let admin = json!({"name": "central-admin", "url": catalog.url, "username": "root", "password": ROOT_PASSWORD});
    let (st, m) = call(&c, Method::POST, &host.api("/catalog-managers"), &ha, Some(admin), &[]).await;
    assert_eq!(st, 200, "{m}");
    let aid = m["id"].as_str().unwrap().to_string();
    let taint = format!("/catalog-managers/{aid}/catalog/golden/1.0.0/x86_64/taint");
    let (st, v) = call(&c, Method::PATCH, &host.api(&taint), &ha, None, &[]).await;
    assert_eq!((st, v["tainted"].as_bool()), (200, Some(true)), "{v}");
    let (_, v) =
        call(&c, Method::GET, &catalog.api("/catalog/golden/1.0.0/x86_64"), &Auth::Bearer(croot.clone()), None, &[])
            .await;
    assert_eq!(v["tainted"], json!(true), "the catalog server has it tainted: {v}");
    let untaint = format!("/catalog-managers/{aid}/catalog/golden/1.0.0/x86_64/untaint");
    let (st, v) = call(&c, Method::PATCH, &host.api(&untaint), &ha, None, &[]).await;
    assert_eq!((st, v["tainted"].as_bool()), (200, Some(false)), "{v}");

    // The password is in no answer and nowhere in the host's data folder (store, audit, log).
    let (_, audit) = call(&c, Method::GET, &host.api("/audit"), &ha, None, &[]).await;
    assert!(!audit.to_string().contains(USER_PASSWORD), "{audit}");
    let found = grep(&host_data, USER_PASSWORD.as_bytes());
    assert!(found.is_empty(), "the connection's password is stored in clear in {found:?}");
    assert!(!host.log().contains(USER_PASSWORD), "the password reached the log");
    let _: Value = audit;
}

#[tokio::test]
async fn catalog_managers_crud_own_visibility_and_masked_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (alice_id, alice) = make_user(&c, &s, &root, "alice").await;
    let (_, bob) = make_user(&c, &s, &root, "bob").await;
    let (a, b, r) = (Auth::Bearer(alice), Auth::Bearer(bob), Auth::Bearer(root));
    let secret = "Manager-Secret-0f9e8d";
    let api_key = "ApiKey-Secret-7a6b5c";
    let url = s.api("/catalog-managers");

    // alice registers her own; she may not make it global.
    let mine =
        json!({"name": "alice-cat", "url": "http://catalog.example.test:8080", "username": "svc", "password": secret});
    let (st, m) = call(&c, Method::POST, &url, &a, Some(mine.clone()), &[]).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!((m["owner_id"].as_str(), m["password"].as_str()), (Some(alice_id.as_str()), Some("********")), "{m}");
    assert_eq!((m["authentication_method"].as_str(), m["active"].as_bool()), (Some("password"), Some(true)), "{m}");
    let alice_mgr = m["id"].as_str().unwrap().to_string();
    let mut global = mine.clone();
    global["global"] = json!(true);
    let (st, v) = call(&c, Method::POST, &url, &a, Some(global), &[]).await;
    assert_eq!(st, 403, "{v}");
    // Missing credentials, or a URL with credentials in it: 400.
    let (st, v) = call(&c, Method::POST, &url, &a, Some(json!({"name": "x", "url": "http://h"})), &[]).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) =
        call(&c, Method::POST, &url, &a, Some(json!({"name": "x", "url": "http://u:p@h", "api_key": "k"})), &[]).await;
    assert_eq!(st, 400, "{v}");

    // root registers a global one (API key) and a private one.
    let g = json!({"name": "shared", "url": "https://shared.example.test", "api_key": api_key, "global": true});
    let (st, m) = call(&c, Method::POST, &url, &r, Some(g), &[]).await;
    assert_eq!(
        (st, m["api_key"].as_str(), m["authentication_method"].as_str()),
        (200, Some("********"), Some("api_key")),
        "{m}"
    );
    let shared = m["id"].as_str().unwrap().to_string();
    let p = json!({"name": "root-only", "url": "https://root.example.test", "api_key": api_key});
    let (st, m) = call(&c, Method::POST, &url, &r, Some(p), &[]).await;
    assert_eq!(st, 200, "{m}");
    let root_only = m["id"].as_str().unwrap().to_string();

    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> =
            v.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
        n.sort();
        n
    };
    let (_, v) = call(&c, Method::GET, &url, &a, None, &[]).await;
    assert_eq!(names(&v), ["alice-cat", "shared"], "{v}");
    let (_, v) = call(&c, Method::GET, &url, &b, None, &[]).await;
    assert_eq!(names(&v), ["shared"], "bob sees the global one only: {v}");
    let (_, v) = call(&c, Method::GET, &url, &r, None, &[]).await;
    assert_eq!(names(&v), ["alice-cat", "root-only", "shared"], "{v}");
    // bob cannot read, change or delete alice's, nor change the global one.
    let one = |id: &str| s.api(&format!("/catalog-managers/{id}"));
    for (m, body) in [(Method::GET, None), (Method::PUT, Some(json!({"name": "mine now"}))), (Method::DELETE, None)] {
        let (st, v) = call(&c, m.clone(), &one(&alice_mgr), &b, body, &[]).await;
        assert_eq!(st, 404, "{m} alice's as bob: {v}");
    }
    let (st, v) = call(&c, Method::PUT, &one(&shared), &b, Some(json!({"name": "bob's"})), &[]).await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(&c, Method::GET, &one(&root_only), &a, None, &[]).await;
    assert_eq!(st, 404, "{v}");
    // alice renames hers; the mask sent back keeps the password.
    let (st, m) =
        call(&c, Method::PUT, &one(&alice_mgr), &a, Some(json!({"name": "alice-2", "password": "********"})), &[])
            .await;
    assert_eq!((st, m["name"].as_str(), m["password"].as_str()), (200, Some("alice-2"), Some("********")), "{m}");
    // No answer and no file in the data folder holds a credential in clear.
    let (_, all) = call(&c, Method::GET, &url, &r, None, &[]).await;
    for needle in [secret, api_key] {
        assert!(!all.to_string().contains(needle), "{all}");
        let found = grep(&data, needle.as_bytes());
        assert!(found.is_empty(), "{needle} in clear in {found:?}");
    }
    // The changes are audited.
    let (st, v) = call(&c, Method::DELETE, &one(&alice_mgr), &a, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = call(&c, Method::GET, &url, &a, None, &[]).await;
    assert_eq!(names(&v), ["shared"], "{v}");
    let (st, audit) = call(&c, Method::GET, &s.api("/audit"), &r, None, &[]).await;
    assert_eq!(st, 200, "{audit}");
    let acts: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target_id"] == json!(alice_mgr))
        .map(|e| (e["action"].as_str().unwrap(), e["target_type"].as_str().unwrap()))
        .collect();
    for want in ["catalog_manager.create", "catalog_manager.update", "catalog_manager.delete"] {
        assert!(acts.contains(&(want, "catalog_manager")), "{want} not audited: {acts:?}");
    }
    assert!(!audit.to_string().contains(secret), "{audit}");
}

#[tokio::test]
async fn through_the_orchestrator_the_connection_reaches_the_host_and_is_kept_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(dir.path());
    // The orchestrator also serves the catalog with the image.
    let orch_data = dir.path().join("orch");
    let orch = Server::start(&orch_data, &[("ENABLED_MODULES", "api,orchestrator,catalog")]);
    let root = login(&c, &orch, "root", ROOT_PASSWORD).await;
    push_golden(&orch, &root, dir.path(), &fake.images.join("golden.pvm"));
    std::fs::remove_dir_all(fake.images.join("golden.pvm")).unwrap();
    // A host agent with its own (empty) image cache.
    let agent_data = dir.path().join("agent");
    let agent = fake.agent(&agent_data, &[("ENABLED_MODULES", "api,host,catalog"), ("SYSTEM_RESERVED_CPU", "0")]);
    let ra = Auth::Bearer(root.clone());
    let (st, h) = register_host(&c, &orch, &ra, &agent).await;
    assert_eq!(st, 201, "{h}");
    let (st, v) = call(
        &c,
        Method::GET,
        &agent.api("/catalog"),
        &Auth::Bearer(login(&c, &agent, "root", ROOT_PASSWORD).await),
        None,
        &[],
    )
    .await;
    assert_eq!((st, v.as_array().map(Vec::len)), (200, Some(0)), "{v}");

    let authority = orch.url.trim_start_matches("http://").to_string();
    let body = json!({"name": "orch-remote", "architecture": "x86_64", "start_on_create": true,
        "catalog_manifest": {"catalog_id": "golden", "version": "1.0.0",
            "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}")},
        "specs": {"cpu": "1", "memory": "1024"}});
    let (st, made) = call(&c, Method::POST, &orch.api("/orchestrator/machines"), &ra, Some(body), &[]).await;
    assert_eq!(st, 200, "create through the orchestrator: {made}");
    let id = made["id"].as_str().unwrap().to_string();
    let (st, vm) = call(&c, Method::GET, &orch.api(&format!("/orchestrator/machines/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 200, "{vm}");
    // A wrong password comes back from the host as a 4xx naming the catalog server.
    let wrong = json!({"name": "orch-remote-2", "architecture": "x86_64",
        "catalog_manifest": {"catalog_id": "golden", "version": "1.0.0",
            "connection": format!("host=http://root:Wrong-Passw0rd-xyz@{authority}")},
        "specs": {"cpu": "1", "memory": "1024"}});
    let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/machines"), &ra, Some(wrong), &[]).await;
    assert!((400..500).contains(&st), "{st} {v}");
    assert!(v["message"].as_str().unwrap_or_default().contains(&authority), "{v}");
    // A catalog manager id cannot go through (the host cannot read the orchestrator's record).
    let by_id =
        json!({"name": "orch-remote-3", "catalog_manifest": {"catalog_id": "golden", "catalog_manager_id": "x"}});
    let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/machines"), &ra, Some(by_id), &[]).await;
    assert_eq!(st, 400, "{v}");

    // The connection's password (root's here) is in neither data folder, log, nor job list.
    for needle in [ROOT_PASSWORD, "Wrong-Passw0rd-xyz"] {
        for d in [&orch_data, &agent_data] {
            let found = grep(d, needle.as_bytes());
            assert!(found.is_empty(), "{needle} in clear in {found:?}");
        }
        assert!(!orch.log().contains(needle) && !agent.log().contains(needle), "{needle} reached a log");
    }
}
