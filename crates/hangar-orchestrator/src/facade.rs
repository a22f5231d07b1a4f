//! The orchestrator as a running service: [`HttpOrchestrator`] owns the scheduler over
//! HTTP hosts, the connector, the tunnels to hosts, its jobs and its background work, and
//! is the only way in for the API and the server. Its fields are private; what the routes
//! need is a method here (hosts, enrollment tokens, resource overviews, tunnels) or in
//! [`crate::service`] (VM work), answering the API's own types.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::audit::Actor;
use hangar_jobs::Jobs;
use hangar_wire::{
    CpuTypeResources, EnrollmentTokenCheck, EnrollmentTokenIssued, EnrollmentTokenRequest, HardwareResponse,
    HostResourcesOverview, Resources,
};

use crate::error::{OrchestratorError, Result};
use crate::http_client::{HttpConnector, HttpHostClient};
use crate::model::{HostView, RegisterHost, ResourceSet, UpdateHost};
use crate::scheduler::{Background, BackgroundIntervals, Scheduler};
use crate::tunnel::{HostTunnelError, HostTunnels, Tunnel};

/// The orchestrator module: the facade the API and the server call.
pub struct HttpOrchestrator {
    pub(crate) scheduler: Scheduler,
    connector: HttpConnector,
    tunnels: Arc<HostTunnels>,
    pub(crate) jobs: Jobs,
    _background: Background,
}

impl std::fmt::Debug for HttpOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOrchestrator").field("scheduler", &self.scheduler).finish()
    }
}

fn usage(r: ResourceSet) -> Resources {
    Resources::new(r.cpu, r.memory_mb, r.disk_mb)
}

impl HttpOrchestrator {
    /// Starts the scheduler's background work (health ticks, host checks, the reaper); it
    /// stops when this value is dropped.
    pub fn start(scheduler: Scheduler, connector: HttpConnector, jobs: Jobs, every: BackgroundIntervals) -> Self {
        let background = scheduler.spawn_background(every);
        scheduler.export_metrics();
        let tunnels = HostTunnels::new(scheduler.clone());
        HttpOrchestrator { scheduler, connector, tunnels, jobs, _background: background }
    }

    /// [`HttpOrchestrator::start`] for one replica of several over one store: the leader
    /// work (health ticks, host checks and event streams, the token purge, the reaper) runs
    /// only while `role` says this replica holds the leader lease, its writes fenced (see
    /// [`Scheduler::lead`]).
    pub fn start_led(
        scheduler: Scheduler,
        connector: HttpConnector,
        jobs: Jobs,
        every: BackgroundIntervals,
        role: tokio::sync::watch::Receiver<hangar_store::Role>,
    ) -> Self {
        let background = scheduler.lead(every, role);
        scheduler.export_metrics();
        let tunnels = HostTunnels::new(scheduler.clone());
        HttpOrchestrator { scheduler, connector, tunnels, jobs, _background: background }
    }

    /// How many hosts are registered.
    pub fn host_count(&self) -> usize {
        self.scheduler.registry().len()
    }

    /// The dialer that reaches a VM's port through the host that owns it (what the reverse
    /// proxy uses for VM targets).
    pub fn dialer(&self) -> Arc<HostTunnels> {
        self.tunnels.clone()
    }

    /// A tunnel to `port` of VM `vm` through its host. Check the caller first with
    /// [`HttpOrchestrator::port_forward`].
    pub async fn open_tunnel(&self, vm: &str, port: u16) -> std::result::Result<Tunnel, HostTunnelError> {
        self.tunnels.open(vm, port).await
    }

    /// A client for a registered host, with its stored credentials.
    pub(crate) fn host_client(&self, host_id: &str) -> Result<Arc<HttpHostClient>> {
        let registry = self.scheduler.registry();
        let host = registry.get(host_id)?;
        let creds = registry.credentials(&host.id)?;
        Ok(self.connector.client_for(&host.url, creds))
    }

    // ----- hosts -------------------------------------------------------------------------

    /// Every registered host.
    pub fn hosts(&self) -> Vec<HostView> {
        self.scheduler.registry().list().into_iter().map(HostView::from).collect()
    }

    /// One host, by id or name.
    pub fn host(&self, id: &str) -> Result<HostView> {
        self.scheduler.registry().get(id).map(HostView::from)
    }

    /// Registers a host for a caller that may manage hosts, once it answered.
    pub async fn register_host(&self, actor: &Actor, req: RegisterHost) -> Result<HostView> {
        self.scheduler.register_host(actor, req).await.map(HostView::from)
    }

    /// Registers a host that presents a single-use enrollment token (used up by this).
    pub async fn join_host(&self, token: &str, req: RegisterHost) -> Result<HostView> {
        self.scheduler.join_with_token(token, req).await.map(HostView::from)
    }

    /// Changes a host's configuration (id or name).
    pub async fn update_host(&self, actor: &Actor, id: &str, change: UpdateHost) -> Result<HostView> {
        let id = self.scheduler.registry().get(id)?.id;
        self.scheduler.update_host(actor, &id, change).await.map(HostView::from)
    }

