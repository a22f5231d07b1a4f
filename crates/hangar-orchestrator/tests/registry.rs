//! Host registry: enrollment tokens, credential secrecy, persistence across restarts.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hangar_core::EventBus;
use hangar_orchestrator::fake::{FakeHost, FakeHostSpec};
use hangar_orchestrator::*;

const SECRET: &str = "S3cr3t-Pa55w0rd-for-host";
const API_KEY: &str = "key-Zq9-very-secret-api-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enrollment_token_registers_exactly_one_host_under_concurrency() {
    let f = fleet(SchedulerConfig::default()).await;
    let issued = f.sched.registry().create_enrollment_token(&f.actor, "mac-07", None).await.unwrap();
    assert!(!format!("{issued:?}").contains(&issued.token), "Debug must not show the token");
    assert_eq!(issued.info.expires_at, t0() + chrono::Duration::minutes(15));
    let info = f.sched.registry().validate_enrollment_token(&issued.token).await.unwrap();
    assert_eq!(info.host_name, "mac-07");

    let mut joins = Vec::new();
    for i in 0..10 {
        let name = format!("joiner{i}");
        f.connector.add(&url(&name), FakeHost::new(FakeHostSpec::mac(8, 16_384, 100_000)));
        let sched = f.sched.clone();
        let token = issued.token.clone();
        joins.push(tokio::spawn(async move {
            sched
                .join_with_token(&token, RegisterHost { url: format!("http://{name}:8080"), ..Default::default() })
                .await
        }));
    }
    let mut ok = Vec::new();
    for j in joins {
        match j.await.unwrap() {
            Ok(h) => ok.push(h),
            Err(OrchestratorError::InvalidToken) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok.len(), 1, "exactly one join succeeds");
    assert_eq!(ok[0].name, "mac-07", "the host takes the token's name");
    assert_eq!(f.sched.registry().len(), 1);
    assert!(matches!(
        f.sched.registry().validate_enrollment_token(&issued.token).await,
        Err(OrchestratorError::InvalidToken)
    ));
    // The join is audited, with the token id (not the token).
    let dump = serde_json::to_string(&f.store.export().await.unwrap()).unwrap();
    assert!(dump.contains("orchestrator.host.join"));
    assert!(!dump.contains(&issued.token), "the token itself is never stored");
}

#[tokio::test]
async fn enrollment_tokens_expire_and_garbage_is_refused() {
    let f = fleet(SchedulerConfig::default()).await;
    let reg = f.sched.registry();
    let t = reg.create_enrollment_token(&f.actor, "h1", Some(Duration::from_secs(60))).await.unwrap();
    f.clock.advance(Duration::from_secs(61));
    f.connector.add(&url("h1"), FakeHost::new(FakeHostSpec::linux(4, 4096, 10_000)));
    let join = f.sched.join_with_token(&t.token, RegisterHost { url: "http://h1:8080".into(), ..Default::default() });
    assert!(matches!(join.await, Err(OrchestratorError::InvalidToken)));
    assert_eq!(reg.purge_expired_tokens().await.unwrap(), 1);
    for bad in ["", "hgr_enroll_nope", "random"] {
        assert!(matches!(reg.validate_enrollment_token(bad).await, Err(OrchestratorError::InvalidToken)));
    }
    assert!(reg.create_enrollment_token(&f.actor, "h1", Some(Duration::ZERO)).await.is_err());
    assert!(reg.create_enrollment_token(&f.actor, "bad name!", None).await.is_err());
}

#[tokio::test]
async fn credentials_never_appear_in_views_events_logs_or_the_store() {
    let f = fleet(SchedulerConfig::default()).await;
    let mut events = f.bus.subscribe();
    let fake = FakeHost::new(FakeHostSpec::linux(8, 16_384, 100_000));
    f.connector.add(&url("h1"), fake.clone());
    let req = RegisterHost {
        name: Some("h1".into()),
        url: "http://h1:8080".into(),
        credentials: Some(HostCredentials::Basic { username: "admin".into(), password: SECRET.into() }),
        ..Default::default()
    };
    assert!(!format!("{req:?}").contains(SECRET), "Debug of the request");
    let host = f.sched.register_host(&f.actor, req).await.unwrap();
    assert!(host.has_credentials);
    // The connector got the real credentials, opened from the sealed copy.
    f.sched.client(&host.id).await.unwrap();
    assert_eq!(
        f.connector.credentials_used(&url("h1")),
        Some(Some(HostCredentials::Basic { username: "admin".into(), password: SECRET.into() }))
    );
    f.sched
        .update_host(
            &f.actor,
            &host.id,
            UpdateHost { credentials: Some(HostCredentials::ApiKey { api_key: API_KEY.into() }), ..Default::default() },
        )
        .await
        .unwrap();
    f.sched.client(&host.id).await.unwrap();
    assert_eq!(
        f.connector.credentials_used(&url("h1")),
        Some(Some(HostCredentials::ApiKey { api_key: API_KEY.into() })),
        "an update drops the cached client"
    );
    f.sched.create_vm(Caller::System, &f.actor, linux_vm("a", 1, 512)).await.unwrap();

    let mut shown = Vec::new();
    for h in f.sched.registry().list() {
        shown.push(serde_json::to_string(&h).unwrap());
        shown.push(format!("{h:?}"));
    }
    shown.push(format!("{:?}", f.sched));
    shown.push(format!("{:?}", f.sched.registry().credentials(&host.id).unwrap()));
    while let Ok(e) = events.try_recv() {
        shown.push(serde_json::to_string(&e).unwrap());
    }
    let dump = serde_json::to_string(&f.store.export().await.unwrap()).unwrap();
    assert!(dump.contains("sealed_credentials"));
    shown.push(dump);
    for s in &shown {
        for secret in [SECRET, API_KEY] {
            assert!(!s.contains(secret), "secret leaked in: {s}");
        }
    }
    // Nor in any file of the data folder (store journal, snapshots).
    f.store.close().await.unwrap();
    let mut files = vec![f.dir.path().to_path_buf()];
    let mut checked = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&p).unwrap();
            for secret in [SECRET, API_KEY] {
                assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "secret in {}", p.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "store files and key file were checked");
}

