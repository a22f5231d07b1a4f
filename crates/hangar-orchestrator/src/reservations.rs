//! The reservation ledger: capacity is taken at decision time, under one lock, so
//! concurrent placements never promise the same room twice.
//!
//! A reservation is released when its VM is confirmed (the host view then counts the VM)
//! or its creation fails, and lapses after a timeout so a lost caller cannot hold room
//! forever. Requests that do not fit can wait in a queue ordered by priority (then
//! arrival); whenever capacity may have been freed, [`Reservations::drain`] serves the
//! waiters in that order, and a lower-priority waiter is served only if no waiter ahead of
//! it fits.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::debug;

use crate::clock::{self, Clock};
use crate::model::{Host, ResourceSet};
use crate::placement::{
    self, Decision, HostReserved, NoCapacity, PlacementIndex, PlacementRequest, Profile, ReservedByHost,
};

/// Capacity held for a VM being created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    /// Ledger id.
    pub id: u64,
    /// Host id.
    pub host_id: String,
    /// What is held.
    pub resources: ResourceSet,
    /// Whether it counts against the macOS limit.
    pub macos: bool,
    /// When it was taken.
    pub created_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
}

/// A placement that was granted: where, and the capacity held there.
pub type Granted = (Decision, Reservation);

struct Waiter {
    request: PlacementRequest,
    tx: oneshot::Sender<Granted>,
}

#[derive(Default)]
struct Ledger {
    next_id: u64,
    items: HashMap<u64, Reservation>,
    by_host: ReservedByHost,
    next_seq: u64,
    waiters: BTreeMap<(Reverse<i32>, u64), Waiter>,
    /// Holds other replicas keep in the store, per host (their ledger ids here), counted
    /// like this replica's own and replaced whenever the host's capacity record is read.
    remote: HashMap<String, Vec<u64>>,
    /// No reservation lapses before this (a lower bound: renewals only push expiries
    /// later), so most calls skip the expiry scan.
    earliest_expiry: Option<DateTime<Utc>>,
}

impl Ledger {
    fn insert(&mut self, decision: &Decision, now: DateTime<Utc>, ttl: Duration) -> Reservation {
        self.insert_raw(&decision.host_id, decision.needs, decision.macos, now, clock::add(now, ttl))
    }

    fn insert_raw(
        &mut self,
        host_id: &str,
        resources: ResourceSet,
        macos: bool,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Reservation {
        self.next_id += 1;
        let r = Reservation {
            id: self.next_id,
            host_id: host_id.to_string(),
            resources,
            macos,
            created_at: now,
            expires_at,
        };
        let h = self.by_host.entry(r.host_id.clone()).or_default();
        h.resources = h.resources.saturating_add(r.resources);
        h.macos_vms += usize::from(r.macos);
        h.count += 1;
        self.earliest_expiry = Some(self.earliest_expiry.map_or(r.expires_at, |e| e.min(r.expires_at)));
        self.items.insert(r.id, r.clone());
        r
    }

    fn remove(&mut self, id: u64) -> Option<Reservation> {
        let r = self.items.remove(&id)?;
        if let Some(h) = self.by_host.get_mut(&r.host_id) {
            h.resources = h.resources.saturating_sub(r.resources);
            h.macos_vms = h.macos_vms.saturating_sub(usize::from(r.macos));
            h.count = h.count.saturating_sub(1);
            if h.count == 0 {
                self.by_host.remove(&r.host_id);
            }
        }
        Some(r)
    }

    fn purge(&mut self, now: DateTime<Utc>) -> usize {
        if self.earliest_expiry.is_none_or(|e| e > now) {
            return 0;
        }
        let expired: Vec<u64> = self.items.values().filter(|r| r.expires_at <= now).map(|r| r.id).collect();
        self.earliest_expiry = self.items.values().filter(|r| r.expires_at > now).map(|r| r.expires_at).min();
        for id in &expired {
            if let Some(r) = self.remove(*id) {
                debug!(reservation = r.id, host = %r.host_id, "reservation lapsed");
            }
        }
        expired.len()
    }
}

/// A place in the waiting queue.
#[derive(Debug)]
pub struct Ticket {
    key: (Reverse<i32>, u64),
    rx: oneshot::Receiver<Granted>,
}

/// The ledger. Cheap to share behind an `Arc`.
pub struct Reservations {
    inner: Mutex<Ledger>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
}

impl std::fmt::Debug for Reservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.lock();
        f.debug_struct("Reservations").field("held", &l.items.len()).field("waiting", &l.waiters.len()).finish()
    }
}

