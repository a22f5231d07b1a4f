//! [`ProxyManager`]: one listener per proxy host, reconfigured in place.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::sync::{Mutex, broadcast};
use tokio::task::JoinHandle;

use crate::auth::ProxyAuth;
use crate::compile::{CompiledHost, compile_config};
use crate::config::{BindAddr, ProxyHost, ReverseProxyConfig, Schema, Target};
use crate::dial::VmDialer;
use crate::error::ConfigError;
use crate::error::ProxyError;
use crate::events::{EventSink, ProxyEvent};
use crate::http::{Shared, Upstreams, server_builder};
use crate::listener::{self, ListenerTimeouts, Running};
use crate::resolve::{TargetCache, TargetResolver};
use crate::tls::UpstreamTrust;

/// Runs the listeners of a [`ReverseProxyConfig`].
///
/// [`ProxyManager::apply`] compares the new configuration with the running one, host by host:
/// a host whose address is unchanged takes its new routes, TLS material and limits in place
/// (its open connections are not touched; new connections and requests use the new settings);
/// a host that moved, was removed or failed earlier is stopped gracefully and, if still
/// wanted, started again. Other hosts are not disturbed. A host whose configuration is
/// unchanged is left alone: TLS files are read again only when the host's settings change.
///
/// Clones share the same listeners; the listeners are cut when the last clone is dropped
/// (call [`ProxyManager::shutdown`] for a graceful stop). Listeners run on the Tokio runtime
/// that calls [`ProxyManager::apply`].
#[derive(Clone)]
pub struct ProxyManager {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<crate::http::ConnExec>>,
    events: broadcast::Sender<ProxyEvent>,
    timeouts: ListenerTimeouts,
    grace: Duration,
    watching: AtomicBool,
    table: Mutex<Table>,
    io: IoThreads,
    reserved: Vec<(u16, String)>,
}

/// Dedicated single-threaded runtimes for listeners (see [`ProxyManagerBuilder::io_threads`]).
/// Dropping it stops them, which cuts whatever still runs on them.
#[derive(Default)]
struct IoThreads {
    handles: Vec<tokio::runtime::Handle>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl IoThreads {
    fn start(n: usize) -> std::io::Result<Self> {
        let mut io = IoThreads::default();
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            io.handles.push(rt.handle().clone());
            std::thread::Builder::new().name(format!("hangar-proxy-io-{i}")).spawn(move || {
                // Returns when the sender is dropped; the runtime and its tasks go with it.
                let _ = rt.block_on(rx);
            })?;
            io.stop.push(tx);
        }
        Ok(io)
    }
}

#[derive(Default)]
struct Table {
    enabled: bool,
    listeners: BTreeMap<String, Entry>,
    draining: Vec<JoinHandle<()>>,
}

struct Entry {
    bind: BindAddr,
    spec: ProxyHost,
    run: Result<Running, String>,
}

/// Builds a [`ProxyManager`].
pub struct ProxyManagerBuilder {
    resolver: Option<Arc<dyn TargetResolver>>,
    dialer: Option<Arc<dyn VmDialer>>,
    auth: Option<Arc<dyn ProxyAuth>>,
    trust: UpstreamTrust,
    grace: Duration,
    tls_handshake: Duration,
    connect: Duration,
    header_read: Duration,
    pool_idle: Duration,
    event_capacity: usize,
    io_threads: usize,
    fast_lane: bool,
    reserved: Vec<(u16, String)>,
}

impl Default for ProxyManagerBuilder {
    fn default() -> Self {
        ProxyManagerBuilder {
            resolver: None,
            dialer: None,
            auth: None,
            trust: UpstreamTrust::Platform,
            grace: Duration::from_secs(5),
            tls_handshake: Duration::from_secs(10),
            connect: Duration::from_secs(10),
            header_read: Duration::from_secs(5),
            pool_idle: Duration::from_secs(90),
            event_capacity: 1024,
            io_threads: 0,
            fast_lane: true,
            reserved: Vec::new(),
        }
    }
}

