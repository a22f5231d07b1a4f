//! Single sign-on with OpenID Connect: providers, discovery and JWKS (cached, refetched on
//! an unknown `kid` at most every 10 s), the authorization-code flow with PKCE (S256),
//! state and nonce, ID-token and access-token checks, and the mapping of a provider's claims
//! or groups to Hangar roles and claims.
//!
//! Built over the workspace's reqwest and `jsonwebtoken` (which verifies a JWT with a JWK)
//! rather than the `openidconnect` crate: that crate verifies signatures with its own
//! RustCrypto stack (rsa, p256, p384, ed25519-dalek) beside our aws-lc-rs, and its HTTP
//! client seam would need an adapter anyway; the flows used here are small.
//!
//! Invariants:
//! - An ID token is accepted only when its signature verifies with a key of the provider's
//!   JWKS, `iss` is the configured issuer exactly, `aud` holds our client id (and `azp`,
//!   when present with several audiences, is ours), `exp`/`nbf`/`iat` hold (60 s leeway) and
//!   `nonce` is the one this login sent.
//! - A login's state, nonce and PKCE verifier are kept in the store (`oidc_logins`, by the
//!   hash of the state), bound to the browser by the short-lived HttpOnly cookie
//!   `hangar_oidc` and consumed by the first callback (a replay finds nothing).
//! - Access is what the mapping grants now: a login with no mapped role or claim is refused,
//!   and a just-in-time user whose mapping no longer grants anything is disabled with every
//!   session killed (security stamp changed) in the batch that records it.

mod config;
mod flow;
mod jwks;
mod mapping;

use std::sync::Arc;

pub use config::{ClientSecret, ProviderConfig, parse_providers_file};
pub use flow::{AuthorizationStart, CallbackOutcome, MachinePrincipal, TokenAnswer, check_return_to};
pub use jwks::{Discovery, Provider};
pub use mapping::{Mapping, MappingRule};

use crate::error::{IdentityError, Result};

/// Collection of logins under way (state hash -> [`flow::PendingLogin`]).
pub const OIDC_LOGINS: &str = "oidc_logins";

/// The cookie that binds a login's state to the browser that started it.
pub const STATE_COOKIE: &str = "hangar_oidc";

/// The configured providers.
pub struct Oidc {
    providers: Vec<Arc<jwks::Provider>>,
}

impl Oidc {
    /// Build from configurations (ids must be unique); nothing is fetched until first use.
    pub fn new(configs: Vec<ProviderConfig>, http: reqwest::Client) -> Result<Self> {
        let mut providers: Vec<Arc<jwks::Provider>> = Vec::new();
        for c in configs {
            c.check()?;
            if providers.iter().any(|p| p.config.id == c.id) {
                return Err(IdentityError::Invalid(format!("OIDC provider id {:?} is configured twice", c.id)));
            }
            providers.push(Arc::new(jwks::Provider::new(c, http.clone())));
        }
        Ok(Oidc { providers })
    }

    /// The providers' configurations, in order.
    pub fn providers(&self) -> Vec<&ProviderConfig> {
        self.providers.iter().map(|p| &p.config).collect()
    }

    fn provider(&self, id: &str) -> Result<&Arc<jwks::Provider>> {
        self.providers.iter().find(|p| p.config.id == id).ok_or_else(|| IdentityError::not_found("OIDC provider", id))
    }

    /// The provider whose issuer signed this JWT (read without verification, only to pick
    /// the keys that then verify it).
    pub fn provider_of_token(&self, token: &str) -> Option<&Arc<jwks::Provider>> {
        let iss = flow::unverified_issuer(token)?;
        self.providers.iter().find(|p| p.config.issuer.trim_end_matches('/') == iss.trim_end_matches('/'))
    }
}
