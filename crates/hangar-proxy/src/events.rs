//! Events about listeners and routes, for Hangar's event stream.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use tokio::sync::broadcast;

/// Something the proxy wants the outside world to know. Sent on a `tokio::sync::broadcast`
/// channel ([`crate::ProxyManager::subscribe`]); slow receivers lose old events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProxyEvent {
    /// A listener is accepting connections.
    ListenerStarted {
        /// Host key.
        host_id: String,
        /// The bound address.
        address: SocketAddr,
    },
    /// A running listener took a new configuration in place (its connections were kept).
    ListenerUpdated {
        /// Host key.
        host_id: String,
    },
    /// A listener stopped accepting (removed, moved, or the proxy was disabled).
    ListenerStopped {
        /// Host key.
        host_id: String,
    },
    /// A listener could not start.
    ListenerFailed {
        /// Host key.
        host_id: String,
        /// The configured address.
        address: String,
        /// Why.
        error: String,
    },
    /// A request or connection could not reach its target.
    RouteFailed {
        /// Host key.
        host_id: String,
        /// Route id (empty for unnamed routes).
        route_id: String,
        /// The target as configured (or as resolved).
        target: String,
        /// Why.
        error: String,
    },
    /// A VM id was resolved to an address.
    TargetResolved {
        /// VM id.
        vm_id: String,
        /// Its address.
        ip: IpAddr,
    },
}

/// Sender wrapper that ignores the "no receivers" case.
#[derive(Clone, Debug)]
pub(crate) struct EventSink(pub(crate) broadcast::Sender<ProxyEvent>);

impl EventSink {
    pub(crate) fn send(&self, e: ProxyEvent) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(e);
        }
    }
}
