//! `hangar`: the server (`hangar serve`) and the CLI that manages it.

mod bundle;
mod catalog_cmd;
mod cli_extras;
mod client;
mod config;
mod db_cmd;
mod fanout;
mod health_cmd;
mod host_cmd;
mod import_pds;
mod leader;
mod logging;
mod metrics;
mod output;
mod pdfile_cmd;
mod pool_cmd;
mod runners;
mod serve;
mod service;
mod settings;
mod sso_cmd;
mod stats;
mod vm_cmd;

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::client::{Client, Credentials, seg};
use crate::config::Layers;
use crate::output::{Output, print};
use crate::settings::Settings;

#[derive(Parser)]
#[command(name = "hangar", version, about = "Disposable VMs for CI: server and CLI", propagate_version = true)]
struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    /// Server URL (default: the one from `hangar login`, or HANGAR_URL).
    #[arg(long, global = true)]
    url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct ServerConfigArgs {
    /// Configuration file: the reference's YAML or JSON (keys in its `environment:` map) or
    /// TOML. Default: the first prldevops_config or config (.local.yaml, .local.yml,
    /// .local.json, .yaml, .yml, .json, .toml) in the executable's folder, its
    /// prldevops_config folder, /etc/prl-devops-service or /etc/hangar.
    #[arg(long, env = "HANGAR_CONFIG")]
    config: Option<PathBuf>,
    /// The reference's `--KEY=value` flags, rewritten by `main` (below the environment).
    #[arg(long = "key-flag", hide = true, value_name = "KEY=VALUE")]
    key_flags: Vec<String>,
    /// Data folder (DATABASE_FOLDER).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP port (API_PORT).
    #[arg(long)]
    port: Option<u16>,
    /// Set any configuration key: --set KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ServerConfigArgs {
    fn layers(&self) -> Result<Layers> {
        let mut flags = Vec::new();
        for kv in &self.set {
            let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv:?}: write KEY=VALUE"))?;
            flags.push((k.to_string(), v.to_string()));
        }
        if let Some(d) = &self.data_dir {
            flags.push(("DATABASE_FOLDER".into(), d.display().to_string()));
        }
        if let Some(p) = self.port {
            flags.push(("API_PORT".into(), p.to_string()));
        }
        let mut key_flags = Vec::new();
        for kv in &self.key_flags {
            let (k, v) = kv.split_once('=').with_context(|| format!("--{kv:?}: write --KEY=value"))?;
            key_flags.push((k.to_string(), v.to_string()));
        }
        let file = match &self.config {
            Some(f) => Some(f.clone()),
            None => {
                std::env::current_exe().ok().and_then(|exe| config::find_config_file(&config::config_folders(&exe)))
            }
        };
        Layers::load_all(file.as_deref(), &key_flags, &|k| std::env::var(k).ok(), &flags)
    }

    /// The layered configuration and the typed settings parsed from it (every problem at once).
    fn load(&self) -> Result<(Layers, Settings)> {
        let l = self.layers()?;
        let s = Settings::from_layers(&l)?;
        Ok((l, s))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start the server with the enabled modules (`api`: the reference's name).
    #[command(alias = "api")]
    Serve(ServerConfigArgs),
    /// Offline operations on the store (stop the server first): the data folder, DATABASE_URL,
    /// or the database named by --url.
    Db {
        #[command(subcommand)]
        command: db_cmd::DbCommand,
    },
    /// Configuration reference.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Log in to a server and keep the token (mode 0600) for later commands.
    Login {
        #[arg(long, required_unless_present = "sso")]
        username: Option<String>,
        /// Read the password from standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Single sign-on through the server's OpenID provider (device code: open the URL
        /// shown and enter the code; a provider without the device grant gets a browser
        /// login that returns to this machine, as with --browser).
        #[arg(long, conflicts_with_all = ["username", "password_stdin"])]
        sso: bool,
        /// The provider's id when the server has several (`GET /api/v1/auth/providers`).
        #[arg(long, requires = "sso")]
        provider: Option<String>,
        /// With --sso: log in in a browser on this machine (authorization code with PKCE,
        /// back to a one-time listener on 127.0.0.1) instead of the device code.
        #[arg(long, requires = "sso")]
        browser: bool,
    },
    /// Forget the saved login.
    Logout,
    /// Users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Roles.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// Claims.
    Claim {
        #[command(subcommand)]
        command: ClaimCommand,
    },
    /// API keys.
    Apikey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Print the OpenAPI document (what the server serves at /api/v1/openapi.json).
    Openapi,
    /// Check that a server is live (GET /health/probe): exit status 0 if it answers, 1 if
    /// not. Default server: --url, HANGAR_URL, else this machine's API_PORT on 127.0.0.1.
    Health(health_cmd::HealthArgs),
    /// Write one tarball for an air-gapped install: the binary, the Docker image archive,
    /// the Helm chart, the Compose file, install.sh and SHA256SUMS.
    Bundle(bundle::BundleArgs),
    /// Catalog images: push, pull, list, get, taint, untaint, revoke, delete, import.
    Catalog {
        #[command(subcommand)]
        command: catalog_cmd::CatalogCommand,
    },
    /// Push an image as a PDFile describes it (the same as `hangar catalog push FILE`).
    Push(catalog_cmd::PushArgs),
    /// Pull as a PDFile describes it: with --host, the reference's pull (the VM is created
    /// on that Hangar host under MACHINE_NAME with OWNER, then CLONE, START_AFTER_PULL and
    /// EXECUTE); without, the image is downloaded into DESTINATION.
    Pull(pdfile_cmd::PullFileArgs),
    /// VMs of a host.
    Vm {
        #[command(subcommand)]
        command: vm_cmd::VmCommand,
    },
    /// The orchestrator's hosts: list, add, join, remove, enable, disable, token.
    Host {
        #[command(subcommand)]
        command: host_cmd::HostCommand,
    },
    /// Runner pools and their warm VMs: list, show, create, update, delete.
    Pool {
        #[command(subcommand)]
        command: pool_cmd::PoolCommand,
    },
    /// Commands run on a host agent: join an orchestrator.
    Agent {
        #[command(subcommand)]
        command: host_cmd::AgentCommand,
    },
    /// Run the server or a host agent as a systemd or launchd service.
    Service {
        #[command(subcommand)]
        command: service::ServiceCommand,
    },
    /// This CLI's version; with --check, the server's too and which of them to upgrade.
    Version {
        /// Compare with the server's version (GET /api/v1/version; needs a login).
        #[arg(long)]
        check: bool,
    },
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or with --dir write one page per command into a folder.
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The audit log (SUPER_USER).
    Audit {
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// List every configuration key with its default.
    Keys {
        /// As a Markdown table.
        #[arg(long)]
        markdown: bool,
    },
    /// Load the configuration as `hangar serve` would: the file used, every problem, and the
    /// reference keys given that Hangar does not honour (with why).
    Check(ServerConfigArgs),
}

#[derive(Subcommand)]
enum UserCommand {
    List,
    Get {
        user: String,
    },
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: Option<String>,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
    Delete {
        user: String,
    },
    Disable {
        user: String,
    },
    Enable {
        user: String,
    },
    Unlock {
        user: String,
    },
    AddRole {
        user: String,
        role: String,
    },
    RemoveRole {
        user: String,
        role: String,
    },
    AddClaim {
        user: String,
        claim: String,
    },
    RemoveClaim {
        user: String,
        claim: String,
    },
}

#[derive(Subcommand)]
enum RoleCommand {
    List,
    Get {
        role: String,
    },
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
    Delete {
        role: String,
    },
    AddClaim {
        role: String,
        claim: String,
    },
    RemoveClaim {
        role: String,
        claim: String,
    },
}

#[derive(Subcommand)]
enum ClaimCommand {
    List,
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    Delete {
        claim: String,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    List,
    /// Create a key; its secret is printed once.
    Create {
        name: String,
        /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
        /// Owner (default: you).
        #[arg(long)]
        user: Option<String>,
    },
    Delete {
        key: String,
    },
    Revoke {
        key: String,
    },
}

fn read_secret_stdin(what: &str) -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).with_context(|| format!("cannot read the {what} from standard input"))?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        bail!("the {what} read from standard input is empty");
    }
    Ok(s)
}

