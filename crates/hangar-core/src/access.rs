//! Route access rules. Every route declares one [`Access`]; the HTTP layer refuses any
//! route that has none (deny by default).

use serde::Serialize;

use crate::principal::Principal;

/// What a caller needs to use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "claims", rename_all = "snake_case")]
pub enum Access {
    /// Anyone, without credentials (liveness, login, JWKS, API docs).
    Public,
    /// Anyone; a credential, when one is sent, is verified (a bad one is refused) and the
    /// handler may answer its caller more than an anonymous one (`/health/system`).
    Open,
    /// Any authenticated caller.
    Authenticated,
    /// Every listed claim.
    AllOf(&'static [&'static str]),
    /// At least one listed claim. Handlers narrow the result to the caller's own records
    /// when the caller only holds an `*_OWN_*` claim.
    AnyOf(&'static [&'static str]),
    /// The SUPER_USER role.
    SuperUser,
    /// A signed webhook (GitHub's `workflow_job`): no Hangar credential is read; the handler
    /// admits only a body signed with the configured secret (HMAC, checked in constant time
    /// before anything is read or stored) and refuses any other request with 401.
    SignedWebhook,
}

/// The outcome of checking an [`Access`] against a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No or invalid credentials (401).
    Unauthenticated,
    /// Authenticated but missing what the route needs (403).
    Forbidden {
        needed: String,
    },
}

impl Access {
    pub fn check(&self, caller: Option<&Principal>) -> Decision {
        let Some(p) = caller else {
            return match self {
                Access::Public | Access::Open | Access::SignedWebhook => Decision::Allow,
                _ => Decision::Unauthenticated,
            };
        };
        let ok = match self {
            Access::Public | Access::Open | Access::SignedWebhook | Access::Authenticated => true,
            Access::AllOf(cs) => cs.iter().all(|c| p.has_claim(c)),
            Access::AnyOf(cs) => p.has_any(cs),
            Access::SuperUser => p.is_super_user(),
        };
        if ok { Decision::Allow } else { Decision::Forbidden { needed: self.describe() } }
    }

    /// Human-readable requirement, used in 403 messages and the API document.
    pub fn describe(&self) -> String {
        match self {
            Access::Public => "nothing".into(),
            Access::Open => "nothing (a caller who sends a credential is checked and may be shown more)".into(),
            Access::Authenticated => "an authenticated caller".into(),
            Access::AllOf(cs) => format!("all of the claims {}", cs.join(", ")),
            Access::AnyOf(cs) => format!("one of the claims {}", cs.join(", ")),
            Access::SuperUser => "the SUPER_USER role".into(),
            Access::SignedWebhook => "a body signed with the webhook secret (no Hangar credential)".into(),
        }
    }

    /// Open to a caller without credentials ([`Access::Public`], [`Access::Open`], and
    /// [`Access::SignedWebhook`], whose handler checks the signature).
    pub fn is_public(&self) -> bool {
        matches!(self, Access::Public | Access::Open | Access::SignedWebhook)
    }

    /// Whether the credential a request carries is read: on every route but the
    /// [`Access::Public`] and [`Access::SignedWebhook`] ones.
    pub fn reads_credential(&self) -> bool {
        !matches!(self, Access::Public | Access::SignedWebhook)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::principal::AuthMethod;

    fn user(roles: &[&str], claims: &[&str]) -> Principal {
        Principal {
            user_id: "u".into(),
            username: "u".into(),
            email: "u@x".into(),
            roles: roles.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            claims: claims.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            method: AuthMethod::Jwt,
        }
    }

    #[test]
    fn anonymous_only_passes_public() {
        assert_eq!(Access::Public.check(None), Decision::Allow);
        assert_eq!(Access::Authenticated.check(None), Decision::Unauthenticated);
        assert_eq!(Access::SuperUser.check(None), Decision::Unauthenticated);
    }

    #[test]
    fn claims_combine_as_declared() {
        let p = user(&["USER"], &["LIST_VM"]);
        assert_eq!(Access::AnyOf(&["LIST_VM", "CREATE_VM"]).check(Some(&p)), Decision::Allow);
        assert!(matches!(Access::AllOf(&["LIST_VM", "CREATE_VM"]).check(Some(&p)), Decision::Forbidden { .. }));
        assert!(matches!(Access::SuperUser.check(Some(&p)), Decision::Forbidden { .. }));
        let root = user(&["SUPER_USER"], &[]);
        assert_eq!(Access::AllOf(&["ANYTHING"]).check(Some(&root)), Decision::Allow);
    }
}
