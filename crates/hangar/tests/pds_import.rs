//! `hangar db import-pds`: migration from a Parallels DevOps Service `data.json`.
//!
//! The fixture is made as the reference makes its database (Go cannot build the reference
//! here): the layout follows `src/data/main.go` (struct `Data`, saved as indented JSON) and
//! the records of `src/data/models/{user,role,claim,api_key,db_common,orchestrator_host,
//! orchestrator_host_authentication,reverse_proxy,catalog_manifest,schema,config}.go` with
//! their JSON tags (embedded roles and claims in users, `omitempty` fields left out, times in
//! RFC 3339 with nanoseconds); passwords and API-key secrets are hashed as
//! `src/security/password/main.go` does: bcrypt at the default cost over `secret` followed by
//! the first 32 bytes of the record's id, in Go's `$2a$` form.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use base64::Engine;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const ALICE_PASSWORD: &str = "Alice-Old-Passw0rd!";
const ALICE_ID: &str = "8c3c5a4e-1f0b-4d6e-9a51-3c2f7b9e0d41";
const ROOT_ID: &str = "6b1f2e4a-77c9-5d3b-a0e8-4f5d9c2b1a00";
const KEY_ALICE_ID: &str = "0e6f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
const KEY_ALICE_SECRET: &str = "alice-key-secret-value-1";
const KEY_ORPHAN_ID: &str = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";
const KEY_ORPHAN_SECRET: &str = "orphan-key-secret-value-2";
const HOST_PASSWORD: &str = "H0st-Clear-Password-7731";
const S3_SECRET: &str = "S3-Clear-Secret-Key-4412";

/// bcrypt as the reference's `PasswordService.Hash(password, salt)`, made once per secret
/// (bcrypt salts randomly, and a new hash would be a changed record).
fn pds_hash(secret: &str, salt: &str) -> String {
    static MADE: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let key = format!("{secret}\n{salt}");
    let mut made = MADE.lock().unwrap();
    if let Some((_, h)) = made.iter().find(|(k, _)| *k == key) {
        return h.clone();
    }
    let h = bcrypt_as_the_reference(secret, salt);
    made.push((key, h.clone()));
    h
}

fn bcrypt_as_the_reference(secret: &str, salt: &str) -> String {
    let salt = &salt.as_bytes()[..salt.len().min(32)];
    let mut input = secret.as_bytes().to_vec();
    input.extend_from_slice(salt);
    bcrypt::hash_with_result(&input, bcrypt::DEFAULT_COST).unwrap().format_for_version(bcrypt::Version::TwoA)
}

fn claim(name: &str, group: &str, internal: bool) -> Value {
    json!({"id": name, "name": name, "internal": internal, "group": group, "resource": group, "action": "READ"})
}

