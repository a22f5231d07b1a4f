//! Pull an image from a store into a folder.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hangar_blobstore::{BlobError, BlobStore};
use tracing::{info, instrument, warn};

use crate::cache::ChunkCache;
use crate::manifest::{ChunkRef, Entry, Manifest, chunk_key, pack_key};
use crate::progress::{Phase, ProgressFn, Tracker};
use crate::{ImageError, Result, decode_chunk, io_err, join_err};

/// Zero blocks of this size (aligned in the file) are not written, so they
/// stay sparse.
const SPARSE_BLOCK: usize = 4096;

/// Neighbouring chunks of a pack closer than this are fetched in one ranged
/// GET (the gap's bytes are read and dropped).
const COALESCE_GAP: u64 = 64 * 1024;

/// Longest ranged GET a pull makes (format 2).
pub const MAX_RANGE: u64 = 8 * 1024 * 1024;

/// How to pull.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Chunk downloads in flight at once (0 means 8).
    pub concurrency: usize,
    /// The host chunk cache: consulted before downloading, filled after.
    pub cache: Option<Arc<ChunkCache>>,
    /// Where progress goes.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("concurrency", &self.concurrency)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The image's manifest.
    pub manifest: Manifest,
    /// Chunks downloaded from the store.
    pub chunks_downloaded: u64,
    /// Stored bytes downloaded from the store.
    pub bytes_downloaded: u64,
    /// Chunks taken from the cache.
    pub chunks_from_cache: u64,
    /// Requests made for chunk bytes (chunk objects, or ranges of packs).
    pub requests: u64,
}

/// Removes the temp folder unless the pull succeeded.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

/// One distinct chunk and where it goes.
struct Use {
    hash: String,
    length: u64,
    /// Store key and byte range of its stored bytes.
    key: String,
    range: Option<(u64, u64)>,
    targets: Vec<(usize, u64)>,
}

/// Neighbouring chunks of one pack fetched in one ranged GET.
struct RangeWork {
    key: String,
    start: u64,
    end: u64,
    uses: Vec<Use>,
}

enum Work {
    /// One chunk: from the cache, else its own request.
    Single(Use),
    /// Several chunks of a pack, one ranged GET.
    Range(RangeWork),
}

/// Groups chunks by pack and offset into ranges of at most [`MAX_RANGE`]
/// bytes whose chunks are at most [`COALESCE_GAP`] apart.
fn coalesce(mut uses: Vec<Use>) -> Vec<RangeWork> {
    uses.sort_by(|a, b| (&a.key, a.range).cmp(&(&b.key, b.range)));
    let mut out: Vec<RangeWork> = Vec::new();
    for u in uses {
        let (at, stored) = u.range.unwrap_or((0, 0));
        let end = at + stored;
        if let Some(r) = out.last_mut()
            && r.key == u.key
            && at >= r.end
            && at - r.end <= COALESCE_GAP
            && end - r.start <= MAX_RANGE
        {
            r.end = end;
            r.uses.push(u);
            continue;
        }
        out.push(RangeWork { key: u.key.clone(), start: at, end, uses: vec![u] });
    }
    out
}

/// Writes one chunk's bytes everywhere it goes.
fn write_targets(data: &[u8], targets: &[(usize, u64)], file_paths: &[PathBuf]) -> Result<()> {
    for (file_idx, offset) in targets {
        let Some(path) = file_paths.get(*file_idx) else {
            continue;
        };
        let f = fs::File::options().write(true).open(path).map_err(io_err("open", path))?;
        write_sparse(&f, data, *offset).map_err(io_err("write", path))?;
    }
    Ok(())
}

