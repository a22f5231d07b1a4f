//! `hangar service install|status|uninstall` with the real binary, on Linux: the systemd
//! unit it writes passes `systemd-analyze verify`, its `ExecStart` line run with its
//! `Environment=` and `EnvironmentFile=` starts a server that answers liveness, secrets are
//! only in the 0600 environment file, and uninstall removes what install wrote. The launchd
//! plist (macOS) is written too and parsed as a property list by Python's plistlib.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const SECRET: &str = "Svc-Passw0rd!-\"quoted\" $HOME `x` \\";

fn hangar(args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .args(args)
        .env_remove("SYSTEMD_UNIT_DIR")
        .env_remove("HANGAR_CONFIG")
        .output()
        .expect("run hangar")
}

fn ok_json(args: &[&str]) -> Value {
    let o = hangar(args);
    assert!(
        o.status.success(),
        "hangar {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("hangar {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// The value of an `Environment="K=V"` line as systemd reads it (the writer escapes `\` and
/// `"` inside double quotes and doubles `%`).
fn unquote_env(v: &str) -> String {
    let inner = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(v);
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '%' => {
                chars.next();
                out.push('%');
            }
            c => out.push(c),
        }
    }
    out
}

#[test]
fn a_systemd_unit_verifies_runs_and_uninstalls() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = |s: &str| t.join(s).display().to_string();
    let (units, etc, data, logs) = (p("units"), p("etc"), p("data"), p("log"));
    let secret_env = format!("ROOT_PASSWORD={SECRET}");
    let v = ok_json(&[
        "service",
        "install",
        "--output",
        "json",
        "--name",
        "hangar-test",
        "--role",
        "server",
        "--unit-dir",
        &units,
        "--config-dir",
        &etc,
        "--data-dir",
        &data,
        "--log-dir",
        &logs,
        "--env",
        "API_HOST=127.0.0.1",
        "--env",
        "API_PORT=0",
        "--env",
        &secret_env,
        "--env",
        "LOG_LEVEL=info",
        "--no-start",
    ]);
    assert_eq!(v["started"], false);
    let unit_path = t.join("units/hangar-test.service");
    let env_path = t.join("etc/hangar-test.env");
    assert_eq!(v["unit"], unit_path.display().to_string());
    assert_eq!(v["log_file"], t.join("log/hangar.log").display().to_string());

    // The secret is in the 0600 environment file only.
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(!unit.contains("Svc-Passw0rd") && !unit.contains("ROOT_PASSWORD"), "a secret in the unit:\n{unit}");
    let mode = std::fs::metadata(&env_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the environment file's mode");
    assert!(std::fs::read_to_string(&env_path).unwrap().contains("ROOT_PASSWORD="));
    assert!(unit.contains("Environment=\"ENABLED_MODULES=api,orchestrator,catalog\""), "{unit}");

    // systemd's own checker: syntax, known settings, the ExecStart binary exists. The man page
    // named in Documentation= is not installed here, so its lookup is off.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test.sh installs it)");
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    // It exits 0 on unknown keys or bad values but names them: a clean unit prints nothing.
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}\n{unit}");

    // Run the unit's ExecStart with its Environment= and EnvironmentFile=, as systemd would:
    // a clean environment, the file read by the shell's rules (which systemd's parser shares
    // for the quoting the writer uses).
    let mut env: Vec<(String, String)> = Vec::new();
    let (mut exec, mut env_file) = (None, None);
    for line in unit.lines() {
        if let Some(v) = line.strip_prefix("Environment=") {
            let kv = unquote_env(v);
            let (k, v) = kv.split_once('=').unwrap();
            env.push((k.into(), v.into()));
        } else if let Some(v) = line.strip_prefix("ExecStart=") {
            exec = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("EnvironmentFile=") {
            env_file = Some(v.to_string());
        }
    }
    let (exec, env_file) = (exec.expect("ExecStart"), env_file.expect("EnvironmentFile"));
    assert_eq!(env_file, env_path.display().to_string());
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!("set -a; . '{env_file}'; set +a; exec {exec}"));
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut url = None;
    while url.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            url = line.trim().strip_prefix("listening on ").map(|u| u.trim().to_string());
        } else if let Ok(Some(st)) = child.try_wait() {
            panic!("the unit's ExecStart exited with {st}; log: {}", read_log(&t.join("log/hangar.log")));
        }
    }
    let url = url.unwrap_or_else(|| panic!("no listener announced; log: {}", read_log(&t.join("log/hangar.log"))));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = common::client();
        let r = c.get(format!("{url}/api/v1/health/probe")).send().await.unwrap();
        assert_eq!(r.status(), 200, "liveness of the server the unit started");
        // The password came from the environment file, quotes, $ and backslash intact.
        let r = c
            .post(format!("{url}/api/v1/auth/token"))
            .json(&serde_json::json!({"username": "root", "password": SECRET}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "root logs in with the password of the environment file");
    });
    // The log file is where the unit says.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.join("log/hangar.log").exists() {
        assert!(Instant::now() < deadline, "no log file at {}", t.join("log/hangar.log").display());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(t.join("data").is_dir());
    let _ = child.kill();
    let _ = child.wait();

    let st = ok_json(&[
        "service",
        "status",
        "--output",
        "json",
        "--name",
        "hangar-test",
        "--unit-dir",
        &units,
        "--config-dir",
        &etc,
    ]);
    assert_eq!(st["installed"], true);
    assert_eq!(st["environment_file_mode"], "600");
    let v = ok_json(&[
        "service",
        "uninstall",
        "--output",
        "json",
        "--name",
        "hangar-test",
        "--unit-dir",
        &units,
        "--config-dir",
        &etc,
    ]);
    assert_eq!(v["stopped"], false, "no systemd here: nothing to stop");
    assert!(!unit_path.exists() && !env_path.exists(), "uninstall leaves the unit or its environment");
    assert!(t.join("data").is_dir(), "the data folder stays");
    let st = ok_json(&["service", "status", "--output", "json", "--name", "hangar-test", "--unit-dir", &units]);
    assert_eq!(st["installed"], false);
    // A second uninstall says there is nothing.
    let o = hangar(&["service", "uninstall", "--name", "hangar-test", "--unit-dir", &units, "--config-dir", &etc]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no service hangar-test is installed"));
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn an_agent_unit_and_a_launchd_plist_are_well_formed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = |s: &str| t.join(s).display().to_string();
    // Dry run: nothing written, secrets masked.
    let o = hangar(&[
        "service",
        "install",
        "--role",
        "agent",
        "--dry-run",
        "--unit-dir",
        &p("units"),
        "--config-dir",
        &p("etc"),
        "--data-dir",
        "/var/lib/hangar agent",
        "--env",
        "JWT_HMACS_SECRET=0123456789abcdef0123456789abcdef-secret",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("ENABLED_MODULES=api,host,reverse_proxy"), "{text}");
    assert!(text.contains("\"/var/lib/hangar agent\""), "a path with a space is quoted: {text}");
    assert!(text.contains("JWT_HMACS_SECRET=********") && !text.contains("0123456789abcdef"), "{text}");
    assert!(!t.join("units").exists() && !t.join("etc").exists(), "a dry run writes nothing");

    // The launchd form, written for real into temporary folders.
    let secret_env = format!("ROOT_PASSWORD={SECRET}");
    let v = ok_json(&[
        "service",
        "install",
        "--output",
        "json",
        "--manager",
        "launchd",
        "--name",
        "ci",
        "--user",
        "nobody",
        "--unit-dir",
        &p("LaunchDaemons"),
        "--config-dir",
        &p("etc"),
        "--data-dir",
        &p("data"),
        "--log-dir",
        &p("log"),
        "--port",
        "3999",
        "--env",
        &secret_env,
        "--env",
        "LOG_LEVEL=debug & <more>",
    ]);
    let plist = t.join("LaunchDaemons/com.hangar.ci.plist");
    assert_eq!(v["unit"], plist.display().to_string());
    let parsed = Command::new("python3")
        .args(["-c", "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))"])
        .arg(&plist)
        .output()
        .expect("python3");
    assert!(parsed.status.success(), "plistlib refused the plist: {}", String::from_utf8_lossy(&parsed.stderr));
    let d: Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(d["Label"], "com.hangar.ci");
    assert_eq!(d["UserName"], "nobody");
    assert_eq!(d["RunAtLoad"], true);
    let args: Vec<&str> = d["ProgramArguments"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let secrets = t.join("etc/ci.secrets.json");
    assert_eq!(args[1..], ["serve", "--data-dir", &p("data"), "--config", &secrets.display().to_string()]);
    assert!(Path::new(args[0]).is_absolute());
    assert_eq!(d["EnvironmentVariables"]["LOG_LEVEL"], "debug & <more>");
    assert_eq!(d["EnvironmentVariables"]["API_PORT"], "3999");
    assert!(d["EnvironmentVariables"].get("ROOT_PASSWORD").is_none());
    assert!(!std::fs::read_to_string(&plist).unwrap().contains("Svc-Passw0rd"));
    // The secrets are a Hangar config file the server reads with --config.
    assert_eq!(std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777, 0o600);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&secrets).unwrap()).unwrap();
    assert_eq!(cfg["environment"]["ROOT_PASSWORD"], SECRET);
    let check = Command::new(common::bin())
        .args(["config", "check", "--config"])
        .arg(&secrets)
        .env_remove("ROOT_PASSWORD")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the server does not read the secrets file: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn bad_service_arguments_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let units = tmp.path().join("u").display().to_string();
    for (args, says) in [
        (vec!["--name", "../etc/passwd"], "--name"),
        (vec!["--env", "NOEQUALS"], "KEY=VALUE"),
        (vec!["--env", "1BAD=x"], "not a variable name"),
        (vec!["--env", "ROOT_PASSWORD=a\nb"], "line break"),
        (vec!["--data-dir", "relative/data"], "absolute"),
        (vec!["--env", "DATABASE_FOLDER=/x"], "--data-dir"),
        (vec!["--user", "no-such-user-hangar-test"], "no such user"),
    ] {
        let mut all = vec!["service", "install", "--unit-dir", &units, "--config-dir", &units];
        all.extend(args.iter().copied());
        let o = hangar(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(err.contains(says) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("a\nb"), "the value is echoed: {err}");
    }
    assert!(!tmp.path().join("u").exists(), "a refused install writes nothing");
}
