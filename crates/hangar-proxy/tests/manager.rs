//! Run-time reconfiguration: VM address changes, in-place updates, isolation between
//! listeners, refused configurations, bind failures, shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hangar_proxy::{ListenerState, MapResolver, ProxyEvent, ProxyManager};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await.expect("echo in time").unwrap();
    assert_eq!(got, msg);
}

/// Two HTTP upstreams on the same port, on 127.0.0.1 and 127.0.0.2: one VM that moved.
async fn twin_upstreams() -> (Server, Server) {
    for _ in 0..20 {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        match TcpListener::bind(("127.0.0.2", port)).await {
            Ok(b) => return (serve_http_upstream(a, "old-ip"), serve_http_upstream(b, "new-ip")),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => panic!(
                "127.0.0.2 is not a local address here ({e}); Linux has all of 127.0.0.0/8 on lo, \
                 on macOS run `sudo ifconfig lo0 alias 127.0.0.2 up`"
            ),
            Err(_) => {}
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

async fn label(addr: std::net::SocketAddr) -> String {
    let r = raw_http(addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    if r.status != 200 {
        return format!("status {}", r.status);
    }
    r.json()["label"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn vm_address_change_and_updates_leave_other_listeners_alone() {
    let (old, _new) = twin_upstreams().await;
    let echo = tcp_upstream("127.0.0.1:0", false).await;
    let resolver = Arc::new(MapResolver::new());
    resolver.set("vm-1", "127.0.0.1".parse().unwrap());
    let m = ProxyManager::builder().resolver(resolver.clone()).build().unwrap();
    let mut events = m.subscribe();
    let mut cfg = config(json!({"hosts": [
        {"id": "web", "host": "127.0.0.1", "port": 0,
         "http_routes": [{"id": "vm", "path": "/", "target_vm_id": "vm-1", "target_port": old.addr.port()}]},
        {"id": "ssh", "host": "127.0.0.1", "port": 0,
         "tcp_route": {"target_host": "127.0.0.1", "target_port": echo.addr.port()}}
    ]}));
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.started, ["web", "ssh"]);
    let web = local(&m, "web").await;
    let ssh = local(&m, "ssh").await;

    // A long-lived connection on the other listener.
    let mut held = TcpStream::connect(ssh).await.unwrap();
    round_trip(&mut held, b"before").await;

    assert_eq!(label(web).await, "old-ip");
    // A keep-alive client too (its requests share one upstream connection).
    let keep_alive = reqwest::Client::builder().http1_only().build().unwrap();
    let ka_label = || async {
        let v: serde_json::Value = keep_alive.get(format!("http://{web}/")).send().await.unwrap().json().await.unwrap();
        v["label"].as_str().unwrap().to_string()
    };
    assert_eq!(ka_label().await, "old-ip");
    resolver.set("vm-1", "127.0.0.2".parse().unwrap());
    wait_for("the new VM address to be used", Duration::from_secs(10), || async { label(web).await == "new-ip" }).await;
    assert_eq!(ka_label().await, "new-ip", "a kept connection follows the VM too");
    assert_eq!(local(&m, "web").await, web, "the listener was not restarted");
    round_trip(&mut held, b"after ip change").await;

    // An in-place update of "web" keeps "ssh" (and its connection) as it is.
    cfg.hosts[0].http_routes[0].response_headers.insert("X-Updated".into(), "1".into());
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.updated, ["web"]);
    assert_eq!(report.unchanged, ["ssh"]);
    let r = raw_http(web, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.header("x-updated"), Some("1"), "new routes apply to new requests");
    round_trip(&mut held, b"after update").await;

    // A VM without an address answers 502 saying so.
    resolver.remove("vm-1");
    wait_for("the forgotten VM to fail", Duration::from_secs(10), || async { label(web).await == "status 502" }).await;
    let r = raw_http(web, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(r.json()["message"].as_str().unwrap().contains("has no IP address"), "{}", r.json());

    // Removing "web" closes its port; "ssh" keeps going.
    cfg.hosts.remove(0);
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.stopped, ["web"]);
    assert!(TcpStream::connect(web).await.is_err(), "removed listener still accepts");
    round_trip(&mut held, b"after removal").await;

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        match e {
            ProxyEvent::ListenerStarted { host_id, .. } => seen.push(format!("started {host_id}")),
            ProxyEvent::ListenerUpdated { host_id } => seen.push(format!("updated {host_id}")),
            ProxyEvent::ListenerStopped { host_id } => seen.push(format!("stopped {host_id}")),
            ProxyEvent::TargetResolved { vm_id, ip } => seen.push(format!("resolved {vm_id} {ip}")),
            _ => {}
        }
    }
    seen.dedup();
    assert_eq!(
        seen,
        [
            "started web",
            "started ssh",
            "resolved vm-1 127.0.0.1",
            "resolved vm-1 127.0.0.2",
            "updated web",
            "stopped web"
        ]
    );
}

#[tokio::test]
async fn moving_a_listener_reopens_it_and_bad_configs_change_nothing() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let m = ProxyManager::builder().build().unwrap();
    let mut cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0,
        "http_routes": [{"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let first = apply(&m, &cfg, "web").await;

    // Refused as a whole: a bad regex in a new host leaves the running one untouched.
    let mut bad = cfg.clone();
    let mut extra = bad.hosts[0].clone();
    extra.id = "other".into();
    extra.http_routes[0].pattern = Some("([".into());
    bad.hosts.push(extra);
    let err = m.apply(&bad).await.unwrap_err().to_string();
    assert!(err.contains("does not compile"), "{err}");
    assert_eq!(m.status().await.listeners.len(), 1);
    assert_eq!(label(first).await, "up");

    // Moving to another address: the old port closes, the new one serves.
    cfg.hosts[0].host = "127.0.0.2".into();
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.started, ["web"]);
    let second = local(&m, "web").await;
    assert_eq!(second.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    assert!(TcpStream::connect(first).await.is_err());
    assert_eq!(label(second).await, "up");
}

#[tokio::test]
async fn a_port_in_use_fails_one_listener_only_and_is_retried() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let squatter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let m = ProxyManager::builder().build().unwrap();
    let mut events = m.subscribe();
    let cfg = config(json!({"hosts": [
        {"id": "busy", "host": "127.0.0.1", "port": taken,
         "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]},
        {"id": "free", "host": "127.0.0.1", "port": 0,
         "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}
    ]}));
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.started, ["free"]);
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].1.contains(&format!("127.0.0.1:{taken}")), "{report:?}");
    let st = m.status().await;
    assert!(matches!(st.listener("busy").unwrap().state, ListenerState::Failed { .. }));
    assert!(matches!(events.try_recv(), Ok(ProxyEvent::ListenerFailed { .. })));
    assert_eq!(label(local(&m, "free").await).await, "up");

    drop(squatter);
    let report = m.apply(&cfg).await.unwrap();
    assert_eq!(report.started, ["busy"], "a failed listener is retried on the next apply");
    assert_eq!(report.unchanged, ["free"]);
    assert_eq!(label(local(&m, "busy").await).await, "up");
}

#[tokio::test]
async fn shutdown_lets_requests_finish_then_closes() {
    let up = http_upstream("127.0.0.1:0", "up").await;
    let m = ProxyManager::builder().shutdown_grace(Duration::from_secs(1)).build().unwrap();
    let cfg = config(json!({"hosts": [{"id": "web", "host": "127.0.0.1", "port": 0,
        "http_routes": [{"path": "/", "target_host": "127.0.0.1", "target_port": up.addr.port()}]}]}));
    let addr = apply(&m, &cfg, "web").await;
    // An idle keep-alive connection and a request in flight to a target that never answers in time.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got
    });
    wait_for("the slow request to be in flight", Duration::from_secs(10), || async {
        m.status().await.listener("web").unwrap().requests >= 2
    })
    .await;

    tokio::time::timeout(Duration::from_secs(10), m.shutdown()).await.expect("shutdown ends after the grace period");
    assert!(TcpStream::connect(addr).await.is_err(), "the port is closed");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("idle connection closed");
    let slow = tokio::time::timeout(Duration::from_secs(5), slow).await.expect("cut after grace").unwrap();
    assert!(slow.is_empty(), "the slow request cannot have been answered: {}", String::from_utf8_lossy(&slow));
    assert!(m.status().await.listeners.is_empty());
}

