//! The seam to Hangar's identity module for hosts with `require_auth`.

use async_trait::async_trait;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};

/// Decides whether a request to a host with `require_auth` may pass. Hangar implements it with
/// its bearer tokens and API keys.
#[async_trait]
pub trait ProxyAuth: Send + Sync + 'static {
    /// `Ok(())` lets the request through; `Err` answers 401 with the rejection's reason.
    async fn check(&self, host_id: &str, headers: &HeaderMap) -> Result<(), AuthRejection>;

    /// The check the engine makes for each request to a protected host: the credential, then
    /// the host's requirements (claims, roles, the VM's owner). The default checks the
    /// credential with [`ProxyAuth::check`] and refuses (403) any request to a host that has
    /// requirements, since it cannot check them: an authenticator that knows callers'
    /// claims, roles and VMs' owners overrides it.
    async fn authorize(&self, req: &AuthRequest<'_>) -> Result<(), AuthRejection> {
        self.check(req.host_id, req.headers).await?;
        if req.has_requirements() {
            return Err(AuthRejection::forbidden(
                "this proxy host requires claims, roles or the VM's owner, which this proxy's authenticator cannot check",
            ));
        }
        Ok(())
    }

    /// Headers that carry Hangar credentials. They are removed from requests before they are
    /// forwarded, so a VM never sees a Hangar token. Default: `Authorization`.
    fn credential_headers(&self) -> Vec<HeaderName> {
        vec![AUTHORIZATION]
    }
}

/// One request to a protected host, as [`ProxyAuth::authorize`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    /// The host's key.
    pub host_id: &'a str,
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// Claims the caller must hold.
    pub required_claims: &'a [String],
    /// Roles the caller must hold.
    pub required_roles: &'a [String],
    /// The VM the request goes to, when the host requires its owner and the chosen route
    /// targets a VM: the caller must be that VM's owner.
    pub vm_owner_of: Option<&'a str>,
}

impl AuthRequest<'_> {
    /// Whether anything beyond a valid credential is required.
    pub fn has_requirements(&self) -> bool {
        !self.required_claims.is_empty() || !self.required_roles.is_empty() || self.vm_owner_of.is_some()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRejection {
    /// Shown to the client in the 401 (or 403) body.
    pub reason: String,
    /// The credential is valid but the caller does not meet the host's requirements: 403
    /// rather than 401.
    pub forbidden: bool,
}

impl AuthRejection {
    /// A rejection of the credential (401) with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        AuthRejection { reason: reason.into(), forbidden: false }
    }

    /// A caller who is known but may not pass (403), with this reason.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        AuthRejection { reason: reason.into(), forbidden: true }
    }
}
