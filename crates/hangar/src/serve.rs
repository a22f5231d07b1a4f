//! `hangar serve`: open the store, seed identity, start the enabled modules and serve
//! the API over HTTP and/or HTTPS until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use hangar_api::{ApiConfig, ModuleStatus, ServerInfo};
use hangar_core::EventBus;
use hangar_identity::{Identity, IdentityOptions, TokenConfig, TokenService};
use hangar_store::Store;
use hangar_store::json::{EncryptionKey, JsonStore, JsonStoreOptions};
use tracing::{info, warn};

use crate::config::{Layers, read_pem};
use crate::settings::{HostSettings, MODULES, OrchestratorSettings, Settings};

/// Make sure the data folder exists with mode 0700, and return it.
pub fn data_dir(s: &Settings) -> Result<PathBuf> {
    let dir = s.database.folder.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    Ok(dir)
}

/// Open the store in the data folder with the configured encryption and backups.
pub async fn open_store(s: &Settings, dir: &Path, with_backups: bool) -> Result<JsonStore> {
    let db = &s.database;
    let key = match &db.encryption_key_file {
        Some(f) => {
            Some(EncryptionKey::from_file(f).with_context(|| format!("DATABASE_ENCRYPTION_KEY_FILE={}", f.display()))?)
        }
        None => None,
    };
    let opts = JsonStoreOptions {
        encryption_key: key,
        backup_interval: db.backup_interval.filter(|_| with_backups),
        backup_retention: db.backups_kept,
        ..Default::default()
    };
    JsonStore::open(dir.join("store"), opts).await.map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))
}

/// Store collection of the host module's jobs.
const HOST_JOBS: &str = "host_jobs";
/// Store collection of the orchestrator's jobs.
const ORCHESTRATOR_JOBS: &str = "orchestrator_jobs";

