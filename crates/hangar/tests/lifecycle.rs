//! The server as an operator sees it: first start, restart, SIGTERM, a second process on
//! the same data folder, TLS-only mode, `hangar db export/import`, the CLI login file.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::process::{Command, Stdio};

#[tokio::test]
async fn first_start_prints_data_folder_and_a_one_time_root_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_with(dir.path(), &[], false);
    let banner = s.banner.join("\n");
    assert!(banner.contains(&format!("data folder: {}", dir.path().display())), "{banner}");
    assert!(banner.contains("hangar login --url"), "{banner}");
    let pw_line = s.banner.iter().position(|l| l.contains("shown only once")).expect("generated password announced");
    let pw = s.banner[pw_line + 1].trim().to_string();
    let log = s.log();
    assert!(!log.contains(&pw), "the generated password must not reach the log");
    let c = client();
    let (st, v) = call(&c, Method::GET, &format!("{}/api/health/probe", s.url), &Auth::None, None, &[]).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("OK")));
    login(&c, &s, "root", &pw).await;
    assert!(s.stop().success(), "clean exit on SIGTERM");
    // The second start keeps the password and does not print one.
    let s2 = Server::start_with(dir.path(), &[], false);
    assert!(!s2.banner.join("\n").contains("shown only once"));
    login(&c, &s2, "root", &pw).await;
}

#[tokio::test]
async fn a_second_process_on_the_same_data_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = Server::start(dir.path(), &[]);
    let out = Command::new(bin())
        .args(["serve", "--port", "0", "--set", "API_HOST=127.0.0.1", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another Hangar process"), "{err}");
    // `hangar db export` says the same, with a hint.
    let out = Command::new(bin()).args(["db", "export", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server still running"));
}

#[tokio::test]
async fn data_survives_restart_and_moves_through_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut s = Server::start(dir.path(), &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    make_user(&c, &s, &root, "carol").await;
    assert!(s.stop().success());
    let export = dir.path().join("export.json");
    let out = Command::new(bin())
        .args(["db", "export", "--output", "json", "--data-dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(&export)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dump: Value = serde_json::from_str(&std::fs::read_to_string(&export).unwrap()).unwrap();
    let users = dump["collections"]["users"].as_object().unwrap();
    assert!(users.values().any(|u| u["username"] == "carol"));
    // Into a fresh folder: carol can log in there.
    let dir2 = tempfile::tempdir().unwrap();
    let out = Command::new(bin()).args(["db", "import", "--data-dir"]).arg(dir2.path()).arg(&export).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Password hashes move with the data; token keys stay per folder, so old tokens do not.
    let s2 = Server::start(dir2.path(), &[]);
    login(&c, &s2, "carol", USER_PASSWORD).await;
    // A file that is not an export is refused with a clear message.
    let bogus = dir.path().join("bogus.json");
    std::fs::write(&bogus, "{\"hello\": 1}").unwrap();
    let dir3 = tempfile::tempdir().unwrap();
    let out = Command::new(bin()).args(["db", "import", "--data-dir"]).arg(dir3.path()).arg(&bogus).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a Hangar export"));
}

#[tokio::test]
async fn https_only_mode_serves_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(st.success());
    let s = Server::start(
        dir.path(),
        &[
            ("TLS_ENABLED", "true"),
            ("TLS_PORT", "0"),
            ("DISABLE_HTTP_WHEN_TLS", "true"),
            ("TLS_CERTIFICATE", cert.to_str().unwrap()),
            ("TLS_PRIVATE_KEY", key.to_str().unwrap()),
        ],
    );
    assert!(s.url.starts_with("https://"), "{}", s.url);
    assert!(!s.banner.iter().any(|l| l.contains("listening on http://")), "no plain HTTP listener: {:?}", s.banner);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let c = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    let (st, v) = call(&c, Method::GET, &format!("{}/api/health/probe", s.url), &Auth::None, None, &[]).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("OK")));
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/auth/token"),
        &Auth::None,
        Some(json!({"email": "root@localhost", "password": ROOT_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "login over HTTPS: {v}");
    // A client that does not trust the certificate is refused.
    let strict = reqwest::Client::builder().build().unwrap();
    assert!(strict.get(format!("{}/api/health/probe", s.url)).send().await.is_err());
}

#[tokio::test]
async fn cli_login_stores_a_private_token_and_manages_users() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let cfg = dir.path().join("cli");
    let cli = |args: &[&str], stdin: &str| {
        let mut child = Command::new(bin())
            .args(args)
            .env("HANGAR_CONFIG_DIR", &cfg)
            .env_remove("HANGAR_URL")
            .env_remove("HANGAR_TOKEN")
            .env_remove("HANGAR_API_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out =
        cli(&["login", "--url", &s.url, "--username", "root", "--password-stdin", "--output", "json"], ROOT_PASSWORD);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = cfg.join("credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let out = cli(
        &["user", "create", "--username", "dave", "--email", "dave@x.test", "--password-stdin", "--output", "json"],
        USER_PASSWORD,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["user", "list", "--output", "json"], "");
    let users: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert!(users.as_array().unwrap().iter().any(|u| u["username"] == "dave"));
    let out = cli(&["user", "list"], "");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID") && table.contains("dave"), "{table}");
    // Errors name the problem and the fix.
    let out = cli(&["role", "get", "NOPE"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    let out = cli(&["user", "create", "--username", "weak", "--email", "w@x.test", "--password-stdin"], "short");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password needs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["logout"], "");
    assert!(out.status.success());
    let out = cli(&["user", "list"], "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("hangar login"));
}

#[test]
fn bad_configuration_is_named_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        Command::new(bin()).args(["serve", "--data-dir"]).arg(dir.path()).env("API_PORT", "eighty").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("API_PORT") && err.contains("environment"), "{err}");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "api_prot = 1\n").unwrap();
    let out = Command::new(bin()).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key"));
    let out = Command::new(bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--set", "ENABLED_MODULES=api,teleport"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown module"));
}
