//! The reference's log, event-stream and per-user config routes (issue 13): `/logs`,
//! `/logs/stream`, `system_logs` events, `/ws/clients`, `/ws/stats`, `/ws/unsubscribe`,
//! `/user/configs`, `LOG_TO_FILE`, and the per-host `/orchestrator/hosts/{id}/logs`. Each test
//! runs the real binary on loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `GET /logs` as plain text, with its status.
async fn logs(c: &reqwest::Client, url: &str, token: &str) -> (u16, String) {
    let r = c.get(url).bearer_auth(token).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.text().await.unwrap())
}

/// Open a websocket at `path` (API-relative, may carry a query) with a bearer header; the
/// handshake's status on refusal.
async fn ws(s: &Server, path: &str, token: &str) -> Result<Ws, u16> {
    let url = format!("{}/api/v1{}", s.url.replacen("http", "ws", 1), path);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    match tokio::time::timeout(Duration::from_secs(30), tokio_tungstenite::connect_async(req)).await.unwrap() {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket {path}: {e}"),
    }
}

/// Read text messages until one satisfies `f` (deadline 20 s); that message.
async fn read_until(ws: &mut Ws, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(m))) => {
                if let Ok(t) = m.to_text()
                    && f(t)
                {
                    return t.to_string();
                }
            }
            Ok(other) => panic!("stream ended waiting for {what}: {other:?}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// An event stream of `types`; its client id (from the first event).
async fn subscribe(s: &Server, token: &str, types: &str) -> (Ws, String) {
    let mut w = ws(s, &format!("/ws/subscribe?event_types={types}"), token).await.expect("subscribe");
    let hello = read_until(&mut w, "CLIENT_SUBSCRIBED", |t| t.contains("CLIENT_SUBSCRIBED")).await;
    let v: Value = serde_json::from_str(&hello).unwrap();
    (w, v["body"]["client_id"].as_str().unwrap().to_string())
}

/// A request whose path (a 404) is a marker that then shows in the log.
async fn mark(c: &reqwest::Client, s: &Server, token: &str) -> String {
    let marker = format!("log-marker-{}", uuid_like());
    let r = c.get(s.api(&format!("/{marker}"))).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    marker
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
async fn logs_show_recent_requests_to_super_users_only_and_never_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (_, user) = make_user(&c, &s, &root, "plain").await;
    // A token in a query string (the UI's websocket) must not reach the log either.
    let url =
        format!("{}/api/v1/ws/subscribe?event_types=global&authorization={user}", s.url.replacen("http", "ws", 1));
    let (mut w, _) = tokio_tungstenite::connect_async(url).await.expect("subscribe with a query token");
    read_until(&mut w, "CLIENT_SUBSCRIBED", |t| t.contains("CLIENT_SUBSCRIBED")).await;
    let _ = w.close(None).await;
    let marker = mark(&c, &s, &root).await;
    let url = s.api("/logs");
    wait_for("the marker request in /logs", Duration::from_secs(20), || async {
        let (st, t) = logs(&c, &url, &root).await;
        assert_eq!(st, 200, "{t}");
        t.contains(&marker)
    })
    .await;
    let text = logs(&c, &url, &root).await.1;
    assert!(text.contains("request done"), "request lines are there: {text}");
    for secret in [ROOT_PASSWORD, USER_PASSWORD, root.as_str(), user.as_str()] {
        assert!(!text.contains(secret), "the log holds a secret: {secret}");
    }
    let (st, t) = logs(&c, &format!("{url}?lines=1"), &root).await;
    assert_eq!((st, t.lines().count()), (200, 1), "{t}");
    // Only a super user reads logs.
    let (st, body) = logs(&c, &url, &user).await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(c.get(&url).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(ws(&s, "/logs/stream", &user).await.err(), Some(403));
}

#[tokio::test]
async fn log_stream_sends_lines_written_after_subscribing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let mut w = ws(&s, "/logs/stream", &root).await.expect("root streams the log");
    let marker = mark(&c, &s, &root).await;
    let line = read_until(&mut w, "the marker line on /logs/stream", |t| t.contains(&marker)).await;
    assert!(!line.contains(&root), "{line}");
}

#[tokio::test]
async fn system_logs_events_reach_log_readers_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (_, user) = make_user(&c, &s, &root, "plain").await;
    // A plain user may not ask for them...
    assert_eq!(ws(&s, "/ws/subscribe?event_types=system_logs", &user).await.err(), Some(403));
    // ...and a stream of everything else it may read never carries one.
    let (mut theirs, _) = subscribe(&s, &user, "global,health,stats").await;
    let (mut mine, _) = subscribe(&s, &root, "system_logs").await;
    let marker = mark(&c, &s, &root).await;
    let ev = read_until(&mut mine, "a system_logs event with the marker", |t| t.contains(&marker)).await;
    let v: Value = serde_json::from_str(&ev).unwrap();
    assert_eq!((v["event_type"].as_str(), v["message"].as_str()), (Some("system_logs"), Some("System Log")));
    assert!(v["body"]["level"].is_string() && v["body"]["message"].as_str().unwrap().contains(&marker), "{v}");
    // The user's stream: a ping answered after the marker proves every earlier event was read.
    use futures::SinkExt;
    theirs
        .send(tokio_tungstenite::tungstenite::Message::Text(r#"{"type":"health","message":"ping"}"#.into()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, theirs.next()).await.expect("pong").unwrap().unwrap();
        let t = m.to_text().unwrap().to_string();
        assert!(!t.contains("system_logs"), "a plain user got a system_logs event: {t}");
        if t.contains("pong") {
            break;
        }
    }
}

#[tokio::test]
async fn ws_clients_stats_and_unsubscribe_are_per_caller() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (user_id, user) = make_user(&c, &s, &root, "plain").await;
    let (_theirs, their_id) = subscribe(&s, &user, "health,stats").await;
    let (_mine, my_id) = subscribe(&s, &root, "health,system_logs").await;
    let (ua, ra) = (Auth::Bearer(user.clone()), Auth::Bearer(root.clone()));

    let (st, v) = call(&c, Method::GET, &s.api("/ws/clients"), &ua, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let ids: Vec<&str> = v.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![their_id.as_str()], "a user sees only its own streams");
    assert_eq!(v[0]["user_id"], user_id.as_str());
    let mut subs: Vec<&str> =
        v[0]["event_subscriptions"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    subs.sort();
    assert_eq!(subs, vec!["global", "health", "stats"]);
    let (st, v) = call(&c, Method::GET, &s.api("/ws/clients"), &ra, None, &[]).await;
    assert_eq!((st, v.as_array().unwrap().len()), (200, 2), "root sees every stream: {v}");

    let (st, v) = call(&c, Method::GET, &s.api("/ws/stats"), &ua, None, &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["total_clients"].as_u64(), v["total_subscriptions"].as_u64()), (Some(2), Some(6)), "{v}");
    assert_eq!((v["type_stats"]["health"].as_u64(), v["type_stats"]["global"].as_u64()), (Some(2), Some(2)));
    assert_eq!(v["clients"].as_array().unwrap().len(), 1, "only the caller's own streams: {v}");
    assert!(v["start_time"].is_string() && v["uptime"].is_string() && v["messages_sent"].is_u64());

    // Another user's stream is not the caller's to change.
    let body = json!({"client_id": my_id, "event_types": ["health"]});
    let (st, v) = call(&c, Method::POST, &s.api("/ws/unsubscribe"), &ua, Some(body), &[]).await;
    assert_eq!(st, 404, "{v}");
    let body = json!({"client_id": their_id, "event_types": ["stats"]});
    let (st, v) = call(&c, Method::POST, &s.api("/ws/unsubscribe"), &ua, Some(body), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({"client_id": their_id, "subscriptions": ["global", "health"]}));
    // Nothing left to drop, an unknown type, no types: 400.
    for types in [json!(["stats"]), json!(["nope"]), json!([]), json!(["global"])] {
        let body = json!({"client_id": their_id, "event_types": types});
        let (st, v) = call(&c, Method::POST, &s.api("/ws/unsubscribe"), &ua, Some(body), &[]).await;
        assert_eq!(st, 400, "{types}: {v}");
    }
    // A super user may change any stream.
    let body = json!({"client_id": their_id, "event_types": ["health"]});
    let (st, v) = call(&c, Method::POST, &s.api("/ws/unsubscribe"), &ra, Some(body), &[]).await;
    assert_eq!((st, v["subscriptions"].clone()), (200, json!(["global"])), "{v}");
    let (_, v) = call(&c, Method::GET, &s.api("/ws/clients"), &ua, None, &[]).await;
    assert_eq!(v[0]["event_subscriptions"], json!(["global"]));
}

