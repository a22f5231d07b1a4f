//! TCP forwarding through real sockets: half-close, idle timeout, connection limit.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use hangar_proxy::ProxyManager;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await.expect("echo in time").unwrap();
    assert_eq!(got, msg);
}

/// Reads until the proxy closes the connection; `true` when it did within `deadline`.
async fn closed_within(s: &mut TcpStream, deadline: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(deadline, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("unexpected {n} bytes"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn echo_with_half_close() {
    let up = tcp_upstream("127.0.0.1:0", true).await;
    let m = ProxyManager::builder().build().unwrap();
    let cfg = config(json!({"hosts": [{"id": "tcp", "host": "127.0.0.1", "port": 0,
        "tcp_route": {"id": "t", "target_host": "127.0.0.1", "target_port": up.addr.port()}}]}));
    let addr = apply(&m, &cfg, "tcp").await;

    let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    });
    w.write_all(&payload).await.unwrap();
    // The upstream answers only once it sees end of input: the proxy must pass the half-close
    // on and keep the other direction open.
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.expect("echo in time").unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echo differs");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let up = tcp_upstream("127.0.0.1:0", false).await;
    let m = ProxyManager::builder().build().unwrap();
    let cfg = config(json!({"hosts": [{"id": "tcp", "host": "127.0.0.1", "port": 0,
        "tcp_route": {"target_host": "127.0.0.1", "target_port": up.addr.port(), "idle_timeout_seconds": 1}}]}));
    let addr = apply(&m, &cfg, "tcp").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    round_trip(&mut s, b"ping").await;
    assert!(closed_within(&mut s, Duration::from_secs(10)).await, "idle connection was not closed");
    assert!(start.elapsed() >= Duration::from_millis(900), "closed before the idle timeout: {:?}", start.elapsed());
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let up = tcp_upstream("127.0.0.1:0", false).await;
    let m = ProxyManager::builder().build().unwrap();
    let cfg = config(json!({"hosts": [{"id": "tcp", "host": "127.0.0.1", "port": 0,
        "tcp_route": {"target_host": "127.0.0.1", "target_port": up.addr.port(), "max_connections": "2"}}]}));
    let addr = apply(&m, &cfg, "tcp").await;

    let mut c1 = TcpStream::connect(addr).await.unwrap();
    let mut c2 = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut c1, b"one").await;
    round_trip(&mut c2, b"two").await;

    let mut c3 = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut c3, Duration::from_secs(10)).await, "third connection was not refused");
    let st = m.status().await;
    assert_eq!(st.listener("tcp").unwrap().refused_connections, 1);
    round_trip(&mut c1, b"still fine").await;

    drop(c2);
    wait_for("the closed connection to free its slot", Duration::from_secs(10), || async {
        m.status().await.listener("tcp").unwrap().active_connections == 1
    })
    .await;
    let mut c4 = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut c4, b"four").await;
}

#[tokio::test]
async fn unreachable_tcp_target_closes_and_reports() {
    let dead = closed_port().await;
    let m = ProxyManager::builder().build().unwrap();
    let mut events = m.subscribe();
    let cfg = config(json!({"hosts": [{"id": "tcp", "host": "127.0.0.1", "port": 0,
        "tcp_route": {"id": "t", "target_host": "127.0.0.1", "target_port": dead}}]}));
    let addr = apply(&m, &cfg, "tcp").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(10)).await);
    let e = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let hangar_proxy::ProxyEvent::RouteFailed { route_id, target, .. } = events.recv().await.unwrap() {
                return (route_id, target);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(e, ("t".to_string(), format!("127.0.0.1:{dead}")));
}

#[tokio::test]
async fn vm_targets_and_tls_termination() {
    use std::sync::Arc;

    use hangar_proxy::{MapResolver, ProxyEvent};
    use rustls_pki_types::pem::PemObject;

    let up = tcp_upstream("127.0.0.1:0", false).await;
    let resolver = Arc::new(MapResolver::new());
    resolver.set("vm-7", "127.0.0.1".parse().unwrap());
    let m = ProxyManager::builder().resolver(resolver.clone()).build().unwrap();
    let mut events = m.subscribe();
    let (ca, leaf, key) = test_pki();
    let cfg = config(json!({"hosts": [
        {"id": "vm", "host": "127.0.0.1", "port": 0,
         "tcp_route": {"id": "t", "target_vm_id": "vm-7", "target_port": up.addr.port()}},
        {"id": "tls", "host": "127.0.0.1", "port": 0, "tls": {"enabled": true, "cert": leaf, "key": key},
         "tcp_route": {"target_host": "127.0.0.1", "target_port": up.addr.port()}}
    ]}));
    m.apply(&cfg).await.unwrap();
    let vm = local(&m, "vm").await;
    let tls = local(&m, "tls").await;

    let mut s = TcpStream::connect(vm).await.unwrap();
    round_trip(&mut s, b"to the vm").await;
    resolver.remove("vm-7");
    // The open connection stays; new ones find no address and are closed.
    round_trip(&mut s, b"still open").await;
    wait_for("connections to the gone VM to be refused", Duration::from_secs(10), || async {
        let mut s = TcpStream::connect(vm).await.unwrap();
        closed_within(&mut s, Duration::from_secs(5)).await
    })
    .await;
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let ProxyEvent::RouteFailed { error, .. } = events.recv().await.unwrap() {
                return error;
            }
        }
    })
    .await
    .unwrap();
    assert!(failed.contains("has no IP address"), "{failed}");

    // TLS terminated by the listener, verified by the client; plain bytes to the target.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let client_cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(tls).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut t = connector.connect(name, tcp).await.unwrap();
    t.write_all(b"over tls").await.unwrap();
    let mut got = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"over tls");
}