/// The reference's `data.json` with two users, a custom role and claim, two API keys (one
/// with no user), an orchestrator host with credentials, a reverse-proxy host and a
/// catalog manifest on S3.
fn fixture(alice_name: &str) -> String {
    let t = "2025-11-03T10:15:42.123456789Z";
    let list_vm = claim("LIST_VM", "Virtual Machines", true);
    let deploy = claim("DEPLOY_APPS", "Custom", false);
    let user_role = json!({"id": "USER", "name": "USER", "description": "User", "internal": true,
                           "claims": [list_vm.clone()]});
    let super_role = json!({"id": "SUPER_USER", "name": "SUPER_USER", "internal": true, "claims": [list_vm.clone()]});
    let ci_role = json!({"id": "CI_RUNNERS", "name": "CI_RUNNERS", "description": "CI", "internal": false,
                         "claims": [list_vm.clone(), deploy.clone()]});
    let db_record = json!({"is_locked": false, "locked_by": "", "locked_at": ""});
    let data = json!({
        "schema": {"version": "0.7.0"},
        "configuration": {"id": "3f1e2d3c-aaaa-bbbb-cccc-000011112222"},
        "users": [
            {"id": ROOT_ID, "username": "root", "name": "Root", "email": "root@localhost",
             "password": pds_hash("Root-Old-Passw0rd!", ROOT_ID), "created_at": t, "updated_at": t,
             "roles": [super_role.clone()], "claims": [list_vm.clone()]},
            {"id": ALICE_ID, "username": "alice", "name": alice_name, "email": "alice@example.com",
             "password": pds_hash(ALICE_PASSWORD, ALICE_ID), "created_at": t, "updated_at": t,
             "roles": [user_role.clone(), ci_role.clone()], "claims": [deploy.clone()],
             "failed_login_attempts": 2}
        ],
        "claims": [list_vm, deploy],
        "roles": [user_role, super_role, ci_role],
        "api_keys": [
            {"id": KEY_ALICE_ID, "name": "alice-ci", "key": "ALICE_CI", "secret": pds_hash(KEY_ALICE_SECRET, KEY_ALICE_ID),
             "revoked": false, "created_at": t, "updated_at": t, "revoked_at": "", "expires_at": "",
             "user_id": ALICE_ID, "type": "external", "db_record": db_record},
            {"id": KEY_ORPHAN_ID, "name": "legacy-deployer", "key": "LEGACY_DEPLOYER",
             "secret": pds_hash(KEY_ORPHAN_SECRET, KEY_ORPHAN_ID),
             "revoked": false, "created_at": t, "updated_at": t, "revoked_at": "", "expires_at": "",
             "type": "external", "db_record": db_record}
        ],
        "virtual_machine_templates": null,
        "catalog_manifests": [{
            "id": "5d7c1a9e-0b1c-4d2e-8f3a-6b5c4d3e2f1a", "catalog_id": "ubuntu", "name": "ubuntu-arm64-v1",
            "version": "v1", "architecture": "arm64", "description": "Ubuntu runner",
            "path": "/ubuntu/v1", "pack_path": "/ubuntu/v1/ubuntu-arm64-v1.pdpack",
            "metadata_path": "/ubuntu/v1/ubuntu-arm64-v1.meta", "type": "pvm",
            "provider": {"type": "aws-s3", "host": "", "port": "", "user": "", "password": "", "api_key": "",
                         "meta": {"bucket": "images", "region": "eu-west-1", "access_key": "AKIAEXAMPLE",
                                  "secret_key": S3_SECRET}},
            "size": 1048576, "required_roles": null, "required_claims": null, "tags": ["ci"],
            "created_at": t, "updated_at": t, "last_downloaded_at": "", "last_downloaded_user": "",
            "is_compressed": true, "pack_relative_path": "ubuntu/v1", "download_count": 3,
            "virtual_machine_contents": null, "pack_contents": null, "pack_size": 524288,
            "tainted": false, "tainted_by": "", "untainted_by": "", "tainted_at": "",
            "revoked": false, "revoked_by": "", "revoked_at": ""
        }],
        "orchestrator_hosts": [{
            "id": "c0ffee00-1111-2222-3333-444455556666", "enabled": true, "host": "mac-1.example.com",
            "architecture": "arm64", "description": "build mac", "tags": ["mac"], "port": "8080", "schema": "http",
            "has_websocket_events": false,
            "authentication": {"username": "root", "password": HOST_PASSWORD},
            "state": "healthy", "created_at": t, "updated_at": t
        }],
        "orchestrator_snapshots": null,
        "reverse_proxy": {"id": "rp", "enabled": false, "host": "127.0.0.1", "port": "8090"},
        "reverse_proxy_hosts": [{
            "id": "a1b2c3d4-0000-4000-8000-000000000001", "name": "web", "host": "127.0.0.1", "port": "18081",
            "http_routes": [{"id": "r-1", "path": "/", "target_host": "10.0.0.5", "target_port": "80", "schema": "http"}]
        }],
        "catalog_managers": null,
        "jobs": null,
        "vm_snapshots": null,
        "enrollment_tokens": null,
        "user_configs": null
    });
    serde_json::to_string_pretty(&data).unwrap()
}

fn hangar(args: &[&str], data: &Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("ROOT_PASSWORD")
        .env_remove("HANGAR_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn import(file: &Path, data: &Path, extra: &[&str]) -> (i32, String, String) {
    let f = file.to_str().unwrap();
    let mut args = vec!["db", "import-pds", "--output", "json", f];
    args.extend_from_slice(extra);
    hangar(&args, data)
}

fn export(data: &Path) -> Value {
    let (code, out, err) = hangar(&["db", "export"], data);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn records(dump: &Value, collection: &str) -> Vec<Value> {
    let c = &dump["collections"][collection];
    match c {
        Value::Object(m) => m.values().map(|r| r.get("value").cloned().unwrap_or(r.clone())).collect(),
        Value::Array(a) => a.iter().map(|r| r.get("value").cloned().unwrap_or(r.clone())).collect(),
        _ => vec![],
    }
}

fn grep_dir(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(grep_dir(&p, needle));
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())) {
            hits.push(p.display().to_string());
        }
    }
    hits
}

