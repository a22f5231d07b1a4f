//! `hangar vm ...`: the host module's VMs, from the command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use hangar_jobs::{Job, JobState};
use hangar_wire::{
    CatalogManifestRef, CloneRequest, CreateMachineRequest, CreateSnapshotRequest, ExecuteRequest, FleetMachine,
    Flexible, Machine, Mb, OrchestratorCreateRequest, OrchestratorCreated, PowerOp, QueueRequest, RevertRequest, Specs,
    VmCall, VmReply,
};
use serde_json::{Value, json};

use crate::client::{Client, seg};
use crate::output::{Output, print, print_as};

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
        #[arg(long, value_parser = parse_cpus)]
        cpus: Option<u32>,
        /// MiB.
        #[arg(long, value_parser = parse_mib)]
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
        #[arg(long, requires = "orchestrator", value_parser = parse_seconds)]
        ttl: Option<u64>,
        /// With --orchestrator: wait up to this many seconds for capacity instead of failing.
        #[arg(long, requires = "orchestrator", value_parser = parse_seconds)]
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
        #[arg(long, default_value_t = 300, value_parser = parse_seconds)]
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

/// `--memory`: a whole number of MiB. A size with a unit is refused, with its value in MiB.
fn parse_mib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    Err(match Mb::parse(t) {
        Some(Mb(n)) if n > 0 && t.chars().any(|c| c.is_ascii_alphabetic()) => {
            format!("the size is a whole number of MiB, without a unit: {t} is {n} MiB, so write --memory {n}")
        }
        _ => "the size is a whole number of MiB, e.g. --memory 2048 for 2 GiB".to_string(),
    })
}

/// `--cpus`: a whole number of virtual CPUs.
fn parse_cpus(text: &str) -> Result<u32, String> {
    text.trim().parse().map_err(|_| "the number of virtual CPUs is a whole number, e.g. --cpus 2".to_string())
}

/// `--ttl`, `--wait`, `--timeout`: a whole number of seconds. A duration with a unit is
/// refused, with its value in seconds.
fn parse_seconds(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    Err(match humantime::parse_duration(t).map(|d| d.as_secs()) {
        Ok(secs) if secs > 0 => {
            format!("give a whole number of seconds, without a unit: {t} is {secs} s, so write {secs}")
        }
        _ => "give a whole number of seconds, e.g. 600 for ten minutes".to_string(),
    })
}

/// `--env KEY=VALUE` flags as the guest's environment (a later KEY wins).
fn parse_env(env: &[String]) -> Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for kv in env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?}: write KEY=VALUE"))?;
        if k.trim().is_empty() {
            bail!("--env {kv:?}: the variable's name before '=' is empty; write KEY=VALUE");
        }
        vars.insert(k.to_string(), v.to_string());
    }
    Ok(vars)
}

/// Follow job `id` under `base` (`/jobs` on a host, `/orchestrator/jobs` on an
/// orchestrator) to its end, with a progress bar on a terminal.
async fn follow_job(c: &Client, base: &str, id: &str, out: Output) -> Result<Job> {
    use std::io::IsTerminal;
    let bar = (out == Output::Table && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(100);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos:>3}% {msg} (eta {eta})") {
            b.set_style(style);
        }
        b
    });
    let path = format!("{base}/{}", seg(id));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6 * 3600);
    loop {
        let j: Job = c.get_as(&path, &[]).await?;
        if let Some(b) = &bar {
            b.set_position(j.progress as u64);
            b.set_message(j.message.clone());
        }
        match j.state {
            JobState::Completed => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(j);
            }
            JobState::Failed => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                bail!("job {id} failed: {}", j.error.as_deref().unwrap_or("unknown error"));
            }
            JobState::Pending | JobState::Running => {}
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} is still running after 6 h; follow it with GET /api/v1{path}");
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

/// A reply `VmCall::read_reply` never gives for the call (a server of another version).
fn unexpected(what: &str, reply: &VmReply) -> anyhow::Error {
    anyhow::anyhow!(
        "the server answered {what} with {reply:?}; is it a Hangar of the same version as this CLI (`hangar --version`)?"
    )
}

