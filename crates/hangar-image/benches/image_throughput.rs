//! Push/pull throughput against the S3 server on loopback, beside plain
//! PUT/GET of the same bytes at the same concurrency and a `cp` of the
//! unpacked image, all measured in one run.
//!
//! Needs `HANGAR_TEST_S3_ENDPOINT` (`eval "$(scripts/test-services.sh start)"`,
//! or run `bench/image-throughput.sh`). Knobs: `HANGAR_BENCH_IMAGE_MIB`
//! (default 256), `HANGAR_BENCH_CONCURRENCY` (default 8), `HANGAR_BENCH_DIR`
//! (scratch folder, default the system temp dir).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hangar_blobstore::conformance::{TestServer, unique_root};
use hangar_blobstore::{BlobStore, PrefixedStore, open_connection_string};
use hangar_image::testimage;
use hangar_image::{CacheLimits, ChunkCache, PullOptions, PushOptions, pull, push};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Every regular file of `dir` cut into `part`-byte pieces.
fn pieces(dir: &Path, part: usize) -> Vec<Bytes> {
    let fp = testimage::fingerprint(dir).unwrap();
    let mut out = Vec::new();
    for (rel, desc) in fp {
        if desc.starts_with("file") {
            let data = std::fs::read(dir.join(rel)).unwrap();
            for c in data.chunks(part) {
                out.push(Bytes::copy_from_slice(c));
            }
        }
    }
    out
}

async fn put_all(store: &Arc<dyn BlobStore>, prefix: &str, objs: &[Bytes], conc: usize) -> Duration {
    let t = Instant::now();
    futures::stream::iter(objs.iter().enumerate())
        .map(|(i, b)| {
            let s = store.clone();
            let key = format!("{prefix}/{i}");
            let b = b.clone();
            async move { s.put(&key, b).await }
        })
        .buffer_unordered(conc)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    t.elapsed()
}

async fn get_all(store: &Arc<dyn BlobStore>, keys: Vec<String>, conc: usize) -> Duration {
    let t = Instant::now();
    futures::stream::iter(keys)
        .map(|k| {
            let s = store.clone();
            async move { s.get(&k).await.map(|b| b.len()) }
        })
        .buffer_unordered(conc)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    t.elapsed()
}

fn row(name: &str, bytes: u64, d: Duration, base: Option<Duration>) {
    let mibs = bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let ratio = base.map_or(String::from("-"), |b| format!("{:.2}x", d.as_secs_f64() / b.as_secs_f64()));
    println!(
        "| {name:<48} | {:>9.0} | {:>8.2} | {mibs:>10.1} | {ratio:>12} |",
        bytes as f64 / (1 << 20) as f64,
        d.as_secs_f64()
    );
}

