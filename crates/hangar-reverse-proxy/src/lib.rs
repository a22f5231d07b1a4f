//! The `reverse_proxy` module.
//!
//! [`ReverseProxy`] keeps the proxy configuration (the reference's model: a global switch and
//! proxy hosts, each a listener with one TCP route or ordered HTTP routes) in the store, and
//! applies it to a [`hangar_proxy::ProxyManager`] after every change, so listeners follow the
//! configuration without a restart and survive one. The adapters connect the engine to the
//! rest of Hangar: [`HostResolver`] finds a VM's current address through the host module and
//! feeds address changes back; [`IdentityAuth`] accepts Hangar tokens and API keys on
//! listeners that require them. Engine events are republished as `reverse_proxy` events.
//! Private keys given as PEM text are written to files with mode 0600 under the data folder
//! (`<data>/secrets/proxy/`, named by Hangar), only once the change is checked, and removed
//! again when the change is refused; the store and the API only ever hold their paths.
//! Certificate and key paths given by a client must lie in the configured TLS folder
//! ([`ReverseProxyOptions::tls_folder`]); listeners may not take the API's ports, privileged
//! ports (unless allowed) or ports another program holds.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use hangar_core::audit::{AUDIT_COLLECTION, Actor, AuditEntry};
use hangar_core::{Classify, ErrorKind, Event, EventBus, EventType};
use hangar_host::Host;
use hangar_hypervisor::{VmEvent, VmState};
use hangar_proxy::{
    AuthRejection, AuthRequest, HttpRoute, ProxyAuth, ProxyEvent, ProxyHost, ProxyManager, ProxyStatus, ResolveError,
    ReverseProxyConfig, TargetResolver, TcpRoute,
};
use hangar_store::{Batch, Store, StoreError};
use serde_json::json;
use tokio::sync::{Mutex, broadcast};
use tracing::warn;

pub const SETTINGS: &str = "reverse_proxy";
pub const HOSTS: &str = "reverse_proxy_hosts";

/// Longest proxy host id.
pub const MAX_ID_LEN: usize = 128;

/// The one rule for proxy host ids (the catalog's id charset): 1 to [`MAX_ID_LEN`] letters,
/// digits, `.`, `_` or `-`, starting with a letter or digit.
pub fn validate_host_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ReverseProxyError::Invalid(format!(
            "proxy host id {id:?} is invalid: use 1 to {MAX_ID_LEN} letters, digits, '.', '_' or '-', starting with a \
             letter or digit (or leave it empty to get a generated id)"
        )))
    }
}

/// What the server's configuration decides for the module.
#[derive(Debug, Clone, Default)]
pub struct ReverseProxyOptions {
    /// Ports no proxy host may take, with what holds them (the API's HTTP and HTTPS ports).
    pub reserved_ports: Vec<(u16, String)>,
    /// `REVERSE_PROXY_ALLOW_PRIVILEGED_PORTS`: whether hosts may listen on ports below 1024.
    pub allow_privileged_ports: bool,
    /// `REVERSE_PROXY_TLS_FOLDER`: the only folder `tls.cert`/`tls.key` paths may name;
    /// `None` refuses paths (PEM text only).
    pub tls_folder: Option<PathBuf>,
}

/// Key files a change created (removed again unless the change is stored) and key files it
/// made obsolete (removed once it is stored).
#[derive(Default)]
struct KeyFiles {
    created: Vec<PathBuf>,
    obsolete: Vec<PathBuf>,
    stored: bool,
}

