//! What can be done to a VM, and who may do it: one closed list of actions with one table
//! of the claims each needs and the one ownership rule. The host module and the
//! orchestrator both decide with [`authorize`]; the HTTP layer declares each route's
//! [`Access`] from [`VmAction::access`], so a route and the service never disagree.

use serde::{Deserialize, Serialize};

use crate::access::Access;
use crate::claims::*;
use crate::principal::Principal;

/// Every operation on a VM, on a host or through the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    List,
    Get,
    Status,
    Create,
    Register,
    Unregister,
    Delete,
    Start,
    Stop,
    Kill,
    Restart,
    Pause,
    Resume,
    Suspend,
    Reset,
    Set,
    Execute,
    Upload,
    Rename,
    Clone,
    PortForward,
    Extend,
    SnapshotList,
    SnapshotCreate,
    SnapshotDelete,
    SnapshotDeleteAll,
    SnapshotRevert,
}

/// Why a caller may not act on a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmDenied {
    /// The caller lacks the action's claim altogether.
    #[error("This needs {0}")]
    Claim(String),
    /// The VM belongs to someone else and the caller lacks the claim for others' VMs.
    #[error("VM {vm} is not yours; this needs {claim}")]
    NotOwner { vm: String, claim: &'static str },
    /// Only a SUPER_USER may create or register a VM for another owner.
    #[error("Only a SUPER_USER can create a VM for another owner")]
    OtherOwner,
}

impl crate::Classify for VmDenied {
    fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Forbidden
    }
}

impl VmAction {
    /// Every action, for tables and tests.
    pub const ALL: &'static [VmAction] = &[
        VmAction::List,
        VmAction::Get,
        VmAction::Status,
        VmAction::Create,
        VmAction::Register,
        VmAction::Unregister,
        VmAction::Delete,
        VmAction::Start,
        VmAction::Stop,
        VmAction::Kill,
        VmAction::Restart,
        VmAction::Pause,
        VmAction::Resume,
        VmAction::Suspend,
        VmAction::Reset,
        VmAction::Set,
        VmAction::Execute,
        VmAction::Upload,
        VmAction::Rename,
        VmAction::Clone,
        VmAction::PortForward,
        VmAction::Extend,
        VmAction::SnapshotList,
        VmAction::SnapshotCreate,
        VmAction::SnapshotDelete,
        VmAction::SnapshotDeleteAll,
        VmAction::SnapshotRevert,
    ];

    /// The name in audit actions (`vm.<name>`) and messages.
    pub fn name(self) -> &'static str {
        match self {
            VmAction::List => "list",
            VmAction::Get => "get",
            VmAction::Status => "status",
            VmAction::Create => "create",
            VmAction::Register => "register",
            VmAction::Unregister => "unregister",
            VmAction::Delete => "delete",
            VmAction::Start => "start",
            VmAction::Stop => "stop",
            VmAction::Kill => "kill",
            VmAction::Restart => "restart",
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
            VmAction::Suspend => "suspend",
            VmAction::Reset => "reset",
            VmAction::Set => "set",
            VmAction::Execute => "execute",
            VmAction::Upload => "upload",
            VmAction::Rename => "rename",
            VmAction::Clone => "clone",
            VmAction::PortForward => "port_forward",
            VmAction::Extend => "extend",
            VmAction::SnapshotList => "snapshot.list",
            VmAction::SnapshotCreate => "snapshot.create",
            VmAction::SnapshotDelete => "snapshot.delete",
            VmAction::SnapshotDeleteAll => "snapshot.delete_all",
            VmAction::SnapshotRevert => "snapshot.revert",
        }
    }

    /// The audit action of a change (`vm.stop`, `vm.snapshot.create`, ...).
    pub fn audit_action(self) -> String {
        format!("vm.{}", self.name())
    }

    /// What a caller needs to call the action at all (the route's declared access).
    pub fn access(self) -> Access {
        match self {
            VmAction::List | VmAction::Get | VmAction::Status => Access::AllOf(&[LIST_VM]),
            VmAction::Create | VmAction::Register | VmAction::Clone => Access::AllOf(&[CREATE_VM]),
            VmAction::Delete => Access::AllOf(&[DELETE_VM]),
            VmAction::Unregister | VmAction::Set | VmAction::Upload | VmAction::Rename | VmAction::Extend => {
                Access::AllOf(&[UPDATE_VM])
            }
            VmAction::Start
            | VmAction::Stop
            | VmAction::Kill
            | VmAction::Restart
            | VmAction::Pause
            | VmAction::Resume
            | VmAction::Suspend
            | VmAction::Reset => Access::AllOf(&[UPDATE_VM_STATES]),
            VmAction::Execute | VmAction::PortForward => Access::AllOf(&[EXECUTE_COMMAND_VM]),
            VmAction::SnapshotList => Access::AnyOf(&[LIST_SNAPSHOT_VM, LIST_OWN_VM_SNAPSHOT]),
            VmAction::SnapshotCreate => Access::AnyOf(&[CREATE_SNAPSHOT_VM, CREATE_OWN_VM_SNAPSHOT]),
            VmAction::SnapshotDelete => Access::AnyOf(&[DELETE_SNAPSHOT_VM, DELETE_OWN_VM_SNAPSHOT]),
            VmAction::SnapshotDeleteAll => Access::AnyOf(&[DELETE_ALL_SNAPSHOTS_VM, DELETE_ALL_OWN_VM_SNAPSHOTS]),
            VmAction::SnapshotRevert => Access::AnyOf(&[REVERT_SNAPSHOT_VM, REVERT_OWN_VM_SNAPSHOT]),
        }
    }

    /// The claim that lets its holder act on VMs that are not theirs; `None` for the
    /// actions that are not about one existing VM's contents (listing, reading, creating).
    /// Reads are owner-scoped too (unlike the reference, where any `LIST_VM` holder sees
    /// every VM): others' VMs need `LIST_ALL_VMS` (or `MANAGE_ALL_VMS`, see [`authorize`]).
    pub fn others_claim(self) -> Option<&'static str> {
        match self {
            // A list is filtered by the same rule ([`may_see_vm`]).
            VmAction::Get | VmAction::Status => Some(LIST_ALL_VMS),
            VmAction::List | VmAction::Create | VmAction::Register => None,
            VmAction::SnapshotList => Some(LIST_SNAPSHOT_VM),
            VmAction::SnapshotCreate => Some(CREATE_SNAPSHOT_VM),
            VmAction::SnapshotDelete => Some(DELETE_SNAPSHOT_VM),
            VmAction::SnapshotDeleteAll => Some(DELETE_ALL_SNAPSHOTS_VM),
            VmAction::SnapshotRevert => Some(REVERT_SNAPSHOT_VM),
            _ => Some(MANAGE_ALL_VMS),
        }
    }

    /// Whether the action changes something (and so is written to the audit log).
    pub fn is_change(self) -> bool {
        !matches!(self, VmAction::List | VmAction::Get | VmAction::Status | VmAction::SnapshotList)
    }
}

