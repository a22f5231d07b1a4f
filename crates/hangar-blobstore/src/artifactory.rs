//! An Artifactory generic repository over plain HTTP (`reqwest`).
//!
//! * PUT `{url}/{repo}/{key}` with `X-Checksum-Sha256` and `X-Checksum-Sha1`
//!   headers (Artifactory verifies them and rejects a corrupted upload);
//! * GET with `Range`, HEAD, DELETE;
//! * auth: basic (`username`/`password`), `X-JFrog-Art-Api` (legacy API key)
//!   or a bearer access token (see [`crate::config::ArtifactoryAuth`]);
//! * list: Artifactory's File List API (`/api/storage/{repo}/{path}?list&deep=1`)
//!   when `/api/system/ping` answers `OK`, otherwise WebDAV `PROPFIND`
//!   (`Depth: 1`, walked recursively), which Artifactory and plain DAV
//!   servers (nginx `dav_ext`, wsgidav) both speak.

use std::ops::Range;
use std::path::Path;

use async_trait::async_trait;
use aws_lc_rs::digest;
use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use tokio::sync::OnceCell;
use tracing::instrument;

use crate::config::{ArtifactoryAuth, ArtifactoryConfig, ConfigError};
use crate::{BlobError, BlobStore, ObjectInfo, Result, clamp_range, validate_key, validate_prefix};

const PROVIDER: &str = "artifactory";

/// How the server lists folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListMode {
    StorageApi,
    WebDav,
}

/// A [`BlobStore`] over an Artifactory generic repository.
#[derive(Debug)]
pub struct ArtifactoryStore {
    client: reqwest::Client,
    base: String,
    repo_base: reqwest::Url,
    repo: String,
    auth: ArtifactoryAuth,
    list_mode: OnceCell<ListMode>,
}

fn backend(op: &'static str, key: &str, message: impl Into<String>) -> BlobError {
    BlobError::Backend { provider: PROVIDER, op, key: key.to_string(), message: message.into() }
}

/// SHA-256 and SHA-1 of `data`, hex encoded.
fn checksums(data: &[u8]) -> (String, String) {
    (
        hex::encode(digest::digest(&digest::SHA256, data)),
        hex::encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, data)),
    )
}

