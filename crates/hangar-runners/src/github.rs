//! The GitHub Actions provider: a GitHub App (app JWT, RS256; installation tokens cached
//! until shortly before they expire) for a repository, an organisation or an enterprise;
//! just-in-time runners (`generate-jitconfig` with a runner group), runner lists and
//! removal, the app's webhook deliveries and their redelivery; `workflow_job` deliveries
//! verified with `X-Hub-Signature-256`. Primary and secondary rate limits are honoured:
//! `Retry-After`, or `x-ratelimit-remaining: 0` until `x-ratelimit-reset`, or a minute for
//! a secondary limit that names no time; while one holds, every call of this client waits.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{Delivery, JobAction, JobEvent, Provider, RemoteRunner, RunnerConfig, RunnerError, Secret, WebhookRequest};

/// Where runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository { owner: String, repo: String },
    Organization(String),
    Enterprise(String),
}

impl Scope {
    /// `repo:OWNER/NAME`, `org:NAME` or `enterprise:SLUG`.
    pub fn parse(s: &str) -> Result<Scope, String> {
        let ok =
            |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let (kind, rest) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| "must be repo:OWNER/NAME, org:NAME or enterprise:SLUG".to_string())?;
        match kind {
            "repo" => match rest.split_once('/') {
                Some((o, r)) if ok(o) && ok(r) => Ok(Scope::Repository { owner: o.into(), repo: r.into() }),
                _ => Err(format!("{rest:?} is not OWNER/NAME")),
            },
            "org" if ok(rest) => Ok(Scope::Organization(rest.into())),
            "enterprise" if ok(rest) => Ok(Scope::Enterprise(rest.into())),
            _ => Err("must be repo:OWNER/NAME, org:NAME or enterprise:SLUG".to_string()),
        }
    }

    /// The scope's runners API, `/repos/o/r/actions/runners` and the like.
    fn runners_path(&self) -> String {
        match self {
            Scope::Repository { owner, repo } => format!("/repos/{owner}/{repo}/actions/runners"),
            Scope::Organization(org) => format!("/orgs/{org}/actions/runners"),
            Scope::Enterprise(e) => format!("/enterprises/{e}/actions/runners"),
        }
    }
}

/// The GitHub provider's settings.
#[derive(Debug, Clone)]
pub struct GithubConfig {
    /// `https://api.github.com`, a GHES `https://HOST/api/v3`, or a mock.
    pub api_url: String,
    pub app_id: u64,
    /// The app's private key (PEM).
    pub private_key: Secret,
    pub webhook_secret: Secret,
    pub scope: Scope,
    /// The installation; looked up from the scope when not given.
    pub installation_id: Option<u64>,
    /// The runner group JIT runners join (1 = the default group).
    pub runner_group_id: u64,
    /// The longest wait for a rate limit before a call gives up.
    pub max_rate_limit_wait: Duration,
}

#[derive(Serialize)]
struct AppClaims {
    iat: i64,
    exp: i64,
    iss: String,
}

/// A cached installation token.
struct Token {
    token: Secret,
    /// Renewed from this moment on (some minutes before GitHub's expiry).
    renew_at: DateTime<Utc>,
}

/// The GitHub App client and provider.
pub struct Github {
    cfg: GithubConfig,
    http: reqwest::Client,
    key: jsonwebtoken::EncodingKey,
    installation: Mutex<Option<u64>>,
    token: Mutex<Option<Token>>,
    /// While a rate limit holds, no call is sent before this instant.
    blocked_until: std::sync::Mutex<Option<Instant>>,
}

