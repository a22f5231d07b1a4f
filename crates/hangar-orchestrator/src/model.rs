//! The orchestrator's data model: hosts, their resources, VM summaries and credentials.
//!
//! [`Host`] is the view type: everything an API caller may see. Host credentials live only
//! in [`HostCredentials`], which has no `Serialize` implementation and a redacted `Debug`,
//! and are stored sealed (see [`crate::sealer`]) next to the view, never inside it.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hangar_hypervisor::{HypervisorKind, VmState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{OrchestratorError, Result};

/// Store collection of hosts (view plus sealed credentials).
pub const HOSTS: &str = "orchestrator_hosts";
/// Store collection of enrollment tokens, keyed by the token's hash.
pub const ENROLLMENT_TOKENS: &str = "orchestrator_enrollment_tokens";
/// Store collection of VMs created through the orchestrator.
pub const VMS: &str = "orchestrator_vms";

/// An operating system, of a host or of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    /// macOS (`macos`, `macosx`, `darwin`).
    Macos,
    /// Linux.
    Linux,
    /// Windows (`windows`, `win-11`, ...).
    Windows,
}

impl Os {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Os::Macos => "macos",
            Os::Linux => "linux",
            Os::Windows => "windows",
        }
    }

    /// Parses the OS names drivers and clients use (`macosx`, `darwin`, `win-11`, `ubuntu`...).
    pub fn parse_lenient(s: &str) -> Option<Os> {
        let s = s.trim().to_ascii_lowercase();
        if s.starts_with("mac") || s == "darwin" || s == "osx" {
            Some(Os::Macos)
        } else if s.starts_with("win") {
            Some(Os::Windows)
        } else if ["linux", "ubuntu", "debian", "fedora", "centos", "rhel", "redhat", "alpine", "arch", "suse"]
            .iter()
            .any(|p| s.starts_with(p))
        {
            Some(Os::Linux)
        } else {
            None
        }
    }
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Os {
    type Err = OrchestratorError;
    fn from_str(s: &str) -> Result<Self> {
        Os::parse_lenient(s).ok_or_else(|| {
            OrchestratorError::Invalid(format!("unknown operating system {s:?}; use macos, linux or windows"))
        })
    }
}

/// Normalises an architecture name: `x86_64` (also `amd64`, `x64`) or `arm64` (also `aarch64`).
pub fn normalize_arch(s: &str) -> Result<String> {
    s.parse::<hangar_core::Architecture>()
        .map(|a| a.as_str().to_string())
        .map_err(|e| OrchestratorError::Invalid(e.to_string()))
}

/// An amount of the three resources placement accounts for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct ResourceSet {
    /// Logical CPUs.
    pub cpu: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Disk in MiB.
    pub disk_mb: u64,
}

impl ResourceSet {
    /// A resource set.
    pub const fn new(cpu: u32, memory_mb: u64, disk_mb: u64) -> Self {
        ResourceSet { cpu, memory_mb, disk_mb }
    }

    /// Component-wise sum, saturating.
    pub fn saturating_add(self, o: ResourceSet) -> ResourceSet {
        ResourceSet {
            cpu: self.cpu.saturating_add(o.cpu),
            memory_mb: self.memory_mb.saturating_add(o.memory_mb),
            disk_mb: self.disk_mb.saturating_add(o.disk_mb),
        }
    }

    /// Component-wise difference, floored at zero.
    pub fn saturating_sub(self, o: ResourceSet) -> ResourceSet {
        ResourceSet {
            cpu: self.cpu.saturating_sub(o.cpu),
            memory_mb: self.memory_mb.saturating_sub(o.memory_mb),
            disk_mb: self.disk_mb.saturating_sub(o.disk_mb),
        }
    }

    /// Component-wise minimum.
    pub fn min(self, o: ResourceSet) -> ResourceSet {
        ResourceSet {
            cpu: self.cpu.min(o.cpu),
            memory_mb: self.memory_mb.min(o.memory_mb),
            disk_mb: self.disk_mb.min(o.disk_mb),
        }
    }

