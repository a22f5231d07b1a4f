//! Logging in and errors: what a host agent's or server's `/auth/token` takes and answers,
//! the liveness probe, and the body of every error answer. The orchestrator's host client
//! and tunnels, the CLI and the fleet simulator send and read these; the API serves them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /auth/token`: a username or email with a password, or an API key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `base64(KEY:SECRET)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl LoginRequest {
    /// A login with a password: by email when `user` has an `@`, by username otherwise.
    pub fn password(user: &str, password: &str) -> Self {
        let (email, username) =
            if user.contains('@') { (Some(user.to_string()), None) } else { (None, Some(user.to_string())) };
        LoginRequest { email, username, password: Some(password.to_string()), api_key: None }
    }
}

/// A token. `expires_at` is in unix seconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub token: String,
    pub email: String,
    pub expires_at: i64,
}

/// `GET /health/probe`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Probe {
    pub status: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    /// The HTTP status code, repeated (clients of the reference API read it).
    pub code: u16,
    /// A stable machine-readable slug: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conflict`, `payload_too_large`,
    /// `unsupported_media_type`, `unprocessable_entity`, `too_many_requests`,
    /// `internal_error`, `unavailable`.
    pub error: String,
    /// What went wrong and, where possible, how to fix it.
    pub message: String,
    /// The id of the request, also in the `x-request-id` header and the server log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_login_names_the_user_or_the_email_and_nothing_else() {
        let v = serde_json::to_value(LoginRequest::password("root", "pw")).unwrap_or_default();
        assert_eq!(v, serde_json::json!({"username": "root", "password": "pw"}));
        let v = serde_json::to_value(LoginRequest::password("a@b.c", "pw")).unwrap_or_default();
        assert_eq!(v, serde_json::json!({"email": "a@b.c", "password": "pw"}));
        assert!(serde_json::from_str::<LoginRequest>(r#"{"username":"x","role":"SUPER_USER"}"#).is_err());
    }
}
