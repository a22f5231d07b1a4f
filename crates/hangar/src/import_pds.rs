//! `hangar db import-pds data.json`: migration from the Parallels DevOps Service.
//!
//! Reads the reference's database file (`src/data/main.go`, struct `Data`, and the records of
//! `src/data/models/*.go`) and hands each kind to the service that owns it:
//! users, roles, claims and API keys to `hangar_identity::Identity::import_pds` (password and
//! key hashes kept in the reference's bcrypt form until their first use), orchestrator hosts
//! to the host registry (credentials sealed), reverse-proxy hosts to
//! `hangar_reverse_proxy::ReverseProxy::import`, and catalog manifests to the collection
//! [`PDS_MANIFESTS`] with their provider connection sealed by the catalog's key. Every kind is
//! planned first; a conflict with an existing record stops the import before anything is
//! written unless `--force`. Secrets are never printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine;
use chrono::{DateTime, Utc};
use hangar_core::EventBus;
use hangar_core::audit::Actor;
use hangar_identity::password::pds_bcrypt_hash;
use hangar_identity::{IdentityImport, ImportedApiKey, ImportedClaim, ImportedRole, ImportedUser};
use hangar_store::{Batch, Store};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::settings::Settings;

/// Catalog manifests imported from the reference, waiting for `hangar catalog import`.
pub const PDS_MANIFESTS: &str = "pds_catalog_manifests";

/// Options of the command.
pub struct Options {
    pub file: PathBuf,
    pub dry_run: bool,
    pub force: bool,
    pub service_user: String,
    pub service_roles: Vec<String>,
    /// The reference's `ENCRYPTION_PRIVATE_KEY` (PEM, or PEM in base64), for an encrypted file.
    pub encryption_key: Option<PathBuf>,
    /// The reference ran with `SECURITY_PASSWORD_SALT_PASSWORD=false`: its hashes have no salt.
    pub unsalted: bool,
}

// ----- the reference's records (only the fields the import uses) ---------------------------
// Go marshals nil slices and pointers as `null`, so every list is an Option.

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    users: Option<Vec<User>>,
    #[serde(default)]
    claims: Option<Vec<Named>>,
    #[serde(default)]
    roles: Option<Vec<Named>>,
    #[serde(default)]
    api_keys: Option<Vec<ApiKey>>,
    #[serde(default)]
    catalog_manifests: Option<Vec<Value>>,
    #[serde(default)]
    orchestrator_hosts: Option<Vec<Host>>,
    #[serde(default)]
    reverse_proxy: Option<ReverseProxy>,
    #[serde(default)]
    reverse_proxy_hosts: Option<Vec<Value>>,
}

#[derive(Deserialize, Clone)]
struct Named {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    resource: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    claims: Option<Vec<Named>>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    id: String,
    username: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    created_at: String,
    #[serde(default)]
    roles: Option<Vec<Named>>,
    #[serde(default)]
    claims: Option<Vec<Named>>,
}

#[derive(Deserialize)]
struct ApiKey {
    id: String,
    #[serde(default)]
    name: String,
    key: String,
    secret: String,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    created_at: String,
    #[serde(default)]
    revoked_at: String,
    #[serde(default)]
    expires_at: String,
    #[serde(default)]
    user_id: String,
}

#[derive(Deserialize)]
struct Host {
    #[serde(default)]
    id: String,
    #[serde(default)]
    enabled: bool,
    host: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    port: String,
    #[serde(default)]
    schema: String,
    #[serde(default)]
    path_prefix: String,
    #[serde(default)]
    authentication: Option<HostAuth>,
    #[serde(default)]
    required_claims: Option<Vec<String>>,
    #[serde(default)]
    required_roles: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct HostAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    api_key: String,
}

#[derive(Deserialize)]
struct ReverseProxy {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: String,
}

