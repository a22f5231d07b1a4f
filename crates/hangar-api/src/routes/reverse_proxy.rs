//! `/reverse-proxy/...`: the reverse_proxy module (reference §1.7). Proxy hosts are
//! listeners carrying one TCP route or ordered HTTP routes; changes apply at once.
//! Private keys are never returned (`tls.key` shows as `********`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use hangar_core::Access;
use hangar_core::claims::*;
use hangar_proxy::{HttpRoute, ProxyHost, TcpRoute};
use hangar_reverse_proxy::ReverseProxy;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    api.add(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), routes!(get_config))
        .add(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), routes!(enable))
        .add(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), routes!(disable))
        .add(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), routes!(restart))
        .add(Access::AllOf(&[LIST_REVERSE_PROXY_HOSTS]), routes!(list_hosts))
        .add(Access::AllOf(&[CREATE_REVERSE_PROXY_HOST]), routes!(create_host))
        .add(Access::AllOf(&[LIST_REVERSE_PROXY_HOSTS]), routes!(get_host))
        .add(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST]), routes!(update_host))
        .add(Access::AllOf(&[DELETE_REVERSE_PROXY_HOST]), routes!(delete_host))
        .add(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST_HTTP_ROUTE]), routes!(upsert_http_route))
        .add(Access::AllOf(&[DELETE_REVERSE_PROXY_HOST_HTTP_ROUTE]), routes!(delete_http_route))
        .add(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST_HTTP_ROUTE]), routes!(order_http_routes))
        .add(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST_TCP_ROUTE]), routes!(set_tcp_route))
}

fn module(s: &AppState) -> R<&Arc<ReverseProxy>> {
    s.reverse_proxy.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The reverse_proxy module is not running on this server; see GET /health/system",
        )
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> R<T> {
    serde_json::from_value(v).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("Bad {what}: {e}")))
}

/// A host as answered: the private key hidden, the listener's state added.
async fn view(m: &ReverseProxy, h: &ProxyHost) -> Value {
    let mut v = serde_json::to_value(h).unwrap_or(Value::Null);
    if let Some(k) = v.pointer_mut("/tls/key")
        && k.as_str().is_some_and(|s| !s.is_empty())
    {
        *k = json!("********");
    }
    let status = m.status().await;
    if let Some(l) = status.listener(&h.id)
        && let Some(o) = v.as_object_mut()
    {
        o.insert("listener".into(), serde_json::to_value(l).unwrap_or(Value::Null));
    }
    v
}

/// The module's configuration and the state of every listener.
#[utoipa::path(get, path = "/reverse-proxy", tag = "reverse_proxy", responses((status = 200, body = Object)))]
async fn get_config(State(s): State<AppState>) -> R<axum::Json<Value>> {
    let m = module(&s)?;
    let cfg = m.config().await.map_err(ApiError::from_domain)?;
    let mut hosts = Vec::new();
    for h in &cfg.hosts {
        hosts.push(view(m, h).await);
    }
    Ok(axum::Json(
        json!({"enabled": cfg.enabled, "host": cfg.host, "port": cfg.port, "hosts": hosts, "status": m.status().await}),
    ))
}

#[utoipa::path(put, path = "/reverse-proxy/enable", tag = "reverse_proxy", responses((status = 202)))]
async fn enable(State(s): State<AppState>, ctx: RequestContext) -> R<StatusCode> {
    module(&s)?.set_enabled(&ctx.actor, true).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(put, path = "/reverse-proxy/disable", tag = "reverse_proxy", responses((status = 202)))]
async fn disable(State(s): State<AppState>, ctx: RequestContext) -> R<StatusCode> {
    module(&s)?.set_enabled(&ctx.actor, false).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(put, path = "/reverse-proxy/restart", tag = "reverse_proxy", responses((status = 202)))]
