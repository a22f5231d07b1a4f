//! Hangar's domain core: the claim catalogue and default roles, the authenticated
//! [`Principal`], route [`Access`] rules, the event envelope and bus, audit records and the
//! error classification every layer maps to a status.
//!
//! Architecture invariant: this crate does no IO and knows nothing about HTTP. The API
//! crate turns [`ErrorKind`] into status codes and [`Access`] decisions into 401/403.

pub mod access;
pub mod audit;
pub mod claims;
pub mod error;
pub mod events;
pub mod principal;

pub use access::{Access, Decision};
pub use error::{Classify, ErrorKind};
pub use events::{Event, EventBus, EventType};
pub use principal::{AuthMethod, Principal};
