//! The flows: a browser login (authorization code + PKCE, state, nonce), its callback, the
//! CLI's token exchange (an ID token from the device grant) and machine access tokens.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hangar_core::audit::Actor;
use hangar_core::{AuthMethod, Principal};
use hangar_store::{Batch, StoreError};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use super::jwks::Provider;
use super::{OIDC_LOGINS, Oidc};
use crate::error::{IdentityError, Result};
use crate::model::{
    EXTERNAL_IDS, ExternalIdentity, IssuedToken, NewUserIds, StoredUser, USER_EMAILS, USER_NAMES, USERS,
};
use crate::service::{
    Identity, NewSession, SessionAuth, audit, check_email, check_username, from_value, now, random_token, to_value,
};

/// How long a started login may take.
const LOGIN_TTL: chrono::TimeDelta = chrono::TimeDelta::minutes(10);
/// Clock skew allowed on `exp`, `nbf` and `iat`.
const LEEWAY: u64 = 60;

/// A login under way, stored by the hash of its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingLogin {
    pub provider: String,
    pub nonce: String,
    pub pkce_verifier: String,
    pub return_to: String,
    pub redirect_uri: String,
    /// BLAKE3 of the `hangar_oidc` cookie's value.
    pub binding: String,
    pub expires_at: DateTime<Utc>,
}

/// Where to send the browser, and the cookie that binds the login to it.
#[derive(Debug, Clone)]
pub struct AuthorizationStart {
    pub redirect_url: String,
    pub state_cookie: String,
    pub cookie_max_age: u64,
}

/// A finished browser login.
#[derive(Debug, Clone)]
pub struct CallbackOutcome {
    pub session: NewSession,
    pub return_to: String,
}

/// A machine authenticated by its provider's access token.
pub type MachinePrincipal = Principal;

fn hash(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex().to_string()
}

fn b64_random(bytes: usize) -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(random_token(bytes)?))
}

/// The `iss` of a JWT, read without verifying it (only to choose the keys that will).
pub fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload) = (parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(String::from)
}

/// `return_to` must be a local path: one leading `/`, not `//`, no scheme, no backslash.
pub fn check_return_to(r: &str) -> Result<String> {
    let ok = r.starts_with('/')
        && !r.starts_with("//")
        && !r.contains('\\')
        && !r.contains("://")
        && r.len() <= 1024
        && !r.chars().any(|c| c.is_control());
    if !ok {
        return Err(IdentityError::Invalid(format!("return_to {r:?} must be a local path such as /console/")));
    }
    Ok(r.to_string())
}

fn bad_token(provider: &str, e: jsonwebtoken::errors::Error) -> IdentityError {
    use jsonwebtoken::errors::ErrorKind as K;
    let why = match e.kind() {
        K::ExpiredSignature => "it has expired".to_string(),
        K::ImmatureSignature => "it is not valid yet (nbf)".to_string(),
        K::InvalidIssuer => "it was issued by another issuer".to_string(),
        K::InvalidAudience => "it was issued for another audience".to_string(),
        K::InvalidSignature => "its signature does not verify".to_string(),
        K::InvalidAlgorithm => "its algorithm does not match the key".to_string(),
        K::MissingRequiredClaim(c) => format!("it lacks the {c} claim"),
        other => format!("it is malformed ({other:?})"),
    };
    IdentityError::Unauthenticated(format!("The token from the OIDC provider {provider} is refused: {why}"))
}

