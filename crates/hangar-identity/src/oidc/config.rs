//! Provider configuration: from the `OIDC_*` keys (one provider) or `OIDC_PROVIDERS_FILE`
//! (a JSON list, any number).

use serde::Deserialize;

use super::mapping::Mapping;
use crate::error::{IdentityError, Result};

/// A client secret: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ClientSecret(pub String);

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(hidden)")
    }
}

/// One OpenID provider.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProviderConfig {
    /// Short id, in URLs (`/auth/oidc/{id}/login`): `[a-z0-9_-]`, 1..=32 chars.
    pub id: String,
    /// What the login page shows.
    #[serde(default)]
    pub name: String,
    /// The issuer URL exactly as the provider's tokens carry it in `iss`; discovery is at
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<ClientSecret>,
    /// Scopes of the browser login (`openid` is always sent).
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// ID-token (or access-token) claim values to roles: `groups:admins=SUPER_USER,devs=USER`.
    #[serde(default, deserialize_with = "mapping_de")]
    pub role_map: Mapping,
    /// The same syntax, to claims.
    #[serde(default, deserialize_with = "mapping_de")]
    pub claim_map: Mapping,
    /// The claim a bare value in a map refers to (default `groups`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The `aud` a machine's access token must carry (a resource indicator); the client id
    /// when absent.
    #[serde(default)]
    pub audience: Option<String>,
    /// The public client the CLI uses for the device authorization grant (`hangar login
    /// --sso`); the client id when absent. ID tokens for it are accepted by the token exchange.
    #[serde(default)]
    pub cli_client_id: Option<String>,
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "profile".into(), "email".into()]
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn mapping_de<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Mapping, D::Error> {
    let s = String::deserialize(d)?;
    Mapping::parse(&s).map_err(serde::de::Error::custom)
}

impl ProviderConfig {
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: String| Err(IdentityError::Invalid(format!("OIDC provider {:?}: {m}", self.id)));
        if self.id.is_empty()
            || self.id.len() > 32
            || !self.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return bad("the id must be 1 to 32 lower-case letters, digits, '-' or '_'".into());
        }
        if !(self.issuer.starts_with("https://") || self.issuer.starts_with("http://")) {
            return bad(format!("the issuer {:?} must be an http(s) URL", self.issuer));
        }
        if self.client_id.trim().is_empty() {
            return bad("a client id is needed".into());
        }
        if self.role_map.is_empty() && self.claim_map.is_empty() {
            return bad("a role or claim map is needed (OIDC_ROLE_MAP, e.g. 'admins=SUPER_USER,*=USER'): without one nobody would get in".into());
        }
        Ok(())
    }

    /// The `aud` machine access tokens must carry.
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(&self.client_id)
    }

    /// Client ids whose ID tokens this provider accepts (the browser's and the CLI's).
    pub fn accepted_clients(&self) -> Vec<&str> {
        let mut v = vec![self.client_id.as_str()];
        if let Some(c) = &self.cli_client_id
            && c != &self.client_id
        {
            v.push(c);
        }
        v
    }

    pub fn cli_client_id(&self) -> &str {
        self.cli_client_id.as_deref().unwrap_or(&self.client_id)
    }

    pub fn display_name(&self) -> String {
        if self.name.is_empty() { self.id.clone() } else { self.name.clone() }
    }
}

/// Read `OIDC_PROVIDERS_FILE`: a JSON list of provider objects with the fields of
/// [`ProviderConfig`] (maps as strings in the `OIDC_ROLE_MAP` syntax).
pub fn parse_providers_file(text: &str) -> Result<Vec<ProviderConfig>> {
    let list: Vec<ProviderConfig> = serde_json::from_str(text)
        .map_err(|e| IdentityError::Invalid(format!("the OIDC providers file is not a JSON list of providers: {e}")))?;
    for p in &list {
        p.check()?;
    }
    Ok(list)
}
