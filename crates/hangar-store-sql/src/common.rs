//! What both engines share: the database's name without its password, sealing record values,
//! the conflict messages, and turning sqlx errors into [`StoreError`]s.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use hangar_store::{Condition, EncryptionKey, StoreError};
use serde_json::Value;

/// Where a store lives, for messages: engine, user, host, port and database, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub engine: &'static str,
    pub user: String,
    pub host: String,
    pub port: u16,
    pub database: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = if self.user.is_empty() { String::new() } else { format!("{}@", self.user) };
        write!(f, "{}://{user}{}:{}/{}", self.engine, self.host, self.port, self.database)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

/// Whether a record could have this collection name or id: a read with a name no batch
/// could write (empty, too long, with a NUL, which PostgreSQL cannot even take as a
/// parameter) finds nothing, as on the JSON engine.
pub fn storable(key: &str) -> bool {
    !key.is_empty() && key.len() <= hangar_store::MAX_KEY_LEN && !key.contains('\0')
}

/// A `list_page` cursor without its NUL and what follows: no stored id holds a NUL, so the
/// ids after `p\0...` are exactly the ids after `p`.
pub fn before_nul(after: &str) -> &str {
    after.split('\0').next().unwrap_or(after)
}

/// The error for a sqlx failure during an operation on an open store.
pub fn engine_error(target: &Target, what: &str, err: sqlx::Error) -> StoreError {
    match err {
        sqlx::Error::PoolClosed => StoreError::Closed,
        sqlx::Error::PoolTimedOut => StoreError::Engine(format!(
            "{what} on {target}: timed out waiting for a database connection (is the server up and reachable?)"
        )),
        other => StoreError::Engine(format!("{what} on {target}: {other}")),
    }
}

/// The error for a failed connection at open.
pub fn connect_error(target: &Target, err: sqlx::Error) -> StoreError {
    let detail = match err {
        sqlx::Error::PoolTimedOut => "timed out (is the server up and reachable?)".to_string(),
        other => other.to_string(),
    };
    StoreError::Engine(format!("Cannot connect to {target}: {detail}. Check DATABASE_URL and that the server is up"))
}

pub fn from_db_revision(target: &Target, revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision).map_err(|_| StoreError::Corrupt {
        path: target.to_string(),
        detail: format!("negative revision {revision} in the database"),
    })
}

/// The text of a failed condition, the same as the JSON engine's.
pub fn condition_failure(condition: &Condition, current: Option<u64>) -> Option<String> {
    let (Condition::Absent { collection, id } | Condition::Revision { collection, id, .. }) = condition;
    match (condition, current) {
        (Condition::Absent { .. }, Some(revision)) => {
            Some(format!("{collection}/{id} already exists (revision {revision})"))
        }
        (Condition::Revision { revision: expected, .. }, None) => {
            Some(format!("{collection}/{id} does not exist (expected revision {expected})"))
        }
        (Condition::Revision { revision: expected, .. }, Some(actual)) if actual != *expected => {
            Some(format!("{collection}/{id} is at revision {actual}, expected {expected}"))
        }
        _ => None,
    }
}

const KEYCHECK_AAD: &[u8] = b"hangar-sql-keycheck-v1";
const KEYCHECK_PLAIN: &[u8] = b"hangar-sql-keycheck";
const TAG_LEN: usize = 16;

/// How record values are kept: JSON text, or JSON text sealed with AES-256-GCM (aws-lc-rs)
/// with the collection and id as associated data, so a sealed value copied onto another
/// record does not open.
pub struct Codec {
    key: Option<RandomizedNonceKey>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.key.is_some() { "Codec(AES-256-GCM)" } else { "Codec(plain)" })
    }
}

fn aad_for(collection: &str, id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + collection.len() + id.len());
    aad.extend_from_slice(b"hangar-sql-v1\0");
    aad.extend_from_slice(collection.as_bytes());
    aad.push(0);
    aad.extend_from_slice(id.as_bytes());
    aad
}

impl Codec {
    pub fn new(key: Option<&EncryptionKey>) -> Result<Self, StoreError> {
        let key = match key {
            None => None,
            Some(key) => {
                let bytes = hex::decode(key.to_hex())
                    .map_err(|_| StoreError::Engine("the encryption key has no hex form".into()))?;
                Some(
                    RandomizedNonceKey::new(&AES_256_GCM, &bytes)
                        .map_err(|_| StoreError::Engine("cannot set up AES-256-GCM".into()))?,
                )
            }
        };
        Ok(Self { key })
    }

