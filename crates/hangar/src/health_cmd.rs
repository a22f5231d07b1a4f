//! `hangar health`: a liveness check of a server through its `/health/probe` route, for the
//! Docker image's `HEALTHCHECK` (an image `FROM scratch` has no curl), a Compose
//! `healthcheck` or a script. Exit status 0 when the server answers `200 {"status": "OK"}`,
//! 1 otherwise, with the reason on stderr.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::client::api_base;

#[derive(Args)]
pub struct HealthArgs {
    /// How long to wait for the answer (e.g. 3s).
    #[arg(long, default_value = "5s")]
    pub timeout: String,
}

/// The server to check: `--url`, else `HANGAR_URL`, else this machine's own listener from
/// `API_HOST` (127.0.0.1 when it listens on every address), `API_PORT` and `API_PREFIX`
/// (their defaults otherwise), as a container's healthcheck sees it.
fn probe_url(url_flag: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> String {
    let given = url_flag.map(String::from).or_else(|| env("HANGAR_URL").filter(|u| !u.trim().is_empty()));
    if let Some(u) = given {
        return format!("{}/health/probe", api_base(&u));
    }
    let default = |k: &str| crate::config::KEYS.iter().find(|d| d.name == k).map(|d| d.default).unwrap_or_default();
    let port = env("API_PORT").filter(|p| !p.trim().is_empty()).unwrap_or_else(|| default("API_PORT").to_string());
    let prefix = env("API_PREFIX").unwrap_or_else(|| default("API_PREFIX").to_string());
    let prefix = prefix.trim_end_matches('/');
    // The listener's own address, unless it listens on every address.
    let host = match env("API_HOST").map(|h| h.trim().trim_matches(['[', ']']).to_string()) {
        Some(h) if !h.is_empty() && h != "0.0.0.0" && h != "::" => h,
        _ => "127.0.0.1".to_string(),
    };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    format!("http://{host}:{}{prefix}/v1/health/probe", port.trim())
}

/// Checks the server once; an error says why it is not live.
pub async fn run(url_flag: Option<&str>, args: HealthArgs) -> Result<String> {
    let timeout = humantime::parse_duration(&args.timeout)
        .with_context(|| format!("--timeout {:?} is not a duration such as 3s", args.timeout))?;
    let url = probe_url(url_flag, &|k| std::env::var(k).ok());
    check(&url, timeout).await?;
    Ok(url)
}

async fn check(url: &str, timeout: Duration) -> Result<()> {
    let http = reqwest::Client::builder()
        .user_agent(concat!("hangar-health/", env!("CARGO_PKG_VERSION")))
        .timeout(timeout)
        .build()?;
    let resp = http.get(url).send().await.with_context(|| format!("{url}: no answer"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{url} answered {status}");
    }
    if body.get("status").and_then(|s| s.as_str()) != Some("OK") {
        bail!("{url} answered {status} without status OK: {body}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::probe_url;

    #[test]
    fn the_probe_url_comes_from_the_flag_the_environment_or_the_listener_keys() {
        let none = |_: &str| None;
        assert_eq!(probe_url(Some("http://h:9/"), &none), "http://h:9/api/v1/health/probe");
        assert_eq!(probe_url(None, &none), "http://127.0.0.1:3080/api/v1/health/probe");
        let env = |k: &str| match k {
            "API_PORT" => Some("8080".to_string()),
            "API_PREFIX" => Some("/x/".to_string()),
            _ => None,
        };
        assert_eq!(probe_url(None, &env), "http://127.0.0.1:8080/x/v1/health/probe");
        let bound = |k: &str| match k {
            "API_HOST" => Some("10.1.2.3".to_string()),
            _ => None,
        };
        assert_eq!(probe_url(None, &bound), "http://10.1.2.3:3080/api/v1/health/probe");
        let v6 = |k: &str| (k == "API_HOST").then(|| "::1".to_string());
        assert_eq!(probe_url(None, &v6), "http://[::1]:3080/api/v1/health/probe");
        let any = |k: &str| (k == "API_HOST").then(|| "0.0.0.0".to_string());
        assert_eq!(probe_url(None, &any), "http://127.0.0.1:3080/api/v1/health/probe");
        let url = |k: &str| (k == "HANGAR_URL").then(|| "http://o:1/api".to_string());
        assert_eq!(probe_url(None, &url), "http://o:1/api/v1/health/probe");
    }
}
