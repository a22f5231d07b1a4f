//! Push/pull throughput against the test stores on loopback (S3 on moto,
//! Azure Blob on Azurite, the DAV server), beside plain PUT/GET of the same
//! bytes at the same concurrency and a `cp` of the unpacked image, all
//! measured in one run.
//!
//! Each provider is measured in `HANGAR_BENCH_ROUNDS` rounds (default 3); a
//! round times every operation once, each push or pull right next to its
//! baseline, on a fresh prefix, and the table gives the medians, so load from
//! other processes hits both sides of a ratio alike. The CPU column is this
//! process's CPU time (all threads) in the median round: what the client
//! spends, which the store's own share of the machine does not include.
//!
//! Needs the test stores' env (`eval "$(scripts/test-services.sh start)"`,
//! or run `bench/image-throughput.sh`); providers whose env is unset are
//! skipped. Knobs: `HANGAR_BENCH_IMAGE_MIB` (default 256),
//! `HANGAR_BENCH_CONCURRENCY` (default 8), `HANGAR_BENCH_ROUNDS` (3),
//! `HANGAR_BENCH_PROVIDERS` (default `s3 azurite dav`), `HANGAR_BENCH_DIR`
//! (scratch folder, default the system temp dir).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hangar_blobstore::conformance::{TestServer, unique_root};
use hangar_blobstore::{BlobStore, PrefixedStore, open_connection_string};
use hangar_image::testimage;
use hangar_image::{CacheLimits, ChunkCache, PullOptions, PushOptions, pull, push};

/// CPU seconds (user + system) this process has used so far, all threads
/// (from /proc/self/stat, in clock ticks of 1/100 s).
fn cpu_now() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// Wall time and this process's CPU time of one operation.
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: f64,
}

struct Clock {
    wall: Instant,
    cpu: f64,
}

impl Clock {
    fn start() -> Self {
        Clock { wall: Instant::now(), cpu: cpu_now() }
    }
    fn took(&self) -> Took {
        Took { wall: self.wall.elapsed(), cpu: cpu_now() - self.cpu }
    }
}

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

async fn put_all(store: &Arc<dyn BlobStore>, prefix: &str, objs: &[Bytes], conc: usize) -> Took {
    let t = Clock::start();
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
    t.took()
}

async fn get_all(store: &Arc<dyn BlobStore>, keys: Vec<String>, conc: usize) -> Took {
    let t = Clock::start();
    futures::stream::iter(keys)
        .map(|k| {
            let s = store.clone();
            async move { s.get(&k).await.map(|b| b.len()) }
        })
        .buffer_unordered(conc)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    t.took()
}

/// The median of one operation's rounds (by wall time).
fn median(mut v: Vec<Took>) -> Took {
    v.sort_by_key(|t| t.wall);
    v[v.len() / 2]
}

fn row(name: &str, bytes: u64, d: Took, base: Option<Took>) {
    let secs = d.wall.as_secs_f64();
    let mibs = bytes as f64 / (1 << 20) as f64 / secs;
    let ratio = base.map_or(String::from("-"), |b| format!("{:.2}x", secs / b.wall.as_secs_f64()));
    println!(
        "| {name:<48} | {:>9.0} | {secs:>8.2} | {:>7.2} | {mibs:>10.1} | {ratio:>12} |",
        bytes as f64 / (1 << 20) as f64,
        d.cpu
    );
}

/// Every operation's time in each round.
#[derive(Default)]
struct Rounds {
    push: Vec<Took>,
    pull: Vec<Took>,
    warm: Vec<Took>,
    raw_put: Vec<Took>,
    raw_get: Vec<Took>,
    stored_put: Vec<Took>,
    stored_get: Vec<Took>,
    cp: Vec<Took>,
}

/// One round on a fresh prefix of `base`: every operation once.
async fn round(cs: &str, src: &Path, work: &Path, conc: usize, r: &mut Rounds) -> hangar_image::Manifest {
    let base = open_connection_string(cs).unwrap();
    let store: Arc<dyn BlobStore> = Arc::new(PrefixedStore::new(base, &unique_root("bench")).unwrap());
    let dir = tempfile::tempdir_in(work).unwrap();

    let t = Clock::start();
    let pushed = push(store.clone(), src, "img/m.json", &PushOptions { concurrency: conc, ..PushOptions::default() })
        .await
        .unwrap();
    r.push.push(t.took());
    // Plain PUT of exactly the objects the push stored: chunks (format 1), or packs and
    // their indexes (format 2, the default), right after it.
    let mut stored_keys: Vec<String> = Vec::new();
    for prefix in [
        hangar_image::manifest::CHUNK_PREFIX,
        hangar_image::manifest::PACK_PREFIX,
        hangar_image::manifest::INDEX_PREFIX,
    ] {
        stored_keys.extend(store.list(prefix).await.unwrap().into_iter().map(|o| o.key));
    }
    assert!(!stored_keys.is_empty(), "the push stored no object the baseline can copy");
    let mut stored = Vec::new();
    for k in &stored_keys {
        stored.push(store.get(k).await.unwrap());
    }
    r.stored_put.push(put_all(&store, "copy", &stored, conc).await);
    drop(stored);

    let t = Clock::start();
    pull(
        store.clone(),
        "img/m.json",
        &dir.path().join("pulled"),
        &PullOptions { concurrency: conc, ..PullOptions::default() },
    )
    .await
    .unwrap();
    r.pull.push(t.took());
    let copy_keys = (0..stored_keys.len()).map(|i| format!("copy/{i}")).collect();
    r.stored_get.push(get_all(&store, copy_keys, conc).await);

    let cache = Arc::new(ChunkCache::open(dir.path().join("cache"), CacheLimits::default()).unwrap());
    let cached = PullOptions { concurrency: conc, cache: Some(cache), ..PullOptions::default() };
    pull(store.clone(), "img/m.json", &dir.path().join("warm0"), &cached).await.unwrap();
    let t = Clock::start();
    pull(store.clone(), "img/m.json", &dir.path().join("warm1"), &cached).await.unwrap();
    r.warm.push(t.took());

    let t = Clock::start();
    let st = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(dir.path().join("pulled"))
        .arg(dir.path().join("copied"))
        .status()
        .unwrap();
    assert!(st.success());
    r.cp.push(t.took());

    // Plain PUT/GET of the image's raw bytes in 1 MiB objects.
    let raw = pieces(src, 1 << 20);
    r.raw_put.push(put_all(&store, "raw", &raw, conc).await);
    let raw_keys = (0..raw.len()).map(|i| format!("raw/{i}")).collect();
    r.raw_get.push(get_all(&store, raw_keys, conc).await);

    for o in store.list("").await.unwrap() {
        store.delete(&o.key).await.unwrap();
    }
    pushed.manifest
}

