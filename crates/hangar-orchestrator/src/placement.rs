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

use std::cmp::Ordering;
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
            Caller::User { super_user, roles, claims } => {
                hangar_core::principal::meets(*super_user, roles, claims, required_roles, required_claims)
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

/// Exact set membership as bits: each distinct key gets one of 64 bit positions for good
/// (never reused, so a bit always means the same key). Keys that come after the 64th get
/// none; hosts holding such keys are checked on their real data instead.
#[derive(Debug)]
struct Bits<K> {
    of: HashMap<K, u8>,
}

impl<K> Default for Bits<K> {
    fn default() -> Self {
        Bits { of: HashMap::new() }
    }
}

impl<K: std::hash::Hash + Eq> Bits<K> {
    fn get<Q>(&self, k: &Q) -> Option<u64>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.of.get(k).map(|b| 1u64 << b)
    }

    fn intern(&mut self, k: K) -> Option<u64> {
        if let Some(b) = self.of.get(&k) {
            return Some(1u64 << b);
        }
        let n = u8::try_from(self.of.len()).ok().filter(|n| *n < 64)?;
        self.of.insert(k, n);
        Some(1u64 << n)
    }
}

/// A cached image as a key: catalog id, version, architecture.
type ImageKey = (String, String, String);

/// The first 32 bytes of an id, zero-padded, as two big-endian numbers: orders like the id
/// itself whenever two prefixes differ (host ids are UUIDs: their first 32 characters
/// already differ).
fn id_prefix(id: &str) -> (u128, u128) {
    let mut b = [0u8; 32];
    for (d, s) in b.iter_mut().zip(id.bytes()) {
        *d = s;
    }
    let (hi, lo) = b.split_at(16);
    let num = |s: &[u8]| u128::from_be_bytes(s.try_into().unwrap_or([0; 16]));
    (num(hi), num(lo))
}

