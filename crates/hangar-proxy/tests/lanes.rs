//! The two ways an HTTP/1.1 request goes through the proxy agree.
//!
//! Keep-alive and `Connection: close` requests are forwarded by the fast lane; a manager built
//! with `http1_fast_lane(false)` leaves every request to hyper. Each case sends the same request
//! to both (kept and closed on the fast lane, kept on hyper) and compares what the target
//! received and what the client got back.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use hangar_proxy::{AuthRejection, MapResolver, ProxyAuth, ProxyManager, ProxyManagerBuilder, ReverseProxyConfig};
use http::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One answer read from a kept connection, framed by its `Content-Length`.
async fn read_one(s: &mut TcpStream, buf: &mut Vec<u8>) -> RawResponse {
    let deadline = Duration::from_secs(10);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(deadline, s.read(&mut chunk)).await.expect("answer in time").unwrap();
        assert!(n > 0, "the proxy closed a kept connection: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
    while buf.len() < head_end + 4 + len {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(deadline, s.read(&mut chunk)).await.expect("body in time").unwrap();
        assert!(n > 0, "the proxy closed mid-answer");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end + 4..head_end + 4 + len].to_vec();
    buf.drain(..head_end + 4 + len);
    RawResponse { status, headers, body }
}

/// One configuration served twice: with the fast lane, and by hyper alone.
struct Lanes {
    fast: SocketAddr,
    hyper: SocketAddr,
    _managers: (ProxyManager, ProxyManager),
}

async fn lanes(builder: impl Fn() -> ProxyManagerBuilder, cfg: &ReverseProxyConfig, id: &str) -> Lanes {
    let (f, h) = (builder().build().unwrap(), builder().http1_fast_lane(false).build().unwrap());
    Lanes { fast: apply(&f, cfg, id).await, hyper: apply(&h, cfg, id).await, _managers: (f, h) }
}

/// Two requests on one kept connection (the second proves it stays open).
async fn kept_twice(addr: SocketAddr, head: &str, body: &str) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(format!("{head}\r\n\r\n{body}{head}\r\n\r\n{body}").as_bytes()).await.unwrap();
    let kept = read_one(&mut s, &mut buf).await;
    let again = read_one(&mut s, &mut buf).await;
    assert_eq!(kept.status, again.status, "the same request on the same kept connection");
    kept
}

/// Send `request` (a head without `Connection: close`, perhaps a body) every way: kept and with
/// `Connection: close` (on a connection of its own, which the proxy must close after the answer)
/// on the fast lane, kept and closed on hyper's; all four must agree. Returns the fast lane's
/// kept and closed answers.
async fn both_ways(l: &Lanes, request: &str) -> (RawResponse, RawResponse) {
    let (head, body) = request.split_once("\r\n\r\n").expect("a request head");
    let kept = kept_twice(l.fast, head, body).await;
    let close = format!("{head}\r\nConnection: close\r\n\r\n{body}");
    let closed = raw_http(l.fast, &close).await;
    assert_eq!(closed.header("connection"), Some("close"), "{request:?}: {:?}", closed.headers);
    let hyper_kept = kept_twice(l.hyper, head, body).await;
    let hyper_closed = raw_http(l.hyper, &close).await;
    assert_same(&kept, &closed);
    assert_same(&kept, &hyper_kept);
    assert_same(&kept, &hyper_closed);
    (kept, closed)
}

/// The answer's headers, without those that depend on the time or the connection.
fn answer_headers(r: &RawResponse) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &r.headers {
        if !["date", "connection", "content-length", "transfer-encoding"].contains(&k.as_str()) {
            m.entry(k.clone()).or_default().push(v.clone());
        }
    }
    m
}

fn assert_same(kept: &RawResponse, closed: &RawResponse) {
    assert_eq!(kept.status, closed.status);
    assert_eq!(answer_headers(kept), answer_headers(closed));
    if kept.header("content-type") == Some("application/json") {
        let (mut a, mut b) = (kept.json(), closed.json());
        // Messages of failed targets name the underlying error in each lane's words.
        if a.get("error").is_some() && b.get("error").is_some() {
            a.as_object_mut().unwrap().remove("message");
            b.as_object_mut().unwrap().remove("message");
        }
        assert_eq!(a, b);
    } else {
        assert_eq!(kept.body, closed.body);
    }
}

