//! Progress of a push or pull, reported through a callback that a CLI can
//! turn into a progress bar.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Where a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Listing the source or the store, reading the manifest.
    #[default]
    Preparing,
    /// Chunks are moving.
    Transferring,
    /// Writing the manifest (push) or syncing and renaming (pull).
    Finishing,
    /// Finished successfully.
    Done,
}

/// A snapshot of a transfer's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Logical (uncompressed) image bytes handled so far: chunked and
    /// uploaded or found present (push), written or restored as holes (pull).
    pub bytes_done: u64,
    /// Logical size of the image.
    pub bytes_total: u64,
    /// Distinct chunks handled so far.
    pub chunks_done: u64,
    /// Distinct chunks in the image. During a push it grows while the files
    /// are being chunked; it is final once `total_known` is true.
    pub chunks_total: u64,
    /// Whether `chunks_total` is final.
    pub total_known: bool,
    /// Chunks actually sent or received over the network.
    pub chunks_transferred: u64,
    /// Compressed bytes actually sent or received over the network.
    pub bytes_transferred: u64,
}

/// The callback progress goes to. It is called from worker tasks after
/// every chunk, so it should be cheap (e.g. send on a channel).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A callback that publishes into a `tokio::sync::watch` channel, and the
/// receiver to read the latest progress from.
pub fn progress_channel() -> (ProgressFn, tokio::sync::watch::Receiver<Progress>) {
    let (tx, rx) = tokio::sync::watch::channel(Progress::default());
    (
        Arc::new(move |p: &Progress| {
            let _ = tx.send(*p);
        }),
        rx,
    )
}

/// Shared counters behind the reports.
pub(crate) struct Tracker {
    callback: Option<ProgressFn>,
    phase: std::sync::Mutex<Phase>,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    chunks_done: AtomicU64,
    chunks_total: AtomicU64,
    total_known: AtomicBool,
    chunks_transferred: AtomicU64,
    bytes_transferred: AtomicU64,
}

impl Tracker {
    pub(crate) fn new(callback: Option<ProgressFn>) -> Self {
        Tracker {
            callback,
            phase: std::sync::Mutex::new(Phase::Preparing),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            chunks_done: AtomicU64::new(0),
            chunks_total: AtomicU64::new(0),
            total_known: AtomicBool::new(false),
            chunks_transferred: AtomicU64::new(0),
            bytes_transferred: AtomicU64::new(0),
        }
    }

    pub(crate) fn snapshot(&self) -> Progress {
        Progress {
            phase: self.phase.lock().map(|p| *p).unwrap_or_default(),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            chunks_done: self.chunks_done.load(Ordering::Relaxed),
            chunks_total: self.chunks_total.load(Ordering::Relaxed),
            total_known: self.total_known.load(Ordering::Relaxed),
            chunks_transferred: self.chunks_transferred.load(Ordering::Relaxed),
            bytes_transferred: self.bytes_transferred.load(Ordering::Relaxed),
        }
    }

    fn emit(&self) {
        if let Some(cb) = &self.callback {
            cb(&self.snapshot());
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
        self.emit();
    }

    pub(crate) fn set_totals(&self, bytes: u64, chunks: u64, known: bool) {
        self.bytes_total.store(bytes, Ordering::Relaxed);
        self.chunks_total.store(chunks, Ordering::Relaxed);
        self.total_known.store(known, Ordering::Relaxed);
        self.emit();
    }

    pub(crate) fn add_chunk_total(&self) {
        self.chunks_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_total_known(&self) {
        self.total_known.store(true, Ordering::Relaxed);
        self.emit();
    }

    /// Logical bytes done without a chunk finishing (holes, duplicates).
    pub(crate) fn add_bytes(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        self.emit();
    }

    /// A distinct chunk finished; `transferred` is its wire size when it
    /// went over the network.
    pub(crate) fn chunk_done(&self, logical: u64, transferred: Option<u64>) {
        self.bytes_done.fetch_add(logical, Ordering::Relaxed);
        self.chunks_done.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = transferred {
            self.chunks_transferred.fetch_add(1, Ordering::Relaxed);
            self.bytes_transferred.fetch_add(t, Ordering::Relaxed);
        }
        self.emit();
    }
}
