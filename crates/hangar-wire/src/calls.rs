//! The one VM command path between processes: a [`VmCall`] is what a client asks of one
//! VM. The host runs it (`hangar_host::Host::run`); the orchestrator finds the VM's host,
//! checks the same rule and forwards the same call ([`VmCall::request`]), and reads the
//! host's answer back as the same [`VmReply`] ([`VmCall::read_reply`]).

use std::time::Duration;

use hangar_core::VmAction;
use hangar_core::path_segment as seg;
use hangar_hypervisor::PowerOp;
use serde::Serialize;
use serde_json::Value;

use crate::machines::{
    CloneRequest, CloneResponse, CreateSnapshotRequest, ExecuteRequest, ExecuteResponse, Machine, MachineStatus,
    RenameRequest, RevertRequest, SetRequest, SetResponse, SnapshotDto, UploadRequest,
};
use crate::orchestrator::{FleetMachine, PowerDone};

/// What can be asked of one existing VM.
#[derive(Debug, Clone, PartialEq)]
pub enum VmCall {
    Get,
    Status,
    Power(PowerOp),
    Delete {
        force: bool,
    },
    Unregister,
    Execute(ExecuteRequest),
    /// Copy a file already on the host (inside its upload folder) into the guest.
    Upload(UploadRequest),
    Rename(RenameRequest),
    Clone(CloneRequest),
    Set(SetRequest),
    SnapshotList,
    SnapshotCreate(CreateSnapshotRequest),
    SnapshotDelete {
        snapshot_id: String,
        delete_children: bool,
    },
    SnapshotDeleteAll,
    SnapshotRevert {
        snapshot_id: String,
        request: RevertRequest,
    },
}

/// A call as an HTTP request to a host's API (path below the API prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCall {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Value>,
    /// How long the host may take to answer.
    pub timeout: Duration,
}

/// What a call answers, whichever process ran it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum VmReply {
    Machine(Box<Machine>),
    Status(MachineStatus),
    Exec(ExecuteResponse),
    Clone(CloneResponse),
    Set(SetResponse),
    Snapshots(Vec<SnapshotDto>),
    Snapshot(Option<SnapshotDto>),
    /// A VM as the orchestrator shows it (its `Get` through the fleet).
    Fleet(Box<FleetMachine>),
    /// A power operation through the orchestrator.
    Power(PowerDone),
    /// No body (the route answers 202 or 204).
    Done,
}

/// The verb of a power operation, as the host routes name it.
pub fn power_verb(op: &PowerOp) -> &'static str {
    match op {
        PowerOp::Start => "start",
        PowerOp::Stop { .. } => "stop",
        PowerOp::Kill => "kill",
        PowerOp::Restart => "restart",
        PowerOp::Pause => "pause",
        PowerOp::Resume => "resume",
        PowerOp::Suspend => "suspend",
        PowerOp::Reset => "reset",
    }
}

fn to_json<T: Serialize>(v: &T) -> Option<Value> {
    serde_json::to_value(v).ok()
}

impl HttpCall {
    /// The same request through an orchestrator, which mounts every VM route of a host
    /// under `/orchestrator` (`/orchestrator/machines/{id}/...`) and finds the VM's host.
    pub fn via_orchestrator(mut self) -> HttpCall {
        self.path = format!("/orchestrator{}", self.path);
        self
    }
}

impl VmCall {
    /// Stop the VM: ACPI power-down, or at once with `force`. The grace period is the
    /// host's own (it is not part of the request), so the one given here is only nominal.
    pub fn stop(force: bool) -> VmCall {
        VmCall::Power(PowerOp::Stop { force, timeout: Duration::from_secs(60) })
    }

    /// The action of the access table this call is checked as.
    pub fn action(&self) -> VmAction {
        match self {
            VmCall::Get => VmAction::Get,
            VmCall::Status => VmAction::Status,
            VmCall::Power(op) => match op {
                PowerOp::Start => VmAction::Start,
                PowerOp::Stop { .. } => VmAction::Stop,
                PowerOp::Kill => VmAction::Kill,
                PowerOp::Restart => VmAction::Restart,
                PowerOp::Pause => VmAction::Pause,
                PowerOp::Resume => VmAction::Resume,
                PowerOp::Suspend => VmAction::Suspend,
                PowerOp::Reset => VmAction::Reset,
            },
            VmCall::Delete { .. } => VmAction::Delete,
            VmCall::Unregister => VmAction::Unregister,
            VmCall::Execute(_) => VmAction::Execute,
            VmCall::Upload(_) => VmAction::Upload,
            VmCall::Rename(_) => VmAction::Rename,
            VmCall::Clone(_) => VmAction::Clone,
            VmCall::Set(_) => VmAction::Set,
            VmCall::SnapshotList => VmAction::SnapshotList,
            VmCall::SnapshotCreate(_) => VmAction::SnapshotCreate,
            VmCall::SnapshotDelete { .. } => VmAction::SnapshotDelete,
            VmCall::SnapshotDeleteAll => VmAction::SnapshotDeleteAll,
            VmCall::SnapshotRevert { .. } => VmAction::SnapshotRevert,
        }
    }

