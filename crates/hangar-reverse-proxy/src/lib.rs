//! The `reverse_proxy` module.
//!
//! [`ReverseProxy`] keeps the proxy configuration (the reference's model: a global switch and
//! proxy hosts, each a listener with one TCP route or ordered HTTP routes) in the store, and
//! applies it to a [`hangar_proxy::ProxyManager`] after every change, so listeners follow the
//! configuration without a restart and survive one. The adapters connect the engine to the
//! rest of Hangar: [`HostResolver`] finds a VM's current address through the host module and
//! feeds address changes back; [`IdentityAuth`] accepts Hangar tokens and API keys on
//! listeners that require them. Engine events are republished as `reverse_proxy` events.
//! Private keys given as PEM text are written to files with mode 0600 under the data folder;
//! the store and the API only ever hold their paths.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::{Classify, ErrorKind, Event, EventBus, EventType};
use hangar_host::Host;
use hangar_hypervisor::{VmEvent, VmState};
use hangar_proxy::{
    AuthRejection, HttpRoute, ProxyAuth, ProxyEvent, ProxyHost, ProxyManager, ProxyStatus, ResolveError,
    ReverseProxyConfig, TargetResolver, TcpRoute,
};
use hangar_store::{Batch, Store, StoreError};
use serde_json::json;
use tokio::sync::{Mutex, broadcast};
use tracing::warn;

pub const SETTINGS: &str = "reverse_proxy";
pub const HOSTS: &str = "reverse_proxy_hosts";

#[derive(Debug, thiserror::Error)]
pub enum ReverseProxyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl Classify for ReverseProxyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ReverseProxyError::Invalid(_) => ErrorKind::BadRequest,
            ReverseProxyError::NotFound(_) => ErrorKind::NotFound,
            ReverseProxyError::Conflict(_) | ReverseProxyError::Store(StoreError::Conflict(_)) => ErrorKind::Conflict,
            ReverseProxyError::Store(_) | ReverseProxyError::Internal(_) => ErrorKind::Internal,
        }
    }
}

type Result<T, E = ReverseProxyError> = std::result::Result<T, E>;

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| ReverseProxyError::Internal(e.to_string()))
}

/// The module.
pub struct ReverseProxy {
    store: Arc<dyn Store>,
    manager: ProxyManager,
    bus: EventBus,
    keys_dir: PathBuf,
    /// Changes are read-modify-write of the whole configuration: one at a time.
    writer: Mutex<()>,
}

impl ReverseProxy {
    /// Load the stored configuration, apply it, and start republishing engine events.
    pub async fn start(
        store: Arc<dyn Store>,
        manager: ProxyManager,
        bus: EventBus,
        data_dir: &std::path::Path,
    ) -> Result<Arc<Self>> {
        let me = Arc::new(ReverseProxy {
            store,
            manager,
            bus: bus.clone(),
            keys_dir: data_dir.join("secrets").join("proxy"),
            writer: Mutex::new(()),
        });
        let mut rx = me.manager.subscribe();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => bus.publish(proxy_event(&e)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        let cfg = me.config().await?;
        if let Err(e) = me.manager.apply(&cfg).await {
            warn!(error = %e, "the stored reverse-proxy configuration does not apply");
        }
        Ok(me)
    }

    /// The whole stored configuration.
    pub async fn config(&self) -> Result<ReverseProxyConfig> {
        let mut cfg = match self.store.get(SETTINGS, "settings").await? {
            Some(r) => serde_json::from_value(r.value)
                .map_err(|e| ReverseProxyError::Internal(format!("stored settings: {e}")))?,
            None => ReverseProxyConfig::default(),
        };
        cfg.hosts = Vec::new();
        for r in self.store.list(HOSTS).await? {
            cfg.hosts.push(
                serde_json::from_value(r.value)
                    .map_err(|e| ReverseProxyError::Internal(format!("stored proxy host: {e}")))?,
            );
        }
        Ok(cfg)
    }

    pub async fn status(&self) -> ProxyStatus {
        self.manager.status().await
    }

    /// Validate a candidate configuration, store it with its audit entry, and apply it.
    async fn commit(
        &self,
        actor: &Actor,
        cfg: &ReverseProxyConfig,
        batch: Batch,
        action: &str,
        target: &str,
    ) -> Result<()> {
        cfg.validate().map_err(|e| ReverseProxyError::Invalid(e.to_string()))?;
        let entry = AuditEntry::new(actor, action, "reverse_proxy", target, json!({}));
        let batch = batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?);
        self.store.commit(batch).await?;
        self.bus.publish(Event::new(
            EventType::ReverseProxy,
            "REVERSE_PROXY_UPDATED",
            json!({"action": action, "target": target}),
        ));
        if let Err(e) = self.manager.apply(cfg).await {
            warn!(error = %e, "reverse-proxy configuration stored but not applied");
            return Err(ReverseProxyError::Invalid(format!("stored, but the proxy could not apply it: {e}")));
        }
        Ok(())
    }

