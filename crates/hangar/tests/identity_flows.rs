//! Identity as a user sees it: lockout, revocation that takes effect at once, API keys
//! that carry exactly their owner's permissions, the audit log, the websocket stream.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn lockout_really_blocks_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        &[
            ("BRUTE_FORCE_MAX_LOGIN_ATTEMPTS", "3"),
            ("BRUTE_FORCE_LOCKOUT_DURATION", "2s"),
            ("BRUTE_FORCE_INCREMENTAL_WAIT", "false"),
        ],
    );
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    make_user(&c, &s, &root, "victim").await;
    let url = s.api("/auth/token");
    for i in 0..2 {
        let (st, v) = call(
            &c,
            Method::POST,
            &url,
            &Auth::None,
            Some(json!({"username": "victim", "password": "Wrong-Passw0rd!"})),
            &[],
        )
        .await;
        assert_eq!(st, 401, "attempt {i}: {v}");
    }
    let (st, v) = call(
        &c,
        Method::POST,
        &url,
        &Auth::None,
        Some(json!({"username": "victim", "password": "Wrong-Passw0rd!"})),
        &[],
    )
    .await;
    assert_eq!(st, 429, "third failure locks: {v}");
    assert!(v["message"].as_str().unwrap().contains("locked"), "{v}");
    // The right password does not get in while locked, and the answer says so.
    let (st, v) =
        call(&c, Method::POST, &url, &Auth::None, Some(json!({"username": "victim", "password": USER_PASSWORD})), &[])
            .await;
    assert_eq!(st, 429, "{v}");
    assert!(v["message"].as_str().unwrap().contains("try again"), "{v}");
    // Once the lockout ends, the right password works again.
    let c2 = c.clone();
    wait_for("the lockout to end", Duration::from_secs(15), || {
        let c2 = c2.clone();
        let url = url.clone();
        async move {
            call(
                &c2,
                Method::POST,
                &url,
                &Auth::None,
                Some(json!({"username": "victim", "password": USER_PASSWORD})),
                &[],
            )
            .await
            .0 == 200
        }
    })
    .await;
}

#[tokio::test]
async fn disabled_deleted_or_repassworded_users_lose_their_tokens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let rb = Auth::Bearer(root.clone());
    let (id, tok) = make_user(&c, &s, &root, "alice").await;
    let me = s.api("/auth/me");
    assert_eq!(call(&c, Method::GET, &me, &Auth::Bearer(tok.clone()), None, &[]).await.0, 200);
    // Disable: the token dies; enable: it works again (it was not revoked).
    let (st, _) =
        call(&c, Method::PUT, &s.api(&format!("/auth/users/{id}")), &rb, Some(json!({"disabled": true})), &[]).await;
    assert_eq!(st, 200);
    assert_eq!(call(&c, Method::GET, &me, &Auth::Bearer(tok.clone()), None, &[]).await.0, 401);
    let (st, _) =
        call(&c, Method::PUT, &s.api(&format!("/auth/users/{id}")), &rb, Some(json!({"disabled": false})), &[]).await;
    assert_eq!(st, 200);
    assert_eq!(call(&c, Method::GET, &me, &Auth::Bearer(tok.clone()), None, &[]).await.0, 200);
    // A password change kills older tokens.
    let (st, v) = call(
        &c,
        Method::PUT,
        &s.api("/auth/me/password"),
        &Auth::Bearer(tok.clone()),
        Some(json!({"current_password": USER_PASSWORD, "new_password": "Another-Passw0rd!"})),
        &[],
    )
    .await;
    assert_eq!(st, 204, "{v}");
    assert_eq!(call(&c, Method::GET, &me, &Auth::Bearer(tok.clone()), None, &[]).await.0, 401);
    let tok2 = login(&c, &s, "alice", "Another-Passw0rd!").await;
    assert_eq!(call(&c, Method::GET, &me, &Auth::Bearer(tok2.clone()), None, &[]).await.0, 200);
    // Role changes take effect on the next request, without a new token.
    let users = s.api("/auth/users");
    assert_eq!(call(&c, Method::GET, &users, &Auth::Bearer(tok2.clone()), None, &[]).await.0, 403);
    let (st, _) = call(
        &c,
        Method::POST,
        &s.api(&format!("/auth/users/{id}/claims")),
        &rb,
        Some(json!({"name": "LIST_USER"})),
        &[],
    )
    .await;
    assert_eq!(st, 201);
    assert_eq!(call(&c, Method::GET, &users, &Auth::Bearer(tok2.clone()), None, &[]).await.0, 200);
    // Delete: the token dies.
    let (st, _) = call(&c, Method::DELETE, &s.api(&format!("/auth/users/{id}")), &rb, None, &[]).await;
    assert_eq!(st, 202);
    let (st, v) = call(&c, Method::GET, &me, &Auth::Bearer(tok2), None, &[]).await;
    assert_eq!(st, 401, "{v}");
    // A tampered token is refused.
    let mut bad = root.clone();
    bad.pop();
    bad.push(if root.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(call(&c, Method::GET, &me, &Auth::Bearer(bad), None, &[]).await.0, 401);
    // JWT payload readable by clients: exp, email, uid, roles, claims.
    use base64::Engine;
    let payload = root.split('.').nth(1).unwrap();
    let p: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    for k in ["exp", "iat", "iss", "aud", "email", "uid", "roles", "claims"] {
        assert!(p.get(k).is_some(), "token payload lacks {k}: {p}");
    }
}

