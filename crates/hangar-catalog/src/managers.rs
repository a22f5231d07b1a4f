//! Catalog managers (reference §1.5): remote catalog servers a user registers with
//! their credentials, to browse them (`/catalog-managers/{id}/catalog/...`) and to create
//! VMs from them (`catalog_manifest.catalog_manager_id`).
//!
//! Access: `CATALOG_MANAGER_<OP>` acts on every manager; `CATALOG_MANAGER_<OP>_OWN` on
//! the caller's own, and (to list and use) on global managers whose `required_claims`
//! the caller holds. Only `CATALOG_MANAGER_CREATE` may create a global or internal one.
//! The password and API key are sealed with the catalog key (AES-256-GCM, bound to the
//! manager's id) and never answered: answers show `********` where one is set.

use chrono::{DateTime, Utc};
use hangar_core::Principal;
use hangar_core::audit::Actor;
use hangar_core::claims::{
    CATALOG_MANAGER_CREATE, CATALOG_MANAGER_DELETE, CATALOG_MANAGER_DELETE_OWN, CATALOG_MANAGER_LIST,
    CATALOG_MANAGER_UPDATE, CATALOG_MANAGER_UPDATE_OWN,
};
use hangar_store::Batch;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::instrument;

use crate::connection::{CatalogConnection, RemoteCredentials};
use crate::service::{from_value, to_value};
use crate::{Catalog, CatalogError, Result};

/// The store collection.
pub const MANAGERS: &str = "catalog_managers";
/// What answers show for a credential that is set.
pub const MASK: &str = "********";

/// A stored catalog manager (credentials sealed).
#[derive(Clone, Serialize, Deserialize)]
pub struct CatalogManagerRecord {
    pub id: String,
    pub name: String,
    /// `scheme://host[:port]`.
    pub url: String,
    pub internal: bool,
    pub active: bool,
    /// `password` or `api_key`.
    pub authentication_method: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password_sealed: Option<String>,
    #[serde(default)]
    pub api_key_sealed: Option<String>,
    pub global: bool,
    #[serde(default)]
    pub required_claims: Vec<String>,
    pub owner_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A catalog manager as answered: credentials masked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogManagerView {
    pub id: String,
    pub name: String,
    pub url: String,
    pub internal: bool,
    pub active: bool,
    pub authentication_method: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub api_key: Option<String>,
    pub global: bool,
    pub required_claims: Vec<String>,
    pub owner_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&CatalogManagerRecord> for CatalogManagerView {
    fn from(r: &CatalogManagerRecord) -> Self {
        let mask = |set: bool| set.then(|| MASK.to_string());
        CatalogManagerView {
            id: r.id.clone(),
            name: r.name.clone(),
            url: r.url.clone(),
            internal: r.internal,
            active: r.active,
            authentication_method: r.authentication_method.clone(),
            username: mask(!r.username.is_empty()),
            password: mask(r.password_sealed.is_some()),
            api_key: mask(r.api_key_sealed.is_some()),
            global: r.global,
            required_claims: r.required_claims.clone(),
            owner_id: r.owner_id.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A create or update. On update, absent fields keep their value; a credential sent as
/// empty or as the mask keeps the stored one.
#[derive(Clone, Default)]
pub struct CatalogManagerInput {
    pub name: Option<String>,
    pub url: Option<String>,
    pub internal: Option<bool>,
    pub active: Option<bool>,
    pub authentication_method: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub api_key: Option<String>,
    pub global: Option<bool>,
    pub required_claims: Option<Vec<String>>,
}

impl std::fmt::Debug for CatalogManagerInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogManagerInput").field("name", &self.name).field("url", &self.url).finish_non_exhaustive()
    }
}

/// `scheme://host[:port]` from what the user typed (no credentials, path or query).
fn normalise_url(url: &str) -> Result<String> {
    let bad = |why: &str| CatalogError::Invalid(format!("url {url:?} is not a catalog server address: {why}"));
    let u = url.trim().trim_end_matches('/');
    let (scheme, rest) = match u.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("https".to_string(), u),
    };
    if scheme != "http" && scheme != "https" {
        return Err(bad("the scheme must be http or https"));
    }
    let rest = rest.strip_suffix("/api").unwrap_or(rest);
    if rest.is_empty() || rest.contains('@') {
        return Err(bad("give the host (and port), without credentials"));
    }
    if !rest.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c)) {
        return Err(bad("only a host and port are allowed"));
    }
    Ok(format!("{scheme}://{rest}"))
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty() && *v != MASK)
}

