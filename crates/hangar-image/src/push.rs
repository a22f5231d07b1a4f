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

use crate::gc::{Lease, read_condemned};
use crate::manifest::{
    CHUNK_PREFIX, ChunkParams, ChunkRef, Entry, FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_PACKED, INDEX_PREFIX,
    IndexEntry, Manifest, PACK_PREFIX, PackIndex, PackRef, chunk_key, index_key, pack_key,
};
use crate::progress::{Phase, ProgressFn, Tracker};
use crate::{ImageError, Result, io_err, join_err};

/// The layout a push writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// Format 1: every chunk its own object under `chunks/` (1 MiB average).
    Chunks,
    /// Format 2: 64 KiB average chunks packed into pack objects of several
    /// MiB under `packs/`, each with an index under `packidx/`.
    #[default]
    Packed,
}

/// Default size a pack is sealed at (format 2).
pub const PACK_TARGET: usize = 8 * 1024 * 1024;

/// How to push.
#[derive(Clone)]
pub struct PushOptions {
    /// Uploads in flight at once (at least 1): chunks (format 1) or packs (format 2).
    pub concurrency: usize,
    /// zstd level for the chunks.
    pub zstd_level: i32,
    /// Chunking parameters; `None`: the format's ([`ChunkParams::default`] for
    /// format 1, [`ChunkParams::packed`] for format 2).
    pub chunking: Option<ChunkParams>,
    /// The layout to write.
    pub format: ImageFormat,
    /// A pack is sealed once it holds this many stored bytes (format 2).
    pub pack_target: usize,
    /// Where progress goes.
    pub progress: Option<ProgressFn>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            concurrency: 8,
            zstd_level: 3,
            chunking: None,
            format: ImageFormat::default(),
            pack_target: PACK_TARGET,
            progress: None,
        }
    }
}

