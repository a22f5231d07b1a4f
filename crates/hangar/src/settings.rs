//! Typed settings: every key of the key table [`KEYS`] parsed once, at start, from the
//! layered configuration (file < environment < flags, see [`Layers`]).
//!
//! - A key that is unset, or set to an empty value, takes its default from the key table,
//!   and from nowhere else: nothing else in the binary repeats a default. The only defaults
//!   that are not in the table are the folders derived from the data folder (and the data
//!   folder itself), which the table's help text describes.
//! - A value that does not parse is a problem, never a default, and that holds for the keys
//!   of modules that are off too: a typo in `QEMU_ACCELERATION` stops `hangar serve` even
//!   when the host module is not requested.
//! - [`Settings::from_layers`] reports every problem at once, each naming the key, the value
//!   (unless the key is secret), where the value came from and what is accepted.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hangar_api::CorsConfig;
use hangar_host::{Acceleration, DriverChoice};
use hangar_identity::oidc::{ClientSecret, Mapping, ProviderConfig};
use hangar_identity::{JwtAlgorithm, LockoutPolicy, PasswordPolicy, SessionPolicy};
use hangar_orchestrator::Profile;

use crate::config::{KEYS, Layers, Source};

/// The server's modules, in start order (`ENABLED_MODULES` names some of them).
pub const MODULES: &[&str] = &["api", "host", "catalog", "orchestrator", "reverse_proxy"];

/// The shortest password policy accepted whatever `SECURITY_PASSWORD_MIN_PASSWORD_LENGTH` says.
const MIN_PASSWORD_LENGTH_FLOOR: usize = 8;
/// The orchestrator never probes hosts more often than this.
const CHECK_INTERVAL_FLOOR: Duration = Duration::from_millis(200);
/// Hosts' event streams carry a heartbeat every 2 s whatever the check interval, so a
/// shorter silence than this is not a sign of anything.
const UNHEALTHY_AFTER_FLOOR: Duration = Duration::from_secs(3);
/// `JWT_HMACS_SECRET`'s shortest length, as the identity service requires.
const HMAC_SECRET_MIN_BYTES: usize = 32;

/// A secret value (password, key, certificate): never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Every configuration key, typed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub modules: Modules,
    pub host: HostSettings,
    pub orchestrator: OrchestratorSettings,
    pub identity: IdentitySettings,
    pub tls: TlsSettings,
    pub database: DatabaseSettings,
    pub reverse_proxy: ReverseProxySettings,
    /// `CATALOG_CACHE_*`, `DISABLE_CATALOG_CACHING`: the host image cache of the catalog module.
    pub catalog_cache: CatalogCacheSettings,
    /// `ENABLE_CORS`, `CORS_ALLOWED_ORIGINS`, `CORS_ALLOWED_METHODS`, `CORS_ALLOWED_HEADERS`.
    pub cors: CorsConfig,
    /// `GITHUB_*`, `RUNNERS_*`: ephemeral GitHub Actions runners, when `GITHUB_APP_ID` is set.
    pub github_runners: Option<GithubRunnerSettings>,
}

/// Ephemeral GitHub Actions runners (`GITHUB_*`, `RUNNERS_*`). `Debug` hides the key and
/// the webhook secret.
#[derive(Debug, Clone)]
pub struct GithubRunnerSettings {
    pub github: hangar_runners::github::GithubConfig,
    pub runners: hangar_runners::RunnersConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// `API_HOST`: the address the HTTP and HTTPS listeners bind.
    pub host: IpAddr,
    /// `API_PORT` (0: any free port).
    pub port: u16,
    /// `API_PREFIX`, without a trailing `/`.
    pub prefix: String,
    /// `API_BODY_LIMIT`, in bytes.
    pub body_limit: usize,
    /// `API_HEADER_READ_TIMEOUT`: headers (and the TLS handshake) must arrive within it,
    /// and an idle connection is closed after it.
    pub header_read_timeout: Duration,
    /// `API_MAX_CONNECTIONS_PER_SOURCE` (at least 1).
    pub max_connections_per_source: usize,
    /// `METRICS_HOST`:`METRICS_PORT`, the unauthenticated `/metrics` listener, when set.
    pub metrics_listener: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `LOG_LEVEL`: a level, or a tracing filter checked to parse.
    pub filter: String,
    /// `LOG_FORMAT`.
    pub format: LogFormat,
    /// `LOG_TO_FILE` (or `PRL_DEVOPS_LOG_TO_FILE`): the file `hangar.log` in `LOG_FILE_PATH`
    /// (or `PRL_DEVOPS_LOG_FILE_PATH`, default the data folder), when on.
    pub file: Option<PathBuf>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (with `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`):
    /// spans exported as traces over OTLP/HTTP, when set.
    pub otlp: Option<OtlpSettings>,
}

/// Where and how the server's spans are exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` with `v1/traces` appended to its path, as the
    /// OpenTelemetry specification says for the signal-independent endpoint.
    pub traces_url: url::Url,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: names and percent-decoded values.
    pub headers: Vec<(String, Secret)>,
}

/// `ENABLED_MODULES` (or `MODE`): the modules asked for; none named means every module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modules {
    requested: Vec<&'static str>,
    /// The reference's module names that were named in `ENABLED_MODULES` (`cors`, `cache`,
    /// `catalog_manager`): `cors` turns CORS on, `cache` the catalog module (which holds the
    /// host image cache); the catalog-managers routes are part of the api module.
    pub reference_names: Vec<&'static str>,
}

/// The host image cache (`CATALOG_CACHE_*`, `DISABLE_CATALOG_CACHING`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogCacheSettings {
    /// `CATALOG_CACHE_FOLDER`; `None`: `<data folder>/catalog-cache`.
    pub folder: Option<PathBuf>,
    /// `CATALOG_CACHE_MAX_SIZE` (0 with `DISABLE_CATALOG_CACHING`) and
    /// `CATALOG_CACHE_KEEP_FREE_DISK_SPACE` (ignored with
    /// `CATALOG_CACHE_ALLOW_CACHE_ABOVE_FREE_DISK_SPACE`), in bytes.
    pub limits: hangar_catalog::hangar_image::CacheLimits,
}

impl Modules {
    /// Whether `module` should run: `api` always, the others when `ENABLED_MODULES` is
    /// empty or names them.
    pub fn wants(&self, module: &str) -> bool {
        module == "api" || self.requested.is_empty() || self.requested.contains(&module)
    }

