//! The conformance suite every [`Store`] engine must pass.
//!
//! An engine's test calls [`run_all`] with a factory that opens a fresh, empty store each
//! time it is called, from inside a multi-threaded tokio runtime:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use hangar_store::{Store, conformance};
//! # async fn fresh_store() -> Arc<dyn Store> { unimplemented!() }
//! # async fn demo() {
//! conformance::run_all(|| Box::pin(fresh_store())).await;
//! # }
//! ```
//!
//! A failed check panics with the case's name and what went wrong, which fails the test.
//! The semantics checked here are the contract of the [`Store`] trait:
//! ids sort in byte order, revisions grow with every commit and all records of one batch share
//! its revision, failed conditions write nothing and answer [`StoreError::Conflict`], empty
//! or NUL-containing names answer [`StoreError::Invalid`], and a closed store answers
//! [`StoreError::Closed`]. The `lease_*` cases run the [`lease`](crate::lease) (built only on
//! batch conditions) with two handles on one store, with short real timings (a few hundred
//! milliseconds): a lease is taken over only after it went unrenewed for its duration, a
//! renewed lease is never taken over, a release hands it over at once, and the old holder's
//! fenced writes answer [`StoreError::Conflict`] once someone else holds it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::lease::{Fence, FencedBatch, Lease, LeaseConfig};
use crate::{Batch, DUMP_FORMAT, Dump, Store, StoreError};

/// A future that yields a fresh, empty store.
pub type StoreFuture = Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>>;

/// Unwraps a result or panics naming the case and the call.
macro_rules! ok {
    ($case:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(err) => panic!("conformance case `{}`: `{}` failed: {err}", $case, stringify!($e)),
        }
    };
}

/// Asserts a condition, naming the case.
macro_rules! check {
    ($case:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!("conformance case `{}`: {}", $case, format!($($msg)+));
        }
    };
}