    /// Whether every component of `self` is at most the one of `o`.
    pub fn fits_in(&self, o: &ResourceSet) -> bool {
        self.cpu <= o.cpu && self.memory_mb <= o.memory_mb && self.disk_mb <= o.disk_mb
    }
}

/// A host's resources as it reports them (the reference's `GetHardwareUsage` shape).
/// Answered with the reference's flat keys as well (`logical_cpu_count`, `memory_size`
/// and `disk_size` from `total`, `free_disk_size` from `available`; MiB), which its
/// clients read from an orchestrator host's `resources`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(into = "HostResourcesOut")]
pub struct HostResources {
    /// What the machine has (disk: the volume that holds VMs).
    pub total: ResourceSet,
    /// Kept for the host system itself; never given to VMs.
    pub system_reserved: ResourceSet,
    /// Used by VMs (CPU, memory: running VMs; disk: everything used on the volume).
    pub in_use: ResourceSet,
    /// Free for new VMs.
    pub available: ResourceSet,
}

/// [`HostResources`] as answered: its blocks plus the reference's flat keys.
#[derive(Serialize)]
struct HostResourcesOut {
    total: ResourceSet,
    system_reserved: ResourceSet,
    in_use: ResourceSet,
    available: ResourceSet,
    logical_cpu_count: i64,
    memory_size: f64,
    disk_size: f64,
    free_disk_size: f64,
}

impl From<HostResources> for HostResourcesOut {
    fn from(r: HostResources) -> Self {
        HostResourcesOut {
            total: r.total,
            system_reserved: r.system_reserved,
            in_use: r.in_use,
            available: r.available,
            logical_cpu_count: i64::from(r.total.cpu),
            memory_size: r.total.memory_mb as f64,
            disk_size: r.total.disk_mb as f64,
            free_disk_size: r.available.disk_mb as f64,
        }
    }
}

/// What a host says about itself beyond its resources (from its `/config/hardware`),
/// answered with the reference's orchestrator-host keys and types.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct HostDetails {
    /// CPU brand string.
    pub cpu_model: String,
    /// Host OS name.
    pub os_name: String,
    /// Host OS version.
    pub os_version: String,
    /// The host agent's version.
    pub devops_version: String,
    /// The host's external IP address, when it knows it.
    pub external_ip_address: String,
    /// Parallels Desktop version (empty on other hypervisors).
    pub parallels_desktop_version: String,
    /// Whether Parallels Desktop is licensed.
    pub parallels_desktop_licensed: bool,
    /// Whether the host's reverse proxy is enabled.
    pub is_reverse_proxy_enabled: bool,
    /// The host's reverse proxy.
    pub reverse_proxy: hangar_wire::HardwareReverseProxy,
}

impl HostDetails {
    /// The details of a host's hardware answer.
    pub fn from_hardware(hw: &hangar_wire::HardwareResponse) -> Self {
        HostDetails {
            cpu_model: hw.cpu_brand.clone(),
            os_name: hw.os_name.clone(),
            os_version: hw.os_version.clone(),
            devops_version: hw.devops_version.clone(),
            external_ip_address: hw.external_ip_address.clone(),
            parallels_desktop_version: hw.parallels_desktop_version.clone(),
            parallels_desktop_licensed: hw.parallels_desktop_licensed,
            is_reverse_proxy_enabled: hw.is_reverse_proxy_enabled,
            reverse_proxy: hw.reverse_proxy.clone(),
        }
    }
}

impl HostResources {
    /// Resources with `available = total - system_reserved - in_use`.
    pub fn from_usage(total: ResourceSet, system_reserved: ResourceSet, in_use: ResourceSet) -> Self {
        HostResources {
            total,
            system_reserved,
            in_use,
            available: total.saturating_sub(system_reserved).saturating_sub(in_use),
        }
    }

