//! A fleet on one machine: an orchestrator and three host agents, each a separate `hangar`
//! process in its own network namespace (`tests/common/netns.rs`), joined by a bridge in a
//! fifth namespace, with no default route anywhere. Host h1 runs real QEMU guests on a VM
//! bridge served by dnsmasq; h2 and h3 drive the fake `prlctl`. Every client (this test's
//! HTTP calls, the CLI) runs in a sixth namespace, `cli`: the outer test builds the
//! namespaces and re-runs this test binary inside `cli` for the scenario, then removes
//! everything, also when the scenario fails.
//!
//! The scenario: hosts join (one with an enrollment token through `hangar agent join`), VMs
//! are placed through the orchestrator and land where their tags say, exec runs through the
//! orchestrator on a real guest, a host whose cable is cut and a host killed with kill -9
//! turn unhealthy and new VMs go elsewhere, both come back by themselves, a restarted
//! orchestrator keeps its state, and services inside the guest (HTTP on 8080, TCP echo on
//! 7777) are reached through h1's reverse proxy, through routes on the orchestrator (which
//! tunnel through h1) and through `hangar vm port-forward`, also after a restart that gives
//! the guest a new IP.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Fabric, ip};
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NODES: &[(&str, &str)] = &[
    ("orch", "10.231.0.2/24"),
    ("h1", "10.231.0.11/24"),
    ("h2", "10.231.0.12/24"),
    ("h3", "10.231.0.13/24"),
    ("cli", "10.231.0.100/24"),
];
/// The VM bridge inside h1 (allowed in /etc/qemu/bridge.conf by scripts/test.sh).
const VM_BRIDGE: &str = "hgvmbr0";
const API_PORT: u16 = 7100;

#[test]
fn fleet_of_hosts_in_network_namespaces() {
    let acl = std::fs::read_to_string("/etc/qemu/bridge.conf").unwrap_or_default();
    assert!(
        acl.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["allow", VM_BRIDGE]),
        "/etc/qemu/bridge.conf must allow {VM_BRIDGE} for the QEMU host's guests (scripts/test.sh writes it)"
    );
    assert!(
        Command::new("dnsmasq").arg("--version").output().is_ok_and(|o| o.status.success()),
        "dnsmasq is missing: install dnsmasq-base (scripts/test.sh does)"
    );
    let image = guest_image();
    let fabric = Fabric::create(NODES);
    // The VM network lives inside h1 only: guests are reachable from h1, nowhere else.
    let h1 = fabric.ns("h1");
    ip(&["-n", &h1, "link", "add", VM_BRIDGE, "type", "bridge"]);
    ip(&["-n", &h1, "addr", "add", "10.232.1.1/24", "dev", VM_BRIDGE]);
    ip(&["-n", &h1, "link", "set", VM_BRIDGE, "up"]);

    let dir = tempfile::tempdir().unwrap();
    let mut scenario = fabric
        .exec("cli", std::env::current_exe().unwrap().to_str().unwrap())
        .args(["fleet_scenario", "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env("HANGAR_FLEET_TAG", &fabric.tag)
        .env("HANGAR_FLEET_DIR", dir.path())
        .env("HANGAR_GUEST_IMAGE_DIR", &image)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    let status = loop {
        if let Some(st) = scenario.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = scenario.kill();
            panic!("the fleet scenario did not finish within 20 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        for f in walk_logs(dir.path()) {
            eprintln!("----- {} -----\n{}", f.display(), tail(&std::fs::read_to_string(&f).unwrap_or_default(), 60));
        }
    }
    drop(fabric);
    assert!(status.success(), "the fleet scenario failed ({status}); see its output above");
}

fn walk_logs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("server-") && n.ends_with(".log")
                    || matches!(n, "dnsmasq.log" | "qemu.log" | "console.log")
            }) {
                out.push(p);
            }
        }
    }
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn guest_image() -> PathBuf {
    let dir = std::env::var("HANGAR_GUEST_IMAGE_DIR").unwrap_or_else(|_| {
        panic!("HANGAR_GUEST_IMAGE_DIR is not set: build the test guest with scripts/build-guest-image.sh DIR (scripts/test.sh does it)")
    });
    let p = PathBuf::from(dir);
    assert!(p.join("image.json").is_file(), "{} holds no test guest; run scripts/build-guest-image.sh", p.display());
    p
}