fn time(field: &str, s: &str) -> Result<Option<DateTime<Utc>>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| Some(t.with_timezone(&Utc)))
        .with_context(|| format!("{field}: {s:?} is not an RFC 3339 time"))
}

fn names(v: &Option<Vec<Named>>) -> Vec<String> {
    v.iter().flatten().map(|n| n.name.clone()).filter(|n| !n.is_empty()).collect()
}

/// DER length octets.
fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let b: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
    let mut out = vec![0x80 | b.len() as u8];
    out.extend(b);
    out
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// The reference's `ENCRYPTION_PRIVATE_KEY`: a PEM RSA key (`RSA PRIVATE KEY`, PKCS#1, as its
/// `gen-rsa` writes, or `PRIVATE KEY`, PKCS#8), or that PEM in base64 (the form the
/// variable holds). Answers PKCS#8 DER.
fn rsa_key_pkcs8(text: &str) -> Result<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut text = text.trim().to_string();
    if !text.starts_with("-----BEGIN") {
        let compact: String = text.split_whitespace().collect();
        let decoded = b64.decode(compact).ok().and_then(|b| String::from_utf8(b).ok());
        text = decoded
            .filter(|t| t.trim_start().starts_with("-----BEGIN"))
            .context("the encryption key is neither a PEM RSA private key nor one in base64")?;
    }
    let label = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN ").and_then(|r| r.strip_suffix("-----")))
        .context("the encryption key has no PEM header")?
        .to_string();
    let body: String = text.lines().map(str::trim).filter(|l| !l.starts_with("-----") && !l.contains(':')).collect();
    let der_bytes = b64.decode(body).context("the encryption key's PEM body is not base64")?;
    match label.as_str() {
        "PRIVATE KEY" => Ok(der_bytes),
        "RSA PRIVATE KEY" => {
            // PrivateKeyInfo { version 0, rsaEncryption with NULL parameters, the PKCS#1 key }.
            let alg: &[u8] =
                &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
            let mut inner = vec![0x02, 0x01, 0x00];
            inner.extend_from_slice(alg);
            inner.extend(der(0x04, &der_bytes));
            Ok(der(0x30, &inner))
        }
        other => bail!("the encryption key is a {other:?}, not an RSA private key"),
    }
}

/// Decrypts a file the reference encrypted (`src/security/main.go`): the AES-256 key wrapped
/// with RSA PKCS#1 v1.5 (as long as the RSA modulus), then the JSON in AES-CFB with the first
/// 16 bytes of the AES key as IV.
fn decrypt(key_text: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    use aws_lc_rs::cipher::{AES_256, DecryptingKey, DecryptionContext, UnboundCipherKey};
    use aws_lc_rs::iv::FixedLength;
    use aws_lc_rs::rsa::{Pkcs1PrivateDecryptingKey, PrivateDecryptingKey};
    let pkcs8 = rsa_key_pkcs8(key_text)?;
    let key = PrivateDecryptingKey::from_pkcs8(&pkcs8)
        .map_err(|e| anyhow::anyhow!("the encryption key is not a usable RSA private key: {e}"))?;
    let n = key.key_size_bytes();
    let key = Pkcs1PrivateDecryptingKey::new(key).map_err(|_| anyhow::anyhow!("the RSA key cannot decrypt"))?;
    if bytes.len() < n {
        bail!("the file is shorter than an RSA-wrapped key: it is not an encrypted data.json");
    }
    let mut aes = vec![0u8; n];
    let aes = key.decrypt(&bytes[..n], &mut aes).map_err(|_| {
        anyhow::anyhow!("the file does not open with this key (wrong key, or not an encrypted data.json)")
    })?;
    if aes.len() != 32 {
        bail!("the file does not open with this key (the wrapped key is not an AES-256 key)");
    }
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&aes[..16]);
    let unbound = UnboundCipherKey::new(&AES_256, aes).map_err(|_| anyhow::anyhow!("bad AES key"))?;
    let cfb = DecryptingKey::cfb128(unbound).map_err(|_| anyhow::anyhow!("AES-CFB is unavailable"))?;
    let mut body = bytes[n..].to_vec();
    cfb.decrypt(&mut body, DecryptionContext::Iv128(FixedLength::from(iv)))
        .map_err(|_| anyhow::anyhow!("the file does not decrypt"))?;
    Ok(body)
}

