//! Error classification shared by every crate: a library error says which [`ErrorKind`]
//! it is, and the HTTP edge maps the kind to a status code once.

/// What kind of failure an error is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed input (400).
    BadRequest,
    /// No valid credentials (401).
    Unauthenticated,
    /// Valid credentials, not allowed (403).
    Forbidden,
    /// The thing does not exist, or the caller may not know it exists (404).
    NotFound,
    /// The request conflicts with current state (409).
    Conflict,
    /// Well-formed input that breaks a rule, such as the password policy (422).
    Unprocessable,
    /// Too many attempts; try again later (429).
    TooManyRequests,
    /// A dependency is unavailable (503).
    Unavailable,
    /// A bug or an unexpected failure (500). The message shown to callers is generic.
    Internal,
}

/// Implemented by library errors so the edge can map them without knowing their types.
pub trait Classify {
    fn kind(&self) -> ErrorKind;
}
