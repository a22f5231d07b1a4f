//! The authenticated caller of a request.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::claims::SUPER_USER_ROLE;

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum AuthMethod {
    /// A JWT issued by this server.
    Jwt,
    /// An API key owned by the user; carries exactly the user's permissions.
    ApiKey { key_id: String },
}

/// A caller whose identity was verified against the store on this request.
///
/// Roles and claims are the *current* ones from the store, never the ones a token or a
/// request header claims.
#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    pub user_id: String,
    pub username: String,
    pub email: String,
    pub roles: BTreeSet<String>,
    /// Effective claims: direct claims and the claims of every role.
    pub claims: BTreeSet<String>,
    pub method: AuthMethod,
}

impl Principal {
    /// Holders of the SUPER_USER role pass every claim check.
    pub fn is_super_user(&self) -> bool {
        self.roles.contains(SUPER_USER_ROLE)
    }

    pub fn has_claim(&self, claim: &str) -> bool {
        self.is_super_user() || self.claims.contains(claim)
    }

    pub fn has_any(&self, claims: &[&str]) -> bool {
        self.is_super_user() || claims.iter().any(|c| self.claims.contains(*c))
    }

    /// Whether the caller meets a requirement of roles and claims (a catalog entry's, a
    /// host's): see [`meets`].
    pub fn meets<'a>(
        &self,
        roles: impl IntoIterator<Item = &'a String>,
        claims: impl IntoIterator<Item = &'a String>,
    ) -> bool {
        meets(self.is_super_user(), &self.roles, &self.claims, roles, claims)
    }
}

/// The one rule for things that require roles and claims (catalog entries, orchestrator
/// hosts): a SUPER_USER meets every requirement; anyone else must hold every required role
/// and every required claim.
pub fn meets<'a>(
    super_user: bool,
    held_roles: &BTreeSet<String>,
    held_claims: &BTreeSet<String>,
    roles: impl IntoIterator<Item = &'a String>,
    claims: impl IntoIterator<Item = &'a String>,
) -> bool {
    super_user
        || (roles.into_iter().all(|r| held_roles.contains(r)) && claims.into_iter().all(|c| held_claims.contains(c)))
}
