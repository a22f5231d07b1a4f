//! Hangar's HTTP layer.
//!
//! This crate parses requests, authenticates callers, checks each route's declared
//! [`Access`] rule, and calls the core services; it holds no business rules of its own.
//! Every route is added through [`Api::add`], which records its rule in the
//! [`auth::AccessTable`] and its documentation in the OpenAPI document, so a route
//! cannot exist without both. Routes are served at `{prefix}/v1/...` and at the alias
//! `{prefix}/...`.

pub mod auth;
pub mod error;
pub mod extract;
pub mod mount;
pub mod openapi;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use chrono::{DateTime, Utc};
use hangar_core::{Access, EventBus};
use hangar_identity::Identity;
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

pub use auth::{AccessTable, RequestContext};
pub use error::{ApiError, ApiErrorBody};

/// Status of one module, reported at start and by `/health/system`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModuleStatus {
    pub name: String,
    pub enabled: bool,
    pub healthy: bool,
    pub message: String,
}

/// This replica among several over one store: its readiness check (`/health/ready`) and
/// who holds the leader lease (`/health/system`, for callers that see the detail).
#[derive(Clone)]
pub struct Replica {
    /// This replica's id (its lease holder id).
    pub id: String,
    pub readiness: Arc<hangar_store::Readiness>,
    /// The lease holder as this replica last saw it.
    pub leader: tokio::sync::watch::Receiver<Option<hangar_store::LeaseHolder>>,
}

/// Facts about this server.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub modules: Vec<ModuleStatus>,
    pub data_dir: String,
    pub store_engine: String,
}

/// CORS settings (`CORS_ALLOWED_ORIGINS`, `CORS_ALLOWED_METHODS`, `CORS_ALLOWED_HEADERS`).
#[derive(Debug, Clone)]
pub struct CorsConfig {
    pub enabled: bool,
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            enabled: true,
            allowed_origins: vec!["*".into()],
            allowed_methods: vec![],
            allowed_headers: vec![],
        }
    }
}

/// The services behind the API. A module that is off has `None`, and its routes answer
/// 503 naming the module.
#[derive(Clone)]
pub struct Services {
    pub identity: Identity,
    pub bus: EventBus,
    pub host: Option<Arc<hangar_host::Host>>,
    /// The catalog module, when it runs.
    pub catalog: Option<Arc<hangar_catalog::Catalog>>,
    /// The reverse_proxy module, when it runs.
    pub reverse_proxy: Option<Arc<hangar_reverse_proxy::ReverseProxy>>,
    /// The orchestrator module, when it runs.
    pub orchestrator: Option<Arc<hangar_orchestrator::HttpOrchestrator>>,
    /// Ephemeral CI runners (`/runners/github/webhook`), when GitHub is configured.
    pub runners: Option<hangar_runners::Runners>,
    /// The server's own recent log lines (`/logs`).
    pub logs: hangar_core::LogRing,
    /// Readiness and leadership of this replica.
    pub replica: Replica,
}

/// Everything handlers need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub identity: Identity,
    pub bus: EventBus,
    /// The host module, when it runs.
    pub host: Option<Arc<hangar_host::Host>>,
    /// The catalog module, when it runs.
    pub catalog: Option<Arc<hangar_catalog::Catalog>>,
    /// The reverse_proxy module, when it runs.
    pub reverse_proxy: Option<Arc<hangar_reverse_proxy::ReverseProxy>>,
    /// The orchestrator module, when it runs.
    pub orchestrator: Option<Arc<hangar_orchestrator::HttpOrchestrator>>,
    /// Ephemeral CI runners, when GitHub is configured.
    pub runners: Option<hangar_runners::Runners>,
    pub info: Arc<ServerInfo>,
    pub api_prefix: String,
    pub access: Arc<AccessTable>,
    pub ws: Arc<routes::ws::WsHub>,
    pub logs: hangar_core::LogRing,
    pub replica: Replica,
}

