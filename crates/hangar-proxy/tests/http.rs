//! HTTP proxying through real sockets: routing, headers, errors, websocket, HTTP/2, TLS, auth.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use futures::{SinkExt, StreamExt};
use hangar_proxy::{AuthRejection, ProxyAuth, ProxyEvent, ProxyManager, UpstreamTrust};
use http::HeaderMap;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn manager() -> ProxyManager {
    ProxyManager::builder().build().unwrap()
}

#[tokio::test]
async fn routes_by_order_prefix_regex_and_host() {
    let a = http_upstream("127.0.0.1:0", "a").await;
    let b = http_upstream("127.0.0.1:0", "b").await;
    let c = http_upstream("127.0.0.1:0", "c").await;
    let m = manager();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "prefix", "order": 3, "path": "/a", "target_host": "127.0.0.1", "target_port": a.addr.port()},
        {"id": "regex", "order": 2, "pattern": "^/items/[0-9]+$", "target_host": "127.0.0.1", "target_port": b.addr.port().to_string()},
        {"id": "vhost", "order": 1, "host_match": "api.test", "path": "/", "target_host": "127.0.0.1", "target_port": c.addr.port()},
        {"id": "shadowed", "order": 4, "path": "/a/deep", "target_host": "127.0.0.1", "target_port": c.addr.port()}
    ]}]}));
    let addr = apply(&m, &cfg, "web").await;
    let get = |path: &'static str, host: &'static str| async move {
        raw_http(addr, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).await
    };

    let r = get("/a/x?q=1", "proxy.test").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["label"], "a");
    assert_eq!(r.json()["uri"], "/a/x?q=1", "path and query are forwarded unchanged");
    assert_eq!(get("/a", "proxy.test").await.json()["label"], "a");
    assert_eq!(get("/a/deep/x", "proxy.test").await.json()["label"], "a", "a lower order wins");
    assert_eq!(get("/items/42", "proxy.test").await.json()["label"], "b");
    assert_eq!(get("/anything", "API.test:8080").await.json()["label"], "c", "host match ignores case and port");

    let r = get("/ax", "proxy.test").await;
    assert_eq!(r.status, 404, "prefixes match whole segments");
    assert_eq!(r.json()["code"], 404);
    assert_eq!(get("/items/x", "proxy.test").await.status, 404);
}