/// Runs every case against stores produced by `make`. Each case gets its own store and
/// closes it at the end.
pub async fn run_all<F>(make: F)
where
    F: Fn() -> StoreFuture,
{
    type Case = fn(Arc<dyn Store>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
    let cases: &[(&str, Case)] = &[
        ("get_put_delete", |s| Box::pin(get_put_delete(s))),
        ("list_ordering", |s| Box::pin(list_ordering(s))),
        ("list_page", |s| Box::pin(list_page(s))),
        ("batch_atomicity", |s| Box::pin(batch_atomicity(s))),
        ("absent_condition", |s| Box::pin(absent_condition(s))),
        ("revision_condition", |s| Box::pin(revision_condition(s))),
        ("revisions_increase", |s| Box::pin(revisions_increase(s))),
        ("racing_creates", |s| Box::pin(racing_creates(s))),
        ("racing_updates", |s| Box::pin(racing_updates(s))),
        ("export_import", |s| Box::pin(export_import(s))),
        ("large_values", |s| Box::pin(large_values(s))),
        ("unicode_ids", |s| Box::pin(unicode_ids(s))),
        ("invalid_input", |s| Box::pin(invalid_input(s))),
        ("lease_takeover_only_after_expiry", |s| Box::pin(lease_takeover_only_after_expiry(s))),
        ("lease_fence_refuses_old_holder", |s| Box::pin(lease_fence_refuses_old_holder(s))),
        ("lease_release_hands_over_at_once", |s| Box::pin(lease_release_hands_over_at_once(s))),
        ("lease_renew_keeps_it", |s| Box::pin(lease_renew_keeps_it(s))),
        ("close_then_closed", |s| Box::pin(close_then_closed(s))),
    ];
    for (name, case) in cases {
        tracing::info!(case = name, "conformance case");
        let store = make().await;
        case(Arc::clone(&store)).await;
        // Every case leaves the store open except the one about closing.
        if *name != "close_then_closed" {
            ok!(name, store.close().await);
        }
    }
    // Import into a store other than the one exported from.
    export_into_fresh_store(&make).await;
}

async fn put(store: &dyn Store, case: &str, collection: &str, id: &str, value: Value) -> u64 {
    ok!(case, store.commit(Batch::new().put(collection, id, value)).await).revision
}

fn ids(records: &[crate::Record]) -> Vec<String> {
    records.iter().map(|r| r.id.clone()).collect()
}

async fn get_put_delete(store: Arc<dyn Store>) {
    let case = "get_put_delete";
    check!(case, ok!(case, store.get("things", "a").await).is_none(), "a missing record must be None");
    let rev = put(&*store, case, "things", "a", json!({"n": 1})).await;
    let got = ok!(case, store.get("things", "a").await);
    let Some(record) = got else { panic!("conformance case `{case}`: a put record must be readable") };
    check!(case, record.id == "a" && record.value == json!({"n": 1}), "read back {record:?}");
    check!(case, record.revision == rev, "record revision {} != commit revision {rev}", record.revision);
    let rev2 = put(&*store, case, "things", "a", json!({"n": 2})).await;
    check!(case, rev2 > rev, "overwrite must get a higher revision ({rev2} <= {rev})");
    let record = ok!(case, store.get("things", "a").await);
    check!(case, record.as_ref().map(|r| &r.value) == Some(&json!({"n": 2})), "overwrite not visible: {record:?}");
    check!(case, ok!(case, store.get("other", "a").await).is_none(), "collections must be separate");
    ok!(case, store.commit(Batch::new().delete("things", "a")).await);
    check!(case, ok!(case, store.get("things", "a").await).is_none(), "deleted record still readable");
    // Deleting what does not exist is not an error.
    ok!(case, store.commit(Batch::new().delete("things", "never")).await);
    check!(case, ok!(case, store.list("things").await).is_empty(), "collection must be empty after delete");
    check!(case, ok!(case, store.list("unknown").await).is_empty(), "unknown collection must list empty");
    // An empty batch is accepted and writes nothing.
    ok!(case, store.commit(Batch::new()).await);
}

async fn list_ordering(store: Arc<dyn Store>) {
    let case = "list_ordering";
    let mut names = vec!["b", "a", "c", "aa", "B", "10", "9", "a b", "é", "z"];
    for (i, id) in names.iter().enumerate() {
        put(&*store, case, "sorted", id, json!(i)).await;
    }
    put(&*store, case, "elsewhere", "0", json!(null)).await;
    names.sort();
    let listed = ok!(case, store.list("sorted").await);
    check!(case, ids(&listed) == names, "list must be sorted by id in byte order: {:?}", ids(&listed));
    let by_id: BTreeMap<_, _> = listed.iter().map(|r| (r.id.as_str(), &r.value)).collect();
    check!(case, by_id.get("aa") == Some(&&json!(3)), "values must match ids");
}

async fn list_page(store: Arc<dyn Store>) {
    let case = "list_page";
    let mut batch = Batch::new();
    for i in 0..25 {
        batch = batch.put("paged", &format!("id-{i:02}"), json!(i));
    }
    ok!(case, store.commit(batch).await);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = ok!(case, store.list_page("paged", after.as_deref(), 10).await);
        if page.is_empty() {
            break;
        }
        check!(case, page.len() <= 10, "page larger than the limit: {}", page.len());
        after = page.last().map(|r| r.id.clone());
        seen.extend(ids(&page));
        pages += 1;
        check!(case, pages <= 3, "too many pages");
    }
    let all = ids(&ok!(case, store.list("paged").await));
    check!(case, pages == 3 && seen == all, "pages must cover the list in order: {seen:?}");
    let from_gap = ok!(case, store.list_page("paged", Some("id-04x"), 2).await);
    check!(case, ids(&from_gap) == ["id-05", "id-06"], "after an absent id: {:?}", ids(&from_gap));
    check!(case, ok!(case, store.list_page("paged", None, 0).await).is_empty(), "limit 0 must be empty");
    check!(case, ok!(case, store.list_page("paged", Some("id-24"), 5).await).is_empty(), "after the last id");
    check!(case, ok!(case, store.list_page("nothing", None, 5).await).is_empty(), "unknown collection");
}