    /// Unregisters a host (id or name); its VMs are not touched.
    pub async fn delete_host(&self, actor: &Actor, id: &str) -> Result<()> {
        self.scheduler.delete_host(actor, id).await.map(drop)
    }

    /// Takes a host (id or name) in or out of scheduling.
    pub async fn set_host_enabled(&self, actor: &Actor, id: &str, enabled: bool) -> Result<HostView> {
        self.scheduler.set_host_enabled(actor, id, enabled).await.map(HostView::from)
    }

    /// The host's own `/config/hardware` answer, read from it now.
    pub async fn host_hardware(&self, id: &str) -> Result<HardwareResponse> {
        let host = self.scheduler.registry().get(id)?;
        let client = self.host_client(&host.id)?;
        client.hardware_response().await.map_err(|source| OrchestratorError::Host { host: host.id, source })
    }

    /// The host's own recent log (its `/logs`), read from it now.
    pub async fn host_logs(&self, id: &str) -> Result<hangar_wire::events::LogLines> {
        let host = self.scheduler.registry().get(id)?;
        let client = self.host_client(&host.id)?;
        client.logs().await.map_err(|source| OrchestratorError::Host { host: host.id, source })
    }

    /// The host's live log (its `/logs/stream`), one line per item.
    pub async fn host_log_lines(&self, id: &str) -> Result<tokio::sync::mpsc::Receiver<String>> {
        let host = self.scheduler.registry().get(id)?;
        let client = self.host_client(&host.id)?;
        client.log_lines().await.map_err(|source| OrchestratorError::Host { host: host.id, source })
    }

    // ----- enrollment tokens -------------------------------------------------------------

    /// A new single-use enrollment token (lifetime: `ttl_seconds`, else `ttl_minutes`, else
    /// the registry's default).
    pub async fn create_enrollment_token(
        &self,
        actor: &Actor,
        req: &EnrollmentTokenRequest,
    ) -> Result<EnrollmentTokenIssued> {
        let ttl = req.ttl_seconds.or(req.ttl_minutes.map(|m| m.saturating_mul(60))).map(Duration::from_secs);
        let issued = self.scheduler.registry().create_enrollment_token(actor, &req.host_name, ttl).await?;
        let info = issued.info;
        Ok(EnrollmentTokenIssued {
            token: issued.token,
            id: info.id,
            host_name: info.host_name,
            created_at: info.created_at,
            expires_at: info.expires_at,
        })
    }

    /// Whether an enrollment token is valid now (the check does not use it up). Any failure
    /// to check answers "not valid".
    pub async fn check_enrollment_token(&self, token: &str) -> EnrollmentTokenCheck {
        match self.scheduler.registry().validate_enrollment_token(token).await {
            Ok(info) => {
                EnrollmentTokenCheck { valid: true, host_name: Some(info.host_name), expires_at: Some(info.expires_at) }
            }
            Err(_) => EnrollmentTokenCheck { valid: false, host_name: None, expires_at: None },
        }
    }

    // ----- resources ---------------------------------------------------------------------

    /// Resources summed across hosts per CPU type (hosts that have not reported resources
    /// are left out), each entry with its host ids, in CPU type order.
    pub fn resource_overview(&self) -> Vec<CpuTypeResources> {
        let mut groups: BTreeMap<String, ([ResourceSet; 4], Vec<String>)> = BTreeMap::new();
        for h in self.scheduler.registry().list() {
            let Some(r) = &h.resources else { continue };
            let arch = h.architecture.clone().unwrap_or_else(|| "unknown".into());
            let (sum, ids) = groups.entry(arch).or_default();
            for (acc, v) in sum.iter_mut().zip([r.total, r.system_reserved, r.in_use, r.available]) {
                *acc = acc.saturating_add(v);
            }
            ids.push(h.id);
        }
        groups
            .into_iter()
            .map(|(cpu_type, ([total, reserved, in_use, available], hosts))| CpuTypeResources {
                cpu_type,
                total: usage(total),
                system_reserved: usage(reserved),
                total_in_use: usage(in_use),
                total_reserved: usage(reserved.saturating_add(in_use)),
                total_available: usage(available),
                hosts,
            })
            .collect()
    }

    /// One host's resources (id or name), as last seen; zero before it reported them.
    pub fn host_resources(&self, id: &str) -> Result<HostResourcesOverview> {
        let h = self.scheduler.registry().get(id)?;
        let r = h.resources.unwrap_or_default();
        Ok(HostResourcesOverview {
            host_id: h.id,
            cpu_type: h.architecture,
            state: h.state.as_str().to_string(),
            total: usage(r.total),
            system_reserved: usage(r.system_reserved),
            total_in_use: usage(r.in_use),
            total_reserved: usage(r.system_reserved.saturating_add(r.in_use)),
            total_available: usage(r.available),
        })
    }
}
