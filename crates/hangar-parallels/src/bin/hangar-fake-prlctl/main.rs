//! A fake `prlctl`/`prlsrvctl` for tests of the Parallels driver.
//!
//! One binary plays both tools, chosen by the basename of `argv[0]` (tests make symlinks
//! named `prlctl` and `prlsrvctl`); called under its own name it takes the tool name as
//! its first argument. It keeps VM state in the folder named by `FAKE_PRL_STATE_DIR`
//! (one JSON file per VM, bundle folders `<name>.pvm`/`.macvm`, an event log) and takes a
//! file lock around every state access, so concurrent invocations are safe.
//!
//! Output follows the shapes of the real tools (JSON keys with spaces, `"2048Mb"` sizes,
//! `{uuid}` ids in snapshot lists and events). Options the real tools lack are refused.
//!
//! `FAKE_PRL_LOG=<file>` appends one line per invocation (tool and arguments).
//!
//! Host hardware: called as `sysctl` it answers `hw.ncpu`, `hw.memsize` and
//! `machdep.cpu.brand_string` from `host.json` at the top of the state folder (the
//! machine's own values without it), the facts the driver asks `sysctl` for.
//!
//! Host users: called as `sudo` it runs the tool as another host user (`FAKE_PRL_USER`);
//! each user has their own VMs (under `users/<name>/` of the state folder, root's at its
//! top), and root's `prlsrvctl user list` names every user that has a folder there.
//!
//! Fault injection: `FAKE_PRL_GARBLE=<subcommand>[,...]` prints garbled output instead of
//! doing the work; `FAKE_PRL_HANG=<subcommand>[,...]` hangs forever (with a child process in
//! the same process group, and both pids written to `<state>/hung-pids/`).

#![recursion_limit = "512"]

mod prlctl;
mod prlsrvctl;
mod render;
mod store;
mod sysctl;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// The one not-found message prlctl prints for an unknown VM.
pub const NOT_FOUND: &str = "Failed to get VM config: The virtual machine could not be found. The virtual machine is not registered in the virtual machine directory on your Mac. Contact the Parallels support team for assistance.";

/// Exit code of prlctl for failed operations.
pub const EXIT_FAILED: u8 = 255;
/// Exit code for invalid usage.
pub const EXIT_USAGE: u8 = 1;

/// A failure: message for stderr and the exit code.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
}

impl Fail {
    pub fn not_found() -> Self {
        Fail { code: EXIT_FAILED, message: NOT_FOUND.to_string() }
    }
    pub fn op(message: impl Into<String>) -> Self {
        Fail { code: EXIT_FAILED, message: message.into() }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Fail { code: EXIT_USAGE, message: message.into() }
    }
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        Fail { code: EXIT_FAILED, message: format!("Failed to {what}: {e}") }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Fail { code: EXIT_FAILED, message: message.into() }
    }
}

/// What a successful command produced.
pub enum Done {
    /// Print this to stdout and exit 0.
    Out(String),
    /// Exit with this code (the command already wrote its own output).
    Code(u8),
}

/// Parsed options of one subcommand.
#[derive(Debug, Default)]
pub struct Opts {
    pub pos: Vec<String>,
    pub values: Vec<(&'static str, String)>,
    pub flags: Vec<&'static str>,
}

impl Opts {
    pub fn value(&self, long: &str) -> Option<&str> {
        self.values.iter().rev().find(|(k, _)| *k == long).map(|(_, v)| v.as_str())
    }
    pub fn all(&self, long: &str) -> Vec<&str> {
        self.values.iter().filter(|(k, _)| *k == long).map(|(_, v)| v.as_str()).collect()
    }
    pub fn flag(&self, long: &str) -> bool {
        self.flags.contains(&long)
    }
}

/// One accepted option: long name, short alias (or ""), takes a value.
pub type OptSpec = (&'static str, &'static str, bool);

/// Parse `args` against `spec`; unknown options are a usage error, as with the real tool.
pub fn parse_opts(args: &[String], spec: &[OptSpec]) -> Result<Opts, Fail> {
    let mut opts = Opts::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg.starts_with('-') && arg.len() > 1 {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let Some((long, _, takes)) = spec.iter().find(|(l, s, _)| *l == name || (!s.is_empty() && *s == name))
            else {
                return Err(Fail::usage(format!("Unrecognized option: {name}\nSee 'prlctl --help' for usage.")));
            };
            if *takes {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| Fail::usage(format!("The {long} option requires a value.")))?
                    }
                };
                opts.values.push((long, value));
            } else {
                opts.flags.push(long);
            }
        } else {
            opts.pos.push(arg.clone());
        }
        i += 1;
    }
    Ok(opts)
}

