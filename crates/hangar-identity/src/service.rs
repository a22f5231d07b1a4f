//! The identity service: every identity operation, authorised against the caller and
//! written together with its audit entry.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::claims::{self, ALL_SYSTEM_CLAIMS, DEFAULT_ROLES, SUPER_USER_ROLE, USER_ROLE};
use hangar_core::{AuthMethod, Event, EventBus, EventType, Principal};
use hangar_store::{Batch, Store, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::error::{IdentityError, Result};
use crate::model::*;
use crate::password::{self, PasswordPolicy};
use crate::secrets;
use crate::throttle::Throttle;
use crate::tokens::TokenService;

mod pds_import;
mod sessions;
pub use pds_import::{
    IdentityImport, IdentityImportReport, ImportedApiKey, ImportedClaim, ImportedRole, ImportedUser, KindReport,
    ServiceUserReport,
};
pub use sessions::{NewSession, SessionAuth, SessionInfo, SessionPolicy, StoredSession};

/// Failed-login lockout, with the reference's key names. It applies per source address and
/// account (see [`crate::throttle`]): bad passwords sent by anyone never lock the account out
/// for its owner at another address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// `BRUTE_FORCE_MAX_LOGIN_ATTEMPTS`: failures in a row from one address for one account
    /// before that address must wait.
    pub max_attempts: u32,
    /// `BRUTE_FORCE_LOCKOUT_DURATION`: how long that address waits.
    pub duration: Duration,
    /// `BRUTE_FORCE_INCREMENTAL_WAIT`: each further lockout of the same address and account
    /// doubles the wait.
    pub incremental: bool,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy { max_attempts: 5, duration: Duration::from_secs(300), incremental: true }
    }
}

#[derive(Debug, Clone, Default)]
pub struct IdentityOptions {
    pub password_policy: PasswordPolicy,
    pub lockout: LockoutPolicy,
    pub sessions: SessionPolicy,
}

/// The identity service. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    tokens: TokenService,
    options: IdentityOptions,
    bus: EventBus,
    pepper: Vec<u8>,
    hasher: password::HashPool,
    throttle: Arc<Throttle>,
    /// Single sign-on, when OIDC providers are configured (set once at start).
    oidc: std::sync::OnceLock<Arc<crate::oidc::Oidc>>,
}

const ROOT_USERNAME: &str = "root";
const ROOT_EMAIL: &str = "root@localhost";

pub(crate) fn now() -> DateTime<Utc> {
    Utc::now()
}

pub(crate) fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| IdentityError::Internal(format!("serialise: {e}")))
}

pub(crate) fn from_value<T: DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| IdentityError::Internal(format!("stored {what} is unreadable: {e}")))
}

pub(crate) fn random_token(bytes: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| IdentityError::Internal("no randomness".into()))?;
    Ok(b)
}

/// Names of roles and claims: trimmed, upper-case, `[A-Z0-9_]`, 1..=64 chars.
pub fn normalise_name(kind: &str, name: &str) -> Result<String> {
    let n = name.trim().to_ascii_uppercase().replace(['-', ' '], "_");
    if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(IdentityError::Invalid(format!(
            "{kind} name {name:?} is invalid: use 1 to 64 letters, digits or underscores"
        )));
    }
    Ok(n)
}

pub(crate) fn check_username(u: &str) -> Result<String> {
    let u = u.trim();
    if u.is_empty() || u.len() > 64 || !u.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c)) {
        return Err(IdentityError::Invalid(format!(
            "username {u:?} is invalid: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
        )));
    }
    Ok(u.to_string())
}

pub(crate) fn check_email(e: &str) -> Result<String> {
    let e = e.trim();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.starts_with('.'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(IdentityError::Invalid(format!("email {e:?} is not a valid address")));
    }
    Ok(e.to_string())
}

fn check_text(field: &str, v: &str, max: usize) -> Result<()> {
    if v.chars().count() > max || v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(IdentityError::Invalid(format!("{field} must be at most {max} printable characters")));
    }
    Ok(())
}

pub(crate) fn audit(
    batch: Batch,
    actor: &Actor,
    action: &str,
    target_type: &str,
    target_id: &str,
    detail: Value,
) -> Result<Batch> {
    let entry = AuditEntry::new(actor, action, target_type, target_id, detail);
    Ok(batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?))
}

impl Identity {
    /// Open the identity service on a store. Creates the API-key pepper in
    /// `data_dir/secrets/` on first use.
    pub fn new(
        store: Arc<dyn Store>,
        tokens: TokenService,
        options: IdentityOptions,
        bus: EventBus,
        data_dir: &std::path::Path,
    ) -> Result<Self> {
        let pepper = secrets::load_or_generate(&data_dir.join("secrets").join("api-key-pepper.key"), 32)?;
        let throttle = Arc::new(Throttle::new(options.lockout.clone()));
        let hasher = password::HashPool::default();
        Ok(Identity {
            inner: Arc::new(Inner {
                store,
                tokens,
                options,
                bus,
                pepper,
                hasher,
                throttle,
                oidc: std::sync::OnceLock::new(),
            }),
        })
    }

    /// How many password hashes may run at once (one per core, at most 8).
    pub fn concurrent_hashes(&self) -> usize {
        self.inner.hasher.size()
    }

    async fn hash_password(&self, pw: String) -> Result<String> {
        self.inner.hasher.hash(pw).await
    }

    /// Turn single sign-on on (once, at start).
    pub fn set_oidc(&self, oidc: Arc<crate::oidc::Oidc>) {
        if self.inner.oidc.set(oidc).is_err() {
            warn!("OIDC was already configured; the second configuration is ignored");
        }
    }

    /// The OIDC providers, when single sign-on is on.
    pub fn oidc(&self) -> Option<&Arc<crate::oidc::Oidc>> {
        self.inner.oidc.get()
    }

    pub fn tokens(&self) -> &TokenService {
        &self.inner.tokens
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub(crate) fn publish(&self, message: &str, body: Value) {
        self.inner.bus.publish(Event::new(EventType::Auth, message, body));
    }

    pub(crate) async fn commit(&self, batch: Batch) -> Result<()> {
        self.inner.store.commit(batch).await?;
        Ok(())
    }

    // ----- bootstrap -----------------------------------------------------------------

    /// Seed claims, roles and the root user. Returns the root password when one was
    /// generated (first start without `ROOT_PASSWORD`), so the caller can print it once.
    ///
    /// Idempotent across replicas: every write carries a condition (`Absent` for a new
    /// record, `Revision` for an updated role), so when several replicas seed one empty
    /// database at once, the one that loses a race gets `Conflict`, re-reads what the
    /// other wrote and goes on from there.
    pub async fn bootstrap(&self, root_password: Option<&str>) -> Result<Option<String>> {
        const ATTEMPTS: usize = 8;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.seed_once(root_password).await {
                Err(IdentityError::Store(StoreError::Conflict(why))) if attempt < ATTEMPTS => {
                    info!(attempt, %why, "another replica seeded at the same time; reading its records again");
                }
                other => return other,
            }
        }
    }