impl Provider {
    /// Verify a JWT of this provider: signature on its JWKS, `iss`, `aud` (one of
    /// `audiences`), `exp`, `nbf`, `iat`.
    pub async fn verify_jwt(&self, token: &str, audiences: &[&str]) -> Result<Map<String, Value>> {
        let id = &self.config.id;
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad_token(id, e))?;
        let asymmetric = matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        );
        if !asymmetric {
            return Err(IdentityError::Unauthenticated(format!(
                "The token from the OIDC provider {id} is refused: algorithm {:?} is not accepted (RS, PS, ES or EdDSA)",
                header.alg
            )));
        }
        let jwk = self.key(header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| bad_token(id, e))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[self.config.issuer.as_str()]);
        v.set_audience(audiences);
        v.leeway = LEEWAY;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v).map_err(|e| bad_token(id, e))?;
        let claims = data.claims;
        let iat = claims.get("iat").and_then(Value::as_i64).unwrap_or(0);
        if iat > now().timestamp() + LEEWAY as i64 {
            return Err(IdentityError::Unauthenticated(format!(
                "The token from the OIDC provider {id} is refused: it was issued in the future (iat)"
            )));
        }
        Ok(claims)
    }

    /// Verify an ID token for one of our clients; with several audiences `azp` must be ours.
    async fn verify_id_token(&self, token: &str, nonce: Option<&str>) -> Result<Map<String, Value>> {
        let clients = self.config.accepted_clients();
        let claims = self.verify_jwt(token, &clients).await?;
        let id = &self.config.id;
        if let Some(Value::Array(auds)) = claims.get("aud")
            && auds.len() > 1
        {
            let azp = claims.get("azp").and_then(Value::as_str).unwrap_or("");
            if !clients.contains(&azp) {
                return Err(IdentityError::Unauthenticated(format!(
                    "The ID token from the OIDC provider {id} is refused: its azp is not this server's client"
                )));
            }
        }
        if let Some(want) = nonce {
            let got = claims.get("nonce").and_then(Value::as_str).unwrap_or("");
            if aws_lc_rs::constant_time::verify_slices_are_equal(got.as_bytes(), want.as_bytes()).is_err() {
                return Err(IdentityError::Unauthenticated(format!(
                    "The ID token from the OIDC provider {id} is refused: its nonce is not this login's"
                )));
            }
        }
        Ok(claims)
    }
}

/// A provider's token endpoint answer (the fields Hangar reads): an ID token, or an error
/// (RFC 6749 §5.2; RFC 8628 §3.5 for the device grant's `authorization_pending`).
#[derive(Debug, Deserialize)]
pub struct TokenAnswer {
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
}

impl Oidc {
    fn get(&self, id: &str) -> Result<Arc<Provider>> {
        self.provider(id).cloned()
    }
}

impl Identity {
    fn oidc_required(&self) -> Result<&Arc<Oidc>> {
        self.oidc().ok_or_else(|| IdentityError::not_found("OIDC provider", "(single sign-on is not configured)"))
    }

