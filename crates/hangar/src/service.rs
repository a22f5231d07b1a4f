//! `hangar service install|uninstall|status`: run Hangar as a system service, a systemd unit
//! on Linux or a launchd daemon on macOS, for the server (`--role server`: the api,
//! orchestrator and catalog modules) or a host agent (`--role agent`: api, host and
//! reverse_proxy).
//!
//! Secrets never go into the unit or the plist. Every key given with `--env` that is a secret
//! (the keys `hangar config keys` marks secret, and any name that says password, secret, token,
//! private key, API key or DATABASE_URL) goes into a separate file of mode 0600 in the config
//! folder: a systemd `EnvironmentFile=`, or on macOS (launchd has no such thing) a Hangar
//! config file (`{"environment": {...}}`) passed with `--config`. The other keys are written
//! in the unit, where `systemctl cat` shows them.
//!
//! `install` loads the service (`systemctl daemon-reload` then `enable --now`, or `launchctl
//! bootstrap`) only when the service manager runs and the file went to its own folder; else it
//! says what to run. `--dry-run` prints what would be written (secrets masked).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::output::{Output, print};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Write the unit (or plist) and its environment file, then enable and start it when the
    /// service manager runs.
    Install(InstallArgs),
    /// Stop and disable the service, remove the unit (or plist) and its environment file. The
    /// data and log folders are kept.
    Uninstall(Target),
    /// Whether the service is installed, where its files are and what the service manager says.
    Status(Target),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The control plane: api, orchestrator and catalog modules.
    Server,
    /// A host agent: api, host and reverse_proxy modules.
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Manager {
    Systemd,
    Launchd,
}

#[derive(Args, Clone)]
pub struct Target {
    /// Service name: the unit `NAME.service`, the launchd label `com.hangar.NAME`.
    #[arg(long, default_value = "hangar")]
    name: String,
    /// Service manager (default: systemd on Linux, launchd on macOS).
    #[arg(long, value_enum)]
    manager: Option<Manager>,
    /// Folder of the unit or plist (default /etc/systemd/system or /Library/LaunchDaemons).
    /// The service is loaded only when it goes to the default folder.
    #[arg(long, env = "SYSTEMD_UNIT_DIR")]
    unit_dir: Option<PathBuf>,
    /// Folder of the secrets file NAME.env (mode 0600; default /etc/hangar, on macOS
    /// /usr/local/etc/hangar).
    #[arg(long)]
    config_dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct InstallArgs {
    #[command(flatten)]
    target: Target,
    /// What the service runs.
    #[arg(long, value_enum, default_value = "server")]
    role: Role,
    /// Run as this user (it must exist); its data and log folders are given to it.
    #[arg(long)]
    user: Option<String>,
    /// Data folder (DATABASE_FOLDER; default /var/lib/NAME).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Folder of the log file hangar.log (LOG_FILE_PATH; default /var/log/NAME).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// HTTP port (API_PORT).
    #[arg(long)]
    port: Option<u16>,
    /// A configuration key for the service: --env KEY=VALUE (repeatable). Secret keys go to
    /// the 0600 environment file, the others into the unit.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A file of KEY=VALUE lines (such as ROOT_PASSWORD=...) added to the environment file.
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// The hangar executable the service runs (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Write the files but do not enable or start the service.
    #[arg(long)]
    no_start: bool,
    /// Print what would be written (secrets masked) and change nothing.
    #[arg(long)]
    dry_run: bool,
}

impl Target {
    fn manager(&self) -> Manager {
        self.manager.unwrap_or(if cfg!(target_os = "macos") { Manager::Launchd } else { Manager::Systemd })
    }

    fn check_name(&self) -> Result<()> {
        let n = &self.name;
        let ok = !n.is_empty()
            && n.len() <= 64
            && !n.starts_with(['-', '.'])
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            bail!("--name {n:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '-' or '.'");
        }
        Ok(())
    }

    fn default_unit_dir(&self) -> PathBuf {
        match self.manager() {
            Manager::Systemd => PathBuf::from("/etc/systemd/system"),
            Manager::Launchd => PathBuf::from("/Library/LaunchDaemons"),
        }
    }

    /// Whether the unit goes to the service manager's own folder (then it may be loaded).
    fn in_default_dir(&self) -> bool {
        self.unit_dir.as_ref().is_none_or(|d| *d == self.default_unit_dir())
    }

    fn label(&self) -> String {
        format!("com.hangar.{}", self.name)
    }

