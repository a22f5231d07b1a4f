//! The orchestrator's VM bodies (`/orchestrator/machines`, per-host machine routes).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::machines::{CatalogManifestRef, Machine, Resources, Specs};

/// Wait for capacity instead of failing at once when no host can take the VM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueRequest {
    /// Higher is served first (then arrival order). Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Give up after this many seconds (at most 3600): 503 "No capacity within Ns" with
    /// the reasons per group of hosts.
    pub timeout_seconds: u64,
}

/// Create a VM somewhere in the fleet, in the host API's shape plus placement hints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrchestratorCreateRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default)]
    pub start_on_create: bool,
    /// A local image name on the hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_manifest: Option<CatalogManifestRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<Specs>,
    /// Guest OS (`macos`, `linux`, `windows`), for the macOS limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Tags the host must all have.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Pin to one host (id or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Delete the VM this many seconds after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Wait for capacity in the queue (priority and timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueRequest>,
    /// Wait up to this many seconds for capacity (priority 0); `queue` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<u64>,
    /// Claim a VM from this runner pool (`/runner-pools`) instead: a warm one at once, else
    /// a new one of the pool's image and size. Only `name`, `owner` and `ttl_seconds` are read
    /// with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// The answer to a create through the orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrchestratorCreated {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub current_state: String,
    /// The host's name.
    pub host: String,
    pub host_id: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A VM of the fleet: the host's whole [`Machine`] (every key of the reference's VM object,
/// with its types) plus the orchestrator's keys: the reference's `host_id`, `host`,
/// `host_name`, `host_url` and `host_state`, then Hangar's flat summary and expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetMachine {
    /// The VM as its host answers it (`ID`, `Name`, `State`, `Hardware`, `user`, `owner`, ...).
    #[serde(flatten)]
    pub machine: Machine,
    /// The registered host's id: what `/orchestrator/hosts/{host_id}/machines/...` takes.
    pub host_id: String,
    /// The host's name.
    pub host: String,
    /// The host's name (the reference's second key for it).
    pub host_name: String,
    /// The host's API base URL.
    pub host_url: String,
    /// `healthy`, `unhealthy`, ...
    pub host_state: String,
    pub id: String,
    pub name: String,
    pub state: String,
    pub os: String,
    pub cpu: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a power operation through the orchestrator answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PowerDone {
    pub id: String,
    /// `start`, `stop`, ...
    pub operation: String,
    pub host_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExtendRequest {
    /// Push the expiry back by this many seconds.
    pub ttl_seconds: u64,
}

/// Ask for a single-use enrollment token a host joins the fleet with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenRequest {
    /// Name the joining host gets.
    pub host_name: String,
    /// Lifetime in minutes (the reference's field; default 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<u64>,
    /// Lifetime in seconds (takes precedence over `ttl_minutes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A new enrollment token: the secret is answered here and never again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenIssued {
    /// The secret to hand to the joining host (`X-Enrollment-Token`).
    pub token: String,
    /// First characters of the token's hash, to tell tokens apart.
    pub id: String,
    pub host_name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Whether an enrollment token is valid now; `host_name` and `expires_at` only when it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenCheck {
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Resources of the hosts of one CPU type, summed (the reference's system usage entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CpuTypeResources {
    /// `x86_64`, `arm64`, or `unknown` for hosts that have not reported it.
    pub cpu_type: String,
    pub total: Resources,
    pub system_reserved: Resources,
    pub total_in_use: Resources,
    /// `system_reserved` + `total_in_use`.
    pub total_reserved: Resources,
    pub total_available: Resources,
    /// The ids of the hosts summed.
    pub hosts: Vec<String>,
}

/// One host's resources as the orchestrator last saw them (zero until it reports them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostResourcesOverview {
    pub host_id: String,
    /// `x86_64` or `arm64`, once known.
    pub cpu_type: Option<String>,
    /// `healthy`, `unhealthy` or `unknown`.
    pub state: String,
    pub total: Resources,
    pub system_reserved: Resources,
    pub total_in_use: Resources,
    /// `system_reserved` + `total_in_use`.
    pub total_reserved: Resources,
    pub total_available: Resources,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_fleet_machine_is_the_hosts_machine_plus_host_keys_and_round_trips() {
        let mut machine = Machine { id: "v1".into(), name: "ci".into(), state: "running".into(), ..Machine::default() };
        machine.details.home_path = "/Users/ci/ci.pvm/config.pvs".into();
        machine.owner = Some("alice".into());
        let f = FleetMachine {
            machine,
            host_id: "h1".into(),
            host: "mac-01".into(),
            host_name: "mac-01".into(),
            host_url: "http://mac-01:3080/api".into(),
            host_state: "healthy".into(),
            id: "v1".into(),
            name: "ci".into(),
            state: "running".into(),
            os: "macosx".into(),
            cpu: 2,
            memory_mb: 2048,
            disk_mb: 8192,
            expires_at: None,
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            (&v["ID"], &v["id"], &v["host_id"], &v["owner"]),
            (&json!("v1"), &json!("v1"), &json!("h1"), &json!("alice"))
        );
        assert_eq!(v["Home path"], "/Users/ci/ci.pvm/config.pvs");
        assert!(v["Hardware"]["video"].is_object() && v["Smart Guard"]["enabled"].is_boolean(), "{v:#}");
        let again: FleetMachine = serde_json::from_value(v).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn create_requests_round_trip() {
        let sent = json!({"name": "ci", "image": "golden.pvm", "tags": ["mac"], "ttl_seconds": 60,
            "queue": {"priority": 3, "timeout_seconds": 30}, "specs": {"cpu": "1", "memory": "1024"}});
        let r: OrchestratorCreateRequest = serde_json::from_value(sent).unwrap();
        assert_eq!(r.queue, Some(QueueRequest { priority: 3, timeout_seconds: 30 }));
        let again: OrchestratorCreateRequest = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn an_invalid_token_check_is_valid_false_alone() {
        let no = EnrollmentTokenCheck { valid: false, host_name: None, expires_at: None };
        assert_eq!(serde_json::to_value(&no).unwrap(), json!({"valid": false}));
        let t: EnrollmentTokenRequest = serde_json::from_value(json!({"host_name": "mac-01"})).unwrap();
        assert_eq!((t.ttl_minutes, t.ttl_seconds), (None, None));
    }
}
