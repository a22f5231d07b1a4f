//! Request and response bodies of the auth and system routes. These are the API's
//! contract; identity types are converted into them at the edge.

use chrono::{DateTime, Utc};
use hangar_identity as id;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use hangar_wire::{LoginRequest, Probe, TokenResponse};

/// The answer for a token the identity service issued.
pub fn token_response(t: id::IssuedToken) -> TokenResponse {
    TokenResponse { token: t.token, email: t.email, expires_at: t.expires_at }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ValidateResponse {
    pub valid: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub username: String,
    pub name: String,
    pub email: String,
    /// Role names.
    pub roles: Vec<String>,
    /// Direct claim names (roles add more).
    pub claims: Vec<String>,
    #[serde(rename = "isSuperUser")]
    pub is_super_user: bool,
    pub disabled: bool,
    /// Locked after failed logins.
    pub blocked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_until: Option<DateTime<Utc>>,
    pub failed_login_attempts: u32,
    /// The OIDC provider of a user created by single sign-on (no local password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_provider: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<id::UserView> for User {
    fn from(u: id::UserView) -> Self {
        User {
            id: u.id,
            username: u.username,
            name: u.name,
            email: u.email,
            roles: u.roles,
            claims: u.claims,
            is_super_user: u.is_super_user,
            disabled: u.disabled,
            blocked: u.blocked,
            blocked_until: u.blocked_until,
            failed_login_attempts: u.failed_login_attempts,
            external_provider: u.external_provider,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub username: String,
    pub name: Option<String>,
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub claims: Vec<String>,
    #[serde(default)]
    pub is_super_user: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    pub name: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
    pub disabled: Option<bool>,
    /// Clear a failed-login lockout (for every source address).
    #[serde(default)]
    pub unlock: bool,
    /// Revoke every API key of the user in the same change (with a password reset, so that
    /// nothing issued before it keeps working); the answer lists them in `revoked_api_keys`.
    #[serde(default)]
    pub revoke_api_keys: bool,
}

/// The user after an update, and the API keys the update revoked (only with
/// `revoke_api_keys`; absent when none).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdatedUser {
    #[serde(flatten)]
    pub user: User,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_api_keys: Vec<ApiKey>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    pub current_password: String,
    pub new_password: String,
}

/// `{name}` (the reference's clients also send an `id`, which is ignored).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NameRequest {
    pub name: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoleRequest {
    pub name: String,
    pub description: Option<String>,
    #[serde(default)]
    pub claims: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Role {
    pub id: String,
    pub name: String,
    pub description: String,
    pub internal: bool,
    pub claims: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<id::Role> for Role {
    fn from(r: id::Role) -> Self {
        Role {
            id: r.id,
            name: r.name,
            description: r.description,
            internal: r.internal,
            claims: r.claims,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Claim {
    pub id: String,
    pub name: String,
    pub description: String,
    pub internal: bool,
    pub group: String,
    pub resource: String,
    pub action: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<id::Claim> for Claim {
    fn from(c: id::Claim) -> Self {
        Claim {
            id: c.id,
            name: c.name,
            description: c.description,
            internal: c.internal,
            group: c.group,
            resource: c.resource,
            action: c.action,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// Claims of one group, for the UI's permission matrix.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClaimGroup {
    pub group: String,
    pub claims: Vec<Claim>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    pub name: String,
    /// The public id; generated when absent.
    pub key: Option<String>,
    /// At least 16 characters; generated when absent.
    pub secret: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Owner; the caller when absent.
    pub user_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
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

impl From<id::ApiKeyView> for ApiKey {
    fn from(k: id::ApiKeyView) -> Self {
        ApiKey {
            id: k.id,
            name: k.name,
            key: k.key,
            user_id: k.user_id,
            revoked: k.revoked,
            revoked_at: k.revoked_at,
            expires_at: k.expires_at,
            expired: k.expired,
            created_at: k.created_at,
            updated_at: k.updated_at,
        }
    }
}

/// A new API key: the only answer that shows the secret, inside `encoded`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// `base64(KEY:SECRET)`: the `X-Api-Key` header value.
    pub encoded: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub at: DateTime<Utc>,
    pub user_id: String,
    pub username: String,
    pub via: String,
    pub source_ip: Option<String>,
    pub request_id: Option<String>,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<hangar_core::audit::AuditEntry> for AuditEntry {
    fn from(a: hangar_core::audit::AuditEntry) -> Self {
        AuditEntry {
            id: a.id,
            at: a.at,
            user_id: a.actor.user_id,
            username: a.actor.username,
            via: a.actor.via,
            source_ip: a.actor.source_ip,
            request_id: a.actor.request_id,
            action: a.action,
            target_type: a.target_type,
            target_id: a.target_id,
            detail: a.detail,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Return entries after this id (ids are time-ordered).
    pub after: Option<String>,
    /// At most this many entries (1 to 1000, default 100).
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceHealth {
    pub name: String,
    pub healthy: bool,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SystemHealth {
    pub healthy: bool,
    pub message: String,
    pub services: Vec<ServiceHealth>,
    /// Who runs the leader work (health checks, the queue, the TTL reaper), for callers
    /// that see the detail; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderView>,
}

/// The holder of the leader lease as the answering replica last saw it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaderView {
    /// The leading replica's id; none while nobody holds the lease.
    pub leader: Option<String>,
    /// Its fencing token (grows with every change of leader).
    pub token: Option<u64>,
    /// Since when it leads, by its own clock.
    pub since: Option<DateTime<Utc>>,
    /// The answering replica's id.
    pub replica: String,
}

/// `GET /health/ready`: whether this replica should get traffic (200) or not (503).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    /// Each check by name (`store`: it answers a read within its deadline; `migrations`:
    /// they are done).
    pub checks: std::collections::BTreeMap<String, bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Version {
    pub version: String,
}
