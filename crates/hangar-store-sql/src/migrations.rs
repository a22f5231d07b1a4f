//! The embedded, versioned schema. Each migration is a list of statements that can run again
//! after a crash half-way (MySQL commits DDL at once, so a migration there is not one
//! transaction): `CREATE ... IF NOT EXISTS`, inserts that ignore an existing row.
//!
//! Never edit a released migration; add the next version.

/// The schema version this binary writes.
pub const LATEST: i64 = 1;

/// The table holding the version, created before any migration.
pub const PG_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS hangar_schema (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
)";

pub const MYSQL_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS hangar_schema (
    id TINYINT PRIMARY KEY,
    version BIGINT NOT NULL
) ENGINE=InnoDB";

/// PostgreSQL migrations, `(version, statements)`.
pub const PG: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE IF NOT EXISTS hangar_revision (
            id SMALLINT PRIMARY KEY CHECK (id = 1),
            revision BIGINT NOT NULL
        )",
        "INSERT INTO hangar_revision (id, revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        // COLLATE \"C\": ids compare and sort by their UTF-8 bytes.
        "CREATE TABLE IF NOT EXISTS hangar_records (
            collection TEXT COLLATE \"C\" NOT NULL,
            id TEXT COLLATE \"C\" NOT NULL,
            revision BIGINT NOT NULL,
            value BYTEA NOT NULL,
            PRIMARY KEY (collection, id)
        )",
        "CREATE TABLE IF NOT EXISTS hangar_meta (
            name TEXT PRIMARY KEY,
            value BYTEA NOT NULL
        )",
    ],
)];

/// MySQL/MariaDB migrations, `(version, statements)`.
pub const MYSQL: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE IF NOT EXISTS hangar_revision (
            id TINYINT PRIMARY KEY,
            revision BIGINT NOT NULL
        ) ENGINE=InnoDB",
        "INSERT IGNORE INTO hangar_revision (id, revision) VALUES (1, 0)",
        // VARBINARY: ids compare and sort by their UTF-8 bytes. 1024 bytes each is
        // hangar_store::MAX_KEY_LEN; the key fits InnoDB's 3072-byte limit (DYNAMIC rows).
        "CREATE TABLE IF NOT EXISTS hangar_records (
            collection VARBINARY(1024) NOT NULL,
            id VARBINARY(1024) NOT NULL,
            revision BIGINT NOT NULL,
            value LONGBLOB NOT NULL,
            PRIMARY KEY (collection, id)
        ) ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
        "CREATE TABLE IF NOT EXISTS hangar_meta (
            name VARCHAR(64) PRIMARY KEY,
            value BLOB NOT NULL
        ) ENGINE=InnoDB",
    ],
)];

/// The refusal for a database newer than this binary.
pub fn too_new(target: &crate::Target, found: i64) -> hangar_store::StoreError {
    hangar_store::StoreError::Engine(format!(
        "The database {target} has schema version {found}, newer than this Hangar's schema version {LATEST}: \
         upgrade Hangar (a newer replica migrated it), or restore a backup taken before that upgrade"
    ))
}
