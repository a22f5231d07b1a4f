//! Connection strings (`provider=...;key=value;...`) parsed into a typed
//! configuration whose `Debug` and `Display` never show a secret.
//!
//! The keys are the reference service's (`prl-devops-service`, catalog
//! providers), plus a few Hangar extensions marked below:
//!
//! | provider | keys |
//! |---|---|
//! | `aws-s3` | `bucket`, `region`, `access_key`, `secret_key`, `session_token`, `use_environment_authentication`; extensions `endpoint`, `prefix`, `ignore_cert` |
//! | `minio` | `endpoint`, `bucket`, `use_ssl`, `ignore_cert`, `access_key`, `secret_key`, `use_environment_authentication`; extensions `region`, `session_token`, `prefix` |
//! | `azure-storage-account` | `storage_account_name`, `storage_account_key`, `container_name`; extensions `endpoint` (e.g. Azurite's `http://127.0.0.1:10000/devstoreaccount1`), `prefix` |
//! | `artifactory` | `url`, `port`, `repo`, `access_key` or `username` + `password`; extensions `prefix`, `ignore_cert` |
//! | `local-storage` | `catalog_path` (default `./catalog`) |
//!
//! Key names are case-insensitive; unknown keys are rejected so a typo does
//! not silently change where images go.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A credential. Its `Debug` and `Display` print `****`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Errors parsing a connection string. Values of secret keys never appear.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `key=value` pair could not be split.
    #[error("malformed connection string: {0} has no '=' (expected key=value pairs separated by ';')")]
    Malformed(String),
    /// No `provider=` key.
    #[error("connection string has no provider= key")]
    MissingProvider,
    /// The provider is not one we know.
    #[error("unknown provider {0:?} (expected aws-s3, minio, azure-storage-account, artifactory or local-storage)")]
    UnknownProvider(String),
    /// A key this provider does not take.
    #[error("provider {provider}: unknown key {key:?}")]
    UnknownKey {
        /// Provider name.
        provider: &'static str,
        /// The unexpected key.
        key: String,
    },
    /// A key given twice.
    #[error("key {0:?} given more than once")]
    DuplicateKey(String),
    /// A required key is missing.
    #[error("provider {provider}: missing required key {key}")]
    MissingKey {
        /// Provider name.
        provider: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A value is not acceptable.
    #[error("key {key}: {reason}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// What is wrong (never the secret itself).
        reason: String,
    },
    /// The client for the provider could not be built.
    #[error("cannot build {provider} client: {message}")]
    Client {
        /// Provider name.
        provider: &'static str,
        /// The builder's message.
        message: String,
    },
}

/// Which flavour of S3 a configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Flavor {
    /// `provider=aws-s3`.
    Aws,
    /// `provider=minio` (any S3-compatible server at `endpoint`).
    Minio,
}

/// S3 and S3-compatible storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Which provider name was used.
    pub flavor: S3Flavor,
    /// Bucket name.
    pub bucket: String,
    /// Region (`us-east-1` when not given).
    pub region: String,
    /// Endpoint URL with scheme; `None` means AWS itself. Path-style
    /// requests are used whenever an endpoint is set.
    pub endpoint: Option<String>,
    /// Access key id.
    pub access_key: Option<Secret>,
    /// Secret access key.
    pub secret_key: Option<Secret>,
    /// Session token.
    pub session_token: Option<Secret>,
    /// Take credentials from the `AWS_*` environment instead.
    pub use_environment_authentication: bool,
    /// Accept invalid TLS certificates.
    pub ignore_cert: bool,
    /// Folder inside the bucket.
    pub prefix: Option<String>,
}

/// Azure Blob Storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureConfig {
    /// Storage account name.
    pub account_name: String,
    /// Storage account key (base64).
    pub account_key: Secret,
    /// Container name.
    pub container_name: String,
    /// Account URL override (Azurite, sovereign clouds).
    pub endpoint: Option<String>,
    /// Folder inside the container.
    pub prefix: Option<String>,
}

/// How to authenticate to Artifactory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactoryAuth {
    /// Anonymous access.
    None,
    /// HTTP basic authentication.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// Legacy API key, sent as `X-JFrog-Art-Api`.
    ApiKey(Secret),
    /// Access token (a JWT or a reference token), sent as a bearer token.
    Bearer(Secret),
}

