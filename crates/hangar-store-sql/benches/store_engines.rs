//! Durable commits on the three engines in one run: JSON (a data folder under the target
//! directory), PostgreSQL and MariaDB (the servers of `scripts/test-services.sh`, whose data
//! folders are on the same disk). `bench/store-engines.sh` starts the servers and runs this.
//!
//! Each engine gets a fresh store with 10,000 records preloaded, then one writer and 16
//! concurrent writers put one ~250-byte record per commit for a fixed time budget. A commit
//! is counted when the engine acknowledged it durably (fsync for JSON; the database's commit,
//! with `synchronous_commit = on` / `innodb_flush_log_at_trx_commit = 1`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_store::{Batch, JsonStore, JsonStoreOptions, Store};
use serde_json::json;

const PRELOAD: usize = 10_000;
const BUDGET: Duration = Duration::from_secs(5);
const MAX_COMMITS: usize = 50_000;

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
    engine: &'static str,
    writers: usize,
    commits: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn preload(store: &dyn Store) {
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
}

async fn measure(store: Arc<dyn Store>, engine: &'static str, writers: usize) -> Row {
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
        engine,
        writers,
        commits: all.len(),
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

fn env_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set: run bench/store-engines.sh, or `scripts/test-services.sh start` and \
             `eval \"$(scripts/test-services.sh env)\"` first"
        ),
    }
}

async fn sql_store(admin: &str, writers: usize) -> Arc<dyn Store> {
    let url = match hangar_store_sql::testing::create_database(admin, "hangar_bench").await {
        Ok(url) => url,
        Err(e) => panic!("cannot create a bench database: {e}"),
    };
    let options = hangar_store_sql::SqlOptions {
        max_connections: u32::try_from(writers).unwrap_or(16).max(2),
        ..Default::default()
    };
    match hangar_store_sql::open(&url, options).await {
        Ok(store) => store,
        Err(e) => panic!("cannot open {}: {e}", hangar_store_sql::redact_url(&url)),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let pg = env_url("HANGAR_TEST_POSTGRES_URL");
    let my = env_url("HANGAR_TEST_MYSQL_URL");
    let base = match tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")) {
        Ok(dir) => dir,
        Err(e) => panic!("cannot make a temp dir: {e}"),
    };
    println!(
        "Durable commits per engine, {PRELOAD} records preloaded, one ~250-byte record per commit, {BUDGET:?} per row"
    );
    let mut rows = Vec::new();
    for writers in [1usize, 16] {
        let json: Arc<dyn Store> =
            match JsonStore::open(base.path().join(format!("json-{writers}")), JsonStoreOptions::default()).await {
                Ok(store) => Arc::new(store),
                Err(e) => panic!("open the JSON store: {e}"),
            };
        for (engine, store) in
            [("json", json), ("postgres", sql_store(&pg, writers).await), ("mariadb", sql_store(&my, writers).await)]
        {
            preload(&*store).await;
            rows.push(measure(Arc::clone(&store), engine, writers).await);
            if let Err(e) = store.close().await {
                panic!("close failed: {e}");
            }
        }
    }
    println!(
        "{:<10} {:>7} {:>9} {:>12} {:>10} {:>10} {:>12}",
        "engine", "writers", "commits", "commits/s", "p50", "p99", "vs json"
    );
    for row in &rows {
        let json = rows.iter().find(|r| r.engine == "json" && r.writers == row.writers).map(|r| r.per_sec);
        let ratio = json.map(|j| format!("{:.2}x", row.per_sec / j)).unwrap_or_default();
        println!(
            "{:<10} {:>7} {:>9} {:>12.0} {:>10} {:>10} {:>12}",
            row.engine,
            row.writers,
            row.commits,
            row.per_sec,
            ms(row.p50),
            ms(row.p99),
            ratio
        );
    }
}
