//! The fleet: registering hosts (a host must answer before it is added), the cached host
//! clients, and health: observations fed into each host's state machine, silence ticks,
//! full checks and the lightweight checks of hosts whose event stream is up.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use hangar_core::audit::Actor;
use hangar_hypervisor::VmState;
use hangar_store::{Batch, FencedBatch};
use serde_json::json;
use tracing::{debug, info, instrument};

use super::{Leadership, Scheduler, lock, timed, view_upsert};
use crate::client::{HostClient, HostClientError};
use crate::error::{OrchestratorError, Result};
use crate::health::{HostHealth, Observation, Transition};
use crate::model::*;
use crate::registry::check_url;

impl Scheduler {
    /// A client for a host (cached until the host changes).
    pub async fn client(&self, host_id: &str) -> Result<Arc<dyn HostClient>> {
        if let Some(c) = lock(&self.inner.clients).get(host_id) {
            return Ok(c.clone());
        }
        let host = self.inner.registry.get(host_id)?;
        let creds = self.inner.registry.credentials(&host.id)?;
        let c = self
            .inner
            .connector
            .connect(&host, creds)
            .await
            .map_err(|source| OrchestratorError::Host { host: host.id.clone(), source })?;
        lock(&self.inner.clients).insert(host.id.clone(), c.clone());
        Ok(c)
    }

    fn forget_host(&self, host_id: &str) {
        lock(&self.inner.clients).remove(host_id);
        lock(&self.inner.recent).remove(host_id);
    }

    async fn probe(&self, url: &str, creds: Option<HostCredentials>) -> Result<(HostHardware, Vec<VmSummary>)> {
        let url = check_url(url)?;
        let host_err = |source| OrchestratorError::Host { host: url.clone(), source };
        let client = self.inner.connector.probe(&url, creds).await.map_err(host_err)?;
        let t = self.inner.config.call_timeout;
        let hw = timed(t, "hardware", client.hardware()).await.map_err(host_err)?;
        let vms = timed(t, "list VMs", client.list_vms()).await.map_err(host_err)?;
        Ok((hw, vms))
    }

    async fn adopt(&self, host: Host, vms: Vec<VmSummary>) -> Result<Host> {
        let now = self.inner.clock.now();
        lock(&self.inner.health).insert(host.id.clone(), HostHealth::new(now, self.inner.config.health));
        let t = self.apply_observation(&host.id, Observation::CheckSucceeded)?;
        let host = self.inner.registry.persist_status(&host.id, Batch::new(), None, |h| h.vms = vms).await?;
        if let Some(t) = &t {
            self.announce(&host, t);
        }
        if self.inner.following.load(Ordering::SeqCst) {
            drop(self.watch_events(&host.id));
        }
        Ok(host)
    }

    /// Registers a host after checking that it answers (the reference fails registration
    /// when the host's hardware cannot be read).
    #[instrument(skip(self, actor, req), fields(url = %req.url))]
    pub async fn register_host(&self, actor: &Actor, req: RegisterHost) -> Result<Host> {
        let (hw, vms) = self.probe(&req.url, req.credentials.clone()).await?;
        let host = self.inner.registry.register(actor, req, Some(hw)).await?;
        self.adopt(host, vms).await
    }

    /// Registers a host with a single-use enrollment token (the agent's `join`).
    #[instrument(skip_all, fields(url = %req.url))]
    pub async fn join_with_token(&self, token: &str, req: RegisterHost) -> Result<Host> {
        self.inner.registry.validate_enrollment_token(token).await?;
        let (hw, vms) = self.probe(&req.url, req.credentials.clone()).await?;
        let host = self.inner.registry.register_with_token(token, req, Some(hw)).await?;
        self.adopt(host, vms).await
    }

    /// Changes a host's configuration.
    pub async fn update_host(&self, actor: &Actor, id: &str, change: UpdateHost) -> Result<Host> {
        let h = self.inner.registry.update(actor, id, change).await?;
        lock(&self.inner.clients).remove(&h.id);
        self.restart_watcher(&h.id);
        self.drain();
        Ok(h)
    }