/// An Artifactory generic repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactoryConfig {
    /// Base URL of Artifactory (e.g. `https://host/artifactory`), with the
    /// `port` key applied, without a trailing `/`.
    pub url: String,
    /// Repository key.
    pub repo: String,
    /// Credentials.
    pub auth: ArtifactoryAuth,
    /// Accept invalid TLS certificates.
    pub ignore_cert: bool,
    /// Folder inside the repository.
    pub prefix: Option<String>,
}

/// A folder on the local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// Root folder of the store.
    pub catalog_path: PathBuf,
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `aws-s3` or `minio`.
    S3(S3Config),
    /// `azure-storage-account`.
    Azure(AzureConfig),
    /// `artifactory`.
    Artifactory(ArtifactoryConfig),
    /// `local-storage`.
    Local(LocalConfig),
}

impl StoreConfig {
    /// The provider name as written in connection strings.
    pub fn provider(&self) -> &'static str {
        match self {
            StoreConfig::S3(c) => match c.flavor {
                S3Flavor::Aws => "aws-s3",
                S3Flavor::Minio => "minio",
            },
            StoreConfig::Azure(_) => "azure-storage-account",
            StoreConfig::Artifactory(_) => "artifactory",
            StoreConfig::Local(_) => "local-storage",
        }
    }

    /// The folder inside the bucket/container/repository, if any.
    pub fn prefix(&self) -> Option<&str> {
        match self {
            StoreConfig::S3(c) => c.prefix.as_deref(),
            StoreConfig::Azure(c) => c.prefix.as_deref(),
            StoreConfig::Artifactory(c) => c.prefix.as_deref(),
            StoreConfig::Local(_) => None,
        }
    }
}

/// Renders the configuration as a connection string with every secret
/// replaced by `****`.
impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "provider={}", self.provider())?;
        let masked = |s: &Option<Secret>| s.as_ref().map(|_| "****");
        let mut pairs: Vec<(&str, Option<String>)> = Vec::new();
        match self {
            StoreConfig::S3(c) => {
                pairs.push(("endpoint", c.endpoint.clone()));
                pairs.push(("bucket", Some(c.bucket.clone())));
                pairs.push(("region", Some(c.region.clone())));
                pairs.push(("access_key", masked(&c.access_key).map(str::to_string)));
                pairs.push(("secret_key", masked(&c.secret_key).map(str::to_string)));
                pairs.push(("session_token", masked(&c.session_token).map(str::to_string)));
                if c.use_environment_authentication {
                    pairs.push(("use_environment_authentication", Some("true".into())));
                }
                if c.ignore_cert {
                    pairs.push(("ignore_cert", Some("true".into())));
                }
                pairs.push(("prefix", c.prefix.clone()));
            }
            StoreConfig::Azure(c) => {
                pairs.push(("storage_account_name", Some(c.account_name.clone())));
                pairs.push(("storage_account_key", Some("****".into())));
                pairs.push(("container_name", Some(c.container_name.clone())));
                pairs.push(("endpoint", c.endpoint.clone()));
                pairs.push(("prefix", c.prefix.clone()));
            }
            StoreConfig::Artifactory(c) => {
                pairs.push(("url", Some(c.url.clone())));
                pairs.push(("repo", Some(c.repo.clone())));
                match &c.auth {
                    ArtifactoryAuth::None => {}
                    ArtifactoryAuth::Basic { username, .. } => {
                        pairs.push(("username", Some(username.clone())));
                        pairs.push(("password", Some("****".into())));
                    }
                    ArtifactoryAuth::ApiKey(_) | ArtifactoryAuth::Bearer(_) => {
                        pairs.push(("access_key", Some("****".into())));
                    }
                }
                if c.ignore_cert {
                    pairs.push(("ignore_cert", Some("true".into())));
                }
                pairs.push(("prefix", c.prefix.clone()));
            }
            StoreConfig::Local(c) => {
                pairs.push(("catalog_path", Some(c.catalog_path.display().to_string())));
            }
        }
        for (k, v) in pairs {
            if let Some(v) = v {
                write!(f, ";{k}={v}")?;
            }
        }
        Ok(())
    }
}

/// The key/value pairs of a connection string, consumed as they are used.
struct Pairs {
    provider: &'static str,
    map: BTreeMap<String, String>,
}

