//! The catalog module end to end: the real server on loopback, the real CLI pushing to a
//! local-folder provider (always) and to S3 (moto, `scripts/test-services.sh start`),
//! pulling back through the server, access rules, taint/revoke, `latest`, secrets,
//! reference imports and the cache routes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hangar_catalog::hangar_blobstore::conformance::TestServer;
use hangar_catalog::hangar_image::testimage;
use reqwest::Method;
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 4 << 20;

/// Output of one CLI run.
struct Run {
    ok: bool,
    json: Value,
    stdout: String,
    stderr: String,
}

/// Runs `hangar --output json --url URL ARGS...` as the token's user, with its own
/// config and cache folders.
fn cli(s: &Server, token: &str, home: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(["--output", "json", "--url", &s.url]).args(args);
    for v in ["HANGAR_API_KEY", "HANGAR_URL", "HANGAR_CATALOG_PROVIDER", "HANGAR_TOKEN"] {
        cmd.env_remove(v);
    }
    if !token.is_empty() {
        cmd.env("HANGAR_TOKEN", token);
    }
    cmd.env("HANGAR_CONFIG_DIR", home.join("cli-config")).env("XDG_CACHE_HOME", home.join("cli-cache"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run hangar");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Run {
        ok: out.status.success(),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn local_provider(dir: &Path) -> String {
    format!("provider=local-storage;catalog_path={}", dir.display())
}

fn image(dir: &Path, seed: u64) -> PathBuf {
    let p = dir.join(format!("image-{seed}"));
    testimage::generate(&p, IMAGE_SIZE, seed).unwrap();
    p
}

fn push_args<'a>(provider: &'a str, id: &'a str, version: &'a str, path: &'a Path) -> Vec<String> {
    vec![
        "catalog".into(),
        "push".into(),
        "--provider".into(),
        provider.into(),
        "--catalog-id".into(),
        id.into(),
        "--version".into(),
        version.into(),
        "--architecture".into(),
        "amd64".into(),
        "--path".into(),
        path.display().to_string(),
    ]
}

#[allow(clippy::too_many_arguments)]
fn push(
    s: &Server,
    token: &str,
    home: &Path,
    provider: &str,
    id: &str,
    version: &str,
    path: &Path,
    extra: &[&str],
) -> Value {
    let mut args = push_args(provider, id, version, path);
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = cli(s, token, home, &a, &[]);
    assert!(r.ok, "push {id} {version} failed: {}\n{}", r.stderr, r.stdout);
    r.json
}

fn pull(s: &Server, token: &str, home: &Path, id: &str, version: &str, dest: &Path, name: &str) -> Run {
    let d = dest.display().to_string();
    cli(
        s,
        token,
        home,
        &[
            "catalog",
            "pull",
            "--catalog-id",
            id,
            "--version",
            version,
            "--architecture",
            "x86_64",
            "--destination",
            &d,
            "--machine-name",
            name,
        ],
        &[],
    )
}

async fn api(s: &Server, m: Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    call(&client(), m, &s.api(path), &Auth::Bearer(token.into()), body, &[]).await
}

async fn latest(s: &Server, token: &str) -> Value {
    api(s, Method::GET, "/catalog/ci/latest/x86_64", token, None).await.1["version"].clone()
}

fn s3_connection(secret: &str) -> String {
    let cs = TestServer::S3.connection_string().unwrap_or_else(|| {
        panic!(
            "HANGAR_TEST_S3_ENDPOINT is not set: this test needs the S3 test server; run `eval \"$(scripts/test-services.sh start)\"` first (CI does)"
        )
    });
    // moto does not check signatures, so a fresh secret works and is easy to search for.
    let cs = cs.replace("secret_key=testing", &format!("secret_key={secret}"));
    format!("{cs};prefix=catalog-test-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn push_list_get_pull_round_trip_with_local_provider() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("provider"));
    let img = image(dir.path(), 1);

    let pushed =
        push(&s, &root, dir.path(), &provider, "ubuntu", "1.0.0", &img, &["--tag", "ci", "--description", "Ubuntu CI"]);
    assert_eq!(pushed["architecture"], "x86_64", "{pushed}");
    assert_eq!(pushed["catalog_id"], "ubuntu");
    assert!(pushed["push"]["chunks_uploaded"].as_u64().unwrap() > 0, "{pushed}");
    assert!(pushed["size"].as_u64().unwrap() > IMAGE_SIZE, "{pushed}");

    // The list has the reference's shape: [{CATALOG_ID: [manifest]}], RFC 3339 times.
    let (st, list) = api(&s, Method::GET, "/catalog", &root, None).await;
    assert_eq!(st, 200, "{list}");
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    let group = entries[0].as_object().unwrap();
    assert_eq!(group.keys().collect::<Vec<_>>(), ["ubuntu"]);
    let m = &group["ubuntu"][0];
    assert_eq!((m["version"].as_str(), m["description"].as_str()), (Some("1.0.0"), Some("Ubuntu CI")));
    assert_eq!(m["tags"], json!(["ci"]));
    for k in ["created_at", "updated_at"] {
        chrono::DateTime::parse_from_rfc3339(m[k].as_str().unwrap()).unwrap();
    }
    // Get by id, version, architecture (aliases accepted, latest resolved).
    for path in ["/catalog/ubuntu/1.0.0/x86_64", "/catalog/UBUNTU/1.0.0/amd64", "/catalog/ubuntu/latest/x86_64"] {
        let (st, v) = api(&s, Method::GET, path, &root, None).await;
        assert_eq!(st, 200, "{path}: {v}");
        assert_eq!(v["version"], "1.0.0", "{path}");
    }
    let (st, v) = api(&s, Method::GET, "/catalog/ubuntu", &root, None).await;
    assert_eq!((st, v.as_array().map(Vec::len)), (200, Some(1)), "{v}");
    let (st, v) = api(&s, Method::GET, "/catalog/ubuntu/1.0.0/sparc", &root, None).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["code"], 400);
    let (st, v) = api(&s, Method::GET, "/catalog/nothing/1.0.0/x86_64", &root, None).await;
    assert_eq!((st, v["code"].as_u64()), (404, Some(404)), "{v}");

    // Pull back through the server: bit-identical, download counted.
    let dest = dir.path().join("pulled");
    let r = pull(&s, &root, dir.path(), "ubuntu", "latest", &dest, "vm1");
    assert!(r.ok, "pull failed: {}", r.stderr);
    assert_eq!(r.json["version"], "1.0.0");
    assert_eq!(testimage::fingerprint(&dest.join("vm1")).unwrap(), testimage::fingerprint(&img).unwrap());
    let (_, v) = api(&s, Method::GET, "/catalog/ubuntu/1.0.0/x86_64", &root, None).await;
    assert_eq!(v["download_count"], 1, "{v}");
    assert_eq!(v["last_downloaded_user"], "root");
    chrono::DateTime::parse_from_rfc3339(v["last_downloaded_at"].as_str().unwrap()).unwrap();
    // A second pull into the same folder is refused and leaves it intact.
    let r = pull(&s, &root, dir.path(), "ubuntu", "1.0.0", &dest, "vm1");
    assert!(!r.ok && r.stderr.contains("already exists"), "{}", r.stderr);

    // The same through PDFiles: `hangar push FILE` and `hangar pull FILE`.
    let push_file = dir.path().join("push.pdfile");
    std::fs::write(
        &push_file,
        format!(
            "# push with a PDFile\nTO {url}\nINSECURE true\nAUTHENTICATE USERNAME root\nAUTHENTICATE PASSWORD {{{{ .Env.PD_PASSWORD }}}}\n\
             PROVIDER {provider}\nCATALOG_ID ubuntu\nVERSION 1.1.0\nARCHITECTURE x86_64\nDESCRIPTION from a pdfile\n\
             TAG pd,file\nLOCAL_PATH {img}\nMINIMUM_REQUIREMENT CPU 2\nMINIMUM_REQUIREMENT MEMORY 2048\n",
            url = s.url,
            img = img.display()
        ),
    )
    .unwrap();
    let r = cli(&s, "", dir.path(), &["push", push_file.to_str().unwrap()], &[("PD_PASSWORD", ROOT_PASSWORD)]);
    assert!(r.ok, "pdfile push: {}", r.stderr);
    assert_eq!(r.json["version"], "1.1.0");
    assert_eq!(r.json["minimum_requirements"], json!({"cpu": 2, "memory": 2048, "disk": 0}));
    assert_eq!(r.json["push"]["chunks_uploaded"], 0, "same image: every chunk already there: {}", r.json);
    let pull_file = dir.path().join("pull.pdfile");
    std::fs::write(
        &pull_file,
        format!(
            "FROM {url}\nAUTHENTICATE USERNAME root\nAUTHENTICATE PASSWORD {{{{ .Env.PD_PASSWORD }}}}\nCATALOG_ID ubuntu\n\
             VERSION latest\nARCHITECTURE amd64\nDESTINATION {dest}\nMACHINE_NAME from-pdfile\n",
            url = s.url,
            dest = dest.display()
        ),
    )
    .unwrap();
    let r = cli(&s, "", dir.path(), &["pull", pull_file.to_str().unwrap()], &[("PD_PASSWORD", ROOT_PASSWORD)]);
    assert!(r.ok, "pdfile pull: {}", r.stderr);
    assert_eq!(r.json["version"], "1.1.0", "latest is the newest semver");
    assert_eq!(testimage::fingerprint(&dest.join("from-pdfile")).unwrap(), testimage::fingerprint(&img).unwrap());
    // A PDFile error names its line.
    std::fs::write(&pull_file, "FROM http://127.0.0.1:1\nCATALOG_ID x\nFLY away\n").unwrap();
    let r = cli(&s, "", dir.path(), &["pull", pull_file.to_str().unwrap()], &[]);
    assert!(!r.ok && r.stderr.contains("line 3") && r.stderr.contains("FLY"), "{}", r.stderr);

    // CLI list/get/delete; the cache routes answer in the documented shapes.
    let r = cli(&s, &root, dir.path(), &["catalog", "list"], &[]);
    assert!(r.ok && r.json.as_array().unwrap()[0]["ubuntu"].as_array().unwrap().len() == 2, "{}", r.stdout);
    let r = cli(&s, &root, dir.path(), &["catalog", "delete", "ubuntu", "1.0.0", "x86_64"], &[]);
    assert!(r.ok, "{}", r.stderr);
    let (st, _) = api(&s, Method::GET, "/catalog/ubuntu/1.0.0/x86_64", &root, None).await;
    assert_eq!(st, 404);
    let (st, v) = api(&s, Method::GET, "/catalog/cache", &root, None).await;
    assert_eq!(st, 200);
    assert!(v["manifests"].is_array() && v["total_size"].is_u64(), "{v}");
    let (st, _) = api(&s, Method::DELETE, "/catalog/cache", &root, None).await;
    assert_eq!(st, 202);
}

#[tokio::test]
async fn a_user_without_the_required_claim_neither_sees_nor_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("provider"));
    let img = image(dir.path(), 2);
    let (st, v) = api(&s, Method::POST, "/auth/claims", &root, Some(json!({"name": "TEAM_SECRET"}))).await;
    assert_eq!(st, 201, "{v}");
    push(&s, &root, dir.path(), &provider, "secret-os", "1.0.0", &img, &["--claim", "team_secret"]);
    push(&s, &root, dir.path(), &provider, "open-os", "1.0.0", &img, &[]);

    let (uid, user) = make_user(&c, &s, &root, "puller").await;
    // Without PULL_CATALOG_MANIFEST a USER can list but not pull.
    let (st, v) = api(
        &s,
        Method::PUT,
        "/catalog/pull-ticket",
        &user,
        Some(json!({"catalog_id": "open-os", "architecture": "x86_64"})),
    )
    .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = api(
        &s,
        Method::POST,
        &format!("/auth/users/{uid}/claims"),
        &root,
        Some(json!({"name": "PULL_CATALOG_MANIFEST"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");

    let (_, list) = api(&s, Method::GET, "/catalog", &user, None).await;
    let ids: Vec<String> =
        list.as_array().unwrap().iter().flat_map(|g| g.as_object().unwrap().keys().cloned()).collect();
    assert_eq!(ids, ["open-os"], "{list}");
    for (m, path, body) in [
        (Method::GET, "/catalog/secret-os", None),
        (Method::GET, "/catalog/secret-os/1.0.0", None),
        (Method::GET, "/catalog/secret-os/1.0.0/x86_64", None),
        (Method::GET, "/catalog/secret-os/latest/x86_64", None),
        (Method::GET, "/catalog/secret-os/1.0.0/x86_64/download", None),
        (
            Method::PUT,
            "/catalog/pull-ticket",
            Some(json!({"catalog_id": "secret-os", "version": "1.0.0", "architecture": "x86_64"})),
        ),
    ] {
        let (st, v) = api(&s, m.clone(), path, &user, body).await;
        assert_eq!(st, 404, "{m} {path}: {v}");
        assert!(!v.to_string().contains("team_secret") && !v.to_string().contains("TEAM_SECRET"), "{v}");
    }
    // Nor can it read the image's chunks, even knowing their hashes.
    let (st, t) = api(
        &s,
        Method::PUT,
        "/catalog/pull-ticket",
        &root,
        Some(json!({"catalog_id": "secret-os", "architecture": "x86_64"})),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    let hash = t["image_manifest"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["chunks"].as_array().cloned().unwrap_or_default())
        .find_map(|c| c["hash"].as_str().map(String::from))
        .unwrap();
    let (st, _) = api(&s, Method::GET, &format!("/catalog/secret-os/1.0.0/x86_64/chunks/{hash}"), &user, None).await;
    assert_eq!(st, 404);
    let dest = dir.path().join("user-pulls");
    let r = pull(&s, &user, dir.path(), "secret-os", "1.0.0", &dest, "x");
    assert!(!r.ok && r.stderr.contains("404"), "{}", r.stderr);
    assert!(!dest.join("x").exists());
    // The open image is fine for it.
    let r = pull(&s, &user, dir.path(), "open-os", "latest", &dest, "open");
    assert!(r.ok, "{}", r.stderr);
    // Given the claim, it sees and pulls the secret image, bit-identical.
    let (st, _) =
        api(&s, Method::POST, &format!("/auth/users/{uid}/claims"), &root, Some(json!({"name": "TEAM_SECRET"}))).await;
    assert_eq!(st, 201);
    let r = pull(&s, &user, dir.path(), "secret-os", "1.0.0", &dest, "secret");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(testimage::fingerprint(&dest.join("secret")).unwrap(), testimage::fingerprint(&img).unwrap());
    // Root removes the requirement with DELETE .../claims; SUPER_USER saw it all along.
    let (st, v) = api(
        &s,
        Method::DELETE,
        "/catalog/secret-os/1.0.0/x86_64/claims",
        &root,
        Some(json!({"required_claims": ["TEAM_SECRET"]})),
    )
    .await;
    assert_eq!((st, v["required_claims"].clone()), (200, json!([])), "{v}");
}

#[tokio::test]
async fn tainted_and_revoked_versions_cannot_be_pulled_and_latest_follows() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("provider"));
    let img = image(dir.path(), 3);
    for v in ["1.2.0", "1.10.0", "1.9.3"] {
        push(&s, &root, dir.path(), &provider, "ci", v, &img, &[]);
    }
    assert_eq!(latest(&s, &root).await, "1.10.0", "semver order, not string or push order");

    let (st, v) =
        api(&s, Method::PATCH, "/catalog/ci/1.10.0/x86_64/taint", &root, Some(json!({"reason": "bad kernel"}))).await;
    assert_eq!((st, v["tainted"].clone()), (200, json!(true)), "{v}");
    let (st, v) = api(
        &s,
        Method::PUT,
        "/catalog/pull-ticket",
        &root,
        Some(json!({"catalog_id": "ci", "version": "1.10.0", "architecture": "x86_64"})),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("tainted") && msg.contains("bad kernel"), "{msg}");
    let (st, _) = api(&s, Method::GET, "/catalog/ci/1.10.0/x86_64/download", &root, None).await;
    assert_eq!(st, 409);
    assert_eq!(latest(&s, &root).await, "1.9.3", "latest skips a tainted version");
    let dest = dir.path().join("pulls");
    let r = pull(&s, &root, dir.path(), "ci", "1.10.0", &dest, "t");
    assert!(!r.ok && r.stderr.contains("tainted"), "{}", r.stderr);
    let r = pull(&s, &root, dir.path(), "ci", "latest", &dest, "l");
    assert!(r.ok && r.json["version"] == "1.9.3", "{} {}", r.stderr, r.stdout);

    let r = cli(&s, &root, dir.path(), &["catalog", "untaint", "ci", "1.10.0", "x86_64"], &[]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(latest(&s, &root).await, "1.10.0");

    // Revoke is for SUPER_USER only, even for a user who may update manifests.
    let (uid, user) = make_user(&c, &s, &root, "updater").await;
    api(
        &s,
        Method::POST,
        &format!("/auth/users/{uid}/claims"),
        &root,
        Some(json!({"name": "UPDATE_CATALOG_MANIFEST"})),
    )
    .await;
    let (st, _) = api(&s, Method::PATCH, "/catalog/ci/1.10.0/x86_64/revoke", &user, None).await;
    assert_eq!(st, 403);
    let (st, _) = api(&s, Method::PATCH, "/catalog/ci/1.10.0/x86_64/taint", &user, None).await;
    assert_eq!(st, 200, "taint needs UPDATE_CATALOG_MANIFEST only");
    let r = cli(&s, &root, dir.path(), &["catalog", "revoke", "ci", "1.10.0", "x86_64"], &[]);
    assert!(r.ok && r.json["revoked"] == true, "{}", r.stderr);
    let r = cli(&s, &root, dir.path(), &["catalog", "untaint", "ci", "1.10.0", "x86_64"], &[]);
    assert!(r.ok);
    let (st, v) = api(
        &s,
        Method::PUT,
        "/catalog/pull-ticket",
        &root,
        Some(json!({"catalog_id": "ci", "version": "1.10.0", "architecture": "x86_64"})),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    assert_eq!(latest(&s, &root).await, "1.9.3");
    // Every change is in the audit log.
    let (_, audit) = api(&s, Method::GET, "/audit?limit=1000", &root, None).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|a| a["action"].as_str()).collect();
    for a in [
        "catalog.manifest.push",
        "catalog.manifest.taint",
        "catalog.manifest.untaint",
        "catalog.manifest.revoke",
        "catalog.manifest.pull",
    ] {
        assert!(actions.contains(&a), "no {a} in the audit log");
    }
}

#[tokio::test]
async fn s3_round_trip_and_no_answer_contains_the_provider_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("S3CRET-{}", uuid::Uuid::new_v4().simple());
    let provider = s3_connection(&secret);
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let img = image(dir.path(), 4);
    let mut answers: Vec<String> = Vec::new();

    let mut args = push_args(&provider, "s3img", "2.0.0", &img);
    args.extend(["--tag".to_string(), "s3".to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = cli(&s, &root, dir.path(), &a, &[]);
    assert!(
        r.ok,
        "S3 push failed: {}\n(HANGAR_TEST_S3_ENDPOINT is set, so the S3 server must answer; `scripts/test-services.sh start`)",
        r.stderr
    );
    answers.push(r.stdout.clone());
    answers.push(r.stderr.clone());
    assert_eq!(r.json["provider"]["type"], "minio", "{}", r.stdout);

    let dest = dir.path().join("pulled");
    let r = pull(&s, &root, dir.path(), "s3img", "latest", &dest, "vm");
    assert!(r.ok, "S3 pull failed: {}", r.stderr);
    answers.push(r.stdout.clone());
    assert_eq!(testimage::fingerprint(&dest.join("vm")).unwrap(), testimage::fingerprint(&img).unwrap());

    let (uid, user) = make_user(&c, &s, &root, "viewer").await;
    api(&s, Method::POST, &format!("/auth/users/{uid}/claims"), &root, Some(json!({"name": "PULL_CATALOG_MANIFEST"})))
        .await;
    for (token, m, path, body) in [
        (&root, Method::GET, "/catalog", None),
        (&user, Method::GET, "/catalog", None),
        (&root, Method::GET, "/catalog/s3img", None),
        (&root, Method::GET, "/catalog/s3img/2.0.0", None),
        (&root, Method::GET, "/catalog/s3img/latest/x86_64", None),
        (&user, Method::GET, "/catalog/s3img/2.0.0/x86_64/download", None),
        (&user, Method::PUT, "/catalog/pull-ticket", Some(json!({"catalog_id": "s3img", "architecture": "x86_64"}))),
        (&root, Method::PATCH, "/catalog/s3img/2.0.0/x86_64/tags", Some(json!({"tags": ["x"]}))),
        (&root, Method::PUT, "/catalog/s3img/2.0.0/x86_64/metadata", Some(json!({"description": "d"}))),
        (&root, Method::PATCH, "/catalog/s3img/2.0.0/x86_64/taint", None),
        (&root, Method::PATCH, "/catalog/s3img/2.0.0/x86_64/untaint", None),
        (&root, Method::PATCH, "/catalog/s3img/2.0.0/x86_64/connection", Some(json!({"connection": provider}))),
        (&root, Method::GET, "/catalog/cache", None),
        (&root, Method::GET, "/audit?limit=1000", None),
        // Failing registrations must not echo the connection either.
        (
            &root,
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "s3img", "version": "2.0.0", "architecture": "x86_64", "connection": provider})),
        ),
        (
            &root,
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "other", "version": "1", "architecture": "x86_64", "connection": provider})),
        ),
        (
            &root,
            Method::POST,
            "/catalog",
            Some(
                json!({"catalog_id": "bad", "version": "1", "architecture": "x86_64", "connection": format!("{provider};colour=red")}),
            ),
        ),
        (
            &root,
            Method::PUT,
            "/catalog/import",
            Some(json!({"catalog_id": "nothing", "architecture": "x86_64", "connection": provider})),
        ),
    ] {
        let (st, v) = api(&s, m.clone(), path, token, body).await;
        assert!(st < 500, "{m} {path}: {st} {v}");
        answers.push(v.to_string());
    }
    // The websocket-free part of the server's own output: its log.
    answers.push(s.log());
    for a in &answers {
        assert!(!a.contains(&secret), "a catalog answer contains the provider secret: {a}");
    }
    // Nor is it stored in clear anywhere in the data folder.
    fn grep(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut hits = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                hits.extend(grep(&p, needle));
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                hits.push(p);
            }
        }
        hits
    }
    let hits = grep(&dir.path().join("server"), secret.as_bytes());
    assert!(hits.is_empty(), "secret in clear in {hits:?}");
}

