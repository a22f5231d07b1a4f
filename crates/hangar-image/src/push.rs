//! Pack an image folder into chunks and push it to a store.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use fastcdc::v2020::{Normalization, StreamCDC};
use futures::{StreamExt, TryStreamExt};
use hangar_blobstore::BlobStore;
use tokio::sync::mpsc;
use tracing::{info, instrument};

use crate::manifest::{CHUNK_PREFIX, ChunkParams, ChunkRef, Entry, FORMAT_NAME, FORMAT_VERSION, Manifest, chunk_key};
use crate::progress::{Phase, ProgressFn, Tracker};
use crate::{ImageError, Result, io_err, join_err};

/// How to push.
#[derive(Clone)]
pub struct PushOptions {
    /// Chunk uploads in flight at once (at least 1).
    pub concurrency: usize,
    /// zstd level for the chunks.
    pub zstd_level: i32,
    /// Chunking parameters.
    pub chunking: ChunkParams,
    /// Where progress goes.
    pub progress: Option<ProgressFn>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions { concurrency: 8, zstd_level: 3, chunking: ChunkParams::default(), progress: None }
    }
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("concurrency", &self.concurrency)
            .field("zstd_level", &self.zstd_level)
            .field("chunking", &self.chunking)
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Chunks uploaded by this push.
    pub chunks_uploaded: u64,
    /// Stored bytes uploaded by this push (chunks only).
    pub bytes_uploaded: u64,
    /// Distinct chunks the store already held.
    pub chunks_present: u64,
}

enum Kind {
    Dir { mode: u32 },
    File { mode: u32, size: u64 },
    Symlink { target: String },
}

struct Walked {
    rel: String,
    abs: PathBuf,
    kind: Kind,
}

fn walk(root: &Path) -> Result<Vec<Walked>> {
    fn visit(root: &Path, dir: &Path, out: &mut Vec<Walked>) -> Result<()> {
        for entry in fs::read_dir(dir).map_err(io_err("read folder", dir))? {
            let entry = entry.map_err(io_err("read folder", dir))?;
            let abs = entry.path();
            let rel_path = abs
                .strip_prefix(root)
                .map_err(|e| ImageError::Unsupported { path: abs.display().to_string(), reason: e.to_string() })?;
            let rel = rel_path
                .to_str()
                .ok_or_else(|| ImageError::Unsupported {
                    path: abs.display().to_string(),
                    reason: "file name is not UTF-8".into(),
                })?
                .to_string();
            let meta = fs::symlink_metadata(&abs).map_err(io_err("stat", &abs))?;
            let mode = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir { mode }
            } else if ft.is_file() {
                Kind::File { mode, size: meta.len() }
            } else if ft.is_symlink() {
                let target = fs::read_link(&abs).map_err(io_err("read link", &abs))?;
                Kind::Symlink {
                    target: target
                        .to_str()
                        .ok_or_else(|| ImageError::Unsupported {
                            path: rel.clone(),
                            reason: "link target is not UTF-8".into(),
                        })?
                        .to_string(),
                }
            } else {
                return Err(ImageError::Unsupported { path: rel, reason: "not a file, folder or symlink".into() });
            };
            let is_dir = matches!(kind, Kind::Dir { .. });
            out.push(Walked { rel, abs: abs.clone(), kind });
            if is_dir {
                visit(root, &abs, out)?;
            }
        }
        Ok(())
    }
    let meta = fs::metadata(root).map_err(io_err("stat image folder", root))?;
    if !meta.is_dir() {
        return Err(ImageError::Unsupported {
            path: root.display().to_string(),
            reason: "an image must be a folder".into(),
        });
    }
    let mut out = Vec::new();
    visit(root, root, &mut out)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// A chunk to compress and upload.
struct Job {
    hash: String,
    data: Vec<u8>,
}

/// Zero runs at least this long at the start or end of a chunk are stored
/// as holes rather than inside the chunk.
const MIN_EDGE_HOLE: usize = 64 * 1024;

/// Number of zero bytes at the start of `data`.
fn leading_zeros(data: &[u8]) -> usize {
    // OR-folding fixed 64-byte blocks vectorises well.
    let blocks = data.chunks_exact(64).take_while(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0).count();
    let at = blocks * 64;
    at + data[at..].iter().take_while(|&&x| x == 0).count()
}

/// Number of zero bytes at the end of `data`.
fn trailing_zeros(data: &[u8]) -> usize {
    let blocks = data.rchunks_exact(64).take_while(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0).count();
    let at = data.len() - blocks * 64;
    blocks * 64 + data[..at].iter().rev().take_while(|&&x| x == 0).count()
}

