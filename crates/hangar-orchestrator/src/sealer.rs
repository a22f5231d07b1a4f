//! Host credentials at rest: AES-256-GCM (`aws_lc_rs::aead`) with a key kept in
//! `<data>/secrets/orchestrator-hosts.key` (32 random bytes, mode 0600, made on first use).
//!
//! A sealed value is `base64(nonce ‖ ciphertext ‖ tag)` with a fresh random 96-bit nonce.
//! The additional data is the host id, so a sealed blob copied onto another host's record
//! does not open.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::error::{OrchestratorError, Result};
use crate::model::HostCredentials;

/// File name of the key, under `<data>/secrets/`.
pub const KEY_FILE: &str = "orchestrator-hosts.key";

const KEY_LEN: usize = 32;

fn internal(msg: impl Into<String>) -> OrchestratorError {
    OrchestratorError::Internal(msg.into())
}

/// Seals and opens host credentials.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

/// The serialised form of credentials, only ever inside a sealed blob.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Plain {
    Basic { username: String, password: String },
    ApiKey { api_key: String },
}

impl Sealer {
    /// Builds a sealer from 32 raw key bytes.
    pub fn from_key(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != KEY_LEN {
            return Err(internal(format!("the host credential key must be {KEY_LEN} bytes, not {}", bytes.len())));
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| internal("cannot use the host credential key"))?;
        Ok(Sealer { key: LessSafeKey::new(key) })
    }

    /// Loads the key from `<data_dir>/secrets/orchestrator-hosts.key`, generating it (mode
    /// 0600) when missing.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        let path = key_path(data_dir);
        match fs::read(&path) {
            Ok(b) => return Sealer::from_key(&b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(format!("cannot read {}: {e}", path.display()))),
        }
        let mut key = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| internal("no randomness"))?;
        write_private(&path, &key)?;
        Sealer::from_key(&key)
    }

    /// Seals credentials for the host `host_id`.
    pub fn seal(&self, host_id: &str, creds: &HostCredentials) -> Result<String> {
        let plain = match creds {
            HostCredentials::Basic { username, password } => {
                Plain::Basic { username: username.clone(), password: password.clone() }
            }
            HostCredentials::ApiKey { api_key } => Plain::ApiKey { api_key: api_key.clone() },
        };
        let mut buf = serde_json::to_vec(&plain).map_err(|e| internal(format!("serialise credentials: {e}")))?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| internal("no randomness"))?;
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(host_id.as_bytes()), &mut buf)
            .map_err(|_| internal("cannot seal host credentials"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(STANDARD.encode(out))
    }

    /// Opens credentials sealed for `host_id`.
    pub fn open(&self, host_id: &str, sealed: &str) -> Result<HostCredentials> {
        let raw = STANDARD.decode(sealed).map_err(|_| internal("sealed host credentials are not base64"))?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(internal("sealed host credentials are truncated"));
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| internal("bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(host_id.as_bytes()), &mut body)
            .map_err(|_| internal("cannot open host credentials: wrong key, or the record was altered"))?;
        let plain: Plain = serde_json::from_slice(plain)
            .map_err(|e| internal(format!("sealed host credentials are unreadable: {e}")))?;
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

/// Writes a file only its owner can read: temp file (0600), fsync, rename, fsync the folder.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| internal(format!("cannot write {}: {e}", path.display()));
    let dir = path.parent().ok_or_else(|| internal("key path has no folder"))?;
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = Sealer::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(key_path(dir.path())).unwrap().permissions().mode() & 0o777;
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
        let mut raw = STANDARD.decode(&sealed).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(s.open("h1", &STANDARD.encode(raw)).is_err(), "tampered blob opened");
        let other = Sealer::from_key(&[8u8; 32]).unwrap();
        assert!(other.open("h1", &sealed).is_err(), "opened with another key");
        // Two seals of the same value differ (fresh nonce).
        assert_ne!(sealed, s.seal("h1", &creds).unwrap());
    }
}