#[tokio::test]
async fn dedicated_io_threads_serve_update_and_stop() {
    let a = http_upstream("127.0.0.1:0", "a").await;
    let b = http_upstream("127.0.0.1:0", "b").await;
    let echo = tcp_upstream("127.0.0.1:0", false).await;
    let m = ProxyManager::builder().io_threads(2).build().unwrap();
    let cfg = |port: u16| {
        config(json!({"hosts": [
            {"id": "web", "host": "127.0.0.1", "port": 0, "http_routes": [
                {"id": "r", "path": "/", "target_host": "127.0.0.1", "target_port": port}]},
            {"id": "tcp", "host": "127.0.0.1", "port": 0,
             "tcp_route": {"target_host": "127.0.0.1", "target_port": echo.addr.port()}}
        ]}))
    };
    let web = apply(&m, &cfg(a.addr.port()), "web").await;
    let tcp = local(&m, "tcp").await;
    // Many connections, so that both threads' sockets take some (the kernel spreads them).
    for i in 0..16 {
        let r = raw_http(web, &format!("GET /{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["label"], "a");
    }
    let mut s = TcpStream::connect(tcp).await.unwrap();
    round_trip(&mut s, b"ping").await;

    // Updated in place: the same address, the new target.
    let report = m.apply(&cfg(b.addr.port())).await.unwrap();
    assert_eq!(report.updated, ["web"]);
    assert_eq!(local(&m, "web").await, web);
    for i in 0..8 {
        let r = raw_http(web, &format!("GET /{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(r.json()["label"], "b");
    }
    assert_eq!(m.status().await.listener("web").unwrap().requests, 24);

    drop(s);
    m.shutdown().await;
    assert!(TcpStream::connect(web).await.is_err(), "every thread's socket is closed after shutdown");
}
