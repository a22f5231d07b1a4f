//! Hangar blob storage: one small object-safe async trait, [`BlobStore`], and
//! its providers.
//!
//! * [`local::LocalStore`]: a folder on a local disk, with atomic writes
//!   (temp file, `fsync`, rename).
//! * [`objstore::ObjectStoreBlobStore`]: AWS S3 and S3-compatible servers
//!   (MinIO, moto, ...) and Azure Blob Storage, through the `object_store`
//!   crate.
//! * [`artifactory::ArtifactoryStore`]: an Artifactory generic repository
//!   (or any WebDAV-ish HTTP file server) over plain `reqwest`.
//!
//! Stores are built from the reference service's connection strings
//! (`provider=aws-s3;bucket=...`), parsed by [`config::StoreConfig`], with
//! [`open`]. Every provider passes the same [`conformance`] suite.
//!
//! Keys are `/`-separated relative paths made of a restricted character set
//! (see [`validate_key`]), so they map to file names and URLs without
//! escaping.

pub mod artifactory;
pub mod config;
pub mod conformance;
pub mod local;
pub mod objstore;
pub mod wrappers;

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use config::{ConfigError, Secret, StoreConfig};
pub use wrappers::{CountingStore, PrefixedStore, TransferCounts};

/// Objects at least this large are uploaded by [`BlobStore::put_file`] in
/// several parts where the provider supports it.
pub const MULTIPART_THRESHOLD: u64 = 32 * 1024 * 1024;

/// Size of one part of a multipart upload.
pub const MULTIPART_PART_SIZE: usize = 16 * 1024 * 1024;

/// How many parts of one multipart upload are in flight at once.
pub const MULTIPART_CONCURRENCY: usize = 4;

/// Longest key accepted by [`validate_key`].
pub const MAX_KEY_LEN: usize = 1024;

/// What a store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's key, relative to the store's root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// Errors of every blob store operation.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The object does not exist.
    #[error("object {key:?} not found")]
    NotFound {
        /// The missing key.
        key: String,
    },
    /// The key is not acceptable (empty, `..`, bad characters, too long).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The rejected key.
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A ranged read asked for bytes outside the object.
    #[error("invalid range {start}..{end} for object {key:?} of {size} bytes")]
    InvalidRange {
        /// The key read.
        key: String,
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
        /// Size of the object (0 when unknown).
        size: u64,
    },
    /// The store rejected our credentials.
    #[error("{provider}: access denied for {op} {key:?}: {message}")]
    Unauthorized {
        /// Provider name.
        provider: &'static str,
        /// Operation attempted.
        op: &'static str,
        /// Key involved.
        key: String,
        /// Server's message.
        message: String,
    },
    /// The store configuration is invalid or the store cannot be built.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A local I/O error.
    #[error("{op} {key:?}: {source}")]
    Io {
        /// Operation attempted.
        op: &'static str,
        /// Key or path involved.
        key: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Any other error reported by the provider or the network.
    #[error("{provider}: {op} {key:?} failed: {message}")]
    Backend {
        /// Provider name.
        provider: &'static str,
        /// Operation attempted.
        op: &'static str,
        /// Key involved.
        key: String,
        /// Description of the failure.
        message: String,
    },
}

impl BlobError {
    /// True when the error means the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BlobError::NotFound { .. })
    }
}

/// Result alias of this crate.
pub type Result<T, E = BlobError> = std::result::Result<T, E>;