fn main() {
    let mib = env_u64("HANGAR_BENCH_IMAGE_MIB", 256);
    let conc = env_u64("HANGAR_BENCH_CONCURRENCY", 8) as usize;
    let rounds = env_u64("HANGAR_BENCH_ROUNDS", 3).max(1);
    let wanted = std::env::var("HANGAR_BENCH_PROVIDERS").unwrap_or_else(|_| "s3 azurite dav".into());
    let servers: Vec<(&str, TestServer)> =
        [("s3", TestServer::S3), ("azurite", TestServer::Azurite), ("dav", TestServer::Artifactory)]
            .into_iter()
            .filter(|(name, _)| wanted.split_whitespace().any(|w| w == *name))
            .collect();
    let scratch = std::env::var("HANGAR_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    let work = tempfile::tempdir_in(scratch).unwrap();
    let src = work.path().join("vm.pvm");
    testimage::generate(&src, mib << 20, 7).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut measured = 0;
    for (name, server) in servers {
        let Some(cs) = server.connection_string() else {
            eprintln!("image_throughput: {} is not set; {name} skipped", server.env_var());
            continue;
        };
        measured += 1;
        let mut r = Rounds::default();
        let mut manifest = None;
        for _ in 0..rounds {
            manifest = Some(rt.block_on(round(&cs, &src, work.path(), conc, &mut r)));
        }
        let Some(m) = manifest else { continue };
        let raw_bytes = m.total_size;
        println!();
        println!(
            "{name}: image {} MiB logical ({} MiB holes, {} MiB stored in {} chunks, {} packs), concurrency {conc}, median of {rounds} rounds, at {}",
            m.total_size >> 20,
            m.hole_size >> 20,
            m.stored_size >> 20,
            m.unique_chunks,
            m.packs.len(),
            std::env::var(server.env_var()).unwrap_or_default()
        );
        println!(
            "| {:<48} | {:>9} | {:>8} | {:>7} | {:>10} | {:>12} |",
            "operation", "MiB", "seconds", "CPU s", "MiB/s", "time ratio"
        );
        println!("|{:-<50}|{:-<11}|{:-<10}|{:-<9}|{:-<12}|{:-<14}|", "", "", "", "", "", "");
        let (raw_put, raw_get) = (median(r.raw_put), median(r.raw_get));
        let (stored_put, stored_get) = (median(r.stored_put), median(r.stored_get));
        let (push_t, pull_t, warm_t, cp_t) = (median(r.push), median(r.pull), median(r.warm), median(r.cp));
        row("plain PUT of raw image bytes (1 MiB objects)", raw_bytes, raw_put, None);
        row("plain PUT of the stored objects (packs, indexes)", m.stored_size, stored_put, None);
        row("push (chunk+hash+zstd+PUT), vs raw PUT", m.total_size, push_t, Some(raw_put));
        row("push, vs PUT of the same stored objects", m.total_size, push_t, Some(stored_put));
        row("plain GET of raw image bytes (1 MiB objects)", raw_bytes, raw_get, None);
        row("plain GET of the stored objects (packs, indexes)", m.stored_size, stored_get, None);
        row("pull, no cache (GET+verify+write), vs raw GET", m.total_size, pull_t, Some(raw_get));
        row("pull, no cache, vs GET of the same objects", m.total_size, pull_t, Some(stored_get));
        row("cp -a --sparse=always of the unpacked image", m.total_size, cp_t, None);
        row("pull, no cache, vs cp", m.total_size, pull_t, Some(cp_t));
        row("pull, warm host cache, vs cp", m.total_size, warm_t, Some(cp_t));
        // The client's CPU alone bounds the wall time from below on this machine's cores
        // (shared with the store's server when it runs here too).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "client CPU floor on {cores} cores: push >= {:.2} s ({:.2}x the PUT of the same objects), pull >= {:.2} s ({:.2}x the GET)",
            push_t.cpu / cores,
            push_t.cpu / cores / stored_put.wall.as_secs_f64(),
            pull_t.cpu / cores,
            pull_t.cpu / cores / stored_get.wall.as_secs_f64(),
        );
    }
    if measured == 0 {
        eprintln!(
            "image_throughput: no test store is set; run bench/image-throughput.sh or eval \"$(scripts/test-services.sh start)\" first"
        );
        std::process::exit(2);
    }
    println!(
        "(MiB/s is logical image bytes per second for push/pull/cp; ratio > 1 means slower than the baseline; CPU s is this process's)"
    );
}
