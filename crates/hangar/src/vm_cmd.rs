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
    /// Create a VM from a local image and wait for it (a progress bar follows the job). With
    /// --orchestrator the server at --url is an orchestrator that places the VM on a host.
    Create {
        name: String,
        /// An image name on the host (a local image, or with --orchestrator a local image of
        /// the hosts or a catalog id when --version is given).
        #[arg(long)]
        image: String,
        #[arg(long)]
        cpus: Option<u32>,
        /// MiB.
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        start: bool,
        /// Place the VM through the orchestrator at --url.
        #[arg(long)]
        orchestrator: bool,
        /// With --orchestrator: catalog version of --image (then --image is a catalog id).
        #[arg(long, requires = "orchestrator")]
        catalog_version: Option<String>,
        /// With --orchestrator: x86_64 or arm64.
        #[arg(long, requires = "orchestrator")]
        architecture: Option<String>,
        /// With --orchestrator: tags the host must have (a,b).
        #[arg(long, requires = "orchestrator", value_delimiter = ',')]
        tags: Vec<String>,
        /// With --orchestrator: delete the VM this many seconds after creation unless extended.
        #[arg(long, requires = "orchestrator")]
        ttl: Option<u64>,
        /// With --orchestrator: wait up to this many seconds for capacity instead of failing.
        #[arg(long, requires = "orchestrator")]
        wait: Option<u64>,
        /// With --orchestrator and --wait: queue priority (higher first).
        #[arg(long, requires = "wait", default_value_t = 0)]
        priority: i32,
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
    /// Forward a local TCP port to a port of the VM through the API, like `kubectl
    /// port-forward`: each local connection opens a websocket to the server (a host, or an
    /// orchestrator that relays through the VM's host). Ctrl-C stops.
    PortForward {
        vm: String,
        /// LOCAL:REMOTE (or one PORT for both); LOCAL 0 picks a free port.
        ports: String,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: std::net::IpAddr,
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
/// Follow job `id` under `base` (`/jobs` on a host, `/orchestrator/jobs` on an orchestrator).
async fn follow_job(c: &Client, base: &str, id: &str, out: Output) -> Result<Value> {
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
        let j = c.get(&format!("{base}/{}", seg(id))).await?;
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

/// `LOCAL:REMOTE` or `PORT`.
fn parse_ports(spec: &str) -> Result<(u16, u16)> {
    let bad = || anyhow::anyhow!("{spec:?}: write LOCAL:REMOTE (e.g. 2222:22) or one PORT");
    let (l, r) = spec.split_once(':').unwrap_or((spec, spec));
    let local: u16 = l.trim().parse().map_err(|_| bad())?;
    let remote: u16 = r.trim().parse().map_err(|_| bad())?;
    if remote == 0 {
        bail!("{spec:?}: the VM port must be between 1 and 65535");
    }
    Ok((local, remote))
}

/// Find the VM on the server: on its host module first, else through its orchestrator.
/// Returns the route to open for each connection.
async fn port_forward_route(c: &Client, vm: &str, remote: u16) -> Result<String> {
    let id_of = |v: &Value| v["ID"].as_str().or(v["id"].as_str()).unwrap_or(vm).to_string();
    match c.get(&vm_path(vm, "")).await {
        Ok(v) => Ok(format!("/machines/{}/port-forward/{remote}", seg(&id_of(&v)))),
        Err(host_err) => match c.get(&format!("/orchestrator/machines/{}", seg(vm))).await {
            Ok(v) => Ok(format!("/orchestrator/machines/{}/port-forward/{remote}", seg(&id_of(&v)))),
            Err(_) => Err(host_err),
        },
    }
}

async fn port_forward(c: &Client, vm: &str, ports: &str, address: std::net::IpAddr) -> Result<()> {
    let (local, remote) = parse_ports(ports)?;
    let route = port_forward_route(c, vm, remote).await?;
    let url = hangar_orchestrator::tunnel::ws_url(c.base(), &route)?;
    let headers: Vec<(String, String)> =
        c.auth_header().map(|(h, v)| vec![(h.to_string(), v.to_string())]).unwrap_or_default();
    let listener = tokio::net::TcpListener::bind((address, local))
        .await
        .with_context(|| format!("cannot listen on {address}:{local}"))?;
    let bound = listener.local_addr()?;
    println!("Forwarding {bound} -> {vm}:{remote}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let headers = std::sync::Arc::new(headers);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => a.context("accepting a local connection")?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("Stopped forwarding {bound}");
                return Ok(());
            }
        };
        let _ = tcp.set_nodelay(true);
        let (url, headers, vm) = (url.clone(), headers.clone(), vm.to_string());
        tokio::spawn(async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            match hangar_orchestrator::tunnel::connect(&url, &h).await {
                Ok(ws) => {
                    if let Err(e) = hangar_orchestrator::tunnel::splice(ws, tcp).await {
                        eprintln!("connection from {peer} to {vm}:{remote} ended: {e}");
                    }
                }
                Err(e) => eprintln!("connection from {peer}: cannot open the tunnel to {vm}:{remote}: {e}"),
            }
        });
    }
}

pub async fn run(c: Client, cmd: VmCommand, out: Output) -> Result<()> {
    let (v, cols): (Value, &[&str]) = match cmd {
        VmCommand::PortForward { vm, ports, address } => return port_forward(&c, &vm, &ports, address).await,
        VmCommand::List { filter } => {
            let v = match filter {
                Some(f) => c.call_with_headers(reqwest::Method::GET, "/machines", None, &[("X-Filter", &f)]).await?,
                None => c.get("/machines").await?,
            };
            (v, VM_COLS)
        }
        VmCommand::Get { vm } => (c.get(&vm_path(&vm, "")).await?, VM_COLS),
        VmCommand::Create {
            name,
            image,
            cpus,
            memory,
            start,
            orchestrator,
            catalog_version,
            architecture,
            tags,
            ttl,
            wait,
            priority,
        } => {
            let specs = json!({"cpu": cpus.map(|n| n.to_string()), "memory": memory.map(|n| n.to_string())});
            if !orchestrator {
                let body = json!({"name": name, "image": image, "start_on_create": start, "specs": specs});
                let job = c.post("/machines/async", body).await?;
                let id = job["id"].as_str().context("the server answered without a job id")?.to_string();
                let done = follow_job(&c, "/jobs", &id, out).await?;
                print(out, &done["result"], &["id", "name", "current_state"]);
                return Ok(());
            }
            let mut body = json!({"name": name, "start_on_create": start, "specs": specs, "tags": tags});
            match catalog_version {
                Some(v) => {
                    body["catalog_manifest"] = json!({"catalog_id": image, "version": v, "architecture": architecture})
                }
                None => body["image"] = json!(image),
            }
            if let Some(a) = architecture {
                body["architecture"] = json!(a);
            }
            if let Some(t) = ttl {
                body["ttl_seconds"] = json!(t);
            }
            if let Some(w) = wait {
                body["queue"] = json!({"priority": priority, "timeout_seconds": w});
            }
            let job = c.post("/orchestrator/machines/async", body).await?;
            let id = job["id"].as_str().context("the orchestrator answered without a job id")?.to_string();
            let done = follow_job(&c, "/orchestrator/jobs", &id, out).await?;
            (done["result"].clone(), &["id", "name", "current_state", "host", "host_id"][..])
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