fn names(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_data_json_imports_and_its_users_and_keys_keep_working() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let file = work.path().join("data.json");
    std::fs::write(&file, fixture("Alice")).unwrap();

    // A dry run writes nothing.
    let (code, out, err) = import(&file, &data, &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let dry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dry["status"], "dry run: nothing written");
    assert!(records(&export(&data), "users").is_empty());

    let (code, out, err) = import(&file, &data, &[]);
    assert_eq!(code, 0, "{err}");
    for secret in [HOST_PASSWORD, S3_SECRET, KEY_ALICE_SECRET, KEY_ORPHAN_SECRET, ALICE_PASSWORD] {
        assert!(!out.contains(secret) && !err.contains(secret), "the report shows a secret");
    }
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["status"], "imported");
    let mut users = names(&r["users"]["created"]);
    users.sort();
    assert_eq!(users, ["alice", "pds-api-keys", "root"]);
    assert_eq!(names(&r["roles"]["created"]), ["CI_RUNNERS"]);
    assert!(names(&r["roles"]["mapped"]).contains(&"SUPER_USER".to_string()));
    assert_eq!(names(&r["claims"]["created"]), ["DEPLOY_APPS"]);
    assert_eq!(names(&r["claims"]["mapped"]), ["LIST_VM"]);
    assert_eq!(r["api_keys"]["created"].as_array().unwrap().len(), 2);
    assert_eq!(r["service_user"]["username"], "pds-api-keys");
    assert_eq!(names(&r["service_user"]["roles"]), ["SUPER_USER"]);
    assert_eq!(names(&r["service_user"]["api_keys"]), ["legacy-deployer"]);
    assert_eq!(names(&r["orchestrator_hosts"]["created"]), ["mac-1.example.com"]);
    assert_eq!(names(&r["reverse_proxy_hosts"]["created"]), ["web"]);
    assert_eq!(names(&r["catalog_manifests"]["created"]), ["ubuntu/v1/arm64"]);

    // A second run changes nothing and says so.
    let (code, out, err) = import(&file, &data, &[]);
    assert_eq!(code, 0, "{err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["status"], "nothing to do: everything in the file is already imported", "{again}");
    assert_eq!(again["users"]["unchanged"].as_array().unwrap().len(), 3);

    // Credentials are sealed: the clear values are nowhere in the data folder.
    for secret in [HOST_PASSWORD, S3_SECRET] {
        assert!(grep_dir(&data, secret).is_empty(), "{secret} is stored in clear: {:?}", grep_dir(&data, secret));
    }
    let dump = export(&data);
    let manifests = records(&dump, "pds_catalog_manifests");
    assert_eq!(manifests.len(), 1);
    assert!(manifests[0]["connection_sealed"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(manifests[0]["pullable"].as_str().unwrap().contains("hangar catalog import"));

    let c = client();
    let mut s = Server::start(&data, &[("ENABLED_MODULES", "api,orchestrator,reverse_proxy")]);
    // The imported user logs in with the password of the reference.
    let alice = login(&c, &s, "alice", ALICE_PASSWORD).await;
    let (st, _) = call(
        &c,
        Method::POST,
        &s.api("/auth/token"),
        &Auth::None,
        Some(json!({"username": "alice", "password": "wrong-Passw0rd!"})),
        &[],
    )
    .await;
    assert_eq!(st, 401);
    let (st, me) = call(&c, Method::GET, &s.api("/auth/me"), &Auth::Bearer(alice.clone()), None, &[]).await;
    assert_eq!(st, 200, "{me}");
    assert!(names(&me["roles"]).contains(&"CI_RUNNERS".to_string()), "{me}");
    assert!(names(&me["claims"]).contains(&"DEPLOY_APPS".to_string()), "{me}");

    // Its API keys keep working: alice's, and the one with no user (now the service user's).
    let enc = |k: &str, sec: &str| base64::engine::general_purpose::STANDARD.encode(format!("{k}:{sec}"));
    let (st, v) =
        call(&c, Method::GET, &s.api("/auth/me"), &Auth::ApiKey(enc("ALICE_CI", KEY_ALICE_SECRET)), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["username"], "alice");
    let bad = Auth::ApiKey(enc("ALICE_CI", "not-the-secret"));
    let (st, _) = call(&c, Method::GET, &s.api("/auth/me"), &bad, None, &[]).await;
    assert_eq!(st, 401);
    let service = Auth::ApiKey(enc("LEGACY_DEPLOYER", KEY_ORPHAN_SECRET));
    let (st, v) = call(&c, Method::GET, &s.api("/auth/me"), &service, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["username"], "pds-api-keys");
    // A second use goes through the re-hashed secret.
    let (st, roles) = call(&c, Method::GET, &s.api("/auth/roles"), &service, None, &[]).await;
    assert_eq!(st, 200, "{roles}");
    assert!(roles.to_string().contains("CI_RUNNERS"));
    let (st, claims) = call(&c, Method::GET, &s.api("/auth/claims"), &service, None, &[]).await;
    assert_eq!(st, 200);
    assert!(claims.to_string().contains("DEPLOY_APPS"));

    let root = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, hosts) = call(&c, Method::GET, &s.api("/orchestrator/hosts"), &root, None, &[]).await;
    assert_eq!(st, 200, "{hosts}");
    assert!(hosts.to_string().contains("mac-1.example.com:8080"), "{hosts}");
    assert!(!hosts.to_string().contains(HOST_PASSWORD));
    let (st, proxy) = call(&c, Method::GET, &s.api("/reverse-proxy/hosts"), &root, None, &[]).await;
    assert_eq!(st, 200, "{proxy}");
    assert!(proxy.to_string().contains("\"web\"") && proxy.to_string().contains("10.0.0.5"), "{proxy}");
    s.stop();

    // After the first login the stored hashes are Hangar's own, with an audit entry.
    let dump = export(&data);
    let users = records(&dump, "users");
    let alice_rec = users.iter().find(|u| u["username"] == "alice").unwrap();
    assert!(alice_rec["password_hash"].as_str().unwrap().starts_with("$argon2id$"), "{alice_rec}");
    let keys = records(&dump, "api_keys");
    assert!(keys.iter().all(|k| !k["secret_hash"].as_str().unwrap().starts_with("pds-")), "{keys:?}");
    let audit = dump["collections"]["audit"].to_string();
    assert!(audit.contains("user.password_rehashed") && audit.contains("api_key.secret_rehashed"));

    // Importing again does not undo the re-hash, and the old password still works.
    let (code, out, err) = import(&file, &data, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to do"), "{out}");
    let s = Server::start(&data, &[]);
    login(&c, &s, "alice", ALICE_PASSWORD).await;
}

#[test]
fn conflicts_need_force_and_bad_files_are_refused_clearly() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let file = work.path().join("data.json");
    std::fs::write(&file, fixture("Alice")).unwrap();
    let (code, _, err) = import(&file, &data, &[]);
    assert_eq!(code, 0, "{err}");

    // The table form: counts per kind, the status and the service user.
    let (code, out, err) = hangar(&["db", "import-pds", file.to_str().unwrap()], &data);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap().starts_with("KIND"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("users") && l.split_whitespace().nth(3) == Some("3")), "{out}");
    assert!(out.contains("status: nothing to do"), "{out}");
    assert!(out.contains("now belong to pds-api-keys (roles: SUPER_USER): legacy-deployer"), "{out}");

    // The same user, changed in the file: refused, nothing written, then --force.
    let changed = work.path().join("changed.json");
    std::fs::write(&changed, fixture("Alice Renamed")).unwrap();
    let (code, _, err) = import(&changed, &data, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("user alice") && err.contains("--force"), "{err}");
    let users = records(&export(&data), "users");
    assert_eq!(users.iter().find(|u| u["username"] == "alice").unwrap()["name"], "Alice");
    let (code, out, err) = import(&changed, &data, &["--force"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(names(&r["users"]["updated"]), ["alice"]);

    // Bad files: a clear error, a non-zero exit, never a panic.
    let cases: [(&str, &[u8], &str); 4] = [
        ("truncated.json", b"{\"users\": [{\"id\": \"x\"", "not valid JSON"),
        ("other.json", b"{\"hello\": 1}", "neither `users` nor `schema`"),
        ("binary.json", &[0x8f, 0x01, 0x22, 0x00, 0xff], "does not start with a JSON object"),
        (
            "badhash.json",
            b"{\"users\": [{\"id\": \"u1\", \"username\": \"bob\", \"email\": \"b@x\", \"password\": \"plain\"}]}",
            "not a bcrypt hash",
        ),
    ];
    for (name, bytes, message) in cases {
        let f = work.path().join(name);
        std::fs::write(&f, bytes).unwrap();
        let (code, _, err) = import(&f, &data, &[]);
        assert_eq!(code, 1, "{name}: {err}");
        assert!(err.contains(message), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let (code, _, err) = import(&work.path().join("missing.json"), &data, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (the reference's `gen-rsa`
/// writes PKCS#1, `RSA PRIVATE KEY`).
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    // (tag, header length, content length) of the DER element at `at`.
    fn element(b: &[u8], at: usize) -> (usize, usize) {
        let first = b[at + 1] as usize;
        if first < 0x80 {
            return (2, first);
        }
        let n = first & 0x7f;
        let len = b[at + 2..at + 2 + n].iter().fold(0usize, |a, x| (a << 8) | *x as usize);
        (2 + n, len)
    }
    let (outer_h, _) = element(pkcs8, 0);
    let mut at = outer_h;
    for _ in 0..2 {
        let (h, l) = element(pkcs8, at); // version, then the algorithm
        at += h + l;
    }
    assert_eq!(pkcs8[at], 0x04);
    let (h, l) = element(pkcs8, at);
    pkcs8[at + h..at + h + l].to_vec()
}

/// Encrypts as the reference's `security.EncryptString`: a random AES-256 key wrapped with
/// RSA PKCS#1 v1.5, then AES-CFB with the key's first 16 bytes as IV.
fn encrypt_as_the_reference(key: &aws_lc_rs::rsa::PrivateDecryptingKey, plain: &[u8]) -> Vec<u8> {
    use aws_lc_rs::cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
    use aws_lc_rs::iv::FixedLength;
    let mut aes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut aes).unwrap();
    let public = aws_lc_rs::rsa::Pkcs1PublicEncryptingKey::new(key.public_key()).unwrap();
    let mut wrapped = vec![0u8; public.ciphertext_size()];
    let wrapped = public.encrypt(&aes, &mut wrapped).unwrap().to_vec();
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&aes[..16]);
    let cfb = EncryptingKey::cfb128(UnboundCipherKey::new(&AES_256, &aes).unwrap()).unwrap();
    let mut body = plain.to_vec();
    cfb.less_safe_encrypt(&mut body, EncryptionContext::Iv128(FixedLength::from(iv))).unwrap();
    [wrapped, body].concat()
}

#[test]
fn a_data_json_the_reference_encrypted_imports_with_its_key() {
    use aws_lc_rs::encoding::AsDer;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let key = aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs1 = pkcs1_of(key.as_der().unwrap().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem_body: Vec<String> =
        b64.encode(&pkcs1).as_bytes().chunks(64).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
    let pem = format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n", pem_body.join("\n"));
    // ENCRYPTION_PRIVATE_KEY holds the PEM in base64.
    let key_file = work.path().join("encryption.key");
    std::fs::write(&key_file, b64.encode(&pem)).unwrap();
    let file = work.path().join("data.json");
    std::fs::write(&file, encrypt_as_the_reference(&key, fixture("Alice").as_bytes())).unwrap();

    let (code, _, err) = import(&file, &data, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--encryption-key"), "{err}");

    let other = aws_lc_rs::rsa::PrivateDecryptingKey::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let wrong = work.path().join("wrong.key");
    let other_pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64.encode(other.as_der().unwrap().as_ref())
    );
    std::fs::write(&wrong, other_pem).unwrap();
    let (code, _, err) = import(&file, &data, &["--encryption-key", wrong.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("does not open with this key"), "{err}");

    let (code, out, err) = import(&file, &data, &["--encryption-key", key_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["status"], "imported");
    assert!(names(&r["users"]["created"]).contains(&"alice".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn unsalted_reference_passwords_import_with_the_flag() {
    // A reference run with SECURITY_PASSWORD_SALT_PASSWORD=false hashes the password alone.
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let file = work.path().join("data.json");
    let hash = bcrypt::hash_with_result("Bob-Old-Passw0rd!", bcrypt::DEFAULT_COST)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoA);
    let doc = json!({"schema": {"version": "0.7.0"}, "users": [
        {"id": "b0b00000-0000-4000-8000-000000000001", "username": "bob", "name": "Bob",
         "email": "bob@example.com", "password": hash, "roles": [{"id": "USER", "name": "USER", "internal": true}]}
    ]});
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let (code, _, err) = import(&file, &data, &["--unsalted-passwords"]);
    assert_eq!(code, 0, "{err}");
    let s = Server::start(&data, &[]);
    login(&client(), &s, "bob", "Bob-Old-Passw0rd!").await;
}
