//! The Parallels Desktop VS Code extension's requests to a DevOps service, replayed call by call
//! against the real binary (fake `prlctl` hosts), as its client (axios) sends them: every call
//! with `X-SOURCE-ID: VSCODE_EXTENSION`, some GETs with `X-LOGGING: IGNORE`, a bearer token from
//! `POST /api/v1/auth/token {email, password}` whose JWT payload it decodes itself, and the
//! status codes it insists on (200 for a VM create, 202 for a cache delete). Written from reading
//! the extension's source; none of its code is here.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use base64::Engine;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// One request as the extension sends it; `quiet` adds `X-LOGGING: IGNORE` (its list GETs).
async fn vs(c: &reqwest::Client, method: Method, url: &str, auth: &Auth, body: Option<Value>) -> (u16, Value) {
    call(c, method, url, auth, body, &[("X-SOURCE-ID", "VSCODE_EXTENSION")]).await
}

async fn vs_quiet(c: &reqwest::Client, url: &str, auth: &Auth) -> (u16, Value) {
    call(c, Method::GET, url, auth, None, &[("X-SOURCE-ID", "VSCODE_EXTENSION"), ("X-LOGGING", "IGNORE")]).await
}

/// axios' `put(path, null)` / `patch(path, null)`: no body at all.
async fn vs_null(c: &reqwest::Client, method: Method, url: &str, auth: &Auth) -> (u16, Value) {
    vs(c, method, url, auth, None).await
}

/// The extension's login: status 200, then its own decode of the JWT payload.
async fn vs_login(c: &reqwest::Client, s: &Server, email: &str, password: &str) -> (Auth, Value) {
    let (st, v) =
        vs(c, Method::POST, &s.api("/auth/token"), &Auth::None, Some(json!({"email": email, "password": password})))
            .await;
    assert_eq!(st, 200, "login {email}: {v}");
    let token = v["token"].as_str().expect("token").to_string();
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("the payload is base64url");
    let claims: Value = serde_json::from_slice(&bytes).expect("the payload is JSON");
    (Auth::Bearer(token), claims)
}

