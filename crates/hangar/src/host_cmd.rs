//! `hangar host ...`: the orchestrator's hosts, from the command line.
//!
//! Secrets never go on the command line: a host's password or API key is read from
//! standard input (or prompted for), and an enrollment token from
//! `HANGAR_ENROLLMENT_TOKEN`.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Client, seg};
use crate::output::{Output, print};

#[derive(Subcommand)]
pub enum HostCommand {
    /// List the orchestrator's hosts.
    List,
    /// One host.
    Get { host: String },
    /// Register a host by the URL of its API. With --username the password is read from
    /// standard input (--secret-stdin) or prompted for; with --api-key-stdin an API key
    /// is read from standard input. With HANGAR_ENROLLMENT_TOKEN set, the host joins with
    /// that token instead of a user login.
    Add {
        /// The host's API URL, e.g. http://mac-1:3080.
        #[arg(value_name = "HOST_URL")]
        host_url: String,
        #[arg(long)]
        name: Option<String>,
        /// User on the host the orchestrator logs in as.
        #[arg(long, conflicts_with = "api_key_stdin")]
        username: Option<String>,
        /// Read the password (with --username) from standard input instead of prompting.
        #[arg(long)]
        secret_stdin: bool,
        /// Authenticate to the host with an API key read from standard input.
        #[arg(long)]
        api_key_stdin: bool,
        /// Tags (repeat the flag).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Register it disabled (out of scheduling).
        #[arg(long)]
        disabled: bool,
    },
    /// Unregister a host (its VMs stay on it).
    Remove { host: String },
    /// Put a host back into scheduling.
    Enable { host: String },
    /// Take a host out of scheduling.
    Disable { host: String },
    /// Make a single-use enrollment token for a host to join with.
    Token {
        /// Name the joining host gets.
        host_name: String,
        /// Lifetime (e.g. 15m, 2h).
        #[arg(long, default_value = "15m")]
        ttl: String,
    },
}

const HOST_COLS: &[&str] = &["id", "name", "url", "state", "enabled", "architecture", "hypervisor", "last_error"];

fn read_stdin(what: &str) -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).with_context(|| format!("cannot read the {what} from standard input"))?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        bail!("the {what} read from standard input is empty");
    }
    Ok(s)
}

fn host_path(host: &str, rest: &str) -> String {
    format!("/orchestrator/hosts/{}{rest}", seg(host))
}

/// Runs one `hangar host` command against the server at `url_flag` (or the saved login).
pub async fn run(url_flag: Option<&str>, cmd: HostCommand, out: Output) -> Result<()> {
    let (v, cols): (Value, &[&str]) = match cmd {
        HostCommand::List => (Client::connect(url_flag)?.get("/orchestrator/hosts").await?, HOST_COLS),
        HostCommand::Get { host } => (Client::connect(url_flag)?.get(&host_path(&host, "")).await?, HOST_COLS),
        HostCommand::Add { host_url, name, username, secret_stdin, api_key_stdin, tags, description, disabled } => {
            let authentication = match (username, api_key_stdin) {
                (Some(u), false) => {
                    let password = if secret_stdin {
                        read_stdin("password")?
                    } else {
                        rpassword::prompt_password(format!("Password of {u} on the host: "))?
                    };
                    json!({"username": u, "password": password})
                }
                (None, true) => json!({"api_key": read_stdin("API key")?}),
                (None, false) => Value::Null,
                (Some(_), true) => bail!("use either --username or --api-key-stdin"),
            };
            let body = json!({"url": host_url, "name": name, "tags": tags, "description": description,
                "disabled": disabled, "authentication": authentication});
            let v = match std::env::var("HANGAR_ENROLLMENT_TOKEN") {
                Ok(token) if !token.trim().is_empty() => {
                    let server = url_flag
                        .map(String::from)
                        .or_else(|| std::env::var("HANGAR_URL").ok())
                        .ok_or_else(|| anyhow!("joining with a token needs the orchestrator's --url or HANGAR_URL"))?;
                    Client::anonymous(&server)?
                        .call_with_headers(
                            reqwest::Method::POST,
                            "/orchestrator/hosts/join",
                            Some(body),
                            &[("X-Enrollment-Token", token.trim())],
                        )
                        .await?
                }
                _ => Client::connect(url_flag)?.post("/orchestrator/hosts", body).await?,
            };
            (v, HOST_COLS)
        }
        HostCommand::Remove { host } => {
            Client::connect(url_flag)?.delete(&host_path(&host, "")).await?;
            (json!({"removed": host}), &["removed"][..])
        }
        HostCommand::Enable { host } => {
            (Client::connect(url_flag)?.put(&host_path(&host, "/enable"), None).await?, HOST_COLS)
        }
        HostCommand::Disable { host } => {
            (Client::connect(url_flag)?.put(&host_path(&host, "/disable"), None).await?, HOST_COLS)
        }
        HostCommand::Token { host_name, ttl } => {
            let ttl: Duration = humantime::parse_duration(&ttl)
                .map_err(|_| anyhow!("--ttl {ttl:?} is not a duration such as 15m or 2h"))?;
            let v = Client::connect(url_flag)?
                .post("/orchestrator/enrollment-token", json!({"host_name": host_name, "ttl_seconds": ttl.as_secs()}))
                .await?;
            (v, &["token", "host_name", "expires_at"][..])
        }
    };
    print(out, &v, cols);
    Ok(())
}
