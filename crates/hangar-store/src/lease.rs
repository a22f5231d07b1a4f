//! A leader lease kept in the store itself, built only on [`Batch`] conditions, so it works
//! on every engine that passes the [`conformance`](crate::conformance) suite.
//!
//! # Records
//!
//! A lease named `N` is two records in the collection [`LEASES`]:
//!
//! * `N`, the **holder record** `{holder, token, since}`: written only when the holder
//!   changes (acquire, take-over, release). Its revision is what a [`Fence`] checks, so it
//!   stays the same for as long as one holder keeps the lease. It is never deleted, so the
//!   fencing token (`token`, +1 at every acquisition) only grows.
//! * `N.beat`, the **renewal record** `{holder, token, beat}`: rewritten by every renewal,
//!   each time in a batch that requires the holder record's revision, so only the current
//!   holder can renew.
//!
//! # Time, and why no shared clock is needed
//!
//! Nobody compares timestamps written by another replica. A replica that wants the lease
//! watches the two records' revisions with its own monotonic clock: it takes the lease over
//! only after it has seen them **unchanged for a whole [`LeaseConfig::duration`]** (then its
//! take-over batch requires exactly those revisions, so a renewal that lands meanwhile makes
//! it fail). The holder, for its part, counts from the moment it *sent* its last successful
//! renewal and stops considering itself leader after [`LeaseConfig::holder_validity`] (half
//! the duration) without a successful renewal. A watcher starts counting only after it has
//! read the renewal, which happened after the holder sent it, so the holder stops at least
//! half a lease period before anyone may take over.
//!
//! The assumption: the replicas' monotonic clocks *run* at rates that differ by less than a
//! factor of two over one lease period (wall clocks may be off by any amount; they are
//! only shown, never compared). A process paused longer than that (SIGSTOP, a VM freeze)
//! cannot notice it stopped leading; that is what the fence is for: every write of leader
//! work carries [`Fence::guard`], the condition that the holder record is still at the
//! revision it had when this holder acquired the lease, so once someone else took over the
//! paused ex-leader's write fails with [`StoreError::Conflict`] and writes nothing.
//!
//! A store used by one process only (the JSON engine: its data folder lock refuses a second
//! process) can set [`LeaseConfig::sole_process`]: a previous holder recorded in the store
//! can only be an earlier run of this process, so the lease is taken over at once, and
//! [`Lease::spawn`] does not renew it (nobody else can be waiting for it).
//!
//! [`Lease`] has the single steps (`try_acquire`, `renew`, `release`, `holder`);
//! [`Lease::spawn`] runs them in a task and reports the role through a watch channel.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{Batch, Record, Result, Store, StoreError};

/// The collection lease records live in.
pub const LEASES: &str = "leases";

/// The lease's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long others watch the lease unchanged before they take it over.
    pub duration: Duration,
    /// How often the holder renews and a follower looks again. At most a quarter of
    /// `duration` (so the holder tries at least twice before it stops leading).
    pub renew_every: Duration,
    /// The store serves this process only (the JSON engine): take over any recorded holder
    /// at once.
    pub sole_process: bool,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { duration: Duration::from_secs(6), renew_every: Duration::from_secs(1), sole_process: false }
    }
}

impl LeaseConfig {
    /// How long the holder keeps leading after it sent its last successful renewal: half
    /// the duration (see the module documentation).
    pub fn holder_validity(&self) -> Duration {
        self.duration / 2
    }

    /// Checks the timings.
    pub fn validate(&self) -> Result<()> {
        if self.renew_every.is_zero() || self.renew_every.saturating_mul(4) > self.duration {
            return Err(StoreError::Invalid(format!(
                "a lease renewed every {} ms must last at least four times that (it lasts {} ms)",
                self.renew_every.as_millis(),
                self.duration.as_millis()
            )));
        }
        Ok(())
    }
}

