//! The seam to the hypervisor: turning a VM id into an IP address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::ResolveError;
use crate::events::{EventSink, ProxyEvent};

/// Finds the current IP of a VM. Hangar's host module implements it (from `prlctl` or the QEMU
/// guest agent); [`MapResolver`] is a ready-made one backed by a map.
///
/// The engine caches answers. It asks again for a VM when the VM id comes out of
/// [`TargetResolver::changes`], and after a connection to the cached address fails, so a VM
/// that got a new IP is reached by the next connection without restarting any listener.
#[async_trait]
pub trait TargetResolver: Send + Sync + 'static {
    /// The VM's current address.
    async fn resolve(&self, vm_id: &str) -> Result<IpAddr, ResolveError>;

    /// A feed of VM ids whose address may have changed (state changes, new DHCP lease).
    /// `None` (the default) means the engine re-resolves only after a failed connection.
    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        None
    }
}

/// A [`TargetResolver`] over an in-memory map, with change notifications.
#[derive(Debug)]
pub struct MapResolver {
    map: RwLock<HashMap<String, IpAddr>>,
    tx: broadcast::Sender<String>,
}

impl Default for MapResolver {
    fn default() -> Self {
        MapResolver { map: RwLock::new(HashMap::new()), tx: broadcast::channel(256).0 }
    }
}

impl MapResolver {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set (or change) a VM's address and tell the engine.
    pub fn set(&self, vm_id: &str, ip: IpAddr) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).insert(vm_id.to_string(), ip);
        let _ = self.tx.send(vm_id.to_string());
    }

    /// Forget a VM (it stopped); connections to it then fail with 502.
    pub fn remove(&self, vm_id: &str) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).remove(vm_id);
        let _ = self.tx.send(vm_id.to_string());
    }
}

#[async_trait]
impl TargetResolver for MapResolver {
    async fn resolve(&self, vm_id: &str) -> Result<IpAddr, ResolveError> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(vm_id).copied().ok_or_else(|| ResolveError::NoAddress(vm_id.to_string()))
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.tx.subscribe())
    }
}

/// The engine's cache in front of the resolver.
pub(crate) struct TargetCache {
    resolver: Option<Arc<dyn TargetResolver>>,
    map: RwLock<HashMap<String, IpAddr>>,
    generation: AtomicU64,
    events: EventSink,
}

impl TargetCache {
    pub(crate) fn new(resolver: Option<Arc<dyn TargetResolver>>, events: EventSink) -> Self {
        TargetCache { resolver, map: RwLock::new(HashMap::new()), generation: AtomicU64::new(0), events }
    }

    /// The VM's address, from the cache or the resolver.
    pub(crate) async fn ip(&self, vm_id: &str) -> Result<IpAddr, ResolveError> {
        if let Some(ip) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(vm_id) {
            return Ok(*ip);
        }
        let Some(resolver) = &self.resolver else {
            return Err(ResolveError::Other(format!("no VM resolver is configured, cannot reach VM {vm_id:?}")));
        };
        let generation = self.generation.load(Ordering::Acquire);
        let ip = resolver.resolve(vm_id).await?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        // A change notice that arrived while we asked makes this answer suspect: use it once,
        // but do not cache it.
        if self.generation.load(Ordering::Acquire) == generation {
            map.insert(vm_id.to_string(), ip);
        }
        drop(map);
        tracing::debug!(vm_id, %ip, "VM target resolved");
        self.events.send(ProxyEvent::TargetResolved { vm_id: vm_id.to_string(), ip });
        Ok(ip)
    }

    /// Drop a cached address (after a change notice or a failed connection).
    pub(crate) fn forget(&self, vm_id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.map.write().unwrap_or_else(|e| e.into_inner()).remove(vm_id);
    }

    fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.map.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Follow the resolver's change feed until it closes.
    pub(crate) fn spawn_watch(self: &Arc<Self>) {
        let Some(mut rx) = self.resolver.as_ref().and_then(|r| r.changes()) else { return };
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let msg = rx.recv().await;
                let Some(cache) = cache.upgrade() else { return };
                match msg {
                    Ok(vm_id) => cache.forget(&vm_id),
                    Err(broadcast::error::RecvError::Lagged(_)) => cache.forget_all(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}