    /// Takes a host in or out of scheduling.
    pub async fn set_host_enabled(&self, actor: &Actor, id: &str, enabled: bool) -> Result<Host> {
        let id = self.inner.registry.get(id)?.id;
        let h = self.inner.registry.set_enabled(actor, &id, enabled).await?;
        self.drain();
        Ok(h)
    }

    /// Unregisters a host. Its VMs are not touched.
    pub async fn delete_host(&self, actor: &Actor, id: &str) -> Result<Host> {
        let id = self.inner.registry.get(id)?.id;
        let h = self.inner.registry.delete(actor, &id).await?;
        self.forget_host(&id);
        if let Some(w) = lock(&self.inner.watchers).remove(&id) {
            w.task.abort();
        }
        lock(&self.inner.health).remove(&id);
        Ok(h)
    }

    /// Feeds an observation about a host into its health machine. On a transition the new
    /// state is written (fenced while leading under a lease; not at all on a follower), `HOST_HEALTH_UPDATE` is published, the VMs of a host that went
    /// unhealthy become `unknown`, and a host that came back is offered to waiting requests.
    pub async fn observe(&self, host_id: &str, obs: Observation) -> Result<Option<Transition>> {
        let transition = self.apply_observation(host_id, obs)?;
        if let Some(t) = &transition {
            // Health status is leader work: a follower writes and announces nothing, and
            // the leader's write carries its fence (refused once another replica leads).
            let fence = match self.leadership() {
                Leadership::Follower => return Ok(transition),
                l => l.fence().cloned(),
            };
            let batch = Batch::new().fenced_by(fence.as_ref());
            let host = self.inner.registry.persist_status(host_id, batch, None, |_| {}).await?;
            self.announce(&host, t);
        }
        Ok(transition)
    }

    /// The in-memory half of [`Scheduler::observe`]: feeds the machine and updates the view.
    fn apply_observation(&self, host_id: &str, obs: Observation) -> Result<Option<Transition>> {
        let now = self.inner.clock.now();
        let mut health = lock(&self.inner.health);
        let h = health.entry(host_id.to_string()).or_insert_with(|| HostHealth::new(now, self.inner.config.health));
        let t = h.observe(now, obs);
        let (state, last_seen, last_error) = (h.state(), h.last_seen(), h.last_error().map(str::to_string));
        // Applied in memory under the health lock, so views follow the machine's order.
        let found = self.inner.registry.update_in_memory(host_id, |host| {
            host.state = state;
            host.last_seen = last_seen;
            host.last_error = last_error;
            if state != HostState::Healthy {
                for vm in &mut host.vms {
                    vm.state = VmState::Unknown;
                }
            }
        });
        if !found {
            health.remove(host_id);
            return Err(OrchestratorError::not_found("host", host_id));
        }
        Ok(t)
    }

    /// Publishes a transition (after it was written) and serves waiters if the host is back.
    fn announce(&self, host: &Host, t: &Transition) {
        info!(host = %host.id, from = %t.from, to = %t.to, reason = ?t.reason, "host health changed");
        self.publish(
            "HOST_HEALTH_UPDATE",
            json!({
                "host_id": host.id,
                "name": host.name,
                "state": t.to,
                "previous": t.from,
                "last_seen": host.last_seen,
                "reason": t.reason,
            }),
        );
        if t.to == HostState::Healthy {
            self.drain();
        }
    }

    /// Runs silence detection over every host.
    pub async fn tick(&self) -> Vec<(String, Transition)> {
        let mut out = Vec::new();
        for id in self.inner.registry.ids() {
            if let Ok(Some(t)) = self.observe(&id, Observation::Tick).await {
                out.push((id, t));
            }
        }
        self.inner.ledger.purge_expired();
        self.drain();
        out
    }

