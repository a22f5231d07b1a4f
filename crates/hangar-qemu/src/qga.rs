//! A QEMU guest agent client: the `guest-sync-delimited` handshake, then plain commands.
//!
//! The agent's socket takes one client at a time and its answers carry no id, so a
//! session syncs first (skipping stale answers left from an earlier client) and is
//! thrown away after any timeout, since a late answer would otherwise be taken for the
//! next command's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hangar_hypervisor::{HypervisorError, Result};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// One synced session with a guest agent.
#[derive(Debug)]
pub struct Qga {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

fn guest_err(what: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Guest(what.to_string())
}

impl Qga {
    /// Connects and syncs, retrying until `deadline` (the agent may still be booting).
    #[tracing::instrument(level = "debug", name = "qga_connect", fields(path = %path.display()))]
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Qga> {
        let mut last_err = String::from("no attempt");
        loop {
            if Instant::now() >= deadline {
                return Err(HypervisorError::Guest(format!(
                    "the guest agent on {} did not answer in time ({last_err})",
                    path.display()
                )));
            }
            match UnixStream::connect(path).await {
                Ok(s) => {
                    let mut q = Qga { path: path.to_path_buf(), stream: BufReader::new(s) };
                    match q.sync(deadline).await {
                        Ok(()) => return Ok(q),
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => {
                    last_err = format!("cannot connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Sends `0xFF` + `guest-sync-delimited` until the agent echoes our id, resending every
    /// second (an agent that is not up yet drops what it is sent).
    async fn sync(&mut self, deadline: Instant) -> Result<()> {
        loop {
            let id: u64 = u64::from(uuid::Uuid::new_v4().as_fields().0);
            let mut msg = vec![0xFFu8];
            msg.extend_from_slice(
                json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}).to_string().as_bytes(),
            );
            msg.push(b'\n');
            self.stream.get_mut().write_all(&msg).await.map_err(guest_err)?;
            let attempt_end = (Instant::now() + Duration::from_secs(1)).min(deadline);
            loop {
                let remaining = attempt_end.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                match tokio::time::timeout(remaining, self.read_message()).await {
                    Ok(Ok(v)) => {
                        if v.get("return").and_then(Value::as_u64) == Some(id) {
                            return Ok(());
                        }
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => break,
                }
            }
            if Instant::now() >= deadline {
                return Err(guest_err("guest-sync timed out"));
            }
        }
    }

    /// Reads one JSON message, skipping the 0xFF delimiter and blank lines.
    async fn read_message(&mut self) -> Result<Value> {
        loop {
            let mut buf = Vec::new();
            let n = self.stream.read_until(b'\n', &mut buf).await.map_err(guest_err)?;
            if n == 0 {
                return Err(guest_err(format!("agent socket {} closed", self.path.display())));
            }
            buf.retain(|b| *b != 0xFF);
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(text) {
                Ok(v) => return Ok(v),
                Err(_) => continue,
            }
        }
    }

    /// Runs one agent command and returns its `return` member. On a timeout the session
    /// must be dropped (the caller does).
    #[tracing::instrument(level = "debug", name = "qga", skip(self, arguments))]
    pub async fn call(&mut self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let fut = async {
            self.stream.get_mut().write_all(&line).await.map_err(guest_err)?;
            let v = self.read_message().await?;
            if let Some(r) = v.get("return") {
                Ok(r.clone())
            } else {
                let desc = v.pointer("/error/desc").and_then(Value::as_str).unwrap_or("unknown error");
                Err(HypervisorError::Guest(format!("{command}: {desc}")))
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| HypervisorError::Timeout { command: format!("guest agent {command}"), after: timeout })?
    }
}
