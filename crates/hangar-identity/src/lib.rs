//! Identity for Hangar: users, roles, claims and API keys kept in any [`hangar_store::Store`],
//! argon2id passwords with a policy and a real lockout, JWTs (HS256 by default, RS256 or
//! EdDSA with a JWKS document), and the audit log.
//!
//! Architecture invariants:
//! - Authorisation uses the roles and claims in the store *now*, never the ones a token
//!   carries: a disabled or deleted user, or a changed password, stops old tokens at once.
//! - An API key authenticates as its owner with exactly the owner's permissions.
//! - No secret is stored in clear: passwords are argon2id PHC strings, API-key secrets are
//!   keyed BLAKE3 hashes, and neither appears in any view type or log line.
//! - Every change is written together with its audit entry in one atomic batch.

pub mod error;
pub mod model;
pub mod oidc;
pub mod password;
pub mod secrets;
pub mod service;
pub mod throttle;
pub mod tokens;
pub mod user_configs;

pub use error::IdentityError;
pub use model::*;
pub use password::PasswordPolicy;
pub use service::{
    Identity, IdentityImport, IdentityImportReport, IdentityOptions, ImportedApiKey, ImportedClaim, ImportedRole,
    ImportedUser, KindReport, LockoutPolicy, NewSession, ServiceUserReport, SessionAuth, SessionInfo, SessionPolicy,
    StoredSession,
};
pub use tokens::{JwtAlgorithm, TokenConfig, TokenService};
pub use user_configs::{NewUserConfig, UserConfig, UserConfigType, UserConfigUpdate, Written};
