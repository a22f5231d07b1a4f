//! The catalog module in the binary: starting it in `hangar serve`, and the CLI
//! (`hangar catalog push|pull|list|get|taint|untaint|revoke|delete|import`,
//! `hangar push FILE.pdfile`, `hangar pull FILE.pdfile`).
//!
//! Push packs a local folder with `hangar-image` and uploads the chunks straight to
//! the storage provider with the credentials the user gave the CLI (flag, PDFile or
//! `HANGAR_CATALOG_PROVIDER`), then registers the manifest with the server. Pull asks
//! the server for the manifest (access is checked there) and fetches the chunks
//! through the server's chunk route, so the puller never holds provider keys.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use hangar_api::ModuleStatus;
use hangar_catalog::hangar_image::{self, CacheLimits, ChunkCache, ProgressFn, PullOptions, PushOptions};
use hangar_catalog::pdfile::{self, PdFile};
use hangar_catalog::remote::{RemoteAuth, RemoteImageStore, segment};
use hangar_catalog::{Architecture, Catalog, CatalogOptions};
use hangar_core::EventBus;
use hangar_store::Store;
use serde_json::{Value, json};
use tracing::info;

use crate::config::Layers;
use crate::output::{Output, print};

// ----- the server side -----------------------------------------------------------------

/// Starts the catalog module when `ENABLED_MODULES` (or `MODE`) asks for it or names
/// nothing, and records its status in `modules`. The host image cache is configured by the
/// `CATALOG_CACHE_*` keys (`Settings::catalog_cache`).
pub fn start_catalog(
    l: &Layers,
    s: &crate::settings::Settings,
    store: Arc<dyn Store>,
    dir: &Path,
    bus: EventBus,
    modules: &mut [ModuleStatus],
) -> Result<Option<Arc<Catalog>>> {
    let (catalog, running, message) = if !s.modules.wants("catalog") {
        (None, false, "not requested in ENABLED_MODULES".to_string())
    } else {
        let mut options = CatalogOptions::new(dir);
        options.cache_dir = s.catalog_cache.folder.clone();
        options.local_roots = l.list("CATALOG_LOCAL_ROOTS").into_iter().map(std::path::PathBuf::from).collect();
        options.cache_limits = s.catalog_cache.limits;
        match Catalog::new(store, bus, options) {
            Ok(c) => {
                let msg = format!("serving manifests; host image cache in {}", c.cache_dir().display());
                (Some(Arc::new(c)), true, msg)
            }
            Err(e) => (None, false, format!("cannot run: {e}")),
        }
    };
    if let Some(m) = modules.iter_mut().find(|m| m.name == "catalog") {
        m.enabled = running;
        m.healthy = running;
        m.message = message;
    }
    Ok(catalog)
}

// ----- the CLI -------------------------------------------------------------------------

