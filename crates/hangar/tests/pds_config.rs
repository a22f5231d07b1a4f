//! The reference service's configuration, as a team switching from it would bring it: its
//! YAML or JSON file with the `environment:` map, found where the reference looks for it,
//! its `--KEY=value` flags, its precedence (file < flag < environment), `MODE`, the
//! reference's module names in `ENABLED_MODULES`, the `CATALOG_CACHE_*` keys, and its keys
//! that Hangar does not honour (reported, never silently dropped). Every test runs the real
//! `hangar` binary, linked into a folder of its own so that the executable's folder can
//! hold a config file.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Auth, ROOT_PASSWORD, Server, bin, call, client};
use reqwest::Method;

/// `hangar` at `<dir>/bin/hangar` (a hard link when the file system allows, else a copy).
fn own_binary(dir: &Path) -> PathBuf {
    let exe = dir.join("bin").join("hangar");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    if std::fs::hard_link(bin(), &exe).is_err() {
        std::fs::copy(bin(), &exe).unwrap();
    }
    exe
}

/// A command of `exe` with none of the configuration of the test's own environment.
fn command(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    for k in ["HANGAR_CONFIG", "ROOT_PASSWORD", "API_PREFIX", "MODE", "ENABLED_MODULES", "DATABASE_FOLDER"] {
        c.env_remove(k);
    }
    c.env("LOG_LEVEL", "info").stdin(Stdio::null());
    c
}

/// Start `hangar serve` (or `hangar api`) from `cmd` and wait for its banner.
fn start(mut cmd: Command, dir: &Path) -> Server {
    let stderr_path = dir.join("server.log");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    cmd.env("ROOT_PASSWORD", ROOT_PASSWORD);
    let child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
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
    let (mut url, mut banner) = (None, Vec::new());
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
                    panic!("hangar exited with {st}: {}", server.log());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    server.url = url.unwrap_or_else(|| panic!("no listener announced: {banner:?}"));
    server.banner = banner;
    server
}

