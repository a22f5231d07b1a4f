//! `hangar db ...` and opening the configured store: the JSON engine in the data folder, or
//! the SQL database of `DATABASE_URL` (or the reference's `MYSQL_*` keys), through
//! `hangar-store-sql`. `export`, `import`, `import-pds` and `migrate` work on every engine;
//! `backup` is the JSON engine's (a SQL database is backed up with its own tools).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use hangar_store::json::EncryptionKey;
use hangar_store::{Dump, Store};
use serde_json::json;
use tracing::info;

use crate::output::{Output, print};
use crate::settings::Settings;
use crate::{ServerConfigArgs, import_pds, serve};

#[derive(Subcommand)]
pub enum DbCommand {
    /// Write every record as plain JSON (to stdout, or --out FILE). The store is the
    /// configured one (DATABASE_URL, else the data folder), or the database named by the
    /// global --url (postgres://..., mysql://...).
    Export {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Replace every record with the content of a JSON export (same store choice as export).
    Import {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        file: PathBuf,
    },
    /// Migrate from the Parallels DevOps Service: import its data.json (users with their
    /// passwords, roles, claims, API keys, orchestrator hosts, reverse-proxy hosts, catalog
    /// manifests). Idempotent; refuses to overwrite differing records without --force.
    ImportPds {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        /// The reference's data.json.
        file: PathBuf,
        /// Show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Overwrite existing records that differ from the file.
        #[arg(long)]
        force: bool,
        /// The user that receives API keys that had no user in the reference.
        #[arg(long, default_value = "pds-api-keys")]
        service_user: String,
        /// Its roles (the reference ran such keys as root, hence SUPER_USER by default).
        #[arg(long = "service-role", default_value = "SUPER_USER")]
        service_roles: Vec<String>,
        /// The reference's ENCRYPTION_PRIVATE_KEY (a PEM file, or the base64 the variable
        /// holds), for a data.json it encrypted.
        #[arg(long)]
        encryption_key: Option<PathBuf>,
        /// The reference ran with SECURITY_PASSWORD_SALT_PASSWORD=false (hashes without the
        /// record id as salt).
        #[arg(long)]
        unsalted_passwords: bool,
    },
    /// Take a backup now (JSON engine; back a SQL database up with its own tools).
    Backup {
        #[command(flatten)]
        cfg: ServerConfigArgs,
    },
    /// Copy every record from one store to another (a data folder, or a postgres:// or
    /// mysql:// URL), then check the record count of every collection on both sides.
    /// Stop the servers on both first. The target must be empty unless --force.
    Migrate {
        #[command(flatten)]
        cfg: ServerConfigArgs,
        /// The source: a data folder (DATABASE_FOLDER) or a database URL.
        #[arg(long)]
        from: String,
        /// The target: a database URL or a data folder.
        #[arg(long)]
        to: String,
        /// Key file of an encrypted source (default: DATABASE_ENCRYPTION_KEY_FILE).
        #[arg(long)]
        from_key_file: Option<PathBuf>,
        /// Key file to encrypt the target with (default: DATABASE_ENCRYPTION_KEY_FILE).
        #[arg(long)]
        to_key_file: Option<PathBuf>,
        /// Replace what the target holds.
        #[arg(long)]
        force: bool,
    },
}

fn key_from(file: Option<&Path>) -> Result<Option<EncryptionKey>> {
    file.map(|f| EncryptionKey::from_file(f).with_context(|| format!("encryption key file {}", f.display())))
        .transpose()
}

/// Opens the SQL database `url` with `key`; errors name the database, never its password.
pub async fn open_sql(url: &str, key: Option<EncryptionKey>) -> Result<Arc<dyn Store>> {
    let options = hangar_store_sql::SqlOptions { encryption_key: key, ..Default::default() };
    hangar_store_sql::open(url, options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store in {}: {e}", hangar_store_sql::redact_url(url)))
}

/// The store the settings name: `DATABASE_URL` (or `MYSQL_*`), else the JSON engine in the
/// data folder `dir` (with scheduled backups when `with_backups`).
pub async fn open_configured(s: &Settings, dir: &Path, with_backups: bool) -> Result<Arc<dyn Store>> {
    match &s.database.url {
        Some(url) => {
            let store = open_sql(url.expose(), key_from(s.database.encryption_key_file.as_deref())?).await?;
            if with_backups && s.database.backup_interval.is_some() {
                info!(
                    engine = store.engine(),
                    "scheduled backups (DATABASE_BACKUP_INTERVAL_MINUTES) are the JSON engine's; back this database \
                     up with its own tools (pg_dump, mariadb-dump, snapshots) or `hangar db export`"
                );
            }
            Ok(store)
        }
        None => Ok(Arc::new(serve::open_store(s, dir, with_backups).await?)),
    }
}

/// A store named on the command line: a database URL, or a data folder.
async fn open_named(name: &str, key: Option<EncryptionKey>, s: &Settings) -> Result<Arc<dyn Store>> {
    if hangar_store_sql::is_sql_url(name) {
        return open_sql(name, key).await;
    }
    if name.contains("://") {
        bail!(
            "{} is neither a data folder nor a postgres://, postgresql://, mysql:// or mariadb:// URL",
            hangar_store_sql::redact_url(name)
        );
    }
    let dir = PathBuf::from(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let opts = hangar_store::JsonStoreOptions {
        encryption_key: key,
        backup_interval: None,
        backup_retention: s.database.backups_kept,
        ..Default::default()
    };
    let store = hangar_store::JsonStore::open(dir.join("store"), opts)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store in {}: {e}", dir.display()))?;
    Ok(Arc::new(store))
}

fn counts(dump: &Dump) -> BTreeMap<String, usize> {
    dump.collections.iter().map(|(name, records)| (name.clone(), records.len())).collect()
}

/// Where a store lives, for output: the folder, or the URL without its password.
fn shown(name: &str) -> String {
    if hangar_store_sql::is_sql_url(name) { hangar_store_sql::redact_url(name) } else { name.to_string() }
}

async fn migrate(
    s: &Settings,
    from: &str,
    to: &str,
    from_key: Option<EncryptionKey>,
    to_key: Option<EncryptionKey>,
    force: bool,
    out: Output,
) -> Result<()> {
    if !hangar_store_sql::is_sql_url(from) && !Path::new(from).join("store").is_dir() {
        bail!("--from {from} is not a Hangar data folder (it has no store/ folder) nor a database URL");
    }
    let source = open_named(from, from_key, s).await.context("the source of the migration (--from)")?;
    let dump = source.export().await;
    source.close().await.ok();
    let dump = dump.with_context(|| format!("cannot read {}", shown(from)))?;
    let target = open_named(to, to_key, s).await.context("the target of the migration (--to)")?;
    let result = async {
        let before = target.export().await?;
        let held: usize = before.collections.values().map(|c| c.len()).sum();
        if held > 0 && !force {
            bail!(
                "the target {} already holds {held} records: migrate into an empty store, or add --force to replace them",
                shown(to)
            );
        }
        let expected = counts(&dump);
        target.import(dump.clone()).await.with_context(|| format!("cannot write {}", shown(to)))?;
        let copied = target.export().await.with_context(|| format!("cannot read {} back", shown(to)))?;
        let got = counts(&copied);
        let mut rows = Vec::new();
        let names: std::collections::BTreeSet<&String> = expected.keys().chain(got.keys()).collect();
        for name in names {
            let (a, b) = (expected.get(name).copied().unwrap_or(0), got.get(name).copied().unwrap_or(0));
            rows.push(json!({"collection": name, "source": a, "target": b, "ok": a == b}));
        }
        if expected != got || copied.collections != dump.collections {
            print(out, &json!(rows), &["collection", "source", "target", "ok"]);
            bail!("the copy in {} differs from {}: see the counts above", shown(to), shown(from));
        }
        let total: usize = expected.values().sum();
        rows.push(json!({"collection": "(all)", "source": total, "target": total, "ok": true}));
        print(out, &json!(rows), &["collection", "source", "target", "ok"]);
        eprintln!(
            "migrated {total} records in {} collections from {} ({}) to {} ({})",
            expected.len(),
            shown(from),
            if hangar_store_sql::is_sql_url(from) { "sql" } else { "json" },
            shown(to),
            target.engine()
        );
        Ok(())
    }
    .await;
    target.close().await.ok();
    result
}

/// `hangar db ...`. `url` is the global `--url`: when it names a database, export and import
/// work on it instead of the configured store.
pub async fn run(cmd: DbCommand, url: Option<String>, out: Output) -> Result<()> {
    let cfg = match &cmd {
        DbCommand::Export { cfg, .. }
        | DbCommand::Import { cfg, .. }
        | DbCommand::ImportPds { cfg, .. }
        | DbCommand::Backup { cfg }
        | DbCommand::Migrate { cfg, .. } => cfg.clone(),
    };
    let (_, s) = cfg.load()?;
    let dir = serve::data_dir(&s)?;
    let configured_key = || key_from(s.database.encryption_key_file.as_deref());
    if let DbCommand::Migrate { from, to, from_key_file, to_key_file, force, .. } = &cmd {
        let from_key = match from_key_file {
            Some(f) => key_from(Some(f))?,
            None => configured_key()?,
        };
        let to_key = match to_key_file {
            Some(f) => key_from(Some(f))?,
            None => configured_key()?,
        };
        return migrate(&s, from, to, from_key, to_key, *force, out).await;
    }
    if let DbCommand::Backup { .. } = &cmd {
        if s.database.url.is_some() {
            bail!(
                "`hangar db backup` backs up the JSON engine; back a SQL database up with its own tools (pg_dump, mariadb-dump) or `hangar db export`"
            );
        }
        let store = serve::open_store(&s, &dir, false)
            .await
            .context("is the server still running? `hangar db` works on a stopped server's data folder")?;
        let p = store.backup_now().await;
        store.close().await.ok();
        print(out, &json!({"backup": p?.display().to_string()}), &["backup"]);
        return Ok(());
    }
    let (store, place) = match url.as_deref() {
        Some(u) if hangar_store_sql::is_sql_url(u) => (open_sql(u, configured_key()?).await?, shown(u)),
        Some(u) => bail!(
            "--url for `hangar db` names a database (postgres://..., mysql://...), not {}",
            hangar_store_sql::redact_url(u)
        ),
        None => {
            let place = match &s.database.url {
                Some(u) => shown(u.expose()),
                None => dir.display().to_string(),
            };
            let store = open_configured(&s, &dir, false)
                .await
                .context("is the server still running? `hangar db` works on a stopped server's data folder")?;
            (store, place)
        }
    };
    let result = async {
        match cmd {
            DbCommand::Export { out: file, .. } => {
                let dump = store.export().await?;
                let text = serde_json::to_string_pretty(&dump)?;
                match file {
                    Some(f) => {
                        std::fs::write(&f, text).with_context(|| format!("cannot write {}", f.display()))?;
                        let n: usize = dump.collections.values().map(|c| c.len()).sum();
                        print(
                            out,
                            &json!({"file": f.display().to_string(), "records": n, "revision": dump.revision}),
                            &["file", "records", "revision"],
                        );
                    }
                    None => println!("{text}"),
                }
            }
            DbCommand::Import { file, .. } => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
                let dump: Dump = serde_json::from_str(&text).with_context(|| {
                    format!("{} is not a Hangar export (made by `hangar db export`)", file.display())
                })?;
                if dump.format != hangar_store::DUMP_FORMAT {
                    bail!(
                        "{} has export format {}, this version reads format {}",
                        file.display(),
                        dump.format,
                        hangar_store::DUMP_FORMAT
                    );
                }
                let n: usize = dump.collections.values().map(|c| c.len()).sum();
                store.import(dump).await?;
                print(
                    out,
                    &json!({"imported_records": n, "data_folder": place, "engine": store.engine()}),
                    &["imported_records", "data_folder", "engine"],
                );
            }
            DbCommand::ImportPds {
                file,
                dry_run,
                force,
                service_user,
                service_roles,
                encryption_key,
                unsalted_passwords,
                ..
            } => {
                let opts = import_pds::Options {
                    file,
                    dry_run,
                    force,
                    service_user,
                    service_roles,
                    encryption_key,
                    unsalted: unsalted_passwords,
                };
                let report = import_pds::run(&s, &dir, store.clone(), opts).await?;
                import_pds::print(out, &report);
            }
            DbCommand::Backup { .. } | DbCommand::Migrate { .. } => {}
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    store.close().await?;
    result
}
