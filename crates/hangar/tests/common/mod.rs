//! Test harness: runs the real `hangar` binary on loopback with its own data folder and
//! talks to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod netns;

pub const ROOT_PASSWORD: &str = "Root-Passw0rd!-test";
pub const USER_PASSWORD: &str = "User-Passw0rd!-test";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hangar")
}

/// A running server.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub banner: Vec<String>,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Start on a random port with `ROOT_PASSWORD` set and the given extra settings.
    pub fn start(dir: &Path, settings: &[(&str, &str)]) -> Server {
        Self::start_with(dir, settings, true)
    }

    pub fn start_with(dir: &Path, settings: &[(&str, &str)], root_password: bool) -> Server {
        Self::start_full(dir, settings, root_password, &[])
    }

    /// Start with extra environment variables for the server process.
    pub fn start_full(dir: &Path, settings: &[(&str, &str)], root_password: bool, env: &[(&str, &str)]) -> Server {
        Self::launch(None, ("127.0.0.1", 0), dir, settings, root_password, env)
    }

    /// Start inside network namespace `netns` (through `ip netns exec`, so the process is
    /// the server itself), listening on `addr`.
    pub fn start_in(netns: &str, addr: (&str, u16), dir: &Path, settings: &[(&str, &str)]) -> Server {
        Self::launch(Some(netns), addr, dir, settings, true, &[])
    }

    /// Start with everything chosen: namespace, listen address, settings and environment.
    pub fn launch(
        netns: Option<&str>,
        addr: (&str, u16),
        dir: &Path,
        settings: &[(&str, &str)],
        root_password: bool,
        env: &[(&str, &str)],
    ) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let stderr_path = dir.join(format!("server-{}.log", std::process::id()));
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_path).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("serve").arg("--data-dir").arg(dir).arg("--port").arg(addr.1.to_string());
        cmd.arg("--set").arg(format!("API_HOST={}", addr.0));
        for (k, v) in settings {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
        cmd.env_remove("ROOT_PASSWORD").env_remove("HANGAR_CONFIG");
        if root_password {
            cmd.env("ROOT_PASSWORD", ROOT_PASSWORD);
        }
        cmd.env("LOG_LEVEL", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(Stdio::piped()).stderr(stderr).stdin(Stdio::null()).spawn().expect("spawn hangar");
        // Held by a `Server` from here on, so a panic while waiting for the banner kills it.
        let mut server = Server { child, url: String::new(), dir: dir.to_path_buf(), banner: Vec::new(), stderr_path };
        let stdout = server.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut banner = Vec::new();
        let mut url = None;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix("listening on ")
                        && url.is_none()
                    {
                        url = Some(rest.trim().to_string());
                    }
                    let done = line.trim_start().starts_with("log in:");
                    banner.push(line);
                    if done {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = server.child.try_wait() {
                        panic!("hangar exited with {st} before it was ready: {}", server.log());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        server.url = url
            .unwrap_or_else(|| panic!("hangar did not announce a listener; banner: {banner:?}; log: {}", server.log()));
        server.banner = banner;
        server
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.url, path)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("hangar did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// How a request authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    Bearer(String),
    ApiKey(String),
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

pub async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    auth: &Auth,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut r = c.request(method, url);
    match auth {
        Auth::None => {}
        Auth::Bearer(t) => r = r.bearer_auth(t),
        Auth::ApiKey(k) => r = r.header("X-Api-Key", k),
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub async fn login(c: &reqwest::Client, s: &Server, user: &str, password: &str) -> String {
    let (st, v) = call(
        c,
        reqwest::Method::POST,
        &s.api("/auth/token"),
        &Auth::None,
        Some(json!({"username": user, "password": password})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "login as {user}: {v}");
    v["token"].as_str().unwrap().to_string()
}

/// Create a plain USER and return (id, token).
pub async fn make_user(c: &reqwest::Client, s: &Server, root: &str, name: &str) -> (String, String) {
    let (st, v) = call(
        c,
        reqwest::Method::POST,
        &s.api("/auth/users"),
        &Auth::Bearer(root.into()),
        Some(json!({"username": name, "email": format!("{name}@example.test"), "password": USER_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "create user {name}: {v}");
    let id = v["id"].as_str().unwrap().to_string();
    (id, login(c, s, name, USER_PASSWORD).await)
}

/// Grants `claim` to the user `user_id` (as root).
pub async fn grant_claim(c: &reqwest::Client, s: &Server, root: &str, user_id: &str, claim: &str) {
    let url = s.api(&format!("/auth/users/{user_id}/claims"));
    let (st, v) =
        call(c, reqwest::Method::POST, &url, &Auth::Bearer(root.into()), Some(json!({"name": claim})), &[]).await;
    assert_eq!(st, 201, "grant {claim}: {v}");
}

/// A second super user `name` (with `USER_PASSWORD`): (id, token).
pub async fn make_super_user(c: &reqwest::Client, s: &Server, root: &str, name: &str) -> (String, String) {
    let body = json!({"username": name, "email": format!("{name}@example.test"), "password": USER_PASSWORD,
        "roles": ["SUPER_USER"]});
    let (st, v) =
        call(c, reqwest::Method::POST, &s.api("/auth/users"), &Auth::Bearer(root.into()), Some(body), &[]).await;
    assert_eq!(st, 201, "create super user {name}: {v}");
    let id = v["id"].as_str().unwrap().to_string();
    (id, login(c, s, name, USER_PASSWORD).await)
}

/// Wait until root's `token` has expired (a request with it answers 401), then disable the
/// user `user_id` with a new root login.
pub async fn expire_then_disable(c: &reqwest::Client, s: &Server, token: &str, user_id: &str) {
    let old = Auth::Bearer(token.into());
    wait_for("root's token to expire", Duration::from_secs(20), || async {
        call(c, reqwest::Method::GET, &s.api("/auth/users"), &old, None, &[]).await.0 == 401
    })
    .await;
    let root = Auth::Bearer(login(c, s, "root", ROOT_PASSWORD).await);
    let url = s.api(&format!("/auth/users/{user_id}"));
    let (st, v) = call(c, reqwest::Method::PUT, &url, &root, Some(json!({"disabled": true})), &[]).await;
    assert_eq!(st, 200, "disable {user_id}: {v}");
}

/// Wait for a condition with a deadline.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fake prlctl binary, built by `cargo test --workspace`; built here when missing.
pub fn fake_prlctl() -> PathBuf {
    let dir = Path::new(bin()).parent().unwrap().to_path_buf();
    let fake = dir.join("hangar-fake-prlctl");
    if !fake.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "hangar-parallels", "--bin", "hangar-fake-prlctl"])
            .status()
            .unwrap();
        assert!(st.success(), "building the fake prlctl");
    }
    assert!(fake.exists(), "{} missing", fake.display());
    fake
}

/// A fake Parallels host: `prlctl`/`prlsrvctl`/`sysctl` links in `tools` (on the PATH of the
/// servers driving it, so the driver's `sysctl` is the fake host's), VM state in `state`,
/// and a golden bundle `images/golden.pvm` made with the fake itself.
pub struct FakeParallels {
    pub tools: PathBuf,
    pub state: PathBuf,
    pub images: PathBuf,
}

impl FakeParallels {
    pub fn new(dir: &Path) -> FakeParallels {
        let tools = dir.join("tools");
        let state = dir.join("prl-state");
        let images = dir.join("images");
        for d in [&tools, &state, &images] {
            std::fs::create_dir_all(d).unwrap();
        }
        let fake = fake_prlctl();
        std::os::unix::fs::symlink(&fake, tools.join("prlctl")).unwrap();
        std::os::unix::fs::symlink(&fake, tools.join("prlsrvctl")).unwrap();
        std::os::unix::fs::symlink(&fake, tools.join("sysctl")).unwrap();
        let f = FakeParallels { tools, state, images };
        f.prlctl(&["create", "golden", "--distribution", "ubuntu"]);
        f.prlctl(&["unregister", "golden"]);
        std::fs::rename(f.state.join("Parallels/golden.pvm"), f.images.join("golden.pvm")).unwrap();
        f
    }

    /// Gives the fake host `cpus` CPUs and `memory_mb` MiB of memory (its `host.json`: what
    /// its `sysctl` answers, so what the host module reports).
    pub fn size(&self, cpus: u32, memory_mb: u64) {
        let v = serde_json::json!({"cpus": cpus, "memory_mb": memory_mb});
        std::fs::write(self.state.join("host.json"), v.to_string()).unwrap();
    }

    pub fn prlctl(&self, args: &[&str]) {
        let out =
            Command::new(self.tools.join("prlctl")).args(args).env("FAKE_PRL_STATE_DIR", &self.state).output().unwrap();
        assert!(out.status.success(), "prlctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A server whose host module drives this fake, with extra settings.
    pub fn server(&self, data: &Path, extra: &[(&str, &str)]) -> Server {
        self.server_env(data, extra, &[])
    }

    /// A server driving this fake, with extra settings and extra environment for the fake
    /// (such as `FAKE_PRL_HANG`).
    pub fn server_env(&self, data: &Path, extra: &[(&str, &str)], env: &[(&str, &str)]) -> Server {
        let prlctl = self.tools.join("prlctl");
        let images = self.images.to_str().unwrap().to_string();
        let mut settings: Vec<(&str, &str)> = vec![
            ("HYPERVISOR", "parallels"),
            ("PRLCTL_PATH", prlctl.to_str().unwrap()),
            ("HOST_IMAGES_FOLDER", &images),
        ];
        settings.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("FAKE_PRL_STATE_DIR", self.state.to_str().unwrap()));
        let path = format!("{}:{}", self.tools.display(), std::env::var("PATH").unwrap_or_default());
        env.push(("PATH", &path));
        Server::start_full(data, &settings, true, &env)
    }

    /// Kill the fake's processes that hang (`FAKE_PRL_HANG`), by the pids they recorded.
    pub fn kill_hung(&self) {
        let Ok(rd) = std::fs::read_dir(self.state.join("hung-pids")) else { return };
        for e in rd.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = std::fs::remove_file(e.path());
        }
    }

    /// A host agent (api and host modules only) driving this fake.
    pub fn agent(&self, data: &Path, extra: &[(&str, &str)]) -> Server {
        let mut settings = vec![("ENABLED_MODULES", "api,host")];
        settings.extend_from_slice(extra);
        self.server(data, &settings)
    }
}

/// The fake's hung processes go with it, also when a test panics.
impl Drop for FakeParallels {
    fn drop(&mut self) {
        self.kill_hung();
    }
}

/// Push the VM bundle `bundle` to `s` as `catalog_id` 1.0.0 (x86_64) with the CLI, into a
/// local-folder provider at `dir/store` (the CLI's own files under `dir` too).
pub fn push_bundle(s: &Server, token: &str, dir: &Path, bundle: &Path, catalog_id: &str) {
    let provider = format!("provider=local-storage;catalog_path={}", dir.join("store").display());
    let out = Command::new(bin())
        .args(["--output", "json", "--url", &s.url, "catalog", "push", "--provider", &provider])
        .args(["--catalog-id", catalog_id, "--version", "1.0.0", "--architecture", "amd64", "--path"])
        .arg(bundle)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", dir.join("cli"))
        .env("XDG_CACHE_HOME", dir.join("cli-cache"))
        .env_remove("HANGAR_URL")
        .env_remove("HANGAR_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "push {catalog_id}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA and a certificate for `localhost` and 127.0.0.1 signed by it (`CA:FALSE`), as
/// PEM: (CA, leaf, leaf key). Each call makes a new CA with a name of its own, so a leaf of
/// one is refused by another as from an unknown issuer.
pub fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    static CAS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CAS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let name = format!("Hangar test CA {} {n}", std::process::id());
    ca_params.distinguished_name.push(DnType::CommonName, name);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// Register `agent` on the orchestrator `orch` as host `host-a`, with root's password.
pub async fn register_host(c: &reqwest::Client, orch: &Server, auth: &Auth, agent: &Server) -> (u16, Value) {
    let body =
        json!({"name": "host-a", "host": agent.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}});
    call(c, reqwest::Method::POST, &orch.api("/orchestrator/hosts"), auth, Some(body), &[]).await
}

/// An orchestrator (its modules `modules`) with one fake-Parallels host agent registered on it.
pub struct OneHostFleet {
    pub fake: FakeParallels,
    pub agent: Server,
    pub orch: Server,
    /// Root's token on the orchestrator.
    pub root: String,
}

pub async fn one_host_fleet(c: &reqwest::Client, dir: &Path, modules: &str) -> OneHostFleet {
    let fake = FakeParallels::new(&dir.join("a"));
    let agent = fake.agent(&dir.join("a/data"), &[("SYSTEM_RESERVED_CPU", "0")]);
    let orch = Server::start(&dir.join("orch"), &[("ENABLED_MODULES", modules), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")]);
    let root = login(c, &orch, "root", ROOT_PASSWORD).await;
    let (st, h) = register_host(c, &orch, &Auth::Bearer(root.clone()), &agent).await;
    assert_eq!(st, 201, "register the host: {h}");
    OneHostFleet { fake, agent, orch, root }
}

/// An HTTP upstream on 127.0.0.1 that answers, and records, what it saw of each request:
/// `{path, headers: {name: value}, hosts: [every Host header]}`.
pub async fn echo_upstream() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let seen2 = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = seen2.clone();
        async move {
            let text = |v: &axum::http::HeaderValue| json!(v.to_str().unwrap_or(""));
            let headers: serde_json::Map<String, Value> =
                req.headers().iter().map(|(k, v)| (k.to_string(), text(v))).collect();
            let hosts: Vec<Value> = req.headers().get_all("host").iter().map(text).collect();
            let v = json!({"path": req.uri().path(), "headers": headers, "hosts": hosts});
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(v.clone());
            axum::Json(v)
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
    let port = l.local_addr().expect("the upstream's address").port();
    tokio::spawn(async move { axum::serve(l, app).await.expect("the upstream") });
    (port, seen)
}
