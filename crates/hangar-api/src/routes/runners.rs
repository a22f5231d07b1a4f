//! `POST /runners/github/webhook`: GitHub's `workflow_job` deliveries for the ephemeral
//! runners (`hangar-runners`). Declared [`Access::SignedWebhook`]: no Hangar credential is
//! read; the runners service checks `X-Hub-Signature-256` before anything else and stores
//! the job before this answers, so a 2xx means the delivery is durable.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hangar_core::Access;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiErrorBody};
use crate::{Api, AppState};

pub fn register(api: Api) -> Api {
    api.add(Access::SignedWebhook, routes!(github_webhook))
}

/// The answer to a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAccepted {
    /// The delivery's event (`workflow_job`, `ping`, ...).
    pub event: String,
    /// The delivery had been taken before; nothing changed.
    pub duplicate: bool,
    /// The job's id, for `workflow_job` deliveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
    /// What Hangar does for the job now (`queued`, `assigned`, `running`, `done`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Take a GitHub webhook delivery (`workflow_job`; other events are verified and ignored).
#[utoipa::path(post, path = "/runners/github/webhook", tag = "runners",
    request_body(content = String, description = "The delivery's raw JSON body, signed in X-Hub-Signature-256", content_type = "application/json"),
    responses((status = 200, body = WebhookAccepted), (status = 400, body = ApiErrorBody),
        (status = 401, body = ApiErrorBody, description = "Missing or wrong signature"),
        (status = 503, body = ApiErrorBody, description = "Runners are not configured, or the store refused the write")))]
pub(crate) async fn github_webhook(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(runners) = s.runners.as_ref() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "GitHub runners are not configured on this server (GITHUB_APP_ID, GITHUB_WEBHOOK_SECRET, ...)",
        )
        .into_response();
    };
    let req = hangar_runners::WebhookRequest {
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_ascii_lowercase(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
    };
    match runners.receive(&req).await {
        Ok(r) => axum::Json(WebhookAccepted {
            event: r.event,
            duplicate: r.duplicate,
            job_id: r.job_id,
            state: r.state.map(|s| s.as_str().to_string()),
        })
        .into_response(),
        Err(e) => ApiError::from_domain(e).into_response(),
    }
}