fn main() {
    let Some(cs) = TestServer::S3.connection_string() else {
        eprintln!(
            "image_throughput: HANGAR_TEST_S3_ENDPOINT is not set; run bench/image-throughput.sh or eval \"$(scripts/test-services.sh start)\" first"
        );
        std::process::exit(2);
    };
    let mib = env_u64("HANGAR_BENCH_IMAGE_MIB", 256);
    let conc = env_u64("HANGAR_BENCH_CONCURRENCY", 8) as usize;
    let scratch =
        std::env::var("HANGAR_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let work = tempfile::tempdir_in(scratch).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let src = work.path().join("vm.pvm");
        testimage::generate(&src, mib << 20, 7).unwrap();
        let base = open_connection_string(&cs).unwrap();
        let root = unique_root("bench");
        let store: Arc<dyn BlobStore> = Arc::new(PrefixedStore::new(base, &root).unwrap());

        let t = Instant::now();
        let pushed =
            push(store.clone(), &src, "img/m.json", &PushOptions { concurrency: conc, ..PushOptions::default() })
                .await
                .unwrap();
        let push_t = t.elapsed();
        let m = &pushed.manifest;
        let logical = m.total_size;

        let dest = work.path().join("pulled.pvm");
        let t = Instant::now();
        pull(store.clone(), "img/m.json", &dest, &PullOptions { concurrency: conc, ..PullOptions::default() })
            .await
            .unwrap();
        let pull_t = t.elapsed();

        let cache = Arc::new(ChunkCache::open(work.path().join("cache"), CacheLimits::default()).unwrap());
        pull(
            store.clone(),
            "img/m.json",
            &work.path().join("warm0"),
            &PullOptions { concurrency: conc, cache: Some(cache.clone()), ..PullOptions::default() },
        )
        .await
        .unwrap();
        let t = Instant::now();
        pull(
            store.clone(),
            "img/m.json",
            &work.path().join("warm1"),
            &PullOptions { concurrency: conc, cache: Some(cache), ..PullOptions::default() },
        )
        .await
        .unwrap();
        let warm_t = t.elapsed();

        // Plain PUT/GET of the image's raw bytes in 1 MiB objects.
        let raw = pieces(&src, 1 << 20);
        let raw_bytes: u64 = raw.iter().map(|b| b.len() as u64).sum();
        let raw_put = put_all(&store, "raw", &raw, conc).await;
        let raw_keys = (0..raw.len()).map(|i| format!("raw/{i}")).collect();
        let raw_get = get_all(&store, raw_keys, conc).await;
        drop(raw);

        // Plain PUT/GET of exactly the objects the push stored: chunks (format 1), or packs
        // and their indexes (format 2, the default).
        let mut chunk_keys: Vec<String> = Vec::new();
        for prefix in [
            hangar_image::manifest::CHUNK_PREFIX,
            hangar_image::manifest::PACK_PREFIX,
            hangar_image::manifest::INDEX_PREFIX,
        ] {
            chunk_keys.extend(store.list(prefix).await.unwrap().into_iter().map(|o| o.key));
        }
        assert!(!chunk_keys.is_empty(), "the push stored no object the baseline can copy");
        let mut stored = Vec::new();
        for k in &chunk_keys {
            stored.push(store.get(k).await.unwrap());
        }
        let stored_put = put_all(&store, "copy", &stored, conc).await;
        let copy_keys = (0..stored.len()).map(|i| format!("copy/{i}")).collect();
        let stored_get = get_all(&store, copy_keys, conc).await;

        let t = Instant::now();
        let st = std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(&dest)
            .arg(work.path().join("copied.pvm"))
            .status()
            .unwrap();
        assert!(st.success());
        let cp_t = t.elapsed();

        println!();
        println!(
            "image {} MiB logical ({} MiB holes, {} MiB stored in {} chunks), concurrency {conc}, S3 at {}",
            logical >> 20,
            m.hole_size >> 20,
            m.stored_size >> 20,
            m.unique_chunks,
            std::env::var("HANGAR_TEST_S3_ENDPOINT").unwrap_or_default()
        );
        println!("| {:<48} | {:>9} | {:>8} | {:>10} | {:>12} |", "operation", "MiB", "seconds", "MiB/s", "time ratio");
        println!("|{:-<50}|{:-<11}|{:-<10}|{:-<12}|{:-<14}|", "", "", "", "", "");
        row("plain PUT of raw image bytes (1 MiB objects)", raw_bytes, raw_put, None);
        row("plain PUT of the stored objects (packs, indexes)", m.stored_size, stored_put, None);
        row("push (chunk+hash+zstd+PUT), vs raw PUT", logical, push_t, Some(raw_put));
        row("push, vs PUT of the same stored objects", logical, push_t, Some(stored_put));
        row("plain GET of raw image bytes (1 MiB objects)", raw_bytes, raw_get, None);
        row("plain GET of the stored objects (packs, indexes)", m.stored_size, stored_get, None);
        row("pull, no cache (GET+verify+write), vs raw GET", logical, pull_t, Some(raw_get));
        row("pull, no cache, vs GET of the same objects", logical, pull_t, Some(stored_get));
        row("cp -a --sparse=always of the unpacked image", logical, cp_t, None);
        row("pull, no cache, vs cp", logical, pull_t, Some(cp_t));
        row("pull, warm host cache, vs cp", logical, warm_t, Some(cp_t));
        println!(
            "(MiB/s is logical image bytes per second for push/pull/cp; ratio > 1 means slower than the baseline)"
        );

        for o in store.list("").await.unwrap() {
            store.delete(&o.key).await.unwrap();
        }
    });
}
