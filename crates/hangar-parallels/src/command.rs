//! Running `prlctl`/`prlsrvctl`: argv only (no shell), optionally as the VM's owner, with a
//! deadline per call. On a deadline the whole process group is signalled (TERM, then KILL
//! after a grace period), so wrappers such as `sudo` and anything the tool started go too.
//! Every call is spawned through [`hangar_proc::spawn`], so it also dies with the agent.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use hangar_hypervisor::{HypervisorError, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tracing::{Instrument, debug, warn};

/// How VM-scoped commands run when the agent is root and the VM has an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunAs {
    /// Wrap as `sudo -n -H -u OWNER -- prlctl ...` (what the reference service does).
    #[default]
    Sudo,
    /// Spawn `prlctl` directly with the owner's uid/gid (`Command::uid`/`gid`), `HOME`,
    /// `USER` and `LOGNAME` set to the owner's.
    Setuid,
    /// Always run as the agent's own user.
    Never,
}

/// Which tool a command calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `prlctl`: VM operations.
    Prlctl,
    /// `prlsrvctl`: host and server settings.
    Prlsrvctl,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Prlctl => "prlctl",
            Tool::Prlsrvctl => "prlsrvctl",
        }
    }
}

/// A fully built command: what is spawned, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The tool called (used in error messages).
    pub tool: Tool,
    /// The tool's own arguments (without any `sudo` prefix).
    pub tool_args: Vec<String>,
    /// The program spawned (`prlctl`, or `sudo` when wrapping).
    pub program: PathBuf,
    /// Its full argv after the program.
    pub args: Vec<String>,
    /// With [`RunAs::Setuid`]: the host user to switch to before exec.
    pub setuid_user: Option<String>,
}

impl Invocation {
    /// Build the invocation of `tool` with `tool_args`, as `owner` when `is_root` and the
    /// mode asks for it. Pure: unit-tested for the argv it produces.
    pub fn build(
        tool: Tool,
        tool_path: &std::path::Path,
        tool_args: Vec<String>,
        owner: Option<&str>,
        run_as: RunAs,
        is_root: bool,
        sudo_path: &std::path::Path,
    ) -> Invocation {
        let owner = owner.filter(|o| !o.is_empty() && *o != "root" && is_root);
        match (owner, run_as) {
            (Some(user), RunAs::Sudo) => {
                let mut args = vec![
                    "-n".to_string(),
                    "-H".to_string(),
                    "-u".to_string(),
                    user.to_string(),
                    "--".to_string(),
                    tool_path.display().to_string(),
                ];
                args.extend(tool_args.iter().cloned());
                Invocation { tool, tool_args, program: sudo_path.to_path_buf(), args, setuid_user: None }
            }
            (Some(user), RunAs::Setuid) => Invocation {
                tool,
                args: tool_args.clone(),
                tool_args,
                program: tool_path.to_path_buf(),
                setuid_user: Some(user.to_string()),
            },
            _ => Invocation {
                tool,
                args: tool_args.clone(),
                tool_args,
                program: tool_path.to_path_buf(),
                setuid_user: None,
            },
        }
    }
}

