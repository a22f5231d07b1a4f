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

    /// Headers that carry Hangar credentials. They are removed from requests before they are
    /// forwarded, so a VM never sees a Hangar token. Default: `Authorization`.
    fn credential_headers(&self) -> Vec<HeaderName> {
        vec![AUTHORIZATION]
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRejection {
    /// Shown to the client in the 401 body.
    pub reason: String,
}

impl AuthRejection {
    /// A rejection with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        AuthRejection { reason: reason.into() }
    }
}