impl ProxyManagerBuilder {
    /// How VM ids become addresses. Without one, VM targets answer 502.
    pub fn resolver(mut self, r: Arc<dyn TargetResolver>) -> Self {
        self.resolver = Some(r);
        self
    }
    /// Reach VM targets through `d` instead of resolving their IP and connecting over TCP:
    /// TCP routes and `http`/`h2c` HTTP routes to a VM then use [`VmDialer::dial`] (the resolver
    /// is not asked). `https` routes to a VM are refused by [`ProxyManager::apply`] with a
    /// configuration error, since TLS to the target through a dialer is not supported.
    pub fn vm_dialer(mut self, d: Arc<dyn VmDialer>) -> Self {
        self.dialer = Some(d);
        self
    }
    /// Who checks requests to hosts with `require_auth`. Without one, such hosts answer 401.
    pub fn auth(mut self, a: Arc<dyn ProxyAuth>) -> Self {
        self.auth = Some(a);
        self
    }
    /// Which certificates `https` targets may present (default: the platform trust store).
    pub fn upstream_trust(mut self, t: UpstreamTrust) -> Self {
        self.trust = t;
        self
    }
    /// How long stopped listeners' connections may finish before they are cut (default 5 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }
    /// Time allowed for a client's TLS handshake (default 10 s).
    pub fn tls_handshake_timeout(mut self, d: Duration) -> Self {
        self.tls_handshake = d;
        self
    }
    /// Time allowed to connect to a TCP target (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect = d;
        self
    }
    /// Time allowed for a client to send a request's headers (default 5 s, as the reference).
    pub fn header_read_timeout(mut self, d: Duration) -> Self {
        self.header_read = d;
        self
    }
    /// Run listeners and their connections on `n` dedicated threads, each with its own
    /// single-threaded Tokio runtime and, when `n > 1`, its own listening socket per host
    /// (`SO_REUSEPORT`: the kernel spreads connections over them). No work moves between
    /// threads, which costs less per request than a work-stealing runtime. `0` (the default)
    /// runs them on the runtime that calls [`ProxyManager::apply`].
    pub fn io_threads(mut self, n: usize) -> Self {
        self.io_threads = n;
        self
    }
    /// Serve plain HTTP/1.1 keep-alive requests in the fast lane (default `true`); `false`
    /// leaves every request to hyper (to compare the two, or as an escape hatch).
    pub fn http1_fast_lane(mut self, enabled: bool) -> Self {
        self.fast_lane = enabled;
        self
    }
    /// A port the listeners must never bind (the server's own API ports), with what holds
    /// it. A host configured on it is reported as failed by [`ProxyManager::apply`] (and in
    /// the status and events) instead of taking the port; the other hosts are not disturbed.
    pub fn reserve_port(mut self, port: u16, holder: impl Into<String>) -> Self {
        if port != 0 {
            self.reserved.push((port, holder.into()));
        }
        self
    }
    /// Build the manager. Nothing listens until [`ProxyManager::apply`].
    pub fn build(self) -> Result<ProxyManager, ProxyError> {
        let (events, _) = broadcast::channel(self.event_capacity.max(1));
        let sink = EventSink(events.clone());
        let shared = Arc::new(Shared {
            upstreams: Upstreams::new(&self.trust, self.pool_idle)?,
            targets: Arc::new(TargetCache::new(self.resolver, sink.clone())),
            dialer: self.dialer,
            auth: self.auth,
            events: sink,
            header_read: self.header_read,
            fast_lane: self.fast_lane,
            idle: crate::h1::IdlePool::new(self.pool_idle),
        });
        Ok(ProxyManager {
            inner: Arc::new(Inner {
                shared,
                builder: Arc::new(server_builder(self.header_read)),
                events,
                timeouts: ListenerTimeouts { tls_handshake: self.tls_handshake, connect: self.connect },
                grace: self.grace,
                watching: AtomicBool::new(false),
                table: Mutex::new(Table::default()),
                io: IoThreads::start(self.io_threads).map_err(ProxyError::Runtime)?,
                reserved: self.reserved,
            }),
        })
    }
}

/// What [`ProxyManager::apply`] did, by host key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Listeners opened (new hosts, moved hosts, retried failures).
    pub started: Vec<String>,
    /// Running listeners that took a new configuration in place.
    pub updated: Vec<String>,
    /// Listeners closed and not reopened.
    pub stopped: Vec<String>,
    /// Running listeners left as they were.
    pub unchanged: Vec<String>,
    /// Hosts whose listener could not start, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Kind of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// HTTP routes.
    Http,
    /// One TCP route.
    Tcp,
}

/// State of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ListenerState {
    /// Accepting connections.
    Running {
        /// The bound address (useful with port 0).
        local_address: SocketAddr,
    },
    /// Could not start; applying again retries.
    Failed {
        /// Why.
        error: String,
    },
}

