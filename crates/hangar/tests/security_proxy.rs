//! Issue 12, the reverse-proxy rows: each test runs the real `hangar` binary on loopback,
//! makes the attack the issue found, and shows what happens now.
//!
//! * row 1: a proxy host id that climbs out of the key folder wrote its `tls.key` text over the
//!   store's key file before the request was refused;
//! * row 5: a listener on the API's own port (or a privileged port, or a port in use) was
//!   accepted, and at the next start the proxy took the API's port and Hangar exited;
//! * row 6: `tls.cert`/`tls.key` paths served any readable file, and the errors told whether a
//!   file exists;
//! * row 15: `require_auth` let any account through, whatever its claims, to any VM;
//! * row 17: two `Host` headers were both forwarded on the hyper path.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

fn route_to(up: u16) -> Value {
    json!([{"path": "/", "target_host": "127.0.0.1", "target_port": up}])
}

/// Row 1 (critical): ids are checked before anything is written, key files get names Hangar
/// makes, and a refused request leaves no file behind.
#[tokio::test]
async fn row01_a_host_id_cannot_write_a_key_outside_the_key_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // The store's encryption key, where `<data>/secrets/proxy/../../store.key` lands.
    let store_key = data.join("store.key");
    let key_text = "7f".repeat(32);
    std::fs::write(&store_key, &key_text).unwrap();
    let key_setting = store_key.to_str().unwrap().to_string();
    let settings = [("ENABLED_MODULES", "api,reverse_proxy"), ("DATABASE_ENCRYPTION_KEY_FILE", key_setting.as_str())];
    let mut s = Server::start(&data, &settings);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (up, _) = echo_upstream().await;
    let (_, cert, pem_key) = test_pki();
    let keys_dir = data.join("secrets").join("proxy");

    // The attack: the id climbs out of the key folder; the certificate is bad, so the request
    // is refused, but the old code had written the key text first.
    for id in ["../../store", "../../../store", "a/b", "..", " web", "-x"] {
        let body = json!({"id": id, "name": "evil", "host": "127.0.0.1", "port": "0",
            "tls": {"enabled": true, "cert": "not a certificate", "key": pem_key},
            "http_routes": route_to(up)});
        let (st, v) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
        assert_eq!(st, 400, "id {id:?}: {v}");
        assert!(v["message"].as_str().unwrap().contains("proxy host id"), "the answer names the id: {v}");
    }
    assert_eq!(std::fs::read_to_string(&store_key).unwrap(), key_text, "the store's key file was overwritten");
    assert!(!dir.path().join("store.key").exists(), "a key file was written above the data folder");
    assert_eq!(files_in(&keys_dir), Vec::<String>::new(), "a refused request left a key file");

    // A good id but a refused host (bad certificate): nothing is written either.
    let body = json!({"id": "web-1", "name": "web", "host": "127.0.0.1", "port": "0",
        "tls": {"enabled": true, "cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "key": pem_key},
        "http_routes": route_to(up)});
    let (st, v) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(files_in(&keys_dir), Vec::<String>::new(), "a refused request left a key file");

    // A good host: its key goes to a file in the key folder, 0600, named by Hangar.
    let body = json!({"id": "web-1", "name": "web", "host": "127.0.0.1", "port": "0",
        "tls": {"enabled": true, "cert": cert, "key": pem_key}, "http_routes": route_to(up)});
    let (st, v) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["tls"]["key"], "********");
    let files = files_in(&keys_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(!files[0].contains("web"), "the key file is named from client input: {files:?}");
    let key_file = keys_dir.join(&files[0]);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), pem_key.trim());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);

    // An update that is refused keeps the stored key file and adds none; deleting the host
    // removes its key file.
    let bad = json!({"name": "web", "host": "127.0.0.1", "port": "0",
        "tls": {"enabled": true, "cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "key": pem_key},
        "http_routes": route_to(up)});
    let (st, v) = call(&c, Method::PUT, &s.api("/reverse-proxy/hosts/web-1"), &ra, Some(bad), &[]).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(files_in(&keys_dir), files, "a refused update changed the key folder");
    let (st, v) = call(&c, Method::DELETE, &s.api("/reverse-proxy/hosts/web-1"), &ra, None, &[]).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(files_in(&keys_dir), Vec::<String>::new(), "the deleted host's key file stays");

    // The server still starts with its store key.
    s.stop();
    let s = Server::start(&data, &settings);
    login(&c, &s, "root", ROOT_PASSWORD).await;
}

