//! Hangar's domain core: the claim catalogue and default roles, the authenticated
//! [`Principal`], route [`Access`] rules, the event envelope and bus, audit records and the
//! error classification every layer maps to a status.
//!
//! Architecture invariant: this crate does no IO and knows nothing about HTTP. The API
//! crate turns [`ErrorKind`] into status codes and [`Access`] decisions into 401/403.

pub mod access;
pub mod arch;
pub mod audit;
pub mod claims;
pub mod error;
pub mod events;
pub mod logs;
pub mod principal;
pub mod vm;

pub use access::{Access, Decision};
pub use arch::{Architecture, UnknownArchitecture};
pub use error::{Classify, ErrorKind, error_chain};
pub use events::{Event, EventBus, EventType};
pub use logs::LogRing;
pub use principal::{AuthMethod, Principal};
pub use vm::{VmAction, VmDenied, may_see_vm};

/// Percent-encode one URL path segment: everything but the RFC 3986 unreserved characters,
/// so a name with `/`, spaces or `%` stays one segment. Every HTTP client in Hangar (CLI,
/// orchestrator, catalog remote store) builds paths with it.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod path_segment_tests {
    #[test]
    fn reserved_characters_are_encoded() {
        assert_eq!(super::path_segment("a b/c%d"), "a%20b%2Fc%25d");
        assert_eq!(super::path_segment("v1.2-x_y~z"), "v1.2-x_y~z");
        assert_eq!(super::path_segment("é"), "%C3%A9");
    }
}