impl Pairs {
    fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key).filter(|v| !v.is_empty())
    }

    fn required(&mut self, key: &'static str) -> Result<String, ConfigError> {
        self.take(key).ok_or(ConfigError::MissingKey { provider: self.provider, key })
    }

    fn secret(&mut self, key: &str) -> Option<Secret> {
        self.take(key).map(Secret)
    }

    fn flag(&mut self, key: &'static str) -> Result<bool, ConfigError> {
        match self.take(key) {
            None => Ok(false),
            Some(v) => parse_bool(key, &v),
        }
    }

    fn prefix(&mut self) -> Result<Option<String>, ConfigError> {
        match self.take("prefix") {
            None => Ok(None),
            Some(p) => {
                let p = p.trim_matches('/').to_string();
                if p.is_empty() {
                    return Ok(None);
                }
                crate::validate_key(&p)
                    .map_err(|e| ConfigError::InvalidValue { key: "prefix", reason: e.to_string() })?;
                Ok(Some(p))
            }
        }
    }

    fn finish(self) -> Result<(), ConfigError> {
        match self.map.into_keys().next() {
            Some(key) => Err(ConfigError::UnknownKey { provider: self.provider, key }),
            None => Ok(()),
        }
    }
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(ConfigError::InvalidValue { key, reason: format!("{other:?} is not a boolean") }),
    }
}

fn endpoint_url(key: &'static str, raw: &str, use_ssl: Option<bool>) -> Result<String, ConfigError> {
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else if use_ssl.unwrap_or(false) {
        format!("https://{raw}")
    } else {
        format!("http://{raw}")
    };
    let url = reqwest::Url::parse(&with_scheme)
        .map_err(|e| ConfigError::InvalidValue { key, reason: format!("{raw:?} is not a URL: {e}") })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::InvalidValue {
            key,
            reason: format!("scheme {:?} is not http or https", url.scheme()),
        });
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

fn name_value(key: &'static str, value: String) -> Result<String, ConfigError> {
    if value.contains('/') || value.chars().any(char::is_whitespace) {
        return Err(ConfigError::InvalidValue { key, reason: format!("{value:?} must not contain '/' or spaces") });
    }
    Ok(value)
}