/// Row 5: the API's ports, privileged ports and ports in use are refused with a 4xx naming
/// the problem; a stored listener on the API's port does not keep the API from starting.
#[tokio::test]
async fn row05_a_listener_cannot_take_the_apis_port_and_never_stops_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let api_port = free_port();
    let settings = [("ENABLED_MODULES", "api,reverse_proxy")];
    let mut s = Server::launch(None, ("127.0.0.1", api_port), &data, &settings, true, &[]);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (up, _) = echo_upstream().await;
    let create = |name: &str, port: Value| {
        let c = c.clone();
        let url = s.api("/reverse-proxy/hosts");
        let ra = ra.clone();
        let body = json!({"name": name, "host": "127.0.0.1", "port": port, "http_routes": route_to(up)});
        async move { call(&c, Method::POST, &url, &ra, Some(body), &[]).await }
    };

    // The API's own port.
    let (st, v) = create("on-api", json!(api_port)).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("API_PORT"), "{v}");
    // Privileged ports, given or by default (an empty port means 80).
    for port in [json!(80), json!("443"), Value::Null] {
        let (st, v) = create("low", port.clone()).await;
        assert_eq!(st, 400, "port {port}: {v}");
        assert!(v["message"].as_str().unwrap().contains("privileged"), "{v}");
    }
    // A port another program holds.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();
    let (st, v) = create("held", json!(held_port)).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("already in use"), "{v}");
    drop(held);
    // Moving a host onto the API's port is refused too.
    let (st, h) = create("mover", json!(0)).await;
    assert_eq!(st, 201, "{h}");
    let id = h["id"].as_str().unwrap().to_string();
    let mut moved = h.clone();
    moved["port"] = json!(api_port);
    moved["tls"]["key"] = json!("");
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/reverse-proxy/hosts/{id}")), &ra, Some(moved), &[]).await;
    assert_eq!(st, 400, "{v}");
    let (_, list) = call(&c, Method::GET, &s.api("/reverse-proxy/hosts"), &ra, None, &[]).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "only the good host is stored: {list}");

    // A host on a free port, then the server restarted with that port as its API port: the
    // API starts, and the host is reported as failed, naming the reason.
    let next = free_port();
    let (st, v) = create("later-clash", json!(next)).await;
    assert_eq!(st, 201, "{v}");
    let clash_id = v["id"].as_str().unwrap().to_string();
    s.stop();
    let s = Server::launch(None, ("127.0.0.1", next), &data, &settings, true, &[]);
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, h) = call(&c, Method::GET, &s.api(&format!("/reverse-proxy/hosts/{clash_id}")), &ra, None, &[]).await;
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["listener"]["state"], "failed", "{h}");
    assert!(h["listener"]["error"].as_str().unwrap().contains("API_PORT"), "{h}");
    assert!(s.log().contains("proxy listener failed"), "the failure is logged");
    // The other host still serves.
    let (_, h) = call(&c, Method::GET, &s.api(&format!("/reverse-proxy/hosts/{id}")), &ra, None, &[]).await;
    let addr = h["listener"]["local_address"].as_str().unwrap_or_else(|| panic!("not running: {h}")).to_string();
    let r = c.get(format!("http://{addr}/ok")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Row 6: certificate and key paths only inside `REVERSE_PROXY_TLS_FOLDER`; outside it (or
/// without it) the error is the same whether the file exists or not.
#[tokio::test]
async fn row06_tls_paths_are_confined_to_the_tls_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki();
    // Readable key material outside the folder (as root's keys would be), and inside it.
    let outside = dir.path().join("outside");
    let folder = dir.path().join("tls");
    for d in [&outside, &folder] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("cert.pem"), &cert).unwrap();
        std::fs::write(d.join("key.pem"), &key).unwrap();
    }
    std::os::unix::fs::symlink(outside.join("key.pem"), folder.join("link.pem")).unwrap();
    let (up, _) = echo_upstream().await;
    let c = client();
    let o = |f: &str| outside.join(f).to_str().unwrap().to_string();
    let i = |f: &str| folder.join(f).to_str().unwrap().to_string();
    let body = |cert: &str, key: &str| {
        json!({"name": "tls", "host": "127.0.0.1", "port": "0",
            "tls": {"enabled": true, "cert": cert, "key": key}, "http_routes": route_to(up)})
    };

    // Without the setting, no path is accepted, and every refusal reads the same (a
    // certificate file that exists, one that does not, one the server may not read).
    let s = Server::start(&dir.path().join("d1"), &[("ENABLED_MODULES", "api,reverse_proxy")]);
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let mut messages = Vec::new();
    for (ce, ke) in [
        (o("cert.pem"), key.clone()),
        (o("missing.pem"), key.clone()),
        ("/etc/shadow".into(), key.clone()),
        (cert.clone(), o("key.pem")),
    ] {
        let (st, v) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body(&ce, &ke)), &[]).await;
        assert_eq!(st, 400, "{v}");
        messages.push(v["message"].as_str().unwrap().to_string());
    }
    assert!(messages[0].contains("REVERSE_PROXY_TLS_FOLDER"), "{messages:?}");
    assert!(messages[..3].iter().all(|m| *m == messages[0]), "the errors differ: {messages:?}");
    assert!(messages[3].contains("tls.key") && messages[3].contains("REVERSE_PROXY_TLS_FOLDER"), "{messages:?}");
    drop(s);

    // With the folder set: paths outside it, up and out of it, or linked out of it are
    // refused alike; a key file that exists and one that does not give the same error.
    let folder_s = folder.to_str().unwrap().to_string();
    let mut s = Server::start(
        &dir.path().join("d2"),
        &[("ENABLED_MODULES", "api,reverse_proxy"), ("REVERSE_PROXY_TLS_FOLDER", folder_s.as_str())],
    );
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let mut messages = Vec::new();
    for ke in [o("key.pem"), o("missing.pem"), i("../outside/key.pem"), i("link.pem"), "../outside/key.pem".into()] {
        let (st, v) =
            call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body(&i("cert.pem"), &ke)), &[]).await;
        assert_eq!(st, 400, "key {ke}: {v}");
        messages.push(v["message"].as_str().unwrap().to_string());
    }
    assert!(messages[0].contains("tls.key") && messages[0].contains("outside"), "{messages:?}");
    assert!(messages.iter().all(|m| *m == messages[0]), "the errors differ: {messages:?}");
    let (_, list) = call(&c, Method::GET, &s.api("/reverse-proxy/hosts"), &ra, None, &[]).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

    // Inside the folder (absolute or relative to it), the files serve.
    let (st, h) =
        call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body(&i("cert.pem"), "key.pem")), &[]).await;
    assert_eq!(st, 201, "{h}");
    let addr: std::net::SocketAddr = h["listener"]["local_address"].as_str().unwrap().parse().unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let r = trusting.get(format!("https://localhost:{}/x", addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Started again without the folder, the stored paths are outside it: the host is kept
    // but not started, and the log says why.
    let id = h["id"].as_str().unwrap().to_string();
    s.stop();
    let s = Server::start(&dir.path().join("d2"), &[("ENABLED_MODULES", "api,reverse_proxy")]);
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, h) = call(&c, Method::GET, &s.api(&format!("/reverse-proxy/hosts/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 200, "{h}");
    assert!(h.get("listener").is_none(), "a host with paths outside the folder runs: {h}");
    assert!(s.log().contains("proxy host not started"), "not logged");
}

/// Make the fake report `ip` as the VM's address while it runs.
fn set_fake_ip(fake: &FakeParallels, vm_id: &str, ip: &str) {
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(fake.state.join(".lock")).unwrap();
    lock.lock().unwrap();
    let path = fake.state.join("vms").join(format!("{vm_id}.json"));
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["ip_address"] = json!(ip);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

async fn grant(c: &reqwest::Client, s: &Server, root: &Auth, user_id: &str, claims: &[&str]) {
    for claim in claims {
        let url = s.api(&format!("/auth/users/{user_id}/claims"));
        let (st, v) = call(c, Method::POST, &url, root, Some(json!({"name": claim})), &[]).await;
        assert_eq!(st, 201, "grant {claim}: {v}");
    }
}

/// Row 15: a listener can require claims or roles, and a VM target its owner.
#[tokio::test]
async fn row15_listeners_require_claims_roles_and_the_vms_owner() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[("ENABLED_MODULES", "api,host,reverse_proxy")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let (alice_id, _) = make_user(&c, &s, &root, "alice").await;
    let (bob_id, _) = make_user(&c, &s, &root, "bob").await;
    grant(&c, &s, &ra, &alice_id, &["CREATE_VM", "LIST_VM"]).await;
    grant(&c, &s, &ra, &bob_id, &["CREATE_VM", "LIST_VM"]).await;
    let alice = login(&c, &s, "alice", USER_PASSWORD).await;
    let bob = login(&c, &s, "bob", USER_PASSWORD).await;
    let (up, seen) = echo_upstream().await;

    // Claims: bob is a valid account but lacks the claim: 403; root (SUPER_USER) passes.
    let body = json!({"name": "ops", "host": "127.0.0.1", "port": "0", "require_auth": true,
        "required_claims": ["CONFIGURE_REVERSE_PROXY"], "http_routes": route_to(up)});
    let (st, h) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    assert_eq!(h["required_claims"], json!(["CONFIGURE_REVERSE_PROXY"]), "{h}");
    let ops = h["listener"]["local_address"].as_str().unwrap().to_string();
    let get = |addr: &str, token: &str, path: &str| {
        let r = c.get(format!("http://{addr}{path}")).bearer_auth(token).send();
        async move { r.await.unwrap() }
    };
    let before = seen.lock().unwrap().len();
    let r = get(&ops, &bob, "/ops").await;
    assert_eq!(r.status(), 403, "a valid account without the claim passed");
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("CONFIGURE_REVERSE_PROXY"), "{v}");
    assert_eq!(seen.lock().unwrap().len(), before, "the refused request reached the upstream");
    assert_eq!(get(&ops, &root, "/ops").await.status(), 200);
    // Granted the claim, bob passes.
    grant(&c, &s, &ra, &bob_id, &["CONFIGURE_REVERSE_PROXY"]).await;
    let bob2 = login(&c, &s, "bob", USER_PASSWORD).await;
    assert_eq!(get(&ops, &bob2, "/ops").await.status(), 200);

    // Roles: only holders of SUPER_USER.
    let body = json!({"name": "admins", "host": "127.0.0.1", "port": "0",
        "required_roles": ["SUPER_USER"], "http_routes": route_to(up)});
    let (st, h) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let admins = h["listener"]["local_address"].as_str().unwrap().to_string();
    assert_eq!(c.get(format!("http://{admins}/")).send().await.unwrap().status(), 401, "no credential");
    assert_eq!(get(&admins, &alice, "/").await.status(), 403);
    assert_eq!(get(&admins, &root, "/").await.status(), 200);

    // The VM's owner: alice's VM, served to alice (and root), not to bob.
    let (st, vm) = call(
        &c,
        Method::POST,
        &s.api("/machines"),
        &Auth::Bearer(alice.clone()),
        Some(json!({"name": "alice-vm", "image": "golden.pvm", "start_on_create": true})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{vm}");
    assert_eq!(vm["owner"], "alice");
    let vm_id = vm["id"].as_str().unwrap().to_string();
    // The fake reports 127.0.0.1 as the guest's address: its "web server" is the upstream.
    set_fake_ip(&fake, &vm_id, "127.0.0.1");
    let body = json!({"name": "alice-web", "host": "127.0.0.1", "port": "0", "require_auth": true,
        "require_vm_owner": true, "http_routes": [{"path": "/", "target_vm_id": vm_id, "target_port": up}]});
    let (st, h) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    assert_eq!(h["require_vm_owner"], true, "{h}");
    let web = h["listener"]["local_address"].as_str().unwrap().to_string();
    let r = get(&web, &bob, "/").await;
    assert_eq!(r.status(), 403, "bob reached alice's VM");
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("not yours"), "{v}");
    // alice and root reach it.
    for who in [&alice, &root] {
        let r = get(&web, who, "/vm").await;
        let st = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(st, 200, "{text}");
    }
    assert_eq!(get(&web, &bob, "/vm").await.status(), 403);
}

/// Row 15 through an orchestrator: a VM of the fleet (reached through its host) is served to
/// its owner only, the owner as the orchestrator sees it.
#[tokio::test]
async fn row15_fleet_vm_targets_require_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let OneHostFleet { fake, agent: _agent, orch, root } =
        one_host_fleet(&c, dir.path(), "api,orchestrator,reverse_proxy").await;
    let ra = Auth::Bearer(root.clone());
    let (alice_id, _) = make_user(&c, &orch, &root, "alice").await;
    let (bob_id, _) = make_user(&c, &orch, &root, "bob").await;
    grant(&c, &orch, &ra, &alice_id, &["CREATE_VM", "LIST_VM"]).await;
    grant(&c, &orch, &ra, &bob_id, &["CREATE_VM", "LIST_VM"]).await;
    let alice = login(&c, &orch, "alice", USER_PASSWORD).await;
    let bob = login(&c, &orch, "bob", USER_PASSWORD).await;
    let body = json!({"name": "alice-fleet", "image": "golden.pvm", "start_on_create": true,
        "specs": {"cpu": "1", "memory": "512"}});
    let url = orch.api("/orchestrator/machines");
    let (st, vm) = call(&c, Method::POST, &url, &Auth::Bearer(alice.clone()), Some(body), &[]).await;
    assert_eq!(st, 200, "{vm}");
    assert_eq!(vm["owner"], "alice", "{vm}");
    let vm_id = vm["id"].as_str().unwrap().to_string();
    set_fake_ip(&fake, &vm_id, "127.0.0.1");
    let (up, _) = echo_upstream().await;

    let body = json!({"name": "fleet-web", "host": "127.0.0.1", "port": "0", "require_vm_owner": true,
        "http_routes": [{"path": "/", "target_vm_id": vm_id, "target_port": up}]});
    let (st, h) = call(&c, Method::POST, &orch.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let web = h["listener"]["local_address"].as_str().unwrap().to_string();
    let get = |token: &str| {
        let r = c.get(format!("http://{web}/fleet")).bearer_auth(token).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (st, text) = get(&bob).await;
    assert_eq!(st, 403, "bob reached alice's VM: {text}");
    for who in [&alice, &root] {
        let (st, text) = get(who).await;
        assert_eq!(st, 200, "{text}");
    }
}

/// Send a raw request and read the status code of the answer.
async fn raw_status(addr: &str, request: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("an answer within 10 s").unwrap();
        assert!(n > 0, "closed without an answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf).lines().next().unwrap().to_string();
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Row 17: a request with two `Host` headers is refused (400) and never forwarded, on both
/// lanes (the fast lane hands such a request to hyper).
#[tokio::test]
async fn row17_two_host_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api,reverse_proxy")]);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (up, seen) = echo_upstream().await;
    let body = json!({"name": "web", "host": "127.0.0.1", "port": "0", "http_routes": route_to(up)});
    let (st, h) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let addr = h["listener"]["local_address"].as_str().unwrap().to_string();

    let one = "GET /one HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(&addr, one).await, 200);
    assert_eq!(seen.lock().unwrap().len(), 1);
    for request in [
        // hyper's lane (Connection: close)
        "GET /two HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        // sent to the fast lane, which hands it over
        "GET /two HTTP/1.1\r\nHost: a.test\r\nhost: b.test\r\n\r\n",
        // HTTP/1.0
        "GET /two HTTP/1.0\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
    ] {
        assert_eq!(raw_status(&addr, request).await, 400, "{request:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "a request with two Host headers reached the upstream: {seen:?}");
}
