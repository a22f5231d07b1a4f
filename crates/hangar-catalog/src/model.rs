//! The catalog's records and the inputs of its operations.
//!
//! No type here holds a provider secret: connection strings live only in
//! [`StoredProvider::sealed`] (encrypted) and in request inputs, which are
//! never serialised back.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use hangar_core::Principal;
use serde::{Deserialize, Serialize};

use crate::arch::Architecture;

/// Store collection of manifests.
pub const MANIFESTS: &str = "catalog_manifests";
/// Store collection of provider connections (sealed).
pub const PROVIDERS: &str = "catalog_providers";
/// Store collection of the host cache's items.
pub const CACHE_ITEMS: &str = "catalog_cache_items";

/// What a VM image needs at least. Memory and disk in MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinimumRequirements {
    /// Virtual CPUs.
    #[serde(default)]
    pub cpu: u32,
    /// Memory, MiB.
    #[serde(default)]
    pub memory: u64,
    /// Disk, MiB.
    #[serde(default)]
    pub disk: u64,
}

/// One catalog entry: an image of `catalog_id` at `version` for
/// `architecture`, whose chunks and image manifest are in a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// `<catalog id, lower case>/<version>/<architecture>`.
    pub id: String,
    /// Catalog id as first pushed.
    pub catalog_id: String,
    /// `<catalog_id>-<architecture>-<version>`, as the reference names it.
    pub name: String,
    /// Version name.
    pub version: String,
    /// Architecture.
    pub architecture: Architecture,
    /// Free text.
    pub description: String,
    /// VM type (`pvm`, `macvm`, `qemu`, ...).
    pub vm_type: String,
    /// Labels.
    pub tags: Vec<String>,
    /// A caller must hold every one of these roles to see or pull it.
    pub required_roles: Vec<String>,
    /// A caller must hold every one of these claims to see or pull it.
    pub required_claims: Vec<String>,
    /// What a VM made from it needs.
    pub minimum_requirements: Option<MinimumRequirements>,
    /// The provider record holding the bytes.
    pub provider_id: String,
    /// Provider kind (`aws-s3`, `local-storage`, ...).
    pub provider_type: String,
    /// Key of the image manifest in the provider.
    pub manifest_key: String,
    /// `manifest_hash` of the image manifest registered.
    pub image_hash: String,
    /// Logical size of the image in bytes.
    pub size: u64,
    /// Stored (compressed, deduplicated) size of its chunks.
    pub pack_size: u64,
    /// Number of distinct chunks.
    pub chunk_count: u64,
    /// Number of files.
    pub file_count: u64,
    /// Who registered it (user id).
    pub owner: String,
    /// When it was first registered.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Last pull.
    pub last_downloaded_at: Option<DateTime<Utc>>,
    /// Username of the last puller.
    pub last_downloaded_user: Option<String>,
    /// Number of pulls.
    pub download_count: u64,
    /// Not pullable until untainted.
    pub tainted: bool,
    /// Who tainted it.
    pub tainted_by: Option<String>,
    /// When.
    pub tainted_at: Option<DateTime<Utc>>,
    /// Why.
    pub taint_reason: Option<String>,
    /// Who last untainted it.
    pub untainted_by: Option<String>,
    /// Not pullable, ever.
    pub revoked: bool,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// When.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Where it came from when imported from a reference catalog.
    pub imported_from: Option<String>,
}

impl Manifest {
    /// Whether `p` may see (and so use) this manifest: a super user always;
    /// anyone else must hold every required role and claim.
    pub fn visible_to(&self, p: &Principal) -> bool {
        visible(p, &self.required_roles, &self.required_claims)
    }

    /// Why it cannot be pulled, if it cannot.
    pub fn unpullable_reason(&self) -> Option<String> {
        if self.revoked {
            return Some(format!(
                "{} {} ({}) was revoked by {} and can no longer be pulled",
                self.catalog_id,
                self.version,
                self.architecture,
                self.revoked_by.as_deref().unwrap_or("an administrator")
            ));
        }
        if self.tainted {
            let why = self.taint_reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            return Some(format!(
                "{} {} ({}) is tainted by {}{why}; it cannot be pulled until it is untainted",
                self.catalog_id,
                self.version,
                self.architecture,
                self.tainted_by.as_deref().unwrap_or("an administrator")
            ));
        }
        None
    }
}

/// The visibility rule (see [`Manifest::visible_to`]).
pub fn visible(p: &Principal, roles: &[String], claims: &[String]) -> bool {
    p.meets(roles, claims)
}

/// A provider connection: the connection string, sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProvider {
    /// Keyed hash of the connection string.
    pub id: String,
    /// Provider kind.
    pub provider_type: String,
    /// `base64(nonce ‖ AES-256-GCM ciphertext)`; see [`crate::sealer`].
    pub sealed: String,
    /// When first stored.
    pub created_at: DateTime<Utc>,
}

/// An image in this host's cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheItem {
    /// Same as the manifest's id.
    pub id: String,
    /// Catalog id.
    pub catalog_id: String,
    /// Version.
    pub version: String,
    /// Architecture.
    pub architecture: Architecture,
    /// The image manifest hash the folder was built from.
    pub image_hash: String,
    /// The image folder.
    pub path: String,
    /// Logical size.
    pub size: u64,
    /// When it was pulled.
    pub cached_at: DateTime<Utc>,
    /// Last use.
    pub last_used_at: DateTime<Utc>,
    /// Number of uses.
    pub used_count: u64,
}

