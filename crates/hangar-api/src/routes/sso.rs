//! `/auth/session`, `/auth/providers` and `/auth/oidc/...`: browser sessions (a password or an
//! OIDC login sets the `hangar_session` cookie) and single sign-on. The rules (session
//! lifetimes, the OIDC checks, just-in-time users) live in `hangar_identity`; this module
//! parses, calls one service method and shapes the answer with its cookies.

use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hangar_core::Access;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;

use super::dto::{TokenResponse, User, token_response};
use crate::auth::{self, Credential, RequestContext};
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, Path, Query};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    api.add(Access::Public, routes!(create_session))
        .add(Access::Authenticated, routes!(get_session, delete_session))
        .add(Access::Public, routes!(providers))
        .add(Access::Public, routes!(oidc_login))
        .add(Access::Public, routes!(oidc_callback))
        .add(Access::Public, routes!(oidc_token_exchange))
}

/// Whether cookies this request sets are `Secure` (it came over TLS).
pub(crate) struct Secure(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for Secure {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Secure(auth::secure_request(&parts.extensions, &parts.headers)))
    }
}

/// A password login for the browser.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SessionLoginRequest {
    /// Username or email.
    pub username: String,
    pub password: String,
}

/// The caller's browser session.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionResponse {
    pub user: User,
    /// Send it as `X-CSRF-Token` with every state-changing request the cookie authenticates.
    /// Absent when the caller authenticated with a token or an API key (no CSRF check then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf_token: Option<String>,
    /// `local` (a password) or `oidc` for a session; `token` or `api_key` for other callers.
    pub auth: String,
    /// The OIDC provider of an `oidc` session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// A single sign-on provider the login page offers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderLink {
    pub id: String,
    pub name: String,
    /// Where the browser goes to sign in (append `?return_to=/console/...`).
    pub login_url: String,
    /// The provider's issuer (the CLI's device login talks to it).
    pub issuer: String,
    /// The public client the CLI's device login uses.
    pub cli_client_id: String,
}

fn with_cookie(mut r: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

pub(crate) fn session_cookie(new: &hangar_identity::NewSession, secure: bool) -> String {
    auth::set_cookie(auth::SESSION_COOKIE, &new.cookie, new.max_age, "Lax", "/", secure)
}

/// Log in with a password and open a browser session: sets the `hangar_session` cookie
/// (HttpOnly, SameSite=Lax, Secure over TLS) and answers the CSRF token. Throttled like
/// `POST /auth/token`.
#[utoipa::path(post, path = "/auth/session", tag = "auth", request_body = SessionLoginRequest,
    responses((status = 200, body = SessionResponse, description = "Logged in; Set-Cookie: hangar_session"),
        (status = 401, body = ApiErrorBody), (status = 403, description = "Disabled, or a single sign-on user", body = ApiErrorBody),
        (status = 429, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn create_session(
    State(s): State<AppState>,
    ctx: RequestContext,
    Secure(secure): Secure,
    Json(req): Json<SessionLoginRequest>,
) -> R<Response> {
    if req.username.trim().is_empty() || req.password.is_empty() {
        return Err(ApiError::bad_request("Send {\"username\", \"password\"}"));
    }
    if req.username.len() > 320 || req.password.len() > 1024 {
        return Err(ApiError::from(hangar_identity::IdentityError::InvalidCredentials));
    }
    let new = s
        .identity
        .login_session(&req.username, &req.password, ctx.actor.source_ip.clone())
        .await
        .map_err(super::auth::answer)?;
    let body = SessionResponse {
        user: new.user.clone().into(),
        csrf_token: Some(new.csrf_token.clone()),
        auth: new.auth.as_str().into(),
        provider: new.provider.clone(),
    };
    Ok(with_cookie(axum::Json(body).into_response(), &session_cookie(&new, secure)))
}

/// The caller's session: the user, the CSRF token and how it signed in (401 without one).
#[utoipa::path(get, path = "/auth/session", tag = "auth",
    responses((status = 200, body = SessionResponse), (status = 401, body = ApiErrorBody)))]
async fn get_session(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<SessionResponse>> {
    let p = ctx.caller()?;
    match &ctx.credential {
        Some(Credential::Session(c)) => {
            let info = s.identity.session(c).await?;
            Ok(axum::Json(SessionResponse {
                user: info.user.into(),
                csrf_token: Some(info.csrf_token),
                auth: info.auth.as_str().into(),
                provider: info.provider,
            }))
        }
        other => Ok(axum::Json(SessionResponse {
            user: s.identity.get_user(&p.user_id).await?.into(),
            csrf_token: None,
            auth: if matches!(other, Some(Credential::ApiKey(_))) { "api_key" } else { "token" }.into(),
            provider: None,
        })),
    }
}

/// Log out: the session is deleted and the cookie cleared.
#[utoipa::path(delete, path = "/auth/session", tag = "auth",
    responses((status = 204, description = "Logged out; the cookie is cleared"), (status = 401, body = ApiErrorBody),
        (status = 403, description = "No X-CSRF-Token", body = ApiErrorBody)))]