    /// Whether `ENABLED_MODULES` names modules (rather than leaving the choice to the machine).
    pub fn explicit(&self) -> bool {
        !self.requested.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    /// `HYPERVISOR`.
    pub hypervisor: DriverChoice,
    /// `HOST_VMS_FOLDER`, or `<data folder>/vms`.
    pub vms_folder: PathBuf,
    /// `HOST_IMAGES_FOLDER`, or `<data folder>/images`.
    pub images_folder: PathBuf,
    /// `HOST_UPLOAD_FOLDER`; `None` disables host-path uploads.
    pub upload_folder: Option<PathBuf>,
    /// `PRLCTL_PATH`.
    pub prlctl: Option<PathBuf>,
    /// `PRLSRVCTL_PATH`.
    pub prlsrvctl: Option<PathBuf>,
    /// `QEMU_BINARY`.
    pub qemu_binary: Option<PathBuf>,
    /// `QEMU_ACCELERATION`.
    pub acceleration: Acceleration,
    /// `QEMU_NETWORK_BRIDGE`; `None` is user-mode networking.
    pub bridge: Option<String>,
    /// `SYSTEM_RESERVED_CPU`.
    pub reserved_cpu: u32,
    /// `SYSTEM_RESERVED_MEMORY`, in MiB.
    pub reserved_memory_mb: u64,
    /// `SYSTEM_RESERVED_DISK`, in MiB.
    pub reserved_disk_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseProxySettings {
    /// `REVERSE_PROXY_TLS_FOLDER`; `None` refuses certificate and key paths (PEM text only).
    pub tls_folder: Option<PathBuf>,
    /// `REVERSE_PROXY_ALLOW_PRIVILEGED_PORTS`.
    pub allow_privileged_ports: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorSettings {
    /// `ORCHESTRATOR_PLACEMENT`.
    pub placement: Profile,
    /// `ORCHESTRATOR_CHECK_INTERVAL`, at least 200 ms.
    pub check_interval: Duration,
    /// `ORCHESTRATOR_UNHEALTHY_AFTER`, at least 3 s.
    pub unhealthy_after: Duration,
    /// `RUNNER_POOLS_FILE`: runner pools applied at start.
    pub pools_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    /// `ROOT_PASSWORD`.
    pub root_password: Option<Secret>,
    /// `ROOT_PASSWORD_FILE` (read at start; `ROOT_PASSWORD` wins when both are set).
    pub root_password_file: Option<PathBuf>,
    /// `JWT_SIGN_ALGORITHM`.
    pub jwt_algorithm: JwtAlgorithm,
    /// `JWT_DURATION`.
    pub jwt_duration: Duration,
    /// `JWT_HMACS_SECRET`, at least 32 bytes.
    pub jwt_hmac_secret: Option<Secret>,
    /// `JWT_PRIVATE_KEY`: PEM text, base64 of the PEM, or a file path (read at start).
    pub jwt_private_key: Option<Secret>,
    /// `JWT_ISSUER`.
    pub jwt_issuer: String,
    /// `JWT_AUDIENCE`.
    pub jwt_audience: String,
    /// `SECURITY_PASSWORD_*` (the shortest minimum is 8).
    pub password_policy: PasswordPolicy,
    /// `BRUTE_FORCE_*`.
    pub lockout: LockoutPolicy,
    /// `SESSION_IDLE_TIMEOUT`, `SESSION_MAX_AGE`.
    pub sessions: SessionPolicy,
    /// `OIDC_*` (one provider) and `OIDC_PROVIDERS_FILE` (more).
    pub oidc: Vec<ProviderConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `TLS_ENABLED`: when true, `certificate` and `private_key` are set.
    pub enabled: bool,
    /// `TLS_PORT`.
    pub port: u16,
    /// `TLS_CERTIFICATE`: PEM text, base64 of the PEM, or a file path (read at start).
    pub certificate: Option<Secret>,
    /// `TLS_PRIVATE_KEY`: same forms.
    pub private_key: Option<Secret>,
    /// `DISABLE_HTTP_WHEN_TLS`.
    pub disable_http: bool,
}

impl TlsSettings {
    /// HTTPS only: TLS is on and plain HTTP is turned off.
    pub fn https_only(&self) -> bool {
        self.enabled && self.disable_http
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// `DATABASE_FOLDER`, or the platform's default data folder.
    pub folder: PathBuf,
    /// `DATABASE_URL`, or the URL the reference's `MYSQL_*` keys make: the store is that SQL
    /// database instead of the JSON engine in `folder` (which still holds the secrets).
    pub url: Option<Secret>,
    /// `DATABASE_ENCRYPTION_KEY_FILE`.
    pub encryption_key_file: Option<PathBuf>,
    /// `DATABASE_BACKUP_INTERVAL_MINUTES`; `None` (0 minutes) disables scheduled backups.
    pub backup_interval: Option<Duration>,
    /// `DATABASE_NUMBER_BACKUP_FILES`.
    pub backups_kept: usize,
}

/// What was wrong with a key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    /// The value as given; `None` when the key is secret or unset.
    pub value: Option<String>,
    /// Where the value came from; `None` when the key is unset.
    pub source: Option<Source>,
    /// What is wrong and what is accepted, as a predicate ("is not one of ...").
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.value, self.source) {
            (Some(v), Some(s)) => write!(f, "{}={v:?} (from the {s}) {}", self.key, self.message),
            (None, Some(s)) => write!(f, "{} (from the {s}; secret, not shown) {}", self.key, self.message),
            (_, None) => write!(f, "{} is not set: {}", self.key, self.message),
        }
    }
}

/// Every problem of the configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }?;
        f.write_str("\n(`hangar config keys` lists every key with its default and meaning)")
    }
}

impl std::error::Error for SettingsError {}