/// The one rule: the caller holds the action's claim, and for an action on one VM either
/// owns it (`owner` is its Hangar owner, `None` when Hangar never recorded one) or holds
/// the action's claim for others' VMs. SUPER_USER passes every check.
pub fn authorize(p: &Principal, action: VmAction, vm: &str, owner: Option<&str>) -> Result<(), VmDenied> {
    let access = action.access();
    if !matches!(access.check(Some(p)), crate::Decision::Allow) {
        return Err(VmDenied::Claim(access.describe()));
    }
    match action.others_claim() {
        None => Ok(()),
        Some(_) if owner == Some(p.username.as_str()) => Ok(()),
        Some(claim) if p.has_claim(claim) => Ok(()),
        // Who may act on others' VMs may also see them.
        Some(LIST_ALL_VMS) if p.has_claim(MANAGE_ALL_VMS) => Ok(()),
        Some(claim) => Err(VmDenied::NotOwner { vm: vm.to_string(), claim }),
    }
}

/// Whether a list shows `p` a VM owned by `owner` (`None`: Hangar never recorded one): the
/// same rule as [`authorize`] for [`VmAction::Get`], for filtering lists and events.
pub fn may_see_vm(p: &Principal, owner: Option<&str>) -> bool {
    authorize(p, VmAction::Get, "", owner).is_ok()
}

/// The owner of a VM a caller creates or registers: the caller, unless it names another
/// owner, which only a SUPER_USER may.
pub fn owner_for(p: &Principal, requested: Option<&str>) -> Result<String, VmDenied> {
    match requested.map(str::trim).filter(|o| !o.is_empty()) {
        Some(o) if o != p.username && !p.is_super_user() => Err(VmDenied::OtherOwner),
        Some(o) => Ok(o.to_string()),
        None => Ok(p.username.clone()),
    }
}

/// Whether a caller may see a job (host or orchestrator): its own, or all with
/// `JOB_MANAGER_LIST`.
pub fn may_see_job(p: &Principal, job_owner_id: &str) -> bool {
    p.has_claim(JOB_MANAGER_LIST) || job_owner_id == p.user_id
}

