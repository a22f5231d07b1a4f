//! The in-memory engine: the JSON engine's semantics without files, for tests and tools.
//!
//! [`MemoryStore`] keeps the same in-memory model as the JSON engine (`crate::model`): the
//! same condition checks and conflict messages, ids in byte order, one revision per commit
//! shared by every record of the batch, imports at the next revision, [`StoreError::Closed`]
//! after [`Store::close`]. It passes the same [`conformance`](crate::conformance) suite.
//!
//! What it does not have: durability (everything is gone when it is dropped; "durable when
//! `commit` returns" holds only for the life of the process), a data folder and its lock,
//! encryption, backups, and the JSON engine's 512 MiB limit on one serialised batch.
//!
//! Commits take one write lock for the check and the apply, so they are serialised and a
//! commit is visible to every read that starts after it returns.

use std::sync::RwLock;

use async_trait::async_trait;

use crate::model::{Model, Pending, poisoned};
use crate::{Batch, Committed, Dump, Record, Result, Store, StoreError};

/// A [`Store`] held in memory. See the [module documentation](self).
///
/// ```
/// # use std::sync::Arc;
/// # use hangar_store::{Batch, MemoryStore, Store};
/// # async fn demo() -> hangar_store::Result<()> {
/// let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
/// let create = Batch::new().require_absent("users", "alice").put("users", "alice", serde_json::json!({}));
/// store.commit(create).await?;
/// assert!(store.get("users", "alice").await?.is_some());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    /// `None` once closed.
    state: RwLock<Option<Model>>,
}

impl MemoryStore {
    /// An empty, open store.
    pub fn new() -> Self {
        Self { state: RwLock::new(Some(Model::default())) }
    }

    /// The revision of the latest commit (0 for a new store).
    pub fn revision(&self) -> Result<u64> {
        self.read(|model| model.revision)
    }

    fn read<T>(&self, f: impl FnOnce(&Model) -> T) -> Result<T> {
        let state = self.state.read().map_err(|_| poisoned())?;
        state.as_ref().map(f).ok_or(StoreError::Closed)
    }

    fn write<T>(&self, f: impl FnOnce(&mut Model) -> Result<T>) -> Result<T> {
        let mut state = self.state.write().map_err(|_| poisoned())?;
        state.as_mut().map_or(Err(StoreError::Closed), f)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn engine(&self) -> &'static str {
        "memory"
    }
    fn shared(&self) -> bool {
        false
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>> {
        self.read(|model| model.get(collection, id))
    }

    async fn list(&self, collection: &str) -> Result<Vec<Record>> {
        self.read(|model| model.list(collection))
    }

    async fn list_page(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        self.read(|model| model.list_page(collection, after, limit))
    }

    async fn commit(&self, batch: Batch) -> Result<Committed> {
        batch.validate()?;
        self.write(|model| {
            model.check_conditions(&batch.conditions, &Pending::new()).map_err(StoreError::Conflict)?;
            if batch.ops.is_empty() {
                return Ok(Committed { revision: model.revision });
            }
            let revision = model.revision + 1;
            model.apply(revision, batch.ops);
            Ok(Committed { revision })
        })
    }

    async fn export(&self) -> Result<Dump> {
        self.read(Model::export)
    }

    async fn import(&self, dump: Dump) -> Result<()> {
        dump.validate()?;
        self.write(|model| {
            *model = Model::from_dump(model.revision + 1, dump);
            Ok(())
        })
    }

    async fn close(&self) -> Result<()> {
        // Closing twice is fine, as with the JSON engine.
        *self.state.write().map_err(|_| poisoned())? = None;
        Ok(())
    }
}