    async fn seed_once(&self, root_password: Option<&str>) -> Result<Option<String>> {
        let actor = Actor::system();
        let t = now();
        let mut batch = Batch::new();
        let mut changed = false;
        for name in ALL_SYSTEM_CLAIMS {
            if self.inner.store.get(CLAIMS, name).await?.is_none() {
                let (group, resource, action) = claims::claim_metadata(name);
                let c = Claim {
                    id: name.to_string(),
                    name: name.to_string(),
                    description: String::new(),
                    internal: true,
                    group,
                    resource,
                    action,
                    created_at: t,
                    updated_at: t,
                };
                batch = batch.require_absent(CLAIMS, name).put(CLAIMS, name, to_value(&c)?);
                changed = true;
            }
        }
        for role in DEFAULT_ROLES {
            let wanted: Vec<String> = claims::default_role_claims(role).iter().map(|s| s.to_string()).collect();
            match self.inner.store.get(ROLES, role).await? {
                None => {
                    let r = Role {
                        id: role.to_string(),
                        name: role.to_string(),
                        description: format!("Built-in {role} role"),
                        internal: true,
                        claims: wanted,
                        created_at: t,
                        updated_at: t,
                    };
                    batch = batch.require_absent(ROLES, role).put(ROLES, role, to_value(&r)?);
                    changed = true;
                }
                Some(rec) if *role != USER_ROLE => {
                    // New system claims reach ADMIN and SUPER_USER on upgrade.
                    let revision = rec.revision;
                    let mut r: Role = from_value(rec.value, "role")?;
                    let before = r.claims.len();
                    for c in &wanted {
                        if !r.claims.contains(c) {
                            r.claims.push(c.clone());
                        }
                    }
                    if r.claims.len() != before {
                        r.updated_at = t;
                        batch = batch.require_revision(ROLES, role, revision).put(ROLES, role, to_value(&r)?);
                        changed = true;
                    }
                }
                Some(_) => {}
            }
        }
        if changed {
            batch = audit(batch, &actor, "system.seed", "system", "identity", json!({}))?;
            self.commit(batch).await?;
        }

        let existing = self.find_user(ROOT_USERNAME).await?;
        match (existing, root_password) {
            (None, given) => {
                let (pw, generated) = match given {
                    Some(p) => (p.to_string(), None),
                    None => {
                        let p = password::generate()?;
                        (p.clone(), Some(p))
                    }
                };
                let hash = self.hash_password(pw).await?;
                let who = NewUserIds {
                    id: uuid::Uuid::now_v7().to_string(),
                    username: ROOT_USERNAME.into(),
                    name: "Root".into(),
                    email: ROOT_EMAIL.into(),
                };
                let user = StoredUser::new(who, hash, vec![SUPER_USER_ROLE.into()], vec![], t);
                let batch = self.user_insert_batch(&user)?;
                let batch = audit(batch, &actor, "user.create", "user", &user.id, json!({"username": ROOT_USERNAME}))?;
                self.commit(batch).await?;
                info!(user_id = %user.id, "created the root user");
                Ok(generated)
            }
            (Some(mut root), Some(pw)) => {
                if !self.inner.hasher.verify(pw.to_string(), root.password_hash.clone()).await? {
                    root.password_hash = self.hash_password(pw.to_string()).await?;
                    root.security_stamp = uuid::Uuid::new_v4().to_string();
                }
                // The operator who sets ROOT_PASSWORD can always get back in.
                root.disabled = false;
                root.failed_login_attempts = 0;
                root.locked_until = None;
                root.lockouts = 0;
                if !root.roles.iter().any(|r| r == SUPER_USER_ROLE) {
                    root.roles.push(SUPER_USER_ROLE.into());
                }
                root.updated_at = t;
                let batch = Batch::new().put(USERS, &root.id, to_value(&root)?);
                let batch = audit(batch, &actor, "user.root_reset", "user", &root.id, json!({}))?;
                self.commit(batch).await?;
                Ok(None)
            }
            (Some(_), None) => Ok(None),
        }
    }

    pub(crate) fn user_insert_batch(&self, user: &StoredUser) -> Result<Batch> {
        let uname = user.username.to_lowercase();
        let email = user.email.to_lowercase();
        Ok(Batch::new()
            .require_absent(USER_NAMES, &uname)
            .require_absent(USER_EMAILS, &email)
            .require_absent(USERS, &user.id)
            .put(USERS, &user.id, to_value(user)?)
            .put(USER_NAMES, &uname, json!(user.id))
            .put(USER_EMAILS, &email, json!(user.id)))
    }

    // ----- lookups -------------------------------------------------------------------

    pub(crate) async fn load_user_by_id(&self, id: &str) -> Result<Option<(StoredUser, u64)>> {
        match self.inner.store.get(USERS, id).await? {
            Some(r) => Ok(Some((from_value(r.value, "user")?, r.revision))),
            None => Ok(None),
        }
    }

    /// Find a user by id, username or email (case-insensitive for the last two).
    pub async fn find_user(&self, ident: &str) -> Result<Option<StoredUser>> {
        Ok(self.find_user_rev(ident).await?.map(|(u, _)| u))
    }

    async fn find_user_rev(&self, ident: &str) -> Result<Option<(StoredUser, u64)>> {
        let ident = ident.trim();
        if ident.is_empty() {
            return Ok(None);
        }
        if let Some(u) = self.load_user_by_id(ident).await? {
            return Ok(Some(u));
        }
        let lower = ident.to_lowercase();
        for index in [USER_NAMES, USER_EMAILS] {
            if let Some(rec) = self.inner.store.get(index, &lower).await?
                && let Some(id) = rec.value.as_str()
                && let Some(u) = self.load_user_by_id(id).await?
            {
                return Ok(Some(u));
            }
        }
        Ok(None)
    }

    async fn require_user(&self, ident: &str) -> Result<(StoredUser, u64)> {
        self.find_user_rev(ident).await?.ok_or_else(|| IdentityError::not_found("User", ident))
    }

    pub(crate) async fn role(&self, name: &str) -> Result<Option<(Role, u64)>> {
        let Ok(n) = normalise_name("role", name) else { return Ok(None) };
        match self.inner.store.get(ROLES, &n).await? {
            Some(r) => Ok(Some((from_value(r.value, "role")?, r.revision))),
            None => Ok(None),
        }
    }

    pub(crate) async fn claim(&self, name: &str) -> Result<Option<Claim>> {
        let Ok(n) = normalise_name("claim", name) else { return Ok(None) };
        match self.inner.store.get(CLAIMS, &n).await? {
            Some(r) => Ok(Some(from_value(r.value, "claim")?)),
            None => Ok(None),
        }
    }

    /// The principal for a stored user: current roles and effective claims.
    pub async fn principal_for(&self, user: &StoredUser, method: AuthMethod) -> Result<Principal> {
        let mut claims: BTreeSet<String> = user.claims.iter().cloned().collect();
        let mut roles = BTreeSet::new();
        for r in &user.roles {
            if let Some((role, _)) = self.role(r).await? {
                claims.extend(role.claims.iter().cloned());
                roles.insert(role.name);
            }
        }
        Ok(Principal {
            user_id: user.id.clone(),
            username: user.username.clone(),
            email: user.email.clone(),
            roles,
            claims,
            method,
        })
    }

    // ----- authentication --------------------------------------------------------------