/// How long before its expiry an installation token is renewed.
const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Wait after a secondary rate limit that names no time (GitHub's advice: a minute).
const SECONDARY_WAIT: Duration = Duration::from_secs(60);

enum Auth {
    App,
    Installation,
}

impl Github {
    pub fn new(cfg: GithubConfig) -> Result<Github, RunnerError> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(cfg.private_key.expose().as_bytes())
            .map_err(|e| RunnerError::Auth(format!("the app's private key is not an RSA PEM key: {e}")))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("hangar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| RunnerError::Transport(e.to_string()))?;
        let installation = Mutex::new(cfg.installation_id);
        Ok(Github { cfg, http, key, installation, token: Mutex::new(None), blocked_until: Default::default() })
    }

    /// The app's JWT (RS256, issued a minute in the past for clock drift, 9 minutes valid).
    pub fn app_jwt(&self) -> Result<Secret, RunnerError> {
        let now = Utc::now().timestamp();
        let claims = AppClaims { iat: now - 60, exp: now + 9 * 60, iss: self.cfg.app_id.to_string() };
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Secret::new)
            .map_err(|e| RunnerError::Auth(format!("cannot sign the app JWT: {e}")))
    }

    async fn installation_id(&self) -> Result<u64, RunnerError> {
        let mut id = self.installation.lock().await;
        if let Some(i) = *id {
            return Ok(i);
        }
        let found = match &self.cfg.scope {
            Scope::Repository { owner, repo } => {
                let v = self.send(Method::GET, &format!("/repos/{owner}/{repo}/installation"), None, None).await?;
                v["id"].as_u64()
            }
            Scope::Organization(org) => {
                let v = self.send(Method::GET, &format!("/orgs/{org}/installation"), None, None).await?;
                v["id"].as_u64()
            }
            Scope::Enterprise(slug) => {
                let v = self.send(Method::GET, "/app/installations?per_page=100", None, None).await?;
                v.as_array().and_then(|a| {
                    a.iter()
                        .find(|i| i["target_type"] == "Enterprise" && i["account"]["slug"].as_str() == Some(slug))
                        .and_then(|i| i["id"].as_u64())
                })
            }
        };
        let found =
            found.ok_or_else(|| RunnerError::Auth(format!("the app has no installation on {:?}", self.cfg.scope)))?;
        *id = Some(found);
        Ok(found)
    }

    /// An installation token, from the cache while it is good for more than a few minutes.
    async fn installation_token(&self) -> Result<Secret, RunnerError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Utc::now() < t.renew_at
        {
            return Ok(t.token.clone());
        }
        let id = self.installation_id().await?;
        let v = self.send(Method::POST, &format!("/app/installations/{id}/access_tokens"), None, None).await?;
        let token = v["token"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| RunnerError::Auth("GitHub's answer has no installation token".into()))?;
        let expires = v["expires_at"].as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok());
        let margin = chrono::Duration::from_std(TOKEN_MARGIN).unwrap_or_default();
        *cached = expires.map(|e| Token { token: token.clone(), renew_at: e.with_timezone(&Utc) - margin });
        Ok(token)
    }

    /// Wait while a rate limit holds.
    async fn respect_block(&self) {
        let until = self.blocked_until.lock().ok().and_then(|g| *g);
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    /// How long a refused answer asks to wait, when it is a rate limit.
    fn rate_limit_wait(status: StatusCode, headers: &reqwest::header::HeaderMap, body: &str) -> Option<Duration> {
        if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
            return None;
        }
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
        if let Some(secs) = h("retry-after").and_then(|v| v.parse::<u64>().ok()) {
            return Some(Duration::from_secs(secs));
        }
        if h("x-ratelimit-remaining") == Some("0")
            && let Some(reset) = h("x-ratelimit-reset").and_then(|v| v.parse::<i64>().ok())
        {
            let secs = (reset - Utc::now().timestamp()).max(1) as u64;
            return Some(Duration::from_secs(secs));
        }
        if status == StatusCode::TOO_MANY_REQUESTS || body.to_ascii_lowercase().contains("secondary rate limit") {
            return Some(SECONDARY_WAIT);
        }
        None
    }

    /// One API call with rate limits honoured (at most three tries). Answers the JSON body
    /// (`null` when empty).
    async fn call(&self, method: Method, path: &str, auth: Auth, body: Option<Value>) -> Result<Value, RunnerError> {
        let token = match auth {
            Auth::App => None,
            Auth::Installation => Some(self.installation_token().await?),
        };
        self.send(method, path, token, body).await
    }

    /// [`Github::call`] with the app's JWT (`token` `None`) or an installation token.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<Secret>,
        body: Option<Value>,
    ) -> Result<Value, RunnerError> {
        let url = format!("{}{path}", self.cfg.api_url.trim_end_matches('/'));
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        for attempt in 0..3 {
            self.respect_block().await;
            let credential = match &token {
                None => self.app_jwt()?,
                Some(t) => t.clone(),
            };
            let mut req = self
                .http
                .request(method.clone(), &url)
                // GitHub's media type first; application/json (what its REST description
                // declares for every answer, and what GitHub also serves) as the fallback, so
                // a server that negotiates by the description answers too.
                .header("accept", "application/vnd.github+json, application/json;q=0.9")
                .header("x-github-api-version", "2022-11-28")
                .bearer_auth(credential.expose());
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| RunnerError::Transport(format!("{what}: {e}")))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let text = resp.text().await.map_err(|e| RunnerError::Transport(format!("{what}: {e}")))?;
            if status.is_success() {
                return Ok(if text.trim().is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(&text).unwrap_or(Value::Null)
                });
            }
            if let Some(wait) = Self::rate_limit_wait(status, &headers, &text) {
                tracing::warn!(call = %what, wait_s = wait.as_secs(), attempt, "GitHub rate limit; waiting");
                if wait > self.cfg.max_rate_limit_wait || attempt == 2 {
                    return Err(RunnerError::RateLimited(format!("{what}: retry after {} s", wait.as_secs())));
                }
                if let Ok(mut g) = self.blocked_until.lock() {
                    let until = Instant::now() + wait;
                    *g = Some(g.map_or(until, |u| u.max(until)));
                }
                continue;
            }
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(String::from))
                .unwrap_or_else(|| text.chars().take(300).collect());
            return Err(RunnerError::Api { what, status: status.as_u16(), message });
        }
        Err(RunnerError::RateLimited(what))
    }
}

