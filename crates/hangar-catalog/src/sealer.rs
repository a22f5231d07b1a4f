//! Encryption of provider connection strings at rest: AES-256-GCM
//! (`aws_lc_rs::aead`) with a key kept in `<data>/secrets/catalog-providers.key`
//! (32 random bytes, mode 0600, generated on first use).
//!
//! A sealed value is `base64(nonce ‖ ciphertext ‖ tag)` with a fresh random
//! 96-bit nonce; the additional data binds it to its provider id, so a sealed
//! value copied onto another record does not open.

use std::path::Path;

use hangar_store::sealed::{self, SealError};

use crate::CatalogError;

pub const KEY_LEN: usize = sealed::KEY_LEN;

/// Seals provider connections with the catalog's key; see [`hangar_store::sealed`].
pub struct Sealer {
    inner: sealed::Sealer,
    id_key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(****)")
    }
}

fn internal(e: SealError) -> CatalogError {
    CatalogError::Internal(match e {
        SealError::Tampered => {
            "cannot decrypt a provider connection: the catalog key in secrets/ changed, or the record was altered"
                .into()
        }
        other => format!("catalog provider key: {other}"),
    })
}

impl Sealer {
    pub fn from_key(bytes: &[u8]) -> Result<Self, CatalogError> {
        Ok(Self::wrap(sealed::Sealer::from_key(bytes).map_err(internal)?))
    }

    /// Read the key file, or create it (32 random bytes, mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, CatalogError> {
        Ok(Self::wrap(sealed::Sealer::load_or_create(path).map_err(internal)?))
    }

    fn wrap(inner: sealed::Sealer) -> Self {
        let id_key = inner.derive_key("hangar catalog provider id v1");
        Sealer { inner, id_key }
    }

    /// A stable id for a connection string that reveals nothing about it.
    pub fn provider_id(&self, connection: &str) -> String {
        let h = blake3::keyed_hash(&self.id_key, connection.as_bytes());
        h.to_hex()[..32].to_string()
    }

    pub fn seal(&self, aad: &str, plain: &str) -> Result<String, CatalogError> {
        self.inner.seal(aad, plain.as_bytes()).map_err(internal)
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<String, CatalogError> {
        let plain = self.inner.open(aad, sealed).map_err(internal)?;
        String::from_utf8(plain).map_err(|_| CatalogError::Internal("a provider connection is not text".into()))
    }
}

/// Writes a file readable only by its owner: temp file, fsync, rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CatalogError> {
    sealed::write_private(path, bytes)
        .map_err(|e| CatalogError::Internal(format!("cannot write {}: {e}", path.display())))
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
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
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
