//! Hangar's SQL store engines: PostgreSQL ([`PgStore`]) and MySQL/MariaDB ([`MySqlStore`])
//! behind the [`hangar_store::Store`] trait, through sqlx with rustls on aws-lc-rs.
//!
//! They keep the JSON engine's semantics and pass the same
//! [`conformance`](hangar_store::conformance) suite:
//!
//! * **One global revision.** A one-row table `hangar_revision` holds the store's revision.
//!   Every commit transaction locks that row first (`SELECT ... FOR UPDATE`), so commits from
//!   every process on the database (several Hangar replicas) are serialised: the conditions
//!   are checked against the latest committed state and each batch is written at the next
//!   revision, which every record of the batch carries.
//! * **Group commit.** Within one process the batches committed at the same time share one
//!   transaction (`group.rs`): each keeps its own revision, its own conditions (checked
//!   against the database plus the batches before it) and its own failure (a savepoint per
//!   batch), and one durable database commit acknowledges them all.
//! * **Atomic and durable.** A batch is one transaction; `commit` returns after the database
//!   committed it. PostgreSQL sessions set `synchronous_commit = on`; on MySQL/MariaDB the
//!   server's `innodb_flush_log_at_trx_commit` must be 1 (the default; a warning is logged
//!   otherwise).
//! * **Byte order.** Collection names and ids are `TEXT COLLATE "C"` on PostgreSQL and
//!   `VARBINARY` on MySQL, so `list` and `list_page` sort them in byte order.
//! * **Migrations** are embedded and versioned (`hangar_schema`), run at open under a lock
//!   (an advisory lock on PostgreSQL, `GET_LOCK` on MySQL) so replicas starting together
//!   migrate once. A database whose schema is newer than this binary is refused.
//! * **Encryption at rest** (optional): values are sealed with AES-256-GCM under the same key
//!   file as the JSON engine (`DATABASE_ENCRYPTION_KEY_FILE`), bound to their collection and
//!   id; a key check in `hangar_meta` refuses a wrong key ([`StoreError::WrongKey`]).
//! * **No password in messages.** Errors, logs and `Debug` name the database as
//!   `engine://user@host:port/database` ([`redact_url`]).

use std::sync::Arc;
use std::time::Duration;

use hangar_store::{EncryptionKey, Store, StoreError};

mod common;
mod group;
mod migrations;
pub mod mysql;
pub mod postgres;
pub mod testing;

pub use common::Target;
pub use mysql::MySqlStore;
pub use postgres::PgStore;

/// The schema version this binary writes and understands.
pub const SCHEMA_VERSION: i64 = migrations::LATEST;

/// Which SQL engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    MySql,
}

impl Engine {
    /// The engine of a database URL by its scheme: `postgres://`, `postgresql://`,
    /// `mysql://` or `mariadb://`. `None` for anything else.
    pub fn of_url(url: &str) -> Option<Engine> {
        let scheme = url.split_once("://")?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Engine::Postgres),
            "mysql" | "mariadb" => Some(Engine::MySql),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::MySql => "mysql",
        }
    }
}

/// Whether `url` names a SQL database this crate can open.
pub fn is_sql_url(url: &str) -> bool {
    Engine::of_url(url).is_some()
}

/// The URL with its password replaced by `****`, for messages. A URL that does not parse is
/// not echoed at all (it may hold a password in a place the parser did not find).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = parsed.set_password(Some("****"));
            }
            parsed.to_string()
        }
        Err(_) => "<a database URL that does not parse>".to_string(),
    }
}

/// How to open a SQL store.
#[derive(Clone)]
pub struct SqlOptions {
    /// Seal record values with this key (the JSON engine's key file format).
    pub encryption_key: Option<EncryptionKey>,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long to wait for a connection (at open, and for each operation) before failing.
    pub connect_timeout: Duration,
}

impl Default for SqlOptions {
    fn default() -> Self {
        Self { encryption_key: None, max_connections: 16, connect_timeout: Duration::from_secs(10) }
    }
}

impl std::fmt::Debug for SqlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlOptions")
            .field("encrypted", &self.encryption_key.is_some())
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Opens the SQL store `url` names (by its scheme), runs the migrations and checks the key.
pub async fn open(url: &str, options: SqlOptions) -> Result<Arc<dyn Store>, StoreError> {
    match Engine::of_url(url) {
        Some(Engine::Postgres) => Ok(Arc::new(PgStore::open(url, options).await?)),
        Some(Engine::MySql) => Ok(Arc::new(MySqlStore::open(url, options).await?)),
        None => Err(StoreError::Invalid(format!(
            "{} is not a database URL Hangar knows: use postgres://, postgresql://, mysql:// or mariadb://",
            redact_url(url)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_by_scheme() {
        assert_eq!(Engine::of_url("postgres://a@b/c"), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("PostgreSQL://a@b/c"), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("mysql://a@b/c"), Some(Engine::MySql));
        assert_eq!(Engine::of_url("mariadb://a@b/c"), Some(Engine::MySql));
        assert_eq!(Engine::of_url("/var/lib/hangar"), None);
        assert_eq!(Engine::of_url("sqlite://x"), None);
    }

    #[test]
    fn redaction_hides_the_password() {
        let shown = redact_url("postgres://hangar:s3cr3t@db.example:5432/hangar");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("db.example"), "{shown}");
        assert!(!redact_url("postgres://hangar:s3cr3t@[bad").contains("s3cr3t"));
        let options = SqlOptions { encryption_key: Some(EncryptionKey::from_bytes([7; 32])), ..Default::default() };
        assert!(!format!("{options:?}").contains("07"));
    }
}
