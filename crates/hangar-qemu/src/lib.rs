//! QEMU/KVM driver for Hangar.
//!
//! Each VM is a folder under the driver's VMs root (named by the VM's id) holding
//! `vm.json` (its configuration), `disk.qcow2` (a copy-on-write overlay on a read-only
//! base image) and, while it runs, `qemu.pid`, `qmp.sock`, `qga.sock`, `console.log`.
//! A suspended VM keeps `suspend.state`. The driver holds no state that it cannot rebuild
//! from those folders and the running QEMU processes: a new driver on the same root
//! adopts running VMs by their pid files and QMP sockets.
//!
//! QEMU runs daemonized (`-daemonize`: its own session, reparented away from the
//! agent), so VMs outlive a crashed agent. Guests use user-mode networking with
//! `restrict=on` unless a VM's config says otherwise, so guest traffic never leaves the
//! machine. Commands run inside guests through the QEMU guest agent.

mod cmd;
pub mod config;
mod driver;
mod host;
mod ops;
mod procs;
pub mod qga;
pub mod qmp;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_hypervisor::{HypervisorError, Result, VmState};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{Acceleration, ImageDescriptor, NetworkConfig, PortForward, QemuConfig, VmConfig};

use driver::Inner;

/// The QEMU/KVM implementation of [`hangar_hypervisor::Hypervisor`].
///
/// Dropping the driver closes its QMP and agent sessions and stops its background
/// reconcile; the VMs keep running and a new driver adopts them.
pub struct QemuDriver {
    inner: Arc<Inner>,
    reconciler: JoinHandle<()>,
}

impl Drop for QemuDriver {
    fn drop(&mut self) {
        self.reconciler.abort();
        self.inner.shutdown();
    }
}

impl std::fmt::Debug for QemuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDriver").field("vms_root", &self.inner.cfg.vms_root).finish()
    }
}

impl QemuDriver {
    /// Opens (creating if needed) a VMs root, adopts the VMs in it, including running
    /// ones, and starts the periodic reconcile.
    #[tracing::instrument(level = "info", skip(cfg), fields(root = %cfg.vms_root.display()))]
    pub async fn new(mut cfg: QemuConfig) -> Result<QemuDriver> {
        std::fs::create_dir_all(&cfg.vms_root).map_err(|e| HypervisorError::io(&cfg.vms_root, e))?;
        cfg.vms_root = std::fs::canonicalize(&cfg.vms_root).map_err(|e| HypervisorError::io(&cfg.vms_root, e))?;
        if let Some(br) = &cfg.bridge {
            if !config::valid_bridge_name(br) {
                return Err(HypervisorError::InvalidInput(format!(
                    "bridge {br:?} is not an interface name (1-15 letters, digits, '-', '_' or '.')"
                )));
            }
            let acl = std::fs::read_to_string("/etc/qemu/bridge.conf").unwrap_or_default();
            let allowed = acl.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some("allow") && matches!(w.next(), Some(n) if n == br || n == "all")
            });
            if !allowed {
                tracing::warn!(bridge = %br, "/etc/qemu/bridge.conf has no `allow {br}` line: qemu-bridge-helper will refuse to attach VMs to it");
            }
        }
        let (events, _) = broadcast::channel(1024);
        let every = cfg.reconcile_interval;
        let inner = Arc::new_cyclic(|weak| Inner {
            cfg,
            events,
            vms: Mutex::new(Default::default()),
            registry: tokio::sync::Mutex::new(()),
            kvm: tokio::sync::OnceCell::new(),
            weak_self: weak.clone(),
        });
        inner.check_socket_room(&inner.cfg.vms_root)?;
        inner.reconcile(false).await;
        let reconciler = driver::spawn_reconciler(Arc::downgrade(&inner), every);
        Ok(QemuDriver { inner, reconciler })
    }

    /// The configuration the driver runs with.
    pub fn config(&self) -> &QemuConfig {
        &self.inner.cfg
    }

    /// Whether guests run under KVM (after the probe) rather than TCG.
    pub async fn uses_kvm(&self) -> bool {
        self.inner.kvm().await
    }

    /// Waits until the guest agent of a running VM answers, up to `timeout`.
    #[tracing::instrument(level = "info", skip(self))]
    pub async fn wait_for_agent(&self, vm: &str, timeout: Duration) -> Result<()> {
        let vm = self.inner.find(vm)?;
        let state = self.inner.refresh(&vm).await;
        if state != VmState::Running {
            return Err(driver::invalid(&vm, "wait for the agent of", state));
        }
        self.inner.qga_call(&vm, "guest-ping", None, Instant::now() + timeout).await.map(|_| ())
    }

    /// Asks the guest agent for the guest's addresses now (loopback and link-local left out).
    pub async fn ip_addresses(&self, vm: &str, timeout: Duration) -> Result<Vec<IpAddr>> {
        let vm = self.inner.find(vm)?;
        let state = self.inner.refresh(&vm).await;
        if state != VmState::Running {
            return Err(driver::invalid(&vm, "read the addresses of", state));
        }
        Ok(self.inner.refresh_ips(&vm, timeout, false).await)
    }

    /// Runs a reconcile now (the background one runs every `reconcile_interval`).
    pub async fn reconcile(&self) {
        self.inner.reconcile(true).await;
    }

    /// Pid of a VM's QEMU process while it runs.
    pub fn qemu_pid(&self, vm: &str) -> Result<Option<i32>> {
        Ok(self.inner.find(vm)?.live_pid())
    }

    /// The VM's folder.
    pub fn vm_dir(&self, vm: &str) -> Result<PathBuf> {
        Ok(self.inner.find(vm)?.dir.clone())
    }

    /// Sets the host ports forwarded to a stopped VM's guest (bound to 127.0.0.1).
    pub async fn set_port_forwards(&self, vm: &str, forwards: Vec<PortForward>) -> Result<()> {
        let vm = self.inner.find(vm)?;
        let _op = vm.op.lock().await;
        let state = self.inner.refresh(&vm).await;
        if state != VmState::Stopped {
            return Err(driver::invalid(&vm, "change the port forwards of", state));
        }
        let mut cfg = vm.config()?;
        cfg.network.port_forwards = forwards;
        config::write_json(&vm.path(config::files::CONFIG), &cfg)
    }
}
