//! The host's side of the one VM command path: every operation on an existing VM is a
//! [`VmCall`] (the wire's closed command enum, the same one the orchestrator forwards),
//! run by [`Host::run`] for a caller. `run` finds the VM, decides access with the one rule
//! ([`hangar_core::vm::authorize`], against the owner Hangar recorded), writes the audit
//! entry before the hypervisor acts (a refused audit write refuses the change), and only
//! then drives the hypervisor. Handlers parse requests into commands and shape answers;
//! they decide nothing.

use std::path::PathBuf;
use std::time::Duration;

use hangar_core::audit::Actor;
use hangar_core::vm::{VmAction, authorize};
use hangar_core::{Principal, VmDenied};
use hangar_hypervisor::{CloneSpec, ConfigChange, ExecRequest, HypervisorError, PowerOp, SnapshotOp, VmInfo, VmState};
use hangar_wire::{
    CloneResponse, ExecuteRequest, ExecuteResponse, Machine, MachineStatus, SetRequest, SetResponse, SetResult,
    SnapshotDto, VmCall, VmReply,
};
use serde_json::{Value, json};
use tracing::{Instrument, info_span, warn};

use crate::{Host, HostError, Result, check_name, check_vm_key};

/// One change of a batch `set` request (the reference's `PUT /machines/{id}/set`).
#[derive(Debug, Clone, PartialEq)]
pub enum SetOp {
    Power(PowerOp),
    Cpus(u32),
    MemoryMb(u64),
    Rename(String),
    Description(String),
    Clone(CloneSpec),
}

impl SetOp {
    /// Parse one `{group, operation, value, flags, options}` item; the error names what is
    /// wrong and says what is accepted.
    pub fn parse(
        group: &str,
        operation: &str,
        value: &str,
        flags: &[String],
        option: impl Fn(&str) -> Option<String>,
    ) -> Result<SetOp> {
        let g = group.to_ascii_lowercase();
        let o = operation.to_ascii_lowercase();
        Ok(match (g.as_str(), o.as_str()) {
            ("state", state) => SetOp::Power(match state {
                "start" => PowerOp::Start,
                "stop" => PowerOp::Stop { force: flags.iter().any(|f| f == "force"), timeout: Duration::from_secs(60) },
                "kill" => PowerOp::Kill,
                "pause" => PowerOp::Pause,
                "resume" => PowerOp::Resume,
                "suspend" => PowerOp::Suspend,
                "reset" => PowerOp::Reset,
                "restart" => PowerOp::Restart,
                other => return Err(HostError::Invalid(format!("unknown state operation {other:?}"))),
            }),
            ("cpu", "set") => SetOp::Cpus(
                value.trim().parse().map_err(|_| HostError::Invalid(format!("cpu value {value:?} is not a number")))?,
            ),
            ("memory", "set") => SetOp::MemoryMb(
                value
                    .trim()
                    .trim_end_matches(['M', 'b', 'B'])
                    .parse()
                    .map_err(|_| HostError::Invalid(format!("memory value {value:?} is not a number of MiB")))?,
            ),
            ("machine", "rename") => SetOp::Rename(value.to_string()),
            ("machine", "description") | ("machine", "set-description") => SetOp::Description(value.to_string()),
            ("machine", "clone") => SetOp::Clone(CloneSpec {
                name: value.to_string(),
                linked: flags.iter().any(|f| f == "linked"),
                destination: option("dst").map(PathBuf::from),
            }),
            (g, o) => return Err(HostError::Unsupported(format!("operation {g} {o} is not supported"))),
        })
    }
}

/// A [`VmCall`] checked and turned into what the hypervisor runs.
enum Op {
    Get,
    Status,
    Power(PowerOp),
    Delete {
        force: bool,
    },
    Unregister,
    Execute(ExecRequest),
    Upload {
        path: PathBuf,
        remote: String,
    },
    Rename {
        name: String,
        description: Option<String>,
    },
    Clone(CloneSpec),
    /// `(group, operation, parsed)` per item: each runs and reports on its own.
    Set(Vec<(String, String, Result<SetOp>)>),
    SnapshotList,
    Snapshot(SnapshotOp),
}

/// The most operations one `set` request may carry.
const MAX_SET_OPERATIONS: usize = 64;

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn exec_request(r: ExecuteRequest) -> Result<ExecRequest> {
    if r.command.trim().is_empty() {
        return Err(HostError::Invalid("command is empty".into()));
    }
    if r.use_ssh || r.script.is_some() {
        return Err(HostError::Unsupported(
            "use_ssh and script are not supported; send the command line in command".into(),
        ));
    }
    let timeout = r.time_limit();
    let command = if r.use_sudo { format!("sudo -n -- /bin/sh -c {}", quote(&r.command)) } else { r.command };
    Ok(ExecRequest {
        argv: vec![command],
        shell: true,
        env: r.environment_variables,
        working_dir: r.working_directory,
        user: r.user,
        timeout,
        stdin: None,
    })
}