impl ArtifactoryStore {
    /// Builds a client for the configured repository.
    pub fn new(c: &ArtifactoryConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(15))
            .danger_accept_invalid_certs(c.ignore_cert)
            .build()
            .map_err(|e| ConfigError::Client { provider: PROVIDER, message: e.to_string() })?;
        let repo_base = reqwest::Url::parse(&format!("{}/{}/", c.url, c.repo))
            .map_err(|e| ConfigError::InvalidValue { key: "url", reason: e.to_string() })?;
        Ok(ArtifactoryStore {
            client,
            base: c.url.clone(),
            repo_base,
            repo: c.repo.clone(),
            auth: c.auth.clone(),
            list_mode: OnceCell::new(),
        })
    }

    fn url(&self, key: &str) -> Result<reqwest::Url> {
        validate_key(key)?;
        self.repo_base.join(key).map_err(|e| backend("url", key, e.to_string()))
    }

    fn request(&self, method: Method, url: reqwest::Url) -> RequestBuilder {
        let rb = self.client.request(method, url);
        match &self.auth {
            ArtifactoryAuth::None => rb,
            ArtifactoryAuth::Basic { username, password } => rb.basic_auth(username, Some(password.expose())),
            ArtifactoryAuth::ApiKey(k) => rb.header("X-JFrog-Art-Api", k.expose()),
            ArtifactoryAuth::Bearer(t) => rb.bearer_auth(t.expose()),
        }
    }

    async fn send(&self, op: &'static str, key: &str, rb: RequestBuilder) -> Result<Response> {
        rb.send().await.map_err(|e| backend(op, key, format!("request failed: {e}")))
    }

    /// Turns a non-success status into the matching error.
    async fn check(&self, op: &'static str, key: &str, resp: Response) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let snippet: String = body.chars().take(300).collect();
        Err(match status {
            StatusCode::NOT_FOUND => BlobError::NotFound { key: key.to_string() },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => BlobError::Unauthorized {
                provider: PROVIDER,
                op,
                key: key.to_string(),
                message: format!("HTTP {status}: {snippet}"),
            },
            _ => backend(op, key, format!("HTTP {status}: {snippet}")),
        })
    }

    async fn list_mode(&self) -> ListMode {
        *self
            .list_mode
            .get_or_init(|| async {
                let url = format!("{}/api/system/ping", self.base);
                let Ok(url) = reqwest::Url::parse(&url) else {
                    return ListMode::WebDav;
                };
                match self.request(Method::GET, url).send().await {
                    Ok(r) if r.status().is_success() => match r.text().await {
                        Ok(t) if t.trim() == "OK" => ListMode::StorageApi,
                        _ => ListMode::WebDav,
                    },
                    _ => ListMode::WebDav,
                }
            })
            .await
    }

    async fn list_storage_api(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let url = format!("{}/api/storage/{}/{}?list&deep=1&listFolders=0", self.base, self.repo, prefix);
        let url = reqwest::Url::parse(&url).map_err(|e| backend("list", prefix, e.to_string()))?;
        let resp = self.send("list", prefix, self.request(Method::GET, url)).await?;
        let resp = match self.check("list", prefix, resp).await {
            Err(BlobError::NotFound { .. }) => return Ok(Vec::new()),
            other => other?,
        };
        let body = resp.bytes().await.map_err(|e| backend("list", prefix, e.to_string()))?;
        parse_file_list(prefix, &body)
    }

    async fn list_webdav(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let base_path = self.repo_base.path().to_string();
        let mut out = Vec::new();
        let mut folders = vec![if prefix.is_empty() { String::new() } else { format!("{prefix}/") }];
        let propfind = Method::from_bytes(b"PROPFIND").map_err(|e| backend("list", prefix, e.to_string()))?;
        while let Some(folder) = folders.pop() {
            let url = self.repo_base.join(&folder).map_err(|e| backend("list", &folder, e.to_string()))?;
            let rb = self
                .request(propfind.clone(), url)
                .header("Depth", "1")
                .header(header::CONTENT_TYPE, "application/xml")
                .body(
                    r#"<?xml version="1.0" encoding="utf-8"?><propfind xmlns="DAV:"><prop><resourcetype/><getcontentlength/></prop></propfind>"#,
                );
            let resp = self.send("list", &folder, rb).await?;
            let resp = match self.check("list", &folder, resp).await {
                Err(BlobError::NotFound { .. }) => continue,
                other => other?,
            };
            let body = resp.text().await.map_err(|e| backend("list", &folder, e.to_string()))?;
            for entry in parse_multistatus(&body).map_err(|m| backend("list", &folder, m))? {
                let Some(rel) = entry.path.strip_prefix(&base_path) else {
                    continue;
                };
                let rel = rel.trim_end_matches('/');
                if rel.is_empty() || rel == folder.trim_end_matches('/') {
                    continue;
                }
                if validate_key(rel).is_err() {
                    continue;
                }
                if entry.is_dir {
                    folders.push(format!("{rel}/"));
                } else {
                    out.push(ObjectInfo { key: rel.to_string(), size: entry.size });
                }
            }
        }
        Ok(out)
    }

    async fn put_body(&self, key: &str, body: reqwest::Body, len: u64, sums: (String, String)) -> Result<()> {
        let url = self.url(key)?;
        let rb = self
            .request(Method::PUT, url)
            .header("X-Checksum-Sha256", sums.0)
            .header("X-Checksum-Sha1", sums.1)
            .header(header::CONTENT_LENGTH, len)
            .body(body);
        let resp = self.send("put", key, rb).await?;
        self.check("put", key, resp).await?;
        Ok(())
    }
}

