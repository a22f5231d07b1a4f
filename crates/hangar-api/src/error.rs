//! The one error shape of the API.
//!
//! Every error answer, whatever produced it (a handler, an extractor rejection, the
//! body-size limit, an unknown route), has the JSON body [`ApiErrorBody`]:
//! `{"code": <HTTP status>, "error": "<slug>", "message": "<what went wrong>", "request_id": "..."}`.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hangar_core::{Classify, ErrorKind};

pub use hangar_wire::ApiErrorBody;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), retry_after: None }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }

    /// Map a library error by its kind; internal details are logged, not returned.
    pub fn from_domain<E: Classify + std::fmt::Display>(e: E) -> Self {
        let status = match e.kind() {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "internal error");
            return ApiError::internal("Internal error; the server log has the details under this request id");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<hangar_identity::IdentityError> for ApiError {
    fn from(e: hangar_identity::IdentityError) -> Self {
        let retry = match &e {
            hangar_identity::IdentityError::LockedOut { seconds, .. } => Some((*seconds).max(1) as u64),
            _ => None,
        };
        let mut out = ApiError::from_domain(e);
        out.retry_after = retry;
        out
    }
}

pub fn slug(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable_entity",
        429 => "too_many_requests",
        503 => "unavailable",
        s if s >= 500 => "internal_error",
        _ => "error",
    }
}

/// Build the JSON error response. The request id is filled in by the error-shaping
/// middleware, which knows it.
pub fn error_response(status: StatusCode, message: String) -> Response {
    let body = ApiErrorBody { code: status.as_u16(), error: slug(status).into(), message, request_id: None };
    let mut r = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = error_response(self.status, self.message);
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// Middleware helper: give every error answer the JSON shape and the request id.
pub async fn shape_errors(request_id: Option<String>, resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let mut parsed: ApiErrorBody = if is_json {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiErrorBody {
            code: status.as_u16(),
            error: slug(status).into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
            request_id: None,
        })
    } else {
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        let message = if text.is_empty() { status.canonical_reason().unwrap_or("Error").to_string() } else { text };
        ApiErrorBody { code: status.as_u16(), error: slug(status).into(), message, request_id: None }
    };
    parsed.request_id = request_id;
    let out = serde_json::to_vec(&parsed).unwrap_or_default();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}
