//! The host's chunk cache: verified stored (compressed) chunks kept on disk
//! by hash, with a size budget and least-recently-used eviction.
//!
//! Layout: `<dir>/<first two hex digits>/<hash>`; writes go through
//! `<dir>/.tmp` and a rename, so a crash never leaves a partial chunk under
//! its final name. Last use is the file's mtime (updated on every hit), so
//! the LRU order survives restarts; within one process a counter breaks
//! ties between uses closer together than the file system's clock.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, instrument};

use crate::{ImageError, Result, io_err, join_err};

/// How much the cache may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheLimits {
    /// Keep the cache's own size at or under this many bytes.
    pub max_bytes: Option<u64>,
    /// Evict until the file system has at least this many bytes free.
    pub keep_free_bytes: Option<u64>,
}

#[derive(Debug)]
struct State {
    entries: HashMap<String, (u64, u128)>,
    total: u64,
    clock: u128,
}

impl State {
    fn tick(&mut self, at: SystemTime) -> u128 {
        let nanos = at.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        self.clock = nanos.max(self.clock + 1);
        self.clock
    }
}

/// A chunk cache folder. Safe to share between tasks (`Arc<ChunkCache>`)
/// and, thanks to atomic renames, between processes on one host (each then
/// keeps its own view of the size).
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    limits: CacheLimits,
    state: Mutex<State>,
}

