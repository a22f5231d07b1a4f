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
    push_bundle(&catalog, &croot, dir.path(), &fake.images.join("golden.pvm"), "golden");
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
    push_bundle(&orch, &root, dir.path(), &fake.images.join("golden.pvm"), "golden");
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

/// Follows `/jobs/{id}` until the job is completed or failed.
async fn wait_job(c: &reqwest::Client, s: &Server, auth: &Auth, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (st, j) = call(c, Method::GET, &s.api(&format!("/jobs/{id}")), auth, None, &[]).await;
        assert_eq!(st, 200, "{j}");
        if j["state"] == "completed" || j["state"] == "failed" {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} did not finish: {j}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Every change route of the remote catalog through a catalog manager does on the catalog
/// server what the direct call does; a user without the route's claim is refused (403) and
/// the remote is unchanged; the download answer holds no provider connection; a refusal of
/// the manager's credentials names the manager; pull through a manager makes a VM here.
#[tokio::test]
async fn every_remote_catalog_route_through_a_manager_acts_on_the_catalog_server() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(dir.path());
    let catalog = Server::start(&dir.path().join("catalog-data"), &[]);
    let croot = login(&c, &catalog, "root", ROOT_PASSWORD).await;
    let cr = Auth::Bearer(croot.clone());
    push_bundle(&catalog, &croot, dir.path(), &fake.images.join("golden.pvm"), "golden");
    std::fs::remove_dir_all(fake.images.join("golden.pvm")).unwrap();
    let store = dir.path().join("store").display().to_string();
    let provider = format!("provider=local-storage;catalog_path={store}");
    let direct = |tail: &str| catalog.api(&format!("/catalog/golden/1.0.0/x86_64{tail}"));
    let remote_now = || async {
        let (st, v) = call(&c, Method::GET, &direct(""), &cr, None, &[]).await;
        assert_eq!(st, 200, "{v}");
        v
    };

    let host_data = dir.path().join("host-data");
    let host = fake.server(&host_data, &[]);
    let hroot = login(&c, &host, "root", ROOT_PASSWORD).await;
    let ha = Auth::Bearer(hroot.clone());
    // A global manager logging in as the catalog server's root.
    let admin = json!({"name": "central-admin", "url": catalog.url, "username": "root", "password": ROOT_PASSWORD,
        "global": true});
    let (st, m) = call(&c, Method::POST, &host.api("/catalog-managers"), &ha, Some(admin), &[]).await;
    assert_eq!(st, 200, "{m}");
    let aid = m["id"].as_str().unwrap().to_string();
    let via = |tail: &str| host.api(&format!("/catalog-managers/{aid}/catalog{tail}"));
    let one = |tail: &str| via(&format!("/golden/1.0.0/x86_64{tail}"));

    // Tags, claims and roles: add, then remove.
    for (field, key, value) in
        [("tags", "tags", "gpu"), ("claims", "required_claims", "LIST_VM"), ("roles", "required_roles", "USER")]
    {
        let body = json!({ key: [value] });
        let (st, v) = call(&c, Method::PATCH, &one(&format!("/{field}")), &ha, Some(body.clone()), &[]).await;
        assert_eq!(st, 200, "add {field}: {v}");
        assert!(v[key].as_array().unwrap().contains(&json!(value)), "{v}");
        let r = remote_now().await;
        assert!(r[key].as_array().unwrap().contains(&json!(value)), "the catalog server has the {field}: {r}");
        let (st, v) = call(&c, Method::DELETE, &one(&format!("/{field}")), &ha, Some(body), &[]).await;
        assert_eq!(st, 200, "remove {field}: {v}");
        let r = remote_now().await;
        assert!(!r[key].as_array().unwrap().contains(&json!(value)), "the catalog server dropped the {field}: {r}");
    }
    // Metadata.
    let (st, v) =
        call(&c, Method::PUT, &one("/metadata"), &ha, Some(json!({"description": "set through a manager"})), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(remote_now().await["description"], "set through a manager");
    // The provider connection (the same store): accepted, answered nowhere.
    let (st, v) = call(&c, Method::PATCH, &one("/connection"), &ha, Some(json!({"connection": provider})), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert!(!v.to_string().contains(&store), "{v}");
    // Registering what exists: the remote's 409, relayed.
    let reg = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64", "connection": provider});
    let (st, v) = call(&c, Method::POST, &via(""), &ha, Some(reg.clone()), &[]).await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = call(&c, Method::POST, &via("/push"), &ha, Some(reg), &[]).await;
    assert_eq!(st, 409, "{v}");

    // Download: the local download answer's shape, with no provider connection in it.
    let (st, d) = call(&c, Method::GET, &one("/download"), &ha, None, &[]).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["manifest"]["catalog_id"], "golden", "{d}");
    assert!(d["image_manifest"].is_object(), "{d}");
    let text = d.to_string();
    assert!(!text.contains(&store) && !text.contains("catalog_path"), "a provider connection in {d}");

    // A user of the host who may see and read through managers (and nothing else) sees the
    // global manager and lists through it; deleting or tagging is refused (403) and the
    // catalog server is unchanged.
    let (carol_id, _) = make_user(&c, &host, &hroot, "carol").await;
    let url = host.api(&format!("/auth/users/{carol_id}/roles/USER"));
    let (st, v) = call(&c, Method::DELETE, &url, &ha, None, &[]).await;
    assert!((200..300).contains(&st), "{st} {v}");
    for claim in ["CATALOG_MANAGER_LIST_OWN", "CATALOG_MANAGER_LIST_CATALOG_MANIFEST_OWN"] {
        let url = host.api(&format!("/auth/users/{carol_id}/claims"));
        let (st, v) = call(&c, Method::POST, &url, &ha, Some(json!({"name": claim})), &[]).await;
        assert_eq!(st, 201, "{v}");
    }
    let ca = Auth::Bearer(login(&c, &host, "carol", USER_PASSWORD).await);
    let (st, v) = call(&c, Method::GET, &host.api("/catalog-managers"), &ca, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    assert!(v.to_string().contains(&aid), "carol sees the global manager: {v}");
    let (st, v) = call(&c, Method::GET, &one(""), &ca, None, &[]).await;
    assert_eq!(st, 200, "carol reads through the manager: {v}");
    let (st, v) = call(&c, Method::DELETE, &one(""), &ca, None, &[]).await;
    assert_eq!(st, 403, "carol without a delete claim: {v}");
    remote_now().await;
    let (st, v) = call(&c, Method::PATCH, &one("/tags"), &ca, Some(json!({"tags": ["carol"]})), &[]).await;
    assert_eq!(st, 403, "carol without an update claim: {v}");
    assert!(!remote_now().await["tags"].as_array().unwrap().contains(&json!("carol")));
    let (st, v) = call(&c, Method::GET, &one("/download"), &ca, None, &[]).await;
    assert_eq!(st, 403, "carol without a pull claim: {v}");

    // A default user (role USER: every CATALOG_MANAGER_*_OWN claim) reads through the global
    // manager root made, but its _OWN claims do not reach changes through a manager it does
    // not own: the manager's stored credentials act for their owner only.
    let (_, dave) = make_user(&c, &host, &hroot, "dave").await;
    let da = Auth::Bearer(dave);
    let (st, v) = call(&c, Method::GET, &one(""), &da, None, &[]).await;
    assert_eq!(st, 200, "dave reads through the global manager: {v}");
    let (st, v) = call(&c, Method::PATCH, &one("/tags"), &da, Some(json!({"tags": ["dave"]})), &[]).await;
    assert_eq!(st, 403, "an _OWN claim does not change through another's manager: {v}");
    let (st, v) = call(&c, Method::DELETE, &one(""), &da, None, &[]).await;
    assert_eq!(st, 403, "{v}");
    assert!(!remote_now().await["tags"].as_array().unwrap().contains(&json!("dave")));

    // Pull through the manager: the image comes from the catalog server, the VM is made here.
    let pull = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64",
        "machine_name": "via-manager"});
    let (st, v) = call(&c, Method::PUT, &via("/pull"), &ha, Some(pull.clone()), &[]).await;
    assert_eq!(st, 200, "pull through a manager: {v}");
    let vm = v["id"].as_str().unwrap().to_string();
    let (st, got) = call(&c, Method::GET, &host.api(&format!("/machines/{vm}")), &ha, None, &[]).await;
    assert_eq!(st, 200, "{got}");
    let mut with_conn = pull.clone();
    with_conn["machine_name"] = json!("via-manager-2");
    with_conn["connection"] = json!(format!("host=http://root:x@{}", catalog.url.trim_start_matches("http://")));
    let (st, v) = call(&c, Method::PUT, &via("/pull"), &ha, Some(with_conn), &[]).await;
    assert_eq!(st, 400, "{v}");

    // Delete (keeping the provider's copy), then register it again with push/async and pull
    // it with pull/async, both jobs of this host; then revoke and delete for good.
    let (st, v) = call(&c, Method::DELETE, &one(""), &ha, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    let (st, v) = call(&c, Method::GET, &direct(""), &cr, None, &[]).await;
    assert_eq!(st, 404, "deleted on the catalog server: {v}");
    let again = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64", "connection": provider,
        "description": "again"});
    let (st, job) = call(&c, Method::POST, &via("/push/async"), &ha, Some(again), &[]).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &host, &ha, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "completed", "{j}");
    assert!(!j.to_string().contains("catalog_path="), "no connection string in the job: {j}");
    assert_eq!(remote_now().await["description"], "again", "registered on the catalog server");
    let mut pull_async = pull.clone();
    pull_async["machine_name"] = json!("via-manager-async");
    let (st, job) = call(&c, Method::PUT, &via("/pull/async"), &ha, Some(pull_async), &[]).await;
    assert_eq!(st, 202, "{job}");
    let j = wait_job(&c, &host, &ha, job["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "completed", "{j}");
    let vm = j["result"]["id"].as_str().unwrap().to_string();
    let (st, got) = call(&c, Method::GET, &host.api(&format!("/machines/{vm}")), &ha, None, &[]).await;
    assert_eq!(st, 200, "{got}");

    let (st, v) = call(&c, Method::PATCH, &one("/revoke"), &ha, None, &[]).await;
    assert_eq!((st, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    assert_eq!(remote_now().await["revoked"], json!(true));
    let (st, v) = call(&c, Method::DELETE, &via("/golden"), &ha, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    let (st, v) = call(&c, Method::GET, &direct(""), &cr, None, &[]).await;
    assert_eq!(st, 404, "deleted on the catalog server: {v}");
    let (st, v) = call(&c, Method::DELETE, &via("/golden"), &ha, None, &[]).await;
    assert_eq!(st, 404, "nothing left to delete: {v}");

    // A manager whose password the catalog server refuses: a 4xx naming the manager; an
    // unreachable one: 503 saying so.
    let bad = json!({"name": "wrong-pass", "url": catalog.url, "username": "root", "password": "Not-The-Passw0rd"});
    let (st, m) = call(&c, Method::POST, &host.api("/catalog-managers"), &ha, Some(bad), &[]).await;
    assert_eq!(st, 200, "{m}");
    let bid = m["id"].as_str().unwrap();
    let url = host.api(&format!("/catalog-managers/{bid}/catalog/golden/1.0.0/x86_64/tags"));
    let (st, v) = call(&c, Method::PATCH, &url, &ha, Some(json!({"tags": ["x"]})), &[]).await;
    assert!((400..500).contains(&st), "{st} {v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("wrong-pass"), "{v}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gone = json!({"name": "gone", "url": format!("http://127.0.0.1:{port}"), "api_key": "k"});
    let (st, m) = call(&c, Method::POST, &host.api("/catalog-managers"), &ha, Some(gone), &[]).await;
    assert_eq!(st, 200, "{m}");
    let gid = m["id"].as_str().unwrap();
    let url = host.api(&format!("/catalog-managers/{gid}/catalog/golden/1.0.0/x86_64/revoke"));
    let (st, v) = call(&c, Method::PATCH, &url, &ha, None, &[]).await;
    assert!(st == 502 || st == 503, "{st} {v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("unreachable"), "{v}");

    // The changes are audited on the host, before they were forwarded.
    let (_, audit) = call(&c, Method::GET, &host.api("/audit"), &ha, None, &[]).await;
    let acts: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for want in ["catalog_manager.remote.update", "catalog_manager.remote.delete", "catalog_manager.remote.create"] {
        assert!(acts.contains(&want), "{want} not audited: {acts:?}");
    }
    assert!(!audit.to_string().contains(ROOT_PASSWORD), "{audit}");
    assert!(!host.log().contains(ROOT_PASSWORD), "the manager's password reached the log");
}