impl Catalog {
    fn manager_aad(id: &str, what: &str) -> String {
        format!("catalog-manager:{id}:{what}")
    }

    fn manager_audit(batch: Batch, actor: &Actor, action: &str, m: &CatalogManagerRecord) -> Result<Batch> {
        let entry = hangar_core::audit::AuditEntry::new(
            actor,
            action,
            "catalog_manager",
            &m.id,
            json!({"name": m.name, "url": m.url, "global": m.global, "owner_id": m.owner_id}),
        );
        Ok(batch.put(hangar_core::audit::AUDIT_COLLECTION, &entry.id, to_value(&entry)?))
    }

    /// May `p` see and use `m`? (`CATALOG_MANAGER_LIST`, its owner, or a global manager
    /// whose required claims `p` holds.)
    fn manager_visible(p: &Principal, m: &CatalogManagerRecord) -> bool {
        p.has_claim(CATALOG_MANAGER_LIST)
            || m.owner_id == p.user_id
            || (m.global && m.required_claims.iter().all(|c| p.has_claim(c)))
    }

    async fn manager_record(&self, p: &Principal, id: &str) -> Result<CatalogManagerRecord> {
        let not_found = || CatalogError::NotFound(format!("catalog manager {id} not found"));
        let rec = self.store().get(MANAGERS, id).await?.ok_or_else(not_found)?;
        let m: CatalogManagerRecord = from_value(rec.value, "catalog manager")?;
        if !Self::manager_visible(p, &m) {
            return Err(not_found());
        }
        Ok(m)
    }