/// Architecture, coded for a cheap comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    X86_64 = 0,
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
/// ([`PlacementIndex`]).
#[derive(Debug, Clone)]
pub struct HostSlot {
    id_hash: u64,
    id_prefix: (u128, u128),
    available: ResourceSet,
    capacity: ResourceSet,
    /// The host's tags (lower-case) as bits of the index's tag set.
    tag_bits: u64,
    /// Some tag of the host has no bit.
    tags_overflow: bool,
    /// The host's cached images as bits of the index's image set.
    image_bits: u64,
    /// Some cached image of the host has no bit.
    images_overflow: bool,
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
    /// The snapshot of `host`, its tags and images coded in `tags` and `images`.
    fn of(host: &Host, tags: &mut Bits<String>, images: &mut Bits<ImageKey>) -> HostSlot {
        let mut s = HostSlot {
            id_hash: fnv(host.id.bytes(), FNV_OFFSET),
            id_prefix: id_prefix(&host.id),
            available: ResourceSet::default(),
            capacity: ResourceSet::default(),
            tag_bits: 0,
            tags_overflow: false,
            image_bits: 0,
            images_overflow: false,
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
        s.code_sets(tags, images);
        s.refresh_hot(host);
        s
    }

    /// Brings the snapshot up to date with `host` (the same host), sharing the rarely
    /// changing part (and its coded tags and images) when it did not change.
    fn refresh(&mut self, host: &Host, tags: &mut Bits<String>, images: &mut Bits<ImageKey>) {
        if !self.detail.describes(host) {
            self.detail = Arc::new(SlotDetail::of(host));
            self.id_hash = fnv(host.id.bytes(), FNV_OFFSET);
            self.id_prefix = id_prefix(&host.id);
            self.code_sets(tags, images);
        }
        self.refresh_hot(host);
    }

    fn code_sets(&mut self, tags: &mut Bits<String>, images: &mut Bits<ImageKey>) {
        let (mut tag_bits, mut tags_overflow) = (0, false);
        for t in &self.detail.tags {
            match tags.intern(t.to_ascii_lowercase()) {
                Some(b) => tag_bits |= b,
                None => tags_overflow = true,
            }
        }
        let (mut image_bits, mut images_overflow) = (0, false);
        for c in &self.detail.cached_images {
            match images.intern((c.catalog_id.clone(), c.version.clone(), c.architecture.clone())) {
                Some(b) => image_bits |= b,
                None => images_overflow = true,
            }
        }
        (self.tag_bits, self.tags_overflow, self.image_bits, self.images_overflow) =
            (tag_bits, tags_overflow, image_bits, images_overflow);
    }

    fn refresh_hot(&mut self, h: &Host) {
        let res = h.resources.unwrap_or_default();
        self.available = res.available;
        self.capacity = res.capacity();
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
/// change, remove on unregistration), grouped by architecture (`x86_64`, `arm64`, anything
/// else or not reported) so a placement scans only its architecture's group unless nothing
/// fits. Order is irrelevant: ties go by host id.
#[derive(Debug, Default)]
pub struct PlacementIndex {
    groups: [Vec<HostSlot>; 3],
    pos: HashMap<String, (usize, usize)>,
    tags: Bits<String>,
    images: Bits<ImageKey>,
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
        let PlacementIndex { groups, pos, tags, images } = self;
        let at = pos.get(&host.id).copied();
        if let Some((g, i)) = at
            && let Some(slot) = groups.get_mut(g).and_then(|v| v.get_mut(i))
        {
            slot.refresh(host, tags, images);
            if slot.arch as usize == g {
                return;
            }
            // Another architecture now: move it to its group.
            let slot = slot.clone();
            self.remove(&host.id);
            self.insert(slot);
            return;
        }
        let slot = HostSlot::of(host, tags, images);
        self.insert(slot);
    }

    fn insert(&mut self, slot: HostSlot) {
        let g = slot.arch as usize;
        if let Some(group) = self.groups.get_mut(g) {
            self.pos.insert(slot.detail.id.clone(), (g, group.len()));
            group.push(slot);
        }
    }

    /// Forgets a host.
    pub fn remove(&mut self, id: &str) {
        let Some((g, i)) = self.pos.remove(id) else { return };
        let Some(group) = self.groups.get_mut(g).filter(|v| i < v.len()) else { return };
        group.swap_remove(i);
        if let Some(moved) = group.get(i) {
            self.pos.insert(moved.detail.id.clone(), (g, i));
        }
    }

    /// Every snapshot.
    fn slots(&self) -> impl Iterator<Item = &HostSlot> {
        self.groups.iter().flatten()
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    /// Whether no host is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request with what the scan compares precomputed.
struct Prepared<'r> {
    request: &'r PlacementRequest,
    arch: Arch,
    /// Bits of the request's tags that have one.
    tag_mask: u64,
    /// Some requested tag has no bit (only hosts with tags beyond the 64th may have it).
    tags_unknown: bool,
    /// The image's bit; `None` when it has none (only hosts with images beyond the 64th
    /// may cache it).
    image_bit: Option<u64>,
    macos: bool,
    /// Holdings by id hash (sorted), verified by id.
    held: Vec<(u64, &'r str, HostReserved)>,
}

impl<'r> Prepared<'r> {
    fn new(request: &'r PlacementRequest, index: &PlacementIndex, reserved: &'r ReservedByHost) -> Self {
        let mut held: Vec<(u64, &str, HostReserved)> =
            reserved.iter().map(|(id, r)| (fnv(id.bytes(), FNV_OFFSET), id.as_str(), *r)).collect();
        held.sort_unstable_by_key(|e| e.0);
        let tag_bits: Vec<Option<u64>> = request.tags.iter().map(|t| index.tags.get(&t.to_ascii_lowercase())).collect();
        Prepared {
            request,
            arch: Arch::of(&request.architecture),
            tag_mask: tag_bits.iter().flatten().fold(0, |m, b| m | b),
            tags_unknown: tag_bits.iter().any(Option::is_none),
            image_bit: request.image.as_ref().and_then(|i| {
                index.images.get(&(i.catalog_id.clone(), i.version.clone(), request.architecture.clone()))
            }),
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
        match (&self.request.image, self.image_bit) {
            (None, _) => false,
            (Some(_), Some(bit)) => s.image_bits & bit != 0,
            (Some(img), None) => {
                s.images_overflow
                    && s.detail.cached_images.iter().any(|c| {
                        c.catalog_id == img.catalog_id
                            && c.version == img.version
                            && c.architecture == self.request.architecture
                    })
            }
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
    let index = PlacementIndex::build([host]);
    let p = Prepared::new(request, &index, &none);
    let slot = index.slots().next().ok_or(Reason::NoHardware)?;
    check_slot(&p, slot, || reserved).map(|(needs, load, _)| (needs, load.ppm()))
}

/// A host's load after placement, kept as used and capacity of CPU and memory so the scan
/// compares loads by multiplication; the parts per million (a division each) are worked
/// out only for the host that leads.
#[derive(Debug, Clone, Copy)]
struct Load {
    cpu: (u64, u64),
    memory: (u64, u64),
}

/// `used` of `cap` in parts per million (a host without capacity counts as full).
fn ppm(used: u64, cap: u64) -> u64 {
    used.saturating_mul(1_000_000).checked_div(cap).unwrap_or(1_000_000)
}

/// [`ppm`]`(used, cap)` compared with `b`, without dividing.
fn cmp_ppm(used: u64, cap: u64, b: u64) -> Ordering {
    if cap == 0 {
        return 1_000_000u64.cmp(&b);
    }
    let (x, c, b) = (u128::from(used.saturating_mul(1_000_000)), u128::from(cap), u128::from(b));
    // floor(x / c) < b  <=>  x < b * c;   floor(x / c) > b  <=>  x >= (b + 1) * c.
    if x < b * c {
        Ordering::Less
    } else if x >= (b + 1) * c {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

impl Load {
    /// The larger of CPU and memory load, in parts per million.
    fn ppm(&self) -> u64 {
        ppm(self.cpu.0, self.cpu.1).max(ppm(self.memory.0, self.memory.1))
    }

    /// [`Load::ppm`] compared with `b`, without dividing.
    fn cmp_ppm(&self, b: u64) -> Ordering {
        cmp_ppm(self.cpu.0, self.cpu.1, b).max(cmp_ppm(self.memory.0, self.memory.1, b))
    }
}

/// The filters over one snapshot, in the documented order; the reservations are looked up
/// only once the cheap filters passed. Returns the needs, the load after placement and
/// whether the host caches the image.
fn check_slot(
    p: &Prepared<'_>,
    s: &HostSlot,
    reserved: impl FnOnce() -> HostReserved,
) -> Result<(ResourceSet, Load, bool), Reason> {
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
    if p.tag_mask & !s.tag_bits != 0
        || (p.tags_unknown
            && !(s.tags_overflow
                && request.tags.iter().all(|t| s.detail.tags.iter().any(|h| h.eq_ignore_ascii_case(t)))))
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
    let (cpu_cap, memory_cap) = (u64::from(cap.cpu), cap.memory_mb);
    let load = Load {
        cpu: (cpu_cap.saturating_sub(u64::from(after.cpu)), cpu_cap),
        memory: (memory_cap.saturating_sub(after.memory_mb), memory_cap),
    };
    Ok((needs, load, cached))
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
    place_indexed(request, &PlacementIndex::build(hosts), reserved, profile)
}

/// [`place`] over the snapshots of an index (what the scheduler uses: the registry keeps
/// one in step with its views).
pub fn place_indexed(
    request: &PlacementRequest,
    index: &PlacementIndex,
    reserved: &ReservedByHost,
    profile: Profile,
) -> Result<Decision, NoCapacity> {
    let p = Prepared::new(request, index, reserved);
    // Hosts of another architecture never fit: look at the request's group first, and at
    // every host only to say why nothing fits.
    let group = match p.arch {
        Arch::Other => None,
        a => index.groups.get(a as usize),
    };
    let found = match group {
        Some(g) => scan(&p, g.iter(), profile),
        None => scan(&p, index.slots(), profile),
    };
    let (best, hosts, refused) = match found {
        (None, ..) if group.is_some() => scan(&p, index.slots(), profile),
        other => other,
    };
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

/// The best host: cached, load in parts per million, host and needs.
type Best<'a> = Option<(bool, u64, &'a HostSlot, ResourceSet)>;

/// Checks `slots`: the best host, how many were looked at and how many failed each filter.
fn scan<'a>(
    p: &Prepared<'_>,
    slots: impl Iterator<Item = &'a HostSlot>,
    profile: Profile,
) -> (Best<'a>, usize, [usize; REASONS.len()]) {
    let mut best: Best<'a> = None;
    let mut hosts = 0usize;
    let mut refused = [0usize; REASONS.len()];
    for s in slots {
        hosts += 1;
        match check_slot(p, s, || p.held_on(s)) {
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
                        } else {
                            match (load.cmp_ppm(*b_load), profile) {
                                (Ordering::Equal, _) => s.id_before(b),
                                (o, Profile::Spread) => o == Ordering::Less,
                                (o, Profile::Pack) => o == Ordering::Greater,
                            }
                        }
                    }
                };
                if better {
                    best = Some((cached, load.ppm(), s, needs));
                }
            }
        }
    }
    (best, hosts, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CachedImage, HostResources};

    fn host(id: &str, cpu: u32, memory_mb: u64) -> Host {
        let t = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        Host {
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
            ..Host::new(id, format!("name-{id}"), format!("http://{id}:8080/api"), t)
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
            let b = place_indexed(r, idx, &held, Profile::Spread);
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

    /// A host that reports another architecture moves group: requests for its new
    /// architecture find it, the old one's no longer do, and reasons still cover every host.
    #[test]
    fn hosts_follow_their_architecture_across_groups() {
        let mut hosts = vec![host("a", 8, 16_384), host("b", 16, 32_768), host("c", 8, 16_384)];
        hosts[2].architecture = None;
        let mut idx = PlacementIndex::build(&hosts);
        let held = ReservedByHost::new();
        let mut arm = ubuntu("24.04");
        arm.architecture = "arm64".into();
        let no = place_indexed(&arm, &idx, &held, Profile::Spread).unwrap_err();
        assert_eq!((no.hosts, no.count(Reason::Architecture), no.count(Reason::NoHardware)), (3, 2, 1));
        hosts[1].architecture = Some("arm64".into());
        idx.upsert(&hosts[1]);
        assert_eq!(place_indexed(&arm, &idx, &held, Profile::Spread).unwrap().host_id, "b");
        assert_eq!(place_indexed(&ubuntu("24.04"), &idx, &held, Profile::Spread).unwrap().host_id, "a");
        hosts[2].architecture = Some("riscv64".into());
        idx.upsert(&hosts[2]);
        let mut riscv = ubuntu("24.04");
        riscv.architecture = "riscv64".into();
        assert_eq!(place_indexed(&riscv, &idx, &held, Profile::Spread).unwrap().host_id, "c");
        idx.remove("b");
        assert_eq!(idx.len(), 2);
        let no = place_indexed(&arm, &idx, &held, Profile::Spread).unwrap_err();
        assert_eq!((no.hosts, no.count(Reason::Architecture)), (2, 2));
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
    /// Beyond 64 distinct tags or images, hosts are checked on their real data: still
    /// exact, case-insensitive for tags, and the cached host still comes first.
    #[test]
    fn tags_and_images_beyond_the_64th_are_still_exact() {
        let hosts: Vec<Host> = (0..70)
            .map(|i| {
                let mut h = caching(host(&format!("h{i:02}"), 8, 16_384), "img", &format!("v{i}"), "x86_64");
                h.tags.insert(format!("Tag-{i}"));
                h
            })
            .collect();
        let idx = PlacementIndex::build(&hosts);
        assert_eq!((idx.tags.of.len(), idx.images.of.len()), (64, 64));
        let held = ReservedByHost::new();
        for i in [3, 63, 64, 69] {
            let mut r = ubuntu("x");
            r.tags = [format!("tag-{i}")].into();
            let d = place_indexed(&r, &idx, &held, Profile::Spread).unwrap();
            assert_eq!(d.host_id, format!("h{i:02}"), "tag {i}");
            r.tags.clear();
            r.image = Some(ImageRef { catalog_id: "img".into(), version: format!("v{i}"), size_mb: None });
            let d = place_indexed(&r, &idx, &held, Profile::Pack).unwrap();
            assert_eq!((d.host_id, d.cached), (format!("h{i:02}"), true), "image {i}");
        }
        let mut r = ubuntu("x");
        r.tags = ["tag-70".to_string()].into();
        assert_eq!(place_indexed(&r, &idx, &held, Profile::Spread).unwrap_err().count(Reason::Tags), 70);
        r.tags = ["tag-1".to_string(), "tag-66".to_string()].into();
        assert_eq!(place_indexed(&r, &idx, &held, Profile::Spread).unwrap_err().count(Reason::Tags), 70);
    }

    proptest::proptest! {
        /// Comparing loads by multiplication agrees with comparing their parts per million.
        #[test]
        fn load_comparison_without_division_agrees(
            used in proptest::prop_oneof![0u64..300_000, proptest::num::u64::ANY],
            cap in proptest::prop_oneof![0u64..300_000, proptest::num::u64::ANY],
            b in proptest::prop_oneof![0u64..1_100_000, proptest::num::u64::ANY],
            near in proptest::bool::ANY,
        ) {
            // Often ask about the exact value and its neighbours.
            let b = if near { ppm(used, cap).saturating_add(b % 3).saturating_sub(1) } else { b };
            proptest::prop_assert_eq!(cmp_ppm(used, cap, b), ppm(used, cap).cmp(&b));
        }
    }
}