/// The reference's `--KEY=value` flags (an upper-case or `_` name, such as `--API_PORT=80`)
/// become `--key-flag KEY=value`; Hangar's own flags are lower-case with `-`. Only for the
/// commands that load the server configuration (`serve`, `api`, `config check`), and never
/// after `--`, so that arguments meant for a guest command pass untouched.
fn rewrite_key_flags(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let args: Vec<std::ffi::OsString> = args.collect();
    let words: Vec<&str> = args.iter().skip(1).filter_map(|a| a.to_str()).take_while(|a| *a != "--").collect();
    let loads_config =
        words.iter().any(|w| matches!(*w, "serve" | "api")) || words.windows(2).any(|w| w == ["config", "check"]);
    if !loads_config {
        return args;
    }
    let mut out = Vec::new();
    let mut rest = false;
    for a in args {
        if rest || a.to_str() == Some("--") {
            rest = true;
            out.push(a);
            continue;
        }
        let key = a.to_str().and_then(|t| t.strip_prefix("--")).and_then(|t| t.split_once('=')).filter(|(k, _)| {
            !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && k.bytes().any(|b| b.is_ascii_uppercase() || b == b'_')
        });
        match key {
            Some((k, v)) => {
                out.push("--key-flag".into());
                out.push(format!("{k}={v}").into());
            }
            None => out.push(a),
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(rewrite_key_flags(std::env::args_os()));
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What the reference's module names that are not modules here turn on.
fn reference_module(m: &str) -> &'static str {
    match m {
        "cors" => "CORS is on (as ENABLE_CORS=true)",
        "cache" => "the host image cache, held by the catalog module, which is started",
        "catalog_manager" => "the /catalog-managers routes, always served by the api module",
        _ => "",
    }
}

async fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    match cli.command {
        Command::Serve(cfg) => {
            let (l, s) = cfg.load()?;
            logging::init(&s.log)?;
            if let Some(f) = l.file() {
                tracing::info!(file = %f.display(), "configuration file read");
            }
            for (key, source, why) in l.unhonoured() {
                tracing::warn!(
                    "{key} (from the {source}) is a key of the reference service that Hangar does not honour: {why}"
                );
            }
            for m in &s.modules.reference_names {
                tracing::info!("ENABLED_MODULES names the reference's {m}: {}", reference_module(m));
            }
            serve::run(l, s).await
        }
        Command::Db { command } => db_cmd::run(command, cli.url.clone(), out).await,
        Command::Config { command: ConfigCommand::Check(cfg) } => {
            let l = cfg.layers()?;
            match l.file() {
                Some(f) => println!("configuration file: {}", f.display()),
                None => println!("configuration file: none found"),
            }
            for (key, source, why) in l.unhonoured() {
                println!("not honoured: {key} (from the {source}): {why}");
            }
            let s = Settings::from_layers(&l)?;
            for m in &s.modules.reference_names {
                println!("module {m}: {}", reference_module(m));
            }
            println!("configuration is valid");
            Ok(())
        }
        Command::Config { command: ConfigCommand::Keys { markdown } } => {
            if markdown {
                println!("| Key | Default | Meaning |\n|---|---|---|");
                for k in config::KEYS {
                    let d = if k.default.is_empty() { "–".to_string() } else { format!("`{}`", k.default) };
                    println!(
                        "| `{}` | {} | {}{} |",
                        k.name,
                        d,
                        k.help,
                        if k.secret { " (secret: never logged)" } else { "" }
                    );
                }
            } else {
                let rows: Vec<Value> = config::KEYS
                    .iter()
                    .map(|k| json!({"key": k.name, "default": k.default, "meaning": k.help}))
                    .collect();
                print(out, &Value::Array(rows), &["key", "default", "meaning"]);
            }
            Ok(())
        }
        Command::Login { username, password_stdin, sso, provider, browser } => {
            let url = cli
                .url
                .clone()
                .or_else(|| std::env::var("HANGAR_URL").ok())
                .context("give the server with --url URL")?;
            if sso {
                let creds = sso_cmd::login(&url, provider.as_deref(), browser).await?;
                let path = client::save_credentials(&creds)?;
                let v = json!({"url": url, "username": creds.username, "expires_at": creds.expires_at, "credentials_file": path.display().to_string()});
                print(out, &v, &["url", "username", "expires_at", "credentials_file"]);
                return Ok(());
            }
            let username = username.context("give --username USER, or --sso")?;
            let password = if password_stdin {
                read_secret_stdin("password")?
            } else {
                rpassword::prompt_password(format!("Password for {username}: "))?
            };
            let c = Client::anonymous(&url)?;
            let body = serde_json::to_value(hangar_wire::LoginRequest::password(&username, &password))?;
            let t: hangar_wire::TokenResponse = serde_json::from_value(c.post("/auth/token", body).await?)
                .context("the server's login answer is not a token; is --url a Hangar server?")?;
            let creds =
                Credentials { url: url.clone(), token: t.token, expires_at: t.expires_at, username: username.clone() };
            let path = client::save_credentials(&creds)?;
            let v = json!({"url": url, "username": username, "expires_at": creds.expires_at, "credentials_file": path.display().to_string()});
            print(out, &v, &["url", "username", "expires_at", "credentials_file"]);
            Ok(())
        }
        Command::Catalog { command } => catalog_cmd::run(command, cli.url.as_deref(), out).await,
        Command::Push(a) => catalog_cmd::push(a, cli.url.as_deref(), out).await,
        Command::Pull(a) => pdfile_cmd::pull(a, cli.url.as_deref(), out).await,
        Command::Openapi => {
            let doc = serde_json::to_value(hangar_api::openapi_document())?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
        Command::Health(a) => {
            let url = health_cmd::run(cli.url.as_deref(), a).await?;
            print(out, &json!({"url": url, "status": "OK"}), &["url", "status"]);
            Ok(())
        }
        Command::Bundle(a) => {
            let v = bundle::run(a)?;
            match out {
                // The whole SHA-256, which a table would cut.
                Output::Table => {
                    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                    println!("{} ({} bytes)\nSHA-256 {}", text("file"), v["bytes"], text("sha256"));
                }
                Output::Json => print(out, &v, &[]),
            }
            Ok(())
        }
        Command::Logout => {
            let p = client::credentials_path();
            let removed = match std::fs::remove_file(&p) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e.into()),
            };
            print(
                out,
                &json!({"logged_out": removed, "credentials_file": p.display().to_string()}),
                &["logged_out", "credentials_file"],
            );
            Ok(())
        }
        Command::User { command } => user(Client::connect(cli.url.as_deref())?, command, out).await,
        Command::Role { command } => role(Client::connect(cli.url.as_deref())?, command, out).await,
        Command::Claim { command } => claim(Client::connect(cli.url.as_deref())?, command, out).await,
        Command::Apikey { command } => apikey(Client::connect(cli.url.as_deref())?, command, out).await,
        Command::Vm { command } => vm_cmd::run(Client::connect(cli.url.as_deref())?, command, out).await,
        Command::Host { command } => host_cmd::run(cli.url.as_deref(), command, out).await,
        Command::Pool { command } => pool_cmd::run(Client::connect(cli.url.as_deref())?, command, out).await,
        Command::Agent { command: host_cmd::AgentCommand::Join(args) } => {
            let v = host_cmd::join(cli.url.as_deref(), args).await?;
            print(out, &v, &["id", "name", "url", "state", "enabled"]);
            Ok(())
        }
        Command::Service { command } => service::run(command, out),
        Command::Version { check } => cli_extras::version(check, cli.url.as_deref(), out).await,
        Command::Completion { shell } => cli_extras::completion(shell, <Cli as clap::CommandFactory>::command()),
        Command::Man { dir } => cli_extras::man(<Cli as clap::CommandFactory>::command(), dir.as_deref()),
        Command::Audit { after, limit } => {
            let c = Client::connect(cli.url.as_deref())?;
            let mut path = format!("/audit?limit={limit}");
            if let Some(a) = after {
                path.push_str(&format!("&after={}", seg(&a)));
            }
            print(
                out,
                &c.get(&path).await?,
                &["id", "at", "username", "via", "source_ip", "action", "target_type", "target_id"],
            );
            Ok(())
        }
    }
}