    /// Start a browser login: a pending login in the store, the provider's authorization URL
    /// (code, PKCE S256, state, nonce) and the binding cookie's value.
    pub async fn oidc_start(&self, provider: &str, return_to: &str, redirect_uri: &str) -> Result<AuthorizationStart> {
        let return_to = check_return_to(return_to)?;
        let p = self.oidc_required()?.get(provider)?;
        let d = p.discovery().await?;
        if let Some(m) = &d.code_challenge_methods_supported
            && !m.iter().any(|x| x == "S256")
        {
            return Err(IdentityError::Unavailable(format!(
                "The OIDC provider {provider} does not support PKCE with S256"
            )));
        }
        let state = b64_random(32)?;
        let nonce = b64_random(32)?;
        let verifier = b64_random(32)?;
        let binding = b64_random(32)?;
        let challenge =
            URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()));
        let pending = PendingLogin {
            provider: provider.to_string(),
            nonce: nonce.clone(),
            pkce_verifier: verifier,
            return_to,
            redirect_uri: redirect_uri.to_string(),
            binding: hash(&binding),
            expires_at: now() + LOGIN_TTL,
        };
        let key = hash(&state);
        self.store()
            .commit(Batch::new().require_absent(OIDC_LOGINS, &key).put(OIDC_LOGINS, &key, to_value(&pending)?))
            .await?;
        let mut url = url::Url::parse(&d.authorization_endpoint).map_err(|e| {
            IdentityError::Unavailable(format!(
                "The OIDC provider {provider}'s authorization endpoint is not a URL: {e}"
            ))
        })?;
        let mut scopes: Vec<&str> = vec!["openid"];
        scopes.extend(p.config.scopes.iter().map(String::as_str).filter(|s| *s != "openid"));
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &p.config.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(AuthorizationStart {
            redirect_url: url.to_string(),
            state_cookie: binding,
            cookie_max_age: LOGIN_TTL.num_seconds() as u64,
        })
    }

    /// Finish a browser login: the state must be a pending login of this provider started in
    /// this browser (`binding` is its cookie) and unused; the code is exchanged with the PKCE
    /// verifier; the ID token is verified (signature, iss, aud, exp, nbf, nonce); the user is
    /// found or created just in time from the mapping; a session is opened.
    pub async fn oidc_callback(
        &self,
        provider: &str,
        code: &str,
        state: &str,
        binding: Option<&str>,
        source_ip: Option<String>,
    ) -> Result<CallbackOutcome> {
        let p = self.oidc_required()?.get(provider)?;
        let bad_state =
            || IdentityError::Invalid("The login's state is unknown, used or expired; start the login again".into());
        let key = hash(state);
        let rec = self.store().get(OIDC_LOGINS, &key).await?.ok_or_else(bad_state)?;
        let pending: PendingLogin = from_value(rec.value, "pending OIDC login")?;
        let bound = binding.is_some_and(|b| {
            aws_lc_rs::constant_time::verify_slices_are_equal(hash(b).as_bytes(), pending.binding.as_bytes()).is_ok()
        });
        if !bound {
            return Err(IdentityError::Invalid(
                "The login was not started in this browser (its state cookie is missing or different); start it again"
                    .into(),
            ));
        }
        if pending.provider != provider {
            return Err(bad_state());
        }
        // Consumed by the first callback: a replay finds nothing.
        match self
            .store()
            .commit(Batch::new().require_revision(OIDC_LOGINS, &key, rec.revision).delete(OIDC_LOGINS, &key))
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => return Err(bad_state()),
            Err(e) => return Err(e.into()),
        }
        if pending.expires_at <= now() {
            return Err(bad_state());
        }
        let d = p.discovery().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", pending.redirect_uri.as_str()),
            ("code_verifier", pending.pkce_verifier.as_str()),
        ];
        let mut req = p.http.post(&d.token_endpoint);
        match &p.config.client_secret {
            Some(secret) => {
                let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                req = req.basic_auth(enc(&p.config.client_id), Some(enc(&secret.0)));
            }
            None => form.push(("client_id", p.config.client_id.as_str())),
        }
        let resp = req.form(&form).send().await.map_err(|e| {
            IdentityError::Unavailable(format!("The OIDC provider {provider}'s token endpoint is unreachable: {e}"))
        })?;
        let status = resp.status();
        let answer: TokenAnswer = resp.json().await.map_err(|e| {
            IdentityError::Unavailable(format!("The OIDC provider {provider}'s token endpoint answered no JSON: {e}"))
        })?;
        if !status.is_success() {
            return Err(IdentityError::Unauthenticated(format!(
                "The OIDC provider {provider} refused the code: {} {}",
                answer.error.unwrap_or_default(),
                answer.error_description.unwrap_or_default()
            )));
        }
        let id_token = answer.id_token.ok_or_else(|| {
            IdentityError::Unauthenticated(format!("The OIDC provider {provider} answered no ID token"))
        })?;
        let claims = p.verify_id_token(&id_token, Some(&pending.nonce)).await?;
        let user = self.external_login(&p, &claims, source_ip.clone()).await?;
        let session = self.create_session(&user, SessionAuth::Oidc, Some(provider.to_string()), source_ip).await?;
        Ok(CallbackOutcome { session, return_to: pending.return_to })
    }

    /// The CLI's login: an ID token it got from the provider (device authorization grant,
    /// for the browser's or the CLI's client) for a Hangar token, through the same mapping.
    pub async fn oidc_token_exchange(
        &self,
        provider: &str,
        id_token: &str,
        source_ip: Option<String>,
    ) -> Result<IssuedToken> {
        let p = self.oidc_required()?.get(provider)?;
        let claims = p.verify_id_token(id_token, None).await?;
        let user = self.external_login(&p, &claims, source_ip).await?;
        self.issue_for(&user, None).await
    }

    /// A machine's access token from a configured issuer: verified on the provider's JWKS
    /// with the configured audience and mapped like a login, as a service principal (no
    /// stored user: `oidc:<provider>:<sub>`).
    pub(crate) async fn oidc_machine(&self, p: &Provider, token: &str) -> Result<Principal> {
        let claims = p.verify_jwt(token, &[p.config.audience()]).await?;
        let (roles, direct) = self.mapped(p, &claims).await;
        if roles.is_empty() && direct.is_empty() {
            return Err(IdentityError::Forbidden(format!(
                "The OIDC provider {}'s token maps to no Hangar role or claim",
                p.config.id
            )));
        }
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        let name = claims.get("client_id").and_then(Value::as_str).unwrap_or(sub);
        let who = NewUserIds {
            id: format!("oidc:{}:{sub}", p.config.id),
            username: format!("{name}@{}", p.config.id),
            name: name.to_string(),
            email: String::new(),
        };
        let from = ExternalIdentity { provider: p.config.id.clone(), subject: sub.to_string() };
        // Never stored: a principal for this request only, so no security stamp.
        let synthetic =
            StoredUser { security_stamp: String::new(), ..StoredUser::external(who, from, roles, direct, now()) };
        self.principal_for(&synthetic, AuthMethod::Jwt).await
    }

    /// The roles and claims the mapping grants, limited to those that exist.
    async fn mapped(&self, p: &Provider, claims: &Map<String, Value>) -> (Vec<String>, Vec<String>) {
        let mut roles = Vec::new();
        for r in p.config.role_map.apply(claims, &p.config.groups_claim) {
            match self.role(&r).await {
                Ok(Some((role, _))) => roles.push(role.name),
                _ => warn!(provider = %p.config.id, role = %r, "the OIDC role map names a role that does not exist"),
            }
        }
        let mut direct = Vec::new();
        for c in p.config.claim_map.apply(claims, &p.config.groups_claim) {
            match self.claim(&c).await {
                Ok(Some(claim)) => direct.push(claim.name),
                _ => warn!(provider = %p.config.id, claim = %c, "the OIDC claim map names a claim that does not exist"),
            }
        }
        (roles, direct)
    }

    /// The user of a verified ID token: found by `<provider>:<sub>`, or created just in time;
    /// roles and claims follow the mapping at every login; when it grants nothing any more
    /// the user is disabled and its sessions and tokens die (new security stamp), in the
    /// batch that audits it.
    async fn external_login(
        &self,
        p: &Provider,
        claims: &Map<String, Value>,
        source_ip: Option<String>,
    ) -> Result<StoredUser> {
        let pid = &p.config.id;
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| IdentityError::Unauthenticated(format!("The ID token from {pid} has no subject")))?;
        let ext_key = format!("{pid}:{sub}");
        let (roles, direct) = self.mapped(p, claims).await;
        let granted = !(roles.is_empty() && direct.is_empty());
        let actor_for = |u: &StoredUser| Actor {
            user_id: u.id.clone(),
            username: u.username.clone(),
            via: format!("oidc:{pid}"),
            source_ip: source_ip.clone(),
            request_id: None,
        };
        for _ in 0..4 {
            let existing = match self.store().get(EXTERNAL_IDS, &ext_key).await? {
                Some(r) => match r.value.as_str() {
                    Some(uid) => self.load_user_by_id(uid).await?,
                    None => None,
                },
                None => None,
            };
            if let Some((mut user, rev)) = existing {
                let actor = actor_for(&user);
                if !granted {
                    if !user.disabled {
                        user.disabled = true;
                        user.security_stamp = uuid::Uuid::new_v4().to_string();
                        user.updated_at = now();
                        let batch =
                            Batch::new().require_revision(USERS, &user.id, rev).put(USERS, &user.id, to_value(&user)?);
                        let batch = self.delete_sessions_of(batch, &user.id).await?;
                        let batch = audit(
                            batch,
                            &actor,
                            "user.sso_disabled",
                            "user",
                            &user.id,
                            json!({"provider": pid, "reason": "the provider's claims map to no role or claim"}),
                        )?;
                        match self.commit(batch).await {
                            Ok(()) => {}
                            Err(IdentityError::Store(StoreError::Conflict(_))) => continue,
                            Err(e) => return Err(e),
                        }
                        info!(user = %user.username, provider = %pid, "single sign-on user disabled: the mapping grants nothing any more");
                        self.publish("USER_DISABLED", json!({"user_id": user.id, "provider": pid}));
                    }
                    return Err(IdentityError::Forbidden(format!(
                        "User {} is no longer granted access by the provider {pid}; the account is disabled",
                        user.username
                    )));
                }
                if user.disabled {
                    return Err(IdentityError::Forbidden(format!(
                        "User {} is disabled; an administrator can enable it again",
                        user.username
                    )));
                }
                if user.roles != roles || user.claims != direct {
                    let before = json!({"roles": user.roles, "claims": user.claims});
                    user.roles = roles.clone();
                    user.claims = direct.clone();
                    user.updated_at = now();
                    let batch =
                        Batch::new().require_revision(USERS, &user.id, rev).put(USERS, &user.id, to_value(&user)?);
                    let batch = audit(
                        batch,
                        &actor,
                        "user.sso_update",
                        "user",
                        &user.id,
                        json!({"provider": pid, "before": before, "roles": roles, "claims": direct}),
                    )?;
                    match self.commit(batch).await {
                        Ok(()) => {}
                        Err(IdentityError::Store(StoreError::Conflict(_))) => continue,
                        Err(e) => return Err(e),
                    }
                }
                return Ok(user);
            }
            if !granted {
                return Err(IdentityError::Forbidden(format!(
                    "The provider {pid}'s claims for this account map to no Hangar role or claim"
                )));
            }
            let user = self.new_external_user(pid, sub, claims, roles.clone(), direct.clone()).await?;
            let batch = self.user_insert_batch(&user)?.require_absent(EXTERNAL_IDS, &ext_key).put(
                EXTERNAL_IDS,
                &ext_key,
                json!(user.id),
            );
            let batch = audit(
                batch,
                &actor_for(&user),
                "user.create",
                "user",
                &user.id,
                json!({"username": user.username, "roles": user.roles, "claims": user.claims, "provider": pid, "just_in_time": true}),
            )?;
            match self.commit(batch).await {
                Ok(()) => {
                    info!(user = %user.username, provider = %pid, "created a single sign-on user just in time");
                    self.publish("USER_ADDED", json!({"user_id": user.id, "provider": pid}));
                    return Ok(user);
                }
                // A concurrent first login of the same account, or a name taken meanwhile.
                Err(IdentityError::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(IdentityError::Conflict("The user changed concurrently too often; log in again".into()))
    }

    /// A new external user: a free username from `preferred_username`/`email`/`sub` (never an
    /// existing local account's: that would hand it over), an email that is free or a
    /// placeholder, no password.
    async fn new_external_user(
        &self,
        pid: &str,
        sub: &str,
        claims: &Map<String, Value>,
        roles: Vec<String>,
        direct: Vec<String>,
    ) -> Result<StoredUser> {
        let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
        let base = s("preferred_username").or_else(|| s("email").and_then(|e| e.split('@').next())).unwrap_or(sub);
        let clean: String =
            base.chars().filter(|c| c.is_ascii_alphanumeric() || "._-@".contains(*c)).take(48).collect::<String>();
        let clean = if clean.is_empty() { "user".to_string() } else { clean };
        let short = &hash(&format!("{pid}:{sub}"))[..8];
        let mut username = None;
        for cand in [clean.clone(), format!("{clean}@{pid}"), format!("{pid}-{short}")] {
            let Ok(c) = check_username(&cand) else { continue };
            if self.store().get(USER_NAMES, &c.to_lowercase()).await?.is_none() {
                username = Some(c);
                break;
            }
        }
        let username = username.ok_or_else(|| IdentityError::Conflict(format!("No free username for {base}")))?;
        let email = match s("email").map(check_email) {
            Some(Ok(e)) if self.store().get(USER_EMAILS, &e.to_lowercase()).await?.is_none() => e,
            _ => format!("{short}@{pid}.sso.invalid"),
        };
        let who = NewUserIds {
            id: uuid::Uuid::now_v7().to_string(),
            username,
            name: s("name").unwrap_or(base).chars().take(200).collect(),
            email,
        };
        let from = ExternalIdentity { provider: pid.to_string(), subject: sub.to_string() };
        Ok(StoredUser::external(who, from, roles, direct, now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_is_a_local_path() {
        assert!(check_return_to("/console/vms?x=1").is_ok());
        for bad in ["https://evil.example/", "//evil.example/", "/\\evil", "console", "/a\nb", ""] {
            assert!(check_return_to(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issuer_is_read_without_verifying() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"http://idp.example","sub":"x"}"#);
        assert_eq!(unverified_issuer(&format!("e30.{payload}.sig")).as_deref(), Some("http://idp.example"));
        assert_eq!(unverified_issuer("nonsense"), None);
    }
}
