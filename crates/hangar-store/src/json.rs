//! The JSON engine: the default [`Store`], living in one data folder.
//!
//! # Files in the data folder
//!
//! | file | purpose |
//! |---|---|
//! | `data.lock` | held with an exclusive OS file lock (`flock`) while a store is open; a second open, from any process, gets [`StoreError::Locked`] |
//! | `data.json` | the snapshot: every record as a JSON document, replaced atomically (temp file, fsync, rename, fsync of the folder) |
//! | `journal.log` | the write-ahead journal: every commit since the snapshot |
//! | `backups/data-<UTC timestamp>.json` | backup copies of the snapshot (same format, encrypted if the store is) |
//! | `*.tmp` | temp files of an interrupted replace; ignored and removed on open |
//!
//! The committed state lives in memory (a `BTreeMap` per collection, the model
//! [`MemoryStore`](crate::MemoryStore) uses too). Reads never touch the disk. One writer
//! thread applies commits in revision order: for each group of batches waiting in its queue
//! it checks the conditions against the latest state, appends one journal frame per accepted
//! batch, makes them durable with a single `fdatasync` (group commit), then applies them to
//! the in-memory model and acknowledges them. A commit is therefore visible to readers only
//! once it is durable.
//!
//! When the journal holds more than `compact_journal_frames` frames or
//! `compact_journal_bytes` bytes, and on [`Store::close`], the writer *compacts*: it writes
//! the model to `data.json` atomically, then replaces `journal.log` with an empty journal
//! (new journal id) through a temp file and rename.
//!
//! # Snapshot format (`data.json`)
//!
//! Plain stores write indented JSON that anyone can read:
//!
//! ```json
//! { "format": "hangar-json-store", "version": 1, "revision": 42,
//!   "collections": { "users": { "alice": { "revision": 40, "value": { "...": "..." } } } } }
//! ```
//!
//! Encrypted stores write a JSON envelope
//! `{ "format": "hangar-json-store", "version": 1, "encryption": "AES-256-GCM",
//! "nonce_and_ciphertext": "<base64>" }` where the base64 decodes to a random 12-byte nonce,
//! the AES-256-GCM ciphertext of the compact plain document and the 16-byte tag; the
//! associated data is the constant `hangar-json-store-snapshot-v1`.
//!
//! # Journal format (`journal.log`)
//!
//! All integers are little endian. The file starts with a 92-byte header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HNGRJNL1` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | flags: bit 0 = frames are encrypted |
//! | 16 | 16 | journal id, random, new for every journal file |
//! | 32 | 44 | key check: encrypted journals hold `nonce(12) ‖ AES-256-GCM(16 zero bytes) ‖ tag(16)` with associated data `hangar-journal-keycheck-v1 ‖ journal id`; zeros otherwise |
//! | 76 | 16 | first 16 bytes of BLAKE3 over bytes 0..76 |
//!
//! Frames follow, one per committed batch:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | frame magic `F7 48 46 01` (`0xF7` never occurs in UTF-8 JSON) |
//! | 4 | 4 | payload length `n` (at most 512 MiB) |
//! | 8 | 8 | revision of the batch |
//! | 16 | 16 | first 16 bytes of BLAKE3 over `journal id ‖ length ‖ revision ‖ payload` |
//! | 32 | n | payload |
//!
//! The plain payload is the JSON array of the batch's [`Op`]s. In an encrypted journal the
//! payload is `nonce(12) ‖ AES-256-GCM ciphertext ‖ tag(16)` with a random nonce per frame
//! and associated data `hangar-journal-frame-v1 ‖ journal id ‖ revision`, so a frame cannot
//! be moved to another position or another journal. The checksum covers the encrypted bytes,
//! so damage is told apart from a wrong key without the key.
//!
//! # Recovery rule
//!
//! On open: load `data.json` (revision `S`; an empty model if it is absent), then read the
//! journal frame by frame. Frames with a revision `<= S` before the first applied frame are
//! leftovers of a compaction interrupted between the two renames and are skipped. Every other
//! frame must carry exactly the next revision. At the first frame that is short, has a bad
//! magic, length or checksum:
//!
//! * if no intact frame follows anywhere after it, it is a torn write (or garbage) at the
//!   tail: the dropped bytes are first kept in `journal.damaged-<UTC time>` next to the
//!   journal (fsynced, mode 0600; the log names the file), then the journal is truncated
//!   there, so the store comes back at the last good commit and a damaged frame that held an
//!   acknowledged commit is not lost;
//! * if an intact frame follows, the damage is in the middle of acknowledged data, which a
//!   crash cannot cause: open fails with [`StoreError::Corrupt`] and changes nothing, unless
//!   [`JsonStoreOptions::salvage_damaged_journal`] is set, in which case the journal is cut
//!   at the damaged frame (the bytes cut are kept aside as above; restore a backup instead
//!   if possible).
//!
//! An intact frame that does not decrypt means a wrong key or tampering:
//! [`StoreError::WrongKey`]. A damaged header or snapshot is [`StoreError::Corrupt`]; the
//! atomic renames make both impossible after a crash.

