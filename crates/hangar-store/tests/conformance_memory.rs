//! The in-memory engine passes the store conformance suite, bare and behind a `FaultyStore`
//! with every switch off.

use std::sync::Arc;

use hangar_store::conformance::{self, StoreFuture};
use hangar_store::{FaultyStore, MemoryStore, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_engine_passes_conformance() {
    conformance::run_all(|| -> StoreFuture { Box::pin(async { Arc::new(MemoryStore::new()) as Arc<dyn Store> }) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faulty_store_without_faults_passes_conformance() {
    conformance::run_all(|| -> StoreFuture {
        Box::pin(async { Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()))) as Arc<dyn Store> })
    })
    .await;
}
