//! `hangar-fleet-sim`: plays `--hosts` host agents with `--vms` VMs each on loopback. With
//! `--orchestrator` it registers them there, waits until the orchestrator shows every host
//! healthy and every VM, then measures for `--window` seconds (event-to-state lag, the
//! orchestrator's RSS and CPU with `--orchestrator-pid`) and times `--creates` creates; it
//! prints a table with the goals and, with `--json`, writes the figures. Without
//! `--orchestrator` it serves the fleet until interrupted (hosts and keys in `--hosts-file`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hangar_fleet_sim::measure::{Creates, HostAuth, Lag, Orchestrator, ProcSample, Ready, watch_rss};
use hangar_fleet_sim::{Fleet, SimConfig, SimError};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "hangar-fleet-sim", version, about = "Plays many Hangar host agents to benchmark an orchestrator")]
struct Args {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// VMs per host.
    #[arg(long, default_value_t = 10)]
    vms: usize,
    /// Host i listens on 127.0.0.1:(base-port + i); 0 takes any free port for each.
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// Host names are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// Background VM state changes a second over the whole fleet.
    #[arg(long, default_value_t = 100.0)]
    changes_per_second: f64,
    /// The orchestrator's URL (e.g. http://127.0.0.1:8080); without it the fleet is only served.
    #[arg(long)]
    orchestrator: Option<String>,
    /// An X-Api-Key of the orchestrator's (a user who may register hosts and create VMs).
    #[arg(long, env = "HANGAR_FLEET_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The orchestrator's process id, to sample its memory and CPU from /proc.
    #[arg(long)]
    orchestrator_pid: Option<u32>,
    /// How the orchestrator authenticates to the simulated hosts.
    #[arg(long, value_enum, default_value = "api-key")]
    host_auth: HostAuth,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 16)]
    register_concurrency: usize,
    /// Longest wait for every host healthy and every VM listed, in seconds.
    #[arg(long, default_value_t = 900)]
    ready_timeout: u64,
    /// Measurement window, in seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Lag probers running at once.
    #[arg(long, default_value_t = 4)]
    probers: usize,
    /// A prober polls the orchestrator's view of its VM this often, in milliseconds.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
    /// A prober waits this long between two probes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    probe_pause_ms: u64,
    /// Creates through POST /orchestrator/machines after the window.
    #[arg(long, default_value_t = 200)]
    creates: usize,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 1)]
    create_concurrency: usize,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Without --orchestrator: write every host's name, URL and API key here (JSON lines).
    #[arg(long)]
    hosts_file: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    hosts: usize,
    vms: usize,
    registration_seconds: f64,
    ready: Ready,
    window_seconds: f64,
    changes: u64,
    events_sent: u64,
    event_streams: usize,
    orchestrator: Option<ProcReport>,
    lag: Lag,
    creates: Creates,
}

#[derive(Debug, Serialize)]
struct ProcReport {
    rss_mb_before: f64,
    rss_mb_after: f64,
    rss_mb_max: f64,
    hwm_mb: f64,
    cpu_seconds: f64,
    cpu_percent: f64,
    threads: u64,
}

#[derive(Serialize)]
struct HostLine<'a> {
    name: &'a str,
    url: &'a str,
    api_key: &'a str,
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn table(r: &Report) {
    let row = |what: &str, figure: String, goal: &str| println!("  {what:<38} {figure:>16}   {goal}");
    println!(
        "fleet: {} hosts x {} VMs ({} VMs), {} event streams open",
        r.hosts,
        r.vms / r.hosts.max(1),
        r.vms,
        r.event_streams
    );
    println!("  {:<38} {:>16}   goal", "measure", "figure");
    row("registration", format!("{:.1} s", r.registration_seconds), "");
    row("all healthy and listed after", format!("{:.1} s", r.ready.seconds), "");
    row("hosts healthy / VMs listed", format!("{} / {}", r.ready.hosts_healthy, r.ready.vms_listed), "");
    if let Some(kb) = r.ready.rss_kb_before_list {
        row("orchestrator VmRSS (ready, before list)", format!("{:.1} MB", mb(kb)), "");
    }
    if let Some(o) = &r.orchestrator {
        row("orchestrator VmRSS (end of window)", format!("{:.1} MB", o.rss_mb_after), "<= 200 MB");
        row("orchestrator VmRSS (max in window)", format!("{:.1} MB", o.rss_mb_max), "<= 200 MB");
        row("orchestrator VmHWM (peak since start)", format!("{:.1} MB", o.hwm_mb), "");
        row("orchestrator CPU in window", format!("{:.1} s ({:.0} %)", o.cpu_seconds, o.cpu_percent), "");
    }
    row(
        "state changes in window",
        format!("{} ({:.0}/s)", r.changes, r.changes as f64 / r.window_seconds.max(0.001)),
        "",
    );
    row("event-to-state lag p50", format!("{:.1} ms", r.lag.lag.p50_ms), "");
    row("event-to-state lag p99", format!("{:.1} ms", r.lag.lag.p99_ms), "<= 1000 ms");
    row(
        "event-to-state lag max / probes / missed",
        format!("{:.0} ms / {} / {}", r.lag.lag.max_ms, r.lag.lag.n, r.lag.missed),
        "",
    );
    row(
        &format!("create via orchestrator p50 (x{})", r.creates.concurrency),
        format!("{:.1} ms", r.creates.latency.p50_ms),
        "",
    );
    row("create via orchestrator p99", format!("{:.1} ms", r.creates.latency.p99_ms), "");
    row("creates ok / failed", format!("{} / {}", r.creates.latency.n, r.creates.failed), "");
    if let Some(e) = &r.creates.first_error {
        println!("  first create error: {e}");
    }
}

