//! The claim catalogue and the default roles, named as in the reference service so that
//! its clients and scripts keep working.

/// Role that passes every claim check.
pub const SUPER_USER_ROLE: &str = "SUPER_USER";
pub const ADMIN_ROLE: &str = "ADMIN";
pub const USER_ROLE: &str = "USER";
/// Holds only `METRICS_READ`: give it to the user whose API key Prometheus scrapes with.
pub const METRICS_ROLE: &str = "METRICS_READER";

/// The roles seeded at first start. They cannot be deleted.
pub const DEFAULT_ROLES: &[&str] = &[USER_ROLE, ADMIN_ROLE, SUPER_USER_ROLE, METRICS_ROLE];

macro_rules! claims {
    ($($name:ident),* $(,)?) => {
        $(pub const $name: &str = stringify!($name);)*
        /// Every system claim, seeded at first start. They cannot be deleted.
        pub const ALL_SYSTEM_CLAIMS: &[&str] = &[$($name),*];
    };
}

claims!(
    READ_ONLY,
    LIST,
    CREATE,
    DELETE,
    UPDATE,
    LIST_USER,
    CREATE_USER,
    DELETE_USER,
    UPDATE_USER,
    LIST_API_KEY,
    CREATE_API_KEY,
    DELETE_API_KEY,
    UPDATE_API_KEY,
    LIST_OWN_API_KEY,
    CREATE_OWN_API_KEY,
    DELETE_OWN_API_KEY,
    UPDATE_OWN_API_KEY,
    LIST_CLAIM,
    CREATE_CLAIM,
    DELETE_CLAIM,
    UPDATE_CLAIM,
    LIST_ROLE,
    CREATE_ROLE,
    DELETE_ROLE,
    UPDATE_ROLE,
    CREATE_VM,
    DELETE_VM,
    LIST_VM,
    UPDATE_VM_STATES,
    UPDATE_VM,
    EXECUTE_COMMAND_VM,
    CREATE_PACKER_TEMPLATE,
    DELETE_PACKER_TEMPLATE,
    LIST_PACKER_TEMPLATE,
    UPDATE_PACKER_TEMPLATE,
    CREATE_CATALOG_MANIFEST,
    DELETE_CATALOG_MANIFEST,
    LIST_CATALOG_MANIFEST,
    UPDATE_CATALOG_MANIFEST,
    PULL_CATALOG_MANIFEST,
    PUSH_CATALOG_MANIFEST,
    IMPORT_CATALOG_MANIFEST,
    LIST_REVERSE_PROXY_HOSTS,
    CREATE_REVERSE_PROXY_HOST,
    DELETE_REVERSE_PROXY_HOST,
    UPDATE_REVERSE_PROXY_HOST,
    LIST_REVERSE_PROXY_HOST_HTTP_ROUTES,
    CREATE_REVERSE_PROXY_HOST_HTTP_ROUTE,
    DELETE_REVERSE_PROXY_HOST_HTTP_ROUTE,
    UPDATE_REVERSE_PROXY_HOST_HTTP_ROUTE,
    LIST_REVERSE_PROXY_HOST_TCP_ROUTES,
    CREATE_REVERSE_PROXY_HOST_TCP_ROUTE,
    DELETE_REVERSE_PROXY_HOST_TCP_ROUTE,
    UPDATE_REVERSE_PROXY_HOST_TCP_ROUTE,
    CONFIGURE_REVERSE_PROXY,
    EXECUTE_SSH,
    LIST_CACHE,
    DELET_CACHE_ITEM,
    DELETE_ALL_CACHE,
    JOB_MANAGER_LIST,
    JOB_MANAGER_LIST_OWN,
    JOB_MANAGER_DELETE,
    JOB_MANAGER_DEBUG,
    CATALOG_MANAGER_LIST,
    CATALOG_MANAGER_LIST_OWN,
    CATALOG_MANAGER_CREATE,
    CATALOG_MANAGER_CREATE_OWN,
    CATALOG_MANAGER_UPDATE,
    CATALOG_MANAGER_UPDATE_OWN,
    CATALOG_MANAGER_DELETE,
    CATALOG_MANAGER_DELETE_OWN,
    CATALOG_MANAGER_LIST_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_CREATE_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_DELETE_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_UPDATE_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_PULL_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_PUSH_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_IMPORT_CATALOG_MANIFEST_OWN,
    CREATE_SNAPSHOT_VM,
    CREATE_OWN_VM_SNAPSHOT,
    DELETE_SNAPSHOT_VM,
    DELETE_OWN_VM_SNAPSHOT,
    DELETE_ALL_SNAPSHOTS_VM,
    DELETE_ALL_OWN_VM_SNAPSHOTS,
    LIST_SNAPSHOT_VM,
    LIST_OWN_VM_SNAPSHOT,
    REVERT_SNAPSHOT_VM,
    REVERT_OWN_VM_SNAPSHOT,
    // Hangar additions.
    LIST_ORCHESTRATOR_HOSTS,
    MANAGE_ORCHESTRATOR_HOSTS,
    LIST_EVENTS_SYSTEM,
    // Act on VMs owned by other users (stop, exec, delete, ...); without it a VM claim
    // reaches only the caller's own VMs.
    MANAGE_ALL_VMS,
    // See VMs owned by other users (list, get, status); without it (or MANAGE_ALL_VMS) a
    // LIST_VM holder sees its own VMs only.
    LIST_ALL_VMS,
    // Read `/metrics` (Prometheus); ADMIN, SUPER_USER and METRICS_READER hold it.
    METRICS_READ,
    // Runner pools and warm pools (`/runner-pools`): read them, and create, edit or delete them.
    RUNNER_POOLS_READ,
    RUNNER_POOLS_WRITE,
);

