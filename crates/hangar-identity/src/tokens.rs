//! JWT issuing and checking.
//!
//! HS256 by default with a secret that survives restarts (given, or generated into the
//! data folder). RS256/384/512 with a PEM key, or EdDSA with a PEM key or one generated
//! into the data folder; for those, [`TokenService::jwks`] publishes the public key.
//! `iss`, `aud`, `exp`, `iat` and `nbf` are always set and checked.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::Jwk};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{IdentityError, Result};
use crate::secrets;

/// Signing algorithms Hangar accepts in `JWT_SIGN_ALGORITHM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    EdDSA,
}

impl FromStr for JwtAlgorithm {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_uppercase().as_str() {
            "HS256" => JwtAlgorithm::HS256,
            "HS384" => JwtAlgorithm::HS384,
            "HS512" => JwtAlgorithm::HS512,
            "RS256" => JwtAlgorithm::RS256,
            "RS384" => JwtAlgorithm::RS384,
            "RS512" => JwtAlgorithm::RS512,
            "EDDSA" | "ED25519" => JwtAlgorithm::EdDSA,
            other => {
                return Err(IdentityError::KeyConfig(format!(
                    "unknown JWT_SIGN_ALGORITHM {other:?}; use HS256, HS384, HS512, RS256, RS384, RS512 or EdDSA"
                )));
            }
        })
    }
}

impl JwtAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::HS384 => Algorithm::HS384,
            JwtAlgorithm::HS512 => Algorithm::HS512,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::RS384 => Algorithm::RS384,
            JwtAlgorithm::RS512 => Algorithm::RS512,
            JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }
    fn is_hmac(self) -> bool {
        matches!(self, JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512)
    }
}

/// How tokens are made.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub algorithm: JwtAlgorithm,
    pub ttl: Duration,
    pub issuer: String,
    pub audience: String,
    /// HMAC secret; generated into `<data>/secrets/jwt-hmac.key` when absent.
    pub hmac_secret: Option<Vec<u8>>,
    /// PEM private key for RS*/EdDSA; for EdDSA one is generated when absent.
    pub private_key_pem: Option<Vec<u8>>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            algorithm: JwtAlgorithm::HS256,
            ttl: Duration::from_secs(15 * 60),
            issuer: "hangar".into(),
            audience: "hangar-api".into(),
            hmac_secret: None,
            private_key_pem: None,
        }
    }
}

/// The payload of a Hangar JWT. `email`, `uid`, `roles`, `claims` and `exp` are what the
/// reference's clients decode; authorisation never trusts `roles`/`claims` from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub uid: String,
    pub email: String,
    pub username: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub claims: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// The user's security stamp when the token was issued.
    pub stamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<String>,
}

/// Issues and verifies tokens.
pub struct TokenService {
    config: TokenConfig,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Option<Value>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService").field("algorithm", &self.config.algorithm).finish_non_exhaustive()
    }
}

