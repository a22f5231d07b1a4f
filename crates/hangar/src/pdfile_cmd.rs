//! `hangar pull FILE --host URL`: the reference's PDFile pull, driven through a host's API.
//!
//! The reference CLI pulls and registers the VM on the machine it runs on. Hangar's CLI asks
//! a running Hangar host instead (`--host`, default the `--url` / `HANGAR_URL` / saved-login
//! server), with the calls every client uses: `POST /machines` with the catalog image
//! (`catalog_manifest`, with a `connection` to the catalog named by `FROM` when it is
//! another server), then `PUT /machines/{id}/clone` (`CLONE`), start, and
//! `PUT /machines/{id}/execute` for each `EXECUTE` line, in the clone when there is one, as
//! the reference does. Without `--host`, `hangar pull FILE` downloads the image into
//! `DESTINATION` as before (`catalog_cmd::pull`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hangar_catalog::pdfile::PdFile;
use hangar_wire::{
    CatalogManifestRef, CloneRequest, CreateMachineRequest, CreateMachineResponse, ExecuteRequest, PowerOp, SecretText,
    VmCall, VmReply,
};
use serde_json::{Value, json};

use crate::catalog_cmd::{self, PullArgs};
use crate::client::{Client, seg};
use crate::output::{Output, print};

/// `hangar pull FILE`: PDFile fields, overridden by these flags (the reference's names).
#[derive(Args, Clone, Default)]
#[command(disable_version_flag = true)]
pub struct PullFileArgs {
    #[command(flatten)]
    pub base: PullArgs,
    /// Register the VM on this Hangar host (its API URL), as the reference's pull does;
    /// without it the image is downloaded into DESTINATION.
    #[arg(long)]
    pub host: Option<String>,
    /// The VM's owner (OWNER).
    #[arg(long)]
    pub owner: Option<String>,
    /// Start the VM (or its clone) once pulled (START_AFTER_PULL).
    #[arg(long)]
    pub start_after_pull: bool,
    /// Catalog server to pull from (FROM).
    #[arg(long)]
    pub from: Option<String>,
}

/// Reads a PDFile, with `{{ .Env.NAME }}` from the environment, and says which of its
/// directives Hangar accepts without acting on them.
pub fn read(path: &std::path::Path) -> Result<PdFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let pd = hangar_catalog::pdfile::parse(&text, &|k| std::env::var(k).ok())
        .with_context(|| format!("{}", path.display()))?;
    for (directive, why) in pd.unused() {
        eprintln!("note: {directive} is accepted and not used: {why}");
    }
    Ok(pd)
}

/// The reference's catalog connection for `FROM` with the PDFile's credentials:
/// `host=scheme://user:password@host:port` or `host=api_key@host:port`.
fn connection(from: &str, pd: &PdFile) -> Result<String> {
    let (scheme, rest) = from.split_once("://").unwrap_or(("https", from));
    let rest = rest.trim_end_matches('/');
    Ok(match (&pd.api_key, &pd.username, &pd.password) {
        (Some(k), _, _) => format!("host={scheme}://{k}@{rest}"),
        (None, Some(u), Some(p)) => format!("host={scheme}://{u}:{p}@{rest}"),
        _ => bail!(
            "FROM {from} is another catalog server: give AUTHENTICATE USERNAME and PASSWORD (or API_KEY) in the PDFile"
        ),
    })
}