    fn unit_path(&self) -> PathBuf {
        let dir = self.unit_dir.clone().unwrap_or_else(|| self.default_unit_dir());
        match self.manager() {
            Manager::Systemd => dir.join(format!("{}.service", self.name)),
            Manager::Launchd => dir.join(format!("{}.plist", self.label())),
        }
    }

    fn secrets_path(&self) -> PathBuf {
        let dir = self.config_dir.clone().unwrap_or_else(|| match self.manager() {
            Manager::Systemd => PathBuf::from("/etc/hangar"),
            Manager::Launchd => PathBuf::from("/usr/local/etc/hangar"),
        });
        match self.manager() {
            Manager::Systemd => dir.join(format!("{}.env", self.name)),
            Manager::Launchd => dir.join(format!("{}.secrets.json", self.name)),
        }
    }
}

/// Whether a key's value must stay out of the unit.
fn is_secret(key: &str) -> bool {
    if crate::config::KEYS.iter().any(|k| k.name == key && k.secret) {
        return true;
    }
    let k = key.to_ascii_uppercase();
    if k.ends_with("_FILE") || k.ends_with("_PATH") {
        return false;
    }
    ["PASSWORD", "SECRET", "TOKEN", "PRIVATE_KEY", "API_KEY", "DATABASE_URL", "CONNECTION", "CREDENTIAL"]
        .iter()
        .any(|w| k.contains(w))
}

fn parse_kv(kv: &str, from: &str) -> Result<(String, String)> {
    let (k, v) = kv.split_once('=').with_context(|| format!("{from}: write KEY=VALUE"))?;
    let k = k.trim();
    if k.is_empty()
        || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        || k.starts_with(|c: char| c.is_ascii_digit())
    {
        bail!("{from}: {k:?} is not a variable name (letters, digits and '_')");
    }
    if v.contains(['\n', '\r', '\0']) {
        bail!("{from}: the value of {k} has a line break or NUL, which a service environment cannot hold");
    }
    Ok((k.to_string(), v.to_string()))
}

