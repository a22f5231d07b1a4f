//! Stores that wrap another store: a key prefix, and transfer counters.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{BlobError, BlobStore, ObjectInfo, Result, validate_key, validate_prefix};

/// Puts every key of the inner store under `prefix/`.
#[derive(Debug, Clone)]
pub struct PrefixedStore {
    inner: Arc<dyn BlobStore>,
    prefix: String,
}

impl PrefixedStore {
    /// Wraps `inner`; `prefix` must be a valid key (leading/trailing `/` are
    /// trimmed).
    pub fn new(inner: Arc<dyn BlobStore>, prefix: &str) -> Result<Self> {
        let prefix = prefix.trim_matches('/').to_string();
        validate_key(&prefix)?;
        Ok(PrefixedStore { inner, prefix })
    }

    fn full(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(format!("{}/{key}", self.prefix))
    }

    fn strip(&self, info: ObjectInfo) -> Option<ObjectInfo> {
        let rest = info.key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        Some(ObjectInfo { key: rest.to_string(), size: info.size })
    }

    fn unprefix_err(&self, e: BlobError) -> BlobError {
        match e {
            BlobError::NotFound { key } => BlobError::NotFound {
                key: key.strip_prefix(&format!("{}/", self.prefix)).map(str::to_string).unwrap_or(key),
            },
            other => other,
        }
    }
}

#[async_trait]
impl BlobStore for PrefixedStore {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner.put(&self.full(key)?, data).await
    }
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64> {
        self.inner.put_file(&self.full(key)?, path).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        let full = self.full(key)?;
        self.inner.get(&full).await.map_err(|e| self.unprefix_err(e))
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let full = self.full(key)?;
        self.inner.get_range(&full, range).await.map_err(|e| self.unprefix_err(e))
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        Ok(self.inner.head(&self.full(key)?).await?.and_then(|i| self.strip(i)))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        validate_prefix(prefix)?;
        let p = prefix.trim_end_matches('/');
        let full = if p.is_empty() { self.prefix.clone() } else { format!("{}/{p}", self.prefix) };
        Ok(self.inner.list(&full).await?.into_iter().filter_map(|i| self.strip(i)).collect())
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(&self.full(key)?).await
    }
}

/// A snapshot of a [`CountingStore`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferCounts {
    /// Successful `put`/`put_file` calls.
    pub puts: u64,
    /// Bytes stored by them.
    pub put_bytes: u64,
    /// Successful `get`/`get_range` calls.
    pub gets: u64,
    /// Bytes read by them.
    pub get_bytes: u64,
    /// `head` calls.
    pub heads: u64,
    /// `list` calls.
    pub lists: u64,
    /// `delete` calls.
    pub deletes: u64,
}

/// Counts the operations and bytes that go through it, for metrics and for
/// tests that check what a transfer really moved.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn BlobStore>,
    puts: AtomicU64,
    put_bytes: AtomicU64,
    gets: AtomicU64,
    get_bytes: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
}

impl CountingStore {
    /// Wraps `inner` with all counters at zero.
    pub fn new(inner: Arc<dyn BlobStore>) -> Self {
        CountingStore {
            inner,
            puts: AtomicU64::new(0),
            put_bytes: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            get_bytes: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
        }
    }

    /// The counters now.
    pub fn counts(&self) -> TransferCounts {
        TransferCounts {
            puts: self.puts.load(Ordering::Relaxed),
            put_bytes: self.put_bytes.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            get_bytes: self.get_bytes.load(Ordering::Relaxed),
            heads: self.heads.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl BlobStore for CountingStore {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.inner.put(key, data).await?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.put_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64> {
        let n = self.inner.put_file(key, path).await?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.put_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        let b = self.inner.get(key).await?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.get_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let b = self.inner.get_range(key, range).await?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.get_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.heads.fetch_add(1, Ordering::Relaxed);
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.deletes.fetch_add(1, Ordering::Relaxed);
        self.inner.delete(key).await
    }
}
