//! `hangar login --sso [--provider ID]`: single sign-on from a terminal with the OAuth 2.0
//! device authorization grant (RFC 8628) against the provider the server lists at
//! `GET /auth/providers`, for its CLI client. The ID token it gets is exchanged at
//! `POST /auth/oidc/{provider}/token-exchange` for a Hangar login token, which is stored like
//! the one of `hangar login`. The server applies the same mapping and just-in-time user as a
//! browser login, so the CLI holds no provider token afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Client, Credentials};

#[derive(Deserialize)]
struct ProviderLink {
    id: String,
    issuer: String,
    cli_client_id: String,
}

#[derive(Deserialize)]
struct Discovery {
    token_endpoint: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

#[derive(Deserialize)]
struct DeviceAnswer {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// Log in through the provider; the credentials to save.
pub async fn login(url: &str, provider: Option<&str>) -> Result<Credentials> {
    let hangar = Client::anonymous(url)?;
    let list: Vec<ProviderLink> = serde_json::from_value(hangar.get("/auth/providers").await?)
        .context("the server's provider list is not what this CLI reads")?;
    let p = match provider {
        Some(id) => list
            .into_iter()
            .find(|p| p.id == id)
            .with_context(|| format!("the server has no single sign-on provider {id:?}"))?,
        None => {
            let mut list = list;
            match list.len() {
                0 => bail!("the server has no single sign-on provider (OIDC_ISSUER_URL or OIDC_PROVIDERS_FILE)"),
                1 => list.remove(0),
                _ => bail!(
                    "the server has several single sign-on providers ({}); choose one with --provider",
                    list.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let discovery_url = format!("{}/.well-known/openid-configuration", p.issuer.trim_end_matches('/'));
    let d: Discovery = http
        .get(&discovery_url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("cannot reach the provider at {discovery_url}"))?
        .json()
        .await
        .context("the provider's discovery document is not JSON")?;
    let Some(device_endpoint) = d.device_authorization_endpoint else {
        bail!(
            "the provider {} offers no device authorization grant; log in through the web console, or use an API key",
            p.id
        );
    };
    let scope = "openid profile email";
    let dev: DeviceAnswer = http
        .post(&device_endpoint)
        .form(&[("client_id", p.cli_client_id.as_str()), ("scope", scope)])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("the provider refused the device login for client {}", p.cli_client_id))?
        .json()
        .await
        .context("the provider's device answer is not JSON")?;
    eprintln!("To sign in, open {} and enter the code {}", dev.verification_uri, dev.user_code);
    if let Some(c) = &dev.verification_uri_complete {
        eprintln!("or open {c}");
    }
    let mut interval = Duration::from_secs(dev.interval.unwrap_or(5).max(1));
    let deadline = Instant::now() + Duration::from_secs(dev.expires_in.unwrap_or(600));
    let id_token = loop {
        if Instant::now() >= deadline {
            bail!("the code expired before the login was finished; run hangar login --sso again");
        }
        // The interval the provider asks for between polls (RFC 8628 §3.5).
        tokio::time::sleep(interval).await;
        let resp = http
            .post(&d.token_endpoint)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", dev.device_code.as_str()),
                ("client_id", p.cli_client_id.as_str()),
            ])
            .send()
            .await
            .context("cannot reach the provider's token endpoint")?;
        let t: TokenAnswer = resp.json().await.context("the provider's token answer is not JSON")?;
        match t.error.as_deref() {
            None => break t.id_token.context("the provider answered no ID token (is the openid scope allowed?)")?,
            Some("authorization_pending") => continue,
            Some("slow_down") => interval += Duration::from_secs(5),
            Some(e) => bail!("the provider ended the login: {e} {}", t.error_description.unwrap_or_default()),
        }
    };
    let t = hangar.post(&format!("/auth/oidc/{}/token-exchange", p.id), json!({"id_token": id_token})).await?;
    let token = t.get("token").and_then(Value::as_str).context("the server answered without a token")?.to_string();
    let me = Client::anonymous(url)?;
    let me: Value = reqwest::Client::new()
        .get(format!("{}/auth/me", me.base()))
        .bearer_auth(&token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("the new token does not work")?
        .json()
        .await?;
    Ok(Credentials {
        url: url.to_string(),
        token,
        expires_at: t.get("expires_at").and_then(Value::as_i64).unwrap_or(0),
        username: me.get("username").and_then(Value::as_str).unwrap_or_default().to_string(),
    })
}