/// The parts of a `workflow_job` delivery Hangar reads.
#[derive(Deserialize)]
struct WorkflowJobDelivery {
    action: String,
    workflow_job: WorkflowJob,
    repository: Repository,
}

#[derive(Deserialize)]
struct WorkflowJob {
    id: u64,
    run_id: u64,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    runner_name: Option<String>,
    #[serde(default)]
    conclusion: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

#[derive(Deserialize)]
struct HookDelivery {
    id: u64,
    guid: String,
    delivered_at: DateTime<Utc>,
    #[serde(default)]
    status_code: u16,
    #[serde(default)]
    event: String,
}

/// The deliveries to ask for again, one attempt each (id, guid): `workflow_job` deliveries
/// of which no attempt succeeded and that Hangar has not stored (`known`, by guid).
fn missed(seen: &[HookDelivery], known: &std::collections::HashSet<String>) -> Vec<(u64, String)> {
    let mut wanted: Vec<(u64, String)> = Vec::new();
    for d in seen {
        let delivered = seen.iter().any(|o| o.guid == d.guid && (200..300).contains(&o.status_code));
        if d.event != "workflow_job" || delivered || known.contains(&d.guid) || wanted.iter().any(|(_, g)| *g == d.guid)
        {
            continue;
        }
        wanted.push((d.id, d.guid.clone()));
    }
    wanted
}

#[async_trait]
impl Provider for Github {
    fn name(&self) -> &'static str {
        "github"
    }

