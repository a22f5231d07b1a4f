//! Security hardening (issue 12), rows 7, 9, 10, 11 and 12: each test runs the attack
//! against the real `hangar` binary on loopback and shows it refused. Traffic stays on
//! 127.0.0.0/8 (all loopback, so distinct source addresses are had by binding client sockets
//! to 127.0.0.x).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The server's address from its URL (`http://127.0.0.1:PORT`).
fn addr_of(s: &Server) -> SocketAddr {
    s.url.trim_start_matches("http://").parse().expect("server address")
}

/// Open `n` connections from `source` to `to`.
async fn connect_from(source: Ipv4Addr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).expect("bind a loopback source address");
        let c = tokio::time::timeout(Duration::from_secs(10), sock.connect(to))
            .await
            .expect("connect within 10 s")
            .expect("connect");
        out.push(c);
    }
    out
}

/// Raise this process's soft file-descriptor limit to its hard limit when it is below what
/// the slow-client test needs (the server, started afterwards, inherits it).
fn ensure_fd_limit(need: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_string();
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (soft, hard) = match nums.as_slice() {
        [s, h, ..] => (*s, *h),
        _ => return,
    };
    if soft >= need {
        return;
    }
    assert!(hard >= need, "RLIMIT_NOFILE hard limit {hard} is below the {need} this test needs");
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={hard}:{hard}")])
        .status()
        .expect("run prlimit");
    assert!(st.success(), "prlimit failed");
}