mod crypto;
mod journal;
mod snapshot;

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, mpsc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::oneshot;
use tracing::{debug, error, info, info_span, warn};

use crypto::Cipher;
pub use crypto::EncryptionKey;
use journal::{HEADER_LEN, HeaderError};

use crate::model::{Model, Pending, poisoned};
use crate::{Batch, Committed, Dump, Op, Record, Result, Store, StoreError};

/// Name of the snapshot file in the data folder.
pub const SNAPSHOT_FILE: &str = "data.json";
/// Name of the journal file in the data folder.
pub const JOURNAL_FILE: &str = "journal.log";
/// Name of the lock file in the data folder.
pub const LOCK_FILE: &str = "data.lock";
/// Name of the backup folder inside the data folder.
pub const BACKUP_DIR: &str = "backups";

/// Prefix of the files a damaged or torn journal tail is kept in
/// (`journal.damaged-<UTC time>`), next to the journal, before the journal is cut.
pub const DAMAGED_TAIL_PREFIX: &str = "journal.damaged-";
const SNAPSHOT_TMP: &str = "data.json.tmp";
const JOURNAL_TMP: &str = "journal.log.tmp";
/// Most batches written by one group commit.
const MAX_GROUP: usize = 1024;
/// Wait before retrying a compaction that failed.
const COMPACT_RETRY: Duration = Duration::from_secs(30);

/// How a [`JsonStore`] behaves.
#[derive(Debug, Clone)]
pub struct JsonStoreOptions {
    /// Encrypt everything at rest with this key (see [`EncryptionKey`] for the key file
    /// format). A store created with a key can only be opened with it, and a plain store
    /// only without one.
    pub encryption_key: Option<EncryptionKey>,
    /// Take a backup when the store opens and then at this interval. `None`: no scheduled
    /// backups ([`JsonStore::backup_now`] still works).
    pub backup_interval: Option<Duration>,
    /// How many backups to keep; the oldest are removed. Values below 1 count as 1.
    pub backup_retention: usize,
    /// Compact once the journal grows past this many bytes.
    pub compact_journal_bytes: u64,
    /// Compact once the journal holds this many frames (commits).
    pub compact_journal_frames: u64,
    /// Open even when the journal is damaged in the middle, dropping every commit from the
    /// damaged frame on. Off by default: such damage is reported as [`StoreError::Corrupt`].
    pub salvage_damaged_journal: bool,
}

