//! Identity errors and their classification.

use chrono::{DateTime, Utc};
use hangar_core::{Classify, ErrorKind};
use hangar_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Invalid username, email or password")]
    InvalidCredentials,
    #[error(
        "Account {username} is locked after too many failed logins until {until} ({seconds} s from now); try again then or ask an administrator to unlock it"
    )]
    LockedOut { username: String, until: DateTime<Utc>, seconds: i64 },
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
}

impl Classify for IdentityError {
    fn kind(&self) -> ErrorKind {
        match self {
            IdentityError::InvalidCredentials | IdentityError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            IdentityError::LockedOut { .. } => ErrorKind::TooManyRequests,
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
