//! External commands: never through a shell, always with a timeout, always in a span, and
//! spawned through [`hangar_proc::spawn`], so they die with the agent.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use hangar_hypervisor::{HypervisorError, Result};
use tokio::process::Command;
use tracing::Instrument;

/// What a finished command printed.
#[derive(Debug, Clone)]
pub(crate) struct CmdOutput {
    pub stdout: String,
}

fn display<S: AsRef<OsStr>>(program: &OsStr, args: &[S]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `program args...` and returns its standard output; a non-zero exit is an error
/// carrying standard error. The child is killed when `timeout` expires.
pub(crate) async fn run<P, S>(program: P, args: &[S], timeout: Duration) -> Result<CmdOutput>
where
    P: AsRef<OsStr>,
    S: AsRef<OsStr>,
{
    let program = program.as_ref();
    let shown = display(program, args);
    let span = tracing::debug_span!("command", command = %shown);
    async move {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let child = hangar_proc::spawn(cmd).map_err(|e| HypervisorError::CommandFailed {
            command: shown.clone(),
            code: None,
            stderr: format!("cannot start: {e}"),
        })?;
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(HypervisorError::CommandFailed { command: shown, code: None, stderr: e.to_string() });
            }
            Err(_) => {
                return Err(HypervisorError::Timeout { command: shown, after: timeout });
            }
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            tracing::debug!(code = ?out.status.code(), %stderr, "command failed");
            return Err(HypervisorError::CommandFailed { command: shown, code: out.status.code(), stderr });
        }
        Ok(CmdOutput { stdout: String::from_utf8_lossy(&out.stdout).into_owned() })
    }
    .instrument(span)
    .await
}
