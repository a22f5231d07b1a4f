//! Password policy and argon2id hashing.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

use crate::error::{IdentityError, Result};

/// The password rules, with the reference service's key names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPolicy {
    pub min_length: usize,
    pub max_length: usize,
    pub require_uppercase: bool,
    pub require_lowercase: bool,
    pub require_number: bool,
    pub require_special: bool,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy {
            min_length: 12,
            max_length: 128,
            require_uppercase: true,
            require_lowercase: true,
            require_number: true,
            require_special: true,
        }
    }
}

impl PasswordPolicy {
    /// Check a password; the error lists every rule it breaks.
    pub fn check(&self, password: &str) -> Result<()> {
        let mut broken = Vec::new();
        let len = password.chars().count();
        if len < self.min_length {
            broken.push(format!("at least {} characters", self.min_length));
        }
        if len > self.max_length {
            broken.push(format!("at most {} characters", self.max_length));
        }
        if self.require_uppercase && !password.chars().any(|c| c.is_uppercase()) {
            broken.push("an upper-case letter".to_string());
        }
        if self.require_lowercase && !password.chars().any(|c| c.is_lowercase()) {
            broken.push("a lower-case letter".to_string());
        }
        if self.require_number && !password.chars().any(|c| c.is_ascii_digit()) {
            broken.push("a digit".to_string());
        }
        if self.require_special && !password.chars().any(|c| !c.is_alphanumeric() && !c.is_whitespace()) {
            broken.push("a special character such as !@#$%^&*()_+.?".to_string());
        }
        if broken.is_empty() {
            Ok(())
        } else {
            Err(IdentityError::Policy(format!("the password needs {}", broken.join(", "))))
        }
    }
}

/// Hash with argon2id (OWASP parameters: 19 MiB, 2 passes, 1 lane). CPU-heavy: call it
/// from `spawn_blocking`.
pub fn hash(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| IdentityError::Internal("no randomness".into()))?;
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| IdentityError::Internal(format!("argon2: {e}")))
}

/// Verify against a PHC string. A malformed stored hash verifies as false.
pub fn verify(password: &str, phc: &str) -> bool {
    Argon2::default().verify_password(password.as_bytes(), phc).is_ok()
}

/// A random password that satisfies the default policy.
pub fn generate() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| IdentityError::Internal("no randomness".into()))?;
    let mut s: String = bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect();
    // Guarantee each class regardless of the draw.
    s.push_str("Aa7!");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_every_broken_rule() {
        let p = PasswordPolicy::default();
        let e = p.check("short").unwrap_err().to_string();
        assert!(e.contains("at least 12"), "{e}");
        assert!(e.contains("upper-case"), "{e}");
        assert!(e.contains("digit"), "{e}");
        assert!(p.check("Correct-Horse-9-battery").is_ok());
    }

    #[test]
    fn hash_verifies_only_the_right_password() {
        let h = hash("Correct-Horse-9").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("Correct-Horse-9", &h));
        assert!(!verify("Correct-Horse-8", &h));
        assert!(!verify("x", "not a phc string"));
    }

    #[test]
    fn generated_passwords_pass_the_default_policy() {
        let p = PasswordPolicy::default();
        for _ in 0..20 {
            p.check(&generate().unwrap()).unwrap();
        }
    }
}