/// Status of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerStatus {
    /// Host key.
    pub id: String,
    /// Host name.
    pub name: String,
    /// Configured address.
    pub address: String,
    /// HTTP or TCP.
    pub kind: ListenerKind,
    /// TLS on the listener.
    pub tls: bool,
    /// Running or failed.
    #[serde(flatten)]
    pub state: ListenerState,
    /// Connections open now.
    pub active_connections: u64,
    /// Connections accepted since start.
    pub total_connections: u64,
    /// HTTP requests received since start.
    pub requests: u64,
    /// TCP connections refused because of `max_connections`.
    pub refused_connections: u64,
}

impl ListenerStatus {
    /// The bound address, when running.
    pub fn local_address(&self) -> Option<SocketAddr> {
        match self.state {
            ListenerState::Running { local_address } => Some(local_address),
            ListenerState::Failed { .. } => None,
        }
    }
}

/// Status of the whole proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyStatus {
    /// Whether the last applied configuration was enabled.
    pub enabled: bool,
    /// One entry per configured host.
    pub listeners: Vec<ListenerStatus>,
}

impl ProxyStatus {
    /// The status of one host.
    pub fn listener(&self, id: &str) -> Option<&ListenerStatus> {
        self.listeners.iter().find(|l| l.id == id)
    }
}

impl ProxyManager {
    /// A builder with the defaults.
    pub fn builder() -> ProxyManagerBuilder {
        ProxyManagerBuilder::default()
    }

