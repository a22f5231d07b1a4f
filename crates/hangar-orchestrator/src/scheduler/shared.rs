//! Several replicas over one store: exact reservations and current views.
//!
//! Each replica places in its own in-memory ledger (fast, as a single process does), then
//! makes the hold durable in the host's capacity record ([`CAPACITY`], one per host), in a
//! batch that requires the record's revision this replica last read. Every replica that
//! reserves on, releases on or confirms a VM on a host rewrites that record, so a replica
//! whose picture of the host is stale (another replica reserved or created there
//! meanwhile) gets `Conflict`: it re-reads the host (its record, its capacity record with
//! the other replicas' holds, and the orchestrator's VM records on it), releases its
//! in-memory hold and places again. A commit that succeeds was therefore decided on the
//! host's current state, so two replicas never promise the same room.
//!
//! Order that keeps the count exact: a confirmed VM's record is written before its hold is
//! removed from the capacity record, and a refresh reads the capacity record before the VM
//! records, so a VM is always counted as a hold, as a VM, or (briefly) both, never neither.
//!
//! Holds carry a wall-clock expiry (the create timeout plus the reservation TTL) so a
//! replica that died holding room frees it; any writer drops expired holds.
//!
//! Besides conflicts, every replica re-reads the hosts, capacity records and VM records
//! on each tick ([`Scheduler::refresh_shared`]), so reads and queued requests on any replica
//! follow the others' changes. Only a scheduler made [`Scheduler::share_store`] does any of
//! this; a single process keeps the in-memory path alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use hangar_store::{Batch, StoreError};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{Leadership, Scheduler, lock, to_value, view_remove, view_upsert};
use crate::clock;
use crate::error::{OrchestratorError, Result};
use crate::model::*;
use crate::placement::{Decision, PlacementRequest};
use crate::reservations::Reservation;

/// The collection of per-host capacity records (id: the host id).
pub const CAPACITY: &str = "orchestrator_host_capacity";

/// Holds on one host, by `<replica>:<ledger id>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CapacityRecord {
    #[serde(default)]
    holds: BTreeMap<String, Hold>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hold {
    replica: String,
    resources: ResourceSet,
    #[serde(default)]
    macos: bool,
    expires_at: DateTime<Utc>,
}

/// What this replica last read of one host's capacity record.
#[derive(Debug, Clone)]
struct Seen {
    /// The record's revision (0: no record).
    revision: u64,
    record: CapacityRecord,
    /// The [`Shared::epoch`] at which the ledger took the record's holds in.
    epoch: u64,
}

/// This replica's identity and what it last read of each host's capacity record.
#[derive(Debug)]
pub(crate) struct Shared {
    replica: String,
    seen: Mutex<HashMap<String, Seen>>,
    /// Grows each time a host's holds from the store replace the ledger's: a decision made
    /// before that (at a smaller epoch) did not count them, and places again.
    epoch: AtomicU64,
    /// This replica's own holds are written one at a time, so they do not race each other.
    gate: tokio::sync::Mutex<()>,
    /// Whether the hosts were read from the store once since start.
    synced: AtomicBool,
    /// Host id -> ids of the orchestrator's VM records on it, as last read.
    records: Mutex<HashMap<String, HashSet<String>>>,
}

impl Shared {
    pub(crate) fn new(replica: String) -> Self {
        Shared {
            replica,
            seen: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            gate: tokio::sync::Mutex::new(()),
            synced: AtomicBool::new(false),
            records: Mutex::new(HashMap::new()),
        }
    }
}

fn hold_key(replica: &str, id: u64) -> String {
    format!("{replica}:{id}")
}

impl Scheduler {
    /// Makes this scheduler share its store with other replicas (see the module's notes):
    /// `replica` names it in the holds it writes. Call once, before serving.
    pub fn share_store(&self, replica: impl Into<String>) {
        let _ = self.inner.shared.set(Shared::new(replica.into()));
    }

    /// Whether this scheduler shares its store with other replicas.
    pub fn shares_store(&self) -> bool {
        self.inner.shared.get().is_some()
    }

    /// The epoch to pass to [`Scheduler::hold_in_store`], read before placing.
    pub(super) fn shared_epoch(&self) -> u64 {
        self.inner.shared.get().map_or(0, |s| s.epoch.load(Ordering::SeqCst))
    }