/// `hangar catalog ...`.
#[derive(Subcommand)]
#[command(disable_version_flag = true)]
pub enum CatalogCommand {
    /// Pack a local image folder, upload its chunks to a storage provider, register it.
    #[command(disable_version_flag = true)]
    Push(PushArgs),
    /// Download an image through the catalog server into a local folder; with a PDFile and
    /// --host, the reference's pull (the same as `hangar pull FILE --host URL`).
    #[command(disable_version_flag = true)]
    Pull(crate::pdfile_cmd::PullFileArgs),
    /// Every manifest you may see; with a PDFile, of the catalog its FROM names.
    List {
        /// A PDFile (`FROM`, `AUTHENTICATE ...`, `INSECURE`).
        file: Option<PathBuf>,
    },
    /// Do what a PDFile says (`RUN push|pull|list|import|import-vm`, or pull with FROM,
    /// push with TO), as the reference's `catalog run`.
    #[command(disable_version_flag = true)]
    Run {
        file: PathBuf,
        /// For a pull: register the VM on this Hangar host (see `hangar pull --help`).
        #[arg(long)]
        host: Option<String>,
    },
    /// Manifests of one id, one version, or one architecture.
    Get { catalog_id: String, version: Option<String>, architecture: Option<String> },
    /// Make a version unpullable until it is untainted.
    Taint {
        catalog_id: String,
        #[arg(id = "image_version", value_name = "VERSION")]
        version: String,
        architecture: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Make a tainted version pullable again.
    Untaint { catalog_id: String, version: String, architecture: String },
    /// Revoke a version for good (SUPER_USER).
    Revoke { catalog_id: String, version: String, architecture: String },
    /// Delete an id, a version, or one architecture of it.
    Delete {
        catalog_id: String,
        #[arg(id = "image_version", value_name = "VERSION")]
        version: Option<String>,
        architecture: Option<String>,
        /// Also delete the image and its unshared chunks in storage.
        #[arg(long)]
        clean_remote: bool,
    },
    /// Convert an image stored in the previous layout (one object per 1 MiB chunk) to
    /// the packed layout (64 KiB chunks in packs), in place, with a progress bar; the
    /// entry is registered again with the same metadata, and its old chunks that no
    /// other image in the provider uses are deleted.
    #[command(disable_version_flag = true)]
    Repack(RepackArgs),
    /// Import a reference catalog entry (.meta + .pdpack) from a provider.
    #[command(disable_version_flag = true)]
    Import {
        /// Provider connection string (or HANGAR_CATALOG_PROVIDER).
        #[arg(long, env = "HANGAR_CATALOG_PROVIDER", hide_env_values = true)]
        provider: String,
        #[arg(long)]
        catalog_id: String,
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        architecture: String,
        /// Key of the .meta when it is not <id>/<id>-<arch>-<version>.meta.
        #[arg(long)]
        meta_path: Option<String>,
        #[arg(long)]
        overwrite: bool,
    },
}

/// What to push; flags override the PDFile's values.
#[derive(Args, Clone, Default)]
#[command(disable_version_flag = true)]
pub struct PushArgs {
    /// A PDFile (`TO`, `PROVIDER`, `CATALOG_ID`, `VERSION`, `LOCAL_PATH`, ...).
    pub file: Option<PathBuf>,
    /// Storage provider connection string (or HANGAR_CATALOG_PROVIDER). Stays with
    /// the CLI for the upload; the server keeps it encrypted to serve pulls.
    #[arg(long, env = "HANGAR_CATALOG_PROVIDER", hide_env_values = true)]
    pub provider: Option<String>,
    #[arg(long)]
    pub catalog_id: Option<String>,
    #[arg(long)]
    pub version: Option<String>,
    /// x86_64 or arm64 (aliases accepted); default: this machine's.
    #[arg(long)]
    pub architecture: Option<String>,
    /// The image folder to push (a VM folder or bundle).
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[arg(long)]
    pub description: Option<String>,
    /// VM type (pvm, macvm, qemu, ...).
    #[arg(long = "type")]
    pub vm_type: Option<String>,
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Required role (repeatable).
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Required claim (repeatable).
    #[arg(long = "claim")]
    pub claims: Vec<String>,
    /// Replace an existing manifest with the same id, version and architecture.
    #[arg(long)]
    pub overwrite: bool,
    /// Chunk uploads in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

/// What to repack.
#[derive(Args, Clone, Default)]
#[command(disable_version_flag = true)]
pub struct RepackArgs {
    pub catalog_id: String,
    #[arg(id = "image_version", value_name = "VERSION")]
    pub version: String,
    pub architecture: String,
    /// Storage provider connection string of the entry (or HANGAR_CATALOG_PROVIDER).
    #[arg(long, env = "HANGAR_CATALOG_PROVIDER", hide_env_values = true)]
    pub provider: String,
    /// Folder for the temporary copy of the image (default: the system temp folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Transfers in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

/// What to pull; flags override the PDFile's values.
#[derive(Args, Clone, Default)]
#[command(disable_version_flag = true)]
pub struct PullArgs {
    /// A PDFile (`FROM`, `CATALOG_ID`, `VERSION`, `ARCHITECTURE`, `DESTINATION`, ...).
    pub file: Option<PathBuf>,
    #[arg(long)]
    pub catalog_id: Option<String>,
    /// A version, or `latest` (the default).
    #[arg(long)]
    pub version: Option<String>,
    /// Default: this machine's.
    #[arg(long)]
    pub architecture: Option<String>,
    /// Folder to put the image folder in (default: the current folder).
    #[arg(long)]
    pub destination: Option<PathBuf>,
    /// Name of the image folder (default: <catalog_id>-<architecture>-<version>).
    #[arg(long)]
    pub machine_name: Option<String>,
    /// Chunk cache folder (default: $XDG_CACHE_HOME/hangar/chunks); makes repeated
    /// and interrupted pulls cheap.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Do not use a chunk cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Chunk downloads in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

/// A connection to the catalog server.
struct Server {
    http: reqwest::Client,
    base: String,
    auth: RemoteAuth,
}

fn read_pdfile(path: &Path) -> Result<PdFile> {
    crate::pdfile_cmd::read(path)
}

impl Server {
    /// URL: the PDFile's, then --url, HANGAR_URL, the saved login. Credentials: the
    /// PDFile's, then HANGAR_API_KEY / HANGAR_TOKEN, then the saved login.
    async fn connect(url_flag: Option<&str>, pd: Option<&PdFile>, pd_url: Option<&str>) -> Result<Server> {
        let saved = crate::client::load_credentials();
        let url = pd_url
            .map(String::from)
            .or_else(|| url_flag.map(String::from))
            .or_else(|| std::env::var("HANGAR_URL").ok())
            .or_else(|| saved.as_ref().map(|c| c.url.clone()))
            .ok_or_else(|| {
                anyhow!("no server: give --url, set HANGAR_URL, use FROM/TO in the PDFile, or run `hangar login`")
            })?;
        let insecure = pd.is_some_and(|p| p.insecure);
        let http = reqwest::Client::builder()
            .user_agent(concat!("hangar-cli/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(insecure)
            .build()?;
        let base = crate::client::api_base(&url);
        let mut server = Server { http, base, auth: RemoteAuth::None };
        server.auth = if let Some(k) = pd.and_then(|p| p.api_key.clone()) {
            RemoteAuth::ApiKey(k)
        } else if let (Some(u), Some(pw)) = (pd.and_then(|p| p.username.clone()), pd.and_then(|p| p.password.clone())) {
            let key = if u.contains('@') { "email" } else { "username" };
            let t = server.call(reqwest::Method::POST, "/auth/token", Some(json!({key: u, "password": pw}))).await?;
            RemoteAuth::Bearer(
                t.get("token").and_then(Value::as_str).context("the server answered without a token")?.to_string(),
            )
        } else if let Ok(k) = std::env::var("HANGAR_API_KEY") {
            RemoteAuth::ApiKey(k)
        } else if let Ok(t) = std::env::var("HANGAR_TOKEN") {
            RemoteAuth::Bearer(t)
        } else if let Some(c) = saved.filter(|c| crate::client::api_base(&c.url) == server.base) {
            if c.expires_at <= chrono::Utc::now().timestamp() {
                bail!("the saved login for {} expired; run `hangar login` again", c.url);
            }
            RemoteAuth::Bearer(c.token)
        } else {
            RemoteAuth::None
        };
        Ok(server)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.auth.apply(self.http.request(method.clone(), &url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let msg =
                value.get("message").and_then(Value::as_str).map(String::from).unwrap_or_else(|| value.to_string());
            bail!("{method} {path} failed with {status}: {msg}");
        }
        Ok(value)
    }
}

/// A progress bar with bytes, throughput and ETA, drawn only on a terminal.
fn progress(label: &str) -> (Option<ProgressFn>, Option<indicatif::ProgressBar>) {
    if !std::io::stdout().is_terminal() {
        return (None, None);
    }
    let pb = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>8} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(label.to_string());
    let bar = pb.clone();
    let f: ProgressFn = Arc::new(move |p: &hangar_image::Progress| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
    });
    (Some(f), Some(pb))
}

fn arch_or_host(a: Option<&str>) -> Result<Architecture> {
    match a {
        Some(a) => a.parse().map_err(|e| anyhow!("{e}")),
        None => Architecture::host().context("this machine's architecture is not x86_64 or arm64: give --architecture"),
    }
}

const MANIFEST_COLS: &[&str] =
    &["catalog_id", "version", "architecture", "type", "size", "tainted", "revoked", "download_count", "tags"];

/// `hangar catalog ...`.
pub async fn run(cmd: CatalogCommand, url: Option<&str>, out: Output) -> Result<()> {
    match cmd {
        CatalogCommand::Push(a) => push(a, url, out).await,
        CatalogCommand::Repack(a) => repack(a, url, out).await,
        CatalogCommand::Pull(a) => crate::pdfile_cmd::pull(a, url, out).await,
        CatalogCommand::List { file: Some(f) } => crate::pdfile_cmd::list(&f, url, out).await,
        CatalogCommand::Run { file, host } => crate::pdfile_cmd::run(file, host, url, out).await,
        other => {
            let s = Server::connect(url, None, None).await?;
            admin(&s, other, out).await
        }
    }
}

async fn admin(s: &Server, cmd: CatalogCommand, out: Output) -> Result<()> {
    use reqwest::Method;
    let entry = |id: &str, v: &str, a: &str| format!("/catalog/{}/{}/{}", segment(id), segment(v), segment(a));
    match cmd {
        CatalogCommand::List { .. } => {
            let v = s.call(Method::GET, "/catalog", None).await?;
            if out == Output::Json {
                print(out, &v, &[]);
            } else {
                // Flatten [{ID: [m...]}] into rows.
                let rows: Vec<Value> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object)
                    .flat_map(|o| o.values().filter_map(Value::as_array).flatten().cloned().collect::<Vec<_>>())
                    .collect();
                print(out, &Value::Array(rows), MANIFEST_COLS);
            }
        }
        CatalogCommand::Get { catalog_id, version, architecture } => {
            let mut path = format!("/catalog/{}", segment(&catalog_id));
            if let Some(v) = &version {
                path.push_str(&format!("/{}", segment(v)));
                if let Some(a) = &architecture {
                    path.push_str(&format!("/{}", segment(a)));
                }
            } else if architecture.is_some() {
                bail!("give a version (or latest) before the architecture");
            }
            print(out, &s.call(Method::GET, &path, None).await?, MANIFEST_COLS);
        }
        CatalogCommand::Taint { catalog_id, version, architecture, reason } => {
            let p = format!("{}/taint", entry(&catalog_id, &version, &architecture));
            print(out, &s.call(Method::PATCH, &p, Some(json!({"reason": reason}))).await?, MANIFEST_COLS);
        }
        CatalogCommand::Untaint { catalog_id, version, architecture } => {
            let p = format!("{}/untaint", entry(&catalog_id, &version, &architecture));
            print(out, &s.call(Method::PATCH, &p, None).await?, MANIFEST_COLS);
        }
        CatalogCommand::Revoke { catalog_id, version, architecture } => {
            let p = format!("{}/revoke", entry(&catalog_id, &version, &architecture));
            print(out, &s.call(Method::PATCH, &p, None).await?, MANIFEST_COLS);
        }
        CatalogCommand::Delete { catalog_id, version, architecture, clean_remote } => {
            let mut path = format!("/catalog/{}", segment(&catalog_id));
            if let Some(v) = &version {
                path.push_str(&format!("/{}", segment(v)));
                if let Some(a) = &architecture {
                    path.push_str(&format!("/{}", segment(a)));
                }
            }
            if clean_remote {
                path.push_str("?clean_remote=true");
            }
            s.call(Method::DELETE, &path, None).await?;
            let v = json!({"deleted": catalog_id, "version": version, "architecture": architecture, "clean_remote": clean_remote});
            print(out, &v, &["deleted", "version", "architecture", "clean_remote"]);
        }
        CatalogCommand::Import { provider, catalog_id, version, architecture, meta_path, overwrite } => {
            let body = json!({"connection": provider, "catalog_id": catalog_id, "version": version,
                "architecture": architecture, "meta_path": meta_path, "overwrite": overwrite});
            print(out, &s.call(Method::PUT, "/catalog/import", Some(body)).await?, MANIFEST_COLS);
        }
        CatalogCommand::Push(_) | CatalogCommand::Pull(_) | CatalogCommand::Repack(_) | CatalogCommand::Run { .. } => {
            unreachable_command()?
        }
    }
    Ok(())
}

/// `hangar catalog list FILE`: the catalog the PDFile's `FROM` (or `TO`) names, with its
/// credentials.
pub async fn list_with(pd: Option<&PdFile>, url: Option<&str>, out: Output) -> Result<()> {
    let target = pd.and_then(|p| p.from.clone().or(p.to.clone()));
    let s = Server::connect(url, pd, target.as_deref()).await?;
    admin(&s, CatalogCommand::List { file: None }, out).await
}

/// `RUN import` in a PDFile: a reference entry (`.meta` + `.pdpack`) from `PROVIDER`.
pub async fn import_with(pd: &PdFile, url: Option<&str>, out: Output) -> Result<()> {
    let s = Server::connect(url, Some(pd), pd.to.clone().or(pd.from.clone()).as_deref()).await?;
    let provider = pd.provider.clone().context("RUN import needs PROVIDER (the storage holding the entry)")?;
    let catalog_id = pd.catalog_id.clone().context("RUN import needs CATALOG_ID")?;
    let architecture = pd.architecture.context("RUN import needs ARCHITECTURE")?;
    admin(
        &s,
        CatalogCommand::Import {
            provider,
            catalog_id,
            version: pd.version.clone(),
            architecture: architecture.as_str().to_string(),
            meta_path: None,
            overwrite: pd.force,
        },
        out,
    )
    .await
}

/// `RUN import-vm` in a PDFile: a VM pack already in `PROVIDER` at `VM_REMOTE_PATH`,
/// registered with the reference's `PUT /catalog/import-vm`.
pub async fn import_vm_with(pd: &PdFile, url: Option<&str>, out: Output) -> Result<()> {
    let s = Server::connect(url, Some(pd), pd.to.clone().or(pd.from.clone()).as_deref()).await?;
    let body = json!({
        "catalog_id": pd.catalog_id.clone().context("RUN import-vm needs CATALOG_ID")?,
        "version": pd.version.clone().context("RUN import-vm needs VERSION")?,
        "architecture": pd.architecture.context("RUN import-vm needs ARCHITECTURE")?.as_str(),
        "connection": pd.provider.clone().context("RUN import-vm needs PROVIDER")?,
        "machine_remote_path": pd.vm_remote_path.clone().context("RUN import-vm needs VM_REMOTE_PATH")?,
        "type": pd.vm_type.clone(), "size": pd.vm_size, "is_compressed": pd.is_compressed.unwrap_or(false),
        "force": pd.force, "description": pd.description.clone(),
        "tags": pd.tags.clone(), "required_roles": pd.roles.clone(), "required_claims": pd.claims.clone(),
    });
    print(out, &s.call(reqwest::Method::PUT, "/catalog/import-vm", Some(body)).await?, MANIFEST_COLS);
    Ok(())
}

fn unreachable_command() -> Result<()> {
    bail!("internal: push and pull are dispatched before admin commands")
}

/// `hangar catalog push` / `hangar push FILE.pdfile`.
pub async fn push(a: PushArgs, url: Option<&str>, out: Output) -> Result<()> {
    let pd = a.file.as_deref().map(read_pdfile).transpose()?;
    let pdv = pd.clone().unwrap_or_default();
    if let Some(c) = pdv.effective_command()
        && c != pdfile::PdCommand::Push
    {
        bail!("this PDFile is for {c:?}, not push");
    }
    let provider = a.provider.clone().or(pdv.provider.clone()).context(
        "no storage provider: give --provider 'provider=...;...', PROVIDER in the PDFile, or HANGAR_CATALOG_PROVIDER",
    )?;
    let catalog_id = a.catalog_id.clone().or(pdv.catalog_id.clone()).context("give --catalog-id (or CATALOG_ID)")?;
    let version = a.version.clone().or(pdv.version.clone()).context("give --version (or VERSION)")?;
    let arch = match a.architecture.as_deref() {
        Some(x) => arch_or_host(Some(x))?,
        None => match pdv.architecture {
            Some(x) => x,
            None => arch_or_host(None)?,
        },
    };
    let path = a
        .path
        .clone()
        .or(pdv.local_path.as_ref().map(PathBuf::from))
        .context("give --path (or LOCAL_PATH): the image folder to push")?;
    if !path.is_dir() {
        bail!("{} is not a folder", path.display());
    }
    hangar_catalog::service::validate_catalog_id(&catalog_id)?;
    hangar_catalog::version::validate_version(&version).map_err(|e| anyhow!(e))?;
    let server = Server::connect(url, pd.as_ref(), pdv.to.as_deref()).await?;

    let store = hangar_catalog::hangar_blobstore::open_connection_string(&provider)
        .map_err(|e| anyhow!("storage provider: {e}"))?;
    let key = hangar_catalog::service::manifest_key(&catalog_id, &version, arch);
    let (cb, bar) = progress("push");
    let opts = PushOptions { concurrency: a.concurrency.max(1), progress: cb, ..Default::default() };
    let started = std::time::Instant::now();
    let report = hangar_image::push(store, &path, &key, &opts).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report =
        report.with_context(|| format!("uploading {} to the {} provider", path.display(), provider_kind(&provider)))?;
    let elapsed = started.elapsed().as_secs_f64();
    info!(chunks = report.chunks_uploaded, bytes = report.bytes_uploaded, "image uploaded");

    let mut tags = pdv.tags.clone();
    tags.extend(a.tags.iter().cloned());
    let mut roles = pdv.roles.clone();
    roles.extend(a.roles.iter().cloned());
    let mut claims = pdv.claims.clone();
    claims.extend(a.claims.iter().cloned());
    let body = json!({
        "catalog_id": catalog_id, "version": version, "architecture": arch.as_str(),
        "description": a.description.clone().or(pdv.description.clone()),
        "type": a.vm_type.clone().or(pdv.vm_type.clone()),
        "tags": tags, "required_roles": roles, "required_claims": claims,
        "minimum_requirements": pdv.minimum_requirements.map(|r| json!({"cpu": r.cpu, "memory": r.memory, "disk": r.disk})),
        "connection": provider, "overwrite": a.overwrite,
    });
    let mut m = server.call(reqwest::Method::POST, "/catalog/push", Some(body)).await?;
    if let Some(o) = m.as_object_mut() {
        o.insert(
            "push".into(),
            json!({"chunks_uploaded": report.chunks_uploaded, "bytes_uploaded": report.bytes_uploaded,
                "chunks_present": report.chunks_present, "seconds": (elapsed * 1000.0).round() / 1000.0}),
        );
    }
    print(out, &m, MANIFEST_COLS);
    Ok(())
}

/// `hangar catalog repack`: pulls the image straight from its provider, pushes it back
/// packed at the same key, registers the entry again (same metadata, overwrite), then
/// deletes its old chunk objects that no image manifest left in the provider uses.
pub async fn repack(a: RepackArgs, url: Option<&str>, out: Output) -> Result<()> {
    let arch = arch_or_host(Some(&a.architecture))?;
    let server = Server::connect(url, None, None).await?;
    let path = format!("/catalog/{}/{}/{}", segment(&a.catalog_id), segment(&a.version), segment(arch.as_str()));
    let entry = server.call(reqwest::Method::GET, &path, None).await?;
    let entry = match entry {
        Value::Array(mut v) if !v.is_empty() => v.swap_remove(0),
        other => other,
    };
    let store = hangar_catalog::hangar_blobstore::open_connection_string(&a.provider)
        .map_err(|e| anyhow!("storage provider: {e}"))?;
    let key = hangar_catalog::service::manifest_key(&a.catalog_id, &a.version, arch);
    let work = a.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let (pull_cb, pull_bar) = progress("read");
    let (push_cb, push_bar) = progress("repack");
    let pull_opts = PullOptions { concurrency: a.concurrency.max(1), cache: None, progress: pull_cb };
    let push_opts = PushOptions { concurrency: a.concurrency.max(1), progress: push_cb, ..Default::default() };
    let started = std::time::Instant::now();
    let done = hangar_image::repack(store.clone(), &key, &work, &pull_opts, &push_opts).await;
    for b in [&pull_bar, &push_bar].into_iter().flatten() {
        b.finish_and_clear();
    }
    let Some((old, report)) =
        done.with_context(|| format!("repacking {key} in the {} provider", provider_kind(&a.provider)))?
    else {
        let v = json!({"catalog_id": a.catalog_id, "version": a.version, "architecture": arch.as_str(), "repacked": false,
            "message": "already in the packed layout"});
        print(out, &v, &["catalog_id", "version", "architecture", "repacked", "message"]);
        return Ok(());
    };
    let field = |k: &str| entry.get(k).cloned().unwrap_or(Value::Null);
    let body = json!({
        "catalog_id": a.catalog_id, "version": a.version, "architecture": arch.as_str(),
        "description": field("description"),
        "type": entry.get("type").or_else(|| entry.get("vm_type")).cloned().unwrap_or(Value::Null),
        "tags": entry.get("tags").cloned().unwrap_or(json!([])),
        "required_roles": entry.get("required_roles").cloned().unwrap_or(json!([])),
        "required_claims": entry.get("required_claims").cloned().unwrap_or(json!([])),
        "minimum_requirements": field("minimum_requirements"),
        "connection": a.provider, "overwrite": true,
    });
    server.call(reqwest::Method::POST, "/catalog/push", Some(body)).await.context("registering the repacked image")?;
    // Old chunks: keep every one another image manifest in the provider still uses.
    let mut keep = Vec::new();
    let mut readable = true;
    for o in store.list("images").await.map_err(|e| anyhow!("listing images: {e}"))? {
        if !o.key.ends_with("/manifest.json") {
            continue;
        }
        match store
            .get(&o.key)
            .await
            .map_err(|e| e.to_string())
            .and_then(|raw| hangar_image::Manifest::from_json(&raw).map_err(|e| e.to_string()))
        {
            Ok(m) => keep.push(m),
            Err(e) => {
                eprintln!("note: {} is unreadable ({e}); old chunks are kept", o.key);
                readable = false;
            }
        }
    }
    let deleted = if readable {
        hangar_image::delete_unused_chunks(store.as_ref(), &old, &keep).await.context("deleting old chunks")?
    } else {
        0
    };
    let v = json!({
        "catalog_id": a.catalog_id, "version": a.version, "architecture": arch.as_str(), "repacked": true,
        "chunks": report.manifest.unique_chunks, "packs": report.manifest.packs.len(),
        "packs_uploaded": report.packs_uploaded, "bytes_uploaded": report.bytes_uploaded,
        "old_chunks_deleted": deleted, "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    });
    print(out, &v, &["catalog_id", "version", "architecture", "chunks", "packs", "old_chunks_deleted"]);
    Ok(())
}

fn provider_kind(connection: &str) -> String {
    connection
        .parse::<hangar_catalog::hangar_blobstore::StoreConfig>()
        .map(|c| c.provider().to_string())
        .unwrap_or_default()
}

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("hangar/chunks");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/hangar/chunks"),
        None => PathBuf::from(".hangar-cache/chunks"),
    }
}

/// `hangar catalog pull` / `hangar pull FILE.pdfile`.
pub async fn pull(a: PullArgs, url: Option<&str>, out: Output) -> Result<()> {
    let pd = a.file.as_deref().map(read_pdfile).transpose()?;
    let pdv = pd.clone().unwrap_or_default();
    if let Some(c) = pdv.effective_command()
        && c != pdfile::PdCommand::Pull
    {
        bail!("this PDFile is for {c:?}, not pull");
    }
    let catalog_id = a.catalog_id.clone().or(pdv.catalog_id.clone()).context("give --catalog-id (or CATALOG_ID)")?;
    let version = a.version.clone().or(pdv.version.clone()).unwrap_or_else(|| "latest".into());
    let arch = match a.architecture.as_deref() {
        Some(x) => arch_or_host(Some(x))?,
        None => match pdv.architecture {
            Some(x) => x,
            None => arch_or_host(None)?,
        },
    };
    let server = Server::connect(url, pd.as_ref(), pdv.from.as_deref()).await?;
    let ticket = server
        .call(
            reqwest::Method::PUT,
            "/catalog/pull-ticket",
            Some(json!({"catalog_id": catalog_id, "version": version, "architecture": arch.as_str()})),
        )
        .await?;
    let m = &ticket["manifest"];
    let resolved = m["version"].as_str().context("the pull answer has no manifest version")?.to_string();
    let real_id = m["catalog_id"].as_str().unwrap_or(&catalog_id).to_string();
    let key = ticket["manifest_key"].as_str().context("the pull answer has no manifest_key")?.to_string();
    let image = serde_json::to_vec(&ticket["image_manifest"])?;
    let name =
        a.machine_name.clone().or(pdv.machine_name.clone()).unwrap_or_else(|| format!("{real_id}-{arch}-{resolved}"));
    if name.contains('/') || name == "." || name == ".." {
        bail!("--machine-name {name:?} must be a plain folder name");
    }
    let parent =
        a.destination.clone().or(pdv.destination.as_ref().map(PathBuf::from)).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let dest = parent.join(&name);
    let store: Arc<dyn hangar_catalog::hangar_blobstore::BlobStore> = Arc::new(RemoteImageStore::new(
        server.http.clone(),
        &server.base,
        server.auth.clone(),
        (&real_id, &resolved, arch.as_str()),
        &key,
        hangar_catalog::remote::Bytes::from(image),
    ));
    let cache = if a.no_cache {
        None
    } else {
        let dir = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
        Some(Arc::new(
            ChunkCache::open(&dir, CacheLimits::default()).with_context(|| format!("chunk cache {}", dir.display()))?,
        ))
    };
    let (cb, bar) = progress("pull");
    let opts = PullOptions { concurrency: a.concurrency.max(1), cache, progress: cb };
    let started = std::time::Instant::now();
    let report = hangar_image::pull(store, &key, &dest, &opts).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = report.with_context(|| format!("pulling {real_id} {resolved} ({arch}) into {}", dest.display()))?;
    let elapsed = started.elapsed().as_secs_f64();
    if pdv.start_after_pull || pdv.clone.is_some() || !pdv.execute.is_empty() || pdv.owner.is_some() {
        eprintln!(
            "note: START_AFTER_PULL, CLONE, EXECUTE and OWNER need a host: run `hangar pull FILE --host URL` to create the VM on a Hangar host"
        );
    }
    let v = json!({
        "catalog_id": real_id, "version": resolved, "architecture": arch.as_str(), "path": dest.display().to_string(),
        "size": report.manifest.total_size, "chunks_downloaded": report.chunks_downloaded,
        "bytes_downloaded": report.bytes_downloaded, "chunks_from_cache": report.chunks_from_cache,
        "seconds": (elapsed * 1000.0).round() / 1000.0,
    });
    print(
        out,
        &v,
        &["catalog_id", "version", "architecture", "path", "size", "chunks_downloaded", "chunks_from_cache"],
    );
    Ok(())
}