/// Row 11: 5,000 slow connections (a header line every second, never finishing the head)
/// from 50 source addresses do not stop a normal client: its requests are answered within
/// 1 s while they are open. One source cannot hold more than `API_MAX_CONNECTIONS_PER_SOURCE`
/// connections (the extra ones are closed at once), and the server closes every slow
/// connection, a silent one and an idle kept-alive one after `API_HEADER_READ_TIMEOUT`.
/// Before the fix nothing was ever closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_capped_per_source_and_timed_out_while_a_normal_client_is_served() {
    const SOURCES: u8 = 50;
    const PER_SOURCE: usize = 100;
    // Long enough that opening the flood on a loaded 2-core machine (23 s seen under three
    // parallel builds) still leaves the probes inside it.
    const TIMEOUT: Duration = Duration::from_secs(30);
    ensure_fd_limit(12_000);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[
            ("ENABLED_MODULES", "api"),
            ("API_HEADER_READ_TIMEOUT", &format!("{}s", TIMEOUT.as_secs())),
            ("API_MAX_CONNECTIONS_PER_SOURCE", &PER_SOURCE.to_string()),
        ],
    );
    let to = addr_of(&s);

    // The per-source cap: 20 connections over the cap from one address are closed at once,
    // the others stay.
    let capped = connect_from(Ipv4Addr::new(127, 0, 0, 200), to, PER_SOURCE + 20).await;
    let closed_at_once = Arc::new(AtomicUsize::new(0));
    let mut keep = Vec::new();
    let mut probes = tokio::task::JoinSet::new();
    for mut c in capped {
        let closed = closed_at_once.clone();
        probes.spawn(async move {
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await {
                closed.fetch_add(1, Ordering::SeqCst);
                None
            } else {
                Some(c)
            }
        });
    }
    while let Some(r) = probes.join_next().await {
        if let Some(c) = r.unwrap() {
            keep.push(c);
        }
    }
    assert_eq!(closed_at_once.load(Ordering::SeqCst), 20, "connections over the per-source cap are closed at once");
    drop(keep);

    // 5,000 slow connections from 127.0.0.10 .. 127.0.0.59, each sending a request line and
    // then one header line a second.
    let flood_started = Instant::now();
    let mut conns = Vec::new();
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..SOURCES {
        opening.spawn(connect_from(Ipv4Addr::new(127, 0, 0, 10 + i), to, PER_SOURCE));
    }
    while let Some(r) = opening.join_next().await {
        conns.extend(r.unwrap());
    }
    assert_eq!(conns.len(), SOURCES as usize * PER_SOURCE);
    let opened = Instant::now();
    println!("opened {} slow connections in {:?}", conns.len(), opened - flood_started);
    let closed = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::with_capacity(conns.len());
    let mut readers = tokio::task::JoinSet::new();
    for c in conns {
        let (mut r, w) = c.into_split();
        let closed = closed.clone();
        readers.spawn(async move {
            let mut b = [0u8; 256];
            let deadline = TIMEOUT + Duration::from_secs(20);
            let r = tokio::time::timeout(deadline, async {
                loop {
                    match r.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            if r.is_ok() {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        });
        writers.push(w);
    }
    let drip = tokio::spawn(async move {
        let end = Instant::now() + TIMEOUT + Duration::from_secs(20);
        let mut n = 0u32;
        while Instant::now() < end {
            for w in writers.iter_mut() {
                let line: &[u8] = if n == 0 { b"GET /api/v1/health/probe HTTP/1.1\r\n" } else { b"X-Slow: 1\r\n" };
                let _ = w.write_all(line).await;
            }
            n += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    // A silent connection and an idle kept-alive one, from the normal client's address.
    let mut silent = connect_from(Ipv4Addr::new(127, 0, 0, 1), to, 1).await.remove(0);
    let mut idle = connect_from(Ipv4Addr::new(127, 0, 0, 1), to, 1).await.remove(0);
    idle.write_all(b"GET /api/v1/health/probe HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    // A normal client, a new connection per request, while the slow ones are open.
    let c = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(30)).build().unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = c.get(s.api("/health/probe")).send().await.expect("probe");
        assert_eq!(r.status(), 200);
        worst = worst.max(t.elapsed());
    }
    assert!(flood_started.elapsed() < TIMEOUT, "the probes ran after the slow connections could have timed out");
    assert_eq!(closed.load(Ordering::SeqCst), 0, "slow connections were closed before the timeout");
    println!("worst normal-request latency with 5,000 slow connections open: {worst:?}");
    assert!(worst < Duration::from_secs(1), "a normal request took {worst:?} under the slow-client flood");

    // The server closes every slow connection once the header-read timeout has passed.
    while readers.join_next().await.is_some() {}
    let slow_closed = opened.elapsed();
    drip.abort();
    assert_eq!(closed.load(Ordering::SeqCst), SOURCES as usize * PER_SOURCE, "slow connections left open");
    println!("all slow connections closed by the server {slow_closed:?} after they opened");
    for (what, c) in [("silent", &mut silent), ("idle", &mut idle)] {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "the {what} connection was not closed");
    }
    // And the API still answers.
    let (st, _) = call(&client(), Method::GET, &s.api("/health/probe"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200);
}

/// A Parallels bundle `name.pvm` made with the fake and moved to `to` (not registered).
fn loose_bundle(fake: &FakeParallels, name: &str, to: &std::path::Path) -> std::path::PathBuf {
    fake.prlctl(&["create", name, "--distribution", "ubuntu"]);
    fake.prlctl(&["unregister", name]);
    std::fs::create_dir_all(to).unwrap();
    let dest = to.join(format!("{name}.pvm"));
    std::fs::rename(fake.state.join(format!("Parallels/{name}.pvm")), &dest).unwrap();
    dest
}

async fn names(c: &reqwest::Client, s: &Server, root: &Auth) -> String {
    let (st, list) = call(c, Method::GET, &s.api("/machines"), root, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    list.to_string()
}

/// Row 9 (folder part): `POST /machines/register` with a bundle outside the host's VM folders
/// (`HOST_VMS_FOLDER` and the Parallels users' VM homes), directly or through a symlink
/// inside a VM folder, is refused (403) and nothing is registered, even for a SUPER_USER;
/// a bundle in the VM home registers. Before the fix any absolute path was registered.
#[tokio::test]
async fn register_is_confined_to_the_vm_folders() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);

    let outside = loose_bundle(&fake, "outside", &dir.path().join("elsewhere"));
    let (st, v) =
        call(&c, Method::POST, &s.api("/machines/register"), &root, Some(json!({"path": outside})), &[]).await;
    assert_eq!(st, 403, "{v}");
    assert!(v.to_string().contains("outside this host's VM folders"), "{v}");
    let link = fake.state.join("Parallels/linked.pvm");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let (st, v) = call(&c, Method::POST, &s.api("/machines/register"), &root, Some(json!({"path": link})), &[]).await;
    assert_eq!(st, 403, "a symlink out of the VM home: {v}");
    assert!(!names(&c, &s, &root).await.contains("\"outside\""), "a refused register left the VM");

    let inside = loose_bundle(&fake, "inside", &fake.state.join("Parallels"));
    let (st, v) = call(&c, Method::POST, &s.api("/machines/register"), &root, Some(json!({"path": inside})), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert!(names(&c, &s, &root).await.contains("\"inside\""));
}

/// Row 10: `PUT /machines/{id}/clone` with a `destination_path` outside the VM folders
/// (the attack used `/root`; here a folder of the test's own) is refused (403) before
/// anything is made there; a destination inside the Parallels VM home works. Before the fix
/// the bundle was made in the given folder.
#[tokio::test]
async fn clone_destinations_are_confined_to_the_vm_folders() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let data = dir.path().join("data");
    let s = fake.server(&data, &[]);
    let c = client();
    let root = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, v) =
        call(&c, Method::POST, &s.api("/machines"), &root, Some(json!({"name": "src", "image": "golden.pvm"})), &[])
            .await;
    assert_eq!(st, 200, "{v}");
    let id = v["ID"].as_str().or(v["id"].as_str()).unwrap().to_string();

    let target = dir.path().join("not-a-vm-folder");
    std::fs::create_dir_all(&target).unwrap();
    for dest in [target.clone(), target.join("new-sub"), std::path::PathBuf::from("/")] {
        let body = json!({"clone_name": "stolen", "destination_path": dest});
        let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/clone")), &root, Some(body), &[]).await;
        assert_eq!(st, 403, "{}: {v}", dest.display());
        assert!(v.to_string().contains("destination_path"), "{v}");
    }
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "something was made in the refused destination");
    assert!(!names(&c, &s, &root).await.contains("\"stolen\""));

    let home = fake.state.join("Parallels");
    let body = json!({"clone_name": "kept", "destination_path": home});
    let (st, v) = call(&c, Method::PUT, &s.api(&format!("/machines/{id}/clone")), &root, Some(body), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert!(home.join("kept.pvm").exists(), "the clone is in the VM home");
}

/// Row 12: VM ids that a tool would read as options (`-a`, `--help`) or that carry a NUL
/// answer 400 on every VM route, naming the rule, and never reach the driver (no other VM
/// is answered, no 500). Before the fix `-a` answered another VM and `--help`/NUL a 500.
#[tokio::test]
async fn option_like_and_nul_vm_ids_answer_400_on_every_vm_route() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, v) =
        call(&c, Method::POST, &s.api("/machines"), &root, Some(json!({"name": "victim", "image": "golden.pvm"})), &[])
            .await;
    assert_eq!(st, 200, "{v}");
    let routes: &[(Method, &str, Option<Value>)] = &[
        (Method::GET, "", None),
        (Method::GET, "/status", None),
        (Method::PUT, "/start", None),
        (Method::PUT, "/stop", None),
        (Method::DELETE, "", None),
        (Method::PUT, "/rename", Some(json!({"new_name": "x"}))),
        (Method::PUT, "/clone", Some(json!({"clone_name": "x"}))),
        (Method::PUT, "/execute", Some(json!({"command": "true"}))),
        (Method::GET, "/snapshots", None),
        (Method::POST, "/snapshots", Some(json!({"snapshot_name": "s"}))),
    ];
    for bad in ["-a", "--help", "%00", "victim%00", "-i"] {
        for (m, tail, body) in routes {
            let url = s.api(&format!("/machines/{bad}{tail}"));
            let (st, v) = call(&c, m.clone(), &url, &root, body.clone(), &[]).await;
            assert_eq!(st, 400, "{m} {url}: {v}");
            assert!(v.to_string().contains("is invalid"), "{m} {url}: {v}");
            assert!(!v.to_string().contains("victim\""), "{m} {url} answered another VM: {v}");
        }
    }
    // Through the orchestrator, with this server registered as its own host: 400 or 404,
    // never a 500 or another VM, on the fleet and the per-host routes.
    let host =
        json!({"name": "self", "host": s.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}});
    let (st, v) = call(&c, Method::POST, &s.api("/orchestrator/hosts"), &root, Some(host), &[]).await;
    assert!(st == 200 || st == 201, "{v}");
    let hid = v["id"].as_str().unwrap().to_string();
    for bad in ["-a", "--help", "%00"] {
        for prefix in ["/orchestrator/machines".to_string(), format!("/orchestrator/hosts/{hid}/machines")] {
            for (m, tail, body) in &routes[..4] {
                let url = s.api(&format!("{prefix}/{bad}{tail}"));
                let (st, v) = call(&c, m.clone(), &url, &root, body.clone(), &[]).await;
                assert!(st == 400 || st == 404, "{m} {url}: {st} {v}");
                assert!(!v.to_string().contains("victim\""), "{m} {url} answered another VM: {v}");
            }
        }
    }
    assert!(names(&c, &s, &root).await.contains("\"victim\""), "the VM is still there");
}

