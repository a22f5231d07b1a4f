//! The real binary on the SQL engines: `hangar serve` with `DATABASE_URL` on PostgreSQL and
//! MariaDB, and `hangar db migrate` from a JSON data folder into both, against the servers
//! `scripts/test-services.sh start` runs (`eval "$(scripts/test-services.sh env)"`).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use serde_json::Value;

const PASSWORD_IN_URLS: &str = "hangar-test-pw";

use hangar_store_sql::testing::admin_url;

async fn fresh_database(admin: &str) -> String {
    hangar_store_sql::testing::create_database(admin, "hangar_bin").await.expect("a fresh test database")
}

#[tokio::test]
async fn serve_on_postgres_keeps_users_across_restarts() {
    let Some(admin) = admin_url("HANGAR_TEST_POSTGRES_URL") else { return };
    let url = fresh_database(&admin).await;
    let c = client();
    let first = tempfile::tempdir().unwrap();
    let env = [("DATABASE_URL", url.as_str())];
    let mut s = Server::start_full(first.path(), &[], true, &env);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    make_user(&c, &s, &root, "pgcarol").await;
    assert!(s.stop().success());
    let log = s.log();
    assert!(!log.contains(PASSWORD_IN_URLS), "the log shows the database password: {log}");
    assert!(!s.banner.join("\n").contains(PASSWORD_IN_URLS), "the banner shows the database password");
    assert!(log.contains("JSON engine"), "the start says scheduled backups are the JSON engine's: {log}");
    assert!(!first.path().join("store").exists(), "nothing is stored in the data folder on PostgreSQL");

    // Another replica's data folder (its own secrets), the same database: the user is there.
    let second = tempfile::tempdir().unwrap();
    let mut s2 = Server::start_full(second.path(), &[], true, &env);
    login(&c, &s2, "pgcarol", USER_PASSWORD).await;
    assert!(s2.stop().success());

    // `hangar db export --url` reads the same database offline.
    let out = Command::new(bin())
        .args(["db", "export", "--output", "json", "--data-dir"])
        .arg(second.path())
        .args(["--url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    let users = dump["collections"]["users"].as_object().unwrap();
    assert!(users.values().any(|u| u["username"] == "pgcarol"), "{users:?}");
}

#[tokio::test]
async fn a_database_that_is_down_is_a_clear_error_without_the_password() {
    let Some(admin) = admin_url("HANGAR_TEST_POSTGRES_URL") else { return };
    let mut down = url::Url::parse(&admin).unwrap();
    down.set_port(Some(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["serve", "--port", "0", "--set", "API_HOST=127.0.0.1", "--data-dir"])
        .arg(dir.path())
        .env("DATABASE_URL", down.as_str())
        .env("ROOT_PASSWORD", ROOT_PASSWORD)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "the error names the server: {err}");
    assert!(!err.contains(PASSWORD_IN_URLS), "the error shows the password: {err}");
}

fn counts(out: &std::process::Output) -> BTreeMap<String, (u64, u64, bool)> {
    assert!(out.status.success(), "hangar db migrate: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            (r["collection"].as_str().unwrap().to_string(), (n("source"), n("target"), r["ok"] == true))
        })
        .collect()
}

#[tokio::test]
async fn db_migrate_copies_a_json_folder_into_postgres_and_mariadb() {
    let Some(pg_admin) = admin_url("HANGAR_TEST_POSTGRES_URL") else { return };
    let Some(my_admin) = admin_url("HANGAR_TEST_MYSQL_URL") else { return };
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &[]);
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    for name in ["mig-ann", "mig-bob", "mig-cid"] {
        make_user(&c, &s, &root, name).await;
    }
    assert!(s.stop().success());
    let source = dir.path().to_str().unwrap().to_string();

    // A folder that is not a data folder is refused, not read as an empty store.
    let out = Command::new(bin())
        .args(["db", "migrate", "--data-dir"])
        .arg(dir.path())
        .args(["--from", &format!("{source}/typo"), "--to", &format!("{source}/elsewhere")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Hangar data folder"));

    for admin in [&pg_admin, &my_admin] {
        let target = fresh_database(admin).await;
        let out = Command::new(bin())
            .args(["db", "migrate", "--output", "json", "--data-dir"])
            .arg(dir.path())
            .args(["--from", &source, "--to", &target])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains(PASSWORD_IN_URLS), "migrate shows the password: {stderr}");
        let table = counts(&out);
        let (src, dst, ok) = table["users"];
        assert!(src >= 4 && src == dst && ok, "users copied: {table:?}");
        assert!(table.values().all(|(a, b, ok)| a == b && *ok), "every collection's count matches: {table:?}");
        assert!(table.contains_key("(all)"), "{table:?}");

        // A second migrate into the now full database is refused without --force.
        let again = Command::new(bin())
            .args(["db", "migrate", "--data-dir"])
            .arg(dir.path())
            .args(["--from", &source, "--to", &target])
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

        // The server on the database: the migrated users log in with their passwords.
        let other = tempfile::tempdir().unwrap();
        let mut s = Server::start_full(other.path(), &[], true, &[("DATABASE_URL", target.as_str())]);
        login(&c, &s, "mig-bob", USER_PASSWORD).await;
        assert!(s.stop().success());

        // And back from the database into a fresh folder, with the same counts.
        let back = tempfile::tempdir().unwrap();
        let out = Command::new(bin())
            .args(["db", "migrate", "--output", "json", "--data-dir"])
            .arg(back.path())
            .args(["--from", &target, "--to", back.path().to_str().unwrap()])
            .output()
            .unwrap();
        let back_table = counts(&out);
        assert_eq!(back_table["users"].0, dst, "{back_table:?}");
    }
}
