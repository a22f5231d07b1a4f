//! Host credentials at rest: AES-256-GCM (`aws_lc_rs::aead`) with a key kept in
//! `<data>/secrets/orchestrator-hosts.key` (32 random bytes, mode 0600, made on first use).
//!
//! A sealed value is `base64(nonce ‖ ciphertext ‖ tag)` with a fresh random 96-bit nonce.
//! The additional data is the host id, so a sealed blob copied onto another host's record
//! does not open.

use std::path::{Path, PathBuf};

use hangar_store::sealed::{self, SealError};
use serde::{Deserialize, Serialize};

use crate::error::{OrchestratorError, Result};
use crate::model::HostCredentials;

pub const KEY_FILE: &str = "orchestrator-hosts.key";

fn internal(e: SealError) -> OrchestratorError {
    OrchestratorError::Internal(match e {
        SealError::Tampered => "cannot open host credentials: wrong key, or the record was altered".into(),
        other => format!("host credential key: {other}"),
    })
}

/// Seals host credentials with the orchestrator's key; see [`hangar_store::sealed`].
pub struct Sealer {
    inner: sealed::Sealer,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Plain {
    Basic { username: String, password: String },
    ApiKey { api_key: String },
}

impl Sealer {
    pub fn from_key(bytes: &[u8]) -> Result<Self> {
        Ok(Sealer { inner: sealed::Sealer::from_key(bytes).map_err(internal)? })
    }

    /// The key under `<data>/secrets/`, created on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        Ok(Sealer { inner: sealed::Sealer::load_or_create(&key_path(data_dir)).map_err(internal)? })
    }

    /// Seals credentials for the host `host_id`.
    pub fn seal(&self, host_id: &str, creds: &HostCredentials) -> Result<String> {
        let plain = match creds {
            HostCredentials::Basic { username, password } => {
                Plain::Basic { username: username.clone(), password: password.clone() }
            }
            HostCredentials::ApiKey { api_key } => Plain::ApiKey { api_key: api_key.clone() },
        };
        let buf = serde_json::to_vec(&plain)
            .map_err(|e| OrchestratorError::Internal(format!("serialise credentials: {e}")))?;
        self.inner.seal(host_id, &buf).map_err(internal)
    }

    /// Opens credentials sealed for `host_id`.
    pub fn open(&self, host_id: &str, sealed: &str) -> Result<HostCredentials> {
        let plain = self.inner.open(host_id, sealed).map_err(internal)?;
        let plain: Plain = serde_json::from_slice(&plain)
            .map_err(|e| OrchestratorError::Internal(format!("sealed host credentials are unreadable: {e}")))?;
        Ok(match plain {
            Plain::Basic { username, password } => HostCredentials::Basic { username, password },
            Plain::ApiKey { api_key } => HostCredentials::ApiKey { api_key },
        })
    }
}

/// Where the key lives under a data folder.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets").join(KEY_FILE)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = Sealer::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(key_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let creds = HostCredentials::Basic { username: "u".into(), password: "hunter2".into() };
        let sealed = s1.seal("h1", &creds).unwrap();
        assert!(!sealed.contains("hunter2"));
        let s2 = Sealer::load_or_create(dir.path()).unwrap();
        assert_eq!(s2.open("h1", &sealed).unwrap(), creds);
    }

    #[test]
    fn sealed_value_is_bound_to_its_host_and_tamper_evident() {
        let s = Sealer::from_key(&[7u8; 32]).unwrap();
        let creds = HostCredentials::ApiKey { api_key: "k-123".into() };
        let sealed = s.seal("h1", &creds).unwrap();
        assert!(s.open("h2", &sealed).is_err(), "opened with another host's id");
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut raw = b64.decode(&sealed).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(s.open("h1", &b64.encode(raw)).is_err(), "tampered blob opened");
        let other = Sealer::from_key(&[8u8; 32]).unwrap();
        assert!(other.open("h1", &sealed).is_err(), "opened with another key");
        // Two seals of the same value differ (fresh nonce).
        assert_ne!(sealed, s.seal("h1", &creds).unwrap());
    }
}
