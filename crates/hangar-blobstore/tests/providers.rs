#![allow(clippy::unwrap_used)]
//! The conformance suite against every provider: the local folder always,
//! moto / Azurite / nginx-dav when their env vars are set
//! (`eval "$(scripts/test-services.sh start)"`).

use std::sync::Arc;

use bytes::Bytes;
use hangar_blobstore::conformance::{self, TestServer, unique_root};
use hangar_blobstore::{BlobError, BlobStore, local::LocalStore, open_connection_string};

#[tokio::test]
async fn local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn BlobStore> = Arc::new(LocalStore::new(dir.path()).unwrap());
    conformance::run(store, &unique_root("local")).await.unwrap();
    // Atomic writes leave no temp files behind.
    let tmp = std::fs::read_dir(dir.path().join(".hangar-tmp")).unwrap().count();
    assert_eq!(tmp, 0, "temp files left in .hangar-tmp");
}

#[tokio::test]
async fn local_store_via_connection_string_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let cs = format!("provider=local-storage;catalog_path={}", dir.path().display());
    let store = open_connection_string(&cs).unwrap();
    let prefixed: Arc<dyn BlobStore> = Arc::new(hangar_blobstore::PrefixedStore::new(store.clone(), "team/a").unwrap());
    conformance::run(prefixed.clone(), "suite").await.unwrap();
    prefixed.put("x/y", Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("team/a/x/y")).unwrap(), b"hello");
    assert_eq!(store.list("team").await.unwrap().len(), 1);
}

async fn server_conforms(server: TestServer) {
    let Some(cs) = server.connection_string() else {
        println!("{}", server.not_run_message("conformance"));
        return;
    };
    let store = open_connection_string(&cs).unwrap();
    if let Err(e) = conformance::run(store, &unique_root("conformance")).await {
        panic!("{server:?} failed the conformance suite: {e}\n{}", server.failure_hint());
    }
}

#[tokio::test]
async fn s3_conforms() {
    server_conforms(TestServer::S3).await;
}

#[tokio::test]
async fn azurite_conforms() {
    server_conforms(TestServer::Azurite).await;
}

#[tokio::test]
async fn artifactory_like_conforms() {
    server_conforms(TestServer::Artifactory).await;
}

#[tokio::test]
async fn artifactory_like_rejects_a_wrong_password() {
    let server = TestServer::Artifactory;
    let Some(cs) = server.connection_string() else {
        println!("{}", server.not_run_message("wrong password"));
        return;
    };
    let cs = cs.replace("password=", "password=wrong-");
    let store = open_connection_string(&cs).unwrap();
    match store.put("auth-check/x", Bytes::from_static(b"x")).await {
        Err(BlobError::Unauthorized { .. }) => {}
        other => panic!("expected Unauthorized, got {other:?}\n{}", server.failure_hint()),
    }
}

#[tokio::test]
async fn s3_missing_bucket_is_an_error() {
    let server = TestServer::S3;
    let Some(cs) = server.connection_string() else {
        println!("{}", server.not_run_message("missing bucket"));
        return;
    };
    let cs = cs.replace("bucket=", "bucket=no-such-bucket-");
    let store = open_connection_string(&cs).unwrap();
    let err = store.put("x", Bytes::from_static(b"x")).await;
    assert!(err.is_err(), "put into a missing bucket succeeded");
}
