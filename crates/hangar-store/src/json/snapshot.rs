//! The JSON snapshot form of the in-memory [`Model`] (`data.json` and the backups).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::crypto::Cipher;
use crate::model::{Collections, Model};
use crate::{Result, StoreError};

/// Value of the `format` field of every snapshot.
pub(crate) const SNAPSHOT_FORMAT: &str = "hangar-json-store";
/// Snapshot format version.
pub(crate) const SNAPSHOT_VERSION: u32 = 1;
/// Value of the `encryption` field of encrypted snapshots.
pub(crate) const SNAPSHOT_CIPHER: &str = "AES-256-GCM";
const SNAPSHOT_AAD: &[u8] = b"hangar-json-store-snapshot-v1";

#[derive(Serialize)]
struct PlainOut<'a> {
    format: &'static str,
    version: u32,
    revision: u64,
    collections: &'a Collections,
}

#[derive(Serialize)]
struct SealedOut<'a> {
    format: &'static str,
    version: u32,
    encryption: &'static str,
    nonce_and_ciphertext: &'a str,
}

#[derive(Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    collections: Option<Collections>,
    #[serde(default)]
    encryption: Option<String>,
    #[serde(default)]
    nonce_and_ciphertext: Option<String>,
}

/// Serialises the model: indented plain JSON, or a JSON envelope around the AES-256-GCM
/// sealed compact JSON when a cipher is given.
pub(crate) fn encode(model: &Model, cipher: Option<&Cipher>) -> Result<Vec<u8>> {
    let plain = PlainOut {
        format: SNAPSHOT_FORMAT,
        version: SNAPSHOT_VERSION,
        revision: model.revision,
        collections: &model.collections,
    };
    let json_err = |e: serde_json::Error| StoreError::Engine(format!("cannot serialise the snapshot: {e}"));
    match cipher {
        None => {
            let mut out = serde_json::to_vec_pretty(&plain).map_err(json_err)?;
            out.push(b'\n');
            Ok(out)
        }
        Some(cipher) => {
            let inner = serde_json::to_vec(&plain).map_err(json_err)?;
            let sealed = cipher.seal(SNAPSHOT_AAD, &inner)?;
            let text = base64::engine::general_purpose::STANDARD.encode(sealed);
            let mut out = serde_json::to_vec_pretty(&SealedOut {
                format: SNAPSHOT_FORMAT,
                version: SNAPSHOT_VERSION,
                encryption: SNAPSHOT_CIPHER,
                nonce_and_ciphertext: &text,
            })
            .map_err(json_err)?;
            out.push(b'\n');
            Ok(out)
        }
    }
}

/// Parses a snapshot written by [`encode`]. `path` names the file in errors.
pub(crate) fn decode(bytes: &[u8], cipher: Option<&Cipher>, path: &str) -> Result<Model> {
    let corrupt = |detail: String| StoreError::Corrupt { path: path.to_string(), detail };
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a valid snapshot: {e}")))?;
    if envelope.format != SNAPSHOT_FORMAT {
        return Err(corrupt(format!("unknown snapshot format {:?}", envelope.format)));
    }
    if envelope.version != SNAPSHOT_VERSION {
        return Err(corrupt(format!("unsupported snapshot version {}", envelope.version)));
    }
    match (envelope.encryption, cipher) {
        (None, None) => {
            Ok(Model { revision: envelope.revision, collections: envelope.collections.unwrap_or_default() })
        }
        (Some(alg), Some(cipher)) => {
            if alg != SNAPSHOT_CIPHER {
                return Err(corrupt(format!("unknown snapshot encryption {alg:?}")));
            }
            let text =
                envelope.nonce_and_ciphertext.ok_or_else(|| corrupt("encrypted snapshot without ciphertext".into()))?;
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| corrupt(format!("encrypted snapshot: bad base64: {e}")))?;
            let inner =
                cipher.open(SNAPSHOT_AAD, &sealed).ok_or_else(|| StoreError::WrongKey { path: path.to_string() })?;
            decode(&inner, None, path)
        }
        (Some(_), None) => Err(StoreError::Invalid(format!(
            "{path} is encrypted: configure the store's encryption key file to open it"
        ))),
        (None, Some(_)) => Err(StoreError::Invalid(format!(
            "{path} is not encrypted but an encryption key was configured; open it without a key \
             (to encrypt an existing store, export it and import it into a new encrypted store)"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Op;
    use crate::json::crypto::EncryptionKey;

    fn sample() -> Model {
        let mut model = Model::default();
        model.apply(
            1,
            vec![Op::Put { collection: "users".into(), id: "ünï".into(), value: serde_json::json!({"a": 1}) }],
        );
        model
    }

    #[test]
    fn plain_and_encrypted_round_trip() {
        let model = sample();
        let plain = encode(&model, None).unwrap();
        assert!(String::from_utf8_lossy(&plain).contains("\"users\""));
        assert_eq!(decode(&plain, None, "p").unwrap(), model);
        let cipher = Cipher::new(&EncryptionKey::generate().unwrap()).unwrap();
        let sealed = encode(&model, Some(&cipher)).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("users"));
        assert_eq!(decode(&sealed, Some(&cipher), "p").unwrap(), model);
        let other = Cipher::new(&EncryptionKey::generate().unwrap()).unwrap();
        assert!(matches!(decode(&sealed, Some(&other), "p"), Err(StoreError::WrongKey { .. })));
        assert!(matches!(decode(&sealed, None, "p"), Err(StoreError::Invalid(_))));
        assert!(matches!(decode(&plain, Some(&cipher), "p"), Err(StoreError::Invalid(_))));
        assert!(matches!(decode(b"{\"format\":", None, "p"), Err(StoreError::Corrupt { .. })));
    }
}