#[tokio::test]
async fn api_keys_carry_exactly_their_owners_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (uid, user) = make_user(&c, &s, &root, "bob").await;
    let ub = Auth::Bearer(user.clone());
    let (st, k) = call(&c, Method::POST, &s.api("/auth/api_keys"), &ub, Some(json!({"name": "ci"})), &[]).await;
    assert_eq!(st, 201, "{k}");
    assert_eq!(k["user_id"].as_str(), Some(uid.as_str()));
    let encoded = k["encoded"].as_str().unwrap().to_string();
    let key = Auth::ApiKey(encoded.clone());
    // The secret is never shown again.
    let (_, list) = call(&c, Method::GET, &s.api("/auth/api_keys"), &ub, None, &[]).await;
    assert!(!list.to_string().contains(&encoded) && list[0].get("encoded").is_none(), "{list}");
    assert!(!std::fs::read_to_string(dir.path().join("store/data.json")).unwrap_or_default().contains(&encoded));
    // What bob can do, the key can do; what bob cannot, the key cannot.
    assert_eq!(call(&c, Method::GET, &s.api("/auth/me"), &key, None, &[]).await.1["username"], "bob");
    assert_eq!(call(&c, Method::GET, &s.api("/auth/users"), &key, None, &[]).await.0, 403);
    assert_eq!(call(&c, Method::GET, &s.api("/audit"), &key, None, &[]).await.0, 403);
    // The key cannot mint a key for root either.
    let (_, me_root) = call(&c, Method::GET, &s.api("/auth/me"), &Auth::Bearer(root.clone()), None, &[]).await;
    let (st, v) = call(
        &c,
        Method::POST,
        &s.api("/auth/api_keys"),
        &key,
        Some(json!({"name": "evil", "user_id": me_root["id"]})),
        &[],
    )
    .await;
    assert_eq!(st, 403, "{v}");
    // The key logs in as bob, with bob's claims.
    let (st, t) =
        call(&c, Method::POST, &s.api("/auth/token"), &Auth::None, Some(json!({"api_key": encoded})), &[]).await;
    assert_eq!(st, 200, "{t}");
    let minted = Auth::Bearer(t["token"].as_str().unwrap().to_string());
    assert_eq!(call(&c, Method::GET, &s.api("/auth/users"), &minted, None, &[]).await.0, 403);
    // Bob loses a permission: so does the key. Revoke: key and its tokens stop.
    let (st, _) =
        call(&c, Method::PUT, &s.api(&format!("/auth/api_keys/{}/revoke", k["id"].as_str().unwrap())), &ub, None, &[])
            .await;
    assert_eq!(st, 200);
    assert_eq!(call(&c, Method::GET, &s.api("/auth/me"), &key, None, &[]).await.0, 401);
    assert_eq!(call(&c, Method::GET, &s.api("/auth/me"), &minted, None, &[]).await.0, 401);
    // A garbage key is a 401 with the error body.
    let (st, v) = call(&c, Method::GET, &s.api("/auth/me"), &Auth::ApiKey("not-base64!!".into()), None, &[]).await;
    assert_eq!((st, v["code"].as_u64()), (401, Some(401)));
    // Expired keys do not work.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let (st, k2) =
        call(&c, Method::POST, &s.api("/auth/api_keys"), &ub, Some(json!({"name": "short", "expires_at": soon})), &[])
            .await;
    assert_eq!(st, 201);
    let k2 = Auth::ApiKey(k2["encoded"].as_str().unwrap().to_string());
    assert_eq!(call(&c, Method::GET, &s.api("/auth/me"), &k2, None, &[]).await.0, 200);
    let c2 = c.clone();
    let me = s.api("/auth/me");
    wait_for("the key to expire", Duration::from_secs(10), || {
        let (c2, me, k2) = (c2.clone(), me.clone(), k2.clone());
        async move { call(&c2, Method::GET, &me, &k2, None, &[]).await.0 == 401 }
    })
    .await;
}

