//! The web console (`hangar-console`'s embedded files) at `/console/...`, and `/`
//! redirecting there. Outside the API prefix, like the Swagger UI; declared [`Access::Public`]
//! in the access table (the files hold no data: the console reads everything through the API
//! with the caller's own session), so deny-by-default still holds for every other path.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hangar_core::Access;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::ApiError;
use crate::{Api, AppState};

/// Where the console lives.
pub const CONSOLE_PATH: &str = "/console/";

/// The console's paths in the access table (GET and HEAD, public), and the one API route
/// the console needs beyond the others: what its caller may do.
pub fn register(mut api: Api) -> Api {
    for p in ["/", "/console", "/console/{*rest}"] {
        for m in [Method::GET, Method::HEAD] {
            api.table_mut().insert(&m, p, Access::Public);
        }
    }
    api.add(Access::Authenticated, routes!(capabilities))
}

/// What the caller may do, so the console shows only what the API would allow.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Capabilities {
    pub user_id: String,
    pub username: String,
    pub roles: Vec<String>,
    /// Effective claims: the user's own and those of every role it holds.
    pub claims: Vec<String>,
    /// A SUPER_USER passes every claim check.
    pub super_user: bool,
    /// The modules this server runs (`api`, `host`, `catalog`, `orchestrator`, `reverse_proxy`).
    pub modules: Vec<String>,
}

/// The caller's effective roles and claims and this server's modules (for the web console:
/// a user's own record lists only its direct claims).
#[utoipa::path(get, path = "/console/capabilities", tag = "auth",
    responses((status = 200, body = Capabilities), (status = 401, body = crate::error::ApiErrorBody)))]
async fn capabilities(State(s): State<AppState>, ctx: RequestContext) -> Result<axum::Json<Capabilities>, ApiError> {
    let p = ctx.caller()?;
    Ok(axum::Json(Capabilities {
        user_id: p.user_id.clone(),
        username: p.username.clone(),
        roles: p.roles.iter().cloned().collect(),
        claims: p.claims.iter().cloned().collect(),
        super_user: p.is_super_user(),
        modules: s.info.modules.iter().filter(|m| m.enabled).map(|m| m.name.clone()).collect(),
    }))
}

/// The console's routes, merged beside the API by [`crate::app`].
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", axum::routing::get(root))
        .route("/console", axum::routing::get(index))
        .route("/console/{*rest}", axum::routing::get(asset))
}

async fn root() -> Response {
    (StatusCode::FOUND, [(header::LOCATION, HeaderValue::from_static(CONSOLE_PATH))]).into_response()
}

async fn index() -> Response {
    answer("")
}

async fn asset(Path(rest): Path<String>) -> Response {
    answer(&rest)
}

fn answer(path: &str) -> Response {
    let Some(a) = hangar_console::get(path) else {
        return ApiError::not_found(format!("No console file {CONSOLE_PATH}{path}")).into_response();
    };
    let mut resp = (StatusCode::OK, a.body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(a.cache_control));
    for (k, v) in hangar_console::SECURITY_HEADERS {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    resp
}