/// Quote one ExecStart argument for systemd: `%` and `$` are systemd's, quotes and
/// backslashes are escaped inside double quotes.
fn systemd_arg(a: &str) -> String {
    let a = a.replace('%', "%%").replace('$', "$$");
    if !a.is_empty() && !a.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        return a;
    }
    format!("\"{}\"", a.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An `Environment=` assignment: `%` is systemd's, quotes and backslashes are escaped inside
/// double quotes (`$` is not expanded there).
fn systemd_env(k: &str, v: &str) -> String {
    let a = format!("{k}={v}").replace('%', "%%");
    format!("\"{}\"", a.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A double-quoted value for an environment file (the escapes of systemd's parser and of
/// the shell alike).
fn env_file_value(v: &str) -> String {
    let mut s = String::from("\"");
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '`' | '$') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Everything an install writes, computed before anything is written.
struct Plan {
    manager: Manager,
    unit_path: PathBuf,
    unit: String,
    secrets_path: PathBuf,
    /// The secrets file's content.
    secrets: String,
    /// Names of the keys in the secrets file (for messages; never their values).
    secret_keys: Vec<String>,
    data_dir: PathBuf,
    log_dir: PathBuf,
    program: Vec<String>,
}

fn plan(a: &InstallArgs) -> Result<Plan> {
    let t = &a.target;
    t.check_name()?;
    let manager = t.manager();
    let (data_default, log_default) = match manager {
        Manager::Systemd => ("/var/lib", "/var/log"),
        Manager::Launchd => ("/usr/local/var/lib", "/usr/local/var/log"),
    };
    let data_dir = a.data_dir.clone().unwrap_or_else(|| Path::new(data_default).join(&t.name));
    let log_dir = a.log_dir.clone().unwrap_or_else(|| Path::new(log_default).join(&t.name));
    for (what, p) in [("--data-dir", &data_dir), ("--log-dir", &log_dir)] {
        if !p.is_absolute() {
            bail!("{what} {}: give an absolute path (a service does not start in your folder)", p.display());
        }
    }
    let binary = match &a.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find this executable; give --binary PATH")?,
    };
    let binary = std::fs::canonicalize(&binary).unwrap_or(binary);
    if !binary.is_absolute() {
        bail!("--binary {}: give an absolute path", binary.display());
    }

    // The environment: the role's modules and the log file first, then --env over them.
    let modules = match a.role {
        Role::Server => "api,orchestrator,catalog",
        Role::Agent => "api,host,reverse_proxy",
    };
    let mut env: Vec<(String, String)> = vec![
        ("ENABLED_MODULES".into(), modules.into()),
        ("LOG_TO_FILE".into(), "true".into()),
        ("LOG_FILE_PATH".into(), log_dir.display().to_string()),
    ];
    if let Some(p) = a.port {
        env.push(("API_PORT".into(), p.to_string()));
    }
    let mut given = Vec::new();
    for kv in &a.env {
        // The message names the key only: the value may be a secret.
        let key = kv.split_once('=').map_or(kv.as_str(), |x| x.0);
        given.push(parse_kv(kv, &format!("--env {key}"))?);
    }
    if let Some(f) = &a.env_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read --env-file {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (k, v) = parse_kv(line, &format!("{} line {}", f.display(), i + 1))?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            given.push((k, v.to_string()));
        }
    }
    for (k, v) in given {
        if matches!(k.as_str(), "DATABASE_FOLDER") {
            bail!("give the data folder with --data-dir, not as {k}");
        }
        env.retain(|(e, _)| *e != k);
        env.push((k, v));
    }
    let (secret, plain): (Vec<_>, Vec<_>) = env.into_iter().partition(|(k, _)| is_secret(k));
    let secret_keys: Vec<String> = secret.iter().map(|(k, _)| k.clone()).collect();
    let secrets_path = t.secrets_path();

    let mut program =
        vec![binary.display().to_string(), "serve".into(), "--data-dir".into(), data_dir.display().to_string()];
    let role_text = match a.role {
        Role::Server => "Hangar server (api, orchestrator, catalog)",
        Role::Agent => "Hangar host agent (api, host, reverse_proxy)",
    };
    let (unit, secrets) = match manager {
        Manager::Systemd => {
            let mut u = String::new();
            let role = if a.role == Role::Server { "server" } else { "agent" };
            let _ = writeln!(u, "# Written by `hangar service install --role {role}`.");
            let _ = writeln!(u, "# Secrets are in {} (mode 0600), never here.", secrets_path.display());
            let _ = writeln!(u, "[Unit]\nDescription={role_text}\nDocumentation=man:hangar(1)");
            let _ = writeln!(u, "After=network-online.target\nWants=network-online.target\n");
            let _ = writeln!(u, "[Service]\nType=simple");
            if let Some(user) = &a.user {
                let _ = writeln!(u, "User={user}");
            }
            let _ = writeln!(u, "WorkingDirectory={}", data_dir.display());
            for (k, v) in &plain {
                let _ = writeln!(u, "Environment={}", systemd_env(k, v));
            }
            let _ = writeln!(u, "EnvironmentFile={}", secrets_path.display());
            let exec: Vec<String> = program.iter().map(|p| systemd_arg(p)).collect();
            let _ = writeln!(u, "ExecStart={}", exec.join(" "));
            let _ = writeln!(u, "Restart=on-failure\nRestartSec=5\nTimeoutStopSec=30\nLimitNOFILE=65536");
            if a.role == Role::Server {
                // The server needs nothing beyond its folders; an agent runs QEMU (KVM, the
                // setuid bridge helper) or prlctl, which these settings would break.
                let _ = writeln!(u, "NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=full");
            }
            let _ = writeln!(u, "\n[Install]\nWantedBy=multi-user.target");
            let mut s = String::from("# Secrets of the hangar service (EnvironmentFile); keep this file mode 0600.\n");
            for (k, v) in &secret {
                let _ = writeln!(s, "{k}={}", env_file_value(v));
            }
            (u, s)
        }
        Manager::Launchd => {
            program.push("--config".into());
            program.push(secrets_path.display().to_string());
            let mut u = String::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\">\n<dict>\n",
            );
            let kv = |u: &mut String, k: &str, v: &str| {
                let _ = writeln!(u, "  <key>{}</key>\n  <string>{}</string>", xml_escape(k), xml_escape(v));
            };
            kv(&mut u, "Label", &t.label());
            u.push_str("  <key>ProgramArguments</key>\n  <array>\n");
            for p in &program {
                let _ = writeln!(u, "    <string>{}</string>", xml_escape(p));
            }
            u.push_str("  </array>\n  <key>EnvironmentVariables</key>\n  <dict>\n");
            for (k, v) in &plain {
                let _ = writeln!(u, "    <key>{}</key>\n    <string>{}</string>", xml_escape(k), xml_escape(v));
            }
            u.push_str("  </dict>\n");
            if let Some(user) = &a.user {
                kv(&mut u, "UserName", user);
            }
            kv(&mut u, "WorkingDirectory", &data_dir.display().to_string());
            kv(&mut u, "StandardOutPath", &log_dir.join("stdout.log").display().to_string());
            kv(&mut u, "StandardErrorPath", &log_dir.join("stderr.log").display().to_string());
            u.push_str("  <key>RunAtLoad</key>\n  <true/>\n  <key>KeepAlive</key>\n  <dict>\n    <key>SuccessfulExit</key>\n    <false/>\n  </dict>\n");
            u.push_str("</dict>\n</plist>\n");
            let map: serde_json::Map<String, serde_json::Value> =
                secret.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            let s = serde_json::to_string_pretty(&json!({ "environment": map }))? + "\n";
            (u, s)
        }
    };
    Ok(Plan { manager, unit_path: t.unit_path(), unit, secrets_path, secrets, secret_keys, data_dir, log_dir, program })
}

/// Whether systemd is the running init (as `sd_booted()` decides).
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn launchd_runs() -> bool {
    cfg!(target_os = "macos")
}

fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program} {}", args.join(" ")))?;
    if !st.success() {
        bail!("{program} {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// uid and gid of a user, through `id` (so NSS users count too).
#[cfg(unix)]
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "--", user]).output().context("cannot run id")?;
        if !out.status.success() {
            bail!("--user {user}: no such user on this machine (create it first, e.g. `useradd --system {user}`)");
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("id {flag} {user}: not a number"))
    };
    Ok((id("-u")?, id("-g")?))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        // An existing file keeps its mode on open: set it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    use std::io::Write;
    f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