#[tokio::test]
async fn audit_log_records_who_did_what_from_where() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let rb = Auth::Bearer(root.clone());
    let (st, _) = call(
        &c,
        Method::POST,
        &s.api("/auth/roles"),
        &rb,
        Some(json!({"name": "builders", "claims": ["LIST_VM"]})),
        &[],
    )
    .await;
    assert_eq!(st, 201);
    let (st, entries) = call(&c, Method::GET, &s.api("/audit?limit=1000"), &rb, None, &[]).await;
    assert_eq!(st, 200);
    let e = entries.as_array().unwrap().iter().find(|e| e["action"] == "role.create").expect("role.create audited");
    assert_eq!(e["username"], "root");
    assert_eq!(e["target_id"], "BUILDERS");
    assert_eq!(e["source_ip"], "127.0.0.1");
    assert!(e["request_id"].as_str().is_some_and(|r| r.len() > 10));
    assert!(!entries.to_string().contains(ROOT_PASSWORD));
}

#[tokio::test]
async fn websocket_streams_auth_events_filtered_by_claims() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (_uid, user) = make_user(&c, &s, &root, "watcher").await;
    let ws_url = s.url.replace("http://", "ws://");
    // The token in the query, as the reference's web UI sends it.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{ws_url}/api/v1/ws/subscribe?event_types=auth,health&authorization={root}"
    ))
    .await
    .expect("root subscribes");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    let hello: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(hello["message"], "CLIENT_SUBSCRIBED");
    // Ping / pong as the reference's load test does it.
    ws.send(Message::Text(json!({"type": "health", "message": "ping"}).to_string().into())).await.unwrap();
    let (st, _) = call(
        &c,
        Method::POST,
        &s.api("/auth/claims"),
        &Auth::Bearer(root.clone()),
        Some(json!({"name": "DEPLOY"})),
        &[],
    )
    .await;
    assert_eq!(st, 201);
    let mut got_pong = false;
    let mut got_claim = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(got_pong && got_claim) {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("events arrive").unwrap().unwrap();
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        for k in ["id", "event_type", "timestamp", "message", "body"] {
            assert!(v.get(k).is_some(), "envelope lacks {k}: {v}");
        }
        got_pong |= v["event_type"] == "health" && v["message"] == "pong";
        got_claim |= v["event_type"] == "auth" && v["message"] == "CLAIM_ADDED" && v["body"]["claim_id"] == "DEPLOY";
    }
    // A plain user may not read auth events, and says so at connect time.
    let r =
        tokio_tungstenite::connect_async(format!("{ws_url}/api/v1/ws/subscribe?event_types=auth&access_token={user}"))
            .await;
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    // Without a token: 401. With a header token: fine.
    match tokio_tungstenite::connect_async(format!("{ws_url}/api/v1/ws/subscribe?event_types=health")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{ws_url}/api/v1/ws/subscribe?event_types=health").into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {user}").parse().unwrap());
    let (mut uws, _) = tokio_tungstenite::connect_async(req).await.expect("user subscribes to health");
    let hello = tokio::time::timeout(Duration::from_secs(10), uws.next()).await.unwrap().unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("CLIENT_SUBSCRIBED"));
}

/// An event stream outlives its login token's expiry (an orchestrator's stream from a host it
/// logged in to must not drop every `JWT_DURATION`), but not its user: at the streams' next
/// credential check, the disabled user's stream closes and the other still delivers events.
#[tokio::test]
async fn an_event_stream_outlives_its_token_but_not_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("JWT_DURATION", "2s")]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (ops_id, ops) = make_super_user(&c, &s, &root, "ops").await;
    let ws_url = s.url.replace("http://", "ws://");
    let subscribe = |token: String| {
        let url = format!("{ws_url}/api/v1/ws/subscribe?event_types=auth&access_token={token}");
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("subscribed");
            let hello = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
            assert!(hello.to_text().unwrap().contains("CLIENT_SUBSCRIBED"));
            ws
        }
    };
    // Root's stream opens first, so its checks come just before the other's.
    let mut kept = subscribe(root.clone()).await;
    let mut cut = subscribe(ops).await;

    expire_then_disable(&c, &s, &root, &ops_id).await;

    // The disabled user's stream closes at its next check (every 5 s).
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(m)) = cut.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the disabled user's stream is still open");
    // Root's stream was checked in the same round, after its token had expired: it still
    // delivers events.
    let rb = Auth::Bearer(login(&c, &s, "root", ROOT_PASSWORD).await);
    let (st, _) = call(&c, Method::POST, &s.api("/auth/claims"), &rb, Some(json!({"name": "AFTER_EXPIRY"})), &[]).await;
    assert_eq!(st, 201);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, kept.next()).await.expect("the event arrives");
        let msg = msg.expect("the stream closed when its token expired").expect("a websocket message");
        assert!(!msg.is_close(), "the stream closed when its token expired: {msg:?}");
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        if v["message"] == "CLAIM_ADDED" && v["body"]["claim_id"] == "AFTER_EXPIRY" {
            break;
        }
    }
}