const USER_COLS: &[&str] = &["id", "username", "email", "roles", "claims", "disabled", "blocked"];
const ROLE_COLS: &[&str] = &["id", "description", "internal", "claims"];
const CLAIM_COLS: &[&str] = &["id", "group", "resource", "action", "internal"];
const KEY_COLS: &[&str] = &["id", "name", "key", "user_id", "revoked", "expires_at", "expired"];

async fn user(c: Client, cmd: UserCommand, out: Output) -> Result<()> {
    let (v, cols) = match cmd {
        UserCommand::List => (c.get("/auth/users").await?, USER_COLS),
        UserCommand::Get { user } => (c.get(&format!("/auth/users/{}", seg(&user))).await?, USER_COLS),
        UserCommand::Create { username, email, name, password_stdin, roles, claims } => {
            let password = if password_stdin {
                read_secret_stdin("password")?
            } else {
                rpassword::prompt_password(format!("Password for {username}: "))?
            };
            let body = json!({"username": username, "email": email, "name": name, "password": password, "roles": roles, "claims": claims});
            (c.post("/auth/users", body).await?, USER_COLS)
        }
        UserCommand::Delete { user } => (
            c.delete(&format!("/auth/users/{}", seg(&user))).await.map(|_| json!({"deleted": user}))?,
            &["deleted"][..],
        ),
        UserCommand::Disable { user } => {
            (c.put(&format!("/auth/users/{}", seg(&user)), Some(json!({"disabled": true}))).await?, USER_COLS)
        }
        UserCommand::Enable { user } => {
            (c.put(&format!("/auth/users/{}", seg(&user)), Some(json!({"disabled": false}))).await?, USER_COLS)
        }
        UserCommand::Unlock { user } => {
            (c.put(&format!("/auth/users/{}", seg(&user)), Some(json!({"unlock": true}))).await?, USER_COLS)
        }
        UserCommand::AddRole { user, role } => {
            (c.post(&format!("/auth/users/{}/roles", seg(&user)), json!({"name": role})).await?, ROLE_COLS)
        }
        UserCommand::RemoveRole { user, role } => {
            c.delete(&format!("/auth/users/{}/roles/{}", seg(&user), seg(&role))).await?;
            (json!({"user": user, "removed_role": role}), &["user", "removed_role"][..])
        }
        UserCommand::AddClaim { user, claim } => {
            (c.post(&format!("/auth/users/{}/claims", seg(&user)), json!({"name": claim})).await?, CLAIM_COLS)
        }
        UserCommand::RemoveClaim { user, claim } => {
            c.delete(&format!("/auth/users/{}/claims/{}", seg(&user), seg(&claim))).await?;
            (json!({"user": user, "removed_claim": claim}), &["user", "removed_claim"][..])
        }
    };
    print(out, &v, cols);
    Ok(())
}

