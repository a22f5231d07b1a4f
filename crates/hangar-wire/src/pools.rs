//! Runner pools and warm pools (`/runner-pools`): the pool as an operator writes it (API,
//! CLI, config file) and the view the orchestrator answers with its warm VMs counted.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The catalog image a pool's VMs are made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolImage {
    pub catalog_id: String,
    /// A version, or `latest` (the default): the pool follows `latest` and recycles its warm
    /// VMs when it moves.
    #[serde(default = "latest")]
    pub version: String,
    /// `x86_64`/`amd64` or `arm64`/`aarch64` (stored canonical).
    pub architecture: String,
}

fn latest() -> String {
    "latest".into()
}

/// A pool: the labels it serves (a CI job's `runs-on`), the image and size of its VMs, the
/// hosts it may use, how many VMs it may have at once (`max_vms`: warm + claimed) and how
/// many to keep booted and exec-ready (`warm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunnerPool {
    /// Letters, digits, `-`, `_`, `.`; at most 63 characters. The pool's key.
    pub name: String,
    /// Labels this pool serves (`runs-on: [self-hosted, <label>]`).
    #[serde(default)]
    pub labels: Vec<String>,
    pub image: PoolImage,
    /// vCPUs per VM (at least 1).
    pub cpus: u32,
    /// Memory per VM in MiB (at least 256).
    pub memory_mb: u64,
    /// Tags a host must all have to run this pool's VMs.
    #[serde(default)]
    pub host_tags: Vec<String>,
    /// At most this many VMs of the pool at once, warm and claimed together (at least 1).
    pub max_vms: u32,
    /// Keep this many VMs booted and exec-ready (at most `max_vms`; 0 = no warm VMs).
    #[serde(default)]
    pub warm: u32,
    /// A claimed VM is deleted this many seconds after its claim unless its user deletes it
    /// or extends it first (a CI job's timeout). Default 3600.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_secs: u64,
}

fn default_job_timeout() -> u64 {
    3600
}

/// A pool's live state, as the orchestrator counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunnerPoolStatus {
    /// Warm VMs booted and exec-ready, waiting for a claim.
    pub warm_ready: u32,
    /// Warm VMs being created or booted.
    pub warm_starting: u32,
    /// VMs claimed from the pool and not deleted yet.
    pub claimed: u32,
    /// The image version `latest` (or the fixed version) resolved to at the last fill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_version: Option<String>,
    /// The last error met while filling the pool (cleared by the next success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A pool as `/runner-pools` answers it: what was written plus its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunnerPoolView {
    #[serde(flatten)]
    pub pool: RunnerPool,
    /// Bumped by every update; warm VMs made under an older generation are recycled.
    pub generation: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub status: RunnerPoolStatus,
}

/// Take a VM from a pool (`POST /orchestrator/machines` with `pool`, or
/// `HttpOrchestrator::claim_from_pool`): a warm one at once, else a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolClaim {
    /// The VM's new name.
    pub name: String,
    /// Owner of the claimed VM; under the create rule (only a SUPER_USER names another user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Delete the VM this many seconds after the claim (default: the pool's
    /// `job_timeout_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_pool_takes_defaults_and_round_trips_with_its_status() {
        let p: RunnerPool = serde_json::from_value(json!({"name": "macos-14", "labels": ["macos-14"],
            "image": {"catalog_id": "macos", "architecture": "arm64"}, "cpus": 4, "memory_mb": 8192,
            "max_vms": 4, "warm": 2}))
        .unwrap();
        assert_eq!((p.image.version.as_str(), p.job_timeout_secs, p.host_tags.len()), ("latest", 3600, 0));
        let v = RunnerPoolView {
            pool: p,
            generation: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            status: RunnerPoolStatus { warm_ready: 1, warm_starting: 1, ..Default::default() },
        };
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!((&j["name"], &j["status"]["warm_ready"]), (&json!("macos-14"), &json!(1)));
        assert_eq!(serde_json::from_value::<RunnerPoolView>(j).unwrap(), v);
    }
}
