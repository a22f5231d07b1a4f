//! The MySQL/MariaDB engine. See the [crate documentation](crate) for the invariants.
//!
//! Sessions run at `READ COMMITTED`: after a commit has locked the revision row, each of its
//! statements reads the latest committed state.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use hangar_store::{Batch, Committed, DUMP_FORMAT, Dump, Op, Record, Result, Store, StoreError};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{Connection, Executor, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::common::{Codec, Target, before_nul, connect_error, engine_error, from_db_revision, storable};
use crate::group::{self, Overlay, Pending};
use crate::{SqlOptions, migrations, redact_url};

/// Rows per INSERT during an import.
const IMPORT_ROWS: usize = 500;
/// Value bytes per INSERT during an import (MariaDB's default max_allowed_packet is 16 MiB).
const IMPORT_BYTES: usize = 4 << 20;

/// A [`Store`] on a MySQL or MariaDB database. See the [crate documentation](crate).
pub struct MySqlStore {
    pool: MySqlPool,
    target: Target,
    codec: Codec,
    closed: AtomicBool,
    /// The group-commit writer (see [`crate::group`]).
    writer: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore").field("target", &self.target).field("codec", &self.codec).finish()
    }
}

/// Parses a `mysql://` or `mariadb://` URL; the error never shows the password.
pub(crate) fn parse_url(url: &str) -> Result<(MySqlConnectOptions, Target)> {
    let normalised = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mariadb") => format!("mysql://{rest}"),
        _ => url.to_string(),
    };
    let options = MySqlConnectOptions::from_str(&normalised)
        .map_err(|e| StoreError::Invalid(format!("Invalid MySQL/MariaDB URL {}: {e}", redact_url(url))))?;
    let database = options.get_database().map(str::to_string).ok_or_else(|| {
        StoreError::Invalid(format!("The MySQL/MariaDB URL {} names no database (add /DATABASE)", redact_url(url)))
    })?;
    let target = Target {
        engine: "mysql",
        user: options.get_username().to_string(),
        host: options.get_host().to_string(),
        port: options.get_port(),
        database,
    };
    Ok((options, target))
}

fn utf8(target: &Target, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|_| StoreError::Corrupt {
        path: target.to_string(),
        detail: "a collection name or id is not UTF-8".into(),
    })
}