impl fmt::Display for Invocation {
    /// `prlctl list -a -i --json`: the tool and its arguments, as named in errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tool.name())?;
        for a in &self.tool_args {
            if a.is_empty() || a.contains(char::is_whitespace) {
                write!(f, " {a:?}")?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// What to feed a command's standard input.
#[derive(Debug)]
pub enum Input {
    /// These bytes.
    Bytes(Vec<u8>),
    /// The contents of this host file, streamed.
    File(PathBuf),
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// `None` when a signal ended it.
    pub code: Option<i32>,
}

/// Sends a signal to a process group on drop unless disarmed: a dropped (cancelled) call
/// never leaves its process tree running.
pub(crate) struct GroupGuard(pub(crate) Option<Pid>);

impl GroupGuard {
    fn signal(&self, sig: Signal) {
        if let Some(pgid) = self.0 {
            match killpg(pgid, sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => warn!(pgid = pgid.as_raw(), %e, "cannot signal process group"),
            }
        }
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// Spawn settings shared by every call.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Extra environment for every call.
    pub env: BTreeMap<String, String>,
    /// Time between TERM and KILL after a deadline.
    pub kill_grace: Duration,
}

async fn read_all<R: AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut r) = r {
        let _ = r.read_to_end(&mut buf).await;
    }
    buf
}

impl Runner {
    /// Make the `tokio::process::Command` for an invocation (its own process group,
    /// killed on drop).
    pub fn command(&self, inv: &Invocation) -> Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(&inv.program);
        cmd.args(&inv.args).envs(&self.env).kill_on_drop(true).process_group(0);
        if let Some(user) = &inv.setuid_user {
            let entry = nix::unistd::User::from_name(user)
                .map_err(|e| HypervisorError::Unavailable(format!("cannot look up host user {user:?}: {e}")))?
                .ok_or_else(|| HypervisorError::InvalidInput(format!("no host user named {user:?}")))?;
            cmd.uid(entry.uid.as_raw())
                .gid(entry.gid.as_raw())
                .env("HOME", &entry.dir)
                .env("USER", user)
                .env("LOGNAME", user);
        }
        Ok(cmd)
    }

    /// Run an invocation to completion within `timeout`. A non-zero exit is not an error
    /// here (see [`Output::code`]); spawn failures, deadlines and I/O are.
    pub async fn run(&self, inv: &Invocation, input: Option<Input>, timeout: Duration) -> Result<Output> {
        let span = tracing::debug_span!("prl_command", command = %inv);
        self.run_inner(inv, input, timeout).instrument(span).await
    }

    async fn run_inner(&self, inv: &Invocation, input: Option<Input>, timeout: Duration) -> Result<Output> {
        let mut cmd = self.command(inv)?;
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = hangar_proc::spawn(cmd).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                HypervisorError::Unavailable(format!("{} not found: {e}", inv.program.display()))
            } else {
                HypervisorError::io(&inv.program, e)
            }
        })?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw);
        let mut guard = GroupGuard(pgid);
        let writer = match (input, child.stdin.take()) {
            (Some(input), Some(mut stdin)) => Some(tokio::spawn(async move {
                let res = match input {
                    Input::Bytes(b) => stdin.write_all(&b).await,
                    Input::File(p) => match tokio::fs::File::open(&p).await {
                        Ok(mut f) => tokio::io::copy(&mut f, &mut stdin).await.map(|_| ()),
                        Err(e) => Err(e),
                    },
                };
                let _ = stdin.shutdown().await;
                res
            })),
            _ => None,
        };
        let out_task = tokio::spawn(read_all(child.stdout.take()));
        let err_task = tokio::spawn(read_all(child.stderr.take()));

        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(HypervisorError::io(&inv.program, e)),
            Err(_) => {
                debug!("deadline reached; terminating the process group");
                guard.signal(Signal::SIGTERM);
                if tokio::time::timeout(self.kill_grace, child.wait()).await.is_err() {
                    guard.signal(Signal::SIGKILL);
                    let _ = child.kill().await;
                }
                // Anything left in the group (children that ignored TERM) goes now.
                guard.signal(Signal::SIGKILL);
                guard.disarm();
                out_task.abort();
                err_task.abort();
                if let Some(w) = writer {
                    w.abort();
                }
                return Err(HypervisorError::Timeout { command: inv.to_string(), after: timeout });
            }
        };
        guard.disarm();
        // Output pipes may be held open by leftovers of the tool; do not wait forever.
        let stdout =
            tokio::time::timeout(self.kill_grace, out_task).await.ok().and_then(|r| r.ok()).unwrap_or_default();
        let stderr =
            tokio::time::timeout(self.kill_grace, err_task).await.ok().and_then(|r| r.ok()).unwrap_or_default();
        if let Some(w) = writer
            && let Ok(Ok(Err(e))) = tokio::time::timeout(self.kill_grace, w).await
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(HypervisorError::io(&inv.program, e));
        }
        Ok(Output {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            code: status.code(),
        })
    }
}

/// Quote one word for a POSIX shell (single quotes; `'` becomes `'\''`).
pub fn sh_quote(word: &str) -> String {
    if !word.is_empty()
        && word.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':' | b'=' | b'@' | b'+' | b',')
        })
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sudo_wrapping_when_root_and_owned() {
        let inv = Invocation::build(
            Tool::Prlctl,
            Path::new("/usr/local/bin/prlctl"),
            args(&["start", "vm-1"]),
            Some("alice"),
            RunAs::Sudo,
            true,
            Path::new("/usr/bin/sudo"),
        );
        assert_eq!(inv.program, Path::new("/usr/bin/sudo"));
        assert_eq!(inv.args, args(&["-n", "-H", "-u", "alice", "--", "/usr/local/bin/prlctl", "start", "vm-1"]));
        assert_eq!(inv.setuid_user, None);
        assert_eq!(inv.to_string(), "prlctl start vm-1");
    }

    #[test]
    fn setuid_mode_keeps_argv_and_names_the_user() {
        let inv = Invocation::build(
            Tool::Prlctl,
            Path::new("/usr/local/bin/prlctl"),
            args(&["list", "-a", "-i", "--json"]),
            Some("bob"),
            RunAs::Setuid,
            true,
            Path::new("/usr/bin/sudo"),
        );
        assert_eq!(inv.program, Path::new("/usr/local/bin/prlctl"));
        assert_eq!(inv.args, args(&["list", "-a", "-i", "--json"]));
        assert_eq!(inv.setuid_user.as_deref(), Some("bob"));
    }

    #[test]
    fn no_wrapping_when_not_root_or_no_owner_or_owner_is_root() {
        for (owner, root, mode) in [
            (Some("alice"), false, RunAs::Sudo),
            (None, true, RunAs::Sudo),
            (Some("root"), true, RunAs::Sudo),
            (Some("alice"), true, RunAs::Never),
            (Some(""), true, RunAs::Setuid),
        ] {
            let inv = Invocation::build(
                Tool::Prlsrvctl,
                Path::new("prlsrvctl"),
                args(&["info", "--json"]),
                owner,
                mode,
                root,
                Path::new("/usr/bin/sudo"),
            );
            assert_eq!(inv.program, Path::new("prlsrvctl"), "{owner:?} {root} {mode:?}");
            assert_eq!(inv.args, args(&["info", "--json"]));
            assert_eq!(inv.setuid_user, None);
        }
    }

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let inv = Invocation::build(
            Tool::Prlctl,
            Path::new("prlctl"),
            args(&["set", "my vm", "--description", ""]),
            None,
            RunAs::Sudo,
            false,
            Path::new("sudo"),
        );
        assert_eq!(inv.to_string(), r#"prlctl set "my vm" --description """#);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("abc"), "abc");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }
}
