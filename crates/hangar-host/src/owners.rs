//! Who owns each VM, as Hangar recorded it when it created, cloned or registered the VM
//! (collection `vm_owners`, keyed by VM id). This is the owner the access rule reads, on
//! every driver: on Parallels the driver's own "owner" is a macOS account, not a Hangar
//! user. VMs from before these records fall back to the QEMU driver's owner field; VMs
//! Hangar never recorded have no owner, so only callers allowed on others' VMs reach them.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hangar_core::audit::{AUDIT_COLLECTION, AuditEntry};
use hangar_hypervisor::{HypervisorKind, VmEvent, VmInfo};
use hangar_store::{Batch, Store};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{HostError, Result};

/// The store collection of owner records.
pub const VM_OWNERS: &str = "vm_owners";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OwnerRecord {
    owner: String,
    recorded_at: DateTime<Utc>,
}

/// Owner records and the host's audit writes, on the server's store.
#[derive(Clone)]
pub struct Owners {
    store: Arc<dyn Store>,
}

fn json<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| HostError::Internal(format!("cannot encode a record: {e}")))
}

impl Owners {
    pub fn new(store: Arc<dyn Store>) -> Owners {
        Owners { store }
    }

    /// The Hangar owner of `vm`, if known.
    pub async fn owner_of(&self, vm: &VmInfo) -> Result<Option<String>> {
        if let Some(owner) = self.recorded(&vm.id).await? {
            return Ok(Some(owner));
        }
        Ok(match vm.hypervisor {
            HypervisorKind::Qemu => vm.owner.clone().filter(|o| !o.is_empty()),
            HypervisorKind::Parallels => None,
        })
    }

    /// The owner recorded for the VM with id `vm`, if any (no driver fallback).
    async fn recorded(&self, vm: &str) -> Result<Option<String>> {
        let Some(r) = self.store.get(VM_OWNERS, vm).await? else { return Ok(None) };
        let rec: OwnerRecord = serde_json::from_value(r.value)
            .map_err(|e| HostError::Internal(format!("owner record of {vm} is unreadable: {e}")))?;
        Ok(Some(rec.owner))
    }

    /// The Hangar owner of the VM a driver event is about, for filtering who receives it.
    /// `known` remembers owners found (a VM's record may be gone by its removal event); an
    /// owner not recorded yet (a VM's first event can come before its record) is looked up
    /// again at its next event. A record that cannot be read counts as no owner.
    pub async fn event_owner(&self, e: &VmEvent, known: &mut HashMap<String, String>) -> Option<String> {
        let (id, found) = match e {
            VmEvent::Added { vm } | VmEvent::Updated { vm } => (&vm.id, self.owner_of(vm).await.ok().flatten()),
            VmEvent::Removed { id } => {
                return match known.remove(id) {
                    Some(o) => Some(o),
                    None => self.recorded(id).await.ok().flatten(),
                };
            }
            VmEvent::StateChanged { id, .. } | VmEvent::IpChanged { id, .. } => {
                if let Some(o) = known.get(id) {
                    return Some(o.clone());
                }
                (id, self.recorded(id).await.ok().flatten())
            }
        };
        if let Some(o) = &found {
            known.insert(id.clone(), o.clone());
        }
        found
    }

    /// Record `owner` for `vm`, with `entry` in the same batch.
    pub async fn record(&self, vm: &str, owner: &str, entry: Option<&AuditEntry>) -> Result<()> {
        let rec = OwnerRecord { owner: owner.to_string(), recorded_at: Utc::now() };
        let mut batch = Batch::new().put(VM_OWNERS, vm, json(&rec)?);
        if let Some(e) = entry {
            batch = batch.put(AUDIT_COLLECTION, &e.id, json(e)?);
        }
        self.store.commit(batch).await?;
        Ok(())
    }

    /// Write one audit entry.
    pub async fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.store.commit(Batch::new().put(AUDIT_COLLECTION, &entry.id, json(entry)?)).await?;
        Ok(())
    }

    /// Drop the record of a VM that is gone. A failure leaves a stale record, which names
    /// an id no VM has; it is logged, not answered.
    pub async fn forget(&self, vm: &str) {
        if let Err(e) = self.store.commit(Batch::new().delete(VM_OWNERS, vm)).await {
            warn!(vm, error = %e, "the owner record of a removed VM stays behind");
        }
    }
}
