//! Authentication and route authorisation.
//!
//! Every route is registered through [`crate::Api::add`] with an [`Access`] rule; the rule
//! is stored in the [`AccessTable`] under the route's method and path. The
//! [`authorize`] middleware runs on every request: it authenticates the caller from the
//! `Authorization: Bearer` (a login token, or an API key: a value without a dot) or `X-Api-Key` header (and, on the websocket route only, from
//! the `access_token`/`authorization` query parameter), then checks the route's rule.
//! A matched route with no rule is refused: deny by default. Client headers such as
//! `X-Super-User`, `X-Claims`, `X-Roles` and `X-SOURCE` are never read.
//!
//! Browser sessions: without an `Authorization` or `X-Api-Key` header, the `hangar_session`
//! cookie is the credential (same RBAC). Because a browser sends it on its own (ambient),
//! a request it authenticates must carry `X-CSRF-Token` unless its method is GET, HEAD or
//! OPTIONS (403 with `error: "csrf"` otherwise), and a websocket upgrade it authenticates
//! must come from the server's own origin (`Origin` equal to the request's `Host`). Bearer
//! tokens and API keys are never CSRF-checked: a browser never sends them by itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_core::audit::Actor;
use hangar_core::{Access, AuthMethod, Decision, Principal};

use crate::AppState;
use crate::error::ApiError;

/// Paths (relative to the API root) that accept the token in the query string.
const QUERY_TOKEN_PATHS: &[&str] = &["/ws/subscribe", "/logs/stream"];

/// The enrollment-token rule, the one exception to a route's declared [`Access`]: these
/// routes (method, path relative to the API root) also accept a request that carries an
/// `X-Enrollment-Token` header and no other credential. Such a request reaches the handler
/// with no principal and the token in [`RequestContext::enrollment_token`]; the handler
/// must validate and consume the token atomically (a host joining the orchestrator, as the
/// reference's `POST /orchestrator/hosts` allows). On every other route the header is
/// never read, so it grants nothing there.
pub const ENROLLMENT_TOKEN_ROUTES: &[(&str, &str)] = &[("POST", "/orchestrator/hosts")];

/// The header that carries an enrollment token.
pub const ENROLLMENT_TOKEN_HEADER: &str = "x-enrollment-token";

/// The enrollment token of a request, when the route takes one (see [`ENROLLMENT_TOKEN_ROUTES`]).
fn enrollment_token(req: &Request, rel_path: &str) -> Result<Option<String>, ApiError> {
    if !ENROLLMENT_TOKEN_ROUTES.iter().any(|(m, p)| req.method().as_str() == *m && rel_path == *p) {
        return Ok(None);
    }
    let Some(v) = req.headers().get(ENROLLMENT_TOKEN_HEADER) else { return Ok(None) };
    let v = v.to_str().map_err(|_| ApiError::unauthorized("The X-Enrollment-Token header is not valid text"))?;
    let v = v.trim();
    if v.is_empty() {
        return Err(ApiError::unauthorized("The X-Enrollment-Token header is empty"));
    }
    Ok(Some(v.to_string()))
}

/// The declared rule of every route: (method, path relative to the API root) -> access.
#[derive(Debug, Clone, Default)]
pub struct AccessTable {
    pub routes: BTreeMap<(String, String), Access>,
}

impl AccessTable {
    pub fn insert(&mut self, method: &Method, path: &str, access: Access) {
        self.routes.insert((method.as_str().to_string(), path.to_string()), access);
    }

    pub fn get(&self, method: &Method, path: &str) -> Option<Access> {
        self.routes.get(&(method.as_str().to_string(), path.to_string())).copied()
    }

    /// Methods declared for a path.
    pub fn methods(&self, path: &str) -> BTreeSet<String> {
        self.routes.keys().filter(|(_, p)| p == path).map(|(m, _)| m.clone()).collect()
    }
}

/// The name of the browser session cookie.
pub const SESSION_COOKIE: &str = "hangar_session";

/// The header that carries a browser session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A request extension the HTTPS listener adds: cookies it sets are `Secure`.
#[derive(Debug, Clone, Copy)]
pub struct ServedOverTls;

/// The credential a request came with, kept so long-lived connections can re-check it.
#[derive(Debug, Clone)]
pub enum Credential {
    Bearer(String),
    ApiKey(String),
    /// The `hangar_session` cookie of a browser session.
    Session(String),
}

/// The value of a cookie in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for pair in v.split(';') {
            if let Some((k, val)) = pair.trim().split_once('=')
                && k.trim() == name
            {
                let val = val.trim().trim_matches('"');
                if !val.is_empty() {
                    return Some(val);
                }
            }
        }
    }
    None
}