/// Writes `data` at `offset`, skipping aligned all-zero blocks (the file
/// was created sparse, so skipped blocks read back as zeros).
fn write_sparse(file: &fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut pos = 0usize;
    let mut run_start: Option<usize> = None;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let to_boundary = SPARSE_BLOCK - (abs % SPARSE_BLOCK as u64) as usize;
        let end = (pos + to_boundary).min(data.len());
        let block = &data[pos..end];
        let zero = block.iter().fold(0u8, |a, &b| a | b) == 0;
        match (zero, run_start) {
            (true, Some(s)) => {
                file.write_all_at(&data[s..pos], offset + s as u64)?;
                run_start = None;
            }
            (false, None) => run_start = Some(pos),
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

fn prepare(manifest: &Manifest, tmp: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir(tmp).map_err(io_err("create", tmp))?;
    let mut files = Vec::new();
    for e in &manifest.entries {
        let path = tmp.join(e.path());
        match e {
            Entry::Dir { .. } => fs::create_dir(&path).map_err(io_err("create folder", &path))?,
            Entry::Symlink { target, .. } => {
                std::os::unix::fs::symlink(target, &path).map_err(io_err("create link", &path))?
            }
            Entry::File { size, .. } => {
                let f = fs::File::create(&path).map_err(io_err("create", &path))?;
                f.set_len(*size).map_err(io_err("size", &path))?;
                files.push(path);
            }
        }
    }
    Ok(files)
}

fn finish(manifest: &Manifest, tmp: &Path) -> Result<()> {
    for e in &manifest.entries {
        if let Entry::File { path, mode, .. } = e {
            let p = tmp.join(path);
            let f = fs::File::options().write(true).open(&p).map_err(io_err("open", &p))?;
            f.sync_all().map_err(io_err("sync", &p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_err("chmod", &p))?;
        }
    }
    // Deepest folders first, so a read-only folder is locked last.
    for e in manifest.entries.iter().rev() {
        if let Entry::Dir { path, mode } = e {
            let p = tmp.join(path);
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_err("chmod", &p))?;
        }
    }
    Ok(())
}

/// Pulls the image whose manifest is at `manifest_key` into the new folder
/// `dest` (which must not exist).
///
/// Chunks are fetched in parallel (from the cache when it holds them),
/// verified after decompression, and written at their offsets; holes and
/// zero blocks are left sparse. The image is built in a temp folder beside
/// `dest` and renamed into place at the end: on any error, or if the future
/// is dropped, nothing is left at `dest`. A chunk that does not verify
/// fails the pull with [`ImageError::CorruptChunk`] naming it and a file
/// that uses it.
#[instrument(skip(store, opts), fields(provider = store.provider()))]
pub async fn pull(
    store: Arc<dyn BlobStore>,
    manifest_key: &str,
    dest: &Path,
    opts: &PullOptions,
) -> Result<PullReport> {
    let started = std::time::Instant::now();
    let tracker = Arc::new(Tracker::new(opts.progress.clone()));
    let raw = store.get(manifest_key).await?;
    let manifest = Manifest::from_json(&raw)?;

    if fs::symlink_metadata(dest).is_ok() {
        return Err(ImageError::DestinationExists(dest.display().to_string()));
    }
    let name = dest
        .file_name()
        .ok_or_else(|| ImageError::Unsupported {
            path: dest.display().to_string(),
            reason: "destination has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple()));
    let mut guard = TempGuard(Some(tmp.clone()));

    let m = manifest.clone();
    let t = tmp.clone();
    let file_paths = Arc::new(tokio::task::spawn_blocking(move || prepare(&m, &t)).await.map_err(join_err)??);

    // Distinct chunks in first-use order, each with every place it goes.
    let mut uses: Vec<Use> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut file_names: Vec<String> = Vec::new();
    let mut hole_bytes = 0u64;
    for (file_idx, (path, _, chunks)) in manifest.files().enumerate() {
        file_names.push(path.to_string());
        for c in chunks {
            match c {
                ChunkRef::Hole { length, .. } => hole_bytes += length,
                ChunkRef::Data { offset, length, hash, stored, pack, at } => {
                    let i = *index.entry(hash.as_str()).or_insert_with(|| {
                        let (key, range) = match (pack.and_then(|p| manifest.packs.get(p as usize)), at) {
                            (Some(p), Some(a)) => (pack_key(&p.id), Some((*a, *stored))),
                            _ => (chunk_key(hash), None),
                        };
                        uses.push(Use { hash: hash.clone(), length: *length, key, range, targets: Vec::new() });
                        uses.len() - 1
                    });
                    uses[i].targets.push((file_idx, *offset));
                }
            }
        }
    }
    let file_names = Arc::new(file_names);
    tracker.set_totals(manifest.total_size, uses.len() as u64, true);
    tracker.set_phase(Phase::Transferring);
    tracker.add_bytes(hole_bytes);

    let concurrency = if opts.concurrency == 0 { 8 } else { opts.concurrency };
    // Chunks the cache holds come from it one by one; the others of a packed
    // image are fetched as coalesced ranges of their packs.
    let (single, ranged): (Vec<Use>, Vec<Use>) =
        uses.into_iter().partition(|u| u.range.is_none() || opts.cache.as_ref().is_some_and(|c| c.contains(&u.hash)));
    let work: Vec<Work> =
        single.into_iter().map(Work::Single).chain(coalesce(ranged).into_iter().map(Work::Range)).collect();
    let results: Vec<Vec<(bool, u64)>> = futures::stream::iter(work)
        .map(|w| {
            let store = store.clone();
            let cache = opts.cache.clone();
            let tracker = tracker.clone();
            let file_paths = file_paths.clone();
            let file_names = file_names.clone();
            async move {
                match w {
                    Work::Single(u) => {
                        fetch_and_write(store, cache, u, file_paths, file_names, &tracker).await.map(|r| vec![r])
                    }
                    Work::Range(r) => fetch_range(store, cache, r, file_paths, file_names, &tracker).await,
                }
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let requests = results.iter().filter(|r| r.len() > 1 || r.first().is_some_and(|(net, _)| *net)).count() as u64;
    let results: Vec<(bool, u64)> = results.into_iter().flatten().collect();

    tracker.set_phase(Phase::Finishing);
    let m = manifest.clone();
    let t = tmp.clone();
    let d = dest.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<()> {
        finish(&m, &t)?;
        if fs::symlink_metadata(&d).is_ok() {
            return Err(ImageError::DestinationExists(d.display().to_string()));
        }
        fs::rename(&t, &d).map_err(io_err("rename into place", &d))?;
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = fs::File::open(parent).and_then(|f| f.sync_all());
        }
        Ok(())
    })
    .await
    .map_err(join_err)??;
    guard.0 = None;
    tracker.set_phase(Phase::Done);

    let chunks_downloaded = results.iter().filter(|(net, _)| *net).count() as u64;
    let bytes_downloaded = results.iter().map(|(_, b)| *b).sum();
    let chunks_from_cache = results.len() as u64 - chunks_downloaded;
    info!(chunks_downloaded, bytes_downloaded, chunks_from_cache, "image pulled");
    hangar_metrics::metrics().image_transfer("pull", bytes_downloaded, started.elapsed());
    Ok(PullReport { manifest, chunks_downloaded, bytes_downloaded, chunks_from_cache, requests })
}

/// Gets one range of a pack, verifies every chunk in it, writes each
/// everywhere it goes and keeps it in the cache. Returns, per chunk,
/// (downloaded, stored bytes).
async fn fetch_range(
    store: Arc<dyn BlobStore>,
    cache: Option<Arc<ChunkCache>>,
    r: RangeWork,
    file_paths: Arc<Vec<PathBuf>>,
    file_names: Arc<Vec<String>>,
    tracker: &Tracker,
) -> Result<Vec<(bool, u64)>> {
    let RangeWork { key, start, end, uses } = r;
    let corrupt = |u: &Use, reason: String| {
        let (file, offset) = u.targets.first().copied().unwrap_or((0, 0));
        ImageError::CorruptChunk {
            hash: u.hash.clone(),
            path: file_names.get(file).cloned().unwrap_or_default(),
            offset,
            reason,
        }
    };
    let bytes = match store.get_range(&key, start..end).await {
        Ok(b) => b,
        Err(BlobError::NotFound { .. }) => {
            return Err(corrupt(&uses[0], format!("its pack {key} is missing from the store")));
        }
        Err(BlobError::InvalidRange { .. }) => {
            return Err(corrupt(&uses[0], format!("its pack {key} is shorter than the manifest says")));
        }
        Err(e) => return Err(e.into()),
    };
    if bytes.len() as u64 != end - start {
        return Err(corrupt(&uses[0], format!("its pack {key} is shorter than the manifest says")));
    }
    let b2 = bytes.clone();
    let fp = file_paths.clone();
    let checked = tokio::task::spawn_blocking(move || -> std::result::Result<Vec<Use>, Box<(Use, String)>> {
        let mut done = Vec::with_capacity(uses.len());
        for u in uses {
            let (at, stored) = u.range.unwrap_or((0, 0));
            let s = usize::try_from(at - start).unwrap_or(usize::MAX);
            let e = s.saturating_add(usize::try_from(stored).unwrap_or(usize::MAX)).min(b2.len());
            let data = match decode_chunk(&b2[s.min(e)..e], &u.hash, u.length) {
                Ok(d) => d,
                Err(reason) => return Err(Box::new((u, reason))),
            };
            if let Err(err) = write_targets(&data, &u.targets, &fp) {
                return Err(Box::new((u, err.to_string())));
            }
            done.push(u);
        }
        Ok(done)
    })
    .await
    .map_err(join_err)?;
    let done = match checked {
        Ok(d) => d,
        Err(b) => return Err(corrupt(&b.0, b.1)),
    };
    let mut out = Vec::with_capacity(done.len());
    for u in done {
        let (at, stored) = u.range.unwrap_or((0, 0));
        if let Some(cache) = &cache {
            let s = usize::try_from(at - start).unwrap_or(usize::MAX);
            let e = s.saturating_add(usize::try_from(stored).unwrap_or(usize::MAX)).min(bytes.len());
            if let Err(err) = cache.insert(&u.hash, bytes.slice(s.min(e)..e)).await {
                warn!(hash = %u.hash, error = %err, "could not cache chunk");
            }
        }
        tracker.chunk_done(u.length * u.targets.len() as u64, Some(stored));
        out.push((true, stored));
    }
    Ok(out)
}

/// Gets one chunk (cache first), verifies it, writes it everywhere it goes.
/// Returns (downloaded?, stored bytes downloaded).
async fn fetch_and_write(
    store: Arc<dyn BlobStore>,
    cache: Option<Arc<ChunkCache>>,
    u: Use,
    file_paths: Arc<Vec<PathBuf>>,
    file_names: Arc<Vec<String>>,
    tracker: &Tracker,
) -> Result<(bool, u64)> {
    let (first_file, first_offset) = u.targets.first().copied().unwrap_or((0, 0));
    let first_name = file_names.get(first_file).cloned().unwrap_or_default();
    let mut data: Option<Vec<u8>> = None;
    if let Some(cache) = &cache
        && let Some(stored) = cache.get(&u.hash).await
    {
        let (hash, length) = (u.hash.clone(), u.length);
        match tokio::task::spawn_blocking(move || decode_chunk(&stored, &hash, length)).await.map_err(join_err)? {
            Ok(d) => data = Some(d),
            Err(reason) => {
                warn!(hash = %u.hash, %reason, "cached chunk does not verify; dropping it");
                cache.remove(&u.hash).await;
            }
        }
    }
    let mut downloaded = None;
    let data = match data {
        Some(d) => d,
        None => {
            let got = match u.range {
                Some((at, stored)) => store.get_range(&u.key, at..at + stored).await,
                None => store.get(&u.key).await,
            };
            let stored = match got {
                Ok(b) => b,
                Err(BlobError::NotFound { .. }) => {
                    return Err(ImageError::CorruptChunk {
                        hash: u.hash,
                        path: first_name,
                        offset: first_offset,
                        reason: "missing from the store".into(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let (hash, length) = (u.hash.clone(), u.length);
            let s2: Bytes = stored.clone();
            let decoded = tokio::task::spawn_blocking(move || decode_chunk(&s2, &hash, length))
                .await
                .map_err(join_err)?
                .map_err(|reason| ImageError::CorruptChunk {
                    hash: u.hash.clone(),
                    path: first_name.clone(),
                    offset: first_offset,
                    reason,
                })?;
            downloaded = Some(stored.len() as u64);
            if let Some(cache) = &cache
                && let Err(e) = cache.insert(&u.hash, stored).await
            {
                warn!(hash = %u.hash, error = %e, "could not cache chunk");
            }
            decoded
        }
    };
    let targets = u.targets;
    let n = targets.len() as u64;
    tokio::task::spawn_blocking(move || write_targets(&data, &targets, &file_paths)).await.map_err(join_err)??;
    tracker.chunk_done(u.length * n, downloaded);
    Ok((downloaded.is_some(), downloaded.unwrap_or(0)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_writes_skip_zero_blocks_and_keep_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = fs::File::create(&p).unwrap();
        let size = 1 << 20;
        f.set_len(size).unwrap();
        // Data, 512 KiB of zeros, data; written at an unaligned offset.
        let mut data = vec![7u8; 3000];
        data.extend(vec![0u8; 512 * 1024]);
        data.extend(vec![9u8; 5000]);
        write_sparse(&f, &data, 1000).unwrap();
        drop(f);
        let back = fs::read(&p).unwrap();
        assert_eq!(&back[1000..1000 + data.len()], &data[..]);
        assert!(back[..1000].iter().all(|&b| b == 0));
        let allocated = fs::metadata(&p).unwrap().blocks() * 512;
        assert!(allocated < 64 * 1024, "zero run was written: {allocated} bytes allocated");
    }
}
