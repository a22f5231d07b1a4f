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
use std::sync::Arc;

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
        self.may_use_with(&host.required_roles, &host.required_claims)
    }

    /// Whether the caller holds every role and claim a host requires.
    fn may_use_with(&self, required_roles: &BTreeSet<String>, required_claims: &BTreeSet<String>) -> bool {
        match self {
            Caller::System => true,
            Caller::User { super_user: true, .. } => true,
            Caller::User { roles, claims, .. } => {
                required_roles.iter().all(|r| roles.contains(r)) && required_claims.iter().all(|c| claims.contains(c))
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
        self.needs_given(self.cached_on(host), host.cache_on_vm_volume)
    }

    /// What the VM takes on a host that caches the image (`cached`) or not, with its cache
    /// on the VM volume or not.
    fn needs_given(&self, cached: bool, cache_on_vm_volume: bool) -> ResourceSet {
        let image_disk = match self.image.as_ref().and_then(|i| i.size_mb) {
            Some(size) => {
                let factor = if cached {
                    1
                } else if cache_on_vm_volume {
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

/// FNV-1a offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `h`: cheap and stable. Only used to pre-filter;
/// every hit is verified on the real data.
fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The bloom bit of a tag (case-insensitive).
fn tag_bit(tag: &str) -> u64 {
    1u64 << (fnv(tag.bytes().map(|b| b.to_ascii_lowercase()), FNV_OFFSET) % 64)
}

/// The bloom bit of a cached image (0xff never occurs in UTF-8, so the fields cannot run
/// into each other).
fn image_bit(catalog_id: &str, version: &str, architecture: &str) -> u64 {
    let h = fnv(catalog_id.bytes(), FNV_OFFSET);
    let h = fnv(version.bytes().chain([0xff]), fnv([0xff], h));
    let h = fnv(architecture.bytes(), fnv([0xff], h));
    1u64 << (h % 64)
}

/// The first 16 bytes of an id, zero-padded, big-endian: orders like the id itself
/// whenever two prefixes differ.
fn id_prefix(id: &str) -> u128 {
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(id.bytes()) {
        *d = s;
    }
    u128::from_be_bytes(b)
}

/// Architecture, coded for a cheap comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    X86_64,
    Arm64,
    /// Anything else: compared as text.
    Other,
}

impl Arch {
    fn of(s: &str) -> Arch {
        match s {
            "x86_64" => Arch::X86_64,
            "arm64" => Arch::Arm64,
            _ => Arch::Other,
        }
    }
}

/// The parts of a host placement reads rarely (only to verify a pre-filter hit, a pin, an
/// exclusion, a tie or to name the decision). Shared between snapshots until they change.
#[derive(Debug, PartialEq, Eq)]
struct SlotDetail {
    id: String,
    name: String,
    architecture: Option<String>,
    tags: BTreeSet<String>,
    cached_images: Vec<crate::model::CachedImage>,
    required_roles: BTreeSet<String>,
    required_claims: BTreeSet<String>,
}

impl SlotDetail {
    fn of(h: &Host) -> SlotDetail {
        SlotDetail {
            id: h.id.clone(),
            name: h.name.clone(),
            architecture: h.architecture.clone(),
            tags: h.tags.clone(),
            cached_images: h.cached_images.clone(),
            required_roles: h.required_roles.clone(),
            required_claims: h.required_claims.clone(),
        }
    }

    /// Whether this still describes `h` (compared without allocating).
    fn describes(&self, h: &Host) -> bool {
        self.id == h.id
            && self.name == h.name
            && self.architecture == h.architecture
            && self.tags == h.tags
            && self.cached_images == h.cached_images
            && self.required_roles == h.required_roles
            && self.required_claims == h.required_claims
    }
}

/// A compact snapshot of one host: everything placement's scan reads, in one small
/// record, so a scan over thousands of hosts touches one contiguous array instead of full
/// host views. Kept up to date by the registry whenever a host's view changes
/// ([`PlacementIndex`]); [`HostSlot::of`] builds one from a view.
#[derive(Debug, Clone)]
pub struct HostSlot {
    id_hash: u64,
    id_prefix: u128,
    available: ResourceSet,
    capacity: ResourceSet,
    tag_bloom: u64,
    image_bloom: u64,
    macos_running: usize,
    arch: Arch,
    os: Option<Os>,
    hypervisor: Option<HypervisorKind>,
    state: HostState,
    enabled: bool,
    /// Architecture, resources and hypervisor all reported.
    hardware: bool,
    /// No roles or claims required.
    open: bool,
    cache_on_vm_volume: bool,
    detail: Arc<SlotDetail>,
}

impl HostSlot {
    /// The snapshot of `host`.
    pub fn of(host: &Host) -> HostSlot {
        let mut s = HostSlot {
            id_hash: fnv(host.id.bytes(), FNV_OFFSET),
            id_prefix: id_prefix(&host.id),
            available: ResourceSet::default(),
            capacity: ResourceSet::default(),
            tag_bloom: 0,
            image_bloom: 0,
            macos_running: 0,
            arch: Arch::Other,
            os: None,
            hypervisor: None,
            state: HostState::Unknown,
            enabled: false,
            hardware: false,
            open: true,
            cache_on_vm_volume: true,
            detail: Arc::new(SlotDetail::of(host)),
        };
        s.refresh_hot(host);
        s
    }

    /// Brings the snapshot up to date with `host` (the same host), sharing the rarely
    /// changing part when it did not change.
    pub fn refresh(&mut self, host: &Host) {
        if !self.detail.describes(host) {
            self.detail = Arc::new(SlotDetail::of(host));
            self.id_hash = fnv(host.id.bytes(), FNV_OFFSET);
            self.id_prefix = id_prefix(&host.id);
        }
        self.refresh_hot(host);
    }

    fn refresh_hot(&mut self, h: &Host) {
        let res = h.resources.unwrap_or_default();
        self.available = res.available;
        self.capacity = res.capacity();
        self.tag_bloom = h.tags.iter().fold(0, |m, t| m | tag_bit(t));
        self.image_bloom =
            h.cached_images.iter().fold(0, |m, c| m | image_bit(&c.catalog_id, &c.version, &c.architecture));
        self.macos_running = h.running_macos_vms();
        self.arch = h.architecture.as_deref().map_or(Arch::Other, Arch::of);
        self.os = h.os;
        self.hypervisor = h.hypervisor;
        self.state = h.state;
        self.enabled = h.enabled;
        self.hardware = h.architecture.is_some() && h.resources.is_some() && h.hypervisor.is_some();
        self.open = h.required_roles.is_empty() && h.required_claims.is_empty();
        self.cache_on_vm_volume = h.cache_on_vm_volume;
    }

    /// The host's id.
    pub fn id(&self) -> &str {
        &self.detail.id
    }

    /// Whether this host's id sorts before `other`'s.
    fn id_before(&self, other: &HostSlot) -> bool {
        match self.id_prefix.cmp(&other.id_prefix) {
            std::cmp::Ordering::Equal => self.detail.id < other.detail.id,
            o => o == std::cmp::Ordering::Less,
        }
    }
}

/// Snapshots of every host, kept in step with the registry's views (upsert on every
/// change, remove on unregistration). Order is irrelevant: ties go by host id.
#[derive(Debug, Default)]
pub struct PlacementIndex {
    slots: Vec<HostSlot>,
    pos: HashMap<String, usize>,
}

impl PlacementIndex {
    /// An index of `hosts`.
    pub fn build<'a>(hosts: impl IntoIterator<Item = &'a Host>) -> PlacementIndex {
        let mut idx = PlacementIndex::default();
        for h in hosts {
            idx.upsert(h);
        }
        idx
    }

    /// Adds `host` or refreshes its snapshot.
    pub fn upsert(&mut self, host: &Host) {
        if let Some(slot) = self.pos.get(&host.id).and_then(|&i| self.slots.get_mut(i)) {
            slot.refresh(host);
            return;
        }
        self.pos.insert(host.id.clone(), self.slots.len());
        self.slots.push(HostSlot::of(host));
    }

    /// Forgets a host.
    pub fn remove(&mut self, id: &str) {
        let Some(i) = self.pos.remove(id) else { return };
        if i >= self.slots.len() {
            return;
        }
        self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.pos.insert(moved.detail.id.clone(), i);
        }
    }

    /// Every snapshot.
    pub fn slots(&self) -> &[HostSlot] {
        &self.slots
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no host is indexed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A request with what the scan compares precomputed.
struct Prepared<'r> {
    request: &'r PlacementRequest,
    arch: Arch,
    tag_mask: u64,
    image_bit: u64,
    macos: bool,
    /// Holdings by id hash (sorted), verified by id.
    held: Vec<(u64, &'r str, HostReserved)>,
}

impl<'r> Prepared<'r> {
    fn new(request: &'r PlacementRequest, reserved: &'r ReservedByHost) -> Self {
        let mut held: Vec<(u64, &str, HostReserved)> =
            reserved.iter().map(|(id, r)| (fnv(id.bytes(), FNV_OFFSET), id.as_str(), *r)).collect();
        held.sort_unstable_by_key(|e| e.0);
        Prepared {
            request,
            arch: Arch::of(&request.architecture),
            tag_mask: request.tags.iter().fold(0, |m, t| m | tag_bit(t)),
            image_bit: request
                .image
                .as_ref()
                .map_or(0, |i| image_bit(&i.catalog_id, &i.version, &request.architecture)),
            macos: request.is_macos(),
            held,
        }
    }

    fn held_on(&self, s: &HostSlot) -> HostReserved {
        if self.held.is_empty() {
            return HostReserved::default();
        }
        let start = self.held.partition_point(|e| e.0 < s.id_hash);
        self.held
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|e| e.0 == s.id_hash)
            .find(|e| e.1 == s.detail.id)
            .map(|e| e.2)
            .unwrap_or_default()
    }

    fn cached_on(&self, s: &HostSlot) -> bool {
        match &self.request.image {
            Some(img) if s.image_bloom & self.image_bit != 0 => s.detail.cached_images.iter().any(|c| {
                c.catalog_id == img.catalog_id
                    && c.version == img.version
                    && c.architecture == self.request.architecture
            }),
            _ => false,
        }
    }
}

/// Checks one host; returns what the VM needs there and the load after placement.
pub fn check_host(
    request: &PlacementRequest,
    host: &Host,
    reserved: HostReserved,
) -> Result<(ResourceSet, u64), Reason> {
    let none = ReservedByHost::new();
    let p = Prepared::new(request, &none);
    check_slot(&p, &HostSlot::of(host), || reserved).map(|(needs, load, _)| (needs, load))
}

/// The filters over one snapshot, in the documented order; the reservations are looked up
/// only once the cheap filters passed. Returns the needs, the load after placement and
/// whether the host caches the image.
fn check_slot(
    p: &Prepared<'_>,
    s: &HostSlot,
    reserved: impl FnOnce() -> HostReserved,
) -> Result<(ResourceSet, u64, bool), Reason> {
    let request = p.request;
    if !request.exclude.is_empty() && request.exclude.contains(&s.detail.id) {
        return Err(Reason::Excluded);
    }
    if let Some(pin) = &request.host
        && *pin != s.detail.id
        && !pin.eq_ignore_ascii_case(&s.detail.name)
    {
        return Err(Reason::NotRequested);
    }
    if !s.enabled {
        return Err(Reason::Disabled);
    }
    match s.state {
        HostState::Healthy => {}
        HostState::Unhealthy => return Err(Reason::Unhealthy),
        HostState::Unknown => return Err(Reason::StateUnknown),
    }
    if !s.open && !request.caller.may_use_with(&s.detail.required_roles, &s.detail.required_claims) {
        return Err(Reason::NotAllowed);
    }
    if !s.hardware {
        return Err(Reason::NoHardware);
    }
    let same_arch = if p.arch == Arch::Other || s.arch == Arch::Other {
        s.detail.architecture.as_deref() == Some(request.architecture.as_str())
    } else {
        p.arch == s.arch
    };
    if !same_arch {
        return Err(Reason::Architecture);
    }
    if request.hypervisor.is_some_and(|h| Some(h) != s.hypervisor) {
        return Err(Reason::Platform);
    }
    if p.macos && (s.os != Some(Os::Macos) || s.hypervisor != Some(HypervisorKind::Parallels)) {
        return Err(Reason::Platform);
    }
    if p.tag_mask & !s.tag_bloom != 0
        || (!request.tags.is_empty()
            && !request.tags.iter().all(|t| s.detail.tags.iter().any(|h| h.eq_ignore_ascii_case(t))))
    {
        return Err(Reason::Tags);
    }
    let reserved = reserved();
    if p.macos && s.macos_running + reserved.macos_vms >= MAX_MACOS_VMS {
        return Err(Reason::MacosLimit);
    }
    let cached = p.cached_on(s);
    let needs = request.needs_given(cached, s.cache_on_vm_volume);
    let free = s.available.saturating_sub(reserved.resources);
    if needs.cpu > free.cpu {
        return Err(Reason::Cpu);
    }
    if needs.memory_mb > free.memory_mb {
        return Err(Reason::Memory);
    }
    if needs.disk_mb > free.disk_mb {
        return Err(Reason::Disk);
    }
    let cap = s.capacity;
    let after = free.saturating_sub(needs);
    let load =
        |cap: u64, free: u64| cap.saturating_sub(free).saturating_mul(1_000_000).checked_div(cap).unwrap_or(1_000_000);
    let load_ppm = load(u64::from(cap.cpu), u64::from(after.cpu)).max(load(cap.memory_mb, after.memory_mb));
    Ok((needs, load_ppm, cached))
}

/// Every reason, in declaration order (indexes of the per-reason counters).
const REASONS: [Reason; 14] = [
    Reason::Excluded,
    Reason::NotRequested,
    Reason::Disabled,
    Reason::Unhealthy,
    Reason::StateUnknown,
    Reason::NotAllowed,
    Reason::NoHardware,
    Reason::Architecture,
    Reason::Platform,
    Reason::Tags,
    Reason::MacosLimit,
    Reason::Cpu,
    Reason::Memory,
    Reason::Disk,
];

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
    let slots: Vec<HostSlot> = hosts.into_iter().map(HostSlot::of).collect();
    place_slots(request, &slots, reserved, profile)
}

/// [`place`] over host snapshots (what the scheduler uses, from its [`PlacementIndex`]).
pub fn place_slots<'a, I>(
    request: &PlacementRequest,
    slots: I,
    reserved: &ReservedByHost,
    profile: Profile,
) -> Result<Decision, NoCapacity>
where
    I: IntoIterator<Item = &'a HostSlot>,
{
    let p = Prepared::new(request, reserved);
    let mut best: Option<(bool, u64, &HostSlot, ResourceSet)> = None;
    let mut hosts = 0usize;
    let mut refused = [0usize; REASONS.len()];
    for s in slots {
        hosts += 1;
        match check_slot(&p, s, || p.held_on(s)) {
            Err(reason) => {
                if let Some(n) = refused.get_mut(reason as usize) {
                    *n += 1;
                }
            }
            Ok((needs, load, cached)) => {
                let better = match &best {
                    None => true,
                    Some((b_cached, b_load, b, _)) => {
                        if cached != *b_cached {
                            cached
                        } else if load != *b_load {
                            match profile {
                                Profile::Spread => load < *b_load,
                                Profile::Pack => load > *b_load,
                            }
                        } else {
                            s.id_before(b)
                        }
                    }
                };
                if better {
                    best = Some((cached, load, s, needs));
                }
            }
        }
    }
    match best {
        Some((cached, load_ppm, s, needs)) => Ok(Decision {
            host_id: s.detail.id.clone(),
            host_name: s.detail.name.clone(),
            needs,
            macos: p.macos,
            cached,
            load_ppm,
        }),
        None => Err(NoCapacity {
            hosts,
            reasons: REASONS.iter().zip(refused).filter(|(_, n)| *n > 0).map(|(r, n)| (*r, n)).collect(),
        }),
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
    #[test]
    fn reasons_are_counted_in_declaration_order() {
        for (i, r) in REASONS.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    /// The index follows every change of a view: the decision over the index is the one
    /// over the views themselves, after tag, cache, name, state and resource changes and
    /// removals.
    #[test]
    fn the_index_follows_view_changes_and_removals() {
        let mut hosts: Vec<Host> = (0..8).map(|i| host(&format!("h{i}"), 4 + i, 8192)).collect();
        let mut idx = PlacementIndex::build(&hosts);
        let mut r = ubuntu("24.04");
        r.tags = ["Rack-A".to_string()].into();
        let same = |hosts: &[Host], idx: &PlacementIndex, r: &PlacementRequest| {
            let held = ReservedByHost::new();
            let a = place(r, hosts, &held, Profile::Spread);
            let b = place_slots(r, idx.slots(), &held, Profile::Spread);
            assert_eq!(a, b);
            a
        };
        assert_eq!(same(&hosts, &idx, &r).unwrap_err().count(Reason::Tags), 8);
        // Tags (case-insensitive) and a cached image appear on two hosts.
        for i in [2, 5] {
            hosts[i].tags.insert("rack-a".into());
            idx.upsert(&hosts[i]);
        }
        assert_eq!(same(&hosts, &idx, &r).unwrap().host_id, "h5", "the bigger one");
        hosts[2].cached_images.push(CachedImage {
            catalog_id: "ubuntu".into(),
            version: "24.04".into(),
            architecture: "x86_64".into(),
        });
        idx.upsert(&hosts[2]);
        let d = same(&hosts, &idx, &r).unwrap();
        assert_eq!((d.host_id.as_str(), d.cached), ("h2", true));
        // It goes unhealthy, then h5 runs out of memory: nothing fits, with reasons.
        hosts[2].state = HostState::Unhealthy;
        idx.upsert(&hosts[2]);
        assert_eq!(same(&hosts, &idx, &r).unwrap().host_id, "h5");
        if let Some(res) = hosts[5].resources.as_mut() {
            res.add_vm(ResourceSet::new(0, 8000, 0));
        }
        idx.upsert(&hosts[5]);
        let no = same(&hosts, &idx, &r).unwrap_err();
        assert_eq!((no.count(Reason::Unhealthy), no.count(Reason::Memory), no.count(Reason::Tags)), (1, 1, 6));
        // Pinned by a new name; removals keep the rest findable.
        hosts[5].name = "renamed".into();
        hosts[5].resources = host("x", 9, 8192).resources;
        idx.upsert(&hosts[5]);
        r.host = Some("RENAMED".into());
        assert_eq!(same(&hosts, &idx, &r).unwrap().host_id, "h5");
        for id in ["h0", "h7", "h3"] {
            idx.remove(id);
            hosts.retain(|h| h.id != id);
        }
        idx.remove("never-there");
        assert_eq!(idx.len(), 5);
        assert_eq!(same(&hosts, &idx, &r).unwrap().host_id, "h5");
        for h in &mut hosts {
            h.tags.clear();
            idx.upsert(h);
        }
        r.host = None;
        r.tags.clear();
        // h4, h5 and h6 tie on memory (25% after placement): the smallest id wins.
        assert_eq!(same(&hosts, &idx, &r).unwrap().host_id, "h4");
    }

    /// Holdings are found by id even when ids share a long prefix (the tie-break and the
    /// lookup both fall back to the full id).
    #[test]
    fn holdings_and_ties_use_the_full_id() {
        let long = "0123456789abcdef-same-prefix";
        let a = host(&format!("{long}-b"), 8, 16_384);
        let b = host(&format!("{long}-a"), 8, 16_384);
        let r = ubuntu("24.04");
        let d = place(&r, [&a, &b], &ReservedByHost::new(), Profile::Spread).unwrap();
        assert_eq!(d.host_id, b.id, "tie: smaller full id");
        let mut held = ReservedByHost::new();
        held.insert(b.id.clone(), HostReserved { resources: ResourceSet::new(7, 0, 0), macos_vms: 0, count: 1 });
        let d = place(&r, [&a, &b], &held, Profile::Spread).unwrap();
        assert_eq!(d.host_id, a.id, "the held host is fuller");
    }
}