    /// What VMs may use at most: `total - system_reserved`.
    pub fn capacity(&self) -> ResourceSet {
        self.total.saturating_sub(self.system_reserved)
    }

    /// Account for a VM the host now runs (before the host reports it).
    pub fn add_vm(&mut self, r: ResourceSet) {
        self.in_use = self.in_use.saturating_add(r);
        self.available = self.available.saturating_sub(r);
    }

    /// These figures, never counting less CPU and memory in use than the active VMs in
    /// `vms` hold. A host's report can predate a VM the orchestrator already counts (a
    /// creation confirmed while the report was on its way); taking the larger figure keeps
    /// placement from promising that room twice. The next report after the host sees the
    /// VM agrees again. Disk is left as reported (hosts count what VMs really use there).
    pub fn covering(self, vms: &[VmSummary]) -> HostResources {
        let (cpu, memory_mb) = vms
            .iter()
            .filter(|v| v.is_active())
            .fold((0u32, 0u64), |(c, m), v| (c.saturating_add(v.cpu), m.saturating_add(v.memory_mb)));
        let in_use = ResourceSet {
            cpu: self.in_use.cpu.max(cpu),
            memory_mb: self.in_use.memory_mb.max(memory_mb),
            ..self.in_use
        };
        let extra = in_use.saturating_sub(self.in_use);
        HostResources { in_use, available: self.available.saturating_sub(extra), ..self }
    }

    /// Account for a VM the host no longer runs.
    pub fn remove_vm(&mut self, r: ResourceSet) {
        self.in_use = self.in_use.saturating_sub(r);
        self.available = self.available.saturating_add(r).min(self.capacity().saturating_sub(self.in_use));
    }
}

/// A host's health as the orchestrator sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// It answered recently.
    Healthy,
    /// It failed a check or was silent too long.
    Unhealthy,
    /// Nothing heard since registration or start-up.
    #[default]
    Unknown,
}

impl HostState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            HostState::Healthy => "healthy",
            HostState::Unhealthy => "unhealthy",
            HostState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM on a host, as the orchestrator last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSummary {
    /// The VM's id on its host.
    pub id: String,
    /// Name.
    pub name: String,
    /// Power state (`running`, `stopped`, ...); `unknown` while its host is unhealthy.
    #[schema(value_type = String)]
    pub state: VmState,
    /// Guest OS as the driver names it (`macosx`, `linux`, `win-11`, ...).
    pub os: String,
    /// CPUs.
    pub cpu: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Disk in MiB.
    pub disk_mb: u64,
    /// The Hangar owner the host recorded, when it says.
    #[serde(default)]
    pub owner: Option<String>,
    /// The host's whole answer for the VM (every key of the reference's VM object), as it
    /// last listed or sent it: what the orchestrator's VM answers carry. In memory only
    /// (neither stored nor part of the host view's JSON); `None` until the host has
    /// answered for the VM. Shared, so copying a host view does not copy it.
    #[serde(skip)]
    pub machine: Option<Arc<hangar_wire::Machine>>,
}

impl VmSummary {
    /// Whether the guest is macOS (by its OS, never by its name).
    pub fn is_macos(&self) -> bool {
        let os = self.os.trim_start().as_bytes();
        (os.len() >= 3 && os[..3].eq_ignore_ascii_case(b"mac"))
            || ["darwin", "osx"].iter().any(|n| self.os.trim().eq_ignore_ascii_case(n))
    }

    /// Whether the VM holds host CPU and memory (running, or on its way in or out).
    pub fn is_active(&self) -> bool {
        !matches!(self.state, VmState::Stopped | VmState::Suspended)
    }

    /// The resources the VM holds.
    pub fn resources(&self) -> ResourceSet {
        ResourceSet::new(self.cpu, self.memory_mb, self.disk_mb)
    }
}

/// A catalog image a host holds in its cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[schema(as = HostCachedImage)]
pub struct CachedImage {
    /// Catalog id.
    pub catalog_id: String,
    /// Version.
    pub version: String,
    /// Architecture (`x86_64` or `arm64`).
    pub architecture: String,
}

