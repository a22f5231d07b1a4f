//! The PostgreSQL engine. See the [crate documentation](crate) for the invariants.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use hangar_store::{Batch, Committed, DUMP_FORMAT, Dump, Op, Record, Result, Store, StoreError};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::common::{Codec, Target, before_nul, connect_error, engine_error, from_db_revision, storable};
use crate::group::{self, Overlay, Pending};
use crate::{SqlOptions, migrations, redact_url};

/// Key of the advisory lock held while migrating ("hangar" in ASCII).
const MIGRATION_LOCK: i64 = 0x68_61_6e_67_61_72;
/// Rows per INSERT during an import.
const IMPORT_ROWS: usize = 1000;
/// Value bytes per INSERT during an import.
const IMPORT_BYTES: usize = 8 << 20;

/// A [`Store`] on a PostgreSQL database. See the [crate documentation](crate).
pub struct PgStore {
    pool: PgPool,
    target: Target,
    codec: Codec,
    closed: AtomicBool,
    /// The group-commit writer (see [`crate::group`]).
    writer: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).field("codec", &self.codec).finish()
    }
}

/// Parses a `postgres://` or `postgresql://` URL; the error never shows the password.
pub(crate) fn parse_url(url: &str) -> Result<(PgConnectOptions, Target)> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Invalid(format!("Invalid PostgreSQL URL {}: {e}", redact_url(url))))?;
    let target = Target {
        engine: "postgres",
        user: options.get_username().to_string(),
        host: options.get_host().to_string(),
        port: options.get_port(),
        database: options.get_database().unwrap_or_else(|| options.get_username()).to_string(),
    };
    // Durable acknowledgements whatever the server's default; a recognisable session name.
    let options = options.options([("synchronous_commit", "on")]).application_name("hangar");
    Ok((options, target))
}

impl PgStore {
    /// Connects, runs the migrations and checks the encryption key.
    pub async fn open(url: &str, options: SqlOptions) -> Result<Self> {
        let (connect, target) = parse_url(url)?;
        let codec = Codec::new(options.encryption_key.as_ref())?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| connect_error(&target, e))?;
        let (writer, queue) = mpsc::channel(4 * group::MAX_GROUP);
        tokio::spawn(run_writer(pool.clone(), target.clone(), queue));
        let store = Self { pool, target, codec, closed: AtomicBool::new(false), writer };
        if let Err(err) = store.prepare().await {
            store.pool.close().await;
            return Err(err);
        }
        tracing::info!(database = %store.target, encrypted = store.codec.encrypted(), "PostgreSQL store open");
        Ok(store)
    }

    /// Where this store lives (no password).
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        let what = what.to_string();
        move |e| engine_error(&self.target, &what, e)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) { Err(StoreError::Closed) } else { Ok(()) }
    }

    async fn prepare(&self) -> Result<()> {
        self.migrate().await?;
        self.check_key().await
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(self.err("migrate"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(self.err("migrate: lock"))?;
        sqlx::query(migrations::PG_SCHEMA_TABLE).execute(&mut *tx).await.map_err(self.err("migrate: schema table"))?;
        let found: Option<i64> = sqlx::query_scalar("SELECT version FROM hangar_schema WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.err("migrate: read version"))?;
        let found = found.unwrap_or(0);
        if found > migrations::LATEST {
            return Err(migrations::too_new(&self.target, found));
        }
        for (version, statements) in migrations::PG.iter().filter(|(v, _)| *v > found) {
            for statement in *statements {
                sqlx::query(*statement).execute(&mut *tx).await.map_err(self.err(&format!("migration {version}")))?;
            }
        }
        if found < migrations::LATEST {
            sqlx::query(
                "INSERT INTO hangar_schema (id, version) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
            )
            .bind(migrations::LATEST)
            .execute(&mut *tx)
            .await
            .map_err(self.err("migrate: write version"))?;
            tracing::info!(database = %self.target, from = found, to = migrations::LATEST, "database schema migrated");
        }
        tx.commit().await.map_err(self.err("migrate: commit"))
    }

    async fn check_key(&self) -> Result<()> {
        let stored = self.read_keycheck().await?;
        let has_records: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM hangar_records)")
            .fetch_one(&self.pool)
            .await
            .map_err(self.err("open"))?;
        self.codec.verify(&self.target, stored.as_deref(), has_records)?;
        if stored.is_none()
            && let Some(check) = self.codec.keycheck()?
        {
            sqlx::query("INSERT INTO hangar_meta (name, value) VALUES ('keycheck', $1) ON CONFLICT (name) DO NOTHING")
                .bind(check)
                .execute(&self.pool)
                .await
                .map_err(self.err("open: write key check"))?;
            // Another replica may have written its key check first.
            let stored = self.read_keycheck().await?;
            self.codec.verify(&self.target, stored.as_deref(), has_records)?;
        }
        Ok(())
    }

    async fn read_keycheck(&self) -> Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT value FROM hangar_meta WHERE name = 'keycheck'")
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err("open: read key check"))
    }

    fn record(&self, collection: &str, row: &PgRow) -> Result<Record> {
        let id: String = row.try_get(0).map_err(self.err("read"))?;
        let revision: i64 = row.try_get(1).map_err(self.err("read"))?;
        let value: Vec<u8> = row.try_get(2).map_err(self.err("read"))?;
        let value = self.codec.decode(&self.target, collection, &id, &value)?;
        Ok(Record { id, revision: from_db_revision(&self.target, revision)?, value })
    }

    async fn lock_revision(&self, tx: &mut Transaction<'static, sqlx::Postgres>, bump: bool) -> Result<i64> {
        let sql = if bump {
            "UPDATE hangar_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision"
        } else {
            "SELECT revision FROM hangar_revision WHERE id = 1 FOR UPDATE"
        };
        sqlx::query_scalar(sql).fetch_one(&mut **tx).await.map_err(self.err("commit: lock the revision"))
    }
}