impl PushOptions {
    /// The chunking this push uses.
    pub fn chunk_params(&self) -> ChunkParams {
        self.chunking.unwrap_or(match self.format {
            ImageFormat::Chunks => ChunkParams::default(),
            ImageFormat::Packed => ChunkParams::packed(),
        })
    }
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("concurrency", &self.concurrency)
            .field("zstd_level", &self.zstd_level)
            .field("chunking", &self.chunking)
            .field("format", &self.format)
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
    /// Packs uploaded by this push (format 2).
    pub packs_uploaded: u64,
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
                    refs.push(ChunkRef::Data {
                        offset: data_offset,
                        length: data_len,
                        hash: hash.clone(),
                        stored: 0,
                        pack: None,
                        at: None,
                    });
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

/// Where a chunk's stored bytes are (format 2).
#[derive(Debug, Clone)]
struct Loc {
    pack: Arc<str>,
    pack_size: u64,
    at: u64,
    stored: u64,
}

/// Reads the indexes of the usable packs: listed, with an index, not condemned.
async fn known_chunks(store: &Arc<dyn BlobStore>, concurrency: usize) -> Result<HashMap<String, Loc>> {
    let condemned = read_condemned(store.as_ref()).await?;
    let packs: HashMap<String, u64> = store
        .list(PACK_PREFIX)
        .await?
        .into_iter()
        .filter(|o| !condemned.objects.contains_key(&o.key))
        .map(|o| (o.key, o.size))
        .collect();
    let indexes: Vec<String> = store
        .list(INDEX_PREFIX)
        .await?
        .into_iter()
        .filter(|o| !condemned.objects.contains_key(&o.key))
        .filter_map(|o| o.key.strip_prefix(INDEX_PREFIX)?.strip_prefix('/').map(str::to_string))
        .filter(|id| packs.contains_key(&pack_key(id)))
        .collect();
    let read: Vec<Option<PackIndex>> = futures::stream::iter(indexes)
        .map(|id| {
            let store = store.clone();
            async move {
                match store.get(&index_key(&id)).await {
                    Ok(raw) => match PackIndex::from_json(&raw) {
                        Ok(idx) if idx.pack == id => Ok(Some(idx)),
                        _ => {
                            tracing::warn!(pack = %id, "pack index unreadable; its chunks are uploaded again");
                            Ok(None)
                        }
                    },
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(ImageError::from(e)),
                }
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let mut out = HashMap::new();
    for idx in read.into_iter().flatten() {
        if packs.get(&pack_key(&idx.pack)) != Some(&idx.size) {
            continue;
        }
        let id: Arc<str> = Arc::from(idx.pack.as_str());
        for c in idx.chunks {
            out.entry(c.hash).or_insert(Loc { pack: id.clone(), pack_size: idx.size, at: c.at, stored: c.stored });
        }
    }
    Ok(out)
}

/// A pack being filled.
#[derive(Default)]
struct PackBuf {
    data: Vec<u8>,
    chunks: Vec<IndexEntry>,
}

/// Compresses the chunks the producer sends, packs them and uploads the
/// packs (each followed by its index), `concurrency` packs in flight.
async fn upload_packed(
    store: &Arc<dyn BlobStore>,
    rx: mpsc::Receiver<Job>,
    opts: &PushOptions,
    tracker: &Arc<Tracker>,
    lease: &mut Lease,
) -> Result<Vec<PackIndex>> {
    let concurrency = opts.concurrency.max(1);
    let level = opts.zstd_level;
    let target = opts.pack_target.max(1);
    // Compression on the blocking pool, several chunks at once, off the I/O path.
    let compressed = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|job| (job, rx)) })
        .map(|job| async move {
            let length = job.data.len() as u64;
            let hash = job.hash;
            let data = job.data;
            let c = tokio::task::spawn_blocking(move || crate::compress_chunk(&data, level))
                .await
                .map_err(join_err)?
                .map_err(|e| ImageError::Task(format!("zstd: {e}")))?;
            Ok::<_, ImageError>((hash, length, c))
        })
        .buffered(concurrency * 2);
    let mut compressed = std::pin::pin!(compressed);
    let mut uploads: tokio::task::JoinSet<Result<PackIndex>> = tokio::task::JoinSet::new();
    let mut done = Vec::new();
    let mut buf = PackBuf::default();
    let seal = |buf: PackBuf, uploads: &mut tokio::task::JoinSet<Result<PackIndex>>| {
        let store = store.clone();
        let tracker = tracker.clone();
        uploads.spawn(async move {
            let PackBuf { data, chunks } = buf;
            let data = Bytes::from(data);
            // The id is the blake3 of a random salt and the pack's chunk hashes: never the
            // key of an earlier pack with the same chunks, which GC may have condemned
            // already. (Hashing the pack's bytes again would add nothing: every chunk in it
            // is verified by its own hash.)
            let salt = uuid::Uuid::new_v4();
            let mut h = blake3::Hasher::new();
            h.update(salt.as_bytes());
            for c in &chunks {
                h.update(c.hash.as_bytes());
            }
            let id = h.finalize().to_hex().to_string();
            let index = PackIndex { pack: id.clone(), size: data.len() as u64, chunks };
            let body = serde_json::to_vec(&index).map_err(|e| ImageError::Manifest(e.to_string()))?;
            store.put(&pack_key(&id), data).await?;
            store.put(&index_key(&id), Bytes::from(body)).await?;
            for c in &index.chunks {
                tracker.chunk_done(c.length, Some(c.stored));
            }
            Ok(index)
        });
    };
    while let Some(next) = compressed.next().await {
        let (hash, length, c) = next?;
        let at = buf.data.len() as u64;
        buf.chunks.push(IndexEntry { hash, at, stored: c.len() as u64, length });
        buf.data.extend_from_slice(&c);
        if buf.data.len() >= target {
            lease.renew_if_due().await?;
            seal(std::mem::take(&mut buf), &mut uploads);
            while uploads.len() >= concurrency {
                if let Some(r) = uploads.join_next().await {
                    done.push(r.map_err(join_err)??);
                }
            }
        }
    }
    if !buf.chunks.is_empty() {
        lease.renew_if_due().await?;
        seal(buf, &mut uploads);
    }
    while let Some(r) = uploads.join_next().await {
        done.push(r.map_err(join_err)??);
    }
    Ok(done)
}

/// Packs the image folder `source` into `store` in the format of
/// [`PushOptions::format`], then writes the manifest at `manifest_key`, last.
///
/// Chunks the store already holds are not uploaded again, so re-running a
/// killed push, or pushing a new version of an image, transfers only what
/// is missing. A packed push holds a lease on the store while it runs (see
/// [`crate::gc`]).
#[instrument(skip(store, opts), fields(provider = store.provider()))]
pub async fn push(
    store: Arc<dyn BlobStore>,
    source: &Path,
    manifest_key: &str,
    opts: &PushOptions,
) -> Result<PushReport> {
    hangar_blobstore::validate_key(manifest_key)?;
    let mut lease = if opts.format == ImageFormat::Packed { Some(Lease::take(store.clone()).await?) } else { None };
    let result = push_leased(store, source, manifest_key, opts, lease.as_mut()).await;
    if let Some(l) = lease {
        l.release().await;
    }
    result
}

async fn push_leased(
    store: Arc<dyn BlobStore>,
    source: &Path,
    manifest_key: &str,
    opts: &PushOptions,
    lease: Option<&mut Lease>,
) -> Result<PushReport> {
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
    let packed = opts.format == ImageFormat::Packed;
    let concurrency = opts.concurrency.max(1);

    // Where every chunk the store holds already is: chunk objects (format 1)
    // or chunks in usable packs (format 2).
    let mut locs: HashMap<String, Loc> = if packed {
        known_chunks(&store, concurrency).await?
    } else {
        let none: Arc<str> = Arc::from("");
        store
            .list(CHUNK_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| {
                let name = o.key.strip_prefix(CHUNK_PREFIX)?.strip_prefix('/')?;
                Some((name.to_string(), Loc { pack: none.clone(), pack_size: 0, at: 0, stored: o.size }))
            })
            .collect()
    };
    let present: HashSet<String> = locs.keys().cloned().collect();
    let present_before = present.clone();
    tracker.set_phase(Phase::Transferring);

    let (tx, rx) = mpsc::channel::<Job>(concurrency * 2);
    let producer = {
        let tracker = tracker.clone();
        let params = opts.chunk_params();
        tokio::task::spawn_blocking(move || produce(walked, &present, params, tx, &tracker))
    };

    let mut packs_uploaded = 0u64;
    // On an upload error, dropping the receiver stops the producer at its next send.
    let uploaded: Vec<(String, u64)> = match lease {
        Some(lease) => {
            let indexes = upload_packed(&store, rx, opts, &tracker, lease).await?;
            packs_uploaded = indexes.len() as u64;
            let mut out = Vec::new();
            for idx in indexes {
                let id: Arc<str> = Arc::from(idx.pack.as_str());
                for c in idx.chunks {
                    out.push((c.hash.clone(), c.stored));
                    locs.insert(c.hash, Loc { pack: id.clone(), pack_size: idx.size, at: c.at, stored: c.stored });
                }
            }
            out
        }
        None => {
            let level = opts.zstd_level;
            let uploaded = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|job| (job, rx)) })
                .map(|job| {
                    let store = store.clone();
                    let tracker = tracker.clone();
                    async move {
                        let length = job.data.len() as u64;
                        let hash = job.hash;
                        let data = job.data;
                        let compressed = tokio::task::spawn_blocking(move || crate::compress_chunk(&data, level))
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
                .await?;
            let none: Arc<str> = Arc::from("");
            for (hash, clen) in &uploaded {
                locs.insert(hash.clone(), Loc { pack: none.clone(), pack_size: 0, at: 0, stored: *clen });
            }
            uploaded
        }
    };
    let (mut entries, hole_size) = producer.await.map_err(join_err)??;

    let chunks_uploaded = uploaded.len() as u64;
    let bytes_uploaded = uploaded.iter().map(|(_, s)| *s).sum();
    // The packs the image uses, sorted by id, and each chunk's place.
    let mut pack_ids: std::collections::BTreeMap<Arc<str>, u64> = std::collections::BTreeMap::new();
    let mut unique: HashMap<String, u64> = HashMap::new();
    for e in &entries {
        if let Entry::File { chunks, .. } = e {
            for c in chunks {
                if let ChunkRef::Data { hash, .. } = c {
                    let loc = locs
                        .get(hash.as_str())
                        .ok_or_else(|| ImageError::Task(format!("chunk {hash} was neither present nor uploaded")))?;
                    unique.insert(hash.clone(), loc.stored);
                    if packed {
                        pack_ids.insert(loc.pack.clone(), loc.pack_size);
                    }
                }
            }
        }
    }
    let pack_index: HashMap<Arc<str>, u32> =
        pack_ids.keys().enumerate().map(|(i, id)| (id.clone(), u32::try_from(i).unwrap_or(u32::MAX))).collect();
    for e in &mut entries {
        if let Entry::File { chunks, .. } = e {
            for c in chunks.iter_mut() {
                if let ChunkRef::Data { hash, stored, pack, at, .. } = c
                    && let Some(loc) = locs.get(hash.as_str())
                {
                    *stored = loc.stored;
                    if packed {
                        *pack = pack_index.get(&loc.pack).copied();
                        *at = Some(loc.at);
                    }
                }
            }
        }
    }
    let chunks_present = unique.keys().filter(|h| present_before.contains(*h)).count() as u64;
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: if packed { FORMAT_VERSION_PACKED } else { FORMAT_VERSION },
        chunking: opts.chunk_params(),
        compression: "zstd".into(),
        hash: "blake3".into(),
        unique_chunks: unique.len() as u64,
        stored_size: unique.values().sum(),
        entries,
        total_size,
        hole_size,
        packs: pack_ids.into_iter().map(|(id, size)| PackRef { id: id.to_string(), size }).collect(),
        manifest_hash: None,
    };
    tracker.set_phase(Phase::Finishing);
    let json = manifest.to_json()?;
    store.put(manifest_key, Bytes::from(json)).await?;
    tracker.set_phase(Phase::Done);
    info!(chunks_uploaded, bytes_uploaded, chunks_present, packs_uploaded, total_size, "image pushed");
    hangar_metrics::metrics().image_transfer("push", bytes_uploaded, started.elapsed());
    Ok(PushReport { manifest, chunks_uploaded, bytes_uploaded, chunks_present, packs_uploaded })
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