fn denied_hint(e: anyhow::Error, path: &Path) -> anyhow::Error {
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if denied {
        e.context(format!(
            "{} is not writable: run as root (sudo), or give --unit-dir and --config-dir folders you can write",
            path.display()
        ))
    } else {
        e
    }
}

pub fn run(cmd: ServiceCommand, out: Output) -> Result<()> {
    match cmd {
        ServiceCommand::Install(a) => install(&a, out),
        ServiceCommand::Uninstall(t) => uninstall(&t, out),
        ServiceCommand::Status(t) => status(&t, out),
    }
}

fn install(a: &InstallArgs, out: Output) -> Result<()> {
    let p = plan(a)?;
    if a.dry_run {
        println!("# {}", p.unit_path.display());
        print!("{}", p.unit);
        println!("# {} (mode 0600), values not shown:", p.secrets_path.display());
        for k in &p.secret_keys {
            println!("#   {k}=********");
        }
        return Ok(());
    }
    #[cfg(unix)]
    let ids = a.user.as_deref().map(user_ids).transpose()?;
    for d in [&p.data_dir, &p.log_dir] {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create {}", d.display()))
            .map_err(|e| denied_hint(e, d))?;
        #[cfg(unix)]
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to the service's user (run as root)", d.display()))?;
        }
    }
    write_private(&p.secrets_path, &p.secrets).map_err(|e| denied_hint(e, &p.secrets_path))?;
    if let Some(dir) = p.unit_path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {}", dir.display()))
            .map_err(|e| denied_hint(e, dir))?;
    }
    std::fs::write(&p.unit_path, &p.unit)
        .with_context(|| format!("cannot write {}", p.unit_path.display()))
        .map_err(|e| denied_hint(e, &p.unit_path))?;

    let t = &a.target;
    let started = if a.no_start {
        false
    } else {
        match p.manager {
            Manager::Systemd if systemd_runs() && t.in_default_dir() => {
                run_tool("systemctl", &["daemon-reload"])?;
                run_tool("systemctl", &["enable", "--now", &format!("{}.service", t.name)])?;
                true
            }
            Manager::Launchd if launchd_runs() && t.in_default_dir() => {
                let plist = p.unit_path.display().to_string();
                run_tool("launchctl", &["bootstrap", "system", &plist])?;
                true
            }
            _ => false,
        }
    };
    print(
        out,
        &json!({
            "name": t.name,
            "unit": p.unit_path.display().to_string(),
            "environment_file": p.secrets_path.display().to_string(),
            "data_dir": p.data_dir.display().to_string(),
            "log_file": p.log_dir.join("hangar.log").display().to_string(),
            "started": started,
        }),
        &["name", "unit", "environment_file", "data_dir", "log_file", "started"],
    );
    if !started && out == Output::Table {
        let why = if a.no_start {
            "--no-start was given".to_string()
        } else if !t.in_default_dir() {
            format!("the file is not in {}", t.default_unit_dir().display())
        } else {
            match p.manager {
                Manager::Systemd => "systemd is not running on this machine (no /run/systemd/system)".to_string(),
                Manager::Launchd => "launchd runs only on macOS".to_string(),
            }
        };
        eprintln!("The service was written but not started: {why}.");
        match p.manager {
            Manager::Systemd => {
                eprintln!("Where systemd runs:  systemctl daemon-reload && systemctl enable --now {}.service", t.name);
                eprintln!(
                    "Without systemd, start it by hand:  set -a; . {}; set +a; {}",
                    p.secrets_path.display(),
                    p.program.join(" ")
                );
            }
            Manager::Launchd => eprintln!("On macOS:  sudo launchctl bootstrap system {}", p.unit_path.display()),
        }
    }
    Ok(())
}

