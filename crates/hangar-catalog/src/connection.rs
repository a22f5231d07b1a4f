//! Pulling an image from another catalog server: the reference's catalog API
//! connection (`host=[scheme://]user:password@host[:port]` or
//! `host=<api_key>@host[:port]`, reference §5.2) and the host-cache pull through
//! that server's API ([`RemoteImageStore`] + [`hangar_image::pull`]).
//!
//! The connection's credentials are used for the remote login only: they are
//! never logged (masked `Debug`), stored, or put in an audit entry, which names
//! the server's address alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hangar_core::Principal;
use hangar_core::audit::Actor;
use hangar_image::PullOptions;
use hangar_store::Batch;
use serde_json::{Value, json};
use tracing::instrument;

use crate::arch::Architecture;
use crate::model::{CACHE_ITEMS, CacheItem};
use crate::remote::{Bytes, RemoteAuth, RemoteImageStore};
use crate::service::{from_value, remove_dir, to_value};
use crate::{Catalog, CatalogError, Result};

/// How to log in to a remote catalog server.
#[derive(Clone, PartialEq, Eq)]
pub enum RemoteCredentials {
    /// Username (or email) and password: `POST /auth/token`, then a bearer token.
    Password { username: String, password: String },
    /// `X-Api-Key` on every request.
    ApiKey(String),
}

impl std::fmt::Debug for RemoteCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteCredentials::Password { .. } => "Password(****)",
            RemoteCredentials::ApiKey(_) => "ApiKey(****)",
        })
    }
}

/// A parsed catalog API connection.
#[derive(Clone, PartialEq, Eq)]
pub struct CatalogConnection {
    /// `scheme://host[:port]`, without a path.
    pub origin: String,
    pub credentials: RemoteCredentials,
}

impl std::fmt::Debug for CatalogConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogConnection").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl CatalogConnection {
    /// Parses `host=[scheme://]user:password@host[:port]` or `host=<api_key>@host[:port]`
    /// (`host=` may be left out; other `;`-separated `key=value` parts are ignored).
    /// Without a scheme, `https` is assumed. Errors never repeat the credentials.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            CatalogError::Invalid(format!(
                "catalog_manifest.connection is not a catalog connection (host=[scheme://]user:password@host:port or host=api_key@host): {why}"
            ))
        };
        let text = text.trim();
        let value = text
            .split(';')
            .map(str::trim)
            .find_map(|part| match part.split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("host") => Some(v.trim()),
                _ => None,
            })
            .unwrap_or(text);
        let (scheme, rest) = match value.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => ("https".to_string(), value),
        };
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let (userinfo, host) = rest.rsplit_once('@').ok_or_else(|| bad("no credentials before '@'"))?;
        let host = host.trim_end_matches('/');
        let host_ok = !host.is_empty()
            && host.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
            && !host.starts_with(':');
        if !host_ok {
            return Err(bad("the host is missing or malformed"));
        }
        let credentials = match userinfo.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() => {
                RemoteCredentials::Password { username: u.to_string(), password: p.to_string() }
            }
            Some(_) => return Err(bad("the user name or password is empty")),
            None if !userinfo.is_empty() => RemoteCredentials::ApiKey(userinfo.to_string()),
            None => return Err(bad("the credentials are empty")),
        };
        Ok(CatalogConnection { origin: format!("{scheme}://{host}"), credentials })
    }

    /// The server's API root.
    pub fn api_base(&self) -> String {
        format!("{}/api/v1", self.origin)
    }
}

/// Reads the `message` of a JSON error body, else the text.
fn message_of(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
        .unwrap_or_else(|| text.chars().take(300).collect())
}

/// Maps a remote answer's status to ours, naming the server. A refusal (401, 403) is of
/// the connection's credentials, not of our caller: 422, which an orchestrator relays as is.
pub(crate) fn remote_error(origin: &str, what: &str, status: u16, text: &str) -> CatalogError {
    let msg = format!("catalog server {origin}: {what} answered HTTP {status}: {}", message_of(text));
    match status {
        401 | 403 => CatalogError::Unprocessable(msg),
        404 => CatalogError::NotFound(msg),
        400 | 422 => CatalogError::Unprocessable(msg),
        409 => CatalogError::Conflict(msg),
        _ => CatalogError::Provider(msg),
    }
}

