//! Image push/pull against real stores: the local folder always, moto (S3),
//! Azurite and nginx-dav when their env vars are set
//! (`eval "$(scripts/test-services.sh start)"`).
//!
//! The generated image is ~64 MiB, or ~512 MiB with HANGAR_TEST_BIG_IMAGE=1.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_blobstore::conformance::{TestServer, unique_root};
use hangar_blobstore::{BlobStore, CountingStore, PrefixedStore, local::LocalStore, open_connection_string};
use hangar_image::testimage::{self, DISK};
use hangar_image::{
    CacheLimits, ChunkCache, ImageError, Phase, Progress, PullOptions, PushOptions, progress_channel, pull, push,
};

fn image_size() -> u64 {
    if std::env::var("HANGAR_TEST_BIG_IMAGE").is_ok_and(|v| v == "1") { 512 << 20 } else { 64 << 20 }
}

fn local_store(dir: &Path) -> Arc<dyn BlobStore> {
    Arc::new(LocalStore::new(dir).unwrap())
}

/// Entries of `dir` whose name marks an unfinished pull.
fn partial_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect()
}

/// Waits (with a deadline, no fixed sleeps) until `cond` holds on the
/// latest progress.
async fn wait_progress(rx: &mut tokio::sync::watch::Receiver<Progress>, what: &str, cond: impl Fn(&Progress) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if cond(&rx.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("transfer ended before {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

async fn round_trip(store: Arc<dyn BlobStore>, label: &str) {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("vm.pvm");
    let disk_size = image_size();
    let zero_bytes = testimage::generate(&src, disk_size, 11).unwrap();

    let (progress, mut rx) = progress_channel();
    let pushed = push(
        store.clone(),
        &src,
        "images/vm/v1.json",
        &PushOptions { progress: Some(progress), ..PushOptions::default() },
    )
    .await
    .unwrap_or_else(|e| panic!("{label}: push failed: {e}"));
    let last = *rx.borrow_and_update();
    assert_eq!(last.phase, Phase::Done, "{label}");
    assert!(last.total_known && last.chunks_done == last.chunks_total, "{label}: {last:?}");
    assert_eq!(last.bytes_done, last.bytes_total, "{label}: {last:?}");
    let m = &pushed.manifest;
    println!("{label}: {} of {zero_bytes} zero bytes recorded as holes", m.hole_size);
    assert!(
        m.hole_size * 10 >= zero_bytes * 9,
        "{label}: only {} of {zero_bytes} zero bytes became holes",
        m.hole_size
    );
    assert!(m.stored_size < m.total_size - m.hole_size, "{label}: nothing was compressed");
    assert_eq!(pushed.chunks_uploaded, m.unique_chunks, "{label}: fresh store");

    // The store holds exactly the manifest and the image's chunks.
    let listed = store.list("").await.unwrap();
    let chunks: Vec<_> = listed.iter().filter(|o| o.key.starts_with("chunks/")).collect();
    assert_eq!(chunks.len() as u64, m.unique_chunks, "{label}");
    assert_eq!(chunks.iter().map(|o| o.size).sum::<u64>(), m.stored_size, "{label}");
    assert_eq!(listed.len() as u64, m.unique_chunks + 1, "{label}");

    let cache = Arc::new(ChunkCache::open(work.path().join("cache"), CacheLimits::default()).unwrap());
    let dest = work.path().join("out").join("vm.pvm");
    std::fs::create_dir(work.path().join("out")).unwrap();
    let (progress, mut rx) = progress_channel();
    let pulled = pull(
        store.clone(),
        "images/vm/v1.json",
        &dest,
        &PullOptions { concurrency: 8, cache: Some(cache.clone()), progress: Some(progress) },
    )
    .await
    .unwrap_or_else(|e| panic!("{label}: pull failed: {e}"));
    let last = *rx.borrow_and_update();
    assert_eq!(
        (last.phase, last.bytes_done, last.chunks_done),
        (Phase::Done, m.total_size, m.unique_chunks),
        "{label}"
    );
    assert_eq!(pulled.chunks_downloaded, m.unique_chunks, "{label}");
    assert_eq!(pulled.bytes_downloaded, m.stored_size, "{label}");
    assert_eq!(cache.len() as u64, m.unique_chunks, "{label}: cache not filled");

    assert_eq!(
        testimage::fingerprint(&src).unwrap(),
        testimage::fingerprint(&dest).unwrap(),
        "{label}: pulled image differs from the source"
    );
    // Holes come back sparse: allocated blocks cover little more than the
    // non-zero bytes.
    let meta = std::fs::metadata(dest.join(DISK)).unwrap();
    let allocated = meta.blocks() * 512;
    let nonzero = disk_size - zero_bytes;
    assert!(
        allocated <= nonzero + nonzero / 10,
        "{label}: disk has {allocated} bytes allocated for {nonzero} non-zero bytes (size {disk_size})"
    );
    assert!(partial_dirs(&work.path().join("out")).is_empty(), "{label}");

    // A second pull into another folder comes entirely from the cache.
    let counting = Arc::new(CountingStore::new(store.clone()));
    let again = pull(
        counting.clone(),
        "images/vm/v1.json",
        &work.path().join("out").join("vm2.pvm"),
        &PullOptions { cache: Some(cache.clone()), ..PullOptions::default() },
    )
    .await
    .unwrap();
    assert_eq!((again.chunks_downloaded, again.chunks_from_cache), (0, m.unique_chunks), "{label}");
    assert_eq!(counting.counts().gets, 1, "{label}: only the manifest should be read");

    // Pulling onto an existing destination is refused.
    let err = pull(store.clone(), "images/vm/v1.json", &dest, &PullOptions::default()).await.unwrap_err();
    assert!(matches!(err, ImageError::DestinationExists(_)), "{label}: {err}");

    for o in store.list("").await.unwrap() {
        store.delete(&o.key).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(local_store(dir.path()), "local").await;
}

async fn round_trip_server(server: TestServer) {
    let Some(cs) = server.connection_string() else {
        println!("{}", server.not_run_message("image round trip"));
        return;
    };
    let store = open_connection_string(&cs).unwrap();
    // Fail fast, with the setup hint, when the server does not answer.
    if let Err(e) = store.list("nothing-here").await {
        panic!("{server:?} does not answer: {e}\n{}", server.failure_hint());
    }
    let store: Arc<dyn BlobStore> = Arc::new(PrefixedStore::new(store, &unique_root("image")).unwrap());
    round_trip(store, &format!("{server:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_s3() {
    round_trip_server(TestServer::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_azurite() {
    round_trip_server(TestServer::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_artifactory_like() {
    round_trip_server(TestServer::Artifactory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_version_uploads_only_changed_chunks() {
    let work = tempfile::tempdir().unwrap();
    let store = local_store(&work.path().join("store"));
    let disk_size = image_size();
    let v1 = work.path().join("v1");
    testimage::generate(&v1, disk_size, 21).unwrap();
    let r1 = push(store.clone(), &v1, "m/v1.json", &PushOptions::default()).await.unwrap();
    let before = store.list("chunks").await.unwrap();

    let v2 = work.path().join("v2");
    testimage::generate(&v2, disk_size, 21).unwrap();
    let changed = testimage::mutate_disk(&v2, 0.05, 2, 99).unwrap();
    let r2 = push(store.clone(), &v2, "m/v2.json", &PushOptions::default()).await.unwrap();
    let after = store.list("chunks").await.unwrap();

    let old: std::collections::HashSet<_> = before.iter().map(|o| o.key.as_str()).collect();
    let new_bytes: u64 = after.iter().filter(|o| !old.contains(o.key.as_str())).map(|o| o.size).sum();
    let v1_bytes = r1.manifest.total_size;
    println!(
        "v2: {changed} bytes changed of {v1_bytes}; new objects {new_bytes} bytes = {:.1}% of v1's size, {:.1}% of v1's stored {} bytes",
        new_bytes as f64 * 100.0 / v1_bytes as f64,
        new_bytes as f64 * 100.0 / r1.manifest.stored_size as f64,
        r1.manifest.stored_size
    );
    assert!(changed >= v1_bytes / 25, "the test changed too little ({changed} bytes)");
    assert!(new_bytes > 0, "nothing uploaded for a changed image");
    assert!(new_bytes * 10 <= v1_bytes, "v2 uploaded {new_bytes} bytes, more than 10% of v1's {v1_bytes}");
    assert_eq!(new_bytes, r2.bytes_uploaded);
    assert!(r2.chunks_present > 0 && r2.chunks_present + r2.chunks_uploaded == r2.manifest.unique_chunks);

    let dest = work.path().join("pulled-v2");
    pull(store.clone(), "m/v2.json", &dest, &PullOptions::default()).await.unwrap();
    assert_eq!(testimage::fingerprint(&v2).unwrap(), testimage::fingerprint(&dest).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_push_reruns_only_missing_chunks() {
    let work = tempfile::tempdir().unwrap();
    let store = local_store(&work.path().join("store"));
    let src = work.path().join("vm");
    testimage::generate(&src, image_size(), 31).unwrap();

    let (progress, mut rx) = progress_channel();
    let s = store.clone();
    let p = src.clone();
    let task = tokio::spawn(async move {
        push(s, &p, "m/vm.json", &PushOptions { concurrency: 2, progress: Some(progress), ..PushOptions::default() })
            .await
    });
    wait_progress(&mut rx, "5 chunk uploads", |p| p.chunks_transferred >= 5).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled(), "push finished before it could be interrupted");
    assert!(store.head("m/vm.json").await.unwrap().is_none(), "manifest written by an interrupted push");
    let stored_after_kill = store.list("chunks").await.unwrap().len() as u64;
    assert!(stored_after_kill >= 5);

    let counting = Arc::new(CountingStore::new(store.clone()));
    let report = push(counting.clone(), &src, "m/vm.json", &PushOptions::default()).await.unwrap();
    let unique = report.manifest.unique_chunks;
    println!(
        "interrupted push: {stored_after_kill} of {unique} chunks stored; rerun uploaded {}",
        report.chunks_uploaded
    );
    assert!(report.chunks_present >= 5, "{report:?}");
    assert!(report.chunks_uploaded < unique, "the rerun uploaded everything again");
    assert!(report.chunks_uploaded > 0, "the push was not interrupted mid-way");
    assert_eq!(report.chunks_present + report.chunks_uploaded, unique);
    // Uploads counted at the store: the missing chunks plus the manifest.
    assert_eq!(counting.counts().puts, report.chunks_uploaded + 1);
    assert_eq!(store.list("chunks").await.unwrap().len() as u64, unique);

    // A third run uploads only the manifest.
    let counting = Arc::new(CountingStore::new(store.clone()));
    push(counting.clone(), &src, "m/vm.json", &PushOptions::default()).await.unwrap();
    assert_eq!(counting.counts().puts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_pull_resumes_from_the_cache() {
    let work = tempfile::tempdir().unwrap();
    let store = local_store(&work.path().join("store"));
    let src = work.path().join("vm");
    testimage::generate(&src, image_size(), 41).unwrap();
    let pushed = push(store.clone(), &src, "m/vm.json", &PushOptions::default()).await.unwrap();
    let unique = pushed.manifest.unique_chunks;

    let cache = Arc::new(ChunkCache::open(work.path().join("cache"), CacheLimits::default()).unwrap());
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("vm");
    let (progress, mut rx) = progress_channel();
    let (s, d, c) = (store.clone(), dest.clone(), cache.clone());
    let task = tokio::spawn(async move {
        pull(s, "m/vm.json", &d, &PullOptions { concurrency: 2, cache: Some(c), progress: Some(progress) }).await
    });
    wait_progress(&mut rx, "5 chunk downloads", |p| p.chunks_transferred >= 5).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled(), "pull finished before it could be interrupted");
    assert!(!dest.exists(), "an interrupted pull left a destination");
    assert!(partial_dirs(&out).is_empty(), "an interrupted pull left {:?}", partial_dirs(&out));
    let cached = cache.len() as u64;
    assert!(cached >= 5 && cached < unique, "cache holds {cached} of {unique}");

    let counting = Arc::new(CountingStore::new(store.clone()));
    let report = pull(
        counting.clone(),
        "m/vm.json",
        &dest,
        &PullOptions { cache: Some(cache.clone()), ..PullOptions::default() },
    )
    .await
    .unwrap();
    println!("interrupted pull: {cached} of {unique} chunks cached; rerun downloaded {}", report.chunks_downloaded);
    assert!(report.chunks_from_cache >= cached.min(5), "{report:?}");
    assert_eq!(report.chunks_from_cache + report.chunks_downloaded, unique);
    assert!(report.chunks_downloaded < unique, "the rerun downloaded everything again");
    // Downloads counted at the store: the manifest plus the missing chunks.
    assert_eq!(counting.counts().gets, report.chunks_downloaded + 1);
    assert_eq!(testimage::fingerprint(&src).unwrap(), testimage::fingerprint(&dest).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_fails_the_pull_and_names_it() {
    let work = tempfile::tempdir().unwrap();
    let store = local_store(&work.path().join("store"));
    let src = work.path().join("vm");
    testimage::generate(&src, 16 << 20, 51).unwrap();
    let pushed = push(store.clone(), &src, "m/vm.json", &PushOptions::default()).await.unwrap();

    // Flip one byte in the middle of the disk's first stored chunk.
    let (victim, offset) = pushed
        .manifest
        .files()
        .find(|(p, _, _)| *p == DISK)
        .and_then(|(_, _, chunks)| {
            chunks.iter().find_map(|c| match c {
                hangar_image::ChunkRef::Data { hash, offset, .. } => Some((hash.clone(), *offset)),
                _ => None,
            })
        })
        .unwrap();
    let key = format!("chunks/{victim}");
    let mut bytes = store.get(&key).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    store.put(&key, bytes.into()).await.unwrap();

    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("vm");
    let cache = Arc::new(ChunkCache::open(work.path().join("cache"), CacheLimits::default()).unwrap());
    let err =
        pull(store.clone(), "m/vm.json", &dest, &PullOptions { cache: Some(cache.clone()), ..PullOptions::default() })
            .await
            .unwrap_err();
    match &err {
        ImageError::CorruptChunk { hash, path, offset: at, .. } => {
            assert_eq!(hash, &victim);
            assert_eq!(path, DISK);
            assert_eq!(*at, offset);
        }
        other => panic!("expected CorruptChunk, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&victim) && msg.contains(DISK), "{msg}");
    assert!(!dest.exists(), "a failed pull left a destination");
    assert!(partial_dirs(&out).is_empty(), "a failed pull left {:?}", partial_dirs(&out));
    assert!(!cache.contains(&victim), "a corrupt chunk was cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_cache_entry_is_downloaded_again() {
    let work = tempfile::tempdir().unwrap();
    let store = local_store(&work.path().join("store"));
    let src = work.path().join("vm");
    testimage::generate(&src, 8 << 20, 61).unwrap();
    push(store.clone(), &src, "m/vm.json", &PushOptions::default()).await.unwrap();
    let cache_dir = work.path().join("cache");
    let cache = Arc::new(ChunkCache::open(&cache_dir, CacheLimits::default()).unwrap());
    let first = pull(
        store.clone(),
        "m/vm.json",
        &work.path().join("a"),
        &PullOptions { cache: Some(cache.clone()), ..PullOptions::default() },
    )
    .await
    .unwrap();
    // Damage one cached chunk on disk.
    let hash = store.list("chunks").await.unwrap()[0].key.trim_start_matches("chunks/").to_string();
    let path = cache_dir.join(&hash[..2]).join(&hash);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    std::fs::write(&path, bytes).unwrap();

    let counting = Arc::new(CountingStore::new(store.clone()));
    let second = pull(
        counting.clone(),
        "m/vm.json",
        &work.path().join("b"),
        &PullOptions { cache: Some(cache.clone()), ..PullOptions::default() },
    )
    .await
    .unwrap();
    assert_eq!(second.chunks_downloaded, 1);
    assert_eq!(second.chunks_from_cache, first.manifest.unique_chunks - 1);
    assert_eq!(counting.counts().gets, 2);
    assert_eq!(testimage::fingerprint(&src).unwrap(), testimage::fingerprint(&work.path().join("b")).unwrap());
}
