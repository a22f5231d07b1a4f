//! VM targets reached through a `VmDialer` (a tunnel in production; here a dialer that connects
//! to real local servers by a table), for TCP and HTTP routes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use futures::{SinkExt, StreamExt};
use hangar_proxy::{BoxedIo, ProxyManager, VmDialer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Connects `(vm, port)` to a local address from its table and records every dial.
#[derive(Default)]
struct TableDialer {
    table: Mutex<HashMap<(String, u16), SocketAddr>>,
    dials: Mutex<Vec<(String, u16)>>,
}

impl TableDialer {
    fn route(&self, vm: &str, port: u16, to: SocketAddr) {
        self.table.lock().unwrap().insert((vm.to_string(), port), to);
    }
    fn dials(&self) -> Vec<(String, u16)> {
        self.dials.lock().unwrap().clone()
    }
}

#[async_trait]
impl VmDialer for TableDialer {
    async fn dial(&self, vm: &str, port: u16) -> std::io::Result<BoxedIo> {
        self.dials.lock().unwrap().push((vm.to_string(), port));
        let to = self.table.lock().unwrap().get(&(vm.to_string(), port)).copied();
        let Some(to) = to else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no tunnel to {vm}:{port}")));
        };
        Ok(Box::new(TcpStream::connect(to).await?))
    }
}

fn manager(d: &Arc<TableDialer>) -> ProxyManager {
    // No resolver: a VM target can only be reached through the dialer.
    ProxyManager::builder().vm_dialer(d.clone()).build().unwrap()
}

#[tokio::test]
async fn tcp_route_to_a_vm_uses_the_dialer() {
    let echo = tcp_upstream("127.0.0.1:0", true).await;
    let d = Arc::new(TableDialer::default());
    d.route("vm-a", 22, echo.addr);
    let m = manager(&d);
    let cfg = config(json!({"hosts": [
        {"id": "ssh", "host": "127.0.0.1", "port": 0, "tcp_route": {"id": "t", "target_vm_id": "vm-a", "target_port": 22}},
        {"id": "gone", "host": "127.0.0.1", "port": 0, "tcp_route": {"id": "g", "target_vm_id": "vm-x", "target_port": 22}}
    ]}));
    let addr = apply(&m, &cfg, "ssh").await;

    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await.expect("echo in time").unwrap();
    assert!(got == payload, "echo through the dialed stream differs ({} bytes)", got.len());
    assert_eq!(d.dials(), [("vm-a".to_string(), 22)]);

    // A dial that fails closes the client connection, as a refused connection does.
    let mut events = m.subscribe();
    let mut s = TcpStream::connect(local(&m, "gone").await).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let e = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert!(format!("{e:?}").contains("no tunnel to vm-x:22"), "{e:?}");
}

#[tokio::test]
async fn http_routes_to_a_vm_use_the_dialer() {
    let up = http_upstream("127.0.0.1:0", "in-vm").await;
    let ws = ws_upstream("127.0.0.1:0", "ws").await;
    let d = Arc::new(TableDialer::default());
    d.route("vm-b", 8080, up.addr);
    d.route("vm-b", 9000, ws.addr);
    let m = manager(&d);
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "ws", "path": "/ws", "target_vm_id": "vm-b", "target_port": 9000},
        {"id": "grpc", "path": "/grpc", "schema": "h2c", "target_vm_id": "vm-b", "target_port": 8080},
        {"id": "down", "path": "/down", "target_vm_id": "vm-b", "target_port": 1},
        {"id": "app", "path": "/", "target_vm_id": "vm-b", "target_port": 8080,
         "request_headers": {"X-Via": "dialer"}}
    ]}]}));
    let addr = apply(&m, &cfg, "web").await;

    // One request on its own connection.
    let r = raw_http(addr, "GET /hello?x=1 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["label"], "in-vm");
    assert_eq!(v["uri"], "/hello?x=1");
    assert_eq!(v["headers"]["host"], json!(["app.test"]));
    assert_eq!(v["headers"]["x-forwarded-for"], json!(["127.0.0.1"]));
    assert_eq!(v["headers"]["x-via"], json!(["dialer"]));
    assert_eq!(d.dials(), [("vm-b".to_string(), 8080)]);

    // Keep-alive: three requests on the dialed stream the closed client connection left idle:
    // no more dial.
    let client = reqwest::Client::new();
    for i in 0..3 {
        let v: serde_json::Value =
            client.get(format!("http://{addr}/k/{i}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["uri"], format!("/k/{i}"));
    }
    assert_eq!(d.dials().len(), 1, "the idle dialed stream is reused and kept: {:?}", d.dials());

    // h2c through the dialer.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let v: serde_json::Value = h2.get(format!("http://{addr}/grpc/x")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["version"], "HTTP/2.0");

    // A websocket through the dialer.
    let (mut c, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat")).await.unwrap();
    assert_eq!(resp.status(), 101);
    c.send(Message::text("hi")).await.unwrap();
    assert_eq!(c.next().await.unwrap().unwrap(), Message::text("ws:hi"));
    c.close(None).await.unwrap();
    assert!(d.dials().contains(&("vm-b".to_string(), 9000)));

    // A failing dial is a 502 naming the VM.
    let r = raw_http(addr, "GET /down HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 502);
    let v = r.json();
    assert_eq!(v["error"], "bad_gateway");
    assert!(v["message"].as_str().unwrap().contains("no tunnel to vm-b:1"), "{v}");
    assert_eq!(v["target"], "vm vm-b port 1 (dialed)");
}

#[tokio::test]
async fn https_to_a_dialed_vm_is_refused() {
    let d = Arc::new(TableDialer::default());
    let m = manager(&d);
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
        {"id": "tls", "path": "/", "schema": "https", "target_vm_id": "vm-c", "target_port": 443}
    ]}]}));
    let e = m.apply(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("https to VM \"vm-c\"") && e.contains("dialer"), "{e}");
    assert!(m.status().await.listeners.is_empty(), "nothing started");
}
