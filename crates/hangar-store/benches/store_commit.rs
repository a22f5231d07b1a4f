//! Durable commit throughput and latency of the JSON engine.
//!
//! `cargo bench -p hangar-store` opens a fresh store under the target directory (on the
//! real disk, not tmpfs), preloads 10,000 records, then measures durable commits (each one
//! fsynced before it is acknowledged) with one writer and with 16 concurrent writers sharing
//! group commits, plain and encrypted. Default compaction thresholds apply, so compaction
//! stalls show in p99.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_store::{Batch, EncryptionKey, JsonStore, JsonStoreOptions, Store};
use serde_json::json;

const PRELOAD: usize = 10_000;
const BUDGET: Duration = Duration::from_secs(4);
const MAX_COMMITS: usize = 20_000;

fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (_, mount, fs) = (parts.next()?, parts.next()?, parts.next()?);
            path.starts_with(mount).then(|| (mount.len(), format!("{fs} ({mount})")))
        })
        .max()
        .map(|(_, fs)| fs)
        .unwrap_or_else(|| "unknown".into())
}

fn record(writer: usize, seq: usize) -> serde_json::Value {
    json!({
        "name": format!("vm-{writer}-{seq}"),
        "state": "running",
        "host": "host-17.example.invalid",
        "cpus": 4, "memory_mb": 8192,
        "tags": ["ci", "macos", "arm64"],
        "created_at": "2025-11-25T18:00:00Z",
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Row {
    label: String,
    commits: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn measure(store: Arc<JsonStore>, writers: usize, label: &str) -> Row {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut seq = 0;
            while started.elapsed() < BUDGET && latencies.len() < MAX_COMMITS / writers {
                let batch = Batch::new().put("vms", &format!("bench-{w}-{seq}"), record(w, seq));
                let t = Instant::now();
                if let Err(e) = store.commit(batch).await {
                    panic!("commit failed: {e}");
                }
                latencies.push(t.elapsed());
                seq += 1;
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(latencies) => all.extend(latencies),
            Err(e) => panic!("writer task failed: {e}"),
        }
    }
    let elapsed = started.elapsed();
    all.sort();
    Row {
        label: label.to_string(),
        commits: all.len(),
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

async fn fresh_store(base: &Path, name: &str, key: Option<EncryptionKey>) -> Arc<JsonStore> {
    let options = JsonStoreOptions { encryption_key: key, ..JsonStoreOptions::default() };
    let store = match JsonStore::open(base.join(name), options).await {
        Ok(store) => store,
        Err(e) => panic!("open failed: {e}"),
    };
    for chunk in 0..PRELOAD / 1000 {
        let mut batch = Batch::new();
        for i in 0..1000 {
            let n = chunk * 1000 + i;
            batch = batch.put("vms", &format!("preload-{n:05}"), record(999, n));
        }
        if let Err(e) = store.commit(batch).await {
            panic!("preload failed: {e}");
        }
    }
    Arc::new(store)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too. Nothing to parse.
    let base = match tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")) {
        Ok(dir) => dir,
        Err(e) => panic!("cannot make a temp dir: {e}"),
    };
    println!("JSON store durable commits; data folder on {}", filesystem_of(base.path()));
    println!("{PRELOAD} records preloaded; each commit puts one ~250-byte record; budget {BUDGET:?} per row");
    let mut rows = Vec::new();
    for (encrypted, tag) in [(false, "plain"), (true, "AES-256-GCM")] {
        for writers in [1usize, 16] {
            let key = if encrypted {
                match EncryptionKey::generate() {
                    Ok(key) => Some(key),
                    Err(e) => panic!("key: {e}"),
                }
            } else {
                None
            };
            let store = fresh_store(base.path(), &format!("{tag}-{writers}"), key).await;
            let label = format!("{tag}, {writers} writer{}", if writers == 1 { "" } else { "s" });
            rows.push(measure(Arc::clone(&store), writers, &label).await);
            if let Err(e) = store.close().await {
                panic!("close failed: {e}");
            }
        }
    }
    println!();
    println!("| {:<24} | {:>8} | {:>10} | {:>10} | {:>10} |", "case", "commits", "commits/s", "p50", "p99");
    println!("|{:-<26}|{:->10}|{:->12}|{:->12}|{:->12}|", "", "", "", "", "");
    for row in rows {
        println!(
            "| {:<24} | {:>8} | {:>10.0} | {:>10} | {:>10} |",
            row.label,
            row.commits,
            row.per_sec,
            ms(row.p50),
            ms(row.p99)
        );
    }
}
