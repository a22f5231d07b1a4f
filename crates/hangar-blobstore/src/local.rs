//! A blob store in a local folder.
//!
//! Writes are atomic: the content goes to a temp file under
//! `<root>/.hangar-tmp/`, is `fsync`ed, renamed over the final name, and the
//! parent folder is `fsync`ed. Keys never start a segment with `.`, so the
//! temp folder never shows up in listings.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tracing::instrument;

use crate::{BlobError, BlobStore, ObjectInfo, Result, clamp_range, validate_key, validate_prefix};

const TMP_DIR: &str = ".hangar-tmp";
const PROVIDER: &str = "local-storage";

/// A [`BlobStore`] backed by a folder.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io_err(op: &'static str, key: &str) -> impl FnOnce(io::Error) -> BlobError {
    let key = key.to_string();
    move |source| BlobError::Io { op, key, source }
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    key: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BlobError::Backend {
        provider: PROVIDER,
        op,
        key: key.to_string(),
        message: format!("worker task failed: {e}"),
    })?
}

impl LocalStore {
    /// Opens a store rooted at `root`. Nothing is created until the first write (then the
    /// root and its temp folder), so opening and reading a folder leaves no trace in it.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        Ok(LocalStore { root: root.as_ref().to_path_buf() })
    }

    /// The store's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `key` (the key must be valid).
    pub fn path_of(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes via a temp file filled by `fill`, then renames into place.
    fn atomic_write(
        root: &Path,
        key: &str,
        target: &Path,
        fill: impl FnOnce(&mut File) -> io::Result<u64>,
    ) -> Result<u64> {
        let tmp = root.join(TMP_DIR).join(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        let result = (|| {
            fs::create_dir_all(root.join(TMP_DIR))?;
            let mut file = File::create(&tmp)?;
            let n = fill(&mut file)?;
            file.sync_all()?;
            drop(file);
            let parent = target.parent().unwrap_or(root);
            fs::create_dir_all(parent)?;
            fs::rename(&tmp, target)?;
            File::open(parent)?.sync_all()?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err("put", key))
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let file_type = entry.file_type()?;
        let path = entry.path();
        if file_type.is_dir() {
            walk(root, &path, out)?;
        } else if file_type.is_file() {
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let key = rel.to_string_lossy().into_owned();
            if validate_key(&key).is_ok() {
                out.push(ObjectInfo { key, size: entry.metadata()?.len() });
            }
        }
    }
    Ok(())
}

#[async_trait]
impl BlobStore for LocalStore {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    #[instrument(skip(self, data), fields(len = data.len()))]
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let target = self.path_of(key)?;
        let root = self.root.clone();
        let k = key.to_string();
        blocking("put", key, move || {
            LocalStore::atomic_write(&root, &k, &target, |f| {
                f.write_all(&data)?;
                Ok(data.len() as u64)
            })
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self))]
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64> {
        let target = self.path_of(key)?;
        let root = self.root.clone();
        let k = key.to_string();
        let source = path.to_path_buf();
        blocking("put_file", key, move || {
            LocalStore::atomic_write(&root, &k, &target, |f| {
                let mut src = File::open(&source)?;
                io::copy(&mut src, f)
            })
        })
        .await
    }

    #[instrument(skip(self))]
    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path_of(key)?;
        let k = key.to_string();
        blocking("get", key, move || match fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::NotFound { key: k }),
            Err(e) => Err(io_err("get", &k)(e)),
        })
        .await
    }

    #[instrument(skip(self))]
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path_of(key)?;
        let k = key.to_string();
        blocking("get_range", key, move || {
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(BlobError::NotFound { key: k });
                }
                Err(e) => return Err(io_err("get_range", &k)(e)),
            };
            let size = file.metadata().map_err(io_err("get_range", &k))?.len();
            let r = clamp_range(&k, &range, size)?;
            file.seek(SeekFrom::Start(r.start)).map_err(io_err("get_range", &k))?;
            let len = usize::try_from(r.end - r.start).map_err(|_| BlobError::InvalidRange {
                key: k.clone(),
                start: r.start,
                end: r.end,
                size,
            })?;
            let mut buf = vec![0u8; len];
            file.read_exact(&mut buf).map_err(io_err("get_range", &k))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    #[instrument(skip(self))]
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path_of(key)?;
        let k = key.to_string();
        blocking("head", key, move || match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo { key: k, size: m.len() })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("head", &k)(e)),
        })
        .await
    }

    #[instrument(skip(self))]
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        validate_prefix(prefix)?;
        let prefix = prefix.trim_end_matches('/').to_string();
        let root = self.root.clone();
        let p = prefix.clone();
        blocking("list", &prefix, move || {
            let mut out = Vec::new();
            let dir = if p.is_empty() { root.clone() } else { root.join(&p) };
            walk(&root, &dir, &mut out).map_err(io_err("list", &p))?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    #[instrument(skip(self))]
    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        let k = key.to_string();
        blocking("delete", key, move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &k)(e)),
        })
        .await
    }
}