/// Who holds a lease, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    /// The holder's id (a replica id).
    pub holder: String,
    /// The fencing token of this holding.
    pub token: u64,
    /// When the holder acquired it, by its own wall clock (shown, never compared).
    pub since: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HolderRecord {
    holder: Option<String>,
    token: u64,
    since: chrono::DateTime<chrono::Utc>,
}

/// Proof of holding a lease: adds to a batch the condition that the lease is still held
/// with this token. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    name: String,
    holder: String,
    token: u64,
    revision: u64,
}

impl Fence {
    /// The fencing token: grows with every acquisition of the lease.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The holder's id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The lease's name.
    pub fn lease(&self) -> &str {
        &self.name
    }

    /// `batch` with the condition that the lease is still held with this token: once
    /// another holder took it (or this one released it) the commit answers
    /// [`StoreError::Conflict`] and writes nothing.
    pub fn guard(&self, batch: Batch) -> Batch {
        batch.require_revision(LEASES, &self.name, self.revision)
    }
}

/// Adds a [`Fence`] to a batch: `Batch::new().put(..).fenced(&fence)`.
pub trait FencedBatch {
    /// The batch with the fence's condition (see [`Fence::guard`]).
    fn fenced(self, fence: &Fence) -> Batch;
    /// The batch with the fence's condition when there is a fence, unchanged otherwise.
    fn fenced_by(self, fence: Option<&Fence>) -> Batch;
}

impl FencedBatch for Batch {
    fn fenced(self, fence: &Fence) -> Batch {
        fence.guard(self)
    }
    fn fenced_by(self, fence: Option<&Fence>) -> Batch {
        match fence {
            Some(f) => f.guard(self),
            None => self,
        }
    }
}

/// What a follower last saw of the lease, by its own monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    holder_revision: u64,
    beat_revision: Option<u64>,
    since: Instant,
}

/// One replica's handle on a named lease in a store.
pub struct Lease {
    store: Arc<dyn Store>,
    name: String,
    beat_id: String,
    me: String,
    config: LeaseConfig,
    seen: Mutex<Option<Seen>>,
    /// The holder as last read or written by this handle.
    last_holder: Mutex<Option<LeaseHolder>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("name", &self.name).field("me", &self.me).field("config", &self.config).finish()
    }
}

fn decode(record: &Record) -> Result<HolderRecord> {
    serde_json::from_value(record.value.clone())
        .map_err(|e| StoreError::Invalid(format!("lease record {}/{} is unreadable: {e}", LEASES, record.id)))
}

fn encode(record: &HolderRecord) -> Result<serde_json::Value> {
    serde_json::to_value(record).map_err(|e| StoreError::Invalid(format!("lease record: {e}")))
}

/// A replica id: the host name, the process id and a random part (unique per start).
pub fn replica_id() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "hangar".into());
    let mut random = [0u8; 4];
    // Without randomness the process id and the start time still tell runs apart.
    if aws_lc_rs::rand::fill(&mut random).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        random = nanos.subsec_nanos().to_le_bytes();
    }
    format!("{host}-{}-{}", std::process::id(), hex::encode(random))
}

impl Lease {
    /// A handle on the lease `name`, for the holder id `me` (unique per replica and start;
    /// see [`replica_id`]).
    pub fn new(store: Arc<dyn Store>, name: &str, me: &str, config: LeaseConfig) -> Result<Lease> {
        crate::validate_key("lease name", name)?;
        crate::validate_key("holder id", me)?;
        config.validate()?;
        Ok(Lease {
            store,
            beat_id: format!("{name}.beat"),
            name: name.to_string(),
            me: me.to_string(),
            config,
            seen: Mutex::new(None),
            last_holder: Mutex::new(None),
        })
    }

