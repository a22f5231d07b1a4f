//! Placement: which host takes a VM. Pure logic over host views and the reservations
//! already held, so it is cheap, deterministic and testable without any IO.
//!
//! A host is a candidate when it passes every filter, in this order (the first filter a
//! host fails is the reason reported for it): not excluded by an earlier failed attempt,
//! the requested host when one is pinned, enabled, healthy, open to the caller (required
//! roles and claims), hardware reported, same architecture, able to run the guest OS with
//! the requested hypervisor, every required tag, fewer than two macOS VMs for a macOS guest
//! (Apple's licence), then enough free CPU, memory and disk after the reservations held
//! on it. Disk: an image of known size needs 3x its size free when the host's image cache
//! shares the VM volume, 2x when it does not, and 1x when the host already caches it.
//!
//! Among candidates, hosts that cache the image come first; then the profile decides
//! (`spread`: the least loaded after placement, `pack`: the most loaded); ties go to the
//! smallest host id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use hangar_core::Principal;
use hangar_hypervisor::HypervisorKind;
use serde::{Deserialize, Serialize};

use crate::model::{Host, HostState, Os, ResourceSet};

/// Apple's licence limit: macOS VMs running at once on one Mac.
pub const MAX_MACOS_VMS: usize = 2;

/// How to choose among hosts that fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Least loaded host first: VMs run alone when they can (faster builds).
    #[default]
    Spread,
    /// Most loaded host first: keep whole hosts free for big VMs.
    Pack,
}

/// A catalog image and its size, for cache locality and the disk rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Catalog id.
    pub catalog_id: String,
    /// Version.
    pub version: String,
    /// Size of the image in MiB, when known.
    pub size_mb: Option<u64>,
}

/// What the caller is allowed to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Caller {
    /// The server itself: every host.
    #[default]
    System,
    /// A user, with their current roles and claims.
    User {
        /// Holds the SUPER_USER role.
        super_user: bool,
        /// Roles.
        roles: BTreeSet<String>,
        /// Effective claims.
        claims: BTreeSet<String>,
    },
}

impl From<&Principal> for Caller {
    fn from(p: &Principal) -> Self {
        Caller::User { super_user: p.is_super_user(), roles: p.roles.clone(), claims: p.claims.clone() }
    }
}

impl Caller {
    /// Whether the caller may place VMs on `host`.
    pub fn may_use(&self, host: &Host) -> bool {
        match self {
            Caller::System => true,
            Caller::User { super_user: true, .. } => true,
            Caller::User { roles, claims, .. } => {
                host.required_roles.iter().all(|r| roles.contains(r))
                    && host.required_claims.iter().all(|c| claims.contains(c))
            }
        }
    }
}

/// What a VM needs from a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementRequest {
    /// CPU and memory of the VM; `disk_mb` is the disk the VM gets (0 when unknown).
    pub resources: ResourceSet,
    /// `x86_64` or `arm64` (already normalised).
    pub architecture: String,
    /// Guest OS.
    pub os: Option<Os>,
    /// Required hypervisor, if any.
    pub hypervisor: Option<HypervisorKind>,
    /// The image, for cache locality and the disk rule.
    pub image: Option<ImageRef>,
    /// Tags the host must all have (case-insensitive).
    pub tags: BTreeSet<String>,
    /// Pin to one host, by id or name.
    pub host: Option<String>,
    /// Whose request it is.
    pub caller: Caller,
    /// Host ids not to use (they already failed this request).
    pub exclude: BTreeSet<String>,
}

impl PlacementRequest {
    /// Whether this VM counts against the macOS limit.
    pub fn is_macos(&self) -> bool {
        self.os == Some(Os::Macos)
    }

    /// Whether `host` caches the requested image.
    pub fn cached_on(&self, host: &Host) -> bool {
        match &self.image {
            Some(img) => host.cached_images.iter().any(|c| {
                c.catalog_id == img.catalog_id && c.version == img.version && c.architecture == self.architecture
            }),
            None => false,
        }
    }