#[tokio::test]
async fn user_configs_are_typed_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("ENABLED_MODULES", "api")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (a_id, a) = make_user(&c, &s, &root, "alice").await;
    let (_, b) = make_user(&c, &s, &root, "bob").await;
    let (a, b) = (Auth::Bearer(a), Auth::Bearer(b));
    let url = s.api("/user/configs");

    let body = json!({"slug": "dark_mode", "name": "Dark mode", "type": "bool", "value": "true"});
    let (st, made) = call(&c, Method::POST, &url, &a, Some(body), &[]).await;
    assert_eq!(st, 201, "{made}");
    assert_eq!(
        (made["user_id"].as_str(), made["type"].as_str(), made["value"].as_str()),
        (Some(a_id.as_str()), Some("bool"), Some("true"))
    );
    let id = made["id"].as_str().unwrap().to_string();
    // The same slug again replaces it (the reference's upsert).
    let body = json!({"slug": "dark_mode", "name": "Dark mode", "type": "bool", "value": "false"});
    let (st, v) = call(&c, Method::POST, &url, &a, Some(body), &[]).await;
    assert_eq!((st, v["id"].as_str(), v["value"].as_str()), (200, Some(id.as_str()), Some("false")), "{v}");
    // Values are checked against their type; nothing is written on refusal.
    for body in [
        json!({"slug": "x", "name": "X", "type": "bool", "value": "maybe"}),
        json!({"slug": "x", "name": "X", "type": "int", "value": "4.5"}),
        json!({"slug": "x", "name": "X", "type": "json", "value": "{"}),
        json!({"slug": "x", "name": "X", "type": "float", "value": "1"}),
        json!({"slug": "", "name": "X", "value": "1"}),
        json!({"slug": "x", "name": "", "value": "1"}),
    ] {
        let (st, v) = call(&c, Method::POST, &url, &a, Some(body.clone()), &[]).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["code"], 400);
    }
    let (st, v) = call(&c, Method::PUT, &format!("{url}/{id}"), &a, Some(json!({"value": "yes"})), &[]).await;
    assert_eq!(st, 400, "a bool config keeps a bool value: {v}");
    let (st, v) =
        call(&c, Method::PUT, &format!("{url}/dark_mode"), &a, Some(json!({"value": "true", "name": "Dark"})), &[])
            .await;
    assert_eq!((st, v["value"].as_str(), v["name"].as_str()), (200, Some("true"), Some("Dark")), "{v}");
    let body = json!({"slug": "layout", "name": "Layout", "type": "json", "value": "{\"cols\":3}"});
    assert_eq!(call(&c, Method::POST, &url, &a, Some(body), &[]).await.0, 201);

    let (st, v) = call(&c, Method::GET, &url, &a, None, &[]).await;
    let slugs: Vec<&str> = v.as_array().unwrap().iter().map(|c| c["slug"].as_str().unwrap()).collect();
    assert_eq!((st, slugs), (200, vec!["dark_mode", "layout"]));
    let (st, v) = call(&c, Method::GET, &format!("{url}/{id}"), &a, None, &[]).await;
    assert_eq!((st, v["slug"].as_str()), (200, Some("dark_mode")));

    // Bob sees, reads and deletes none of Alice's configs, by id or slug.
    let (st, v) = call(&c, Method::GET, &url, &b, None, &[]).await;
    assert_eq!((st, v), (200, json!([])));
    for path in [format!("{url}/{id}"), format!("{url}/dark_mode")] {
        assert_eq!(call(&c, Method::GET, &path, &b, None, &[]).await.0, 404, "{path}");
        assert_eq!(call(&c, Method::DELETE, &path, &b, None, &[]).await.0, 404, "{path}");
    }
    // Bob's own config with the same slug is his, and Alice's is untouched.
    let body = json!({"slug": "dark_mode", "name": "Mine", "type": "string", "value": "sometimes"});
    assert_eq!(call(&c, Method::POST, &url, &b, Some(body), &[]).await.0, 201);
    let (_, v) = call(&c, Method::GET, &format!("{url}/dark_mode"), &a, None, &[]).await;
    assert_eq!((v["value"].as_str(), v["name"].as_str()), (Some("true"), Some("Dark")));

    let (st, _) = call(&c, Method::DELETE, &format!("{url}/{id}"), &a, None, &[]).await;
    assert_eq!(st, 202);
    assert_eq!(call(&c, Method::GET, &format!("{url}/{id}"), &a, None, &[]).await.0, 404);
    assert_eq!(call(&c, Method::GET, &format!("{url}/dark_mode"), &b, None, &[]).await.0, 200);

    // Every change is in the audit log.
    let (st, v) = call(&c, Method::GET, &s.api("/audit"), &Auth::Bearer(root), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let text = v.to_string();
    for action in ["user_config.create", "user_config.update", "user_config.delete"] {
        assert!(text.contains(action), "audit lacks {action}");
    }
    assert_eq!(call(&c, Method::GET, &url, &Auth::None, None, &[]).await.0, 401);
}