fn set_items(r: SetRequest) -> Result<Vec<(String, String, Result<SetOp>)>> {
    if r.operations.len() > MAX_SET_OPERATIONS {
        return Err(HostError::Invalid(format!("at most {MAX_SET_OPERATIONS} operations per request")));
    }
    Ok(r.operations
        .into_iter()
        .map(|o| {
            let parsed = SetOp::parse(&o.group, &o.operation, &o.value, &o.flags, |flag| {
                o.options.iter().find(|x| x.flag == flag).map(|x| x.value.clone())
            });
            (o.group, o.operation, parsed)
        })
        .collect())
}

impl Op {
    fn of(call: VmCall) -> Result<Op> {
        Ok(match call {
            VmCall::Get => Op::Get,
            VmCall::Status => Op::Status,
            VmCall::Power(op) => Op::Power(op),
            VmCall::Delete { force } => Op::Delete { force },
            VmCall::Unregister => Op::Unregister,
            VmCall::Execute(r) => Op::Execute(exec_request(r)?),
            VmCall::Upload(r) => Op::Upload { path: PathBuf::from(r.path), remote: r.remote_path },
            VmCall::Rename(r) => {
                check_name(&r.new_name)?;
                Op::Rename { name: r.new_name, description: r.description }
            }
            VmCall::Clone(r) => Op::Clone(CloneSpec {
                name: r.clone_name,
                linked: r.linked,
                destination: r.destination_path.map(PathBuf::from),
            }),
            VmCall::Set(r) => Op::Set(set_items(r)?),
            VmCall::SnapshotList => Op::SnapshotList,
            VmCall::SnapshotCreate(r) => {
                if r.snapshot_name.trim().is_empty() || r.snapshot_name.len() > 200 {
                    return Err(HostError::Invalid("snapshot_name must be 1 to 200 characters".into()));
                }
                Op::Snapshot(SnapshotOp::Create { name: r.snapshot_name, description: r.snapshot_description })
            }
            VmCall::SnapshotDelete { snapshot_id, delete_children } => {
                Op::Snapshot(SnapshotOp::Delete { snapshot_id, delete_children })
            }
            VmCall::SnapshotDeleteAll => Op::Snapshot(SnapshotOp::DeleteAll),
            VmCall::SnapshotRevert { snapshot_id, request } => {
                Op::Snapshot(SnapshotOp::Revert { snapshot_id, skip_resume: request.skip_resume })
            }
        })
    }

    /// Non-secret details for the audit entry.
    fn audit_detail(&self, vm: &VmInfo) -> Value {
        match self {
            Op::Delete { force } => json!({"name": vm.name, "force": force}),
            Op::Upload { path, remote } => json!({"path": path, "remote_path": remote}),
            Op::Rename { name, .. } => json!({"from": vm.name, "name": name}),
            Op::Clone(spec) => json!({"name": spec.name, "linked": spec.linked}),
            Op::Set(items) => json!({"operations": items.len()}),
            Op::Snapshot(SnapshotOp::Create { name, .. }) => json!({"snapshot_name": name}),
            Op::Snapshot(SnapshotOp::Delete { snapshot_id, .. } | SnapshotOp::Revert { snapshot_id, .. }) => {
                json!({"snapshot_id": snapshot_id})
            }
            _ => json!({}),
        }
    }
}

impl From<VmDenied> for HostError {
    fn from(e: VmDenied) -> Self {
        HostError::Forbidden(e.to_string())
    }
}

impl Host {
    /// The VM `vm` (id or name) after checking `p` may run `action` on it.
    pub async fn authorized(&self, p: &Principal, action: VmAction, vm: &str) -> Result<VmInfo> {
        check_vm_key(vm)?;
        let info = self.hv.get(vm).await?;
        let owner = self.owners.owner_of(&info).await?;
        authorize(p, action, &info.name, owner.as_deref())?;
        Ok(info)
    }

