//! `/auth/...`: login, token validation, JWKS, users, roles, claims, API keys.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hangar_core::Access;
use hangar_core::claims::*;
use hangar_identity::{NewApiKey, NewUser, UserUpdate};
use utoipa_axum::routes;

use super::dto::*;
use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Json, JsonOrForm, Path};
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

/// An identity error as an answer, with `Retry-After` when the error says when to retry
/// (a login lockout, busy password hashers).
pub(crate) fn answer(e: hangar_identity::IdentityError) -> ApiError {
    let retry = e.retry_after();
    let mut out = ApiError::from(e);
    if out.retry_after.is_none() {
        out.retry_after = retry;
    }
    out
}

pub fn register(api: Api) -> Api {
    api.add(Access::Public, routes!(login))
        .add(Access::Public, routes!(validate))
        .add(Access::Public, routes!(jwks))
        .add(Access::Authenticated, routes!(me))
        .add(Access::Authenticated, routes!(change_password))
        .add(Access::AllOf(&[LIST_USER]), routes!(list_users))
        .add(Access::AllOf(&[CREATE_USER]), routes!(create_user))
        .add(Access::AllOf(&[LIST_USER]), routes!(get_user))
        .add(Access::AllOf(&[UPDATE_USER]), routes!(update_user))
        .add(Access::AllOf(&[DELETE_USER]), routes!(delete_user))
        .add(Access::AllOf(&[LIST_USER]), routes!(user_roles))
        .add(Access::AllOf(&[UPDATE_USER]), routes!(add_user_role))
        .add(Access::AllOf(&[UPDATE_USER]), routes!(remove_user_role))
        .add(Access::AllOf(&[LIST_USER]), routes!(user_claims))
        .add(Access::AllOf(&[UPDATE_USER]), routes!(add_user_claim))
        .add(Access::AllOf(&[UPDATE_USER]), routes!(remove_user_claim))
        .add(Access::AllOf(&[LIST_ROLE]), routes!(list_roles))
        .add(Access::AllOf(&[CREATE_ROLE]), routes!(create_role))
        .add(Access::AllOf(&[LIST_ROLE]), routes!(get_role))
        .add(Access::AllOf(&[DELETE_ROLE]), routes!(delete_role))
        .add(Access::AllOf(&[LIST_ROLE]), routes!(role_claims))
        .add(Access::AllOf(&[UPDATE_ROLE]), routes!(add_role_claim))
        .add(Access::AllOf(&[UPDATE_ROLE]), routes!(remove_role_claim))
        .add(Access::AllOf(&[LIST_CLAIM]), routes!(list_claims))
        .add(Access::AllOf(&[LIST_CLAIM]), routes!(grouped_claims))
        .add(Access::AllOf(&[CREATE_CLAIM]), routes!(create_claim))
        .add(Access::AllOf(&[LIST_CLAIM]), routes!(get_claim))
        .add(Access::AllOf(&[DELETE_CLAIM]), routes!(delete_claim))
        .add(Access::AnyOf(&[LIST_API_KEY, LIST_OWN_API_KEY]), routes!(list_api_keys))
        .add(Access::AnyOf(&[CREATE_API_KEY, CREATE_OWN_API_KEY]), routes!(create_api_key))
        .add(Access::AnyOf(&[LIST_API_KEY, LIST_OWN_API_KEY]), routes!(get_api_key))
        .add(Access::AnyOf(&[DELETE_API_KEY, DELETE_OWN_API_KEY]), routes!(delete_api_key))
        .add(Access::AnyOf(&[UPDATE_API_KEY, UPDATE_OWN_API_KEY]), routes!(revoke_api_key))
}

/// Log in: `{email or username, password}` or `{api_key}`, as JSON or a form body.
#[utoipa::path(post, path = "/auth/token", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ApiErrorBody),
        (status = 429, description = "Logins to this account from this address are locked after failed logins, or this address has too many logins under way (Retry-After)", body = ApiErrorBody),
        (status = 503, description = "Every password hasher is busy (Retry-After)", body = ApiErrorBody)))]
async fn login(
    State(s): State<AppState>,
    ctx: RequestContext,
    JsonOrForm(req): JsonOrForm<LoginRequest>,
) -> R<axum::Json<TokenResponse>> {
    if let Some(k) = req.api_key.filter(|k| !k.is_empty()) {
        return Ok(axum::Json(token_response(s.identity.login_api_key(&k).await.map_err(answer)?)));
    }
    let ident = req.email.filter(|e| !e.is_empty()).or(req.username).unwrap_or_default();
    let password = req.password.unwrap_or_default();
    if ident.is_empty() || password.is_empty() {
        return Err(ApiError::bad_request("Send {\"email\" or \"username\", \"password\"} or {\"api_key\"}"));
    }
    if ident.len() > 320 || password.len() > 1024 {
        return Err(ApiError::from(hangar_identity::IdentityError::InvalidCredentials));
    }
    // The peer address of the connection, never a client header: the lockout applies to it.
    let issued = s.identity.login(&ident, &password, ctx.actor.source_ip.clone()).await.map_err(answer)?;
    Ok(axum::Json(token_response(issued)))
}

