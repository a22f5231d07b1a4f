//! Orchestrator errors and their classification.

use hangar_core::{Classify, ErrorKind};
use hangar_store::StoreError;

use crate::client::HostClientError;
use crate::placement::NoCapacity;

/// Every failure of the orchestrator core.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// Malformed input.
    #[error("{0}")]
    Invalid(String),
    /// No such host, VM or token.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked up (`"host"`, `"VM"`, ...).
        kind: &'static str,
        /// The id or name asked for.
        id: String,
    },
    /// The request conflicts with current state (duplicate name or URL, concurrent change).
    #[error("{0}")]
    Conflict(String),
    /// An enrollment token is unknown, expired or already used.
    #[error("The enrollment token is invalid, expired or already used")]
    InvalidToken,
    /// No host can take the VM; the message says why per group of hosts.
    #[error(transparent)]
    NoCapacity(#[from] NoCapacity),
    /// The request waited in the queue for capacity and gave up.
    #[error("No capacity became free within {waited_ms} ms: {last}")]
    QueueTimeout {
        /// How long the request waited, in milliseconds.
        waited_ms: u64,
        /// Why the last placement attempt failed.
        last: NoCapacity,
    },
    /// A host answered with an error or could not be reached.
    #[error("Host {host}: {source}")]
    Host {
        /// Host id.
        host: String,
        /// What the host client reported.
        #[source]
        source: HostClientError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or unexpected failure.
    #[error("Internal orchestrator error: {0}")]
    Internal(String),
    /// The caller may not do this (a host's required roles, a VM of someone else).
    #[error("{0}")]
    Forbidden(String),
    /// A create waited in the queue as long as the caller asked and nothing fitted.
    #[error("No capacity within {seconds}s: {last}")]
    NoCapacityWithin {
        /// The wait the caller asked for.
        seconds: u64,
        /// Why the last placement attempt failed.
        last: NoCapacity,
    },
}

impl From<hangar_core::VmDenied> for OrchestratorError {
    fn from(e: hangar_core::VmDenied) -> Self {
        OrchestratorError::Forbidden(e.to_string())
    }
}

impl OrchestratorError {
    /// A [`OrchestratorError::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        OrchestratorError::NotFound { kind, id: id.into() }
    }
}

impl Classify for OrchestratorError {
    fn kind(&self) -> ErrorKind {
        match self {
            OrchestratorError::Invalid(_) => ErrorKind::BadRequest,
            OrchestratorError::NotFound { .. } => ErrorKind::NotFound,
            OrchestratorError::Conflict(_) => ErrorKind::Conflict,
            OrchestratorError::InvalidToken => ErrorKind::Unauthenticated,
            OrchestratorError::NoCapacity(_)
            | OrchestratorError::QueueTimeout { .. }
            | OrchestratorError::NoCapacityWithin { .. } => ErrorKind::Unavailable,
            OrchestratorError::Forbidden(_) => ErrorKind::Forbidden,
            OrchestratorError::Host { source, .. } => match source {
                HostClientError::NotFound(_) => ErrorKind::NotFound,
                HostClientError::Rejected(_) => ErrorKind::Conflict,
                HostClientError::Refused { status, .. } => match status {
                    400 => ErrorKind::BadRequest,
                    // The host refused the orchestrator's own credential: not the caller's doing.
                    401 | 403 => ErrorKind::Unavailable,
                    422 => ErrorKind::Unprocessable,
                    429 => ErrorKind::TooManyRequests,
                    _ => ErrorKind::Conflict,
                },
                HostClientError::Unreachable(_) | HostClientError::Timeout(_) => ErrorKind::Unavailable,
                HostClientError::Protocol(_) => ErrorKind::Internal,
            },
            OrchestratorError::Store(StoreError::Conflict(_)) => ErrorKind::Conflict,
            OrchestratorError::Store(StoreError::Invalid(_)) => ErrorKind::BadRequest,
            OrchestratorError::Store(StoreError::Closed) => ErrorKind::Unavailable,
            OrchestratorError::Store(_) | OrchestratorError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Result with [`OrchestratorError`].
pub type Result<T, E = OrchestratorError> = std::result::Result<T, E>;