    pub fn encrypted(&self) -> bool {
        self.key.is_some()
    }

    fn seal(&self, key: &RandomizedNonceKey, aad: &[u8], plain: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let mut in_out = plain;
        in_out.reserve(TAG_LEN);
        let nonce = key
            .seal_in_place_append_tag(Aad::from(aad), &mut in_out)
            .map_err(|_| StoreError::Engine("AES-256-GCM encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + in_out.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&in_out);
        Ok(out)
    }

    fn open(key: &RandomizedNonceKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = body.to_vec();
        let len = key.open_in_place(nonce, Aad::from(aad), &mut in_out).ok()?.len();
        in_out.truncate(len);
        Some(in_out)
    }

    /// The bytes stored for a record's value.
    pub fn encode(&self, collection: &str, id: &str, value: &Value) -> Result<Vec<u8>, StoreError> {
        let plain = serde_json::to_vec(value)
            .map_err(|e| StoreError::Invalid(format!("{collection}/{id}: value does not serialise: {e}")))?;
        match &self.key {
            None => Ok(plain),
            Some(key) => self.seal(key, &aad_for(collection, id), plain),
        }
    }

    /// A record's value from its stored bytes.
    pub fn decode(&self, target: &Target, collection: &str, id: &str, stored: &[u8]) -> Result<Value, StoreError> {
        let opened;
        let plain = match &self.key {
            None => stored,
            Some(key) => {
                opened = Self::open(key, &aad_for(collection, id), stored).ok_or_else(|| StoreError::Corrupt {
                    path: target.to_string(),
                    detail: format!(
                        "record {collection}/{id} does not decrypt (altered, or moved from another record)"
                    ),
                })?;
                &opened
            }
        };
        serde_json::from_slice(plain).map_err(|e| StoreError::Corrupt {
            path: target.to_string(),
            detail: format!(
                "record {collection}/{id} is not JSON{}: {e}",
                if self.key.is_none() { " (is the database encrypted? set DATABASE_ENCRYPTION_KEY_FILE)" } else { "" }
            ),
        })
    }

    /// The key check stored in `hangar_meta` when the store is encrypted.
    pub fn keycheck(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.key {
            None => Ok(None),
            Some(key) => self.seal(key, KEYCHECK_AAD, KEYCHECK_PLAIN.to_vec()).map(Some),
        }
    }

    /// Checks the stored key check (if any) against this codec's key. `has_records` tells
    /// whether the database holds records, for an encrypted open of a plain database.
    pub fn verify(&self, target: &Target, stored: Option<&[u8]>, has_records: bool) -> Result<(), StoreError> {
        match (&self.key, stored) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(StoreError::Invalid(format!(
                "The database {target} is encrypted: set DATABASE_ENCRYPTION_KEY_FILE to its key file"
            ))),
            (Some(key), Some(stored)) => match Self::open(key, KEYCHECK_AAD, stored) {
                Some(plain) if plain == KEYCHECK_PLAIN => Ok(()),
                _ => Err(StoreError::WrongKey { path: target.to_string() }),
            },
            (Some(_), None) if has_records => Err(StoreError::Invalid(format!(
                "The database {target} holds unencrypted records: open it without DATABASE_ENCRYPTION_KEY_FILE, \
                 or copy it into an empty database with `hangar db migrate`"
            ))),
            (Some(_), None) => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target() -> Target {
        Target { engine: "postgres", user: "u".into(), host: "h".into(), port: 1, database: "d".into() }
    }

    #[test]
    fn sealed_values_round_trip_and_are_bound_to_their_record() {
        let codec = Codec::new(Some(&EncryptionKey::generate().unwrap())).unwrap();
        let sealed = codec.encode("c", "a", &json!({"secret": "s3cr3t"})).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("s3cr3t"));
        assert_eq!(codec.decode(&target(), "c", "a", &sealed).unwrap(), json!({"secret": "s3cr3t"}));
        assert!(matches!(codec.decode(&target(), "c", "b", &sealed), Err(StoreError::Corrupt { .. })));
        let other = Codec::new(Some(&EncryptionKey::generate().unwrap())).unwrap();
        let check = codec.keycheck().unwrap().unwrap();
        assert!(codec.verify(&target(), Some(&check), true).is_ok());
        assert!(matches!(other.verify(&target(), Some(&check), true), Err(StoreError::WrongKey { .. })));
        assert!(matches!(Codec::new(None).unwrap().verify(&target(), Some(&check), true), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn target_never_shows_a_password() {
        assert_eq!(target().to_string(), "postgres://u@h:1/d");
    }
}