/// Check whether a token is valid now.
#[utoipa::path(post, path = "/auth/token/validate", tag = "auth", request_body = ValidateRequest, responses((status = 200, body = ValidateResponse)))]
async fn validate(State(s): State<AppState>, Json(req): Json<ValidateRequest>) -> axum::Json<ValidateResponse> {
    axum::Json(ValidateResponse { valid: s.identity.validate_token(&req.token).await })
}

/// The public keys that verify Hangar's tokens (empty for HMAC algorithms).
#[utoipa::path(get, path = "/auth/jwks", tag = "auth", responses((status = 200, description = "A JWKS document")))]
async fn jwks(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(s.identity.tokens().jwks())
}

/// The same document at `/.well-known/jwks.json`.
pub async fn jwks_document(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(s.identity.tokens().jwks())
}

/// The caller.
#[utoipa::path(get, path = "/auth/me", tag = "auth", responses((status = 200, body = User)))]
async fn me(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<User>> {
    Ok(axum::Json(s.identity.get_user(&ctx.caller()?.user_id).await?.into()))
}

/// Change the caller's own password; old tokens stop working.
#[utoipa::path(put, path = "/auth/me/password", tag = "auth", request_body = ChangePasswordRequest, responses((status = 204), (status = 401, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn change_password(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<ChangePasswordRequest>,
) -> R<StatusCode> {
    let p = ctx.caller()?;
    // Proving the current password; a lockout applies as at login.
    s.identity.login(&p.user_id, &req.current_password, ctx.actor.source_ip.clone()).await.map_err(answer)?;
    s.identity
        .update_user(p, &ctx.actor, &p.user_id, UserUpdate { password: Some(req.new_password), ..Default::default() })
        .await
        .map_err(answer)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/auth/users", tag = "users", responses((status = 200, body = Vec<User>)))]
async fn list_users(State(s): State<AppState>) -> R<axum::Json<Vec<User>>> {
    Ok(axum::Json(s.identity.list_users().await?.into_iter().map(User::from).collect()))
}

#[utoipa::path(post, path = "/auth/users", tag = "users", request_body = CreateUserRequest,
    responses((status = 201, body = User), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
async fn create_user(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateUserRequest>,
) -> R<(StatusCode, axum::Json<User>)> {
    let input = NewUser {
        username: req.username,
        name: req.name,
        email: req.email,
        password: req.password,
        roles: req.roles,
        claims: req.claims,
        is_super_user: req.is_super_user,
    };
    let u = s.identity.create_user(ctx.caller()?, &ctx.actor, input).await.map_err(answer)?;
    Ok((StatusCode::CREATED, axum::Json(u.into())))
}

#[utoipa::path(get, path = "/auth/users/{id}", tag = "users", params(("id" = String, Path, description = "User id, username or email")),
    responses((status = 200, body = User), (status = 404, body = ApiErrorBody)))]
