//! The store seam of Hangar.
//!
//! A store holds named *collections* of JSON records keyed by id. Writes go through
//! [`Store::commit`] as one atomic [`Batch`]: either every operation lands or none does,
//! and when `commit` returns `Ok` the batch is durable (it survives kill -9 and power loss).
//! Optimistic concurrency comes from [`Condition`]s checked inside the same commit.
//!
//! Engines, which all pass the same [`conformance`] suite (a SQL engine comes later and must
//! pass it too):
//!
//! * [`json`]: [`JsonStore`], the default and the only durable one: a data folder with a
//!   write-ahead journal and a snapshot.
//! * [`memory`]: [`MemoryStore`], the same semantics without files (nothing survives the
//!   process), for tests and tools.
//!
//! Both keep the committed state in the same in-memory model, so conditions, conflicts,
//! revisions and paging behave alike.
//!
//! Test aid: [`faulty`] has [`FaultyStore`], a wrapper around any `Arc<dyn Store>` that
//! refuses commits on demand, and reads too (or hangs them) when asked, for services' tests
//! of store failures.
//!
//! [`sealed`] seals small secrets kept inside records.
//!
//! [`lease`] keeps a leader lease in the store itself (only `Batch` conditions), with a
//! [`Fence`] that makes a deposed leader's writes fail with [`StoreError::Conflict`];
//! [`ready`] checks, for load balancers, that the store answers within a deadline.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod conformance;
pub mod faulty;
pub mod json;
pub mod lease;
pub mod memory;
mod model;
pub mod ready;
pub mod sealed;

pub use faulty::{Fault, FaultyStore, Reads};
pub use json::{EncryptionKey, JsonStore, JsonStoreOptions};
pub use lease::{Fence, FencedBatch, Lease, LeaseConfig, LeaseHolder, LeaseTask, Role};
pub use memory::MemoryStore;
pub use ready::{Readiness, ReadinessConfig, ReadyReport};

/// Longest collection name or record id accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Checks a collection name or record id: non-empty, at most [`MAX_KEY_LEN`] bytes, no NUL.
pub fn validate_key(kind: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid(format!("empty {kind}")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::Invalid(format!("{kind} is {} bytes long, the limit is {MAX_KEY_LEN}", key.len())));
    }
    if key.contains('\0') {
        return Err(StoreError::Invalid(format!("{kind} contains a NUL character")));
    }
    Ok(())
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// Revision of the commit that last wrote this record. Revisions grow with every commit.
    pub revision: u64,
    pub value: Value,
}

/// One write inside a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Put { collection: String, id: String, value: Value },
    Delete { collection: String, id: String },
}

/// A precondition checked atomically with the batch's writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cond", rename_all = "snake_case")]
pub enum Condition {
    /// No record with this id exists.
    Absent { collection: String, id: String },
    /// The record exists and was last written at exactly this revision.
    Revision { collection: String, id: String, revision: u64 },
}

/// An atomic unit of writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(mut self, collection: &str, id: &str, value: Value) -> Self {
        self.ops.push(Op::Put { collection: collection.into(), id: id.into(), value });
        self
    }
    pub fn delete(mut self, collection: &str, id: &str) -> Self {
        self.ops.push(Op::Delete { collection: collection.into(), id: id.into() });
        self
    }
    pub fn require_absent(mut self, collection: &str, id: &str) -> Self {
        self.conditions.push(Condition::Absent { collection: collection.into(), id: id.into() });
        self
    }
    pub fn require_revision(mut self, collection: &str, id: &str, revision: u64) -> Self {
        self.conditions.push(Condition::Revision { collection: collection.into(), id: id.into(), revision });
        self
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.conditions.is_empty()
    }
    /// Checks every collection name and id of the batch with [`validate_key`]. Engines call
    /// this before writing anything, so an invalid batch answers [`StoreError::Invalid`].
    pub fn validate(&self) -> Result<()> {
        for condition in &self.conditions {
            let (Condition::Absent { collection, id } | Condition::Revision { collection, id, .. }) = condition;
            validate_key("collection", collection)?;
            validate_key("id", id)?;
        }
        for op in &self.ops {
            let (Op::Put { collection, id, .. } | Op::Delete { collection, id }) = op;
            validate_key("collection", collection)?;
            validate_key("id", id)?;
        }
        Ok(())
    }
}

/// What a successful commit reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The revision this batch was written at.
    pub revision: u64,
}

/// Every record of every collection, as plain JSON: the `db export` / `db import` format
/// and the bridge between engines.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dump {
    /// Format version of the dump itself.
    pub format: u32,
    /// Revision of the store when the dump was taken.
    pub revision: u64,
    /// collection name -> id -> value.
    pub collections: BTreeMap<String, BTreeMap<String, Value>>,
}

pub const DUMP_FORMAT: u32 = 1;

impl Dump {
    /// Checks the format version and every collection name and id.
    pub fn validate(&self) -> Result<()> {
        if self.format != DUMP_FORMAT {
            return Err(StoreError::Invalid(format!(
                "dump format {} is not supported (expected {DUMP_FORMAT})",
                self.format
            )));
        }
        for (collection, records) in &self.collections {
            validate_key("collection", collection)?;
            for id in records.keys() {
                validate_key("id", id)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A batch condition did not hold; nothing was written.
    #[error("Conflict: {0}")]
    Conflict(String),
    /// Another process holds the data folder.
    #[error(
        "The data folder {path} is in use by another Hangar process (lock file {lock}); stop it or choose another DATABASE_FOLDER"
    )]
    Locked { path: String, lock: String },
    /// The data cannot be decrypted with the key given.
    #[error("Cannot decrypt the store in {path}: wrong encryption key, or the file was altered")]
    WrongKey { path: String },
    /// The stored data is damaged beyond what recovery can repair.
    #[error("The store in {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("Invalid store input: {0}")]
    Invalid(String),
    #[error("The store is closed")]
    Closed,
    #[error("Store I/O error on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Store engine error: {0}")]
    Engine(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store seam. Object safe; engines are used as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Engine name for logs and `hangar db` output (`"json"`, `"postgres"`, ...).
    fn engine(&self) -> &'static str;
    /// Whether other processes may write this store at the same time (replicas on one
    /// database). `false` for a store one process owns (the JSON engine locks its folder):
    /// that process leads at once and its in-memory views are the truth.
    fn shared(&self) -> bool;
    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>>;
    /// Every record of a collection, sorted by id.
    async fn list(&self, collection: &str) -> Result<Vec<Record>>;
    /// Up to `limit` records with id greater than `after`, sorted by id.
    async fn list_page(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Vec<Record>>;
    /// Apply a batch atomically. When this returns `Ok`, the batch is durable.
    async fn commit(&self, batch: Batch) -> Result<Committed>;
    /// Everything, as plain JSON.
    async fn export(&self) -> Result<Dump>;
    /// Replace everything with the dump's content, atomically and durably.
    async fn import(&self, dump: Dump) -> Result<()>;
    /// Flush and release the data folder. Later calls answer [`StoreError::Closed`].
    async fn close(&self) -> Result<()>;
}