impl TokenService {
    /// Build from configuration; missing keys are generated into `data_dir/secrets/`.
    pub fn new(config: TokenConfig, data_dir: &Path) -> Result<Self> {
        let secrets_dir = data_dir.join("secrets");
        let alg = config.algorithm;
        let (encoding, decoding, jwk) = if alg.is_hmac() {
            let secret = match &config.hmac_secret {
                Some(s) if s.len() >= 32 => s.clone(),
                Some(_) => {
                    return Err(IdentityError::KeyConfig("JWT_HMACS_SECRET must be at least 32 bytes long".into()));
                }
                None => secrets::load_or_generate(&secrets_dir.join("jwt-hmac.key"), 64)?,
            };
            (EncodingKey::from_secret(&secret), DecodingKey::from_secret(&secret), None)
        } else if alg == JwtAlgorithm::EdDSA {
            let pem = match &config.private_key_pem {
                Some(p) => p.clone(),
                None => secrets::load_or_create_with(&secrets_dir.join("jwt-ed25519.pem"), || {
                    let rng = aws_lc_rs::rand::SystemRandom::new();
                    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                        .map_err(|_| IdentityError::Internal("cannot generate an Ed25519 key".into()))?;
                    Ok(pem_encode("PRIVATE KEY", doc.as_ref()).into_bytes())
                })?,
            };
            let der = pem_decode(&pem)?;
            let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&der)
                .map_err(|_| IdentityError::KeyConfig("the EdDSA key is not a PKCS#8 Ed25519 private key".into()))?;
            use aws_lc_rs::signature::KeyPair;
            let public = pair.public_key().as_ref().to_vec();
            let x = URL_SAFE_NO_PAD.encode(&public);
            let kid = key_id(&public);
            let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA", "use": "sig", "kid": kid});
            (
                EncodingKey::from_ed_der(&der),
                DecodingKey::from_ed_components(&x).map_err(|e| IdentityError::KeyConfig(e.to_string()))?,
                Some(jwk),
            )
        } else {
            let pem = config.private_key_pem.clone().ok_or_else(|| {
                IdentityError::KeyConfig(format!(
                    "JWT_SIGN_ALGORITHM={:?} needs an RSA private key: set JWT_PRIVATE_KEY (PEM, base64 PEM or a file path)",
                    alg
                ))
            })?;
            let encoding = EncodingKey::from_rsa_pem(&pem)
                .map_err(|e| IdentityError::KeyConfig(format!("JWT_PRIVATE_KEY is not an RSA PEM key: {e}")))?;
            let mut jwk = serde_json::to_value(
                Jwk::from_encoding_key(&encoding, alg.jwt()).map_err(|e| IdentityError::KeyConfig(e.to_string()))?,
            )
            .map_err(|e| IdentityError::Internal(e.to_string()))?;
            let n = jwk.get("n").and_then(Value::as_str).unwrap_or_default().to_string();
            let e = jwk.get("e").and_then(Value::as_str).unwrap_or_default().to_string();
            let decoding =
                DecodingKey::from_rsa_components(&n, &e).map_err(|e| IdentityError::KeyConfig(e.to_string()))?;
            if let Some(o) = jwk.as_object_mut() {
                o.insert("use".into(), json!("sig"));
                o.insert("kid".into(), json!(key_id(n.as_bytes())));
            }
            (encoding, decoding, Some(jwk))
        };
        Ok(TokenService { config, encoding, decoding, jwk })
    }

    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// Sign a token for the given subject.
    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        &self,
        uid: &str,
        username: &str,
        email: &str,
        roles: Vec<String>,
        claims: Vec<String>,
        stamp: &str,
        api_key_id: Option<String>,
    ) -> Result<(String, i64)> {
        let now = Utc::now().timestamp();
        let exp = now + self.config.ttl.as_secs() as i64;
        let payload = TokenClaims {
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            sub: uid.into(),
            uid: uid.into(),
            email: email.into(),
            username: username.into(),
            roles,
            claims,
            iat: now,
            nbf: now,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            stamp: stamp.into(),
            api_key_id,
        };
        let mut header = Header::new(self.config.algorithm.jwt());
        header.kid = self.jwk.as_ref().and_then(|j| j.get("kid")).and_then(Value::as_str).map(String::from);
        let token = jsonwebtoken::encode(&header, &payload, &self.encoding)
            .map_err(|e| IdentityError::Internal(format!("cannot sign a token: {e}")))?;
        Ok((token, exp))
    }

    /// Check signature, algorithm, issuer, audience and lifetime.
    pub fn verify(&self, token: &str) -> Result<TokenClaims> {
        self.check(token, true)
    }

    /// [`TokenService::verify`] without the expiry: for a credential that was valid when a
    /// long-lived connection opened and is checked again while it lasts.
    pub fn verify_past_expiry(&self, token: &str) -> Result<TokenClaims> {
        self.check(token, false)
    }

    fn check(&self, token: &str, expiry: bool) -> Result<TokenClaims> {
        let mut v = Validation::new(self.config.algorithm.jwt());
        v.validate_exp = expiry;
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = 5;
        jsonwebtoken::decode::<TokenClaims>(token, &self.decoding, &v).map(|d| d.claims).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            IdentityError::Unauthenticated(match e.kind() {
                K::ExpiredSignature => "The token has expired; log in again".into(),
                K::InvalidIssuer | K::InvalidAudience => "The token was not issued for this server".into(),
                K::ImmatureSignature => "The token is not valid yet".into(),
                _ => "The token is invalid".into(),
            })
        })
    }

    /// The JWKS document: the public key for RS*/EdDSA, an empty key set for HMAC.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.jwk.iter().collect::<Vec<_>>()})
    }
}