    /// What the VM takes on `host`: its CPU and memory, and disk by the 3x/2x/1x rule.
    pub fn needs_on(&self, host: &Host) -> ResourceSet {
        let image_disk = match self.image.as_ref().and_then(|i| i.size_mb) {
            Some(size) => {
                let factor = if self.cached_on(host) {
                    1
                } else if host.cache_on_vm_volume {
                    3
                } else {
                    2
                };
                size.saturating_mul(factor)
            }
            None => 0,
        };
        ResourceSet { disk_mb: self.resources.disk_mb.max(image_disk), ..self.resources }
    }
}

/// What is reserved on one host and not yet confirmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReserved {
    /// Resources held.
    pub resources: ResourceSet,
    /// macOS VMs among them.
    pub macos_vms: usize,
    /// Number of reservations.
    pub count: usize,
}

/// Reservations per host id.
pub type ReservedByHost = HashMap<String, HostReserved>;

/// Why a host was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// It already failed this request.
    Excluded,
    /// Another host was pinned.
    NotRequested,
    /// Disabled by an operator.
    Disabled,
    /// Failed checks or silent.
    Unhealthy,
    /// Not heard from since registration.
    StateUnknown,
    /// Needs roles or claims the caller lacks.
    NotAllowed,
    /// Has not reported its hardware.
    NoHardware,
    /// Other architecture.
    Architecture,
    /// Cannot run the guest OS or lacks the requested hypervisor.
    Platform,
    /// Lacks a required tag.
    Tags,
    /// Already runs the most macOS VMs Apple allows.
    MacosLimit,
    /// Not enough free CPU.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Not enough free disk.
    Disk,
}

impl Reason {
    /// The phrase after a count: "3 lack memory".
    pub fn phrase(&self) -> &'static str {
        match self {
            Reason::Excluded => "failed this request already",
            Reason::NotRequested => "are not the requested host",
            Reason::Disabled => "disabled",
            Reason::Unhealthy => "unhealthy",
            Reason::StateUnknown => "not heard from yet",
            Reason::NotAllowed => "need roles or claims the caller lacks",
            Reason::NoHardware => "have not reported their hardware",
            Reason::Architecture => "have another architecture",
            Reason::Platform => "cannot run this guest OS or hypervisor",
            Reason::Tags => "lack a required tag",
            Reason::MacosLimit => "already run 2 macOS VMs",
            Reason::Cpu => "lack CPU",
            Reason::Memory => "lack memory",
            Reason::Disk => "lack disk space",
        }
    }
}

/// No host can take the VM. `Display` says why per group of hosts, most common first:
/// "No host can take this VM: 3 lack memory, 2 disabled, 1 unhealthy".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct NoCapacity {
    /// Hosts considered.
    pub hosts: usize,
    /// How many hosts failed for each reason.
    pub reasons: BTreeMap<Reason, usize>,
}

impl NoCapacity {
    /// How many hosts were turned down for `reason`.
    pub fn count(&self, reason: Reason) -> usize {
        self.reasons.get(&reason).copied().unwrap_or(0)
    }
}

impl fmt::Display for NoCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("No host can take this VM: ")?;
        if self.hosts == 0 {
            return f.write_str("no hosts are registered");
        }
        let mut groups: Vec<(Reason, usize)> = self.reasons.iter().map(|(r, n)| (*r, *n)).collect();
        groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (i, (reason, n)) in groups.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n} {}", reason.phrase())?;
        }
        Ok(())
    }
}

/// Where the VM goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Host id.
    pub host_id: String,
    /// Host name.
    pub host_name: String,
    /// What the VM takes on that host (reserve this).
    pub needs: ResourceSet,
    /// Whether it counts against the macOS limit.
    pub macos: bool,
    /// Whether the host caches the image.
    pub cached: bool,
    /// The host's load after placement, in parts per million of its capacity (the larger
    /// of CPU and memory).
    pub load_ppm: u64,
}

/// Checks one host; returns what the VM needs there and the load after placement.
pub fn check_host(
    request: &PlacementRequest,
    host: &Host,
    reserved: HostReserved,
) -> Result<(ResourceSet, u64), Reason> {
    check_host_with(request, host, || reserved)
}

