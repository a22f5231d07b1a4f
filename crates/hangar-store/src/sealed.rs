//! Small secrets at rest, for modules that keep a secret inside a record (catalog provider
//! connections, orchestrator host credentials): AES-256-GCM from `aws_lc_rs` with a 32-byte
//! key kept in a file of mode 0600, created on first use.
//!
//! A sealed value is `base64(nonce ‖ ciphertext ‖ tag)` with a fresh random 96-bit nonce.
//! Callers pass additional data (typically the record's id), so a sealed value copied onto
//! another record does not open.

use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Length of a sealing key.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the key in {path} must be {KEY_LEN} bytes, not {len}")]
    BadKey { path: String, len: usize },
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no randomness available")]
    Random,
    #[error("a sealed value is malformed")]
    Malformed,
    #[error("a sealed value does not open: the key changed, or the record was altered or moved")]
    Tampered,
}

/// Seals and opens small values with one key.
pub struct Sealer {
    key: LessSafeKey,
    raw: [u8; KEY_LEN],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(****)")
    }
}

impl Sealer {
    pub fn from_key(bytes: &[u8]) -> Result<Self, SealError> {
        let raw: [u8; KEY_LEN] =
            bytes.try_into().map_err(|_| SealError::BadKey { path: "(memory)".into(), len: bytes.len() })?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &raw)
                .map_err(|_| SealError::BadKey { path: "(memory)".into(), len: bytes.len() })?,
        );
        Ok(Sealer { key, raw })
    }

    /// Read the key file, or create it with a random key.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::Io { path: path.to_path_buf(), source };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; KEY_LEN];
                aws_lc_rs::rand::fill(&mut b).map_err(|_| SealError::Random)?;
                write_private(path, &b).map_err(io)?;
                b
            }
            Err(e) => return Err(io(e)),
        };
        Self::from_key(&bytes).map_err(|_| SealError::BadKey { path: path.display().to_string(), len: bytes.len() })
    }

    /// A key for another purpose, derived from this one (BLAKE3 `derive_key`).
    pub fn derive_key(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.raw)
    }

    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| SealError::Malformed)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(STANDARD.encode(out))
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let raw = STANDARD.decode(sealed.trim()).map_err(|_| SealError::Malformed)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (n, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| SealError::Malformed)?;
        let mut buf = rest.to_vec();
        let plain =
            self.key.open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf).map_err(|_| SealError::Tampered)?;
        Ok(plain.to_vec())
    }
}

/// Write a file readable only by its owner: temp file, fsync, rename, fsync of the folder.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("the path has no folder"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn seals_opens_binds_and_keeps_its_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/k.key");
        let s = Sealer::load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let sealed = s.seal("rec-1", b"secret").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(Sealer::load_or_create(&path).unwrap().open("rec-1", &sealed).unwrap(), b"secret");
        assert!(matches!(s.open("rec-2", &sealed), Err(SealError::Tampered)));
        assert!(matches!(s.open("rec-1", "!!"), Err(SealError::Malformed)));
        let other = Sealer::from_key(&[7u8; KEY_LEN]).unwrap();
        assert!(matches!(other.open("rec-1", &sealed), Err(SealError::Tampered)));
        assert!(Sealer::from_key(&[1u8; 5]).is_err());
    }
}