impl MySqlStore {
    /// Connects, runs the migrations and checks the encryption key.
    pub async fn open(url: &str, options: SqlOptions) -> Result<Self> {
        let (connect, target) = parse_url(url)?;
        let codec = Codec::new(options.encryption_key.as_ref())?;
        // The migration runs on its own connection: GET_LOCK belongs to the session, and
        // closing the connection releases it whatever happens.
        let migrate = tokio::time::timeout(options.connect_timeout, MySqlConnection::connect_with(&connect))
            .await
            .map_err(|_| connect_error(&target, sqlx::Error::PoolTimedOut))?
            .map_err(|e| connect_error(&target, e))?;
        migrate_on(migrate, &target, options.connect_timeout).await?;
        let pool = MySqlPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.connect_timeout)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await?;
                    Ok(())
                })
            })
            .connect_with(connect)
            .await
            .map_err(|e| connect_error(&target, e))?;
        let (writer, queue) = mpsc::channel(4 * group::MAX_GROUP);
        tokio::spawn(run_writer(pool.clone(), target.clone(), queue));
        let store = Self { pool, target, codec, closed: AtomicBool::new(false), writer };
        if let Err(err) = store.check_key().await {
            store.pool.close().await;
            return Err(err);
        }
        store.warn_if_not_durable().await;
        tracing::info!(database = %store.target, encrypted = store.codec.encrypted(), "MySQL/MariaDB store open");
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

    async fn warn_if_not_durable(&self) {
        let flush: std::result::Result<i64, _> =
            sqlx::query_scalar("SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED)").fetch_one(&self.pool).await;
        match flush {
            Ok(1) => {}
            Ok(other) => tracing::warn!(
                database = %self.target,
                innodb_flush_log_at_trx_commit = other,
                "the server does not flush its log at each commit: an acknowledged write can be lost in a crash; \
                 set innodb_flush_log_at_trx_commit=1"
            ),
            Err(e) => tracing::warn!(database = %self.target, error = %e, "cannot read innodb_flush_log_at_trx_commit"),
        }
    }

    async fn check_key(&self) -> Result<()> {
        let stored = self.read_keycheck().await?;
        let has_records: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM hangar_records)")
            .fetch_one(&self.pool)
            .await
            .map_err(self.err("open"))?;
        let has_records = has_records != 0;
        self.codec.verify(&self.target, stored.as_deref(), has_records)?;
        if stored.is_none()
            && let Some(check) = self.codec.keycheck()?
        {
            sqlx::query("INSERT IGNORE INTO hangar_meta (name, value) VALUES ('keycheck', ?)")
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

    fn record(&self, collection: &str, row: &MySqlRow) -> Result<Record> {
        let id: Vec<u8> = row.try_get(0).map_err(self.err("read"))?;
        let id = utf8(&self.target, id)?;
        let revision: i64 = row.try_get(1).map_err(self.err("read"))?;
        let value: Vec<u8> = row.try_get(2).map_err(self.err("read"))?;
        let value = self.codec.decode(&self.target, collection, &id, &value)?;
        Ok(Record { id, revision: from_db_revision(&self.target, revision)?, value })
    }

    async fn lock_revision(&self, tx: &mut Transaction<'static, sqlx::MySql>) -> Result<i64> {
        sqlx::query_scalar("SELECT revision FROM hangar_revision WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut **tx)
            .await
            .map_err(self.err("commit: lock the revision"))
    }

    async fn set_revision(&self, tx: &mut Transaction<'static, sqlx::MySql>, revision: i64) -> Result<()> {
        sqlx::query("UPDATE hangar_revision SET revision = ? WHERE id = 1")
            .bind(revision)
            .execute(&mut **tx)
            .await
            .map_err(self.err("commit: write the revision"))?;
        Ok(())
    }
}

/// Runs the migrations on `conn` under a named lock for this database, then closes `conn`.
async fn migrate_on(mut conn: MySqlConnection, target: &Target, wait: std::time::Duration) -> Result<()> {
    let result = migrate_locked(&mut conn, target, wait).await;
    // Closing the session releases the named lock, also after a failure.
    let _ = conn.close().await;
    result
}

async fn migrate_locked(conn: &mut MySqlConnection, target: &Target, wait: std::time::Duration) -> Result<()> {
    let err = |what: &'static str| move |e| engine_error(target, what, e);
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(CONCAT('hangar_schema:', DATABASE()), ?)")
        .bind(i64::try_from(wait.as_secs()).unwrap_or(60).max(1))
        .fetch_one(&mut *conn)
        .await
        .map_err(err("migrate: lock"))?;
    if got != Some(1) {
        return Err(StoreError::Engine(format!(
            "migrate on {target}: another process holds the migration lock for longer than {} s",
            wait.as_secs()
        )));
    }
    sqlx::query(migrations::MYSQL_SCHEMA_TABLE).execute(&mut *conn).await.map_err(err("migrate: schema table"))?;
    let found: Option<i64> = sqlx::query_scalar("SELECT version FROM hangar_schema WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await
        .map_err(err("migrate: read version"))?;
    let found = found.unwrap_or(0);
    if found > migrations::LATEST {
        return Err(migrations::too_new(target, found));
    }
    for (version, statements) in migrations::MYSQL.iter().filter(|(v, _)| *v > found) {
        for statement in *statements {
            sqlx::query(*statement).execute(&mut *conn).await.map_err(err("migration"))?;
        }
        // DDL commits at once on MySQL: record each version as soon as it is done.
        sqlx::query(
            "INSERT INTO hangar_schema (id, version) VALUES (1, ?) ON DUPLICATE KEY UPDATE version = VALUES(version)",
        )
        .bind(*version)
        .execute(&mut *conn)
        .await
        .map_err(err("migrate: write version"))?;
        tracing::info!(database = %target, to = version, "database schema migrated");
    }
    Ok(())
}

#[async_trait]
impl Store for MySqlStore {
    fn engine(&self) -> &'static str {
        "mysql"
    }
    fn shared(&self) -> bool {
        true
    }

    async fn get(&self, collection: &str, id: &str) -> Result<Option<Record>> {
        self.check_open()?;
        if !storable(collection) || !storable(id) {
            return Ok(None);
        }
        let row = sqlx::query("SELECT id, revision, value FROM hangar_records WHERE collection = ? AND id = ?")
            .bind(collection.as_bytes())
            .bind(id.as_bytes())
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
        let rows = sqlx::query("SELECT id, revision, value FROM hangar_records WHERE collection = ? ORDER BY id")
            .bind(collection.as_bytes())
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
                    "SELECT id, revision, value FROM hangar_records WHERE collection = ? AND id > ? \
                     ORDER BY id LIMIT ?",
                )
                .bind(collection.as_bytes())
                .bind(after.as_bytes())
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query("SELECT id, revision, value FROM hangar_records WHERE collection = ? ORDER BY id LIMIT ?")
                    .bind(collection.as_bytes())
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
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM hangar_revision WHERE id = 1 LOCK IN SHARE MODE")
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
            let collection: Vec<u8> = row.try_get(0).map_err(self.err("export: read"))?;
            let collection = utf8(&self.target, collection)?;
            let id: Vec<u8> = row.try_get(1).map_err(self.err("export: read"))?;
            let id = utf8(&self.target, id)?;
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
        let revision = self.lock_revision(&mut tx).await? + 1;
        sqlx::query("DELETE FROM hangar_records").execute(&mut *tx).await.map_err(self.err("import: clear"))?;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some(row) = rows.next_if(|_| chunk.len() < IMPORT_ROWS && bytes < IMPORT_BYTES) {
                bytes += row.2.len();
                chunk.push(row);
            }
            let mut sql = String::from("INSERT INTO hangar_records (collection, id, revision, value) VALUES ");
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "(?, ?, ?, ?)" } else { ", (?, ?, ?, ?)" });
            }
            // Only placeholders are added to the text; every value is bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (collection, id, value) in chunk {
                query = query.bind(collection.as_bytes()).bind(id.as_bytes()).bind(revision).bind(value);
            }
            query.execute(&mut *tx).await.map_err(self.err("import: insert"))?;
        }
        self.set_revision(&mut tx, revision).await?;
        tx.commit().await.map_err(self.err("import: commit"))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.pool.close().await;
        Ok(())
    }
}

