//! Browser sessions: the credential behind the `hangar_session` cookie.
//!
//! Invariants:
//! - The cookie holds 256 random bits; the store keeps only a keyed BLAKE3 hash of it (the
//!   API-key pepper is the key), so a copy of the store opens no session.
//! - A session expires after `idle` without use and `absolute` after it was made, whichever
//!   comes first; an expired session is deleted when it is presented.
//! - A session is bound to its user's security stamp: a password change, a disable or a
//!   deletion ends it at its next request (the user is read again every time, like tokens).
//! - The CSRF token is derived from the cookie's secret with a different key (never stored),
//!   so it is stable for the session's life and worthless without the cookie.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_core::audit::Actor;
use hangar_core::{AuthMethod, Principal};
use hangar_store::{Batch, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::debug;

use super::{Identity, audit, from_value, now, random_token, to_value};
use crate::error::{IdentityError, Result};
use crate::model::{SESSIONS, StoredUser, UserView};

/// How long a session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Ends a session not used for this long (`SESSION_IDLE_TIMEOUT`).
    pub idle: Duration,
    /// Ends a session this long after it was made, used or not (`SESSION_MAX_AGE`).
    pub absolute: Duration,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy { idle: Duration::from_secs(8 * 3600), absolute: Duration::from_secs(24 * 3600) }
    }
}

/// How the session's user signed in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionAuth {
    Local,
    Oidc,
}

impl SessionAuth {
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionAuth::Local => "local",
            SessionAuth::Oidc => "oidc",
        }
    }
}

/// A session as stored (its id is the keyed hash of the cookie's secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    pub id: String,
    pub user_id: String,
    /// The user's security stamp when the session was made.
    pub stamp: String,
    pub auth: SessionAuth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The absolute end.
    pub expires_at: DateTime<Utc>,
}

/// A session just made: the cookie value and the CSRF token are shown this once (the CSRF
/// token can be asked for again with the cookie).
#[derive(Debug, Clone)]
pub struct NewSession {
    pub cookie: String,
    pub csrf_token: String,
    pub user: UserView,
    pub auth: SessionAuth,
    pub provider: Option<String>,
    /// Seconds the cookie may live (the absolute lifetime).
    pub max_age: u64,
}

/// A valid session presented with a request.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub principal: Principal,
    pub user: UserView,
    pub csrf_token: String,
    pub auth: SessionAuth,
    pub provider: Option<String>,
    /// The stored id (a hash; safe to log).
    pub id: String,
}

const SESSION_DOMAIN: &[u8] = b"hangar session id\0";
const CSRF_DOMAIN: &[u8] = b"hangar session csrf\0";
/// `last_seen` is written at most this often per session, so a busy console does not write
/// to the store on every request.
const TOUCH_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

impl Identity {
    fn session_mac(&self, domain: &[u8], secret: &str) -> String {
        let mut k = [0u8; 32];
        let n = self.inner.pepper.len().min(32);
        k[..n].copy_from_slice(&self.inner.pepper[..n]);
        let mut h = blake3::Hasher::new_keyed(&k);
        h.update(domain);
        h.update(secret.as_bytes());
        h.finalize().to_hex().to_string()
    }

