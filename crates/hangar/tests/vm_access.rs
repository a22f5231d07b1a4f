//! The route matrix of the one VM path: for every operation on a VM, on the host's own
//! route (`/machines/{id}/...`) and through the orchestrator (`/orchestrator/machines/{id}/...`),
//! four callers get the same answer from both paths:
//!
//! * the VM's owner (a plain user holding the VM claims),
//! * another plain user holding the same claims (refused: 403 on every operation on the VM
//!   but reading it, which any holder of LIST_VM may, as in the reference),
//! * a holder of the operation's claim for others' VMs (`MANAGE_ALL_VMS`, the snapshot `*_VM` claims),
//! * a SUPER_USER.
//!
//! One server runs the host module (on the fake `prlctl`) and the orchestrator, which has
//! that same server registered as its host. Each allowed call that changes a VM runs on a
//! fresh VM per path, so both paths see the same state. Registering a VM under another
//! owner is refused to a plain user. Websocket events about a VM reach only who may see it.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const VM_CLAIMS: &[&str] =
    &["CREATE_VM", "LIST_VM", "DELETE_VM", "UPDATE_VM", "UPDATE_VM_STATES", "EXECUTE_COMMAND_VM"];
const OTHERS_CLAIMS: &[&str] = &[
    "MANAGE_ALL_VMS",
    "LIST_SNAPSHOT_VM",
    "CREATE_SNAPSHOT_VM",
    "DELETE_SNAPSHOT_VM",
    "DELETE_ALL_SNAPSHOTS_VM",
    "REVERT_SNAPSHOT_VM",
];

/// Every event `token`'s websocket subscription to `types` receives, as it comes.
async fn listen(s: &Server, token: &str, types: &str) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    use futures::StreamExt;
    let url =
        format!("{}/api/v1/ws/subscribe?event_types={types}&access_token={token}", s.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("subscribe");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    // Subscribed once the server says so: events published after that are all received.
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        if m.to_text().is_ok_and(|t| t.contains("CLIENT_SUBSCRIBED")) {
            break;
        }
    }
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Ok(v) = serde_json::from_str::<Value>(m.to_text().unwrap_or_default()) {
                seen.lock().unwrap().push(v);
            }
        }
    });
    got
}

/// The VM ids the events in `events` are about.
fn vm_ids(events: &std::sync::Mutex<Vec<Value>>) -> Vec<String> {
    events.lock().unwrap().iter().filter_map(|e| e["body"]["vm_id"].as_str().map(String::from)).collect()
}

struct Fixture {
    c: reqwest::Client,
    s: Server,
    host_id: String,
}

async fn grant(f: &Fixture, root: &Auth, user_id: &str, claims: &[&str]) {
    for claim in claims {
        let url = f.s.api(&format!("/auth/users/{user_id}/claims"));
        let (st, v) = call(&f.c, Method::POST, &url, root, Some(json!({"name": claim})), &[]).await;
        assert_eq!(st, 201, "grant {claim}: {v}");
    }
}