/// Row 7: `POST /catalog/push` and `PUT /catalog/import` with a `local-storage` provider
/// outside `CATALOG_LOCAL_ROOTS` (default `<data>/catalog`) are refused for a plain user
/// holding the push claim (403, naming the setting), directly, with `..`, relative or
/// through a symlink inside the root, and nothing is created there (before the fix the
/// server read the folder and made `.hangar-tmp` in it). A folder inside the root is
/// accepted (422: nothing was pushed there); a SUPER_USER may name any folder, and reading
/// it creates nothing either.
#[tokio::test]
async fn local_storage_providers_of_api_callers_are_confined_to_the_roots() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[("ENABLED_MODULES", "api,catalog")]);
    let c = client();
    let root_token = login(&c, &s, "root", ROOT_PASSWORD).await;
    let root = Auth::Bearer(root_token.clone());
    let (uid, bob) = make_user(&c, &s, &root_token, "bob").await;
    let bob = Auth::Bearer(bob);
    for claim in ["PUSH_CATALOG_MANIFEST", "IMPORT_CATALOG_MANIFEST"] {
        let url = s.api(&format!("/auth/users/{uid}/claims"));
        let (st, v) = call(&c, Method::POST, &url, &root, Some(json!({"name": claim})), &[]).await;
        assert_eq!(st, 201, "{v}");
    }
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(victim.join("sub")).unwrap();
    std::fs::write(victim.join("secret.txt"), "do not read").unwrap();
    let roots = data.join("catalog");
    std::fs::create_dir_all(&roots).unwrap();
    std::os::unix::fs::symlink(&victim, roots.join("escape")).unwrap();
    let listing = |d: &std::path::Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let before = listing(&victim);
    let push =
        |cs: String| json!({"catalog_id": "probe", "version": "1.0.0", "architecture": "x86_64", "connection": cs});
    let import = |cs: String| json!({"catalog_id": "probe", "architecture": "x86_64", "connection": cs});
    let bad = [
        victim.display().to_string(),
        victim.join("sub").display().to_string(),
        format!("{}/../victim", roots.display()),
        "victim".to_string(),
        roots.join("escape").display().to_string(),
        "/".to_string(),
    ];
    for path in &bad {
        let cs = format!("provider=local-storage;catalog_path={path}");
        let (st, v) = call(&c, Method::POST, &s.api("/catalog/push"), &bob, Some(push(cs.clone())), &[]).await;
        assert_eq!(st, 403, "push {path}: {v}");
        assert!(v.to_string().contains("CATALOG_LOCAL_ROOTS"), "{v}");
        let (st, v) = call(&c, Method::PUT, &s.api("/catalog/import"), &bob, Some(import(cs)), &[]).await;
        assert_eq!(st, 403, "import {path}: {v}");
    }
    assert_eq!(listing(&victim), before, "the refused requests created something in the folder");

    // Inside the root: accepted, and reading it creates nothing.
    let inside = roots.join("bob");
    let cs = format!("provider=local-storage;catalog_path={}", inside.display());
    let (st, v) = call(&c, Method::POST, &s.api("/catalog/push"), &bob, Some(push(cs)), &[]).await;
    assert_eq!(st, 422, "{v}");
    assert!(!inside.exists(), "a read-only probe created the folder");

    // A SUPER_USER may name another folder; reading it leaves no trace.
    let cs = format!("provider=local-storage;catalog_path={}", victim.display());
    let (st, v) = call(&c, Method::POST, &s.api("/catalog/push"), &root, Some(push(cs)), &[]).await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(listing(&victim), before, "a read-only probe created something");
}