/// What a host says about itself (its `hardware()` answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostHardware {
    /// `x86_64` or `arm64`.
    pub architecture: String,
    /// Host OS.
    pub os: Os,
    /// Hypervisor on the host.
    pub hypervisor: HypervisorKind,
    /// Resources.
    pub resources: HostResources,
    /// Images in the host's catalog cache.
    pub cached_images: Vec<CachedImage>,
    /// Whether the image cache is on the same volume as the VMs (the reference's 3x rule)
    /// rather than another one (2x).
    pub cache_on_vm_volume: bool,
    /// The rest of what the host said about itself.
    pub details: HostDetails,
}

/// A registered host: the view every API caller with `LIST_ORCHESTRATOR_HOSTS` may see.
/// It holds no credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    /// Id (UUID).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Base URL of the host's API (`https://mac-01:8080/api`).
    pub url: String,
    /// Free text.
    pub description: String,
    /// Tags requests can require (compared case-insensitively).
    pub tags: BTreeSet<String>,
    /// Whether the scheduler may place VMs on it.
    pub enabled: bool,
    /// `x86_64` or `arm64`, once known.
    pub architecture: Option<String>,
    /// Host OS, once known.
    pub os: Option<Os>,
    /// Hypervisor (`parallels`, `qemu`), once known.
    #[schema(value_type = Option<String>)]
    pub hypervisor: Option<HypervisorKind>,
    /// Resources, once reported.
    pub resources: Option<HostResources>,
    /// Health.
    pub state: HostState,
    /// When the host was last heard from.
    pub last_seen: Option<DateTime<Utc>>,
    /// Why it is unhealthy.
    pub last_error: Option<String>,
    /// Its VMs as last seen.
    pub vms: Vec<VmSummary>,
    /// Images in its cache.
    pub cached_images: Vec<CachedImage>,
    /// Whether its image cache shares the VM volume (3x disk rule) or not (2x).
    pub cache_on_vm_volume: bool,
    /// Callers need every one of these roles to use the host (super users always can).
    pub required_roles: BTreeSet<String>,
    /// Callers need every one of these claims to use the host.
    pub required_claims: BTreeSet<String>,
    /// Whether credentials are stored for it (the credentials themselves are never shown).
    /// The host's own description of itself (the reference's host keys), from its last
    /// hardware answer.
    #[serde(default, flatten)]
    pub details: HostDetails,
    pub has_credentials: bool,
    /// Registration time.
    pub created_at: DateTime<Utc>,
    /// Last configuration or status change written.
    pub updated_at: DateTime<Utc>,
}

impl Host {
    /// A host nothing has been heard from yet: enabled, state unknown, no hardware, VMs,
    /// cache, tags, access rules or credentials. Registration and tests fill in the rest.
    pub fn new(id: impl Into<String>, name: impl Into<String>, url: impl Into<String>, now: DateTime<Utc>) -> Host {
        Host {
            id: id.into(),
            name: name.into(),
            url: url.into(),
            description: String::new(),
            tags: BTreeSet::new(),
            enabled: true,
            architecture: None,
            os: None,
            hypervisor: None,
            resources: None,
            details: HostDetails::default(),
            state: HostState::Unknown,
            last_seen: None,
            last_error: None,
            vms: Vec::new(),
            cached_images: Vec::new(),
            cache_on_vm_volume: true,
            required_roles: BTreeSet::new(),
            required_claims: BTreeSet::new(),
            has_credentials: false,
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether the host has `tag`, case-insensitively.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))
    }

    /// Running macOS VMs (Apple's licence allows two per Mac).
    pub fn running_macos_vms(&self) -> usize {
        self.vms.iter().filter(|v| v.is_active() && v.is_macos()).count()
    }

    /// Apply what the host reported about itself.
    pub fn apply_hardware(&mut self, hw: &HostHardware) {
        self.architecture = Some(hw.architecture.clone());
        self.os = Some(hw.os);
        self.hypervisor = Some(hw.hypervisor);
        self.resources = Some(hw.resources);
        self.cached_images = hw.cached_images.clone();
        self.cache_on_vm_volume = hw.cache_on_vm_volume;
        self.details = hw.details.clone();
    }
}