/// A VM owned by alice (running or stopped), made through the orchestrator, with one snapshot.
async fn fresh_vm(f: &Fixture, alice: &Auth, root: &Auth, n: usize, running: bool) -> (String, String) {
    let body = json!({"name": format!("m{n}"), "image": "golden.pvm", "start_on_create": running,
        "specs": {"cpu": "1", "memory": "512"},
        // The host frees a deleted VM's CPU once its resources are read again: wait for it.
        "queue": {"timeout_seconds": 30}});
    let (st, v) = call(&f.c, Method::POST, &f.s.api("/orchestrator/machines"), alice, Some(body), &[]).await;
    assert_eq!(st, 200, "create m{n}: {v}");
    assert_eq!(v["owner"], "alice", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let url = f.s.api(&format!("/machines/{id}/snapshots"));
    let (st, snap) = call(&f.c, Method::POST, &url, root, Some(json!({"snapshot_name": "base"})), &[]).await;
    assert_eq!(st, 201, "{snap}");
    let (st, list) = call(&f.c, Method::GET, &url, root, None, &[]).await;
    assert_eq!(st, 200, "{list}");
    let sid = list[0]["id"].as_str().unwrap().to_string();
    (id, sid)
}

/// One operation: method, path after `/machines/{id}` (`{sid}` is the snapshot), body,
/// and whether it changes the VM (then each allowed call gets a fresh VM).
struct Op {
    method: Method,
    rest: &'static str,
    body: Option<Value>,
    changes: bool,
    /// Run on a stopped VM (the operation needs one).
    stopped: bool,
}

fn op(method: Method, rest: &'static str, body: Option<Value>, changes: bool) -> Op {
    Op { method, rest, body, changes, stopped: false }
}

/// A read: owner-scoped too (unlike the reference): others' VMs need LIST_ALL_VMS or
/// MANAGE_ALL_VMS.
fn read(rest: &'static str) -> Op {
    Op { method: Method::GET, rest, body: None, changes: false, stopped: false }
}

fn on_stopped(mut o: Op) -> Op {
    o.stopped = true;
    o
}

fn ops(upload_file: &str) -> Vec<Op> {
    use Method as M;
    vec![
        read(""),
        read("/status"),
        op(M::GET, "/snapshots", None, false),
        op(M::PUT, "/execute", Some(json!({"command": "echo hi"})), false),
        op(M::PUT, "/stop", None, true),
        op(M::PUT, "/kill", None, true),
        op(M::PUT, "/restart", None, true),
        op(M::PUT, "/pause", None, true),
        op(M::PUT, "/suspend", None, true),
        op(M::PUT, "/reset", None, true),
        on_stopped(op(M::PUT, "/start", None, true)),
        op(
            M::PUT,
            "/set",
            Some(json!({"operations": [{"group": "machine", "operation": "description", "value": "x"}]})),
            true,
        ),
        on_stopped(op(M::PUT, "/rename", Some(json!({"new_name": "renamed"})), true)),
        on_stopped(op(M::PUT, "/clone", Some(json!({"clone_name": "copy"})), true)),
        op(M::POST, "/upload", Some(json!({"path": upload_file, "remote_path": "/tmp/in.txt"})), true),
        op(M::POST, "/snapshots", Some(json!({"snapshot_name": "s2"})), true),
        op(M::POST, "/snapshots/{sid}/revert", Some(json!({})), true),
        op(M::DELETE, "/snapshots/{sid}", None, true),
        op(M::DELETE, "/snapshots", None, true),
        op(M::DELETE, "?force=true", None, true),
        on_stopped(op(M::POST, "/unregister", None, true)),
    ]
}

/// Delete a VM made for one call (through the orchestrator, which forgets it too), and
/// the clone a clone call made.
async fn remove(f: &Fixture, root: &Auth, id: &str) {
    let (st, v) = call(&f.c, Method::DELETE, &f.s.api(&format!("/orchestrator/machines/{id}")), root, None, &[]).await;
    assert!(st == 202 || st == 404, "delete {id}: {st} {v}");
    let (st, v) = call(&f.c, Method::DELETE, &f.s.api("/machines/copy?force=true"), root, None, &[]).await;
    assert!(st == 202 || st == 404, "delete the clone: {st} {v}");
}

async fn send(f: &Fixture, who: &Auth, base: &str, id: &str, sid: &str, o: &Op) -> (u16, Value) {
    let rest = o.rest.replace("{sid}", sid);
    let url = f.s.api(&format!("{base}/{id}{rest}"));
    call(&f.c, o.method.clone(), &url, who, o.body.clone(), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vm_operation_answers_the_same_on_the_host_and_through_the_orchestrator() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(&dir.path().join("prl"));
    // Room for the VMs below, bob's own beside alice's.
    fake.size(32, 65536);
    let uploads = dir.path().join("uploads");
    std::fs::create_dir_all(&uploads).unwrap();
    let upload_file = uploads.join("in.txt");
    std::fs::write(&upload_file, "hello").unwrap();
    let s = fake.server(
        &dir.path().join("data"),
        &[
            ("ENABLED_MODULES", "api,host,orchestrator"),
            ("HOST_UPLOAD_FOLDER", uploads.to_str().unwrap()),
            ("SYSTEM_RESERVED_CPU", "0"),
            ("SYSTEM_RESERVED_MEMORY", "0"),
        ],
    );
    let c = client();
    let root_token = login(&c, &s, "root", ROOT_PASSWORD).await;
    let root = Auth::Bearer(root_token.clone());
    let body = json!({"name": "self", "url": s.url, "authentication": {"username": "root", "password": ROOT_PASSWORD}});
    let (st, h) = call(&c, Method::POST, &s.api("/orchestrator/hosts"), &root, Some(body), &[]).await;
    assert_eq!(st, 201, "{h}");
    let mut f = Fixture { c, s, host_id: h["id"].as_str().unwrap().to_string() };

    let (alice_id, _) = make_user(&f.c, &f.s, &root_token, "alice").await;
    let (bob_id, _) = make_user(&f.c, &f.s, &root_token, "bob").await;
    let (ops_id, _) = make_user(&f.c, &f.s, &root_token, "ops").await;
    grant(&f, &root, &alice_id, VM_CLAIMS).await;
    grant(&f, &root, &bob_id, VM_CLAIMS).await;
    grant(&f, &root, &ops_id, VM_CLAIMS).await;
    grant(&f, &root, &ops_id, OTHERS_CLAIMS).await;
    // Log in after the grants (a token carries no claims: they are read per request, but
    // make the order plain).
    let alice = Auth::Bearer(login(&f.c, &f.s, "alice", USER_PASSWORD).await);
    let bob_token = login(&f.c, &f.s, "bob", USER_PASSWORD).await;
    let bob = Auth::Bearer(bob_token.clone());
    let ops_token = login(&f.c, &f.s, "ops", USER_PASSWORD).await;
    let ops_user = Auth::Bearer(ops_token.clone());
    // VM events, on the host's stream and the orchestrator's, for the whole test.
    let bob_events = listen(&f.s, &bob_token, "pdfm,orchestrator").await;
    let ops_events = listen(&f.s, &ops_token, "pdfm,orchestrator").await;
    let callers: [(&str, &Auth, bool); 4] = [
        ("owner", &alice, true),
        ("other user", &bob, false),
        ("holder of the claim", &ops_user, true),
        ("SUPER_USER", &root, true),
    ];

    let paths = [
        "/machines".to_string(),
        "/orchestrator/machines".to_string(),
        format!("/orchestrator/hosts/{}/machines", f.host_id),
    ];
    let mut n = 0;
    let (shared, shared_sid) = fresh_vm(&f, &alice, &root, n, true).await;
    let mut report = Vec::new();
    for o in ops(upload_file.to_str().unwrap()) {
        for (who, auth, owner_or_allowed) in callers {
            let allowed = owner_or_allowed;
            let mut answers = Vec::new();
            for base in &paths {
                let fresh = (o.changes && allowed) || o.stopped;
                let (id, sid) = if fresh {
                    n += 1;
                    fresh_vm(&f, &alice, &root, n, !o.stopped).await
                } else {
                    (shared.clone(), shared_sid.clone())
                };
                let (st, v) = send(&f, auth, base, &id, &sid, &o).await;
                if fresh {
                    remove(&f, &root, &id).await;
                }
                if allowed {
                    assert!((200..300).contains(&st), "{who} {} {base}/{{id}}{}: {st} {v}", o.method, o.rest);
                } else {
                    assert_eq!(st, 403, "{who} {} {base}/{{id}}{}: {st} {v}", o.method, o.rest);
                    assert!(v["message"].as_str().unwrap_or_default().contains("not yours"), "{v}");
                }
                answers.push(st);
            }
            assert!(answers.windows(2).all(|w| w[0] == w[1]), "{who} {} {}: {answers:?}", o.method, o.rest);
            report.push(format!("{who} {} {}: {}", o.method, o.rest, answers[0]));
        }
    }
    eprintln!("{} calls on {} VMs:\n{}", report.len() * paths.len(), n + 1, report.join("\n"));

    // Lists and creation: a plain user's lists hold its own VMs only (unlike the
    // reference, where LIST_VM shows every VM), the claim's holder sees them all, and a
    // plain user cannot create or register for someone else.
    let listed = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().filter_map(|m| m["ID"].as_str().or(m["id"].as_str()).map(String::from)).collect()
    };
    for base in &paths {
        let (st, v) = call(&f.c, Method::GET, &f.s.api(base), &bob, None, &[]).await;
        assert_eq!(st, 200, "{base}: {v}");
        assert!(!listed(&v).contains(&shared), "bob's {base} shows alice's VM: {v}");
        for who in [&alice, &ops_user] {
            let (st, v) = call(&f.c, Method::GET, &f.s.api(base), who, None, &[]).await;
            assert_eq!(st, 200, "{base}: {v}");
            assert!(listed(&v).contains(&shared), "{base} lacks alice's VM for its owner or the claim's holder: {v}");
        }
    }
    let (st, v) = call(
        &f.c,
        Method::POST,
        &f.s.api("/orchestrator/machines"),
        &bob,
        Some(json!({"name": "for-alice", "image": "golden.pvm", "owner": "alice"})),
        &[],
    )
    .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(
        &f.c,
        Method::POST,
        &f.s.api("/machines"),
        &bob,
        Some(json!({"name": "for-alice", "image": "golden.pvm", "hangar_owner": "alice"})),
        &[],
    )
    .await;
    assert_eq!(st, 403, "{v}");

    // Register: a bundle registered by bob under owner root is refused and nothing is
    // registered; without an owner it is bob's, and alice cannot touch it.
    fake.prlctl(&["create", "loose", "--distribution", "ubuntu"]);
    fake.prlctl(&["unregister", "loose"]);
    let bundle = fake.state.join("Parallels/loose.pvm");
    let reg = |owner: Option<&str>| {
        let mut b = json!({"path": bundle.to_str().unwrap()});
        if let Some(o) = owner {
            b["owner"] = json!(o);
        }
        b
    };
    let (st, v) = call(&f.c, Method::POST, &f.s.api("/machines/register"), &bob, Some(reg(Some("root"))), &[]).await;
    assert_eq!(st, 403, "{v}");
    let (st, list) = call(&f.c, Method::GET, &f.s.api("/machines"), &root, None, &[]).await;
    assert_eq!(st, 200);
    assert!(!list.to_string().contains("\"loose\""), "a refused register left the VM: {list}");
    let (st, v) = call(&f.c, Method::POST, &f.s.api("/machines/register"), &bob, Some(reg(None)), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["owner"], "bob", "{v}");
    let loose = v["ID"].as_str().unwrap().to_string();
    let (st, v) = call(&f.c, Method::PUT, &f.s.api(&format!("/machines/{loose}/start")), &alice, None, &[]).await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = call(&f.c, Method::PUT, &f.s.api(&format!("/machines/{loose}/start")), &bob, None, &[]).await;
    assert_eq!(st, 200, "{v}");

    // Events: bob hears of his own VMs (the host's state change of his registered VM, the
    // orchestrator's creation of another), never of alice's or of VMs without an owner;
    // the claim's holder hears of alice's.
    let body = json!({"name": "bobs-own", "image": "golden.pvm", "specs": {"cpu": "1", "memory": "256"}});
    let (st, v) = call(&f.c, Method::POST, &f.s.api("/orchestrator/machines"), &bob, Some(body), &[]).await;
    assert!((200..300).contains(&st), "{v}");
    let own = v["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !(vm_ids(&bob_events).contains(&loose) && vm_ids(&bob_events).contains(&own)) {
        assert!(std::time::Instant::now() < deadline, "bob's own VM events did not come: {:?}", vm_ids(&bob_events));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let foreign: Vec<String> = vm_ids(&bob_events).into_iter().filter(|id| *id != loose && *id != own).collect();
    assert!(foreign.is_empty(), "bob heard of VMs not his: {foreign:?}");
    assert!(vm_ids(&ops_events).contains(&shared), "the claim's holder heard nothing of alice's VM");

    // Every allowed change is in the audit log, under the caller.
    let mut text = String::new();
    let mut after = String::new();
    loop {
        let url = f.s.api(&format!("/audit?limit=500&after={after}"));
        let (st, page) = call(&f.c, Method::GET, &url, &root, None, &[]).await;
        assert_eq!(st, 200, "{page}");
        let Some(last) = page.as_array().unwrap().last() else { break };
        after = last["id"].as_str().unwrap().to_string();
        text.push_str(&page.to_string());
    }
    for action in ["vm.stop", "orchestrator.vm.stop", "vm.snapshot.revert", "vm.create", "vm.registered"] {
        assert!(text.contains(&format!("\"{action}\"")), "no {action} in the audit log");
    }
    f.s.stop();
}
