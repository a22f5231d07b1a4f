//! A fault-injecting [`Store`] wrapper. **A test aid**: services' tests use it (as a
//! dev-dependency) to check what a service does when the store refuses a write, such as
//! answering a server error and leaving no half-done state behind. Nothing in Hangar's
//! binary uses it.
//!
//! [`FaultyStore`] wraps any `Arc<dyn Store>` and passes every call through, except the
//! writes it is told to refuse: while [`FaultyStore::refuse_commits`] is on, or for batches
//! touching a collection given to [`FaultyStore::refuse_commits_touching`], `commit` answers
//! the chosen [`Fault`] without reaching the wrapped store, so a refused commit writes
//! nothing. Reads (`get`, `list`, `list_page`, `export`) pass through unless
//! [`FaultyStore::set_reads`] says to refuse them (the chosen [`Fault`]) or to hang them (they
//! wait until the switch changes, like a database that stopped answering); `close` always
//! passes through. Switches take effect for the next call (a hung read resumes or fails as
//! soon as the read switch changes) and can be flipped back at any time.
//!
//! ```
//! # use std::sync::Arc;
//! # use hangar_store::{Batch, FaultyStore, MemoryStore, Store, StoreError};
//! # async fn demo() -> hangar_store::Result<()> {
//! let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
//! store.refuse_commits(true);
//! let refused = store.commit(Batch::new().put("users", "alice", serde_json::json!({}))).await;
//! assert!(matches!(refused, Err(StoreError::Closed)));
//! store.refuse_commits(false);
//! store.commit(Batch::new().put("users", "alice", serde_json::json!({}))).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{Batch, Committed, Dump, Op, Record, Result, Store, StoreError};

/// The error a refused write answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    /// [`StoreError::Closed`]: the store is out of service. Services classify it as
    /// `ErrorKind::Unavailable` (503). The default.
    #[default]
    Unavailable,
    /// [`StoreError::Io`], like the JSON engine's answer when writing its journal fails.
    /// Services classify it as `ErrorKind::Internal` (500).
    Io,
}

impl Fault {
    fn error(self) -> StoreError {
        match self {
            Fault::Unavailable => StoreError::Closed,
            Fault::Io => StoreError::Io {
                path: "(fault injected by FaultyStore)".into(),
                source: std::io::Error::other("the write was refused by FaultyStore"),
            },
        }
    }
}

/// What reads do (see [`FaultyStore::set_reads`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reads {
    /// Reads pass through. The default.
    #[default]
    Pass,
    /// Reads answer the chosen [`Fault`].
    Refuse,
    /// Reads wait, without answering, until the switch changes.
    Hang,
}

#[derive(Debug, Default)]
struct Switches {
    all: bool,
    collections: BTreeSet<String>,
    fault: Fault,
}

/// A [`Store`] that refuses writes on demand. See the [module documentation](self).
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    switches: Mutex<Switches>,
    refused: AtomicU64,
    reads: watch::Sender<Reads>,
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore")
            .field("engine", &self.inner.engine())
            .field("switches", &*self.switches())
            .field("refused", &self.refused())
            .field("reads", &*self.reads.borrow())
            .finish()
    }
}

