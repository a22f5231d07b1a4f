//! The reverse_proxy module through the API: a proxy host created over REST starts a real
//! listener at once, forwards to a real upstream, can demand a Hangar credential (which
//! never reaches the upstream), answers 502 when the target is down, and hides private keys.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// An upstream on 127.0.0.1 that echoes what it saw.
async fn upstream() -> (u16, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen2 = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = seen2.clone();
        async move {
            let headers: serde_json::Map<String, Value> =
                req.headers().iter().map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("")))).collect();
            let v = json!({"path": req.uri().path(), "headers": headers});
            seen.lock().unwrap().push(v.clone());
            axum::Json(v)
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (port, seen)
}

#[tokio::test]
async fn a_proxy_host_made_over_rest_forwards_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api,reverse_proxy")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let (up, seen) = upstream().await;

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
