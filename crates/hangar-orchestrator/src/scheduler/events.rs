//! Event streams: one follower per host reads its pushed events (each (re)connection
//! starts with a full resync), marks the host at once when the stream closes, and
//! reconnects with backoff and jitter.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug};

use super::{Scheduler, lock, timed, view_remove, view_upsert};
use crate::client::{HostClientError, HostEvent};
use crate::error::{OrchestratorError, Result};
use crate::health::Observation;
use crate::model::*;

/// Longest pause between two attempts to reopen a host's event stream.
pub const RECONNECT_CAP: Duration = Duration::from_secs(5);
const RECONNECT_FIRST: Duration = Duration::from_millis(250);

/// The pause before reconnection attempt `attempt` (0-based): 250 ms doubling up to
/// [`RECONNECT_CAP`], each multiplied by a random factor in [0.5, 1) so hosts that went
/// away together do not all come back at the same instant.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let base = RECONNECT_FIRST.saturating_mul(1u32 << attempt.min(16)).min(RECONNECT_CAP);
    let mut b = [0u8; 2];
    let r = if aws_lc_rs::rand::fill(&mut b).is_ok() { u16::from_le_bytes(b) } else { u16::MAX / 2 };
    base.mul_f64(0.5 + f64::from(r) / f64::from(u16::MAX) / 2.0)
}

/// The orchestrator event a VM's state change on its host becomes (body: `host_id`,
/// `vm_id`, `previous_state`, `current_state`).
pub const VM_STATE_CHANGED: &str = "VM_STATE_CHANGED";

/// One host's event-stream follower.
pub(super) struct Watcher {
    pub(super) task: tokio::task::AbortHandle,
    /// The stream is open (its first resync applied).
    pub(super) connected: Arc<AtomicBool>,
    /// Ends the current stream (a failed health check) so it is reopened and resynced.
    pub(super) reset: Arc<tokio::sync::Notify>,
}

impl Scheduler {
    /// Applies one event pushed by a host.
    pub async fn handle_event(&self, host_id: &str, event: HostEvent) -> Result<()> {
        let now = self.inner.seq.load(Ordering::SeqCst);
        self.apply_event(host_id, event, now).await
    }

