//! The orchestrator's series at scrape time (`hangar_metrics::on_scrape`): each host's
//! health and CPU/memory (total, reserved: the system's share plus placement reservations,
//! used: running VMs) and the placement queue's depth, read from the registry and the
//! ledger the scheduler already keeps, so nothing is updated on every change.

use hangar_metrics::{CapacityLabels, HostLabels, Metrics};

use super::Scheduler;
use crate::model::HostState;

const MIB: u64 = 1024 * 1024;

impl Scheduler {
    /// Fill the host and queue gauges at every scrape while this scheduler lives.
    pub fn export_metrics(&self) {
        let weak = self.downgrade();
        hangar_metrics::on_scrape(move |m| {
            if let Some(s) = weak.upgrade() {
                s.fill(m);
            }
        });
    }

    fn fill(&self, m: &Metrics) {
        let held = self.inner.ledger.held();
        m.queue_depth.set(i64::try_from(self.inner.ledger.waiting()).unwrap_or(i64::MAX));
        m.host_up.clear();
        m.host_cpu.clear();
        m.host_memory.clear();
        self.inner.registry.with_hosts(|hosts| {
            for h in hosts {
                let up = i64::from(h.enabled && h.state == HostState::Healthy);
                m.host_up.get_or_create(&HostLabels { host: h.id.clone() }).set(up);
                let Some(r) = &h.resources else { continue };
                let placed = held.get(&h.id).map(|x| x.resources).unwrap_or_default();
                let reserved = r.system_reserved.saturating_add(placed);
                for (kind, set) in [("total", r.total), ("reserved", reserved), ("used", r.in_use)] {
                    let l = CapacityLabels { host: h.id.clone(), kind };
                    m.host_cpu.get_or_create(&l).set(f64::from(set.cpu));
                    m.host_memory
                        .get_or_create(&l)
                        .set(i64::try_from(set.memory_mb.saturating_mul(MIB)).unwrap_or(i64::MAX));
                }
            }
        });
    }
}
