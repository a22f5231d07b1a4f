//! Port-forward over websocket, end to end with real processes: a host agent driving the
//! fake `prlctl` (the VM's address set to 127.0.0.1 in the fake's state, so a "banner then
//! echo" TCP server on the test machine plays the VM's SSH port), the `hangar vm
//! port-forward` CLI, and an orchestrator that relays through the VM's host, both for
//! port-forward and for a reverse-proxy TCP route to the VM.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use hangar_orchestrator::tunnel::{self, TunnelError};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const BANNER: &[u8] = b"SSH-2.0-HangarTest_1.0\r\n";

/// An SSH-like service on 127.0.0.1: it speaks first (a banner), then echoes every byte and
/// closes its side once the client closed its own.
async fn banner_echo_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                s.write_all(BANNER).await.unwrap();
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    port
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

/// Talk to the SSH-like service through `addr`: banner, a few lines, 2 MiB each way, then
/// half-close and read to the end.
async fn ssh_like_session(addr: &str) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_line(&mut line)).await.expect("banner in time").unwrap();
    assert_eq!(line.as_bytes(), BANNER, "the service speaks first");
    for i in 0..3 {
        let msg = format!("line {i}\n");
        w.write_all(msg.as_bytes()).await.unwrap();
        line.clear();
        tokio::time::timeout(Duration::from_secs(20), r.read_line(&mut line)).await.expect("echo in time").unwrap();
        assert_eq!(line, msg);
    }
    // 2 MB pushed while the echo comes back: both directions full at once (a relay that
    // copies one direction at a time deadlocks here), then the half-close.
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        // Half-close: the service sees EOF, finishes echoing and closes its side.
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back)).await.expect("EOF in time").unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len(), "every byte came back, then EOF");
    assert!(back == payload, "the echoed bytes differ");
}

