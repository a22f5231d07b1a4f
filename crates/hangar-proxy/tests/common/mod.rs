//! Real upstreams and helpers for the proxy tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hangar_proxy::{ProxyManager, ReverseProxyConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A server task that stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub conns: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP upstream (HTTP/1.1 and cleartext HTTP/2) that answers every request with a JSON
/// description of what it received. `/slow...` answers after 30 s; `/close...` closes the
/// connection after answering.
pub async fn http_upstream(bind: &str, label: &'static str) -> Server {
    let listener = TcpListener::bind(bind).await.unwrap();
    serve_http_upstream(listener, label)
}

pub fn serve_http_upstream(listener: TcpListener, label: &'static str) -> Server {
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| describe(req, label));
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Server { addr, conns, task }
}

async fn describe(req: Request<Incoming>, label: &'static str) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers.entry(k.as_str().to_string()).or_default().push(v.to_str().unwrap_or("?").to_string());
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let v = json!({
        "label": label,
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    let h = resp.headers_mut();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-upstream", label.parse().unwrap());
    h.insert("x-remove-me", "yes".parse().unwrap());
    if parts.uri.path().starts_with("/close") {
        h.insert("connection", "close".parse().unwrap());
    } else if parts.version == http::Version::HTTP_11 {
        h.insert("x-resp-hop", "1".parse().unwrap());
        h.insert("connection", "x-resp-hop".parse().unwrap());
    }
    Ok(resp)
}

/// A websocket upstream echoing every message back, prefixed with its label.
pub async fn ws_upstream(bind: &str, label: &'static str) -> Server {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    use tokio_tungstenite::tungstenite::Message;
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("{label}:{t}")),
                        Message::Binary(b) => Message::Binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Server { addr, conns: Arc::default(), task }
}

/// A TCP upstream. `echo_at_eof`: collect everything until the client half-closes, then send it
/// all back and close; otherwise echo as bytes arrive.
pub async fn tcp_upstream(bind: &str, echo_at_eof: bool) -> Server {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                if echo_at_eof {
                    let mut all = Vec::new();
                    if s.read_to_end(&mut all).await.is_ok() {
                        let _ = s.write_all(&all).await;
                        let _ = s.shutdown().await;
                    }
                } else {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Server { addr, conns: Arc::default(), task }
}

/// A port on 127.0.0.1 that nothing listens on.
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Parse a JSON configuration.
pub fn config(v: Value) -> ReverseProxyConfig {
    serde_json::from_value(v).unwrap()
}

/// Apply and return the bound address of `id`.
pub async fn apply(m: &ProxyManager, cfg: &ReverseProxyConfig, id: &str) -> SocketAddr {
    let report = m.apply(cfg).await.unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    local(m, id).await
}

pub async fn local(m: &ProxyManager, id: &str) -> SocketAddr {
    m.status().await.listener(id).and_then(|l| l.local_address()).unwrap_or_else(|| panic!("{id} is not running"))
}

/// A raw HTTP/1.1 exchange (the request must ask for `Connection: close`).
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn raw_http(addr: SocketAddr, request: &str) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await.expect("response in time").unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut body = buf[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        body = out;
    }
    RawResponse { status, headers, body }
}

/// Wait for `cond` to hold, checking every 20 ms, failing after `deadline`.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test CA and a leaf for `localhost` and 127.0.0.1 (`CA:FALSE`), as PEM: (ca, leaf, leaf key).
pub fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "hangar-proxy test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}
