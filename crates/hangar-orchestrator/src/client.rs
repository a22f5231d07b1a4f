//! The seam between the orchestrator and its hosts.
//!
//! [`HostClient`] is what the orchestrator needs from one host; the API crate implements
//! it over HTTP (the host's `/api/v1/config/hardware`, `/machines`, websocket events).
//! [`HostConnector`] turns a registered host and its credentials into a client.
//! [`crate::fake`] holds an in-memory implementation of both for tests and benchmarks.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use hangar_hypervisor::{PowerOp, VmState};
use hangar_wire::{VmCall, VmReply};
use serde::{Deserialize, Serialize};

use crate::model::{CachedImage, Host, HostCredentials, HostHardware, HostResources, Os, VmSummary};

/// What a host client can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostClientError {
    /// The host could not be reached (connection refused, DNS, TLS).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The host did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The host refused the request (bad input, no room, conflict).
    #[error("refused: {0}")]
    Rejected(String),
    /// The VM (or other object) does not exist on the host.
    #[error("not found: {0}")]
    NotFound(String),
    /// The host refused the request with a client-error status (400, 403, 409, 422, ...),
    /// relayed as the same kind of answer.
    #[error("refused: {message}")]
    Refused {
        /// The host's HTTP status.
        status: u16,
        /// The host's message.
        message: String,
    },
    /// The host answered something the client cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl HostClientError {
    /// Whether the failure says the host itself is down (and its health should drop).
    pub fn is_host_down(&self) -> bool {
        matches!(self, HostClientError::Unreachable(_) | HostClientError::Timeout(_))
    }
}

/// What to create on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCreateVm {
    /// VM name.
    pub name: String,
    /// Image to create from (catalog id, or a local image name).
    pub image: String,
    /// Catalog version, when the image comes from the catalog.
    pub version: Option<String>,
    /// Architecture.
    pub architecture: String,
    /// Guest OS.
    pub os: Os,
    /// CPUs.
    pub cpu: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Disk in MiB, `None` keeps the image's size.
    pub disk_mb: Option<u64>,
    /// The Hangar user the VM is for.
    pub owner: String,
    /// Start the VM once created.
    pub start: bool,
    /// Another catalog server to pull the image from (the caller's
    /// `catalog_manifest.connection`); never stored or logged (masked `Debug`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_connection: Option<hangar_wire::SecretText>,
}

/// An operation on an existing VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum VmOp {
    /// A power operation.
    Power {
        /// Which one.
        power: PowerOp,
    },
    /// Delete the VM and its files; `force` stops it first if it runs.
    Delete {
        /// Stop a running VM first.
        force: bool,
    },
}

/// A change a host pushes (its websocket event stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostEvent {
    /// A keep-alive: the host is alive.
    Heartbeat,
    /// A VM appeared or changed.
    VmChanged {
        /// The VM as it is now.
        vm: VmSummary,
    },
    /// A VM is gone.
    VmRemoved {
        /// Its id.
        id: String,
    },
    /// A VM's power state changed (the rest of it did not).
    VmState {
        /// Its id.
        id: String,
        /// The new state.
        state: VmState,
    },
    /// The host's resources changed.
    Resources {
        /// The new figures.
        resources: HostResources,
    },
    /// The images in the host's catalog cache changed; this is the whole new list.
    CacheChanged {
        /// Every cached image.
        images: Vec<CachedImage>,
    },
    /// The host's whole state, read when the stream (re)connects: everything before it is
    /// superseded.
    Synced {
        /// Hardware, resources and cache.
        hardware: Box<HostHardware>,
        /// Every VM on the host.
        vms: Vec<VmSummary>,
    },
    /// The host's periodic `System Stats` (its process and hardware use), passed on to the
    /// orchestrator's subscribers as `HOST_STATS_UPDATE`.
    Stats {
        /// The event's body, as the host sent it.
        stats: serde_json::Value,
    },
}

/// What the orchestrator needs from one host.
#[async_trait]
pub trait HostClient: Send + Sync + 'static {
    /// Hardware, resources and cache (also the health probe).
    async fn hardware(&self) -> Result<HostHardware, HostClientError>;
    /// Every VM on the host.
    async fn list_vms(&self) -> Result<Vec<VmSummary>, HostClientError>;
    /// Create a VM; returns it once it exists.
    async fn create_vm(&self, req: HostCreateVm) -> Result<VmSummary, HostClientError>;
    /// Operate on a VM.
    async fn vm_op(&self, id: &str, op: VmOp) -> Result<(), HostClientError>;
    /// The host's event stream. Its first item is [`HostEvent::Synced`] (the state read
    /// after subscribing, so no change falls between the two); it carries
    /// [`HostEvent::Heartbeat`]s while the host is quiet and ends when the connection
    /// drops or the host stops answering. Call again to reconnect.
    async fn events(&self) -> Result<BoxStream<'static, HostEvent>, HostClientError>;
    /// A lightweight liveness check (no VM listing).
    async fn ping(&self) -> Result<(), HostClientError> {
        self.hardware().await.map(|_| ())
    }
    /// Runs one VM call (the host API's own, e.g. exec or rename) and reads its answer.
    async fn vm_call(&self, id: &str, call: &VmCall) -> Result<VmReply, HostClientError> {
        let _ = (id, call);
        Err(HostClientError::Rejected("this host client cannot run VM calls".into()))
    }
}

/// Makes clients for registered hosts.
#[async_trait]
pub trait HostConnector: Send + Sync + 'static {
    /// A client for `host`, authenticated with `credentials` when there are any. Called
    /// again after the host's URL or credentials change.
    async fn connect(
        &self,
        host: &Host,
        credentials: Option<HostCredentials>,
    ) -> Result<Arc<dyn HostClient>, HostClientError>;

    /// A client for a host not registered yet (to probe it before registration).
    async fn probe(
        &self,
        url: &str,
        credentials: Option<HostCredentials>,
    ) -> Result<Arc<dyn HostClient>, HostClientError>;
}
