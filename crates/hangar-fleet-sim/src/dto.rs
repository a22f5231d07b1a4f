//! The shapes of `hangar-api`'s DTOs a host agent's routes take and answer
//! (`hangar_api::routes::dto::{LoginRequest, TokenResponse, Probe}`, `hangar_api::ApiErrorBody`),
//! typed here so the simulator does not link the whole server. Field names and types are
//! the API's; the orchestrator's client reads them (`token` of a login, `message` of an
//! error).

use serde::{Deserialize, Serialize};

/// `POST /auth/token`: a username or email with a password.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoginRequest {
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// `base64(KEY:SECRET)` (not accepted by the simulator).
    #[serde(default)]
    pub api_key: Option<String>,
}

/// A login token; `expires_at` in unix seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub email: String,
    pub expires_at: i64,
}

/// `GET /health/probe`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub status: String,
}

/// Every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub code: u16,
    pub error: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}
