//! Test helper for `hangar-store`'s crash and lock tests. Not part of Hangar's interface.
//!
//! * `store-crash-writer write <dir> <run> <writers>`: opens the store (tiny compaction
//!   thresholds, frequent backups) and runs `writers` concurrent writers forever. Each
//!   commit puts `records/<run>-w<writer>-<seq>` and increments the shared counter
//!   `counters/total` under a revision condition, in one batch. Only after `commit` returns
//!   `Ok` does it print `ack <id> <counter value>` (flushed). Prints `ready` once open.
//! * `store-crash-writer hold <dir>`: opens the store, prints `held`, closes it when stdin
//!   reaches end of file.
//! * `store-crash-writer try-open <dir>`: prints `locked` if the store is locked by someone
//!   else, `opened` if it could open it, and the error otherwise.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hangar_store::{Batch, JsonStore, JsonStoreOptions, Store, StoreError};
use serde_json::json;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // If stdout is gone the parent stopped listening; nothing useful to do.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn writer(store: Arc<JsonStore>, run: String, writer: usize) -> Result<(), StoreError> {
    for seq in 0u64.. {
        let id = format!("{run}-w{writer}-{seq}");
        // Values of varying size so frames and compactions differ from run to run.
        let filler = "x".repeat((seq as usize * 37 + writer * 101) % 3000);
        loop {
            let counter = store.get("counters", "total").await?;
            let (condition, next) = match &counter {
                Some(record) => (Some(record.revision), record.value.as_u64().unwrap_or(0) + 1),
                None => (None, 1),
            };
            let mut batch = Batch::new()
                .put("records", &id, json!({"run": run, "writer": writer, "seq": seq, "filler": filler}))
                .put("counters", "total", json!(next));
            batch = match condition {
                Some(revision) => batch.require_revision("counters", "total", revision),
                None => batch.require_absent("counters", "total"),
            };
            match store.commit(batch).await {
                Ok(_) => {
                    say(&format!("ack {id} {next}"));
                    break;
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

async fn write(dir: &str, run: &str, writers: usize) -> ExitCode {
    let options = JsonStoreOptions {
        compact_journal_frames: 25,
        compact_journal_bytes: 64 * 1024,
        backup_interval: Some(Duration::from_millis(150)),
        backup_retention: 3,
        ..JsonStoreOptions::default()
    };
    let store = match JsonStore::open(dir, options).await {
        Ok(store) => Arc::new(store),
        Err(e) => {
            say(&format!("error {e}"));
            return ExitCode::FAILURE;
        }
    };
    say("ready");
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        tasks.spawn(writer(Arc::clone(&store), run.to_string(), w));
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            say(&format!("error {e}"));
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

async fn hold(dir: &str) -> ExitCode {
    let store = match JsonStore::open(dir, JsonStoreOptions::default()).await {
        Ok(store) => store,
        Err(e) => {
            say(&format!("error {e}"));
            return ExitCode::FAILURE;
        }
    };
    say("held");
    let waited = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin())).await;
    drop(waited);
    match store.close().await {
        Ok(()) => {
            say("closed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("error {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn try_open(dir: &str) -> ExitCode {
    match JsonStore::open(dir, JsonStoreOptions::default()).await {
        Ok(store) => {
            say("opened");
            let _ = store.close().await;
            ExitCode::SUCCESS
        }
        Err(StoreError::Locked { .. }) => {
            say("locked");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("error {e}"));
            ExitCode::FAILURE
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["write", dir, run, writers] => match writers.parse() {
            Ok(writers) => write(dir, run, writers).await,
            Err(_) => {
                eprintln!("writers must be a number");
                ExitCode::FAILURE
            }
        },
        ["hold", dir] => hold(dir).await,
        ["try-open", dir] => try_open(dir).await,
        _ => {
            eprintln!("usage: store-crash-writer write <dir> <run> <writers> | hold <dir> | try-open <dir>");
            ExitCode::FAILURE
        }
    }
}
