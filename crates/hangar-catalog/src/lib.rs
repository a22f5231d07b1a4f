//! Hangar's catalog module.
//!
//! A catalog entry ([`Manifest`]) names an image by catalog id, version and
//! architecture, and points at the image's chunks and image manifest
//! (the [`hangar_image`] format) in a storage provider ([`hangar_blobstore`]).
//! The [`Catalog`] service keeps entries in the [`hangar_store::Store`], and:
//!
//! * enforces per-entry visibility: an entry with required roles or claims
//!   is invisible (not found, absent from lists) and unpullable for callers
//!   who do not hold all of them; `SUPER_USER` sees everything;
//! * resolves `latest` ([`version`]): the newest pullable version in semver
//!   order, or by creation time when versions are not semver;
//! * refuses pulls of tainted or revoked versions with a conflict naming why;
//! * counts downloads and records the last downloader;
//! * keeps provider connection strings encrypted at rest ([`sealer`]) and
//!   never returns them: pullers get bytes through the server
//!   ([`Catalog::read_chunk`]), never provider keys;
//! * writes every change together with its audit entry in one batch and
//!   publishes a `catalog_cache` event;
//! * imports reference catalog entries (`.meta` + `.pdpack`) into the new
//!   format ([`Catalog::import`]);
//! * pulls images into this host's cache for the host module
//!   ([`Catalog::pull_to_host`]).
//!
//! [`pdfile`] parses the reference's PDFile format; [`remote`] is a
//! read-only [`hangar_blobstore::BlobStore`] over a catalog server's pull
//! routes, so [`hangar_image::pull`] can pull through a server.

/// The architecture alias table lives in `hangar-core`; re-exported for the catalog's users.
pub mod connection;
pub mod managers;
pub mod arch {
    pub use hangar_core::arch::*;
}
pub mod model;
pub mod pdfile;
pub mod remote;
pub mod sealer;
pub mod service;
pub mod version;

mod import;

pub use arch::Architecture;
pub use connection::CatalogConnection;
pub use hangar_blobstore;
pub use hangar_image;
pub use import::{IMPORT_VM_TYPES, ImportRequest, ImportVmRequest};
pub use managers::{CatalogManagerInput, CatalogManagerView, Forwarded, ManagerOp, RemoteCall, RemoteMethod};
pub use model::{CacheItem, ListField, Manifest, MetadataUpdate, MinimumRequirements, NewManifest, PullTicket};
pub use service::{Catalog, CatalogOptions};

use hangar_core::{Classify, ErrorKind};

/// Errors of catalog operations. Messages never contain provider secrets.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Malformed input.
    #[error("{0}")]
    Invalid(String),
    /// Well-formed input that cannot be acted on (the pushed image is not in
    /// the provider, a reference pack is unreadable, ...).
    #[error("{0}")]
    Unprocessable(String),
    /// The entry does not exist or the caller may not see it.
    #[error("{0}")]
    NotFound(String),
    /// The entry's state forbids the operation (tainted, revoked, exists).
    #[error("{0}")]
    Conflict(String),
    /// The caller may see the entry but not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The storage provider failed or cannot be reached.
    #[error("storage provider: {0}")]
    Provider(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] hangar_store::StoreError),
    /// A bug or an unexpected local failure.
    #[error("internal catalog error: {0}")]
    Internal(String),
}

impl Classify for CatalogError {
    fn kind(&self) -> ErrorKind {
        use hangar_store::StoreError;
        match self {
            CatalogError::Invalid(_) => ErrorKind::BadRequest,
            CatalogError::Unprocessable(_) => ErrorKind::Unprocessable,
            CatalogError::NotFound(_) => ErrorKind::NotFound,
            CatalogError::Conflict(_) | CatalogError::Store(StoreError::Conflict(_)) => ErrorKind::Conflict,
            CatalogError::Forbidden(_) => ErrorKind::Forbidden,
            CatalogError::Provider(_) | CatalogError::Store(StoreError::Closed) => ErrorKind::Unavailable,
            CatalogError::Store(StoreError::Invalid(_)) => ErrorKind::BadRequest,
            CatalogError::Store(_) | CatalogError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<hangar_blobstore::BlobError> for CatalogError {
    fn from(e: hangar_blobstore::BlobError) -> Self {
        use hangar_blobstore::BlobError;
        match e {
            BlobError::Config(c) => CatalogError::Invalid(format!("provider connection: {c}")),
            BlobError::InvalidKey { .. } => CatalogError::Invalid(e.to_string()),
            other => CatalogError::Provider(other.to_string()),
        }
    }
}

impl From<hangar_image::ImageError> for CatalogError {
    fn from(e: hangar_image::ImageError) -> Self {
        use hangar_image::ImageError;
        match e {
            ImageError::Store(b) => b.into(),
            ImageError::Manifest(m) => CatalogError::Unprocessable(format!("image manifest: {m}")),
            ImageError::CorruptChunk { .. } => CatalogError::Provider(e.to_string()),
            ImageError::Unsupported { .. } => CatalogError::Unprocessable(e.to_string()),
            other => CatalogError::Internal(other.to_string()),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = CatalogError> = std::result::Result<T, E>;