/// What registering a pushed image needs.
#[derive(Clone, Default, Deserialize)]
pub struct NewManifest {
    /// Catalog id.
    pub catalog_id: String,
    /// Version (must not be `latest`-resolved: it is stored as given).
    pub version: String,
    /// Architecture (aliases accepted).
    pub architecture: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// VM type.
    #[serde(default)]
    pub vm_type: Option<String>,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Required roles.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Required claims.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Minimum requirements.
    #[serde(default)]
    pub minimum_requirements: Option<MinimumRequirements>,
    /// The provider connection string the chunks were pushed to.
    pub connection: String,
    /// Replace an existing manifest with the same id, version and
    /// architecture (refused when it is revoked).
    #[serde(default)]
    pub overwrite: bool,
}

impl std::fmt::Debug for NewManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewManifest")
            .field("catalog_id", &self.catalog_id)
            .field("version", &self.version)
            .field("architecture", &self.architecture)
            .field("connection", &"****")
            .finish_non_exhaustive()
    }
}

/// A change to a manifest's lists or metadata.
#[derive(Debug, Clone, Default)]
pub struct MetadataUpdate {
    /// New description.
    pub description: Option<String>,
    /// New minimum requirements.
    pub minimum_requirements: Option<MinimumRequirements>,
    /// New VM type.
    pub vm_type: Option<String>,
}

/// Which list a patch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListField {
    /// `tags`.
    Tags,
    /// `required_roles`.
    Roles,
    /// `required_claims`.
    Claims,
}

impl ListField {
    /// Field name in records and audit details.
    pub fn as_str(&self) -> &'static str {
        match self {
            ListField::Tags => "tags",
            ListField::Roles => "required_roles",
            ListField::Claims => "required_claims",
        }
    }
}

/// What a pull resolves to: the manifest and its image manifest's bytes.
#[derive(Debug, Clone)]
pub struct PullTicket {
    /// The catalog manifest (after counting this download).
    pub manifest: Manifest,
    /// The image manifest, as stored (JSON, self-checking).
    pub image_manifest: bytes::Bytes,
}

/// A set of names, normalised (trimmed, upper case for roles and claims).
pub(crate) fn normalise_names(kind: &str, names: &[String], upper: bool) -> Result<Vec<String>, String> {
    let mut out = BTreeSet::new();
    for n in names {
        for part in n.split(',') {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            let p = if upper { p.to_ascii_uppercase().replace(['-', ' '], "_") } else { p.to_string() };
            let ok = p.len() <= 64
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:/ ".contains(c))
                && (!upper || p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if !ok {
                return Err(format!("{kind} {part:?} is invalid: use up to 64 letters, digits, '_', '-', '.'"));
            }
            out.insert(p);
        }
    }
    if out.len() > 64 {
        return Err(format!("at most 64 {kind}s"));
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use hangar_core::AuthMethod;

    use super::*;

    fn p(roles: &[&str], claims: &[&str]) -> Principal {
        Principal {
            user_id: "u".into(),
            username: "u".into(),
            email: "u@x".into(),
            roles: roles.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            claims: claims.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            method: AuthMethod::Jwt,
        }
    }

    #[test]
    fn visibility_needs_every_required_role_and_claim() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // (caller roles, caller claims, required roles, required claims, visible)
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a [&'a str], bool);
        let cases: &[Case] = &[
            (&["USER"], &[], &[], &[], true),
            (&["USER"], &["A"], &[], &["A"], true),
            (&["USER"], &[], &[], &["A"], false),
            (&["USER"], &["A"], &[], &["A", "B"], false),
            (&["USER"], &["A", "B", "C"], &[], &["A", "B"], true),
            (&["USER"], &["A"], &["QA"], &["A"], false),
            (&["USER", "QA"], &["A"], &["QA"], &["A"], true),
            (&["QA"], &[], &["QA"], &[], true),
            // A claim named like a role does not count as the role, and vice versa.
            (&["USER"], &["QA"], &["QA"], &[], false),
            (&["A"], &[], &[], &["A"], false),
            (&["SUPER_USER"], &[], &["QA"], &["A", "B"], true),
        ];
        for (roles, claims, req_roles, req_claims, want) in cases {
            assert_eq!(
                visible(&p(roles, claims), &s(req_roles), &s(req_claims)),
                *want,
                "caller {roles:?}/{claims:?} vs required {req_roles:?}/{req_claims:?}"
            );
        }
    }

    #[test]
    fn names_are_normalised_and_checked() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(normalise_names("claim", &v(&["team-a", " TEAM_A ", "b,c"]), true).unwrap(), ["B", "C", "TEAM_A"]);
        assert_eq!(normalise_names("tag", &v(&["CI", "ci", "linux"]), false).unwrap(), ["CI", "ci", "linux"]);
        assert!(normalise_names("claim", &v(&["a.b"]), true).is_err());
        assert!(normalise_names("tag", &v(&["<script>"]), false).is_err());
    }
}