#[tokio::test]
async fn log_to_file_writes_hangar_log_in_the_folder_given() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("logs");
    let s = Server::start(
        &dir.path().join("data"),
        &[("ENABLED_MODULES", "api"), ("LOG_TO_FILE", "true"), ("LOG_FILE_PATH", folder.to_str().unwrap())],
    );
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let marker = mark(&c, &s, &root).await;
    let file = folder.join("hangar.log");
    wait_for("the marker in hangar.log", Duration::from_secs(20), || async {
        std::fs::read_to_string(&file).unwrap_or_default().contains(&marker)
    })
    .await;
    let (st, text) = logs(&c, &s.api("/logs"), &root).await;
    assert!(st == 200 && text.contains(&marker), "{st}: {text}");
    let content = std::fs::read_to_string(&file).unwrap();
    assert!(!content.contains(ROOT_PASSWORD) && !content.contains(&root));

    // The reference's names work too.
    let dir2 = tempfile::tempdir().unwrap();
    let folder2 = dir2.path().join("ref-logs");
    let s2 = Server::start_full(
        &dir2.path().join("data"),
        &[("ENABLED_MODULES", "api")],
        true,
        &[("PRL_DEVOPS_LOG_TO_FILE", "true"), ("PRL_DEVOPS_LOG_FILE_PATH", folder2.to_str().unwrap())],
    );
    let root2 = login(&c, &s2, "root", ROOT_PASSWORD).await;
    let marker = mark(&c, &s2, &root2).await;
    let file2 = folder2.join("hangar.log");
    wait_for("the marker in the reference-named hangar.log", Duration::from_secs(20), || async {
        std::fs::read_to_string(&file2).unwrap_or_default().contains(&marker)
    })
    .await;
}

