//! A small QMP client: line-delimited JSON over a Unix socket, the greeting, capability
//! negotiation, id-tagged commands answered out of order, and asynchronous events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_hypervisor::{HypervisorError, Result};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// An asynchronous QMP event (`STOP`, `RESUME`, `SHUTDOWN`, `POWERDOWN`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event's name.
    pub event: String,
    /// The event's `data` member (`null` when absent).
    pub data: Value,
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value>>>>>>;

/// A connected, negotiated QMP session. Dropping it closes the socket.
pub struct Qmp {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn qmp_err(path: &Path, what: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Unavailable(format!("QMP {}: {what}", path.display()))
}

impl Qmp {
    /// Connects to a QMP socket, retrying until `timeout` while the socket is not there
    /// yet, reads the greeting and negotiates capabilities. Events arrive on the returned
    /// receiver, which closes when the connection does (QEMU exited).
    #[tracing::instrument(level = "debug", name = "qmp_connect", fields(path = %path.display()))]
    pub async fn connect(path: &Path, timeout: Duration) -> Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>)> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(qmp_err(path, format!("cannot connect: {e}")));
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let greeting = tokio::time::timeout(remaining, lines.next_line())
            .await
            .map_err(|_| qmp_err(path, "no greeting"))?
            .map_err(|e| qmp_err(path, e))?
            .ok_or_else(|| qmp_err(path, "closed before the greeting"))?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|e| qmp_err(path, format!("bad greeting: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(path, format!("unexpected greeting {greeting}")));
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let reader_pending = pending.clone();
        let reader_path = path.to_path_buf();
        let reader = tokio::spawn(async move {
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    Ok(None) | Err(_) => break,
                };
                let msg: Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(path = %reader_path.display(), error = %e, "unparseable QMP line");
                        continue;
                    }
                };
                if let Some(event) = msg.get("event").and_then(Value::as_str) {
                    let data = msg.get("data").cloned().unwrap_or(Value::Null);
                    tracing::debug!(path = %reader_path.display(), event, "QMP event");
                    let _ = events_tx.send(QmpEvent { event: event.to_string(), data });
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let result = if let Some(ret) = msg.get("return") {
                    Ok(ret.clone())
                } else {
                    let desc =
                        msg.pointer("/error/desc").and_then(Value::as_str).unwrap_or("unknown error").to_string();
                    Err(HypervisorError::CommandFailed { command: "qmp".into(), code: None, stderr: desc })
                };
                let waiter = reader_pending.lock().ok().and_then(|mut p| p.as_mut().and_then(|m| m.remove(&id)));
                if let Some(w) = waiter {
                    let _ = w.send(result);
                }
            }
            // Closed: fail whoever still waits, and refuse new commands.
            if let Ok(mut p) = reader_pending.lock() {
                p.take();
            }
        });
        let qmp = Qmp {
            path: path.to_path_buf(),
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            reader,
        };
        qmp.execute("qmp_capabilities", None, Duration::from_secs(5)).await?;
        Ok((qmp, events_rx))
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.pending.lock().map(|p| p.is_none()).unwrap_or(true)
    }

    /// Runs one command and returns its `return` member.
    #[tracing::instrument(level = "debug", name = "qmp", skip(self, arguments), fields(path = %self.path.display()))]
    pub async fn execute(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().map_err(|_| qmp_err(&self.path, "poisoned"))?;
            match p.as_mut() {
                Some(map) => {
                    map.insert(id, tx);
                }
                None => return Err(qmp_err(&self.path, "connection closed")),
            }
        }
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        let outcome = tokio::time::timeout(timeout, async {
            write.await.map_err(|e| qmp_err(&self.path, e))?;
            rx.await.map_err(|_| qmp_err(&self.path, "connection closed"))?
        })
        .await;
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(HypervisorError::CommandFailed { stderr, code, .. })) => {
                Err(HypervisorError::CommandFailed { command: format!("qmp {command}"), code, stderr })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock()
                    && let Some(m) = p.as_mut()
                {
                    m.remove(&id);
                }
                Err(HypervisorError::Timeout { command: format!("qmp {command}"), after: timeout })
            }
        }
    }

    /// Runs a human monitor (HMP) command line and returns its text output.
    pub async fn hmp(&self, command_line: &str, timeout: Duration) -> Result<String> {
        let out = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })), timeout).await?;
        Ok(out.as_str().unwrap_or_default().to_string())
    }
}