/// `hangar vm port-forward VM 0:PORT` against `url` with `token`; returns the child and the
/// local address it announced.
/// The CLI child, killed when dropped (also when an assertion fails), so no forwarder
/// outlives its test.
struct Forwarder(Child);

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli_port_forward(url: &str, token: &str, vm: &str, port: u16, home: &Path) -> (Forwarder, String) {
    let mut child = Command::new(bin())
        .args(["vm", "port-forward", vm, &format!("0:{port}")])
        .env("HANGAR_URL", url)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", home)
        .env_remove("HANGAR_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let child = Forwarder(child);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let rest = line.trim().strip_prefix("Forwarding ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let (local, target) = rest.split_once(" -> ").unwrap();
    assert_eq!(target, format!("{vm}:{port}"));
    assert!(local.starts_with("127.0.0.1:"), "{line}");
    (child, local.to_string())
}

async fn create_vm(c: &reqwest::Client, url: &str, auth: &Auth, name: &str) -> String {
    let (st, v) = call(
        c,
        Method::POST,
        url,
        auth,
        Some(json!({"name": name, "image": "golden.pvm", "architecture": "x86_64", "start_on_create": true,
            "specs": {"cpu": "1", "memory": "1024"}})),
        &[],
    )
    .await;
    assert!(st == 200 || st == 201, "create {name}: {st} {v}");
    v["id"].as_str().or(v["ID"].as_str()).unwrap().to_string()
}

fn refused_status(r: Result<tunnel::Tunnel, TunnelError>) -> (u16, String) {
    match r {
        Err(TunnelError::Refused { status, message }) => (status, message),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the tunnel opened"),
    }
}

#[tokio::test]
async fn port_forward_through_a_host() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.agent(&dir.path().join("data"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let id = create_vm(&c, &s.api("/machines"), &ra, "pf-1").await;
    set_fake_ip(&fake, &id, "127.0.0.1");
    let port = banner_echo_server().await;
    let ws_url = |p: u16| tunnel::ws_url(&s.api(""), &format!("/machines/{id}/port-forward/{p}")).unwrap();

    // A plain USER may list VMs but not exec into them: no tunnel either.
    let (_, user) = make_user(&c, &s, &root, "plain").await;
    let (st, msg) =
        refused_status(tunnel::connect(&ws_url(port), &[("authorization", &format!("Bearer {user}"))]).await);
    assert_eq!(st, 403, "{msg}");
    let (st, _) = refused_status(tunnel::connect(&ws_url(port), &[]).await);
    assert_eq!(st, 401);

    // Through the CLI: two sessions at once, each its own tunnel.
    let home = dir.path().join("cli");
    let (cli, local) = cli_port_forward(&s.url, &root, "pf-1", port, &home);
    tokio::join!(ssh_like_session(&local), ssh_like_session(&local));

    // A port nobody listens on: 502 naming the VM and the port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bearer = format!("Bearer {root}");
    let (st, msg) = refused_status(tunnel::connect(&ws_url(dead), &[("authorization", &bearer)]).await);
    assert_eq!(st, 502, "{msg}");
    assert!(msg.contains("pf-1") && msg.contains(&dead.to_string()), "{msg}");

    // A stopped VM: 409 saying so.
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/stop")), &ra, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (st, msg) = refused_status(tunnel::connect(&ws_url(port), &[("authorization", &bearer)]).await);
    assert_eq!(st, 409, "{msg}");
    assert!(msg.contains("stopped"), "{msg}");

    drop(cli);
    assert!(!s.log().contains(ROOT_PASSWORD) && !s.log().contains(&root), "a secret reached the log");
}

#[tokio::test]
async fn port_forward_and_a_tcp_route_through_an_orchestrator() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(&dir.path().join("a"));
    let agent = fake.agent(&dir.path().join("a/data"), &[("SYSTEM_RESERVED_CPU", "0")]);
    let orch = Server::start(
        &dir.path().join("orch"),
        &[("ENABLED_MODULES", "api,orchestrator,reverse_proxy"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")],
    );
    let root = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let (st, h) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &ra,
        Some(json!({"name": "host-a", "host": agent.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}})), &[]).await;
    assert_eq!(st, 201, "{h}");
    let id = create_vm(&c, &orch.api("/orchestrator/machines"), &ra, "pf-o").await;
    set_fake_ip(&fake, &id, "127.0.0.1");
    let port = banner_echo_server().await;

    // The orchestrator checks the caller first: a plain USER gets 403.
    let (_, user) = make_user(&c, &orch, &root, "plain").await;
    let url = tunnel::ws_url(&orch.api(""), &format!("/orchestrator/machines/{id}/port-forward/{port}")).unwrap();
    let (st, msg) = refused_status(tunnel::connect(&url, &[("authorization", &format!("Bearer {user}"))]).await);
    assert_eq!(st, 403, "{msg}");

    // The CLI pointed at the orchestrator (no host module there) goes through it.
    let (cli, local) = cli_port_forward(&orch.url, &root, &id, port, &dir.path().join("cli"));
    ssh_like_session(&local).await;
    drop(cli);

    // A host's refusal comes back with its status and message.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = tunnel::ws_url(&orch.api(""), &format!("/orchestrator/machines/{id}/port-forward/{dead}")).unwrap();
    let (st, msg) = refused_status(tunnel::connect(&url, &[("authorization", &format!("Bearer {root}"))]).await);
    assert_eq!(st, 502, "{msg}");
    assert!(msg.contains("host-a") && msg.contains("refused"), "{msg}");

    // A reverse-proxy TCP route on the orchestrator to the VM reaches it through its host.
    let body = json!({"name": "ssh", "host": "127.0.0.1", "port": "0",
        "tcp_route": {"target_vm_id": id, "target_port": port}});
    let (st, h) = call(&c, Method::POST, &orch.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let addr = h["listener"]["local_address"].as_str().unwrap_or_else(|| panic!("the listener runs: {h}")).to_string();
    ssh_like_session(&addr).await;
    assert!(!orch.log().contains(ROOT_PASSWORD), "a secret reached the orchestrator's log");
}