/// Reads and checks the file: a clear error for anything that is not the reference's
/// `data.json`.
fn read(path: &Path, key: Option<&Path>) -> Result<Data> {
    let mut bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Some(k) = key {
        let text = std::fs::read_to_string(k).with_context(|| format!("cannot read the key {}", k.display()))?;
        if bytes.first() != Some(&b'{') {
            bytes = decrypt(&text, &bytes).with_context(|| format!("cannot decrypt {}", path.display()))?;
        }
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        bail!("{} is empty", path.display());
    }
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied().unwrap_or(0);
    if first != b'{' {
        bail!(
            "{} is not a Parallels DevOps Service data.json: it does not start with a JSON object{}",
            path.display(),
            if key.is_some() {
                " (even after decryption with the key given)"
            } else {
                " (if the reference encrypted it with ENCRYPTION_PRIVATE_KEY, pass that key with --encryption-key FILE)"
            }
        );
    }
    let v: Value = serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let obj = v.as_object().context("the file is not a JSON object")?;
    if !obj.contains_key("users") && !obj.contains_key("schema") {
        bail!("{} is not a Parallels DevOps Service data.json: it has neither `users` nor `schema`", path.display());
    }
    let data: Data = serde_json::from_value(v)
        .with_context(|| format!("{} does not have the layout of the reference's data.json", path.display()))?;
    Ok(data)
}

fn identity_input(d: &Data, opts: &Options) -> Result<IdentityImport> {
    let mut input = IdentityImport {
        service_user: opts.service_user.clone(),
        service_roles: opts.service_roles.clone(),
        ..Default::default()
    };
    for c in d.claims.iter().flatten() {
        input.claims.push(ImportedClaim {
            name: c.name.clone(),
            description: c.description.clone(),
            group: c.group.clone(),
            resource: c.resource.clone(),
            action: c.action.clone(),
        });
    }
    for r in d.roles.iter().flatten() {
        input.roles.push(ImportedRole {
            name: r.name.clone(),
            description: r.description.clone(),
            claims: names(&r.claims),
        });
    }
    for (i, u) in d.users.iter().flatten().enumerate() {
        if u.id.is_empty() {
            bail!("users[{i}] ({}) has no id (the reference salts its password with it)", u.username);
        }
        if !u.password.starts_with("$2") {
            bail!("users[{i}] ({}): the password is not a bcrypt hash", u.username);
        }
        let mut claims = names(&u.claims);
        // A role's claims come with the role; the user keeps only its own.
        claims.sort();
        claims.dedup();
        input.users.push(ImportedUser {
            id: u.id.clone(),
            username: u.username.clone(),
            name: u.name.clone(),
            email: u.email.clone(),
            password_hash: pds_bcrypt_hash(if opts.unsalted { "" } else { &u.id }, &u.password),
            roles: names(&u.roles),
            claims,
            created_at: time(&format!("users[{i}].created_at"), &u.created_at)?,
        });
    }
    for (i, k) in d.api_keys.iter().flatten().enumerate() {
        if !k.secret.starts_with("$2") {
            bail!("api_keys[{i}] ({}): the secret is not a bcrypt hash", k.name);
        }
        input.api_keys.push(ImportedApiKey {
            id: k.id.clone(),
            name: if k.name.is_empty() { k.key.clone() } else { k.name.clone() },
            key: k.key.clone(),
            secret_hash: pds_bcrypt_hash(if opts.unsalted { "" } else { &k.id }, &k.secret),
            user_id: Some(k.user_id.clone()).filter(|u| !u.is_empty()),
            revoked: k.revoked,
            revoked_at: time(&format!("api_keys[{i}].revoked_at"), &k.revoked_at)?,
            expires_at: time(&format!("api_keys[{i}].expires_at"), &k.expires_at)?,
            created_at: time(&format!("api_keys[{i}].created_at"), &k.created_at)?,
        });
    }
    Ok(input)
}