/// Parses Artifactory's File List API answer into keys under `prefix`.
fn parse_file_list(prefix: &str, body: &[u8]) -> Result<Vec<ObjectInfo>> {
    #[derive(serde::Deserialize)]
    struct Listing {
        #[serde(default)]
        files: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        uri: String,
        #[serde(default)]
        size: u64,
        #[serde(default)]
        folder: bool,
    }
    let listing: Listing =
        serde_json::from_slice(body).map_err(|e| backend("list", prefix, format!("bad file list JSON: {e}")))?;
    let mut out = Vec::new();
    for e in listing.files.into_iter().filter(|e| !e.folder) {
        let rel = e.uri.trim_start_matches('/');
        let key = if prefix.is_empty() { rel.to_string() } else { format!("{prefix}/{rel}") };
        if validate_key(&key).is_ok() {
            out.push(ObjectInfo { key, size: e.size });
        }
    }
    Ok(out)
}

/// One `<response>` of a WebDAV multistatus.
#[derive(Debug, PartialEq, Eq)]
struct DavEntry {
    path: String,
    is_dir: bool,
    size: u64,
}

/// Parses a WebDAV `207 Multi-Status` body (namespace prefixes ignored).
fn parse_multistatus(xml: &str) -> std::result::Result<Vec<DavEntry>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut out = Vec::new();
    let mut current: Option<DavEntry> = None;
    let mut text_target: Option<&'static str> = None;
    loop {
        match reader.read_event().map_err(|e| format!("bad PROPFIND XML: {e}"))? {
            Event::Start(e) | Event::Empty(e) if e.local_name().as_ref() == b"response" => {
                current = Some(DavEntry { path: String::new(), is_dir: false, size: 0 });
            }
            Event::Start(e) => match e.local_name().as_ref() {
                b"href" => text_target = Some("href"),
                b"getcontentlength" => text_target = Some("len"),
                b"collection" => {
                    if let Some(c) = current.as_mut() {
                        c.is_dir = true;
                    }
                }
                _ => {}
            },
            Event::Empty(e) if e.local_name().as_ref() == b"collection" => {
                if let Some(c) = current.as_mut() {
                    c.is_dir = true;
                }
            }
            Event::Text(t) => {
                if let (Some(target), Some(c)) = (text_target, current.as_mut()) {
                    let text = t.decode().map_err(|e| format!("bad text: {e}"))?;
                    match target {
                        "href" => c.path.push_str(&text),
                        _ => c.size = text.trim().parse().unwrap_or(0),
                    }
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                b"response" => {
                    if let Some(mut c) = current.take() {
                        c.path = href_path(&c.path);
                        out.push(c);
                    }
                }
                b"href" | b"getcontentlength" => text_target = None,
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// The decoded path of an href that may be a full URL or a path.
fn href_path(href: &str) -> String {
    let path = match reqwest::Url::parse(href) {
        Ok(u) => u.path().to_string(),
        Err(_) => href.to_string(),
    };
    percent_encoding::percent_decode_str(&path).decode_utf8_lossy().into_owned()
}

#[async_trait]
impl BlobStore for ArtifactoryStore {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    #[instrument(skip(self, data), fields(len = data.len()))]
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        validate_key(key)?;
        let sums = checksums(&data);
        let len = data.len() as u64;
        self.put_body(key, reqwest::Body::from(data), len, sums).await
    }

    #[instrument(skip(self))]
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64> {
        validate_key(key)?;
        let io = |source| BlobError::Io { op: "put_file", key: path.display().to_string(), source };
        // First pass: checksums (Artifactory wants them before the body).
        let p = path.to_path_buf();
        let (len, sums) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            use std::io::Read;
            let mut f = std::fs::File::open(&p)?;
            let mut sha256 = digest::Context::new(&digest::SHA256);
            let mut sha1 = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
            let mut buf = vec![0u8; 1 << 20];
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sha256.update(&buf[..n]);
                sha1.update(&buf[..n]);
                len += n as u64;
            }
            Ok((len, (hex::encode(sha256.finish()), hex::encode(sha1.finish()))))
        })
        .await
        .map_err(|e| backend("put_file", key, e.to_string()))?
        .map_err(io)?;
        // Second pass: stream the body.
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        self.put_body(key, reqwest::Body::wrap_stream(stream), len, sums).await?;
        Ok(len)
    }

    #[instrument(skip(self))]
    async fn get(&self, key: &str) -> Result<Bytes> {
        let url = self.url(key)?;
        let resp = self.send("get", key, self.request(Method::GET, url)).await?;
        let resp = self.check("get", key, resp).await?;
        resp.bytes().await.map_err(|e| backend("get", key, e.to_string()))
    }

    #[instrument(skip(self))]
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let url = self.url(key)?;
        if range.start >= range.end {
            return Err(BlobError::InvalidRange { key: key.to_string(), start: range.start, end: range.end, size: 0 });
        }
        let rb =
            self.request(Method::GET, url).header(header::RANGE, format!("bytes={}-{}", range.start, range.end - 1));
        let resp = self.send("get_range", key, rb).await?;
        if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            let size = match self.head(key).await? {
                Some(info) => info.size,
                None => 0,
            };
            return Err(BlobError::InvalidRange { key: key.to_string(), start: range.start, end: range.end, size });
        }
        let resp = self.check("get_range", key, resp).await?;
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let body = resp.bytes().await.map_err(|e| backend("get_range", key, e.to_string()))?;
        if partial {
            return Ok(body);
        }
        // The server ignored Range and sent the whole object: cut it here.
        let r = clamp_range(key, &range, body.len() as u64)?;
        let (s, e) = (usize::try_from(r.start).unwrap_or(usize::MAX), usize::try_from(r.end).unwrap_or(usize::MAX));
        Ok(body.slice(s..e))
    }

    #[instrument(skip(self))]
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let url = self.url(key)?;
        let resp = self.send("head", key, self.request(Method::HEAD, url)).await?;
        let resp = match self.check("head", key, resp).await {
            Err(BlobError::NotFound { .. }) => return Ok(None),
            other => other?,
        };
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| backend("head", key, "no Content-Length in HEAD answer"))?;
        Ok(Some(ObjectInfo { key: key.to_string(), size }))
    }

    #[instrument(skip(self))]
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        validate_prefix(prefix)?;
        let prefix = prefix.trim_end_matches('/');
        let mut out = match self.list_mode().await {
            ListMode::StorageApi => self.list_storage_api(prefix).await?,
            ListMode::WebDav => self.list_webdav(prefix).await?,
        };
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    #[instrument(skip(self))]
    async fn delete(&self, key: &str) -> Result<()> {
        let url = self.url(key)?;
        let resp = self.send("delete", key, self.request(Method::DELETE, url)).await?;
        match self.check("delete", key, resp).await {
            Ok(_) | Err(BlobError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn multistatus_is_parsed() {
        let xml = r#"<?xml version="1.0" encoding="utf-8" ?>
<D:multistatus xmlns:D="DAV:">
<D:response><D:href>/repo/chunks/</D:href><D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop></D:propstat></D:response>
<D:response><D:href>http://h:1/repo/chunks/ab%2Bc</D:href><D:propstat><D:prop><D:resourcetype/><D:getcontentlength>42</D:getcontentlength></D:prop></D:propstat></D:response>
<response xmlns="DAV:"><href>/repo/chunks/sub/</href><propstat><prop><resourcetype><collection></collection></resourcetype></prop></propstat></response>
</D:multistatus>"#;
        let entries = parse_multistatus(xml).unwrap();
        assert_eq!(
            entries,
            vec![
                DavEntry { path: "/repo/chunks/".into(), is_dir: true, size: 0 },
                DavEntry { path: "/repo/chunks/ab+c".into(), is_dir: false, size: 42 },
                DavEntry { path: "/repo/chunks/sub/".into(), is_dir: true, size: 0 },
            ]
        );
    }

    #[test]
    fn file_list_is_parsed() {
        let body = br#"{"uri":"http://h/artifactory/api/storage/r/chunks","files":[
            {"uri":"/a1","size":10,"folder":false},{"uri":"/sub","folder":true},
            {"uri":"/sub/b2","size":3,"folder":false}]}"#;
        let list = parse_file_list("chunks", body).unwrap();
        assert_eq!(
            list,
            vec![ObjectInfo { key: "chunks/a1".into(), size: 10 }, ObjectInfo { key: "chunks/sub/b2".into(), size: 3 },]
        );
    }

    #[test]
    fn checksums_match_known_values() {
        let (sha256, sha1) = checksums(b"abc");
        assert_eq!(sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha1, "a9993e364706816aba3e25717850c26c9cd0d89d");
    }
}
