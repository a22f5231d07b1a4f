//! Events on every replica: what one replica publishes on its bus reaches websocket
//! subscribers on the others, through the store they share.
//!
//! * Out: a task reads this replica's bus and appends each fleet event (not `stats`,
//!   `system_logs` or `system`, which are about one process) to the [`EVENTS`] collection,
//!   the events of one moment in one batch, under ids that sort by time, then replica, then
//!   sequence (`<ms since epoch, 13 digits>-<replica>-<seq, 12 digits>`).
//! * In: a task reads the collection every [`POLL`] from a cursor and publishes the other
//!   replicas' events on this bus. It reads again from [`LOOKBACK`] before its cursor, so an
//!   event committed late (or stamped by a clock a little behind) is not skipped, and
//!   remembers the ids it delivered, so none is delivered twice. Its own events are
//!   skipped (its subscribers had them from the bus), and events it relayed are never
//!   written out again.
//! * Trim: the leader deletes records older than [`KEEP`], its deletes fenced.
//!
//! Delivery is at most once per replica and best effort, like the bus itself: a replica
//! that cannot reach the store loses the events of that time (they are also in the audit
//! log and the resources' own state).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::{Event, EventBus, EventType};
use hangar_store::{Batch, FencedBatch, Role, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tracing::{debug, warn};

/// The collection of relayed events.
pub const EVENTS: &str = "replica_events";
/// How often a replica reads the others' events.
pub const POLL: Duration = Duration::from_millis(200);
/// How far before its cursor a replica reads again.
pub const LOOKBACK: Duration = Duration::from_secs(10);
/// How long events stay in the store.
pub const KEEP: Duration = Duration::from_secs(300);
/// Ids remembered as delivered or relayed (more than a lookback's worth).
const REMEMBER: usize = 50_000;

#[derive(Serialize, Deserialize)]
struct Stored {
    replica: String,
    event: Event,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vm_owner: Option<Option<String>>,
}

/// Event ids seen recently, bounded.
#[derive(Default)]
struct Recent {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Recent {
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        while self.order.len() > REMEMBER {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

fn relayed(t: EventType) -> bool {
    !matches!(t, EventType::Stats | EventType::SystemLogs | EventType::System)
}

fn millis(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis().max(0)
}

fn key(ms: i64, replica: &str, seq: u64) -> String {
    format!("{ms:013}-{replica}-{seq:012}")
}

/// Starts the three tasks; they run as long as the process.
pub fn start(store: Arc<dyn Store>, bus: EventBus, replica: &str, role: watch::Receiver<Role>) {
    let relayed_ids = Arc::new(Mutex::new(Recent::default()));
    let replica = replica.to_string();
    // Subscribed before returning: every event published after start is relayed.
    tokio::spawn(out(store.clone(), bus.subscribe(), replica.clone(), relayed_ids.clone()));
    tokio::spawn(tail(store.clone(), bus, replica, relayed_ids));
    tokio::spawn(trim(store, role));
}

async fn out(
    store: Arc<dyn Store>,
    mut rx: tokio::sync::broadcast::Receiver<Event>,
    replica: String,
    relayed_ids: Arc<Mutex<Recent>>,
) {
    let mut seq: u64 = 0;
    loop {
        let first = match rx.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                warn!(lost = n, "the event relay fell behind; other replicas miss these events");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        // Whatever else is already there goes in the same batch.
        let mut events = vec![first];
        while events.len() < 256 {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let mut batch = Batch::new();
        {
            let seen = relayed_ids.lock().unwrap_or_else(|p| p.into_inner());
            for e in events {
                if !relayed(e.event_type) || seen.contains(&e.id) {
                    continue;
                }
                seq += 1;
                let id = key(millis(chrono::Utc::now()), &replica, seq);
                let (audience, vm_owner) = (e.audience.clone(), e.vm_owner.clone());
                let value =
                    match serde_json::to_value(Stored { replica: replica.clone(), event: e, audience, vm_owner }) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                batch = batch.put(EVENTS, &id, value);
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = store.commit(batch).await {
            warn!(error = %e, "cannot hand events to the other replicas");
        }
    }
}

async fn tail(store: Arc<dyn Store>, bus: EventBus, replica: String, relayed_ids: Arc<Mutex<Recent>>) {
    let lookback = i64::try_from(LOOKBACK.as_millis()).unwrap_or(i64::MAX);
    // Only what happens from now on.
    let mut cursor_ms = millis(chrono::Utc::now());
    let mut delivered = Recent::default();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut after = format!("{:013}", cursor_ms.saturating_sub(lookback));
        loop {
            let page = match store.list_page(EVENTS, Some(&after), 500).await {
                Ok(p) => p,
                Err(e) => {
                    debug!(error = %e, "cannot read the other replicas' events now");
                    break;
                }
            };
            let full = page.len() == 500;
            for rec in page {
                after = rec.id.clone();
                if let Some(ms) = rec.id.get(..13).and_then(|m| m.parse::<i64>().ok()) {
                    cursor_ms = cursor_ms.max(ms);
                }
                if !delivered.insert(&rec.id) {
                    continue;
                }
                let Ok(stored) = serde_json::from_value::<Stored>(rec.value) else { continue };
                if stored.replica == replica {
                    continue;
                }
                let mut event = stored.event;
                event.audience = stored.audience;
                event.vm_owner = stored.vm_owner;
                relayed_ids.lock().unwrap_or_else(|p| p.into_inner()).insert(&event.id);
                bus.publish(event);
            }
            if !full {
                break;
            }
        }
    }
}

async fn trim(store: Arc<dyn Store>, mut role: watch::Receiver<Role>) {
    let keep = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Role::Leader(fence) = role.borrow_and_update().clone() else { continue };
        let cutoff = format!("{:013}", millis(chrono::Utc::now()).saturating_sub(keep));
        loop {
            let page = match store.list_page(EVENTS, None, 500).await {
                Ok(p) => p,
                Err(_) => break,
            };
            let old: Vec<_> = page.iter().filter(|r| r.id.as_str() < cutoff.as_str()).collect();
            if old.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            for r in &old {
                batch = batch.delete(EVENTS, &r.id);
            }
            if let Err(e) = store.commit(batch.fenced(&fence)).await {
                debug!(error = %e, "event trim refused or failed");
                break;
            }
            if old.len() < page.len() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hangar_store::MemoryStore;
    use serde_json::json;
    use tokio::sync::broadcast;

    /// The next event within a deadline, or `None`.
    async fn next(rx: &mut broadcast::Receiver<Event>, within: Duration) -> Option<Event> {
        tokio::time::timeout(within, rx.recv()).await.ok().and_then(|r| r.ok())
    }

    #[tokio::test]
    async fn events_reach_the_other_replica_once_and_never_come_back() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let (bus_a, bus_b) = (EventBus::default(), EventBus::default());
        let (_role_a, role_a) = watch::channel(Role::Follower);
        let (_role_b, role_b) = watch::channel(Role::Follower);
        let (mut seen_a, mut seen_b) = (bus_a.subscribe(), bus_b.subscribe());
        start(store.clone(), bus_a.clone(), "a", role_a);
        start(store.clone(), bus_b.clone(), "b", role_b);

        let vm = Event::new(EventType::Pdfm, "VM_STATE_CHANGED", json!({"vm": "v1"})).about_vm(Some("alice".into()));
        let job = Event::new(EventType::JobManager, "JOB_PROGRESS", json!({"job": "j1"})).for_user("u1");
        let stats = Event::new(EventType::Stats, "System Stats", json!({}));
        for e in [vm.clone(), stats, job.clone()] {
            bus_a.publish(e);
        }
        // A's own subscriber has them once, from its bus.
        assert_eq!(next(&mut seen_a, Duration::from_secs(1)).await.unwrap().id, vm.id);
        next(&mut seen_a, Duration::from_secs(1)).await.unwrap();
        assert_eq!(next(&mut seen_a, Duration::from_secs(1)).await.unwrap().id, job.id);
        // B gets the fleet events (not the stats), with the VM's owner and the job's
        // audience kept.
        let got = next(&mut seen_b, Duration::from_secs(10)).await.unwrap();
        assert_eq!((got.id.as_str(), got.message.as_str()), (vm.id.as_str(), "VM_STATE_CHANGED"));
        assert_eq!(got.vm_owner, Some(Some("alice".to_string())));
        let got = next(&mut seen_b, Duration::from_secs(10)).await.unwrap();
        assert_eq!(got.id, job.id);
        assert_eq!(got.audience.as_deref(), Some("u1"));
        // An event of B's reaches A.
        let back = Event::new(EventType::Orchestrator, "HOST_HEALTH_CHANGED", json!({"host": "h0"}));
        bus_b.publish(back.clone());
        assert_eq!(next(&mut seen_b, Duration::from_secs(1)).await.unwrap().id, back.id);
        assert_eq!(next(&mut seen_a, Duration::from_secs(10)).await.unwrap().id, back.id);
        // Nothing more: no echo, no second delivery (several polls and lookbacks later).
        assert!(next(&mut seen_a, POLL * 5).await.is_none(), "A had an event twice");
        assert!(next(&mut seen_b, POLL * 5).await.is_none(), "B had an event twice");
        // Three events written: two of A's, one of B's (relayed ones are not written again).
        assert_eq!(store.list(EVENTS).await.unwrap().len(), 3);
    }
}