/// [`check_host`], looking the reservations up only once the cheap filters passed.
fn check_host_with(
    request: &PlacementRequest,
    host: &Host,
    reserved: impl FnOnce() -> HostReserved,
) -> Result<(ResourceSet, u64), Reason> {
    if request.exclude.contains(&host.id) {
        return Err(Reason::Excluded);
    }
    if let Some(pin) = &request.host
        && *pin != host.id
        && !pin.eq_ignore_ascii_case(&host.name)
    {
        return Err(Reason::NotRequested);
    }
    if !host.enabled {
        return Err(Reason::Disabled);
    }
    match host.state {
        HostState::Healthy => {}
        HostState::Unhealthy => return Err(Reason::Unhealthy),
        HostState::Unknown => return Err(Reason::StateUnknown),
    }
    if !request.caller.may_use(host) {
        return Err(Reason::NotAllowed);
    }
    let (Some(arch), Some(resources), Some(hv)) = (&host.architecture, &host.resources, host.hypervisor) else {
        return Err(Reason::NoHardware);
    };
    if *arch != request.architecture {
        return Err(Reason::Architecture);
    }
    if request.hypervisor.is_some_and(|h| h != hv) {
        return Err(Reason::Platform);
    }
    if request.is_macos() && (host.os != Some(Os::Macos) || hv != HypervisorKind::Parallels) {
        return Err(Reason::Platform);
    }
    if !request.tags.iter().all(|t| host.has_tag(t)) {
        return Err(Reason::Tags);
    }
    let reserved = reserved();
    if request.is_macos() && host.running_macos_vms() + reserved.macos_vms >= MAX_MACOS_VMS {
        return Err(Reason::MacosLimit);
    }
    let needs = request.needs_on(host);
    let free = resources.available.saturating_sub(reserved.resources);
    if needs.cpu > free.cpu {
        return Err(Reason::Cpu);
    }
    if needs.memory_mb > free.memory_mb {
        return Err(Reason::Memory);
    }
    if needs.disk_mb > free.disk_mb {
        return Err(Reason::Disk);
    }
    let cap = resources.capacity();
    let after = free.saturating_sub(needs);
    let load =
        |cap: u64, free: u64| cap.saturating_sub(free).saturating_mul(1_000_000).checked_div(cap).unwrap_or(1_000_000);
    let load_ppm = load(u64::from(cap.cpu), u64::from(after.cpu)).max(load(cap.memory_mb, after.memory_mb));
    Ok((needs, load_ppm))
}