#[tokio::test]
async fn hosts_survive_a_restart_with_their_credentials_and_start_unknown() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, _) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    f.sched.set_host_enabled(&f.actor, &h.id, false).await.unwrap();
    let dir = f.dir.path().to_path_buf();
    f.store.close().await.unwrap();
    drop(f.sched);

    let store: Arc<dyn hangar_store::Store> = Arc::new(
        hangar_store::JsonStore::open(dir.join("db"), hangar_store::JsonStoreOptions::default()).await.unwrap(),
    );
    let reg =
        HostRegistry::open(store.clone(), &dir, EventBus::default(), Arc::new(ManualClock::new(t0()))).await.unwrap();
    let back = reg.get("h0").unwrap();
    assert_eq!(back.id, h.id);
    assert!(!back.enabled);
    assert_eq!(back.state, HostState::Unknown, "not heard from since start-up");
    assert_eq!(back.resources, h.resources);
    assert_eq!(
        reg.credentials(&h.id).unwrap(),
        Some(HostCredentials::Basic { username: "admin".into(), password: "pw-h0".into() })
    );
    drop(reg);
    store.close().await.unwrap();

    // With another key, the sealed credentials do not open.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("secrets")).unwrap();
    std::fs::write(hangar_orchestrator::sealer::key_path(other.path()), [9u8; 32]).unwrap();
    let store: Arc<dyn hangar_store::Store> = Arc::new(
        hangar_store::JsonStore::open(dir.join("db"), hangar_store::JsonStoreOptions::default()).await.unwrap(),
    );
    let reg =
        HostRegistry::open(store, other.path(), EventBus::default(), Arc::new(ManualClock::new(t0()))).await.unwrap();
    assert!(reg.credentials(&h.id).is_err());
}

#[tokio::test]
async fn register_update_delete_are_audited_and_validated() {
    let f = fleet(SchedulerConfig::default()).await;
    let (h, _) = f.add_host("h0", FakeHostSpec::linux(8, 16_384, 100_000)).await;
    assert_eq!(h.url, "http://h0:8080/api", "default /api prefix");
    let up = f
        .sched
        .update_host(
            &f.actor,
            &h.id,
            UpdateHost {
                description: Some("rack 4".into()),
                tags: Some(["ci".to_string(), " gpu ".to_string()].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(up.tags, ["ci".to_string(), "gpu".to_string()].into());
    assert_eq!(up.state, HostState::Healthy, "an update keeps runtime status");
    assert!(
        f.sched.update_host(&f.actor, &h.id, UpdateHost { name: Some("".into()), ..Default::default() }).await.is_err()
    );
    f.sched.delete_host(&f.actor, &h.id).await.unwrap();
    assert!(matches!(f.sched.registry().get(&h.id), Err(OrchestratorError::NotFound { .. })));
    let dump = f.store.export().await.unwrap();
    let actions: Vec<String> =
        dump.collections["audit"].values().map(|v| v["action"].as_str().unwrap().to_string()).collect();
    for a in ["orchestrator.host.register", "orchestrator.host.update", "orchestrator.host.delete"] {
        assert!(actions.iter().any(|x| x == a), "missing audit {a}: {actions:?}");
    }
    assert!(dump.collections.get(hangar_orchestrator::HOSTS).is_none_or(|c| c.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_condition_alone_keeps_a_token_single_use() {
    // Two registries on one store do not share a write gate: only the batch's revision
    // condition stands between two joins with the same token.
    let f = fleet(SchedulerConfig::default()).await;
    let clock: Arc<dyn Clock> = Arc::new(f.clock.clone());
    let other = Arc::new(HostRegistry::open(f.store.clone(), f.dir.path(), EventBus::default(), clock).await.unwrap());
    let mine = f.sched.registry().clone();
    for round in 0..20 {
        let t = mine.create_enrollment_token(&f.actor, &format!("r{round}"), None).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let mut joins = Vec::new();
        for (i, reg) in [mine.clone(), other.clone()].into_iter().enumerate() {
            let (token, barrier) = (t.token.clone(), barrier.clone());
            joins.push(tokio::spawn(async move {
                barrier.wait().await;
                let req = RegisterHost {
                    name: Some(format!("r{round}-{i}")),
                    url: format!("http://r{round}-{i}:8080"),
                    ..Default::default()
                };
                reg.register_with_token(&token, req, None).await
            }));
        }
        let mut ok = 0;
        for j in joins {
            match j.await.unwrap() {
                Ok(_) => ok += 1,
                Err(OrchestratorError::InvalidToken) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(ok, 1, "round {round}");
    }
    let hosts = f.store.list(HOSTS).await.unwrap();
    assert_eq!(hosts.len(), 20);
}