async fn role(c: Client, cmd: RoleCommand, out: Output) -> Result<()> {
    let (v, cols) = match cmd {
        RoleCommand::List => (c.get("/auth/roles").await?, ROLE_COLS),
        RoleCommand::Get { role } => (c.get(&format!("/auth/roles/{}", seg(&role))).await?, ROLE_COLS),
        RoleCommand::Create { name, description, claims } => (
            c.post("/auth/roles", json!({"name": name, "description": description, "claims": claims})).await?,
            ROLE_COLS,
        ),
        RoleCommand::Delete { role } => {
            c.delete(&format!("/auth/roles/{}", seg(&role))).await?;
            (json!({"deleted": role}), &["deleted"][..])
        }
        RoleCommand::AddClaim { role, claim } => {
            (c.post(&format!("/auth/roles/{}/claims", seg(&role)), json!({"name": claim})).await?, CLAIM_COLS)
        }
        RoleCommand::RemoveClaim { role, claim } => {
            c.delete(&format!("/auth/roles/{}/claims/{}", seg(&role), seg(&claim))).await?;
            (json!({"role": role, "removed_claim": claim}), &["role", "removed_claim"][..])
        }
    };
    print(out, &v, cols);
    Ok(())
}

async fn claim(c: Client, cmd: ClaimCommand, out: Output) -> Result<()> {
    let (v, cols) = match cmd {
        ClaimCommand::List => (c.get("/auth/claims").await?, CLAIM_COLS),
        ClaimCommand::Create { name, description } => {
            (c.post("/auth/claims", json!({"name": name, "description": description})).await?, CLAIM_COLS)
        }
        ClaimCommand::Delete { claim } => {
            c.delete(&format!("/auth/claims/{}", seg(&claim))).await?;
            (json!({"deleted": claim}), &["deleted"][..])
        }
    };
    print(out, &v, cols);
    Ok(())
}

