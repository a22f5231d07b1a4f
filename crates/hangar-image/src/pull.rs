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

/// Bytes written to the image's files after which the writeback thread
/// flushes them to disk, while the pull goes on downloading.
const FLUSH_EVERY: u64 = 32 * 1024 * 1024;

/// The regular files being written, opened once, and their writeback.
struct Outputs {
    paths: Vec<PathBuf>,
    files: Vec<fs::File>,
    writeback: Writeback,
}

/// What the pull has written since the last flush, per file.
#[derive(Default)]
struct Dirty {
    per_file: HashMap<usize, u64>,
    total: u64,
    stop: bool,
    failed: Option<ImageError>,
}

/// Flushes written data to disk in the background (`fdatasync` every
/// [`FLUSH_EVERY`] bytes), so the disk writes overlap the downloads and the
/// final sync of the files has little left to do. A flush error fails the
/// pull: it is kept and returned by [`Writeback::failed`], because the
/// kernel reports a writeback error to one sync only.
#[derive(Default)]
struct Writeback {
    dirty: std::sync::Mutex<Dirty>,
    wake: std::sync::Condvar,
}

impl Writeback {
    fn lock(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wrote(&self, file: usize, bytes: u64) {
        let mut d = self.lock();
        *d.per_file.entry(file).or_default() += bytes;
        d.total += bytes;
        if d.total >= FLUSH_EVERY {
            self.wake.notify_one();
        }
    }

    /// The writeback thread's loop; returns when [`Writeback::stop`] is called.
    fn run(out: &Outputs) {
        let wb = &out.writeback;
        loop {
            let files: Vec<usize> = {
                let mut d = wb.lock();
                while d.total < FLUSH_EVERY && !d.stop {
                    d = wb.wake.wait(d).unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                if d.stop || d.failed.is_some() {
                    return;
                }
                d.total = 0;
                d.per_file.drain().map(|(f, _)| f).collect()
            };
            for i in files {
                let (Some(f), Some(p)) = (out.files.get(i), out.paths.get(i)) else { continue };
                if let Err(e) = f.sync_data() {
                    wb.lock().failed = Some(io_err("sync", p)(e));
                    return;
                }
            }
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    /// The error a flush met, if any (once the thread has stopped).
    fn failed(&self) -> Result<()> {
        match self.lock().failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Stops the writeback thread when the pull ends, however it ends.
struct StopWriteback(Arc<Outputs>);

impl Drop for StopWriteback {
    fn drop(&mut self) {
        self.0.writeback.stop();
    }
}

/// Writes one chunk's bytes everywhere it goes.
fn write_targets(data: &[u8], targets: &[(usize, u64)], out: &Outputs) -> Result<()> {
    for (file_idx, offset) in targets {
        let (Some(path), Some(f)) = (out.paths.get(*file_idx), out.files.get(*file_idx)) else {
            continue;
        };
        write_sparse(f, data, *offset).map_err(io_err("write", path))?;
        out.writeback.wrote(*file_idx, data.len() as u64);
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

fn prepare(manifest: &Manifest, tmp: &Path) -> Result<Outputs> {
    fs::create_dir(tmp).map_err(io_err("create", tmp))?;
    let mut out = Outputs { paths: Vec::new(), files: Vec::new(), writeback: Writeback::default() };
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
                out.paths.push(path);
                out.files.push(f);
            }
        }
    }
    Ok(out)
}

fn finish(manifest: &Manifest, tmp: &Path, out: &Outputs) -> Result<()> {
    for (f, p) in out.files.iter().zip(&out.paths) {
        f.sync_all().map_err(io_err("sync", p))?;
    }
    for e in &manifest.entries {
        if let Entry::File { path, mode, .. } = e {
            let p = tmp.join(path);
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
    let outputs = Arc::new(tokio::task::spawn_blocking(move || prepare(&m, &t)).await.map_err(join_err)??);
    let stop_writeback = StopWriteback(outputs.clone());
    let flusher = {
        let out = outputs.clone();
        tokio::task::spawn_blocking(move || Writeback::run(&out))
    };

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
            let outputs = outputs.clone();
            let file_names = file_names.clone();
            async move {
                match w {
                    Work::Single(u) => {
                        fetch_and_write(store, cache, u, outputs, file_names, &tracker).await.map(|r| vec![r])
                    }
                    Work::Range(r) => fetch_range(store, cache, r, outputs, file_names, &tracker).await,
                }
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let requests = results.iter().filter(|r| r.len() > 1 || r.first().is_some_and(|(net, _)| *net)).count() as u64;
    let results: Vec<(bool, u64)> = results.into_iter().flatten().collect();

    tracker.set_phase(Phase::Finishing);
    drop(stop_writeback);
    flusher.await.map_err(join_err)?;
    outputs.writeback.failed()?;
    let m = manifest.clone();
    let t = tmp.clone();
    let d = dest.to_path_buf();
    let out = outputs.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        finish(&m, &t, &out)?;
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
    outputs: Arc<Outputs>,
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
    let fp = outputs.clone();
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

/// Verifies one stored chunk and writes it everywhere it goes, in one trip
/// to the blocking pool. The outer error is a failed write; the inner one
/// says why the chunk does not verify.
async fn decode_and_write(stored: Bytes, u: &Use, out: &Arc<Outputs>) -> Result<std::result::Result<(), String>> {
    let (hash, length, targets, out) = (u.hash.clone(), u.length, u.targets.clone(), out.clone());
    tokio::task::spawn_blocking(move || match decode_chunk(&stored, &hash, length) {
        Ok(data) => write_targets(&data, &targets, &out).map(Ok),
        Err(reason) => Ok(Err(reason)),
    })
    .await
    .map_err(join_err)?
}

/// Gets one chunk (cache first), verifies it, writes it everywhere it goes.
/// Returns (downloaded?, stored bytes downloaded).
async fn fetch_and_write(
    store: Arc<dyn BlobStore>,
    cache: Option<Arc<ChunkCache>>,
    u: Use,
    outputs: Arc<Outputs>,
    file_names: Arc<Vec<String>>,
    tracker: &Tracker,
) -> Result<(bool, u64)> {
    let (first_file, offset) = u.targets.first().copied().unwrap_or((0, 0));
    let corrupt = |reason: String| ImageError::CorruptChunk {
        hash: u.hash.clone(),
        path: file_names.get(first_file).cloned().unwrap_or_default(),
        offset,
        reason,
    };
    let logical = u.length * u.targets.len() as u64;
    if let Some(cache) = &cache
        && let Some(stored) = cache.get(&u.hash).await
    {
        match decode_and_write(Bytes::from(stored), &u, &outputs).await? {
            Ok(()) => {
                tracker.chunk_done(logical, None);
                return Ok((false, 0));
            }
            Err(reason) => {
                warn!(hash = %u.hash, %reason, "cached chunk does not verify; dropping it");
                cache.remove(&u.hash).await;
            }
        }
    }
    let got = match u.range {
        Some((at, stored)) => store.get_range(&u.key, at..at + stored).await,
        None => store.get(&u.key).await,
    };
    let stored = match got {
        Ok(b) => b,
        Err(BlobError::NotFound { .. }) => return Err(corrupt("missing from the store".into())),
        Err(e) => return Err(e.into()),
    };
    decode_and_write(stored.clone(), &u, &outputs).await?.map_err(corrupt)?;
    let n = stored.len() as u64;
    if let Some(cache) = &cache
        && let Err(e) = cache.insert(&u.hash, stored).await
    {
        warn!(hash = %u.hash, error = %e, "could not cache chunk");
    }
    tracker.chunk_done(logical, Some(n));
    Ok((true, n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writeback_flushes_once_enough_is_written_and_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = fs::File::create(&p).unwrap();
        let out = Arc::new(Outputs { paths: vec![p], files: vec![f], writeback: Writeback::default() });
        let thread = std::thread::spawn({
            let out = out.clone();
            move || Writeback::run(&out)
        });
        out.writeback.wrote(0, FLUSH_EVERY - 1);
        assert_eq!(out.writeback.lock().total, FLUSH_EVERY - 1, "flushed before the threshold");
        out.writeback.wrote(0, 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.writeback.lock().total != 0 {
            assert!(std::time::Instant::now() < deadline, "nothing was flushed past the threshold");
            std::thread::yield_now();
        }
        out.writeback.stop();
        thread.join().unwrap();
        assert!(out.writeback.failed().is_ok());
    }

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