/// Configuration of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `API_PREFIX`, default `/api`.
    pub prefix: String,
    /// Largest accepted request body.
    pub body_limit: usize,
    pub cors: CorsConfig,
    pub request_timeout: Duration,
    /// Serve the web console at `/console/` (and redirect `/` there).
    pub console: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            prefix: "/api".into(),
            body_limit: 1024 * 1024,
            cors: CorsConfig::default(),
            request_timeout: Duration::from_secs(300),
            console: true,
        }
    }
}

/// Route registration: every route with its access rule.
pub struct Api {
    router: OpenApiRouter<AppState>,
    table: AccessTable,
}

impl Default for Api {
    fn default() -> Self {
        Self::new()
    }
}

impl Api {
    pub fn new() -> Self {
        Api { router: OpenApiRouter::new(), table: AccessTable::default() }
    }

    /// Add a route (from `utoipa_axum::routes!`) with the access it needs.
    pub fn add(mut self, access: Access, (schemas, mut paths, method_router): UtoipaMethodRouter<AppState>) -> Self {
        for (path, item) in paths.paths.iter_mut() {
            for (method, op) in [
                (Method::GET, item.get.as_mut()),
                (Method::PUT, item.put.as_mut()),
                (Method::POST, item.post.as_mut()),
                (Method::DELETE, item.delete.as_mut()),
                (Method::PATCH, item.patch.as_mut()),
                (Method::HEAD, item.head.as_mut()),
            ] {
                if let Some(op) = op {
                    self.table.insert(&method, path, access);
                    openapi::document_access(op, access);
                }
            }
        }
        self.router = self.router.routes((schemas, paths, method_router));
        self
    }

    pub fn table(&self) -> &AccessTable {
        &self.table
    }
}

/// All routes of the API.
pub fn api() -> Api {
    let api = Api::new();
    let api = routes::system::register(api);
    let api = routes::auth::register(api);
    let api = routes::sso::register(api);
    let api = routes::catalog::register(api);
    let api = routes::cache::register(api);
    let api = routes::machines::register(api);
    let api = routes::reverse_proxy::register(api);
    let api = routes::orchestrator::register(api);
    let api = routes::pools::register(api);
    let api = routes::port_forward::register(api);
    let api = routes::catalog_managers::register(api);
    let api = routes::logs::register(api);
    let api = routes::user_configs::register(api);
    let api = routes::metrics::register(api);
    let api = routes::runners::register(api);
    let api = routes::console::register(api);
    routes::ws::register(api)
}

/// The access table alone (for tests and docs).
pub fn access_table() -> AccessTable {
    api().table
}

/// The OpenAPI document, as served at `{prefix}/v1/openapi.json`.
pub fn openapi_document() -> OpenApi {
    let (_, doc) = api().router.split_for_parts();
    openapi::finish(doc)
}

/// Collapse `//` and drop a trailing `/` so `/api/v1//machines/` reaches `/api/v1/machines`.
pub fn normalize_path(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let keep_trailing = path.starts_with("/swagger");
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' {
            if prev_slash {
                continue;
            }
            prev_slash = true;
        } else {
            prev_slash = false;
        }
        out.push(c);
    }
    if !keep_trailing && out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    if out == path {
        return None;
    }
    let pq = match uri.query() {
        Some(q) => format!("{out}?{q}"),
        None => out,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).ok()
}

async fn normalize(mut req: Request, next: Next) -> Response {
    if let Some(u) = normalize_path(req.uri()) {
        *req.uri_mut() = u;
    }
    next.run(req).await
}

/// Request id, tracing span, access log line and error shaping for every request.
async fn envelope(mut req: Request, next: Next) -> Response {
    // Always our own id: a client cannot choose what the audit log records.
    let id = uuid::Uuid::now_v7().to_string();
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert("x-request-id", v);
    }
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path(), user = tracing::field::Empty);
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    let mut resp = error::shape_errors(Some(id.clone()), resp).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| {
        tracing::info!(status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request done");
    });
    resp
}