impl Settings {
    /// Parse every key of the table from the layered configuration, with the table's
    /// default for the keys that are unset. All problems are returned together.
    pub fn from_layers(l: &Layers) -> Result<Settings, SettingsError> {
        let mut r = Reader { layers: l, problems: Vec::new() };

        let api_host = r.required("API_HOST", ip);
        let api_port = r.required("API_PORT", port);
        let api_prefix = r.required("API_PREFIX", prefix);
        let api_body_limit = r.required("API_BODY_LIMIT", whole::<usize>("a whole number of bytes"));
        let api_header_read_timeout = r.required("API_HEADER_READ_TIMEOUT", |v| {
            duration(v).and_then(|d| {
                if d < Duration::from_millis(100) {
                    Err("is too short: use at least 100ms, such as 10s".to_string())
                } else {
                    Ok(d)
                }
            })
        });
        let api_max_per_source = r.required("API_MAX_CONNECTIONS_PER_SOURCE", |v| {
            whole::<usize>("a whole number of connections")(v)
                .and_then(|n| if n == 0 { Err("must be at least 1".to_string()) } else { Ok(n) })
        });
        let metrics_port = r.optional("METRICS_PORT", port);
        let metrics_host = r.required("METRICS_HOST", ip);
        let log_level = r.required("LOG_LEVEL", log_filter);
        let log_format =
            r.required("LOG_FORMAT", |v| choice(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)]));
        let log_to_file = r.optional("LOG_TO_FILE", boolean);
        let log_to_file_alias = r.optional("PRL_DEVOPS_LOG_TO_FILE", boolean);
        let log_file_path = r.optional("LOG_FILE_PATH", path);
        let log_file_path_alias = r.optional("PRL_DEVOPS_LOG_FILE_PATH", path);
        let otlp_endpoint = r.optional("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_traces_url);
        let otlp_service = r.required("OTEL_SERVICE_NAME", text);
        let otlp_headers = r.optional("OTEL_EXPORTER_OTLP_HEADERS", otlp_headers);
        let modules = r.optional("ENABLED_MODULES", modules);
        let modules_named_cors = matches!(&modules, Some(Some(m)) if m.contains(&"cors"));
        let mode = r.optional("MODE", |v| {
            choice(v, &[("api", &[][..]), ("orchestrator", &["orchestrator"][..]), ("catalog", &["catalog"][..])])
        });
        let cache_folder = r.optional("CATALOG_CACHE_FOLDER", path);
        let cache_disabled = r.required("DISABLE_CATALOG_CACHING", boolean);
        let cache_keep_free = r.optional("CATALOG_CACHE_KEEP_FREE_DISK_SPACE", whole::<u64>("a whole number of MiB"));
        let cache_max = r.optional("CATALOG_CACHE_MAX_SIZE", whole::<u64>("a whole number of MiB"));
        let cache_above_free = r.required("CATALOG_CACHE_ALLOW_CACHE_ABOVE_FREE_DISK_SPACE", boolean);

        let hypervisor = r.required("HYPERVISOR", |v| {
            DriverChoice::from_str(v).map_err(|_| "is not one of auto, qemu or parallels".to_string())
        });
        let vms_folder = r.optional("HOST_VMS_FOLDER", path);
        let images_folder = r.optional("HOST_IMAGES_FOLDER", path);
        let upload_folder = r.optional("HOST_UPLOAD_FOLDER", path);
        let prlctl = r.optional("PRLCTL_PATH", path);
        let prlsrvctl = r.optional("PRLSRVCTL_PATH", path);
        let qemu_binary = r.optional("QEMU_BINARY", path);
        let acceleration = r.required("QEMU_ACCELERATION", |v| {
            choice(v, &[("auto", Acceleration::Auto), ("kvm", Acceleration::Kvm), ("tcg", Acceleration::Tcg)])
        });
        let bridge = r.optional("QEMU_NETWORK_BRIDGE", text);
        let reserved_cpu = r.required("SYSTEM_RESERVED_CPU", whole::<u32>("a whole number of CPUs"));
        let reserved_memory = r.required("SYSTEM_RESERVED_MEMORY", whole::<u64>("a whole number of MiB"));
        // Read by the catalog module (`catalog_cmd::start_catalog`); checked here with the rest.
        let _catalog_local_roots = r.optional("CATALOG_LOCAL_ROOTS", |v| {
            let dirs = list(v)?;
            match dirs.iter().find(|d| !std::path::Path::new(d).is_absolute()) {
                Some(d) => Err(format!("names {d:?}, which is not an absolute folder")),
                None => Ok(dirs),
            }
        });
        let reserved_disk = r.required("SYSTEM_RESERVED_DISK", whole::<u64>("a whole number of MiB"));

        let placement = r
            .required("ORCHESTRATOR_PLACEMENT", |v| choice(v, &[("spread", Profile::Spread), ("pack", Profile::Pack)]));
        let check_interval = r.required("ORCHESTRATOR_CHECK_INTERVAL", duration);
        let unhealthy_after = r.required("ORCHESTRATOR_UNHEALTHY_AFTER", duration);
        let pools_file = r.optional("RUNNER_POOLS_FILE", path);
        let proxy_tls_folder = r.optional("REVERSE_PROXY_TLS_FOLDER", path);
        let proxy_privileged = r.required("REVERSE_PROXY_ALLOW_PRIVILEGED_PORTS", boolean);

        let root_password = r.optional("ROOT_PASSWORD", secret);
        let root_password_file = r.optional("ROOT_PASSWORD_FILE", path);
        let jwt_algorithm = r.required("JWT_SIGN_ALGORITHM", |v| {
            JwtAlgorithm::from_str(v)
                .map_err(|_| "is not one of HS256, HS384, HS512, RS256, RS384, RS512 or EdDSA".to_string())
        });
        let jwt_duration = r.required("JWT_DURATION", duration);
        let jwt_hmac_secret = r.optional("JWT_HMACS_SECRET", |v| {
            if v.len() < HMAC_SECRET_MIN_BYTES {
                return Err(format!("is too short: use at least {HMAC_SECRET_MIN_BYTES} bytes"));
            }
            secret(v)
        });
        let jwt_private_key = r.optional("JWT_PRIVATE_KEY", secret);
        let jwt_issuer = r.required("JWT_ISSUER", text);
        let jwt_audience = r.required("JWT_AUDIENCE", text);

        let tls_enabled = r.required("TLS_ENABLED", boolean);
        let tls_port = r.required("TLS_PORT", port);
        let tls_certificate = r.optional("TLS_CERTIFICATE", secret);
        let tls_private_key = r.optional("TLS_PRIVATE_KEY", secret);
        let disable_http = r.required("DISABLE_HTTP_WHEN_TLS", boolean);

        let database_folder = r.optional("DATABASE_FOLDER", path);
        let database_url = r.optional("DATABASE_URL", |v| {
            if hangar_store_sql::is_sql_url(v) {
                secret(v)
            } else {
                Err("is not a postgres://, postgresql://, mysql:// or mariadb:// URL (unset it for the JSON engine)"
                    .into())
            }
        });
        let mysql_database = r.optional("MYSQL_DATABASE", text);
        let mysql_host = r.required("MYSQL_HOST", text);
        let mysql_port = r.required("MYSQL_PORT", port);
        let mysql_user = r.optional("MYSQL_USER", text);
        let mysql_password = r.optional("MYSQL_PASSWORD", secret);
        let database_url = match (database_url, mysql_database) {
            (Some(Some(_)), Some(Some(_))) => {
                r.problem("MYSQL_DATABASE", "is set with DATABASE_URL: give one of them");
                None
            }
            (Some(None), Some(Some(db))) => match (mysql_host, mysql_port, mysql_user, mysql_password) {
                (Some(host), Some(port), Some(user), Some(password)) => {
                    match mysql_url(&host, port, user.as_deref(), password.as_ref().map(Secret::expose), &db) {
                        Ok(url) => Some(Some(Secret(url))),
                        Err(message) => {
                            r.problem("MYSQL_HOST", &message);
                            None
                        }
                    }
                }
                _ => None,
            },
            (url, _) => url,
        };
        let encryption_key_file = r.optional("DATABASE_ENCRYPTION_KEY_FILE", path);
        let backup_minutes = r.required("DATABASE_BACKUP_INTERVAL_MINUTES", whole::<u64>("a whole number of minutes"));
        let backups_kept = r.required("DATABASE_NUMBER_BACKUP_FILES", whole::<usize>("a whole number of files"));

        let cors_enabled = r.required("ENABLE_CORS", boolean);
        let cors_origins = r.required("CORS_ALLOWED_ORIGINS", list);
        let cors_methods = r.optional("CORS_ALLOWED_METHODS", list);
        let cors_headers = r.optional("CORS_ALLOWED_HEADERS", list);

        let min_password = r.required("SECURITY_PASSWORD_MIN_PASSWORD_LENGTH", whole::<usize>("a whole number"));
        let max_password = r.required("SECURITY_PASSWORD_MAX_PASSWORD_LENGTH", whole::<usize>("a whole number"));
        let require_uppercase = r.required("SECURITY_PASSWORD_REQUIRE_UPPERCASE", boolean);
        let require_lowercase = r.required("SECURITY_PASSWORD_REQUIRE_LOWERCASE", boolean);
        let require_number = r.required("SECURITY_PASSWORD_REQUIRE_NUMBER", boolean);
        let require_special = r.required("SECURITY_PASSWORD_REQUIRE_SPECIAL_CHAR", boolean);
        let max_attempts = r.required("BRUTE_FORCE_MAX_LOGIN_ATTEMPTS", whole::<u32>("a whole number"));
        let lockout_duration = r.required("BRUTE_FORCE_LOCKOUT_DURATION", duration);
        let session_idle = r.required("SESSION_IDLE_TIMEOUT", positive_duration);
        let session_max_age = r.required("SESSION_MAX_AGE", positive_duration);
        let oidc_issuer = r.optional("OIDC_ISSUER_URL", text);
        let oidc_client_id = r.optional("OIDC_CLIENT_ID", text);
        let oidc_client_secret = r.optional("OIDC_CLIENT_SECRET", text);
        let oidc_scopes = r.required("OIDC_SCOPES", |v| {
            Ok(v.split([' ', ',']).filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>())
        });
        let oidc_role_map = r.optional("OIDC_ROLE_MAP", Mapping::parse);
        let oidc_claim_map = r.optional("OIDC_CLAIM_MAP", Mapping::parse);
        let oidc_groups_claim = r.required("OIDC_GROUPS_CLAIM", text);
        let oidc_audience = r.optional("OIDC_AUDIENCE", text);
        let oidc_cli_client = r.optional("OIDC_CLI_CLIENT_ID", text);
        let oidc_id = r.required("OIDC_PROVIDER_ID", text);
        let oidc_name = r.required("OIDC_PROVIDER_NAME", text);
        let oidc_file = r.optional("OIDC_PROVIDERS_FILE", |v| {
            let text = std::fs::read_to_string(v).map_err(|e| format!("cannot be read ({e})"))?;
            hangar_identity::oidc::parse_providers_file(&text).map_err(|e| e.to_string())
        });
        let incremental = r.required("BRUTE_FORCE_INCREMENTAL_WAIT", boolean);

        // Rules between keys, checked when both values parsed.
        if let (Some(true), Some(cert), Some(key)) = (tls_enabled, &tls_certificate, &tls_private_key) {
            for (name, value) in [("TLS_CERTIFICATE", cert), ("TLS_PRIVATE_KEY", key)] {
                if value.is_none() {
                    r.problems.push(Problem {
                        key: name,
                        value: None,
                        source: None,
                        message: "TLS_ENABLED=true needs it (PEM text, base64 of the PEM, or a file path)".into(),
                    });
                }
            }
        }
        if let (Some(min), Some(max)) = (min_password, max_password)
            && min.max(MIN_PASSWORD_LENGTH_FLOOR) > max
        {
            r.problem(
                "SECURITY_PASSWORD_MAX_PASSWORD_LENGTH",
                &format!("is shorter than the shortest password ({})", min.max(MIN_PASSWORD_LENGTH_FLOOR)),
            );
        }

        let github_runners = github_runner_settings(&mut r);
        let database_folder = database_folder.map(|f| f.unwrap_or_else(crate::config::default_data_dir));
        let settings = (|| {
            let data = database_folder.clone()?;
            Some(Settings {
                http: HttpSettings {
                    host: api_host?,
                    port: api_port?,
                    prefix: api_prefix?,
                    body_limit: api_body_limit?,
                    header_read_timeout: api_header_read_timeout?,
                    max_connections_per_source: api_max_per_source?,
                    metrics_listener: match metrics_port? {
                        Some(p) => Some(std::net::SocketAddr::new(metrics_host?, p)),
                        None => None,
                    },
                },
                log: LogSettings {
                    filter: log_level?,
                    format: log_format?,
                    file: match (log_to_file?, log_to_file_alias?) {
                        (Some(true), _) | (None, Some(true)) => Some(
                            log_file_path?.or(log_file_path_alias?).unwrap_or_else(|| data.clone()).join("hangar.log"),
                        ),
                        _ => None,
                    },
                    otlp: match (otlp_endpoint?, otlp_service?, otlp_headers?) {
                        (Some(traces_url), service_name, headers) => {
                            Some(OtlpSettings { traces_url, service_name, headers: headers.unwrap_or_default() })
                        }
                        (None, ..) => None,
                    },
                },
                modules: {
                    let named = modules?.unwrap_or_default();
                    let mode: &[&'static str] = mode?.unwrap_or(&[]);
                    let (reference_names, mut requested): (Vec<_>, Vec<_>) =
                        named.into_iter().partition(|m| REFERENCE_MODULES.contains(m));
                    if reference_names.contains(&"cache") && !requested.contains(&"catalog") {
                        requested.push("catalog");
                    }
                    if requested.is_empty() && reference_names.is_empty() {
                        requested = mode.to_vec();
                    }
                    Modules { requested, reference_names }
                },
                host: HostSettings {
                    hypervisor: hypervisor?,
                    vms_folder: vms_folder?.unwrap_or_else(|| data.join("vms")),
                    images_folder: images_folder?.unwrap_or_else(|| data.join("images")),
                    upload_folder: upload_folder?,
                    prlctl: prlctl?,
                    prlsrvctl: prlsrvctl?,
                    qemu_binary: qemu_binary?,
                    acceleration: acceleration?,
                    bridge: bridge?,
                    reserved_cpu: reserved_cpu?,
                    reserved_memory_mb: reserved_memory?,
                    reserved_disk_mb: reserved_disk?,
                },
                orchestrator: OrchestratorSettings {
                    placement: placement?,
                    check_interval: check_interval?.max(CHECK_INTERVAL_FLOOR),
                    unhealthy_after: unhealthy_after?.max(UNHEALTHY_AFTER_FLOOR),
                    pools_file: pools_file?,
                },
                reverse_proxy: ReverseProxySettings {
                    tls_folder: proxy_tls_folder?,
                    allow_privileged_ports: proxy_privileged?,
                },
                identity: IdentitySettings {
                    root_password: root_password?,
                    root_password_file: root_password_file?,
                    jwt_algorithm: jwt_algorithm?,
                    jwt_duration: jwt_duration?,
                    jwt_hmac_secret: jwt_hmac_secret?,
                    jwt_private_key: jwt_private_key?,
                    jwt_issuer: jwt_issuer?,
                    jwt_audience: jwt_audience?,
                    password_policy: PasswordPolicy {
                        min_length: min_password?.max(MIN_PASSWORD_LENGTH_FLOOR),
                        max_length: max_password?,
                        require_uppercase: require_uppercase?,
                        require_lowercase: require_lowercase?,
                        require_number: require_number?,
                        require_special: require_special?,
                    },
                    lockout: LockoutPolicy {
                        max_attempts: max_attempts?,
                        duration: lockout_duration?,
                        incremental: incremental?,
                    },
                    sessions: SessionPolicy { idle: session_idle?, absolute: session_max_age? },
                    oidc: {
                        let mut list = Vec::new();
                        if let Some(issuer) = oidc_issuer?.filter(|i| !i.is_empty()) {
                            list.push(ProviderConfig {
                                id: oidc_id?,
                                name: oidc_name?,
                                issuer,
                                client_id: oidc_client_id?.unwrap_or_default(),
                                client_secret: oidc_client_secret?.filter(|s| !s.is_empty()).map(ClientSecret),
                                scopes: oidc_scopes?,
                                role_map: oidc_role_map?.unwrap_or_default(),
                                claim_map: oidc_claim_map?.unwrap_or_default(),
                                groups_claim: oidc_groups_claim?,
                                audience: oidc_audience?.filter(|s| !s.is_empty()),
                                cli_client_id: oidc_cli_client?.filter(|s| !s.is_empty()),
                            });
                        }
                        list.extend(oidc_file?.unwrap_or_default());
                        list
                    },
                },
                tls: TlsSettings {
                    enabled: tls_enabled?,
                    port: tls_port?,
                    certificate: tls_certificate?,
                    private_key: tls_private_key?,
                    disable_http: disable_http?,
                },
                database: DatabaseSettings {
                    folder: data,
                    url: database_url?,
                    encryption_key_file: encryption_key_file?,
                    backup_interval: backup_minutes
                        .map(|m| (m > 0).then(|| Duration::from_secs(m.saturating_mul(60))))?,
                    backups_kept: backups_kept?,
                },
                github_runners: github_runners?,
                catalog_cache: {
                    let mib = |v: Option<u64>| v.map(|m| m.saturating_mul(1 << 20));
                    let disabled = cache_disabled?;
                    CatalogCacheSettings {
                        folder: cache_folder?,
                        limits: hangar_catalog::hangar_image::CacheLimits {
                            max_bytes: if disabled { Some(0) } else { mib(cache_max?) },
                            keep_free_bytes: if cache_above_free? { None } else { mib(cache_keep_free?) },
                        },
                    }
                },
                cors: CorsConfig {
                    enabled: cors_enabled? || modules_named_cors,
                    allowed_origins: cors_origins?,
                    allowed_methods: cors_methods?.unwrap_or_default(),
                    allowed_headers: cors_headers?.unwrap_or_default(),
                },
            })
        })();
        match settings {
            Some(s) if r.problems.is_empty() => Ok(s),
            _ => {
                if r.problems.is_empty() {
                    // Every `None` above comes with a problem; this only guards the rule.
                    r.problems.push(Problem {
                        key: "settings",
                        value: None,
                        source: None,
                        message: "internal error: a setting failed without a reason; please report it".into(),
                    });
                }
                Err(SettingsError { problems: r.problems })
            }
        }
    }
}

