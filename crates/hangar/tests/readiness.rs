//! Readiness and leadership on the real binary: `/health/ready` is open and says only
//! whether the replica is ready and which checks passed; `/health/system` names the leader
//! for callers that see its detail; a single server on the JSON engine leads at once at
//! every start, with a fencing token that grows from one start to the next, and after
//! `kill -9` too (the data folder's lock says no other process can hold the lease).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// The leader as `/health/system` shows it to root, once the lease was taken.
async fn leader(c: &reqwest::Client, s: &Server, token: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (st, v) = call(c, Method::GET, &s.api("/health/system"), &Auth::Bearer(token.into()), None, &[]).await;
        assert_eq!(st, 200, "{v}");
        if v["leader"]["leader"].is_string() {
            return v["leader"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no leader shown: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn ready_is_open_and_terse_and_a_single_server_leads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[]);
    let c = client();
    let (st, v) = call(&c, Method::GET, &s.api("/health/ready"), &Auth::None, None, &[]).await;
    assert_eq!((st, v.clone()), (200, json!({"ready": true, "checks": {"migrations": true, "store": true}})));
    // Anonymous callers of /health/system get no leader.
    let (st, v) = call(&c, Method::GET, &s.api("/health/system"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200);
    assert!(v.get("leader").is_none(), "{v}");
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let first = leader(&c, &s, &root).await;
    assert_eq!(first["leader"], first["replica"], "the only server leads: {first}");
    let token = first["token"].as_u64().unwrap();

    // A clean stop releases the lease; the next start takes it with a greater token.
    assert!(s.stop().success());
    let mut s = Server::start(dir.path(), &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let second = leader(&c, &s, &root).await;
    assert_eq!(second["leader"], second["replica"], "{second}");
    assert_ne!(second["replica"], first["replica"], "every start is a new replica id");
    assert!(second["token"].as_u64().unwrap() > token, "{first} then {second}");

    // After kill -9 the lease still names the dead process: taken over at once all the same.
    s.kill9();
    let s = Server::start(dir.path(), &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let third = leader(&c, &s, &root).await;
    assert_eq!(third["leader"], third["replica"], "{third}");
    assert!(third["token"].as_u64().unwrap() > second["token"].as_u64().unwrap(), "{second} then {third}");
    let (st, _) = call(&c, Method::GET, &s.api("/health/ready"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200);
}
