//! The JSON engine passes the store conformance suite, plain and encrypted.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use hangar_store::conformance::{self, StoreFuture};
use hangar_store::{EncryptionKey, JsonStore, JsonStoreOptions, Store};
use tempfile::TempDir;

fn factory(options: JsonStoreOptions) -> (Arc<Mutex<Vec<TempDir>>>, impl Fn() -> StoreFuture) {
    let dirs = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&dirs);
    let make = move || -> StoreFuture {
        let keep = Arc::clone(&keep);
        let options = options.clone();
        Box::pin(async move {
            let dir = tempfile::tempdir().unwrap();
            let store = JsonStore::open(dir.path(), options).await.unwrap();
            keep.lock().unwrap().push(dir);
            Arc::new(store) as Arc<dyn Store>
        })
    };
    (dirs, make)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_engine_passes_conformance() {
    let (_dirs, make) = factory(JsonStoreOptions::default());
    conformance::run_all(make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_json_engine_passes_conformance() {
    // Small compaction thresholds so the suite also runs across compactions.
    let options = JsonStoreOptions {
        encryption_key: Some(EncryptionKey::generate().unwrap()),
        compact_journal_frames: 7,
        ..JsonStoreOptions::default()
    };
    let (_dirs, make) = factory(options);
    conformance::run_all(make).await;
}
