//! Audit records: who changed what, when, from where.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Store collection that holds audit records, keyed by time-ordered ids.
pub const AUDIT_COLLECTION: &str = "audit";

/// Who did something, and from where. Built by the HTTP layer from the authenticated
/// principal and the connection, never from client-supplied headers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    /// User id, or `"system"` for the server itself.
    pub user_id: String,
    pub username: String,
    /// `jwt`, `api_key:<id>`, `cli` or `system`.
    pub via: String,
    /// Peer address of the connection.
    pub source_ip: Option<String>,
    pub request_id: Option<String>,
}

impl Actor {
    pub fn system() -> Self {
        Actor { user_id: "system".into(), username: "system".into(), via: "system".into(), ..Default::default() }
    }
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: String,
    pub at: DateTime<Utc>,
    pub actor: Actor,
    /// What happened, e.g. `user.create`, `role.claim.add`, `api_key.revoke`.
    pub action: String,
    /// What it happened to (kind and id).
    pub target_type: String,
    pub target_id: String,
    /// Non-secret details.
    pub detail: serde_json::Value,
}

impl AuditEntry {
    pub fn new(actor: &Actor, action: &str, target_type: &str, target_id: &str, detail: serde_json::Value) -> Self {
        AuditEntry {
            id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            actor: actor.clone(),
            action: action.into(),
            target_type: target_type.into(),
            target_id: target_id.into(),
            detail,
        }
    }
}