#[async_trait]
impl Store for PgStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }
    fn shared(&self) -> bool {
        true
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>> {
        self.check_open()?;
        if !storable(collection) || !storable(id) {
            return Ok(None);
        }
        let row = sqlx::query("SELECT id, revision, value FROM hangar_records WHERE collection = $1 AND id = $2")
            .bind(collection)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err("get"))?;
        row.map(|row| self.record(collection, &row)).transpose()
    }

    async fn list(&self, collection: &str) -> Result<Vec<Record>> {
        self.check_open()?;
        if !storable(collection) {
            return Ok(Vec::new());
        }
        let rows = sqlx::query("SELECT id, revision, value FROM hangar_records WHERE collection = $1 ORDER BY id")
            .bind(collection)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err("list"))?;
        rows.iter().map(|row| self.record(collection, row)).collect()
    }

    async fn list_page(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        self.check_open()?;
        if limit == 0 || !storable(collection) {
            return Ok(Vec::new());
        }
        let after = after.map(before_nul);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            Some(after) => {
                sqlx::query(
                    "SELECT id, revision, value FROM hangar_records WHERE collection = $1 AND id > $2 \
                     ORDER BY id LIMIT $3",
                )
                .bind(collection)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query("SELECT id, revision, value FROM hangar_records WHERE collection = $1 ORDER BY id LIMIT $2")
                    .bind(collection)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(self.err("list_page"))?;
        rows.iter().map(|row| self.record(collection, row)).collect()
    }

    async fn commit(&self, batch: Batch) -> Result<Committed> {
        batch.validate()?;
        self.check_open()?;
        // Seal before queueing: the revision lock is held for the database work only.
        let mut values = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            values.push(match op {
                Op::Put { collection, id, value } => Some(self.codec.encode(collection, id, value)?),
                Op::Delete { .. } => None,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.writer.send(Pending { batch, values, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn export(&self) -> Result<Dump> {
        self.check_open()?;
        let mut tx = self.pool.begin().await.map_err(self.err("export: begin"))?;
        // A share lock on the revision row waits for a commit in flight and keeps new ones out
        // until the records are read: the revision and the records agree.
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM hangar_revision WHERE id = 1 FOR SHARE")
            .fetch_one(&mut *tx)
            .await
            .map_err(self.err("export: lock the revision"))?;
        let rows = sqlx::query("SELECT collection, id, value FROM hangar_records ORDER BY collection, id")
            .fetch_all(&mut *tx)
            .await
            .map_err(self.err("export: read"))?;
        tx.commit().await.map_err(self.err("export: end"))?;
        let mut collections: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
        for row in rows {
            let collection: String = row.try_get(0).map_err(self.err("export: read"))?;
            let id: String = row.try_get(1).map_err(self.err("export: read"))?;
            let value: Vec<u8> = row.try_get(2).map_err(self.err("export: read"))?;
            let value = self.codec.decode(&self.target, &collection, &id, &value)?;
            collections.entry(collection).or_default().insert(id, value);
        }
        Ok(Dump { format: DUMP_FORMAT, revision: from_db_revision(&self.target, revision)?, collections })
    }

    async fn import(&self, dump: Dump) -> Result<()> {
        dump.validate()?;
        self.check_open()?;
        let mut rows = Vec::new();
        for (collection, records) in &dump.collections {
            for (id, value) in records {
                rows.push((collection.as_str(), id.as_str(), self.codec.encode(collection, id, value)?));
            }
        }
        let mut tx = self.pool.begin().await.map_err(self.err("import: begin"))?;
        let revision = self.lock_revision(&mut tx, true).await?;
        sqlx::query("DELETE FROM hangar_records").execute(&mut *tx).await.map_err(self.err("import: clear"))?;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let (mut collections, mut ids, mut values) = (Vec::new(), Vec::new(), Vec::new());
            let mut bytes = 0;
            while let Some((collection, id, value)) = rows.next_if(|_| ids.len() < IMPORT_ROWS && bytes < IMPORT_BYTES)
            {
                bytes += value.len();
                collections.push(collection.to_string());
                ids.push(id.to_string());
                values.push(value);
            }
            sqlx::query(
                "INSERT INTO hangar_records (collection, id, revision, value) \
                 SELECT c, i, $3, v FROM UNNEST($1::text[], $2::text[], $4::bytea[]) AS t(c, i, v)",
            )
            .bind(collections)
            .bind(ids)
            .bind(revision)
            .bind(values)
            .execute(&mut *tx)
            .await
            .map_err(self.err("import: insert"))?;
        }
        tx.commit().await.map_err(self.err("import: commit"))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.pool.close().await;
        Ok(())
    }
}

/// Writes the queued batches, a group per transaction, until the store is dropped.
async fn run_writer(pool: PgPool, target: Target, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.recv().await {
        let group = group::collect(first, &mut queue);
        write_group(&pool, &target, group).await;
    }
}

async fn write_group(pool: &PgPool, target: &Target, group: Vec<Pending>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return group::fail_all(group, &engine_error(target, "commit: begin", e)),
    };
    let outcomes = match apply_group(&mut tx, target, &group).await {
        Ok(outcomes) => outcomes,
        Err(err) => {
            let _ = tx.rollback().await;
            return group::fail_all(group, &err);
        }
    };
    if let Err(e) = tx.commit().await {
        return group::fail_all(group, &engine_error(target, "commit", e));
    }
    for (pending, outcome) in group.into_iter().zip(outcomes) {
        let _ = pending.reply.send(outcome.map(|revision| Committed { revision }));
    }
}

/// Checks and writes each batch of the group in order; an `Err` fails the whole group.
async fn apply_group(
    tx: &mut Transaction<'static, sqlx::Postgres>,
    target: &Target,
    group: &[Pending],
) -> Result<Vec<Result<u64>>> {
    let err = |what: &'static str| move |e| engine_error(target, what, e);
    // Every commit of every process locks this row first: commits are serialised, and the
    // conditions below see every commit that finished before this one.
    let start: i64 = sqlx::query_scalar("SELECT revision FROM hangar_revision WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut **tx)
        .await
        .map_err(err("commit: lock the revision"))?;
    let start = from_db_revision(target, start)?;
    let mut revision = start;
    let savepoints = group.len() > 1;
    let mut overlay = Overlay::default();
    let mut outcomes = Vec::with_capacity(group.len());
    for pending in group {
        let batch = &pending.batch;
        let mut current = Vec::with_capacity(batch.conditions.len());
        for condition in &batch.conditions {
            let (collection, id) = group::condition_key(condition);
            current.push(match overlay.get(collection, id) {
                Some(pending) => pending,
                None => {
                    let found: Option<i64> =
                        sqlx::query_scalar("SELECT revision FROM hangar_records WHERE collection = $1 AND id = $2")
                            .bind(collection)
                            .bind(id)
                            .fetch_optional(&mut **tx)
                            .await
                            .map_err(err("commit: check a condition"))?;
                    found.map(|r| from_db_revision(target, r)).transpose()?
                }
            });
        }
        if let Some(message) = group::first_conflict(&batch.conditions, &current) {
            outcomes.push(Err(StoreError::Conflict(message)));
            continue;
        }
        if batch.ops.is_empty() {
            outcomes.push(Ok(revision));
            continue;
        }
        let next = revision + 1;
        if savepoints {
            sqlx::query("SAVEPOINT hangar_batch").execute(&mut **tx).await.map_err(err("commit: savepoint"))?;
        }
        match write_ops(tx, target, &batch.ops, &pending.values, next).await {
            Ok(()) => {
                if savepoints {
                    sqlx::query("RELEASE SAVEPOINT hangar_batch")
                        .execute(&mut **tx)
                        .await
                        .map_err(err("commit: savepoint"))?;
                }
                overlay.record(&batch.ops, next);
                revision = next;
                outcomes.push(Ok(next));
            }
            Err(e) if savepoints => {
                sqlx::query("ROLLBACK TO SAVEPOINT hangar_batch")
                    .execute(&mut **tx)
                    .await
                    .map_err(err("commit: savepoint"))?;
                outcomes.push(Err(e));
            }
            Err(e) => return Err(e),
        }
    }
    if revision != start {
        sqlx::query("UPDATE hangar_revision SET revision = $1 WHERE id = 1")
            .bind(to_db(revision)?)
            .execute(&mut **tx)
            .await
            .map_err(err("commit: write the revision"))?;
    }
    Ok(outcomes)
}

fn to_db(revision: u64) -> Result<i64> {
    i64::try_from(revision).map_err(|_| StoreError::Engine(format!("revision {revision} is out of range")))
}

async fn write_ops(
    tx: &mut Transaction<'static, sqlx::Postgres>,
    target: &Target,
    ops: &[Op],
    values: &[Option<Vec<u8>>],
    revision: u64,
) -> Result<()> {
    let revision = to_db(revision)?;
    for (op, value) in ops.iter().zip(values) {
        match (op, value) {
            (Op::Put { collection, id, .. }, Some(value)) => {
                sqlx::query(
                    "INSERT INTO hangar_records (collection, id, revision, value) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (collection, id) DO UPDATE SET revision = EXCLUDED.revision, value = EXCLUDED.value",
                )
                .bind(collection)
                .bind(id)
                .bind(revision)
                .bind(value.as_slice())
                .execute(&mut **tx)
                .await
                .map_err(|e| engine_error(target, "commit: put", e))?;
            }
            (Op::Delete { collection, id }, _) | (Op::Put { collection, id, .. }, None) => {
                sqlx::query("DELETE FROM hangar_records WHERE collection = $1 AND id = $2")
                    .bind(collection)
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| engine_error(target, "commit: delete", e))?;
            }
        }
    }
    Ok(())
}
