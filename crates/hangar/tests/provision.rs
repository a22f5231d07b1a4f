//! A VM from a catalog image (`hangar_provision`), by every route that makes one: every
//! refusal comes before any work on `POST /machines[/async]` with a `catalog_manifest` as on
//! `PUT /catalog/pull[/async]`: a bad VM name or an owner the caller may not name fills no
//! cache, starts no job and makes no VM; then a good request makes the VM from the cache.
//! VMs are made on the fake Parallels host.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

async fn api(c: &reqwest::Client, s: &Server, m: Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    call(c, m, &s.api(path), &Auth::Bearer(token.into()), body, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_vm_from_a_catalog_image_fills_no_cache_on_any_route() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeParallels::new(dir.path());
    let s = fake.server(&dir.path().join("data"), &[]);
    let c = client();
    let root = login(&c, &s, "root", ROOT_PASSWORD).await;
    push_bundle(&s, &root, dir.path(), &fake.images.join("golden.pvm"), "golden");
    let (uid, user) = make_user(&c, &s, &root, "maker").await;
    for claim in ["PULL_CATALOG_MANIFEST", "CREATE_VM"] {
        let (st, v) =
            api(&c, &s, Method::POST, &format!("/auth/users/{uid}/claims"), &root, Some(json!({"name": claim}))).await;
        assert_eq!(st, 201, "{v}");
    }
    let manifest = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64"});
    let create = |name: &str, owner: Option<&str>| {
        let mut b = json!({"name": name, "catalog_manifest": manifest});
        if let Some(o) = owner {
            b["owner"] = json!(o);
        }
        b
    };
    let pull = |name: &str, owner: Option<&str>| {
        let mut b = json!({"catalog_id": "golden", "version": "1.0.0", "architecture": "x86_64", "machine_name": name});
        if let Some(o) = owner {
            b["owner"] = json!(o);
        }
        b
    };
    let cache_len = || {
        let (c, s, root) = (c.clone(), &s, root.clone());
        async move {
            let (st, cache) = api(&c, s, Method::GET, "/catalog/cache", &root, None).await;
            assert_eq!(st, 200, "{cache}");
            cache["manifests"].as_array().map(Vec::len).unwrap()
        }
    };

    for (method, path) in [(Method::POST, "/machines"), (Method::POST, "/machines/async")] {
        // A name the host refuses: 400 from the root too.
        let (st, v) = api(&c, &s, method.clone(), path, &root, Some(create("bad/name", None))).await;
        assert_eq!((st, v["code"].as_u64()), (400, Some(400)), "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains("is invalid"), "{path}: {v}");
        // Another owner than the caller, not a SUPER_USER: 403.
        let (st, v) = api(&c, &s, method.clone(), path, &user, Some(create("for-root", Some("root")))).await;
        assert_eq!((st, v["code"].as_u64()), (403, Some(403)), "{path}: {v}");
    }
    for path in ["/catalog/pull", "/catalog/pull/async"] {
        let (st, v) = api(&c, &s, Method::PUT, path, &root, Some(pull(".hidden", None))).await;
        assert_eq!((st, v["code"].as_u64()), (400, Some(400)), "{path}: {v}");
        let (st, v) = api(&c, &s, Method::PUT, path, &user, Some(pull("for-root", Some("root")))).await;
        assert_eq!((st, v["code"].as_u64()), (403, Some(403)), "{path}: {v}");
    }
    assert_eq!(cache_len().await, 0, "a refused request pulls nothing");
    let (_, jobs) = api(&c, &s, Method::GET, "/jobs", &root, None).await;
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "a refused request starts no job: {jobs}");
    let (_, list) = api(&c, &s, Method::GET, "/machines", &root, None).await;
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

    // The same requests, well formed: the image comes through the cache into the VMs.
    let (st, v) = api(&c, &s, Method::POST, "/machines", &user, Some(create("made-1", None))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["owner"], "maker", "{v}");
    assert_eq!(cache_len().await, 1);
    let (st, v) = api(&c, &s, Method::PUT, "/catalog/pull", &user, Some(pull("made-2", None))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["catalog_id"].as_str(), v["version"].as_str()), (Some("golden"), Some("1.0.0")), "{v}");
    assert_eq!(v["machine_name"], "made-2", "{v}");
    let (_, list) = api(&c, &s, Method::GET, "/machines", &root, None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}