/// How the orchestrator authenticates to a host. Never serialised into any view;
/// `Debug` shows only the kind.
#[derive(Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum HostCredentials {
    /// Username and password (the orchestrator logs in to get a token).
    Basic {
        /// User name on the host.
        username: String,
        /// Password.
        password: String,
    },
    /// An API key sent as `X-Api-Key`.
    ApiKey {
        /// The key.
        api_key: String,
    },
}

impl fmt::Debug for HostCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostCredentials::Basic { .. } => f.write_str("HostCredentials::Basic(<redacted>)"),
            HostCredentials::ApiKey { .. } => f.write_str("HostCredentials::ApiKey(<redacted>)"),
        }
    }
}

/// What registering a host takes.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RegisterHost {
    /// Unique name; defaults to the URL's host name.
    #[serde(default)]
    pub name: Option<String>,
    /// Base URL of the host's API (also accepted as `host`, the reference's name).
    #[serde(alias = "host")]
    pub url: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// Credentials, stored sealed (also accepted as `authentication`, the reference's name).
    #[serde(default, alias = "authentication")]
    pub credentials: Option<HostCredentials>,
    /// Roles a caller needs to use the host.
    #[serde(default)]
    pub required_roles: BTreeSet<String>,
    /// Claims a caller needs to use the host.
    #[serde(default)]
    pub required_claims: BTreeSet<String>,
    /// Start disabled (out of scheduling).
    #[serde(default)]
    pub disabled: bool,
}

/// A partial host update; `None` leaves a field alone.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct UpdateHost {
    /// New name.
    pub name: Option<String>,
    /// New URL (also accepted as `host`).
    #[serde(alias = "host")]
    pub url: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New tags (replace the old ones).
    pub tags: Option<BTreeSet<String>>,
    /// New credentials (also accepted as `authentication`).
    #[serde(alias = "authentication")]
    pub credentials: Option<HostCredentials>,
    /// New required roles.
    pub required_roles: Option<BTreeSet<String>>,
    /// New required claims.
    pub required_claims: Option<BTreeSet<String>>,
}

/// A VM created through the orchestrator, with its expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrchestratedVm {
    /// The VM's id on its host.
    pub id: String,
    /// Name.
    pub name: String,
    /// Host id.
    pub host_id: String,
    /// The user it was made for.
    pub owner: String,
    /// Guest OS.
    pub os: Os,
    /// What it was given.
    pub resources: ResourceSet,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When the reaper deletes it; `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
    /// Why the last deletion attempt failed.
    pub last_error: Option<String>,
    /// The runner pool the VM belongs to (warm, or claimed from it); `None` for other VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolMark>,
}

/// A VM's place in a runner pool (`OrchestratedVm::pool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolMark {
    /// The pool's name.
    pub pool: String,
    /// Kept warm for a claim (owned by the pool's service owner); `false` once claimed.
    pub warm: bool,
    /// A no-op exec succeeded in it: a claim may take it.
    pub ready: bool,
    /// The pool's generation it was made for (an edit recycles older ones).
    pub generation: u64,
    /// The image version it was made from (`latest` resolved when it was made).
    pub version: String,
}

/// A host as the API answers it: the view, plus its URL again as `host` (the reference's
/// name for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    /// The host.
    #[serde(flatten)]
    pub view: Host,
    /// The host's URL (the same as `url`).
    pub host: String,
    /// Whether the host agent's version (`devops_version`) differs from this orchestrator's
    /// (then upgrade the one that is older); false while the host has not reported a version.
    #[serde(default)]
    pub version_differs: bool,
}

