//! kill -9 at random moments while concurrent writers run: every acknowledged write is
//! there after the restart, and the store always loads.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let mut s = Server::start(dir.path(), &[]);
        // Everything acknowledged before is still there.
        let root = login(&c, &s, "root", ROOT_PASSWORD).await;
        let (st, list) = call(&c, Method::GET, &s.api("/auth/claims"), &Auth::Bearer(root.clone()), None, &[]).await;
        assert_eq!(st, 200, "round {round}: the store loads: {list}");
        let present: BTreeSet<String> =
            list.as_array().unwrap().iter().filter_map(|c| c["name"].as_str().map(String::from)).collect();
        let missing: Vec<String> = acked.lock().unwrap().difference(&present).cloned().collect();
        assert!(missing.is_empty(), "round {round}: acknowledged writes lost after kill -9: {missing:?}");
        // Concurrent writers, then a kill at a random moment.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..6 {
            let (c, url, root, acked, stop) =
                (c.clone(), s.api("/auth/claims"), root.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("CRASH_R{round}_W{w}_{i}");
                    let r = c.post(&url).bearer_auth(&root).json(&json!({"name": name})).send().await;
                    if let Ok(r) = r
                        && r.status() == 201
                    {
                        acked.lock().unwrap().insert(name);
                    }
                    i += 1;
                }
            }));
        }
        let before = acked.lock().unwrap().len();
        let want = before + 5 + (next() % 60) as usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Kill while writes are in flight, a random moment after the wanted count.
        tokio::time::sleep(Duration::from_micros(next() % 20_000)).await;
        s.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            let _ = w.await;
        }
        assert!(acked.lock().unwrap().len() > before, "round {round}: writers made progress");
    }
    // Final check after the last kill.
    let s = Server::start(dir.path(), &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    let (_, list) = call(&c, Method::GET, &s.api("/auth/claims"), &Auth::Bearer(root), None, &[]).await;
    let present: BTreeSet<String> =
        list.as_array().unwrap().iter().filter_map(|c| c["name"].as_str().map(String::from)).collect();
    let acked = acked.lock().unwrap();
    let missing: Vec<&String> = acked.difference(&present).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    println!("{} acknowledged writes over {ROUNDS} kills, none lost", acked.len());
}