/// Chooses a host for `request` among `hosts`, given what `reserved` already holds.
pub fn place<'a, I>(
    request: &PlacementRequest,
    hosts: I,
    reserved: &ReservedByHost,
    profile: Profile,
) -> Result<Decision, NoCapacity>
where
    I: IntoIterator<Item = &'a Host>,
{
    let mut best: Option<(bool, u64, &Host, ResourceSet)> = None;
    let mut refused = NoCapacity::default();
    for host in hosts {
        refused.hosts += 1;
        let held = || {
            if reserved.is_empty() {
                HostReserved::default()
            } else {
                reserved.get(&host.id).copied().unwrap_or_default()
            }
        };
        match check_host_with(request, host, held) {
            Err(reason) => *refused.reasons.entry(reason).or_insert(0) += 1,
            Ok((needs, load)) => {
                let cached = request.cached_on(host);
                let better = match &best {
                    None => true,
                    Some((b_cached, b_load, b_host, _)) => {
                        if cached != *b_cached {
                            cached
                        } else if load != *b_load {
                            match profile {
                                Profile::Spread => load < *b_load,
                                Profile::Pack => load > *b_load,
                            }
                        } else {
                            host.id < b_host.id
                        }
                    }
                };
                if better {
                    best = Some((cached, load, host, needs));
                }
            }
        }
    }
    match best {
        Some((cached, load_ppm, host, needs)) => Ok(Decision {
            host_id: host.id.clone(),
            host_name: host.name.clone(),
            needs,
            macos: request.is_macos(),
            cached,
            load_ppm,
        }),
        None => Err(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CachedImage, HostResources};

    fn host(id: &str, cpu: u32, memory_mb: u64) -> Host {
        let t = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        Host {
            id: id.into(),
            name: format!("name-{id}"),
            url: format!("http://{id}:8080/api"),
            description: String::new(),
            tags: BTreeSet::new(),
            enabled: true,
            architecture: Some("x86_64".into()),
            os: Some(Os::Linux),
            hypervisor: Some(HypervisorKind::Qemu),
            resources: Some(HostResources::from_usage(
                ResourceSet::new(cpu, memory_mb, 1_000_000),
                ResourceSet::default(),
                ResourceSet::default(),
            )),
            state: HostState::Healthy,
            last_seen: Some(t),
            last_error: None,
            vms: Vec::new(),
            cached_images: Vec::new(),
            cache_on_vm_volume: true,
            required_roles: BTreeSet::new(),
            required_claims: BTreeSet::new(),
            has_credentials: false,
            created_at: t,
            updated_at: t,
        }
    }

    fn caching(mut h: Host, id: &str, version: &str, arch: &str) -> Host {
        h.cached_images.push(CachedImage { catalog_id: id.into(), version: version.into(), architecture: arch.into() });
        h
    }

    fn ubuntu(version: &str) -> PlacementRequest {
        PlacementRequest {
            resources: ResourceSet::new(2, 2048, 0),
            architecture: "x86_64".into(),
            os: Some(Os::Linux),
            image: Some(ImageRef { catalog_id: "ubuntu".into(), version: version.into(), size_mb: Some(10_000) }),
            ..Default::default()
        }
    }

    fn chosen(r: &PlacementRequest, hosts: &[&Host], profile: Profile) -> (String, bool) {
        let d = place(r, hosts.iter().copied(), &ReservedByHost::new(), profile).unwrap();
        (d.host_id, d.cached)
    }

    #[test]
    fn a_host_caching_the_image_wins_under_either_profile() {
        let (small, big, mid) = (host("a-small", 4, 8192), host("b-big", 64, 262_144), host("c-mid", 16, 32_768));
        let r = ubuntu("24.04");
        // Without cache: spread takes the emptiest after placement, pack the fullest.
        assert_eq!(chosen(&r, &[&small, &big, &mid], Profile::Spread), ("b-big".into(), false));
        assert_eq!(chosen(&r, &[&small, &big, &mid], Profile::Pack), ("a-small".into(), false));
        // The middle host caches it: first under both profiles.
        let mid = caching(mid, "ubuntu", "24.04", "x86_64");
        assert_eq!(chosen(&r, &[&small, &big, &mid], Profile::Spread), ("c-mid".into(), true));
        assert_eq!(chosen(&r, &[&small, &big, &mid], Profile::Pack), ("c-mid".into(), true));
        // Among several caching hosts, the profile decides again.
        let small = caching(small, "ubuntu", "24.04", "x86_64");
        assert_eq!(chosen(&r, &[&small, &big, &mid], Profile::Spread), ("c-mid".into(), true));
        assert_eq!(chosen(&r, &[&small, &big, &mid], Profile::Pack), ("a-small".into(), true));
    }

    #[test]
    fn only_the_same_id_version_and_architecture_count_as_cached() {
        let big = host("b-big", 64, 262_144);
        let other_version = caching(host("a", 8, 16_384), "ubuntu", "22.04", "x86_64");
        let other_arch = caching(host("c", 8, 16_384), "ubuntu", "24.04", "arm64");
        let other_id = caching(host("d", 8, 16_384), "debian", "24.04", "x86_64");
        let r = ubuntu("24.04");
        assert_eq!(
            chosen(&r, &[&other_version, &big, &other_arch, &other_id], Profile::Spread),
            ("b-big".into(), false)
        );
        // A request without an image never prefers a caching host.
        let mut plain = r.clone();
        plain.image = None;
        let cached = caching(host("a", 8, 16_384), "ubuntu", "24.04", "x86_64");
        assert_eq!(chosen(&plain, &[&cached, &big], Profile::Spread), ("b-big".into(), false));
    }

    #[test]
    fn ties_go_to_the_smallest_host_id_whatever_the_order() {
        let hosts: Vec<Host> =
            ["h3", "h1", "h2"].iter().map(|id| caching(host(id, 8, 16_384), "ubuntu", "24.04", "x86_64")).collect();
        let r = ubuntu("24.04");
        for profile in [Profile::Spread, Profile::Pack] {
            let fwd: Vec<&Host> = hosts.iter().collect();
            let rev: Vec<&Host> = hosts.iter().rev().collect();
            assert_eq!(chosen(&r, &fwd, profile), ("h1".into(), true));
            assert_eq!(chosen(&r, &rev, profile), ("h1".into(), true));
        }
    }
}