#[tokio::test]
async fn host_logs_and_stats_reach_the_orchestrator() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let OneHostFleet { fake: _, agent, orch, root } = one_host_fleet(&c, dir.path(), "api,orchestrator").await;
    // The host's own stats events, and the orchestrator's HOST_STATS_UPDATE for them.
    let (mut events, _) = subscribe(&orch, &root, "orchestrator").await;
    let ev = read_until(&mut events, "HOST_STATS_UPDATE", |t| t.contains("HOST_STATS_UPDATE")).await;
    let v: Value = serde_json::from_str(&ev).unwrap();
    assert_eq!(v["event_type"], "orchestrator");
    assert!(v["body"]["host_id"].is_string(), "{v}");
    let hw = &v["body"]["stats"]["hardware"];
    assert!(hw["total_cpu"].as_u64().unwrap() > 0 && hw["available_memory_mb"].is_u64(), "{v}");
    let agent_root = login(&c, &agent, "root", ROOT_PASSWORD).await;
    let (mut own, _) = subscribe(&agent, &agent_root, "stats").await;
    let ev = read_until(&mut own, "System Stats", |t| t.contains("System Stats")).await;
    let v: Value = serde_json::from_str(&ev).unwrap();
    assert_eq!(v["event_type"], "stats");
    assert!(v["body"]["memory_bytes"].as_u64().unwrap() > 0 && v["body"]["cpu_percent"].is_number(), "{v}");
    let (st, hosts) =
        call(&c, Method::GET, &orch.api("/orchestrator/hosts"), &Auth::Bearer(root.clone()), None, &[]).await;
    assert_eq!(st, 200, "{hosts}");
    let host_id = hosts[0]["id"].as_str().unwrap().to_string();
    let marker = mark(&c, &agent, &agent_root).await;
    let url = orch.api(&format!("/orchestrator/hosts/{host_id}/logs"));
    let (st, text) = logs(&c, &url, &root).await;
    assert_eq!(st, 200, "{text}");
    assert!(text.contains(&marker), "the host's own line is there: {text}");
    assert!(!text.contains(ROOT_PASSWORD) && !text.contains(&agent_root));
    // The live form: a line the host logs after the stream opened comes through.
    let mut w = ws(&orch, &format!("/orchestrator/hosts/{host_id}/logs/stream"), &root).await.expect("host log stream");
    // The relay is open once the host's own stream is; a line logged now may race its
    // subscription, so mark until one arrives (each mark is a new request line).
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        assert!(Instant::now() < deadline, "no host log line came through the orchestrator");
        let marker = mark(&c, &agent, &agent_root).await;
        match tokio::time::timeout(Duration::from_secs(2), async {
            read_until(&mut w, "the marker from the host", |t| t.contains(&marker)).await
        })
        .await
        {
            Ok(line) => break line,
            Err(_) => continue,
        }
    };
    assert!(!got.contains(&agent_root) && !got.contains(ROOT_PASSWORD));
    let (_, user) = make_user(&c, &orch, &root, "plain").await;
    assert_eq!(logs(&c, &url, &user).await.0, 403);
    assert_eq!(ws(&orch, &format!("/orchestrator/hosts/{host_id}/logs/stream"), &user).await.err(), Some(403));
    assert_eq!(ws(&orch, "/orchestrator/hosts/no-such-host/logs/stream", &root).await.err(), Some(404));
    let (st, v) = logs(&c, &orch.api("/orchestrator/hosts/no-such-host/logs"), &root).await;
    assert_eq!(st, 404, "{v}");
}