/// `GITHUB_*` and `RUNNERS_*`: off without `GITHUB_APP_ID`; with it, the key file, the
/// webhook secret and the scope are needed too.
fn github_runner_settings(r: &mut Reader) -> Option<Option<GithubRunnerSettings>> {
    let app_id = r.optional("GITHUB_APP_ID", whole::<u64>("a GitHub App id (a whole number)"));
    let key = r.optional("GITHUB_APP_PRIVATE_KEY_FILE", |v| {
        std::fs::read_to_string(v).map_err(|e| format!("cannot be read ({e})"))
    });
    let secret = r.optional("GITHUB_WEBHOOK_SECRET", text);
    let api_url = r.required("GITHUB_API_URL", |v| {
        url::Url::parse(v)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .map(|_| v.trim_end_matches('/').to_string())
            .ok_or_else(|| "is not an http(s) URL".to_string())
    });
    let scope = r.optional("GITHUB_SCOPE", hangar_runners::github::Scope::parse);
    let installation = r.optional("GITHUB_INSTALLATION_ID", whole::<u64>("an installation id (a whole number)"));
    let group = r.required("GITHUB_RUNNER_GROUP_ID", whole::<u64>("a runner group id (a whole number)"));
    let dir = r.required("RUNNERS_GUEST_DIR", text);
    let check = r.required("RUNNERS_CHECK_INTERVAL", duration);
    let Some(app_id) = app_id? else { return Some(None) };
    let mut missing = false;
    for (name, set) in [
        ("GITHUB_APP_PRIVATE_KEY_FILE", matches!(key, Some(Some(_)))),
        ("GITHUB_WEBHOOK_SECRET", matches!(secret, Some(Some(ref s)) if !s.is_empty())),
        ("GITHUB_SCOPE", matches!(scope, Some(Some(_)))),
    ] {
        if !set {
            missing = true;
            r.problems.push(Problem {
                key: name,
                value: None,
                source: None,
                message: "GITHUB_APP_ID is set, so runners need it".into(),
            });
        }
    }
    if missing {
        return None;
    }
    Some(Some(GithubRunnerSettings {
        github: hangar_runners::github::GithubConfig {
            api_url: api_url?,
            app_id,
            private_key: hangar_runners::Secret::new(key??),
            webhook_secret: hangar_runners::Secret::new(secret??),
            scope: scope??,
            installation_id: installation?,
            runner_group_id: group?,
            max_rate_limit_wait: Duration::from_secs(15 * 60),
        },
        runners: hangar_runners::RunnersConfig {
            runner_dir: dir?,
            check_interval: check?.max(Duration::from_millis(200)),
            ..Default::default()
        },
    }))
}