/// Find the VM on the server: on its host module first, else through its orchestrator.
/// Returns the route to open for each connection.
async fn port_forward_route(c: &Client, vm: &str, remote: u16) -> Result<String> {
    let host_err = match c.vm(vm, &VmCall::Get).await {
        Ok(VmReply::Machine(m)) => return Ok(format!("/machines/{}/port-forward/{remote}", seg(&m.id))),
        Ok(other) => return Err(unexpected("a VM lookup", &other)),
        Err(e) => e,
    };
    let fleet = VmCall::Get.request(vm).via_orchestrator();
    match c.get_as::<FleetMachine>(&fleet.path, &[]).await {
        Ok(f) => Ok(format!("/orchestrator/machines/{}/port-forward/{remote}", seg(&f.id))),
        Err(_) => Err(host_err),
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

/// Run one VM operation and print what it answers.
async fn run_call(c: &Client, vm: &str, call: VmCall, out: Output, cols: &[&str]) -> Result<()> {
    print_as(out, &c.vm(vm, &call).await?, cols)
}

pub async fn run(c: Client, cmd: VmCommand, out: Output) -> Result<()> {
    let (v, cols): (Value, &[&str]) = match cmd {
        VmCommand::PortForward { vm, ports, address } => return port_forward(&c, &vm, &ports, address).await,
        VmCommand::List { filter } => {
            let filter: Vec<(&str, &str)> = filter.iter().map(|f| ("X-Filter", f.as_str())).collect();
            let vms: Vec<Machine> = c.get_as("/machines", &filter).await?;
            return print_as(out, &vms, VM_COLS);
        }
        VmCommand::Get { vm } => return run_call(&c, &vm, VmCall::Get, out, VM_COLS).await,
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
            let specs = Specs { cpu: Flexible(cpus.map(u64::from)), memory: Flexible(memory), disk: Flexible(None) };
            if !orchestrator {
                let req = CreateMachineRequest {
                    name,
                    image: Some(image),
                    start_on_create: start,
                    specs: Some(specs),
                    ..Default::default()
                };
                let job: Job = c.send_as(reqwest::Method::POST, "/machines/async", &req).await?;
                let done = follow_job(&c, "/jobs", &job.id, out).await?;
                // The host's job holds `{id, name, current_state}` (hangar-host builds it), not
                // yet a wire type: printed as the job holds it.
                (done.result.unwrap_or(Value::Null), &["id", "name", "current_state"][..])
            } else {
                let (image, catalog_manifest) = match catalog_version {
                    Some(v) => (
                        None,
                        Some(CatalogManifestRef {
                            catalog_id: image,
                            version: Some(v),
                            architecture: architecture.clone(),
                            connection: None,
                            catalog_manager_id: None,
                            other: Default::default(),
                        }),
                    ),
                    None => (Some(image), None),
                };
                let req = OrchestratorCreateRequest {
                    name,
                    start_on_create: start,
                    specs: Some(specs),
                    tags: tags.into_iter().collect(),
                    image,
                    catalog_manifest,
                    architecture,
                    ttl_seconds: ttl,
                    queue: wait.map(|w| QueueRequest { priority, timeout_seconds: w }),
                    ..Default::default()
                };
                let job: Job = c.send_as(reqwest::Method::POST, "/orchestrator/machines/async", &req).await?;
                let done = follow_job(&c, "/orchestrator/jobs", &job.id, out).await?;
                let created: OrchestratorCreated =
                    serde_json::from_value(done.result.unwrap_or(Value::Null)).map_err(|e| {
                        anyhow::anyhow!(
                            "job {} completed, but its result is not a created VM ({e}); \
                             look at it with GET /api/v1/orchestrator/jobs/{}",
                            job.id,
                            job.id
                        )
                    })?;
                return print_as(out, &created, &["id", "name", "current_state", "host", "host_id"]);
            }
        }
        VmCommand::Start { vm } => return run_call(&c, &vm, VmCall::Power(PowerOp::Start), out, STATUS_COLS).await,
        VmCommand::Stop { vm, force } => return run_call(&c, &vm, VmCall::stop(force), out, STATUS_COLS).await,
        VmCommand::Pause { vm } => return run_call(&c, &vm, VmCall::Power(PowerOp::Pause), out, STATUS_COLS).await,
        VmCommand::Resume { vm } => return run_call(&c, &vm, VmCall::Power(PowerOp::Resume), out, STATUS_COLS).await,
        VmCommand::Suspend { vm } => return run_call(&c, &vm, VmCall::Power(PowerOp::Suspend), out, STATUS_COLS).await,
        VmCommand::Restart { vm } => return run_call(&c, &vm, VmCall::Power(PowerOp::Restart), out, STATUS_COLS).await,
        VmCommand::Delete { vm, force } => {
            c.vm(&vm, &VmCall::Delete { force }).await?;
            (json!({"deleted": vm}), &["deleted"][..])
        }
        VmCommand::Exec { vm, command, env, workdir, timeout } => {
            let req = ExecuteRequest {
                command,
                environment_variables: parse_env(&env)?,
                working_directory: workdir,
                timeout: Some(timeout),
                ..Default::default()
            };
            let r = match c.vm(&vm, &VmCall::Execute(req)).await? {
                VmReply::Exec(r) => r,
                other => return Err(unexpected("a command", &other)),
            };
            if out == Output::Json {
                print_as(out, &r, &[])?;
            } else {
                print!("{}", r.stdout);
                eprint!("{}", r.stderr);
            }
            if r.exit_code != 0 {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(r.exit_code);
            }
            return Ok(());
        }
        VmCommand::Upload { vm, file, remote_path } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let n = bytes.len();
            c.put_bytes(&format!("/machines/{}/files?remote_path={}", seg(&vm), seg(&remote_path)), bytes).await?;
            (json!({"vm": vm, "remote_path": remote_path, "bytes": n}), &["vm", "remote_path", "bytes"][..])
        }
        VmCommand::Clone { vm, name, linked } => {
            let req = CloneRequest { clone_name: name, destination_path: None, linked };
            return run_call(&c, &vm, VmCall::Clone(req), out, &["id", "name", "status"]).await;
        }
        VmCommand::Snapshot { command } => match command {
            SnapshotCommand::List { vm } => {
                return run_call(&c, &vm, VmCall::SnapshotList, out, &["id", "name", "date", "current", "state"]).await;
            }
            SnapshotCommand::Create { vm, name, description } => {
                let req = CreateSnapshotRequest { snapshot_name: name, snapshot_description: description };
                return run_call(&c, &vm, VmCall::SnapshotCreate(req), out, &["id", "name", "date", "state"]).await;
            }
            SnapshotCommand::Delete { vm, snapshot } => {
                c.vm(&vm, &VmCall::SnapshotDelete { snapshot_id: snapshot.clone(), delete_children: false }).await?;
                (json!({"deleted": snapshot}), &["deleted"][..])
            }
            SnapshotCommand::Revert { vm, snapshot } => {
                let call = VmCall::SnapshotRevert { snapshot_id: snapshot.clone(), request: RevertRequest::default() };
                c.vm(&vm, &call).await?;
                (json!({"reverted_to": snapshot}), &["reverted_to"][..])
            }
        },
    };
    // What the CLI itself reports (no server answer to print): its own rows.
    print(out, &v, cols);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_mib_and_a_unit_is_refused_with_the_fix() {
        assert_eq!(parse_mib("2048"), Ok(2048));
        assert_eq!(parse_mib(" 512 "), Ok(512));
        let e = parse_mib("2GB").unwrap_err();
        assert!(e.contains("MiB") && e.contains("--memory 2048"), "{e}");
        assert!(parse_mib("1.5 GiB").unwrap_err().contains("--memory 1536"));
        assert!(parse_mib("2048Mb").unwrap_err().contains("--memory 2048"));
        for bad in ["", "lots", "-1", "2.5", "0.1MB"] {
            let e = parse_mib(bad).unwrap_err();
            assert!(e.contains("whole number of MiB") && e.contains("--memory 2048"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpus_and_seconds_name_the_fix() {
        assert_eq!(parse_cpus("4"), Ok(4));
        assert!(parse_cpus("four").unwrap_err().contains("--cpus 2"));
        assert_eq!(parse_seconds("3600"), Ok(3600));
        assert!(parse_seconds("1h").unwrap_err().contains("write 3600"));
        assert!(parse_seconds("10m 30s").unwrap_err().contains("write 630"));
        for bad in ["soon", "-5", "500ms", ""] {
            assert!(parse_seconds(bad).unwrap_err().contains("whole number of seconds"), "{bad}");
        }
    }

    #[test]
    fn env_flags_become_the_guest_environment() {
        let env = |v: &[&str]| parse_env(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let vars = env(&["A=1", "B=x=y", "C=", "A=2"]).unwrap();
        assert_eq!(
            vars.into_iter().collect::<Vec<_>>(),
            [("A".to_string(), "2".to_string()), ("B".into(), "x=y".into()), ("C".into(), "".into())]
        );
        assert!(env(&["NOVALUE"]).unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(env(&["=v"]).unwrap_err().to_string().contains("name before '=' is empty"));
    }

    #[test]
    fn ports_are_local_remote_or_one() {
        assert_eq!(parse_ports("2222:22").unwrap(), (2222, 22));
        assert_eq!(parse_ports("8080").unwrap(), (8080, 8080));
        assert_eq!(parse_ports("0:22").unwrap(), (0, 22));
        assert!(parse_ports("22:0").unwrap_err().to_string().contains("between 1 and 65535"));
        for bad in ["", "a:b", "70000", "1:2:3"] {
            assert!(parse_ports(bad).unwrap_err().to_string().contains("LOCAL:REMOTE"), "{bad}");
        }
    }

    #[test]
    fn each_command_sends_the_shared_request() {
        // What the CLI sends is what the orchestrator sends a host for the same call.
        assert_eq!(VmCall::stop(true).request("ci 1").path, "/machines/ci%201/stop?force=true");
        let del = VmCall::Delete { force: false }.request("v");
        assert_eq!((del.method, del.path.as_str(), del.body), ("DELETE", "/machines/v", None));
        let exec = VmCall::Execute(ExecuteRequest {
            command: "true".into(),
            environment_variables: parse_env(&["K=V".into()]).unwrap(),
            timeout: Some(5),
            ..Default::default()
        })
        .request("v");
        assert_eq!(exec.body.unwrap()["environment_variables"]["K"], "V");
    }
}
