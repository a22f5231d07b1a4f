//! The store conformance suite and the engine's own checks on a real PostgreSQL server
//! (`scripts/test-services.sh start`, then `eval "$(scripts/test-services.sh env)"`); the
//! tests themselves are in `common/suite.rs`, shared by every SQL engine.

mod common;

common::suite::engine_suite!("HANGAR_TEST_POSTGRES_URL", "postgres", hangar_store_sql::PgStore);