/// The key table's default for `name` (empty: none).
fn table_default(name: &str) -> Option<&'static str> {
    KEYS.iter().find(|k| k.name == name).map(|k| k.default).filter(|d| !d.is_empty())
}

fn is_secret(name: &str) -> bool {
    KEYS.iter().any(|k| k.name == name && k.secret)
}

/// Reads keys and collects the problems.
struct Reader<'a> {
    layers: &'a Layers,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    /// The key's value and its source: the layered value, else the table's default.
    fn raw(&self, name: &'static str) -> Option<(String, Source)> {
        debug_assert!(KEYS.iter().any(|k| k.name == name), "{name} is not in KEYS");
        match self.layers.value(name) {
            Some((v, s)) => Some((v.to_string(), s)),
            None => table_default(name).map(|d| (d.to_string(), Source::Default)),
        }
    }

    /// A key that may be unset: `Some(None)` when it is, `None` when its value is bad (a
    /// problem is recorded).
    fn optional<T>(&mut self, name: &'static str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<Option<T>> {
        let Some((value, source)) = self.raw(name) else { return Some(None) };
        match parse(&value) {
            Ok(t) => Some(Some(t)),
            Err(message) => {
                let value = (!is_secret(name)).then_some(value);
                self.problems.push(Problem { key: name, value, source: Some(source), message });
                None
            }
        }
    }

    /// A key with a default in the table: `None` when its value is bad (a problem is recorded).
    fn required<T>(&mut self, name: &'static str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        match self.optional(name, parse)? {
            Some(t) => Some(t),
            None => {
                self.problems.push(Problem {
                    key: name,
                    value: None,
                    source: None,
                    message: "it has no default; give it a value".into(),
                });
                None
            }
        }
    }

    /// A problem with a key's current value, found by a rule between keys.
    fn problem(&mut self, name: &'static str, message: &str) {
        let (value, source) = match self.raw(name) {
            Some((v, s)) => ((!is_secret(name)).then_some(v), Some(s)),
            None => (None, None),
        };
        self.problems.push(Problem { key: name, value, source, message: message.to_string() });
    }
}

// ----- value parsers: Err is the predicate of the problem ("is not ...") -----

fn choice<T: Copy>(v: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices.iter().find(|(name, _)| name.eq_ignore_ascii_case(v)).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        match names.split_last() {
            Some((last, [])) => format!("is not {last}"),
            Some((last, [first])) => format!("is not {first} or {last}"),
            Some((last, rest)) => format!("is not one of {} or {last}", rest.join(", ")),
            None => "is not accepted".to_string(),
        }
    })
}

fn whole<T: FromStr>(what: &'static str) -> impl Fn(&str) -> Result<T, String> {
    move |v| v.parse().map_err(|_| format!("is not {what}"))
}

fn port(v: &str) -> Result<u16, String> {
    v.parse().map_err(|_| "is not a port number (0 to 65535; 0 takes any free port)".to_string())
}

fn ip(v: &str) -> Result<IpAddr, String> {
    v.parse().map_err(|_| "is not an IP address, such as 0.0.0.0, 127.0.0.1 or ::".to_string())
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("is not true or false".to_string()),
    }
}

/// A duration of at least a second.
fn positive_duration(v: &str) -> Result<Duration, String> {
    duration(v).and_then(|d| if d < Duration::from_secs(1) { Err("must be at least 1s".into()) } else { Ok(d) })
}

/// Seconds as a bare number, or a duration such as `30s`, `15m`, `1h`.
fn duration(v: &str) -> Result<Duration, String> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).map_err(|_| "is not a duration such as 30s, 15m or 1h".to_string())
}

fn prefix(v: &str) -> Result<String, String> {
    let p = v.trim_end_matches('/');
    if p.starts_with('/') && p.len() > 1 {
        Ok(p.to_string())
    } else {
        Err("is not a path prefix: start it with '/' and name a path, such as /api".to_string())
    }
}

fn path(v: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(v))
}

fn text(v: &str) -> Result<String, String> {
    Ok(v.to_string())
}