/// dnsmasq serving the VM bridge inside h1, handing out addresses from `range`.
struct Dhcp {
    child: Child,
}

impl Dhcp {
    fn start(fabric: &Fabric, dir: &Path, range: &str) -> Dhcp {
        std::fs::create_dir_all(dir).unwrap();
        let leases = dir.join("leases");
        let _ = std::fs::remove_file(&leases);
        let log = std::fs::File::create(dir.join("dnsmasq.log")).unwrap();
        let mut child = fabric
            .exec("h1", "dnsmasq")
            .args([
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
                "--user=root",
                "--port=0",
                "--bind-interfaces",
                &format!("--interface={VM_BRIDGE}"),
                "--except-interface=lo",
                "--dhcp-authoritative",
                &format!("--dhcp-range={range},255.255.255.0,10m"),
                &format!("--dhcp-leasefile={}", leases.display()),
                "--pid-file=",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Ready when it still runs a moment after binding; a bad option exits at once.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "dnsmasq exited with {st}: {}",
                    std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Dhcp { child }
    }
}

impl Drop for Dhcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url(fabric: &Fabric, role: &str, port: u16) -> String {
    format!("http://{}:{port}", fabric.addr(role))
}

/// A host agent (api, host and reverse proxy modules) in its node, on a fixed address so the
/// orchestrator finds it again after a restart.
fn agent(fabric: &Fabric, role: &str, dir: &Path, fake: Option<&FakeParallels>, image: &Path) -> Server {
    let data = dir.join(role);
    let addr = fabric.addr(role);
    let mut settings: Vec<(String, String)> =
        vec![("ENABLED_MODULES".into(), "api,host,reverse_proxy".into()), ("LOG_LEVEL".into(), "info".into())];
    let mut env: Vec<(String, String)> = Vec::new();
    match fake {
        Some(f) => {
            settings.push(("HYPERVISOR".into(), "parallels".into()));
            // This machine has 2 CPUs; keep none back so each fake host takes two 1-CPU VMs.
            settings.push(("SYSTEM_RESERVED_CPU".into(), "0".into()));
            settings.push(("PRLCTL_PATH".into(), f.tools.join("prlctl").to_str().unwrap().into()));
            settings.push(("HOST_IMAGES_FOLDER".into(), f.images.to_str().unwrap().into()));
            env.push(("FAKE_PRL_STATE_DIR".into(), f.state.to_str().unwrap().into()));
        }
        None => {
            let images = dir.join("h1-images");
            if !images.exists() {
                std::fs::create_dir_all(&images).unwrap();
                std::os::unix::fs::symlink(image, images.join("test-guest")).unwrap();
            }
            settings.push(("HYPERVISOR".into(), "qemu".into()));
            settings.push(("QEMU_NETWORK_BRIDGE".into(), VM_BRIDGE.into()));
            settings.push(("HOST_IMAGES_FOLDER".into(), images.to_str().unwrap().into()));
        }
    }
    let s: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::launch(Some(&fabric.ns(role)), (&addr, API_PORT), &data, &s, true, &e)
}

fn orchestrator(fabric: &Fabric, dir: &Path) -> Server {
    Server::start_in(
        &fabric.ns("orch"),
        (&fabric.addr("orch"), API_PORT),
        &dir.join("orch"),
        &[
            ("ENABLED_MODULES", "api,orchestrator,reverse_proxy"),
            ("ORCHESTRATOR_CHECK_INTERVAL", "1s"),
            ("ORCHESTRATOR_UNHEALTHY_AFTER", "5s"),
        ],
    )
}

async fn host_state(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str) -> String {
    let (st, v) = call(c, Method::GET, &o.api(&format!("/orchestrator/hosts/{id}")), auth, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v["state"].as_str().unwrap_or_default().to_string()
}

/// Wait until the orchestrator shows host `id` in `state`; returns how long it took.
async fn until_state(c: &reqwest::Client, o: &Server, auth: &Auth, id: &str, state: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let now = host_state(c, o, auth, id).await;
        if now == state {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "host {id} is {now:?}, not {state:?}, {limit:?} later");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create(c: &reqwest::Client, o: &Server, auth: &Auth, body: Value) -> Value {
    let (st, v) = call(c, Method::POST, &o.api("/orchestrator/machines"), auth, Some(body.clone()), &[]).await;
    assert_eq!(st, 200, "create {body}: {v}");
    v
}

fn mac_vm(name: &str) -> Value {
    json!({"name": name, "image": "golden.pvm", "architecture": "x86_64", "start_on_create": true, "tags": ["mac"],
        "specs": {"cpu": "1", "memory": "1024"}})
}

/// The guest's first IPv4 address as its host reports it, once it has one.
async fn guest_ip(c: &reqwest::Client, host: &Server, auth: &Auth, vm: &str, not: Option<&str>) -> String {
    let t0 = Instant::now();
    loop {
        let (st, v) = call(c, Method::GET, &host.api(&format!("/machines/{vm}")), auth, None, &[]).await;
        assert_eq!(st, 200, "{v}");
        let text = v.to_string();
        let found = text
            .split(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
            .find(|w| w.starts_with("10.232.1.") && w.split('.').count() == 4 && Some(*w) != not)
            .map(String::from);
        if let Some(ip) = found {
            return ip;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "no (new) guest address reported for {vm}: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn tcp_echo(addr: &str, msg: &[u8]) -> Vec<u8> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await.expect("echo timed out").unwrap();
    got
}

/// Two reverse-proxy listeners on `server` at `addr`: `port` a TCP route to the guest's echo
/// service (7777), `port + 1` an HTTP route to its web server (8080).
async fn expose_guest(c: &reqwest::Client, server: &Server, auth: &Auth, addr: &str, port: u16, vm: &str) {
    let listeners = [
        json!({"name": format!("echo-{port}"), "host": addr, "port": port.to_string(),
            "tcp_route": {"target_vm_id": vm, "target_port": "7777"}}),
        json!({"name": format!("web-{port}"), "host": addr, "port": (port + 1).to_string(),
            "http_routes": [{"path": "/", "target_vm_id": vm, "target_port": "8080"}]}),
    ];
    for body in listeners {
        let (st, v) = call(c, Method::POST, &server.api("/reverse-proxy/hosts"), auth, Some(body), &[]).await;
        assert_eq!(st, 201, "{v}");
    }
}

/// Run the CLI inside a node, with its own credentials folder and `stdin` as input.
fn cli_in(fabric: &Fabric, role: &str, home: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    std::fs::create_dir_all(home).unwrap();
    let mut child = fabric
        .exec(role, bin())
        .args(args)
        .env("HANGAR_CONFIG_DIR", home)
        .env_remove("HANGAR_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
#[ignore = "run inside its client namespace by fleet_of_hosts_in_network_namespaces"]
async fn fleet_scenario() {
    let Ok(tag) = std::env::var("HANGAR_FLEET_TAG") else { return };
    let fabric = Fabric::attach(&tag, NODES);
    let dir = PathBuf::from(std::env::var("HANGAR_FLEET_DIR").unwrap());
    let image = guest_image();
    let c = client();

    let mut dhcp = Dhcp::start(&fabric, &dir.join("dhcp"), "10.232.1.100,10.232.1.119");
    let fake2 = FakeParallels::new(&dir.join("fake2"));
    let fake3 = FakeParallels::new(&dir.join("fake3"));
    let h1 = agent(&fabric, "h1", &dir, None, &image);
    let mut h2 = agent(&fabric, "h2", &dir, Some(&fake2), &image);
    let h3 = agent(&fabric, "h3", &dir, Some(&fake3), &image);
    let mut orch = orchestrator(&fabric, &dir);
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);

    // h1 and h2 are registered by an administrator, h3 joins by itself with a token.
    let mut ids = std::collections::HashMap::new();
    for (role, tags) in [("h1", vec!["qemu"]), ("h2", vec!["mac"])] {
        let (st, h) = call(
            &c,
            Method::POST,
            &orch.api("/orchestrator/hosts"),
            &root,
            Some(json!({"name": role, "url": url(&fabric, role, API_PORT), "tags": tags,
                "authentication": {"username": "root", "password": ROOT_PASSWORD}})),
            &[],
        )
        .await;
        assert_eq!(st, 201, "register {role}: {h}");
        ids.insert(role, h["id"].as_str().unwrap().to_string());
    }
    let (st, tok) = call(
        &c,
        Method::POST,
        &orch.api("/orchestrator/enrollment-token"),
        &root,
        Some(json!({"host_name": "h3", "ttl_seconds": 600})),
        &[],
    )
    .await;
    assert!(st == 200 || st == 201, "{tok}");
    let token = tok["token"].as_str().unwrap().to_string();
    let h3_home = dir.join("h3-home");
    let out = cli_in(
        &fabric,
        "h3",
        &h3_home,
        &["--url", &h3.url, "login", "--username", "root", "--password-stdin"],
        ROOT_PASSWORD,
    );
    assert!(out.status.success(), "login on h3: {}", String::from_utf8_lossy(&out.stderr));
    let out = cli_in(
        &fabric,
        "h3",
        &h3_home,
        &[
            "agent",
            "join",
            "--orchestrator",
            &orch.url,
            "--token",
            &token,
            "--url",
            &h3.url,
            "--name",
            "h3",
            "--tags",
            "mac",
        ],
        "",
    );
    assert!(
        out.status.success(),
        "hangar agent join: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, hosts) = call(&c, Method::GET, &orch.api("/orchestrator/hosts"), &root, None, &[]).await;
    assert_eq!(st, 200);
    let h3_id = hosts.as_array().unwrap().iter().find(|h| h["name"] == "h3").unwrap_or_else(|| panic!("{hosts}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    ids.insert("h3", h3_id);
    for (role, id) in &ids {
        until_state(&c, &orch, &root, id, "healthy", Duration::from_secs(10)).await;
        eprintln!("fleet: {role} is {id}");
    }

    // Placement: a QEMU guest lands on h1; two macOS-tagged VMs spread over h2 and h3.
    let guest = create(
        &c,
        &orch,
        &root,
        json!({"name": "guest", "image": "test-guest", "architecture": "x86_64", "start_on_create": true,
            "tags": ["qemu"], "specs": {"cpu": "1", "memory": "192"}}),
    )
    .await;
    assert_eq!(guest["host_id"], ids["h1"].as_str(), "{guest}");
    let guest_id = guest["id"].as_str().unwrap().to_string();
    let m1 = create(&c, &orch, &root, mac_vm("mac-1")).await;
    let m2 = create(&c, &orch, &root, mac_vm("mac-2")).await;
    let mut mac_hosts = [m1["host_id"].as_str().unwrap().to_string(), m2["host_id"].as_str().unwrap().to_string()];
    mac_hosts.sort();
    let mut want = [ids["h2"].clone(), ids["h3"].clone()];
    want.sort();
    assert_eq!(mac_hosts, want, "spread over h2 and h3: {m1} {m2}");

    // Exec through the orchestrator on the real guest, once its agent answers.
    let exec_url = orch.api(&format!("/orchestrator/machines/{guest_id}/execute"));
    let t0 = Instant::now();
    let out = loop {
        let (st, out) =
            call(&c, Method::PUT, &exec_url, &root, Some(json!({"command": "cat /etc/hostname; exit 3"})), &[]).await;
        if st == 200 {
            break out;
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "the guest never answered exec: {st} {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(out["stdout"].as_str().unwrap().trim(), "hangar-guest", "{out}");
    assert_eq!(out["exit_code"], 3, "{out}");
    eprintln!("fleet: exec through the orchestrator answered {:.1} s after create", t0.elapsed().as_secs_f64());

    // Services inside the guest through h1's reverse proxy: TCP echo and HTTP.
    let h1_root = Auth::Bearer(login(&c, &h1, "root", ROOT_PASSWORD).await);
    let first_ip = guest_ip(&c, &h1, &h1_root, &guest_id, None).await;
    eprintln!("fleet: guest address {first_ip}");
    let h1_addr = fabric.addr("h1");
    expose_guest(&c, &h1, &h1_root, &h1_addr, 7201, &guest_id).await;
    let echo_addr = format!("{h1_addr}:7201");
    assert_eq!(tcp_echo(&echo_addr, b"ping-through-h1\n").await, b"ping-through-h1\n");
    let page = c.get(format!("http://{h1_addr}:7202/index.html")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.unwrap().trim(), "hello-from-guest");

    // The same services through the orchestrator: its routes reach the VM through the host
    // that owns it (the orchestrator cannot route to h1's VM network at all).
    let orch_addr = fabric.addr("orch");
    expose_guest(&c, &orch, &root, &orch_addr, 7301, &guest_id).await;
    let orch_echo = format!("{orch_addr}:7301");
    assert_eq!(tcp_echo(&orch_echo, b"ping-through-orchestrator\n").await, b"ping-through-orchestrator\n");
    let page = c.get(format!("http://{orch_addr}:7302/index.html")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.unwrap().trim(), "hello-from-guest");

    // `hangar vm port-forward` through the orchestrator: an SSH-like exchange (a banner one
    // way, a reply the other, then bulk bytes) over a local port in the client namespace.
    let cli_home = dir.join("cli-home");
    let out = cli_in(
        &fabric,
        "cli",
        &cli_home,
        &["--url", &orch.url, "login", "--username", "root", "--password-stdin"],
        ROOT_PASSWORD,
    );
    assert!(out.status.success(), "login on the orchestrator: {}", String::from_utf8_lossy(&out.stderr));
    let mut pf = fabric
        .exec("cli", bin())
        .args(["vm", "port-forward", &guest_id, "17777:7777"])
        .env("HANGAR_CONFIG_DIR", &cli_home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pf_out = pf.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(pf_out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("port-forward announced nothing");
    assert!(line.contains("Forwarding") && line.contains("17777"), "{line}");
    let banner = b"SSH-2.0-hangar-test\r\n".to_vec();
    assert_eq!(tcp_echo("127.0.0.1:17777", &banner).await, banner);
    let bulk: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(tcp_echo("127.0.0.1:17777", &bulk).await, bulk, "256 KiB both ways");
    let _ = pf.kill();
    let _ = pf.wait();

    // Cable cut: h3 turns unhealthy within 10 s, its VM shows as unknown, and new VMs go
    // to h2. The cable back: h3 is healthy again by itself.
    let on_h3 = if m1["host_id"] == ids["h3"].as_str() { &m1 } else { &m2 };
    fabric.link("h3", false);
    let took = until_state(&c, &orch, &root, &ids["h3"], "unhealthy", Duration::from_secs(10)).await;
    eprintln!("fleet: link down -> unhealthy in {:.1} s", took.as_secs_f64());
    let (st, v) = call(
        &c,
        Method::GET,
        &orch.api(&format!("/orchestrator/machines/{}", on_h3["id"].as_str().unwrap())),
        &root,
        None,
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "unknown", "a VM on an unreachable host: {v}");
    let m3 = create(&c, &orch, &root, mac_vm("mac-3")).await;
    assert_eq!(m3["host_id"], ids["h2"].as_str(), "{m3}");
    fabric.link("h3", true);
    let took = until_state(&c, &orch, &root, &ids["h3"], "healthy", Duration::from_secs(30)).await;
    eprintln!("fleet: link up -> healthy in {:.1} s", took.as_secs_f64());

    // kill -9: h2 turns unhealthy within 10 s; new VMs go to h3; restarted, h2 rejoins.
    h2.kill9();
    let took = until_state(&c, &orch, &root, &ids["h2"], "unhealthy", Duration::from_secs(10)).await;
    eprintln!("fleet: kill -9 -> unhealthy in {:.1} s", took.as_secs_f64());
    // This one through the CLI: `hangar vm create --orchestrator` places it and follows the job.
    let out = cli_in(
        &fabric,
        "cli",
        &cli_home,
        &[
            "--output",
            "json",
            "vm",
            "create",
            "mac-4",
            "--orchestrator",
            "--image",
            "golden.pvm",
            "--tags",
            "mac",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--start",
            "--ttl",
            "3600",
        ],
        "",
    );
    assert!(out.status.success(), "hangar vm create --orchestrator: {}", String::from_utf8_lossy(&out.stderr));
    let m4: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(m4["host_id"], ids["h3"].as_str(), "{m4}");
    h2 = agent(&fabric, "h2", &dir, Some(&fake2), &image);
    let took = until_state(&c, &orch, &root, &ids["h2"], "healthy", Duration::from_secs(30)).await;
    eprintln!("fleet: restarted agent -> healthy in {:.1} s", took.as_secs_f64());

    // The orchestrator restarts (kill -9): hosts and VMs are all still there.
    let (_, before) = call(&c, Method::GET, &orch.api("/orchestrator/machines"), &root, None, &[]).await;
    orch.kill9();
    orch = orchestrator(&fabric, &dir);
    // A new client: the old one's pooled connections died with the old process.
    let c = client();
    let root = Auth::Bearer(login(&c, &orch, "root", ROOT_PASSWORD).await);
    for id in ids.values() {
        until_state(&c, &orch, &root, id, "healthy", Duration::from_secs(30)).await;
    }
    let (st, after) = call(&c, Method::GET, &orch.api("/orchestrator/machines"), &root, None, &[]).await;
    assert_eq!(st, 200, "{after}");
    let ids_of = |v: &Value| {
        let mut x: Vec<String> =
            v.as_array().unwrap().iter().map(|m| m["ID"].as_str().or(m["id"].as_str()).unwrap().to_string()).collect();
        x.sort();
        x
    };
    assert_eq!(ids_of(&before), ids_of(&after), "VMs after an orchestrator restart");
    assert_eq!(ids_of(&after).len(), 5, "{after}");

    // Drain: a disabled host takes no new VMs, and its running VMs keep running.
    let out = cli_in(&fabric, "cli", &cli_home, &["--output", "json", "host", "disable", "h2"], "");
    assert!(out.status.success(), "hangar host disable: {}", String::from_utf8_lossy(&out.stderr));
    let (st, v) = call(&c, Method::POST, &orch.api("/orchestrator/machines"), &root, Some(mac_vm("mac-5")), &[]).await;
    assert_eq!(st, 503, "h2 drained, h3 full: {v}");
    assert!(v["message"].as_str().unwrap().contains("disabled"), "{v}");
    for vm in [&m3, if m1["host_id"] == ids["h2"].as_str() { &m1 } else { &m2 }] {
        let (st, v) = call(
            &c,
            Method::GET,
            &orch.api(&format!("/orchestrator/machines/{}/status", vm["id"].as_str().unwrap())),
            &root,
            None,
            &[],
        )
        .await;
        assert_eq!((st, v["status"].as_str()), (200, Some("running")), "a drained host's VM keeps running: {v}");
    }
    let out = cli_in(&fabric, "cli", &cli_home, &["--output", "json", "host", "enable", "h2"], "");
    assert!(out.status.success(), "hangar host enable: {}", String::from_utf8_lossy(&out.stderr));

    // A restart that changes the guest's address: the DHCP pool moves, the guest reboots,
    // and the same proxy listener reaches it at its new address.
    drop(dhcp);
    dhcp = Dhcp::start(&fabric, &dir.join("dhcp"), "10.232.1.150,10.232.1.169");
    let (st, v) =
        call(&c, Method::PUT, &orch.api(&format!("/orchestrator/machines/{guest_id}/stop")), &root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) =
        call(&c, Method::PUT, &orch.api(&format!("/orchestrator/machines/{guest_id}/start")), &root, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let second_ip = guest_ip(&c, &h1, &h1_root, &guest_id, Some(&first_ip)).await;
    assert!(second_ip.starts_with("10.232.1.15") || second_ip.starts_with("10.232.1.16"), "{second_ip}");
    eprintln!("fleet: guest moved {first_ip} -> {second_ip}");
    let t0 = Instant::now();
    loop {
        // The echo service starts a moment after the address is up.
        let attempt = tokio::time::timeout(Duration::from_secs(5), tcp_echo(&echo_addr, b"after-restart\n")).await;
        if let Ok(got) = attempt
            && got == b"after-restart\n"
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the route did not follow the guest to {second_ip}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let page = c.get(format!("http://{h1_addr}:7202/index.html")).send().await.unwrap();
    assert_eq!(page.text().await.unwrap().trim(), "hello-from-guest");
    assert_eq!(tcp_echo(&orch_echo, b"orchestrator-after-restart\n").await, b"orchestrator-after-restart\n");

    // Clean up through the orchestrator; nothing of the guest stays on h1.
    for vm in ids_of(&after) {
        let (st, v) =
            call(&c, Method::DELETE, &orch.api(&format!("/orchestrator/machines/{vm}")), &root, None, &[]).await;
        assert!(st == 200 || st == 202, "delete {vm}: {st} {v}");
    }
    drop(dhcp);
    drop((h1, h2, h3, orch));
}
