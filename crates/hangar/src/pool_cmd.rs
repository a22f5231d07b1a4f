//! `hangar pool ...`: runner pools (`/runner-pools`) from the command line, and the server
//! side of `RUNNER_POOLS_FILE` (pools applied at start) and of resolving a pool image's
//! `latest` through this server's catalog module.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use hangar_wire::{PoolImage, RunnerPool, RunnerPoolView};

use crate::client::{Client, seg};
use crate::output::{Output, print_as};

const COLS: &[&str] = &["name", "labels", "image", "cpus", "memory_mb", "warm", "max_vms", "status"];

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Every runner pool with its warm VMs counted.
    List,
    /// One runner pool.
    Show { name: String },
    /// Create a runner pool from flags or from a YAML/JSON file (--file).
    Create {
        #[command(flatten)]
        def: PoolArgs,
        /// Wait until the pool's warm VMs are ready, showing progress (at most this long,
        /// e.g. 10m).
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// Replace a runner pool (its warm VMs are made again) from flags or a file.
    Update {
        #[command(flatten)]
        def: PoolArgs,
        /// Wait until the pool's warm VMs are ready again, showing progress.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// Delete a runner pool: its warm VMs go; VMs claimed from it stay.
    Delete { name: String },
}

#[derive(Args)]
pub struct PoolArgs {
    /// The pool's name (with --file, the file's name wins when it has one).
    name: Option<String>,
    /// A YAML or JSON file holding the pool (the /runner-pools body).
    #[arg(long, conflicts_with_all = ["image", "labels"])]
    file: Option<std::path::PathBuf>,
    /// Labels the pool serves (repeat the flag).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Catalog image: ID[:VERSION] (VERSION defaults to latest).
    #[arg(long)]
    image: Option<String>,
    #[arg(long, default_value = "x86_64")]
    architecture: String,
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    #[arg(long, default_value_t = 4096)]
    memory_mb: u64,
    /// Tags a host must have (repeat the flag).
    #[arg(long = "host-tag")]
    host_tags: Vec<String>,
    #[arg(long, default_value_t = 4)]
    max_vms: u32,
    #[arg(long, default_value_t = 0)]
    warm: u32,
    #[arg(long, default_value_t = 3600)]
    job_timeout_secs: u64,
}

impl PoolArgs {
    fn pool(self) -> Result<RunnerPool> {
        if let Some(f) = &self.file {
            let mut p: RunnerPool = read_one(f)?;
            if p.name.trim().is_empty() {
                p.name = self.name.unwrap_or_default();
            }
            return Ok(p);
        }
        let name = self.name.ok_or_else(|| anyhow!("give the pool's name (or --file)"))?;
        let image = self.image.ok_or_else(|| anyhow!("give --image ID[:VERSION] (or --file)"))?;
        let (catalog_id, version) = match image.split_once(':') {
            Some((id, v)) => (id.to_string(), v.to_string()),
            None => (image, "latest".to_string()),
        };
        Ok(RunnerPool {
            name,
            labels: self.labels,
            image: PoolImage { catalog_id, version, architecture: self.architecture },
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            host_tags: self.host_tags,
            max_vms: self.max_vms,
            warm: self.warm,
            job_timeout_secs: self.job_timeout_secs,
        })
    }
}

fn read_one(path: &Path) -> Result<RunnerPool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not a runner pool (YAML or JSON)", path.display()))
}

/// The pools of a `RUNNER_POOLS_FILE`: a YAML or JSON list, or `{pools: [...]}`.
pub fn read_file(path: &Path) -> Result<Vec<RunnerPool>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<RunnerPool>),
        Wrapped { pools: Vec<RunnerPool> },
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("RUNNER_POOLS_FILE: cannot read {}", path.display()))?;
    let f: File = serde_yaml::from_str(&text)
        .with_context(|| format!("RUNNER_POOLS_FILE {}: not a list of runner pools (YAML or JSON)", path.display()))?;
    Ok(match f {
        File::List(l) | File::Wrapped { pools: l } => l,
    })
}

/// A row for tables: the status folded into one cell.
fn row(v: &RunnerPoolView) -> serde_json::Value {
    let mut j = serde_json::to_value(v).unwrap_or_default();
    let s = &v.status;
    j["image"] = format!("{}:{} ({})", v.pool.image.catalog_id, v.pool.image.version, v.pool.image.architecture).into();
    j["status"] = format!(
        "{} ready, {} starting, {} claimed{}",
        s.warm_ready,
        s.warm_starting,
        s.claimed,
        s.last_error.as_deref().map(|e| format!("; {e}")).unwrap_or_default()
    )
    .into();
    j
}

fn parse_wait(w: &str) -> Result<Duration> {
    humantime::parse_duration(w).map_err(|e| anyhow!("--wait {w:?}: {e} (e.g. 90s, 10m)"))
}

