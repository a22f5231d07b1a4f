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

/// An error and its sources in one line, `outer: inner: cause`, each part said once
/// (libraries such as reqwest and hyper keep the telling cause, like a refused certificate,
/// in the sources only).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_name_every_cause_once() {
        let e = Outer(std::io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(error_chain(&e), "outer: invalid peer certificate: UnknownIssuer");
        let plain = std::io::Error::other("alone");
        assert_eq!(error_chain(&plain), "alone");
    }
}
