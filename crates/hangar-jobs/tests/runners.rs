//! Jobs on a store several replicas share: each job records its runner, a replica's start
//! touches nobody's jobs, and the leader marks failed only the unfinished jobs of a replica
//! whose liveness lease lapsed, with fenced writes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::EventBus;
use hangar_jobs::runners::{JobRunners, liveness_lease};
use hangar_jobs::{Job, JobState, RUNNER_LOST_ERROR};
use hangar_store::lease::LEASES;
use hangar_store::{Batch, Lease, LeaseConfig, MemoryStore, Store};

const C: &str = "test_jobs";

/// Leases long enough that a renewal delayed by a loaded 2-core machine (one was seen at
/// ~300 ms) does not make a live replica's lease lapse before the test kills it.
fn timing() -> LeaseConfig {
    LeaseConfig { duration: Duration::from_millis(1500), renew_every: Duration::from_millis(100), sole_process: false }
}

async fn stored(store: &Arc<dyn Store>, id: &str) -> Job {
    serde_json::from_value(store.get(C, id).await.unwrap().unwrap().value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_fails_only_a_dead_replicas_jobs_and_only_while_it_leads() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = JobRunners::shared(store.clone(), "replica-a", timing()).await.unwrap();
    let b = JobRunners::shared(store.clone(), "replica-b", timing()).await.unwrap();
    let c = JobRunners::shared(store.clone(), "replica-c", timing()).await.unwrap();
    let (ja, jb, jc) = (
        a.open(C, EventBus::default()).await.unwrap(),
        b.open(C, EventBus::default()).await.unwrap(),
        c.open(C, EventBus::default()).await.unwrap(),
    );
    let on_a = ja.start("u", "vm", "create", &[("placing", 1), ("creating", 9)]).await.unwrap();
    on_a.step(1, 30.0, "creating on host x");
    let on_b = jb.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
    let on_c = jc.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
    assert_eq!(stored(&store, &on_a.id).await.runner.as_deref(), Some("replica-a"));
    // A job a sole process left behind (no runner) before the store was shared.
    let mut legacy = stored(&store, &on_c.id).await;
    legacy.id = "legacy".into();
    legacy.runner = None;
    legacy.state = JobState::Running;
    store.commit(Batch::new().put(C, "legacy", serde_json::to_value(&legacy).unwrap())).await.unwrap();

    // A replica that starts later touches nobody's jobs.
    let d = JobRunners::shared(store.clone(), "replica-d", timing()).await.unwrap();
    let jd = d.open(C, EventBus::default()).await.unwrap();
    assert_eq!(jd.get(&on_a.id).unwrap().state, JobState::Pending, "loaded, not failed");
    assert_eq!(stored(&store, &on_a.id).await.state, JobState::Pending);

    // A follower's pass only re-reads: b sees a's job (and its runner), marks nothing.
    assert!(b.pass(None).await.unwrap().recovered.is_empty());
    assert_eq!(jb.get(&on_a.id).unwrap().runner.as_deref(), Some("replica-a"));

    // c leads. While everyone renews, a pass after a whole lease period marks nothing but
    // the job without a runner.
    let leader = Lease::new(store.clone(), "leader", "replica-c", timing()).unwrap();
    let fence = leader.try_acquire().await.unwrap().unwrap();
    let first = c.pass(Some(&fence)).await.unwrap();
    assert_eq!(first.orphans, 1);
    assert_eq!(stored(&store, "legacy").await.error.as_deref(), Some(RUNNER_LOST_ERROR));
    let calm = Instant::now();
    while calm.elapsed() < timing().duration * 3 {
        let r = c.pass(Some(&fence)).await.unwrap();
        assert!(r.recovered.is_empty(), "nobody died: {r:?}");
        tokio::time::sleep(timing().renew_every).await;
    }
    for id in [&on_a.id, &on_b.id, &on_c.id] {
        assert_eq!(stored(&store, id).await.state, JobState::Pending, "a live replica's job is untouched");
    }

    // a dies (its liveness lease stops without a release, as with kill -9).
    drop(a);
    let died = Instant::now();
    let report = loop {
        let r = c.pass(Some(&fence)).await.unwrap();
        if r.recovered.contains_key("replica-a") {
            break r;
        }
        assert!(died.elapsed() < Duration::from_secs(10), "a's jobs not recovered: {r:?}");
        tokio::time::sleep(timing().renew_every).await;
    };
    assert!(died.elapsed() >= timing().duration / 2, "not at once: {:?}", died.elapsed());
    assert_eq!(report.recovered["replica-a"], 1);
    let j = stored(&store, &on_a.id).await;
    assert_eq!((j.state, j.error.as_deref()), (JobState::Failed, Some(RUNNER_LOST_ERROR)));
    assert_eq!(jc.get(&on_a.id).unwrap().state, JobState::Failed, "the leader's own view");
    for id in [&on_b.id, &on_c.id] {
        assert_eq!(stored(&store, id).await.state, JobState::Pending, "live replicas' jobs are untouched");
    }
    let name = liveness_lease("replica-a");
    assert!(store.get(LEASES, &name).await.unwrap().is_none(), "the dead runner's lease records go");
    assert!(store.get(LEASES, &format!("{name}.beat")).await.unwrap().is_none());
    // The others learn it at their next pass; b's own job keeps its live progress.
    on_b.step(0, 50.0, "half");
    b.pass(None).await.unwrap();
    assert_eq!(jb.get(&on_a.id).unwrap().state, JobState::Failed);
    assert!((jb.get(&on_b.id).unwrap().progress - 50.0).abs() < 0.01);
    // b finishes its job; everyone sees the outcome.
    on_b.complete(serde_json::json!({"id": "vm-b"})).await;
    c.pass(Some(&fence)).await.unwrap();
    assert_eq!(jc.get(&on_b.id).unwrap().state, JobState::Completed);

    // A leader that lost the lease cannot recover anything: d dies while c's fence is stale.
    let on_d = jd.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
    let usurper = Lease::new(store.clone(), "leader", "replica-b", LeaseConfig { sole_process: true, ..timing() });
    let new_fence = usurper.unwrap().try_acquire().await.unwrap().unwrap();
    drop(d);
    let stale = Instant::now();
    while stale.elapsed() < timing().duration * 3 {
        let r = c.pass(Some(&fence)).await.unwrap();
        assert!(r.recovered.is_empty(), "a stale fence recovered: {r:?}");
        tokio::time::sleep(timing().renew_every).await;
    }
    assert_eq!(stored(&store, &on_d.id).await.state, JobState::Pending, "the stale leader wrote nothing");
    // The new leader does it (after watching for a whole period itself).
    let took = Instant::now();
    loop {
        let r = b.pass(Some(&new_fence)).await.unwrap();
        if r.recovered.get("replica-d") == Some(&1) {
            break;
        }
        assert!(took.elapsed() < Duration::from_secs(10), "d's job not recovered: {r:?}");
        tokio::time::sleep(timing().renew_every).await;
    }
    assert_eq!(stored(&store, &on_d.id).await.state, JobState::Failed);
    assert_eq!(stored(&store, &on_c.id).await.state, JobState::Pending);

    // A replica that stops gracefully releases its liveness: its jobs go at the next pass.
    let on_c2 = jc.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
    c.shutdown().await;
    let r = b.pass(Some(&new_fence)).await.unwrap();
    assert_eq!(r.recovered.get("replica-c"), Some(&2), "{r:?}");
    assert_eq!(stored(&store, &on_c2.id).await.state, JobState::Failed);
}

/// A sole process keeps today's rule: its start marks every unfinished job failed, and a
/// pass does nothing.
#[tokio::test]
async fn a_sole_process_fails_unfinished_jobs_at_start() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = JobRunners::sole(store.clone());
    let jobs = first.open(C, EventBus::default()).await.unwrap();
    let j = jobs.start("u", "vm", "create", &[("a", 1)]).await.unwrap();
    assert_eq!(stored(&store, &j.id).await.runner, None);
    assert_eq!(first.pass(None).await.unwrap(), Default::default());
    let again = JobRunners::sole(store.clone());
    let jobs = again.open(C, EventBus::default()).await.unwrap();
    assert_eq!(jobs.get(&j.id).unwrap().error.as_deref(), Some(hangar_jobs::RESTART_ERROR));
}
