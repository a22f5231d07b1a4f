//! Bodies of the event-stream and log routes (reference §1.8): `/ws/unsubscribe`,
//! `/ws/clients`, `/ws/stats`, the per-user `/user/configs`, and the log lines a host
//! answers on `/logs` that the orchestrator reads back for `/orchestrator/hosts/{id}/logs`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /ws/unsubscribe`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UnsubscribeRequest {
    /// The stream's id (sent in the body of its first `CLIENT_SUBSCRIBED` event).
    pub client_id: String,
    /// Accepted for the reference's shape and ignored: the owner is the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Event types to stop receiving (`global` cannot be dropped).
    #[serde(default)]
    pub event_types: Vec<String>,
}

/// The answer to `POST /ws/unsubscribe`: what the stream still receives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UnsubscribeResponse {
    pub client_id: String,
    pub subscriptions: Vec<String>,
}

/// One open event stream (`GET /ws/clients`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventClientInfo {
    pub id: String,
    pub user_id: String,
    pub username: String,
    pub connected_at: DateTime<Utc>,
    /// Last ping the client sent (Hangar does not ping clients; the stream is re-checked instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_ping_at: Option<DateTime<Utc>>,
    /// Last pong the server sent back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pong_at: Option<DateTime<Utc>>,
    pub event_subscriptions: Vec<String>,
    pub is_alive: bool,
    /// Events waiting to be sent to this client.
    pub queue_depth: usize,
}

/// `GET /ws/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventEmitterStats {
    pub total_clients: usize,
    pub total_subscriptions: usize,
    /// Subscribed streams per event type.
    pub type_stats: BTreeMap<String, usize>,
    /// The streams themselves: every stream for a super user, otherwise the caller's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<EventClientInfo>,
    pub messages_sent: u64,
    pub start_time: DateTime<Utc>,
    /// Time since `start_time`, such as `1h2m3s`.
    pub uptime: String,
}

/// A server's own recent log: what `/logs` answers as `text/plain`, one line per entry.
/// The orchestrator reads a host's answer back with [`LogLines::from_text`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLines {
    pub lines: Vec<String>,
}

impl LogLines {
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(self.lines.iter().map(|l| l.len() + 1).sum());
        for l in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    pub fn from_text(text: &str) -> Self {
        LogLines { lines: text.lines().map(String::from).collect() }
    }
}

/// One per-user setting (`/user/configs`), in the reference's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserConfigResponse {
    pub id: String,
    pub user_id: String,
    pub slug: String,
    pub name: String,
    /// `string`, `bool`, `int` or `json`.
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// `POST /user/configs`: create, or replace the caller's config with the same slug.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserConfigRequest {
    pub slug: String,
    pub name: String,
    /// `string` (the default), `bool`, `int` or `json`; the value must be of this type.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: String,
}

/// `PUT /user/configs/{id}`: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserConfigUpdateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_with_reference_keys() {
        let r: UserConfigRequest =
            serde_json::from_str(r#"{"slug":"theme","name":"Theme","type":"bool","value":"true"}"#).unwrap();
        assert_eq!(r.kind.as_deref(), Some("bool"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["type"], "bool");
        let u: UnsubscribeRequest = serde_json::from_str(r#"{"client_id":"c","event_types":["pdfm"]}"#).unwrap();
        assert_eq!(u.event_types, vec!["pdfm".to_string()]);
        let l = LogLines { lines: vec!["a".into(), "b c".into()] };
        assert_eq!(LogLines::from_text(&l.to_text()), l);
    }
}
