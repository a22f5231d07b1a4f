//! A provider's discovery document and keys, fetched on first use and cached: discovery for
//! an hour, the JWKS until a token names a `kid` it lacks (key rotation), then fetched again
//! at most once every [`REFETCH_EVERY`].

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::info;

use super::config::ProviderConfig;
use crate::error::{IdentityError, Result};

/// The least time between two JWKS fetches caused by unknown keys.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// The longest answer read from a provider.
const MAX_BODY: usize = 1 << 20;

/// The fields of `/.well-known/openid-configuration` Hangar uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub code_challenge_methods_supported: Option<Vec<String>>,
}

struct Cached<T> {
    value: T,
    at: Instant,
}

pub struct Provider {
    pub config: ProviderConfig,
    pub(crate) http: reqwest::Client,
    discovery: Mutex<Option<Cached<Discovery>>>,
    keys: Mutex<Option<Cached<JwkSet>>>,
}

fn unavailable(p: &ProviderConfig, what: &str, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Unavailable(format!("The OIDC provider {} ({}) is unreachable: {what}: {e}", p.id, p.issuer))
}

pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    p: &ProviderConfig,
    url: &str,
    what: &str,
) -> Result<T> {
    let resp = http.get(url).send().await.map_err(|e| unavailable(p, what, e))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| unavailable(p, what, e))?;
    if !status.is_success() {
        return Err(unavailable(p, what, format!("HTTP {status}")));
    }
    if bytes.len() > MAX_BODY {
        return Err(unavailable(p, what, "answer too large"));
    }
    serde_json::from_slice(&bytes).map_err(|e| unavailable(p, what, format!("not the expected JSON: {e}")))
}

impl Provider {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Provider { config, http, discovery: Mutex::new(None), keys: Mutex::new(None) }
    }

    /// The discovery document (cached an hour); its issuer must be the configured one.
    pub async fn discovery(&self) -> Result<Discovery> {
        let mut d = self.discovery.lock().await;
        if let Some(c) = d.as_ref()
            && c.at.elapsed() < DISCOVERY_TTL
        {
            return Ok(c.value.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", self.config.issuer.trim_end_matches('/'));
        let doc: Discovery = get_json(&self.http, &self.config, &url, "discovery").await?;
        if doc.issuer.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(IdentityError::Unavailable(format!(
                "The OIDC provider {}'s discovery document names the issuer {:?}, not the configured {:?}",
                self.config.id, doc.issuer, self.config.issuer
            )));
        }
        *d = Some(Cached { value: doc.clone(), at: Instant::now() });
        Ok(doc)
    }

    async fn fetch_keys(&self) -> Result<JwkSet> {
        let d = self.discovery().await?;
        let set: JwkSet = get_json(&self.http, &self.config, &d.jwks_uri, "JWKS").await?;
        info!(provider = %self.config.id, keys = set.keys.len(), "fetched the OIDC provider's keys");
        Ok(set)
    }

    /// The key that verifies a token signed with `kid`: from the cache, or from a fresh
    /// JWKS when the cache lacks it (rotation) and the last fetch is old enough.
    pub async fn key(&self, kid: Option<&str>) -> Result<Jwk> {
        let mut k = self.keys.lock().await;
        let pick = |set: &JwkSet| -> Option<Jwk> {
            match kid {
                Some(kid) => set.find(kid).cloned(),
                None if set.keys.len() == 1 => set.keys.first().cloned(),
                None => None,
            }
        };
        if let Some(c) = k.as_ref() {
            if let Some(j) = pick(&c.value) {
                return Ok(j);
            }
            if c.at.elapsed() < REFETCH_EVERY {
                return Err(IdentityError::Unauthenticated(format!(
                    "The token is signed with a key the OIDC provider {} does not publish",
                    self.config.id
                )));
            }
        }
        let set = self.fetch_keys().await?;
        let found = pick(&set);
        *k = Some(Cached { value: set, at: Instant::now() });
        found.ok_or_else(|| {
            IdentityError::Unauthenticated(format!(
                "The token is signed with a key the OIDC provider {} does not publish",
                self.config.id
            ))
        })
    }
}
