//! S3, S3-compatible and Azure Blob stores through the `object_store` crate.

use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;
use tracing::instrument;

use crate::config::{AzureConfig, ConfigError, S3Config, S3Flavor};
use crate::{
    BlobError, BlobStore, MULTIPART_CONCURRENCY, MULTIPART_PART_SIZE, MULTIPART_THRESHOLD, ObjectInfo, Result,
    clamp_range, validate_key, validate_prefix,
};

/// A [`BlobStore`] over any `object_store` implementation.
#[derive(Debug, Clone)]
pub struct ObjectStoreBlobStore {
    inner: Arc<dyn ObjectStore>,
    provider: &'static str,
}

impl ObjectStoreBlobStore {
    /// Wraps an existing `object_store` client.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, provider: &'static str) -> Self {
        ObjectStoreBlobStore { inner, provider }
    }

    /// Builds an S3 (or S3-compatible, path-style) store.
    pub fn s3(c: &S3Config) -> Result<Self> {
        let provider = match c.flavor {
            S3Flavor::Aws => "aws-s3",
            S3Flavor::Minio => "minio",
        };
        let mut b = if c.use_environment_authentication { AmazonS3Builder::from_env() } else { AmazonS3Builder::new() };
        b = b.with_bucket_name(&c.bucket).with_region(&c.region);
        // Servers commonly drop idle keep-alive connections after about 5 s (Node-based ones
        // such as Azurite do); reusing one that is being closed fails the request. Stay below.
        let mut opts = ClientOptions::new().with_pool_idle_timeout(std::time::Duration::from_secs(3));
        if let Some(endpoint) = &c.endpoint {
            b = b.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                opts = opts.with_allow_http(true);
            }
        }
        if c.ignore_cert {
            opts = opts.with_allow_invalid_certificates(true);
        }
        if let Some(k) = &c.access_key {
            b = b.with_access_key_id(k.expose());
        }
        if let Some(k) = &c.secret_key {
            b = b.with_secret_access_key(k.expose());
        }
        if let Some(t) = &c.session_token {
            b = b.with_token(t.expose());
        }
        let store = b
            .with_client_options(opts)
            .build()
            .map_err(|e| ConfigError::Client { provider, message: e.to_string() })?;
        Ok(Self::from_object_store(Arc::new(store), provider))
    }

    /// Builds an Azure Blob Storage store.
    pub fn azure(c: &AzureConfig) -> Result<Self> {
        let provider = "azure-storage-account";
        let mut b = MicrosoftAzureBuilder::new()
            .with_account(&c.account_name)
            .with_access_key(c.account_key.expose())
            .with_container_name(&c.container_name);
        // Servers commonly drop idle keep-alive connections after about 5 s (Node-based ones
        // such as Azurite do); reusing one that is being closed fails the request. Stay below.
        let mut opts = ClientOptions::new().with_pool_idle_timeout(std::time::Duration::from_secs(3));
        if let Some(endpoint) = &c.endpoint {
            b = b.with_endpoint(endpoint.clone());
            if endpoint.starts_with("http://") {
                opts = opts.with_allow_http(true);
            }
        }
        let store = b
            .with_client_options(opts)
            .build()
            .map_err(|e| ConfigError::Client { provider, message: e.to_string() })?;
        Ok(Self::from_object_store(Arc::new(store), provider))
    }

    fn path(key: &str) -> Result<Path> {
        validate_key(key)?;
        Ok(Path::from(key))
    }

    fn map_err(&self, op: &'static str, key: &str, e: object_store::Error) -> BlobError {
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound { key: key.to_string() },
            object_store::Error::Unauthenticated { source, .. }
            | object_store::Error::PermissionDenied { source, .. } => BlobError::Unauthorized {
                provider: self.provider,
                op,
                key: key.to_string(),
                message: source.to_string(),
            },
            other => {
                BlobError::Backend { provider: self.provider, op, key: key.to_string(), message: other.to_string() }
            }
        }
    }
}

#[async_trait]
impl BlobStore for ObjectStoreBlobStore {
    fn provider(&self) -> &'static str {
        self.provider
    }

    #[instrument(skip(self, data), fields(provider = self.provider, len = data.len()))]
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = Self::path(key)?;
        self.inner.put(&path, PutPayload::from(data)).await.map_err(|e| self.map_err("put", key, e))?;
        Ok(())
    }

    #[instrument(skip(self), fields(provider = self.provider))]
    async fn put_file(&self, key: &str, path: &FsPath) -> Result<u64> {
        let location = Self::path(key)?;
        let io = |source| BlobError::Io { op: "put_file", key: path.display().to_string(), source };
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        if size < MULTIPART_THRESHOLD {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut buf).await.map_err(io)?;
            let n = buf.len() as u64;
            self.put(key, Bytes::from(buf)).await?;
            return Ok(n);
        }
        let upload = self.inner.put_multipart(&location).await.map_err(|e| self.map_err("put_file", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_SIZE);
        let mut total = 0u64;
        let mut buf = vec![0u8; MULTIPART_PART_SIZE];
        loop {
            if let Err(e) = writer.wait_for_capacity(MULTIPART_CONCURRENCY).await {
                let _ = writer.abort().await;
                return Err(self.map_err("put_file", key, e));
            }
            let n = match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(io(e));
                }
            };
            writer.write(&buf[..n]);
            total += n as u64;
        }
        writer.finish().await.map_err(|e| self.map_err("put_file", key, e))?;
        Ok(total)
    }

    #[instrument(skip(self), fields(provider = self.provider))]
    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = Self::path(key)?;
        let result = self.inner.get(&path).await.map_err(|e| self.map_err("get", key, e))?;
        result.bytes().await.map_err(|e| self.map_err("get", key, e))
    }

    #[instrument(skip(self), fields(provider = self.provider))]
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = Self::path(key)?;
        if range.start >= range.end {
            return Err(BlobError::InvalidRange { key: key.to_string(), start: range.start, end: range.end, size: 0 });
        }
        // object_store rejects ranges past the end; clamp against the size
        // like an HTTP server would.
        let size = match self.inner.head(&path).await {
            Ok(meta) => meta.size,
            Err(e) => return Err(self.map_err("get_range", key, e)),
        };
        let r = clamp_range(key, &range, size)?;
        self.inner.get_range(&path, r).await.map_err(|e| self.map_err("get_range", key, e))
    }

    #[instrument(skip(self), fields(provider = self.provider))]
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = Self::path(key)?;
        match self.inner.head(&path).await {
            Ok(meta) => Ok(Some(ObjectInfo { key: key.to_string(), size: meta.size })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.map_err("head", key, e)),
        }
    }

    #[instrument(skip(self), fields(provider = self.provider))]
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        validate_prefix(prefix)?;
        let trimmed = prefix.trim_end_matches('/');
        let p = Path::from(trimmed);
        let prefix_path = if trimmed.is_empty() { None } else { Some(&p) };
        let metas: Vec<_> =
            self.inner.list(prefix_path).try_collect().await.map_err(|e| self.map_err("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> =
            metas.into_iter().map(|m| ObjectInfo { key: m.location.to_string(), size: m.size }).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    #[instrument(skip(self), fields(provider = self.provider))]
    async fn delete(&self, key: &str) -> Result<()> {
        let path = Self::path(key)?;
        // Delete is idempotent, and some backends send it as a non-retried POST (Azure's
        // batch delete), so a dropped connection is retried here.
        let mut attempt = 0;
        loop {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(object_store::Error::Generic { .. }) if attempt < 2 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(self.map_err("delete", key, e)),
            }
        }
    }
}