    /// Log in with a username or email and a password, from the peer address `actor_ip`.
    ///
    /// Failed logins are throttled per source address and account ([`LockoutPolicy`]); the
    /// password check runs in the bounded [`password::HashPool`], and an unknown user costs
    /// the same check against a dummy hash.
    pub async fn login(&self, ident: &str, password: &str, actor_ip: Option<String>) -> Result<IssuedToken> {
        let user = self.verify_login(ident, password, actor_ip).await?;
        self.issue_for(&user, None).await
    }

    /// The password check of a login (throttled, in the bounded pool), shared by token and
    /// browser-session logins. An external (single sign-on) user has no local password and
    /// is refused at the same cost as a wrong password.
    pub(crate) async fn verify_login(
        &self,
        ident: &str,
        password: &str,
        actor_ip: Option<String>,
    ) -> Result<StoredUser> {
        let found = self.find_user_rev(ident).await?;
        let shown = ident.trim().to_string();
        let account = match &found {
            Some((u, _)) => u.id.clone(),
            None => format!("unknown:{}", shown.to_lowercase()),
        };
        let source = actor_ip.clone().unwrap_or_else(|| "unknown".into());
        let locked = |wait: Duration| {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as i64;
            IdentityError::LockedOut {
                username: shown.clone(),
                until: now() + chrono::Duration::seconds(seconds),
                seconds,
            }
        };
        let attempt = self.inner.throttle.begin(&source, &account).map_err(locked)?;
        let _checking = self
            .inner
            .throttle
            .checking(&source, self.inner.hasher.per_source())
            .ok_or(IdentityError::TooManyAtOnce { seconds: 1 })?;
        let Some((mut user, rev)) = found else {
            self.inner.hasher.verify_dummy(password.to_string()).await?;
            return Err(match attempt.finish(false) {
                Some(wait) => locked(wait),
                None => IdentityError::InvalidCredentials,
            });
        };
        if let Some(ext) = &user.external {
            self.inner.hasher.verify_dummy(password.to_string()).await?;
            attempt.finish(false);
            return Err(IdentityError::Forbidden(format!(
                "User {} signs in through the single sign-on provider {}; use it instead of a password",
                user.username, ext.provider
            )));
        }
        let ok = self.inner.hasher.verify(password.to_string(), user.password_hash.clone()).await?;
        let actor = Actor {
            user_id: user.id.clone(),
            username: user.username.clone(),
            via: "password".into(),
            source_ip: actor_ip,
            request_id: None,
        };
        if !ok {
            let lock = attempt.finish(false);
            let action = if lock.is_some() { "user.lockout" } else { "user.login_failed" };
            let detail = json!({"source": source, "seconds": lock.map(|w| w.as_secs())});
            let batch = audit(Batch::new(), &actor, action, "user", &user.id, detail)?;
            match self.commit(batch).await {
                Ok(()) | Err(IdentityError::Store(StoreError::Conflict(_))) => {}
                Err(e) => return Err(e),
            }
            if let Some(wait) = lock {
                warn!(user = %user.username, source = %source, seconds = wait.as_secs(), "logins locked for one source address after failed logins");
                self.publish("USER_LOCKED", json!({"user_id": user.id, "source": source, "seconds": wait.as_secs()}));
                return Err(locked(wait));
            }
            return Err(IdentityError::InvalidCredentials);
        }
        attempt.finish(true);
        if user.disabled {
            return Err(IdentityError::Forbidden(format!("User {} is disabled", user.username)));
        }
        // A password imported from the reference service (bcrypt) is replaced by an argon2id
        // hash on its first successful use, with its audit entry in the same batch.
        let rehash = password::is_pds_hash(&user.password_hash);
        if rehash {
            user.password_hash = self.hash_password(password.to_string()).await?;
            user.updated_at = now();
        }
        // Lockouts stored on the user by earlier versions no longer apply; clear them.
        if rehash || user.failed_login_attempts != 0 || user.lockouts != 0 || user.locked_until.is_some() {
            user.failed_login_attempts = 0;
            user.lockouts = 0;
            user.locked_until = None;
            let mut batch = Batch::new().require_revision(USERS, &user.id, rev).put(USERS, &user.id, to_value(&user)?);
            if rehash {
                batch =
                    audit(batch, &actor, "user.password_rehashed", "user", &user.id, json!({"from": "pds-bcrypt"}))?;
            }
            match self.commit(batch).await {
                Ok(()) | Err(IdentityError::Store(StoreError::Conflict(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(user)
    }

    pub(crate) async fn issue_for(&self, user: &StoredUser, api_key_id: Option<String>) -> Result<IssuedToken> {
        let method = match &api_key_id {
            Some(id) => AuthMethod::ApiKey { key_id: id.clone() },
            None => AuthMethod::Jwt,
        };
        let p = self.principal_for(user, method).await?;
        let (token, exp) = self.inner.tokens.issue(
            &user.id,
            &user.username,
            &user.email,
            p.roles.into_iter().collect(),
            p.claims.into_iter().collect(),
            &user.security_stamp,
            api_key_id,
        )?;
        Ok(IssuedToken { token, email: user.email.clone(), expires_at: exp })
    }

    /// Exchange an API key (`base64(KEY:SECRET)`) for a token of its owner.
    pub async fn login_api_key(&self, encoded: &str) -> Result<IssuedToken> {
        let (key, user) = self.check_api_key(encoded).await?;
        self.issue_for(&user, Some(key.id)).await
    }

    /// Authenticate a bearer token against the store's current state.
    pub async fn authenticate_token(&self, token: &str) -> Result<Principal> {
        if let Some(p) = self.oidc().and_then(|o| o.provider_of_token(token)).cloned() {
            return self.oidc_machine(&p, token).await;
        }
        let claims = self.inner.tokens.verify(token)?;
        self.principal_of_token(claims).await
    }

    /// Check again the bearer token of a long-lived connection (a port-forward tunnel) that
    /// was authenticated when it opened: everything [`Identity::authenticate_token`] checks
    /// (the user exists and is enabled, no password change since, the API key behind it still
    /// valid, current roles and claims) except the token's expiry, so a session outlives its
    /// token but not a revocation.
    pub async fn recheck_token(&self, token: &str) -> Result<Principal> {
        if let Some(p) = self.oidc().and_then(|o| o.provider_of_token(token)).cloned() {
            return self.oidc_machine(&p, token).await;
        }
        let claims = self.inner.tokens.verify_past_expiry(token)?;
        self.principal_of_token(claims).await
    }

    async fn principal_of_token(&self, claims: crate::tokens::TokenClaims) -> Result<Principal> {
        let (user, _) = self
            .load_user_by_id(&claims.uid)
            .await?
            .ok_or_else(|| IdentityError::Unauthenticated("The token's user no longer exists".into()))?;
        if user.disabled {
            return Err(IdentityError::Unauthenticated(format!("User {} is disabled", user.username)));
        }
        if user.security_stamp != claims.stamp {
            return Err(IdentityError::Unauthenticated(
                "The token was revoked by a password change; log in again".into(),
            ));
        }
        let method = match claims.api_key_id {
            Some(id) => {
                // A token minted from an API key dies with the key.
                let rec = self.inner.store.get(API_KEYS, &id).await?;
                let key: Option<StoredApiKey> = rec.map(|r| from_value(r.value, "api key")).transpose()?;
                match key {
                    Some(k) if !k.revoked && k.expires_at.is_none_or(|t| t > now()) => {
                        AuthMethod::ApiKey { key_id: id }
                    }
                    _ => {
                        return Err(IdentityError::Unauthenticated(
                            "The API key behind this token is no longer valid".into(),
                        ));
                    }
                }
            }
            None => AuthMethod::Jwt,
        };
        self.principal_for(&user, method).await
    }

    /// Authenticate an `X-Api-Key` header value.
    pub async fn authenticate_api_key(&self, encoded: &str) -> Result<Principal> {
        let (key, user) = self.check_api_key(encoded).await?;
        self.principal_for(&user, AuthMethod::ApiKey { key_id: key.id }).await
    }

    fn secret_hash(&self, secret: &str) -> String {
        let mut k = [0u8; 32];
        let n = self.inner.pepper.len().min(32);
        k[..n].copy_from_slice(&self.inner.pepper[..n]);
        blake3::keyed_hash(&k, secret.as_bytes()).to_hex().to_string()
    }

    async fn check_api_key(&self, encoded: &str) -> Result<(StoredApiKey, StoredUser)> {
        let bad = || IdentityError::Unauthenticated("Invalid API key".into());
        let decoded = STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (key, secret) = text.split_once(':').ok_or_else(bad)?;
        let key = key.trim().to_ascii_uppercase();
        let id = match self.inner.store.get(API_KEY_INDEX, &key).await? {
            Some(r) => r.value.as_str().map(String::from).ok_or_else(bad)?,
            None => return Err(bad()),
        };
        let rec = self.inner.store.get(API_KEYS, &id).await?.ok_or_else(bad)?;
        let revision = rec.revision;
        let mut stored: StoredApiKey = from_value(rec.value, "api key")?;
        let presented = self.secret_hash(secret);
        let imported = password::is_pds_hash(&stored.secret_hash);
        if imported {
            // A key imported from the reference: its bcrypt hash is checked once, in the
            // bounded pool, then replaced below by the keyed hash every other key has.
            if !self.inner.hasher.verify(secret.to_string(), stored.secret_hash.clone()).await? {
                return Err(bad());
            }
        } else if aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_bytes(), stored.secret_hash.as_bytes())
            .is_err()
        {
            return Err(bad());
        }
        if stored.revoked {
            return Err(IdentityError::Unauthenticated("The API key was revoked".into()));
        }
        if stored.expires_at.is_some_and(|t| t <= now()) {
            return Err(IdentityError::Unauthenticated("The API key has expired".into()));
        }
        let (user, _) = self
            .load_user_by_id(&stored.user_id)
            .await?
            .ok_or_else(|| IdentityError::Unauthenticated("The API key's user no longer exists".into()))?;
        if user.disabled {
            return Err(IdentityError::Unauthenticated(format!("User {} is disabled", user.username)));
        }
        if imported {
            stored.secret_hash = presented;
            stored.updated_at = now();
            let actor = Actor {
                user_id: user.id.clone(),
                username: user.username.clone(),
                via: format!("api_key:{}", stored.id),
                source_ip: None,
                request_id: None,
            };
            let batch = Batch::new().require_revision(API_KEYS, &stored.id, revision).put(
                API_KEYS,
                &stored.id,
                to_value(&stored)?,
            );
            let batch =
                audit(batch, &actor, "api_key.secret_rehashed", "api_key", &stored.id, json!({"from": "pds-bcrypt"}))?;
            match self.commit(batch).await {
                // Another request upgraded it first.
                Ok(()) | Err(IdentityError::Store(StoreError::Conflict(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((stored, user))
    }

    /// `true` when the token is valid now.
    pub async fn validate_token(&self, token: &str) -> bool {
        self.authenticate_token(token).await.is_ok()
    }

    // ----- users -----------------------------------------------------------------------

    pub async fn list_users(&self) -> Result<Vec<UserView>> {
        let mut out = Vec::new();
        for r in self.inner.store.list(USERS).await? {
            let u: StoredUser = from_value(r.value, "user")?;
            out.push(u.view());
        }
        Ok(out)
    }

    pub async fn get_user(&self, ident: &str) -> Result<UserView> {
        Ok(self.require_user(ident).await?.0.view())
    }

    /// Refuse to grant what the granter does not hold (no privilege escalation).
    async fn check_grantable(&self, by: &Principal, roles: &[String], claims: &[String]) -> Result<()> {
        if by.is_super_user() {
            return Ok(());
        }
        for r in roles {
            if r == SUPER_USER_ROLE {
                return Err(IdentityError::Forbidden("Only a SUPER_USER can grant the SUPER_USER role".into()));
            }
            // Roles are granted as claims are: only by someone who holds them. The default
            // role every new user gets is the one exception, when it carries nothing the
            // granter lacks.
            if by.roles.contains(r) {
                continue;
            }
            if r != USER_ROLE {
                return Err(IdentityError::Forbidden(format!(
                    "Cannot grant role {r}, which you do not hold; ask a user who holds it or a SUPER_USER"
                )));
            }
            if let Some((role, _)) = self.role(r).await? {
                for c in &role.claims {
                    if !by.claims.contains(c) {
                        return Err(IdentityError::Forbidden(format!(
                            "Cannot grant role {r}: it carries claim {c}, which you do not hold"
                        )));
                    }
                }
            }
        }
        for c in claims {
            if !by.claims.contains(c) {
                return Err(IdentityError::Forbidden(format!("Cannot grant claim {c}, which you do not hold")));
            }
        }
        Ok(())
    }

    /// Whether `by` may change, disable, reset, delete or make keys for `target`: itself, a
    /// SUPER_USER, or a caller who holds every role and every claim (direct or through a
    /// role) of the target. Otherwise a holder of UPDATE_USER could take over an account
    /// with more rights than his own (set its password, log in as it).
    async fn check_manageable(&self, by: &Principal, target: &StoredUser) -> Result<()> {
        if target.id == by.user_id || by.is_super_user() {
            return Ok(());
        }
        let tp = self.principal_for(target, AuthMethod::Jwt).await?;
        if tp.is_super_user() {
            return Err(IdentityError::Forbidden(format!(
                "User {} is a SUPER_USER; only a SUPER_USER can change, disable, reset or delete them",
                target.username
            )));
        }
        let mut lacking: Vec<String> =
            tp.roles.iter().filter(|r| !by.roles.contains(*r)).map(|r| format!("role {r}")).collect();
        lacking.extend(tp.claims.iter().filter(|c| !by.claims.contains(*c)).map(|c| format!("claim {c}")));
        if !lacking.is_empty() {
            return Err(IdentityError::Forbidden(format!(
                "User {} holds {} which you do not; only a user who holds all of their roles and claims, or a SUPER_USER, can change, disable, reset or delete them or make keys for them",
                target.username,
                lacking.join(", ")
            )));
        }
        Ok(())
    }

    pub async fn create_user(&self, by: &Principal, actor: &Actor, input: NewUser) -> Result<UserView> {
        let username = check_username(&input.username)?;
        let email = check_email(&input.email)?;
        let name = input.name.clone().unwrap_or_else(|| username.clone());
        check_text("name", &name, 200)?;
        self.inner.options.password_policy.check(&input.password)?;
        let mut roles = Vec::new();
        for r in &input.roles {
            let (role, _) =
                self.role(r).await?.ok_or_else(|| IdentityError::Invalid(format!("role {r:?} does not exist")))?;
            if !roles.contains(&role.name) {
                roles.push(role.name);
            }
        }
        if input.is_super_user && !roles.iter().any(|r| r == SUPER_USER_ROLE) {
            roles.push(SUPER_USER_ROLE.into());
        }
        if roles.is_empty() {
            roles.push(USER_ROLE.into());
        }
        let mut claims = Vec::new();
        for c in &input.claims {
            let claim =
                self.claim(c).await?.ok_or_else(|| IdentityError::Invalid(format!("claim {c:?} does not exist")))?;
            if !claims.contains(&claim.name) {
                claims.push(claim.name);
            }
        }
        self.check_grantable(by, &roles, &claims).await?;
        let hash = self.hash_password(input.password.clone()).await?;
        let who = NewUserIds { id: uuid::Uuid::now_v7().to_string(), username, name, email };
        let user = StoredUser::new(who, hash, roles, claims, now());
        let batch = self.user_insert_batch(&user)?;
        let batch = audit(
            batch,
            actor,
            "user.create",
            "user",
            &user.id,
            json!({"username": user.username, "roles": user.roles}),
        )?;
        match self.commit(batch).await {
            Err(IdentityError::Store(StoreError::Conflict(_))) => {
                return Err(IdentityError::Conflict(format!(
                    "A user with username {:?} or email {:?} already exists",
                    user.username, user.email
                )));
            }
            other => other?,
        }
        self.publish("USER_ADDED", json!({"user_id": user.id, "username": user.username}));
        Ok(user.view())
    }

    /// Read-modify-write a user with optimistic concurrency.
    async fn modify_user<F>(&self, ident: &str, actor: &Actor, action: &str, detail: Value, f: F) -> Result<StoredUser>
    where
        F: Fn(&mut StoredUser) -> Result<()>,
    {
        Ok(self.modify_user_ext(ident, actor, action, detail, false, f).await?.0)
    }

    /// [`Identity::modify_user`], revoking the user's API keys in the same commit when
    /// `revoke_keys`; answers the keys revoked.
    async fn modify_user_ext<F>(
        &self,
        ident: &str,
        actor: &Actor,
        action: &str,
        detail: Value,
        revoke_keys: bool,
        f: F,
    ) -> Result<(StoredUser, Vec<ApiKeyView>)>
    where
        F: Fn(&mut StoredUser) -> Result<()>,
    {
        for _ in 0..8 {
            let (mut user, rev) = self.require_user(ident).await?;
            let old_email = user.email.to_lowercase();
            f(&mut user)?;
            user.updated_at = now();
            let mut batch = Batch::new().require_revision(USERS, &user.id, rev).put(USERS, &user.id, to_value(&user)?);
            let new_email = user.email.to_lowercase();
            if new_email != old_email {
                batch = batch.require_absent(USER_EMAILS, &new_email).delete(USER_EMAILS, &old_email).put(
                    USER_EMAILS,
                    &new_email,
                    json!(user.id),
                );
            }
            let mut revoked = Vec::new();
            if revoke_keys {
                for rec in self.inner.store.list(API_KEYS).await? {
                    let mut k: StoredApiKey = from_value(rec.value, "api key")?;
                    if k.user_id != user.id || k.revoked {
                        continue;
                    }
                    k.revoked = true;
                    k.revoked_at = Some(now());
                    k.updated_at = now();
                    batch = batch.require_revision(API_KEYS, &k.id, rec.revision).put(API_KEYS, &k.id, to_value(&k)?);
                    batch = audit(batch, actor, "api_key.revoke", "api_key", &k.id, json!({"reason": action}))?;
                    revoked.push(k.view());
                }
            }
            let batch = audit(batch, actor, action, "user", &user.id, detail.clone())?;
            match self.commit(batch).await {
                Ok(()) => return Ok((user, revoked)),
                Err(IdentityError::Store(StoreError::Conflict(_))) => {
                    // Either a concurrent change (retry) or the new email is taken.
                    if new_email != old_email && self.inner.store.get(USER_EMAILS, &new_email).await?.is_some() {
                        return Err(IdentityError::Conflict(format!("Email {new_email:?} is already in use")));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(IdentityError::Conflict("The user changed concurrently too often; retry".into()))
    }

    pub async fn update_user(&self, by: &Principal, actor: &Actor, ident: &str, upd: UserUpdate) -> Result<UserView> {
        Ok(self.update_user_revoking(by, actor, ident, upd).await?.0)
    }

    /// Update a user; with `revoke_api_keys`, the user's API keys are revoked in the same
    /// commit and answered. A caller changes only users it may manage (itself, or a user
    /// whose every role and claim it holds; a SUPER_USER any user).
    pub async fn update_user_revoking(
        &self,
        by: &Principal,
        actor: &Actor,
        ident: &str,
        upd: UserUpdate,
    ) -> Result<(UserView, Vec<ApiKeyView>)> {
        let (target, _) = self.require_user(ident).await?;
        let is_self = target.id == by.user_id;
        if !is_self && !by.has_claim(claims::UPDATE_USER) {
            return Err(IdentityError::Forbidden("Updating another user needs the UPDATE_USER claim".into()));
        }
        if target.roles.iter().any(|r| r == SUPER_USER_ROLE) && !by.is_super_user() {
            return Err(IdentityError::Forbidden("Only a SUPER_USER can change a SUPER_USER".into()));
        }
        self.check_manageable(by, &target).await?;
        if let Some(n) = &upd.name {
            check_text("name", n, 200)?;
        }
        let email = upd.email.as_deref().map(check_email).transpose()?;
        let new_hash = match &upd.password {
            Some(p) => {
                self.inner.options.password_policy.check(p)?;
                Some(self.hash_password(p.clone()).await?)
            }
            None => None,
        };
        if upd.disabled == Some(true) && is_self {
            return Err(IdentityError::Conflict("You cannot disable yourself".into()));
        }
        let detail = json!({
            "name": upd.name.is_some(), "email": email.is_some(), "password": new_hash.is_some(),
            "disabled": upd.disabled, "unlock": upd.unlock, "revoke_api_keys": upd.revoke_api_keys,
        });
        let (user, revoked) = self
            .modify_user_ext(&target.id, actor, "user.update", detail, upd.revoke_api_keys, |u| {
                if let Some(n) = &upd.name {
                    u.name = n.clone();
                }
                if let Some(e) = &email {
                    u.email = e.clone();
                }
                if let Some(h) = &new_hash {
                    u.password_hash = h.clone();
                    u.security_stamp = uuid::Uuid::new_v4().to_string();
                }
                if let Some(d) = upd.disabled {
                    u.disabled = d;
                }
                if upd.unlock {
                    u.locked_until = None;
                    u.failed_login_attempts = 0;
                    u.lockouts = 0;
                }
                Ok(())
            })
            .await?;
        if upd.unlock {
            self.inner.throttle.clear_account(&user.id);
        }
        self.publish("USER_UPDATED", json!({"user_id": user.id}));
        Ok((user.view(), revoked))
    }

    pub async fn delete_user(&self, by: &Principal, actor: &Actor, ident: &str) -> Result<()> {
        let (user, rev) = self.require_user(ident).await?;
        if user.id == by.user_id {
            return Err(IdentityError::Conflict("You cannot delete yourself".into()));
        }
        if user.username == ROOT_USERNAME {
            return Err(IdentityError::Conflict("The root user cannot be deleted".into()));
        }
        if user.roles.iter().any(|r| r == SUPER_USER_ROLE) && !by.is_super_user() {
            return Err(IdentityError::Forbidden("Only a SUPER_USER can delete a SUPER_USER".into()));
        }
        self.check_manageable(by, &user).await?;
        let mut batch = Batch::new()
            .require_revision(USERS, &user.id, rev)
            .delete(USERS, &user.id)
            .delete(USER_NAMES, &user.username.to_lowercase())
            .delete(USER_EMAILS, &user.email.to_lowercase());
        for k in self.inner.store.list(API_KEYS).await? {
            let key: StoredApiKey = from_value(k.value, "api key")?;
            if key.user_id == user.id {
                batch = batch.delete(API_KEYS, &key.id).delete(API_KEY_INDEX, &key.key);
            }
        }
        let batch = self.forget_user_configs(batch, &user.id).await?;
        let batch = audit(batch, actor, "user.delete", "user", &user.id, json!({"username": user.username}))?;
        self.commit(batch).await?;
        self.publish("USER_REMOVED", json!({"user_id": user.id}));
        Ok(())
    }

    pub async fn add_user_role(&self, by: &Principal, actor: &Actor, ident: &str, role: &str) -> Result<Role> {
        let (r, _) = self.role(role).await?.ok_or_else(|| IdentityError::not_found("Role", role))?;
        self.check_grantable(by, std::slice::from_ref(&r.name), &[]).await?;
        let (target, _) = self.require_user(ident).await?;
        self.check_manageable(by, &target).await?;
        let name = r.name.clone();
        let user = self
            .modify_user(&target.id, actor, "user.role.add", json!({"role": name}), |u| {
                if !u.roles.contains(&name) {
                    u.roles.push(name.clone());
                }
                Ok(())
            })
            .await?;
        self.publish("USER_ROLE_ADDED", json!({"user_id": user.id, "role_id": r.id}));
        Ok(r)
    }

    pub async fn remove_user_role(&self, by: &Principal, actor: &Actor, ident: &str, role: &str) -> Result<()> {
        let name = normalise_name("role", role)?;
        let (target, _) = self.require_user(ident).await?;
        if !target.roles.contains(&name) {
            return Err(IdentityError::not_found("Role of the user", role));
        }
        if name == SUPER_USER_ROLE && !by.is_super_user() {
            return Err(IdentityError::Forbidden("Only a SUPER_USER can remove the SUPER_USER role".into()));
        }
        if name == SUPER_USER_ROLE && target.username == ROOT_USERNAME {
            return Err(IdentityError::Conflict("The root user keeps the SUPER_USER role".into()));
        }
        self.check_manageable(by, &target).await?;
        let user = self
            .modify_user(&target.id, actor, "user.role.remove", json!({"role": name}), |u| {
                u.roles.retain(|r| *r != name);
                Ok(())
            })
            .await?;
        self.publish("USER_ROLE_REMOVED", json!({"user_id": user.id, "role_id": name}));
        Ok(())
    }

    pub async fn add_user_claim(&self, by: &Principal, actor: &Actor, ident: &str, claim: &str) -> Result<Claim> {
        let c = self.claim(claim).await?.ok_or_else(|| IdentityError::not_found("Claim", claim))?;
        self.check_grantable(by, &[], std::slice::from_ref(&c.name)).await?;
        let (target, _) = self.require_user(ident).await?;
        self.check_manageable(by, &target).await?;
        let name = c.name.clone();
        let user = self
            .modify_user(&target.id, actor, "user.claim.add", json!({"claim": name}), |u| {
                if !u.claims.contains(&name) {
                    u.claims.push(name.clone());
                }
                Ok(())
            })
            .await?;
        self.publish("USER_CLAIM_ADDED", json!({"user_id": user.id, "claim_id": c.id}));
        Ok(c)
    }

    pub async fn remove_user_claim(&self, by: &Principal, actor: &Actor, ident: &str, claim: &str) -> Result<()> {
        let name = normalise_name("claim", claim)?;
        let (target, _) = self.require_user(ident).await?;
        self.check_manageable(by, &target).await?;
        if !target.claims.contains(&name) {
            return Err(IdentityError::not_found("Claim of the user", claim));
        }
        let user = self
            .modify_user(&target.id, actor, "user.claim.remove", json!({"claim": name}), |u| {
                u.claims.retain(|c| *c != name);
                Ok(())
            })
            .await?;
        self.publish("USER_CLAIM_REMOVED", json!({"user_id": user.id, "claim_id": name}));
        Ok(())
    }

    pub async fn user_roles(&self, ident: &str) -> Result<Vec<Role>> {
        let (u, _) = self.require_user(ident).await?;
        let mut out = Vec::new();
        for r in &u.roles {
            if let Some((role, _)) = self.role(r).await? {
                out.push(role);
            }
        }
        Ok(out)
    }

    pub async fn user_claims(&self, ident: &str) -> Result<Vec<Claim>> {
        let (u, _) = self.require_user(ident).await?;
        let mut out = Vec::new();
        for c in &u.claims {
            if let Some(claim) = self.claim(c).await? {
                out.push(claim);
            }
        }
        Ok(out)
    }

    // ----- roles -----------------------------------------------------------------------

    pub async fn list_roles(&self) -> Result<Vec<Role>> {
        self.inner.store.list(ROLES).await?.into_iter().map(|r| from_value(r.value, "role")).collect()
    }

    pub async fn get_role(&self, name: &str) -> Result<Role> {
        Ok(self.role(name).await?.ok_or_else(|| IdentityError::not_found("Role", name))?.0)
    }

    pub async fn create_role(
        &self,
        by: &Principal,
        actor: &Actor,
        name: &str,
        description: Option<String>,
        claims: Vec<String>,
    ) -> Result<Role> {
        let n = normalise_name("role", name)?;
        let description = description.unwrap_or_default();
        check_text("description", &description, 1000)?;
        let mut cs = Vec::new();
        for c in &claims {
            let claim =
                self.claim(c).await?.ok_or_else(|| IdentityError::Invalid(format!("claim {c:?} does not exist")))?;
            if !cs.contains(&claim.name) {
                cs.push(claim.name);
            }
        }
        self.check_grantable(by, &[], &cs).await?;
        let t = now();
        let role = Role {
            id: n.clone(),
            name: n.clone(),
            description,
            internal: false,
            claims: cs,
            created_at: t,
            updated_at: t,
        };
        let batch = Batch::new().require_absent(ROLES, &n).put(ROLES, &n, to_value(&role)?);
        let batch = audit(batch, actor, "role.create", "role", &n, json!({"claims": role.claims}))?;
        match self.commit(batch).await {
            Err(IdentityError::Store(StoreError::Conflict(_))) => {
                return Err(IdentityError::Conflict(format!("Role {n} already exists")));
            }
            other => other?,
        }
        self.publish("ROLE_ADDED", json!({"role_id": n}));
        Ok(role)
    }

    pub async fn delete_role(&self, actor: &Actor, name: &str) -> Result<()> {
        let (role, rev) = self.role(name).await?.ok_or_else(|| IdentityError::not_found("Role", name))?;
        if role.internal {
            return Err(IdentityError::Conflict(format!("Role {} is built in and cannot be deleted", role.name)));
        }
        let mut batch = Batch::new().require_revision(ROLES, &role.id, rev).delete(ROLES, &role.id);
        // Users lose the role in the same commit: no dangling references.
        for rec in self.inner.store.list(USERS).await? {
            let mut u: StoredUser = from_value(rec.value, "user")?;
            if u.roles.contains(&role.name) {
                u.roles.retain(|r| *r != role.name);
                u.updated_at = now();
                batch = batch.require_revision(USERS, &u.id, rec.revision).put(USERS, &u.id, to_value(&u)?);
            }
        }
        let batch = audit(batch, actor, "role.delete", "role", &role.id, json!({}))?;
        self.commit(batch).await?;
        self.publish("ROLE_REMOVED", json!({"role_id": role.id}));
        Ok(())
    }

    async fn modify_role<F: Fn(&mut Role)>(
        &self,
        actor: &Actor,
        name: &str,
        action: &str,
        detail: Value,
        f: F,
    ) -> Result<Role> {
        for _ in 0..8 {
            let (mut role, rev) = self.role(name).await?.ok_or_else(|| IdentityError::not_found("Role", name))?;
            f(&mut role);
            role.updated_at = now();
            let batch = Batch::new().require_revision(ROLES, &role.id, rev).put(ROLES, &role.id, to_value(&role)?);
            let batch = audit(batch, actor, action, "role", &role.id, detail.clone())?;
            match self.commit(batch).await {
                Ok(()) => return Ok(role),
                Err(IdentityError::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(IdentityError::Conflict("The role changed concurrently too often; retry".into()))
    }

    pub async fn add_role_claim(&self, by: &Principal, actor: &Actor, role: &str, claim: &str) -> Result<Claim> {
        let c = self.claim(claim).await?.ok_or_else(|| IdentityError::not_found("Claim", claim))?;
        let (r, _) = self.role(role).await?.ok_or_else(|| IdentityError::not_found("Role", role))?;
        if r.name == SUPER_USER_ROLE && !by.is_super_user() {
            return Err(IdentityError::Forbidden("Only a SUPER_USER can change the SUPER_USER role".into()));
        }
        self.check_grantable(by, &[], std::slice::from_ref(&c.name)).await?;
        let cname = c.name.clone();
        self.modify_role(actor, role, "role.claim.add", json!({"claim": cname}), |r| {
            if !r.claims.contains(&cname) {
                r.claims.push(cname.clone());
            }
        })
        .await?;
        self.publish("ROLE_CLAIM_ADDED", json!({"role_id": r.id, "claim_id": c.id}));
        Ok(c)
    }

    pub async fn remove_role_claim(&self, by: &Principal, actor: &Actor, role: &str, claim: &str) -> Result<()> {
        let cname = normalise_name("claim", claim)?;
        let (r, _) = self.role(role).await?.ok_or_else(|| IdentityError::not_found("Role", role))?;
        if r.name == SUPER_USER_ROLE && !by.is_super_user() {
            return Err(IdentityError::Forbidden("Only a SUPER_USER can change the SUPER_USER role".into()));
        }
        if !r.claims.contains(&cname) {
            return Err(IdentityError::not_found("Claim of the role", claim));
        }
        self.modify_role(actor, role, "role.claim.remove", json!({"claim": cname}), |r| {
            r.claims.retain(|c| *c != cname)
        })
        .await?;
        self.publish("ROLE_CLAIM_REMOVED", json!({"role_id": r.id, "claim_id": cname}));
        Ok(())
    }

    // ----- claims ----------------------------------------------------------------------

    pub async fn list_claims(&self) -> Result<Vec<Claim>> {
        self.inner.store.list(CLAIMS).await?.into_iter().map(|r| from_value(r.value, "claim")).collect()
    }

    pub async fn get_claim(&self, name: &str) -> Result<Claim> {
        self.claim(name).await?.ok_or_else(|| IdentityError::not_found("Claim", name))
    }

    pub async fn create_claim(&self, actor: &Actor, name: &str, description: Option<String>) -> Result<Claim> {
        let n = normalise_name("claim", name)?;
        let description = description.unwrap_or_default();
        check_text("description", &description, 1000)?;
        let (group, resource, action) = claims::claim_metadata(&n);
        let t = now();
        let c = Claim {
            id: n.clone(),
            name: n.clone(),
            description,
            internal: false,
            group,
            resource,
            action,
            created_at: t,
            updated_at: t,
        };
        let batch = Batch::new().require_absent(CLAIMS, &n).put(CLAIMS, &n, to_value(&c)?);
        let batch = audit(batch, actor, "claim.create", "claim", &n, json!({}))?;
        match self.commit(batch).await {
            Err(IdentityError::Store(StoreError::Conflict(_))) => {
                return Err(IdentityError::Conflict(format!("Claim {n} already exists")));
            }
            other => other?,
        }
        self.publish("CLAIM_ADDED", json!({"claim_id": n}));
        Ok(c)
    }

    pub async fn delete_claim(&self, actor: &Actor, name: &str) -> Result<()> {
        let c = self.claim(name).await?.ok_or_else(|| IdentityError::not_found("Claim", name))?;
        if c.internal {
            return Err(IdentityError::Conflict(format!("Claim {} is a system claim and cannot be deleted", c.name)));
        }
        let mut batch = Batch::new().delete(CLAIMS, &c.id);
        for rec in self.inner.store.list(USERS).await? {
            let mut u: StoredUser = from_value(rec.value, "user")?;
            if u.claims.contains(&c.name) {
                u.claims.retain(|x| *x != c.name);
                batch = batch.require_revision(USERS, &u.id, rec.revision).put(USERS, &u.id, to_value(&u)?);
            }
        }
        for rec in self.inner.store.list(ROLES).await? {
            let mut r: Role = from_value(rec.value, "role")?;
            if r.claims.contains(&c.name) {
                r.claims.retain(|x| *x != c.name);
                batch = batch.require_revision(ROLES, &r.id, rec.revision).put(ROLES, &r.id, to_value(&r)?);
            }
        }
        let batch = audit(batch, actor, "claim.delete", "claim", &c.id, json!({}))?;
        self.commit(batch).await?;
        self.publish("CLAIM_REMOVED", json!({"claim_id": c.id}));
        Ok(())
    }

    // ----- API keys --------------------------------------------------------------------

    /// Keys the caller may see: all with LIST_API_KEY, otherwise its own.
    pub async fn list_api_keys(&self, by: &Principal) -> Result<Vec<ApiKeyView>> {
        let all = by.has_claim(claims::LIST_API_KEY);
        let mut out = Vec::new();
        for r in self.inner.store.list(API_KEYS).await? {
            let k: StoredApiKey = from_value(r.value, "api key")?;
            if all || k.user_id == by.user_id {
                out.push(k.view());
            }
        }
        Ok(out)
    }

    async fn find_api_key(&self, by: &Principal, ident: &str, admin_claim: &str) -> Result<(StoredApiKey, u64)> {
        let mut found = None;
        if let Some(r) = self.inner.store.get(API_KEYS, ident).await? {
            found = Some((from_value::<StoredApiKey>(r.value, "api key")?, r.revision));
        } else {
            for r in self.inner.store.list(API_KEYS).await? {
                let k: StoredApiKey = from_value(r.value, "api key")?;
                if k.name == ident || k.key.eq_ignore_ascii_case(ident) {
                    found = Some((k, r.revision));
                    break;
                }
            }
        }
        match found {
            // Another user's key is invisible without the admin claim.
            Some((k, rev)) if k.user_id == by.user_id || by.has_claim(admin_claim) => Ok((k, rev)),
            _ => Err(IdentityError::not_found("API key", ident)),
        }
    }

    pub async fn get_api_key(&self, by: &Principal, ident: &str) -> Result<ApiKeyView> {
        Ok(self.find_api_key(by, ident, claims::LIST_API_KEY).await?.0.view())
    }

    pub async fn create_api_key(&self, by: &Principal, actor: &Actor, input: NewApiKey) -> Result<CreatedApiKey> {
        let name = input.name.trim().to_string();
        if name.is_empty() || name.len() > 100 {
            return Err(IdentityError::Invalid("API key name must be 1 to 100 characters".into()));
        }
        check_text("name", &name, 100)?;
        let owner_id = match &input.user_id {
            Some(u) if !u.is_empty() => self.require_user(u).await?.0.id,
            _ => by.user_id.clone(),
        };
        if owner_id != by.user_id && !by.has_claim(claims::CREATE_API_KEY) {
            return Err(IdentityError::Forbidden(
                "Creating a key for another user needs the CREATE_API_KEY claim".into(),
            ));
        }
        if owner_id != by.user_id && !by.is_super_user() {
            // A key for someone else lets the caller act as them (their VMs included): only
            // for a user the caller may manage, as for a password reset.
            if !by.has_claim(claims::UPDATE_USER) {
                return Err(IdentityError::Forbidden(
                    "Creating a key for another user needs the UPDATE_USER claim as well as CREATE_API_KEY; omit user_id to create a key of your own".into(),
                ));
            }
            let (owner, _) = self.require_user(&owner_id).await?;
            self.check_manageable(by, &owner).await?;
        }
        let key = match &input.key {
            Some(k) => {
                let k = k.trim().to_ascii_uppercase();
                if k.is_empty()
                    || k.len() > 64
                    || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    || k.contains(':')
                {
                    return Err(IdentityError::Invalid(
                        "API key id must be 1 to 64 letters, digits, '_' or '-'".into(),
                    ));
                }
                k
            }
            None => hex::encode_upper(random_token(10)?),
        };
        let secret = match &input.secret {
            Some(s) => {
                if s.chars().count() < 16 || s.len() > 256 {
                    return Err(IdentityError::Policy(
                        "an API key secret must be 16 to 256 characters; omit it to have one generated".into(),
                    ));
                }
                s.clone()
            }
            None => URL_SAFE_NO_PAD.encode(random_token(32)?),
        };
        if let Some(t) = input.expires_at
            && t <= now()
        {
            return Err(IdentityError::Invalid("expires_at is in the past".into()));
        }
        let t = now();
        let stored = StoredApiKey {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            key: key.clone(),
            secret_hash: self.secret_hash(&secret),
            user_id: owner_id,
            revoked: false,
            revoked_at: None,
            expires_at: input.expires_at,
            created_at: t,
            updated_at: t,
        };
        let batch = Batch::new().require_absent(API_KEY_INDEX, &key).put(API_KEYS, &stored.id, to_value(&stored)?).put(
            API_KEY_INDEX,
            &key,
            json!(stored.id),
        );
        let batch = audit(
            batch,
            actor,
            "api_key.create",
            "api_key",
            &stored.id,
            json!({"name": stored.name, "user_id": stored.user_id}),
        )?;
        match self.commit(batch).await {
            Err(IdentityError::Store(StoreError::Conflict(_))) => {
                return Err(IdentityError::Conflict(format!("An API key with id {key} already exists")));
            }
            other => other?,
        }
        let encoded = STANDARD.encode(format!("{key}:{secret}"));
        Ok(CreatedApiKey { key: stored.view(), encoded })
    }

    pub async fn delete_api_key(&self, by: &Principal, actor: &Actor, ident: &str) -> Result<()> {
        let (k, rev) = self.find_api_key(by, ident, claims::DELETE_API_KEY).await?;
        let batch =
            Batch::new().require_revision(API_KEYS, &k.id, rev).delete(API_KEYS, &k.id).delete(API_KEY_INDEX, &k.key);
        let batch = audit(batch, actor, "api_key.delete", "api_key", &k.id, json!({}))?;
        self.commit(batch).await
    }

    pub async fn revoke_api_key(&self, by: &Principal, actor: &Actor, ident: &str) -> Result<ApiKeyView> {
        let (mut k, rev) = self.find_api_key(by, ident, claims::UPDATE_API_KEY).await?;
        if !k.revoked {
            k.revoked = true;
            k.revoked_at = Some(now());
            k.updated_at = now();
            let batch = Batch::new().require_revision(API_KEYS, &k.id, rev).put(API_KEYS, &k.id, to_value(&k)?);
            let batch = audit(batch, actor, "api_key.revoke", "api_key", &k.id, json!({}))?;
            self.commit(batch).await?;
        }
        Ok(k.view())
    }

    // ----- audit -----------------------------------------------------------------------

    /// Audit entries in time order, after the given id.
    pub async fn list_audit(&self, after: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>> {
        self.inner
            .store
            .list_page(AUDIT_COLLECTION, after, limit.clamp(1, 1000))
            .await?
            .into_iter()
            .map(|r| from_value(r.value, "audit entry"))
            .collect()
    }

    /// Record an audit entry for a change made outside this service.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target_type: &str,
        target_id: &str,
        detail: Value,
    ) -> Result<()> {
        let batch = audit(Batch::new(), actor, action, target_type, target_id, detail)?;
        self.commit(batch).await
    }
}

#[cfg(test)]
mod seed_tests {
    use super::*;
    use crate::tokens::TokenConfig;
    use hangar_store::MemoryStore;

    /// Replicas starting together on one empty database all seed without an error, and the
    /// database ends with one root user, whose generated password exactly one replica prints.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_seeding_is_idempotent() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut tasks = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..4 {
            let dir = tempfile::tempdir().expect("temp dir");
            let tokens = TokenService::new(TokenConfig::default(), dir.path()).expect("tokens");
            let id = Identity::new(store.clone(), tokens, IdentityOptions::default(), EventBus::default(), dir.path())
                .expect("identity");
            dirs.push(dir);
            tasks.push(tokio::spawn(async move { id.bootstrap(None).await }));
        }
        let mut generated = 0;
        for t in tasks {
            if t.await.expect("task").expect("seeding must not fail").is_some() {
                generated += 1;
            }
        }
        assert_eq!(generated, 1, "exactly one replica created root");
        let names = store.list(USER_NAMES).await.expect("list");
        assert_eq!(names.len(), 1, "one user name index: {names:?}");
        let users = store.list(USERS).await.expect("list");
        assert_eq!(users.len(), 1, "one user: {users:?}");
        for role in DEFAULT_ROLES {
            assert!(store.get(ROLES, role).await.expect("get").is_some(), "role {role}");
        }
    }
}