impl Default for JsonStoreOptions {
    fn default() -> Self {
        Self {
            encryption_key: None,
            backup_interval: None,
            backup_retention: 10,
            compact_journal_bytes: 16 * 1024 * 1024,
            compact_journal_frames: 10_000,
            salvage_damaged_journal: false,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Request {
    Commit { batch: Batch, reply: Reply<Committed> },
    Import { dump: Dump, reply: Reply<()> },
    Backup { reply: Reply<PathBuf> },
    Compact { reply: Reply<()> },
    Close { reply: Reply<()> },
}

struct Shared {
    dir: PathBuf,
    model: Arc<RwLock<Model>>,
    closed: AtomicBool,
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    encrypted: bool,
}

/// The JSON engine. See the [module documentation](self) for its files and formats.
///
/// Call [`Store::close`] before dropping it: close compacts and releases the folder before
/// it returns. Dropping an open store is safe (every acknowledged commit is already
/// durable) but the lock is released by the writer thread a moment later.
pub struct JsonStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for JsonStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonStore")
            .field("dir", &self.shared.dir)
            .field("encrypted", &self.shared.encrypted)
            .field("closed", &self.shared.closed.load(Ordering::SeqCst))
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

fn random_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| StoreError::Engine("the system random generator failed".into()))?;
    Ok(id)
}

/// fsyncs a directory so a rename or a new file in it is durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Keeps the journal bytes recovery drops (`tail`) in a new file next to the journal, mode
/// 0600, written and fsynced (with its directory entry) before the journal is cut, so a
/// damaged frame that held an acknowledged commit can still be inspected or repaired.
fn keep_damaged_tail(dir: &Path, tail: &[u8]) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ").to_string();
    let mut n = 0u32;
    loop {
        let name = match n {
            0 => format!("{DAMAGED_TAIL_PREFIX}{stamp}"),
            n => format!("{DAMAGED_TAIL_PREFIX}{stamp}-{n}"),
        };
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(mut file) => {
                file.write_all(tail).map_err(io_err(&path))?;
                file.sync_all().map_err(io_err(&path))?;
                sync_dir(dir)?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
}

/// Writes `bytes` to `tmp` and fsyncs it. The caller renames it into place.
fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(tmp).map_err(io_err(tmp))?;
    file.write_all(bytes).map_err(io_err(tmp))?;
    file.sync_all().map_err(io_err(tmp))
}

/// Atomically replaces `path` with `bytes` (temp file, fsync, rename, fsync of the folder).
fn replace_file(dir: &Path, path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    write_synced(tmp, bytes)?;
    fs::rename(tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            info!(path = %path.display(), "removed a leftover temp file of an interrupted write");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The backup files in `dir` (a data folder), oldest first. Blocking.
pub fn backup_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let backups = dir.join(BACKUP_DIR);
    let entries = match fs::read_dir(&backups) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&backups)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&backups))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("data-") && name.ends_with(".json") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// What journal recovery found.
struct Recovered {
    journal_id: [u8; 16],
    good_len: usize,
    frames: u64,
}