/// `GET /api/health/probe` (5 s timeout, status 200).
async fn probe(c: &reqwest::Client, s: &Server) {
    let r = c
        .get(format!("{}/api/health/probe", s.url))
        .header("X-SOURCE-ID", "VSCODE_EXTENSION")
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// The hardware fields the extension shows.
fn check_hardware(what: &str, hw: &Value) {
    for key in [
        "cpu_type",
        "cpu_brand",
        "devops_version",
        "os_name",
        "os_version",
        "parallels_desktop_version",
        "external_ip_address",
    ] {
        assert!(hw[key].is_string(), "{what}: {key} in {hw:#}");
    }
    assert!(hw["parallels_desktop_licensed"].is_boolean(), "{what}: {hw:#}");
    assert!(hw["is_reverse_proxy_enabled"].is_boolean(), "{what}: {hw:#}");
    let rp = &hw["reverse_proxy"];
    assert!(rp.is_object() && rp["enabled"].is_boolean() && rp["hosts"].is_array(), "{what}: {hw:#}");
    assert!(rp["host"].is_string() && (rp["port"].is_string() || rp["port"].is_number()), "{what}: {hw:#}");
    for block in ["system_reserved", "total", "total_available", "total_in_use", "total_reserved"] {
        for key in ["logical_cpu_count", "memory_size", "disk_count"] {
            assert!(hw[block][key].is_number(), "{what}: {block}.{key} in {hw:#}");
        }
    }
}

/// The user fields the extension reads.
fn check_user(u: &Value) {
    for key in ["id", "username", "name", "email"] {
        assert!(u[key].is_string(), "{key}: {u}");
    }
    assert!(u["roles"].is_array() && u["claims"].is_array(), "{u}");
    assert!(u["isSuperUser"].is_boolean(), "{u}");
}

/// The host fields the extension's orchestrator view reads, those Hangar answers. Left out
/// (Hangar's host answer does not carry them yet; the view shows them blank): `cpu_model`,
/// `os_version`, `os_name`, `devops_version`, `is_reverse_proxy_enabled` and the reference's
/// flat `resources{logical_cpu_count, memory_size, disk_size}` (Hangar's `resources` holds
/// `total`, `system_reserved`, `in_use` and `available` blocks instead).
fn check_orchestrator_host(h: &Value) {
    for key in ["id", "host", "architecture", "state", "description"] {
        assert!(h[key].is_string(), "{key}: {h:#}");
    }
    assert!(h["enabled"].is_boolean() && h["tags"].is_array(), "{h:#}");
    let total = &h["resources"]["total"];
    assert!(total["cpu"].as_u64().is_some_and(|n| n > 0) && total["memory_mb"].is_number(), "{h:#}");
    // What the extension's host tree shows (its OrchestratorHost model): the host's own
    // description, the reference's flat resources, its reverse proxy.
    for key in ["cpu_model", "os_name", "devops_version"] {
        assert!(h[key].as_str().is_some_and(|s| !s.is_empty()), "{key}: {h:#}");
    }
    for key in ["os_version", "external_ip_address", "parallels_desktop_version"] {
        assert!(h[key].is_string(), "{key}: {h:#}");
    }
    for key in ["parallels_desktop_licensed", "is_reverse_proxy_enabled"] {
        assert!(h[key].is_boolean(), "{key}: {h:#}");
    }
    assert!(h["reverse_proxy"].is_object(), "{h:#}");
    let r = &h["resources"];
    assert!(r["logical_cpu_count"].as_i64().is_some_and(|n| n > 0), "{h:#}");
    assert!(r["memory_size"].as_f64().is_some_and(|m| m > 0.0), "{h:#}");
    assert!(r["disk_size"].is_number() && r["free_disk_size"].is_number(), "{h:#}");
}

fn push_golden(s: &Server, token: &str, dir: &Path, bundle: &Path, id: &str) {
    let provider = format!("provider=local-storage;catalog_path={}", dir.join("store").display());
    let out = std::process::Command::new(bin())
        .args(["--output", "json", "--url", &s.url, "catalog", "push", "--provider", &provider])
        .args(["--catalog-id", id, "--version", "1.0.0", "--architecture", "amd64", "--path"])
        .arg(bundle)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", dir.join("cli"))
        .env("XDG_CACHE_HOME", dir.join("cli-cache"))
        .env_remove("HANGAR_URL")
        .env_remove("HANGAR_API_KEY")
        .env_remove("HANGAR_CATALOG_PROVIDER")
        .output()
        .unwrap();
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
}

fn state_op(operation: &str) -> Value {
    json!({"operations": [{"group": "state", "operation": operation, "value": ""}]})
}

/// Login and its JWT, the probe, hardware, users (with claims and roles added by name and
/// removed by NAME in the path), claims and roles.
#[tokio::test]
async fn login_identity_and_hardware_as_the_extension_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    probe(&c, &s).await;
    let (root, jwt) = vs_login(&c, &s, "root@localhost", ROOT_PASSWORD).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(jwt["exp"].as_u64().is_some_and(|e| e > now), "exp in unix seconds: {jwt}");
    assert_eq!(jwt["email"], "root@localhost", "{jwt}");
    assert!(jwt["uid"].as_str().is_some_and(|u| !u.is_empty()), "{jwt}");
    assert!(jwt["roles"].as_array().unwrap().iter().any(|r| r == "SUPER_USER"), "root is a super user: {jwt}");
    assert!(jwt["claims"].is_array(), "{jwt}");

    let (st, hw) = vs_quiet(&c, &s.api("/config/hardware"), &root).await;
    assert_eq!(st, 200, "{hw}");
    check_hardware("/config/hardware", &hw);

    // Claims and roles: create {name}, list, get, delete.
    let mut ids = Vec::new();
    for kind in ["claims", "roles"] {
        let name = format!("VS_{}", kind.to_uppercase());
        let (st, v) = vs(&c, Method::POST, &s.api(&format!("/auth/{kind}")), &root, Some(json!({"name": name}))).await;
        assert!((200..300).contains(&st), "{kind}: {st} {v}");
        assert_eq!(v["name"], name.as_str(), "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let (st, list) = vs_quiet(&c, &s.api(&format!("/auth/{kind}")), &root).await;
        assert_eq!(st, 200, "{list}");
        assert!(list.as_array().unwrap().iter().any(|x| x["id"] == id.as_str() && x["name"] == name.as_str()));
        ids.push((kind, id, name));
    }

    // Users: create with is_super_user, read, update {name?, password?, email?}.
    let body = json!({"username": "vs-user", "name": "VS User", "email": "vs-user@example.test",
        "password": USER_PASSWORD, "is_super_user": false});
    let (st, u) = vs(&c, Method::POST, &s.api("/auth/users"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "{st} {u}");
    check_user(&u);
    assert_eq!(u["isSuperUser"], false, "{u}");
    let uid = u["id"].as_str().unwrap().to_string();
    let body = json!({"username": "vs-admin", "name": "VS Admin", "email": "vs-admin@example.test",
        "password": USER_PASSWORD, "is_super_user": true});
    let (st, admin) = vs(&c, Method::POST, &s.api("/auth/users"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "{st} {admin}");
    assert_eq!(admin["isSuperUser"], true, "{admin}");
    let (_, jwt) = vs_login(&c, &s, "vs-admin@example.test", USER_PASSWORD).await;
    assert!(jwt["roles"].as_array().unwrap().iter().any(|r| r == "SUPER_USER"), "{jwt}");

    let new_password = "User-Passw0rd!-changed";
    let body = json!({"name": "VS User Renamed", "email": "vs-renamed@example.test", "password": new_password});
    let (st, v) = vs(&c, Method::PUT, &s.api(&format!("/auth/users/{uid}")), &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let (st, got) = vs(&c, Method::GET, &s.api(&format!("/auth/users/{uid}")), &root, None).await;
    assert_eq!(st, 200, "{got}");
    check_user(&got);
    assert_eq!(
        (got["name"].as_str(), got["email"].as_str()),
        (Some("VS User Renamed"), Some("vs-renamed@example.test"))
    );
    let (_, jwt) = vs_login(&c, &s, "vs-renamed@example.test", new_password).await;
    assert_eq!(jwt["email"], "vs-renamed@example.test", "{jwt}");
    assert_eq!(jwt["uid"], uid.as_str(), "{jwt}");

    // A claim and a role added by name, then removed with the NAME in the path.
    for (kind, _, name) in &ids {
        let url = s.api(&format!("/auth/users/{uid}/{kind}"));
        let (st, v) = vs(&c, Method::POST, &url, &root, Some(json!({"name": name}))).await;
        assert!((200..300).contains(&st), "add {kind}: {st} {v}");
    }
    let (_, got) = vs(&c, Method::GET, &s.api(&format!("/auth/users/{uid}")), &root, None).await;
    assert!(got["claims"].as_array().unwrap().iter().any(|x| x == "VS_CLAIMS"), "{got}");
    assert!(got["roles"].as_array().unwrap().iter().any(|x| x == "VS_ROLES"), "{got}");
    let (_, jwt) = vs_login(&c, &s, "vs-renamed@example.test", new_password).await;
    assert!(jwt["claims"].as_array().unwrap().iter().any(|x| x == "VS_CLAIMS"), "{jwt}");
    for (kind, _, name) in &ids {
        let url = s.api(&format!("/auth/users/{uid}/{kind}/{name}"));
        let (st, v) = vs(&c, Method::DELETE, &url, &root, None).await;
        assert!((200..300).contains(&st), "remove {kind} by name: {st} {v}");
    }
    let (_, got) = vs(&c, Method::GET, &s.api(&format!("/auth/users/{uid}")), &root, None).await;
    assert!(!got["claims"].as_array().unwrap().iter().any(|x| x == "VS_CLAIMS"), "{got}");
    assert!(!got["roles"].as_array().unwrap().iter().any(|x| x == "VS_ROLES"), "{got}");

    let (st, list) = vs_quiet(&c, &s.api("/auth/users"), &root).await;
    assert_eq!(st, 200, "{list}");
    list.as_array().unwrap().iter().for_each(check_user);

    for path in
        [format!("/auth/users/{uid}"), format!("/auth/claims/{}", ids[0].1), format!("/auth/roles/{}", ids[1].1)]
    {
        let (st, v) = vs(&c, Method::DELETE, &s.api(&path), &root, None).await;
        assert!((200..300).contains(&st), "DELETE {path}: {st} {v}");
        let (st, v) = vs(&c, Method::GET, &s.api(&path), &root, None).await;
        assert_eq!((st, v["code"].as_u64()), (404, Some(404)), "{path}: {v}");
    }
}

/// A catalog host and a remote host in one: the catalog tree, a VM from the catalog (200),
/// state changes through `set`, unregister, catalog administration, the cache and the reverse
/// proxy, each as the extension calls it.
#[tokio::test]
async fn host_catalog_vms_cache_and_proxy_as_the_extension_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[("ENABLED_MODULES", "api,host,catalog,reverse_proxy")]);
    let c = client();
    let (root, _) = vs_login(&c, &s, "root@localhost", ROOT_PASSWORD).await;
    let Auth::Bearer(token) = &root else { unreachable!() };
    push_golden(&s, token, dir.path(), &fake.images.join("golden.pvm"), "vs-image");

    // The catalog tree: an array of {CATALOG_ID: [manifest]}.
    let (st, cat) = vs_quiet(&c, &s.api("/catalog"), &root).await;
    assert_eq!(st, 200, "{cat}");
    let entry = cat.as_array().unwrap().iter().find(|e| e.get("vs-image").is_some()).expect("vs-image");
    let first_key = entry.as_object().unwrap().keys().next().unwrap().clone();
    assert_eq!(first_key, "vs-image", "{cat}");
    let items = entry["vs-image"].as_array().unwrap();
    assert!(items[0]["description"].is_string() || items[0]["description"].is_null(), "{cat}");
    let arch = items[0]["architecture"].as_str().unwrap().to_string();
    assert_eq!(items[0]["version"], "1.0.0", "{cat}");

    // Create from the catalog with the extension's connection (no scheme): status 200.
    let authority = s.url.trim_start_matches("http://");
    let body = json!({"name": "vs-vm", "architecture": arch, "start_on_create": false,
        "catalog_manifest": {"catalog_id": "vs-image", "version": "1.0.0",
            "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}")}});
    let (st, made) = vs(&c, Method::POST, &s.api("/machines"), &root, Some(body)).await;
    assert_eq!(st, 200, "the extension needs 200: {made}");
    let id = made["id"].as_str().unwrap().to_string();

    let (st, vms) = vs_quiet(&c, &s.api("/machines"), &root).await;
    assert_eq!(st, 200, "{vms}");
    let vm = vms.as_array().unwrap().iter().find(|v| v["ID"] == id.as_str()).expect("the VM is listed").clone();
    assert_eq!(vm["Name"], "vs-vm");
    for (op, want) in [("start", "running"), ("stop", "stopped")] {
        let (st, v) = vs(&c, Method::PUT, &s.api(&format!("/machines/{id}/set")), &root, Some(state_op(op))).await;
        assert_eq!(st, 200, "{op}: {v}");
        let (_, vm) = vs(&c, Method::GET, &s.api(&format!("/machines/{id}")), &root, None).await;
        assert_eq!(vm["State"], want, "{vm}");
    }

    // Unregister {id, clean_source_uuid: true}: the VM leaves the list.
    let body = json!({"id": id, "clean_source_uuid": true});
    let (st, v) = vs(&c, Method::POST, &s.api(&format!("/machines/{id}/unregister")), &root, Some(body)).await;
    assert!((200..300).contains(&st), "unregister: {st} {v}");
    let (_, vms) = vs_quiet(&c, &s.api("/machines"), &root).await;
    assert!(!vms.as_array().unwrap().iter().any(|v| v["ID"] == id.as_str()), "{vms}");

    // The cache: the pull left the image there; list, then DELETE (202) empties it.
    let (st, cache) = vs_quiet(&c, &s.api("/catalog/cache"), &root).await;
    assert_eq!(st, 200, "{cache}");
    assert!(cache["manifests"].as_array().is_some_and(|m| !m.is_empty()), "{cache}");
    assert!(cache["total_size"].is_number(), "{cache}");
    let m0 = &cache["manifests"][0];
    assert_eq!(m0["catalog_id"], "vs-image", "{cache}");
    assert!(m0["version"].is_string() && m0["architecture"].is_string() && m0["size"].is_number(), "{cache}");
    let (st, v) = vs(&c, Method::DELETE, &s.api("/catalog/cache/vs-image/1.0.0"), &root, None).await;
    assert_eq!(st, 202, "{v}");
    let (st, v) = vs(&c, Method::DELETE, &s.api("/catalog/cache"), &root, None).await;
    assert_eq!(st, 202, "{v}");
    let (_, cache) = vs_quiet(&c, &s.api("/catalog/cache"), &root).await;
    assert_eq!(cache["manifests"].as_array().map(Vec::len).unwrap_or(0), 0, "{cache}");

    // Catalog administration: taint/untaint/revoke (null bodies), roles/claims/tags.
    let m = s.api(&format!("/catalog/vs-image/1.0.0/{arch}"));
    let (st, v) = vs(&c, Method::POST, &s.api("/auth/claims"), &root, Some(json!({"name": "VS_CATALOG"}))).await;
    assert!((200..300).contains(&st), "{v}");
    for (verb, key, value) in [
        ("roles", "required_roles", json!(["USER"])),
        ("claims", "required_claims", json!(["VS_CATALOG"])),
        ("tags", "tags", json!(["vs", "ci"])),
    ] {
        let url = format!("{m}/{verb}");
        let (st, v) = vs(&c, Method::PATCH, &url, &root, Some(json!({ key: value.clone() }))).await;
        assert!((200..300).contains(&st), "PATCH {verb}: {st} {v}");
        let (_, got) = vs(&c, Method::GET, &m, &root, None).await;
        let have = got[key].as_array().cloned().unwrap_or_default();
        assert!(value.as_array().unwrap().iter().all(|x| have.contains(x)), "PATCH {verb}: {got}");
        let (st, v) = vs(&c, Method::DELETE, &url, &root, Some(json!({ key: value.clone() }))).await;
        assert!((200..300).contains(&st), "DELETE {verb}: {st} {v}");
        let (_, got) = vs(&c, Method::GET, &m, &root, None).await;
        let have = got[key].as_array().cloned().unwrap_or_default();
        assert!(value.as_array().unwrap().iter().all(|x| !have.contains(x)), "DELETE {verb}: {got}");
    }
    for (verb, key, want) in [("taint", "tainted", true), ("untaint", "tainted", false), ("revoke", "revoked", true)] {
        let (st, v) = vs_null(&c, Method::PATCH, &format!("{m}/{verb}"), &root).await;
        assert!((200..300).contains(&st), "{verb}: {st} {v}");
        let (_, got) = vs(&c, Method::GET, &m, &root, None).await;
        assert_eq!(got[key], want, "{verb}: {got}");
    }
    let (st, v) = vs(&c, Method::DELETE, &s.api("/catalog/vs-image/1.0.0"), &root, None).await;
    assert!((200..300).contains(&st), "{st} {v}");
    let (_, cat) = vs_quiet(&c, &s.api("/catalog"), &root).await;
    assert!(
        !cat.as_array()
            .unwrap()
            .iter()
            .any(|e| e.get("vs-image").is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))),
        "{cat}"
    );

    // The reverse proxy as the extension reads it.
    let (st, rp) = vs_quiet(&c, &s.api("/reverse-proxy"), &root).await;
    assert_eq!(st, 200, "{rp}");
    assert!(rp["enabled"].is_boolean() && rp["host"].is_string(), "{rp}");
    let (st, hosts) = vs_quiet(&c, &s.api("/reverse-proxy/hosts"), &root).await;
    assert_eq!((st, hosts.is_array()), (200, true), "{hosts}");
}