    /// [`Scheduler::handle_event`] for a stream opened when the VM sequence was at `since`.
    async fn apply_event(&self, host_id: &str, event: HostEvent, since: u64) -> Result<()> {
        let mut freed = false;
        let synced = matches!(event, HostEvent::Synced { .. });
        match event {
            HostEvent::Heartbeat => {}
            HostEvent::VmChanged { vm } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| view_upsert(h, vm));
            }
            HostEvent::VmState { id, state } => {
                freed = true;
                let (mut previous, mut owner) = (None, None);
                self.inner.registry.update_in_memory(host_id, |h| {
                    if let Some(vm) = h.vms.iter().find(|v| v.id == id).cloned() {
                        previous = Some(vm.state);
                        owner = vm.owner.clone();
                        view_upsert(h, VmSummary { state, ..vm });
                    }
                });
                // Subscribers (on every replica, through the store's event relay) and the
                // other replicas' views learn it from this event.
                if let Some(previous) = previous.filter(|p| *p != state) {
                    self.publish_vm(
                        VM_STATE_CHANGED,
                        owner.as_deref(),
                        serde_json::json!({"host_id": host_id, "vm_id": id,
                            "previous_state": previous.as_str(), "current_state": state.as_str()}),
                    );
                }
            }
            HostEvent::VmRemoved { id } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| {
                    view_remove(h, &id);
                });
            }
            HostEvent::Resources { resources } => {
                freed = true;
                self.inner.registry.update_in_memory(host_id, |h| h.resources = Some(resources.covering(&h.vms)));
            }
            HostEvent::CacheChanged { images } => {
                self.inner.registry.update_in_memory(host_id, |h| h.cached_images = images);
            }
            HostEvent::Synced { hardware, vms } => {
                freed = true;
                self.apply_sync(host_id, &hardware, vms, since);
            }
            HostEvent::Stats { stats } => {
                self.publish("HOST_STATS_UPDATE", serde_json::json!({"host_id": host_id, "stats": stats}));
            }
        }
        // Heard from: healthy (after the view changed, so a host coming back shows its
        // VMs' real states, never `unknown` ones, once healthy).
        let t = self.observe(host_id, Observation::Heartbeat).await?;
        if freed {
            self.drain();
        }
        if !synced && t.is_some_and(|t| t.from == HostState::Unhealthy) {
            // Back without a resync (silence ended while the stream stayed open): the VM
            // list is stale; refresh it in the background.
            let me = self.clone();
            let id = host_id.to_string();
            tokio::spawn(async move {
                let _ = me.check_host(&id).await;
            });
        }
        Ok(())
    }

    /// A follower takes in a VM state change the leader heard from a host (its
    /// [`VM_STATE_CHANGED`] event, relayed through the store): only the leader follows the
    /// hosts' streams. The leader's own view already has it.
    pub(super) fn take_relayed_state(&self, event: &hangar_core::Event) {
        if event.message != VM_STATE_CHANGED
            || event.event_type != hangar_core::EventType::Orchestrator
            || !matches!(self.leadership(), super::Leadership::Follower)
        {
            return;
        }
        let (Some(host_id), Some(vm_id)) = (event.body["host_id"].as_str(), event.body["vm_id"].as_str()) else {
            return;
        };
        let Ok(state) = serde_json::from_value::<hangar_hypervisor::VmState>(event.body["current_state"].clone())
        else {
            return;
        };
        self.inner.registry.update_in_memory(host_id, |h| {
            if let Some(vm) = h.vms.iter().find(|v| v.id == vm_id).cloned() {
                view_upsert(h, VmSummary { state, ..vm });
            }
        });
    }

    /// Follows a host's event stream until the host is unregistered: each (re)connection
    /// starts with a full resync, a closed stream counts at once as a failed check, and
    /// reconnection attempts back off ([`reconnect_delay`], at most [`RECONNECT_CAP`]).
    /// Replaces an earlier follower of the same host.
    pub fn watch_events(&self, host_id: &str) -> JoinHandle<()> {
        let connected = Arc::new(AtomicBool::new(false));
        let reset = Arc::new(tokio::sync::Notify::new());
        let me = self.clone();
        let id = host_id.to_string();
        let (c, r) = (connected.clone(), reset.clone());
        let handle = tokio::spawn(
            async move { me.follow(&id, &c, &r).await }.instrument(tracing::info_span!("host_events", host = %host_id)),
        );
        let old = lock(&self.inner.watchers)
            .insert(host_id.to_string(), Watcher { task: handle.abort_handle(), connected, reset });
        if let Some(old) = old {
            old.task.abort();
        }
        handle
    }

    async fn follow(&self, id: &str, connected: &AtomicBool, reset: &tokio::sync::Notify) {
        let mut attempt = 0u32;
        loop {
            if self.inner.registry.get(id).is_err() {
                return;
            }
            let since = self.inner.seq.load(Ordering::SeqCst);
            let opened = match self.client(id).await {
                Ok(c) => timed(self.inner.config.call_timeout, "opening the event stream", c.events()).await,
                Err(OrchestratorError::Host { source, .. }) => Err(source),
                Err(OrchestratorError::NotFound { .. }) => return,
                Err(e) => Err(HostClientError::Protocol(e.to_string())),
            };
            match opened {
                Ok(mut stream) => {
                    debug!(host = %id, "event stream open");
                    attempt = 0;
                    let why = loop {
                        tokio::select! {
                            e = stream.next() => match e {
                                Some(e) => {
                                    match self.apply_event(id, e, since).await {
                                        Ok(()) => connected.store(true, Ordering::SeqCst),
                                        Err(OrchestratorError::NotFound { .. }) => return,
                                        Err(e) => debug!(host = %id, error = %e, "event not applied"),
                                    }
                                }
                                None => break "the host's event stream closed".to_string(),
                            },
                            _ = reset.notified() => break "the host failed a health check".to_string(),
                        }
                    };
                    connected.store(false, Ordering::SeqCst);
                    lock(&self.inner.clients).remove(id);
                    debug!(host = %id, reason = %why, "event stream ended");
                    let _ = self.observe(id, Observation::CheckFailed(why)).await;
                }
                Err(e) => {
                    if e.is_host_down() {
                        lock(&self.inner.clients).remove(id);
                    }
                    let _ = self.observe(id, Observation::CheckFailed(e.to_string())).await;
                }
            }
            tokio::time::sleep(reconnect_delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// Starts event-stream followers for hosts that have none and stops those of hosts
    /// that are gone.
    pub(super) fn watch_all(&self) {
        let ids: HashSet<String> = self.inner.registry.ids().into_iter().collect();
        let missing: Vec<String> = {
            let mut w = lock(&self.inner.watchers);
            w.retain(|id, watcher| {
                let keep = ids.contains(id) && !watcher.task.is_finished();
                if !keep {
                    watcher.task.abort();
                }
                keep
            });
            ids.iter().filter(|id| !w.contains_key(*id)).cloned().collect()
        };
        for id in missing {
            drop(self.watch_events(&id));
        }
    }

    /// Reopens a host's event stream (after its URL or credentials changed).
    pub(super) fn restart_watcher(&self, host_id: &str) {
        if let Some(w) = lock(&self.inner.watchers).get(host_id) {
            w.reset.notify_one();
        }
    }

    /// Stops every event-stream follower.
    pub(super) fn stop_watchers(&self) {
        self.inner.following.store(false, Ordering::SeqCst);
        for (_, w) in lock(&self.inner.watchers).drain() {
            w.task.abort();
        }
    }

    /// Whether a host's event stream is open.
    pub fn events_connected(&self, host_id: &str) -> bool {
        lock(&self.inner.watchers).get(host_id).is_some_and(|w| w.connected.load(Ordering::SeqCst))
    }
}