async fn restart(State(s): State<AppState>, ctx: RequestContext) -> R<StatusCode> {
    module(&s)?.restart(&ctx.actor).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/reverse-proxy/hosts", tag = "reverse_proxy", responses((status = 200, body = Vec<Object>)))]
async fn list_hosts(State(s): State<AppState>) -> R<axum::Json<Vec<Value>>> {
    let m = module(&s)?;
    let cfg = m.config().await.map_err(ApiError::from_domain)?;
    let mut out = Vec::new();
    for h in &cfg.hosts {
        out.push(view(m, h).await);
    }
    Ok(axum::Json(out))
}

/// Create a proxy host: `{name, host, port, tls{enabled, cert, key}, cors, http_routes[...] | tcp_route{...}, require_auth}`.
#[utoipa::path(post, path = "/reverse-proxy/hosts", tag = "reverse_proxy", request_body = Object,
    responses((status = 201, body = Object), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn create_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(body): Json<Value>,
) -> R<(StatusCode, axum::Json<Value>)> {
    let m = module(&s)?;
    let host: ProxyHost = parse(body, "proxy host")?;
    let h = m.create_host(&ctx.actor, host).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(view(m, &h).await)))
}

#[utoipa::path(get, path = "/reverse-proxy/hosts/{id}", tag = "reverse_proxy", params(("id" = String, Path)), responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)))]
async fn get_host(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Value>> {
    let m = module(&s)?;
    let h = m.get_host(&id).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, &h).await))
}

#[utoipa::path(put, path = "/reverse-proxy/hosts/{id}", tag = "reverse_proxy", params(("id" = String, Path)), request_body = Object, responses((status = 200, body = Object)))]
async fn update_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let m = module(&s)?;
    let host: ProxyHost = parse(body, "proxy host")?;
    let h = m.update_host(&ctx.actor, &id, host).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, &h).await))
}

#[utoipa::path(delete, path = "/reverse-proxy/hosts/{id}", tag = "reverse_proxy", params(("id" = String, Path)), responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_host(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    module(&s)?.delete_host(&ctx.actor, &id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

/// Add an HTTP route, or replace the one with the same `id`.
#[utoipa::path(post, path = "/reverse-proxy/hosts/{id}/http_routes", tag = "reverse_proxy", params(("id" = String, Path)), request_body = Object, responses((status = 200, body = Object)))]
async fn upsert_http_route(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let m = module(&s)?;
    let route: HttpRoute = parse(body, "HTTP route")?;
    let h = m.upsert_http_route(&ctx.actor, &id, route).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, &h).await))
}

#[utoipa::path(delete, path = "/reverse-proxy/hosts/{id}/http_routes/{http_route_id}", tag = "reverse_proxy", params(("id" = String, Path), ("http_route_id" = String, Path)), responses((status = 202)))]
async fn delete_http_route(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, route)): Path<(String, String)>,
) -> R<StatusCode> {
    module(&s)?.delete_http_route(&ctx.actor, &id, &route).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RouteOrder {
    /// Every route id of the host, first tried first.
    pub order: Vec<String>,
}

#[utoipa::path(put, path = "/reverse-proxy/hosts/{id}/http_routes/order", tag = "reverse_proxy", params(("id" = String, Path)), request_body = RouteOrder, responses((status = 200, body = Object)))]
async fn order_http_routes(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<RouteOrder>,
) -> R<axum::Json<Value>> {
    let m = module(&s)?;
    let h = m.order_http_routes(&ctx.actor, &id, body.order).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, &h).await))
}

#[utoipa::path(post, path = "/reverse-proxy/hosts/{id}/tcp_route", tag = "reverse_proxy", params(("id" = String, Path)), request_body = Object, responses((status = 200, body = Object)))]
async fn set_tcp_route(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> R<axum::Json<Value>> {
    let m = module(&s)?;
    let route: TcpRoute = parse(body, "TCP route")?;
    let h = m.set_tcp_route(&ctx.actor, &id, route).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, &h).await))
}