/// This orchestrator's version: every crate of the workspace has the binary's version.
pub const ORCHESTRATOR_VERSION: &str = env!("CARGO_PKG_VERSION");

impl From<Host> for HostView {
    fn from(view: Host) -> Self {
        let reported = view.details.devops_version.trim();
        let version_differs = !reported.is_empty() && reported != ORCHESTRATOR_VERSION;
        HostView { host: view.url.clone(), version_differs, view }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_host_view_is_the_host_plus_its_url_as_host() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let mut h = Host::new("h1", "mac-01", "http://mac-01:3080/api", now);
        h.hypervisor = Some(HypervisorKind::Parallels);
        h.vms.push(VmSummary {
            id: "v1".into(),
            name: "ci".into(),
            state: VmState::Running,
            os: "ubuntu".into(),
            cpu: 2,
            memory_mb: 2048,
            disk_mb: 8192,
            owner: None,
            machine: None,
        });
        let mut want = serde_json::to_value(&h).unwrap();
        want.as_object_mut().unwrap().insert("host".into(), json!(h.url));
        want.as_object_mut().unwrap().insert("version_differs".into(), json!(false));
        let view = serde_json::to_value(HostView::from(h.clone())).unwrap();
        assert_eq!(view, want);
        assert_eq!(serde_json::from_value::<HostView>(view).unwrap().view, h);
    }

    #[test]
    fn a_host_whose_agent_runs_another_version_is_flagged() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let mut h = Host::new("h1", "mac-01", "http://mac-01:3080/api", now);
        assert!(!HostView::from(h.clone()).version_differs, "no version reported yet");
        h.details.devops_version = ORCHESTRATOR_VERSION.into();
        assert!(!HostView::from(h.clone()).version_differs);
        h.details.devops_version = "0.0.1-old".into();
        let v = serde_json::to_value(HostView::from(h)).unwrap();
        assert_eq!(v["version_differs"], json!(true));
        assert_eq!(v["devops_version"], json!("0.0.1-old"));
    }

    #[test]
    fn a_host_stored_before_its_details_still_reads_and_answers_the_reference_keys() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let mut h = Host::new("h1", "mac-01", "http://mac-01:3080/api", now);
        h.resources = Some(HostResources::from_usage(
            ResourceSet { cpu: 8, memory_mb: 16384, disk_mb: 100_000 },
            ResourceSet::default(),
            ResourceSet::default(),
        ));
        let mut old = serde_json::to_value(&h).unwrap();
        assert_eq!(old["resources"]["logical_cpu_count"], 8, "{old}");
        assert_eq!(old["resources"]["memory_size"], 16384.0, "{old}");
        for key in ["cpu_model", "os_name", "devops_version", "reverse_proxy", "is_reverse_proxy_enabled"] {
            assert!(old.get(key).is_some(), "{key}: {old}");
            old.as_object_mut().unwrap().remove(key);
        }
        let back: Host = serde_json::from_value(old).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn registration_takes_host_for_url_and_authentication_for_credentials() {
        let r: RegisterHost = serde_json::from_value(
            json!({"host": "http://h:3080", "authentication": {"username": "u", "password": "p"}}),
        )
        .unwrap();
        assert_eq!(r.url, "http://h:3080");
        assert!(matches!(r.credentials, Some(HostCredentials::Basic { .. })));
        let r: RegisterHost = serde_json::from_value(json!({"url": "http://h:3080", "tags": ["a"]})).unwrap();
        assert_eq!((r.url.as_str(), r.tags.len()), ("http://h:3080", 1));
        assert!(serde_json::from_value::<RegisterHost>(json!({"name": "no url"})).is_err());
        let u: UpdateHost = serde_json::from_value(json!({"host": "http://other:3080"})).unwrap();
        assert_eq!(u.url.as_deref(), Some("http://other:3080"));
        let u: UpdateHost = serde_json::from_value(json!({"description": "d"})).unwrap();
        assert_eq!(u.url, None);
    }
}
