//! Identity errors and their classification.

use chrono::{DateTime, Utc};
use hangar_core::{Classify, ErrorKind};
use hangar_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Invalid username, email or password")]
    InvalidCredentials,
    /// Too many failed logins for this account from this source address (logins from other
    /// addresses are not affected).
    #[error(
        "Logins to {username} from your address are locked after too many failed attempts until {until} ({seconds} s from now); try again then, or ask an administrator to unlock the account (logins from other addresses are not affected)"
    )]
    LockedOut { username: String, until: DateTime<Utc>, seconds: i64 },
    /// This source address already has the most password checks under way.
    #[error("Too many logins at once from your address; retry in {seconds} s")]
    TooManyAtOnce { seconds: u64 },
    /// Every password hasher is busy and the queue is full.
    #[error("The server is busy checking other passwords; retry in {seconds} s")]
    Busy { seconds: u64 },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("Password policy: {0}")]
    Policy(String),
    /// A service Hangar depends on (an OIDC provider) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    #[error("Token signing is misconfigured: {0}")]
    KeyConfig(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Internal identity error: {0}")]
    Internal(String),
}

impl IdentityError {
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        IdentityError::NotFound { kind, id: id.into() }
    }

    /// Seconds a client should wait before it retries (`Retry-After`), when that applies.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            IdentityError::LockedOut { seconds, .. } => Some((*seconds).max(1) as u64),
            IdentityError::Busy { seconds } | IdentityError::TooManyAtOnce { seconds } => Some((*seconds).max(1)),
            _ => None,
        }
    }
}

impl Classify for IdentityError {
    fn kind(&self) -> ErrorKind {
        match self {
            IdentityError::InvalidCredentials | IdentityError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            IdentityError::LockedOut { .. } => ErrorKind::TooManyRequests,
            IdentityError::Busy { .. } | IdentityError::Unavailable(_) => ErrorKind::Unavailable,
            IdentityError::TooManyAtOnce { .. } => ErrorKind::TooManyRequests,
            IdentityError::Forbidden(_) => ErrorKind::Forbidden,
            IdentityError::NotFound { .. } => ErrorKind::NotFound,
            IdentityError::Conflict(_) => ErrorKind::Conflict,
            IdentityError::Invalid(_) => ErrorKind::BadRequest,
            IdentityError::Policy(_) => ErrorKind::Unprocessable,
            IdentityError::Store(StoreError::Conflict(_)) => ErrorKind::Conflict,
            IdentityError::Store(StoreError::Invalid(_)) => ErrorKind::BadRequest,
            IdentityError::Store(StoreError::Closed) => ErrorKind::Unavailable,
            IdentityError::Store(_) | IdentityError::KeyConfig(_) | IdentityError::Internal(_) => ErrorKind::Internal,
        }
    }
}

pub type Result<T, E = IdentityError> = std::result::Result<T, E>;
