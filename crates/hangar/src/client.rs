//! The CLI's HTTP client and its credentials file.
//!
//! `hangar login` stores `{url, token, expires_at, username}` in
//! `$HANGAR_CONFIG_DIR/credentials.json` (default `$XDG_CONFIG_HOME/hangar` or
//! `~/.config/hangar`), created with mode 0600. `HANGAR_URL`, `HANGAR_TOKEN` and
//! `HANGAR_API_KEY` override it for scripts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hangar_wire::{VmCall, VmReply};
use serde::de::DeserializeOwned;
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
        let body =
            self.send(Request { method: reqwest::Method::PUT, path, raw: Some(bytes), ..Request::default() }).await?;
        Ok(to_value(body))
    }

    pub async fn call_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value> {
        Ok(to_value(self.send(Request { method, path, body, headers, ..Request::default() }).await?))
    }

    /// A request whose answer is a `hangar-wire` (or other shared) type.
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str, headers: &[(&str, &str)]) -> Result<T> {
        let method = reqwest::Method::GET;
        let body = self.send(Request { method: method.clone(), path, headers, ..Request::default() }).await?;
        decode(&method, path, &body)
    }

    /// Send a typed body, read a typed answer.
    pub async fn send_as<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let json = serde_json::to_value(body).with_context(|| format!("cannot write the body of {method} {path}"))?;
        let answer =
            self.send(Request { method: method.clone(), path, body: Some(json), ..Request::default() }).await?;
        decode(&method, path, &answer)
    }

    /// Run one VM operation: the request is the one every Hangar process sends for it
    /// (`VmCall::request`), and so is the reading of the answer (`VmCall::read_reply`).
    /// The host's time limit for the operation (`HttpCall::timeout`) applies here too.
    pub async fn vm(&self, vm: &str, call: &VmCall) -> Result<VmReply> {
        let http = call.request(vm);
        let method = reqwest::Method::from_bytes(http.method.as_bytes())
            .with_context(|| format!("{:?} is not an HTTP method", http.method))?;
        let answer = self
            .send(Request {
                method: method.clone(),
                path: &http.path,
                body: http.body,
                timeout: Some(http.timeout),
                ..Request::default()
            })
            .await?;
        call.read_reply(&answer).map_err(|e| unreadable(&method, &http.path, &e))
    }

    async fn send(&self, r: Request<'_>) -> Result<Vec<u8>> {
        let Request { method, path, body, raw, headers, timeout } = r;
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
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let late = |e: &reqwest::Error| {
            timeout.filter(|_| e.is_timeout()).map(|t| {
                anyhow!(
                    "{method} {path}: no answer from {} within {} s; the server may still finish the operation \
                     (look with `hangar vm get` or `hangar vm list`)",
                    self.base,
                    t.as_secs()
                )
            })
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Err(late(&e).unwrap_or_else(|| anyhow::Error::new(e).context(format!("cannot reach {url}"))));
            }
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => match late(&e) {
                Some(timed_out) => return Err(timed_out),
                // A body that broke off reads as empty (a typed answer then fails to decode).
                None => Vec::new(),
            },
        };
        if !status.is_success() {
            let value = to_value(bytes);
            let msg =
                value.get("message").and_then(Value::as_str).map(String::from).unwrap_or_else(|| value.to_string());
            let hint = match status.as_u16() {
                401 => " (log in again with `hangar login`)",
                403 => " (your user lacks the permission; ask an administrator)",
                _ => "",
            };
            bail!("{method} {path} failed with {status}: {msg}{hint}");
        }
        Ok(bytes)
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

/// One request: what [`Client::send`] needs.
struct Request<'a> {
    method: reqwest::Method,
    path: &'a str,
    body: Option<Value>,
    raw: Option<Vec<u8>>,
    headers: &'a [(&'a str, &'a str)],
    /// No limit when `None`.
    timeout: Option<Duration>,
}

impl Default for Request<'_> {
    fn default() -> Self {
        Request { method: reqwest::Method::GET, path: "", body: None, raw: None, headers: &[], timeout: None }
    }
}

/// An answer body as JSON: empty is `null`, text that is not JSON a string.
fn to_value(body: Vec<u8>) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&body).unwrap_or_else(|_| {
        Value::String(String::from_utf8(body).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    })
}

fn unreadable(method: &reqwest::Method, path: &str, e: &serde_json::Error) -> anyhow::Error {
    anyhow!(
        "{method} {path}: the server's answer is not what this CLI reads ({e}); \
         is the server a Hangar of the same version as this CLI (`hangar --version`)?"
    )
}

fn decode<T: DeserializeOwned>(method: &reqwest::Method, path: &str, body: &[u8]) -> Result<T> {
    // An empty answer reads as `null` (for `Option`s), as the untyped calls read it.
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"null".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| unreadable(method, path, &e))
}

/// One path segment, percent-encoded.
pub use hangar_core::path_segment as seg;