fn listed(var: &str, sub: &str) -> bool {
    std::env::var(var).map(|v| v.split(',').any(|s| s.trim() == sub)).unwrap_or(false)
}

/// Hang forever with a child in our process group; record both pids for tests.
fn hang(state: Option<&PathBuf>) -> ! {
    let child = std::process::Command::new("sleep").arg("100000").spawn();
    if let Some(dir) = state {
        let dir = dir.join("hung-pids");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(std::process::id().to_string()), "");
        if let Ok(child) = &child {
            let _ = std::fs::write(dir.join(child.id().to_string()), "");
        }
    }
    if let Ok(mut child) = child {
        let _ = child.wait();
    }
    loop {
        std::thread::park();
    }
}

fn garbled(sub: &str) -> String {
    format!("[{{\"ID\": \"{{7d3c\u{1b}[0m\u{fffd}\u{fffd} PRL_ERR {sub} \"Hardware\": {{\"cpu\": [,,\n")
}

/// The host user the fake runs as: `FAKE_PRL_USER` (set by the fake `sudo`), else root.
pub fn current_user() -> String {
    std::env::var("FAKE_PRL_USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".to_string())
}

/// The fake's state folder for the current user: the root of `FAKE_PRL_STATE_DIR` for root
/// (the agent's own user), `users/<name>/` under it for another host user, so each user
/// has their own VM list, as with Parallels Desktop.
pub fn user_state(base: &std::path::Path, user: &str) -> PathBuf {
    if user == "root" { base.to_path_buf() } else { base.join("users").join(user) }
}

/// Called as `sudo -n -H -u USER -- PROGRAM ARGS...` (the driver's form when it runs as
/// root): run PROGRAM as the fake host user USER (`FAKE_PRL_USER`).
fn sudo(args: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let mut user = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-n" | "-H" => {}
            "-u" => {
                i += 1;
                user = args.get(i).cloned();
            }
            "--" => {
                i += 1;
                break;
            }
            _ => break,
        }
        i += 1;
    }
    let (Some(user), Some(program)) = (user, args.get(i)) else {
        eprintln!("sudo: usage: sudo -n -H -u USER -- PROGRAM [ARGS...]");
        return ExitCode::from(EXIT_USAGE);
    };
    let err =
        std::process::Command::new(program).args(&args[i + 1..]).env("FAKE_PRL_USER", &user).env("USER", &user).exec();
    eprintln!("sudo: {program}: {err}");
    ExitCode::from(EXIT_FAILED)
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let mut tool = std::path::Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    args.remove(0);
    if tool == "sudo" {
        return sudo(&args);
    }
    if tool != "prlctl" && tool != "prlsrvctl" && tool != "sysctl" {
        match args.first().map(String::as_str) {
            Some(t @ ("prlctl" | "prlsrvctl" | "sysctl")) => {
                tool = t.to_string();
                args.remove(0);
            }
            _ => {
                eprintln!(
                    "hangar-fake-prlctl: call me as prlctl, prlsrvctl or sysctl (via a symlink or as the first argument)"
                );
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let state_dir = std::env::var_os("FAKE_PRL_STATE_DIR").map(PathBuf::from);
    let sub = args.first().cloned().unwrap_or_default();
    if let Some(log) = std::env::var_os("FAKE_PRL_LOG") {
        // One line per invocation (tool and argv), for tests that count calls.
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{tool} {}", args.join(" "));
        }
    }
    if listed("FAKE_PRL_HANG", &sub) {
        hang(state_dir.as_ref());
    }
    if listed("FAKE_PRL_GARBLE", &sub) {
        print!("{}", garbled(&sub));
        let _ = std::io::stdout().flush();
        return ExitCode::SUCCESS;
    }
    let result =
        if tool == "sysctl" { sysctl::run(state_dir.as_deref(), &args) } else { run_tool(&tool, state_dir, &args) };
    match result {
        Ok(Done::Out(text)) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        Ok(Done::Code(code)) => ExitCode::from(code),
        Err(fail) => {
            eprintln!("{}", fail.message);
            ExitCode::from(fail.code)
        }
    }
}

/// `prlctl` or `prlsrvctl` on the state folder.
fn run_tool(tool: &str, state_dir: Option<PathBuf>, args: &[String]) -> Result<Done, Fail> {
    let Some(state_dir) = state_dir else {
        return Err(Fail::op(format!(
            "{tool}: FAKE_PRL_STATE_DIR is not set (this is the Hangar test double, not Parallels Desktop)"
        )));
    };
    store::Store::open(user_state(&state_dir, &current_user()))
        .and_then(|store| if tool == "prlctl" { prlctl::run(&store, args) } else { prlsrvctl::run(&store, args) })
}