impl FromStr for StoreConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut map = BTreeMap::new();
        for (n, segment) in s.split(';').enumerate() {
            let segment = segment.trim();
            if segment.is_empty() {
                continue;
            }
            let Some((k, v)) = segment.split_once('=') else {
                // Never echo a segment: without its `=` it may be a secret (a value
                // cut off from its key). Its position is enough to find it.
                return Err(ConfigError::Malformed(format!(
                    "segment {} (of {} characters)",
                    n + 1,
                    segment.chars().count()
                )));
            };
            let k = k.trim().to_ascii_lowercase();
            if map.insert(k.clone(), v.trim().to_string()).is_some() {
                return Err(ConfigError::DuplicateKey(k));
            }
        }
        let provider = map.remove("provider").ok_or(ConfigError::MissingProvider)?;
        let provider = provider.to_ascii_lowercase();
        let name: &'static str = match provider.as_str() {
            "aws-s3" | "s3" => "aws-s3",
            "minio" => "minio",
            "azure-storage-account" | "azure" => "azure-storage-account",
            "artifactory" | "jfrog" => "artifactory",
            "local-storage" | "local" => "local-storage",
            _ => return Err(ConfigError::UnknownProvider(provider)),
        };
        let mut p = Pairs { provider: name, map };
        let config = match name {
            "aws-s3" | "minio" => {
                let flavor = if name == "aws-s3" { S3Flavor::Aws } else { S3Flavor::Minio };
                let use_ssl = match p.take("use_ssl") {
                    Some(v) if flavor == S3Flavor::Minio => Some(parse_bool("use_ssl", &v)?),
                    Some(_) => {
                        return Err(ConfigError::UnknownKey { provider: name, key: "use_ssl".into() });
                    }
                    None => None,
                };
                let endpoint = match (flavor, p.take("endpoint")) {
                    (S3Flavor::Minio, None) => {
                        return Err(ConfigError::MissingKey { provider: name, key: "endpoint" });
                    }
                    (_, Some(e)) => Some(endpoint_url("endpoint", &e, use_ssl)?),
                    (S3Flavor::Aws, None) => None,
                };
                let c = S3Config {
                    flavor,
                    bucket: name_value("bucket", p.required("bucket")?)?,
                    region: p.take("region").unwrap_or_else(|| "us-east-1".into()),
                    endpoint,
                    access_key: p.secret("access_key"),
                    secret_key: p.secret("secret_key"),
                    session_token: p.secret("session_token"),
                    use_environment_authentication: p.flag("use_environment_authentication")?,
                    ignore_cert: p.flag("ignore_cert")?,
                    prefix: p.prefix()?,
                };
                if !c.use_environment_authentication && c.access_key.is_some() != c.secret_key.is_some() {
                    return Err(ConfigError::MissingKey {
                        provider: name,
                        key: if c.access_key.is_some() { "secret_key" } else { "access_key" },
                    });
                }
                StoreConfig::S3(c)
            }
            "azure-storage-account" => StoreConfig::Azure(AzureConfig {
                account_name: name_value("storage_account_name", p.required("storage_account_name")?)?,
                account_key: Secret(p.required("storage_account_key")?),
                container_name: name_value("container_name", p.required("container_name")?)?,
                endpoint: match p.take("endpoint") {
                    Some(e) => Some(endpoint_url("endpoint", &e, Some(true))?),
                    None => None,
                },
                prefix: p.prefix()?,
            }),
            "artifactory" => {
                let raw_url = p.required("url")?;
                let mut url = reqwest::Url::parse(&endpoint_url("url", &raw_url, Some(true))?)
                    .map_err(|e| ConfigError::InvalidValue { key: "url", reason: e.to_string() })?;
                if let Some(port) = p.take("port") {
                    let port: u16 = port.parse().map_err(|_| ConfigError::InvalidValue {
                        key: "port",
                        reason: format!("{port:?} is not a port number"),
                    })?;
                    url.set_port(Some(port)).map_err(|()| ConfigError::InvalidValue {
                        key: "port",
                        reason: "cannot set a port on this URL".into(),
                    })?;
                }
                let username = p.take("username");
                let password = p.secret("password");
                let access_key = p.secret("access_key");
                let auth = match (username, password, access_key) {
                    (Some(username), Some(password), None) => ArtifactoryAuth::Basic { username, password },
                    (None, None, Some(key)) => token_auth(key),
                    (None, None, None) => ArtifactoryAuth::None,
                    (Some(_), None, None) => {
                        return Err(ConfigError::MissingKey { provider: name, key: "password" });
                    }
                    (None, Some(_), None) => {
                        return Err(ConfigError::MissingKey { provider: name, key: "username" });
                    }
                    _ => {
                        return Err(ConfigError::InvalidValue {
                            key: "access_key",
                            reason: "give either access_key or username+password, not both".into(),
                        });
                    }
                };
                StoreConfig::Artifactory(ArtifactoryConfig {
                    url: url.as_str().trim_end_matches('/').to_string(),
                    repo: name_value("repo", p.required("repo")?)?,
                    auth,
                    ignore_cert: p.flag("ignore_cert")?,
                    prefix: p.prefix()?,
                })
            }
            _ => StoreConfig::Local(LocalConfig {
                catalog_path: PathBuf::from(p.take("catalog_path").unwrap_or_else(|| "./catalog".into())),
            }),
        };
        p.finish()?;
        Ok(config)
    }
}

