//! `/metrics`: the Prometheus exposition of `hangar_metrics`, for callers with
//! `METRICS_READ`; the request counter and latency middleware ([`record`]); and the router of
//! the optional unauthenticated metrics listener (`METRICS_PORT`, [`listener_app`]).

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_core::Access;
use hangar_core::claims::METRICS_READ;
use utoipa_axum::routes;

use crate::error::ApiErrorBody;
use crate::{Api, AppState};

pub fn register(api: Api) -> Api {
    api.add(Access::AllOf(&[METRICS_READ]), routes!(metrics))
}

/// Every series in the Prometheus text format (OpenMetrics 1.0 text). Also served at the
/// server's root (`/metrics`, where Prometheus looks by default) under the same rule.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus/OpenMetrics text exposition", body = String, content_type = "application/openmetrics-text"),
        (status = 401, body = ApiErrorBody), (status = 403, body = ApiErrorBody)))]
pub(crate) async fn metrics() -> Response {
    exposition()
}

fn exposition() -> Response {
    ([(header::CONTENT_TYPE, hangar_metrics::CONTENT_TYPE)], hangar_metrics::encode()).into_response()
}

/// The app of the `METRICS_PORT` listener: `GET /metrics` and nothing else, without
/// authentication (it is meant for a private network or loopback).
pub fn listener_app() -> Router {
    Router::new().route("/metrics", axum::routing::get(|| async { exposition() }))
}

/// Count every routed request by method, matched route template (relative to the API
/// prefix, so `/api/v1/...` and `/api/...` are one series) and status. Requests that match
/// no route share the route label `unmatched`: a label never holds a raw path.
pub(crate) async fn record(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = match req.extensions().get::<MatchedPath>() {
        Some(m) => crate::auth::relative_path(&s.api_prefix, m.as_str()).to_string(),
        None => "unmatched".to_string(),
    };
    let resp = next.run(req).await;
    hangar_metrics::metrics().http_request(method.as_str(), &route, resp.status().as_u16(), started.elapsed());
    resp
}