    /// Takes every host's stored status at the next re-read (after leading stopped).
    pub(super) fn resync_shared(&self) {
        if let Some(shared) = self.inner.shared.get() {
            shared.synced.store(false, Ordering::SeqCst);
        }
    }

    fn keep_runtime(&self) -> bool {
        !matches!(self.leadership(), Leadership::Follower)
    }

    /// Re-reads every host, capacity record and VM record from the store (each tick, on
    /// every replica sharing the store).
    pub async fn refresh_shared(&self) -> Result<()> {
        let Some(shared) = self.inner.shared.get() else { return Ok(()) };
        // Capacity records first, VM records after (see the module's notes).
        let caps = self.inner.registry.store().list(CAPACITY).await?;
        let first = !shared.synced.load(Ordering::SeqCst);
        self.inner.registry.sync_from_store(self.keep_runtime(), first).await?;
        shared.synced.store(true, Ordering::SeqCst);
        let vms = self.inner.registry.store().list(VMS).await?;
        let mut by_host: HashMap<String, Vec<OrchestratedVm>> = HashMap::new();
        for rec in vms {
            if let Ok(vm) = serde_json::from_value::<OrchestratedVm>(rec.value) {
                by_host.entry(vm.host_id.clone()).or_default().push(vm);
            }
        }
        let mut seen_caps: HashMap<String, (u64, CapacityRecord)> = HashMap::new();
        for rec in caps {
            let record: CapacityRecord = serde_json::from_value(rec.value).unwrap_or_default();
            seen_caps.insert(rec.id, (rec.revision, record));
        }
        for id in self.inner.registry.ids() {
            let (revision, record) = seen_caps.remove(&id).unwrap_or_default();
            self.adopt_capacity(shared, &id, revision, record, by_host.remove(&id).unwrap_or_default());
        }
        self.drain();
        Ok(())
    }

    /// Re-reads one host after a conflict on its capacity record.
    async fn refresh_host(&self, shared: &Shared, host_id: &str) -> Result<()> {
        let store = self.inner.registry.store().clone();
        let (revision, record) = match store.get(CAPACITY, host_id).await? {
            Some(rec) => (rec.revision, serde_json::from_value(rec.value).unwrap_or_default()),
            None => (0, CapacityRecord::default()),
        };
        self.inner.registry.sync_from_store(self.keep_runtime(), false).await?;
        let mut vms = Vec::new();
        for rec in store.list(VMS).await? {
            if let Ok(vm) = serde_json::from_value::<OrchestratedVm>(rec.value)
                && vm.host_id == host_id
            {
                vms.push(vm);
            }
        }
        self.adopt_capacity(shared, host_id, revision, record, vms);
        Ok(())
    }