/// `hangar config check` from `exe` with `args`: (success, stdout + stderr).
fn check(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = command(exe);
    c.args(["config", "check"]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The modules `/health/system` lists for root, with their messages.
async fn modules(s: &Server, prefix: &str) -> Vec<(String, String)> {
    let c = client();
    let (st, v) = call(
        &c,
        Method::POST,
        &format!("{}{prefix}/v1/auth/token", s.url),
        &Auth::None,
        Some(serde_json::json!({"username": "root", "password": ROOT_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (st, v) =
        call(&c, Method::GET, &format!("{}{prefix}/v1/health/system", s.url), &Auth::Bearer(token), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["message"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn yaml(env: &[(&str, &str)]) -> String {
    let mut t = String::from("# written as the reference's docs show it\nenvironment:\n");
    for (k, v) in env {
        t.push_str(&format!("  {k}: {v}\n"));
    }
    t
}

#[test]
fn the_config_file_is_found_where_the_reference_looks() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = own_binary(dir.path());
    let bin_dir = exe.parent().unwrap();
    let (ok, out) = check(&exe, &[], &[]);
    assert!(ok && out.contains("configuration file: none found"), "{out}");

    // <exe dir>/prldevops_config/config.yml
    std::fs::create_dir_all(bin_dir.join("prldevops_config")).unwrap();
    let sub = bin_dir.join("prldevops_config/config.yml");
    std::fs::write(&sub, yaml(&[("api_port", "4001")])).unwrap();
    let (ok, out) = check(&exe, &[], &[]);
    assert!(ok && out.contains(&format!("configuration file: {}", sub.display())), "{out}");

    // The executable's own folder comes first; JSON is read too.
    let json = bin_dir.join("config.json");
    std::fs::write(&json, r#"{"environment": {"API_PORT": "4002", "log_level": "debug"}}"#).unwrap();
    let (ok, out) = check(&exe, &[], &[]);
    assert!(ok && out.contains(&format!("configuration file: {}", json.display())), "{out}");

    // prldevops_config before config; .local.yaml before .yaml.
    let plain = bin_dir.join("prldevops_config.yaml");
    std::fs::write(&plain, yaml(&[("API_PORT", "4003")])).unwrap();
    let (_, out) = check(&exe, &[], &[]);
    assert!(out.contains(&format!("configuration file: {}", plain.display())), "{out}");
    let local = bin_dir.join("prldevops_config.local.yaml");
    std::fs::write(&local, yaml(&[("API_PORT", "4004")])).unwrap();
    let (_, out) = check(&exe, &[], &[]);
    assert!(out.contains(&format!("configuration file: {}", local.display())), "{out}");

    // --config= overrides the lookup.
    let (_, out) = check(&exe, &[&format!("--config={}", sub.display())], &[]);
    assert!(out.contains(&format!("configuration file: {}", sub.display())), "{out}");

    // A bad value in the found file is named with its source.
    std::fs::write(&local, yaml(&[("API_PORT", "eighty")])).unwrap();
    let (ok, out) = check(&exe, &[], &[]);
    assert!(!ok && out.contains("API_PORT=\"eighty\" (from the config file)"), "{out}");
}

#[tokio::test]
async fn file_flag_and_environment_layer_as_the_reference_and_mode_picks_modules() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = own_binary(dir.path());
    let data = dir.path().join("data");
    std::fs::write(
        exe.parent().unwrap().join("prldevops_config.yaml"),
        yaml(&[
            ("api_host", "127.0.0.1"),
            ("API_PORT", "0"),
            ("database_folder", &data.display().to_string()),
            ("API_PREFIX", "/file"),
            ("MODE", "orchestrator"),
            ("TLS_DISABLE_VALIDATION", "\"true\""),
        ]),
    )
    .unwrap();

    // The file alone: its prefix, its mode.
    let mut cmd = command(&exe);
    cmd.arg("api");
    let mut s = start(cmd, dir.path());
    let names: Vec<String> = modules(&s, "/file").await.into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"orchestrator".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n == "host" || n == "catalog" || n == "reverse_proxy"), "{names:?}");
    // The reference key Hangar does not honour is named at start, with the reason.
    let log = s.log();
    assert!(
        log.contains("TLS_DISABLE_VALIDATION (from the config file) is a key of the reference service that Hangar does not honour")
            && log.contains("outbound TLS is always verified"),
        "{log}"
    );
    s.stop();

    // A --KEY=value flag beats the file.
    let mut cmd = command(&exe);
    cmd.args(["serve", "--API_PREFIX=/flag"]);
    let mut s = start(cmd, dir.path());
    let c = client();
    let probe = |p: &str| format!("{}{p}/v1/health/probe", s.url);
    assert_eq!(c.get(probe("/flag")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(probe("/file")).send().await.unwrap().status(), 404);
    s.stop();

    // The environment beats the flag (the reference's order).
    let mut cmd = command(&exe);
    cmd.args(["serve", "--API_PREFIX=/flag"]).env("API_PREFIX", "/env");
    let s = start(cmd, dir.path());
    let probe = |p: &str| format!("{}{p}/v1/health/probe", s.url);
    assert_eq!(c.get(probe("/env")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(probe("/flag")).send().await.unwrap().status(), 404);
    // And `hangar config check` lists the key that is not honoured.
    let (ok, out) = check(&exe, &[], &[]);
    assert!(ok && out.contains("not honoured: TLS_DISABLE_VALIDATION (from the config file)"), "{out}");
}

#[tokio::test]
async fn reference_module_names_and_the_catalog_cache_folder_are_honoured() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = own_binary(dir.path());
    let cache = dir.path().join("my-cache");
    let cfg = dir.path().join("pds.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"environment": {
            "API_HOST": "127.0.0.1", "API_PORT": "0",
            "DATABASE_FOLDER": dir.path().join("data"),
            "ENABLED_MODULES": "api,cors,cache,catalog_manager",
            "ENABLE_CORS": "false",
            "CATALOG_CACHE_FOLDER": cache,
            "CATALOG_CACHE_KEEP_FREE_DISK_SPACE": 5000,
            "CATALOG_CACHE_MAX_SIZE": 20000,
        }})
        .to_string(),
    )
    .unwrap();
    let mut cmd = command(&exe);
    cmd.arg("serve").arg(format!("--config={}", cfg.display()));
    let s = start(cmd, dir.path());
    let mods = modules(&s, "/api").await;
    let names: Vec<&str> = mods.iter().map(|(n, _)| n.as_str()).collect();
    // `cache` is the host image cache, held by the catalog module.
    let catalog = mods.iter().find(|(n, _)| n == "catalog").unwrap_or_else(|| panic!("{names:?}"));
    assert!(catalog.1.contains(&cache.display().to_string()), "{catalog:?}");
    assert!(!names.contains(&"host") && !names.contains(&"orchestrator"), "{names:?}");
    // `cors` turns CORS on even though ENABLE_CORS says false.
    let c = client();
    let r = c
        .request(Method::OPTIONS, s.api("/health/probe"))
        .header("Origin", "https://ci.example.test")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("access-control-allow-origin"), "{:?}", r.headers());
    let log = s.log();
    assert!(log.contains("ENABLED_MODULES names the reference's catalog_manager"), "{log}");
}

#[test]
fn a_typo_in_a_key_is_refused_naming_it() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = own_binary(dir.path());
    std::fs::write(exe.parent().unwrap().join("config.yaml"), yaml(&[("API_PROT", "3080")])).unwrap();
    let out = command(&exe).args(["serve", "--set", "API_PORT=0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown key \"API_PROT\""), "{err}");
    std::fs::remove_file(exe.parent().unwrap().join("config.yaml")).unwrap();
    let out = command(&exe).args(["serve", "--LOG_LEVL=debug"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"LOG_LEVL\""), "{err}");
    // An unknown top-level entry in the reference's format is refused too.
    let f = dir.path().join("c.yaml");
    std::fs::write(&f, "enviroment:\n  API_PORT: 1\n").unwrap();
    let (ok, out) = check(&exe, &[&format!("--config={}", f.display())], &[]);
    assert!(!ok && out.contains("unknown top-level entry \"enviroment\""), "{out}");
}

#[tokio::test]
async fn the_reverse_proxy_block_of_a_reference_yaml_file_is_imported() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = own_binary(dir.path());
    let (up, _seen) = common::echo_upstream().await;
    // The reference writes ports as strings.
    let text = format!(
        "environment:\n  ENABLED_MODULES: api,reverse_proxy\n  API_HOST: 127.0.0.1\n  API_PORT: 0\n  DATABASE_FOLDER: {data}\n\
         reverse_proxy:\n  host: 127.0.0.1\n  hosts:\n    - name: from-yaml\n      host: 127.0.0.1\n      port: \"0\"\n\
         \x20     http_routes:\n        - path: /\n          target_host: 127.0.0.1\n          target_port: \"{up}\"\n",
        data = dir.path().join("data").display()
    );
    std::fs::write(exe.parent().unwrap().join("prldevops_config.yml"), text).unwrap();
    let mut cmd = command(&exe);
    cmd.arg("serve");
    let s = start(cmd, dir.path());
    let c = client();
    let token = common::login(&c, &s, "root", ROOT_PASSWORD).await;
    let (st, v) = call(&c, Method::GET, &s.api("/reverse-proxy/hosts"), &Auth::Bearer(token), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let hosts = v.as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{v}");
    assert_eq!(hosts[0]["name"], "from-yaml", "{v}");
    let addr = hosts[0]["listener"]["local_address"].as_str().unwrap_or_else(|| panic!("no listener: {v}"));
    let r = c.get(format!("http://{addr}/through-the-proxy")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