/// JFrog access tokens are JWTs (`eyJ...`, three dot-separated parts) or
/// reference tokens (base64 of `reftkn...`, so starting with `cmVmdGtu`):
/// those go as bearer tokens; anything else is a legacy API key.
fn token_auth(key: Secret) -> ArtifactoryAuth {
    let v = key.expose();
    let is_jwt = v.starts_with("eyJ") && v.split('.').count() == 3;
    if is_jwt || v.starts_with("cmVmdGtu") { ArtifactoryAuth::Bearer(key) } else { ArtifactoryAuth::ApiKey(key) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(s: &str) -> StoreConfig {
        match s.parse() {
            Ok(c) => c,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn aws_s3() {
        let c = parse("provider=aws-s3;bucket=images;region=eu-west-1;access_key=AKIAXXX;secret_key=topsecret");
        let StoreConfig::S3(s3) = &c else { panic!("not s3") };
        assert_eq!(s3.flavor, S3Flavor::Aws);
        assert_eq!(s3.bucket, "images");
        assert_eq!(s3.region, "eu-west-1");
        assert_eq!(s3.endpoint, None);
        assert_eq!(s3.secret_key.as_ref().map(Secret::expose), Some("topsecret"));
        let shown = format!("{c} {c:?}");
        assert!(!shown.contains("topsecret") && !shown.contains("AKIAXXX"), "{shown}");
        assert!(shown.contains("bucket=images"));
    }

    #[test]
    fn minio_endpoint_scheme_follows_use_ssl() {
        let c = parse("provider=minio;endpoint=127.0.0.1:9000;bucket=b;access_key=a;secret_key=s");
        let StoreConfig::S3(s3) = c else { panic!() };
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let c = parse("provider=minio;endpoint=minio.local;use_ssl=true;bucket=b");
        let StoreConfig::S3(s3) = c else { panic!() };
        assert_eq!(s3.endpoint.as_deref(), Some("https://minio.local"));
        assert!(matches!(
            "provider=minio;bucket=b".parse::<StoreConfig>(),
            Err(ConfigError::MissingKey { key: "endpoint", .. })
        ));
    }

    #[test]
    fn azure() {
        let c = parse(
            "provider=azure-storage-account;storage_account_name=acct;storage_account_key=S3cr3tKey==;container_name=vms",
        );
        let StoreConfig::Azure(a) = &c else { panic!() };
        assert_eq!(a.account_key.expose(), "S3cr3tKey==");
        assert_eq!(a.container_name, "vms");
        let shown = format!("{c} {c:?}");
        assert!(!shown.contains("S3cr3tKey"), "{shown}");
    }

    #[test]
    fn artifactory_auth_variants() {
        let c = parse(
            "provider=artifactory;url=https://jf.example/artifactory;port=8443;repo=vms;username=u;password=hunter2",
        );
        let StoreConfig::Artifactory(a) = &c else { panic!() };
        assert_eq!(a.url, "https://jf.example:8443/artifactory");
        assert!(matches!(&a.auth, ArtifactoryAuth::Basic { username, .. } if username == "u"));
        assert!(!format!("{c}{c:?}").contains("hunter2"));
        let c = parse("provider=artifactory;url=jf.example;repo=vms;access_key=AKCpLegacyKey");
        let StoreConfig::Artifactory(a) = &c else { panic!() };
        assert!(matches!(a.auth, ArtifactoryAuth::ApiKey(_)));
        assert_eq!(a.url, "https://jf.example");
        let c = parse("provider=artifactory;url=jf.example;repo=vms;access_key=eyJhbGc.eyJzdWIi.sig");
        let StoreConfig::Artifactory(a) = &c else { panic!() };
        assert!(matches!(a.auth, ArtifactoryAuth::Bearer(_)));
        assert!(!format!("{c}{c:?}").contains("eyJ"));
        assert!("provider=artifactory;url=x;repo=r;username=u".parse::<StoreConfig>().is_err());
    }

    #[test]
    fn local_default_and_errors() {
        let c = parse("provider=local-storage");
        assert_eq!(c, StoreConfig::Local(LocalConfig { catalog_path: "./catalog".into() }));
        let c = parse("PROVIDER=local-storage; CATALOG_PATH=/srv/cat ;");
        assert_eq!(c, StoreConfig::Local(LocalConfig { catalog_path: "/srv/cat".into() }));
        assert_eq!(
            "provider=local-storage;catalogpath=/x".parse::<StoreConfig>(),
            Err(ConfigError::UnknownKey { provider: "local-storage", key: "catalogpath".into() })
        );
        assert_eq!("bucket=x".parse::<StoreConfig>(), Err(ConfigError::MissingProvider));
        assert!(matches!("provider=gcs".parse::<StoreConfig>(), Err(ConfigError::UnknownProvider(_))));
        let err = "provider=aws-s3;bucket=b;supersecretvalue".parse::<StoreConfig>();
        assert!(matches!(err, Err(ConfigError::Malformed(_))));
    }

    #[test]
    fn prefix_is_validated() {
        let c = parse("provider=aws-s3;bucket=b;prefix=/team/images/");
        assert_eq!(c.prefix(), Some("team/images"));
        assert!("provider=aws-s3;bucket=b;prefix=../x".parse::<StoreConfig>().is_err());
    }
}