fn add_hole(refs: &mut Vec<ChunkRef>, at: u64, length: u64) {
    match refs.last_mut() {
        Some(ChunkRef::Hole { offset, length: l }) if *offset + *l == at => *l += length,
        _ => refs.push(ChunkRef::Hole { offset: at, length }),
    }
}

/// Reads and chunks every file, sending new chunks to the uploaders.
fn produce(
    walked: Vec<Walked>,
    present: &HashSet<String>,
    params: ChunkParams,
    tx: mpsc::Sender<Job>,
    tracker: &Tracker,
) -> Result<(Vec<Entry>, u64)> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut entries = Vec::with_capacity(walked.len());
    let mut holes = 0u64;
    for w in walked {
        match w.kind {
            Kind::Dir { mode } => entries.push(Entry::Dir { path: w.rel, mode }),
            Kind::Symlink { target } => entries.push(Entry::Symlink { path: w.rel, target }),
            Kind::File { mode, size } => {
                let file = fs::File::open(&w.abs).map_err(io_err("open", &w.abs))?;
                let mut refs: Vec<ChunkRef> = Vec::new();
                let mut covered = 0u64;
                let chunker = StreamCDC::with_level(
                    file,
                    params.min as usize,
                    params.avg as usize,
                    params.max as usize,
                    Normalization::Level1,
                );
                for chunk in chunker {
                    let c = chunk.map_err(|e| ImageError::Io {
                        op: "read",
                        path: w.abs.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                    let length = c.length as u64;
                    covered += length;
                    let mut data = c.data;
                    let lead = leading_zeros(&data);
                    if lead == data.len() {
                        holes += length;
                        add_hole(&mut refs, c.offset, length);
                        tracker.add_bytes(length);
                        continue;
                    }
                    // Zero runs at either end of a chunk (where a zero region
                    // begins or ends) become holes too; the rest is the chunk.
                    let trail = trailing_zeros(&data);
                    let lead = if lead >= MIN_EDGE_HOLE { lead } else { 0 };
                    let trail = if trail >= MIN_EDGE_HOLE { trail } else { 0 };
                    if lead > 0 {
                        add_hole(&mut refs, c.offset, lead as u64);
                    }
                    if lead > 0 || trail > 0 {
                        data = data[lead..data.len() - trail].to_vec();
                    }
                    let data_offset = c.offset + lead as u64;
                    let data_len = data.len() as u64;
                    let edge_holes = (lead + trail) as u64;
                    holes += edge_holes;
                    tracker.add_bytes(edge_holes);
                    let hash = blake3::hash(&data).to_hex().to_string();
                    refs.push(ChunkRef::Data { offset: data_offset, length: data_len, hash: hash.clone(), stored: 0 });
                    if trail > 0 {
                        add_hole(&mut refs, data_offset + data_len, trail as u64);
                    }
                    if !seen.insert(hash.clone()) {
                        tracker.add_bytes(data_len);
                        continue;
                    }
                    tracker.add_chunk_total();
                    if present.contains(&hash) {
                        tracker.chunk_done(data_len, None);
                        continue;
                    }
                    tx.blocking_send(Job { hash, data }).map_err(|_| ImageError::Task("uploads stopped".into()))?;
                }
                if covered != size {
                    return Err(ImageError::Unsupported {
                        path: w.rel,
                        reason: format!("file changed while pushing ({size} bytes, read {covered})"),
                    });
                }
                entries.push(Entry::File { path: w.rel, mode, size, chunks: refs });
            }
        }
    }
    tracker.set_total_known();
    Ok((entries, holes))
}

/// Packs the image folder `source` into `store`: chunks under `chunks/`,
/// then the manifest at `manifest_key`, written last.
///
/// Chunks the store already lists are not uploaded again, so re-running a
/// killed push, or pushing a new version of an image, transfers only what
/// is missing.
#[instrument(skip(store, opts), fields(provider = store.provider()))]
pub async fn push(
    store: Arc<dyn BlobStore>,
    source: &Path,
    manifest_key: &str,
    opts: &PushOptions,
) -> Result<PushReport> {
    hangar_blobstore::validate_key(manifest_key)?;
    let started = std::time::Instant::now();
    let tracker = Arc::new(Tracker::new(opts.progress.clone()));
    let src = source.to_path_buf();
    let walked = tokio::task::spawn_blocking(move || walk(&src)).await.map_err(join_err)??;
    let total_size: u64 = walked
        .iter()
        .map(|w| match w.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    tracker.set_totals(total_size, 0, false);

    let listed = store.list(CHUNK_PREFIX).await?;
    let mut stored_sizes: HashMap<String, u64> = listed
        .into_iter()
        .filter_map(|o| {
            let name = o.key.strip_prefix(CHUNK_PREFIX)?.strip_prefix('/')?;
            Some((name.to_string(), o.size))
        })
        .collect();
    let present: HashSet<String> = stored_sizes.keys().cloned().collect();
    tracker.set_phase(Phase::Transferring);

    let concurrency = opts.concurrency.max(1);
    let (tx, rx) = mpsc::channel::<Job>(concurrency);
    let producer = {
        let tracker = tracker.clone();
        let params = opts.chunking;
        tokio::task::spawn_blocking(move || produce(walked, &present, params, tx, &tracker))
    };

    let level = opts.zstd_level;
    let uploads = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|job| (job, rx)) })
        .map(|job| {
            let store = store.clone();
            let tracker = tracker.clone();
            async move {
                let length = job.data.len() as u64;
                let hash = job.hash;
                let data = job.data;
                let compressed = tokio::task::spawn_blocking(move || zstd::bulk::compress(&data, level))
                    .await
                    .map_err(join_err)?
                    .map_err(|e| ImageError::Task(format!("zstd: {e}")))?;
                let clen = compressed.len() as u64;
                store.put(&chunk_key(&hash), Bytes::from(compressed)).await?;
                tracker.chunk_done(length, Some(clen));
                Ok::<_, ImageError>((hash, clen))
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await;
    let uploaded = match uploads {
        Ok(u) => u,
        Err(e) => {
            // Dropping the receiver stops the producer at its next send.
            return Err(e);
        }
    };
    let (mut entries, hole_size) = producer.await.map_err(join_err)??;

    let chunks_uploaded = uploaded.len() as u64;
    let bytes_uploaded = uploaded.iter().map(|(_, s)| *s).sum();
    let chunks_present_before: HashSet<String> = stored_sizes.keys().cloned().collect();
    stored_sizes.extend(uploaded);
    let mut unique: HashMap<&str, u64> = HashMap::new();
    for e in &mut entries {
        if let Entry::File { chunks, .. } = e {
            for c in chunks.iter_mut() {
                if let ChunkRef::Data { hash, stored, .. } = c {
                    *stored = stored_sizes
                        .get(hash.as_str())
                        .copied()
                        .ok_or_else(|| ImageError::Task(format!("chunk {hash} was neither present nor uploaded")))?;
                }
            }
        }
    }
    for e in &entries {
        if let Entry::File { chunks, .. } = e {
            for c in chunks {
                if let ChunkRef::Data { hash, stored, .. } = c {
                    unique.insert(hash.as_str(), *stored);
                }
            }
        }
    }
    let chunks_present = unique.keys().filter(|h| chunks_present_before.contains(**h)).count() as u64;
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        chunking: opts.chunking,
        compression: "zstd".into(),
        hash: "blake3".into(),
        unique_chunks: unique.len() as u64,
        stored_size: unique.values().sum(),
        entries,
        total_size,
        hole_size,
        manifest_hash: None,
    };
    tracker.set_phase(Phase::Finishing);
    let json = manifest.to_json()?;
    store.put(manifest_key, Bytes::from(json)).await?;
    tracker.set_phase(Phase::Done);
    info!(chunks_uploaded, bytes_uploaded, chunks_present, total_size, "image pushed");
    hangar_metrics::metrics().image_transfer("push", bytes_uploaded, started.elapsed());
    Ok(PushReport { manifest, chunks_uploaded, bytes_uploaded, chunks_present })
}

#[cfg(test)]
mod tests {
    use super::{leading_zeros, trailing_zeros};

    #[test]
    fn zero_runs_at_the_edges() {
        assert_eq!((leading_zeros(&[]), trailing_zeros(&[])), (0, 0));
        assert_eq!((leading_zeros(&[0; 100]), trailing_zeros(&[0; 100])), (100, 100));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert_eq!((leading_zeros(&v), trailing_zeros(&v)), (999, 0));
        v[999] = 0;
        v[3] = 1;
        assert_eq!((leading_zeros(&v), trailing_zeros(&v)), (3, 996));
        v[130] = 7;
        assert_eq!((leading_zeros(&v), trailing_zeros(&v)), (3, 869));
    }
}
