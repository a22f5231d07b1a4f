//! Dedup on stored bytes: what a second version of an image adds to the
//! store, as a share of what the first version stored, for the packed format
//! (2), the previous chunker (format 1) and the reference service (which
//! uploads the whole pack again: 100 %), measured in one run.
//!
//! The bundle: a disk of `HANGAR_BENCH_BUNDLE_MIB` (256) MiB whose first
//! `HANGAR_BENCH_RANDOM_MIB` (200) MiB are random and the rest zeros. v1 is
//! pushed; v2 rewrites `HANGAR_BENCH_CHANGE_PCT` (5) % of v1's stored bytes
//! inside the random part, in two patterns: clustered (whole 1 MiB blocks)
//! and scattered (runs of 4-64 KiB). Stores are local folders under
//! `HANGAR_BENCH_DIR` (default: the system temp dir): stored bytes do not
//! depend on the provider. Run with `bench/dedup.sh` or
//! `cargo bench -p hangar-image --bench dedup`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use hangar_blobstore::BlobStore;
use hangar_blobstore::local::LocalStore;
use hangar_image::testimage::{self, ChangePattern};
use hangar_image::{ImageFormat, PushOptions, push};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn objects(store: &Arc<dyn BlobStore>) -> HashMap<String, u64> {
    store.list("").await.unwrap().into_iter().map(|o| (o.key, o.size)).collect()
}

struct Measure {
    v1_stored: u64,
    added: u64,
    changed: u64,
}

async fn measure(
    work: &Path,
    format: ImageFormat,
    pattern: ChangePattern,
    mib: u64,
    random_mib: u64,
    pct: u64,
) -> Measure {
    let tag = format!("{format:?}-{pattern:?}").replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let dir = work.join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let store: Arc<dyn BlobStore> = Arc::new(LocalStore::new(dir.join("store")).unwrap());
    let v1 = dir.join("v1");
    testimage::generate_random_then_zeros(&v1, mib << 20, random_mib << 20, 5).unwrap();
    // HANGAR_BENCH_CHUNK_KIB: another average for the packed layout (min avg/4, max avg*4).
    let chunking = match (format, env_u64("HANGAR_BENCH_CHUNK_KIB", 0)) {
        (ImageFormat::Packed, avg) if avg > 0 => {
            let avg = u32::try_from(avg << 10).unwrap();
            Some(hangar_image::ChunkParams { min: avg / 4, avg, max: avg * 4 })
        }
        _ => None,
    };
    let opts = PushOptions { format, chunking, ..PushOptions::default() };
    push(store.clone(), &v1, "images/b/1/manifest.json", &opts).await.unwrap();
    let before = objects(&store).await;
    let v1_stored: u64 = before.values().sum();
    // v2: the same bundle with pct % of v1's stored bytes rewritten.
    let v2 = dir.join("v2");
    testimage::generate_random_then_zeros(&v2, mib << 20, random_mib << 20, 5).unwrap();
    let changed = testimage::mutate_pattern(&v2, 0..random_mib << 20, v1_stored * pct / 100, pattern, 77).unwrap();
    push(store.clone(), &v2, "images/b/2/manifest.json", &opts).await.unwrap();
    let after = objects(&store).await;
    let added = after.iter().filter(|(k, _)| !before.contains_key(*k)).map(|(_, s)| *s).sum();
    std::fs::remove_dir_all(&dir).unwrap();
    Measure { v1_stored, added, changed }
}

fn main() {
    let mib = env_u64("HANGAR_BENCH_BUNDLE_MIB", 256);
    let random_mib = env_u64("HANGAR_BENCH_RANDOM_MIB", 200).min(mib);
    let pct = env_u64("HANGAR_BENCH_CHANGE_PCT", 5);
    let base = std::env::var_os("HANGAR_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(base).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let avg = match env_u64("HANGAR_BENCH_CHUNK_KIB", 0) {
        0 => hangar_image::ChunkParams::packed().avg >> 10,
        n => u32::try_from(n).unwrap(),
    };
    println!(
        "packed layout: FastCDC average {avg} KiB (min avg/4, max avg*4), packs of {} MiB",
        hangar_image::PACK_TARGET >> 20
    );
    println!(
        "dedup on stored bytes: {mib} MiB bundle ({random_mib} MiB random, the rest zeros); v2 rewrites {pct} % of v1's stored bytes"
    );
    println!(
        "| pattern                 | layout                          | v1 stored MiB | changed MiB | v2 adds MiB | v2 adds % of v1 stored |"
    );
    println!(
        "|-------------------------|---------------------------------|---------------|-------------|-------------|------------------------|"
    );
    let mut worst_packed = 0f64;
    for (name, pattern) in [
        ("clustered (1 MiB)", ChangePattern::Clustered(1 << 20)),
        ("scattered (4-64 KiB)", ChangePattern::Scattered { min: 4 << 10, max: 64 << 10 }),
    ] {
        let mut reference = None;
        for (layout, format) in
            [("packed (format 2)", ImageFormat::Packed), ("previous, 1 MiB chunks (format 1)", ImageFormat::Chunks)]
        {
            let m = rt.block_on(measure(work.path(), format, pattern, mib, random_mib, pct));
            let share = m.added as f64 * 100.0 / m.v1_stored as f64;
            if format == ImageFormat::Packed {
                worst_packed = worst_packed.max(share);
            }
            reference.get_or_insert(m.v1_stored);
            println!(
                "| {name:<23} | {layout:<31} | {:>13.1} | {:>11.1} | {:>11.1} | {share:>21.1}% |",
                m.v1_stored as f64 / 1048576.0,
                m.changed as f64 / 1048576.0,
                m.added as f64 / 1048576.0,
            );
        }
        let v1 = reference.unwrap_or(0) as f64 / 1048576.0;
        println!(
            "| {name:<23} | {:<31} | {v1:>13.1} | {:>11} | {v1:>11.1} | {:>21.1}% |",
            "reference (whole pack again)", "-", 100.0
        );
    }
    println!("goal: v2 adds <= 10 % of v1's stored bytes in both patterns; packed worst: {worst_packed:.1} %");
}
