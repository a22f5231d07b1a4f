//! Three replicas of the real binary (api + orchestrator) on one PostgreSQL database (the
//! server `scripts/test-services.sh start` runs; `HANGAR_SKIP_SQL_TESTS=1` skips) and two
//! host agents on the fake Parallels driver, all on loopback:
//!
//! * the three start together on the empty database (seeding is idempotent across replicas);
//! * hosts registered on one replica are healthy on every replica;
//! * 50 concurrent creates sent round-robin to the three replicas against room for 20 give
//!   exactly 20 VMs (the rest answer 503, no capacity), every replica lists exactly those VMs,
//!   and the hosts hold exactly those;
//! * kill -9 of the leader moves the lease to another replica within 10 s, every
//!   acknowledged create is still listed, and no host shows unhealthy on the survivors
//!   meanwhile.
//!
//! The same runs with two replicas on MariaDB (`HANGAR_TEST_MYSQL_URL`), without the pause.
//! A last test restarts a PostgreSQL server of its own under two replicas: they go not-ready
//! and come back by themselves.
//!
//! Room: each agent offers its CPUs (`SYSTEM_RESERVED_CPU=0`) and each VM takes one; the fake
//! hosts are given 11 and 10 CPUs (`FakeParallels::size`, what their `sysctl` answers), and
//! a short-lived VM takes one, so the 50 creates meet room for exactly 20.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const JWT_SECRET: &str = "replicas-test-hmac-secret-0123456789-abcdefghij";

use hangar_store_sql::testing::admin_url;

/// The keys every replica must share (as the Helm chart's Secret gives each pod).
fn shared_secrets(dirs: &[&Path]) {
    use std::os::unix::fs::PermissionsExt;
    for name in ["api-key-pepper.key", "orchestrator-hosts.key", "catalog-providers.key"] {
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
        for d in dirs {
            let s = d.join("secrets");
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join(name), bytes).unwrap();
            std::fs::set_permissions(s.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

async fn get(c: &reqwest::Client, s: &Server, token: &str, path: &str) -> Value {
    let (st, v) = call(c, Method::GET, &s.api(path), &Auth::Bearer(token.into()), None, &[]).await;
    assert_eq!(st, 200, "GET {path}: {v}");
    v
}

/// Waits until `f` holds, failing after `limit` with what was last seen.
async fn until<F, Fut>(what: &str, limit: Duration, mut f: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, Value)>,
{
    let start = Instant::now();
    loop {
        let (ok, seen) = f().await;
        if ok {
            return seen;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}: {seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A websocket subscription to `types` on `s`, once the server confirmed it.
async fn subscribe(s: &Server, token: &str, types: &str) -> Ws {
    let url = format!("{}/api/v1/ws/subscribe?event_types={types}", s.url.replacen("http", "ws", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("subscribe");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        if m.to_text().is_ok_and(|t| t.contains("CLIENT_SUBSCRIBED")) {
            return ws;
        }
    }
}

/// The `VM_CREATED` events' VM ids read from `ws` until every id of `want` came (deadline
/// 15 s), then for `quiet` more: every id read, duplicates included.
async fn vm_created_ids(ws: &mut Ws, want: &[String], quiet: Duration) -> Vec<String> {
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut quiet_until: Option<Instant> = None;
    loop {
        if quiet_until.is_none() && want.iter().all(|w| got.contains(w)) {
            quiet_until = Some(Instant::now() + quiet);
        }
        let until = quiet_until.unwrap_or(deadline);
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            assert!(quiet_until.is_some(), "not every VM_CREATED came: {got:?} of {want:?}");
            return got;
        }
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(m))) => {
                let Ok(t) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t) else { continue };
                if v["message"] == "VM_CREATED"
                    && let Some(id) = v["body"]["vm_id"].as_str()
                {
                    got.push(id.to_string());
                }
            }
            Ok(other) => panic!("the event stream ended: {other:?}"),
            Err(_) => {}
        }
    }
}

/// The sorted ids of an `/orchestrator/machines` answer.
fn machine_ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        v.as_array().map_or_else(Vec::new, |a| a.iter().filter_map(|m| m["ID"].as_str().map(String::from)).collect());
    ids.sort();
    ids
}

/// Waits up to `limit` for an event `message` on `ws` whose body satisfies `pred`.
async fn event_where(ws: &mut Ws, message: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {message} as wanted within {limit:?}; saw {seen:?}");
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(m))) => {
                let Ok(t) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t) else { continue };
                if v["message"] == message && pred(&v["body"]) {
                    return v;
                }
                seen.push(v["message"].clone());
            }
            Ok(other) => panic!("the event stream ended: {other:?}"),
            Err(_) => {}
        }
    }
}

