//! The seam for reaching a VM's port by another path than its IP address.

use async_trait::async_trait;

/// A byte stream to an upstream (TCP, TLS, or a tunnel through another Hangar server).
pub trait UpstreamIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// A boxed [`UpstreamIo`], what a [`VmDialer`] returns.
pub type BoxedIo = Box<dyn UpstreamIo>;

/// Reaches a VM's port by some other path than its IP (used by the orchestrator, which tunnels
/// through the host that owns the VM).
///
/// When one is given to [`crate::ProxyManagerBuilder::vm_dialer`], every VM target (`vm` +
/// `port`) of TCP routes and of plain-HTTP and h2c routes is reached through
/// [`VmDialer::dial`] instead of the [`crate::TargetResolver`]; an `https` route to a VM is then
/// refused by [`crate::ProxyManager::apply`]. A dial error is answered like a refused
/// connection: 502 for HTTP, a closed connection for TCP.
#[async_trait]
pub trait VmDialer: Send + Sync + 'static {
    /// Open a byte stream to `port` of the VM `vm`.
    async fn dial(&self, vm: &str, port: u16) -> std::io::Result<BoxedIo>;
}
