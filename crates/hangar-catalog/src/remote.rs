//! Pulling through a catalog server: a read-only [`BlobStore`] that serves
//! an image's manifest from a pull answer and fetches its chunks from the
//! server's chunk route (`GET {catalog}/{id}/{version}/{arch}/chunks/{hash}`),
//! which checks the caller's access on every request. Hand it to
//! [`hangar_image::pull`]; the puller never sees provider credentials.

use std::ops::Range;
use std::path::Path;

use async_trait::async_trait;
pub use bytes::Bytes;
use hangar_blobstore::{BlobError, BlobStore, ObjectInfo};
use hangar_image::manifest::{CHUNK_PREFIX, PACK_PREFIX};

const PROVIDER: &str = "hangar-catalog";

/// How requests to the server authenticate.
#[derive(Clone)]
pub enum RemoteAuth {
    /// No credentials.
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `X-Api-Key: <base64(KEY:SECRET)>`.
    ApiKey(String),
}

impl std::fmt::Debug for RemoteAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteAuth::None => "None",
            RemoteAuth::Bearer(_) => "Bearer(****)",
            RemoteAuth::ApiKey(_) => "ApiKey(****)",
        })
    }
}

impl RemoteAuth {
    /// Adds the credentials to a request.
    pub fn apply(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            RemoteAuth::None => r,
            RemoteAuth::Bearer(t) => r.bearer_auth(t),
            RemoteAuth::ApiKey(k) => r.header("X-Api-Key", k),
        }
    }
}

/// Percent-encodes one path segment.
pub use hangar_core::path_segment as segment;

/// A read-only store over one catalog entry on a server.
#[derive(Debug)]
pub struct RemoteImageStore {
    http: reqwest::Client,
    entry_url: String,
    auth: RemoteAuth,
    manifest_key: String,
    manifest: Bytes,
}

impl RemoteImageStore {
    /// `api_base` is the server's API root (`http://host:port/api/v1`);
    /// the entry is `(catalog id, version, architecture)`; `manifest` is the
    /// image manifest from the pull answer, served at `manifest_key`.
    pub fn new(
        http: reqwest::Client,
        api_base: &str,
        auth: RemoteAuth,
        (catalog_id, version, architecture): (&str, &str, &str),
        manifest_key: &str,
        manifest: Bytes,
    ) -> Self {
        let entry_url = format!(
            "{}/catalog/{}/{}/{}",
            api_base.trim_end_matches('/'),
            segment(catalog_id),
            segment(version),
            segment(architecture)
        );
        RemoteImageStore { http, entry_url, auth, manifest_key: manifest_key.to_string(), manifest }
    }

    fn read_only(op: &'static str, key: &str) -> BlobError {
        BlobError::Backend {
            provider: PROVIDER,
            op,
            key: key.to_string(),
            message: "a catalog server is read-only for pulls".into(),
        }
    }

    /// A chunk (`chunks/<hash>`, whole) or a range of a pack (`packs/<id>`, format 2) through
    /// the server's routes for them.
    async fn fetch(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, BlobError> {
        let in_dir = |dir: &str| key.strip_prefix(dir).and_then(|r| r.strip_prefix('/'));
        let (url, range) = if let Some(hash) = in_dir(CHUNK_PREFIX) {
            (format!("{}/chunks/{}", self.entry_url, segment(hash)), None)
        } else if let (Some(pack), Some(r)) = (in_dir(PACK_PREFIX), range) {
            (format!("{}/packs/{}", self.entry_url, segment(pack)), Some(r))
        } else {
            return Err(BlobError::NotFound { key: key.to_string() });
        };
        let backend =
            |message: String| BlobError::Backend { provider: PROVIDER, op: "get", key: key.to_string(), message };
        let mut req = self.auth.apply(self.http.get(&url));
        if let Some(r) = range.as_ref().filter(|r| r.end > r.start) {
            req = req.header(reqwest::header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
        }
        let resp = req.send().await.map_err(|e| backend(format!("{url}: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return resp.bytes().await.map_err(|e| backend(e.to_string()));
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or(text);
        match status.as_u16() {
            404 => Err(BlobError::NotFound { key: key.to_string() }),
            401 | 403 => Err(BlobError::Unauthorized { provider: PROVIDER, op: "get", key: key.to_string(), message }),
            s => Err(backend(format!("HTTP {s}: {message}"))),
        }
    }
}

#[async_trait]
impl BlobStore for RemoteImageStore {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    async fn put(&self, key: &str, _data: Bytes) -> hangar_blobstore::Result<()> {
        Err(Self::read_only("put", key))
    }

    async fn put_file(&self, key: &str, _path: &Path) -> hangar_blobstore::Result<u64> {
        Err(Self::read_only("put", key))
    }

    async fn get(&self, key: &str) -> hangar_blobstore::Result<Bytes> {
        if key == self.manifest_key {
            return Ok(self.manifest.clone());
        }
        self.fetch(key, None).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> hangar_blobstore::Result<Bytes> {
        if key.starts_with(PACK_PREFIX) {
            return self.fetch(key, Some(range)).await;
        }
        let all = self.get(key).await?;
        let r = hangar_blobstore::clamp_range(key, &range, all.len() as u64)?;
        let (s, e) = (usize::try_from(r.start).unwrap_or(usize::MAX), usize::try_from(r.end).unwrap_or(usize::MAX));
        Ok(all.slice(s..e))
    }

    async fn head(&self, key: &str) -> hangar_blobstore::Result<Option<ObjectInfo>> {
        match self.get(key).await {
            Ok(b) => Ok(Some(ObjectInfo { key: key.to_string(), size: b.len() as u64 })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, _prefix: &str) -> hangar_blobstore::Result<Vec<ObjectInfo>> {
        Ok(Vec::new())
    }

    async fn delete(&self, key: &str) -> hangar_blobstore::Result<()> {
        Err(Self::read_only("delete", key))
    }
}
