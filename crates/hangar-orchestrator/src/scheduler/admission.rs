//! Admission: a create request becomes a placement request, placement reserves capacity
//! in the ledger under one lock, and requests nothing fits may wait in the queue (by
//! priority, then arrival), served whenever capacity may have freed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{CreateProgress, CreateVm, ProgressFn, Scheduler};
use crate::error::{OrchestratorError, Result};
use crate::model::*;
use crate::placement::{Caller, ImageRef, NoCapacity, PlacementRequest};
use crate::reservations::Granted;

impl Scheduler {
    /// Builds the placement request for a create request.
    pub fn placement_request(&self, req: &CreateVm, caller: Caller) -> Result<PlacementRequest> {
        let cfg = &self.inner.config;
        let cpu = req.cpu.unwrap_or(cfg.default_cpu);
        let memory_mb = req.memory_mb.unwrap_or(cfg.default_memory_mb);
        if cpu == 0 || memory_mb == 0 {
            return Err(OrchestratorError::Invalid("a VM needs at least 1 CPU and 1 MiB of memory".into()));
        }
        let image = (!req.image.is_empty()).then(|| ImageRef {
            catalog_id: req.image.clone(),
            version: req.version.clone().unwrap_or_default(),
            size_mb: req.image_size_mb,
        });
        Ok(PlacementRequest {
            resources: ResourceSet::new(cpu, memory_mb, req.disk_mb.unwrap_or(0)),
            architecture: normalize_arch(&req.architecture)?,
            os: req.os,
            hypervisor: req.hypervisor,
            image,
            tags: req.tags.clone(),
            host: req.host.clone(),
            caller,
            exclude: BTreeSet::new(),
        })
    }

    /// Serves waiting requests that fit now.
    pub fn drain(&self) -> usize {
        if self.inner.ledger.waiting() == 0 {
            return 0;
        }
        let profile = self.inner.config.profile;
        let served = self.inner.registry.with_placement(|index| self.inner.ledger.drain_indexed(index, profile));
        self.note_queue();
        served
    }

    /// Places and reserves without creating anything (what `create_vm` does first).
    pub fn reserve(&self, req: &PlacementRequest) -> std::result::Result<Granted, NoCapacity> {
        let profile = self.inner.config.profile;
        let started = Instant::now();
        let r = self.inner.registry.with_placement(|index| self.inner.ledger.reserve_indexed(req, index, profile));
        let outcome = if r.is_ok() { "placed" } else { "no_capacity" };
        hangar_metrics::metrics().placement(outcome, started.elapsed());
        r
    }

    /// `hangar_placement_queue_depth` after the queue changed.
    fn note_queue(&self) {
        let depth = i64::try_from(self.inner.ledger.waiting()).unwrap_or(i64::MAX);
        hangar_metrics::metrics().queue_depth.set(depth);
    }

    pub(super) async fn reserve_or_wait(
        &self,
        req: &PlacementRequest,
        priority: i32,
        wait: Option<Duration>,
        progress: ProgressFn<'_>,
        may_evict: bool,
    ) -> Result<Granted> {
        // Warm VMs never block a real request: when nothing fits, a warm VM on a host that
        // would then fit is deleted first and placement runs again (a few rounds, as a warm
        // fill may take the room meanwhile).
        if may_evict && self.has_warm_vms() {
            for _ in 0..4 {
                match self.reserve(req) {
                    Ok(g) => return Ok(g),
                    Err(_) => {
                        if !self.evict_warm_for(req).await? {
                            break;
                        }
                    }
                }
            }
        }
        let Some(wait) = wait.filter(|w| !w.is_zero()) else {
            return Ok(self.reserve(req)?);
        };
        let profile = self.inner.config.profile;
        let decided = Instant::now();
        let queued = self
            .inner
            .registry
            .with_placement(|index| self.inner.ledger.reserve_or_enqueue_indexed(req, index, profile, priority));
        let metrics = hangar_metrics::metrics();
        metrics.placement(if queued.is_ok() { "placed" } else { "queued" }, decided.elapsed());
        match queued {
            Ok(g) => Ok(g),
            Err((no, ticket)) => {
                self.note_queue();
                debug!(reason = %no, priority, "request queued");
                progress(CreateProgress::Queued { reason: no.to_string(), priority });
                let started = Instant::now();
                let served = self.inner.ledger.wait(ticket, wait).await;
                metrics.queue_wait_seconds.observe(started.elapsed().as_secs_f64());
                self.note_queue();
                match served {
                    Some(g) => Ok(g),
                    // Room may have appeared at the very end: one last try.
                    None => self.reserve(req).map_err(|last| OrchestratorError::QueueTimeout {
                        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        last,
                    }),
                }
            }
        }
    }
}