/// Row 11 on the HTTPS listener: one source holds at most `API_MAX_CONNECTIONS_PER_SOURCE`
/// connections (the others are closed at once), a client that never starts its TLS
/// handshake is closed after `API_HEADER_READ_TIMEOUT`, and a client from another address
/// is served meanwhile. Before the fix nothing was capped and the handshake waited 10 s.
#[tokio::test]
async fn the_https_listener_caps_sources_and_times_out_silent_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki();
    let (ca_path, cert_path, key_path) =
        (dir.path().join("ca.pem"), dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&ca_path, &ca).unwrap();
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[
            ("ENABLED_MODULES", "api"),
            ("TLS_ENABLED", "true"),
            ("TLS_PORT", "0"),
            ("DISABLE_HTTP_WHEN_TLS", "true"),
            ("TLS_CERTIFICATE", cert_path.to_str().unwrap()),
            ("TLS_PRIVATE_KEY", key_path.to_str().unwrap()),
            ("API_HEADER_READ_TIMEOUT", "2s"),
            ("API_MAX_CONNECTIONS_PER_SOURCE", "5"),
        ],
    );
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let to: SocketAddr = s.url.trim_start_matches("https://").parse().unwrap();
    let opened = Instant::now();
    let conns = connect_from(Ipv4Addr::new(127, 0, 0, 7), to, 8).await;
    let mut waits = tokio::task::JoinSet::new();
    for mut c in conns {
        waits.spawn(async move {
            let mut b = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_secs(8), c.read(&mut b)).await;
            assert!(matches!(r, Ok(Ok(0) | Err(_))), "the server did not close a silent TLS connection");
            opened.elapsed()
        });
    }
    let ca = reqwest::Certificate::from_pem(ca.as_bytes()).unwrap();
    let tls = reqwest::Client::builder().add_root_certificate(ca).timeout(Duration::from_secs(10)).build().unwrap();
    let t = Instant::now();
    let r = tls.get(s.api("/health/probe")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let mut closed: Vec<Duration> = Vec::new();
    while let Some(r) = waits.join_next().await {
        closed.push(r.unwrap());
    }
    closed.sort();
    assert!(closed[..3].iter().all(|d| *d < Duration::from_millis(1500)), "over the cap, closed at once: {closed:?}");
    assert!(closed[3..].iter().all(|d| *d >= Duration::from_millis(1500)), "within the cap, kept a while: {closed:?}");
    assert!(closed[7] < Duration::from_secs(6), "silent handshakes closed after the timeout: {closed:?}");
}
