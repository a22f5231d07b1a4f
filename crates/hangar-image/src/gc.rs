//! Garbage collection of packs, safe against concurrent pushes.
//!
//! The rule (also in ARCHITECTURE.md):
//! * A push of the packed format takes a **lease** (`leases/<uuid>`, its start
//!   and last renewal in Unix seconds) before it lists what the store holds,
//!   renews it while it uploads, and deletes it after writing its manifest.
//! * A GC run lists the packs and pack indexes no kept manifest uses and
//!   records them in the **condemned** map (`gc/condemned.json`: object key →
//!   when it was first found unused), writing the map *before* deleting
//!   anything. A push reads that map after taking its lease and never reuses
//!   a condemned pack (it uploads those chunks again in a new pack).
//! * An object is deleted only when it has been condemned for at least the
//!   grace period, is still unused, and no live lease exists (one renewed
//!   within the lease lifetime). Index first, then pack, so a push never sees
//!   an index whose pack is gone.
//!
//! Why that is safe: a pack deleted now was condemned a grace period ago.
//! A push that started since then read the map and does not use it; a push
//! that started earlier and still runs holds a live lease, which blocks
//! every deletion. A finished push either wrote a manifest that the caller
//! keeps (so the pack is no longer unused) or its image is not kept. Clocks
//! of pushers and collectors are assumed to agree to well within the lease
//! lifetime.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hangar_blobstore::BlobStore;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::manifest::{INDEX_PREFIX, Manifest, PACK_PREFIX};
use crate::{ImageError, Result};

/// Store folder of the push leases.
pub const LEASE_PREFIX: &str = "leases";
/// Store key of the condemned map.
pub const CONDEMNED_KEY: &str = "gc/condemned.json";
/// A lease not renewed for this long is stale (its push died).
pub const LEASE_TTL: Duration = Duration::from_secs(2 * 3600);
/// A push renews its lease when this much time passed since the last renewal.
pub const LEASE_RENEW: Duration = Duration::from_secs(5 * 60);
/// Default time an unused pack stays condemned before it is deleted.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct LeaseBody {
    started: u64,
    renewed: u64,
}

/// A push's lease on the store (see the module docs).
#[derive(Debug)]
pub struct Lease {
    store: Arc<dyn BlobStore>,
    key: String,
    started: u64,
    renewed: std::time::Instant,
}

impl Lease {
    /// Writes a new lease.
    pub async fn take(store: Arc<dyn BlobStore>) -> Result<Lease> {
        let key = format!("{LEASE_PREFIX}/{}", uuid::Uuid::new_v4().simple());
        let now = unix_now();
        let body = serde_json::to_vec(&LeaseBody { started: now, renewed: now })
            .map_err(|e| ImageError::Manifest(e.to_string()))?;
        store.put(&key, Bytes::from(body)).await?;
        Ok(Lease { store, key, started: now, renewed: std::time::Instant::now() })
    }

    /// Renews the lease when [`LEASE_RENEW`] passed since the last renewal.
    pub async fn renew_if_due(&mut self) -> Result<()> {
        if self.renewed.elapsed() < LEASE_RENEW {
            return Ok(());
        }
        let body = serde_json::to_vec(&LeaseBody { started: self.started, renewed: unix_now() })
            .map_err(|e| ImageError::Manifest(e.to_string()))?;
        self.store.put(&self.key, Bytes::from(body)).await?;
        self.renewed = std::time::Instant::now();
        Ok(())
    }

    /// Deletes the lease (a failure only delays GC until the lease is stale).
    pub async fn release(self) {
        if let Err(e) = self.store.delete(&self.key).await {
            warn!(key = %self.key, error = %e, "could not release the push lease; GC waits until it is stale");
        }
    }
}

/// Objects found unused, with the Unix second they were first found so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condemned {
    /// Object key → first condemned at (Unix seconds).
    pub objects: BTreeMap<String, u64>,
}