#[tokio::test]
async fn header_rules_agree() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [{
        "id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port(),
        "request_headers": {"X-Added": "yes", "X-Remove": "", "X-Forwarded-Proto": "from-rule"},
        "response_headers": {"X-Served-By": "hangar", "X-Remove-Me": ""}
    }]}]}));
    let l = lanes(ProxyManager::builder, &cfg, "web").await;
    let (kept, closed) = both_ways(
        &l,
        "POST /h?q=1 HTTP/1.1\r\nHost: proxy.test:1234\r\nConnection: X-Secret\r\nX-Secret: s\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nProxy-Foo: 1\r\nTE: trailers, deflate\r\n\
         X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Host: evil.test\r\n\
         X-Remove: bye\r\nX-Multi: a\r\nX-Multi: b\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_same(&kept, &closed);
    let seen = kept.json();
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], json!(["10.0.0.1, 10.0.0.2, 127.0.0.1"]));
    assert_eq!(h["x-forwarded-host"], json!(["proxy.test:1234"]));
    assert_eq!(h["x-forwarded-proto"], json!(["from-rule"]), "a rule wins over the proxy's own value");
    assert_eq!(h["te"], json!(["trailers"]));
    assert_eq!(h["x-multi"], json!(["a", "b"]));
    assert_eq!(h["x-added"], json!(["yes"]));
    for gone in ["x-secret", "keep-alive", "proxy-authorization", "proxy-foo", "x-remove", "connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the target: {h}");
    }
    assert_eq!(seen["body_len"], 5);
    assert_eq!(seen["uri"], "/h?q=1");
    assert_eq!(kept.header("x-served-by"), Some("hangar"));
    assert_eq!(kept.header("x-remove-me"), None);
    assert_eq!(kept.header("x-resp-hop"), None, "a header the target's Connection names is dropped");
}

#[tokio::test]
async fn close_requests_take_the_fast_lane_and_reuse_one_upstream_connection() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let m = ProxyManager::builder().build().unwrap();
    let addr = apply(&m, &cfg, "web").await;
    for i in 0..5 {
        let r = raw_http(addr, &format!("GET /{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(r.json()["uri"], format!("/{i}"));
        assert!(r.json()["headers"].get("connection").is_none(), "the client's close reached the target");
    }
    // Each client connection closed after its answer; the upstream connection stayed open
    // and served the next client connection.
    assert_eq!(up.conns.load(std::sync::atomic::Ordering::SeqCst), 1, "one upstream connection for five clients");
}

struct TokenAuth;

#[async_trait]
impl ProxyAuth for TokenAuth {
    async fn check(&self, _host_id: &str, headers: &HeaderMap) -> Result<(), AuthRejection> {
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            Some("Bearer good") if headers.contains_key("x-other") => Ok(()),
            Some("Bearer good") => Err(AuthRejection::new("the checker sees every header")),
            Some(_) => Err(AuthRejection::new("the token is not valid")),
            None => Err(AuthRejection::new("a bearer token is required")),
        }
    }
}

#[tokio::test]
async fn authentication_agrees_and_credentials_stay_behind() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "require_auth": true,
        "http_routes": [{"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let l = lanes(|| ProxyManager::builder().auth(Arc::new(TokenAuth)), &cfg, "web").await;

    for (request, status) in [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        ("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\n\r\n", 401),
        ("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\n\r\n", 401),
        ("GET /ok HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nX-Other: 1\r\n\r\n", 200),
    ] {
        let (kept, closed) = both_ways(&l, request).await;
        assert_same(&kept, &closed);
        assert_eq!(kept.status, status, "{request:?}: {}", String::from_utf8_lossy(&kept.body));
        if status == 401 {
            assert_eq!(kept.header("www-authenticate"), Some("Bearer"));
        } else {
            assert!(kept.json()["headers"].get("authorization").is_none(), "the token must not reach the target");
        }
    }
}

#[tokio::test]
async fn vm_targets_and_failures_agree() {
    let up = http_upstream("127.0.0.1:0", "vm").await;
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resolver = Arc::new(MapResolver::new());
    resolver.set("vm-1", "127.0.0.1".parse().unwrap());
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "vm", "path": "/vm", "target_vm_id": "vm-1", "target_port": up.addr.port()},
        {"id": "gone", "path": "/gone", "target_vm_id": "vm-unknown", "target_port": 80},
        {"id": "refused", "path": "/refused", "target_host": "127.0.0.1", "target_port": closed_port().await},
        {"id": "silent", "path": "/silent", "target_host": "127.0.0.1",
         "target_port": silent.local_addr().unwrap().port(), "timeout_seconds": 1}
    ]}]}));
    let l = lanes(|| ProxyManager::builder().resolver(resolver.clone()), &cfg, "web").await;

    let (kept, closed) = both_ways(&l, "GET /vm/x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_same(&kept, &closed);
    assert_eq!(kept.json()["label"], "vm");
    for (path, status) in [("/gone", 502), ("/refused", 502), ("/silent", 504), ("/nothing", 404)] {
        let (kept, closed) = both_ways(&l, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert_same(&kept, &closed);
        assert_eq!(kept.status, status, "{path}");
        let body: Value = kept.json();
        assert_eq!(body["code"], status);
    }
}

#[tokio::test]
async fn cors_agrees() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0,
    "cors": {"enabled": true, "allowed_origins": ["https://ui.test"]},
    "http_routes": [
        {"id": "r", "path": "/a", "target_host": "127.0.0.1", "target_port": up.addr.port(),
         "response_headers": {"Access-Control-Allow-Origin": "https://rule.test", "X-Rule": "1"}},
        {"id": "down", "path": "/down", "target_host": "127.0.0.1", "target_port": closed_port().await}
    ]}]}));
    let l = lanes(ProxyManager::builder, &cfg, "web").await;
    let allowed = "Origin: https://ui.test\r\n";
    let other = "Origin: https://evil.test\r\n";
    for (request, status, allow) in [
        (format!("GET /a HTTP/1.1\r\nHost: x\r\n{allowed}\r\n"), 200, Some("https://ui.test")),
        (format!("GET /a HTTP/1.1\r\nHost: x\r\n{other}\r\n"), 200, Some("https://rule.test")),
        ("GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), 200, Some("https://rule.test")),
        (format!("GET /down HTTP/1.1\r\nHost: x\r\n{allowed}\r\n"), 502, Some("https://ui.test")),
        (
            format!(
                "OPTIONS /a HTTP/1.1\r\nHost: x\r\n{allowed}Access-Control-Request-Method: PUT\r\n\
                 Access-Control-Request-Headers: authorization\r\n\r\n"
            ),
            204,
            Some("https://ui.test"),
        ),
        (format!("OPTIONS /a HTTP/1.1\r\nHost: x\r\n{other}Access-Control-Request-Method: PUT\r\n\r\n"), 204, None),
    ] {
        let (kept, closed) = both_ways(&l, &request).await;
        assert_same(&kept, &closed);
        assert_eq!(kept.status, status, "{request:?}");
        assert_eq!(kept.header("access-control-allow-origin"), allow, "{request:?}: {:?}", kept.headers);
        if status == 204 && allow.is_some() {
            assert_eq!(kept.header("access-control-allow-headers"), Some("authorization"));
            assert_eq!(kept.header("access-control-max-age"), Some("600"));
        }
    }
}