fn uninstall(t: &Target, out: Output) -> Result<()> {
    t.check_name()?;
    let unit = t.unit_path();
    let secrets = t.secrets_path();
    if !unit.exists() && !secrets.exists() {
        bail!("no service {} is installed ({} does not exist)", t.name, unit.display());
    }
    let mut stopped = false;
    match t.manager() {
        Manager::Systemd if systemd_runs() && t.in_default_dir() => {
            // A unit that is not loaded cannot be stopped: that is not an error here.
            let _ = run_tool("systemctl", &["disable", "--now", &format!("{}.service", t.name)]);
            stopped = true;
        }
        Manager::Launchd if launchd_runs() && t.in_default_dir() => {
            let _ = run_tool("launchctl", &["bootout", &format!("system/{}", t.label())]);
            stopped = true;
        }
        _ => {}
    }
    for f in [&unit, &secrets] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(denied_hint(anyhow::Error::new(e).context(format!("cannot remove {}", f.display())), f));
            }
        }
    }
    if stopped && t.manager() == Manager::Systemd {
        run_tool("systemctl", &["daemon-reload"])?;
    }
    print(
        out,
        &json!({"name": t.name, "removed": [unit.display().to_string(), secrets.display().to_string()], "stopped": stopped}),
        &["name", "removed", "stopped"],
    );
    Ok(())
}

fn status(t: &Target, out: Output) -> Result<()> {
    t.check_name()?;
    let unit = t.unit_path();
    let secrets = t.secrets_path();
    let installed = unit.exists();
    let query = |program: &str, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let (manager_runs, state, enabled) = match t.manager() {
        Manager::Systemd if systemd_runs() => {
            let u = format!("{}.service", t.name);
            (true, query("systemctl", &["is-active", &u]), query("systemctl", &["is-enabled", &u]))
        }
        Manager::Launchd if launchd_runs() => {
            let loaded = Command::new("launchctl")
                .args(["print", &format!("system/{}", t.label())])
                .output()
                .is_ok_and(|o| o.status.success());
            (true, if loaded { "loaded".into() } else { "not loaded".into() }, String::new())
        }
        _ => (false, "unknown: the service manager is not running here".into(), String::new()),
    };
    let secrets_mode = {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&secrets).map(|m| format!("{:o}", m.permissions().mode() & 0o777)).unwrap_or_default()
        }
        #[cfg(not(unix))]
        {
            String::new()
        }
    };
    print(
        out,
        &json!({
            "name": t.name,
            "installed": installed,
            "unit": unit.display().to_string(),
            "environment_file": secrets.display().to_string(),
            "environment_file_mode": secrets_mode,
            "manager_running": manager_runs,
            "state": state,
            "enabled": enabled,
        }),
        &["name", "installed", "unit", "environment_file_mode", "state", "enabled"],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_told_apart() {
        assert!(is_secret("ROOT_PASSWORD") && is_secret("JWT_HMACS_SECRET") && is_secret("DATABASE_URL"));
        assert!(is_secret("HANGAR_API_KEY") && is_secret("SOME_TOKEN"));
        assert!(!is_secret("API_PORT") && !is_secret("ROOT_PASSWORD_FILE") && !is_secret("LOG_FILE_PATH"));
    }

    #[test]
    fn arguments_and_values_are_quoted() {
        assert_eq!(systemd_arg("/usr/bin/hangar"), "/usr/bin/hangar");
        assert_eq!(systemd_arg("/a b/c"), "\"/a b/c\"");
        assert_eq!(systemd_arg("50%$x"), "50%%$$x");
        assert_eq!(env_file_value("a\"b$c\\d"), "\"a\\\"b\\$c\\\\d\"");
        assert!(parse_kv("A=1\nB=2", "t").is_err());
        assert!(parse_kv("1A=x", "t").is_err());
        assert_eq!(parse_kv("A_B=x=y", "t").ok(), Some(("A_B".into(), "x=y".into())));
    }
}