    fn config_env(&self) -> &'static str {
        // The runner reads `--jitconfig` from this variable when the flag is absent.
        "ACTIONS_RUNNER_INPUT_JITCONFIG"
    }

    fn parse(&self, req: &WebhookRequest) -> Result<Delivery, RunnerError> {
        if !crate::webhook::verify(&self.cfg.webhook_secret, &req.body, req.header("x-hub-signature-256")) {
            return Err(RunnerError::BadSignature);
        }
        let delivery_id = req
            .header("x-github-delivery")
            .filter(|d| !d.is_empty() && d.len() <= 100 && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .ok_or_else(|| RunnerError::Invalid("X-GitHub-Delivery is missing or not a delivery id".into()))?
            .to_string();
        let event = req.header("x-github-event").unwrap_or_default().to_string();
        if event != "workflow_job" {
            return Ok(Delivery::Other { delivery_id, event });
        }
        let d: WorkflowJobDelivery = serde_json::from_slice(&req.body)
            .map_err(|e| RunnerError::Invalid(format!("not a workflow_job delivery: {e}")))?;
        let action = match d.action.as_str() {
            "queued" => JobAction::Queued,
            "waiting" => JobAction::Waiting,
            "in_progress" => JobAction::InProgress,
            "completed" => JobAction::Completed,
            other => return Ok(Delivery::Other { delivery_id, event: format!("workflow_job.{other}") }),
        };
        Ok(Delivery::Job(JobEvent {
            delivery_id,
            job_id: d.workflow_job.id,
            run_id: d.workflow_job.run_id,
            action,
            labels: d.workflow_job.labels,
            repository: d.repository.full_name,
            runner_name: d.workflow_job.runner_name.filter(|n| !n.is_empty()),
            conclusion: d.workflow_job.conclusion,
        }))
    }

    async fn runner_config(&self, name: &str, labels: &[String]) -> Result<RunnerConfig, RunnerError> {
        let mut labels: Vec<String> = labels.to_vec();
        if labels.is_empty() {
            labels.push("self-hosted".into());
        }
        labels.truncate(100);
        let body = json!({"name": name, "runner_group_id": self.cfg.runner_group_id, "labels": labels,
            "work_folder": "_work"});
        let path = format!("{}/generate-jitconfig", self.cfg.scope.runners_path());
        let v = self.call(Method::POST, &path, Auth::Installation, Some(body)).await?;
        let config = v["encoded_jit_config"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| RunnerError::Api {
            what: format!("POST {path}"),
            status: 201,
            message: "the answer has no encoded_jit_config".into(),
        })?;
        Ok(RunnerConfig { runner_id: v["runner"]["id"].as_u64().unwrap_or(0), config: Secret::new(config) })
    }

    async fn runners(&self) -> Result<Vec<RemoteRunner>, RunnerError> {
        let mut out = Vec::new();
        for page in 1..=50u32 {
            let path = format!("{}?per_page=100&page={page}", self.cfg.scope.runners_path());
            let v = self.call(Method::GET, &path, Auth::Installation, None).await?;
            let runners = v["runners"].as_array().cloned().unwrap_or_default();
            let n = runners.len();
            out.extend(runners.iter().filter_map(|r| {
                Some(RemoteRunner {
                    id: r["id"].as_u64()?,
                    name: r["name"].as_str()?.to_string(),
                    online: r["status"] == "online",
                    busy: r["busy"].as_bool().unwrap_or(false),
                })
            }));
            let total = v["total_count"].as_u64().unwrap_or(0) as usize;
            if n < 100 || out.len() >= total {
                break;
            }
        }
        Ok(out)
    }

    async fn remove_runner(&self, id: u64) -> Result<(), RunnerError> {
        let path = format!("{}/{id}", self.cfg.scope.runners_path());
        match self.call(Method::DELETE, &path, Auth::Installation, None).await {
            Ok(_) | Err(RunnerError::Api { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn redeliver_missed(
        &self,
        since: DateTime<Utc>,
        known: &std::collections::HashSet<String>,
    ) -> Result<usize, RunnerError> {
        // Newest first; every attempt of a delivery is listed with the same guid.
        let mut seen: Vec<HookDelivery> = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..20 {
            let path = match &cursor {
                Some(c) => format!("/app/hook/deliveries?per_page=100&cursor={c}"),
                None => "/app/hook/deliveries?per_page=100".to_string(),
            };
            let v = self.call(Method::GET, &path, Auth::App, None).await?;
            let page: Vec<HookDelivery> = serde_json::from_value(v).unwrap_or_default();
            let done = page.is_empty() || page.iter().any(|d| d.delivered_at < since);
            cursor = page.last().map(|d| d.id.to_string());
            seen.extend(page.into_iter().filter(|d| d.delivered_at >= since));
            if done {
                break;
            }
        }
        let wanted = missed(&seen, known);
        let mut asked = 0;
        for (id, guid) in wanted {
            match self.call(Method::POST, &format!("/app/hook/deliveries/{id}/attempts"), Auth::App, None).await {
                Ok(_) => asked += 1,
                Err(e) => tracing::warn!(delivery = %guid, error = %e, "cannot ask GitHub to redeliver"),
            }
        }
        Ok(asked)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_failed_unknown_job_deliveries_are_asked_for_again() {
        // GET /app/hook/deliveries items (the description's shape), newest first.
        let item = |id: u64, guid: &str, status_code: u16, event: &str| {
            serde_json::json!({"id": id, "guid": guid, "delivered_at": "2026-12-01T10:00:00Z", "redelivery": id > 10,
                "duration": 0.03, "status": if status_code == 200 { "OK" } else { "Service Unavailable" },
                "status_code": status_code, "event": event, "action": "queued", "installation_id": 1,
                "repository_id": 2})
        };
        let page = serde_json::json!([
            item(11, "a", 200, "workflow_job"), // a retry of a that got through
            item(1, "a", 503, "workflow_job"),
            item(2, "b", 503, "workflow_job"), // failed twice: asked for once
            item(3, "b", 0, "workflow_job"),
            item(4, "c", 503, "workflow_job"), // failed, but Hangar stored it
            item(5, "d", 503, "ping"),         // not a job
            item(6, "e", 502, "workflow_job"),
        ]);
        let seen: Vec<HookDelivery> = serde_json::from_value(page).unwrap();
        let known = std::collections::HashSet::from(["c".to_string()]);
        assert_eq!(missed(&seen, &known), vec![(2, "b".to_string()), (6, "e".to_string())]);
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            Scope::parse("repo:octo/hello-world").unwrap(),
            Scope::Repository { owner: "octo".into(), repo: "hello-world".into() }
        );
        assert_eq!(Scope::parse("org:octo").unwrap(), Scope::Organization("octo".into()));
        assert_eq!(Scope::parse("enterprise:big").unwrap(), Scope::Enterprise("big".into()));
        for bad in ["octo", "repo:octo", "org:a/b", "team:x", "repo:../x/y", "org:"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_are_read_from_the_answer() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(Github::rate_limit_wait(StatusCode::FORBIDDEN, &h, ""), Some(Duration::from_secs(7)));
        assert_eq!(Github::rate_limit_wait(StatusCode::NOT_FOUND, &h, ""), None);
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        let reset = (Utc::now().timestamp() + 30).to_string();
        h.insert("x-ratelimit-reset", HeaderValue::from_str(&reset).unwrap());
        let w = Github::rate_limit_wait(StatusCode::FORBIDDEN, &h, "").unwrap();
        assert!(w > Duration::from_secs(25) && w <= Duration::from_secs(30), "{w:?}");
        let none = HeaderMap::new();
        assert_eq!(
            Github::rate_limit_wait(StatusCode::FORBIDDEN, &none, "You have exceeded a secondary rate limit"),
            Some(SECONDARY_WAIT)
        );
        assert_eq!(Github::rate_limit_wait(StatusCode::FORBIDDEN, &none, "Resource not accessible"), None);
    }
}
