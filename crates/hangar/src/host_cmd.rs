//! `hangar host ...`: the orchestrator's hosts, from the command line.
//!
//! Secrets never go on the command line: a host's password or API key is read from
//! standard input (or prompted for), and an enrollment token from
//! `HANGAR_ENROLLMENT_TOKEN`.
//!
//! `hangar agent join` (also `hangar host join`) runs on a host agent: it makes an API key
//! on this host for the orchestrator (or takes one) and registers the host with the
//! orchestrator using a single-use enrollment token.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{Client, load_credentials, seg};
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
    /// Register the host this CLI talks to (--url, HANGAR_URL or the saved login) with an
    /// orchestrator, using an enrollment token. The same as `hangar agent join`.
    Join(JoinArgs),
    /// Make a single-use enrollment token for a host to join with.
    Token {
        /// Name the joining host gets.
        host_name: String,
        /// Lifetime (e.g. 15m, 2h).
        #[arg(long, default_value = "15m")]
        ttl: String,
    },
}

/// `hangar agent ...`: commands run on a host agent.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Register this host (--url, HANGAR_URL or the saved login) with an orchestrator,
    /// using an enrollment token made there with `hangar host token NAME`.
    Join(JoinArgs),
}

/// Arguments of `hangar agent join` and `hangar host join`.
#[derive(Args)]
pub struct JoinArgs {
    /// The orchestrator's URL, e.g. http://orchestrator:3080.
    #[arg(long, value_name = "URL")]
    pub orchestrator: String,
    /// The single-use enrollment token (from `hangar host token NAME` on the orchestrator).
    #[arg(long, env = "HANGAR_ENROLLMENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The host's name; the token already fixes it, so this only checks it.
    #[arg(long)]
    pub name: Option<String>,
    /// Tags, comma-separated (a,b).
    #[arg(long, value_delimiter = ',')]
    pub tags: Vec<String>,
    #[arg(long, default_value = "")]
    pub description: String,
    /// The URL the orchestrator reaches this host at, when it differs from --url.
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// An API key of this host for the orchestrator to use, instead of making a new one
    /// with the current login.
    #[arg(long, env = "HANGAR_HOST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Join disabled (out of scheduling).
    #[arg(long)]
    pub disabled: bool,
}

const HOST_COLS: &[&str] = &[
    "id",
    "name",
    "url",
    "state",
    "enabled",
    "architecture",
    "hypervisor",
    "devops_version",
    "version_differs",
    "last_error",
];

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

/// Runs `hangar agent join`: see [`JoinArgs`]. `url_flag` is this host's URL.
pub async fn join(url_flag: Option<&str>, args: JoinArgs) -> Result<Value> {
    let token = args.token.trim();
    if token.is_empty() {
        bail!("--token is empty: make a token on the orchestrator with `hangar host token NAME`");
    }
    let orch = Client::anonymous(&args.orchestrator)?;
    let check = orch
        .get(&format!("/orchestrator/enrollment-token/{}/validate", seg(token)))
        .await
        .with_context(|| format!("cannot check the enrollment token with the orchestrator at {}", args.orchestrator))?;
    if check["valid"] != true {
        bail!(
            "the orchestrator at {} says the enrollment token is invalid, expired or already used; \
             make a new one there with `hangar host token NAME`",
            args.orchestrator
        );
    }
    let token_name = check["host_name"].as_str().unwrap_or_default().to_string();
    if let Some(n) = &args.name
        && *n != token_name
    {
        bail!(
            "the enrollment token is for a host named {token_name:?}, not {n:?}; drop --name or make a token for {n:?}"
        );
    }
    let local = url_flag
        .map(String::from)
        .or_else(|| std::env::var("HANGAR_URL").ok().filter(|u| !u.is_empty()))
        .or_else(|| load_credentials().map(|c| c.url))
        .ok_or_else(|| {
            anyhow!("which host joins? Pass this host's --url (or set HANGAR_URL, or `hangar login` to it)")
        })?;
    // The API key the orchestrator will use on this host: given, or made now.
    let (api_key, made) = match &args.api_key {
        Some(k) if !k.trim().is_empty() => (k.trim().to_string(), None),
        _ => {
            let here = Client::connect(Some(&local))?;
            let key_name = format!("orchestrator-{token_name}-{}", chrono::Utc::now().timestamp());
            let k = here.post("/auth/api_keys", json!({"name": key_name})).await.with_context(|| {
                format!(
                    "cannot make an API key on {local} for the orchestrator: log in to this host first \
                     (`hangar login --url {local} --username USER`) or pass --api-key"
                )
            })?;
            let encoded =
                k["encoded"].as_str().ok_or_else(|| anyhow!("the host answered an API key without `encoded`"))?;
            (encoded.to_string(), k["id"].as_str().map(|id| (here, id.to_string())))
        }
    };
    let body = json!({"url": args.advertise_url.as_deref().unwrap_or(&local), "tags": args.tags,
        "description": args.description, "disabled": args.disabled, "authentication": {"api_key": api_key}});
    let joined = orch
        .call_with_headers(reqwest::Method::POST, "/orchestrator/hosts", Some(body), &[("X-Enrollment-Token", token)])
        .await;
    match joined {
        Ok(v) => Ok(v),
        Err(e) => {
            // Do not leave behind a key nobody uses.
            if let Some((here, id)) = made {
                let _ = here.delete(&format!("/auth/api_keys/{}", seg(&id))).await;
            }
            Err(e.context(format!(
                "the orchestrator at {} refused to register this host (if the token was refused, \
                 make a new one with `hangar host token NAME`)",
                args.orchestrator
            )))
        }
    }
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
        HostCommand::Join(args) => (join(url_flag, args).await?, HOST_COLS),
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
