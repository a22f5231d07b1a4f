//! The engine tests every SQL engine runs: the store conformance suite (plain and encrypted)
//! and the engine's own checks, expanded once per engine by `engine_suite!(URL variable,
//! URL scheme, store type)` in `conformance_postgres.rs` and `conformance_mysql.rs`.

/// Expands the whole suite for one engine.
macro_rules! engine_suite {
    ($var:literal, $scheme:literal, $store:ty) => {
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use hangar_store::{Batch, EncryptionKey, Store, StoreError, conformance};
        use hangar_store_sql::{SCHEMA_VERSION, testing};
        use serde_json::json;

        const VAR: &str = $var;

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn conformance_plain() {
            let Some(admin) = common::admin_url(VAR) else { return };
            conformance::run_all(move || {
                let admin = admin.clone();
                Box::pin(async move { common::fresh_store(&admin, None).await })
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn conformance_encrypted() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let key = EncryptionKey::generate().expect("a random key");
            conformance::run_all(move || {
                let admin = admin.clone();
                let key = key.clone();
                Box::pin(async move { common::fresh_store(&admin, Some(&key)).await })
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn migrations_rerun_and_data_survives_reopen() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let url = common::fresh_url(&admin).await;
            let store = hangar_store_sql::open(&url, common::options(None)).await.expect("first open");
            let done = store.commit(Batch::new().put("c", "a", json!({"n": 1}))).await.expect("commit");
            store.close().await.expect("close");
            // Opening again runs the migrations again: nothing changes, nothing is lost.
            for _ in 0..2 {
                let again = hangar_store_sql::open(&url, common::options(None)).await.expect("reopen");
                let record = again.get("c", "a").await.expect("get").expect("the record survives a reopen");
                assert_eq!((record.revision, record.value), (done.revision, json!({"n": 1})));
                let next = again.commit(Batch::new().put("c", "b", json!(2))).await.expect("commit after reopen");
                assert!(next.revision > done.revision, "the revision goes on growing after a reopen");
                again.commit(Batch::new().delete("c", "b")).await.expect("delete");
                again.close().await.expect("close");
            }
            // Several replicas opening at once migrate once and all open.
            let fresh = common::fresh_url(&admin).await;
            let opens: Vec<_> = (0..4)
                .map(|_| {
                    tokio::spawn({
                        let fresh = fresh.clone();
                        async move { hangar_store_sql::open(&fresh, common::options(None)).await }
                    })
                })
                .collect();
            for open in opens {
                let store = open.await.expect("join").expect("a concurrent open");
                store.close().await.expect("close");
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn a_newer_schema_is_refused() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let url = common::fresh_url(&admin).await;
            let store = hangar_store_sql::open(&url, common::options(None)).await.expect("open");
            store.close().await.expect("close");
            let newer = SCHEMA_VERSION + 41;
            testing::execute(&url, &format!("UPDATE hangar_schema SET version = {newer} WHERE id = 1")).await.expect("bump");
            let err = common::open_err(&url, common::options(None)).await;
            let text = err.to_string();
            assert!(
                text.contains(&newer.to_string()) && text.contains(&format!("version {SCHEMA_VERSION}")),
                "the error names both versions: {text}"
            );
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn two_replicas_racing_on_one_revision_let_exactly_one_win() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let url = common::fresh_url(&admin).await;
            // Two handles with their own pools, as two replicas would have.
            let a = hangar_store_sql::open(&url, common::options(None)).await.expect("replica a");
            let b = hangar_store_sql::open(&url, common::options(None)).await.expect("replica b");
            for round in 0..20 {
                let id = format!("doc-{round}");
                let base = a.commit(Batch::new().put("docs", &id, json!(0))).await.expect("seed").revision;
                let mut tasks = tokio::task::JoinSet::new();
                for (n, store) in [Arc::clone(&a), Arc::clone(&b), Arc::clone(&a), Arc::clone(&b)].into_iter().enumerate() {
                    let id = id.clone();
                    tasks.spawn(async move {
                        store.commit(Batch::new().require_revision("docs", &id, base).put("docs", &id, json!(n + 1))).await
                    });
                }
                let (mut wins, mut conflicts) = (Vec::new(), 0);
                while let Some(joined) = tasks.join_next().await {
                    match joined.expect("join") {
                        Ok(done) => wins.push(done.revision),
                        Err(StoreError::Conflict(_)) => conflicts += 1,
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                assert_eq!((wins.len(), conflicts), (1, 3), "round {round}: exactly one writer wins");
                let seen_by_b = b.get("docs", &id).await.expect("get").expect("record");
                assert_eq!(Some(seen_by_b.revision), wins.first().copied(), "the other replica reads the winner");
            }
            // Revisions are global: commits through either handle interleave in one sequence.
            let r1 = a.commit(Batch::new().put("x", "1", json!(1))).await.expect("a").revision;
            let r2 = b.commit(Batch::new().put("x", "2", json!(2))).await.expect("b").revision;
            let r3 = a.commit(Batch::new().put("x", "3", json!(3))).await.expect("a").revision;
            assert!(r1 < r2 && r2 < r3, "{r1} < {r2} < {r3}");
            a.close().await.expect("close a");
            b.close().await.expect("close b");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn wrong_or_missing_key_is_refused() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let url = common::fresh_url(&admin).await;
            let key = EncryptionKey::generate().expect("key");
            let store = hangar_store_sql::open(&url, common::options(Some(&key))).await.expect("open encrypted");
            store.commit(Batch::new().put("secrets", "s", json!({"token": "very-secret-value"}))).await.expect("commit");
            store.close().await.expect("close");
            // What a database administrator sees is not the value.
            let rows = testing::execute(&url, "DELETE FROM hangar_records WHERE value LIKE '%very-secret-value%'").await;
            assert_eq!(rows.expect("query"), 0, "the sealed value must not be readable in the database");
            let other = EncryptionKey::generate().expect("key");
            let wrong = common::open_err(&url, common::options(Some(&other))).await;
            assert!(matches!(wrong, StoreError::WrongKey { .. }), "a wrong key: {wrong:?}");
            let none = common::open_err(&url, common::options(None)).await;
            assert!(matches!(&none, StoreError::Invalid(m) if m.contains("DATABASE_ENCRYPTION_KEY_FILE")), "no key: {none:?}");
            let right = hangar_store_sql::open(&url, common::options(Some(&key))).await.expect("the right key opens");
            let value = right.get("secrets", "s").await.expect("get").map(|r| r.value);
            assert_eq!(value, Some(json!({"token": "very-secret-value"})));
            right.close().await.expect("close");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn a_down_server_or_bad_url_fails_fast_without_the_password() {
            let Some(admin) = common::admin_url(VAR) else { return };
            // A port nothing listens on.
            let down = testing::with_database(&admin, "nothing")
                .expect("url")
                .replace(&format!(":{}", url::Url::parse(&admin).expect("url").port().expect("port")), ":1");
            let started = Instant::now();
            let err = common::open_err(&down, common::options(None)).await;
            let text = err.to_string();
            assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
            assert!(text.contains("127.0.0.1:1"), "the error names the host and port: {text}");
            assert!(!text.contains("hangar-test-pw"), "the error shows the password: {text}");
            assert!(!format!("{err:?}").contains("hangar-test-pw"), "Debug shows the password: {err:?}");
            // A wrong password.
            let mut wrong = url::Url::parse(&admin).expect("url");
            wrong.set_password(Some("not-the-password")).expect("password");
            let err = common::open_err(wrong.as_str(), common::options(None)).await;
            assert!(!err.to_string().contains("not-the-password"), "{err}");
            // Not a URL at all.
            let err = common::open_err(concat!($scheme, "://user:pw-in-url@[broken"), common::options(None)).await;
            assert!(!err.to_string().contains("pw-in-url"), "{err}");
            // An open store's Debug never shows the password either.
            let url = common::fresh_url(&admin).await;
            let store = <$store>::open(&url, common::options(None)).await.expect("open");
            assert!(!format!("{store:?}").contains("hangar-test-pw"));
            store.close().await.expect("close");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn reads_with_names_no_batch_could_write_find_nothing() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let store = common::fresh_store(&admin, None).await;
            assert!(store.shared(), "a SQL engine may be shared by several replicas");
            store.commit(Batch::new().put("c", "ab", json!(1)).put("c", "b", json!(2))).await.expect("commit");
            for (collection, id) in [("c", "a\0b"), ("c\0", "ab"), ("", "ab"), ("c", "")] {
                let got = store.get(collection, id).await;
                assert!(matches!(got, Ok(None)), "get({collection:?}, {id:?}): {got:?}");
            }
            let long = "x".repeat(hangar_store::MAX_KEY_LEN + 1);
            assert!(matches!(store.get("c", &long).await, Ok(None)));
            assert!(store.list("c\0").await.expect("list").is_empty());
            // Ids after "a\0..." are the ids after "a".
            let page = store.list_page("c", Some("a\0zzz"), 10).await.expect("page");
            let ids: Vec<_> = page.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, ["ab", "b"]);
            store.close().await.expect("close");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_commits_grouped_keep_one_revision_each() {
            let Some(admin) = common::admin_url(VAR) else { return };
            let store = common::fresh_store(&admin, None).await;
            store.commit(Batch::new().put("g", "taken", json!(0))).await.expect("seed");
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..64usize {
                let store = Arc::clone(&store);
                tasks.spawn(async move {
                    // Every 8th batch conflicts; the others must land whatever group they share.
                    let batch = if n % 8 == 0 {
                        Batch::new().require_absent("g", "taken").put("g", &format!("never-{n}"), json!(n))
                    } else {
                        Batch::new().put("g", &format!("k-{n}"), json!(n)).put("h", &format!("k-{n}"), json!(n))
                    };
                    (n, store.commit(batch).await)
                });
            }
            let mut revisions = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                let (n, result) = joined.expect("join");
                match result {
                    Ok(done) => {
                        assert!(n % 8 != 0, "batch {n} must conflict");
                        for collection in ["g", "h"] {
                            let record = store.get(collection, &format!("k-{n}")).await.expect("get").expect("written");
                            assert_eq!(record.revision, done.revision, "both records of batch {n} carry its revision");
                        }
                        revisions.push(done.revision);
                    }
                    Err(StoreError::Conflict(_)) => assert!(n % 8 == 0, "batch {n} must land"),
                    Err(other) => panic!("batch {n}: {other}"),
                }
                assert!(store.get("g", &format!("never-{n}")).await.expect("get").is_none());
            }
            revisions.sort_unstable();
            let before = revisions.len();
            revisions.dedup();
            assert_eq!((before, revisions.len()), (56, 56), "56 batches land, each at its own revision");
            let dump = store.export().await.expect("export");
            assert_eq!(dump.revision, *revisions.last().expect("some"), "the store's revision is the last batch's");
            store.close().await.expect("close");
        }
    };
}
pub(crate) use engine_suite;
