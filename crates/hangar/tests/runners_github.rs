//! Ephemeral GitHub Actions runners against GitHub's own published contract, without GitHub:
//! the REST description (`@octokit/openapi`) served by Prism, which refuses requests that do
//! not match it and answers in its shapes; `workflow_job` payloads from
//! `@octokit/webhooks-examples`, edited with the test's ids and labels and validated against
//! `@octokit/openapi-webhooks` (`tests/github/payloads.mjs`). `tests/github` is installed by
//! `scripts/test.sh` (`npm ci`).
//!
//! The fleet: an orchestrator with GitHub runners on, two fake-Parallels host agents, a pool
//! (two warm VMs) whose catalog image carries the runner stand-in `actions-runner/run.sh`,
//! which records the JIT configuration it was started with (from its environment) and exits
//! as a finished job would (or, for the crash phase, waits for the test's word first).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const SECRET: &str = "hangar-test-webhook-secret";
const LABEL: &str = "hangar-test-runner";
const POOL: &str = "gh-runners";

fn github_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/github")
}

/// Prism serving api.github.com's description on a loopback port.
struct Prism {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prism(dir: &Path) -> Prism {
    let gh = github_dir();
    let prism = gh.join("node_modules/.bin/prism");
    assert!(prism.exists(), "{} missing: run `npm ci` in tests/github (scripts/test.sh does)", prism.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = dir.join("prism.log");
    let mut child = Command::new(&prism)
        .args(["mock", "-h", "127.0.0.1", "-p", &port.to_string()])
        .arg(gh.join("node_modules/@octokit/openapi/generated/api.github.com.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Prism says when it listens; everything it prints goes to the log file too.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log_path = log.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&log_path).unwrap();
        let mut told = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(f, "{line}");
            let _ = f.flush();
            if !told && line.contains("Prism is listening") {
                told = true;
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(180)).expect("Prism did not start listening within 180 s");
    Prism { child, url: format!("http://127.0.0.1:{port}"), log }
}

/// `workflow_job` payloads from GitHub's examples, checked against GitHub's schema.
fn payloads(wanted: &Value) -> Vec<Value> {
    let mut child = Command::new("node")
        .arg(github_dir().join("payloads.mjs"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (scripts/test.sh installs nodejs)");
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(wanted.to_string().as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "payloads.mjs: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn job(action: &str, id: u64, runner: Option<&str>) -> Value {
    json!({"action": action, "job_id": id, "run_id": 7000 + id, "labels": ["self-hosted", LABEL],
        "runner_name": runner, "conclusion": "success"})
}

/// Deliver `payload` signed with `secret` (or with the given signature).
async fn deliver(
    c: &reqwest::Client,
    orch: &Server,
    payload: &Value,
    delivery: &str,
    signature: Option<&str>,
) -> (u16, Value) {
    let body = serde_json::to_vec(payload).unwrap();
    let sig = match signature {
        Some(s) => s.to_string(),
        None => hangar_runners::webhook::sign(&hangar_runners::Secret::new(SECRET), &body),
    };
    let resp = c
        .post(orch.api("/runners/github/webhook"))
        .header("content-type", "application/json")
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    let st = resp.status().as_u16();
    (st, resp.json().await.unwrap_or(Value::Null))
}

/// The runner VMs the orchestrator lists (by name).
async fn runner_vms(c: &reqwest::Client, orch: &Server, root: &str) -> Vec<String> {
    let (st, v) =
        call(c, Method::GET, &orch.api("/orchestrator/machines"), &Auth::Bearer(root.into()), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .filter(|n| n.starts_with("hangar-runner-"))
        .map(String::from)
        .collect()
}

fn records(dir: &Path) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jit"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap_or_default()))
        .collect()
}

/// The runner stand-in: records `$ACTIONS_RUNNER_INPUT_JITCONFIG` under the VM's folder name
/// in `rec`, then exits 0 like a runner whose one job finished; while `rec/hold` exists it
/// first waits for `rec/release` (at most 120 s, so it never outlives the test).
fn stand_in(rec: &Path) -> String {
    let rec = rec.display();
    format!(
        "#!/bin/sh\n\
         vm=$(basename \"$(cd ../.. && pwd)\" .pvm)\n\
         printf '%s' \"$ACTIONS_RUNNER_INPUT_JITCONFIG\" > '{rec}'/\"$vm.tmp\" && mv '{rec}'/\"$vm.tmp\" '{rec}'/\"$vm.jit\"\n\
         if [ -e '{rec}/hold' ]; then\n\
           touch '{rec}'/\"$vm.held\"\n\
           n=0; while [ ! -e '{rec}/release' ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done\n\
         fi\n\
         exit 0\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_jobs_get_one_vm_each_from_a_pool_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let prism = start_prism(dir.path());

    // The mock is GitHub's contract, not a stub: a request the description does not allow
    // is refused.
    let (st, v) = call(
        &c,
        Method::POST,
        &format!("{}/repos/octo/hello/actions/runners/generate-jitconfig", prism.url),
        &Auth::Bearer("x".into()),
        Some(json!({"name": "r", "labels": []})),
        &[],
    )
    .await;
    assert_eq!(st, 422, "Prism validates requests: {v}");
    // The JIT configuration its description gives as the example answer.
    let (st, v) = call(
        &c,
        Method::POST,
        &format!("{}/repos/octo/hello/actions/runners/generate-jitconfig", prism.url),
        &Auth::Bearer("x".into()),
        Some(json!({"name": "r", "runner_group_id": 1, "labels": ["self-hosted"]})),
        &[],
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let mock_jit = v["encoded_jit_config"].as_str().unwrap().to_string();

    // GitHub App: a fresh RSA key.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let key_file = dir.path().join("app.pem");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    // Two host agents whose catalog holds the runner image (the stand-in in its guest).
    let rec = dir.path().join("records");
    std::fs::create_dir_all(&rec).unwrap();
    let mut agents = Vec::new();
    for name in ["a", "b"] {
        let fake = FakeParallels::new(&dir.path().join(name));
        let runner_dir = fake.images.join("golden.pvm/guest/actions-runner");
        std::fs::create_dir_all(&runner_dir).unwrap();
        let run = runner_dir.join("run.sh");
        std::fs::write(&run, stand_in(&rec)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Room for the pool (the fake reports this machine's CPUs otherwise).
        std::fs::write(fake.state.join("host.json"), r#"{"cpus": 16, "memory_mb": 65536}"#).unwrap();
        let agent = fake.agent(
            &dir.path().join(name).join("data"),
            &[("ENABLED_MODULES", "api,host,catalog"), ("SYSTEM_RESERVED_CPU", "0"), ("SYSTEM_RESERVED_MEMORY", "0")],
        );
        let token = login(&c, &agent, "root", ROOT_PASSWORD).await;
        push_bundle(&agent, &token, &dir.path().join(name), &fake.images.join("golden.pvm"), "runner-image");
        agents.push((fake, agent));
    }

    let key_path = key_file.to_str().unwrap().to_string();
    let orch_settings = [
        ("ENABLED_MODULES", "api,orchestrator"),
        ("ORCHESTRATOR_CHECK_INTERVAL", "1s"),
        ("GITHUB_APP_ID", "4242"),
        ("GITHUB_APP_PRIVATE_KEY_FILE", key_path.as_str()),
        ("GITHUB_WEBHOOK_SECRET", SECRET),
        ("GITHUB_API_URL", prism.url.as_str()),
        ("GITHUB_SCOPE", "repo:octo-org/octo-repo"),
        ("GITHUB_INSTALLATION_ID", "1"),
        ("RUNNERS_CHECK_INTERVAL", "500ms"),
    ];
    let orch_dir = dir.path().join("orch");
    let mut orch = Server::start(&orch_dir, &orch_settings);
    let root = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let auth = Auth::Bearer(root.clone());
    for (name, (_, agent)) in ["host-a", "host-b"].iter().zip(&agents) {
        let body = json!({"name": name, "host": agent.url,
            "authentication": {"username": "root", "password": ROOT_PASSWORD}});
        let (st, h) = call(&c, Method::POST, &orch.api("/orchestrator/hosts"), &auth, Some(body), &[]).await;
        assert_eq!(st, 201, "{h}");
    }
    let pool = json!({"name": POOL, "labels": [LABEL],
        "image": {"catalog_id": "runner-image", "version": "1.0.0", "architecture": "x86_64"},
        "cpus": 1, "memory_mb": 512, "max_vms": 12, "warm": 2, "job_timeout_secs": 600});
    let (st, v) = call(&c, Method::POST, &orch.api("/runner-pools"), &auth, Some(pool), &[]).await;
    assert!(st == 200 || st == 201, "create the pool: {st} {v}");
    let warm_ready = |c: reqwest::Client, url: String, root: String| async move {
        let (st, v) = call(&c, Method::GET, &url, &Auth::Bearer(root), None, &[]).await;
        st == 200 && v["status"]["warm_ready"].as_u64() == Some(2)
    };
    let pool_url = orch.api(&format!("/runner-pools/{POOL}"));
    wait_for("two warm VMs", Duration::from_secs(120), || warm_ready(c.clone(), pool_url.clone(), root.clone())).await;

    // Ten signed queued deliveries at once.
    let queued = payloads(&json!((1..=10u64).map(|i| job("queued", i, None)).collect::<Vec<_>>()));
    let sends = queued.iter().enumerate().map(|(i, p)| {
        let (c, orch) = (c.clone(), &orch);
        async move { deliver(&c, orch, p, &format!("q-{i}"), None).await }
    });
    for (st, v) in futures::future::join_all(sends).await {
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["duplicate"], false, "{v}");
    }
    // Each job had its own VM whose runner got a JIT configuration from the mock.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while records(&rec).len() < 10 {
        if std::time::Instant::now() > deadline {
            let log = orch.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "timed out waiting for ten runners ({} started); the orchestrator's log ends:\n{}",
                records(&rec).len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // Waiting on the stand-ins' records (files written in the guests).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = records(&rec);
    assert_eq!(got.len(), 10, "one runner per job: {got:?}");
    for (vm, jit) in &got {
        assert_eq!(jit, &mock_jit, "{vm} holds the mock's JIT configuration");
    }
    // The runners exited: their VMs go; the pool is refilled.
    wait_for("the runner VMs deleted", Duration::from_secs(120), || {
        let (c, orch, root) = (c.clone(), &orch, root.clone());
        async move { runner_vms(&c, orch, &root).await.is_empty() }
    })
    .await;
    wait_for("the pool refilled", Duration::from_secs(120), || warm_ready(c.clone(), pool_url.clone(), root.clone()))
        .await;

    // A replayed delivery and a bad signature change nothing.
    let (st, v) = deliver(&c, &orch, &queued[0], "q-0", None).await;
    assert_eq!((st, &v["duplicate"]), (200, &json!(true)), "{v}");
    let bad = payloads(&json!([job("queued", 99, None)]));
    let (st, v) = deliver(&c, &orch, &bad[0], "bad-1", Some("sha256=00")).await;
    assert_eq!(st, 401, "{v}");
    let (st, v) = deliver(&c, &orch, &bad[0], "bad-2", Some("")).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(records(&rec).len(), 10, "no new runner");
    assert!(runner_vms(&c, &orch, &root).await.is_empty());

    // completed deliveries for the ten: accepted, nothing left to clean.
    let completed = payloads(&json!(
        (1..=10u64).map(|i| job("completed", i, Some(&format!("hangar-runner-{i}")))).collect::<Vec<_>>()
    ));
    for (i, p) in completed.iter().enumerate() {
        let (st, v) = deliver(&c, &orch, p, &format!("c-{i}"), None).await;
        assert_eq!(st, 200, "{v}");
    }

    // SIGKILL between queued and completed: the runner holds its job (VM alive) when Hangar
    // dies; after the restart, the completed delivery still deletes the VM.
    std::fs::write(rec.join("hold"), "").unwrap();
    let q11 = payloads(&json!([job("queued", 11, None)]));
    let (st, v) = deliver(&c, &orch, &q11[0], "q-11", None).await;
    assert_eq!(st, 200, "{v}");
    wait_for("job 11's runner holding its job", Duration::from_secs(120), || {
        let rec = rec.clone();
        async move {
            std::fs::read_dir(&rec)
                .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".held")))
                .unwrap_or(false)
        }
    })
    .await;
    assert_eq!(runner_vms(&c, &orch, &root).await, vec!["hangar-runner-11".to_string()]);
    orch.kill9();
    let orch = Server::start(&orch_dir, &orch_settings);
    let root = login(&c, &orch, "root", ROOT_PASSWORD).await;
    let c11 = payloads(&json!([job("completed", 11, Some("hangar-runner-11"))]));
    let (st, v) = deliver(&c, &orch, &c11[0], "c-11", None).await;
    assert_eq!(st, 200, "{v}");
    wait_for("job 11's VM deleted after the restart", Duration::from_secs(120), || {
        let (c, orch, root) = (c.clone(), &orch, root.clone());
        async move { runner_vms(&c, orch, &root).await.is_empty() }
    })
    .await;
    std::fs::write(rec.join("release"), "").unwrap();

    // Every request Hangar sent GitHub passed the description's validation.
    let log = std::fs::read_to_string(&prism.log).unwrap_or_default();
    assert!(log.contains("generate-jitconfig"), "Hangar asked the mock for JIT configurations");
    // The leader's loop: the reconcile pass read the scope's runner list, and each start as
    // leader (before the SIGKILL and after the restart) asked for the app's deliveries, to
    // have missed ones redelivered.
    let asked = |what: &str| log.lines().filter(|l| l.contains("HTTP SERVER") && l.contains(what)).count();
    assert!(asked("get /repos/octo-org/octo-repo/actions/runners ") >= 1, "no runner list asked for:\n{log}");
    assert!(asked("get /app/hook/deliveries ") >= 2, "deliveries not asked for at each start:\n{log}");
    // Only the test's own wrong request above was refused.
    assert_eq!(
        log.matches("Request did not pass the validation rules").count(),
        1,
        "a request the description refuses:\n{log}"
    );
    drop(agents);
}