    /// Run `call` on VM `vm` (id or name) for `p`, audited as `actor`.
    pub async fn run(&self, p: &Principal, actor: &Actor, vm: &str, call: VmCall) -> Result<VmReply> {
        let action = call.action();
        let info = self.authorized(p, action, vm).await?;
        // Checks that need no IO come before the audit entry, so a refused request is not
        // recorded as a change.
        let mut op = Op::of(call)?;
        // Clone destinations are confined to the VM folders before anything is recorded.
        if let Op::Clone(CloneSpec { destination: Some(d), .. }) = &mut op {
            if !d.is_absolute() || d.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(HostError::Invalid("destination_path must be an absolute path without '..'".into()));
            }
            *d = self.in_vm_folders(d, "destination_path", false).await?;
        }
        if action.is_change() {
            self.audit(actor, &action.audit_action(), &info.id, op.audit_detail(&info)).await?;
        }
        let span = info_span!("vm_command", vm = %info.id, action = action.name(), user = %p.username);
        self.execute(p, actor, info, op).instrument(span).await
    }

    /// Copy `bytes` into the guest at `remote` (the request's body, staged in a private
    /// temporary file that is removed afterwards).
    pub async fn upload_bytes(&self, p: &Principal, actor: &Actor, vm: &str, bytes: &[u8], remote: &str) -> Result<()> {
        if remote.is_empty() || remote.contains('\0') {
            return Err(HostError::Invalid("remote_path is empty or invalid".into()));
        }
        let info = self.authorized(p, VmAction::Upload, vm).await?;
        self.audit(actor, "vm.upload", &info.id, json!({"remote_path": remote, "bytes": bytes.len()})).await?;
        let tmp = std::env::temp_dir().join(format!("hangar-upload-{}", uuid::Uuid::new_v4()));
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| HostError::Unavailable(format!("cannot stage the upload: {e}")))?;
        let r = self.hv.upload(&info.id, &tmp, remote).await;
        if let Err(e) = tokio::fs::remove_file(&tmp).await {
            warn!(file = %tmp.display(), error = %e, "staged upload not removed");
        }
        Ok(r?)
    }

    /// The VM whose `port` a caller may open a tunnel to (audited); the tunnel itself is
    /// the caller's to run.
    pub async fn port_forward(&self, p: &Principal, actor: &Actor, vm: &str, port: u16) -> Result<VmInfo> {
        if port == 0 {
            return Err(HostError::Invalid("port must be between 1 and 65535".into()));
        }
        let info = self.authorized(p, VmAction::PortForward, vm).await?;
        if info.state != VmState::Running {
            return Err(HostError::Conflict(format!(
                "VM {} is {}; start it before forwarding a port",
                info.name,
                info.state.as_str()
            )));
        }
        self.audit(actor, "vm.port_forward", &info.id, json!({"port": port})).await?;
        Ok(info)
    }

    /// A VM as the API shows it, with the owner Hangar recorded.
    pub async fn machine(&self, info: VmInfo) -> Result<Machine> {
        let owner = self.owners.owner_of(&info).await?;
        Ok(Machine::from_vm(info, owner))
    }

    /// Every VM of the host, as the API shows them.
    pub async fn machines(&self, p: &Principal) -> Result<Vec<Machine>> {
        authorize(p, VmAction::List, "", None)?;
        let mut out = Vec::new();
        for info in self.hv.list().await? {
            let m = self.machine(info).await?;
            if hangar_core::may_see_vm(p, m.owner.as_deref()) {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn execute(&self, p: &Principal, actor: &Actor, info: VmInfo, op: Op) -> Result<VmReply> {
        let id = info.id.clone();
        Ok(match op {
            Op::Get => VmReply::Machine(Box::new(self.machine(info).await?)),
            Op::Status => VmReply::Status(MachineStatus::of(&info)),
            Op::Power(op) => VmReply::Status(MachineStatus::of(&self.hv.power(&id, op).await?)),
            Op::Delete { force } => {
                match info.state {
                    VmState::Stopped | VmState::Unknown => {}
                    // A suspended VM's saved state is dropped when forced; without force
                    // the driver says whether it deletes one.
                    VmState::Suspended if !force => {}
                    _ if !force => {
                        return Err(HostError::Hypervisor(HypervisorError::InvalidState {
                            id,
                            operation: "delete",
                            state: info.state,
                        }));
                    }
                    _ => self.stop_now(&id).await?,
                }
                self.hv.delete(&id).await?;
                self.owners.forget(&id).await;
                VmReply::Done
            }
            Op::Unregister => {
                self.hv.unregister(&id).await?;
                self.owners.forget(&id).await;
                VmReply::Done
            }
            Op::Execute(req) => {
                let out = self.hv.exec(&id, req).await?;
                VmReply::Exec(ExecuteResponse {
                    stdout: out.stdout,
                    stderr: out.stderr,
                    exit_code: out.exit_code,
                    error: None,
                })
            }
            Op::Upload { path, remote } => {
                let real = self.confined_upload(&path)?;
                self.hv.upload(&id, &real, &remote).await?;
                VmReply::Done
            }
            Op::Rename { name, description } => {
                let mut vm = self.hv.rename(&id, &name).await?;
                if let Some(d) = description {
                    vm = self.hv.configure(&vm.id, ConfigChange { description: Some(d), ..Default::default() }).await?;
                }
                VmReply::Machine(Box::new(self.machine(vm).await?))
            }
            Op::Clone(spec) => {
                let vm = self.clone_for(p, actor, &id, spec).await?;
                VmReply::Clone(CloneResponse {
                    id: vm.id,
                    name: vm.name,
                    status: vm.state.as_str().into(),
                    host_id: None,
                })
            }
            Op::Set(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (group, operation, op) in items {
                    let r = match op {
                        Err(e) => Err(e),
                        Ok(op) => self.set_one(p, actor, &id, op).await,
                    };
                    out.push(SetResult {
                        group,
                        operation,
                        status: if r.is_ok() { "success".into() } else { "error".into() },
                        error: r.err().map(|e| e.to_string()),
                    });
                }
                VmReply::Set(SetResponse { operations: out })
            }
            Op::SnapshotList => {
                VmReply::Snapshots(self.hv.snapshots(&id).await?.into_iter().map(SnapshotDto::from).collect())
            }
            Op::Snapshot(op) => VmReply::Snapshot(self.hv.snapshot(&id, op).await?.map(SnapshotDto::from)),
        })
    }

    async fn set_one(&self, p: &Principal, actor: &Actor, id: &str, op: SetOp) -> Result<()> {
        match op {
            SetOp::Power(op) => self.hv.power(id, op).await.map(drop)?,
            SetOp::Cpus(n) => {
                self.hv.configure(id, ConfigChange { cpus: Some(n), ..Default::default() }).await.map(drop)?
            }
            SetOp::MemoryMb(n) => {
                self.hv.configure(id, ConfigChange { memory_mb: Some(n), ..Default::default() }).await.map(drop)?
            }
            SetOp::Rename(name) => {
                check_name(&name)?;
                self.hv.rename(id, &name).await.map(drop)?
            }
            SetOp::Description(d) => {
                self.hv.configure(id, ConfigChange { description: Some(d), ..Default::default() }).await.map(drop)?
            }
            SetOp::Clone(spec) => self.clone_for(p, actor, id, spec).await.map(drop)?,
        }
        Ok(())
    }

    /// Clone `id`; the clone belongs to the caller, recorded with its audit entry in one
    /// batch (a refused write removes the clone again).
    async fn clone_for(&self, p: &Principal, actor: &Actor, id: &str, mut spec: CloneSpec) -> Result<VmInfo> {
        check_name(&spec.name)?;
        if let Some(d) = &spec.destination {
            if !d.is_absolute() || d.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(HostError::Invalid("destination_path must be an absolute path without '..'".into()));
            }
            spec.destination = Some(self.in_vm_folders(d, "destination_path", false).await?);
        }
        let vm = self.hv.clone_vm(id, spec).await?;
        self.record_new_vm(actor, "vm.clone.created", &vm, &p.username, json!({"source": id})).await?;
        Ok(vm)
    }

    /// Record a new VM's owner with its audit entry in one batch; if the store refuses,
    /// the VM is removed again and the change fails.
    pub(crate) async fn record_new_vm(
        &self,
        actor: &Actor,
        action: &str,
        vm: &VmInfo,
        owner: &str,
        detail: Value,
    ) -> Result<()> {
        let entry = hangar_core::audit::AuditEntry::new(actor, action, "vm", &vm.id, detail);
        if let Err(e) = self.owners.record(&vm.id, owner, Some(&entry)).await {
            warn!(vm = %vm.id, error = %e, "the new VM's owner could not be recorded; removing the VM");
            if let Err(del) = self.remove_quietly(&vm.id).await {
                warn!(vm = %vm.id, error = %del, "could not remove the VM whose owner was not recorded");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn remove_quietly(&self, id: &str) -> Result<()> {
        self.stop_now(id).await?;
        Ok(self.hv.delete(id).await?)
    }

    /// Power a VM off at once (a suspended one loses its saved state), whatever its state.
    async fn stop_now(&self, id: &str) -> Result<()> {
        match self.hv.power(id, PowerOp::Kill).await {
            // Already off, or a driver that deletes a VM in this state as it is.
            Ok(_) | Err(HypervisorError::InvalidState { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Write one audit entry now; the change it announces happens only if this succeeds.
    pub(crate) async fn audit(&self, actor: &Actor, action: &str, vm: &str, detail: Value) -> Result<()> {
        let entry = hangar_core::audit::AuditEntry::new(actor, action, "vm", vm, detail);
        self.owners.audit(&entry).await
    }
}
