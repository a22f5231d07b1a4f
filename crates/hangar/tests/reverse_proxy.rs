//! The reverse_proxy module through the API: a proxy host created over REST starts a real
//! listener at once, forwards to a real upstream, can demand a Hangar credential (which
//! never reaches the upstream), answers 502 when the target is down, and hides private keys.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn a_proxy_host_made_over_rest_forwards_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api,reverse_proxy")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let (up, seen) = echo_upstream().await;
    // Route state changes reach the websocket event stream.
    let ws_url = s.url.replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{ws_url}/api/v1/ws/subscribe?event_types=reverse_proxy&access_token={root}"
    ))
    .await
    .unwrap();

    let key_pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBV8c3ryFXJ8aMZ1xP7y3zZ6sWmV3h1hN4cQ9gQ8b0Xy\n-----END PRIVATE KEY-----\n";
    let body = json!({
        "name": "web", "host": "127.0.0.1", "port": "0",
        "tls": {"enabled": false, "cert": "", "key": key_pem},
        "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up.to_string(), "request_headers": {"X-Via": "hangar"}}]
    });
    let (st, h) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    assert_eq!(h["tls"]["key"], "********", "the private key is never returned: {h}");
    assert!(!h.to_string().contains("MC4CAQAw"));
    let addr = h["listener"]["local_address"].as_str().expect("the listener runs").to_string();
    let id = h["id"].as_str().unwrap().to_string();
    {
        use futures::StreamExt;
        let mut seen_msgs = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(seen_msgs.iter().any(|m: &String| m.contains("REVERSE_PROXY_UPDATED"))
            && seen_msgs.iter().any(|m| m.contains("REVERSE_PROXY_HOST_STATE_CHANGED")))
        {
            let msg = tokio::time::timeout_at(deadline, ws.next())
                .await
                .unwrap_or_else(|_| panic!("no reverse_proxy events within 10 s; got {seen_msgs:?}"))
                .unwrap()
                .unwrap();
            if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                seen_msgs.push(t.to_string());
            }
        }
        assert!(seen_msgs.iter().all(|m| !m.contains("MC4CAQAw")), "no key in events: {seen_msgs:?}");
    }

    let r = c.get(format!("http://{addr}/hello?x=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["headers"]["x-via"], "hangar");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");

    // Protected listener: no credential, 401; a token passes and never reaches the VM side.
    let mut upd = h.clone();
    upd["require_auth"] = json!(true);
    upd["tls"]["key"] = json!("");
    upd.as_object_mut().unwrap().remove("listener");
    let (st, h2) = call(&c, Method::PUT, &s.api(&format!("/reverse-proxy/hosts/{id}")), &ra, Some(upd), &[]).await;
    assert_eq!(st, 200, "{h2}");
    let r = c.get(format!("http://{addr}/private")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(format!("http://{addr}/private")).bearer_auth(&root).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["path"], "/private");
    assert!(last["headers"].get("authorization").is_none(), "the token reached the upstream: {last}");

    // The target down: 502 with a JSON body naming it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (st, _) = call(
        &c,
        Method::POST,
        &s.api(&format!("/reverse-proxy/hosts/{id}/http_routes")),
        &ra,
        Some(json!({"id": "dead", "order": -1, "path": "/dead", "target_host": "127.0.0.1", "target_port": dead})),
        &[],
    )
    .await;
    assert_eq!(st, 200);
    let r = c.get(format!("http://{addr}/dead")).bearer_auth(&root).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 502);

    // Bad input is a 4xx; a TCP route on an HTTP host is a conflict.
    let (st, _) =
        call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(json!({"name": "x", "port": 70000})), &[])
            .await;
    assert!(st == 400 || st == 422, "{st}");
    let (st, _) = call(
        &c,
        Method::POST,
        &s.api(&format!("/reverse-proxy/hosts/{id}/tcp_route")),
        &ra,
        Some(json!({"target_host": "127.0.0.1", "target_port": 1})),
        &[],
    )
    .await;
    assert_eq!(st, 409);

    // Disable stops the listener; delete removes the host.
    let (st, _) = call(&c, Method::PUT, &s.api("/reverse-proxy/disable"), &ra, None, &[]).await;
    assert_eq!(st, 202);
    assert!(c.get(format!("http://{addr}/hello")).send().await.is_err(), "listener stopped");
    let (st, _) = call(&c, Method::PUT, &s.api("/reverse-proxy/enable"), &ra, None, &[]).await;
    assert_eq!(st, 202);
    let (st, _) = call(&c, Method::DELETE, &s.api(&format!("/reverse-proxy/hosts/{id}")), &ra, None, &[]).await;
    assert_eq!(st, 202);
    let (_, cfg) = call(&c, Method::GET, &s.api("/reverse-proxy"), &ra, None, &[]).await;
    assert_eq!(cfg["hosts"].as_array().unwrap().len(), 0, "{cfg}");
}