async fn delete_session(State(s): State<AppState>, ctx: RequestContext, Secure(secure): Secure) -> R<Response> {
    if let Some(Credential::Session(c)) = &ctx.credential {
        s.identity.delete_session(c, &ctx.actor).await?;
    }
    Ok(with_cookie(StatusCode::NO_CONTENT.into_response(), &auth::clear_session_cookie(secure)))
}

/// The single sign-on providers the login page offers.
#[utoipa::path(get, path = "/auth/providers", tag = "auth", responses((status = 200, body = Vec<ProviderLink>)))]
async fn providers(State(s): State<AppState>) -> axum::Json<Vec<ProviderLink>> {
    let prefix = format!("{}/v1", s.api_prefix);
    let list = s
        .identity
        .oidc()
        .map(|o| {
            o.providers()
                .iter()
                .map(|p| ProviderLink {
                    id: p.id.clone(),
                    name: p.display_name(),
                    login_url: format!("{prefix}/auth/oidc/{}/login", p.id),
                    issuer: p.issuer.clone(),
                    cli_client_id: p.cli_client_id().to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    axum::Json(list)
}

/// `?return_to=` of a login.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
pub struct LoginQuery {
    /// A local path to land on after the login (default `/console/`).
    pub return_to: Option<String>,
}

/// What the provider sends back to the callback.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    /// Set by the provider when the login failed there.
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// An ID token the CLI got from the provider (device authorization grant).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenExchangeRequest {
    pub id_token: String,
}

/// The callback URL of a provider, as the browser reaches this server.
fn redirect_uri(s: &AppState, headers: &http::HeaderMap, secure: bool, provider: &str) -> R<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".:-[]".contains(c)))
        .ok_or_else(|| ApiError::bad_request("The request has no usable Host header"))?;
    let scheme = if secure { "https" } else { "http" };
    Ok(format!("{scheme}://{host}{}/v1/auth/oidc/{provider}/callback", s.api_prefix))
}

fn state_cookie(value: &str, max_age: u64, secure: bool) -> String {
    auth::set_cookie(hangar_identity::oidc::STATE_COOKIE, value, max_age, "Lax", "/", secure)
}

/// Start a single sign-on login: redirects to the provider (authorization code with PKCE
/// S256, state and nonce) and sets the short-lived `hangar_oidc` cookie that binds the login
/// to this browser.
#[utoipa::path(get, path = "/auth/oidc/{provider}/login", tag = "auth",
    params(("provider" = String, Path, description = "Provider id"), LoginQuery),
    responses((status = 302, description = "To the provider's login page"), (status = 400, body = ApiErrorBody),
        (status = 404, body = ApiErrorBody), (status = 503, description = "The provider is unreachable", body = ApiErrorBody)))]