fn key_id(material: &[u8]) -> String {
    blake3::hash(material).to_hex()[..16].to_string()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(pem: &[u8]) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(pem).map_err(|_| IdentityError::KeyConfig("the key is not PEM text".into()))?;
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| IdentityError::KeyConfig("the key is not valid PEM".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(alg: JwtAlgorithm, dir: &Path) -> TokenService {
        TokenService::new(TokenConfig { algorithm: alg, ..Default::default() }, dir).unwrap()
    }

    #[test]
    fn hmac_secret_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = svc(JwtAlgorithm::HS256, dir.path());
        let (t, _) = a.issue("u1", "bob", "b@x", vec![], vec![], "s", None).unwrap();
        let b = svc(JwtAlgorithm::HS256, dir.path());
        assert_eq!(b.verify(&t).unwrap().uid, "u1");
        let other = tempfile::tempdir().unwrap();
        assert!(svc(JwtAlgorithm::HS256, other.path()).verify(&t).is_err());
    }

    #[test]
    fn eddsa_publishes_its_key_and_rejects_foreign_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let s = svc(JwtAlgorithm::EdDSA, dir.path());
        let (t, _) = s.issue("u1", "bob", "b@x", vec![], vec![], "s", None).unwrap();
        assert_eq!(s.verify(&t).unwrap().email, "b@x");
        let jwks = s.jwks();
        assert_eq!(jwks["keys"][0]["kty"], "OKP");
        let hs = svc(JwtAlgorithm::HS256, dir.path());
        assert!(hs.verify(&t).is_err(), "an EdDSA token must not verify as HS256");
    }

    #[test]
    fn wrong_audience_or_issuer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = svc(JwtAlgorithm::HS256, dir.path());
        let other =
            TokenService::new(TokenConfig { audience: "elsewhere".into(), ..Default::default() }, dir.path()).unwrap();
        let (t, _) = other.issue("u", "u", "u@x", vec![], vec![], "s", None).unwrap();
        let e = s.verify(&t).unwrap_err().to_string();
        assert!(e.contains("not issued for this server"), "{e}");
        assert!(s.verify_past_expiry(&t).is_err(), "only the expiry is waived");
    }

    #[test]
    fn an_expired_token_verifies_only_past_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenService::new(TokenConfig { ttl: Duration::ZERO, ..Default::default() }, dir.path()).unwrap();
        // Issued already expired, beyond the leeway.
        let mut claims =
            s.verify_past_expiry(&s.issue("u1", "bob", "b@x", vec![], vec![], "s", None).unwrap().0).unwrap();
        claims.exp -= 60;
        claims.iat -= 60;
        claims.nbf -= 60;
        let header = Header::new(s.config.algorithm.jwt());
        let t = jsonwebtoken::encode(&header, &claims, &s.encoding).unwrap();
        let e = s.verify(&t).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        assert_eq!(s.verify_past_expiry(&t).unwrap().uid, "u1");
        let forged = format!("{}x", &t[..t.len() - 1]);
        assert!(s.verify_past_expiry(&forged).is_err(), "the signature is still checked");
    }
}
