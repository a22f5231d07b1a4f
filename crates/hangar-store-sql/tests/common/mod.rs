//! Shared by the engine tests: the test server's URL, fresh databases, stores on them.
#![allow(dead_code)]

pub mod suite;

use std::sync::Arc;
use std::time::Duration;

use hangar_store::{EncryptionKey, Store};
use hangar_store_sql::{SqlOptions, testing};

pub use hangar_store_sql::testing::admin_url;

pub fn options(key: Option<&EncryptionKey>) -> SqlOptions {
    SqlOptions { encryption_key: key.cloned(), max_connections: 8, connect_timeout: Duration::from_secs(10) }
}

/// A URL for a new, empty database on the server of `admin`.
pub async fn fresh_url(admin: &str) -> String {
    match testing::create_database(admin, "hangar_t").await {
        Ok(url) => url,
        Err(e) => panic!("cannot create a test database: {e}"),
    }
}

/// A store on a new, empty database.
pub async fn fresh_store(admin: &str, key: Option<&EncryptionKey>) -> Arc<dyn Store> {
    let url = fresh_url(admin).await;
    match hangar_store_sql::open(&url, options(key)).await {
        Ok(store) => store,
        Err(e) => panic!("cannot open a store on a fresh database: {e}"),
    }
}

/// The error opening `url` must give.
pub async fn open_err(url: &str, options: SqlOptions) -> hangar_store::StoreError {
    match hangar_store_sql::open(url, options).await {
        Ok(_) => panic!("opening {} must fail", hangar_store_sql::redact_url(url)),
        Err(e) => e,
    }
}