/// Start the host module over the configured hypervisor driver, with its jobs in the store.
async fn start_host(
    s: &HostSettings,
    data: &Path,
    store: Arc<dyn Store>,
    bus: EventBus,
    runners: &hangar_jobs::runners::JobRunners,
) -> Result<Arc<hangar_host::Host>> {
    let cfg = hangar_host::HostConfig {
        driver: s.hypervisor,
        vms_dir: s.vms_folder.clone(),
        images_dir: s.images_folder.clone(),
        prlctl: s.prlctl.clone(),
        prlsrvctl: s.prlsrvctl.clone(),
        qemu_binary: s.qemu_binary.clone(),
        acceleration: s.acceleration,
        qemu_bridge: s.bridge.clone(),
        reserved_cpu: s.reserved_cpu,
        reserved_memory_mb: s.reserved_memory_mb,
        reserved_disk_mb: s.reserved_disk_mb,
        upload_root: s.upload_folder.clone(),
        helpers_dir: Some(data.join("run").join("helpers")),
    };
    let _ = std::fs::create_dir_all(&cfg.images_dir);
    let hv = hangar_host::open_driver(&cfg).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let jobs = runners.open(HOST_JOBS, bus.clone()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(hangar_host::Host::new(hv, jobs, store, bus, cfg))
}

async fn module_statuses(
    s: &Settings,
    store: Arc<dyn Store>,
    bus: EventBus,
    runners: &hangar_jobs::runners::JobRunners,
) -> (Vec<ModuleStatus>, Option<Arc<hangar_host::Host>>) {
    let explicit = s.modules.explicit();
    let mut out = Vec::new();
    let mut host = None;
    for m in MODULES {
        let want = s.modules.wants(m);
        let (running, message) = match *m {
            "api" => (true, "serving".to_string()),
            "host" if !want => (false, "not requested in ENABLED_MODULES".to_string()),
            "host" => match start_host(&s.host, &s.database.folder, store.clone(), bus.clone(), runners).await {
                Ok(h) => {
                    let info = h.driver().host_info().await.ok();
                    let detail = info
                        .map(|i| format!("{} {} ({})", i.hypervisor, i.version, i.acceleration))
                        .unwrap_or_else(|| h.kind().to_string());
                    host = Some(h);
                    (true, format!("driving {detail}"))
                }
                Err(e) => (false, format!("cannot run: {e:#}")),
            },
            // Started after this list, by their own start functions, which fill in the status.
            "catalog" | "orchestrator" | "reverse_proxy" => {
                out.push(ModuleStatus { name: m.to_string(), enabled: false, healthy: false, message: String::new() });
                continue;
            }
            other => (false, format!("the {other} module is not part of this build")),
        };
        if want && !running && explicit {
            warn!(module = m, "{message}");
        }
        out.push(ModuleStatus { name: m.to_string(), enabled: running, healthy: running, message });
    }
    (out, host)
}

/// Start the reverse_proxy module when it is wanted, and record its status. VM targets go
/// to the local host module's VMs by IP; with the orchestrator on, to any VM of the fleet
/// through a tunnel to its host (local VMs first when both run). Once it runs, the file's
/// `[reverse_proxy]` table is imported into the store (`ReverseProxy::import`: the
/// file wins for the hosts it names).
#[allow(clippy::too_many_arguments)]
async fn start_reverse_proxy(
    s: &Settings,
    l: &Layers,
    store: Arc<dyn Store>,
    dir: &Path,
    bus: EventBus,
    identity: &Identity,
    host: Option<&Arc<hangar_host::Host>>,
    orchestrator: Option<&Arc<hangar_orchestrator::HttpOrchestrator>>,
    modules: &mut [ModuleStatus],
) -> Result<Option<Arc<hangar_reverse_proxy::ReverseProxy>>> {
    let Some(status) = modules.iter_mut().find(|m| m.name == "reverse_proxy") else { return Ok(None) };
    if !s.modules.wants("reverse_proxy") {
        status.message = "not requested in ENABLED_MODULES".into();
        return Ok(None);
    }
    // The API's own ports are never a listener's: a host configured on one is reported as
    // failed (and logged) rather than taking the port before the API binds it.
    let mut reserved = Vec::new();
    if !s.tls.https_only() {
        reserved.push((s.http.port, "the API's HTTP port (API_PORT)".to_string()));
    }
    if s.tls.enabled {
        reserved.push((s.tls.port, "the API's HTTPS port (TLS_PORT)".to_string()));
    }
    // `require_vm_owner`: the host module's owner records, then the orchestrator's view of
    // the fleet (as the caller may see it).
    let fleet_owners = orchestrator.map(|o| {
        let o = o.clone();
        let f: hangar_reverse_proxy::FleetOwners = Arc::new(move |p: hangar_core::Principal, vm: String| {
            let o = o.clone();
            Box::pin(async move {
                let m = o.machine(&p, None, &vm).await.map_err(|e| e.to_string())?;
                Ok(m.machine.owner.filter(|u| !u.is_empty()))
            })
        });
        f
    });
    let auth = hangar_reverse_proxy::IdentityAuth::with_owners(identity.clone(), host.cloned(), fleet_owners);
    let mut builder = hangar_proxy::ProxyManager::builder().auth(auth);
    for (port, holder) in &reserved {
        builder = builder.reserve_port(*port, holder.clone());
    }
    let options = hangar_reverse_proxy::ReverseProxyOptions {
        reserved_ports: reserved,
        allow_privileged_ports: s.reverse_proxy.allow_privileged_ports,
        tls_folder: s.reverse_proxy.tls_folder.clone(),
    };
    let local = host.map(|h| hangar_reverse_proxy::HostResolver::new(h.clone()));
    if let Some(r) = &local {
        builder = builder.resolver(r.clone());
    }
    if let Some(o) = orchestrator {
        let fleet: Arc<dyn hangar_proxy::VmDialer> = o.dialer();
        builder = builder.vm_dialer(match &local {
            Some(r) => hangar_reverse_proxy::LocalFirstDialer::new(r.clone(), fleet),
            None => fleet,
        });
    }
    let manager = builder.build().map_err(|e| anyhow::anyhow!("reverse proxy: {e}"))?;
    let dyn_store: Arc<dyn Store> = store;
    match hangar_reverse_proxy::ReverseProxy::start_with(dyn_store, manager, bus, dir, options).await {
        Ok(rp) => {
            status.enabled = true;
            status.healthy = true;
            status.message = match (host.is_some(), orchestrator.is_some()) {
                (_, true) => "serving the stored proxy hosts; VM targets reached through their hosts".into(),
                (true, false) => "serving the stored proxy hosts; VM targets follow the host module".into(),
                (false, false) => "serving the stored proxy hosts; VM targets need the host module".into(),
            };
            if let Some(block) = l.reverse_proxy_block() {
                let actor = hangar_core::audit::Actor {
                    username: "config-file".into(),
                    via: "config_file".into(),
                    ..hangar_core::audit::Actor::system()
                };
                match rp.import(&actor, block).await {
                    Ok(r) => info!(
                        created = r.created.len(),
                        updated = r.updated.len(),
                        unchanged = r.unchanged.len(),
                        "imported the configuration file's reverse_proxy block"
                    ),
                    Err(e) => {
                        warn!(error = %e, "the configuration file's reverse_proxy block was not imported");
                        status.healthy = false;
                        status.message =
                            format!("{}; the config file's reverse_proxy block was not imported: {e}", status.message);
                    }
                }
            }
            Ok(Some(rp))
        }
        Err(e) => {
            status.message = format!("cannot run: {e}");
            Ok(None)
        }
    }
}

/// The orchestrator module (it owns its jobs).
type Orchestrator = Arc<hangar_orchestrator::HttpOrchestrator>;

/// Start the orchestrator module (with its jobs, in the store) when it is wanted, and
/// record its status.
#[allow(clippy::too_many_arguments)]
async fn start_orchestrator(
    s: &Settings,
    store: Arc<dyn Store>,
    dir: &Path,
    bus: EventBus,
    modules: &mut [ModuleStatus],
    role: tokio::sync::watch::Receiver<hangar_store::Role>,
    replica: &str,
    runners: &hangar_jobs::runners::JobRunners,
) -> Result<Option<Orchestrator>> {
    let Some(status) = modules.iter_mut().find(|m| m.name == "orchestrator") else { return Ok(None) };
    if !s.modules.wants("orchestrator") {
        status.message = "not requested in ENABLED_MODULES".into();
        return Ok(None);
    }
    let OrchestratorSettings { placement, check_interval: check, unhealthy_after, .. } = s.orchestrator.clone();
    let config = hangar_orchestrator::SchedulerConfig {
        profile: placement,
        health: hangar_orchestrator::HealthConfig { unhealthy_after },
        ..Default::default()
    };
    let dyn_store: Arc<dyn Store> = store;
    // Other replicas may share the database: holds go through the store, views follow it.
    let shared = dyn_store.shared();
    let jobs = match runners.open(ORCHESTRATOR_JOBS, bus.clone()).await {
        Ok(j) => j,
        Err(e) => {
            status.message = format!("cannot run: {e}");
            return Ok(None);
        }
    };
    let clock: Arc<dyn hangar_orchestrator::Clock> = Arc::new(hangar_orchestrator::SystemClock);
    let registry = match hangar_orchestrator::HostRegistry::open(dyn_store, dir, bus.clone(), clock).await {
        Ok(r) => Arc::new(r),
        Err(e) => {
            status.message = format!("cannot run: {e}");
            return Ok(None);
        }
    };
    let connector = hangar_orchestrator::HttpConnector::new(std::time::Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("orchestrator: {e}"))?;
    let scheduler = hangar_orchestrator::Scheduler::new(registry, Arc::new(connector.clone()), bus, config);
    if shared {
        scheduler.share_store(replica);
    }
    let every = hangar_orchestrator::BackgroundIntervals { check, ..Default::default() };
    // Health checks, host event streams and the TTL reaper run on the lease holder only.
    let o = hangar_orchestrator::HttpOrchestrator::start_led(scheduler, connector, jobs, every, role);
    status.enabled = true;
    status.healthy = true;
    status.message = format!("{} registered hosts, checked every {} ms", o.host_count(), check.as_millis());
    Ok(Some(Arc::new(o)))
}

fn token_config(s: &Settings) -> Result<TokenConfig> {
    let i = &s.identity;
    let private_key_pem = match &i.jwt_private_key {
        Some(v) => Some(read_pem("JWT_PRIVATE_KEY", v.expose())?),
        None => None,
    };
    Ok(TokenConfig {
        algorithm: i.jwt_algorithm,
        ttl: i.jwt_duration,
        issuer: i.jwt_issuer.clone(),
        audience: i.jwt_audience.clone(),
        hmac_secret: i.jwt_hmac_secret.as_ref().map(|s| s.expose().as_bytes().to_vec()),
        private_key_pem,
    })
}

fn identity_options(s: &Settings) -> IdentityOptions {
    IdentityOptions {
        password_policy: s.identity.password_policy.clone(),
        lockout: s.identity.lockout.clone(),
        sessions: s.identity.sessions.clone(),
    }
}

fn root_password(s: &Settings) -> Result<Option<String>> {
    if let Some(p) = &s.identity.root_password {
        return Ok(Some(p.expose().to_string()));
    }
    if let Some(f) = &s.identity.root_password_file {
        let p =
            std::fs::read_to_string(f).with_context(|| format!("ROOT_PASSWORD_FILE: cannot read {}", f.display()))?;
        return Ok(Some(p.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(None)
}

/// Build the identity service on an open store (also used by offline CLI commands).
pub fn identity(s: &Settings, store: Arc<dyn Store>, dir: &Path, bus: EventBus) -> Result<Identity> {
    let tokens = TokenService::new(token_config(s)?, dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    Identity::new(store, tokens, identity_options(s), bus, dir).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Serve with the settings parsed from `l` (`l` still carries what is not a key: the
/// file's `[reverse_proxy]` table, and the catalog module's own reads).
pub async fn run(l: Layers, s: Settings) -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = data_dir(&s)?;
    let store = crate::db_cmd::open_configured(&s, &dir, true).await?;
    // Every service gets the store through the commit timer (`hangar_store_commit_duration_seconds`).
    let dyn_store: Arc<dyn Store> = crate::metrics::timed(store.clone());
    let bus = EventBus::default();
    let identity = identity(&s, dyn_store.clone(), &dir, bus.clone())?;
    let generated = identity
        .bootstrap(root_password(&s)?.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("cannot seed users and roles: {e}"))?;
    if !s.identity.oidc.is_empty() {
        // Single sign-on: discovery and keys are fetched at first use, so a provider that is
        // down at start delays only SSO logins.
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client for OIDC")?;
        let oidc = hangar_identity::oidc::Oidc::new(s.identity.oidc.clone(), http)
            .map_err(|e| anyhow::anyhow!("OIDC configuration: {e}"))?;
        identity.set_oidc(Arc::new(oidc));
    }

    let leadership = crate::leader::start(dyn_store.clone(), bus.clone())?;
    // Jobs: with other replicas on the store, each job records its runner and the leader
    // recovers a dead replica's; a sole process fails its own unfinished jobs at start.
    let runners = Arc::new(crate::leader::job_runners(dyn_store.clone(), &leadership).await?);
    let (mut modules, host) = module_statuses(&s, dyn_store.clone(), bus.clone(), &runners).await;
    // ----- catalog module (crates/hangar-catalog, started in catalog_cmd.rs) -----
    let catalog_store: Arc<dyn Store> = dyn_store.clone();
    let catalog = crate::catalog_cmd::start_catalog(&l, &s, catalog_store, &dir, bus.clone(), &mut modules)?;
    // ----- end of catalog module -----
    if store.shared() {
        // Other replicas may share the database: their events reach this one's subscribers.
        crate::fanout::start(dyn_store.clone(), bus.clone(), leadership.id(), leadership.role());
    }
    let orchestrator = start_orchestrator(
        &s,
        dyn_store.clone(),
        &dir,
        bus.clone(),
        &mut modules,
        leadership.role(),
        leadership.id(),
        &runners,
    )
    .await?;
    runners.clone().spawn(leadership.role(), crate::leader::JOBS_PASS);
    // Runner pools: `latest` through the catalog module, RUNNER_POOLS_FILE applied (pool_cmd.rs).
    crate::pool_cmd::start(s.orchestrator.pools_file.as_deref(), orchestrator.as_ref(), catalog.as_ref()).await?;
    // Ephemeral GitHub Actions runners (crates/hangar-runners, started in runners.rs).
    let ci_runners = crate::runners::start(
        s.github_runners.as_ref(),
        dyn_store.clone(),
        bus.clone(),
        orchestrator.as_ref(),
        leadership.role(),
    )?;
    let reverse_proxy = start_reverse_proxy(
        &s,
        &l,
        dyn_store.clone(),
        &dir,
        bus.clone(),
        &identity,
        host.as_ref(),
        orchestrator.as_ref(),
        &mut modules,
    )
    .await?;
    let info = ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: chrono::Utc::now(),
        modules: modules.clone(),
        data_dir: dir.display().to_string(),
        store_engine: store.engine().into(),
    };
    let config = ApiConfig {
        prefix: s.http.prefix.clone(),
        body_limit: s.http.body_limit,
        cors: s.cors.clone(),
        ..Default::default()
    };
    crate::logging::publish_system_logs(bus.clone());
    crate::stats::publish(bus.clone(), host.clone());
    let logs = crate::logging::ring();
    let replica = leadership.replica(dyn_store.clone());
    let services = hangar_api::Services {
        identity,
        bus,
        host,
        catalog,
        reverse_proxy: reverse_proxy.clone(),
        orchestrator,
        runners: ci_runners,
        logs,
        replica,
    };
    let app = hangar_api::app(services, info, &config);

    let host = s.http.host;
    let tls = s.tls.enabled;
    let https_only = s.tls.https_only();
    let handle: axum_server::Handle<SocketAddr> = axum_server::Handle::new();
    let limits = listen::Limits { header_read_timeout: s.http.header_read_timeout };
    let cap = listen::SourceCap::new(s.http.max_connections_per_source);
    let mut servers = tokio::task::JoinSet::new();
    let mut announce = Vec::new();
    if !https_only {
        let addr = SocketAddr::new(host, s.http.port);
        let h = handle.clone();
        let svc = app.clone().into_make_service_with_connect_info::<SocketAddr>();
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (API_PORT)"))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        announce.push(format!("http://{bound}"));
        let server = limits.apply(axum_server::from_tcp(listener)?.acceptor(cap.clone()));
        servers.spawn(async move { server.handle(h).serve(svc).await });
    }
    if tls {
        let cert = s.tls.certificate.as_ref().context("TLS_ENABLED=true needs TLS_CERTIFICATE")?;
        let key = s.tls.private_key.as_ref().context("TLS_ENABLED=true needs TLS_PRIVATE_KEY")?;
        let cert = read_pem("TLS_CERTIFICATE", cert.expose())?;
        let key = read_pem("TLS_PRIVATE_KEY", key.expose())?;
        let rustls = axum_server::tls_rustls::RustlsConfig::from_pem(cert, key)
            .await
            .context("TLS_CERTIFICATE/TLS_PRIVATE_KEY are not a usable certificate and key")?;
        let addr = SocketAddr::new(host, s.tls.port);
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (TLS_PORT)"))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        announce.push(format!("https://{bound}"));
        let h = handle.clone();
        // Cookies set over this listener are Secure.
        let svc = app
            .layer(axum::Extension(hangar_api::auth::ServedOverTls))
            .into_make_service_with_connect_info::<SocketAddr>();
        let server = limits.apply(
            axum_server::from_tcp_rustls(listener, rustls)?
                .map(|tls| tls.handshake_timeout(limits.header_read_timeout).acceptor(cap.clone())),
        );
        servers.spawn(async move { server.handle(h).serve(svc).await });
    }

    if let Some(addr) = s.http.metrics_listener {
        let bound = crate::metrics::spawn_listener(addr, handle.clone(), &mut servers)?;
        announce.push(format!("http://{bound}/metrics (metrics only, no authentication)"));
    }

    // Registered before the banner announces the server: a SIGTERM or SIGINT from then on
    // shuts down gracefully (registered later, one arriving right after the banner killed
    // the process with the default action, leaving its helpers to the next start).
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();

    // The console banner: where data lives, where to connect, how to log in.
    println!("Hangar {} is running.", env!("CARGO_PKG_VERSION"));
    println!("  data folder: {}", dir.display());
    for a in &announce {
        println!("  listening on {a}");
    }
    for m in &modules {
        let state = if m.enabled { "running" } else { "off" };
        println!("  module {:<14} {state}: {}", m.name, m.message);
    }
    match &generated {
        Some(pw) => {
            println!("  first start: created user 'root' with the generated password below. It is shown only once:");
            println!("      {pw}");
            println!("    Set ROOT_PASSWORD (or ROOT_PASSWORD_FILE) to choose it.");
        }
        None => println!("  log in as 'root' with the password from ROOT_PASSWORD or the one printed at first start."),
    }
    let first = announce.first().cloned().unwrap_or_default();
    println!("  log in: hangar login --url {} --username root", first.replace("0.0.0.0", "127.0.0.1"));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    info!(data_dir = %dir.display(), "hangar started");

    let shutdown = async {
        tokio::select! {
            _ = received(interrupt.as_mut()) => {}
            _ = received(term.as_mut()) => {}
        }
    };
    tokio::select! {
        _ = shutdown => {
            info!("shutting down: finishing requests in flight");
            handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            while servers.join_next().await.is_some() {}
        }
        r = servers.join_next() => {
            if let Some(Ok(Err(e))) = r {
                store.close().await.ok();
                return Err(anyhow::anyhow!("the HTTP server stopped: {e}"));
            }
        }
    }
    // Hand the leader lease over at once rather than after a lease period, and the
    // liveness lease (the jobs this replica leaves unfinished are recovered at once).
    runners.shutdown().await;
    leadership.shutdown().await;
    store.close().await.map_err(|e| anyhow::anyhow!("closing the store: {e}"))?;
    info!("stopped");
    crate::logging::shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// What the API listeners (HTTP and HTTPS) do against slow and greedy clients: a deadline
/// for each request's headers that also closes idle kept-alive connections
/// (`API_HEADER_READ_TIMEOUT`; also the deadline of the first request and of the TLS
/// handshake), and a cap on the connections one source address holds open
/// (`API_MAX_CONNECTIONS_PER_SOURCE`; further connections are closed as soon as they are
/// accepted). Together they keep a slow-client flood from holding file descriptors: the
/// process still needs `RLIMIT_NOFILE` above the connections it should hold (sources x
/// cap at most), which the service manager sets (`LimitNOFILE=`).
mod listen {
    use std::collections::HashMap;
    use std::io;
    use std::net::IpAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tracing::debug;

    /// Timeouts of one listener.
    #[derive(Debug, Clone, Copy)]
    pub struct Limits {
        pub header_read_timeout: Duration,
    }

    impl Limits {
        /// Set the timeouts on a server's HTTP builder.
        pub fn apply<A>(
            &self,
            server: axum_server::Server<std::net::SocketAddr, A>,
        ) -> axum_server::Server<std::net::SocketAddr, A> {
            let t = self.header_read_timeout;
            // Also covers hyper's protocol detection, which reads before any head.
            let mut server = server.first_request_timeout(t);
            let b = server.http_builder();
            // Starts whenever hyper waits for a request head, so it also bounds the idle
            // time of a kept-alive connection.
            b.http1().header_read_timeout(t).keep_alive(true);
            b.http2().keep_alive_interval(Some(t)).keep_alive_timeout(t);
            server
        }
    }

    /// Connections open per source address, with a cap.
    #[derive(Debug, Clone)]
    pub struct SourceCap {
        max: usize,
        open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    }

    impl SourceCap {
        pub fn new(max: usize) -> SourceCap {
            SourceCap { max: max.max(1), open: Arc::default() }
        }

        fn admit(&self, ip: IpAddr) -> bool {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let n = open.entry(ip).or_insert(0);
            if *n >= self.max {
                return false;
            }
            *n += 1;
            true
        }

        fn release(&self, ip: IpAddr) {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = open.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }

    impl<S> axum_server::accept::Accept<TcpStream, S> for SourceCap {
        type Stream = Counted;
        type Service = S;
        type Future = std::future::Ready<io::Result<(Counted, S)>>;

        fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
            let ip = match stream.peer_addr() {
                Ok(a) => a.ip().to_canonical(),
                Err(e) => return std::future::ready(Err(e)),
            };
            if !self.admit(ip) {
                debug!(source = %ip, max = self.max, "connection refused: API_MAX_CONNECTIONS_PER_SOURCE reached");
                return std::future::ready(Err(io::Error::other("too many connections from this source address")));
            }
            std::future::ready(Ok((Counted { inner: stream, ip, cap: self.clone() }, service)))
        }
    }

    /// An accepted connection, counted against its source until it is dropped.
    #[derive(Debug)]
    pub struct Counted {
        inner: TcpStream,
        ip: IpAddr,
        cap: SourceCap,
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.cap.release(self.ip);
        }
    }

    impl AsyncRead for Counted {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
}

/// The next delivery of a signal registered at start (never, when it could not be).
async fn received(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