async fn apikey(c: Client, cmd: ApiKeyCommand, out: Output) -> Result<()> {
    let (v, cols) = match cmd {
        ApiKeyCommand::List => (c.get("/auth/api_keys").await?, KEY_COLS),
        ApiKeyCommand::Create { name, expires_at, user } => {
            let v = c.post("/auth/api_keys", json!({"name": name, "expires_at": expires_at, "user_id": user})).await?;
            if out == Output::Table {
                eprintln!("Keep the value of 'encoded': it is the X-Api-Key header and is shown only this once.");
            }
            (v, &["id", "name", "key", "user_id", "expires_at", "encoded"][..])
        }
        ApiKeyCommand::Delete { key } => {
            c.delete(&format!("/auth/api_keys/{}", seg(&key))).await?;
            (json!({"deleted": key}), &["deleted"][..])
        }
        ApiKeyCommand::Revoke { key } => {
            (c.put(&format!("/auth/api_keys/{}/revoke", seg(&key)), None).await?, KEY_COLS)
        }
    };
    print(out, &v, cols);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// clap checks the whole command tree (unique names, valid `requires`) only in debug
    /// builds, and only for the commands that run; this walks all of them.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

#[cfg(test)]
mod key_flag_tests {
    use super::rewrite_key_flags;

    fn run(args: &[&str]) -> Vec<String> {
        rewrite_key_flags(args.iter().map(std::ffi::OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap_or_default())
            .collect()
    }

    #[test]
    fn only_server_commands_take_the_reference_flags() {
        assert_eq!(run(&["hangar", "serve", "--API_PORT=80"]), ["hangar", "serve", "--key-flag", "API_PORT=80"]);
        assert_eq!(run(&["hangar", "api", "--log_level=debug"]), ["hangar", "api", "--key-flag", "log_level=debug"]);
        assert_eq!(run(&["hangar", "config", "check", "--MODE=catalog"])[3..], ["--key-flag", "MODE=catalog"]);
        // Hangar's own flags, other commands and anything after `--` pass untouched.
        assert_eq!(run(&["hangar", "serve", "--data-dir=/x"]), ["hangar", "serve", "--data-dir=/x"]);
        assert_eq!(run(&["hangar", "vm", "exec", "v", "--FOO=1"]), ["hangar", "vm", "exec", "v", "--FOO=1"]);
        assert_eq!(run(&["hangar", "serve", "--", "--A_B=1"]), ["hangar", "serve", "--", "--A_B=1"]);
    }
}