    pub async fn set_enabled(&self, actor: &Actor, enabled: bool) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut cfg = self.config().await?;
        cfg.enabled = enabled;
        let settings = json!({"enabled": cfg.enabled, "host": cfg.host, "port": cfg.port});
        self.commit(
            actor,
            &cfg,
            Batch::new().put(SETTINGS, "settings", settings),
            if enabled { "reverse_proxy.enable" } else { "reverse_proxy.disable" },
            "settings",
        )
        .await
    }

    /// Stop every listener and start them again from the stored configuration.
    pub async fn restart(&self, actor: &Actor) -> Result<()> {
        let _w = self.writer.lock().await;
        let cfg = self.config().await?;
        let off = ReverseProxyConfig { enabled: false, ..cfg.clone() };
        let _ = self.manager.apply(&off).await;
        self.manager.apply(&cfg).await.map_err(|e| ReverseProxyError::Invalid(e.to_string()))?;
        let _ = self
            .store
            .commit(Batch::new().put(
                AUDIT_COLLECTION,
                &uuid::Uuid::now_v7().to_string(),
                to_value(&AuditEntry::new(actor, "reverse_proxy.restart", "reverse_proxy", "settings", json!({})))?,
            ))
            .await;
        Ok(())
    }

    pub async fn get_host(&self, id: &str) -> Result<ProxyHost> {
        let cfg = self.config().await?;
        cfg.hosts
            .into_iter()
            .find(|h| h.id == id || h.name == id)
            .ok_or_else(|| ReverseProxyError::NotFound(format!("No reverse-proxy host {id:?}")))
    }

    /// Keep private keys out of the store: PEM text becomes a 0600 file.
    fn externalise_key(&self, host: &mut ProxyHost) -> Result<()> {
        let key = host.tls.key.trim().to_string();
        if key.starts_with("-----BEGIN") {
            std::fs::create_dir_all(&self.keys_dir)
                .map_err(|e| ReverseProxyError::Internal(format!("{}: {e}", self.keys_dir.display())))?;
            let path = self.keys_dir.join(format!("{}.key", host.id));
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| ReverseProxyError::Internal(format!("{}: {e}", path.display())))?;
            f.write_all(key.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| ReverseProxyError::Internal(e.to_string()))?;
            host.tls.key = path.display().to_string();
        }
        Ok(())
    }

    pub async fn create_host(&self, actor: &Actor, mut host: ProxyHost) -> Result<ProxyHost> {
        let _w = self.writer.lock().await;
        let mut cfg = self.config().await?;
        if host.id.is_empty() {
            host.id = uuid::Uuid::now_v7().to_string();
        }
        if cfg.hosts.iter().any(|h| h.id == host.id || (!host.name.is_empty() && h.name == host.name)) {
            return Err(ReverseProxyError::Conflict(format!(
                "A reverse-proxy host with id {:?} or name {:?} exists",
                host.id, host.name
            )));
        }
        fill_route_ids(&mut host);
        self.externalise_key(&mut host)?;
        cfg.hosts.push(host.clone());
        let batch = Batch::new().require_absent(HOSTS, &host.id).put(HOSTS, &host.id, to_value(&host)?);
        self.commit(actor, &cfg, batch, "reverse_proxy.host.create", &host.id).await?;
        Ok(host)
    }

    async fn modify_host(
        &self,
        actor: &Actor,
        id: &str,
        action: &str,
        f: impl FnOnce(&mut ProxyHost) -> Result<()>,
    ) -> Result<ProxyHost> {
        let _w = self.writer.lock().await;
        let mut cfg = self.config().await?;
        let pos = cfg
            .hosts
            .iter()
            .position(|h| h.id == id || h.name == id)
            .ok_or_else(|| ReverseProxyError::NotFound(format!("No reverse-proxy host {id:?}")))?;
        let mut host = cfg.hosts[pos].clone();
        f(&mut host)?;
        fill_route_ids(&mut host);
        self.externalise_key(&mut host)?;
        cfg.hosts[pos] = host.clone();
        self.commit(actor, &cfg, Batch::new().put(HOSTS, &host.id, to_value(&host)?), action, &host.id).await?;
        Ok(host)
    }

    pub async fn update_host(&self, actor: &Actor, id: &str, new: ProxyHost) -> Result<ProxyHost> {
        self.modify_host(actor, id, "reverse_proxy.host.update", |h| {
            let keep = h.id.clone();
            *h = new;
            h.id = keep;
            Ok(())
        })
        .await
    }

    pub async fn delete_host(&self, actor: &Actor, id: &str) -> Result<()> {
        let _w = self.writer.lock().await;
        let mut cfg = self.config().await?;
        let host = cfg
            .hosts
            .iter()
            .find(|h| h.id == id || h.name == id)
            .cloned()
            .ok_or_else(|| ReverseProxyError::NotFound(format!("No reverse-proxy host {id:?}")))?;
        cfg.hosts.retain(|h| h.id != host.id);
        self.commit(actor, &cfg, Batch::new().delete(HOSTS, &host.id), "reverse_proxy.host.delete", &host.id).await?;
        let _ = std::fs::remove_file(self.keys_dir.join(format!("{}.key", host.id)));
        Ok(())
    }

    /// Add or replace (by id) one HTTP route.
    pub async fn upsert_http_route(&self, actor: &Actor, host_id: &str, route: HttpRoute) -> Result<ProxyHost> {
        self.modify_host(actor, host_id, "reverse_proxy.http_route.upsert", |h| {
            if h.tcp_route.is_some() {
                return Err(ReverseProxyError::Conflict(
                    "This host carries a TCP route; remove it before adding HTTP routes".into(),
                ));
            }
            match h.http_routes.iter_mut().find(|r| !route.id.is_empty() && r.id == route.id) {
                Some(r) => *r = route,
                None => h.http_routes.push(route),
            }
            Ok(())
        })
        .await
    }

    pub async fn delete_http_route(&self, actor: &Actor, host_id: &str, route_id: &str) -> Result<ProxyHost> {
        self.modify_host(actor, host_id, "reverse_proxy.http_route.delete", |h| {
            let before = h.http_routes.len();
            h.http_routes.retain(|r| r.id != route_id);
            if h.http_routes.len() == before {
                return Err(ReverseProxyError::NotFound(format!("No HTTP route {route_id:?}")));
            }
            Ok(())
        })
        .await
    }

    /// Reorder the HTTP routes: `ids` lists every route once, first one tried first.
    pub async fn order_http_routes(&self, actor: &Actor, host_id: &str, ids: Vec<String>) -> Result<ProxyHost> {
        self.modify_host(actor, host_id, "reverse_proxy.http_route.order", |h| {
            let mut have: Vec<&str> = h.http_routes.iter().map(|r| r.id.as_str()).collect();
            let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
            have.sort_unstable();
            want.sort_unstable();
            if have != want {
                return Err(ReverseProxyError::Invalid(
                    "order must list every route id of the host exactly once".into(),
                ));
            }
            for r in &mut h.http_routes {
                r.order = ids.iter().position(|i| *i == r.id).unwrap_or(0) as i64;
            }
            h.http_routes.sort_by_key(|r| r.order);
            Ok(())
        })
        .await
    }

    pub async fn set_tcp_route(&self, actor: &Actor, host_id: &str, route: TcpRoute) -> Result<ProxyHost> {
        self.modify_host(actor, host_id, "reverse_proxy.tcp_route.set", |h| {
            if !h.http_routes.is_empty() {
                return Err(ReverseProxyError::Conflict(
                    "This host carries HTTP routes; a listener has either one TCP route or HTTP routes".into(),
                ));
            }
            h.tcp_route = Some(route);
            Ok(())
        })
        .await
    }
}

