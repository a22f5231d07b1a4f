//! `hangar vm ...`: the host module's VMs, from the command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Client, seg};
use crate::output::{Output, print};

#[derive(Subcommand)]
pub enum VmCommand {
    /// List VMs (optionally filtered: --filter 'name=^ci-,i').
    List {
        #[arg(long)]
        filter: Option<String>,
    },
    Get {
        vm: String,
    },
    /// Create a VM from a local image and wait for it (a progress bar follows the job).
    Create {
        name: String,
        /// A local image name on the host.
        #[arg(long)]
        image: String,
        #[arg(long)]
        cpus: Option<u32>,
        /// MiB.
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        start: bool,
    },
    Start {
        vm: String,
    },
    Stop {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    Pause {
        vm: String,
    },
    Resume {
        vm: String,
    },
    Suspend {
        vm: String,
    },
    Restart {
        vm: String,
    },
    Delete {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    /// Run a shell command line in the guest; exits with the command's exit code.
    Exec {
        vm: String,
        /// The command line (quote it).
        command: String,
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(long)]
        workdir: Option<String>,
        /// Seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Copy a local file into the guest.
    Upload {
        vm: String,
        file: PathBuf,
        remote_path: String,
    },
    Clone {
        vm: String,
        name: String,
        #[arg(long)]
        linked: bool,
    },
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    List {
        vm: String,
    },
    Create {
        vm: String,
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Delete {
        vm: String,
        snapshot: String,
    },
    Revert {
        vm: String,
        snapshot: String,
    },
}

const VM_COLS: &[&str] = &["ID", "Name", "State", "OS", "hypervisor", "internal_ip_address", "user"];
const STATUS_COLS: &[&str] = &["id", "name", "status", "ip_configured"];

fn vm_path(vm: &str, rest: &str) -> String {
    format!("/machines/{}{rest}", seg(vm))
}

/// Follow a job to its end, with a progress bar on a terminal.
async fn follow_job(c: &Client, id: &str, out: Output) -> Result<Value> {
    use std::io::IsTerminal;
    let bar = (out == Output::Table && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(100);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos:>3}% {msg} (eta {eta})") {
            b.set_style(style);
        }
        b
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6 * 3600);
    loop {
        let j = c.get(&format!("/jobs/{}", seg(id))).await?;
        if let Some(b) = &bar {
            b.set_position(j["progress"].as_f64().unwrap_or(0.0) as u64);
            b.set_message(j["message"].as_str().unwrap_or("").to_string());
        }
        match j["state"].as_str() {
            Some("completed") => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(j);
            }
            Some("failed") => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                bail!("job {id} failed: {}", j["error"].as_str().unwrap_or("unknown error"));
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} is still running after 6 h; follow it with GET /api/v1/jobs/{id}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(c: Client, cmd: VmCommand, out: Output) -> Result<()> {
    let (v, cols): (Value, &[&str]) = match cmd {
        VmCommand::List { filter } => {
            let v = match filter {
                Some(f) => c.call_with_headers(reqwest::Method::GET, "/machines", None, &[("X-Filter", &f)]).await?,
                None => c.get("/machines").await?,
            };
            (v, VM_COLS)
        }
        VmCommand::Get { vm } => (c.get(&vm_path(&vm, "")).await?, VM_COLS),
        VmCommand::Create { name, image, cpus, memory, start } => {
            let body = json!({"name": name, "image": image, "start_on_create": start, "specs": {"cpu": cpus, "memory": memory}});
            let job = c.post("/machines/async", body).await?;
            let id = job["id"].as_str().context("the server answered without a job id")?.to_string();
            let done = follow_job(&c, &id, out).await?;
            (done["result"].clone(), &["id", "name", "current_state"][..])
        }
        VmCommand::Start { vm } => (c.put(&vm_path(&vm, "/start"), None).await?, STATUS_COLS),
        VmCommand::Stop { vm, force } => {
            (c.put(&vm_path(&vm, if force { "/stop?force=true" } else { "/stop" }), None).await?, STATUS_COLS)
        }
        VmCommand::Pause { vm } => (c.put(&vm_path(&vm, "/pause"), None).await?, STATUS_COLS),
        VmCommand::Resume { vm } => (c.put(&vm_path(&vm, "/resume"), None).await?, STATUS_COLS),
        VmCommand::Suspend { vm } => (c.put(&vm_path(&vm, "/suspend"), None).await?, STATUS_COLS),
        VmCommand::Restart { vm } => (c.put(&vm_path(&vm, "/restart"), None).await?, STATUS_COLS),
        VmCommand::Delete { vm, force } => {
            c.delete(&vm_path(&vm, if force { "?force=true" } else { "" })).await?;
            (json!({"deleted": vm}), &["deleted"][..])
        }
        VmCommand::Exec { vm, command, env, workdir, timeout } => {
            let mut vars = serde_json::Map::new();
            for kv in env {
                let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?}: write KEY=VALUE"))?;
                vars.insert(k.into(), Value::String(v.into()));
            }
            let r = c
                .put(&vm_path(&vm, "/execute"), Some(json!({"command": command, "environment_variables": vars, "working_directory": workdir, "timeout": timeout})))
                .await?;
            if out == Output::Json {
                print(out, &r, &[]);
            } else {
                print!("{}", r["stdout"].as_str().unwrap_or(""));
                eprint!("{}", r["stderr"].as_str().unwrap_or(""));
            }
            let code = r["exit_code"].as_i64().unwrap_or(1) as i32;
            if code != 0 {
                std::process::exit(code);
            }
            return Ok(());
        }
        VmCommand::Upload { vm, file, remote_path } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let n = bytes.len();
            c.put_bytes(&format!("{}?remote_path={}", vm_path(&vm, "/files"), seg(&remote_path)), bytes).await?;
            (json!({"vm": vm, "remote_path": remote_path, "bytes": n}), &["vm", "remote_path", "bytes"][..])
        }
        VmCommand::Clone { vm, name, linked } => (
            c.put(&vm_path(&vm, "/clone"), Some(json!({"clone_name": name, "linked": linked}))).await?,
            &["id", "name", "status"][..],
        ),
        VmCommand::Snapshot { command } => match command {
            SnapshotCommand::List { vm } => {
                (c.get(&vm_path(&vm, "/snapshots")).await?, &["id", "name", "date", "current", "state"][..])
            }
            SnapshotCommand::Create { vm, name, description } => (
                c.post(
                    &vm_path(&vm, "/snapshots"),
                    json!({"snapshot_name": name, "snapshot_description": description}),
                )
                .await?,
                &["id", "name", "date", "state"][..],
            ),
            SnapshotCommand::Delete { vm, snapshot } => {
                c.delete(&vm_path(&vm, &format!("/snapshots/{}", seg(&snapshot)))).await?;
                (json!({"deleted": snapshot}), &["deleted"][..])
            }
            SnapshotCommand::Revert { vm, snapshot } => {
                c.post(&vm_path(&vm, &format!("/snapshots/{}/revert", seg(&snapshot))), json!({})).await?;
                (json!({"reverted_to": snapshot}), &["reverted_to"][..])
            }
        },
    };
    print(out, &v, cols);
    Ok(())
}
