//! Two replicas of the real binary on one PostgreSQL database (the server
//! `scripts/test-services.sh start` runs; `HANGAR_SKIP_SQL_TESTS=1` skips): both are ready and
//! agree on one leader, which is one of them; after `kill -9` of the leader the other takes
//! the lease over within a lease period and a renewal, with a greater fencing token.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::Value;

fn admin_url() -> Option<String> {
    if std::env::var("HANGAR_SKIP_SQL_TESTS").as_deref() == Ok("1") {
        eprintln!("HANGAR_SKIP_SQL_TESTS=1: skipping a test that needs HANGAR_TEST_POSTGRES_URL");
        return None;
    }
    match std::env::var("HANGAR_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => panic!(
            "HANGAR_TEST_POSTGRES_URL is not set: start the test databases with `scripts/test-services.sh start` and \
             `eval \"$(scripts/test-services.sh env)\"` (or set HANGAR_SKIP_SQL_TESTS=1)"
        ),
    }
}

/// The `leader` block of `/health/system` as root sees it on `s`.
async fn leader_seen(c: &reqwest::Client, s: &Server, token: &str) -> Value {
    let (st, v) = call(c, Method::GET, &s.api("/health/system"), &Auth::Bearer(token.into()), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    v["leader"].clone()
}

/// Waits until `f` holds for what `s` shows, failing after `limit`.
async fn wait_leader(
    c: &reqwest::Client,
    s: &Server,
    token: &str,
    limit: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let seen = leader_seen(c, s, token).await;
        if f(&seen) {
            return seen;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}: {seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_replicas_on_postgres_agree_on_one_leader_and_the_other_takes_over_after_kill_9() {
    let Some(admin) = admin_url() else { return };
    let url = hangar_store_sql::testing::create_database(&admin, "hangar_lease").await.expect("a fresh database");
    let env = [("DATABASE_URL", url.as_str())];
    let c = client();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // One after the other: the first seeds the users.
    let a = Server::start_full(dir_a.path(), &[], true, &env);
    let token_a = login(&c, &a, "root", ROOT_PASSWORD).await;
    let b = Server::start_full(dir_b.path(), &[], true, &env);
    let token_b = login(&c, &b, "root", ROOT_PASSWORD).await;
    for s in [&a, &b] {
        let (st, v) = call(&c, Method::GET, &s.api("/health/ready"), &Auth::None, None, &[]).await;
        assert_eq!(st, 200, "{v}");
    }

    let limit = Duration::from_secs(20);
    let led = |v: &Value| v["leader"].is_string();
    let seen_a = wait_leader(&c, &a, &token_a, limit, "a leader on A", led).await;
    let leader = seen_a["leader"].clone();
    let seen_b = wait_leader(&c, &b, &token_b, limit, "B to see A's leader", |v| v["leader"] == leader).await;
    let leaders = [&seen_a, &seen_b].iter().filter(|v| v["leader"] == v["replica"]).count();
    assert_eq!(leaders, 1, "exactly one replica leads: {seen_a} {seen_b}");
    assert_eq!(seen_a["token"], seen_b["token"]);

    // kill -9 the leader: the other takes over within a lease period (6 s) and a renewal.
    let (mut dead, survivor, token, before) =
        if seen_a["leader"] == seen_a["replica"] { (a, b, token_b, seen_b) } else { (b, a, token_a, seen_a) };
    let killed = Instant::now();
    dead.kill9();
    let after =
        wait_leader(&c, &survivor, &token, limit, "the survivor to lead", |v| v["leader"] == v["replica"]).await;
    assert!(killed.elapsed() < Duration::from_secs(10), "take-over took {:?}", killed.elapsed());
    assert!(after["token"].as_u64().unwrap() > before["token"].as_u64().unwrap(), "{before} then {after}");
    let (st, _) = call(&c, Method::GET, &survivor.api("/health/ready"), &Auth::None, None, &[]).await;
    assert_eq!(st, 200);
}