impl FaultyStore {
    /// Wraps `inner`, with every switch off: every call passes through.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            switches: Mutex::new(Switches::default()),
            refused: AtomicU64::new(0),
            reads: watch::Sender::new(Reads::Pass),
        }
    }

    /// What reads (`get`, `list`, `list_page`, `export`) do from now on; reads hung by
    /// [`Reads::Hang`] go on (or fail) at once when this changes. [`heal`](Self::heal) sets
    /// [`Reads::Pass`].
    pub fn set_reads(&self, reads: Reads) {
        self.reads.send_replace(reads);
    }

    /// Waits while reads hang, then answers the refusal if reads are refused.
    async fn read_gate(&self) -> Result<()> {
        let mut reads = self.reads.subscribe();
        loop {
            let now = *reads.borrow_and_update();
            match now {
                Reads::Pass => return Ok(()),
                Reads::Refuse => {
                    let fault = self.switches().fault;
                    tracing::debug!(?fault, "FaultyStore refused a read");
                    return Err(fault.error());
                }
                // The sender lives as long as `self`, so `changed` only answers on a change.
                Reads::Hang => {
                    if reads.changed().await.is_err() {
                        return Err(StoreError::Closed);
                    }
                }
            }
        }
    }

    /// The wrapped store, to read or write behind the faults' back.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// Refuse every commit and import (`true`), or stop doing so (`false`; commits touching
    /// a collection given to [`refuse_commits_touching`](Self::refuse_commits_touching) are
    /// still refused).
    pub fn refuse_commits(&self, refuse: bool) {
        self.switches().all = refuse;
    }

    /// Refuse (`true`), or stop refusing (`false`), the commits that touch `collection`: whose
    /// batch puts or deletes a record in it (a condition alone does not count). An import,
    /// which replaces every collection, is refused while any collection is refused.
    pub fn refuse_commits_touching(&self, collection: &str, refuse: bool) {
        let mut switches = self.switches();
        if refuse {
            switches.collections.insert(collection.to_string());
        } else {
            switches.collections.remove(collection);
        }
    }

    /// Which error refused writes answer from now on ([`Fault::Unavailable`] by default).
    pub fn set_fault(&self, fault: Fault) {
        self.switches().fault = fault;
    }

    /// Turns every switch off: every call passes through again. The fault kind is kept.
    pub fn heal(&self) {
        let mut switches = self.switches();
        switches.all = false;
        switches.collections.clear();
        drop(switches);
        self.set_reads(Reads::Pass);
    }

    /// How many writes (commits and imports) have been refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// The switches. A panic while they are held cannot leave them inconsistent (each change
    /// is one assignment), so a poisoned lock is used as is.
    fn switches(&self) -> MutexGuard<'_, Switches> {
        self.switches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error to answer if this write must be refused: when every write is, or when
    /// `touches` says the write touches one of the refused collections.
    fn refusal(&self, touches: impl FnOnce(&BTreeSet<String>) -> bool) -> Option<StoreError> {
        let switches = self.switches();
        if !switches.all && !touches(&switches.collections) {
            return None;
        }
        self.refused.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(fault = ?switches.fault, "FaultyStore refused a write");
        Some(switches.fault.error())
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>> {
        self.read_gate().await?;
        self.inner.get(collection, id).await
    }

    async fn list(&self, collection: &str) -> Result<Vec<Record>> {
        self.read_gate().await?;
        self.inner.list(collection).await
    }

    async fn list_page(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        self.read_gate().await?;
        self.inner.list_page(collection, after, limit).await
    }

    async fn commit(&self, batch: Batch) -> Result<Committed> {
        let touches = |refused: &BTreeSet<String>| {
            batch.ops.iter().any(|op| {
                let (Op::Put { collection, .. } | Op::Delete { collection, .. }) = op;
                refused.contains(collection)
            })
        };
        if let Some(error) = self.refusal(touches) {
            return Err(error);
        }
        self.inner.commit(batch).await
    }

    async fn export(&self) -> Result<Dump> {
        self.read_gate().await?;
        self.inner.export().await
    }

    async fn import(&self, dump: Dump) -> Result<()> {
        if let Some(error) = self.refusal(|refused| !refused.is_empty()) {
            return Err(error);
        }
        self.inner.import(dump).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::MemoryStore;

    fn faulty() -> FaultyStore {
        FaultyStore::new(Arc::new(MemoryStore::new()))
    }

    #[tokio::test]
    async fn a_refused_commit_writes_nothing_and_switching_back_works() {
        let store = faulty();
        let first = store.commit(Batch::new().put("users", "a", json!(1))).await.unwrap();
        store.refuse_commits(true);
        let refused = store.commit(Batch::new().put("users", "b", json!(2)).delete("users", "a")).await;
        assert!(matches!(refused, Err(StoreError::Closed)), "{refused:?}");
        // Reads still work and see nothing of the refused batch.
        assert_eq!(store.get("users", "a").await.unwrap().map(|r| r.revision), Some(first.revision));
        assert!(store.get("users", "b").await.unwrap().is_none());
        assert_eq!(store.list("users").await.unwrap().len(), 1);
        assert_eq!(store.export().await.unwrap().revision, first.revision);
        assert_eq!(store.refused(), 1);

        store.refuse_commits(false);
        let next = store.commit(Batch::new().put("users", "b", json!(2))).await.unwrap();
        assert!(next.revision > first.revision);
        assert_eq!(store.get("users", "b").await.unwrap().map(|r| r.value), Some(json!(2)));
        assert_eq!(store.refused(), 1);
    }

    #[tokio::test]
    async fn refuses_only_commits_touching_a_collection() {
        let store = faulty();
        store.refuse_commits_touching("audit", true);
        store.commit(Batch::new().put("users", "a", json!(1))).await.unwrap();
        // A condition on the collection alone does not count as touching it.
        store.commit(Batch::new().require_absent("audit", "x").put("users", "b", json!(1))).await.unwrap();
        let mixed = store.commit(Batch::new().put("users", "c", json!(1)).put("audit", "e1", json!("made c"))).await;
        assert!(matches!(mixed, Err(StoreError::Closed)), "{mixed:?}");
        assert!(store.get("users", "c").await.unwrap().is_none(), "a refused batch must write none of its records");
        let delete = store.commit(Batch::new().delete("audit", "e0")).await;
        assert!(delete.is_err(), "a delete touches its collection too: {delete:?}");
        let import = store.import(store.export().await.unwrap()).await;
        assert!(import.is_err(), "an import touches every collection: {import:?}");
        assert_eq!(store.refused(), 3);

        store.refuse_commits_touching("audit", false);
        store.commit(Batch::new().put("users", "c", json!(1)).put("audit", "e1", json!("made c"))).await.unwrap();
        assert_eq!(store.list("audit").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn reads_can_be_refused_or_hung_and_come_back() {
        let store = Arc::new(faulty());
        store.commit(Batch::new().put("users", "a", json!(1))).await.unwrap();
        store.set_reads(Reads::Refuse);
        assert!(matches!(store.get("users", "a").await, Err(StoreError::Closed)));
        assert!(store.list("users").await.is_err() && store.export().await.is_err());
        // Writes are a separate switch.
        store.commit(Batch::new().put("users", "b", json!(2))).await.unwrap();
        store.set_reads(Reads::Hang);
        let hung = tokio::spawn({
            let store = store.clone();
            async move { store.list_page("users", None, 10).await.map(|r| r.len()) }
        });
        // A hung read does not answer (here: within 50 ms); it answers once healed.
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), store.get("users", "a")).await;
        assert!(early.is_err(), "a hung read answered: {early:?}");
        store.heal();
        assert_eq!(hung.await.unwrap().unwrap(), 2);
        assert!(store.get("users", "a").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn io_fault_heal_and_pass_through() {
        let store = faulty();
        assert_eq!(store.engine(), "memory");
        store.set_fault(Fault::Io);
        store.refuse_commits(true);
        store.refuse_commits_touching("users", true);
        let refused = store.commit(Batch::new().put("hosts", "h", json!(1))).await;
        assert!(matches!(refused, Err(StoreError::Io { .. })), "{refused:?}");
        let import = store.import(Dump { format: crate::DUMP_FORMAT, ..Dump::default() }).await;
        assert!(matches!(import, Err(StoreError::Io { .. })), "{import:?}");

        store.heal();
        store.commit(Batch::new().put("users", "u", json!(1))).await.unwrap();
        // The inner store sees what passed through, and closing passes through too.
        assert!(store.inner().get("users", "u").await.unwrap().is_some());
        store.close().await.unwrap();
        assert!(matches!(store.inner().get("users", "u").await, Err(StoreError::Closed)));
    }
}
