//! Encryption at rest: AES-256-GCM from `aws_lc_rs::aead` with a random 96-bit nonce per
//! sealed message.

use std::fmt;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;

use crate::{Result, StoreError};

/// Length of a sealed message's overhead: the nonce in front and the tag at the end.
pub(crate) const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const TAG_LEN: usize = 16;

/// A 256-bit key for encryption at rest.
///
/// A key file holds the 32 key bytes in one of three encodings, recognised in this order:
/// 1. exactly 32 raw bytes (the file is exactly 32 bytes long);
/// 2. 64 hexadecimal characters;
/// 3. standard base64 (with or without `=` padding) of 32 bytes.
///
/// Leading and trailing whitespace (such as a final newline) is ignored for the text forms.
/// `openssl rand -hex 32 > store.key` makes a suitable file.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey {
    bytes: [u8; 32],
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

impl EncryptionKey {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self { bytes }
    }

    /// A fresh random key from the system's secure random generator.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| StoreError::Engine("the system random generator failed".into()))?;
        Ok(Self { bytes })
    }

    /// Parses the content of a key file (see the type's documentation for the encodings).
    pub fn parse(content: &[u8]) -> Result<Self> {
        if let Ok(bytes) = <[u8; 32]>::try_from(content) {
            // 32 bytes of hex or base64 text cannot encode 32 bytes, so this is unambiguous.
            return Ok(Self { bytes });
        }
        let text = std::str::from_utf8(content)
            .map_err(|_| {
                StoreError::Invalid(
                    "encryption key: expected 32 raw bytes, 64 hex characters or base64 of 32 bytes".into(),
                )
            })?
            .trim();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(text, &mut bytes)
                .map_err(|e| StoreError::Invalid(format!("encryption key: bad hex: {e}")))?;
            return Ok(Self { bytes });
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .map_err(|_| {
                StoreError::Invalid(
                    "encryption key: expected 32 raw bytes, 64 hex characters or base64 of 32 bytes".into(),
                )
            })?;
        let bytes = <[u8; 32]>::try_from(decoded.as_slice()).map_err(|_| {
            StoreError::Invalid(format!("encryption key: base64 decodes to {} bytes, expected 32", decoded.len()))
        })?;
        Ok(Self { bytes })
    }

    /// Reads and parses a key file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let content =
            std::fs::read(path).map_err(|source| StoreError::Io { path: path.display().to_string(), source })?;
        Self::parse(&content)
    }

    /// The key as 64 lowercase hex characters, the form [`EncryptionKey::parse`] reads back.
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }
}

/// A ready AEAD key.
pub(crate) struct Cipher {
    key: RandomizedNonceKey,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(AES-256-GCM)")
    }
}

impl Cipher {
    pub(crate) fn new(key: &EncryptionKey) -> Result<Self> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, &key.bytes)
            .map_err(|_| StoreError::Engine("cannot set up AES-256-GCM".into()))?;
        Ok(Self { key })
    }

    /// Encrypts `plaintext`, authenticating `aad` with it. Returns `nonce || ciphertext || tag`.
    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut in_out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        in_out.extend_from_slice(plaintext);
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(aad), &mut in_out)
            .map_err(|_| StoreError::Engine("AES-256-GCM encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + in_out.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&in_out);
        Ok(out)
    }

    /// Decrypts `nonce || ciphertext || tag`. `None` when the key is wrong or the data or
    /// `aad` were altered.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = body.to_vec();
        let plain_len = self.key.open_in_place(nonce, Aad::from(aad), &mut in_out).ok()?.len();
        in_out.truncate(plain_len);
        Some(in_out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_encodings_parse_to_the_same_key() {
        let raw: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let key = EncryptionKey::from_bytes(raw);
        let hex_text = format!("{}\n", key.to_hex());
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let b64_nopad = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
        assert_eq!(EncryptionKey::parse(&raw).unwrap(), key);
        assert_eq!(EncryptionKey::parse(hex_text.as_bytes()).unwrap(), key);
        assert_eq!(EncryptionKey::parse(b64.as_bytes()).unwrap(), key);
        assert_eq!(EncryptionKey::parse(b64_nopad.as_bytes()).unwrap(), key);
        assert!(matches!(EncryptionKey::parse(b"too short"), Err(StoreError::Invalid(_))));
        assert!(matches!(EncryptionKey::parse(&[0xff; 31]), Err(StoreError::Invalid(_))));
        assert_eq!(format!("{key:?}"), "EncryptionKey(<redacted>)");
    }

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let cipher = Cipher::new(&EncryptionKey::generate().unwrap()).unwrap();
        let sealed = cipher.seal(b"aad", b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(cipher.open(b"aad", &sealed).unwrap(), b"hello");
        assert!(cipher.open(b"other aad", &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN] ^= 1;
        assert!(cipher.open(b"aad", &flipped).is_none());
        let other = Cipher::new(&EncryptionKey::generate().unwrap()).unwrap();
        assert!(other.open(b"aad", &sealed).is_none());
        // Two seals of the same message use different nonces.
        assert_ne!(cipher.seal(b"aad", b"hello").unwrap(), sealed);
    }
}