async fn serve_only(fleet: &Fleet, args: &Args) -> Result<(), SimError> {
    if let Some(path) = &args.hosts_file {
        let mut out = String::new();
        for h in &fleet.hosts {
            let line = HostLine { name: &h.name, url: &h.url, api_key: &h.api_key };
            out.push_str(&serde_json::to_string(&line).unwrap_or_default());
            out.push('\n');
        }
        std::fs::write(path, out)?;
    }
    println!("serving {} hosts with {} VMs; Ctrl-C stops", fleet.hosts.len(), fleet.vm_count());
    let stop = AtomicBool::new(false);
    tokio::select! {
        _ = fleet.change_states(args.changes_per_second, &stop) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), SimError> {
    let cfg = SimConfig {
        hosts: args.hosts,
        vms_per_host: args.vms,
        base_port: args.base_port,
        name_prefix: args.name_prefix.clone(),
        ..SimConfig::default()
    };
    let fleet = Arc::new(Fleet::start(&cfg).await?);
    let Some(url) = args.orchestrator.clone() else {
        return serve_only(&fleet, &args).await;
    };
    let key = args
        .api_key
        .clone()
        .ok_or_else(|| SimError::Orchestrator("--orchestrator needs --api-key (or HANGAR_FLEET_SIM_API_KEY)".into()))?;
    let orch = Orchestrator::new(&url, &key)?;
    if !orch.alive().await {
        return Err(SimError::Orchestrator(format!("{url} does not answer /api/v1/health/probe")));
    }
    eprintln!("fleet-sim: {} hosts x {} VMs listening; registering", cfg.hosts, cfg.vms_per_host);
    let t = Instant::now();
    orch.register(&fleet, args.host_auth, args.register_concurrency).await?;
    let registration_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "fleet-sim: registered in {registration_seconds:.1} s; waiting for every host healthy and every VM listed"
    );
    let ready = orch.wait_ready(&fleet, Duration::from_secs(args.ready_timeout), args.orchestrator_pid).await?;
    eprintln!("fleet-sim: ready after {:.1} s more; measuring for {} s", ready.seconds, args.window);

    // The window: background changes, lag probes, memory samples.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_changes = Arc::new(AtomicBool::new(false));
    let changer = {
        let (fleet, stop) = (fleet.clone(), stop_changes.clone());
        let rate = args.changes_per_second;
        tokio::spawn(async move { fleet.change_states(rate, &stop).await })
    };
    let pid = args.orchestrator_pid;
    let before = pid.map(ProcSample::read).transpose()?;
    let sent_before = fleet.events_sent();
    let watcher = pid.map(|p| tokio::spawn(watch_rss(p, Duration::from_millis(250), stop.clone())));
    let t = Instant::now();
    let window = Duration::from_secs(args.window);
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let lag = orch
        .lag_probes(
            &fleet,
            args.probers,
            Duration::from_millis(args.poll_ms),
            Duration::from_millis(args.probe_pause_ms),
            &stop,
        )
        .await;
    let _ = timer.await;
    let window_seconds = t.elapsed().as_secs_f64();
    let after = pid.map(ProcSample::read).transpose()?;
    let rss_max = match watcher {
        Some(w) => w.await.unwrap_or(0),
        None => 0,
    };
    let events_sent = fleet.events_sent() - sent_before;
    let orchestrator = match (before, after) {
        (Some(b), Some(a)) => {
            let cpu = a.cpu_ticks.saturating_sub(b.cpu_ticks) as f64 / hangar_fleet_sim::measure::CLK_TCK;
            Some(ProcReport {
                rss_mb_before: mb(b.rss_kb),
                rss_mb_after: mb(a.rss_kb),
                rss_mb_max: mb(rss_max.max(a.rss_kb)),
                hwm_mb: mb(a.hwm_kb),
                cpu_seconds: cpu,
                cpu_percent: 100.0 * cpu / window_seconds.max(0.001),
                threads: a.threads,
            })
        }
        _ => None,
    };
    eprintln!("fleet-sim: window done; {} creates", args.creates);
    let creates = orch.creates(args.creates, args.create_concurrency, &format!("{}-new", args.name_prefix)).await;
    stop_changes.store(true, Ordering::Relaxed);
    let changes = changer.await.unwrap_or(0);
    let report = Report {
        hosts: cfg.hosts,
        vms: cfg.hosts * cfg.vms_per_host,
        registration_seconds,
        ready,
        window_seconds,
        changes: changes + lag.lag.n as u64 + lag.missed,
        events_sent,
        event_streams: fleet.subscribers(),
        orchestrator,
        lag,
        creates,
    };
    table(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text)?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hangar-fleet-sim: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hangar-fleet-sim: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