#[tokio::test]
async fn a_tls_listener_is_verified_by_a_client_that_trusts_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api,reverse_proxy")]);
    let c = client();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (up, _) = echo_upstream().await;
    let (ca, cert, key) = test_pki();
    let body = json!({
        "name": "secure", "host": "127.0.0.1", "port": "0",
        "tls": {"enabled": true, "cert": cert, "key": key},
        "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up}]
    });
    let (st, h) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    assert!(!h.to_string().contains("PRIVATE KEY"), "the key came back: {h}");
    let addr: std::net::SocketAddr =
        h["listener"]["local_address"].as_str().expect("the listener runs").parse().unwrap();

    // A client that trusts only the test CA and checks the name `localhost`.
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    let r = trusting.get(format!("https://localhost:{}/over-tls", addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["path"], "/over-tls");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");

    // The same request from a client that does not trust the CA fails at the handshake.
    let stranger = reqwest::Client::builder().resolve("localhost", addr).build().unwrap();
    let e = stranger.get(format!("https://localhost:{}/over-tls", addr.port())).send().await.unwrap_err();
    assert!(e.is_connect(), "expected a certificate failure, got {e:?}");
}

#[tokio::test]
async fn the_config_file_reverse_proxy_table_is_imported_and_the_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (up, seen) = echo_upstream().await;
    let config = dir.path().join("hangar.toml");
    std::fs::write(
        &config,
        format!(
            "enabled_modules = \"api,reverse_proxy\"\n\n[reverse_proxy]\nhost = \"127.0.0.1\"\n\n\
             [[reverse_proxy.hosts]]\nname = \"from-file\"\nhost = \"127.0.0.1\"\nport = \"0\"\n\n\
             [[reverse_proxy.hosts.http_routes]]\npath = \"/\"\ntarget_host = \"127.0.0.1\"\ntarget_port = {up}\n\
             request_headers = {{ X-From = \"file\" }}\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let start = || Server::start_full(&data, &[], true, &[("HANGAR_CONFIG", config.to_str().unwrap())]);
    let c = client();
    let hosts = |s: &Server, auth: Auth| {
        let c = c.clone();
        let url = s.api("/reverse-proxy/hosts");
        async move {
            let (st, v) = call(&c, Method::GET, &url, &auth, None, &[]).await;
            assert_eq!(st, 200, "{v}");
            v.as_array().unwrap().clone()
        }
    };
    let imports = |s: &Server, auth: Auth| {
        let c = c.clone();
        let url = s.api("/audit?limit=1000");
        async move {
            let (st, v) = call(&c, Method::GET, &url, &auth, None, &[]).await;
            assert_eq!(st, 200, "{v}");
            v.as_array().unwrap().iter().filter(|e| e["action"] == "reverse_proxy.import").count()
        }
    };
    let via = |h: &Value| {
        let c = c.clone();
        let addr = h["listener"]["local_address"].as_str().unwrap_or_else(|| panic!("no listener: {h}")).to_string();
        async move {
            let r = c.get(format!("http://{addr}/x")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };

    // First start: the file's host exists and serves.
    let mut s = start();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let list = hosts(&s, ra.clone()).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let file_host = list[0].clone();
    assert_eq!(file_host["name"], "from-file");
    via(&file_host).await;
    assert_eq!(seen.lock().unwrap().last().unwrap()["headers"]["x-from"], "file");
    assert_eq!(imports(&s, ra.clone()).await, 1);

    // The API changes the file's host and adds its own.
    let id = file_host["id"].as_str().unwrap().to_string();
    let mut changed = file_host.clone();
    changed["http_routes"][0]["request_headers"] = json!({"X-From": "api"});
    changed.as_object_mut().unwrap().remove("listener");
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/reverse-proxy/hosts/{id}")), &ra, Some(changed), &[]).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(&c, Method::POST, &s.api("/reverse-proxy/hosts"), &ra,
        Some(json!({"name": "api-made", "host": "127.0.0.1", "port": "0", "tcp_route": {"target_host": "127.0.0.1", "target_port": up}})), &[]).await;
    assert_eq!(st, 201, "{v}");
    s.stop();

    // Restart: the file wins for its host (same id), the API's host stays.
    let mut s = start();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let list = hosts(&s, ra.clone()).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let file_host = list.iter().find(|h| h["name"] == "from-file").unwrap().clone();
    assert_eq!(file_host["id"], id.as_str(), "the file's host keeps its id");
    assert!(list.iter().any(|h| h["name"] == "api-made"));
    via(&file_host).await;
    assert_eq!(seen.lock().unwrap().last().unwrap()["headers"]["x-from"], "file", "the file wins");
    assert_eq!(imports(&s, ra.clone()).await, 2);
    s.stop();

    // Another start with the same file changes nothing and writes nothing.
    let s = start();
    let ra = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    assert_eq!(hosts(&s, ra.clone()).await.len(), 2);
    assert_eq!(imports(&s, ra).await, 2, "importing the same file again is a no-op");
}