async fn oidc_login(
    State(s): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<LoginQuery>,
    Secure(secure): Secure,
    headers: http::HeaderMap,
) -> R<Response> {
    let return_to = q.return_to.unwrap_or_else(|| "/console/".into());
    let redirect = redirect_uri(&s, &headers, secure, &provider)?;
    let start = s.identity.oidc_start(&provider, &return_to, &redirect).await?;
    let mut r = StatusCode::FOUND.into_response();
    let loc = HeaderValue::from_str(&start.redirect_url).map_err(|_| ApiError::internal("bad redirect URL"))?;
    r.headers_mut().insert(header::LOCATION, loc);
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(with_cookie(r, &state_cookie(&start.state_cookie, start.cookie_max_age, secure)))
}

/// The provider's redirect after a login: checks the state (and that this browser started
/// the login), exchanges the code with the PKCE verifier, verifies the ID token (signature,
/// issuer, audience, expiry, nonce), creates or updates the user from the mapping, sets the
/// `hangar_session` cookie and redirects to `return_to`.
#[utoipa::path(get, path = "/auth/oidc/{provider}/callback", tag = "auth",
    params(("provider" = String, Path, description = "Provider id"), CallbackQuery),
    responses((status = 302, description = "Logged in; to return_to"), (status = 400, description = "Bad or used state, or an error from the provider", body = ApiErrorBody),
        (status = 401, description = "The ID token is refused", body = ApiErrorBody), (status = 403, description = "The mapping grants nothing", body = ApiErrorBody)))]
async fn oidc_callback(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(provider): Path<String>,
    Query(q): Query<CallbackQuery>,
    Secure(secure): Secure,
    headers: http::HeaderMap,
) -> R<Response> {
    if let Some(e) = q.error {
        return Err(ApiError::bad_request(format!(
            "The provider {provider} ended the login: {e} {}",
            q.error_description.unwrap_or_default()
        )));
    }
    let (Some(code), Some(state)) = (q.code.filter(|c| !c.is_empty()), q.state.filter(|c| !c.is_empty())) else {
        return Err(ApiError::bad_request("The callback needs code and state"));
    };
    if code.len() > 4096 || state.len() > 512 {
        return Err(ApiError::bad_request("code or state is too long"));
    }
    let binding = auth::cookie(&headers, hangar_identity::oidc::STATE_COOKIE);
    let done = s
        .identity
        .oidc_callback(&provider, &code, &state, binding, ctx.actor.source_ip.clone())
        .await
        .map_err(super::auth::answer)?;
    let mut r = StatusCode::FOUND.into_response();
    let loc = HeaderValue::from_str(&done.return_to).map_err(|_| ApiError::bad_request("bad return_to"))?;
    r.headers_mut().insert(header::LOCATION, loc);
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let r = with_cookie(r, &state_cookie("", 0, secure));
    Ok(with_cookie(r, &session_cookie(&done.session, secure)))
}

/// The CLI's single sign-on: an ID token from the provider (device authorization grant, for
/// the server's or the CLI's client id) for a Hangar token, through the same mapping and
/// just-in-time user as a browser login.
#[utoipa::path(post, path = "/auth/oidc/{provider}/token-exchange", tag = "auth",
    params(("provider" = String, Path, description = "Provider id")), request_body = TokenExchangeRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ApiErrorBody), (status = 403, body = ApiErrorBody),
        (status = 404, body = ApiErrorBody)))]
async fn oidc_token_exchange(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(provider): Path<String>,
    Json(req): Json<TokenExchangeRequest>,
) -> R<axum::Json<TokenResponse>> {
    if req.id_token.is_empty() || req.id_token.len() > 16 * 1024 {
        return Err(ApiError::bad_request("Send {\"id_token\"} from the provider"));
    }
    let t = s
        .identity
        .oidc_token_exchange(&provider, &req.id_token, ctx.actor.source_ip.clone())
        .await
        .map_err(super::auth::answer)?;
    Ok(axum::Json(token_response(t)))
}