impl KeyFiles {
    /// The change is stored: drop the files it replaced.
    fn stored(mut self) {
        self.stored = true;
        for p in &self.obsolete {
            if !self.created.contains(p) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Drop for KeyFiles {
    fn drop(&mut self) {
        if !self.stored {
            for p in &self.created {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

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
    /// With `tls_folder` canonical.
    options: ReverseProxyOptions,
    /// `tls_folder` as configured (paths may name it so).
    tls_folder_as_set: Option<PathBuf>,
    /// Changes are read-modify-write of the whole configuration: one at a time.
    writer: Mutex<()>,
}

impl ReverseProxy {
    /// Load the stored configuration, apply it, and start republishing engine events, with
    /// the default options (no TLS folder: certificate and key paths are refused).
    pub async fn start(
        store: Arc<dyn Store>,
        manager: ProxyManager,
        bus: EventBus,
        data_dir: &std::path::Path,
    ) -> Result<Arc<Self>> {
        Self::start_with(store, manager, bus, data_dir, ReverseProxyOptions::default()).await
    }

    /// [`ReverseProxy::start`] with the server's options. Stored hosts whose TLS paths lie
    /// outside the TLS folder are not started (logged).
    pub async fn start_with(
        store: Arc<dyn Store>,
        manager: ProxyManager,
        bus: EventBus,
        data_dir: &std::path::Path,
        mut options: ReverseProxyOptions,
    ) -> Result<Arc<Self>> {
        let tls_folder_as_set = options.tls_folder.clone();
        if let Some(f) = &options.tls_folder {
            let canonical = f.canonicalize().map_err(|e| {
                ReverseProxyError::Invalid(format!(
                    "REVERSE_PROXY_TLS_FOLDER {} cannot be used: {e}; create it or unset the key",
                    f.display()
                ))
            })?;
            options.tls_folder = Some(canonical);
        }
        let me = Arc::new(ReverseProxy {
            store,
            manager,
            bus: bus.clone(),
            keys_dir: data_dir.join("secrets").join("proxy"),
            options,
            tls_folder_as_set,
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
        let cfg = me.runnable(&me.config().await?);
        if let Err(e) = me.manager.apply(&cfg).await {
            warn!(error = %e, "the stored reverse-proxy configuration does not apply");
        }
        Ok(me)
    }

    /// What the engine may run of `cfg`: stored hosts whose TLS paths lie outside the TLS
    /// folder (stored before it was enforced) are left out, with a warning.
    fn runnable(&self, cfg: &ReverseProxyConfig) -> ReverseProxyConfig {
        let mut out = cfg.clone();
        out.hosts.retain(|h| match self.check_stored_tls(h) {
            Ok(()) => true,
            Err(e) => {
                warn!(host = %h.key(), error = %e, "proxy host not started");
                false
            }
        });
        out
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
    /// Key files `keys` created are removed again when the change is refused or not stored.
    async fn commit(
        &self,
        actor: &Actor,
        cfg: &ReverseProxyConfig,
        batch: Batch,
        action: &str,
        target: &str,
        keys: KeyFiles,
    ) -> Result<()> {
        cfg.validate().map_err(|e| ReverseProxyError::Invalid(e.to_string()))?;
        let entry = AuditEntry::new(actor, action, "reverse_proxy", target, json!({}));
        let batch = batch.put(AUDIT_COLLECTION, &entry.id, to_value(&entry)?);
        self.store.commit(batch).await?;
        keys.stored();
        self.bus.publish(Event::new(
            EventType::ReverseProxy,
            "REVERSE_PROXY_UPDATED",
            json!({"action": action, "target": target}),
        ));
        if let Err(e) = self.manager.apply(&self.runnable(cfg)).await {
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
            KeyFiles::default(),
        )
        .await
    }

    /// Stop every listener and start them again from the stored configuration.
    pub async fn restart(&self, actor: &Actor) -> Result<()> {
        let _w = self.writer.lock().await;
        let cfg = self.config().await?;
        let off = ReverseProxyConfig { enabled: false, ..cfg.clone() };
        let _ = self.manager.apply(&off).await;
        self.manager.apply(&self.runnable(&cfg)).await.map_err(|e| ReverseProxyError::Invalid(e.to_string()))?;
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

    /// Whether `path` is a key file of this module (under its folder, no `..`).
    fn is_own_key_file(&self, path: &str) -> bool {
        let p = Path::new(path.trim());
        p.starts_with(&self.keys_dir) && p.components().all(|c| !matches!(c, Component::ParentDir))
    }

    /// A certificate or key path given by a client: inside the TLS folder, or refused with
    /// the same message whether or not the file exists. Returns the canonical path.
    fn confine(&self, field: &str, value: &str) -> Result<String> {
        let outside = || {
            ReverseProxyError::Invalid(format!(
                "tls.{field} is a file path outside the folder REVERSE_PROXY_TLS_FOLDER ({}); send the PEM text \
                 instead, or put the file in that folder",
                match &self.options.tls_folder {
                    Some(_) => "set on this server",
                    None => "not set on this server, so paths are refused",
                }
            ))
        };
        let (Some(folder), Some(as_set)) = (&self.options.tls_folder, &self.tls_folder_as_set) else {
            return Err(outside());
        };
        let given = Path::new(value.trim());
        let joined = if given.is_absolute() { given.to_path_buf() } else { folder.join(given) };
        if joined.components().any(|c| matches!(c, Component::ParentDir))
            || !(joined.starts_with(folder) || joined.starts_with(as_set))
        {
            return Err(outside());
        }
        // Inside the folder (which the operator chose), whether a file exists may be told.
        let canonical = joined.canonicalize().map_err(|e| {
            ReverseProxyError::Invalid(format!("tls.{field}: {} in REVERSE_PROXY_TLS_FOLDER: {e}", given.display()))
        })?;
        if !canonical.starts_with(folder) {
            return Err(outside());
        }
        Ok(canonical.display().to_string())
    }

    /// Check (and settle) the TLS sources of a host a client sends, before anything is
    /// written: PEM text, paths inside the TLS folder, the hidden key `********` (the stored
    /// key kept) or the stored key file itself.
    fn check_tls(&self, host: &mut ProxyHost, stored: Option<&ProxyHost>) -> Result<()> {
        let stored_key = stored.map(|h| h.tls.key.clone()).unwrap_or_default();
        let key = host.tls.key.trim().to_string();
        if key == "********" {
            if stored_key.is_empty() {
                return Err(ReverseProxyError::Invalid(
                    "tls.key is the hidden placeholder ********, but this host has no key; send the key's PEM text"
                        .into(),
                ));
            }
            host.tls.key = stored_key.clone();
        } else {
            let kept = key == stored_key.trim() && self.is_own_key_file(&key);
            if !key.is_empty() && !is_pem(&key) && !kept {
                host.tls.key = self.confine("key", &key)?;
            }
        }
        let cert = host.tls.cert.trim().to_string();
        if !cert.is_empty() && !is_pem(&cert) {
            host.tls.cert = self.confine("cert", &cert)?;
        }
        Ok(())
    }

    /// The same rule for a stored host at start: paths in the TLS folder, or key files of
    /// this module.
    fn check_stored_tls(&self, host: &ProxyHost) -> Result<()> {
        let key = host.tls.key.trim();
        if !key.is_empty() && !is_pem(key) && !self.is_own_key_file(key) {
            self.confine("key", key)?;
        }
        let cert = host.tls.cert.trim();
        if !cert.is_empty() && !is_pem(cert) {
            self.confine("cert", cert)?;
        }
        Ok(())
    }

    /// A listener a client asks for: not on the API's ports, not on a privileged port unless
    /// allowed, not on a port another program holds. Checked when the address is new.
    async fn check_listener(
        &self,
        cfg: &ReverseProxyConfig,
        host: &ProxyHost,
        stored: Option<&ProxyHost>,
    ) -> Result<()> {
        let bind = cfg.bind_addr(host);
        let port = bind.port;
        if port == 0 {
            return Ok(());
        }
        if let Some(old) = stored
            && cfg.bind_addr(old) == bind
        {
            return Ok(());
        }
        let default = if host.port.is_none() { " (the default when port is empty)" } else { "" };
        if let Some((_, holder)) = self.options.reserved_ports.iter().find(|(p, _)| *p == port) {
            return Err(ReverseProxyError::Invalid(format!(
                "port {port}{default} is {holder}; give this proxy host another port"
            )));
        }
        if port < 1024 && !self.options.allow_privileged_ports {
            return Err(ReverseProxyError::Invalid(format!(
                "port {port}{default} is a privileged port (below 1024); use a port from 1024 up, or set \
                 REVERSE_PROXY_ALLOW_PRIVILEGED_PORTS=true on the server"
            )));
        }
        if self.status().await.listener(&host.id).and_then(|l| l.local_address()).is_some_and(|a| a.port() == port) {
            return Ok(());
        }
        let addrs: Vec<std::net::SocketAddr> = (bind.host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| ReverseProxyError::Invalid(format!("bind address {bind} cannot be used: {e}")))?
            .collect();
        for a in addrs {
            if let Err(e) = std::net::TcpListener::bind(a) {
                return Err(if e.kind() == std::io::ErrorKind::AddrInUse {
                    ReverseProxyError::Conflict(format!(
                        "port {port} on {} is already in use on this machine; give this proxy host another port",
                        a.ip()
                    ))
                } else {
                    ReverseProxyError::Invalid(format!("this server cannot listen on {a}: {e}"))
                });
            }
        }
        Ok(())
    }

    /// Keep private keys out of the store: PEM text becomes a 0600 file under the module's
    /// folder, named by Hangar (the stored file is kept when its text is the same). Call only
    /// once the change is checked; `keys` records the files made and replaced.
    fn externalise_key(&self, host: &mut ProxyHost, stored: Option<&ProxyHost>, keys: &mut KeyFiles) -> Result<()> {
        let old = stored.map(|h| h.tls.key.trim().to_string()).filter(|k| self.is_own_key_file(k));
        let key = host.tls.key.trim().to_string();
        if is_pem(&key) {
            let same = old.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).is_some_and(|t| t.trim() == key);
            if same && let Some(p) = &old {
                host.tls.key = p.clone();
                return Ok(());
            }
            let path = self.write_key(&key)?;
            keys.created.push(path.clone());
            host.tls.key = path.display().to_string();
        }
        if let Some(p) = old
            && p != host.tls.key.trim()
        {
            keys.obsolete.push(PathBuf::from(p));
        }
        Ok(())
    }

    /// Write a key to a new file of the module's folder: a temporary file (0600, created
    /// new), synced, then renamed to its final name.
    fn write_key(&self, pem: &str) -> Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = &self.keys_dir;
        let fail = |what: &Path, e: std::io::Error| ReverseProxyError::Internal(format!("{}: {e}", what.display()));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| fail(dir, e))?;
        let name = uuid::Uuid::new_v4().simple().to_string();
        let tmp = dir.join(format!(".{name}.tmp"));
        let path = dir.join(format!("{name}.key"));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(&path, e)
        })?;
        Ok(path)
    }

    pub async fn create_host(&self, actor: &Actor, mut host: ProxyHost) -> Result<ProxyHost> {
        if host.id.is_empty() {
            host.id = uuid::Uuid::now_v7().to_string();
        }
        validate_host_id(&host.id)?;
        let _w = self.writer.lock().await;
        let mut cfg = self.config().await?;
        if cfg.hosts.iter().any(|h| h.id == host.id || (!host.name.is_empty() && h.name == host.name)) {
            return Err(ReverseProxyError::Conflict(format!(
                "A reverse-proxy host with id {:?} or name {:?} exists",
                host.id, host.name
            )));
        }
        fill_route_ids(&mut host);
        self.check_tls(&mut host, None)?;
        self.check_listener(&cfg, &host, None).await?;
        cfg.hosts.push(host.clone());
        // Checked whole (the key still as PEM text) before any file is written.
        cfg.validate().map_err(|e| ReverseProxyError::Invalid(e.to_string()))?;
        let mut keys = KeyFiles::default();
        self.externalise_key(&mut host, None, &mut keys)?;
        if let Some(last) = cfg.hosts.last_mut() {
            *last = host.clone();
        }
        let batch = Batch::new().require_absent(HOSTS, &host.id).put(HOSTS, &host.id, to_value(&host)?);
        self.commit(actor, &cfg, batch, "reverse_proxy.host.create", &host.id, keys).await?;
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
        let stored = cfg.hosts[pos].clone();
        let mut host = stored.clone();
        f(&mut host)?;
        fill_route_ids(&mut host);
        self.check_tls(&mut host, Some(&stored))?;
        self.check_listener(&cfg, &host, Some(&stored)).await?;
        cfg.hosts[pos] = host.clone();
        cfg.validate().map_err(|e| ReverseProxyError::Invalid(e.to_string()))?;
        let mut keys = KeyFiles::default();
        self.externalise_key(&mut host, Some(&stored), &mut keys)?;
        cfg.hosts[pos] = host.clone();
        let batch = Batch::new().put(HOSTS, &host.id, to_value(&host)?);
        self.commit(actor, &cfg, batch, action, &host.id, keys).await?;
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
        let mut keys = KeyFiles::default();
        if self.is_own_key_file(&host.tls.key) {
            keys.obsolete.push(PathBuf::from(host.tls.key.trim()));
        }
        let batch = Batch::new().delete(HOSTS, &host.id);
        self.commit(actor, &cfg, batch, "reverse_proxy.host.delete", &host.id, keys).await?;
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
        let mut keys = KeyFiles::default();
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
                    let stored = cfg.hosts[pos].clone();
                    self.check_tls(&mut host, Some(&stored))?;
                    compile_alone(&cfg, &host)?;
                    self.externalise_key(&mut host, Some(&stored), &mut keys)?;
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
                    validate_host_id(&host.id)?;
                    self.check_tls(&mut host, None)?;
                    compile_alone(&cfg, &host)?;
                    self.externalise_key(&mut host, None, &mut keys)?;
                    report.created.push(host.name.clone());
                    batch = batch.require_absent(HOSTS, &host.id).put(HOSTS, &host.id, to_value(&host)?);
                    cfg.hosts.push(host);
                }
            }
        }
        if report.settings_changed || !report.created.is_empty() || !report.updated.is_empty() {
            self.commit(actor, &cfg, batch, "reverse_proxy.import", "config file", keys).await?;
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

fn is_pem(s: &str) -> bool {
    s.trim_start().starts_with("-----BEGIN")
}

/// Check one host on its own (routes, TLS material given as PEM text) before its key is
/// written; the whole configuration is checked again when it is committed.
fn compile_alone(cfg: &ReverseProxyConfig, host: &ProxyHost) -> Result<()> {
    let alone = ReverseProxyConfig { hosts: vec![host.clone()], ..cfg.clone() };
    alone.validate().map_err(|e| ReverseProxyError::Invalid(e.to_string()))
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

/// Hangar tokens (`Authorization: Bearer`) and API keys (`X-Api-Key`) on protected listeners,
/// and the hosts' requirements: roles and claims (the one rule of
/// [`hangar_core::Principal::meets`]) and, for VM targets, the VM's owner as the host module
/// recorded it (the owner, a SUPER_USER, or a holder of `MANAGE_ALL_VMS`).
/// Both headers are removed before the request reaches the VM.
pub struct IdentityAuth {
    identity: hangar_identity::Identity,
    host: Option<Arc<Host>>,
    fleet: Option<FleetOwners>,
}

/// The answer of a [`FleetOwners`] lookup: the VM's Hangar owner (`None` when it has none),
/// or why it cannot be told.
pub type OwnerFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<String>, String>> + Send>>;

/// Finds the owner of a VM that is not on this server's host module (the orchestrator's
/// fleet), as the caller (the principal) may see it.
pub type FleetOwners = Arc<dyn Fn(hangar_core::Principal, String) -> OwnerFuture + Send + Sync>;

impl IdentityAuth {
    pub fn new(identity: hangar_identity::Identity) -> Arc<Self> {
        Arc::new(IdentityAuth { identity, host: None, fleet: None })
    }

    /// With the host module, whose owner records decide `require_vm_owner` for its VMs, and
    /// the orchestrator's lookup for the fleet's. A request to a VM neither knows is refused
    /// on hosts that require the VM's owner.
    pub fn with_owners(
        identity: hangar_identity::Identity,
        host: Option<Arc<Host>>,
        fleet: Option<FleetOwners>,
    ) -> Arc<Self> {
        Arc::new(IdentityAuth { identity, host, fleet })
    }

    async fn principal(&self, headers: &http::HeaderMap) -> Result<hangar_core::Principal, AuthRejection> {
        if let Some(v) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
            && let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))
        {
            return self.identity.authenticate_token(t.trim()).await.map_err(|e| AuthRejection::new(e.to_string()));
        }
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            return self.identity.authenticate_api_key(k.trim()).await.map_err(|e| AuthRejection::new(e.to_string()));
        }
        Err(AuthRejection::new("This listener needs a Hangar token (Authorization: Bearer) or an API key (X-Api-Key)"))
    }

    /// The owner Hangar recorded for a VM: of the local host module first, else of the fleet.
    async fn owner_of(&self, p: &hangar_core::Principal, vm: &str) -> Result<Option<String>, AuthRejection> {
        let refused = || {
            AuthRejection::forbidden(format!(
                "This listener serves VM {vm:?} to its owner only, and the owner of that VM cannot be found on this \
                 server"
            ))
        };
        if let Some(host) = &self.host
            && let Ok(info) = host.get(vm).await
        {
            return host.machine(info).await.map(|m| m.owner).map_err(|_| refused());
        }
        match &self.fleet {
            Some(fleet) => fleet(p.clone(), vm.to_string()).await.map_err(|_| refused()),
            None => Err(refused()),
        }
    }
}

#[async_trait]
impl ProxyAuth for IdentityAuth {
    async fn check(&self, _host_id: &str, headers: &http::HeaderMap) -> Result<(), AuthRejection> {
        self.principal(headers).await.map(|_| ())
    }

    async fn authorize(&self, req: &AuthRequest<'_>) -> Result<(), AuthRejection> {
        let p = self.principal(req.headers).await?;
        if !p.meets(req.required_roles, req.required_claims) {
            return Err(AuthRejection::forbidden(format!(
                "This listener requires the roles {:?} and the claims {:?}; ask an administrator to grant them",
                req.required_roles, req.required_claims
            )));
        }
        if let Some(vm) = req.vm_owner_of
            && !p.is_super_user()
            && !p.has_claim(hangar_core::claims::MANAGE_ALL_VMS)
        {
            let owner = self.owner_of(&p, vm).await?;
            if owner.as_deref() != Some(p.username.as_str()) {
                return Err(AuthRejection::forbidden(format!(
                    "VM {vm:?} is not yours: this listener serves it to its owner only (or to a holder of {})",
                    hangar_core::claims::MANAGE_ALL_VMS
                )));
            }
        }
        Ok(())
    }

    fn credential_headers(&self) -> Vec<http::HeaderName> {
        vec![http::header::AUTHORIZATION, http::HeaderName::from_static("x-api-key")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_follow_one_rule() {
        for ok in ["web", "web-1", "a.b_c", "0193c0de-7a1b-7c00-8000-000000000000", &"x".repeat(MAX_ID_LEN)] {
            assert!(validate_host_id(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "..", "../../store", "a/b", "a\\b", "-x", ".hidden", " web", "a b", "é", &"x".repeat(129)] {
            let e = validate_host_id(bad).unwrap_err().to_string();
            assert!(e.contains("proxy host id"), "{bad:?}: {e}");
        }
    }
}