    /// Takes a host's capacity record and orchestrator VMs as read: other replicas' holds
    /// go into the ledger (when the record changed since last read), VMs the view does not
    /// list yet are counted in it.
    fn adopt_capacity(
        &self,
        shared: &Shared,
        host_id: &str,
        revision: u64,
        record: CapacityRecord,
        vms: Vec<OrchestratedVm>,
    ) {
        // VMs whose record went since the last read were deleted through the orchestrator
        // (maybe by another replica): they leave the view too.
        let now_ids: HashSet<String> = vms.iter().map(|v| v.id.clone()).collect();
        let gone: Vec<String> = {
            let mut known = lock(&shared.records);
            let before = known.insert(host_id.to_string(), now_ids.clone()).unwrap_or_default();
            before.difference(&now_ids).cloned().collect()
        };
        if !gone.is_empty() {
            self.inner.registry.update_in_memory(host_id, |h| {
                for id in &gone {
                    view_remove(h, id);
                }
            });
        }
        if !vms.is_empty() {
            self.inner.registry.update_in_memory(host_id, |h| {
                for vm in vms {
                    if h.vms.iter().any(|v| v.id == vm.id) {
                        continue;
                    }
                    view_upsert(
                        h,
                        VmSummary {
                            id: vm.id,
                            name: vm.name,
                            // Counted as active until the host says otherwise.
                            state: hangar_hypervisor::VmState::Running,
                            os: if vm.os == Os::Macos { "macosx".into() } else { String::new() },
                            cpu: vm.resources.cpu,
                            memory_mb: vm.resources.memory_mb,
                            disk_mb: vm.resources.disk_mb,
                            owner: Some(vm.owner),
                            machine: None,
                        },
                    );
                }
            });
        }
        let known = lock(&shared.seen).get(host_id).map(|s| s.revision);
        if known == Some(revision) {
            return;
        }
        let now = self.inner.clock.now();
        let remote: Vec<_> = record
            .holds
            .values()
            .filter(|h| h.replica != shared.replica && h.expires_at > now)
            .map(|h| (h.resources, h.macos, h.expires_at))
            .collect();
        // Ledger first, epoch after: a decision that read the epoch before this saw the old
        // holds, and its commit will see the new epoch.
        self.inner.ledger.set_remote(host_id, remote);
        let epoch = shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&shared.seen).insert(host_id.to_string(), Seen { revision, record, epoch });
    }

    /// Makes a hold taken in memory durable in the host's capacity record. [`Held::Again`]:
    /// the record changed since this replica read it (another replica reserved, released or
    /// created there), or the decision predates its last read: the caller releases the hold
    /// and places again. [`Held::Full`]: the host has no room by the store's count.
    pub(super) async fn hold_in_store(
        &self,
        decision: &Decision,
        reservation: &Reservation,
        decided_at: u64,
    ) -> Result<Held> {
        let Some(shared) = self.inner.shared.get() else { return Ok(Held::Yes) };
        let host_id = &decision.host_id;
        let _one = shared.gate.lock().await;
        let seen = lock(&shared.seen).get(host_id).cloned();
        let Some(Seen { revision, mut record, epoch }) = seen else {
            // Never read: read it, then place again on what it says.
            drop(_one);
            self.refresh_host(shared, host_id).await?;
            return Ok(Held::Again);
        };
        if epoch > decided_at {
            // The host's holds were re-read after the decision: decide again on them.
            return Ok(Held::Again);
        }
        let now = self.inner.clock.now();
        record.holds.retain(|_, h| h.expires_at > now);
        // Checked against the store, not the view (which a host's late listing or a record
        // read can leave behind for a moment): the orchestrator's VM records on the host,
        // other VMs the view knows, and every hold in the record, which the commit below
        // requires unchanged (VM records are written before their holds go, so a VM counts
        // at least once).
        if !self.fits_by_store(host_id, &record, reservation.resources).await? {
            debug!(host = %host_id, "the host is full by the store's count; placing elsewhere");
            drop(_one);
            self.refresh_host(shared, host_id).await?;
            return Ok(Held::Full);
        }
        let ttl = self.inner.config.create_timeout + self.inner.config.reservation_ttl;
        record.holds.insert(
            hold_key(&shared.replica, reservation.id),
            Hold {
                replica: shared.replica.clone(),
                resources: reservation.resources,
                macos: reservation.macos,
                expires_at: clock::add(now, ttl),
            },
        );
        let batch = conditioned(Batch::new(), host_id, revision).put(CAPACITY, host_id, to_value(&record)?);
        match self.inner.registry.store().commit(batch).await {
            Ok(c) => {
                lock(&shared.seen).insert(host_id.clone(), Seen { revision: c.revision, record, epoch });
                Ok(Held::Yes)
            }
            Err(StoreError::Conflict(_)) => {
                debug!(host = %host_id, "another replica changed the host meanwhile; placing again");
                drop(_one);
                self.refresh_host(shared, host_id).await?;
                Ok(Held::Again)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Places `req` and holds the room as a create does (the decision in memory, then on a
    /// shared store the hold committed into the host's capacity record, placing again on a
    /// lost race or a host full by the store's count), without creating anything: for
    /// benchmarks and capacity probes. Give the answer back with [`Scheduler::release_hold`].
    pub async fn place_and_hold(&self, req: &PlacementRequest) -> Result<crate::reservations::Granted> {
        let mut req = req.clone();
        for _ in 0..64 {
            let decided_at = self.shared_epoch();
            let (decision, reservation) = self.reserve(&req)?;
            match self.hold_in_store(&decision, &reservation, decided_at).await {
                Ok(Held::Yes) => return Ok((decision, reservation)),
                Ok(again) => {
                    self.inner.ledger.release(reservation.id);
                    if again == Held::Full {
                        req.exclude.insert(decision.host_id.clone());
                    }
                }
                Err(e) => {
                    self.inner.ledger.release(reservation.id);
                    return Err(e);
                }
            }
        }
        Err(contended("any"))
    }

    /// Gives back what [`Scheduler::place_and_hold`] held: in memory and in the store.
    pub async fn release_hold(&self, (decision, reservation): crate::reservations::Granted) {
        self.inner.ledger.release(reservation.id);
        self.drop_hold(&decision.host_id, reservation.id).await;
        self.drain();
    }

    /// Whether `more` fits on the host counting, by the store, the orchestrator's VM records
    /// on it and every hold in `record`, plus the active VMs its view knows that have no
    /// record (made outside the orchestrator). CPU and memory only.
    async fn fits_by_store(&self, host_id: &str, record: &CapacityRecord, more: ResourceSet) -> Result<bool> {
        let Ok(host) = self.inner.registry.get(host_id) else { return Ok(false) };
        let Some(resources) = host.resources else { return Ok(false) };
        let capacity = resources.capacity();
        let mut ids = std::collections::HashSet::new();
        let (mut cpu, mut memory) = (u64::from(more.cpu), more.memory_mb);
        for rec in self.inner.registry.store().list(VMS).await? {
            if let Ok(vm) = serde_json::from_value::<OrchestratedVm>(rec.value)
                && vm.host_id == host_id
            {
                cpu += u64::from(vm.resources.cpu);
                memory += vm.resources.memory_mb;
                ids.insert(vm.id);
            }
        }
        for vm in host.vms.iter().filter(|v| v.is_active() && !ids.contains(&v.id)) {
            cpu += u64::from(vm.cpu);
            memory += vm.memory_mb;
        }
        for h in record.holds.values() {
            cpu += u64::from(h.resources.cpu);
            memory += h.resources.memory_mb;
        }
        Ok(cpu <= u64::from(capacity.cpu) && memory <= capacity.memory_mb)
    }

    /// Removes this replica's hold `reservation` from the host's capacity record (after
    /// the VM was recorded, or its creation failed). Retries on conflicts; a hold that
    /// cannot be removed lapses at its expiry.
    pub(super) async fn drop_hold(&self, host_id: &str, reservation: u64) {
        let Some(shared) = self.inner.shared.get() else { return };
        let key = hold_key(&shared.replica, reservation);
        let store = self.inner.registry.store().clone();
        for _ in 0..16 {
            let read = match store.get(CAPACITY, host_id).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(host = %host_id, error = %e, "cannot read the capacity record; the hold lapses later");
                    return;
                }
            };
            let Some(rec) = read else { return };
            let mut record: CapacityRecord = serde_json::from_value(rec.value).unwrap_or_default();
            let now = self.inner.clock.now();
            let before = record.holds.len();
            record.holds.retain(|k, h| k != &key && h.expires_at > now);
            if record.holds.len() == before {
                return;
            }
            let value = match to_value(&record) {
                Ok(v) => v,
                Err(_) => return,
            };
            let batch = Batch::new().require_revision(CAPACITY, host_id, rec.revision).put(CAPACITY, host_id, value);
            match store.commit(batch).await {
                Ok(c) => {
                    // Only this replica's hold went: the others' are as the ledger has them,
                    // unless the record had changed since it was last read.
                    let mut seen = lock(&shared.seen);
                    if let Some(s) = seen.get_mut(host_id)
                        && s.revision == rec.revision
                    {
                        *s = Seen { revision: c.revision, record, epoch: s.epoch };
                    }
                    return;
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => {
                    warn!(host = %host_id, error = %e, "cannot remove a hold; it lapses later");
                    return;
                }
            }
        }
    }
}

/// What became of a hold taken in memory, in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// In the store: go on.
    Yes,
    /// Another replica changed the host meanwhile: release and place again.
    Again,
    /// The host is full by the store's count: release and place on another host.
    Full,
}

fn conditioned(batch: Batch, host_id: &str, revision: u64) -> Batch {
    if revision == 0 {
        batch.require_absent(CAPACITY, host_id)
    } else {
        batch.require_revision(CAPACITY, host_id, revision)
    }
}

/// Too many lost races in a row for one create.
pub(super) fn contended(host: &str) -> OrchestratorError {
    OrchestratorError::Internal(format!("placement kept losing races with other replicas on host {host}; try again"))
}
