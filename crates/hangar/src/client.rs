//! The CLI's HTTP client and its credentials file.
//!
//! `hangar login` stores `{url, token, expires_at, username}` in
//! `$HANGAR_CONFIG_DIR/credentials.json` (default `$XDG_CONFIG_HOME/hangar` or
//! `~/.config/hangar`), created with mode 0600. `HANGAR_URL`, `HANGAR_TOKEN` and
//! `HANGAR_API_KEY` override it for scripts.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub token: String,
    pub expires_at: i64,
    pub username: String,
}

pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HANGAR_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(x).join("hangar");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".config/hangar"),
        None => PathBuf::from(".hangar"),
    }
}

pub fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

pub fn save_credentials(c: &Credentials) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = credentials_path();
    let dir = config_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(c)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

pub fn load_credentials() -> Option<Credentials> {
    let text = std::fs::read_to_string(credentials_path()).ok()?;
    serde_json::from_str(&text).ok()
}

/// An authenticated connection to a Hangar server.
pub struct Client {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, String)>,
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().user_agent(concat!("hangar-cli/", env!("CARGO_PKG_VERSION"))).build()?)
}

/// `http://host:port` -> `http://host:port/api/v1`.
pub fn api_base(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/api/v1") {
        u.to_string()
    } else if u.ends_with("/api") {
        format!("{u}/v1")
    } else {
        format!("{u}/api/v1")
    }
}

impl Client {
    /// From flags, environment, then the credentials file.
    pub fn connect(url_flag: Option<&str>) -> Result<Client> {
        let saved = load_credentials();
        let url = url_flag
            .map(String::from)
            .or_else(|| std::env::var("HANGAR_URL").ok())
            .or_else(|| saved.as_ref().map(|c| c.url.clone()))
            .ok_or_else(|| {
                anyhow!("no server: run `hangar login --url URL --username USER` first, or set HANGAR_URL")
            })?;
        let auth = if let Ok(k) = std::env::var("HANGAR_API_KEY") {
            Some(("x-api-key".to_string(), k))
        } else if let Ok(t) = std::env::var("HANGAR_TOKEN") {
            Some(("authorization".to_string(), format!("Bearer {t}")))
        } else if let Some(c) = saved.filter(|c| api_base(&c.url) == api_base(&url)) {
            if c.expires_at <= chrono::Utc::now().timestamp() {
                bail!(
                    "the saved login for {} expired; run `hangar login --url {} --username {}` again",
                    c.url,
                    c.url,
                    c.username
                );
            }
            Some(("authorization".to_string(), format!("Bearer {}", c.token)))
        } else {
            None
        };
        Ok(Client { http: http()?, base: api_base(&url), auth })
    }

    /// The API base URL (`http://host:port/api/v1`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The credential header (name, value) this client sends, if any (for websockets).
    pub fn auth_header(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(h, v)| (h.as_str(), v.as_str()))
    }

    pub fn anonymous(url: &str) -> Result<Client> {
        Ok(Client { http: http()?, base: api_base(url), auth: None })
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        self.call_with_headers(method, path, body, &[]).await
    }

    /// Upload raw bytes with PUT.
    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<Value> {
        self.send(reqwest::Method::PUT, path, None, Some(bytes), &[]).await
    }

    pub async fn call_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value> {
        self.send(method, path, body, None, headers).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        raw: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(r) = raw {
            req = req.header("content-type", "application/octet-stream").body(r);
        }
        if let Some((h, v)) = &self.auth {
            req = req.header(h.as_str(), v.as_str());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let msg =
                value.get("message").and_then(Value::as_str).map(String::from).unwrap_or_else(|| value.to_string());
            let hint = match status.as_u16() {
                401 => " (log in again with `hangar login`)",
                403 => " (your user lacks the permission; ask an administrator)",
                _ => "",
            };
            bail!("{method} {path} failed with {status}: {msg}{hint}");
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(reqwest::Method::PUT, path, body).await
    }
    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

/// One path segment, percent-encoded.
pub use hangar_core::path_segment as seg;
