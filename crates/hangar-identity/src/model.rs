//! Stored records and the views the API shows. Stored records hold secrets (hashes);
//! views never do.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const USERS: &str = "users";
pub const USER_NAMES: &str = "user_names";
pub const USER_EMAILS: &str = "user_emails";
pub const ROLES: &str = "roles";
pub const CLAIMS: &str = "claims";
pub const API_KEYS: &str = "api_keys";
pub const API_KEY_INDEX: &str = "api_key_index";
/// Browser sessions, by the keyed hash of the cookie's secret.
pub const SESSIONS: &str = "sessions";
/// External identities: `<provider>:<subject>` -> user id (JIT users of an OIDC provider).
pub const EXTERNAL_IDS: &str = "external_ids";

/// Where an external user comes from: an OIDC provider and the subject it knows them by.
/// Such a user has no local password; password logins are refused for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalIdentity {
    pub provider: String,
    pub subject: String,
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredUser {
    pub id: String,
    pub username: String,
    pub name: String,
    pub email: String,
    /// argon2id PHC string.
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub claims: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub failed_login_attempts: u32,
    /// How many times the account was locked in a row (for the incremental lockout).
    #[serde(default)]
    pub lockouts: u32,
    #[serde(default)]
    pub locked_until: Option<DateTime<Utc>>,
    /// Changes whenever the password changes; tokens carry it, so old tokens die.
    pub security_stamp: String,
    /// Set for a user created just in time by an OIDC login (no local password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalIdentity>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A user as the API shows it (reference field names; `roles`/`claims` as names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub name: String,
    pub email: String,
    pub roles: Vec<String>,
    pub claims: Vec<String>,
    #[serde(rename = "isSuperUser")]
    pub is_super_user: bool,
    pub disabled: bool,
    pub blocked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_until: Option<DateTime<Utc>>,
    pub failed_login_attempts: u32,
    /// The OIDC provider of an external user (no local password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_provider: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Who a new user is: ids and names, as [`StoredUser::new`] takes them.
pub struct NewUserIds {
    pub id: String,
    pub username: String,
    pub name: String,
    pub email: String,
}

impl StoredUser {
    /// A new local user with the password hash, roles and claims given: enabled, never
    /// locked, a fresh security stamp.
    pub fn new(
        who: NewUserIds,
        password_hash: String,
        roles: Vec<String>,
        claims: Vec<String>,
        at: DateTime<Utc>,
    ) -> Self {
        StoredUser {
            id: who.id,
            username: who.username,
            name: who.name,
            email: who.email,
            password_hash,
            roles,
            claims,
            disabled: false,
            failed_login_attempts: 0,
            lockouts: 0,
            locked_until: None,
            security_stamp: uuid::Uuid::new_v4().to_string(),
            external: None,
            created_at: at,
            updated_at: at,
        }
    }

    /// A user known only through an OIDC provider (no local password), with the roles and
    /// claims its mapping grants.
    pub fn external(
        who: NewUserIds,
        from: ExternalIdentity,
        roles: Vec<String>,
        claims: Vec<String>,
        at: DateTime<Utc>,
    ) -> Self {
        StoredUser { external: Some(from), ..StoredUser::new(who, String::new(), roles, claims, at) }
    }

    pub fn view(&self) -> UserView {
        let blocked = self.locked_until.is_some_and(|t| t > Utc::now());
        UserView {
            id: self.id.clone(),
            username: self.username.clone(),
            name: self.name.clone(),
            email: self.email.clone(),
            roles: self.roles.clone(),
            claims: self.claims.clone(),
            is_super_user: self.roles.iter().any(|r| r == hangar_core::claims::SUPER_USER_ROLE),
            disabled: self.disabled,
            blocked,
            blocked_until: if blocked { self.locked_until } else { None },
            failed_login_attempts: self.failed_login_attempts,
            external_provider: self.external.as_ref().map(|e| e.provider.clone()),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A role: a named set of claims. Its id is its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Role {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeded roles cannot be deleted.
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub claims: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A claim: one permission. Its id is its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// System claims cannot be deleted.
    #[serde(default)]
    pub internal: bool,
    pub group: String,
    pub resource: String,
    pub action: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An API key as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredApiKey {
    pub id: String,
    pub name: String,
    /// The public half, upper-cased.
    pub key: String,
    /// Keyed BLAKE3 of the secret half, hex.
    pub secret_hash: String,
    pub user_id: String,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An API key as the API shows it. The secret is never shown after creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    pub key: String,
    pub user_id: String,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub expired: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl StoredApiKey {
    pub fn view(&self) -> ApiKeyView {
        ApiKeyView {
            id: self.id.clone(),
            name: self.name.clone(),
            key: self.key.clone(),
            user_id: self.user_id.clone(),
            revoked: self.revoked,
            revoked_at: self.revoked_at,
            expires_at: self.expires_at,
            expired: self.expires_at.is_some_and(|t| t <= Utc::now()),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A freshly created API key: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// `base64(KEY:SECRET)`, the value of the `X-Api-Key` header.
    pub encoded: String,
}

/// Input for a new user.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NewUser {
    pub username: String,
    pub name: Option<String>,
    pub email: String,
    pub password: String,
    pub roles: Vec<String>,
    pub claims: Vec<String>,
    pub is_super_user: bool,
}

/// Changes to a user; `None` leaves a field alone.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UserUpdate {
    pub name: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
    pub disabled: Option<bool>,
    /// Clear a lockout.
    pub unlock: bool,
    /// Revoke every API key of the user in the same change (with a password reset, so
    /// that nothing issued before the reset keeps working).
    pub revoke_api_keys: bool,
}

/// Input for a new API key. `key` and `secret` are generated when absent.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NewApiKey {
    pub name: String,
    pub key: Option<String>,
    pub secret: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Owner; the caller when absent. Another user's key needs CREATE_API_KEY.
    pub user_id: Option<String>,
}

/// A token handed out by a login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedToken {
    pub token: String,
    pub email: String,
    /// Unix seconds.
    pub expires_at: i64,
}