/// Whether cookies set in answer to this request should be `Secure`: it came over TLS, or
/// through a proxy that says so (the header can only make the cookie stricter).
pub fn secure_request(extensions: &http::Extensions, headers: &http::HeaderMap) -> bool {
    extensions.get::<ServedOverTls>().is_some()
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value for a cookie of this server (HttpOnly, SameSite, Path, Secure over TLS).
pub fn set_cookie(name: &str, value: &str, max_age: u64, same_site: &str, path: &str, secure: bool) -> String {
    let mut c = format!("{name}={value}; HttpOnly; SameSite={same_site}; Path={path}; Max-Age={max_age}");
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_session_cookie(secure: bool) -> String {
    set_cookie(SESSION_COOKIE, "", 0, "Lax", "/", secure)
}

/// Whether the `Origin` of a request is the server's own (scheme aside: the authority
/// equals the `Host` the request was sent to).
fn same_origin(headers: &http::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return false };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else { return false };
    let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
    !authority.is_empty() && authority.trim_end_matches('/').eq_ignore_ascii_case(host.trim())
}

fn is_websocket_upgrade(headers: &http::HeaderMap) -> bool {
    headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The stable error answer of a cookie-authenticated request without its CSRF token.
fn csrf_refused(message: &str) -> Response {
    let body =
        crate::error::ApiErrorBody { code: 403, error: "csrf".into(), message: message.into(), request_id: None };
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

/// Per-request context put in the request's extensions by [`authorize`].
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Option<Principal>,
    pub credential: Option<Credential>,
    pub actor: Actor,
    pub request_id: Option<String>,
    /// The enrollment token of a request let through by the enrollment-token rule (no
    /// principal then); see [`ENROLLMENT_TOKEN_ROUTES`]. The handler must consume it.
    pub enrollment_token: Option<String>,
}

impl RequestContext {
    /// The principal; handlers on non-public routes can rely on it.
    pub fn caller(&self) -> Result<&Principal, ApiError> {
        self.principal.as_ref().ok_or_else(|| ApiError::unauthorized("Authentication required"))
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<RequestContext>().cloned().ok_or_else(|| ApiError::internal("request context missing"))
    }
}

/// Strip the API prefix (`/api/v1` or `/api`) from a matched path.
pub fn relative_path<'a>(prefix: &str, matched: &'a str) -> &'a str {
    let v1 = format!("{prefix}/v1");
    if let Some(rest) = matched.strip_prefix(v1.as_str())
        && (rest.is_empty() || rest.starts_with('/'))
    {
        return rest;
    }
    if let Some(rest) = matched.strip_prefix(prefix)
        && (rest.is_empty() || rest.starts_with('/'))
    {
        return rest;
    }
    matched
}

fn query_token(uri: &http::Uri) -> Option<String> {
    let q = uri.query()?;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "access_token" || k == "authorization" {
            let v = percent_decode(v);
            let v = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(&v).to_string();
            if !v.is_empty() {
                return Some(v);
            }
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn credential_from(req: &Request, rel_path: &str) -> Result<Option<Credential>, ApiError> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| ApiError::unauthorized("The Authorization header is not valid text"))?;
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthorized("The Authorization header must be 'Bearer <token>'"))?;
        let token = token.trim();
        // A login token is a JWT (three dot-separated parts); an API key is plain base64
        // without a dot. A key sent as a bearer token (what Prometheus and most scrapers and
        // HTTP clients can send) is checked as an API key, with the same RBAC.
        if !token.contains('.') {
            return Ok(Some(Credential::ApiKey(token.to_string())));
        }
        return Ok(Some(Credential::Bearer(token.to_string())));
    }
    if let Some(v) = req.headers().get("x-api-key") {
        let v = v.to_str().map_err(|_| ApiError::unauthorized("The X-Api-Key header is not valid text"))?;
        return Ok(Some(Credential::ApiKey(v.trim().to_string())));
    }
    if QUERY_TOKEN_PATHS.contains(&rel_path)
        && let Some(t) = query_token(req.uri())
    {
        return Ok(Some(Credential::Bearer(t)));
    }
    if let Some(c) = cookie(req.headers(), SESSION_COOKIE) {
        return Ok(Some(Credential::Session(c.to_string())));
    }
    Ok(None)
}

/// Authenticate a credential against the current store.
pub async fn authenticate(state: &AppState, cred: &Credential) -> Result<Principal, ApiError> {
    match cred {
        Credential::Bearer(t) => Ok(state.identity.authenticate_token(t).await?),
        Credential::ApiKey(k) => Ok(state.identity.authenticate_api_key(k).await?),
        Credential::Session(c) => Ok(state.identity.session(c).await?.principal),
    }
}

/// Check again the credential of a long-lived connection (an event stream, a tunnel) that was
/// authenticated when it opened: a revocation fails it, the expiry of its login token does not.
pub async fn recheck(state: &AppState, cred: &Credential) -> Result<Principal, ApiError> {
    match cred {
        Credential::Bearer(t) => Ok(state.identity.recheck_token(t).await?),
        Credential::ApiKey(_) | Credential::Session(_) => authenticate(state, cred).await,
    }
}