fn cors_layer(c: &CorsConfig) -> CorsLayer {
    let mut layer = CorsLayer::new();
    let origins: Vec<HeaderValue> =
        c.allowed_origins.iter().filter(|o| *o != "*").filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    layer = if c.allowed_origins.iter().any(|o| o == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        layer.allow_origin(origins)
    };
    let mut methods: Vec<Method> = c.allowed_methods.iter().filter_map(|m| m.parse().ok()).collect();
    if methods.is_empty() {
        methods = vec![Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];
    }
    let mut headers: Vec<http::HeaderName> = c.allowed_headers.iter().filter_map(|h| h.parse().ok()).collect();
    for h in ["authorization", "content-type", "x-api-key", "x-filter", "x-request-id"] {
        if let Ok(n) = h.parse::<http::HeaderName>()
            && !headers.contains(&n)
        {
            headers.push(n);
        }
    }
    layer.allow_methods(methods).allow_headers(headers).expose_headers([http::HeaderName::from_static("x-request-id")])
}

/// Build the whole HTTP application.
pub fn app(services: Services, info: ServerInfo, config: &ApiConfig) -> Router {
    let Services { identity, bus, host, catalog, reverse_proxy, orchestrator, runners, logs, replica } = services;
    let Api { router, table } = api();
    let (inner, doc) = router.split_for_parts();
    let doc = openapi::finish(doc);
    let access = Arc::new(table);
    let state = AppState {
        identity,
        bus: bus.clone(),
        host,
        catalog,
        reverse_proxy,
        orchestrator,
        runners,
        info: Arc::new(info),
        api_prefix: config.prefix.clone(),
        access,
        ws: Arc::new(routes::ws::WsHub::default()),
        logs,
        replica,
    };
    let v1 = format!("{}/v1", config.prefix);
    let doc = Arc::new(doc);
    let doc_for_route = doc.clone();
    let api_router: Router<AppState> = inner.route(
        "/openapi.json",
        axum::routing::get(move || {
            let d = doc_for_route.clone();
            async move { axum::Json(d.as_ref().clone()) }
        }),
    );
    let swagger: Router<AppState> = utoipa_swagger_ui::SwaggerUi::new("/swagger")
        .config(utoipa_swagger_ui::Config::new([format!("{v1}/openapi.json")]))
        .into();
    let jwks_route = axum::routing::get(routes::auth::jwks_document);
    let mut routed = Router::new();
    if config.console {
        routed = routed.merge(routes::console::router());
    }
    let routed = routed
        .nest(&v1, api_router.clone())
        .nest(&config.prefix, api_router)
        .route("/.well-known/jwks.json", jwks_route)
        .route("/metrics", axum::routing::get(routes::metrics::metrics))
        .merge(swagger)
        .fallback(|| async { ApiError::not_found("No such route; the API is described at /api/v1/openapi.json") })
        .layer(middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(middleware::from_fn_with_state(state.clone(), routes::metrics::record))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state);
    let mut routed = routed.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        http::StatusCode::REQUEST_TIMEOUT,
        config.request_timeout,
    ));
    if config.cors.enabled {
        routed = routed.layer(cors_layer(&config.cors));
    }
    Router::new().fallback_service(routed).layer(middleware::from_fn(envelope)).layer(middleware::from_fn(normalize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised() {
        let n = |s: &str| normalize_path(&s.parse().unwrap()).map(|u| u.to_string());
        assert_eq!(n("/api/v1//machines/"), Some("/api/v1/machines".into()));
        assert_eq!(n("/api/v1/machines"), None);
        assert_eq!(n("//api///v1/x/?a=b"), Some("/api/v1/x?a=b".into()));
        assert_eq!(n("/swagger/"), None);
        assert_eq!(n("/"), None);
    }
}