fn is_hash(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, indexing what it holds.
    pub fn open(dir: impl AsRef<Path>, limits: CacheLimits) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let tmp = dir.join(".tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err("create cache", &tmp))?;
        let mut found = Vec::new();
        for shard in fs::read_dir(&dir).map_err(io_err("read cache", &dir))? {
            let shard = shard.map_err(io_err("read cache", &dir))?;
            let name = shard.file_name().to_string_lossy().into_owned();
            if name.len() != 2 || !shard.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(shard.path()).map_err(io_err("read cache", &shard.path()))? {
                let f = f.map_err(io_err("read cache", &shard.path()))?;
                let hash = f.file_name().to_string_lossy().into_owned();
                if !is_hash(&hash) {
                    continue;
                }
                let meta = f.metadata().map_err(io_err("stat cache entry", &f.path()))?;
                found.push((hash, meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)));
            }
        }
        found.sort_by_key(|(_, _, m)| *m);
        let mut state = State { entries: HashMap::new(), total: 0, clock: 0 };
        for (hash, size, modified) in found {
            let t = state.tick(modified);
            state.total += size;
            state.entries.insert(hash, (size, t));
        }
        Ok(ChunkCache { dir, limits, state: Mutex::new(state) })
    }

    fn path_of(&self, hash: &str) -> PathBuf {
        self.dir.join(&hash[..2.min(hash.len())]).join(hash)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes held.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the cache holds `hash` (without touching it).
    pub fn contains(&self, hash: &str) -> bool {
        self.lock().entries.contains_key(hash)
    }

    /// Reads a chunk's stored bytes and marks it used; `None` when absent.
    /// The caller verifies the content and calls [`ChunkCache::remove`] if
    /// it does not match.
    #[instrument(skip(self))]
    pub async fn get(&self, hash: &str) -> Option<Vec<u8>> {
        if !is_hash(hash) || !self.contains(hash) {
            return None;
        }
        let path = self.path_of(hash);
        let read = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let data = fs::read(&path)?;
            let now = SystemTime::now();
            fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(now))?;
            Ok(data)
        })
        .await;
        match read {
            Ok(Ok(data)) => {
                let mut st = self.lock();
                let t = st.tick(SystemTime::now());
                if let Some(e) = st.entries.get_mut(hash) {
                    e.1 = t;
                }
                Some(data)
            }
            _ => {
                self.forget(hash);
                None
            }
        }
    }

    fn forget(&self, hash: &str) {
        let mut st = self.lock();
        if let Some((size, _)) = st.entries.remove(hash) {
            st.total = st.total.saturating_sub(size);
        }
    }

    /// Drops a chunk (e.g. one that failed verification).
    pub async fn remove(&self, hash: &str) {
        if !is_hash(hash) {
            return;
        }
        self.forget(hash);
        let path = self.path_of(hash);
        let _ = tokio::task::spawn_blocking(move || fs::remove_file(path)).await;
    }

    /// Stores a verified chunk's stored bytes, then evicts as the limits
    /// require.
    #[instrument(skip(self, data), fields(len = data.len()))]
    pub async fn insert(&self, hash: &str, data: bytes::Bytes) -> Result<()> {
        if !is_hash(hash) {
            return Err(ImageError::Manifest(format!("bad chunk hash {hash:?}")));
        }
        let path = self.path_of(hash);
        let tmp = self.dir.join(".tmp").join(format!("{hash}.{}", uuid::Uuid::new_v4().simple()));
        let len = data.len() as u64;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let write = || -> io::Result<()> {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(&data)?;
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::rename(&tmp, &path)
            };
            write().map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err("write cache entry", &path)(e)
            })
        })
        .await
        .map_err(join_err)??;
        {
            let mut st = self.lock();
            let t = st.tick(SystemTime::now());
            if let Some((old, _)) = st.entries.insert(hash.to_string(), (len, t)) {
                st.total = st.total.saturating_sub(old);
            }
            st.total += len;
        }
        self.evict().await
    }

    /// Free bytes on the cache's file system.
    pub fn free_bytes(&self) -> Result<u64> {
        let st = rustix::fs::statvfs(&self.dir).map_err(|e| io_err("statvfs", &self.dir)(io::Error::from(e)))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Evicts least recently used chunks until the cache is within its
    /// limits. Returns nothing; evictions are logged.
    pub async fn evict(&self) -> Result<()> {
        let CacheLimits { max_bytes, keep_free_bytes } = self.limits;
        if max_bytes.is_none() && keep_free_bytes.is_none() {
            return Ok(());
        }
        let free = match keep_free_bytes {
            Some(_) => Some(self.free_bytes()?),
            None => None,
        };
        let victims: Vec<(String, u64)> = {
            let st = self.lock();
            let over_size = max_bytes.map_or(0, |m| st.total.saturating_sub(m));
            let short_free = match (keep_free_bytes, free) {
                (Some(k), Some(f)) => k.saturating_sub(f),
                _ => 0,
            };
            let need = over_size.max(short_free);
            if need == 0 {
                return Ok(());
            }
            let mut all: Vec<(&String, &(u64, u128))> = st.entries.iter().collect();
            all.sort_by_key(|(h, (_, t))| (*t, (*h).clone()));
            let mut freed = 0u64;
            let mut out = Vec::new();
            for (h, (size, _)) in all {
                if freed >= need {
                    break;
                }
                freed += size;
                out.push((h.clone(), *size));
            }
            out
        };
        for (hash, size) in victims {
            debug!(%hash, size, "evicting cached chunk");
            self.remove(&hash).await;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn h(i: u8) -> String {
        blake3::hash(&[i]).to_hex().to_string()
    }

    #[tokio::test]
    async fn evicts_least_recently_used_first_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let limits = CacheLimits { max_bytes: Some(3000), keep_free_bytes: None };
        let cache = ChunkCache::open(dir.path(), limits).unwrap();
        for i in 0..3 {
            cache.insert(&h(i), vec![i; 1000].into()).await.unwrap();
        }
        assert_eq!(cache.total_bytes(), 3000);
        // Use chunk 0, so chunk 1 is now the least recently used.
        assert_eq!(cache.get(&h(0)).await.unwrap(), vec![0; 1000]);
        cache.insert(&h(3), vec![3; 1000].into()).await.unwrap();
        assert!(cache.contains(&h(0)) && !cache.contains(&h(1)));
        assert!(cache.contains(&h(2)) && cache.contains(&h(3)));
        assert_eq!(cache.total_bytes(), 3000);
        assert!(!dir.path().join(&h(1)[..2]).join(h(1)).exists(), "evicted file still on disk");
        drop(cache);
        let reopened = ChunkCache::open(dir.path(), limits).unwrap();
        assert_eq!(reopened.len(), 3);
        assert_eq!(reopened.get(&h(3)).await.unwrap(), vec![3; 1000]);
        assert!(reopened.get(&h(1)).await.is_none());
    }

    #[tokio::test]
    async fn keep_free_evicts_everything_when_the_disk_is_short() {
        let dir = tempfile::tempdir().unwrap();
        let cache =
            ChunkCache::open(dir.path(), CacheLimits { max_bytes: None, keep_free_bytes: Some(u64::MAX) }).unwrap();
        cache.insert(&h(1), vec![1; 10].into()).await.unwrap();
        assert!(cache.is_empty(), "an impossible free-space target must empty the cache");
    }
}