/// What [`ReverseProxy::import`] did, by host name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    /// Whether `enabled`, `host` or `port` changed.
    pub settings_changed: bool,
}

impl ReverseProxy {
    /// Import the configuration file's `reverse_proxy` block (the reference's shape:
    /// `{enabled, host, port, ssl, cors, hosts: [{name, host, port, ssl, http_routes: [...],
    /// tcp_route: {...}}]}`).
    ///
    /// **The file wins for what it names.** Each host of the block, matched by `name`, is
    /// created, or replaces the stored host of that name (keeping its id), so an API change
    /// to a host the file defines lasts until the next start. Hosts only in the store are
    /// kept. `enabled`, `host` and `port` are taken when the block sets them. Routes without
    /// an id get stable ones (`file-<n>`, `file-tcp`), so importing the same block again
    /// changes nothing and writes nothing.
    pub async fn import(&self, actor: &Actor, block: &serde_json::Value) -> Result<ImportReport> {
        let file: ReverseProxyConfig = serde_json::from_value(block.clone())
            .map_err(|e| ReverseProxyError::Invalid(format!("the reverse_proxy block: {e}")))?;
        let _w = self.writer.lock().await;
        let mut cfg = self.config().await?;
        let mut report = ImportReport::default();
        let mut batch = Batch::new();
        let set = |k: &str| block.get(k).is_some();
        let before = (cfg.enabled, cfg.host.clone(), cfg.port);
        if set("enabled") {
            cfg.enabled = file.enabled;
        }
        if set("host") {
            cfg.host = file.host.clone();
        }
        if set("port") {
            cfg.port = file.port;
        }
        if before != (cfg.enabled, cfg.host.clone(), cfg.port) {
            report.settings_changed = true;
            batch =
                batch.put(SETTINGS, "settings", json!({"enabled": cfg.enabled, "host": cfg.host, "port": cfg.port}));
        }
        for mut host in file.hosts {
            if host.name.trim().is_empty() {
                return Err(ReverseProxyError::Invalid(
                    "every host of the reverse_proxy block needs a name (hosts are matched by name)".into(),
                ));
            }
            for (i, r) in host.http_routes.iter_mut().enumerate() {
                if r.id.is_empty() {
                    r.id = format!("file-{i}");
                }
            }
            if let Some(t) = &mut host.tcp_route
                && t.id.is_empty()
            {
                t.id = "file-tcp".into();
            }
            match cfg.hosts.iter().position(|h| h.name == host.name) {
                Some(pos) => {
                    host.id = cfg.hosts[pos].id.clone();
                    self.externalise_key(&mut host)?;
                    if cfg.hosts[pos] == host {
                        report.unchanged.push(host.name.clone());
                        continue;
                    }
                    report.updated.push(host.name.clone());
                    batch = batch.put(HOSTS, &host.id, to_value(&host)?);
                    cfg.hosts[pos] = host;
                }
                None => {
                    if host.id.is_empty() || cfg.hosts.iter().any(|h| h.id == host.id) {
                        host.id = uuid::Uuid::now_v7().to_string();
                    }
                    self.externalise_key(&mut host)?;
                    report.created.push(host.name.clone());
                    batch = batch.require_absent(HOSTS, &host.id).put(HOSTS, &host.id, to_value(&host)?);
                    cfg.hosts.push(host);
                }
            }
        }
        if report.settings_changed || !report.created.is_empty() || !report.updated.is_empty() {
            self.commit(actor, &cfg, batch, "reverse_proxy.import", "config file").await?;
        }
        Ok(report)
    }
}

