//! The behaviour every [`BlobStore`] must show, as one async suite.
//!
//! Run it against a store with [`run`]; all keys it writes are under a
//! caller-chosen folder, deleted at the end when the suite passes. A failure
//! is returned as a message naming the check that failed.

use std::sync::Arc;

use bytes::Bytes;

use crate::{BlobError, BlobStore, MULTIPART_THRESHOLD};

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn ok<T>(what: &str, r: crate::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Runs every check against `store`, writing only under `root/`.
pub async fn run(store: Arc<dyn BlobStore>, root: &str) -> Result<(), String> {
    let s = store.as_ref();
    let k = |name: &str| format!("{root}/{name}");
    let provider = s.provider();

    // Put, get, head.
    let small = Bytes::from(pattern(1000, 1));
    ok("put small", s.put(&k("a/small"), small.clone()).await)?;
    let got = ok("get small", s.get(&k("a/small")).await)?;
    ensure!(got == small, "{provider}: get returned different bytes than put");
    let head = ok("head small", s.head(&k("a/small")).await)?;
    ensure!(head.as_ref().map(|h| h.size) == Some(1000), "{provider}: head of a 1000-byte object gave {head:?}");

    // Missing objects.
    let missing = k("a/missing");
    ensure!(ok("head missing", s.head(&missing).await)?.is_none(), "{provider}: head of a missing key is not None");
    match s.get(&missing).await {
        Err(BlobError::NotFound { .. }) => {}
        other => return Err(format!("{provider}: get of a missing key gave {other:?}")),
    }
    ok("delete missing", s.delete(&missing).await)?;

    // Overwrite replaces the whole object.
    ok("overwrite", s.put(&k("a/small"), Bytes::from_static(b"short")).await)?;
    let got = ok("get overwritten", s.get(&k("a/small")).await)?;
    ensure!(&got[..] == b"short", "{provider}: overwrite left {} bytes", got.len());

    // Ranged reads.
    let data = Bytes::from(pattern(10_000, 2));
    ok("put ranged", s.put(&k("r/obj"), data.clone()).await)?;
    let mid = ok("get_range middle", s.get_range(&k("r/obj"), 1000..1010).await)?;
    ensure!(mid == data.slice(1000..1010), "{provider}: ranged read 1000..1010 wrong");
    let tail = ok("get_range past end", s.get_range(&k("r/obj"), 9990..20_000).await)?;
    ensure!(tail == data.slice(9990..), "{provider}: range past the end not clamped (got {} bytes)", tail.len());
    match s.get_range(&k("r/obj"), 10_000..10_010).await {
        Err(BlobError::InvalidRange { .. }) => {}
        other => {
            return Err(format!("{provider}: range starting at the end gave {other:?}"));
        }
    }
    match s.get_range(&missing, 0..10).await {
        Err(BlobError::NotFound { .. }) => {}
        other => return Err(format!("{provider}: range of a missing key gave {other:?}")),
    }

    // Empty objects.
    ok("put empty", s.put(&k("e/empty"), Bytes::new()).await)?;
    ensure!(ok("get empty", s.get(&k("e/empty")).await)?.is_empty(), "{provider}: empty object not empty");
    ensure!(
        ok("head empty", s.head(&k("e/empty")).await)?.map(|h| h.size) == Some(0),
        "{provider}: head of an empty object"
    );

    // Listing with prefixes.
    for name in ["l/p/a", "l/p/b/c", "l/pp/x"] {
        ok("put for list", s.put(&k(name), Bytes::from(name.as_bytes().to_vec())).await)?;
    }
    let listed = ok("list", s.list(&k("l/p")).await)?;
    let keys: Vec<_> = listed.iter().map(|o| o.key.clone()).collect();
    ensure!(keys == vec![k("l/p/a"), k("l/p/b/c")], "{provider}: list({}) gave {keys:?}", k("l/p"));
    ensure!(
        listed.iter().all(|o| o.size == o.key.len() as u64 - root.len() as u64 - 1),
        "{provider}: list sizes wrong: {listed:?}"
    );
    let with_slash = ok("list with slash", s.list(&format!("{}/", k("l/p"))).await)?;
    ensure!(with_slash == listed, "{provider}: list with a trailing '/' differs");
    ensure!(ok("list none", s.list(&k("nothing")).await)?.is_empty(), "{provider}: list of an empty prefix not empty");

    // Invalid keys are refused before any request.
    match s.put("../escape", Bytes::from_static(b"x")).await {
        Err(BlobError::InvalidKey { .. }) => {}
        other => return Err(format!("{provider}: key '../escape' gave {other:?}")),
    }

    // Files, small and multipart-sized.
    let dir = std::env::temp_dir().join(format!("hangar-conformance-{}", uuid::Uuid::new_v4().simple()));
    ok(
        "tempdir",
        std::fs::create_dir_all(&dir).map_err(|e| BlobError::Io {
            op: "mkdir",
            key: dir.display().to_string(),
            source: e,
        }),
    )?;
    let result = files(s, &k, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;

    // Concurrent puts of distinct keys.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let st = store.clone();
        let key = k(&format!("c/{i}"));
        tasks.push(tokio::spawn(async move { st.put(&key, Bytes::from(pattern(50_000, i + 100))).await }));
    }
    for t in tasks {
        let joined = t.await.map_err(|e| format!("{provider}: put task failed: {e}"))?;
        ok("concurrent put", joined)?;
    }
    for i in 0..16u64 {
        let got = ok("get concurrent", s.get(&k(&format!("c/{i}"))).await)?;
        ensure!(got[..] == pattern(50_000, i + 100)[..], "{provider}: concurrent object {i} corrupted");
    }

    // Delete, then clean everything up.
    ok("delete", s.delete(&k("a/small")).await)?;
    ensure!(ok("head deleted", s.head(&k("a/small")).await)?.is_none(), "{provider}: object still there after delete");
    let all = ok("list all", s.list(root).await)?;
    ensure!(!all.iter().any(|o| o.key == k("a/small")), "{provider}: deleted object still listed");
    ensure!(all.len() == 23, "{provider}: expected 23 objects under {root}, listed {}", all.len());
    for o in all {
        ok("cleanup", s.delete(&o.key).await)?;
    }
    ensure!(ok("list after cleanup", s.list(root).await)?.is_empty(), "{provider}: objects left after deleting all");
    Ok(())
}

async fn files(s: &dyn BlobStore, k: &dyn Fn(&str) -> String, dir: &std::path::Path) -> Result<(), String> {
    let provider = s.provider();
    let io = |e: std::io::Error| format!("temp file: {e}");
    let small = dir.join("small");
    std::fs::write(&small, pattern(5000, 3)).map_err(io)?;
    let n = ok("put_file small", s.put_file(&k("f/small"), &small).await)?;
    ensure!(n == 5000, "{provider}: put_file reported {n} bytes");
    let got = ok("get file small", s.get(&k("f/small")).await)?;
    ensure!(got[..] == pattern(5000, 3)[..], "{provider}: put_file small content differs");

    let big_len = usize::try_from(MULTIPART_THRESHOLD).unwrap_or(usize::MAX) + 3 * 1024 * 1024 + 17;
    let big_data = pattern(big_len, 4);
    let big = dir.join("big");
    std::fs::write(&big, &big_data).map_err(io)?;
    let n = ok("put_file big", s.put_file(&k("f/big"), &big).await)?;
    ensure!(n == big_len as u64, "{provider}: put_file big reported {n}");
    let head = ok("head big", s.head(&k("f/big")).await)?;
    ensure!(head.map(|h| h.size) == Some(big_len as u64), "{provider}: big object size wrong");
    let got = ok("get big", s.get(&k("f/big")).await)?;
    ensure!(blake3::hash(&got) == blake3::hash(&big_data), "{provider}: multipart object content differs");
    let at = (big_len - 100) as u64;
    let part = ok("get_range big", s.get_range(&k("f/big"), at..at + 50).await)?;
    ensure!(part[..] == big_data[big_len - 100..big_len - 50], "{provider}: ranged read in the last part wrong");
    Ok(())
}

/// The servers the test suites can run against, each named by an env var
/// that `scripts/test-services.sh env` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestServer {
    /// S3 (moto): `HANGAR_TEST_S3_ENDPOINT` (+ `HANGAR_TEST_S3_BUCKET`).
    S3,
    /// Azure Blob (Azurite): `HANGAR_TEST_AZURITE_ENDPOINT` (+ `_CONTAINER`).
    Azurite,
    /// Artifactory-like HTTP store: `HANGAR_TEST_ARTIFACTORY_URL` (+ `_REPO`,
    /// `_USER`, `_PASSWORD`).
    Artifactory,
}