    /// Receive events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ProxyEvent> {
        self.inner.events.subscribe()
    }

    /// Make the running listeners match `config`. The configuration is checked completely
    /// first; when it is refused nothing changes. Listeners that cannot bind are reported in
    /// [`ApplyReport::failed`] and in the status, and do not stop the others.
    pub async fn apply(&self, config: &ReverseProxyConfig) -> Result<ApplyReport, ProxyError> {
        let span = tracing::info_span!("proxy_apply", hosts = config.hosts.len(), enabled = config.enabled);
        let _e = span.enter();
        let compiled = if config.enabled { compile_config(config)? } else { Vec::new() };
        if self.inner.shared.dialer.is_some() {
            refuse_https_to_dialed_vms(config)?;
        }
        drop(_e);
        if !self.inner.watching.swap(true, Ordering::AcqRel) {
            self.inner.shared.targets.spawn_watch();
        }
        let mut table = self.inner.table.lock().await;
        table.enabled = config.enabled;
        table.draining.retain(|h| !h.is_finished());
        let mut report = ApplyReport::default();
        let desired: HashMap<&str, &CompiledHost> = compiled.iter().map(|c| (c.key.as_str(), c)).collect();

        // Close what is no longer wanted, what moved and what failed, before binding anything.
        let keys: Vec<String> = table.listeners.keys().cloned().collect();
        for key in keys {
            let keep = match (desired.get(key.as_str()), table.listeners.get(&key)) {
                (Some(c), Some(e)) => e.bind == c.bind && e.run.is_ok(),
                _ => false,
            };
            if keep {
                continue;
            }
            if let Some(entry) = table.listeners.remove(&key)
                && let Ok(run) = entry.run
            {
                let h = self.stop_running(run).await;
                table.draining.push(h);
                self.send(ProxyEvent::ListenerStopped { host_id: key.clone() });
                if !desired.contains_key(key.as_str()) {
                    report.stopped.push(key);
                }
            }
        }

        for c in compiled {
            if let Some(entry) = table.listeners.get_mut(&c.key) {
                if entry.spec == c.spec {
                    report.unchanged.push(c.key);
                    continue;
                }
                if let Ok(run) = &entry.run {
                    run.ctx.state.store(c.state);
                }
                entry.spec = c.spec;
                tracing::info!(host = %c.key, "proxy listener updated in place");
                self.send(ProxyEvent::ListenerUpdated { host_id: c.key.clone() });
                report.updated.push(c.key);
                continue;
            }
            let started = match self.inner.reserved.iter().find(|(p, _)| *p == c.bind.port) {
                Some((port, holder)) => Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("port {port} is reserved for {holder}; give this proxy host another port"),
                )),
                None => {
                    listener::start(
                        &c.key,
                        &c.bind,
                        c.state,
                        self.inner.shared.clone(),
                        self.inner.builder.clone(),
                        self.inner.timeouts,
                        &self.inner.io.handles,
                    )
                    .await
                }
            };
            let run = match started {
                Ok(run) => {
                    self.send(ProxyEvent::ListenerStarted { host_id: c.key.clone(), address: run.local });
                    report.started.push(c.key.clone());
                    Ok(run)
                }
                Err(e) => {
                    let error = format!("cannot listen on {}: {e}", c.bind);
                    tracing::warn!(host = %c.key, %error, "proxy listener failed");
                    self.send(ProxyEvent::ListenerFailed {
                        host_id: c.key.clone(),
                        address: c.bind.to_string(),
                        error: error.clone(),
                    });
                    report.failed.push((c.key.clone(), error.clone()));
                    Err(error)
                }
            };
            table.listeners.insert(c.key, Entry { bind: c.bind, spec: c.spec, run });
        }
        Ok(report)
    }

    /// The state of every configured listener.
    pub async fn status(&self) -> ProxyStatus {
        let table = self.inner.table.lock().await;
        let listeners = table
            .listeners
            .iter()
            .map(|(key, e)| {
                let kind = if e.spec.tcp_route.is_some() { ListenerKind::Tcp } else { ListenerKind::Http };
                let (state, counters) = match &e.run {
                    Ok(run) => {
                        let s = &run.ctx.stats;
                        (
                            ListenerState::Running { local_address: run.local },
                            [&s.active, &s.total, &s.requests, &s.refused].map(|c| c.load(Ordering::Relaxed)),
                        )
                    }
                    Err(error) => (ListenerState::Failed { error: error.clone() }, [0; 4]),
                };
                ListenerStatus {
                    id: key.clone(),
                    name: e.spec.name.clone(),
                    address: e.bind.to_string(),
                    kind,
                    tls: e.spec.tls.enabled,
                    state,
                    active_connections: counters[0],
                    total_connections: counters[1],
                    requests: counters[2],
                    refused_connections: counters[3],
                }
            })
            .collect();
        ProxyStatus { enabled: table.enabled, listeners }
    }

    /// Stop every listener: stop accepting at once, let connections finish their current
    /// requests for the grace period, then cut what is left. Returns when all is closed.
    pub async fn shutdown(&self) {
        let mut table = self.inner.table.lock().await;
        table.enabled = false;
        let entries = std::mem::take(&mut table.listeners);
        for (key, e) in entries {
            if let Ok(run) = e.run {
                let h = self.stop_running(run).await;
                table.draining.push(h);
                self.send(ProxyEvent::ListenerStopped { host_id: key });
            }
        }
        for h in table.draining.drain(..) {
            let _ = h.await;
        }
    }

    /// Stop accepting (the socket is closed when this returns) and drain in the background.
    async fn stop_running(&self, run: Running) -> JoinHandle<()> {
        run.ctx.graceful.cancel();
        for h in run.accept {
            let _ = h.await;
        }
        let ctx = run.ctx;
        let grace = self.inner.grace;
        tokio::spawn(async move {
            ctx.conns.close();
            if tokio::time::timeout(grace, ctx.conns.wait()).await.is_err() {
                tracing::info!(host = %ctx.key, "cutting connections left after the grace period");
                ctx.hard.cancel();
                ctx.conns.wait().await;
            }
        })
    }

    fn send(&self, e: ProxyEvent) {
        self.inner.shared.events.send(e);
    }
}

/// With a [`VmDialer`], VM targets are byte streams without TLS: `https` routes to a VM are refused.
fn refuse_https_to_dialed_vms(config: &ReverseProxyConfig) -> Result<(), ConfigError> {
    for h in &config.hosts {
        for r in &h.http_routes {
            if r.schema == Schema::Https
                && let Ok(Target::Vm { vm_id, .. }) = r.target()
            {
                return Err(ConfigError::Invalid(format!(
                    "host {:?}, route {:?}: https to VM {vm_id:?} is not supported when VMs are reached through a \
                     dialer (tunnel); use schema http or h2c",
                    h.key(),
                    r.id
                )));
            }
        }
    }
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Listeners left running when the manager goes away are cut.
        if let Ok(table) = self.table.try_lock() {
            for e in table.listeners.values() {
                if let Ok(run) = &e.run {
                    run.ctx.graceful.cancel();
                    run.ctx.hard.cancel();
                }
            }
        }
    }
}