async fn batch_atomicity(store: Arc<dyn Store>) {
    let case = "batch_atomicity";
    put(&*store, case, "users", "taken", json!("x")).await;
    let failing = Batch::new()
        .put("users", "new-1", json!(1))
        .put("roles", "new-2", json!(2))
        .delete("users", "taken")
        .require_absent("users", "taken");
    match store.commit(failing).await {
        Err(StoreError::Conflict(msg)) => {
            check!(case, msg.contains("taken"), "a conflict must name the record: {msg}");
        }
        other => panic!("conformance case `{case}`: expected Conflict, got {other:?}"),
    }
    check!(case, ok!(case, store.get("users", "new-1").await).is_none(), "failed batch wrote users/new-1");
    check!(case, ok!(case, store.get("roles", "new-2").await).is_none(), "failed batch wrote roles/new-2");
    check!(case, ok!(case, store.get("users", "taken").await).is_some(), "failed batch deleted users/taken");
    let done = ok!(
        case,
        store
            .commit(Batch::new().put("users", "u", json!(1)).put("roles", "r", json!(2)).delete("users", "taken"))
            .await
    );
    let u = ok!(case, store.get("users", "u").await);
    let r = ok!(case, store.get("roles", "r").await);
    check!(
        case,
        u.map(|x| x.revision) == Some(done.revision) && r.map(|x| x.revision) == Some(done.revision),
        "every record of a batch must carry the batch's revision"
    );
    check!(case, ok!(case, store.get("users", "taken").await).is_none(), "delete in a batch must apply");
}

async fn absent_condition(store: Arc<dyn Store>) {
    let case = "absent_condition";
    ok!(case, store.commit(Batch::new().require_absent("c", "x").put("c", "x", json!(1))).await);
    let again = store.commit(Batch::new().require_absent("c", "x").put("c", "x", json!(2))).await;
    check!(case, matches!(again, Err(StoreError::Conflict(_))), "second create must conflict: {again:?}");
    let value = ok!(case, store.get("c", "x").await).map(|r| r.value);
    check!(case, value == Some(json!(1)), "the conflicting create must not write: {value:?}");
    ok!(case, store.commit(Batch::new().delete("c", "x")).await);
    ok!(case, store.commit(Batch::new().require_absent("c", "x").put("c", "x", json!(3))).await);
}

async fn revision_condition(store: Arc<dyn Store>) {
    let case = "revision_condition";
    let rev = put(&*store, case, "c", "doc", json!("v1")).await;
    let rev2 =
        ok!(case, store.commit(Batch::new().require_revision("c", "doc", rev).put("c", "doc", json!("v2"))).await)
            .revision;
    let stale = store.commit(Batch::new().require_revision("c", "doc", rev).put("c", "doc", json!("v3"))).await;
    match stale {
        Err(StoreError::Conflict(msg)) => check!(case, msg.contains("doc"), "conflict must name the record: {msg}"),
        other => panic!("conformance case `{case}`: stale revision must conflict, got {other:?}"),
    }
    let value = ok!(case, store.get("c", "doc").await).map(|r| r.value);
    check!(case, value == Some(json!("v2")), "stale update wrote: {value:?}");
    let missing = store.commit(Batch::new().require_revision("c", "nope", 1).put("c", "nope", json!(0))).await;
    check!(case, matches!(missing, Err(StoreError::Conflict(_))), "revision on a missing record: {missing:?}");
    check!(case, ok!(case, store.get("c", "nope").await).is_none(), "the failed batch wrote c/nope");
    ok!(case, store.commit(Batch::new().require_revision("c", "doc", rev2).delete("c", "doc")).await);
    check!(case, ok!(case, store.get("c", "doc").await).is_none(), "conditional delete must apply");
}

async fn revisions_increase(store: Arc<dyn Store>) {
    let case = "revisions_increase";
    let mut last = 0;
    for i in 0..20 {
        let rev = put(&*store, case, "seq", &format!("r{}", i % 3), json!(i)).await;
        check!(case, rev > last, "revision {rev} after {last}");
        last = rev;
    }
    let dump = ok!(case, store.export().await);
    check!(case, dump.revision >= last, "export revision {} below the last commit {last}", dump.revision);
}

async fn racing_creates(store: Arc<dyn Store>) {
    let case = "racing_creates";
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..16 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            store.commit(Batch::new().require_absent("race", "the-one").put("race", "the-one", json!(writer))).await
        });
    }
    let mut wins = Vec::new();
    let mut conflicts = 0;
    while let Some(joined) = tasks.join_next().await {
        match ok!(case, joined) {
            Ok(done) => wins.push(done.revision),
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(other) => panic!("conformance case `{case}`: unexpected error {other}"),
        }
    }
    check!(case, wins.len() == 1 && conflicts == 15, "{} winners, {conflicts} conflicts", wins.len());
    let record = ok!(case, store.get("race", "the-one").await);
    check!(case, record.map(|r| r.revision) == wins.first().copied(), "the winner's write must be stored");
}

