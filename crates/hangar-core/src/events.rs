//! The event envelope of the websocket stream and the in-process bus that carries it.
//!
//! The envelope follows the reference service (`id, ref_id?, event_type, timestamp,
//! message, body, client_id?`). Each event type names the claim a subscriber needs.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::access::Access;
use crate::claims;

/// Event types, as the reference names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Global,
    Pdfm,
    System,
    SystemLogs,
    Health,
    Orchestrator,
    Stats,
    ReverseProxy,
    CatalogCache,
    JobManager,
    Auth,
    /// Ephemeral CI runners: a job's state changes (`hangar-runners`).
    Runner,
}

impl EventType {
    pub const ALL: &'static [EventType] = &[
        EventType::Global,
        EventType::Pdfm,
        EventType::System,
        EventType::SystemLogs,
        EventType::Health,
        EventType::Orchestrator,
        EventType::Stats,
        EventType::ReverseProxy,
        EventType::CatalogCache,
        EventType::JobManager,
        EventType::Auth,
        EventType::Runner,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Global => "global",
            EventType::Pdfm => "pdfm",
            EventType::System => "system",
            EventType::SystemLogs => "system_logs",
            EventType::Health => "health",
            EventType::Orchestrator => "orchestrator",
            EventType::Stats => "stats",
            EventType::ReverseProxy => "reverse_proxy",
            EventType::CatalogCache => "catalog_cache",
            EventType::JobManager => "job_manager",
            EventType::Auth => "auth",
            EventType::Runner => "runner",
        }
    }

    /// What a subscriber needs to receive events of this type. Unlike the reference,
    /// system logs and auth changes are not visible to every reader.
    pub fn access(&self) -> Access {
        match self {
            EventType::Global | EventType::Health | EventType::Stats => Access::AnyOf(&[claims::READ_ONLY]),
            EventType::Pdfm => Access::AnyOf(&[claims::LIST_VM]),
            EventType::Orchestrator => Access::AnyOf(&[claims::LIST_ORCHESTRATOR_HOSTS, claims::LIST_VM]),
            EventType::ReverseProxy => Access::AnyOf(&[claims::LIST_REVERSE_PROXY_HOSTS]),
            EventType::CatalogCache => Access::AnyOf(&[claims::LIST_CACHE]),
            EventType::JobManager => Access::AnyOf(&[claims::JOB_MANAGER_LIST, claims::JOB_MANAGER_LIST_OWN]),
            EventType::Auth => Access::AnyOf(&[claims::LIST_USER]),
            EventType::Runner => Access::AnyOf(&[claims::LIST_ORCHESTRATOR_HOSTS, claims::LIST_VM]),
            EventType::System | EventType::SystemLogs => Access::SuperUser,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Unknown event type name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Unknown event type {0:?}; known types: global, pdfm, system, system_logs, health, orchestrator, stats, reverse_proxy, catalog_cache, job_manager, auth, runner"
)]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        EventType::ALL.iter().copied().find(|e| e.as_str() == t).ok_or_else(|| UnknownEventType(s.to_string()))
    }
}

/// One event, in the reference's envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_id: Option<String>,
    pub event_type: EventType,
    pub timestamp: DateTime<Utc>,
    pub message: String,
    pub body: Value,
    /// Only the owner (user id) of a private event, such as a job, receives it, unless
    /// the subscriber is a super user. `None` means everyone allowed by the type.
    #[serde(skip)]
    pub audience: Option<String>,
    /// For an event about one VM: its Hangar owner (`Some(None)`: a VM Hangar recorded no
    /// owner for). Only who may see that VM receives it ([`Event::may_reach`]).
    #[serde(skip)]
    pub vm_owner: Option<Option<String>>,
}

impl Event {
    pub fn new(event_type: EventType, message: impl Into<String>, body: Value) -> Self {
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            ref_id: None,
            event_type,
            timestamp: Utc::now(),
            message: message.into(),
            body,
            audience: None,
            vm_owner: None,
        }
    }

    /// Marks the event as about a VM owned by `owner` (see [`Event::vm_owner`]).
    pub fn about_vm(mut self, owner: Option<String>) -> Self {
        self.vm_owner = Some(owner);
        self
    }

    /// Whether the event may reach `p` beyond its type's claims (which the caller checks):
    /// a private event only its audience (or a super user), an event about a VM only who
    /// may see that VM ([`crate::vm::may_see_vm`]: its owner, or a holder of the claims on
    /// others' VMs).
    pub fn may_reach(&self, p: &crate::Principal) -> bool {
        self.audience.as_ref().is_none_or(|a| *a == p.user_id || p.is_super_user())
            && self.vm_owner.as_ref().is_none_or(|owner| crate::vm::may_see_vm(p, owner.as_deref()))
    }

    pub fn for_user(mut self, user_id: impl Into<String>) -> Self {
        self.audience = Some(user_id.into());
        self
    }
}

/// The in-process event bus: a bounded broadcast channel. A slow subscriber loses the
/// oldest events rather than slowing publishers down. Streams declare which types they want
/// ([`EventBus::interest`]), so a publisher of costly periodic events (`stats`) can skip the
/// work while nobody wants them.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    wanted: Arc<[AtomicUsize; EventType::ALL.len()]>,
}

/// A stream's declared interest in some event types, withdrawn when dropped.
#[derive(Debug)]
pub struct Interest {
    wanted: Arc<[AtomicUsize; EventType::ALL.len()]>,
    types: Vec<usize>,
}

impl Drop for Interest {
    fn drop(&mut self) {
        for i in &self.types {
            self.wanted[*i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn index(t: EventType) -> usize {
    EventType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        EventBus { tx, wanted: Arc::new(std::array::from_fn(|_| AtomicUsize::new(0))) }
    }

    /// Publish; having no subscriber is not an error.
    pub fn publish(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Declare that a stream wants `types` until the answer is dropped.
    pub fn interest(&self, types: impl IntoIterator<Item = EventType>) -> Interest {
        let types: Vec<usize> = types.into_iter().map(index).collect();
        for i in &types {
            self.wanted[*i].fetch_add(1, Ordering::Relaxed);
        }
        Interest { wanted: self.wanted.clone(), types }
    }

    /// Whether any stream wants events of type `t` now.
    pub fn wanted(&self, t: EventType) -> bool {
        self.wanted[index(t)].load(Ordering::Relaxed) > 0
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_parse_and_print() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(*t));
        }
        assert!("nope".parse::<EventType>().is_err());
        assert_eq!(" PDFM ".parse::<EventType>(), Ok(EventType::Pdfm));
    }

    #[test]
    fn interest_is_counted_until_dropped() {
        let bus = EventBus::default();
        assert!(!bus.wanted(EventType::Stats));
        let a = bus.interest([EventType::Stats, EventType::Global]);
        let b = bus.interest([EventType::Stats]);
        drop(a);
        assert!(bus.wanted(EventType::Stats) && !bus.wanted(EventType::Global));
        drop(b);
        assert!(!bus.wanted(EventType::Stats));
    }

    #[test]
    fn envelope_has_reference_keys() {
        let e = Event::new(EventType::Auth, "USER_ADDED", serde_json::json!({"user_id": "1"}));
        let v = serde_json::to_value(&e).unwrap();
        for k in ["id", "event_type", "timestamp", "message", "body"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["event_type"], "auth");
    }
}