/// `hangar pull FILE` / `hangar catalog pull FILE`.
pub async fn pull(a: PullFileArgs, url: Option<&str>, out: Output) -> Result<()> {
    let Some(host) = a.host.clone() else {
        return catalog_cmd::pull(a.base, url, out).await;
    };
    let file = a.base.file.clone().context("give the PDFile: hangar pull FILE --host URL")?;
    let mut pd = read(&file)?;
    if let Some(c) = pd.effective_command()
        && c != hangar_catalog::pdfile::PdCommand::Pull
    {
        bail!("{} is a PDFile for {c:?}, not pull: use `hangar catalog run {}`", file.display(), file.display());
    }
    let b = &a.base;
    let catalog_id = b.catalog_id.clone().or(pd.catalog_id.clone()).context("give CATALOG_ID (or --catalog-id)")?;
    let machine_name =
        b.machine_name.clone().or(pd.machine_name.clone()).context("give MACHINE_NAME (or --machine-name)")?;
    let version = b.version.clone().or(pd.version.clone()).unwrap_or_else(|| "latest".into());
    let architecture = b.architecture.clone().or(pd.architecture.map(|x| x.as_str().to_string()));
    let owner = a.owner.clone().or(pd.owner.clone());
    let start_after_pull = a.start_after_pull || pd.start_after_pull;
    if let Some(f) = &a.from {
        pd.from = Some(f.clone());
    }
    if b.destination.is_some() || pd.destination.is_some() {
        eprintln!("note: DESTINATION is not used with --host: the host keeps its VMs in its own VMs folder");
    }
    let client = Client::connect(Some(&host))?;
    // FROM names another server: the host pulls from it with the PDFile's credentials.
    let same_server = pd.from.as_deref().is_none_or(|f| crate::client::api_base(f) == crate::client::api_base(&host));
    let conn = if same_server { None } else { Some(connection(pd.from.as_deref().unwrap_or(""), &pd)?) };
    let cloning = pd.clone.is_some();
    let body = CreateMachineRequest {
        name: machine_name.clone(),
        owner,
        architecture: architecture.clone(),
        start_on_create: start_after_pull && !cloning,
        catalog_manifest: Some(CatalogManifestRef {
            catalog_id: catalog_id.clone(),
            version: Some(version.clone()),
            architecture,
            connection: conn.map(SecretText),
            ..Default::default()
        }),
        ..Default::default()
    };
    let vm: CreateMachineResponse = client
        .send_as(reqwest::Method::POST, "/machines", &body)
        .await
        .with_context(|| format!("pulling {catalog_id} {version} as {machine_name} on {host}"))?;
    let mut result = json!({"machine_id": vm.id, "machine_name": vm.name, "catalog_id": catalog_id,
        "version": version, "current_state": vm.current_state});

    // CLONE [name]: the clone is where EXECUTE runs and what START_AFTER_PULL starts.
    let mut target = vm.id.clone();
    if let Some(name) = &pd.clone {
        let clone_name = name.clone().unwrap_or_else(|| format!("{machine_name}-clone-{}", &uuid_suffix()));
        let request = CloneRequest {
            clone_name: clone_name.clone(),
            destination_path: pd.clone_destination.clone(),
            linked: false,
        };
        let VmReply::Clone(c) = client.vm(&vm.id, &VmCall::Clone(request)).await? else {
            bail!("the host answered the clone of {machine_name} with something else than the clone");
        };
        result["clone_id"] = json!(c.id);
        result["clone_name"] = json!(c.name);
        target = c.id;
    }
    let mut executed = Vec::new();
    if !pd.execute.is_empty() {
        start_and_wait(&client, &target).await?;
        for command in &pd.execute {
            let request = ExecuteRequest { command: command.clone(), ..Default::default() };
            let VmReply::Exec(r) = client.vm(&target, &VmCall::Execute(request)).await? else {
                bail!("the host answered EXECUTE {command:?} with something else than its output");
            };
            executed.push(json!({"command": command, "exit_code": r.exit_code, "stdout": r.stdout}));
            if r.exit_code != 0 {
                bail!(
                    "EXECUTE {command:?} in {target} exited with {}: {}{}",
                    r.exit_code,
                    r.stdout.trim(),
                    r.stderr.trim()
                );
            }
        }
    }
    if cloning && start_after_pull {
        start(&client, &target).await?;
    }
    result["executed"] = Value::Array(executed);
    let state = client.get(&format!("/machines/{}/status", seg(&target))).await?;
    result["current_state"] = state["status"].clone();
    print(out, &result, &["machine_id", "machine_name", "clone_name", "version", "current_state"]);
    Ok(())
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}", nanos & 0xff_ffff)
}

async fn start(client: &Client, vm: &str) -> Result<()> {
    let status = client.get(&format!("/machines/{}/status", seg(vm))).await?;
    if status["status"].as_str() != Some("running") {
        client.vm(vm, &VmCall::Power(PowerOp::Start)).await?;
    }
    Ok(())
}

/// Starts the VM when it is not running and waits (up to 60 s, as the reference) until a
/// command runs in it.
async fn start_and_wait(client: &Client, vm: &str) -> Result<()> {
    start(client, vm).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = ExecuteRequest { command: "echo ready".into(), ..Default::default() };
        if let Ok(VmReply::Exec(r)) = client.vm(vm, &VmCall::Execute(probe)).await
            && r.exit_code == 0
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{vm} did not run a command within 60 s of its start; look at it with `hangar vm get {vm}`");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `hangar catalog list FILE`: the catalog named by `FROM` (with the PDFile's credentials).
pub async fn list(file: &std::path::Path, url: Option<&str>, out: Output) -> Result<()> {
    let pd = read(file)?;
    catalog_cmd::list_with(Some(&pd), url, out).await
}

/// `hangar catalog run FILE`: what the PDFile's command (`RUN ...`, or implied by
/// `FROM`/`TO`) says.
pub async fn run(file: std::path::PathBuf, host: Option<String>, url: Option<&str>, out: Output) -> Result<()> {
    use hangar_catalog::pdfile::PdCommand;
    let pd = read(&file)?;
    match pd.effective_command() {
        Some(PdCommand::Push) => {
            catalog_cmd::push(catalog_cmd::PushArgs { file: Some(file), ..Default::default() }, url, out).await
        }
        Some(PdCommand::Pull) => {
            let base = PullArgs { file: Some(file), ..Default::default() };
            pull(PullFileArgs { base, host, ..Default::default() }, url, out).await
        }
        Some(PdCommand::List) => catalog_cmd::list_with(Some(&pd), url, out).await,
        Some(PdCommand::Import) => catalog_cmd::import_with(&pd, url, out).await,
        Some(PdCommand::ImportVm) => catalog_cmd::import_vm_with(&pd, url, out).await,
        None => {
            bail!("{}: say what to do with RUN push|pull|list|import|import-vm, or give FROM or TO", file.display())
        }
    }
}