/// VM targets on a server that runs the host module and the orchestrator: a VM of the local
/// host module is reached at its IP, any other through `fleet` (the orchestrator's tunnels).
pub struct LocalFirstDialer {
    local: Arc<HostResolver>,
    fleet: Arc<dyn hangar_proxy::VmDialer>,
}

impl LocalFirstDialer {
    pub fn new(local: Arc<HostResolver>, fleet: Arc<dyn hangar_proxy::VmDialer>) -> Arc<Self> {
        Arc::new(LocalFirstDialer { local, fleet })
    }
}

#[async_trait]
impl hangar_proxy::VmDialer for LocalFirstDialer {
    async fn dial(&self, vm: &str, port: u16) -> std::io::Result<hangar_proxy::BoxedIo> {
        match self.local.resolve(vm).await {
            Ok(ip) => {
                let s = tokio::net::TcpStream::connect((ip, port)).await?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
            Err(ResolveError::UnknownVm(_)) => self.fleet.dial(vm, port).await,
            Err(e) => Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())),
        }
    }
}

fn fill_route_ids(h: &mut ProxyHost) {
    for r in &mut h.http_routes {
        if r.id.is_empty() {
            r.id = uuid::Uuid::now_v7().to_string();
        }
    }
    if let Some(t) = &mut h.tcp_route
        && t.id.is_empty()
    {
        t.id = uuid::Uuid::now_v7().to_string();
    }
}