#[tokio::test]
async fn headers_are_rewritten() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let m = manager();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [{
        "id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port(),
        "request_headers": {"X-Added": "yes", "X-Remove": ""},
        "response_headers": {"X-Served-By": "hangar", "X-Remove-Me": ""}
    }]}]}));
    let addr = apply(&m, &cfg, "web").await;
    let r = raw_http(
        addr,
        "GET /h HTTP/1.1\r\nHost: proxy.test:1234\r\nConnection: close, X-Secret\r\nX-Secret: s\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nProxy-Foo: 1\r\nUpgrade: foo\r\nTE: trailers\r\n\
         X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-Proto: https\r\nX-Remove: bye\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], json!(["10.0.0.1, 127.0.0.1"]), "the socket peer is appended");
    assert_eq!(h["x-forwarded-host"], json!(["proxy.test:1234"]), "client X-Forwarded-Host is replaced");
    assert_eq!(h["x-forwarded-proto"], json!(["http"]), "client X-Forwarded-Proto is replaced");
    assert_eq!(h["host"], json!(["proxy.test:1234"]), "Host is kept");
    assert_eq!(h["x-added"], json!(["yes"]));
    assert_eq!(h["te"], json!(["trailers"]), "TE: trailers may pass");
    for gone in ["x-secret", "keep-alive", "proxy-authorization", "proxy-foo", "upgrade", "x-remove"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    assert!(h.get("connection").is_none_or(|v| v == &json!(["keep-alive"])), "client Connection passed: {h}");

    assert_eq!(r.header("x-upstream"), Some("up"));
    assert_eq!(r.header("x-served-by"), Some("hangar"));
    assert_eq!(r.header("x-remove-me"), None);
    assert_eq!(r.header("x-resp-hop"), None, "a header named in the upstream's Connection is removed");

    // An HTTP/1.0 request without Host: the target still gets one (its own address).
    let r = raw_http(addr, "GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert_eq!(h["host"], json!([up.addr.to_string()]));
    assert!(h.get("x-forwarded-host").is_none(), "{h}");
}

#[tokio::test]
async fn keep_alive_clients_reuse_one_upstream_connection() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let m = manager();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}
    ]}]}));
    let addr = apply(&m, &cfg, "web").await;
    let client = reqwest::Client::builder().http1_only().pool_max_idle_per_host(1).build().unwrap();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let r = client.get(format!("http://{addr}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    for path in ["/1", "/2", "/3"] {
        assert_eq!(get(path).await["uri"], path);
    }
    assert_eq!(
        up.conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection for one client connection"
    );
    // The target closes its side: the next request goes out on a new connection.
    assert_eq!(get("/close").await["uri"], "/close");
    assert_eq!(get("/4").await["uri"], "/4");
    assert_eq!(up.conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(m.status().await.listener("web").unwrap().total_connections, 1, "the client kept its connection");
}

#[tokio::test]
async fn unreachable_target_is_502_and_slow_target_is_504() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let dead = closed_port().await;
    let m = manager();
    let mut events = m.subscribe();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "dead", "path": "/dead", "target_host": "127.0.0.1", "target_port": dead},
        {"id": "slow", "path": "/slow", "target_host": "127.0.0.1", "target_port": up.addr.port(), "timeout_seconds": "1"}
    ]}]}));
    let addr = apply(&m, &cfg, "web").await;

    let r = raw_http(addr, "GET /dead HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 502);
    let body = r.json();
    assert_eq!(body["code"], 502);
    assert_eq!(body["error"], "bad_gateway");
    assert_eq!(body["target"], format!("127.0.0.1:{dead}"));
    assert!(body["message"].as_str().unwrap().contains("refused or unreachable"), "{body}");

    let start = Instant::now();
    let r = raw_http(addr, "GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 504);
    assert!(start.elapsed() < Duration::from_secs(10), "the route timeout was not applied");
    let body = r.json();
    assert_eq!(body["error"], "gateway_timeout");
    assert_eq!(body["target"], up.addr.to_string());

    let mut failed = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let ProxyEvent::RouteFailed { route_id, .. } = e {
            failed.push(route_id);
        }
    }
    assert_eq!(failed, ["dead", "slow"]);
}

#[tokio::test]
async fn websocket_passes_through() {
    let ws = ws_upstream("127.0.0.1:0", "ws").await;
    let m = manager();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "ws", "path": "/ws", "target_host": "127.0.0.1", "target_port": ws.addr.port()}
    ]}]}));
    let addr = apply(&m, &cfg, "web").await;
    let (mut client, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat")).await.unwrap();
    assert_eq!(resp.status(), 101);
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("ws:hello"));
    let big = vec![7u8; 200_000];
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap().into_data(), big);
    client.close(None).await.unwrap();
}

#[tokio::test]
async fn http2_clients_and_h2c_targets() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let m = manager();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "h2c", "path": "/grpc", "schema": "h2c", "target_host": "127.0.0.1", "target_port": up.addr.port()},
        {"id": "h1", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}
    ]}]}));
    let addr = apply(&m, &cfg, "web").await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();

    let r = client.post(format!("http://{addr}/x")).body(vec![1u8; 100_000]).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["version"], "HTTP/1.1", "an HTTP/1.1 route speaks HTTP/1.1 to its target");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["body_len"], 100_000, "the request body is streamed through");
    assert_eq!(v["headers"]["host"], json!([addr.to_string()]), "an HTTP/2 :authority becomes Host");
    assert_eq!(v["headers"]["x-forwarded-host"], json!([addr.to_string()]));

    let v: serde_json::Value = client.get(format!("http://{addr}/grpc/x")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["version"], "HTTP/2.0", "an h2c route speaks HTTP/2 to its target");
}