async fn get_user(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<User>> {
    Ok(axum::Json(s.identity.get_user(&id).await?.into()))
}

/// Change a user.
///
/// The caller changes, disables or resets only users it may manage: itself, or a user whose
/// every role and claim it holds (a SUPER_USER, anyone). With `revoke_api_keys`, the user's
/// API keys are revoked in the same change and listed in `revoked_api_keys`.
#[utoipa::path(put, path = "/auth/users/{id}", tag = "users", params(("id" = String, Path)), request_body = UpdateUserRequest,
    responses((status = 200, body = UpdatedUser), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
async fn update_user(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<UpdateUserRequest>,
) -> R<axum::Json<UpdatedUser>> {
    let upd = UserUpdate {
        name: req.name,
        email: req.email,
        password: req.password,
        disabled: req.disabled,
        unlock: req.unlock,
        revoke_api_keys: req.revoke_api_keys,
    };
    let (user, revoked) = s.identity.update_user_revoking(ctx.caller()?, &ctx.actor, &id, upd).await.map_err(answer)?;
    Ok(axum::Json(UpdatedUser { user: user.into(), revoked_api_keys: revoked.into_iter().map(ApiKey::from).collect() }))
}

#[utoipa::path(delete, path = "/auth/users/{id}", tag = "users", params(("id" = String, Path)), responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_user(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    s.identity.delete_user(ctx.caller()?, &ctx.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/auth/users/{id}/roles", tag = "users", params(("id" = String, Path)), responses((status = 200, body = Vec<Role>)))]
async fn user_roles(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Vec<Role>>> {
    Ok(axum::Json(s.identity.user_roles(&id).await?.into_iter().map(Role::from).collect()))
}

#[utoipa::path(post, path = "/auth/users/{id}/roles", tag = "users", params(("id" = String, Path)), request_body = NameRequest, responses((status = 201, body = Role)))]
async fn add_user_role(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<NameRequest>,
) -> R<(StatusCode, axum::Json<Role>)> {
    let r = s.identity.add_user_role(ctx.caller()?, &ctx.actor, &id, &req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(r.into())))
}

#[utoipa::path(delete, path = "/auth/users/{id}/roles/{role_id}", tag = "users", params(("id" = String, Path), ("role_id" = String, Path, description = "Role id or name")), responses((status = 202)))]
async fn remove_user_role(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, role)): Path<(String, String)>,
) -> R<StatusCode> {
    s.identity.remove_user_role(ctx.caller()?, &ctx.actor, &id, &role).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/auth/users/{id}/claims", tag = "users", params(("id" = String, Path)), responses((status = 200, body = Vec<Claim>)))]
async fn user_claims(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Vec<Claim>>> {
    Ok(axum::Json(s.identity.user_claims(&id).await?.into_iter().map(Claim::from).collect()))
}

#[utoipa::path(post, path = "/auth/users/{id}/claims", tag = "users", params(("id" = String, Path)), request_body = NameRequest, responses((status = 201, body = Claim)))]
async fn add_user_claim(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<NameRequest>,
) -> R<(StatusCode, axum::Json<Claim>)> {
    let c = s.identity.add_user_claim(ctx.caller()?, &ctx.actor, &id, &req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(c.into())))
}

#[utoipa::path(delete, path = "/auth/users/{id}/claims/{claim_id}", tag = "users", params(("id" = String, Path), ("claim_id" = String, Path, description = "Claim id or name")), responses((status = 202)))]
async fn remove_user_claim(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, claim)): Path<(String, String)>,
) -> R<StatusCode> {
    s.identity.remove_user_claim(ctx.caller()?, &ctx.actor, &id, &claim).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/auth/roles", tag = "roles", responses((status = 200, body = Vec<Role>)))]
async fn list_roles(State(s): State<AppState>) -> R<axum::Json<Vec<Role>>> {
    Ok(axum::Json(s.identity.list_roles().await?.into_iter().map(Role::from).collect()))
}

#[utoipa::path(post, path = "/auth/roles", tag = "roles", request_body = CreateRoleRequest, responses((status = 201, body = Role), (status = 409, body = ApiErrorBody)))]
async fn create_role(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateRoleRequest>,
) -> R<(StatusCode, axum::Json<Role>)> {
    let r = s.identity.create_role(ctx.caller()?, &ctx.actor, &req.name, req.description, req.claims).await?;
    Ok((StatusCode::CREATED, axum::Json(r.into())))
}

#[utoipa::path(get, path = "/auth/roles/{id}", tag = "roles", params(("id" = String, Path)), responses((status = 200, body = Role), (status = 404, body = ApiErrorBody)))]
async fn get_role(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Role>> {
    Ok(axum::Json(s.identity.get_role(&id).await?.into()))
}

#[utoipa::path(delete, path = "/auth/roles/{id}", tag = "roles", params(("id" = String, Path)), responses((status = 202), (status = 409, body = ApiErrorBody)))]
async fn delete_role(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    s.identity.delete_role(&ctx.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/auth/roles/{id}/claims", tag = "roles", params(("id" = String, Path)), responses((status = 200, body = Vec<Claim>)))]
async fn role_claims(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Vec<Claim>>> {
    let role = s.identity.get_role(&id).await?;
    let mut out = Vec::new();
    for c in role.claims {
        if let Ok(claim) = s.identity.get_claim(&c).await {
            out.push(Claim::from(claim));
        }
    }
    Ok(axum::Json(out))
}

#[utoipa::path(post, path = "/auth/roles/{id}/claims", tag = "roles", params(("id" = String, Path)), request_body = NameRequest, responses((status = 201, body = Claim)))]
async fn add_role_claim(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    Json(req): Json<NameRequest>,
) -> R<(StatusCode, axum::Json<Claim>)> {
    let c = s.identity.add_role_claim(ctx.caller()?, &ctx.actor, &id, &req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(c.into())))
}

#[utoipa::path(delete, path = "/auth/roles/{id}/claims/{claim_id}", tag = "roles", params(("id" = String, Path), ("claim_id" = String, Path)), responses((status = 202)))]
async fn remove_role_claim(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, claim)): Path<(String, String)>,
) -> R<StatusCode> {
    s.identity.remove_role_claim(ctx.caller()?, &ctx.actor, &id, &claim).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/auth/claims", tag = "claims", responses((status = 200, body = Vec<Claim>)))]
async fn list_claims(State(s): State<AppState>) -> R<axum::Json<Vec<Claim>>> {
    Ok(axum::Json(s.identity.list_claims().await?.into_iter().map(Claim::from).collect()))
}

#[utoipa::path(get, path = "/auth/claims/grouped", tag = "claims", responses((status = 200, body = Vec<ClaimGroup>)))]
async fn grouped_claims(State(s): State<AppState>) -> R<axum::Json<Vec<ClaimGroup>>> {
    let mut groups: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for c in s.identity.list_claims().await? {
        groups.entry(c.group.clone()).or_default().push(c.into());
    }
    Ok(axum::Json(groups.into_iter().map(|(group, claims)| ClaimGroup { group, claims }).collect()))
}

#[utoipa::path(post, path = "/auth/claims", tag = "claims", request_body = NameRequest, responses((status = 201, body = Claim), (status = 409, body = ApiErrorBody)))]
async fn create_claim(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<NameRequest>,
) -> R<(StatusCode, axum::Json<Claim>)> {
    let c = s.identity.create_claim(&ctx.actor, &req.name, req.description).await?;
    Ok((StatusCode::CREATED, axum::Json(c.into())))
}

#[utoipa::path(get, path = "/auth/claims/{id}", tag = "claims", params(("id" = String, Path)), responses((status = 200, body = Claim), (status = 404, body = ApiErrorBody)))]
async fn get_claim(State(s): State<AppState>, Path(id): Path<String>) -> R<axum::Json<Claim>> {
    Ok(axum::Json(s.identity.get_claim(&id).await?.into()))
}

#[utoipa::path(delete, path = "/auth/claims/{id}", tag = "claims", params(("id" = String, Path)), responses((status = 202), (status = 409, body = ApiErrorBody)))]
async fn delete_claim(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    s.identity.delete_claim(&ctx.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Keys the caller may see: every key with LIST_API_KEY, its own otherwise.
#[utoipa::path(get, path = "/auth/api_keys", tag = "api_keys", responses((status = 200, body = Vec<ApiKey>)))]
async fn list_api_keys(State(s): State<AppState>, ctx: RequestContext) -> R<axum::Json<Vec<ApiKey>>> {
    Ok(axum::Json(s.identity.list_api_keys(ctx.caller()?).await?.into_iter().map(ApiKey::from).collect()))
}

/// Create a key owned by the caller (or, with CREATE_API_KEY, by another user). The
/// answer's `encoded` field is the only time the secret is shown.
#[utoipa::path(post, path = "/auth/api_keys", tag = "api_keys", request_body = CreateApiKeyRequest, responses((status = 201, body = CreatedApiKey), (status = 409, body = ApiErrorBody)))]
async fn create_api_key(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<CreateApiKeyRequest>,
) -> R<(StatusCode, axum::Json<CreatedApiKey>)> {
    let input = NewApiKey {
        name: req.name,
        key: req.key,
        secret: req.secret,
        expires_at: req.expires_at,
        user_id: req.user_id,
    };
    let k = s.identity.create_api_key(ctx.caller()?, &ctx.actor, input).await?;
    Ok((StatusCode::CREATED, axum::Json(CreatedApiKey { key: k.key.into(), encoded: k.encoded })))
}

#[utoipa::path(get, path = "/auth/api_keys/{id}", tag = "api_keys", params(("id" = String, Path, description = "Key id, name or public key")), responses((status = 200, body = ApiKey), (status = 404, body = ApiErrorBody)))]
async fn get_api_key(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<axum::Json<ApiKey>> {
    Ok(axum::Json(s.identity.get_api_key(ctx.caller()?, &id).await?.into()))
}

#[utoipa::path(delete, path = "/auth/api_keys/{id}", tag = "api_keys", params(("id" = String, Path)), responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_api_key(State(s): State<AppState>, ctx: RequestContext, Path(id): Path<String>) -> R<StatusCode> {
    s.identity.delete_api_key(ctx.caller()?, &ctx.actor, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(put, path = "/auth/api_keys/{id}/revoke", tag = "api_keys", params(("id" = String, Path)), responses((status = 200, body = ApiKey), (status = 404, body = ApiErrorBody)))]
async fn revoke_api_key(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> R<axum::Json<ApiKey>> {
    Ok(axum::Json(s.identity.revoke_api_key(ctx.caller()?, &ctx.actor, &id).await?.into()))
}
