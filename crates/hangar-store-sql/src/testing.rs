//! Test aid: fresh databases on a test server, one per store, so tests do not share state.
//!
//! `admin_url` is a URL with a user allowed to create databases (the ones
//! `scripts/test-services.sh env` exports as `HANGAR_TEST_POSTGRES_URL` and
//! `HANGAR_TEST_MYSQL_URL`).

use std::sync::atomic::{AtomicU64, Ordering};

use hangar_store::StoreError;
use sqlx::{Connection, Executor};

use crate::{Engine, redact_url};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The admin URL of the test server in the environment variable `var`, or `None` when
/// `HANGAR_SKIP_SQL_TESTS=1`. A missing variable panics (fails the test): a SQL engine that
/// was not tested must not look tested.
pub fn admin_url(var: &str) -> Option<String> {
    if std::env::var("HANGAR_SKIP_SQL_TESTS").as_deref() == Ok("1") {
        eprintln!("HANGAR_SKIP_SQL_TESTS=1: skipping a test that needs {var}");
        return None;
    }
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => panic!(
            "{var} is not set: start the test databases with `scripts/test-services.sh start` and \
             `eval \"$(scripts/test-services.sh env)\"` (or set HANGAR_SKIP_SQL_TESTS=1 to skip the SQL engine tests)"
        ),
    }
}

/// A database name no other call (in this process or another) has made.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let clean: String = prefix.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(24).collect();
    format!("{clean}_{}_{nanos:x}_{n}", std::process::id())
}

/// `url` with its database (path) replaced by `database`.
pub fn with_database(url: &str, database: &str) -> Result<String, StoreError> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| StoreError::Invalid(format!("bad URL {}: {e}", redact_url(url))))?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

/// Creates an empty database named from `prefix` on the server of `admin_url` and returns
/// a URL for it (same user and password).
pub async fn create_database(admin_url: &str, prefix: &str) -> Result<String, StoreError> {
    let name = unique_name(prefix);
    let engine = Engine::of_url(admin_url)
        .ok_or_else(|| StoreError::Invalid(format!("{} is not a SQL URL", redact_url(admin_url))))?;
    let fail = |e: sqlx::Error| StoreError::Engine(format!("create database {name} on {}: {e}", redact_url(admin_url)));
    match engine {
        Engine::Postgres => {
            let (options, _) = crate::postgres::parse_url(admin_url)?;
            let mut conn = sqlx::PgConnection::connect_with(&options).await.map_err(fail)?;
            conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).await.map_err(fail)?;
            let _ = conn.close().await;
        }
        Engine::MySql => {
            let (options, _) = crate::mysql::parse_url(admin_url)?;
            let mut conn = sqlx::MySqlConnection::connect_with(&options).await.map_err(fail)?;
            conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4")))
                .await
                .map_err(fail)?;
            let _ = conn.close().await;
        }
    }
    let url = if admin_url.to_ascii_lowercase().starts_with("mariadb://") {
        with_database(&format!("mysql://{}", &admin_url["mariadb://".len()..]), &name)?
    } else {
        with_database(admin_url, &name)?
    };
    Ok(url)
}

/// Runs one statement on the database `url` names, for tests that alter a store's tables
/// behind its back (a newer schema version, a damaged record).
pub async fn execute(url: &str, sql: &str) -> Result<u64, StoreError> {
    let fail = |e: sqlx::Error| StoreError::Engine(format!("{} on {}: {e}", sql, redact_url(url)));
    match Engine::of_url(url) {
        Some(Engine::Postgres) => {
            let (options, _) = crate::postgres::parse_url(url)?;
            let mut conn = sqlx::PgConnection::connect_with(&options).await.map_err(fail)?;
            let done = conn.execute(sqlx::AssertSqlSafe(sql.to_string())).await.map_err(fail)?;
            let _ = conn.close().await;
            Ok(done.rows_affected())
        }
        Some(Engine::MySql) => {
            let (options, _) = crate::mysql::parse_url(url)?;
            let mut conn = sqlx::MySqlConnection::connect_with(&options).await.map_err(fail)?;
            let done = conn.execute(sqlx::AssertSqlSafe(sql.to_string())).await.map_err(fail)?;
            let _ = conn.close().await;
            Ok(done.rows_affected())
        }
        None => Err(StoreError::Invalid(format!("{} is not a SQL URL", redact_url(url)))),
    }
}
