//! The Parallels Desktop Terraform provider's requests, replayed call by call against the real
//! binary (fake `prlctl` hosts), as its Go client builds them: base `<host>/api/v1`, every call
//! with `Content-Type: application/json` and `X-No-Cache: true`, a bearer token from
//! `POST /auth/token {email, password}` (it reads `token` only). Its answers are decoded into
//! structs with the provider's Go types: a wrong JSON type fails the whole answer, as Go's
//! `json.Unmarshal` does, and "not found" is recognised only by the body's `code == 404`.
//! Written from reading the provider's source; none of its code is here.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use reqwest::Method;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// One request as the provider's HTTP caller sends it.
async fn tf(c: &reqwest::Client, method: Method, url: &str, auth: &Auth, body: Option<Value>) -> (u16, Value) {
    tf_with(c, method, url, auth, body, &[]).await
}

async fn tf_with(
    c: &reqwest::Client,
    method: Method,
    url: &str,
    auth: &Auth,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> (u16, Value) {
    let mut headers = vec![("Content-Type", "application/json"), ("X-No-Cache", "true")];
    headers.extend_from_slice(extra);
    call(c, method, url, auth, body, &headers).await
}

/// Decode an answer as the provider's Go type; a wrong type is a failure.
fn go<T: DeserializeOwned>(what: &str, v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: Go-like decode failed: {e}\n{v:#}"))
}

/// The provider's not-found check: the error body's `code` is 404 (the status alone is not read).
fn assert_not_found(what: &str, st: u16, v: &Value) {
    assert_eq!(st, 404, "{what}: {v}");
    let e: TfApiError = go(what, v);
    assert_eq!(e.code, 404, "{what}: the provider reads `code`: {v}");
    assert!(!e.message.is_empty(), "{what}: {v}");
}

// ----- the provider's Go types ---------------------------------------------------------------

#[derive(Deserialize)]
struct TfApiError {
    message: String,
    code: i64,
}

#[derive(Deserialize)]
struct TfLogin {
    token: String,
}

#[derive(Deserialize)]
struct TfUser {
    id: String,
    username: String,
    name: String,
    email: String,
    roles: Option<Vec<String>>,
    claims: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TfClaimRole {
    id: String,
    name: String,
}

#[derive(Deserialize)]
struct TfApiKey {
    id: String,
    name: String,
    key: String,
    revoked: bool,
    created_at: String,
    updated_at: String,
    #[serde(default)]
    revoked_at: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfUsageItem {
    #[serde(default)]
    physical_cpu_count: Option<i64>,
    logical_cpu_count: i64,
    memory_size: f64,
    #[serde(default)]
    disk_count: Option<f64>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfSystemUsage {
    #[serde(default)]
    cpu_type: Option<String>,
    #[serde(default)]
    cpu_brand: Option<String>,
    #[serde(default)]
    devops_version: Option<String>,
    #[serde(default)]
    is_reverse_proxy_enabled: bool,
    #[serde(default)]
    reverse_proxy: Option<TfSystemReverseProxy>,
    total: Option<TfUsageItem>,
    total_available: Option<TfUsageItem>,
    total_in_use: Option<TfUsageItem>,
    total_reserved: Option<TfUsageItem>,
    system_reserved: Option<TfUsageItem>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfSystemReverseProxy {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfHostResources {
    #[serde(default)]
    total_apple_vms: Option<i64>,
    #[serde(default)]
    physical_cpu_count: Option<i64>,
    #[serde(default)]
    logical_cpu_count: Option<i64>,
    #[serde(default)]
    memory_size: Option<f64>,
    #[serde(default)]
    disk_size: Option<f64>,
    #[serde(default)]
    free_disk_size: Option<f64>,
}

/// The provider's OrchestratorHost, with the keys it reads required here and typed as in
/// Go (a missing key or another type fails the decode): the host's own description
/// (`cpu_model`, `os_name`, `os_version`, `devops_version`, `external_ip_address`, the
/// Parallels Desktop keys, the reverse proxy) and the flat `resources{logical_cpu_count,
/// memory_size, ...}` (Hangar answers them next to its `total`/`available`/... blocks).
#[derive(Deserialize)]
#[allow(dead_code)]
struct TfOrchestratorHost {
    id: String,
    enabled: bool,
    host: String,
    architecture: String,
    cpu_model: String,
    os_version: String,
    os_name: String,
    devops_version: String,
    external_ip_address: String,
    parallels_desktop_version: String,
    parallels_desktop_licensed: bool,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    state: Option<String>,
    is_reverse_proxy_enabled: bool,
    reverse_proxy: TfSystemReverseProxy,
    resources: TfHostResources,
    #[serde(default)]
    required_claims: Option<Vec<String>>,
    #[serde(default)]
    required_roles: Option<Vec<String>>,
}

/// The answer to `POST /orchestrator/hosts` (the provider's OrchestratorHostResponse).
#[derive(Deserialize)]
#[allow(dead_code)]
struct TfOrchestratorHostResponse {
    id: String,
    host: String,
    architecture: String,
    #[serde(default)]
    cpu_model: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    state: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfManifestProviderMeta {
    #[serde(default)]
    access_key: Option<String>,
    #[serde(default)]
    bucket: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    secret_key: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfManifestProvider {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    meta: Option<TfManifestProviderMeta>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfPackContent {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

/// The provider's CatalogManifest; its three timestamps are Go `time.Time` (RFC 3339 or absent).
#[derive(Deserialize)]
#[allow(dead_code)]
struct TfCatalogManifest {
    #[serde(default)]
    name: Option<String>,
    id: String,
    catalog_id: String,
    #[serde(default)]
    description: Option<String>,
    architecture: String,
    version: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    pack_filename: Option<String>,
    #[serde(default)]
    metadata_filename: Option<String>,
    #[serde(default)]
    provider: Option<TfManifestProvider>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    updated_at: Option<String>,
    #[serde(default)]
    required_roles: Option<Vec<String>>,
    #[serde(default)]
    last_downloaded_at: Option<String>,
    #[serde(default)]
    last_downloaded_user: Option<String>,
    #[serde(default)]
    download_count: Option<i64>,
    #[serde(default)]
    pack_contents: Option<Vec<TfPackContent>>,
}

#[derive(Deserialize)]
struct TfVmCpu {
    cpus: i64,
}

#[derive(Deserialize)]
struct TfVmMemory {
    size: String,
}

#[derive(Deserialize)]
struct TfVmHardware {
    cpu: TfVmCpu,
    memory: TfVmMemory,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfVm {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: String,
    user: String,
    #[serde(default)]
    internal_ip_address: Option<String>,
    #[serde(default)]
    host_id: Option<String>,
    #[serde(rename = "Hardware")]
    hardware: TfVmHardware,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfCreateVm {
    id: String,
    name: String,
    owner: String,
    current_state: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfSetOperation {
    group: String,
    operation: String,
    status: String,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct TfSetResponse {
    operations: Vec<TfSetOperation>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfExecute {
    #[serde(default)]
    stdout: Option<String>,
    #[serde(default)]
    stderr: Option<String>,
    exit_code: i64,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfProxyRoute {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    target_vm_id: Option<String>,
    #[serde(default)]
    target_host: Option<String>,
    #[serde(default)]
    target_port: Option<String>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfProxyTcpRoute {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    target_port: Option<String>,
    #[serde(default)]
    target_host: Option<String>,
    #[serde(default)]
    target_vm_id: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TfProxyHost {
    id: String,
    host: String,
    port: String,
    #[serde(default)]
    http_routes: Option<Vec<TfProxyRoute>>,
    #[serde(default)]
    tcp_route: Option<TfProxyTcpRoute>,
}

#[derive(Deserialize)]
struct TfPull {
    id: String,
}

fn rfc3339(what: &str, t: &Option<String>) {
    if let Some(t) = t {
        assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok(), "{what}: {t:?} is not RFC 3339 (Go time.Time)");
    }
}

// ----- fixtures ------------------------------------------------------------------------------

/// Push the fake's golden bundle to `s`'s catalog as `id` 1.0.0 (amd64) with the CLI.
fn push_golden(s: &Server, token: &str, dir: &Path, bundle: &Path, id: &str) {
    let provider = format!("provider=local-storage;catalog_path={}", dir.join("store").display());
    let out = std::process::Command::new(bin())
        .args(["--output", "json", "--url", &s.url, "catalog", "push", "--provider", &provider])
        .args(["--catalog-id", id, "--version", "1.0.0", "--architecture", "amd64", "--path"])
        .arg(bundle)
        .env("HANGAR_TOKEN", token)
        .env("HANGAR_CONFIG_DIR", dir.join("cli"))
        .env("XDG_CACHE_HOME", dir.join("cli-cache"))
        .env_remove("HANGAR_URL")
        .env_remove("HANGAR_API_KEY")
        .env_remove("HANGAR_CATALOG_PROVIDER")
        .output()
        .unwrap();
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
}

/// The provider's login: `{email, password}`, reads `token`.
async fn tf_login(c: &reqwest::Client, s: &Server, email: &str, password: &str) -> (u16, Value) {
    tf(c, Method::POST, &s.api("/auth/token"), &Auth::None, Some(json!({"email": email, "password": password}))).await
}

// ----- tests ---------------------------------------------------------------------------------

/// Login (with an authenticator block, and without one), then users, claims, roles and API keys
/// as the provider's resources create, read and delete them, and its not-found checks.
#[tokio::test]
async fn identity_resources_as_the_provider_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();

    let (st, v) = tf_login(&c, &s, "root@localhost", ROOT_PASSWORD).await;
    assert_eq!(st, 200, "{v}");
    let token = go::<TfLogin>("login", &v).token;
    let root = Auth::Bearer(token);

    // No authenticator block: the provider logs in as root@localhost with its `license` string
    // as the password. Hangar's root has a password of its own (`ROOT_PASSWORD`, or one made at
    // first start, README): a Parallels licence is not a credential, so this is refused unless
    // the string is root's password. Terraform reports the refusal from `{code, message}`.
    let (st, v) = tf_login(&c, &s, "root@localhost", "PDS-LICENSE-1234-5678-ABCD").await;
    assert_eq!(st, 401, "{v}");
    let e: TfApiError = go("licence login", &v);
    assert_eq!(e.code, 401, "{v}");
    assert!(!e.message.is_empty());
    // When the licence string is root's password, that login works like any other.
    let (st, v) = tf_login(&c, &s, "root@localhost", ROOT_PASSWORD).await;
    assert_eq!(st, 200, "{v}");

    // Claims and roles: POST {name} → {id, name}, GET by id, list, DELETE.
    let mut made = Vec::new();
    for kind in ["claims", "roles"] {
        let name = format!("TF_{}", kind.to_uppercase());
        let (st, v) = tf(&c, Method::POST, &s.api(&format!("/auth/{kind}")), &root, Some(json!({"name": name}))).await;
        assert!((200..300).contains(&st), "create {kind}: {st} {v}");
        let cr: TfClaimRole = go(kind, &v);
        assert_eq!(cr.name, name);
        let (st, v) = tf(&c, Method::GET, &s.api(&format!("/auth/{kind}/{}", cr.id)), &root, None).await;
        assert_eq!(st, 200, "{v}");
        let got: TfClaimRole = go(kind, &v);
        assert_eq!((got.id.as_str(), got.name.as_str()), (cr.id.as_str(), name.as_str()));
        let (st, v) = tf(&c, Method::GET, &s.api(&format!("/auth/{kind}")), &root, None).await;
        assert_eq!(st, 200, "{v}");
        let all: Vec<TfClaimRole> = go(kind, &v);
        assert!(all.iter().any(|x| x.id == cr.id));
        made.push((kind, cr));
    }

    // Users: POST {username, name, email, password} → the user; GET; add a role and a claim
    // (each answers {id, name}); the user then lists them as strings.
    let body = json!({"username": "tf-user", "name": "TF User", "email": "tf-user@example.test",
        "password": USER_PASSWORD});
    let (st, v) = tf(&c, Method::POST, &s.api("/auth/users"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "create user: {st} {v}");
    let u: TfUser = go("user", &v);
    assert_eq!(
        (u.username.as_str(), u.name.as_str(), u.email.as_str()),
        ("tf-user", "TF User", "tf-user@example.test")
    );
    for (kind, cr) in &made {
        let url = s.api(&format!("/auth/users/{}/{kind}", u.id));
        let (st, v) = tf(&c, Method::POST, &url, &root, Some(json!({"name": cr.name}))).await;
        assert!((200..300).contains(&st), "add {kind}: {st} {v}");
        let added: TfClaimRole = go(kind, &v);
        assert!(!added.id.is_empty() && !added.name.is_empty(), "{v}");
    }
    let (st, v) = tf(&c, Method::GET, &s.api(&format!("/auth/users/{}", u.id)), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let got: TfUser = go("user", &v);
    assert!(got.roles.unwrap_or_default().iter().any(|r| r == "TF_ROLES"), "{v}");
    assert!(got.claims.unwrap_or_default().iter().any(|r| r == "TF_CLAIMS"), "{v}");
    let (st, v) = tf(&c, Method::GET, &s.api("/auth/users"), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let users: Vec<TfUser> = go("users", &v);
    assert!(users.iter().any(|x| x.id == u.id));

    // API keys: POST {name, key, secret} → {id, name, key, revoked, created_at, ...}.
    let body = json!({"name": "tf-key", "key": "tf-key-public", "secret": "Tf-Secret-0123456789abcdef"});
    let (st, v) = tf(&c, Method::POST, &s.api("/auth/api_keys"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "create api key: {st} {v}");
    let k: TfApiKey = go("api key", &v);
    assert_eq!((k.name.as_str(), k.revoked), ("tf-key", false), "{v}");
    assert!(!k.key.contains("Tf-Secret"), "the secret is never answered: {v}");
    for (what, t) in [
        ("created_at", Some(k.created_at.clone())),
        ("updated_at", Some(k.updated_at.clone())),
        ("revoked_at", k.revoked_at.clone()),
    ] {
        rfc3339(what, &t);
    }
    let (st, v) = tf(&c, Method::GET, &s.api(&format!("/auth/api_keys/{}", k.id)), &root, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(go::<TfApiKey>("api key", &v).id, k.id);
    let (st, v) = tf(&c, Method::GET, &s.api("/auth/api_keys"), &root, None).await;
    assert_eq!(st, 200, "{v}");
    assert!(go::<Vec<TfApiKey>>("api keys", &v).iter().any(|x| x.id == k.id));

    // Deletes, then the provider's read of each is a not-found by `code`.
    let gone = [
        format!("/auth/api_keys/{}", k.id),
        format!("/auth/users/{}", u.id),
        format!("/auth/claims/{}", made[0].1.id),
        format!("/auth/roles/{}", made[1].1.id),
    ];
    for path in &gone {
        let (st, v) = tf(&c, Method::DELETE, &s.api(path), &root, None).await;
        assert!((200..300).contains(&st), "DELETE {path}: {st} {v}");
        let (st, v) = tf(&c, Method::GET, &s.api(path), &root, None).await;
        assert_not_found(&format!("GET {path} after delete"), st, &v);
        let (st, v) = tf(&c, Method::DELETE, &s.api(path), &root, None).await;
        assert_not_found(&format!("second DELETE {path}"), st, &v);
    }
    // A catalog manifest that does not exist.
    let (st, v) = tf(&c, Method::GET, &s.api("/catalog/no-such-image/1.0.0/arm64"), &root, None).await;
    assert_not_found("GET /catalog/{id}/{version}/{arch}", st, &v);
}

/// Host mode: hardware, the catalog manifest, a VM from the catalog (`catalog_manifest`), the
/// list with the trailing slash and `X-Filter`, `set` operations, execute, `PUT /catalog/pull`,
/// and reverse-proxy hosts with string ports.
#[tokio::test]
async fn host_mode_vm_catalog_and_reverse_proxy_as_the_provider_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(
        &dir.path().join("data"),
        &[("ENABLED_MODULES", "api,host,catalog,reverse_proxy"), ("SYSTEM_RESERVED_CPU", "0")],
    );
    let c = client();
    let (_, v) = tf_login(&c, &s, "root@localhost", ROOT_PASSWORD).await;
    let token = go::<TfLogin>("login", &v).token;
    let root = Auth::Bearer(token.clone());
    push_golden(&s, &token, dir.path(), &fake.images.join("golden.pvm"), "tf-image");

    // Hardware: total_available.logical_cpu_count (int64) and .memory_size (float64),
    // dereferenced without a nil check.
    let (st, v) = tf(&c, Method::GET, &s.api("/config/hardware"), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let hw: TfSystemUsage = go("/config/hardware", &v);
    let avail = hw.total_available.expect("total_available");
    assert!(avail.logical_cpu_count > 0 && avail.memory_size > 0.0, "{v}");

    // The catalog manifest the provider reads before a pull: RFC 3339 timestamps.
    let (st, v) = tf(&c, Method::GET, &s.api("/catalog/tf-image/1.0.0/x86_64"), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let m: TfCatalogManifest = go("catalog manifest", &v);
    assert_eq!((m.catalog_id.as_str(), m.version.as_str()), ("tf-image", "1.0.0"), "{v}");
    assert!(!m.id.is_empty() && !m.architecture.is_empty(), "{v}");
    rfc3339("created_at", &m.created_at);
    rfc3339("updated_at", &m.updated_at);
    rfc3339("last_downloaded_at", &m.last_downloaded_at);
    assert!(m.created_at.is_some(), "{v}");

    // VM create (the deploy resource): {name, owner, architecture, catalog_manifest{...}}.
    let authority = s.url.trim_start_matches("http://");
    // A connection without a scheme: the reference assumes http, Hangar https (deliberate: the
    // connection carries credentials, which are not sent in clear unless `http://` is written;
    // see hangar-catalog's CatalogConnection). The refusal names the https origin it tried.
    let body = json!({"name": "tf-vm-noscheme", "architecture": "x86_64",
        "catalog_manifest": {"machine_name": "tf-vm-noscheme", "catalog_id": "tf-image", "version": "1.0.0",
            "connection": format!("host=root:{ROOT_PASSWORD}@{authority}")}});
    let (st, v) = tf(&c, Method::POST, &s.api("/machines"), &root, Some(body)).await;
    assert!(st >= 400, "{st} {v}");
    let e: TfApiError = go("no-scheme connection", &v);
    assert!(e.message.contains(&format!("https://{authority}")) && !e.message.contains(ROOT_PASSWORD), "{v}");
    let body = json!({"name": "tf-vm", "owner": "root", "architecture": "x86_64",
        "catalog_manifest": {"machine_name": "tf-vm", "catalog_id": "tf-image", "version": "1.0.0",
            "architecture": "x86_64", "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}"),
            "start_after_pull": false, "path": ""}});
    let (st, v) = tf(&c, Method::POST, &s.api("/machines"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "create: {st} {v}");
    let made: TfCreateVm = go("create vm", &v);
    assert_eq!(made.name, "tf-vm", "{v}");
    assert!(!made.id.is_empty() && !made.current_state.is_empty(), "{v}");

    // The list with the trailing slash, filtered by name.
    let (st, v) = tf_with(&c, Method::GET, &s.api("/machines/"), &root, None, &[("X-Filter", "Name=tf-vm")]).await;
    assert_eq!(st, 200, "GET /machines/: {v}");
    let vms: Vec<TfVm> = go("vm list", &v);
    assert_eq!(vms.len(), 1, "X-Filter Name=tf-vm: {v}");
    assert_eq!(vms[0].id, made.id);
    let (st, v) = tf(&c, Method::GET, &s.api(&format!("/machines/{}", made.id)), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let vm: TfVm = go("vm", &v);
    assert_eq!((vm.name.as_str(), vm.user.is_empty()), ("tf-vm", false), "{v}");
    assert!(vm.hardware.memory.size.ends_with("Mb") && vm.hardware.cpu.cpus > 0, "{v}");

    // set: cpu, memory (stopped), then start; each reported per operation.
    let op = |group: &str, operation: &str, value: &str| {
        json!({"owner": "", "group": group, "operation": operation, "value": value, "options": [], "flags": [],
            "error": null})
    };
    let set = s.api(&format!("/machines/{}/set", made.id));
    let body = json!({"owner": vm.user, "operations": [op("cpu", "set", "2"), op("memory", "set", "2048")]});
    let (st, v) = tf(&c, Method::PUT, &set, &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let r: TfSetResponse = go("set", &v);
    assert_eq!(r.operations.len(), 2, "{v}");
    assert!(r.operations.iter().all(|o| o.error.as_deref().unwrap_or_default().is_empty()), "{v}");
    assert_eq!((r.operations[0].group.as_str(), r.operations[0].operation.as_str()), ("cpu", "set"), "{v}");
    let (_, v) = tf(&c, Method::GET, &s.api(&format!("/machines/{}", made.id)), &root, None).await;
    let vm: TfVm = go("vm", &v);
    assert_eq!((vm.hardware.cpu.cpus, vm.hardware.memory.size.as_str()), (2, "2048Mb"), "{v}");

    // clone (the clone resource): value = the new name, option dst, flag regenerate-src-uuid.
    // `dst` must lie in this host's VM folders (deliberate: an API caller may not write a VM
    // bundle anywhere on the host, SECURITY.md); the provider's users name such a folder.
    let clone_dir = fake.state.join("Parallels/clones");
    std::fs::create_dir_all(&clone_dir).unwrap();
    let clone = json!({"owner": "", "group": "machine", "operation": "clone", "value": "tf-vm-clone",
        "options": [{"flag": "dst", "value": clone_dir.to_str().unwrap()}], "flags": ["regenerate-src-uuid"],
        "error": null});
    let (st, v) = tf(&c, Method::PUT, &set, &root, Some(json!({"owner": vm.user, "operations": [clone]}))).await;
    assert_eq!(st, 200, "{v}");
    let r: TfSetResponse = go("set clone", &v);
    assert!(r.operations[0].error.as_deref().unwrap_or_default().is_empty(), "{v}");
    let (st, v) =
        tf_with(&c, Method::GET, &s.api("/machines/"), &root, None, &[("X-Filter", "Name=tf-vm-clone")]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(go::<Vec<TfVm>>("vm list", &v).len(), 1, "the clone exists: {v}");

    let body = json!({"owner": vm.user, "operations": [op("state", "start", "")]});
    let (st, v) = tf(&c, Method::PUT, &set, &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let r: TfSetResponse = go("set state", &v);
    assert_eq!((r.operations[0].group.as_str(), r.operations[0].operation.as_str()), ("state", "start"), "{v}");
    assert!(!r.operations[0].status.is_empty(), "{v}");
    let (_, v) = tf(&c, Method::GET, &s.api(&format!("/machines/{}", made.id)), &root, None).await;
    assert_eq!(go::<TfVm>("vm", &v).state, "running", "{v}");

    // execute (post-processor scripts): exit_code, stdout, stderr.
    let body = json!({"command": "echo provisioned", "environment_variables": {"TF": "1"}});
    let (st, v) = tf(&c, Method::PUT, &s.api(&format!("/machines/{}/execute", made.id)), &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let x: TfExecute = go("execute", &v);
    assert_eq!(x.exit_code, 0, "{v}");
    assert_eq!(x.stdout.as_deref().map(str::trim), Some("provisioned"), "{v}");

    // The remote-image resource: PUT /catalog/pull → {id}.
    let body = json!({"catalog_id": "tf-image", "version": "1.0.0", "machine_name": "tf-pulled", "owner": "root",
        "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}"), "path": "", "start_after_pull": true});
    let (st, v) = tf(&c, Method::PUT, &s.api("/catalog/pull"), &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let pulled: TfPull = go("pull", &v);
    let (st, v) = tf(&c, Method::GET, &s.api(&format!("/machines/{}", pulled.id)), &root, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(go::<TfVm>("vm", &v).name, "tf-pulled");

    // Reverse-proxy hosts, ports as strings.
    reverse_proxy_roundtrip(&c, &root, &s.api("/reverse-proxy/hosts"), &made.id).await;

    // Delete the VMs (stop first, as the provider does through `set`).
    for id in [made.id.as_str(), pulled.id.as_str()] {
        let body = json!({"owner": "", "operations": [op("state", "stop", "")]});
        let (st, v) = tf(&c, Method::PUT, &s.api(&format!("/machines/{id}/set")), &root, Some(body)).await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = tf(&c, Method::DELETE, &s.api(&format!("/machines/{id}")), &root, None).await;
        assert!((200..300).contains(&st), "delete: {st} {v}");
        let (st, v) = tf(&c, Method::GET, &s.api(&format!("/machines/{id}")), &root, None).await;
        assert_eq!(st, 404, "{v}");
    }
}

/// POST a reverse-proxy host as the provider does (ports as strings), read it back, list it
/// and delete it; every answer is decoded with the provider's types.
async fn reverse_proxy_roundtrip(c: &reqwest::Client, root: &Auth, hosts_url: &str, vm_id: &str) {
    let body = json!({"host": "127.0.0.1", "port": "0",
        "http_routes": [{"path": "/", "target_vm_id": vm_id, "target_host": "", "target_port": "8080",
            "schema": "http", "pattern": "", "request_headers": {"X-From": "tf"}, "response_headers": {}}]});
    let (st, v) = tf(c, Method::POST, hosts_url, root, Some(body)).await;
    assert!((200..300).contains(&st), "create proxy host: {st} {v}");
    let h: TfProxyHost = go("reverse proxy host", &v);
    let routes = h.http_routes.unwrap_or_default();
    assert_eq!(routes.len(), 1, "{v}");
    assert_eq!(routes[0].target_port.as_deref(), Some("8080"), "{v}");
    let one = format!("{hosts_url}/{}", h.id);
    let (st, v) = tf(c, Method::GET, &one, root, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(go::<TfProxyHost>("reverse proxy host", &v).id, h.id);
    let (st, v) = tf(c, Method::GET, hosts_url, root, None).await;
    assert_eq!(st, 200, "{v}");
    assert!(go::<Vec<TfProxyHost>>("reverse proxy hosts", &v).iter().any(|x| x.id == h.id));
    let (st, v) = tf(c, Method::DELETE, &one, root, None).await;
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, v) = tf(c, Method::GET, &one, root, None).await;
    assert_eq!(st, 404, "{v}");
}

/// Orchestrator mode: register a host with the provider's body, read hosts, their hardware and
/// the overview, make a VM from the catalog on the orchestrator, list it with the trailing slash,
/// configure it through `/orchestrator/machines/{id}/set`, a per-host reverse-proxy host, and
/// the host's removal.
#[tokio::test]
async fn orchestrator_mode_as_the_provider_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let fake = FakeParallels::new(&dir.path().join("a"));
    let agent = fake.agent(
        &dir.path().join("a/data"),
        &[("ENABLED_MODULES", "api,host,catalog,reverse_proxy"), ("SYSTEM_RESERVED_CPU", "0")],
    );
    let orch = Server::start(
        &dir.path().join("orch"),
        &[("ENABLED_MODULES", "api,orchestrator,catalog"), ("ORCHESTRATOR_CHECK_INTERVAL", "1s")],
    );
    let (_, v) = tf_login(&c, &orch, "root@localhost", ROOT_PASSWORD).await;
    let token = go::<TfLogin>("login", &v).token;
    let root = Auth::Bearer(token.clone());
    push_golden(&orch, &token, dir.path(), &fake.images.join("golden.pvm"), "tf-image");

    // The orchestrator-registration resource's body.
    let body = json!({"host": agent.url, "description": "tf host", "tags": ["tf", "ci"],
        "authentication": {"username": "root", "password": ROOT_PASSWORD},
        "required_claims": [], "required_roles": []});
    let (st, v) = tf(&c, Method::POST, &orch.api("/orchestrator/hosts"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "register: {st} {v}");
    let reg: TfOrchestratorHostResponse = go("register host", &v);
    assert!(!reg.id.is_empty(), "{v}");
    assert_eq!(reg.description.as_deref(), Some("tf host"), "{v}");
    let hid = reg.id.clone();
    let (st, v) = tf(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{hid}")), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let h: TfOrchestratorHost = go("orchestrator host", &v);
    assert_eq!(h.id, hid);
    assert!(h.enabled, "{v}");
    // The host's description of itself, as the provider shows it.
    assert!(!h.cpu_model.is_empty() && !h.os_name.is_empty() && !h.devops_version.is_empty(), "{v}");
    assert!(h.resources.logical_cpu_count.is_some_and(|n| n > 0), "resources.logical_cpu_count: {v}");
    assert!(h.resources.memory_size.is_some_and(|m| m > 0.0), "resources.memory_size: {v}");
    assert!(h.resources.disk_size.is_some_and(|d| d > 0.0), "resources.disk_size: {v}");
    assert_eq!(h.is_reverse_proxy_enabled, h.reverse_proxy.enabled.unwrap_or_default(), "{v}");
    let mut tags = h.tags.unwrap_or_default();
    tags.sort();
    assert_eq!(tags, vec!["ci".to_string(), "tf".to_string()], "{v}");
    let (st, v) = tf(&c, Method::GET, &orch.api("/orchestrator/hosts"), &root, None).await;
    assert_eq!(st, 200, "{v}");
    assert!(go::<Vec<TfOrchestratorHost>>("hosts", &v).iter().any(|x| x.id == hid));

    // Hardware of that host (the deploy resource's capacity check) and the overview.
    let (st, v) = tf(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{hid}/hardware")), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let hw: TfSystemUsage = go("host hardware", &v);
    let avail = hw.total_available.expect("total_available");
    assert!(avail.logical_cpu_count > 0 && avail.memory_size > 0.0, "{v}");
    let (st, v) = tf(&c, Method::GET, &orch.api("/orchestrator/overview/resources"), &root, None).await;
    assert_eq!(st, 200, "{v}");
    let overview: Vec<TfSystemUsage> = go("overview/resources", &v);
    assert!(!overview.is_empty(), "{v}");

    // VM create through the orchestrator, from the orchestrator's catalog.
    let authority = orch.url.trim_start_matches("http://");
    let body = json!({"name": "tf-orch-vm", "architecture": "x86_64",
        "catalog_manifest": {"machine_name": "tf-orch-vm", "catalog_id": "tf-image", "version": "1.0.0",
            "architecture": "x86_64", "connection": format!("host=http://root:{ROOT_PASSWORD}@{authority}"),
            "start_after_pull": false, "path": ""}});
    let (st, v) = tf(&c, Method::POST, &orch.api("/orchestrator/machines"), &root, Some(body)).await;
    assert!((200..300).contains(&st), "create: {st} {v}");
    let made: TfCreateVm = go("create vm", &v);
    let (st, v) =
        tf_with(&c, Method::GET, &orch.api("/orchestrator/machines/"), &root, None, &[("X-Filter", "Name=tf-orch-vm")])
            .await;
    assert_eq!(st, 200, "GET /orchestrator/machines/: {v}");
    let vms: Vec<TfVm> = go("orchestrator vm list", &v);
    assert_eq!(vms.len(), 1, "X-Filter Name=tf-orch-vm: {v}");
    assert_eq!(vms[0].id, made.id);
    assert_eq!(vms[0].host_id.as_deref(), Some(hid.as_str()), "{v}");

    let set = orch.api(&format!("/orchestrator/machines/{}/set", made.id));
    let body = json!({"owner": vms[0].user, "operations": [
        {"owner": "", "group": "cpu", "operation": "set", "value": "2", "options": [], "flags": [], "error": null},
        {"owner": "", "group": "state", "operation": "start", "value": "", "options": [], "flags": [], "error": null}]});
    let (st, v) = tf(&c, Method::PUT, &set, &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let r: TfSetResponse = go("orchestrator set", &v);
    assert_eq!(r.operations.len(), 2, "{v}");
    assert!(r.operations.iter().all(|o| o.error.as_deref().unwrap_or_default().is_empty()), "{v}");
    // The provider reads the VM right after the answer: its state is already the new one.
    let vm_url = orch.api(&format!("/orchestrator/machines/{}", made.id));
    let (st, v) = tf(&c, Method::GET, &vm_url, &root, None).await;
    assert_eq!(st, 200, "{v}");
    let vm: TfVm = go("orchestrator vm right after set", &v);
    assert_eq!(vm.state, "running", "State right after set start: {v}");
    // The hardware (cpu count) follows the host's event a moment later.
    wait_for("the orchestrator shows the VM running", std::time::Duration::from_secs(15), || {
        let (c, url, root) = (c.clone(), vm_url.clone(), root.clone());
        async move {
            let (st, v) = tf(&c, Method::GET, &url, &root, None).await;
            assert_eq!(st, 200, "{v}");
            let vm: TfVm = go("orchestrator vm", &v);
            vm.state == "running" && vm.hardware.cpu.cpus == 2
        }
    })
    .await;
    let body = json!({"command": "echo through-orchestrator"});
    let url = orch.api(&format!("/orchestrator/machines/{}/execute", made.id));
    let (st, v) = tf(&c, Method::PUT, &url, &root, Some(body)).await;
    assert_eq!(st, 200, "{v}");
    let x: TfExecute = go("execute", &v);
    assert_eq!((x.exit_code, x.stdout.as_deref().map(str::trim)), (0, Some("through-orchestrator")), "{v}");

    // A reverse-proxy host on that host, through the orchestrator.
    reverse_proxy_roundtrip(&c, &root, &orch.api(&format!("/orchestrator/hosts/{hid}/reverse-proxy/hosts")), &made.id)
        .await;

    // VM delete, then the host's removal.
    let stop = json!({"owner": "", "operations": [{"owner": "", "group": "state", "operation": "stop", "value": "",
        "options": [], "flags": [], "error": null}]});
    let (st, v) = tf(&c, Method::PUT, &set, &root, Some(stop)).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = tf(&c, Method::GET, &vm_url, &root, None).await;
    assert_eq!(st, 200, "{v}");
    let vm: TfVm = go("orchestrator vm right after set stop", &v);
    assert_eq!(vm.state, "stopped", "State right after set stop: {v}");
    let (st, v) = tf(&c, Method::DELETE, &orch.api(&format!("/orchestrator/machines/{}", made.id)), &root, None).await;
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, v) = tf(&c, Method::DELETE, &orch.api(&format!("/orchestrator/hosts/{hid}")), &root, None).await;
    assert!((200..300).contains(&st), "unregister host: {st} {v}");
    let (st, v) = tf(&c, Method::GET, &orch.api(&format!("/orchestrator/hosts/{hid}")), &root, None).await;
    assert_eq!(st, 404, "{v}");
}
