//! What real clients of the reference API send: form-body logins, `//` and trailing `/`
//! in paths, the unversioned `/api/...` alias, CORS preflights, and tokens that a client
//! can verify against the published JWKS.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn reference_client_quirks_are_absorbed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[("CORS_ALLOWED_ORIGINS", "https://ui.example.test")]);
    let c = client();
    // k6's form-encoded login.
    let r = c
        .post(s.api("/auth/token"))
        .form(&[("email", "root@localhost"), ("password", ROOT_PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    assert!(v["expires_at"].as_i64().unwrap() > chrono::Utc::now().timestamp(), "expires_at in unix seconds");
    assert_eq!(v["email"], "root@localhost");
    let auth = Auth::Bearer(token.clone());
    // The GitHub Action's `//` and Terraform's trailing `/`, and the `/api/` alias.
    for path in ["/api/v1//auth/users", "/api/v1/auth/users/", "/api/auth/users", "/api//auth/users/"] {
        let (st, v) = call(&c, Method::GET, &format!("{}{}", s.url, path), &auth, None, &[]).await;
        assert_eq!(st, 200, "{path}: {v}");
        assert!(v.as_array().unwrap().iter().any(|u| u["username"] == "root"));
        let root = v.as_array().unwrap().iter().find(|u| u["username"] == "root").unwrap();
        assert!(root["roles"].is_array() && root["roles"][0].is_string());
        assert!(chrono::DateTime::parse_from_rfc3339(root["created_at"].as_str().unwrap()).is_ok());
    }
    // 404 with `code` equal to the status (Terraform's not-found check).
    let (st, v) = call(&c, Method::GET, &s.api("/auth/users/nobody"), &auth, None, &[]).await;
    assert_eq!((st, v["code"].as_u64()), (404, Some(404)));
    // CORS: the configured origin is allowed, another is not.
    let pre = |origin: &'static str| {
        c.request(Method::OPTIONS, s.api("/auth/users"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let r = pre("https://ui.example.test").await.unwrap();
    assert_eq!(
        r.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://ui.example.test")
    );
    let r = pre("https://evil.example.test").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Every answer carries a request id.
    let r = c.get(s.api("/health/probe")).send().await.unwrap();
    assert!(r.headers().get("x-request-id").is_some());
    // Token validation route.
    let (st, v) =
        call(&c, Method::POST, &s.api("/auth/token/validate"), &Auth::None, Some(json!({"token": token})), &[]).await;
    assert_eq!((st, v["valid"].as_bool()), (200, Some(true)));
    let (_, v) =
        call(&c, Method::POST, &s.api("/auth/token/validate"), &Auth::None, Some(json!({"token": "x.y.z"})), &[]).await;
    assert_eq!(v["valid"].as_bool(), Some(false));
}

#[tokio::test]
async fn eddsa_tokens_verify_against_the_published_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[("JWT_SIGN_ALGORITHM", "EdDSA"), ("JWT_DURATION", "10m")]);
    let c = client();
    let token = login(&c, &s, "root", ROOT_PASSWORD).await;
    let jwks: Value = c.get(format!("{}/.well-known/jwks.json", s.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["hangar-api"]);
    v.set_issuer(&["hangar"]);
    let data = jsonwebtoken::decode::<Value>(&token, &key, &v).expect("a client verifies the token with the JWKS");
    let ttl = data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap();
    assert_eq!(ttl, 600, "JWT_DURATION applies");
    // The signing key survives a restart: the old token still works.
    assert!(s.stop().success());
    let s2 = Server::start(dir.path(), &[("JWT_SIGN_ALGORITHM", "EdDSA")]);
    let (st, _) = call(&c, Method::GET, &s2.api("/auth/me"), &Auth::Bearer(token), None, &[]).await;
    assert_eq!(st, 200);
    let jwks2: Value = c.get(format!("{}/api/v1/auth/jwks", s2.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks, jwks2);
}

#[tokio::test]
async fn hs256_secret_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[]);
    let c = client();
    let token = login(&c, &s, "root", ROOT_PASSWORD).await;
    assert!(s.stop().success());
    let s2 = Server::start(dir.path(), &[]);
    let (st, v) = call(&c, Method::GET, &s2.api("/auth/me"), &Auth::Bearer(token), None, &[]).await;
    assert_eq!(st, 200, "{v}");
    let secret = dir.path().join("secrets/jwt-hmac.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(secret).unwrap().permissions().mode() & 0o777, 0o600);
}
