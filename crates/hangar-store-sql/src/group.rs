//! Group commit for the SQL engines: the batches committed at the same time by one process go
//! to the database in one transaction, so one durable commit of the database acknowledges all
//! of them. Each batch still gets its own revision (consecutive, in the order they are
//! written), its conditions are checked against the database plus the batches before it in
//! the group, a batch whose conditions fail writes nothing and answers `Conflict`, and a batch
//! whose writes fail is rolled back to its savepoint alone. Between processes the revision
//! row's lock still serialises the groups.

use std::collections::HashMap;

use hangar_store::{Batch, Committed, Condition, Op, Result, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::common::condition_failure;

/// Most batches in one group.
pub const MAX_GROUP: usize = 256;
/// Most sealed value bytes in one group.
pub const MAX_GROUP_BYTES: usize = 16 << 20;

/// A batch waiting for its group, with its values already encoded.
pub struct Pending {
    pub batch: Batch,
    pub values: Vec<Option<Vec<u8>>>,
    pub reply: oneshot::Sender<Result<Committed>>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.values.iter().flatten().map(Vec::len).sum()
    }
}

/// The next group: `first` and whatever else is already waiting, within the limits.
pub fn collect(first: Pending, rx: &mut mpsc::Receiver<Pending>) -> Vec<Pending> {
    let mut bytes = first.bytes();
    let mut group = vec![first];
    while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
        match rx.try_recv() {
            Ok(next) => {
                bytes += next.bytes();
                group.push(next);
            }
            Err(_) => break,
        }
    }
    group
}

/// Revisions written by the earlier batches of a group: (collection, id) -> revision, or
/// `None` for a delete.
#[derive(Default)]
pub struct Overlay(HashMap<(String, String), Option<u64>>);

impl Overlay {
    pub fn get(&self, collection: &str, id: &str) -> Option<Option<u64>> {
        self.0.get(&(collection.to_string(), id.to_string())).copied()
    }

    pub fn record(&mut self, ops: &[Op], revision: u64) {
        for op in ops {
            match op {
                Op::Put { collection, id, .. } => self.0.insert((collection.clone(), id.clone()), Some(revision)),
                Op::Delete { collection, id } => self.0.insert((collection.clone(), id.clone()), None),
            };
        }
    }
}

/// The (collection, id) a condition is about.
pub fn condition_key(condition: &Condition) -> (&str, &str) {
    let (Condition::Absent { collection, id } | Condition::Revision { collection, id, .. }) = condition;
    (collection, id)
}

/// The conflict message of the first failing condition, given each condition's current revision.
pub fn first_conflict(conditions: &[Condition], current: &[Option<u64>]) -> Option<String> {
    conditions.iter().zip(current).find_map(|(c, r)| condition_failure(c, *r))
}

/// Answers every batch of a group whose transaction failed as a whole.
pub fn fail_all(group: Vec<Pending>, err: &StoreError) {
    for pending in group {
        let _ = pending.reply.send(Err(copy_error(err)));
    }
}

/// `StoreError` is not `Clone`; the group's error goes to every batch of the group.
pub fn copy_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        StoreError::Invalid(m) => StoreError::Invalid(m.clone()),
        StoreError::Closed => StoreError::Closed,
        StoreError::WrongKey { path } => StoreError::WrongKey { path: path.clone() },
        StoreError::Corrupt { path, detail } => StoreError::Corrupt { path: path.clone(), detail: detail.clone() },
        StoreError::Engine(m) => StoreError::Engine(m.clone()),
        other => StoreError::Engine(other.to_string()),
    }
}