async fn racing_updates(store: Arc<dyn Store>) {
    let case = "racing_updates";
    put(&*store, case, "counters", "n", json!(0)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            for _ in 0..5 {
                loop {
                    let current = store.get("counters", "n").await?;
                    let Some(current) = current else {
                        return Err(StoreError::Engine("counter vanished".into()));
                    };
                    let n = current.value.as_i64().unwrap_or(-1000);
                    let attempt = Batch::new().require_revision("counters", "n", current.revision).put(
                        "counters",
                        "n",
                        json!(n + 1),
                    );
                    match store.commit(attempt).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<(), StoreError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        ok!(case, ok!(case, joined));
    }
    let value = ok!(case, store.get("counters", "n").await).map(|r| r.value);
    check!(case, value == Some(json!(40)), "40 conditional increments must give 40, got {value:?}");
}

fn sample_dump() -> Dump {
    let mut collections = BTreeMap::new();
    collections.insert(
        "users".to_string(),
        BTreeMap::from([
            ("alice".to_string(), json!({"name": "Alice", "roles": ["admin"]})),
            ("bob".to_string(), json!({"name": "Bob"})),
        ]),
    );
    collections.insert("hosts".to_string(), BTreeMap::from([("h1".to_string(), json!([1, 2, 3]))]));
    Dump { format: DUMP_FORMAT, revision: 7, collections }
}

async fn export_import(store: Arc<dyn Store>) {
    let case = "export_import";
    put(&*store, case, "stale", "gone", json!("must be replaced")).await;
    let before = ok!(case, store.export().await).revision;
    let dump = sample_dump();
    ok!(case, store.import(dump.clone()).await);
    let exported = ok!(case, store.export().await);
    check!(case, exported.format == DUMP_FORMAT, "export format {}", exported.format);
    check!(case, exported.collections == dump.collections, "export after import differs: {exported:?}");
    check!(case, exported.revision > before, "import must move the revision forward");
    check!(case, ok!(case, store.get("stale", "gone").await).is_none(), "import must replace everything");
    let alice = ok!(case, store.get("users", "alice").await);
    let Some(alice) = alice else { panic!("conformance case `{case}`: imported record missing") };
    // Conditions work on imported records with the revision they report.
    ok!(
        case,
        store
            .commit(Batch::new().require_revision("users", "alice", alice.revision).put("users", "alice", json!(1)))
            .await
    );
    let bad = store.import(Dump { format: DUMP_FORMAT + 100, ..sample_dump() }).await;
    check!(case, matches!(bad, Err(StoreError::Invalid(_))), "unknown dump format must be Invalid: {bad:?}");
    check!(case, ok!(case, store.get("users", "bob").await).is_some(), "a refused import must change nothing");
}

async fn export_into_fresh_store<F: Fn() -> StoreFuture>(make: &F) {
    let case = "export_into_fresh_store";
    let source = make().await;
    let mut batch = Batch::new();
    for i in 0..50 {
        batch = batch.put(&format!("col-{}", i % 4), &format!("id-{i}"), json!({"i": i, "s": "x".repeat(i)}));
    }
    ok!(case, source.commit(batch).await);
    let dump = ok!(case, source.export().await);
    let target = make().await;
    put(&*target, case, "junk", "j", json!(true)).await;
    ok!(case, target.import(dump.clone()).await);
    let copy = ok!(case, target.export().await);
    check!(case, copy.collections == dump.collections, "round trip through a fresh store differs");
    let json_text = ok!(case, serde_json::to_string(&dump));
    let parsed: Dump = ok!(case, serde_json::from_str(&json_text));
    check!(case, parsed == dump, "a dump must survive JSON serialisation");
    ok!(case, source.close().await);
    ok!(case, target.close().await);
}

async fn large_values(store: Arc<dyn Store>) {
    let case = "large_values";
    let big_string = "0123456789abcdef".repeat(256 * 1024); // 4 MiB
    let big_array: Vec<Value> = (0..50_000).map(|i| json!({"i": i, "tag": format!("t{i}")})).collect();
    ok!(
        case,
        store
            .commit(Batch::new().put("big", "string", json!({"s": big_string})).put(
                "big",
                "array",
                Value::Array(big_array.clone())
            ))
            .await
    );
    let s = ok!(case, store.get("big", "string").await).map(|r| r.value);
    check!(case, s == Some(json!({"s": big_string})), "4 MiB string did not round trip");
    let a = ok!(case, store.get("big", "array").await).map(|r| r.value);
    check!(case, a == Some(Value::Array(big_array)), "50k element array did not round trip");
}

async fn unicode_ids(store: Arc<dyn Store>) {
    let case = "unicode_ids";
    let odd = [
        "ünïcødé",
        "日本語のキー",
        "🚀 rocket",
        "with/slash",
        "with\"quote'and\\backslash",
        "tab\tand\nnewline",
        "%2F..%00",
    ];
    for id in odd {
        put(&*store, case, "ユーザー/users", id, json!({"id": id})).await;
    }
    for id in odd {
        let got = ok!(case, store.get("ユーザー/users", id).await).map(|r| r.value);
        check!(case, got == Some(json!({"id": id})), "id {id:?} did not round trip: {got:?}");
    }
    let listed = ids(&ok!(case, store.list("ユーザー/users").await));
    let mut expected: Vec<String> = odd.iter().map(|s| s.to_string()).collect();
    expected.sort();
    check!(case, listed == expected, "unicode ids must list in byte order: {listed:?}");
    let long_id = "é".repeat(256); // 512 bytes
    put(&*store, case, "long", &long_id, json!(1)).await;
    check!(case, ok!(case, store.get("long", &long_id).await).is_some(), "a 512-byte id must work");
}

async fn invalid_input(store: Arc<dyn Store>) {
    let case = "invalid_input";
    for batch in [
        Batch::new().put("", "id", json!(1)),
        Batch::new().put("c", "", json!(1)),
        Batch::new().put("c", "nul\0id", json!(1)),
        Batch::new().put("c", "fine", json!(1)).require_absent("c", ""),
    ] {
        let answer = store.commit(batch.clone()).await;
        check!(case, matches!(answer, Err(StoreError::Invalid(_))), "{batch:?} must be Invalid: {answer:?}");
    }
    check!(case, ok!(case, store.get("c", "fine").await).is_none(), "an invalid batch must write nothing");
}

async fn close_then_closed(store: Arc<dyn Store>) {
    let case = "close_then_closed";
    put(&*store, case, "c", "x", json!(1)).await;
    ok!(case, store.close().await);
    let get = store.get("c", "x").await;
    check!(case, matches!(get, Err(StoreError::Closed)), "get after close: {get:?}");
    let list = store.list("c").await;
    check!(case, matches!(list, Err(StoreError::Closed)), "list after close: {list:?}");
    let commit = store.commit(Batch::new().put("c", "y", json!(2))).await;
    check!(case, matches!(commit, Err(StoreError::Closed)), "commit after close: {commit:?}");
    let export = store.export().await;
    check!(case, matches!(export, Err(StoreError::Closed)), "export after close: {export:?}");
}

// ----- the leader lease -------------------------------------------------------------------

fn lease_config() -> LeaseConfig {
    LeaseConfig { duration: Duration::from_millis(300), renew_every: Duration::from_millis(75), sole_process: false }
}

fn lease(case: &str, store: &Arc<dyn Store>, me: &str) -> Lease {
    ok!(case, Lease::new(Arc::clone(store), "leader", me, lease_config()))
}

/// `b` tries every third of a renewal interval until it acquires (within `limit`); answers
/// its fence and how long after `since` it got it.
async fn acquire_within(case: &str, b: &Lease, since: tokio::time::Instant, limit: Duration) -> (Fence, Duration) {
    let started = tokio::time::Instant::now();
    loop {
        if let Some(fence) = ok!(case, b.try_acquire().await) {
            return (fence, since.elapsed());
        }
        check!(case, started.elapsed() < limit, "{} did not acquire the lease within {limit:?}", b.me());
        tokio::time::sleep(lease_config().renew_every / 3).await;
    }
}

async fn lease_takeover_only_after_expiry(store: Arc<dyn Store>) {
    let case = "lease_takeover_only_after_expiry";
    let (a, b) = (lease(case, &store, "replica-a"), lease(case, &store, "replica-b"));
    let Some(fa) = ok!(case, a.try_acquire().await) else { panic!("conformance case `{case}`: a free lease") };
    // `b` starts watching no earlier than this.
    let watching = tokio::time::Instant::now();
    check!(case, ok!(case, b.try_acquire().await).is_none(), "a held lease was taken at once");
    // `a` stops renewing: `b` gets it once it saw it unchanged for the whole duration.
    let (fb, waited) = acquire_within(case, &b, watching, lease_config().duration * 10).await;
    check!(case, waited >= lease_config().duration, "taken over after {waited:?}, before the lease period");
    check!(case, fb.token() > fa.token(), "tokens must grow ({} then {})", fa.token(), fb.token());
    let holder = ok!(case, a.holder().await);
    check!(case, holder.as_ref().map(|h| h.holder.as_str()) == Some("replica-b"), "recorded holder {holder:?}");
    let renewed = a.renew(&fa, 1).await;
    check!(case, matches!(renewed, Err(StoreError::Conflict(_))), "the old holder renewed: {renewed:?}");
}

async fn lease_fence_refuses_old_holder(store: Arc<dyn Store>) {
    let case = "lease_fence_refuses_old_holder";
    let (a, b) = (lease(case, &store, "replica-a"), lease(case, &store, "replica-b"));
    let Some(fa) = ok!(case, a.try_acquire().await) else { panic!("conformance case `{case}`: a free lease") };
    // While `a` holds it, its fenced writes land.
    ok!(case, store.commit(fa.guard(Batch::new().put("work", "w1", json!({"by": "a"})))).await);
    // `a` pauses past its lease; `b` takes over.
    let (fb, _) = acquire_within(case, &b, tokio::time::Instant::now(), lease_config().duration * 10).await;
    let stale = store.commit(Batch::new().put("work", "w2", json!({"by": "a"})).fenced(&fa)).await;
    check!(case, matches!(stale, Err(StoreError::Conflict(_))), "the paused ex-leader's write landed: {stale:?}");
    check!(case, ok!(case, store.get("work", "w2").await).is_none(), "a refused fenced batch wrote something");
    ok!(case, store.commit(Batch::new().put("work", "w2", json!({"by": "b"})).fenced(&fb)).await);
    // Renewals do not change the fence.
    ok!(case, b.renew(&fb, 1).await);
    ok!(case, b.renew(&fb, 2).await);
    ok!(case, store.commit(fb.guard(Batch::new().put("work", "w3", json!({"by": "b"})))).await);
}

async fn lease_release_hands_over_at_once(store: Arc<dyn Store>) {
    let case = "lease_release_hands_over_at_once";
    let (a, b) = (lease(case, &store, "replica-a"), lease(case, &store, "replica-b"));
    let Some(fa) = ok!(case, a.try_acquire().await) else { panic!("conformance case `{case}`: a free lease") };
    check!(case, ok!(case, b.try_acquire().await).is_none(), "a held lease was taken at once");
    ok!(case, a.release(&fa).await);
    check!(case, ok!(case, a.holder().await).is_none(), "a released lease has no holder");
    let Some(fb) = ok!(case, b.try_acquire().await) else {
        panic!("conformance case `{case}`: a released lease must be free at once")
    };
    check!(case, fb.token() > fa.token(), "tokens must grow after a release ({} then {})", fa.token(), fb.token());
    let stale = store.commit(fa.guard(Batch::new().put("work", "w", json!(1)))).await;
    check!(case, matches!(stale, Err(StoreError::Conflict(_))), "a released fence still writes: {stale:?}");
    let again = a.release(&fa).await;
    check!(case, matches!(again, Err(StoreError::Conflict(_))), "released twice: {again:?}");
}

async fn lease_renew_keeps_it(store: Arc<dyn Store>) {
    let case = "lease_renew_keeps_it";
    let (a, b) = (lease(case, &store, "replica-a"), lease(case, &store, "replica-b"));
    let Some(fa) = ok!(case, a.try_acquire().await) else { panic!("conformance case `{case}`: a free lease") };
    let started = tokio::time::Instant::now();
    let mut beat = 0;
    // Three lease periods of renewals, `b` trying all along.
    while started.elapsed() < lease_config().duration * 3 {
        beat += 1;
        ok!(case, a.renew(&fa, beat).await);
        check!(case, ok!(case, b.try_acquire().await).is_none(), "a renewed lease was taken over");
        tokio::time::sleep(lease_config().renew_every).await;
    }
    ok!(case, store.commit(fa.guard(Batch::new().put("work", "w", json!(1)))).await);
    let holder = ok!(case, b.holder().await);
    check!(
        case,
        holder.as_ref().map(|h| (h.holder.as_str(), h.token)) == Some(("replica-a", fa.token())),
        "{holder:?}"
    );
}