fn proxy_event(e: &ProxyEvent) -> Event {
    let message = match e {
        ProxyEvent::ListenerStarted { .. }
        | ProxyEvent::ListenerUpdated { .. }
        | ProxyEvent::ListenerStopped { .. } => "REVERSE_PROXY_HOST_STATE_CHANGED",
        ProxyEvent::ListenerFailed { .. } => "REVERSE_PROXY_HOST_FAILED",
        ProxyEvent::RouteFailed { .. } => "Reverse Proxy Route Failed",
        ProxyEvent::TargetResolved { .. } => "Reverse Proxy Route Updated",
    };
    Event::new(EventType::ReverseProxy, message, serde_json::to_value(e).unwrap_or_default())
}

/// VM targets through the host module: the first IPv4 address of a running VM.
pub struct HostResolver {
    host: Arc<Host>,
    changes: broadcast::Sender<String>,
}

impl HostResolver {
    pub fn new(host: Arc<Host>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(256);
        let mut rx = host.driver().subscribe();
        let feed = tx.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(VmEvent::IpChanged { id, .. })
                    | Ok(VmEvent::StateChanged { id, .. })
                    | Ok(VmEvent::Removed { id }) => {
                        let _ = feed.send(id);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Arc::new(HostResolver { host, changes: tx })
    }
}

#[async_trait]
impl TargetResolver for HostResolver {
    async fn resolve(&self, vm_id: &str) -> Result<IpAddr, ResolveError> {
        let vm = self.host.get(vm_id).await.map_err(|_| ResolveError::UnknownVm(vm_id.to_string()))?;
        if vm.state != VmState::Running {
            return Err(ResolveError::NoAddress(vm_id.to_string()));
        }
        vm.ip_addresses
            .iter()
            .find(|i| i.is_ipv4())
            .or(vm.ip_addresses.first())
            .copied()
            .ok_or_else(|| ResolveError::NoAddress(vm_id.to_string()))
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }
}

/// Hangar tokens (`Authorization: Bearer`) and API keys (`X-Api-Key`) on protected listeners.
/// Both headers are removed before the request reaches the VM.
pub struct IdentityAuth {
    identity: hangar_identity::Identity,
}

impl IdentityAuth {
    pub fn new(identity: hangar_identity::Identity) -> Arc<Self> {
        Arc::new(IdentityAuth { identity })
    }
}

#[async_trait]
impl ProxyAuth for IdentityAuth {
    async fn check(&self, _host_id: &str, headers: &http::HeaderMap) -> Result<(), AuthRejection> {
        if let Some(v) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
            && let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
        {
            return self
                .identity
                .authenticate_token(t.trim())
                .await
                .map(|_| ())
                .map_err(|e| AuthRejection::new(e.to_string()));
        }
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            return self
                .identity
                .authenticate_api_key(k.trim())
                .await
                .map(|_| ())
                .map_err(|e| AuthRejection::new(e.to_string()));
        }
        Err(AuthRejection::new("This listener needs a Hangar token (Authorization: Bearer) or an API key (X-Api-Key)"))
    }

    fn credential_headers(&self) -> Vec<http::HeaderName> {
        vec![http::header::AUTHORIZATION, http::HeaderName::from_static("x-api-key")]
    }
}