    /// The host API request that runs this call on VM `vm`.
    pub fn request(&self, vm: &str) -> HttpCall {
        let base = format!("/machines/{}", seg(vm));
        let short = Duration::from_secs(60);
        let long = Duration::from_secs(600);
        let (method, path, body, timeout) = match self {
            VmCall::Get => ("GET", base, None, short),
            VmCall::Status => ("GET", format!("{base}/status"), None, short),
            VmCall::Power(op) => {
                let force = matches!(op, PowerOp::Stop { force: true, .. });
                let q = if force { "?force=true" } else { "" };
                ("PUT", format!("{base}/{}{q}", power_verb(op)), None, long)
            }
            VmCall::Delete { force } => {
                ("DELETE", if *force { format!("{base}?force=true") } else { base }, None, long)
            }
            VmCall::Unregister => ("POST", format!("{base}/unregister"), None, long),
            // The host's own limit plus time for the answer to travel.
            VmCall::Execute(r) => {
                ("PUT", format!("{base}/execute"), to_json(r), r.time_limit() + Duration::from_secs(30))
            }
            VmCall::Upload(r) => ("POST", format!("{base}/upload"), to_json(r), long),
            VmCall::Rename(r) => ("PUT", format!("{base}/rename"), to_json(r), long),
            VmCall::Clone(r) => ("PUT", format!("{base}/clone"), to_json(r), Duration::from_secs(3600)),
            VmCall::Set(r) => ("PUT", format!("{base}/set"), to_json(r), Duration::from_secs(3600)),
            VmCall::SnapshotList => ("GET", format!("{base}/snapshots"), None, short),
            VmCall::SnapshotCreate(r) => ("POST", format!("{base}/snapshots"), to_json(r), long),
            VmCall::SnapshotDelete { snapshot_id, delete_children } => (
                "DELETE",
                format!("{base}/snapshots/{}?delete_children={delete_children}", seg(snapshot_id)),
                None,
                long,
            ),
            VmCall::SnapshotDeleteAll => ("DELETE", format!("{base}/snapshots"), None, long),
            VmCall::SnapshotRevert { snapshot_id, request } => {
                ("POST", format!("{base}/snapshots/{}/revert", seg(snapshot_id)), to_json(request), long)
            }
        };
        HttpCall { method, path, body, timeout }
    }

    /// Read a host's successful answer to this call (an empty body reads as no body).
    pub fn read_reply(&self, body: &[u8]) -> Result<VmReply, serde_json::Error> {
        fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
            serde_json::from_slice(body)
        }
        Ok(match self {
            VmCall::Get | VmCall::Rename(_) => VmReply::Machine(parse(body)?),
            VmCall::Status | VmCall::Power(_) => VmReply::Status(parse(body)?),
            VmCall::Execute(_) => VmReply::Exec(parse(body)?),
            VmCall::Clone(_) => VmReply::Clone(parse(body)?),
            VmCall::Set(_) => VmReply::Set(parse(body)?),
            VmCall::SnapshotList => VmReply::Snapshots(parse(body)?),
            VmCall::SnapshotCreate(_) if body.iter().all(u8::is_ascii_whitespace) => VmReply::Snapshot(None),
            VmCall::SnapshotCreate(_) => VmReply::Snapshot(parse(body)?),
            VmCall::Delete { .. }
            | VmCall::Unregister
            | VmCall::Upload(_)
            | VmCall::SnapshotDelete { .. }
            | VmCall::SnapshotDeleteAll
            | VmCall::SnapshotRevert { .. } => VmReply::Done,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn calls_become_the_host_routes() {
        let stop = VmCall::Power(PowerOp::Stop { force: true, timeout: Duration::from_secs(60) });
        assert_eq!(stop.request("a b").path, "/machines/a%20b/stop?force=true");
        assert_eq!(stop.action(), VmAction::Stop);
        let del = VmCall::SnapshotDelete { snapshot_id: "s/1".into(), delete_children: true };
        let r = del.request("v");
        assert_eq!((r.method, r.path.as_str()), ("DELETE", "/machines/v/snapshots/s%2F1?delete_children=true"));
    }

    #[test]
    fn helpers_build_the_same_requests() {
        assert_eq!(VmCall::stop(false).request("v").path, "/machines/v/stop");
        assert_eq!(VmCall::stop(true).request("v").path, "/machines/v/stop?force=true");
        assert_eq!(VmCall::stop(true).action(), VmAction::Stop);
        let r = VmCall::Get.request("a b").via_orchestrator();
        assert_eq!((r.method, r.path.as_str()), ("GET", "/orchestrator/machines/a%20b"));
    }

    #[test]
    fn replies_read_back_what_the_host_printed() {
        let status = MachineStatus {
            id: "v".into(),
            name: "n".into(),
            status: "running".into(),
            ip_configured: "-".into(),
            host_id: None,
        };
        let body = serde_json::to_vec(&VmReply::Status(status.clone())).unwrap();
        assert_eq!(VmCall::Power(PowerOp::Start).read_reply(&body).unwrap(), VmReply::Status(status));
        assert_eq!(
            VmCall::SnapshotCreate(CreateSnapshotRequest {
                snapshot_name: "s".into(),
                snapshot_description: String::new()
            })
            .read_reply(b"null")
            .unwrap(),
            VmReply::Snapshot(None)
        );
        assert_eq!(VmCall::Delete { force: false }.read_reply(b"").unwrap(), VmReply::Done);
    }
}