/// Writes the queued batches, a group per transaction, until the store is dropped.
async fn run_writer(pool: MySqlPool, target: Target, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.recv().await {
        let group = group::collect(first, &mut queue);
        write_group(&pool, &target, group).await;
    }
}

async fn write_group(pool: &MySqlPool, target: &Target, group: Vec<Pending>) {
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
    tx: &mut Transaction<'static, sqlx::MySql>,
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
                        sqlx::query_scalar("SELECT revision FROM hangar_records WHERE collection = ? AND id = ?")
                            .bind(collection.as_bytes())
                            .bind(id.as_bytes())
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
        sqlx::query("UPDATE hangar_revision SET revision = ? WHERE id = 1")
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
    tx: &mut Transaction<'static, sqlx::MySql>,
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
                    "INSERT INTO hangar_records (collection, id, revision, value) VALUES (?, ?, ?, ?) \
                     ON DUPLICATE KEY UPDATE revision = VALUES(revision), value = VALUES(value)",
                )
                .bind(collection.as_bytes())
                .bind(id.as_bytes())
                .bind(revision)
                .bind(value.as_slice())
                .execute(&mut **tx)
                .await
                .map_err(|e| engine_error(target, "commit: put", e))?;
            }
            (Op::Delete { collection, id }, _) | (Op::Put { collection, id, .. }, None) => {
                sqlx::query("DELETE FROM hangar_records WHERE collection = ? AND id = ?")
                    .bind(collection.as_bytes())
                    .bind(id.as_bytes())
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| engine_error(target, "commit: delete", e))?;
            }
        }
    }
    Ok(())
}
