//! Port-forward over websocket, end to end with real processes: a host agent driving the
//! fake `prlctl` (the VM's address set to 127.0.0.1 in the fake's state, so a "banner then
//! echo" TCP server on the test machine plays the VM's SSH port), the `hangar vm
//! port-forward` CLI, and an orchestrator that relays through the VM's host, both for
//! port-forward and for a reverse-proxy TCP route to the VM. The same again with servers
//! that speak only HTTPS (wss:// tunnels), trusted through `SSL_CERT_FILE`.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// The CLI child, killed when dropped (also when an assertion fails), so no forwarder
/// outlives its test.
struct Forwarder(Child);

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hangar vm port-forward VM 0:PORT` against `url` with `token`; returns the child and the
/// local address it announced.
fn cli_port_forward(url: &str, token: &str, vm: &str, port: u16, home: &Path) -> (Forwarder, String) {
    cli_port_forward_with(url, token, vm, port, home, &[])
}

/// The `hangar vm port-forward` command line, environment included.
fn port_forward_command(url: &str, token: &str, vm: &str, port: u16, home: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["vm", "port-forward", vm, &format!("0:{port}")])
        .env("HANGAR_URL", url)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", home)
        .env_remove("HANGAR_API_KEY")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    cmd
}

/// [`cli_port_forward`] with extra environment (`SSL_CERT_FILE`, say).
fn cli_port_forward_with(
    url: &str,
    token: &str,
    vm: &str,
    port: u16,
    home: &Path,
    env: &[(&str, &Path)],
) -> (Forwarder, String) {
    let mut cmd = port_forward_command(url, token, vm, port, home);
    cmd.envs(env.iter().copied());
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null()).spawn().unwrap();
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
    let OneHostFleet { fake, agent: _agent, orch, root } =
        one_host_fleet(&c, dir.path(), "api,orchestrator,reverse_proxy").await;
    let ra = Auth::Bearer(root.clone());
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

/// A test CA and a leaf for `localhost` and `127.0.0.1` it signed, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A new CA and its leaf for localhost, written to files named after `name` in `dir`.
fn test_pki_files(dir: &Path, name: &str) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let (ca, cert, key) = test_pki();
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca).unwrap();
    std::fs::write(&pki.cert, cert).unwrap();
    std::fs::write(&pki.key, key).unwrap();
    pki
}

/// Register `agent` as host `host-a` of the orchestrator `orch`, with the root login.
/// Settings that make a server speak HTTPS only, with `pki`'s leaf.
fn https_only(pki: &Pki) -> [(&'static str, &str); 5] {
    [
        ("TLS_ENABLED", "true"),
        ("TLS_PORT", "0"),
        ("DISABLE_HTTP_WHEN_TLS", "true"),
        ("TLS_CERTIFICATE", pki.cert.to_str().unwrap()),
        ("TLS_PRIVATE_KEY", pki.key.to_str().unwrap()),
    ]
}

fn assert_https_only(s: &Server) {
    assert!(s.url.starts_with("https://"), "{}", s.url);
    assert!(!s.banner.iter().any(|l| l.contains("listening on http://")), "a plain HTTP listener: {:?}", s.banner);
}

/// An HTTP client of the test that trusts only `pki`'s CA.
fn tls_client(pki: &Pki) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
    reqwest::Client::builder().tls_certs_only([ca]).timeout(Duration::from_secs(30)).build().unwrap()
}

/// What a finished process left: its status, stdout and stderr.
struct Finished {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Run `cmd` to its end, failing the test if it still runs after `limit` (it is killed
/// then). Its output goes to files under `dir`, so a full pipe never blocks it; the wait
/// yields to the runtime, so this test's own servers keep serving meanwhile.
async fn run_with_deadline(mut cmd: Command, limit: Duration, dir: &Path, name: &str) -> Finished {
    std::fs::create_dir_all(dir).unwrap();
    let (out, err) = (dir.join(format!("{name}.stdout")), dir.join(format!("{name}.stderr")));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} still ran after {limit:?}; stdout: {}; stderr: {}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Finished {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// The CLI run with `trust` as its only trusted CA file (or the platform's store when
/// `None`) fails at once, says why (TLS, the certificate) and never starts forwarding.
async fn cli_refuses_untrusted(s: &Server, token: &str, vm: &str, port: u16, dir: &Path, trust: Option<&Path>) {
    let mut cmd = port_forward_command(&s.url, token, vm, port, &dir.join("cli-home"));
    if let Some(ca) = trust {
        cmd.env("SSL_CERT_FILE", ca);
    }
    let name = if trust.is_some() { "cli-wrong-ca" } else { "cli-platform-store" };
    let done = run_with_deadline(cmd, Duration::from_secs(30), dir, name).await;
    assert!(!done.status.success(), "{name}: the CLI succeeded; stdout: {}", done.stdout);
    assert!(!done.stdout.contains("Forwarding"), "{name}: it started forwarding: {}", done.stdout);
    let err = done.stderr.to_lowercase();
    assert!(
        err.contains("certificate") && err.contains("unknownissuer"),
        "{name}: stderr does not name the certificate problem: {}",
        done.stderr
    );
    assert!(!done.stderr.contains(token), "{name}: the token reached stderr");
}

const PROBE_URL: &str = "HANGAR_TEST_WSS_PROBE_URL";
const PROBE_TOKEN: &str = "HANGAR_TEST_WSS_PROBE_TOKEN";
const PROBE_DONE: &str = "wss probe: all checks passed";

/// `tunnel::connect` over wss:// needs the test CA among the roots of the platform verifier,
/// which come from `SSL_CERT_FILE` when the process first verifies a certificate; this test
/// process cannot change its own environment safely while other tests run, so
/// `port_forward_through_a_host_over_tls` runs this test in a child process of the same
/// binary with `SSL_CERT_FILE` set. On its own (no probe URL) it does nothing.
#[tokio::test]
#[ignore = "run by port_forward_through_a_host_over_tls in a child process"]
async fn wss_probe_in_a_child_process() {
    let (Ok(url), Ok(token)) = (std::env::var(PROBE_URL), std::env::var(PROBE_TOKEN)) else { return };
    assert!(url.starts_with("wss://"), "{url}");
    // TLS does not stand in for authentication: no credential, or a bogus one, is a 401.
    let (st, msg) = refused_status(tunnel::connect(&url, &[]).await);
    assert_eq!(st, 401, "no credential: {msg}");
    let (st, msg) = refused_status(tunnel::connect(&url, &[("authorization", "Bearer not-a-token")]).await);
    assert_eq!(st, 401, "a bogus token: {msg}");
    let (st, msg) = refused_status(tunnel::connect(&url, &[("x-api-key", "not-a-key")]).await);
    assert_eq!(st, 401, "a bogus API key: {msg}");
    // The right credential opens the tunnel, and the service's banner comes through it.
    let ws = tunnel::connect(&url, &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
    let mut io = tokio::io::BufReader::new(tunnel::into_io(ws));
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), io.read_line(&mut line)).await.expect("banner in time").unwrap();
    assert_eq!(line.as_bytes(), BANNER);
    io.write_all(b"ping over wss\n").await.unwrap();
    line.clear();
    tokio::time::timeout(Duration::from_secs(20), io.read_line(&mut line)).await.expect("echo in time").unwrap();
    assert_eq!(line, "ping over wss\n");
    println!("{PROBE_DONE}");
}

#[tokio::test]
async fn port_forward_through_a_host_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki_files(&dir.path().join("pki"), "good");
    let stranger = test_pki_files(&dir.path().join("pki"), "stranger");
    let fake = FakeParallels::new(dir.path());
    let s = fake.agent(&dir.path().join("data"), &https_only(&pki));
    assert_https_only(&s);
    let c = tls_client(&pki);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let id = create_vm(&c, &s.api("/machines"), &Auth::Bearer(root.clone()), "pf-tls").await;
    set_fake_ip(&fake, &id, "127.0.0.1");
    let port = banner_echo_server().await;
    let url = tunnel::ws_url(&s.api(""), &format!("/machines/{id}/port-forward/{port}")).unwrap();
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");

    // This process does not trust the test CA: the tunnel fails at the handshake, saying so.
    match tunnel::connect(&url, &[("authorization", &format!("Bearer {root}"))]).await {
        Err(e @ TunnelError::Tls { .. }) => {
            assert!(e.to_string().contains("certificate"), "{e}")
        }
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("a tunnel opened with a certificate nobody trusts"),
    }

    // A process that trusts it (SSL_CERT_FILE): 401 without a credential, a working tunnel with one.
    let mut probe = Command::new(std::env::current_exe().unwrap());
    probe
        .args(["wss_probe_in_a_child_process", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(PROBE_URL, &url)
        .env(PROBE_TOKEN, &root)
        .env("SSL_CERT_FILE", &pki.ca)
        .env_remove("SSL_CERT_DIR");
    let done = run_with_deadline(probe, Duration::from_secs(60), &dir.path().join("probe"), "probe").await;
    assert!(
        done.status.success() && done.stdout.contains(PROBE_DONE),
        "the wss probe failed ({}): {}\n{}",
        done.status,
        done.stdout,
        done.stderr
    );

    // The CLI trusting the CA carries two SSH-like sessions at once over wss://.
    let home = dir.path().join("cli");
    let (cli, local) = cli_port_forward_with(&s.url, &root, "pf-tls", port, &home, &[("SSL_CERT_FILE", &pki.ca)]);
    tokio::join!(ssh_like_session(&local), ssh_like_session(&local));
    drop(cli);

    // The CLI trusting another CA, or only the platform's store, stops with a certificate error.
    cli_refuses_untrusted(&s, &root, "pf-tls", port, dir.path(), Some(&stranger.ca)).await;
    cli_refuses_untrusted(&s, &root, "pf-tls", port, dir.path(), None).await;
    assert!(!s.log().contains(ROOT_PASSWORD) && !s.log().contains(&root), "a secret reached the log");
}

#[tokio::test]
async fn port_forward_and_a_tcp_route_through_an_orchestrator_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_pki_files(&dir.path().join("pki"), "good");
    let fake = FakeParallels::new(&dir.path().join("a"));
    let mut agent_settings = vec![("SYSTEM_RESERVED_CPU", "0")];
    agent_settings.extend(https_only(&pki));
    let agent = fake.agent(&dir.path().join("a/data"), &agent_settings);
    assert_https_only(&agent);
    let mut orch_settings =
        vec![("ENABLED_MODULES", "api,orchestrator,reverse_proxy"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")];
    orch_settings.extend(https_only(&pki));
    // The orchestrator trusts the test CA for its calls and tunnels to the host.
    let orch = Server::start_full(
        &dir.path().join("orch"),
        &orch_settings,
        true,
        &[("SSL_CERT_FILE", pki.ca.to_str().unwrap())],
    );
    assert_https_only(&orch);
    let c = tls_client(&pki);
    let root = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let (st, h) = register_host(&c, &orch, &ra, &agent).await;
    assert_eq!(st, 201, "{h}");
    let id = create_vm(&c, &orch.api("/orchestrator/machines"), &ra, "pf-otls").await;
    set_fake_ip(&fake, &id, "127.0.0.1");
    let port = banner_echo_server().await;

    // The CLI (trusting the CA) → wss:// → the orchestrator → wss:// → the host → the VM.
    let (cli, local) =
        cli_port_forward_with(&orch.url, &root, &id, port, &dir.path().join("cli"), &[("SSL_CERT_FILE", &pki.ca)]);
    tokio::join!(ssh_like_session(&local), ssh_like_session(&local));
    drop(cli);

    // A reverse-proxy TCP route on the orchestrator to the VM reaches it over the wss:// tunnel.
    let body = json!({"name": "ssh", "host": "127.0.0.1", "port": "0",
        "tcp_route": {"target_vm_id": id, "target_port": port}});
    let (st, h) = call(&c, Method::POST, &orch.api("/reverse-proxy/hosts"), &ra, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let addr = h["listener"]["local_address"].as_str().unwrap_or_else(|| panic!("the listener runs: {h}")).to_string();
    ssh_like_session(&addr).await;
    assert!(!orch.log().contains(ROOT_PASSWORD), "a secret reached the orchestrator's log");

    // An orchestrator that trusts another CA cannot reach the host: registration is refused.
    let stranger = test_pki_files(&dir.path().join("pki"), "stranger");
    let other = Server::start_full(
        &dir.path().join("orch-stranger"),
        &[("ENABLED_MODULES", "api,orchestrator")],
        true,
        &[("SSL_CERT_FILE", stranger.ca.to_str().unwrap())],
    );
    let plain = client();
    let other_root = Auth::Bearer(login(&plain, &other, "root", ROOT_PASSWORD).await);
    let (st, h) = register_host(&plain, &other, &other_root, &agent).await;
    assert_eq!(st, 503, "{h}");
    assert!(h["message"].as_str().is_some_and(|m| m.contains(&agent.url)), "{h}");
    assert!(h["message"].as_str().is_some_and(|m| m.contains("certificate")), "the reason is named: {h}");
}

/// A tunnel outlives its login token's expiry (an SSH session must not drop after
/// `JWT_DURATION`), but not its user: at the tunnels' next credential check, the one whose
/// token has expired keeps carrying bytes, the one whose user was disabled closes with 1008.
#[tokio::test]
async fn a_tunnel_outlives_its_token_but_not_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.agent(&dir.path().join("data"), &[("JWT_DURATION", "2s")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let ra = Auth::Bearer(root.clone());
    let id = create_vm(&c, &s.api("/machines"), &ra, "pf-exp").await;
    set_fake_ip(&fake, &id, "127.0.0.1");
    let port = banner_echo_server().await;
    let (ops_id, ops) = make_super_user(&c, &s, &root, "ops").await;
    let url = tunnel::ws_url(&s.api(""), &format!("/machines/{id}/port-forward/{port}")).unwrap();
    let open = |token: String| {
        let url = url.clone();
        async move {
            let ws = tunnel::connect(&url, &[("authorization", &format!("Bearer {token}"))]).await.unwrap();
            let mut io = tokio::io::BufReader::new(tunnel::into_io(ws));
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(20), io.read_line(&mut line)).await.expect("banner").unwrap();
            assert_eq!(line.as_bytes(), BANNER);
            io
        }
    };
    // Root's tunnel opens first, so its checks come just before the other's.
    let mut kept = open(root.clone()).await;
    let mut cut = open(ops).await;

    expire_then_disable(&c, &s, &root, &ops_id).await;

    // The disabled user's tunnel closes at its next check (within RECHECK_EVERY = 10 s).
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), cut.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the disabled user's tunnel is still open");
    // Root's tunnel was checked in the same round, after its token had expired: still open.
    kept.write_all(b"still here\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), kept.read_line(&mut line)).await.expect("echo in time").unwrap();
    assert_eq!(line, "still here\n", "the tunnel closed when its token expired");
}
