//! `hangar login --sso [--provider ID] [--browser]`: single sign-on from a terminal with the
//! OAuth 2.0 device authorization grant (RFC 8628) against the provider the server lists at
//! `GET /auth/providers`, for its CLI client; with `--browser`, or when the provider lacks
//! the device grant, the authorization code grant with PKCE through a browser on this
//! machine, redirected back to a one-time listener on 127.0.0.1 (RFC 8252 §7.3: the CLI
//! client is registered as a native client with `http://127.0.0.1/callback`, any port). The
//! ID token it gets is exchanged at
//! `POST /auth/oidc/{provider}/token-exchange` for a Hangar login token, which is stored like
//! the one of `hangar login`. The server applies the same mapping and just-in-time user as a
//! browser login, so the CLI holds no provider token afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use hangar_identity::oidc::{Discovery, TokenAnswer};

use crate::client::{Client, Credentials};

#[derive(Deserialize)]
struct ProviderLink {
    id: String,
    issuer: String,
    cli_client_id: String,
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

/// Log in through the provider; the credentials to save.
pub async fn login(url: &str, provider: Option<&str>, browser: bool) -> Result<Credentials> {
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
    let id_token = match (&d.device_authorization_endpoint, browser) {
        (Some(device_endpoint), false) => device_login(&http, &d, device_endpoint, &p).await?,
        (None, false) => {
            eprintln!("The provider {} offers no device code login; logging in through a browser instead", p.id);
            loopback_login(&http, &d, &p).await?
        }
        (_, true) => loopback_login(&http, &d, &p).await?,
    };
    let t: hangar_wire::TokenResponse = serde_json::from_value(
        hangar.post(&format!("/auth/oidc/{}/token-exchange", p.id), json!({"id_token": id_token})).await?,
    )
    .context("the server's answer to the token exchange is not a token")?;
    let token = t.token;
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
        expires_at: t.expires_at,
        username: me.get("username").and_then(Value::as_str).unwrap_or_default().to_string(),
    })
}

/// The device authorization grant: show the code, poll the token endpoint; the ID token.
async fn device_login(
    http: &reqwest::Client,
    d: &Discovery,
    device_endpoint: &str,
    p: &ProviderLink,
) -> Result<String> {
    let scope = "openid profile email";
    let dev: DeviceAnswer = http
        .post(device_endpoint)
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
    loop {
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
            None => return t.id_token.context("the provider answered no ID token (is the openid scope allowed?)"),
            Some("authorization_pending") => continue,
            Some("slow_down") => interval += Duration::from_secs(5),
            Some(e) => bail!("the provider ended the login: {e} {}", t.error_description.unwrap_or_default()),
        }
    }
}

/// Random text for state, nonce and the PKCE verifier (32 random bytes, base64url).
fn random_text() -> Result<String> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no random numbers from the system"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The authorization code grant with PKCE (S256) in a browser on this machine, back to a
/// one-time listener on 127.0.0.1; state and nonce are checked; the ID token.
async fn loopback_login(http: &reqwest::Client, d: &Discovery, p: &ProviderLink) -> Result<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1 for the browser's return")?;
    let redirect_uri = format!("http://127.0.0.1:{}/callback", listener.local_addr()?.port());
    let (state, nonce, verifier) = (random_text()?, random_text()?, random_text()?);
    let challenge = b64.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()));
    let mut auth = url::Url::parse(&d.authorization_endpoint).with_context(|| {
        format!("the provider's authorization endpoint {:?} is not a URL", d.authorization_endpoint)
    })?;
    auth.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &p.cli_client_id)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", "openid profile email")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    eprintln!("To sign in, open this address in a browser on this machine: {auth}");

    // One callback: its query, then the listener closes.
    let (tx, rx) = tokio::sync::oneshot::channel::<std::collections::HashMap<String, String>>();
    let tx = std::sync::Arc::new(std::sync::Mutex::new(Some(tx)));
    let app = axum::Router::new().route(
        "/callback",
        axum::routing::get(
            move |axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>| async move {
                if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(q);
                }
                axum::response::Html("<h1>Signed in; return to your terminal.</h1>")
            },
        ),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await;
    });
    let answer = tokio::time::timeout(Duration::from_secs(600), rx).await;
    let _ = stop_tx.send(());
    let _ = server.await;
    let q = answer
        .map_err(|_| anyhow::anyhow!("no browser came back within 10 minutes; run hangar login --sso again"))?
        .context("the browser's return was lost")?;
    if let Some(e) = q.get("error") {
        bail!("the provider ended the login: {e} {}", q.get("error_description").map(String::as_str).unwrap_or(""));
    }
    if q.get("state") != Some(&state) {
        bail!("the browser came back with another login's state; run hangar login --sso again");
    }
    let code = q.get("code").context("the browser came back without a code")?;
    let resp = http
        .post(&d.token_endpoint)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("client_id", p.cli_client_id.as_str()),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .context("cannot reach the provider's token endpoint")?;
    let t: TokenAnswer = resp.json().await.context("the provider's token answer is not JSON")?;
    if let Some(e) = t.error {
        bail!("the provider refused the code: {e} {}", t.error_description.unwrap_or_default());
    }
    let id_token = t.id_token.context("the provider answered no ID token (is the openid scope allowed?)")?;
    // The server verifies the token's signature, issuer, audience and times; the nonce is
    // this login's, which only this process knows.
    let payload = id_token.split('.').nth(1).context("the ID token is not a JWT")?;
    let claims: Value = serde_json::from_slice(&b64.decode(payload).context("the ID token is not a JWT")?)
        .context("the ID token's claims are not JSON")?;
    if claims.get("nonce").and_then(Value::as_str) != Some(nonce.as_str()) {
        bail!("the ID token was not issued for this login (nonce); run hangar login --sso again");
    }
    Ok(id_token)
}