impl TestServer {
    /// Every test server.
    pub const ALL: [TestServer; 3] = [TestServer::S3, TestServer::Azurite, TestServer::Artifactory];

    /// The env var whose presence turns the server's tests on.
    pub fn env_var(self) -> &'static str {
        match self {
            TestServer::S3 => "HANGAR_TEST_S3_ENDPOINT",
            TestServer::Azurite => "HANGAR_TEST_AZURITE_ENDPOINT",
            TestServer::Artifactory => "HANGAR_TEST_ARTIFACTORY_URL",
        }
    }

    /// The connection string for the server from the environment, or `None`
    /// when its env var is unset (the caller then reports that the test did
    /// not run; when it is set, an unreachable server must fail the test).
    pub fn connection_string(self) -> Option<String> {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let endpoint = std::env::var(self.env_var()).ok().filter(|v| !v.is_empty())?;
        Some(match self {
            TestServer::S3 => format!(
                "provider=minio;endpoint={endpoint};bucket={};region=us-east-1;access_key=testing;secret_key=testing",
                var("HANGAR_TEST_S3_BUCKET", "hangar-test")
            ),
            TestServer::Azurite => format!(
                "provider=azure-storage-account;storage_account_name=devstoreaccount1;storage_account_key={};container_name={};endpoint={endpoint}",
                // Azurite's well-known development key (public, not a secret).
                "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==",
                var("HANGAR_TEST_AZURITE_CONTAINER", "hangar-test")
            ),
            TestServer::Artifactory => format!(
                "provider=artifactory;url={endpoint};repo={};username={};password={}",
                var("HANGAR_TEST_ARTIFACTORY_REPO", "generic-local"),
                var("HANGAR_TEST_ARTIFACTORY_USER", "hangar"),
                var("HANGAR_TEST_ARTIFACTORY_PASSWORD", "hangar-test-pw")
            ),
        })
    }

    /// The message a test prints when it did not run against this server.
    pub fn not_run_message(self, test: &str) -> String {
        format!(
            "NOT RUN: {test} against {self:?}: {} is not set (run `eval \"$(scripts/test-services.sh start)\"` to start moto, Azurite and nginx-dav and set it)",
            self.env_var()
        )
    }

    /// The hint added to a failure against this server.
    pub fn failure_hint(self) -> String {
        format!(
            "{}={:?} is set, so this server must answer; start it with `scripts/test-services.sh start`",
            self.env_var(),
            std::env::var(self.env_var()).unwrap_or_default()
        )
    }
}

/// A fresh folder name for one test run, so runs never see each other.
pub fn unique_root(test: &str) -> String {
    format!("test-{test}-{}", uuid::Uuid::new_v4().simple())
}