/// Orchestrator mode: hosts (add, update, enable/disable with a null body, remove), the
/// overview, VMs (with `host_id`), a create answering 200, state changes, unregister through
/// the host's route, the host's cache and reverse proxy.
#[tokio::test]
async fn orchestrator_as_the_extension_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(&dir.path().join("a"));
    let agent = fake.agent(
        &dir.path().join("a/data"),
        &[("ENABLED_MODULES", "api,host,catalog,reverse_proxy"), ("SYSTEM_RESERVED_CPU", "0")],
    );
    let orch = Server::start(
        &dir.path().join("orch"),
        &[("ENABLED_MODULES", "api,orchestrator,catalog"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")],
    );
    let (root, _) = vs_login(&c, &orch, "root@localhost", ROOT_PASSWORD).await;
    let Auth::Bearer(token) = &root else { unreachable!() };
    push_golden(&orch, token, dir.path(), &fake.images.join("golden.pvm"), "vs-image");

    let body = json!({"host": agent.url, "description": "vs host", "tags": ["vs"],
        "authentication": {"username": "root", "password": ROOT_PASSWORD}});
    let (st, h) = vs(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "{st} {h}");
    let hid = h["id"].as_str().unwrap().to_string();
    let hosts = orch.api("/orchestrator/hosts");
    wait_for("the host is healthy", std::time::Duration::from_secs(30), || {
        let (c, hosts, root) = (c.clone(), hosts.clone(), root.clone());
        async move {
            let (_, v) = vs_quiet(&c, &hosts, &root).await;
            v.as_array().is_some_and(|a| a.iter().any(|h| h["state"] == "healthy"))
        }
    })
    .await;
    let (st, list) = vs_quiet(&c, &hosts, &root).await;
    assert_eq!(st, 200, "{list}");
    let host = list.as_array().unwrap().iter().find(|x| x["id"] == hid.as_str()).unwrap().clone();
    check_orchestrator_host(&host);
    assert_eq!((host["description"].as_str(), host["tags"].clone()), (Some("vs host"), json!(["vs"])), "{host}");
    assert!(host["reverse_proxy_hosts"].is_array() || host["reverse_proxy_hosts"].is_null(), "{host}");

    // PUT {description} and enable/disable with a null body.
    let url = orch.api(&format!("/orchestrator/hosts/{hid}"));
    let (st, v) = vs(&c, Method::PUT, &url, &root, Some(json!({"description": "vs host 2"}))).await;
    assert!((200..300).contains(&st), "{st} {v}");
    for (verb, want) in [("disable", false), ("enable", true)] {
        let (st, v) = vs_null(&c, Method::PUT, &format!("{url}/{verb}"), &root).await;
        assert!((200..300).contains(&st), "{verb}: {st} {v}");
        let (_, h) = vs(&c, Method::GET, &url, &root, None).await;
        assert_eq!((h["enabled"].as_bool(), h["description"].as_str()), (Some(want), Some("vs host 2")), "{h}");
    }
    let (st, v) = vs_quiet(&c, &orch.api("/orchestrator/overview/resources"), &root).await;
    assert_eq!((st, v.is_array()), (200, true), "{v}");

    // Create through the orchestrator: 200; the VM answer carries host_id.
    let authority = orch.url.trim_start_matches("http://");
    let body = json!({"name": "vs-orch-vm", "architecture": "x86_64", "start_on_create": false,
        "catalog_manifest": {"catalog_id": "vs-image", "version": "1.0.0",
            "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}")}});
    let (st, made) = vs(&c, Method::POST, &orch.api("/orchestrator/machines"), &root, Some(body)).await;
    assert_eq!(st, 200, "the extension needs 200: {made}");
    let id = made["id"].as_str().unwrap().to_string();
    let (st, vms) = vs_quiet(&c, &orch.api("/orchestrator/machines"), &root).await;
    assert_eq!(st, 200, "{vms}");
    let vm = vms.as_array().unwrap().iter().find(|v| v["ID"] == id.as_str()).expect("listed").clone();
    assert_eq!(vm["host_id"], hid.as_str(), "unregister needs host_id: {vm}");
    let set = orch.api(&format!("/orchestrator/machines/{id}/set"));
    for (op, want) in [("start", "running"), ("stop", "stopped")] {
        let (st, v) = vs(&c, Method::PUT, &set, &root, Some(state_op(op))).await;
        assert_eq!(st, 200, "{op}: {v}");
        assert_eq!(v["operations"][0]["status"], "success", "{v}");
        // The extension refreshes its tree right after the answer: the record already
        // shows the new state (no polling).
        let (st, v) = vs(&c, Method::GET, &orch.api(&format!("/orchestrator/machines/{id}")), &root, None).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["State"], want, "State right after set {op}: {v}");
    }

    // The host's cache (the create pulled the image there): list, DELETE 202.
    let cache = orch.api(&format!("/orchestrator/hosts/{hid}/catalog/cache"));
    let (st, v) = vs_quiet(&c, &cache, &root).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["manifests"].as_array().is_some_and(|m| !m.is_empty()), "{v}");
    let (st, v) = vs(&c, Method::DELETE, &cache, &root, None).await;
    assert_eq!(st, 202, "{v}");
    let (_, v) = vs_quiet(&c, &cache, &root).await;
    assert_eq!(v["manifests"].as_array().map(Vec::len).unwrap_or(0), 0, "{v}");

    // Unregister through /orchestrator/hosts/{vm.host_id}/machines/{id}/unregister.
    let host_id = vm["host_id"].as_str().unwrap();
    let url = orch.api(&format!("/orchestrator/hosts/{host_id}/machines/{id}/unregister"));
    let (st, v) = vs(&c, Method::POST, &url, &root, Some(json!({"id": id, "clean_source_uuid": true}))).await;
    assert!((200..300).contains(&st), "{st} {v}");
    wait_for("the VM leaves the orchestrator's list", std::time::Duration::from_secs(30), || {
        let (c, url, root, id) = (c.clone(), orch.api("/orchestrator/machines"), root.clone(), id.clone());
        async move {
            let (_, v) = vs_quiet(&c, &url, &root).await;
            v.as_array().is_some_and(|a| !a.iter().any(|m| m["ID"] == id.as_str()))
        }
    })
    .await;

    // The host's reverse proxy.
    let (st, rp) = vs_quiet(&c, &orch.api(&format!("/orchestrator/hosts/{hid}/reverse-proxy")), &root).await;
    assert_eq!(st, 200, "{rp}");
    assert!(rp["enabled"].is_boolean(), "{rp}");
    let (st, v) = vs_quiet(&c, &orch.api(&format!("/orchestrator/hosts/{hid}/reverse-proxy/hosts")), &root).await;
    assert_eq!((st, v.is_array()), (200, true), "{v}");

    let (st, v) = vs(&c, Method::DELETE, &url_of(&orch, &hid), &root, None).await;
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, v) = vs(&c, Method::GET, &url_of(&orch, &hid), &root, None).await;
    assert_eq!(st, 404, "{v}");
}

fn url_of(orch: &Server, hid: &str) -> String {
    orch.api(&format!("/orchestrator/hosts/{hid}"))
}