#[tokio::test]
async fn imports_a_reference_meta_and_pdpack() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider_dir = dir.path().join("provider");
    let provider = local_provider(&provider_dir);
    // A reference entry as the reference service lays it out: <id>/<name>.meta and
    // <name>.pdpack, a tar.gz of the VM bundle, made with the system tar.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let bundle = src.join("Build Agent.pvm");
    testimage::generate(&bundle, 2 << 20, 5).unwrap();
    let name = "build-agent-x86_64-3.1";
    std::fs::create_dir_all(provider_dir.join("build-agent")).unwrap();
    let pack = provider_dir.join(format!("build-agent/{name}.pdpack"));
    let st = Command::new("tar").arg("-czf").arg(&pack).arg("-C").arg(&src).arg("Build Agent.pvm").status().unwrap();
    assert!(st.success(), "tar failed");
    let meta = json!({
        "id": "x", "name": name, "catalog_id": "build-agent", "version": "3.1", "architecture": "x86_64",
        "description": "imported", "type": "pvm", "path": "/build-agent", "pack_path": format!("{name}.pdpack"),
        "metadata_path": format!("{name}.meta"), "is_compressed": true, "tags": ["legacy"],
        "required_roles": [], "required_claims": [], "minimum_requirements": {"cpu": 2, "memory": 4096, "disk": 40000},
        "provider": {"type": "local-storage"}, "created_at": "2025-01-01T00:00:00Z"
    });
    std::fs::write(provider_dir.join(format!("build-agent/{name}.meta")), meta.to_string()).unwrap();

    let (st, v) = api(
        &s,
        Method::PUT,
        "/catalog/import",
        &root,
        Some(json!({"connection": provider, "catalog_id": "build-agent", "version": "3.1", "architecture": "amd64"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!((v["description"].as_str(), v["type"].as_str()), (Some("imported"), Some("pvm")));
    assert_eq!(v["minimum_requirements"], json!({"cpu": 2, "memory": 4096, "disk": 40000}));
    let dest = dir.path().join("pulled");
    let r = pull(&s, &root, dir.path(), "build-agent", "3.1", &dest, "agent");
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(testimage::fingerprint(&dest.join("agent")).unwrap(), testimage::fingerprint(&bundle).unwrap());
    // The CLI import of a missing entry is a clear 422.
    let r = cli(
        &s,
        &root,
        dir.path(),
        &[
            "catalog",
            "import",
            "--provider",
            &provider,
            "--catalog-id",
            "build-agent",
            "--version",
            "9",
            "--architecture",
            "x86_64",
        ],
        &[],
    );
    assert!(!r.ok && r.stderr.contains("422") && r.stderr.contains("no reference entry"), "{}", r.stderr);
}

#[tokio::test]
async fn bad_inputs_get_a_4xx_with_the_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("server"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let provider = local_provider(&dir.path().join("provider"));
    let cases: Vec<(Method, &str, Option<Value>, u16)> = vec![
        (Method::POST, "/catalog/push", Some(json!({"catalog_id": "x"})), 422),
        (
            Method::POST,
            "/catalog/push",
            Some(
                json!({"catalog_id": "x", "version": "1", "architecture": "x86_64", "connection": provider, "colour": 1}),
            ),
            422,
        ),
        (
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "x", "version": "1", "architecture": "sparc", "connection": provider})),
            400,
        ),
        (
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "../x", "version": "1", "architecture": "x86_64", "connection": provider})),
            400,
        ),
        (
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "x", "version": "1 2", "architecture": "x86_64", "connection": provider})),
            400,
        ),
        (
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "x", "version": "1", "architecture": "x86_64", "connection": "provider=nope"})),
            400,
        ),
        (
            Method::POST,
            "/catalog/push",
            Some(json!({"catalog_id": "x", "version": "1", "architecture": "x86_64", "connection": provider})),
            422,
        ),
        (Method::PUT, "/catalog/pull-ticket", Some(json!({"catalog_id": "x", "architecture": "mips"})), 400),
        (Method::PUT, "/catalog/pull-ticket", Some(json!({"catalog_id": "x", "architecture": "x86_64"})), 404),
        (Method::GET, "/catalog/x/1/x86_64/chunks/not-a-hash", None, 400),
        (Method::PATCH, "/catalog/x/1/x86_64/taint", None, 404),
        (Method::PATCH, "/catalog/x/1/x86_64/claims", Some(json!({"required_claims": "A"})), 422),
        (Method::DELETE, "/catalog/cache/x", None, 404),
        (
            Method::PUT,
            "/catalog/import",
            Some(json!({"catalog_id": "x", "architecture": "x86_64", "connection": provider})),
            422,
        ),
    ];
    for (m, path, body, want) in cases {
        let (st, v) = api(&s, m.clone(), path, &root, body).await;
        assert_eq!(st, want, "{m} {path}: {v}");
        assert_eq!(v["code"].as_u64(), Some(want as u64), "{m} {path}: {v}");
        assert!(v["message"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    }
    // Malformed JSON is a 400.
    let r = c
        .post(s.api("/catalog/push"))
        .bearer_auth(&root)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}
