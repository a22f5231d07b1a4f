//! Encryption of provider connection strings at rest: AES-256-GCM
//! (`aws_lc_rs::aead`) with a key kept in `<data>/secrets/catalog-providers.key`
//! (32 random bytes, mode 0600, generated on first use).
//!
//! A sealed value is `base64(nonce ‖ ciphertext ‖ tag)` with a fresh random
//! 96-bit nonce; the additional data binds it to its provider id, so a sealed
//! value copied onto another record does not open.

use std::fs;
use std::io::Write;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::CatalogError;

/// Length of the key file.
pub const KEY_LEN: usize = 32;

/// Seals and opens connection strings; also derives provider ids.
pub struct Sealer {
    key: LessSafeKey,
    id_key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(****)")
    }
}

fn internal(m: impl Into<String>) -> CatalogError {
    CatalogError::Internal(m.into())
}

impl Sealer {
    /// Builds a sealer from raw key bytes.
    pub fn from_key(bytes: &[u8]) -> Result<Self, CatalogError> {
        if bytes.len() != KEY_LEN {
            return Err(internal(format!("the catalog provider key must be {KEY_LEN} bytes, not {}", bytes.len())));
        }
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| internal("cannot build the AES-256-GCM key"))?,
        );
        let id_key = blake3::derive_key("hangar catalog provider id v1", bytes);
        Ok(Sealer { key, id_key })
    }

    /// Loads the key at `path`, creating it (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, CatalogError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; KEY_LEN];
                aws_lc_rs::rand::fill(&mut b).map_err(|_| internal("no randomness for the catalog key"))?;
                write_private(path, &b)?;
                b
            }
            Err(e) => return Err(internal(format!("cannot read {}: {e}", path.display()))),
        };
        Self::from_key(&bytes)
    }

    /// A stable id for a connection string (keyed, so ids reveal nothing).
    pub fn provider_id(&self, connection: &str) -> String {
        let h = blake3::keyed_hash(&self.id_key, connection.as_bytes());
        h.to_hex()[..32].to_string()
    }

    /// Encrypts `plain` for the record `aad`.
    pub fn seal(&self, aad: &str, plain: &str) -> Result<String, CatalogError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| internal("no randomness for a nonce"))?;
        let mut buf = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| internal("encryption failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(STANDARD.encode(out))
    }

    /// Decrypts a value sealed for `aad`.
    pub fn open(&self, aad: &str, sealed: &str) -> Result<String, CatalogError> {
        let raw = STANDARD.decode(sealed).map_err(|_| internal("a sealed provider connection is not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(internal("a sealed provider connection is truncated"));
        }
        let (n, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| internal("bad nonce"))?;
        let mut buf = rest.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf).map_err(|_| {
            internal(
                "cannot decrypt a provider connection: the catalog key in secrets/ changed, or the record was altered",
            )
        })?;
        String::from_utf8(plain.to_vec()).map_err(|_| internal("a provider connection is not text"))
    }
}

/// Writes a file readable only by its owner: temp file, fsync, rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CatalogError> {
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
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn seals_opens_and_binds_to_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/catalog-providers.key");
        let s = Sealer::load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let secret = "provider=aws-s3;bucket=b;access_key=AK;secret_key=VERY-SECRET";
        let sealed = s.seal("p1", secret).unwrap();
        assert!(!sealed.contains("VERY-SECRET"));
        assert_eq!(s.open("p1", &sealed).unwrap(), secret);
        assert!(s.open("p2", &sealed).is_err(), "opened for another record");
        // Two seals differ (fresh nonces); the key survives a reload.
        assert_ne!(s.seal("p1", secret).unwrap(), sealed);
        let again = Sealer::load_or_create(&path).unwrap();
        assert_eq!(again.open("p1", &sealed).unwrap(), secret);
        assert_eq!(again.provider_id(secret), s.provider_id(secret));
        // Another key opens nothing and gives other ids.
        let other = Sealer::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("p1", &sealed).is_err());
        assert_ne!(other.provider_id(secret), s.provider_id(secret));
    }
}