    /// Reads a host's hardware and VMs; success refreshes its view and marks it healthy,
    /// failure marks it unhealthy with the error. (A full resync on demand; the event
    /// stream resyncs by itself at each (re)connection.)
    #[instrument(skip(self))]
    pub async fn check_host(&self, host_id: &str) -> Result<Host> {
        let started_at = self.inner.seq.load(Ordering::SeqCst);
        let client = match self.client(host_id).await {
            Ok(c) => c,
            Err(OrchestratorError::Host { source, .. }) => {
                self.observe(host_id, Observation::CheckFailed(source.to_string())).await?;
                return self.inner.registry.get(host_id);
            }
            Err(e) => return Err(e),
        };
        let t = self.inner.config.call_timeout;
        let answer = async { Ok::<_, HostClientError>((client.hardware().await?, client.list_vms().await?)) };
        match timed(t, "hardware and VM list", answer).await {
            Ok((hw, vms)) => {
                self.apply_sync(host_id, &hw, vms, started_at);
                self.observe(host_id, Observation::CheckSucceeded).await?;
                self.drain();
                self.inner.registry.get(host_id)
            }
            Err(e) => {
                if e.is_host_down() {
                    lock(&self.inner.clients).remove(host_id);
                }
                self.observe(host_id, Observation::CheckFailed(e.to_string())).await?;
                self.inner.registry.get(host_id)
            }
        }
    }

    /// Replaces a host's view with a full read of it (started when the VM sequence was at
    /// `started_at`), keeping VMs confirmed since then that the read may predate.
    pub(super) fn apply_sync(&self, host_id: &str, hw: &HostHardware, vms: Vec<VmSummary>, started_at: u64) {
        let recent: Vec<VmSummary> = {
            let mut recent = lock(&self.inner.recent);
            let list = recent.entry(host_id.to_string()).or_default();
            list.retain(|(seq, _)| *seq >= started_at);
            list.iter().map(|(_, vm)| vm.clone()).collect()
        };
        self.inner.registry.update_in_memory(host_id, |h| {
            h.apply_hardware(hw);
            h.vms = vms;
            for vm in recent {
                if !h.vms.iter().any(|v| v.id == vm.id) {
                    view_upsert(h, vm);
                }
            }
            h.resources = h.resources.map(|r| r.covering(&h.vms));
        });
    }

    /// The lightweight health check of every host: hosts whose event stream is up are
    /// pinged (a failure counts against the host and reopens its stream); hosts whose
    /// stream is down are left to its reconnection attempts, which are their check; hosts
    /// without a stream follower (no background running) get a full [`Scheduler::check_host`].
    pub async fn check_all(&self) {
        let ids = self.inner.registry.ids();
        let timeout = self.inner.config.call_timeout.min(Duration::from_secs(3));
        futures::stream::iter(ids)
            .for_each_concurrent(64, |id| async move {
                let watcher = lock(&self.inner.watchers)
                    .get(&id)
                    .map(|w| (w.connected.clone(), w.reset.clone(), w.task.is_finished()));
                let (connected, reset) = match watcher {
                    Some((c, r, false)) => (c, r),
                    Some((_, _, true)) => return,
                    None => {
                        if let Err(e) = self.check_host(&id).await {
                            debug!(host = %id, error = %e, "host check");
                        }
                        return;
                    }
                };
                if !connected.load(Ordering::SeqCst) {
                    return;
                }
                let client = match self.client(&id).await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(host = %id, error = %e, "health check: no client");
                        return;
                    }
                };
                let result = timed(timeout, "health check", client.ping()).await;
                // The stream may have closed meanwhile: it reported that itself.
                if !connected.load(Ordering::SeqCst) {
                    return;
                }
                let healthy = self.inner.registry.get(&id).map(|h| h.state == HostState::Healthy).unwrap_or(false);
                match result {
                    // A healthy host stays so; an unhealthy one comes back through a resync.
                    Ok(()) if healthy => {
                        let _ = self.observe(&id, Observation::Heartbeat).await;
                    }
                    Ok(()) => reset.notify_one(),
                    Err(e) => {
                        let _ = self.observe(&id, Observation::CheckFailed(format!("health check: {e}"))).await;
                        reset.notify_one();
                    }
                }
            })
            .await;
    }
}