/// The host's base URL as the reference builds it (`OrchestratorHost.GetHost`).
fn host_url(h: &Host) -> String {
    if h.host.starts_with("http://") || h.host.starts_with("https://") {
        return h.host.trim_end_matches('/').to_string();
    }
    let schema = if h.schema.is_empty() { "http".to_string() } else { h.schema.trim_end_matches("://").to_string() };
    let port = if h.port.is_empty() { String::new() } else { format!(":{}", h.port) };
    let prefix = h.path_prefix.trim_matches('/');
    let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
    format!("{schema}://{}{port}{prefix}", h.host)
}

#[derive(Default, serde::Serialize)]
struct Kind {
    created: Vec<String>,
    updated: Vec<String>,
    unchanged: Vec<String>,
    conflicts: Vec<String>,
}

/// Prints the report: the whole of it as JSON, or a table of counts per kind with the
/// status, the service user and the notes.
pub fn print(out: crate::output::Output, report: &Value) {
    if out == crate::output::Output::Json {
        crate::output::print(out, report, &[]);
        return;
    }
    let kinds = [
        ("users", "users"),
        ("roles", "roles"),
        ("claims", "claims"),
        ("api_keys", "API keys"),
        ("orchestrator_hosts", "orchestrator hosts"),
        ("reverse_proxy_hosts", "reverse-proxy hosts"),
        ("catalog_manifests", "catalog manifests"),
    ];
    let count = |k: &str, f: &str| report[k][f].as_array().map_or(0, Vec::len);
    let rows: Vec<Value> = kinds
        .iter()
        .map(|(k, label)| {
            json!({"kind": label, "created": count(k, "created"), "updated": count(k, "updated"),
                   "unchanged": count(k, "unchanged"), "mapped": count(k, "mapped"),
                   "conflicts": count(k, "conflicts")})
        })
        .collect();
    crate::output::print(out, &Value::Array(rows), &["kind", "created", "updated", "unchanged", "mapped", "conflicts"]);
    println!("status: {}", report["status"].as_str().unwrap_or(""));
    if let Some(u) = report["service_user"].as_object() {
        let list = |k: &str| {
            u.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        };
        println!(
            "API keys that had no user now belong to {} (roles: {}): {}",
            u.get("username").and_then(Value::as_str).unwrap_or(""),
            list("roles"),
            list("api_keys")
        );
    }
    for n in report["notes"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        println!("note: {n}");
    }
}