/// An async create on `s` that waits in the queue (it asks for a tag no host has): its job.
async fn queued_job(c: &reqwest::Client, s: &Server, token: &str, name: &str) -> Value {
    let body = json!({"name": name, "image": "golden.pvm", "architecture": "x86_64", "tags": ["nowhere"],
        "wait_seconds": 600, "specs": {"cpu": "1", "memory": "256"}});
    let (st, v) =
        call(c, Method::POST, &s.api("/orchestrator/machines/async"), &Auth::Bearer(token.into()), Some(body), &[])
            .await;
    assert_eq!(st, 202, "{v}");
    v
}

fn states(hosts: &Value) -> Vec<String> {
    hosts.as_array().map_or_else(Vec::new, |a| {
        a.iter()
            .map(|h| format!("{}={}", h["name"].as_str().unwrap_or("?"), h["state"].as_str().unwrap_or("?")))
            .collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_postgres_place_exactly_and_survive_the_leader() {
    let Some(admin) = admin_url("HANGAR_TEST_POSTGRES_URL") else { return };
    fleet_of_replicas(&admin, 3).await;
}

/// The same with two replicas on MariaDB (the pause is not tried: after the kill one is left).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_mariadb_place_exactly_and_survive_the_leader() {
    let Some(admin) = admin_url("HANGAR_TEST_MYSQL_URL") else { return };
    fleet_of_replicas(&admin, 2).await;
}

async fn fleet_of_replicas(admin: &str, n: usize) {
    let url = hangar_store_sql::testing::create_database(admin, "hangar_replicas").await.expect("a fresh database");
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..n).map(|i| dir.path().join(format!("replica-{i}"))).collect();
    shared_secrets(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    let settings = [
        ("ENABLED_MODULES", "api,orchestrator"),
        ("ORCHESTRATOR_CHECK_INTERVAL", "1s"),
        ("JWT_HMACS_SECRET", JWT_SECRET),
    ];
    let env = [("DATABASE_URL", url.as_str())];
    // All three at once on the empty database.
    let mut replicas: Vec<Option<Server>> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs.iter().map(|d| s.spawn(|| Server::start_full(d, &settings, true, &env))).collect();
        handles.into_iter().map(|h| Some(h.join().unwrap())).collect()
    });
    let c = client();
    let root = login(&c, replicas[0].as_ref().unwrap(), "root", ROOT_PASSWORD).await;
    for r in replicas.iter().flatten() {
        // One key signs for all: the token made on the first works on every replica.
        let v = get(&c, r, &root, "/health/system").await;
        assert!(v["leader"].is_object(), "{v}");
    }

    // Two fake-Parallels hosts of 11 and 10 CPUs (16 GiB each), registered on different
    // replicas: room for 21 one-CPU VMs, one of them the short-lived VM below, so the 50
    // concurrent creates meet room for exactly 20.
    let fakes: Vec<_> = (0..2).map(|i| FakeParallels::new(&dir.path().join(format!("host-{i}")))).collect();
    fakes[0].size(11, 16384);
    fakes[1].size(10, 16384);
    let room = 21;
    let agents: Vec<_> = fakes
        .iter()
        .enumerate()
        .map(|(i, f)| {
            f.agent(
                &dir.path().join(format!("host-{i}/data")),
                &[("SYSTEM_RESERVED_CPU", "0"), ("SYSTEM_RESERVED_MEMORY", "0")],
            )
        })
        .collect();
    for (i, a) in agents.iter().enumerate() {
        let on = replicas[i].as_ref().unwrap();
        let body = json!({"name": format!("host-{i}"), "host": a.url,
            "authentication": {"username": "root", "password": ROOT_PASSWORD}});
        let (st, v) =
            call(&c, Method::POST, &on.api("/orchestrator/hosts"), &Auth::Bearer(root.clone()), Some(body), &[]).await;
        assert_eq!(st, 201, "register host-{i}: {v}");
    }
    for r in replicas.iter().flatten() {
        until("every replica sees both hosts healthy", Duration::from_secs(30), || async {
            let v = get(&c, r, &root, "/orchestrator/hosts").await;
            let ok = v.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|h| h["state"] == "healthy"));
            (ok, v)
        })
        .await;
    }

    // A VM with a short TTL, made before the leader dies: the new leader's reaper deletes it.
    let body = json!({"name": "short-lived", "image": "golden.pvm", "architecture": "x86_64", "ttl_seconds": 15,
        "specs": {"cpu": "1", "memory": "256"}});
    let (st, v) = call(
        &c,
        Method::POST,
        &replicas[n - 1].as_ref().unwrap().api("/orchestrator/machines"),
        &Auth::Bearer(root.clone()),
        Some(body),
        &[],
    )
    .await;
    assert!((200..300).contains(&st), "{v}");
    let short_lived = v["id"].as_str().unwrap().to_string();
    let room = room - 1;

    // Websocket subscribers on every replica, for the orchestrator's events.
    let mut streams = Vec::new();
    for r in replicas.iter().flatten() {
        streams.push(subscribe(r, &root, "orchestrator").await);
    }

    // 50 concurrent creates, round-robin over the three replicas.
    let urls: Vec<String> = replicas.iter().flatten().map(|r| r.api("/orchestrator/machines")).collect();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (c, url, root) = (c.clone(), urls[i % n].clone(), root.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"name": format!("vm-{i}"), "image": "golden.pvm", "architecture": "x86_64",
                "specs": {"cpu": "1", "memory": "256"}});
            let r = c.post(&url).bearer_auth(&root).json(&body).send().await.unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    let mut created = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let (st, v) = t.await.unwrap();
        if (200..300).contains(&st) {
            created.push(v["id"].as_str().unwrap().to_string());
        } else {
            refused.push((st, v));
        }
    }
    if created.len() != 20 {
        // What the replicas and agents said of the failed attempts, for the reader.
        let logs: Vec<String> = replicas
            .iter()
            .flatten()
            .map(|r| r.log())
            .chain(agents.iter().map(|a| a.log()))
            .flat_map(|l| {
                l.lines().filter(|x| x.contains("WARN") || x.contains("ERROR")).map(str::to_string).collect::<Vec<_>>()
            })
            .collect();
        panic!("exactly the room (20) was created, not {}; refused: {refused:?}; warnings: {logs:#?}", created.len());
    }
    assert!(refused.iter().all(|(st, _)| *st == 503), "the rest are refused for room: {refused:?}");
    created.sort();
    // Every replica's subscribers hear of every creation, wherever it was made, once (a
    // second delivery would come within the relay's lookback; a second of quiet is watched).
    for (i, ws) in streams.iter_mut().enumerate() {
        let mut got = vm_created_ids(ws, &created, Duration::from_secs(1)).await;
        // The short-lived VM's event may come relayed after the subscription began.
        got.retain(|id| *id != short_lived);
        got.sort();
        assert_eq!(got, created, "replica {i}: each VM_CREATED exactly once");
    }
    drop(streams);

    // Every replica lists exactly them (a replica learns another's VMs at its next tick).
    for r in replicas.iter().flatten() {
        let (cr, rootr, cre, short) = (&c, &root, &created, &short_lived);
        until("every replica to list exactly the created VMs", Duration::from_secs(5), || async move {
            let v = get(cr, r, rootr, "/orchestrator/machines").await;
            let mut want = cre.clone();
            want.push(short.clone());
            want.sort();
            (machine_ids(&v) == want, json!(machine_ids(&v)))
        })
        .await;
    }
    let mut on_hosts = 0;
    for a in &agents {
        let t = login(&c, a, "root", ROOT_PASSWORD).await;
        on_hosts += get(&c, a, &t, "/machines").await.as_array().unwrap().len();
    }
    assert_eq!(on_hosts, room + 1, "the hosts hold exactly the acknowledged VMs (and the short-lived one)");

    // kill -9 the leader: another replica leads within 10 s; nothing acknowledged is lost and
    // no host shows unhealthy on the survivors meanwhile.
    let seen = get(&c, replicas[0].as_ref().unwrap(), &root, "/health/system").await["leader"].clone();
    let leader_id = seen["leader"].as_str().unwrap().to_string();
    let mut leader_at = None;
    for (i, r) in replicas.iter().enumerate() {
        let v = get(&c, r.as_ref().unwrap(), &root, "/health/system").await;
        if v["leader"]["replica"] == leader_id.as_str() {
            leader_at = Some(i);
        }
    }
    let leader_at = leader_at.unwrap_or_else(|| panic!("the leader {leader_id} is none of the three: {seen}"));
    let token_before = seen["token"].as_u64().unwrap();
    // Async creates waiting in the queue, one on the leader and one on another replica: each
    // job records the replica that runs it.
    let dead_job = queued_job(&c, replicas[leader_at].as_ref().unwrap(), &root, "queued-on-leader").await;
    assert_eq!(dead_job["runner"], leader_id.as_str(), "{dead_job}");
    let live_at = (leader_at + 1) % n;
    let live_job = queued_job(&c, replicas[live_at].as_ref().unwrap(), &root, "queued-elsewhere").await;
    let live_runner =
        get(&c, replicas[live_at].as_ref().unwrap(), &root, "/health/system").await["leader"]["replica"].clone();
    assert_eq!(live_job["runner"], live_runner, "{live_job}");
    // And one that fits any host but finds the fleet full: it waits on a survivor for the
    // room the short-lived VM frees when the new leader's reaper deletes it.
    let body = json!({"name": "queued-for-room", "image": "golden.pvm", "architecture": "x86_64",
        "wait_seconds": 600, "specs": {"cpu": "1", "memory": "256"}});
    let (st, room_job) = call(
        &c,
        Method::POST,
        &replicas[live_at].as_ref().unwrap().api("/orchestrator/machines/async"),
        &Auth::Bearer(root.clone()),
        Some(body),
        &[],
    )
    .await;
    assert_eq!(st, 202, "{room_job}");
    let room_job = room_job["id"].as_str().unwrap().to_string();
    {
        let (cr, rootr, at, id) = (&c, &root, replicas[live_at].as_ref().unwrap(), &room_job);
        until("the room-waiting job to be queued", Duration::from_secs(10), || async move {
            let v = get(cr, at, rootr, &format!("/orchestrator/jobs/{id}")).await;
            (v["state"] == "running" && v["message"].as_str().is_some_and(|m| m.starts_with("queued")), v)
        })
        .await;
    }
    let (dead_job, live_job) =
        (dead_job["id"].as_str().unwrap().to_string(), live_job["id"].as_str().unwrap().to_string());
    let mut dead = replicas[leader_at].take().unwrap();
    let killed = Instant::now();
    dead.kill9();
    let survivors: Vec<&Server> = replicas.iter().flatten().collect();
    let unhealthy = std::sync::Mutex::new(Vec::new());
    let (cr, rootr, sv, un, lid) = (&c, &root, &survivors, &unhealthy, &leader_id);
    let after = until("another replica to lead", Duration::from_secs(15), || async move {
        for s in sv {
            let hosts = get(cr, s, rootr, "/orchestrator/hosts").await;
            if hosts.as_array().unwrap().iter().any(|h| h["state"] == "unhealthy") {
                un.lock().unwrap().push(states(&hosts));
            }
        }
        let v = get(cr, sv[0], rootr, "/health/system").await["leader"].clone();
        let moved = v["leader"].is_string() && v["leader"] != lid.as_str();
        (moved, v)
    })
    .await;
    let mut unhealthy = unhealthy.into_inner().unwrap();
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "the lease moved in {took:?}");
    assert!(after["token"].as_u64().unwrap() > token_before, "{after}");
    // A few more check intervals under the new leader.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(4) {
        for s in &survivors {
            let hosts = get(&c, s, &root, "/orchestrator/hosts").await;
            if hosts.as_array().unwrap().iter().any(|h| h["state"] == "unhealthy") {
                unhealthy.push(states(&hosts));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(unhealthy.is_empty(), "a host showed unhealthy across the change of leader: {unhealthy:?}");
    // Job recovery: the new leader marks the dead leader's job failed once that replica's
    // liveness lease lapsed, and every survivor shows it; the job a live replica runs is
    // left alone.
    for s in &survivors {
        let (cr, rootr, id) = (&c, &root, &dead_job);
        until("the dead leader's job to be marked failed", Duration::from_secs(30), || async move {
            let v = get(cr, s, rootr, &format!("/orchestrator/jobs/{id}")).await;
            let lost = v["error"].as_str().is_some_and(|e| e.contains("replica that ran this job stopped"));
            (v["state"] == "failed" && lost, v)
        })
        .await;
        let v = get(&c, s, &root, &format!("/orchestrator/jobs/{live_job}")).await;
        assert!(v["state"] == "pending" || v["state"] == "running", "a live replica's job is untouched: {v}");
        assert_eq!(v["runner"], live_runner);
    }
    let jobs_recovered = killed.elapsed();
    // The hosts' event streams: the new leader follows them, so a VM's state changed on its
    // host directly (the host user's prlctl) reaches every survivor's VM list and websocket
    // subscribers.
    let mut streams = Vec::new();
    for s in &survivors {
        streams.push(subscribe(s, &root, "orchestrator").await);
    }
    let t0 = login(&c, &agents[0], "root", ROOT_PASSWORD).await;
    let on_host = get(&c, &agents[0], &t0, "/machines").await;
    let vm = on_host
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ID"].as_str().is_some_and(|id| created.iter().any(|c| c == id)))
        .expect("a created VM on host-0")
        .clone();
    let (vm_id, vm_name) = (vm["ID"].as_str().unwrap().to_string(), vm["Name"].as_str().unwrap().to_string());
    let (op, want) = if vm["State"] == "running" { ("stop", "stopped") } else { ("start", "running") };
    let changed = Instant::now();
    fakes[0].prlctl(&[op, &vm_name]);
    for s in &survivors {
        let (cr, rootr, id) = (&c, &root, &vm_id);
        until("the host's change in every survivor's VM list", Duration::from_secs(15), || async move {
            let v = get(cr, s, rootr, "/orchestrator/machines").await;
            let m = v.as_array().unwrap().iter().find(|m| m["ID"] == id.as_str()).cloned().unwrap_or(Value::Null);
            (m["State"] == want, m)
        })
        .await;
    }
    for ws in &mut streams {
        event_where(ws, "VM_STATE_CHANGED", Duration::from_secs(15), |b| {
            b["vm_id"] == vm_id.as_str() && b["current_state"] == want
        })
        .await;
    }
    drop(streams);
    let host_change = changed.elapsed();
    for s in &survivors {
        let v = get(&c, s, &root, "/orchestrator/machines").await;
        let listed = machine_ids(&v);
        assert!(created.iter().all(|id| listed.contains(id)), "no acknowledged create was lost: {listed:?}");
        let (st, _) = call(&c, Method::GET, &s.api("/health/ready"), &Auth::None, None, &[]).await;
        assert_eq!(st, 200);
    }
    // The reaper goes on under the new leader: the short-lived VM goes from every listing.
    let reaped = Instant::now();
    for s in &survivors {
        let (cr, rootr, short) = (&c, &root, &short_lived);
        until("the short-lived VM to be reaped", Duration::from_secs(75), || async move {
            let v = get(cr, s, rootr, "/orchestrator/machines").await;
            (!machine_ids(&v).contains(short), json!(machine_ids(&v)))
        })
        .await;
    }
    let reaped = reaped.elapsed();
    let reaped_at = Instant::now();
    // The queue goes on: the waiting create takes the freed room.
    let room_vm = {
        let (cr, rootr, at, id) = (&c, &root, survivors[0], &room_job);
        until("the queued create to take the freed room", Duration::from_secs(30), || async move {
            let v = get(cr, at, rootr, &format!("/orchestrator/jobs/{id}")).await;
            (v["state"] == "completed", v)
        })
        .await["result"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let queue_went_on = reaped_at.elapsed();
    created.push(room_vm);
    created.sort();
    for s in &survivors {
        let (cr, rootr, cre) = (&c, &root, &created);
        until("every survivor to list the queued create's VM", Duration::from_secs(10), || async move {
            let v = get(cr, s, rootr, "/orchestrator/machines").await;
            (machine_ids(&v) == *cre, json!(machine_ids(&v)))
        })
        .await;
    }

    if survivors.len() < 2 {
        eprintln!(
            "room {}: {} created, {} refused; lease moved in {took:?} after kill -9; the dead leader's job failed \
             {jobs_recovered:?} after it; a host's VM change on every survivor in {host_change:?}; short-lived VM \
             reaped {reaped:?} after the kill; the queued create placed {queue_went_on:?} after that",
            room + 1,
            created.len() - 1,
            refused.len()
        );
        return;
    }
    // A leader paused past its lease (SIGSTOP) loses it to the other survivor; resumed
    // (SIGCONT), it steps down, and nothing it still had under way changes the fleet.
    let v = get(&c, survivors[0], &root, "/health/system").await["leader"].clone();
    let leader_now = v["leader"].as_str().unwrap().to_string();
    let mut paused_at = None;
    for (i, s) in survivors.iter().enumerate() {
        if get(&c, s, &root, "/health/system").await["leader"]["replica"] == leader_now.as_str() {
            paused_at = Some(i);
        }
    }
    let paused_at = paused_at.expect("the new leader is a survivor");
    let (paused, other) = (survivors[paused_at], survivors[1 - paused_at]);
    let pid = paused.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let stopped = Instant::now();
    let taken = until("the other survivor to take the lease from the paused one", Duration::from_secs(20), || async {
        let v = get(&c, other, &root, "/health/system").await["leader"].clone();
        (v["leader"] == v["replica"], v)
    })
    .await;
    let takeover = stopped.elapsed();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let stepped = until("the resumed ex-leader to step down", Duration::from_secs(10), || async {
        let v = get(&c, paused, &root, "/health/system").await["leader"].clone();
        (v["leader"] == taken["leader"] && v["leader"] != v["replica"], v)
    })
    .await;
    assert!(stepped["token"].as_u64().unwrap() > v["token"].as_u64().unwrap(), "{v} then {stepped}");
    // The resumed ex-leader's own view may show what its refused observations said (silence
    // while it was stopped) until its next re-read of the store after stepping down; the
    // store never said so. Then: every VM is still there and every host healthy, on both.
    for s in &survivors {
        until("every host healthy on both survivors", Duration::from_secs(15), || async {
            let hosts = get(&c, s, &root, "/orchestrator/hosts").await;
            (hosts.as_array().unwrap().iter().all(|h| h["state"] == "healthy"), json!(states(&hosts)))
        })
        .await;
    }
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        for s in &survivors {
            let hosts = get(&c, s, &root, "/orchestrator/hosts").await;
            assert!(
                hosts.as_array().unwrap().iter().all(|h| h["state"] == "healthy"),
                "after the pause: {:?}",
                states(&hosts)
            );
            assert_eq!(machine_ids(&get(&c, s, &root, "/orchestrator/machines").await), created);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "room {}: {} created, {} refused; lease moved in {took:?} after kill -9, {takeover:?} after SIGSTOP; the \
         dead leader's job failed {jobs_recovered:?} after the kill; a host's VM change on every survivor in \
         {host_change:?}; short-lived VM reaped {reaped:?} after the kill; the queued create placed \
         {queue_went_on:?} after that",
        room + 1,
        created.len() - 1,
        refused.len()
    );
}

/// A PostgreSQL server of this test's own (so restarting it disturbs no other test), run as
/// the `postgres` user when the test runs as root; stopped on drop.
struct PrivatePostgres {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
}

fn as_pg(bin: &Path, tool: &str) -> std::process::Command {
    let mut cmd;
    if nix_is_root() {
        cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    } else {
        cmd = std::process::Command::new(bin.join(tool));
    }
    cmd
}

fn nix_is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl PrivatePostgres {
    fn start(dir: &Path) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("PostgreSQL's tools (Debian postgresql)");
        std::fs::create_dir_all(dir.join("sock")).unwrap();
        if nix_is_root() {
            assert!(std::process::Command::new("chown").args(["-R", "postgres"]).arg(dir).status().unwrap().success());
            // The test's temporary folder is root's: let postgres through to its own.
            let mut p = dir.parent();
            while let Some(d) = p {
                if d == Path::new("/") {
                    break;
                }
                let _ = std::process::Command::new("chmod").arg("o+x").arg(d).status();
                p = d.parent();
            }
        }
        let st = as_pg(&bin, "initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "initdb");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = PrivatePostgres { bin, dir: dir.to_path_buf(), port };
        pg.ctl("start");
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn ctl(&self, what: &str) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.join("sock").display());
        let st = as_pg(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "-m", "fast", "-o", &opts, what])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "pg_ctl {what}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_pg(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn ready(c: &reqwest::Client, s: &Server) -> u16 {
    match c.get(s.api("/health/ready")).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// The database stops under load (logins and reads on both replicas) and starts again: both
/// replicas answer 503 on /health/ready while it is down and 200 after, serving writes
/// again, without being restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_go_not_ready_while_the_database_restarts_and_come_back() {
    if std::env::var("HANGAR_SKIP_SQL_TESTS").as_deref() == Ok("1") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = PrivatePostgres::start(&dir.path().join("pg"));
    let url = pg.url();
    let dirs: Vec<_> = (0..2).map(|i| dir.path().join(format!("replica-{i}"))).collect();
    shared_secrets(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    let settings = [("ENABLED_MODULES", "api,orchestrator"), ("JWT_HMACS_SECRET", JWT_SECRET)];
    let env = [("DATABASE_URL", url.as_str())];
    let mut replicas: Vec<Server> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs.iter().map(|d| s.spawn(|| Server::start_full(d, &settings, true, &env))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let c = client();
    let root = login(&c, &replicas[0], "root", ROOT_PASSWORD).await;
    for r in &replicas {
        assert_eq!(ready(&c, r).await, 200);
    }
    // Load: every replica is asked for its users and its health all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for r in &replicas {
        let (c, url, root, stop) = (c.clone(), r.api("/auth/users"), root.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.get(&url).bearer_auth(&root).send().await;
                n += 1;
            }
            n
        }));
    }
    pg.ctl("stop");
    let down = Instant::now();
    for r in &replicas {
        until("the replica to go not-ready", Duration::from_secs(10), || async {
            let st = ready(&c, r).await;
            (st == 503, json!(st))
        })
        .await;
    }
    let went = down.elapsed();
    pg.ctl("start");
    let up = Instant::now();
    for r in &replicas {
        until("the replica to be ready again", Duration::from_secs(30), || async {
            let st = ready(&c, r).await;
            (st == 200, json!(st))
        })
        .await;
    }
    let back = up.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut requests = 0;
    for l in load {
        requests += l.await.unwrap();
    }
    // Writes work again on both, and they are the same processes.
    for (i, r) in replicas.iter_mut().enumerate() {
        assert!(r.child.try_wait().unwrap().is_none(), "replica {i} exited");
        let body = json!({"username": format!("after-{i}"), "email": format!("after-{i}@example.test"),
            "password": USER_PASSWORD});
        let (st, v) = call(&c, Method::POST, &r.api("/auth/users"), &Auth::Bearer(root.clone()), Some(body), &[]).await;
        assert_eq!(st, 201, "{v}");
    }
    eprintln!("not ready {went:?} after the stop, ready {back:?} after the start; {requests} requests of load");
}