/// A flat namespace of immutable-ish objects addressed by key.
///
/// Object safe: use it as `Arc<dyn BlobStore>`. Semantics every provider
/// follows (checked by [`conformance`]):
/// * `put`/`put_file` replace an existing object atomically: readers see the
///   old or the new content, never a mix or a partial object.
/// * `get` of a missing key is [`BlobError::NotFound`]; `head` of a missing
///   key is `Ok(None)`; `delete` of a missing key is `Ok(())`.
/// * `get_range(start..end)` returns bytes `start..min(end, size)`; a range
///   with `start >= size` or `start >= end` is [`BlobError::InvalidRange`].
/// * `list(prefix)` returns every object whose key is `prefix` followed by
///   `/` and more (an empty prefix lists everything), sorted by key.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Short provider name (`local-storage`, `aws-s3`, ...), for messages.
    fn provider(&self) -> &'static str;

    /// Stores `data` under `key`.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    /// Stores the content of the local file `path` under `key`, streaming it
    /// and using a multipart upload for large files where supported.
    /// Returns the number of bytes stored.
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64>;

    /// Reads the whole object.
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Reads bytes `range` of the object (see the trait docs for clamping).
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;

    /// Returns the object's size, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// Lists the objects under `prefix` (recursively), sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Deletes the object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Checks that `key` is a usable key: 1 to [`MAX_KEY_LEN`] bytes, segments
/// separated by single `/`, each segment made of ASCII letters, digits and
/// `-_.+=@,~`, not starting with `.` (so `.`/`..` and hidden names are out).
pub fn validate_key(key: &str) -> Result<()> {
    let bad = |reason| BlobError::InvalidKey { key: key.to_string(), reason };
    if key.is_empty() {
        return Err(bad("empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(bad("key too long"));
    }
    for segment in key.split('/') {
        validate_segment(segment).map_err(bad)?;
    }
    Ok(())
}

/// Like [`validate_key`] but also accepts the empty prefix (list everything).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() { Ok(()) } else { validate_key(prefix.trim_end_matches('/')) }
}

fn validate_segment(segment: &str) -> std::result::Result<(), &'static str> {
    if segment.is_empty() {
        return Err("empty path segment (leading, trailing or double '/')");
    }
    if segment.starts_with('.') {
        return Err("path segment starts with '.'");
    }
    if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+=@,~".contains(&b)) {
        return Err("character outside [A-Za-z0-9-_.+=@,~/]");
    }
    Ok(())
}

/// Checks a requested range against an object size and returns the clamped
/// range, or [`BlobError::InvalidRange`].
pub fn clamp_range(key: &str, range: &Range<u64>, size: u64) -> Result<Range<u64>> {
    if range.start >= range.end || range.start >= size {
        return Err(BlobError::InvalidRange { key: key.to_string(), start: range.start, end: range.end, size });
    }
    Ok(range.start..range.end.min(size))
}

/// Builds the store a parsed connection string describes.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn BlobStore>> {
    let store: Arc<dyn BlobStore> = match config {
        StoreConfig::Local(c) => Arc::new(local::LocalStore::new(&c.catalog_path)?),
        StoreConfig::S3(c) => Arc::new(objstore::ObjectStoreBlobStore::s3(c)?),
        StoreConfig::Azure(c) => Arc::new(objstore::ObjectStoreBlobStore::azure(c)?),
        StoreConfig::Artifactory(c) => Arc::new(artifactory::ArtifactoryStore::new(c)?),
    };
    let prefix = config.prefix();
    if let Some(prefix) = prefix {
        return Ok(Arc::new(PrefixedStore::new(store, prefix)?));
    }
    Ok(store)
}

/// Parses a connection string and opens the store it describes.
pub fn open_connection_string(connection: &str) -> Result<Arc<dyn BlobStore>> {
    let config: StoreConfig = connection.parse()?;
    open(&config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        for good in ["a", "chunks/0af3", "m/v1.2/x86_64/image.json", "a-b_c+d=e@f,g~h"] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/a", "a/", "a//b", "../x", "a/../b", ".hidden", "a b", "a\\b", "é", "a?b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_key(&"a".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("chunks/").is_ok());
    }

    #[test]
    fn ranges_are_clamped() {
        assert_eq!(clamp_range("k", &(2..10), 5).ok(), Some(2..5));
        assert!(clamp_range("k", &(5..10), 5).is_err());
        assert!(clamp_range("k", &(3..3), 5).is_err());
    }
}