    fn session_id_of(&self, cookie: &str) -> Option<String> {
        let c = cookie.trim();
        // 32 bytes in URL-safe base64 without padding: 43 characters.
        if c.len() != 43 || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return None;
        }
        Some(self.session_mac(SESSION_DOMAIN, c))
    }

    /// The CSRF token of a session cookie.
    pub fn csrf_token_of(&self, cookie: &str) -> String {
        self.session_mac(CSRF_DOMAIN, cookie.trim())
    }

    /// Whether `presented` is the CSRF token of `cookie` (constant time).
    pub fn csrf_matches(&self, cookie: &str, presented: &str) -> bool {
        let want = self.csrf_token_of(cookie);
        aws_lc_rs::constant_time::verify_slices_are_equal(want.as_bytes(), presented.trim().as_bytes()).is_ok()
    }

    pub fn session_policy(&self) -> &SessionPolicy {
        &self.inner.options.sessions
    }

    /// Log in with a password and open a browser session (same throttling and hash pool as
    /// [`Identity::login`]).
    pub async fn login_session(&self, ident: &str, password: &str, source_ip: Option<String>) -> Result<NewSession> {
        let user = self.verify_login(ident, password, source_ip.clone()).await?;
        self.create_session(&user, SessionAuth::Local, None, source_ip).await
    }

    /// Open a session for a user whose identity was verified (a password, an OIDC login).
    pub(crate) async fn create_session(
        &self,
        user: &StoredUser,
        auth: SessionAuth,
        provider: Option<String>,
        source_ip: Option<String>,
    ) -> Result<NewSession> {
        if user.disabled {
            return Err(IdentityError::Forbidden(format!("User {} is disabled", user.username)));
        }
        let secret = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, random_token(32)?);
        let id = self.session_mac(SESSION_DOMAIN, &secret);
        let policy = &self.inner.options.sessions;
        let t = now();
        let absolute = chrono::Duration::from_std(policy.absolute).unwrap_or(chrono::TimeDelta::hours(24));
        let stored = StoredSession {
            id: id.clone(),
            user_id: user.id.clone(),
            stamp: user.security_stamp.clone(),
            auth: auth.clone(),
            provider: provider.clone(),
            source_ip: source_ip.clone(),
            created_at: t,
            last_seen: t,
            expires_at: t + absolute,
        };
        let actor = Actor {
            user_id: user.id.clone(),
            username: user.username.clone(),
            via: match &provider {
                Some(p) => format!("oidc:{p}"),
                None => "password".into(),
            },
            source_ip,
            request_id: None,
        };
        let batch = Batch::new().require_absent(SESSIONS, &id).put(SESSIONS, &id, to_value(&stored)?);
        let batch = audit(batch, &actor, "session.create", "user", &user.id, json!({"auth": auth.as_str()}))?;
        self.commit(batch).await?;
        Ok(NewSession {
            csrf_token: self.csrf_token_of(&secret),
            cookie: secret,
            user: user.view(),
            auth,
            provider,
            max_age: policy.absolute.as_secs(),
        })
    }

    /// The session of a cookie, checked against the store now: unknown, expired (idle or
    /// absolute), or outlived by its user's security stamp, disable or deletion is refused
    /// (and deleted).
    pub async fn session(&self, cookie: &str) -> Result<SessionInfo> {
        let gone = || IdentityError::Unauthenticated("The session has ended; log in again".into());
        let id = self.session_id_of(cookie).ok_or_else(gone)?;
        let rec = self.inner.store.get(SESSIONS, &id).await?.ok_or_else(gone)?;
        let revision = rec.revision;
        let mut s: StoredSession = from_value(rec.value, "session")?;
        let t = now();
        let idle = chrono::Duration::from_std(self.inner.options.sessions.idle).unwrap_or(chrono::TimeDelta::hours(8));
        let why = if s.expires_at <= t {
            Some("expired")
        } else if s.last_seen + idle <= t {
            Some("idle")
        } else {
            None
        };
        let user = match why {
            Some(_) => None,
            None => self.load_user_by_id(&s.user_id).await?.map(|(u, _)| u),
        };
        let end = match (why, &user) {
            (Some(w), _) => Some(w),
            (None, None) => Some("user deleted"),
            (None, Some(u)) if u.disabled => Some("user disabled"),
            (None, Some(u)) if u.security_stamp != s.stamp => Some("credentials changed"),
            _ => None,
        };
        if let Some(reason) = end {
            debug!(session = %id, reason, "session ended");
            let batch = Batch::new().require_revision(SESSIONS, &id, revision).delete(SESSIONS, &id);
            match self.commit(batch).await {
                Ok(()) | Err(IdentityError::Store(StoreError::Conflict(_))) => {}
                Err(e) => return Err(e),
            }
            return Err(gone());
        }
        let Some(user) = user else { return Err(gone()) };
        if t - s.last_seen >= TOUCH_EVERY {
            s.last_seen = t;
            let batch = Batch::new().require_revision(SESSIONS, &id, revision).put(SESSIONS, &id, to_value(&s)?);
            match self.commit(batch).await {
                // A concurrent request touched it first.
                Ok(()) | Err(IdentityError::Store(StoreError::Conflict(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let principal = self.principal_for(&user, AuthMethod::Jwt).await?;
        Ok(SessionInfo {
            principal,
            user: user.view(),
            csrf_token: self.csrf_token_of(cookie),
            auth: s.auth,
            provider: s.provider,
            id,
        })
    }

    /// Log out: delete the session of a cookie (nothing when it is unknown).
    pub async fn delete_session(&self, cookie: &str, actor: &Actor) -> Result<()> {
        let Some(id) = self.session_id_of(cookie) else { return Ok(()) };
        let Some(rec) = self.inner.store.get(SESSIONS, &id).await? else { return Ok(()) };
        let s: StoredSession = from_value(rec.value, "session")?;
        let batch = Batch::new().require_revision(SESSIONS, &id, rec.revision).delete(SESSIONS, &id);
        let batch = audit(batch, actor, "session.delete", "user", &s.user_id, json!({}))?;
        match self.commit(batch).await {
            Ok(()) | Err(IdentityError::Store(StoreError::Conflict(_))) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delete the sessions of a user in a batch being built (a JIT user disabled by its
    /// provider's mapping): they would die at their next request anyway, this frees them now.
    pub(crate) async fn delete_sessions_of(&self, mut batch: Batch, user_id: &str) -> Result<Batch> {
        for rec in self.inner.store.list(SESSIONS).await? {
            let s: StoredSession = from_value(rec.value, "session")?;
            if s.user_id == user_id {
                batch = batch.delete(SESSIONS, &s.id);
            }
        }
        Ok(batch)
    }

    /// How many sessions a user has (tests, diagnostics).
    pub async fn session_count(&self, user_id: &str) -> Result<usize> {
        let mut n = 0;
        for rec in self.inner.store.list(SESSIONS).await? {
            let s: StoredSession = from_value(rec.value, "session")?;
            if s.user_id == user_id && s.expires_at > now() {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;
    use crate::model::UserUpdate;
    use crate::service::IdentityOptions;
    use crate::tokens::{TokenConfig, TokenService};
    use hangar_core::EventBus;
    use hangar_store::{MemoryStore, Store};

    async fn identity(policy: SessionPolicy) -> (Identity, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let tokens = TokenService::new(TokenConfig::default(), dir.path()).unwrap();
        let options = IdentityOptions { sessions: policy, ..Default::default() };
        let id = Identity::new(store, tokens, options, EventBus::default(), dir.path()).unwrap();
        id.bootstrap(Some("Root-Passw0rd!")).await.unwrap();
        (id, dir)
    }

    #[tokio::test]
    async fn a_session_is_hashed_checked_and_ends_with_the_stamp() {
        let (id, _d) = identity(SessionPolicy::default()).await;
        assert!(id.login_session("root", "wrong", None).await.is_err());
        let s = id.login_session("root", "Root-Passw0rd!", None).await.unwrap();
        assert_eq!(s.cookie.len(), 43);
        // Stored by hash only.
        let stored = id.store().list(SESSIONS).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert!(!stored[0].value.to_string().contains(&s.cookie));
        assert_ne!(stored[0].id, s.cookie);
        let info = id.session(&s.cookie).await.unwrap();
        assert_eq!(info.principal.username, "root");
        assert_eq!(info.csrf_token, s.csrf_token);
        assert!(id.csrf_matches(&s.cookie, &s.csrf_token));
        assert!(!id.csrf_matches(&s.cookie, "x"));
        // A damaged cookie opens nothing.
        let mut bad = s.cookie.clone();
        bad.replace_range(0..1, if bad.starts_with('A') { "B" } else { "A" });
        assert!(id.session(&bad).await.is_err());
        // A password change ends it.
        let p = info.principal.clone();
        let actor = Actor::system();
        id.update_user(
            &p,
            &actor,
            &p.user_id,
            UserUpdate { password: Some("An0ther-Passw0rd!".into()), ..Default::default() },
        )
        .await
        .unwrap();
        assert!(id.session(&s.cookie).await.is_err());
        assert!(id.store().list(SESSIONS).await.unwrap().is_empty(), "the ended session is deleted");
        // Logout deletes it.
        let s2 = id.login_session("root", "An0ther-Passw0rd!", None).await.unwrap();
        id.delete_session(&s2.cookie, &actor).await.unwrap();
        assert!(id.session(&s2.cookie).await.is_err());
    }

    #[tokio::test]
    async fn idle_and_absolute_expiry() {
        let (id, _d) =
            identity(SessionPolicy { idle: Duration::from_secs(3600), absolute: Duration::from_secs(7200) }).await;
        let s = id.login_session("root", "Root-Passw0rd!", None).await.unwrap();
        let rec = id.store().list(SESSIONS).await.unwrap().remove(0);
        let mut v: StoredSession = from_value(rec.value, "session").unwrap();
        // Idle for longer than the idle timeout.
        v.last_seen = now() - chrono::TimeDelta::seconds(3601);
        id.store().commit(Batch::new().put(SESSIONS, &v.id, to_value(&v).unwrap())).await.unwrap();
        assert!(id.session(&s.cookie).await.is_err());
        // Used recently but past its absolute end.
        let s = id.login_session("root", "Root-Passw0rd!", None).await.unwrap();
        let rec = id.store().list(SESSIONS).await.unwrap().remove(0);
        let mut v: StoredSession = from_value(rec.value, "session").unwrap();
        v.expires_at = now() - chrono::TimeDelta::seconds(1);
        id.store().commit(Batch::new().put(SESSIONS, &v.id, to_value(&v).unwrap())).await.unwrap();
        assert!(id.session(&s.cookie).await.is_err());
        // A fresh one works.
        let s = id.login_session("root", "Root-Passw0rd!", None).await.unwrap();
        assert!(id.session(&s.cookie).await.is_ok());
    }
}