fn secret(v: &str) -> Result<Secret, String> {
    Ok(Secret(v.to_string()))
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: an http(s) base URL; the traces go to its path + `v1/traces`.
fn otlp_traces_url(v: &str) -> Result<url::Url, String> {
    let mut u = url::Url::parse(v).map_err(|e| format!("is not a URL ({e}), such as http://127.0.0.1:4318"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err("is not an http or https URL with a host, such as http://127.0.0.1:4318".to_string());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("holds a user name or password: send credentials with OTEL_EXPORTER_OTLP_HEADERS".to_string());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("has a query or fragment: give the collector's base URL, such as http://127.0.0.1:4318".to_string());
    }
    let path = format!("{}/v1/traces", u.path().trim_end_matches('/'));
    u.set_path(&path);
    Ok(u)
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `name=value` pairs separated by commas, values
/// percent-encoded (the OpenTelemetry format). A secret: no message quotes a value.
fn otlp_headers(v: &str) -> Result<Vec<(String, Secret)>, String> {
    let mut out = Vec::new();
    for (i, pair) in v.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
        let n = i + 1;
        let Some((name, value)) = pair.split_once('=') else {
            return Err(format!("is not a list of name=value pairs: pair {n} has no '='"));
        };
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
            return Err(format!("pair {n}'s name is not an HTTP header name"));
        }
        let value = percent_decode(value.trim())
            .filter(|d| !d.bytes().any(|b| b.is_ascii_control() && b != b'\t'))
            .ok_or_else(|| format!("pair {n}'s value is not percent-encoded text without control characters"))?;
        out.push((name.to_ascii_lowercase(), Secret(value)));
    }
    Ok(out)
}

fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The URL of the reference's `MYSQL_*` keys, user and password percent-encoded.
fn mysql_url(host: &str, port: u16, user: Option<&str>, password: Option<&str>, db: &str) -> Result<String, String> {
    let mut url = url::Url::parse("mysql://localhost/").map_err(|e| e.to_string())?;
    url.set_host(Some(host)).map_err(|e| format!("is not a host name or address ({e})"))?;
    let _ = url.set_port(Some(port));
    if let Some(user) = user {
        let _ = url.set_username(user);
    }
    if let Some(password) = password {
        let _ = url.set_password(Some(password));
    }
    url.path_segments_mut().map_err(|_| "cannot make a MySQL URL".to_string())?.pop_if_empty().push(db);
    Ok(url.to_string())
}

fn list(v: &str) -> Result<Vec<String>, String> {
    Ok(v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

/// The reference's module names that are not modules of their own here (see [`Modules`]).
pub const REFERENCE_MODULES: &[&str] = &["cors", "cache", "catalog_manager"];

fn modules(v: &str) -> Result<Vec<&'static str>, String> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match MODULES.iter().chain(REFERENCE_MODULES).find(|m| m.eq_ignore_ascii_case(name)) {
            Some(m) if !out.contains(m) => out.push(m),
            Some(_) => {}
            None => {
                return Err(format!(
                    "names an unknown module {name:?}; modules are {}, and the reference's {}",
                    MODULES.join(", "),
                    REFERENCE_MODULES.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// A level, or a tracing filter (`hangar_api=debug,info`) whose bare parts are levels.
fn log_filter(v: &str) -> Result<String, String> {
    let accepted = "is not trace, debug, info, warn, error or off, nor a tracing filter such as hangar_api=debug,info";
    let bare_parts_are_levels = v
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.contains(['=', '[']))
        .all(|p| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(p)));
    if !bare_parts_are_levels {
        return Err(accepted.to_string());
    }
    let filter = if LEVELS.iter().any(|l| l.eq_ignore_ascii_case(v)) { v.to_ascii_lowercase() } else { v.to_string() };
    tracing_subscriber::EnvFilter::try_new(&filter).map(|_| filter).map_err(|_| accepted.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn with_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let env = env_of(vars);
        Settings::from_layers(&Layers::load(None, &env, &[]).unwrap())
    }

    fn with_flags(flags: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let flags: Vec<(String, String)> = flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_layers(&Layers::load(None, &|_| None, &flags).unwrap())
    }

    #[test]
    fn otlp_export_keys() {
        assert_eq!(with_env(&[]).unwrap().log.otlp, None, "off unless the endpoint is set");
        let s = with_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]).unwrap();
        let o = s.log.otlp.unwrap();
        assert_eq!(o.traces_url.as_str(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(o.service_name, "hangar");
        assert!(o.headers.is_empty());
        let s = with_env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.example:4318/base/"),
            ("OTEL_SERVICE_NAME", "hangar-eu"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20sekrit, x-tenant=a"),
        ])
        .unwrap();
        let o = s.log.otlp.unwrap();
        assert_eq!(o.traces_url.as_str(), "https://otel.example:4318/base/v1/traces");
        assert_eq!(o.service_name, "hangar-eu");
        let h: Vec<(&str, &str)> = o.headers.iter().map(|(n, v)| (n.as_str(), v.expose())).collect();
        assert_eq!(h, [("authorization", "Bearer sekrit"), ("x-tenant", "a")]);
        assert!(!format!("{o:?}").contains("sekrit"), "header values are secrets");
        for bad in ["127.0.0.1:4318", "ftp://h/", "http://h:4318/?q=1", "http://u:sekrit@h:4318"] {
            let e = with_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]).unwrap_err().to_string();
            assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
        }
        for bad in ["authorization", "a b=c", "x=%zz-sekrit"] {
            let e = with_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h"), ("OTEL_EXPORTER_OTLP_HEADERS", bad)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("OTEL_EXPORTER_OTLP_HEADERS") && !e.contains("sekrit"), "{e}");
        }
    }

    #[test]
    fn database_url_and_the_reference_mysql_keys() {
        assert_eq!(with_env(&[]).unwrap().database.url, None, "the JSON engine is the default");
        let url = "postgres://hangar:pw@db:5432/hangar";
        let s = with_env(&[("DATABASE_URL", url)]).unwrap();
        assert_eq!(s.database.url.as_ref().map(Secret::expose), Some(url));
        assert!(!format!("{:?}", s.database).contains("pw@"), "the URL is a secret");
        let e = with_env(&[("DATABASE_URL", "sqlite:///x?pw=hidden")]).unwrap_err().to_string();
        assert!(e.contains("DATABASE_URL") && e.contains("postgres://") && !e.contains("hidden"), "{e}");
        let s = with_env(&[
            ("MYSQL_HOST", "db.internal"),
            ("MYSQL_USER", "hangar"),
            ("MYSQL_PASSWORD", "p@ss/word"),
            ("MYSQL_DATABASE", "hangar"),
        ])
        .unwrap();
        let made = s.database.url.as_ref().map(Secret::expose).unwrap().to_string();
        assert_eq!(made, "mysql://hangar:p%40ss%2Fword@db.internal:3306/hangar");
        assert_eq!(with_env(&[("MYSQL_HOST", "db.internal")]).unwrap().database.url, None, "no MYSQL_DATABASE");
        let e = with_env(&[("DATABASE_URL", url), ("MYSQL_DATABASE", "x")]).unwrap_err().to_string();
        assert!(e.contains("MYSQL_DATABASE"), "{e}");
    }

    #[test]
    fn log_to_file_takes_the_reference_names_too() {
        assert_eq!(with_env(&[]).unwrap().log.file, None);
        let s = with_env(&[("LOG_TO_FILE", "true"), ("DATABASE_FOLDER", "/srv/hangar")]).unwrap();
        assert_eq!(s.log.file, Some(PathBuf::from("/srv/hangar/hangar.log")));
        let s = with_env(&[("PRL_DEVOPS_LOG_TO_FILE", "true"), ("PRL_DEVOPS_LOG_FILE_PATH", "/var/log/x")]).unwrap();
        assert_eq!(s.log.file, Some(PathBuf::from("/var/log/x/hangar.log")));
        let s = with_env(&[("LOG_TO_FILE", "false"), ("PRL_DEVOPS_LOG_TO_FILE", "true")]).unwrap();
        assert_eq!(s.log.file, None, "LOG_TO_FILE wins");
        let s =
            with_env(&[("LOG_TO_FILE", "on"), ("LOG_FILE_PATH", "/a"), ("PRL_DEVOPS_LOG_FILE_PATH", "/b")]).unwrap();
        assert_eq!(s.log.file, Some(PathBuf::from("/a/hangar.log")));
        assert!(with_env(&[("LOG_TO_FILE", "maybe")]).is_err());
    }

    #[test]
    fn mode_reference_modules_and_the_catalog_cache_keys() {
        let s = with_env(&[("MODE", "orchestrator")]).unwrap();
        assert!(s.modules.wants("orchestrator") && !s.modules.wants("host") && !s.modules.wants("catalog"));
        let s = with_env(&[("MODE", "catalog"), ("ENABLED_MODULES", "host")]).unwrap();
        assert!(s.modules.wants("host") && !s.modules.wants("catalog"), "ENABLED_MODULES wins over MODE");
        let s = with_env(&[("MODE", "api")]).unwrap();
        assert!(!s.modules.explicit());
        assert!(with_env(&[("MODE", "host")]).is_err());
        let s = with_env(&[("ENABLED_MODULES", "CORS,cache,catalog_manager"), ("ENABLE_CORS", "false")]).unwrap();
        assert!(s.cors.enabled && s.modules.wants("catalog") && !s.modules.wants("host"));
        assert_eq!(s.modules.reference_names, ["cors", "cache", "catalog_manager"]);
        let e = with_env(&[("ENABLED_MODULES", "api,catalog_managers")]).unwrap_err().to_string();
        assert!(e.contains("catalog_managers") && e.contains("catalog_manager"), "{e}");

        let s = with_env(&[]).unwrap();
        assert_eq!(s.catalog_cache, CatalogCacheSettings { folder: None, limits: Default::default() });
        let s = with_env(&[
            ("CATALOG_CACHE_FOLDER", "/srv/cache"),
            ("CATALOG_CACHE_KEEP_FREE_DISK_SPACE", "5000"),
            ("CATALOG_CACHE_MAX_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(s.catalog_cache.folder, Some(PathBuf::from("/srv/cache")));
        assert_eq!(s.catalog_cache.limits.keep_free_bytes, Some(5000 << 20));
        assert_eq!(s.catalog_cache.limits.max_bytes, Some(2 << 20));
        let s = with_env(&[
            ("DISABLE_CATALOG_CACHING", "true"),
            ("CATALOG_CACHE_MAX_SIZE", "2"),
            ("CATALOG_CACHE_KEEP_FREE_DISK_SPACE", "5000"),
            ("CATALOG_CACHE_ALLOW_CACHE_ABOVE_FREE_DISK_SPACE", "true"),
        ])
        .unwrap();
        assert_eq!(s.catalog_cache.limits.max_bytes, Some(0), "caching off keeps no chunk");
        assert_eq!(s.catalog_cache.limits.keep_free_bytes, None, "allowed above the free-space floor");
        let e = with_env(&[("CATALOG_CACHE_MAX_SIZE", "lots")]).unwrap_err().to_string();
        assert!(e.contains("CATALOG_CACHE_MAX_SIZE=\"lots\""), "{e}");
    }

    #[test]
    fn defaults_come_from_the_key_table() {
        let s = with_env(&[]).unwrap();
        let d = |name: &str| table_default(name).unwrap();
        assert_eq!(s.http.port.to_string(), d("API_PORT"));
        assert_eq!(s.http.host.to_string(), d("API_HOST"));
        assert_eq!(s.http.prefix, d("API_PREFIX"));
        assert_eq!(s.http.body_limit.to_string(), d("API_BODY_LIMIT"));
        assert_eq!(s.log.filter, d("LOG_LEVEL"));
        assert_eq!(s.log.format, LogFormat::Text);
        assert_eq!(d("LOG_FORMAT"), "text");
        assert!(!s.modules.explicit() && MODULES.iter().all(|m| s.modules.wants(m)));
        assert_eq!(s.host.hypervisor, DriverChoice::from_str(d("HYPERVISOR")).unwrap());
        assert_eq!(s.host.acceleration, Acceleration::Auto);
        assert_eq!(d("QEMU_ACCELERATION"), "auto");
        assert_eq!(s.host.reserved_cpu.to_string(), d("SYSTEM_RESERVED_CPU"));
        assert_eq!(s.host.reserved_memory_mb.to_string(), d("SYSTEM_RESERVED_MEMORY"));
        assert_eq!(s.host.reserved_disk_mb.to_string(), d("SYSTEM_RESERVED_DISK"));
        assert_eq!(s.host.vms_folder, s.database.folder.join("vms"));
        assert_eq!(s.host.images_folder, s.database.folder.join("images"));
        assert_eq!(s.orchestrator.placement, Profile::Spread);
        assert_eq!(d("ORCHESTRATOR_PLACEMENT"), "spread");
        assert_eq!(Ok(s.orchestrator.check_interval), duration(d("ORCHESTRATOR_CHECK_INTERVAL")));
        assert_eq!(Ok(s.orchestrator.unhealthy_after), duration(d("ORCHESTRATOR_UNHEALTHY_AFTER")));
        assert_eq!(s.identity.jwt_algorithm, JwtAlgorithm::from_str(d("JWT_SIGN_ALGORITHM")).unwrap());
        assert_eq!(Ok(s.identity.jwt_duration), duration(d("JWT_DURATION")));
        assert_eq!(s.identity.jwt_issuer, d("JWT_ISSUER"));
        assert_eq!(s.identity.jwt_audience, d("JWT_AUDIENCE"));
        assert_eq!(s.identity.password_policy.min_length.to_string(), d("SECURITY_PASSWORD_MIN_PASSWORD_LENGTH"));
        assert_eq!(s.identity.password_policy.max_length.to_string(), d("SECURITY_PASSWORD_MAX_PASSWORD_LENGTH"));
        assert_eq!(s.identity.lockout.max_attempts.to_string(), d("BRUTE_FORCE_MAX_LOGIN_ATTEMPTS"));
        assert_eq!(Ok(s.identity.lockout.duration), duration(d("BRUTE_FORCE_LOCKOUT_DURATION")));
        assert_eq!(s.tls.enabled.to_string(), d("TLS_ENABLED"));
        assert_eq!(s.tls.port.to_string(), d("TLS_PORT"));
        assert_eq!(s.tls.disable_http.to_string(), d("DISABLE_HTTP_WHEN_TLS"));
        let minutes: u64 = d("DATABASE_BACKUP_INTERVAL_MINUTES").parse().unwrap();
        assert_eq!(s.database.backup_interval, Some(Duration::from_secs(minutes * 60)));
        assert_eq!(s.database.backups_kept.to_string(), d("DATABASE_NUMBER_BACKUP_FILES"));
        assert_eq!(s.cors.enabled.to_string(), d("ENABLE_CORS"));
        assert_eq!(s.cors.allowed_origins, vec![d("CORS_ALLOWED_ORIGINS").to_string()]);
        assert!(s.identity.root_password.is_none() && s.tls.certificate.is_none());
    }

    #[test]
    fn an_empty_value_is_unset_and_takes_the_table_default() {
        let s = with_env(&[("API_PORT", ""), ("QEMU_ACCELERATION", "  ")]).unwrap();
        assert_eq!(s.http.port.to_string(), table_default("API_PORT").unwrap());
        assert_eq!(s.host.acceleration, Acceleration::Auto);
    }

    #[test]
    fn every_enum_key_refuses_a_typo() {
        for (key, typo, accepted) in [
            ("QEMU_ACCELERATION", "kvmm", "auto, kvm or tcg"),
            ("HYPERVISOR", "qemuu", "auto, qemu or parallels"),
            ("ORCHESTRATOR_PLACEMENT", "spred", "spread or pack"),
            ("LOG_FORMAT", "jsonn", "text or json"),
            ("JWT_SIGN_ALGORITHM", "HS257", "HS256, HS384, HS512, RS256, RS384, RS512 or EdDSA"),
            ("LOG_LEVEL", "infoo", "trace, debug, info, warn, error or off"),
            ("LOG_LEVEL", "hangar=debug,inf", "trace, debug, info, warn, error or off"),
            ("ENABLED_MODULES", "api,hots", "api, host, catalog, orchestrator, reverse_proxy"),
            ("TLS_ENABLED", "ture", "true or false"),
            ("ENABLE_CORS", "yess", "true or false"),
            ("BRUTE_FORCE_INCREMENTAL_WAIT", "treu", "true or false"),
        ] {
            let e = with_env(&[(key, typo)]).unwrap_err();
            assert_eq!(e.problems.len(), 1, "{key}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(key) && msg.contains(&format!("{typo:?}")) && msg.contains(accepted), "{msg}");
            assert!(msg.contains("environment"), "{msg}");
        }
        // The accepted spellings, any case.
        let s = with_env(&[
            ("QEMU_ACCELERATION", "KVM"),
            ("HYPERVISOR", "parallels"),
            ("ORCHESTRATOR_PLACEMENT", "Pack"),
            ("LOG_FORMAT", "json"),
            ("JWT_SIGN_ALGORITHM", "eddsa"),
            ("LOG_LEVEL", "hangar_api=debug,warn"),
            ("ENABLED_MODULES", "api, host,host"),
        ])
        .unwrap();
        assert_eq!(s.host.acceleration, Acceleration::Kvm);
        assert_eq!(s.host.hypervisor, DriverChoice::Parallels);
        assert_eq!(s.orchestrator.placement, Profile::Pack);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.identity.jwt_algorithm, JwtAlgorithm::EdDSA);
        assert_eq!(s.log.filter, "hangar_api=debug,warn");
        assert!(s.modules.explicit() && s.modules.wants("host") && !s.modules.wants("catalog"));
        assert!(s.modules.wants("api"));
        assert_eq!(with_env(&[("LOG_LEVEL", "DEBUG")]).unwrap().log.filter, "debug");
    }

    #[test]
    fn all_problems_are_reported_together() {
        let e = with_env(&[
            ("QEMU_ACCELERATION", "kvmm"),
            ("API_PORT", "70000"),
            ("JWT_DURATION", "forever"),
            ("SYSTEM_RESERVED_MEMORY", "lots"),
            ("API_PREFIX", "api"),
            ("API_HOST", "localhost"),
            ("JWT_HMACS_SECRET", "short-and-secret"),
        ])
        .unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key).collect();
        for k in [
            "QEMU_ACCELERATION",
            "API_PORT",
            "JWT_DURATION",
            "SYSTEM_RESERVED_MEMORY",
            "API_PREFIX",
            "API_HOST",
            "JWT_HMACS_SECRET",
        ] {
            assert!(keys.contains(&k), "{k} missing from {e}");
        }
        assert_eq!(e.problems.len(), 7, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("7 problems") && msg.contains("\"70000\"") && msg.contains("\"forever\""), "{msg}");
        // A secret's value is never repeated.
        assert!(!msg.contains("short-and-secret") && msg.contains("JWT_HMACS_SECRET"), "{msg}");
    }

    #[test]
    fn rules_between_keys_are_problems_too() {
        let e = with_flags(&[("TLS_ENABLED", "true")]).unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key).collect();
        assert_eq!(keys, ["TLS_CERTIFICATE", "TLS_PRIVATE_KEY"], "{e}");
        let e = with_flags(&[
            ("SECURITY_PASSWORD_MIN_PASSWORD_LENGTH", "40"),
            ("SECURITY_PASSWORD_MAX_PASSWORD_LENGTH", "20"),
        ])
        .unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(e.to_string().contains("SECURITY_PASSWORD_MAX_PASSWORD_LENGTH=\"20\""), "{e}");
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "qemu_acceleration = \"tcg\"\napi_port = 4000\norchestrator_placement = \"pack\"\n")
            .unwrap();
        let file_only = Settings::from_layers(&Layers::load(Some(&f), &|_| None, &[]).unwrap()).unwrap();
        assert_eq!(file_only.host.acceleration, Acceleration::Tcg);
        assert_eq!(file_only.http.port, 4000);
        assert_eq!(file_only.orchestrator.placement, Profile::Pack);

        let env = env_of(&[("QEMU_ACCELERATION", "kvm"), ("API_PORT", "5000")]);
        let with_env = Settings::from_layers(&Layers::load(Some(&f), &env, &[]).unwrap()).unwrap();
        assert_eq!(with_env.host.acceleration, Acceleration::Kvm);
        assert_eq!(with_env.http.port, 5000);
        assert_eq!(with_env.orchestrator.placement, Profile::Pack);

        let flags = vec![("qemu-acceleration".to_string(), "auto".to_string())];
        let with_flags = Settings::from_layers(&Layers::load(Some(&f), &env, &flags).unwrap()).unwrap();
        assert_eq!(with_flags.host.acceleration, Acceleration::Auto);
        assert_eq!(with_flags.http.port, 5000);

        // A bad value names where it came from.
        let flags = vec![("QEMU_ACCELERATION".to_string(), "kvmm".to_string())];
        let e = Settings::from_layers(&Layers::load(Some(&f), &env, &flags).unwrap()).unwrap_err();
        assert!(e.to_string().contains("(from the flag)"), "{e}");
        std::fs::write(&f, "qemu_acceleration = \"kvmm\"\n").unwrap();
        let e = Settings::from_layers(&Layers::load(Some(&f), &|_| None, &[]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("(from the config file)"), "{e}");
    }

    #[test]
    fn typed_values_and_floors() {
        let s = with_env(&[
            ("ORCHESTRATOR_CHECK_INTERVAL", "10ms"),
            ("ORCHESTRATOR_UNHEALTHY_AFTER", "1"),
            ("SECURITY_PASSWORD_MIN_PASSWORD_LENGTH", "4"),
            ("DATABASE_BACKUP_INTERVAL_MINUTES", "0"),
            ("DATABASE_FOLDER", "/srv/hangar"),
            ("HOST_IMAGES_FOLDER", "/srv/images"),
            ("API_PREFIX", "/v/"),
            ("CORS_ALLOWED_METHODS", "GET, POST"),
            ("ROOT_PASSWORD", "hunter2-Hunter2"),
        ])
        .unwrap();
        assert_eq!(s.orchestrator.check_interval, CHECK_INTERVAL_FLOOR);
        assert_eq!(s.orchestrator.unhealthy_after, UNHEALTHY_AFTER_FLOOR);
        assert_eq!(s.identity.password_policy.min_length, MIN_PASSWORD_LENGTH_FLOOR);
        assert_eq!(s.database.backup_interval, None);
        assert_eq!(s.host.vms_folder, PathBuf::from("/srv/hangar/vms"));
        assert_eq!(s.host.images_folder, PathBuf::from("/srv/images"));
        assert_eq!(s.http.prefix, "/v");
        assert_eq!(s.cors.allowed_methods, ["GET", "POST"]);
        assert_eq!(s.identity.root_password.as_ref().map(Secret::expose), Some("hunter2-Hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn api_listener_limits_and_catalog_roots_are_checked() {
        let s = with_env(&[]).unwrap();
        assert_eq!(Ok(s.http.header_read_timeout), duration(table_default("API_HEADER_READ_TIMEOUT").unwrap()));
        assert_eq!(
            s.http.max_connections_per_source.to_string(),
            table_default("API_MAX_CONNECTIONS_PER_SOURCE").unwrap()
        );
        let e = with_env(&[
            ("API_HEADER_READ_TIMEOUT", "1ms"),
            ("API_MAX_CONNECTIONS_PER_SOURCE", "0"),
            ("CATALOG_LOCAL_ROOTS", "/srv/catalog, relative/catalog"),
        ])
        .unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key).collect();
        for key in ["API_HEADER_READ_TIMEOUT", "API_MAX_CONNECTIONS_PER_SOURCE", "CATALOG_LOCAL_ROOTS"] {
            assert!(keys.contains(&key), "{key} not reported: {e}");
        }
        assert!(with_env(&[("CATALOG_LOCAL_ROOTS", "/srv/a,/srv/b")]).is_ok());
    }
}