/// Claims of the default USER role. Unlike the reference, a plain user cannot wipe the
/// host's catalog cache (no `DELET_CACHE_ITEM`/`DELETE_ALL_CACHE`) and holds the
/// `*_OWN_API_KEY` claims, which the API-key routes accept on their own.
pub const DEFAULT_USER_CLAIMS: &[&str] = &[
    READ_ONLY,
    LIST,
    LIST_CATALOG_MANIFEST,
    LIST_PACKER_TEMPLATE,
    LIST_VM,
    LIST_CACHE,
    CATALOG_MANAGER_LIST_OWN,
    CATALOG_MANAGER_CREATE_OWN,
    CATALOG_MANAGER_UPDATE_OWN,
    CATALOG_MANAGER_DELETE_OWN,
    CATALOG_MANAGER_LIST_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_CREATE_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_DELETE_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_UPDATE_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_PULL_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_PUSH_CATALOG_MANIFEST_OWN,
    CATALOG_MANAGER_IMPORT_CATALOG_MANIFEST_OWN,
    JOB_MANAGER_LIST_OWN,
    CREATE_OWN_VM_SNAPSHOT,
    DELETE_OWN_VM_SNAPSHOT,
    DELETE_ALL_OWN_VM_SNAPSHOTS,
    LIST_OWN_VM_SNAPSHOT,
    REVERT_OWN_VM_SNAPSHOT,
    LIST_OWN_API_KEY,
    CREATE_OWN_API_KEY,
    DELETE_OWN_API_KEY,
    UPDATE_OWN_API_KEY,
];

/// Claims of a role, for the seeded roles. ADMIN holds every claim; SUPER_USER also
/// holds every claim and in addition passes every check.
pub fn default_role_claims(role: &str) -> Vec<&'static str> {
    match role {
        USER_ROLE => DEFAULT_USER_CLAIMS.to_vec(),
        ADMIN_ROLE | SUPER_USER_ROLE => ALL_SYSTEM_CLAIMS.to_vec(),
        METRICS_ROLE => vec![METRICS_READ],
        _ => Vec::new(),
    }
}

/// UI metadata for a claim, as the reference's `/auth/claims/grouped` shows it:
/// `(group, resource, action)`, derived from the claim's name.
pub fn claim_metadata(name: &str) -> (String, String, String) {
    const ACTIONS: &[&str] = &[
        "LIST",
        "CREATE",
        "DELETE",
        "UPDATE",
        "EXECUTE",
        "PULL",
        "PUSH",
        "IMPORT",
        "REVERT",
        "CONFIGURE",
        "READ",
        "MANAGE",
        "DELET",
    ];
    let words: Vec<&str> = name.split('_').collect();
    let (action, rest): (&str, Vec<&str>) = match words.iter().position(|w| ACTIONS.contains(w)) {
        Some(i) => {
            let mut rest = words.clone();
            let a = rest.remove(i);
            (a, rest)
        }
        None => ("ACCESS", words.clone()),
    };
    let rest: Vec<&str> = rest.into_iter().filter(|w| *w != "OWN" && *w != "ALL").collect();
    let resource = if rest.is_empty() { "SYSTEM".to_string() } else { rest.join("_") };
    let group = if name.starts_with("CATALOG_MANAGER") {
        "CATALOG_MANAGER"
    } else if name.contains("CATALOG") {
        "CATALOG"
    } else if name.contains("REVERSE_PROXY") {
        "REVERSE_PROXY"
    } else if name.contains("SNAPSHOT") || name.ends_with("_VM") || name.contains("VM_") {
        "VIRTUAL_MACHINES"
    } else if name.contains("ORCHESTRATOR") {
        "ORCHESTRATOR"
    } else if name.starts_with("RUNNER") {
        "RUNNERS"
    } else if name.starts_with("JOB_MANAGER") {
        "JOBS"
    } else if name.contains("CACHE") {
        "CACHE"
    } else if name.contains("PACKER") {
        "PACKER"
    } else if ["USER", "ROLE", "CLAIM", "API_KEY"].iter().any(|w| name.contains(w)) {
        "AUTH"
    } else {
        "SYSTEM"
    };
    (group.into(), resource, if action == "DELET" { "DELETE".into() } else { action.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_has_no_duplicates_and_covers_defaults() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ALL_SYSTEM_CLAIMS {
            assert!(seen.insert(*c), "duplicate claim {c}");
        }
        for c in DEFAULT_USER_CLAIMS {
            assert!(seen.contains(c), "USER claim {c} is not a system claim");
        }
        assert!(seen.contains(CONFIGURE_REVERSE_PROXY));
    }

    #[test]
    fn metadata_is_derived_from_the_name() {
        assert_eq!(claim_metadata("LIST_OWN_API_KEY"), ("AUTH".into(), "API_KEY".into(), "LIST".into()));
        assert_eq!(claim_metadata("DELET_CACHE_ITEM"), ("CACHE".into(), "CACHE_ITEM".into(), "DELETE".into()));
        assert_eq!(claim_metadata("CREATE_VM").0, "VIRTUAL_MACHINES");
    }
}