/// Follows the pool until its warm VMs are ready, on a progress bar.
async fn wait_warm(c: &Client, name: &str, limit: Duration) -> Result<RunnerPoolView> {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} warm VMs ready {msg}")
    {
        bar.set_style(style);
    }
    let deadline = Instant::now() + limit;
    loop {
        let v: RunnerPoolView = c.get_as(&format!("/runner-pools/{}", seg(name)), &[]).await?;
        bar.set_length(u64::from(v.pool.warm));
        bar.set_position(u64::from(v.status.warm_ready.min(v.pool.warm)));
        bar.set_message(v.status.last_error.clone().map(|e| format!("({e})")).unwrap_or_default());
        if v.status.warm_ready >= v.pool.warm {
            bar.finish_and_clear();
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "pool {name}: {} of {} warm VMs ready after {}",
                v.status.warm_ready,
                v.pool.warm,
                humantime::format_duration(limit)
            );
        }
        // Polling the server's status while the pool fills.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(c: Client, cmd: PoolCommand, out: Output) -> Result<()> {
    match cmd {
        PoolCommand::List => {
            let v: Vec<RunnerPoolView> = c.get_as("/runner-pools", &[]).await?;
            match out {
                Output::Json => print_as(out, &v, COLS),
                Output::Table => print_as(out, &v.iter().map(row).collect::<Vec<_>>(), COLS),
            }
        }
        PoolCommand::Show { name } => {
            let v: RunnerPoolView = c.get_as(&format!("/runner-pools/{}", seg(&name)), &[]).await?;
            match out {
                Output::Json => print_as(out, &v, COLS),
                Output::Table => print_as(out, &row(&v), COLS),
            }
        }
        PoolCommand::Create { def, wait } => {
            let limit = wait.as_deref().map(parse_wait).transpose()?;
            let pool = def.pool()?;
            let mut v: RunnerPoolView = c.send_as(reqwest::Method::POST, "/runner-pools", &pool).await?;
            if let Some(limit) = limit {
                v = wait_warm(&c, &v.pool.name, limit).await?;
            }
            show(out, &v)
        }
        PoolCommand::Update { def, wait } => {
            let limit = wait.as_deref().map(parse_wait).transpose()?;
            let pool = def.pool()?;
            let path = format!("/runner-pools/{}", seg(&pool.name));
            let mut v: RunnerPoolView = c.send_as(reqwest::Method::PUT, &path, &pool).await?;
            if let Some(limit) = limit {
                v = wait_warm(&c, &v.pool.name, limit).await?;
            }
            show(out, &v)
        }
        PoolCommand::Delete { name } => {
            c.delete(&format!("/runner-pools/{}", seg(&name))).await?;
            print_as(out, &serde_json::json!({"deleted": name}), &["deleted"])
        }
    }
}

fn show(out: Output, v: &RunnerPoolView) -> Result<()> {
    match out {
        Output::Json => print_as(out, v, COLS),
        Output::Table => print_as(out, &row(v), COLS),
    }
}

// ----- server side ------------------------------------------------------------------------

/// Resolves a pool image's `latest` through this server's catalog module.
struct CatalogVersions(Arc<hangar_catalog::Catalog>);

#[async_trait::async_trait]
impl hangar_orchestrator::ImageVersions for CatalogVersions {
    async fn resolve(&self, image: &PoolImage) -> std::result::Result<String, String> {
        let arch = hangar_catalog::service::parse_arch(&image.architecture).map_err(|e| e.to_string())?;
        let system = hangar_core::Principal {
            user_id: "system".into(),
            username: "system".into(),
            email: String::new(),
            roles: [hangar_core::claims::SUPER_USER_ROLE.to_string()].into(),
            claims: Default::default(),
            method: hangar_core::principal::AuthMethod::Jwt,
        };
        match self.0.get(&system, &image.catalog_id, &image.version, arch).await {
            Ok(m) => Ok(m.version),
            // Not in this server's catalog (the hosts pull from their own): as written.
            Err(_) => Ok(image.version.clone()),
        }
    }
}

/// At start: `latest` through the catalog module when it runs here, and the pools of
/// `RUNNER_POOLS_FILE` applied (created, or updated where they differ: the file wins over
/// edits made through the API, at every start; pools it does not name are left alone).
pub async fn start(
    file: Option<&Path>,
    orchestrator: Option<&Arc<hangar_orchestrator::HttpOrchestrator>>,
    catalog: Option<&Arc<hangar_catalog::Catalog>>,
) -> Result<()> {
    let Some(o) = orchestrator else {
        if let Some(f) = file {
            tracing::warn!(file = %f.display(), "RUNNER_POOLS_FILE is ignored: the orchestrator module is off");
        }
        return Ok(());
    };
    if let Some(c) = catalog {
        o.set_image_versions(Arc::new(CatalogVersions(c.clone())));
    }
    let Some(f) = file else { return Ok(()) };
    let pools = read_file(f)?;
    let applied = o
        .apply_runner_pools(&hangar_core::audit::Actor::system(), pools)
        .await
        .map_err(|e| anyhow!("RUNNER_POOLS_FILE {}: {e}", f.display()))?;
    tracing::info!(
        file = %f.display(),
        created = ?applied.created,
        updated = ?applied.updated,
        unchanged = applied.unchanged.len(),
        "runner pools applied"
    );
    Ok(())
}
