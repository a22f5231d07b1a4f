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

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use hangar_store::{Batch, StoreError};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{Leadership, Scheduler, lock, to_value, view_upsert};
use crate::clock;
use crate::error::{OrchestratorError, Result};
use crate::model::*;
use crate::placement::Decision;
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
}

impl Shared {
    pub(crate) fn new(replica: String) -> Self {
        Shared {
            replica,
            seen: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            gate: tokio::sync::Mutex::new(()),
            synced: AtomicBool::new(false),
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

    /// Makes a hold taken in memory durable in the host's capacity record. `Ok(false)`: the
    /// record changed since this replica read it (another replica reserved, released or
    /// created there): the host was re-read, and the caller releases the hold and places
    /// again.
    pub(super) async fn hold_in_store(
        &self,
        decision: &Decision,
        reservation: &Reservation,
        decided_at: u64,
    ) -> Result<bool> {
        let Some(shared) = self.inner.shared.get() else { return Ok(true) };
        let host_id = &decision.host_id;
        let _one = shared.gate.lock().await;
        let seen = lock(&shared.seen).get(host_id).cloned();
        let Some(Seen { revision, mut record, epoch }) = seen else {
            // Never read: read it, then place again on what it says.
            drop(_one);
            self.refresh_host(shared, host_id).await?;
            return Ok(false);
        };
        if epoch > decided_at {
            // The host's holds were re-read after the decision: decide again on them.
            return Ok(false);
        }
        let now = self.inner.clock.now();
        record.holds.retain(|_, h| h.expires_at > now);
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
                Ok(true)
            }
            Err(StoreError::Conflict(_)) => {
                debug!(host = %host_id, "another replica changed the host meanwhile; placing again");
                drop(_one);
                self.refresh_host(shared, host_id).await?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
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