/// `GET url` with `auth`, as JSON; errors name the server, never the credentials.
pub(crate) async fn get_json(
    http: &reqwest::Client,
    auth: &RemoteAuth,
    conn: &CatalogConnection,
    url: &str,
    what: &str,
) -> Result<Value> {
    let resp = auth.apply(http.get(url)).send().await.map_err(|e| {
        CatalogError::Provider(format!("catalog server {} is unreachable: {}", conn.origin, e.without_url()))
    })?;
    json_answer(resp, conn, what).await
}

/// A remote answer as JSON; error statuses mapped by [`remote_error`].
pub(crate) async fn json_answer(resp: reqwest::Response, conn: &CatalogConnection, what: &str) -> Result<Value> {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    if !(200..300).contains(&status) {
        return Err(remote_error(&conn.origin, what, status, &text));
    }
    serde_json::from_str(&text)
        .map_err(|e| CatalogError::Provider(format!("catalog server {}: {what} did not answer JSON: {e}", conn.origin)))
}

impl Catalog {
    pub(crate) fn remote_http() -> Result<reqwest::Client> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| CatalogError::Internal(format!("http client: {e}")))
    }

    /// Logs in to the remote server; the answer is how to authenticate further requests.
    pub(crate) async fn remote_auth(http: &reqwest::Client, c: &CatalogConnection) -> Result<RemoteAuth> {
        match &c.credentials {
            RemoteCredentials::ApiKey(k) => Ok(RemoteAuth::ApiKey(k.clone())),
            RemoteCredentials::Password { username, password } => {
                let url = format!("{}/auth/token", c.api_base());
                let body = if username.contains('@') {
                    json!({"email": username, "password": password})
                } else {
                    json!({"username": username, "password": password})
                };
                let resp = http.post(&url).json(&body).send().await.map_err(|e| {
                    CatalogError::Provider(format!("catalog server {} is unreachable: {}", c.origin, e.without_url()))
                })?;
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                if !(200..300).contains(&status) {
                    return Err(remote_error(&c.origin, "the login", status, &text));
                }
                let token = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(String::from))
                    .ok_or_else(|| {
                        CatalogError::Provider(format!("catalog server {}: the login answer has no token", c.origin))
                    })?;
                Ok(RemoteAuth::Bearer(token))
            }
        }
    }

    /// For the host module: pulls `(catalog_id, version, arch)` from the catalog server
    /// `conn` names, with its credentials (the remote server decides access), into this
    /// host's cache (pulling only missing chunks), and returns the image folder. The
    /// folder is shared: copy or clone it, do not modify it. The audit entry names the
    /// server, never the credentials.
    #[instrument(skip(self, p, actor, conn), fields(user = %p.username, server = %conn.origin))]
    pub async fn pull_remote_to_host(
        &self,
        p: &Principal,
        actor: &Actor,
        conn: &CatalogConnection,
        catalog_id: &str,
        version: &str,
        arch: Architecture,
    ) -> Result<PathBuf> {
        let http = Self::remote_http()?;
        let auth = Self::remote_auth(&http, conn).await?;
        // The download route answers the pull ticket (the same on Hangar before and after
        // `/catalog/pull` took the reference's meaning).
        let url = format!(
            "{}/catalog/{}/{}/{}/download",
            conn.api_base(),
            crate::remote::segment(catalog_id),
            crate::remote::segment(version),
            arch.as_str()
        );
        let what = format!("the pull of {catalog_id} {version} ({arch})");
        let ticket = get_json(&http, &auth, conn, &url, &what).await?;
        let field = |v: &Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let m = ticket.get("manifest").cloned().unwrap_or(Value::Null);
        let incomplete =
            || CatalogError::Provider(format!("catalog server {}: the pull answer is incomplete", conn.origin));
        let real_id = field(&m, "catalog_id").unwrap_or_else(|| catalog_id.to_string());
        let resolved = field(&m, "version").ok_or_else(incomplete)?;
        let manifest_key = field(&ticket, "manifest_key").ok_or_else(incomplete)?;
        let image = ticket.get("image_manifest").filter(|v| v.is_object()).ok_or_else(incomplete)?;
        let image = serde_json::to_vec(image).map_err(|e| CatalogError::Internal(e.to_string()))?;
        let image_hash = field(&m, "image_hash").unwrap_or_else(|| manifest_key.clone());
        let size = m.get("size").and_then(Value::as_u64).unwrap_or(0);

        // The cache entry is per server, so two servers' images of one id do not mix.
        let server_key: String =
            conn.origin.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        let id = format!("remote:{}:{}:{}:{}", conn.origin, real_id.to_ascii_lowercase(), resolved, arch.as_str());
        let lock = self.host_lock(&id);
        let _held = lock.lock().await;
        let now = Utc::now();
        let store = self.store();
        let detail =
            json!({"server": conn.origin, "catalog_id": real_id, "version": resolved, "architecture": arch.as_str()});
        if let Some(rec) = store.get(CACHE_ITEMS, &id).await? {
            let mut item: CacheItem = from_value(rec.value, "cache item")?;
            if item.image_hash == image_hash && Path::new(&item.path).is_dir() {
                item.last_used_at = now;
                item.used_count += 1;
                let batch = Batch::new().put(CACHE_ITEMS, &id, to_value(&item)?);
                let batch = Self::audit(batch, actor, "catalog.cache.use", &id, detail)?;
                store.commit(batch).await?;
                return Ok(PathBuf::from(item.path));
            }
        }
        let folder = self
            .cache_dir()
            .join("remote")
            .join(server_key)
            .join(crate::remote::segment(&real_id.to_ascii_lowercase()))
            .join(crate::remote::segment(&resolved))
            .join(arch.as_str());
        let hash_dir: String = image_hash.chars().filter(char::is_ascii_alphanumeric).take(16).collect();
        let dest = folder.join(if hash_dir.is_empty() { "image".to_string() } else { hash_dir });
        if dest.exists() {
            remove_dir(&dest).await?;
        }
        std::fs::create_dir_all(&folder)
            .map_err(|e| CatalogError::Internal(format!("cannot create {}: {e}", folder.display())))?;
        let remote: Arc<dyn hangar_blobstore::BlobStore> = Arc::new(RemoteImageStore::new(
            http,
            &conn.api_base(),
            auth,
            (&real_id, &resolved, arch.as_str()),
            &manifest_key,
            Bytes::from(image),
        ));
        let opts = PullOptions { concurrency: 8, cache: Some(self.chunk_cache().await?), progress: None };
        hangar_image::pull(remote, &manifest_key, &dest, &opts).await.map_err(|e| match CatalogError::from(e) {
            CatalogError::Forbidden(m) | CatalogError::Provider(m) => {
                CatalogError::Provider(format!("catalog server {}: {m}", conn.origin))
            }
            other => other,
        })?;
        if let Ok(rd) = std::fs::read_dir(&folder) {
            for e in rd.flatten() {
                if e.path() != dest {
                    let _ = remove_dir(&e.path()).await;
                }
            }
        }
        let item = CacheItem {
            id: id.clone(),
            catalog_id: real_id,
            version: resolved,
            architecture: arch,
            image_hash,
            path: dest.display().to_string(),
            size,
            cached_at: now,
            last_used_at: now,
            used_count: 1,
        };
        let batch = Batch::new().put(CACHE_ITEMS, &id, to_value(&item)?);
        let batch = Self::audit(batch, actor, "catalog.cache.add", &id, detail)?;
        store.commit(batch).await?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_reference_forms() {
        let c = CatalogConnection::parse("host=http://user:p@ss@127.0.0.1:8080").unwrap();
        assert_eq!(c.origin, "http://127.0.0.1:8080");
        assert_eq!(c.credentials, RemoteCredentials::Password { username: "user".into(), password: "p@ss".into() });
        let c = CatalogConnection::parse("host=KEY123@catalog.example.com").unwrap();
        assert_eq!(c.origin, "https://catalog.example.com");
        assert_eq!(c.credentials, RemoteCredentials::ApiKey("KEY123".into()));
        let c = CatalogConnection::parse("https://a:b@h:1/").unwrap();
        assert_eq!(c.origin, "https://h:1");
        for bad in ["host=nohost", "host=ftp://a:b@h", "host=a:b@", "host=:b@h", "host=a:b@h/x y"] {
            let e = CatalogConnection::parse(bad).unwrap_err().to_string();
            assert!(!e.contains(":b@"), "{e}");
        }
        let dbg = format!("{:?}", CatalogConnection::parse("host=http://user:secret@h:1").unwrap());
        assert!(!dbg.contains("secret"), "{dbg}");
    }
}