    /// This replica's holder id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The timings.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn seen(&self) -> MutexGuard<'_, Option<Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn note_holder(&self, holder: Option<LeaseHolder>) {
        *self.last_holder.lock().unwrap_or_else(PoisonError::into_inner) = holder;
    }

    /// The holder as this handle last read or wrote it (`None`: nobody, or not read yet).
    pub fn last_holder(&self) -> Option<LeaseHolder> {
        self.last_holder.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Who holds the lease as recorded now (`None`: nobody, or released). A holder that
    /// died stays recorded until someone takes over.
    pub async fn holder(&self) -> Result<Option<LeaseHolder>> {
        let Some(record) = self.store.get(LEASES, &self.name).await? else { return Ok(None) };
        let h = decode(&record)?;
        Ok(h.holder.map(|holder| LeaseHolder { holder, token: h.token, since: h.since }))
    }

    /// One attempt to acquire the lease: it succeeds when nobody holds it, it was released,
    /// this replica is the recorded holder, the store serves this process only, or this
    /// replica has seen it unchanged for a whole lease period. `Ok(None)`: someone else
    /// holds it (call again every [`LeaseConfig::renew_every`]; the watch is kept between
    /// calls).
    pub async fn try_acquire(&self) -> Result<Option<Fence>> {
        let holder = self.store.get(LEASES, &self.name).await?;
        let beat = self.store.get(LEASES, &self.beat_id).await?;
        let now = Instant::now();
        let (batch, token) = match &holder {
            None => {
                self.note_holder(None);
                (Batch::new().require_absent(LEASES, &self.name), 1)
            }
            Some(record) => {
                let current = decode(record)?;
                self.note_holder(current.holder.clone().map(|holder| LeaseHolder {
                    holder,
                    token: current.token,
                    since: current.since,
                }));
                let free = match &current.holder {
                    None => true,
                    Some(h) if *h == self.me || self.config.sole_process => true,
                    Some(_) => {
                        let observed = Seen {
                            holder_revision: record.revision,
                            beat_revision: beat.as_ref().map(|b| b.revision),
                            since: now,
                        };
                        let mut seen = self.seen();
                        match *seen {
                            Some(s)
                                if s.holder_revision == observed.holder_revision
                                    && s.beat_revision == observed.beat_revision =>
                            {
                                now.duration_since(s.since) >= self.config.duration
                            }
                            _ => {
                                *seen = Some(observed);
                                false
                            }
                        }
                    }
                };
                if !free {
                    return Ok(None);
                }
                (Batch::new().require_revision(LEASES, &self.name, record.revision), current.token.saturating_add(1))
            }
        };
        let batch = match &beat {
            Some(b) => batch.require_revision(LEASES, &self.beat_id, b.revision),
            None => batch.require_absent(LEASES, &self.beat_id),
        };
        let since = chrono::Utc::now();
        let record = HolderRecord { holder: Some(self.me.clone()), token, since };
        let batch = batch.put(LEASES, &self.name, encode(&record)?).put(
            LEASES,
            &self.beat_id,
            json!({"holder": self.me, "token": token, "beat": 0}),
        );
        match self.store.commit(batch).await {
            Ok(committed) => {
                *self.seen() = None;
                self.note_holder(Some(LeaseHolder { holder: self.me.clone(), token, since }));
                let previous = holder.as_ref().and_then(|r| decode(r).ok()).and_then(|h| h.holder);
                info!(lease = %self.name, holder = %self.me, token, ?previous, "lease acquired");
                Ok(Some(Fence {
                    name: self.name.clone(),
                    holder: self.me.clone(),
                    token,
                    revision: committed.revision,
                }))
            }
            // Someone renewed, released or acquired meanwhile: not ours this time.
            Err(StoreError::Conflict(detail)) => {
                debug!(lease = %self.name, %detail, "lease changed while acquiring");
                *self.seen() = None;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Renews the lease held with `fence`. [`StoreError::Conflict`]: it is no longer held
    /// with this fence (taken over or released); stop leader work at once.
    pub async fn renew(&self, fence: &Fence, beat: u64) -> Result<()> {
        let batch =
            Batch::new().put(LEASES, &self.beat_id, json!({"holder": self.me, "token": fence.token, "beat": beat}));
        self.store.commit(fence.guard(batch)).await.map(drop)
    }

    /// Gives the lease up, so another replica may take it at once. [`StoreError::Conflict`]:
    /// it was not held with this fence any more.
    pub async fn release(&self, fence: &Fence) -> Result<()> {
        let record = HolderRecord { holder: None, token: fence.token, since: chrono::Utc::now() };
        let batch = Batch::new().put(LEASES, &self.name, encode(&record)?);
        self.store.commit(fence.guard(batch)).await?;
        self.note_holder(None);
        info!(lease = %self.name, holder = %self.me, token = fence.token, "lease released");
        Ok(())
    }

    /// Runs the lease in a task: acquire when possible, renew every
    /// [`LeaseConfig::renew_every`], and report the role. The role turns to follower as soon
    /// as a renewal is refused, or when no renewal succeeded for
    /// [`LeaseConfig::holder_validity`] (by this process's monotonic clock; a renewal that
    /// hangs is abandoned then), well before others may take over.
    pub fn spawn(self: Arc<Self>) -> LeaseTask {
        let (role_tx, role_rx) = watch::channel(Role::Follower);
        let (leader_tx, leader_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(self.run(role_tx, leader_tx, stop_rx));
        LeaseTask { role: role_rx, leader: leader_rx, stop: Some(stop_tx), task: Some(task) }
    }

    async fn run(
        self: Arc<Self>,
        role_tx: watch::Sender<Role>,
        leader_tx: watch::Sender<Option<LeaseHolder>>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let every = self.config.renew_every;
        let mut held: Option<(Fence, Instant)> = None;
        let mut beat = 0u64;
        loop {
            let started = Instant::now();
            let mut wake = started + every;
            match held.take() {
                None => match tokio::time::timeout(every, self.try_acquire()).await {
                    Ok(Ok(Some(fence))) => {
                        held = Some((fence.clone(), started + self.config.holder_validity()));
                        role_tx.send_replace(Role::Leader(fence));
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => debug!(lease = %self.name, error = %e, "cannot read the lease"),
                    Err(_) => debug!(lease = %self.name, "reading the lease timed out"),
                },
                // A sole process never loses the lease to anyone: no renewals (and no write
                // every second into a store that serves only it).
                Some((fence, _)) if self.config.sole_process => {
                    held = Some((fence, Instant::now() + Duration::from_secs(365 * 24 * 3600)));
                    wake = Instant::now() + Duration::from_secs(3600);
                }
                Some((fence, valid_until)) => {
                    beat += 1;
                    match tokio::time::timeout_at(valid_until, self.renew(&fence, beat)).await {
                        Ok(Ok(())) => held = Some((fence, started + self.config.holder_validity())),
                        Ok(Err(StoreError::Conflict(_))) => {
                            warn!(lease = %self.name, token = fence.token, "lease lost: another replica holds it");
                        }
                        Ok(Err(e)) if Instant::now() < valid_until => {
                            warn!(lease = %self.name, error = %e, "lease renewal failed; trying again");
                            held = Some((fence, valid_until));
                        }
                        Ok(Err(e)) => warn!(lease = %self.name, error = %e, "lease renewal overdue: leader work stops"),
                        Err(_) => warn!(lease = %self.name, "lease renewal overdue: leader work stops"),
                    }
                    match &held {
                        Some((_, valid_until)) => wake = wake.min(*valid_until),
                        None => {
                            role_tx.send_replace(Role::Follower);
                        }
                    }
                }
            }
            let holder = self.last_holder();
            leader_tx.send_if_modified(|seen| {
                let changed = *seen != holder;
                *seen = holder;
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = &mut stop => break,
            }
            // Woken at the end of the holding's validity without a renewal in between.
            if let Some((_, valid_until)) = &held
                && Instant::now() >= *valid_until
            {
                warn!(lease = %self.name, "lease renewal overdue: leader work stops");
                held = None;
                role_tx.send_replace(Role::Follower);
            }
        }
        role_tx.send_replace(Role::Follower);
        if let Some((fence, _)) = held
            && let Err(e) = self.release(&fence).await
        {
            debug!(lease = %self.name, error = %e, "lease not released");
        }
        leader_tx.send_replace(self.last_holder());
    }
}

/// A replica's role under a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Follower,
    /// This replica holds the lease, with this fence.
    Leader(Fence),
}

impl Role {
    /// The fence while leading.
    pub fn fence(&self) -> Option<&Fence> {
        match self {
            Role::Leader(f) => Some(f),
            Role::Follower => None,
        }
    }
}

/// The running lease (see [`Lease::spawn`]). Dropping it stops the task without releasing
/// the lease (others take over after a lease period); [`LeaseTask::shutdown`] releases it.
#[derive(Debug)]
pub struct LeaseTask {
    role: watch::Receiver<Role>,
    leader: watch::Receiver<Option<LeaseHolder>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LeaseTask {
    /// The role, and its changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Who leads, as this replica last read or wrote the lease (the recorded holder; a
    /// dead holder stays recorded until someone takes over), and its changes.
    pub fn leader(&self) -> watch::Receiver<Option<LeaseHolder>> {
        self.leader.clone()
    }

    /// Stops leading and following, releasing the lease if held, and waits for that.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaseTask {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::MemoryStore;

    fn config() -> LeaseConfig {
        LeaseConfig { duration: Duration::from_secs(4), renew_every: Duration::from_secs(1), sole_process: false }
    }

    #[test]
    fn timings_are_checked() {
        let bad = LeaseConfig { duration: Duration::from_secs(3), renew_every: Duration::from_secs(1), ..config() };
        assert!(bad.validate().is_err());
        assert!(config().validate().is_ok());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        assert!(Lease::new(store, "", "me", config()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sole_process_takes_over_its_previous_run_at_once() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let before = Lease::new(store.clone(), "leader", "run-1", config()).unwrap();
        let first = before.try_acquire().await.unwrap().unwrap();
        let sole = LeaseConfig { sole_process: true, ..config() };
        let after = Lease::new(store.clone(), "leader", "run-2", sole).unwrap();
        let second = after.try_acquire().await.unwrap().expect("a sole process acquires at once");
        assert!(second.token() > first.token());
        assert_eq!(after.holder().await.unwrap().map(|h| h.holder), Some("run-2".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_renews_steps_down_when_renewals_fail_and_releases_on_shutdown() {
        let faulty = Arc::new(crate::FaultyStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn Store> = faulty.clone();
        let lease = Arc::new(Lease::new(store.clone(), "leader", "a", config()).unwrap());
        let task = lease.clone().spawn();
        let mut role = task.role();
        role.wait_for(|r| r.fence().is_some()).await.unwrap();
        let mut leader = task.leader();
        leader.wait_for(|l| l.as_ref().is_some_and(|l| l.holder == "a" && l.token == 1)).await.unwrap();
        // Several renewals later it still leads.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(role.borrow().fence().is_some());
        // The store refuses writes: the holder steps down within its validity, before the
        // lease period others wait.
        let refused_at = Instant::now();
        faulty.refuse_commits(true);
        role.wait_for(|r| r.fence().is_none()).await.unwrap();
        assert!(refused_at.elapsed() <= config().holder_validity() + config().renew_every);
        faulty.refuse_commits(false);
        // The recorded holder is still this replica: it takes the lease back with a new token.
        role.wait_for(|r| r.fence().is_some_and(|f| f.token() == 2)).await.unwrap();
        task.shutdown().await;
        assert_eq!(lease.holder().await.unwrap(), None, "shutdown releases the lease");
    }
}
