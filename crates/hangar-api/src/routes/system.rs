//! `/health/...`, `/version`, `/audit`, and the access rules of routes that live outside
//! the API's own router (OpenAPI document, Swagger UI, JWKS).

use axum::extract::State;
use axum::http::{Method, StatusCode};
use hangar_core::claims::READ_ONLY;
use hangar_core::{Access, Decision};
use utoipa_axum::routes;

use super::dto::*;
use crate::auth::RequestContext;
use crate::error::ApiError;
use crate::extract::Query;
use crate::{Api, AppState};

pub fn register(mut api: Api) -> Api {
    for (m, p) in [
        (Method::GET, "/openapi.json"),
        (Method::GET, "/.well-known/jwks.json"),
        (Method::GET, "/swagger"),
        (Method::GET, "/swagger/"),
        (Method::GET, "/swagger/{*rest}"),
    ] {
        api.table_mut().insert(&m, p, Access::Public);
    }
    api.add(Access::Public, routes!(probe))
        .add(Access::Public, routes!(ready))
        .add(Access::Open, routes!(system_health))
        .add(Access::Authenticated, routes!(version))
        .add(Access::SuperUser, routes!(audit))
}

impl Api {
    pub(crate) fn table_mut(&mut self) -> &mut crate::AccessTable {
        &mut self.table
    }
}

/// Liveness: answers while the process serves requests. Open to anyone, like login, JWKS,
/// the API documents and the minimal `/health/system`.
#[utoipa::path(get, path = "/health/probe", tag = "health", responses((status = 200, body = Probe)))]
async fn probe() -> axum::Json<Probe> {
    axum::Json(Probe { status: "OK".into() })
}

/// Readiness, for load balancers: 200 when this replica's store answers a read within its
/// deadline and its migrations are done, 503 otherwise. Open to anyone like liveness; it
/// says nothing but the checks' names and results, and the answer is cached for a second so
/// probes cannot load the database.
#[utoipa::path(get, path = "/health/ready", tag = "health", responses((status = 200, body = Ready), (status = 503, body = Ready)))]
async fn ready(State(s): State<AppState>) -> (StatusCode, axum::Json<Ready>) {
    let report = s.replica.readiness.check().await;
    let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let checks = report.checks.into_iter().map(|(name, ok)| (name.to_string(), ok)).collect();
    (status, axum::Json(Ready { ready: report.ready, checks }))
}

/// Who sees the detail of `/health/system` (module messages, the store engine): the route
/// itself is open, so that the reference's clients can check a server before they log in.
const HEALTH_DETAIL: Access = Access::AnyOf(&[READ_ONLY]);

/// Health of each module. Anyone gets whether the server and each module are healthy; a
/// caller with READ_ONLY also gets each module's message, the store engine and who leads.
#[utoipa::path(get, path = "/health/system", tag = "health", params(("full" = Option<bool>, Query, description = "Accepted for the reference's clients; the answer is the same")), responses((status = 200, body = SystemHealth)))]
async fn system_health(State(s): State<AppState>, ctx: RequestContext) -> Result<axum::Json<SystemHealth>, ApiError> {
    let detail = HEALTH_DETAIL.check(ctx.principal.as_ref()) == Decision::Allow;
    let store = if detail { format!("store ({})", s.info.store_engine) } else { "store".to_string() };
    let mut services = vec![ServiceHealth {
        name: store,
        healthy: s.identity.store().get("users", "-").await.is_ok(),
        message: String::new(),
    }];
    for m in s.info.modules.iter().filter(|m| m.enabled) {
        let message = if detail { m.message.clone() } else { String::new() };
        services.push(ServiceHealth { name: m.name.clone(), healthy: m.healthy, message });
    }
    let healthy = services.iter().all(|s| s.healthy);
    let leader = detail.then(|| {
        let holder = s.replica.leader.borrow().clone();
        LeaderView {
            leader: holder.as_ref().map(|h| h.holder.clone()),
            token: holder.as_ref().map(|h| h.token),
            since: holder.map(|h| h.since),
            replica: s.replica.id.clone(),
        }
    });
    let message = if healthy { "OK".into() } else { "Degraded".into() };
    Ok(axum::Json(SystemHealth { healthy, message, services, leader }))
}

#[utoipa::path(get, path = "/version", tag = "health", responses((status = 200, body = Version)))]
async fn version(State(s): State<AppState>) -> axum::Json<Version> {
    axum::Json(Version { version: s.info.version.clone() })
}

/// The audit log: every state change, oldest first, paged by id.
#[utoipa::path(get, path = "/audit", tag = "audit", params(AuditQuery), responses((status = 200, body = Vec<AuditEntry>)))]
async fn audit(
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<axum::Json<Vec<AuditEntry>>, ApiError> {
    let entries = s.identity.list_audit(q.after.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(axum::Json(entries.into_iter().map(AuditEntry::from).collect()))
}
