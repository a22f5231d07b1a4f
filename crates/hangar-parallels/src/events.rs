//! Live VM events: one long-lived `prlctl monitor-events --json` per host user (read
//! through a pseudo-terminal so prlctl line-buffers, restarted with backoff when it dies),
//! plus a periodic reconcile through `list` that reports drift the monitor missed.
//!
//! Each monitor is spawned through `hangar_proc` (it dies with the agent on Linux) and, with
//! [`crate::ParallelsConfig::run_dir`], recorded in the helper ledger while it runs, so the
//! next agent stops a monitor a killed one left behind (macOS has no parent-death signal).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use hangar_hypervisor::{HypervisorError, Result, VmEvent, VmInfo, VmState};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::command::{GroupGuard, Tool};
use crate::{Inner, parse};

pub(crate) fn spawn(handle: &Handle, inner: Arc<Inner>, cancel: CancellationToken) {
    // One monitor per host user whose VMs the driver lists (a root agent's users are found
    // with `prlsrvctl user list` first; users that appear later are seen by the reconcile).
    let (spawner, monitors, stop) = (handle.clone(), inner.clone(), cancel.clone());
    handle.spawn(async move {
        for scope in monitors.list_scopes().await {
            let span = info_span!("parallels.monitor_events", user = scope.as_deref().unwrap_or("-"));
            spawner.spawn(monitor_loop(monitors.clone(), scope, stop.clone()).instrument(span));
        }
    });
    handle.spawn(reconcile_loop(inner, cancel).instrument(info_span!("parallels.reconcile")));
}

fn send(inner: &Inner, event: VmEvent) {
    debug!(?event, "vm event");
    let _ = inner.events.send(event);
}

/// Events that turn `old` into `new`.
pub(crate) fn diff(old: Option<&VmInfo>, new: &VmInfo) -> Vec<VmEvent> {
    let Some(old) = old else {
        return vec![VmEvent::Added { vm: Box::new(new.clone()) }];
    };
    let mut out = Vec::new();
    if old.state != new.state {
        out.push(VmEvent::StateChanged { id: new.id.clone(), previous: old.state, current: new.state });
    }
    if old.ip_addresses != new.ip_addresses {
        out.push(VmEvent::IpChanged { id: new.id.clone(), ip_addresses: new.ip_addresses.clone() });
    }
    // `disk_bytes` moves all the time on a running VM; it is not a configuration change.
    let config_changed = old.name != new.name
        || old.description != new.description
        || old.cpus != new.cpus
        || old.memory_mb != new.memory_mb
        || old.disk_virtual_bytes != new.disk_virtual_bytes
        || old.os != new.os
        || old.home != new.home
        || old.owner != new.owner
        || old.is_template != new.is_template
        || old.architecture != new.architecture;
    if config_changed {
        out.push(VmEvent::Updated { vm: Box::new(new.clone()) });
    }
    out
}

/// Re-read one VM and report how it changed.
async fn refresh(inner: &Inner, id: &str) {
    match inner.get(id).await {
        Ok(vm) => {
            let events = match inner.known.lock() {
                Ok(mut known) => {
                    let events = diff(known.get(&vm.id), &vm);
                    known.insert(vm.id.clone(), vm);
                    events
                }
                Err(_) => Vec::new(),
            };
            for e in events {
                send(inner, e);
            }
        }
        Err(HypervisorError::NotFound(_)) => {
            let was_known = inner.known.lock().map(|mut k| k.remove(id).is_some()).unwrap_or(false);
            if was_known {
                send(inner, VmEvent::Removed { id: id.to_string() });
            }
        }
        Err(e) => warn!(%id, %e, "cannot re-read a VM after an event"),
    }
}

/// Handle one line of `monitor-events --json`.
pub(crate) async fn handle_line(inner: &Inner, line: &str) {
    let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if line.is_empty() {
        return;
    }
    let event = match parse::event(line) {
        Ok(e) => e,
        Err(message) => {
            debug!(%message, line, "ignoring an unparsable monitor-events line");
            return;
        }
    };
    let id = parse::trim_id(&event.vm_id).to_string();
    if id.is_empty() {
        return;
    }
    match event.name.as_str() {
        "vm_state_changed" if !event.info.vm_state_name.trim().is_empty() => {
            let current = parse::vm_state(&event.info.vm_state_name);
            let previous = inner
                .known
                .lock()
                .ok()
                .and_then(|mut known| known.get_mut(&id).map(|vm| std::mem::replace(&mut vm.state, current)));
            match previous {
                Some(p) if p == current => {}
                Some(previous) => send(inner, VmEvent::StateChanged { id, previous, current }),
                None => {
                    send(inner, VmEvent::StateChanged { id: id.clone(), previous: VmState::Unknown, current });
                    refresh(inner, &id).await;
                }
            }
        }
        "vm_unregistered" | "vm_deleted" => {
            if let Ok(mut known) = inner.known.lock() {
                known.remove(&id);
            }
            send(inner, VmEvent::Removed { id });
        }
        "vm_state_changed" | "vm_added" | "vm_registered" | "vm_config_changed" | "vm_tools_state_changed" => {
            refresh(inner, &id).await;
        }
        other => debug!(event = other, %id, "event not tracked"),
    }
}