fn recover_journal(
    bytes: &[u8],
    path: &Path,
    cipher: Option<&Cipher>,
    model: &mut Model,
    salvage: bool,
) -> Result<Recovered> {
    let shown = path.display().to_string();
    let header = journal::decode_header(bytes, cipher).map_err(|e| match e {
        HeaderError::Damaged(detail) => StoreError::Corrupt { path: shown.clone(), detail },
        HeaderError::WrongKey => StoreError::WrongKey { path: shown.clone() },
        HeaderError::EncryptionMismatch { encrypted: true } => {
            StoreError::Invalid(format!("{shown} is encrypted: configure the store's encryption key file to open it"))
        }
        HeaderError::EncryptionMismatch { encrypted: false } => StoreError::Invalid(format!(
            "{shown} is not encrypted but an encryption key was configured; open it without a key"
        )),
    })?;
    let id = header.journal_id;
    let mut offset = HEADER_LEN;
    let mut applied = 0u64;
    let mut frames = 0u64;
    while offset < bytes.len() {
        match journal::parse_frame_at(bytes, offset, &id) {
            Ok(frame) => {
                if frame.revision <= model.revision && applied == 0 {
                    debug!(revision = frame.revision, "skipping a frame already in the snapshot");
                } else if frame.revision == model.revision + 1 {
                    let plain = journal::open_payload(bytes, &frame, &id, cipher)
                        .ok_or_else(|| StoreError::WrongKey { path: shown.clone() })?;
                    let ops: Vec<Op> = serde_json::from_slice(&plain).map_err(|e| StoreError::Corrupt {
                        path: shown.clone(),
                        detail: format!("frame at offset {offset} is intact but not a batch: {e}"),
                    })?;
                    model.apply(frame.revision, ops);
                    applied += 1;
                } else {
                    return Err(StoreError::Corrupt {
                        path: shown,
                        detail: format!(
                            "frame at offset {offset} has revision {}, expected {} (is data.json missing or from another store?)",
                            frame.revision,
                            model.revision + 1
                        ),
                    });
                }
                frames += 1;
                offset = frame.end;
            }
            Err(reason) => {
                let dropped = bytes.len() - offset;
                if let Some(next) = journal::next_good_frame(bytes, offset + 1, &id) {
                    if !salvage {
                        return Err(StoreError::Corrupt {
                            path: shown,
                            detail: format!(
                                "damaged frame at offset {offset} ({reason}) is followed by an intact frame at \
                                 offset {next}; this is not a torn write, so nothing was changed. Restore a backup, \
                                 or open with salvage_damaged_journal to keep only the commits before offset {offset}"
                            ),
                        });
                    }
                    warn!(
                        offset,
                        reason,
                        next,
                        dropped,
                        revision = model.revision,
                        "salvaging a journal damaged in the middle: dropping every commit from the damaged frame on"
                    );
                } else {
                    warn!(
                        offset,
                        reason,
                        dropped,
                        revision = model.revision,
                        "journal tail is torn or damaged; truncating it to the last good commit"
                    );
                }
                return Ok(Recovered { journal_id: id, good_len: offset, frames });
            }
        }
    }
    Ok(Recovered { journal_id: id, good_len: offset, frames })
}