/// Whether a caller may delete a job: its own, or any with `JOB_MANAGER_DELETE`.
pub fn may_delete_job(p: &Principal, job_owner_id: &str) -> bool {
    p.has_claim(JOB_MANAGER_DELETE) || job_owner_id == p.user_id
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::principal::AuthMethod;

    fn user(name: &str, roles: &[&str], claims: &[&str]) -> Principal {
        Principal {
            user_id: format!("id-{name}"),
            username: name.into(),
            email: format!("{name}@x"),
            roles: roles.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            claims: claims.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            method: AuthMethod::Jwt,
        }
    }

    #[test]
    fn owners_act_on_their_vms_and_others_need_the_all_claim() {
        let alice = user("alice", &[], &[UPDATE_VM_STATES]);
        assert_eq!(authorize(&alice, VmAction::Stop, "v", Some("alice")), Ok(()));
        assert!(matches!(authorize(&alice, VmAction::Stop, "v", Some("bob")), Err(VmDenied::NotOwner { .. })));
        assert!(matches!(authorize(&alice, VmAction::Stop, "v", None), Err(VmDenied::NotOwner { .. })));
        assert!(matches!(authorize(&alice, VmAction::Delete, "v", Some("alice")), Err(VmDenied::Claim(_))));
        let ops = user("ops", &[], &[UPDATE_VM_STATES, MANAGE_ALL_VMS]);
        assert_eq!(authorize(&ops, VmAction::Stop, "v", Some("bob")), Ok(()));
        let root = user("root", &[SUPER_USER_ROLE], &[]);
        for a in VmAction::ALL {
            assert_eq!(authorize(&root, *a, "v", Some("bob")), Ok(()), "{a:?}");
        }
    }

    #[test]
    fn own_snapshot_claims_reach_only_own_vms() {
        let alice = user("alice", &[], &[CREATE_OWN_VM_SNAPSHOT]);
        assert_eq!(authorize(&alice, VmAction::SnapshotCreate, "v", Some("alice")), Ok(()));
        assert!(authorize(&alice, VmAction::SnapshotCreate, "v", Some("bob")).is_err());
        let all = user("ops", &[], &[CREATE_SNAPSHOT_VM]);
        assert_eq!(authorize(&all, VmAction::SnapshotCreate, "v", Some("bob")), Ok(()));
    }

    #[test]
    fn reads_are_owner_scoped_and_other_owners_need_super_user() {
        let alice = user("alice", &[], &[LIST_VM, CREATE_VM]);
        assert_eq!(authorize(&alice, VmAction::Get, "v", Some("alice")), Ok(()));
        assert!(authorize(&alice, VmAction::Get, "v", Some("bob")).is_err());
        assert!(authorize(&alice, VmAction::Status, "v", None).is_err());
        assert_eq!(authorize(&alice, VmAction::List, "", None), Ok(()));
        assert!(may_see_vm(&alice, Some("alice")) && !may_see_vm(&alice, Some("bob")) && !may_see_vm(&alice, None));
        for claim in [LIST_ALL_VMS, MANAGE_ALL_VMS] {
            let auditor = user("auditor", &[], &[LIST_VM, claim]);
            assert!(may_see_vm(&auditor, Some("bob")) && may_see_vm(&auditor, None), "{claim}");
            assert_eq!(authorize(&auditor, VmAction::Status, "v", Some("bob")), Ok(()));
        }
        assert_eq!(owner_for(&alice, None), Ok("alice".into()));
        assert_eq!(owner_for(&alice, Some("alice")), Ok("alice".into()));
        assert_eq!(owner_for(&alice, Some("root")), Err(VmDenied::OtherOwner));
        let root = user("root", &[SUPER_USER_ROLE], &[]);
        assert_eq!(owner_for(&root, Some("alice")), Ok("alice".into()));
    }

    #[test]
    fn one_job_rule_for_seeing_and_deleting() {
        let alice = user("alice", &[], &[JOB_MANAGER_LIST_OWN]);
        assert!(may_see_job(&alice, "id-alice") && may_delete_job(&alice, "id-alice"));
        assert!(!may_see_job(&alice, "id-bob") && !may_delete_job(&alice, "id-bob"));
        let deleter = user("d", &[], &[JOB_MANAGER_DELETE]);
        assert!(!may_see_job(&deleter, "id-bob") && may_delete_job(&deleter, "id-bob"));
    }
}