/// Knows one caller (`Bearer alice`, holding the claim `OPS` and owning VM `vm-1`) and checks
/// the host's requirements.
struct RequirementAuth;

#[async_trait]
impl ProxyAuth for RequirementAuth {
    async fn check(&self, _host_id: &str, headers: &HeaderMap) -> Result<(), AuthRejection> {
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            Some("Bearer alice" | "Bearer bob") => Ok(()),
            _ => Err(AuthRejection::new("a bearer token is required")),
        }
    }

    async fn authorize(&self, req: &hangar_proxy::AuthRequest<'_>) -> Result<(), AuthRejection> {
        self.check(req.host_id, req.headers).await?;
        let alice = req.headers.get("authorization").is_some_and(|v| v == "Bearer alice");
        let claims_ok = req.required_claims.iter().all(|c| alice && c == "OPS");
        let owner_ok = req.vm_owner_of.is_none_or(|vm| alice && vm == "vm-1");
        if claims_ok && owner_ok { Ok(()) } else { Err(AuthRejection::forbidden("not for you")) }
    }
}

#[tokio::test]
async fn requirements_answer_403_on_both_lanes() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let resolver = Arc::new(MapResolver::new());
    resolver.set("vm-1", "127.0.0.1".parse().unwrap());
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0,
        "required_claims": ["OPS"], "require_vm_owner": true, "http_routes": [
            {"id": "vm", "path": "/vm", "target_vm_id": "vm-1", "target_port": up.addr.port()},
            {"id": "plain", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let l =
        lanes(|| ProxyManager::builder().resolver(resolver.clone()).auth(Arc::new(RequirementAuth)), &cfg, "web").await;
    for (request, status) in [
        ("GET /vm HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        ("GET /vm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bob\r\n\r\n", 403),
        ("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bob\r\n\r\n", 403),
        ("GET /vm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice\r\n\r\n", 200),
        ("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice\r\n\r\n", 200),
    ] {
        let (kept, closed) = both_ways(&l, request).await;
        assert_same(&kept, &closed);
        assert_eq!(kept.status, status, "{request:?}: {}", String::from_utf8_lossy(&kept.body));
        if status == 403 {
            assert_eq!(kept.json()["error"], "forbidden");
        }
    }

    // An authenticator that only checks credentials refuses hosts with requirements.
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "required_roles": ["ADMIN"],
        "http_routes": [{"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let l = lanes(|| ProxyManager::builder().auth(Arc::new(TokenAuth)), &cfg, "web").await;
    let (kept, closed) =
        both_ways(&l, "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nX-Other: 1\r\n\r\n").await;
    assert_same(&kept, &closed);
    assert_eq!(kept.status, 403);
}

#[tokio::test]
async fn a_reserved_port_is_never_bound() {
    let port = closed_port().await;
    let m = ProxyManager::builder().reserve_port(port, "the API's HTTP port (API_PORT)").build().unwrap();
    let cfg = config(json!({"hosts": [
        {"id": "clash", "host": "127.0.0.1", "port": port, "tcp_route": {"target_host": "127.0.0.1", "target_port": 1}},
        {"id": "fine", "host": "127.0.0.1", "port": 0, "tcp_route": {"target_host": "127.0.0.1", "target_port": 1}}]}));
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.started, ["fine"]);
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].1.contains("API_PORT"), "{:?}", report.failed);
    // Nothing listens there: the port can still be bound by its owner.
    std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}