impl JsonStore {
    /// Opens (or creates) the store in `dir`, recovering from any crash. Runs the file work
    /// on tokio's blocking pool.
    pub async fn open(dir: impl Into<PathBuf>, options: JsonStoreOptions) -> Result<Self> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(&dir, options))
            .await
            .map_err(|e| StoreError::Engine(format!("the open task failed: {e}")))?
    }

    /// Blocking form of [`JsonStore::open`], for code outside an async runtime.
    pub fn open_blocking(dir: &Path, options: JsonStoreOptions) -> Result<Self> {
        let span = info_span!("store_open", dir = %dir.display(), engine = "json");
        let _entered = span.enter();
        let dir = dir.to_path_buf();
        let existed = dir.is_dir();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if !existed {
            // Make the new folder's own directory entry durable.
            match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
                _ => sync_dir(Path::new("."))?,
            }
        }

        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.display().to_string(),
                    lock: lock_path.display().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }

        let cipher = options.encryption_key.as_ref().map(Cipher::new).transpose()?;
        remove_if_present(&dir.join(SNAPSHOT_TMP))?;
        remove_if_present(&dir.join(JOURNAL_TMP))?;
        for tmp in leftover_backup_temps(&dir) {
            remove_if_present(&tmp)?;
        }

        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let mut model = match fs::read(&snapshot_path) {
            Ok(bytes) => snapshot::decode(&bytes, cipher.as_ref(), &snapshot_path.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Model::default(),
            Err(e) => return Err(io_err(&snapshot_path)(e)),
        };
        let journal_path = dir.join(JOURNAL_FILE);
        let existing = match fs::read(&journal_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&journal_path)(e)),
        };
        let (journal_id, journal_len, frames) = match existing {
            Some(bytes) => {
                let found = recover_journal(
                    &bytes,
                    &journal_path,
                    cipher.as_ref(),
                    &mut model,
                    options.salvage_damaged_journal,
                )?;
                if let Some(tail) = bytes.get(found.good_len..).filter(|t| !t.is_empty()) {
                    // Kept aside first: if that fails, the journal is left as it is.
                    let kept = keep_damaged_tail(&dir, tail)?;
                    warn!(
                        file = %kept.display(),
                        bytes = tail.len(),
                        offset = found.good_len,
                        "the journal's dropped tail is kept in {}; the journal is cut at offset {}",
                        kept.display(),
                        found.good_len
                    );
                    let file = OpenOptions::new().write(true).open(&journal_path).map_err(io_err(&journal_path))?;
                    file.set_len(found.good_len as u64).map_err(io_err(&journal_path))?;
                    file.sync_all().map_err(io_err(&journal_path))?;
                }
                (found.journal_id, found.good_len, found.frames)
            }
            None => {
                if !snapshot_path.exists() {
                    // A new store: write the (empty) snapshot users expect to find.
                    let bytes = snapshot::encode(&model, cipher.as_ref())?;
                    replace_file(&dir, &snapshot_path, &dir.join(SNAPSHOT_TMP), &bytes)?;
                    info!("created a new store");
                }
                let id = random_id()?;
                let header = journal::encode_header(id, cipher.as_ref())?;
                replace_file(&dir, &journal_path, &dir.join(JOURNAL_TMP), &header)?;
                (id, HEADER_LEN, 0)
            }
        };
        let journal = OpenOptions::new().append(true).open(&journal_path).map_err(io_err(&journal_path))?;
        info!(revision = model.revision, frames, encrypted = cipher.is_some(), "store opened");

        let model = Arc::new(RwLock::new(model));
        let (sender, receiver) = mpsc::channel();
        let encrypted = cipher.is_some();
        let writer = Writer {
            dir: dir.clone(),
            model: Arc::clone(&model),
            cipher,
            journal,
            journal_id,
            journal_bytes: journal_len as u64,
            journal_frames: frames,
            compact_bytes: options.compact_journal_bytes.max(1),
            compact_frames: options.compact_journal_frames.max(1),
            compact_not_before: None,
            backup_interval: options.backup_interval,
            backup_retention: options.backup_retention.max(1),
            next_backup: options.backup_interval.map(|_| Instant::now()),
            failed: None,
            lock: Some(lock),
        };
        std::thread::Builder::new()
            .name("hangar-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(io_err(&dir))?;
        Ok(Self {
            shared: Arc::new(Shared {
                dir,
                model,
                closed: AtomicBool::new(false),
                sender: Mutex::new(Some(sender)),
                encrypted,
            }),
        })
    }

    /// The data folder.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether the store is encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.shared.encrypted
    }

    /// The revision of the latest commit.
    pub fn revision(&self) -> Result<u64> {
        Ok(self.read()?.revision)
    }

    /// Writes a backup now (a consistent copy of the committed state) and prunes old ones.
    /// Returns the backup's path.
    pub async fn backup_now(&self) -> Result<PathBuf> {
        self.request(|reply| Request::Backup { reply }).await
    }

    /// Compacts the journal into `data.json` now.
    pub async fn compact_now(&self) -> Result<()> {
        self.request(|reply| Request::Compact { reply }).await
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Model>> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.shared.model.read().map_err(|_| poisoned())
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        {
            let guard = self.shared.sender.lock().map_err(|_| poisoned())?;
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            sender.send(make(reply)).map_err(|_| StoreError::Closed)?;
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn leftover_backup_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir.join(BACKUP_DIR)) else {
        return Vec::new();
    };
    entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|ext| ext == "tmp")).collect()
}