/// The authorisation middleware. See the module docs.
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(String::from);
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let Some(matched) = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()) else {
        // No route matched: the fallback answers 404.
        return next.run(req).await;
    };
    let rel = relative_path(&state.api_prefix, &matched).to_string();
    let access = match state.access.get(req.method(), &rel) {
        Some(a) => a,
        None => {
            let methods = state.access.methods(&rel);
            if methods.is_empty() {
                tracing::error!(path = %matched, method = %req.method(), "route has no access declaration; refused");
                return ApiError::forbidden("This route has no access declaration and is refused").into_response();
            }
            let allow = methods.into_iter().collect::<Vec<_>>().join(", ");
            let mut r = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Method {} is not allowed here; use {allow}", req.method()),
            )
            .into_response();
            if let Ok(v) = http::HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            return r;
        }
    };
    let credential = if !access.reads_credential() {
        None
    } else {
        match credential_from(&req, &rel) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        }
    };
    // The enrollment-token rule: only on its routes, only without another credential.
    let enrollment = match credential {
        Some(_) => None,
        None => match enrollment_token(&req, &rel) {
            Ok(t) => t,
            Err(e) => return e.into_response(),
        },
    };
    let principal = match &credential {
        Some(c) => match authenticate(&state, c).await {
            Ok(p) => Some(p),
            Err(e) => {
                let mut r = e.into_response();
                if matches!(c, Credential::Session(_)) {
                    // An ended session: the browser forgets the cookie.
                    let secure = secure_request(req.extensions(), req.headers());
                    if let Ok(v) = http::HeaderValue::from_str(&clear_session_cookie(secure)) {
                        r.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                return r;
            }
        },
        None => None,
    };
    if let Some(Credential::Session(c)) = &credential {
        // The cookie is ambient: a state-changing request needs the session's CSRF token,
        // and a websocket upgrade the server's own origin.
        if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
            let presented = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
            if presented.is_empty() || !state.identity.csrf_matches(c, presented) {
                return csrf_refused(
                    "A request authenticated by the session cookie must send the session's CSRF token in X-CSRF-Token (GET /api/v1/auth/session gives it)",
                );
            }
        }
        if is_websocket_upgrade(req.headers()) && !same_origin(req.headers()) {
            return ApiError::forbidden(
                "A websocket opened with the session cookie must come from this server's own origin; other clients send a token",
            )
            .into_response();
        }
    }
    match access.check(principal.as_ref()) {
        Decision::Allow => {}
        Decision::Unauthenticated if enrollment.is_some() => {}
        Decision::Unauthenticated => {
            return ApiError::unauthorized("Authentication required: send 'Authorization: Bearer <token>' (from POST /api/v1/auth/token) or 'X-Api-Key'").into_response();
        }
        Decision::Forbidden { needed } => {
            return ApiError::forbidden(format!("Forbidden: this route needs {needed}")).into_response();
        }
    }
    let actor = match &principal {
        Some(p) => Actor {
            user_id: p.user_id.clone(),
            username: p.username.clone(),
            via: match (&p.method, &credential) {
                (_, Some(Credential::Session(_))) => "session".into(),
                (AuthMethod::Jwt, _) => "jwt".into(),
                (AuthMethod::ApiKey { key_id }, _) => format!("api_key:{key_id}"),
            },
            source_ip: peer,
            request_id: request_id.clone(),
        },
        None => Actor {
            user_id: "anonymous".into(),
            username: "anonymous".into(),
            via: "none".into(),
            source_ip: peer,
            request_id: request_id.clone(),
        },
    };
    if let Some(p) = &principal {
        tracing::Span::current().record("user", p.username.as_str());
    }
    let actor = match &enrollment {
        Some(_) => Actor { username: "enrollment".into(), via: "enrollment_token".into(), ..actor },
        None => actor,
    };
    req.extensions_mut().insert(RequestContext {
        principal,
        credential,
        actor,
        request_id,
        enrollment_token: enrollment,
    });
    next.run(req).await
}

/// Shared state for the authorisation middleware's table.
pub type SharedAccess = Arc<AccessTable>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped_exactly() {
        assert_eq!(relative_path("/api", "/api/v1/auth/users"), "/auth/users");
        assert_eq!(relative_path("/api", "/api/auth/users"), "/auth/users");
        assert_eq!(relative_path("/api", "/api/v1"), "");
        assert_eq!(relative_path("/api", "/apix/users"), "/apix/users");
        assert_eq!(relative_path("/api", "/swagger/{*rest}"), "/swagger/{*rest}");
    }

    #[test]
    fn query_tokens_decode() {
        let u: http::Uri = "/api/v1/ws/subscribe?event_types=auth&access_token=abc%2Edef".parse().unwrap();
        assert_eq!(query_token(&u).as_deref(), Some("abc.def"));
        let u: http::Uri = "/x?authorization=Bearer%20tok".parse().unwrap();
        assert_eq!(query_token(&u).as_deref(), Some("tok"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn cookies_and_origins() {
        let mut h = http::HeaderMap::new();
        h.append(header::COOKIE, "a=1; hangar_session=abc ; b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(!same_origin(&h), "no Origin is not the same origin");
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://evil.example:8080".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