async fn monitor_loop(inner: Arc<Inner>, scope: Option<String>, cancel: CancellationToken) {
    let (first, max) = inner.cfg.monitor_backoff;
    let mut backoff = first;
    loop {
        let started = Instant::now();
        let res = monitor_once(&inner, scope.as_deref(), &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        match res {
            Ok(()) => warn!(?backoff, "prlctl monitor-events ended; restarting"),
            Err(e) => warn!(%e, ?backoff, "prlctl monitor-events failed; restarting"),
        }
        if started.elapsed() > max {
            backoff = first;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

async fn monitor_once(inner: &Inner, scope: Option<&str>, cancel: &CancellationToken) -> Result<()> {
    let inv = inner.invocation(Tool::Prlctl, vec!["monitor-events".to_string(), "--json".to_string()], scope);
    let mut cmd = inner.runner.command(&inv)?;
    cmd.stdin(Stdio::null()).stderr(Stdio::null());
    let spawn_err = |e: std::io::Error| HypervisorError::io(&inv.program, e);
    // The command leads its own process group (`Runner::command`); the ledger entry, when
    // there is a ledger, lives as long as this call, which reaps the monitor before returning.
    let spawn = |cmd: tokio::process::Command| match &inner.ledger {
        Some(ledger) => hangar_proc::spawn_recorded(cmd, ledger, true).map(|(child, rec)| (child, Some(rec))),
        None => hangar_proc::spawn(cmd).map(|child| (child, None)),
    };
    let pty = if inner.cfg.monitor_pty {
        let pty = nix::pty::openpty(None, None)
            .map_err(|e| HypervisorError::Unavailable(format!("cannot open a pseudo-terminal: {e}")))?;
        cmd.stdout(Stdio::from(pty.slave));
        Some(pty.master)
    } else {
        cmd.stdout(Stdio::piped());
        None
    };
    // The command is consumed by the spawn: our copy of the terminal's slave side goes with
    // it, so the master reports end-of-file when the child is gone.
    let (mut child, _recorded) = spawn(cmd).map_err(spawn_err)?;
    let reader: Box<dyn AsyncBufRead + Unpin + Send> = match pty {
        Some(master) => Box::new(BufReader::new(tokio::fs::File::from_std(std::fs::File::from(master)))),
        None => {
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| HypervisorError::Unavailable("monitor-events has no stdout".to_string()))?;
            Box::new(BufReader::new(stdout))
        }
    };
    let pgid = child.id().and_then(|p| i32::try_from(p).ok()).map(nix::unistd::Pid::from_raw);
    let _guard = GroupGuard(pgid);
    debug!(pid = ?child.id(), "monitor-events started");
    let mut lines = reader.lines();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            line = lines.next_line() => match line {
                Ok(Some(line)) => handle_line(inner, &line).await,
                // A terminal reports EIO once the child has gone.
                Ok(None) | Err(_) => break,
            },
        }
    }
    match tokio::time::timeout(inner.cfg.kill_grace, child.wait()).await {
        Ok(Ok(status)) => debug!(%status, "monitor-events exited"),
        _ => {
            let _ = child.kill().await;
        }
    }
    Ok(())
}

async fn reconcile_loop(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut primed = false;
    loop {
        match inner.list().await {
            Ok(vms) => {
                let fresh: HashMap<String, VmInfo> = vms.into_iter().map(|v| (v.id.clone(), v)).collect();
                let events = match inner.known.lock() {
                    Ok(mut known) => {
                        let mut events = Vec::new();
                        if primed {
                            for (id, vm) in &fresh {
                                events.extend(diff(known.get(id), vm));
                            }
                            for id in known.keys().filter(|id| !fresh.contains_key(*id)) {
                                events.push(VmEvent::Removed { id: id.clone() });
                            }
                        } else {
                            // Seed silently; only later drift is news.
                            for (id, vm) in known.iter() {
                                if !fresh.contains_key(id) {
                                    debug!(%id, vm = %vm.name, "known from events but not listed");
                                }
                            }
                        }
                        *known = fresh;
                        events
                    }
                    Err(_) => Vec::new(),
                };
                primed = true;
                for e in events {
                    send(&inner, e);
                }
            }
            Err(e) => warn!(%e, "reconcile: list failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(inner.cfg.reconcile_interval) => {}
        }
    }
}