#[async_trait]
impl Store for JsonStore {
    fn engine(&self) -> &'static str {
        "json"
    }
    fn shared(&self) -> bool {
        false
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>> {
        Ok(self.read()?.get(collection, id))
    }

    async fn list(&self, collection: &str) -> Result<Vec<Record>> {
        Ok(self.read()?.list(collection))
    }

    async fn list_page(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        Ok(self.read()?.list_page(collection, after, limit))
    }

    #[tracing::instrument(level = "debug", name = "store_commit", skip_all, fields(ops = batch.ops.len(), conditions = batch.conditions.len()))]
    async fn commit(&self, batch: Batch) -> Result<Committed> {
        batch.validate()?;
        self.request(|reply| Request::Commit { batch, reply }).await
    }

    async fn export(&self) -> Result<Dump> {
        Ok(self.read()?.export())
    }

    #[tracing::instrument(name = "store_import", skip_all, fields(collections = dump.collections.len()))]
    async fn import(&self, dump: Dump) -> Result<()> {
        dump.validate()?;
        self.request(|reply| Request::Import { dump, reply }).await
    }

    #[tracing::instrument(name = "store_close", skip_all, fields(dir = %self.shared.dir.display()))]
    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let sender = self.shared.sender.lock().map_err(|_| poisoned())?.take();
        let Some(sender) = sender else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        sender.send(Request::Close { reply }).map_err(|_| StoreError::Closed)?;
        drop(sender);
        answer.await.map_err(|_| StoreError::Engine("the store writer stopped before closing".into()))?
    }
}

/// The single writer: owns the journal and the lock, and is the only code that changes the
/// model.
struct Writer {
    dir: PathBuf,
    model: Arc<RwLock<Model>>,
    cipher: Option<Cipher>,
    journal: File,
    journal_id: [u8; 16],
    journal_bytes: u64,
    journal_frames: u64,
    compact_bytes: u64,
    compact_frames: u64,
    compact_not_before: Option<Instant>,
    backup_interval: Option<Duration>,
    backup_retention: usize,
    next_backup: Option<Instant>,
    /// Set after a write failure that leaves the journal in an unknown state: later writes
    /// are refused until the store is reopened (which recovers the journal).
    failed: Option<String>,
    lock: Option<File>,
}

/// A batch accepted into the current group.
struct Accepted {
    revision: u64,
    ops: Vec<Op>,
}

