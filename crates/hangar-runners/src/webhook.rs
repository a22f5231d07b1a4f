//! Webhook signatures: `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 of the raw body with
//! the webhook secret, compared in constant time (aws-lc-rs).

use aws_lc_rs::hmac;

use crate::Secret;

/// Sign `body` as GitHub does (`sha256=<hex>`): for tests and the redelivery check.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// Whether `header` (the `X-Hub-Signature-256` value) is the signature of `body` with
/// `secret`. The comparison of the MAC runs in constant time; a malformed header is `false`.
pub fn verify(secret: &Secret, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_mac) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else { return false };
    let Ok(mac) = hex::decode(hex_mac) else { return false };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    hmac::verify(&key, body, &mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_documented_example_verifies() {
        // The example of GitHub's "Validating webhook deliveries" page.
        let secret = Secret::new("It's a Secret to Everybody");
        let body = b"Hello, World!";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(&secret, body), sig);
        assert!(verify(&secret, body, Some(sig)));
        assert!(!verify(&secret, b"Hello, World?", Some(sig)));
        assert!(!verify(&Secret::new("other"), body, Some(sig)));
        assert!(!verify(&secret, body, None));
        assert!(!verify(&secret, body, Some("sha1=757107ea")));
        assert!(!verify(&secret, body, Some("sha256=zz")));
    }
}