#[tokio::test]
async fn tls_listener_and_https_target() {
    let (ca, leaf, key) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("leaf.pem");
    std::fs::write(&cert_path, &leaf).unwrap();
    let up = http_upstream("127.0.0.1:0", "up").await;

    // Inner: a TLS listener (cert from a file, key as PEM text) in front of the upstream.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        r.add(rustls_pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
        Arc::new(r)
    };
    let m = ProxyManager::builder().upstream_trust(UpstreamTrust::Roots(roots)).build().unwrap();
    let cfg = config(json!({"hosts": [
        {"id": "tls", "host": "127.0.0.1", "port": 0,
         "tls": {"enabled": true, "cert": cert_path.to_str().unwrap(), "key": key},
         "http_routes": [{"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}
    ]}));
    let tls_addr = apply(&m, &cfg, "tls").await;

    let ca_cert = reqwest::Certificate::from_pem(ca.as_bytes()).unwrap();
    for h2 in [false, true] {
        let mut b = reqwest::Client::builder().tls_certs_only([ca_cert.clone()]).resolve("localhost", tls_addr);
        if !h2 {
            b = b.http1_only();
        }
        let r = b.build().unwrap().get(format!("https://localhost:{}/secure", tls_addr.port())).send().await.unwrap();
        assert_eq!(r.version(), if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 }, "ALPN");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["headers"]["x-forwarded-proto"], json!(["https"]));
    }
    // A client that does not trust the test CA is refused: the certificate is really checked.
    let untrusting = reqwest::Client::builder().resolve("localhost", tls_addr).build().unwrap();
    assert!(untrusting.get(format!("https://localhost:{}/", tls_addr.port())).send().await.is_err());

    // Outer: a plain listener whose route reaches the TLS listener over https (verified).
    let mut cfg2 = cfg.clone();
    cfg2.hosts.push(hangar_proxy::ProxyHost {
        id: "front".into(),
        host: "127.0.0.1".into(),
        port: Some(0),
        http_routes: vec![
            serde_json::from_value(json!({"id": "https", "path": "/", "schema": "https",
                "target_host": "localhost", "target_port": tls_addr.port()}))
            .unwrap(),
        ],
        ..Default::default()
    });
    let report = m.apply(&cfg2).await.unwrap();
    assert_eq!(report.unchanged, ["tls"]);
    let front = local(&m, "front").await;
    let r = raw_http(front, "GET /via-https HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["uri"], "/via-https");
}

struct TokenAuth;

#[async_trait]
impl ProxyAuth for TokenAuth {
    async fn check(&self, host_id: &str, headers: &HeaderMap) -> Result<(), AuthRejection> {
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            Some("Bearer good") if host_id == "web" => Ok(()),
            Some(_) => Err(AuthRejection::new("the token is not valid")),
            None => Err(AuthRejection::new("a bearer token is required")),
        }
    }
}

#[tokio::test]
async fn require_auth_and_cors() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let m = ProxyManager::builder().auth(Arc::new(TokenAuth)).build().unwrap();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "require_auth": true,
        "cors": {"enabled": true, "allowed_origins": ["https://ui.test"]},
        "http_routes": [{"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let addr = apply(&m, &cfg, "web").await;

    let r = raw_http(addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"code": 401, "error": "unauthorized", "message": "a bearer token is required"}));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = raw_http(addr, "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 401);

    let r = raw_http(
        addr,
        "GET /ok HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nOrigin: https://ui.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("authorization").is_none(), "the Hangar token must not reach the VM");
    assert_eq!(r.header("access-control-allow-origin"), Some("https://ui.test"));

    // Preflight: answered by the proxy, without credentials.
    let r = raw_http(
        addr,
        "OPTIONS /ok HTTP/1.1\r\nHost: x\r\nOrigin: https://ui.test\r\nAccess-Control-Request-Method: PUT\r\n\
         Access-Control-Request-Headers: authorization\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://ui.test"));
    assert_eq!(r.header("access-control-allow-headers"), Some("authorization"));
    let r = raw_http(
        addr,
        "OPTIONS /ok HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.test\r\nAccess-Control-Request-Method: PUT\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.header("access-control-allow-origin"), None);
}