impl Writer {
    fn run(mut self, requests: mpsc::Receiver<Request>) {
        loop {
            let first = match self.next_backup {
                Some(due) => {
                    let now = Instant::now();
                    if due <= now {
                        self.scheduled_backup();
                        continue;
                    }
                    match requests.recv_timeout(due - now) {
                        Ok(request) => request,
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match requests.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            let mut pending = vec![first];
            while pending.len() < MAX_GROUP {
                match requests.try_recv() {
                    Ok(request) => pending.push(request),
                    Err(_) => break,
                }
            }
            let mut group = Vec::new();
            for request in pending {
                match request {
                    Request::Commit { batch, reply } => group.push((batch, reply)),
                    Request::Import { dump, reply } => {
                        self.commit_group(std::mem::take(&mut group));
                        let _ = reply.send(self.import(dump));
                    }
                    Request::Backup { reply } => {
                        self.commit_group(std::mem::take(&mut group));
                        let _ = reply.send(self.backup());
                    }
                    Request::Compact { reply } => {
                        self.commit_group(std::mem::take(&mut group));
                        let _ = reply.send(self.compact());
                    }
                    Request::Close { reply } => {
                        self.commit_group(std::mem::take(&mut group));
                        let result =
                            if self.failed.is_none() && self.journal_frames > 0 { self.compact() } else { Ok(()) };
                        self.lock = None;
                        info!(dir = %self.dir.display(), "store closed");
                        let _ = reply.send(result);
                        // Requests queued behind Close are dropped: they answer Closed.
                        return;
                    }
                }
            }
            self.commit_group(group);
            self.maybe_compact();
        }
        debug!(dir = %self.dir.display(), "store dropped without close; writer exits");
    }

    fn failure(&self) -> Option<StoreError> {
        self.failed.as_ref().map(|why| {
            StoreError::Engine(format!(
                "the store refuses writes after an earlier write failure ({why}); restart to recover"
            ))
        })
    }

    fn mark_failed(&mut self, why: String) {
        error!(dir = %self.dir.display(), %why, "store write failure; refusing further writes");
        self.failed = Some(why);
    }

    /// Checks, journals, fsyncs once, applies and acknowledges a group of batches.
    fn commit_group(&mut self, group: Vec<(Batch, Reply<Committed>)>) {
        if group.is_empty() {
            return;
        }
        let span = info_span!("store_group_commit", batches = group.len());
        let _entered = span.enter();
        if self.failed.is_some() {
            for (_, reply) in group {
                let _ = reply.send(Err(self.failure().unwrap_or(StoreError::Closed)));
            }
            return;
        }
        let mut outcomes: Vec<(Reply<Committed>, Result<Committed>)> = Vec::with_capacity(group.len());
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut buffer = Vec::new();
        {
            let model = match self.model.read() {
                Ok(model) => model,
                Err(_) => {
                    for (_, reply) in group {
                        let _ = reply.send(Err(poisoned()));
                    }
                    return;
                }
            };
            let mut overlay = Pending::new();
            let mut revision = model.revision;
            for (batch, reply) in group {
                if let Err(conflict) = model.check_conditions(&batch.conditions, &overlay) {
                    outcomes.push((reply, Err(StoreError::Conflict(conflict))));
                    continue;
                }
                if batch.ops.is_empty() {
                    outcomes.push((reply, Ok(Committed { revision })));
                    continue;
                }
                let plain = match serde_json::to_vec(&batch.ops) {
                    Ok(plain) => plain,
                    Err(e) => {
                        outcomes.push((reply, Err(StoreError::Invalid(format!("batch is not serialisable: {e}")))));
                        continue;
                    }
                };
                let next = revision + 1;
                match journal::encode_frame(&mut buffer, &self.journal_id, next, &plain, self.cipher.as_ref()) {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        outcomes.push((
                            reply,
                            Err(StoreError::Invalid(format!(
                                "batch of {} bytes exceeds the {} byte limit",
                                plain.len(),
                                journal::MAX_FRAME_PAYLOAD
                            ))),
                        ));
                        continue;
                    }
                    Err(e) => {
                        outcomes.push((reply, Err(e)));
                        continue;
                    }
                }
                for op in &batch.ops {
                    match op {
                        Op::Put { collection, id, .. } => overlay.insert((collection.clone(), id.clone()), Some(next)),
                        Op::Delete { collection, id } => overlay.insert((collection.clone(), id.clone()), None),
                    };
                }
                revision = next;
                accepted.push(Accepted { revision: next, ops: batch.ops });
                outcomes.push((reply, Ok(Committed { revision: next })));
            }
        }
        if !buffer.is_empty() {
            let written = self.journal.write_all(&buffer).and_then(|()| self.journal.sync_data());
            if let Err(e) = written {
                let why = format!("journal write failed: {e}");
                self.mark_failed(why.clone());
                let path = self.dir.join(JOURNAL_FILE).display().to_string();
                for (reply, outcome) in outcomes {
                    let answer = match outcome {
                        Ok(_) => Err(StoreError::Io {
                            path: path.clone(),
                            source: std::io::Error::new(e.kind(), why.clone()),
                        }),
                        other => other,
                    };
                    let _ = reply.send(answer);
                }
                return;
            }
            self.journal_bytes += buffer.len() as u64;
            self.journal_frames += accepted.len() as u64;
            let shared_model = Arc::clone(&self.model);
            let applied = match shared_model.write() {
                Ok(mut model) => {
                    for batch in accepted {
                        model.apply(batch.revision, batch.ops);
                    }
                    true
                }
                Err(_) => false,
            };
            if !applied {
                self.mark_failed("state lock poisoned".into());
                for (reply, _) in outcomes {
                    let _ = reply.send(Err(poisoned()));
                }
                return;
            }
        }
        for (reply, outcome) in outcomes {
            let _ = reply.send(outcome);
        }
    }

    fn maybe_compact(&mut self) {
        if self.failed.is_some() {
            return;
        }
        if self.journal_frames < self.compact_frames && self.journal_bytes < self.compact_bytes {
            return;
        }
        if self.compact_not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if let Err(e) = self.compact() {
            error!(error = %e, "compaction failed; the journal keeps every commit, retrying later");
            self.compact_not_before = Some(Instant::now() + COMPACT_RETRY);
        }
    }

    fn encode_model(&self) -> Result<Vec<u8>> {
        let model = self.model.read().map_err(|_| poisoned())?;
        snapshot::encode(&model, self.cipher.as_ref())
    }

    /// Writes `bytes` as the new `data.json`. Failing after the rename leaves the disk
    /// ahead of the journal, so that marks the store failed.
    fn write_snapshot(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let tmp = self.dir.join(SNAPSHOT_TMP);
        write_synced(&tmp, bytes)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if let Err(e) = sync_dir(&self.dir) {
            self.mark_failed(format!("fsync of the data folder after replacing data.json failed: {e}"));
            return Err(e);
        }
        Ok(())
    }

    /// Replaces the journal with an empty one (new journal id).
    fn reset_journal(&mut self) -> Result<()> {
        let id = random_id()?;
        let header = journal::encode_header(id, self.cipher.as_ref())?;
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = self.dir.join(JOURNAL_TMP);
        write_synced(&tmp, &header)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        // From here the old handle points to an unlinked file: switch or stop writing.
        let opened = OpenOptions::new().append(true).open(&path).map_err(io_err(&path));
        let synced = opened.and_then(|file| sync_dir(&self.dir).map(|()| file));
        match synced {
            Ok(file) => {
                self.journal = file;
                self.journal_id = id;
                self.journal_bytes = HEADER_LEN as u64;
                self.journal_frames = 0;
                Ok(())
            }
            Err(e) => {
                self.mark_failed(format!("switching to the new journal failed: {e}"));
                Err(e)
            }
        }
    }

    fn compact(&mut self) -> Result<()> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let span = info_span!("store_compact", frames = self.journal_frames, bytes = self.journal_bytes);
        let _entered = span.enter();
        let started = Instant::now();
        let bytes = self.encode_model()?;
        self.write_snapshot(&bytes)?;
        self.reset_journal()?;
        self.compact_not_before = None;
        info!(
            snapshot_bytes = bytes.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "compacted the journal into data.json"
        );
        Ok(())
    }

    fn import(&mut self, dump: Dump) -> Result<()> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let revision = self.model.read().map_err(|_| poisoned())?.revision + 1;
        let model = Model::from_dump(revision, dump);
        let bytes = snapshot::encode(&model, self.cipher.as_ref())?;
        // The rename of data.json is the commit point: the old journal's frames all carry
        // older revisions and are skipped by recovery from now on.
        self.write_snapshot(&bytes)?;
        *self.model.write().map_err(|_| poisoned())? = model;
        if let Err(e) = self.reset_journal() {
            warn!(error = %e, "import is durable but resetting the journal failed");
        }
        info!(revision, "imported a dump");
        Ok(())
    }

    fn backup(&mut self) -> Result<PathBuf> {
        let span = info_span!("store_backup");
        let _entered = span.enter();
        let bytes = self.encode_model()?;
        let dir = self.dir.join(BACKUP_DIR);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let name = format!("data-{}.json", chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"));
        let path = dir.join(&name);
        replace_file(&dir, &path, &dir.join(format!(".{name}.tmp")), &bytes)?;
        let files = backup_files(&self.dir)?;
        let excess = files.len().saturating_sub(self.backup_retention);
        for old in &files[..excess] {
            fs::remove_file(old).map_err(io_err(old))?;
            debug!(path = %old.display(), "removed an old backup");
        }
        info!(path = %path.display(), bytes = bytes.len(), "backup written");
        Ok(path)
    }

    fn scheduled_backup(&mut self) {
        if let Err(e) = self.backup() {
            error!(error = %e, "scheduled backup failed");
        }
        self.next_backup = self.backup_interval.map(|every| Instant::now() + every);
    }
}
