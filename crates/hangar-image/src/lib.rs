//! Hangar's VM image format and its transfer.
//!
//! An image is a folder (a QEMU VM folder or a Parallels `.pvm`/`.macvm`
//! bundle). [`push`] walks it (sorted relative paths, modes, symlinks), cuts
//! every file into content-defined chunks (FastCDC), records all-zero chunks
//! as holes, compresses the others with zstd, names each by the blake3 of its
//! uncompressed bytes, uploads only the chunks the store does not hold
//! already, in parallel, and writes the [`Manifest`] last. A killed push
//! re-run transfers only what is missing; a new version of an image uploads
//! only its changed chunks. Two layouts ([`ImageFormat`]):
//!
//! * format 2, packed (the default): 16 KiB / 64 KiB / 256 KiB chunks
//!   ([`ChunkParams::packed`]) appended to pack objects of about 8 MiB at
//!   `packs/<blake3 of a salt and its chunk hashes>`, each followed by its [`PackIndex`] at
//!   `packidx/<id>` (hash, offset, stored and plain length of every chunk);
//!   the manifest names its packs and every chunk's pack and offset. Pushes
//!   hold a lease and [`gc`] deletes unused packs by a rule safe against them.
//! * format 1: 256 KiB / 1 MiB / 4 MiB chunks, one object each at
//!   `chunks/<hash>`. Still pulled; [`repack`] converts such an image.
//!
//! [`pull`] reads the manifest, fetches the chunks in parallel (format 2:
//! ranged GETs of packs, neighbours coalesced up to 8 MiB), verifies
//! each one's hash after decompression, restores holes as sparse regions,
//! and builds the image in a temp folder renamed into place at the end, so a
//! failed or interrupted pull leaves nothing at the destination. Verified
//! chunks go to an optional host [`ChunkCache`] (LRU, size budget), which
//! also makes an interrupted pull resume without downloading again.
//!
//! Progress goes to a callback ([`ProgressFn`]); this crate draws nothing.

pub mod cache;
pub mod gc;
pub mod manifest;
pub mod progress;
mod pull;
mod push;
mod repack;
pub mod testimage;

pub use cache::{CacheLimits, ChunkCache};
pub use gc::{GcOptions, GcReport, collect_garbage};
pub use hangar_blobstore::{BlobError, BlobStore};
pub use manifest::{ChunkParams, ChunkRef, Entry, Manifest, PackIndex, PackRef};
pub use progress::{Phase, Progress, ProgressFn, progress_channel};
pub use pull::{MAX_RANGE, PullOptions, PullReport, pull};
pub use push::{ImageFormat, PACK_TARGET, PushOptions, PushReport, push};
pub use repack::{delete_unused_chunks, repack};

/// Errors of packing, pushing and pulling images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BlobError),
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed, tampered with or unsupported.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A chunk did not decompress or did not match its hash.
    #[error("chunk {hash} (used by {path} at offset {offset}) is corrupt: {reason}")]
    CorruptChunk {
        /// The chunk's expected hash.
        hash: String,
        /// A file that uses it.
        path: String,
        /// Where in that file.
        offset: u64,
        /// What did not match.
        reason: String,
    },
    /// The source folder holds something an image cannot carry.
    #[error("unsupported file {path}: {reason}")]
    Unsupported {
        /// The offending path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The pull destination already exists.
    #[error("destination {0} already exists")]
    DestinationExists(String),
    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Result alias of this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

pub(crate) fn io_err(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.display().to_string();
    move |source| ImageError::Io { op, path, source }
}

pub(crate) fn join_err(e: tokio::task::JoinError) -> ImageError {
    ImageError::Task(e.to_string())
}

thread_local! {
    /// One zstd decompression context per thread, reused, rather than a new
    /// context (and its tables) allocated for every 64 KiB chunk.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// One zstd compression context per thread, reused, with its level.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compresses one chunk at `level` with this thread's context.
pub(crate) fn compress_chunk(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = match &mut *slot {
            Some((l, c)) if *l == level => c,
            other => &mut other.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        ctx.compress(data)
    })
}

/// zstd-decompresses a stored chunk and checks its length and blake3 hash.
pub fn decode_chunk(stored: &[u8], hash: &str, length: u64) -> std::result::Result<Vec<u8>, String> {
    let cap = usize::try_from(length).map_err(|_| "length does not fit in memory".to_string())?;
    let data = DECOMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            let ctx = match &mut *slot {
                Some(c) => c,
                none => none.insert(zstd::bulk::Decompressor::new()?),
            };
            ctx.decompress(stored, cap)
        })
        .map_err(|e| format!("zstd: {e}"))?;
    if data.len() as u64 != length {
        return Err(format!("decompressed to {} bytes, expected {length}", data.len()));
    }
    let actual = blake3::hash(&data).to_hex();
    if actual.as_str() != hash {
        return Err(format!("content hashes to {actual}"));
    }
    Ok(data)
}
