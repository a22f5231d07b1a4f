//! The committed state as engines hold it in memory, shared by the JSON engine ([`crate::json`])
//! and the in-memory engine ([`crate::memory`]): applying a batch, checking conditions, and the
//! reads of the [`Store`](crate::Store) trait. No IO and no locking here; each engine decides
//! how commits are ordered and made durable.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Condition, DUMP_FORMAT, Dump, Op, Record, StoreError};

/// One record as the model keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub(crate) revision: u64,
    pub(crate) value: Value,
}

/// collection -> id -> record.
pub(crate) type Collections = BTreeMap<String, BTreeMap<String, Stored>>;

/// Writes accepted but not yet applied to the model, (collection, id) -> the revision the
/// record will have, or `None` for a delete. The JSON engine's group commit checks later
/// batches of a group against them.
pub(crate) type Pending = HashMap<(String, String), Option<u64>>;

/// The whole committed state. Collections are never empty: the last delete drops them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Model {
    pub(crate) revision: u64,
    pub(crate) collections: Collections,
}

/// The error for a lock a panicking thread left poisoned.
pub(crate) fn poisoned() -> StoreError {
    StoreError::Engine("the store's state lock is poisoned (a thread panicked)".into())
}

fn to_record(id: &str, stored: &Stored) -> Record {
    Record { id: id.to_string(), revision: stored.revision, value: stored.value.clone() }
}

impl Model {
    /// The state an import of `dump` leaves: every record at `revision`, empty collections
    /// dropped. The caller has validated the dump.
    pub(crate) fn from_dump(revision: u64, dump: Dump) -> Self {
        let collections = dump
            .collections
            .into_iter()
            .filter(|(_, records)| !records.is_empty())
            .map(|(name, records)| {
                (name, records.into_iter().map(|(id, value)| (id, Stored { revision, value })).collect())
            })
            .collect();
        Model { revision, collections }
    }

    /// Applies a batch's writes at `revision`. Empty collections are dropped.
    pub(crate) fn apply(&mut self, revision: u64, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Put { collection, id, value } => {
                    self.collections.entry(collection).or_default().insert(id, Stored { revision, value });
                }
                Op::Delete { collection, id } => {
                    if let Some(records) = self.collections.get_mut(&collection) {
                        records.remove(&id);
                        if records.is_empty() {
                            self.collections.remove(&collection);
                        }
                    }
                }
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// Revision of a record, if it exists.
    pub(crate) fn record_revision(&self, collection: &str, id: &str) -> Option<u64> {
        self.collections.get(collection)?.get(id).map(|r| r.revision)
    }

    /// Checks a batch's conditions against this state plus the `pending` writes. Returns a
    /// message naming the record on failure (the text of [`StoreError::Conflict`]).
    pub(crate) fn check_conditions(&self, conditions: &[Condition], pending: &Pending) -> Result<(), String> {
        for condition in conditions {
            let (Condition::Absent { collection, id } | Condition::Revision { collection, id, .. }) = condition;
            let current = match pending.get(&(collection.clone(), id.clone())) {
                Some(pending) => *pending,
                None => self.record_revision(collection, id),
            };
            match (condition, current) {
                (Condition::Absent { .. }, Some(revision)) => {
                    return Err(format!("{collection}/{id} already exists (revision {revision})"));
                }
                (Condition::Revision { revision: expected, .. }, None) => {
                    return Err(format!("{collection}/{id} does not exist (expected revision {expected})"));
                }
                (Condition::Revision { revision: expected, .. }, Some(actual)) if actual != *expected => {
                    return Err(format!("{collection}/{id} is at revision {actual}, expected {expected}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`Store::get`](crate::Store::get).
    pub(crate) fn get(&self, collection: &str, id: &str) -> Option<Record> {
        self.collections.get(collection).and_then(|c| c.get(id)).map(|s| to_record(id, s))
    }

    /// [`Store::list`](crate::Store::list).
    pub(crate) fn list(&self, collection: &str) -> Vec<Record> {
        self.collections.get(collection).map(|c| c.iter().map(|(id, s)| to_record(id, s)).collect()).unwrap_or_default()
    }

    /// [`Store::list_page`](crate::Store::list_page).
    pub(crate) fn list_page(&self, collection: &str, after: Option<&str>, limit: usize) -> Vec<Record> {
        let Some(records) = self.collections.get(collection) else {
            return Vec::new();
        };
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        records.range::<str, _>((start, Bound::Unbounded)).take(limit).map(|(id, s)| to_record(id, s)).collect()
    }

    /// [`Store::export`](crate::Store::export).
    pub(crate) fn export(&self) -> Dump {
        Dump {
            format: DUMP_FORMAT,
            revision: self.revision,
            collections: self
                .collections
                .iter()
                .map(|(name, records)| {
                    (name.clone(), records.iter().map(|(id, s)| (id.clone(), s.value.clone())).collect())
                })
                .collect(),
        }
    }
}