impl Reservations {
    /// A ledger whose reservations lapse `ttl` after they are taken.
    pub fn new(clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        Reservations { inner: Mutex::new(Ledger::default()), clock, ttl }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces what other replicas hold on `host_id` (from its capacity record in the
    /// store) by `holds` (resources, macOS, expiry): they count against the host like this
    /// replica's own reservations until the next read of the record or their expiry.
    pub fn set_remote(&self, host_id: &str, holds: impl IntoIterator<Item = (ResourceSet, bool, DateTime<Utc>)>) {
        let now = self.clock.now();
        let mut l = self.lock();
        for id in l.remote.remove(host_id).unwrap_or_default() {
            l.remove(id);
        }
        let mut ids = Vec::new();
        for (resources, macos, expires_at) in holds {
            if expires_at > now {
                let r = l.insert_raw(host_id, resources, macos, now, expires_at);
                ids.push(r.id);
            }
        }
        if !ids.is_empty() {
            l.remote.insert(host_id.to_string(), ids);
        }
    }

    /// Places `request` among `hosts` and reserves the capacity, atomically with respect to
    /// every other call on this ledger.
    pub fn reserve<'a, I>(&self, request: &PlacementRequest, hosts: I, profile: Profile) -> Result<Granted, NoCapacity>
    where
        I: IntoIterator<Item = &'a Host>,
    {
        let index = PlacementIndex::build(hosts);
        self.reserve_indexed(request, &index, profile)
    }

    /// [`Reservations::reserve`] over a placement index (the registry's).
    pub fn reserve_indexed(
        &self,
        request: &PlacementRequest,
        index: &PlacementIndex,
        profile: Profile,
    ) -> Result<Granted, NoCapacity> {
        let now = self.clock.now();
        let mut l = self.lock();
        l.purge(now);
        let decision = placement::place_indexed(request, index, &l.by_host, profile)?;
        let r = l.insert(&decision, now, self.ttl);
        Ok((decision, r))
    }

    /// Like [`Reservations::reserve`], but when nothing fits the request joins the queue
    /// (under the same lock, so no release can slip between the attempt and the enqueue).
    pub fn reserve_or_enqueue<'a, I>(
        &self,
        request: &PlacementRequest,
        hosts: I,
        profile: Profile,
        priority: i32,
    ) -> Result<Granted, (NoCapacity, Ticket)>
    where
        I: IntoIterator<Item = &'a Host>,
    {
        let index = PlacementIndex::build(hosts);
        self.reserve_or_enqueue_indexed(request, &index, profile, priority)
    }

    /// [`Reservations::reserve_or_enqueue`] over a placement index.
    pub fn reserve_or_enqueue_indexed(
        &self,
        request: &PlacementRequest,
        index: &PlacementIndex,
        profile: Profile,
        priority: i32,
    ) -> Result<Granted, (NoCapacity, Ticket)> {
        let now = self.clock.now();
        let mut l = self.lock();
        l.purge(now);
        match placement::place_indexed(request, index, &l.by_host, profile) {
            Ok(decision) => {
                let r = l.insert(&decision, now, self.ttl);
                Ok((decision, r))
            }
            Err(no) => {
                l.next_seq += 1;
                let key = (Reverse(priority), l.next_seq);
                let (tx, rx) = oneshot::channel();
                l.waiters.insert(key, Waiter { request: request.clone(), tx });
                Err((no, Ticket { key, rx }))
            }
        }
    }

    /// Serves queued requests that now fit, highest priority first. Returns how many were
    /// served. Call it whenever capacity may have been freed.
    pub fn drain<'a, I>(&self, hosts: I, profile: Profile) -> usize
    where
        I: IntoIterator<Item = &'a Host> + Clone,
    {
        let index = PlacementIndex::build(hosts);
        self.drain_indexed(&index, profile)
    }

    /// [`Reservations::drain`] over a placement index.
    pub fn drain_indexed(&self, index: &PlacementIndex, profile: Profile) -> usize {
        let now = self.clock.now();
        let mut l = self.lock();
        l.purge(now);
        if l.waiters.is_empty() {
            return 0;
        }
        let keys: Vec<(Reverse<i32>, u64)> = l.waiters.keys().copied().collect();
        let mut served = 0;
        for key in keys {
            let Some(w) = l.waiters.get(&key) else { continue };
            if w.tx.is_closed() {
                l.waiters.remove(&key);
                continue;
            }
            let Ok(decision) = placement::place_indexed(&w.request, index, &l.by_host, profile) else { continue };
            let Some(w) = l.waiters.remove(&key) else { continue };
            let r = l.insert(&decision, now, self.ttl);
            let id = r.id;
            if w.tx.send((decision, r)).is_err() {
                l.remove(id);
            } else {
                served += 1;
            }
        }
        served
    }

    /// Waits for a queued request to be served, up to `timeout`. On timeout the ticket
    /// leaves the queue and `None` is returned; no capacity stays held for it.
    pub async fn wait(&self, ticket: Ticket, timeout: Duration) -> Option<Granted> {
        let Ticket { key, mut rx } = ticket;
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(granted)) => Some(granted),
            _ => {
                let mut l = self.lock();
                if l.waiters.remove(&key).is_some() {
                    return None;
                }
                // Served between the timeout and the lock: take it rather than leak it.
                rx.try_recv().ok()
            }
        }
    }

    /// Releases a reservation (VM confirmed, or its creation failed). Returns it, or `None`
    /// when it had already lapsed or been released.
    pub fn release(&self, id: u64) -> Option<Reservation> {
        self.lock().remove(id)
    }

    /// Pushes a reservation's expiry to `ttl` from now (for long creations).
    pub fn renew(&self, id: u64) -> bool {
        let now = self.clock.now();
        let mut l = self.lock();
        match l.items.get_mut(&id) {
            Some(r) => {
                r.expires_at = clock::add(now, self.ttl);
                true
            }
            None => false,
        }
    }

    /// Drops lapsed reservations; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = self.clock.now();
        self.lock().purge(now)
    }

    /// What is held on one host.
    pub fn held_on(&self, host_id: &str) -> HostReserved {
        self.lock().by_host.get(host_id).copied().unwrap_or_default()
    }

    /// What is held, per host.
    pub fn held(&self) -> ReservedByHost {
        self.lock().by_host.clone()
    }

    /// Reservations currently held.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether no reservation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests waiting in the queue.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Runs `f` with the per-host holdings while no reservation can change (for checks that
    /// must see holdings and host views consistently).
    pub fn inspect<R>(&self, f: impl FnOnce(&ReservedByHost) -> R) -> R {
        f(&self.lock().by_host)
    }
}