/// Runs the import; answers the report printed by the CLI.
pub async fn run(s: &Settings, dir: &Path, store: Arc<dyn Store>, opts: Options) -> Result<Value> {
    let data = read(&opts.file, opts.encryption_key.as_deref())?;
    let actor = Actor { via: "import-pds".into(), ..Actor::system() };
    let bus = EventBus::new(16);

    // ----- identity: planned (dry run) first
    let identity = crate::serve::identity(s, store.clone(), dir, bus.clone())?;
    let input = identity_input(&data, &opts)?;
    let ident_plan =
        identity.import_pds(&actor, input.clone(), opts.force, true).await.map_err(|e| anyhow::anyhow!("{e}"))?;

    // ----- orchestrator hosts
    let registry = hangar_orchestrator::HostRegistry::open(
        store.clone(),
        dir,
        bus.clone(),
        Arc::new(hangar_orchestrator::SystemClock),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let existing = registry.list();
    let mut hosts = Kind::default();
    // (name, request, existing id to replace)
    let mut host_writes: Vec<(String, Value, Option<String>)> = Vec::new();
    let pds_hosts: Vec<&Host> = data.orchestrator_hosts.iter().flatten().collect();
    for (i, h) in pds_hosts.iter().enumerate() {
        let url = hangar_orchestrator::registry::check_url(&host_url(h))
            .map_err(|e| anyhow::anyhow!("orchestrator_hosts[{i}]: {e}"))?;
        let base = url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', ':']).next().unwrap_or(""))
            .filter(|h| !h.is_empty())
            .map(String::from)
            .with_context(|| format!("orchestrator_hosts[{i}]: {url:?} is not a URL"))?;
        let shared = pds_hosts.iter().any(|o| o.host == h.host && (o.port != h.port || o.path_prefix != h.path_prefix));
        let name = if shared && !h.port.is_empty() { format!("{base}-{}", h.port) } else { base };
        let auth = h.authentication.as_ref();
        let credentials = match auth {
            Some(a) if !a.api_key.is_empty() => json!({"api_key": a.api_key}),
            Some(a) if !a.username.is_empty() => json!({"username": a.username, "password": a.password}),
            _ => Value::Null,
        };
        let req = json!({
            "name": name, "url": url, "description": h.description,
            "tags": h.tags.clone().unwrap_or_default(),
            "credentials": credentials,
            "required_roles": h.required_roles.clone().unwrap_or_default(),
            "required_claims": h.required_claims.clone().unwrap_or_default(),
            "disabled": !h.enabled,
        });
        let same_url = existing.iter().find(|e| e.url == url);
        let same_name = existing.iter().find(|e| e.name == name);
        match (same_url, same_name) {
            (Some(e), _) if e.name == name => hosts.unchanged.push(name),
            (None, None) => {
                hosts.created.push(name.clone());
                host_writes.push((name, req, None));
            }
            (a, b) => {
                hosts.conflicts.push(name.clone());
                if opts.force {
                    let id = a.or(b).map(|e| e.id.clone());
                    hosts.updated.push(name.clone());
                    host_writes.push((name, req, id));
                }
            }
        }
        let _ = &h.id;
    }

    // ----- reverse-proxy hosts (matched by name, as the reference's config block)
    let rp_hosts: Vec<Value> = data.reverse_proxy_hosts.clone().unwrap_or_default();
    let mut proxy = Kind::default();
    let mut block_hosts = Vec::new();
    let stored_rp: Vec<Value> = store.list(hangar_reverse_proxy::HOSTS).await?.into_iter().map(|r| r.value).collect();
    for (i, h) in rp_hosts.iter().enumerate() {
        let mut h = h.clone();
        let obj = h.as_object_mut().with_context(|| format!("reverse_proxy_hosts[{i}] is not an object"))?;
        obj.remove("host_id");
        let id = obj.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
        let name = match obj.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => {
                let host = obj.get("host").and_then(Value::as_str).unwrap_or("");
                let port = obj.get("port").and_then(Value::as_str).unwrap_or("");
                if host.is_empty() && port.is_empty() { id.clone() } else { format!("{host}:{port}") }
            }
        };
        obj.insert("name".into(), json!(name));
        for k in ["http_routes"] {
            if obj.get(k).is_some_and(Value::is_null) {
                obj.remove(k);
            }
        }
        match stored_rp.iter().find(|s| s.get("name").and_then(Value::as_str) == Some(name.as_str())) {
            Some(s) if s.get("id").and_then(Value::as_str) == Some(id.as_str()) => proxy.unchanged.push(name),
            Some(_) => {
                proxy.conflicts.push(name.clone());
                if opts.force {
                    proxy.updated.push(name);
                    block_hosts.push(h);
                }
            }
            None => {
                proxy.created.push(name);
                block_hosts.push(h);
            }
        }
    }

    // ----- catalog manifests: records with the provider connection sealed
    let sealer = hangar_catalog::sealer::Sealer::load_or_create(&dir.join("secrets").join("catalog-providers.key"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut manifests = Kind::default();
    let mut manifest_batch = Batch::new();
    for (i, m) in data.catalog_manifests.iter().flatten().enumerate() {
        let obj = m.as_object().with_context(|| format!("catalog_manifests[{i}] is not an object"))?;
        let id = obj.get("id").and_then(Value::as_str).filter(|s| !s.is_empty());
        let id = id.with_context(|| format!("catalog_manifests[{i}] has no id"))?.to_string();
        let label = format!(
            "{}/{}/{}",
            obj.get("catalog_id").and_then(Value::as_str).unwrap_or(""),
            obj.get("version").and_then(Value::as_str).unwrap_or(""),
            obj.get("architecture").and_then(Value::as_str).unwrap_or("")
        );
        let mut record = m.clone();
        let rec = record.as_object_mut().context("manifest")?;
        let provider = rec.remove("provider").unwrap_or(Value::Null);
        let text = |k: &str| provider.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let mut conn = format!("provider={}", text("type"));
        for (k, field) in
            [("host", "host"), ("port", "port"), ("user", "user"), ("password", "password"), ("api_key", "api_key")]
        {
            let v = text(field);
            if !v.is_empty() {
                conn.push_str(&format!(";{k}={v}"));
            }
        }
        if let Some(meta) = provider.get("meta").and_then(Value::as_object) {
            let mut keys: Vec<_> = meta.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in keys {
                conn.push_str(&format!(";{k}={}", v.as_str().unwrap_or("")));
            }
        }
        rec.insert(
            "provider".into(),
            json!({"type": text("type"), "host": text("host"), "port": text("port"),
                   "has_credentials": !(text("password").is_empty() && text("api_key").is_empty())}),
        );
        rec.insert("connection_id".into(), json!(sealer.provider_id(&conn)));
        rec.insert(
            "pullable".into(),
            json!("no: the bytes are in the reference's pack format; run `hangar catalog import` for this entry"),
        );
        let compare = record.clone();
        let sealed = sealer.seal(&id, &conn).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut full = record;
        if let Some(o) = full.as_object_mut() {
            o.insert("connection_sealed".into(), json!(sealed));
        }
        match store.get(PDS_MANIFESTS, &id).await? {
            Some(r) => {
                let mut old = r.value.clone();
                if let Some(o) = old.as_object_mut() {
                    o.remove("connection_sealed");
                }
                if old == compare {
                    manifests.unchanged.push(label);
                } else {
                    manifests.conflicts.push(label.clone());
                    if opts.force {
                        manifests.updated.push(label);
                        manifest_batch = manifest_batch.require_revision(PDS_MANIFESTS, &id, r.revision).put(
                            PDS_MANIFESTS,
                            &id,
                            full,
                        );
                    }
                }
            }
            None => {
                manifests.created.push(label);
                manifest_batch = manifest_batch.require_absent(PDS_MANIFESTS, &id).put(PDS_MANIFESTS, &id, full);
            }
        }
    }

    let mut conflicts = ident_plan.conflicts();
    conflicts.extend(hosts.conflicts.iter().map(|n| format!("orchestrator host {n}")));
    conflicts.extend(proxy.conflicts.iter().map(|n| format!("reverse-proxy host {n}")));
    conflicts.extend(manifests.conflicts.iter().map(|n| format!("catalog manifest {n}")));
    let changes = ident_plan.changes()
        + hosts.created.len()
        + hosts.updated.len()
        + proxy.created.len()
        + proxy.updated.len()
        + manifests.created.len()
        + manifests.updated.len();
    let summary = |ident: &hangar_identity::IdentityImportReport, status: &str| {
        json!({
            "file": opts.file.display().to_string(),
            "schema_version": data.schema.as_ref().and_then(|s| s.get("version")).cloned().unwrap_or(Value::Null),
            "status": status,
            "users": ident.users, "roles": ident.roles, "claims": ident.claims, "api_keys": ident.api_keys,
            "service_user": ident.service_user,
            "orchestrator_hosts": hosts, "reverse_proxy_hosts": proxy, "catalog_manifests": manifests,
            "conflicts": conflicts,
            "notes": [
                "imported passwords and API key secrets keep working; each is re-hashed by Hangar on first use",
                "catalog manifests are recorded with their provider connection sealed; their bytes are in the reference's pack format: run `hangar catalog import` (or push again) before Hangar hosts can pull them",
            ],
        })
    };
    if !conflicts.is_empty() && !opts.force {
        let report = summary(&ident_plan, "refused");
        bail!(
            "{} existing record(s) differ from the file: {}; nothing was written (run with --force to overwrite them)\n{}",
            conflicts.len(),
            conflicts.join(", "),
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    if opts.dry_run {
        return Ok(summary(&ident_plan, "dry run: nothing written"));
    }
    if changes == 0 {
        return Ok(summary(&ident_plan, "nothing to do: everything in the file is already imported"));
    }

    // ----- write, kind by kind, each with its owner's audit entry
    let done = identity.import_pds(&actor, input, opts.force, false).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    for (name, req, replace) in host_writes {
        if let Some(id) = replace {
            registry.delete(&actor, &id).await.map_err(|e| anyhow::anyhow!("orchestrator host {name}: {e}"))?;
        }
        let req: hangar_orchestrator::model::RegisterHost =
            serde_json::from_value(req).with_context(|| format!("orchestrator host {name}"))?;
        registry.register(&actor, req, None).await.map_err(|e| anyhow::anyhow!("orchestrator host {name}: {e}"))?;
    }
    if !manifests.created.is_empty() || !manifests.updated.is_empty() {
        let entry = hangar_core::audit::AuditEntry::new(
            &actor,
            "catalog.import_pds",
            "catalog",
            PDS_MANIFESTS,
            json!({"manifests": manifests.created.len() + manifests.updated.len()}),
        );
        let batch = manifest_batch.put(hangar_core::audit::AUDIT_COLLECTION, &entry.id, serde_json::to_value(&entry)?);
        store.commit(batch).await?;
    }
    let mut proxy_note = None;
    if !block_hosts.is_empty() || data.reverse_proxy.is_some() {
        let mut block = json!({"hosts": block_hosts});
        if let Some(rp) = &data.reverse_proxy {
            block["enabled"] = json!(rp.enabled);
            if !rp.host.is_empty() {
                block["host"] = json!(rp.host);
            }
            if !rp.port.is_empty() {
                block["port"] = json!(rp.port);
            }
        }
        let manager =
            hangar_proxy::ProxyManager::builder().build().map_err(|e| anyhow::anyhow!("reverse proxy: {e}"))?;
        let options = hangar_reverse_proxy::ReverseProxyOptions {
            reserved_ports: vec![],
            allow_privileged_ports: s.reverse_proxy.allow_privileged_ports,
            tls_folder: s.reverse_proxy.tls_folder.clone(),
        };
        let rp = hangar_reverse_proxy::ReverseProxy::start_with(store.clone(), manager, bus.clone(), dir, options)
            .await
            .map_err(|e| anyhow::anyhow!("reverse proxy: {e}"))?;
        match rp.import(&actor, &block).await {
            Ok(_) => {}
            // Stored, but this offline command could not open the listeners (a port in use or
            // privileged): `hangar serve` opens them, and reports it if it cannot.
            Err(e) if e.to_string().starts_with("stored, but") => {
                proxy_note = Some(format!("reverse-proxy hosts stored; {e}; `hangar serve` opens the listeners"));
            }
            Err(e) => return Err(anyhow::anyhow!("reverse-proxy hosts: {e}")),
        }
    }
    let mut report = summary(&done, "imported");
    if let (Some(note), Some(notes)) = (proxy_note, report["notes"].as_array_mut()) {
        notes.push(json!(note));
    }
    Ok(report)
}