/// Reads the condemned map (empty when absent or unreadable: an unreadable
/// map is rewritten by the next GC run, and condemning starts over).
pub async fn read_condemned(store: &dyn BlobStore) -> Result<Condemned> {
    match store.get(CONDEMNED_KEY).await {
        Ok(raw) => Ok(serde_json::from_slice(&raw).unwrap_or_else(|e| {
            warn!(error = %e, "condemned map unreadable; starting a new one");
            Condemned::default()
        })),
        Err(e) if e.is_not_found() => Ok(Condemned::default()),
        Err(e) => Err(e.into()),
    }
}

async fn write_condemned(store: &dyn BlobStore, c: &Condemned) -> Result<()> {
    let body = serde_json::to_vec_pretty(c).map_err(|e| ImageError::Manifest(e.to_string()))?;
    store.put(CONDEMNED_KEY, Bytes::from(body)).await?;
    Ok(())
}

/// How to collect.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// How long an unused object stays condemned before it is deleted.
    pub grace: Duration,
    /// A lease not renewed for this long is stale.
    pub lease_ttl: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { grace: DEFAULT_GRACE, lease_ttl: LEASE_TTL }
    }
}

/// What a GC run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Pack objects and indexes no kept manifest uses (condemned now or before).
    pub unused: u64,
    /// Objects deleted by this run.
    pub deleted: u64,
    /// Bytes deleted by this run.
    pub deleted_bytes: u64,
    /// Live push leases seen (deletions are skipped while there is one).
    pub live_leases: u64,
    /// Stale leases removed.
    pub stale_leases: u64,
}

/// Collects the packs (and their indexes) that none of `keep` uses, by the
/// rule of the module docs. Chunk objects of format 1 are not touched.
pub async fn collect_garbage(store: Arc<dyn BlobStore>, keep: &[Manifest], opts: GcOptions) -> Result<GcReport> {
    let now = unix_now();
    let used: BTreeSet<String> = keep.iter().flat_map(Manifest::object_keys).collect();
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for prefix in [INDEX_PREFIX, PACK_PREFIX] {
        for o in store.list(prefix).await? {
            if !used.contains(&o.key) {
                sizes.insert(o.key, o.size);
            }
        }
    }
    let mut report = GcReport { unused: sizes.len() as u64, ..GcReport::default() };
    let mut stale = Vec::new();
    for o in store.list(LEASE_PREFIX).await? {
        let body = match store.get(&o.key).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<LeaseBody>(&body) {
            Ok(l) if l.renewed.saturating_add(opts.lease_ttl.as_secs()) > now => report.live_leases += 1,
            Ok(_) => stale.push(o.key),
            // Unreadable: treat as live until the TTL could have passed for anyone.
            Err(_) => report.live_leases += 1,
        }
    }
    let old = read_condemned(store.as_ref()).await?;
    let mut map = Condemned::default();
    for key in sizes.keys() {
        map.objects.insert(key.clone(), old.objects.get(key).copied().unwrap_or(now));
    }
    write_condemned(store.as_ref(), &map).await?;
    if report.live_leases == 0 {
        let due: Vec<String> = map
            .objects
            .iter()
            .filter(|(_, at)| at.saturating_add(opts.grace.as_secs()) <= now)
            .map(|(k, _)| k.clone())
            .collect();
        // Indexes sort before packs ("packidx" < "packs"), so an index goes first.
        for key in due {
            store.delete(&key).await?;
            report.deleted += 1;
            report.deleted_bytes += sizes.get(&key).copied().unwrap_or(0);
            map.objects.remove(&key);
        }
        if report.deleted > 0 {
            write_condemned(store.as_ref(), &map).await?;
        }
    }
    for key in stale {
        store.delete(&key).await?;
        report.stale_leases += 1;
    }
    info!(?report, "pack garbage collection");
    Ok(report)
}