    /// The managers `p` may see.
    pub async fn managers_list(&self, p: &Principal) -> Result<Vec<CatalogManagerView>> {
        let mut out = Vec::new();
        for r in self.store().list(MANAGERS).await? {
            let m: CatalogManagerRecord = from_value(r.value, "catalog manager")?;
            if Self::manager_visible(p, &m) {
                out.push(CatalogManagerView::from(&m));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One manager `p` may see.
    pub async fn manager_get(&self, p: &Principal, id: &str) -> Result<CatalogManagerView> {
        Ok(CatalogManagerView::from(&self.manager_record(p, id).await?))
    }

    /// Applies `input` to `m` (a new record when `m.created_at == m.updated_at`), sealing
    /// credentials, and checks the result is usable.
    fn manager_apply(&self, m: &mut CatalogManagerRecord, input: &CatalogManagerInput) -> Result<()> {
        if let Some(n) = input.name.as_deref().map(str::trim) {
            if n.is_empty() || n.len() > 128 {
                return Err(CatalogError::Invalid("name must be 1 to 128 characters".into()));
            }
            m.name = n.to_string();
        }
        if let Some(u) = &input.url {
            m.url = normalise_url(u)?;
        }
        for (set, v) in
            [(&mut m.internal, input.internal), (&mut m.active, input.active), (&mut m.global, input.global)]
        {
            if let Some(v) = v {
                *set = v;
            }
        }
        if let Some(c) = &input.required_claims {
            m.required_claims =
                crate::model::normalise_names("required_claims", c, true).map_err(CatalogError::Invalid)?;
        }
        if let Some(u) = input.username.as_deref().map(str::trim).filter(|u| *u != MASK) {
            m.username = u.to_string();
        }
        if let Some(pw) = given(&input.password) {
            m.password_sealed = Some(self.sealer().seal(&Self::manager_aad(&m.id, "password"), pw)?);
        }
        if let Some(k) = given(&input.api_key) {
            m.api_key_sealed = Some(self.sealer().seal(&Self::manager_aad(&m.id, "api_key"), k)?);
        }
        let method = match input.authentication_method.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
            Some(s) if !s.is_empty() => s,
            _ if input.api_key.as_deref().is_some_and(|k| !k.trim().is_empty()) => "api_key".into(),
            _ if input.password.as_deref().is_some_and(|k| !k.trim().is_empty()) => "password".into(),
            _ => m.authentication_method.clone(),
        };
        m.authentication_method = match method.as_str() {
            "api_key" | "apikey" | "api-key" => "api_key".into(),
            "password" | "credentials" | "basic" | "" => "password".into(),
            other => {
                return Err(CatalogError::Invalid(format!(
                    "authentication_method {other:?} is not password or api_key"
                )));
            }
        };
        match m.authentication_method.as_str() {
            "api_key" if m.api_key_sealed.is_none() => {
                Err(CatalogError::Invalid("authentication_method api_key needs api_key".into()))
            }
            "password" if m.username.is_empty() || m.password_sealed.is_none() => Err(CatalogError::Invalid(
                "missing authentication credentials: give username and password, or api_key".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Registers a manager owned by `p`.
    #[instrument(skip(self, p, actor, input), fields(user = %p.username))]
    pub async fn manager_create(
        &self,
        p: &Principal,
        actor: &Actor,
        input: &CatalogManagerInput,
    ) -> Result<CatalogManagerView> {
        if (input.global == Some(true) || input.internal == Some(true)) && !p.has_claim(CATALOG_MANAGER_CREATE) {
            return Err(CatalogError::Forbidden(
                "only CATALOG_MANAGER_CREATE may create a global or internal catalog manager".into(),
            ));
        }
        if input.name.as_deref().is_none_or(|n| n.trim().is_empty()) {
            return Err(CatalogError::Invalid("name is required".into()));
        }
        if input.url.as_deref().is_none_or(|n| n.trim().is_empty()) {
            return Err(CatalogError::Invalid("url is required".into()));
        }
        let now = Utc::now();
        let mut m = CatalogManagerRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: String::new(),
            url: String::new(),
            internal: false,
            active: true,
            authentication_method: String::new(),
            username: String::new(),
            password_sealed: None,
            api_key_sealed: None,
            global: false,
            required_claims: Vec::new(),
            owner_id: p.user_id.clone(),
            created_at: now,
            updated_at: now,
        };
        self.manager_apply(&mut m, input)?;
        let batch = Batch::new().put(MANAGERS, &m.id, to_value(&m)?);
        let batch = Self::manager_audit(batch, actor, "catalog_manager.create", &m)?;
        self.store().commit(batch).await?;
        Ok(CatalogManagerView::from(&m))
    }

    /// Changes a manager: its owner (with `CATALOG_MANAGER_UPDATE_OWN`) or
    /// `CATALOG_MANAGER_UPDATE`.
    #[instrument(skip(self, p, actor, input), fields(user = %p.username))]
    pub async fn manager_update(
        &self,
        p: &Principal,
        actor: &Actor,
        id: &str,
        input: &CatalogManagerInput,
    ) -> Result<CatalogManagerView> {
        let mut m = self.manager_record(p, id).await?;
        let own = m.owner_id == p.user_id && p.has_claim(CATALOG_MANAGER_UPDATE_OWN);
        if !own && !p.has_claim(CATALOG_MANAGER_UPDATE) {
            return Err(CatalogError::Forbidden(format!("you may not change catalog manager {id}")));
        }
        let widen = (input.global == Some(true) && !m.global) || (input.internal == Some(true) && !m.internal);
        if widen && !p.has_claim(CATALOG_MANAGER_CREATE) {
            return Err(CatalogError::Forbidden(
                "only CATALOG_MANAGER_CREATE may make a catalog manager global or internal".into(),
            ));
        }
        self.manager_apply(&mut m, input)?;
        m.updated_at = Utc::now();
        let batch = Batch::new().put(MANAGERS, &m.id, to_value(&m)?);
        let batch = Self::manager_audit(batch, actor, "catalog_manager.update", &m)?;
        self.store().commit(batch).await?;
        Ok(CatalogManagerView::from(&m))
    }

    /// Removes a manager: its owner (with `CATALOG_MANAGER_DELETE_OWN`) or
    /// `CATALOG_MANAGER_DELETE`.
    #[instrument(skip(self, p, actor), fields(user = %p.username))]
    pub async fn manager_delete(&self, p: &Principal, actor: &Actor, id: &str) -> Result<()> {
        let m = self.manager_record(p, id).await?;
        let own = m.owner_id == p.user_id && p.has_claim(CATALOG_MANAGER_DELETE_OWN);
        if !own && !p.has_claim(CATALOG_MANAGER_DELETE) {
            return Err(CatalogError::Forbidden(format!("you may not delete catalog manager {id}")));
        }
        let batch = Batch::new().delete(MANAGERS, &m.id);
        let batch = Self::manager_audit(batch, actor, "catalog_manager.delete", &m)?;
        self.store().commit(batch).await?;
        Ok(())
    }

    /// The connection of a manager `p` may use (visible and active), credentials opened.
    pub async fn manager_connection(&self, p: &Principal, id: &str) -> Result<CatalogConnection> {
        let m = self.manager_record(p, id).await?;
        if !m.active {
            return Err(CatalogError::Unprocessable(format!("catalog manager {} is disabled", m.name)));
        }
        let credentials = if m.authentication_method == "api_key" {
            let sealed = m.api_key_sealed.as_deref().unwrap_or_default();
            RemoteCredentials::ApiKey(self.sealer().open(&Self::manager_aad(&m.id, "api_key"), sealed)?)
        } else {
            let sealed = m.password_sealed.as_deref().unwrap_or_default();
            let password = self.sealer().open(&Self::manager_aad(&m.id, "password"), sealed)?;
            RemoteCredentials::Password { username: m.username.clone(), password }
        };
        Ok(CatalogConnection { origin: m.url, credentials })
    }

    /// `GET {manager}/api/v1{path}` with the manager's credentials (never the caller's
    /// identity), for `p` who may use the manager. The remote server decides what its
    /// user sees; its error statuses come back naming the server.
    pub async fn manager_get_json(&self, p: &Principal, id: &str, path: &str) -> Result<Value> {
        let conn = self.manager_connection(p, id).await?;
        let http = Self::remote_http()?;
        let auth = Self::remote_auth(&http, &conn).await?;
        let url = format!("{}{path}", conn.api_base());
        crate::connection::get_json(&http, &auth, &conn, &url, "the catalog").await
    }

    /// Forwards `method {manager}/api/v1{path}` (with `body` as JSON) to the remote catalog
    /// with the manager's credentials only (never the caller's identity), for `p` who may
    /// use the manager and holds one of `op`'s claims. A change (`op` other than `List`/
    /// `Pull` reads) is audited here, naming the manager, the method and the path, before
    /// the call. The remote server decides whether the manager's user may; its success
    /// status is relayed, its errors come back naming the manager and the server (a
    /// refusal of the manager's credentials is a 422, an unreachable server a 503).
    #[instrument(skip(self, p, actor, call), fields(user = %p.username, path = call.path))]
    pub async fn manager_forward(
        &self,
        p: &Principal,
        actor: &Actor,
        id: &str,
        call: RemoteCall<'_>,
    ) -> Result<Forwarded> {
        let RemoteCall { op, method, path, body } = call;
        let m = self.manager_record(p, id).await?;
        // The `_OWN` claims (every USER has them) reach a manager the caller owns; through
        // anyone else's (a global one an admin made, with its credentials) they only read and
        // pull, and a change needs the full claim.
        let owns = m.owner_id == p.user_id;
        let reads = matches!(op, ManagerOp::List | ManagerOp::Pull);
        if !op.claims().iter().any(|c| p.has_claim(c) && (owns || reads || !c.ends_with("_OWN"))) {
            return Err(CatalogError::Forbidden(format!(
                "catalog manager {id}: this needs one of the claims {}{}",
                op.claims().join(", "),
                if owns || reads { "" } else { " (an _OWN claim only on a manager you own)" }
            )));
        }
        let conn = self.manager_connection(p, id).await?;
        let named = |e: CatalogError| name_error(&m.name, e);
        if method != RemoteMethod::Get {
            let entry = hangar_core::audit::AuditEntry::new(
                actor,
                &format!("catalog_manager.remote.{}", op.as_str()),
                "catalog_manager",
                &m.id,
                json!({"url": m.url, "method": method.as_str(), "path": path}),
            );
            let batch = Batch::new().put(hangar_core::audit::AUDIT_COLLECTION, &entry.id, to_value(&entry)?);
            self.store().commit(batch).await?;
        }
        let http = Self::remote_http()?;
        let auth = Self::remote_auth(&http, &conn).await.map_err(named)?;
        let url = format!("{}{path}", conn.api_base());
        let req = match method {
            RemoteMethod::Get => http.get(&url),
            RemoteMethod::Post => http.post(&url),
            RemoteMethod::Put => http.put(&url),
            RemoteMethod::Patch => http.patch(&url),
            RemoteMethod::Delete => http.delete(&url),
        };
        let req = match &body {
            Some(b) => req.json(b),
            None => req,
        };
        let resp = auth.apply(req).send().await.map_err(|e| {
            named(CatalogError::Provider(format!("catalog server {} is unreachable: {}", conn.origin, e.without_url())))
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            let what = format!("{} {path}", method.as_str());
            return Err(named(crate::connection::remote_error(&conn.origin, &what, status, &text)));
        }
        let body = if text.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&text).map_err(|e| {
                named(CatalogError::Provider(format!("catalog server {} did not answer JSON: {e}", conn.origin)))
            })?)
        };
        Ok(Forwarded { status, body })
    }

    /// The connection of a manager `p` may use for `op` (claim, visibility, active):
    /// for pulling from it onto this host.
    pub async fn manager_connection_for(&self, p: &Principal, id: &str, op: ManagerOp) -> Result<CatalogConnection> {
        if !op.claims().iter().any(|c| p.has_claim(c)) {
            return Err(CatalogError::Forbidden(format!(
                "catalog manager {id}: this needs one of the claims {}",
                op.claims().join(", ")
            )));
        }
        self.manager_connection(p, id).await
    }
}

/// Prefixes a remote error with the manager's name, keeping its kind (and so its status).
fn name_error(name: &str, e: CatalogError) -> CatalogError {
    let pre = |m: String| format!("catalog manager {name:?}: {m}");
    match e {
        CatalogError::Invalid(m) => CatalogError::Invalid(pre(m)),
        CatalogError::Unprocessable(m) => CatalogError::Unprocessable(pre(m)),
        CatalogError::NotFound(m) => CatalogError::NotFound(pre(m)),
        CatalogError::Conflict(m) => CatalogError::Conflict(pre(m)),
        CatalogError::Forbidden(m) => CatalogError::Forbidden(pre(m)),
        CatalogError::Provider(m) => CatalogError::Provider(pre(m)),
        other => other,
    }
}

/// What a call through a catalog manager does on the remote catalog; each takes the
/// reference's full claim or its `CATALOG_MANAGER_*_CATALOG_MANIFEST_OWN` claim here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerOp {
    List,
    Create,
    Delete,
    Update,
    Pull,
    Push,
    Import,
}

impl ManagerOp {
    /// Any one of these lets a caller do `self` through a manager it may use.
    pub const fn claims(self) -> &'static [&'static str] {
        use hangar_core::claims::*;
        match self {
            ManagerOp::List => &[LIST_CATALOG_MANIFEST, CATALOG_MANAGER_LIST_CATALOG_MANIFEST_OWN],
            ManagerOp::Create => &[CREATE_CATALOG_MANIFEST, CATALOG_MANAGER_CREATE_CATALOG_MANIFEST_OWN],
            ManagerOp::Delete => &[DELETE_CATALOG_MANIFEST, CATALOG_MANAGER_DELETE_CATALOG_MANIFEST_OWN],
            ManagerOp::Update => &[UPDATE_CATALOG_MANIFEST, CATALOG_MANAGER_UPDATE_CATALOG_MANIFEST_OWN],
            ManagerOp::Pull => &[PULL_CATALOG_MANIFEST, CATALOG_MANAGER_PULL_CATALOG_MANIFEST_OWN],
            ManagerOp::Push => &[PUSH_CATALOG_MANIFEST, CATALOG_MANAGER_PUSH_CATALOG_MANIFEST_OWN],
            ManagerOp::Import => {
                &[IMPORT_CATALOG_MANIFEST, PUSH_CATALOG_MANIFEST, CATALOG_MANAGER_IMPORT_CATALOG_MANIFEST_OWN]
            }
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            ManagerOp::List => "list",
            ManagerOp::Create => "create",
            ManagerOp::Delete => "delete",
            ManagerOp::Update => "update",
            ManagerOp::Pull => "pull",
            ManagerOp::Push => "push",
            ManagerOp::Import => "import",
        }
    }
}

/// The HTTP method of a forwarded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl RemoteMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            RemoteMethod::Get => "GET",
            RemoteMethod::Post => "POST",
            RemoteMethod::Put => "PUT",
            RemoteMethod::Patch => "PATCH",
            RemoteMethod::Delete => "DELETE",
        }
    }
}

/// One call through a manager: what it does here (its claims), and what is sent.
#[derive(Debug, Clone)]
pub struct RemoteCall<'a> {
    pub op: ManagerOp,
    pub method: RemoteMethod,
    /// Below the remote's `/api/v1`, with any query.
    pub path: &'a str,
    pub body: Option<Value>,
}

/// A remote catalog's success answer: its status and JSON body (none when empty).
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub status: u16,
    pub body: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_and_credentials_refused() {
        assert_eq!(normalise_url("http://h:8080/").unwrap(), "http://h:8080");
        assert_eq!(normalise_url("h.example.com").unwrap(), "https://h.example.com");
        assert_eq!(normalise_url("https://h/api").unwrap(), "https://h");
        for bad in ["ftp://h", "http://u:p@h", "http://h/x", ""] {
            assert!(normalise_url(bad).is_err(), "{bad}");
        }
    }
}
