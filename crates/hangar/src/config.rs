//! Server configuration, in rising precedence: a config file (the reference's YAML or JSON
//! with its `environment:` map, or TOML), the reference's `--KEY=value` flags, environment
//! variables, then Hangar's `--set`/`--port`/`--data-dir` flags ([`Layers::load_all`]).
//! Keys are the reference service's names (`API_PORT`, `DATABASE_FOLDER`, ...); in a file
//! they may be written in lower case. The reference's keys Hangar does not honour are in
//! [`REFERENCE_ONLY`] with the reason; any other unknown key is an error. Every key is listed in [`KEYS`]
//! with its default and meaning, which is also what the README's configuration table
//! shows (`hangar config keys`). [`Layers`] holds the raw values given; the typed
//! settings, with the defaults of this table, are parsed from them once, in
//! `crate::settings`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A configuration key: name, default (empty: none), meaning. The default is the only one:
/// `crate::settings` reads it when the key is unset or empty.
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    pub secret: bool,
}

const fn k(name: &'static str, default: &'static str, help: &'static str) -> Key {
    Key { name, default, help, secret: false }
}
const fn s(name: &'static str, help: &'static str) -> Key {
    Key { name, default: "", help, secret: true }
}

pub const KEYS: &[Key] = &[
    k("API_PORT", "3080", "HTTP port"),
    k("API_HOST", "0.0.0.0", "Address the HTTP and HTTPS listeners bind"),
    k("API_PREFIX", "/api", "Prefix of every API route; routes are served at PREFIX/v1/... and PREFIX/..."),
    k("API_BODY_LIMIT", "1048576", "Largest accepted request body, in bytes"),
    k(
        "API_HEADER_READ_TIMEOUT",
        "10s",
        "Longest time a client of the HTTP/HTTPS listeners may take to send a request's headers (or the TLS handshake), and the longest an open connection may stay idle between requests; then it is closed",
    ),
    k(
        "API_MAX_CONNECTIONS_PER_SOURCE",
        "512",
        "Most connections one source IP address may hold open to the HTTP/HTTPS listeners at once; further ones are closed at once",
    ),
    k(
        "METRICS_PORT",
        "",
        "Port of a second listener that serves only GET /metrics, without authentication (for private networks); unset: /metrics is served on the API ports only, to callers with METRICS_READ",
    ),
    k("METRICS_HOST", "127.0.0.1", "Address the METRICS_PORT listener binds"),
    k("LOG_LEVEL", "info", "trace, debug, info, warn or error (or a tracing filter)"),
    k("LOG_FORMAT", "text", "text or json"),
    k(
        "LOG_TO_FILE",
        "",
        "true: also write the log to the file hangar.log in LOG_FILE_PATH (appended; GET /logs then answers from it)",
    ),
    k("PRL_DEVOPS_LOG_TO_FILE", "", "The reference's name of LOG_TO_FILE (LOG_TO_FILE wins when both are set)"),
    k("LOG_FILE_PATH", "", "Folder of hangar.log when LOG_TO_FILE is on; default the data folder"),
    k("PRL_DEVOPS_LOG_FILE_PATH", "", "The reference's name of LOG_FILE_PATH (LOG_FILE_PATH wins when both are set)"),
    k(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "Base URL (http or https) of an OpenTelemetry collector: the server's spans are exported as traces over OTLP/HTTP (protobuf) to its path + /v1/traces; unset: no export",
    ),
    k("OTEL_SERVICE_NAME", "hangar", "The service.name of the exported traces"),
    s(
        "OTEL_EXPORTER_OTLP_HEADERS",
        "Headers sent with every OTLP export, as name=value pairs separated by commas (values percent-encoded), such as authorization=Bearer%20abc",
    ),
    k(
        "ENABLED_MODULES",
        "",
        "Comma list of modules (api, host, catalog, orchestrator, reverse_proxy); empty: every module this machine supports",
    ),
    k("HYPERVISOR", "auto", "Hypervisor driver of the host module: auto, qemu or parallels"),
    k("HOST_VMS_FOLDER", "", "Folder of the QEMU driver's VMs; default <data folder>/vms"),
    k(
        "HOST_IMAGES_FOLDER",
        "",
        "Folder of local images (one sub-folder per image, created from by name); default <data folder>/images",
    ),
    k(
        "HOST_UPLOAD_FOLDER",
        "",
        "Folder whose files POST /machines/{id}/upload may copy into guests; unset: host-path uploads are disabled",
    ),
    k(
        "PRLCTL_PATH",
        "",
        "Path of prlctl (default: found on PATH); prlsrvctl is looked up beside it unless PRLSRVCTL_PATH is set",
    ),
    k("PRLSRVCTL_PATH", "", "Path of prlsrvctl"),
    k(
        "CATALOG_LOCAL_ROOTS",
        "",
        "Comma list of absolute folders that local-storage catalog providers given by API callers (push, import, a new connection) must lie in; SUPER_USERs may name any folder; default <data folder>/catalog",
    ),
    k(
        "MODE",
        "",
        "The reference's older module switch: api (every module this machine supports), orchestrator or catalog; ENABLED_MODULES wins when both are set, and also accepts the reference's cors, cache and catalog_manager",
    ),
    k(
        "CATALOG_CACHE_FOLDER",
        "",
        "Folder of the host image cache (images/ and chunks/ of pulled catalog images); default <data folder>/catalog-cache",
    ),
    k(
        "DISABLE_CATALOG_CACHING",
        "false",
        "true: the host image cache keeps no chunks (every pull downloads them again); the unpacked image of each entry's current version stays, as it is the source VMs are cloned from",
    ),
    k(
        "CATALOG_CACHE_KEEP_FREE_DISK_SPACE",
        "",
        "MiB the host image cache leaves free on its file system (evicting least recently used chunks); empty: no floor",
    ),
    k("CATALOG_CACHE_MAX_SIZE", "", "Largest size of the host image cache's chunks, in MiB; empty: no limit"),
    k(
        "CATALOG_CACHE_ALLOW_CACHE_ABOVE_FREE_DISK_SPACE",
        "false",
        "true: ignore CATALOG_CACHE_KEEP_FREE_DISK_SPACE (the cache may fill the disk up to CATALOG_CACHE_MAX_SIZE)",
    ),
    k("QEMU_BINARY", "", "Path of qemu-system-x86_64 (default: found on PATH)"),
    k("QEMU_ACCELERATION", "auto", "auto (KVM when a real probe works, TCG otherwise), kvm or tcg"),
    k(
        "QEMU_NETWORK_BRIDGE",
        "",
        "Bridge new QEMU VMs join (allowed in /etc/qemu/bridge.conf; a DHCP server on it gives their IPs); empty: user-mode networking",
    ),
    k("SYSTEM_RESERVED_CPU", "1", "CPUs kept for the host, not offered to VMs"),
    k("SYSTEM_RESERVED_MEMORY", "2048", "Memory (MiB) kept for the host"),
    k("SYSTEM_RESERVED_DISK", "20000", "Disk (MiB) kept for the host"),
    k("ORCHESTRATOR_PLACEMENT", "spread", "Orchestrator placement: spread (least loaded host first) or pack"),
    k(
        "ORCHESTRATOR_CHECK_INTERVAL",
        "2s",
        "How often the orchestrator probes each host (besides its event stream's pings)",
    ),
    k("ORCHESTRATOR_UNHEALTHY_AFTER", "10s", "Silence after which the orchestrator marks a host unhealthy"),
    k(
        "RUNNER_POOLS_FILE",
        "",
        "YAML/JSON list of runner pools applied at every start (created, or updated where they differ: the file wins over API edits; pools it does not name are kept)",
    ),
    k(
        "GITHUB_APP_ID",
        "",
        "GitHub App id for ephemeral GitHub Actions runners (one VM per workflow_job); unset: runners are off",
    ),
    k("GITHUB_APP_PRIVATE_KEY_FILE", "", "PEM file of the GitHub App's private key (RS256)"),
    s("GITHUB_WEBHOOK_SECRET", "Secret of the GitHub App's webhook (X-Hub-Signature-256)"),
    k(
        "GITHUB_API_URL",
        "https://api.github.com",
        "GitHub REST API root: https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise Server",
    ),
    k("GITHUB_SCOPE", "", "Where runners register: repo:OWNER/NAME, org:NAME or enterprise:SLUG"),
    k("GITHUB_INSTALLATION_ID", "", "The app's installation id (looked up from GITHUB_SCOPE when unset)"),
    k("GITHUB_RUNNER_GROUP_ID", "1", "Runner group of the just-in-time runners (1: the default group)"),
    k(
        "RUNNERS_GUEST_DIR",
        "actions-runner",
        "The runner's folder (with run.sh) in the guest, relative to the guest user's home or absolute",
    ),
    k("RUNNERS_CHECK_INTERVAL", "5s", "How often runners are checked and queued CI jobs retried"),
    k(
        "REVERSE_PROXY_TLS_FOLDER",
        "",
        "The only folder whose files proxy hosts' tls.cert/tls.key may name as paths; unset: paths are refused (PEM text only)",
    ),
    k(
        "REVERSE_PROXY_ALLOW_PRIVILEGED_PORTS",
        "false",
        "Let proxy hosts created over the API listen on ports below 1024",
    ),
    s(
        "ROOT_PASSWORD",
        "Password of the root user, set at every start; when unset a password is generated at first start and printed once",
    ),
    k("ROOT_PASSWORD_FILE", "", "File holding the root password (instead of ROOT_PASSWORD)"),
    k("JWT_SIGN_ALGORITHM", "HS256", "HS256, HS384, HS512, RS256, RS384, RS512 or EdDSA"),
    k("JWT_DURATION", "15m", "Token lifetime (e.g. 15m, 1h)"),
    s("JWT_HMACS_SECRET", "HMAC secret (at least 32 bytes); generated into the data folder when unset"),
    s(
        "JWT_PRIVATE_KEY",
        "PEM private key for RS*/EdDSA: PEM text, base64 of the PEM, or a file path; EdDSA generates one when unset",
    ),
    k("JWT_ISSUER", "hangar", "The tokens' iss claim"),
    k("JWT_AUDIENCE", "hangar-api", "The tokens' aud claim"),
    k("TLS_ENABLED", "false", "Serve HTTPS on TLS_PORT"),
    k("TLS_PORT", "443", "HTTPS port"),
    s("TLS_CERTIFICATE", "Certificate chain: PEM text, base64 of the PEM, or a file path"),
    s("TLS_PRIVATE_KEY", "Private key of the certificate: PEM text, base64 of the PEM, or a file path"),
    k("DISABLE_HTTP_WHEN_TLS", "false", "With TLS enabled, serve HTTPS only"),
    k("DATABASE_FOLDER", "", "Data folder; default /var/lib/hangar for root, ~/.local/share/hangar otherwise"),
    s(
        "DATABASE_URL",
        "Keep the store in PostgreSQL (postgres://USER:PASSWORD@HOST:PORT/DB) or MySQL/MariaDB (mysql://... or mariadb://...) instead of the JSON engine in the data folder; unset: the JSON engine",
    ),
    k(
        "MYSQL_HOST",
        "localhost",
        "The reference's MySQL keys: with MYSQL_DATABASE set, the store is that MySQL/MariaDB database on this host",
    ),
    k("MYSQL_PORT", "3306", "Port of MYSQL_HOST"),
    k("MYSQL_USER", "", "MySQL/MariaDB user (with MYSQL_DATABASE)"),
    s("MYSQL_PASSWORD", "MySQL/MariaDB password (with MYSQL_DATABASE)"),
    k(
        "MYSQL_DATABASE",
        "",
        "MySQL/MariaDB database; set it (or DATABASE_URL) to keep the store there; unset: the JSON engine",
    ),
    k(
        "DATABASE_ENCRYPTION_KEY_FILE",
        "",
        "Key file that encrypts the store at rest (AES-256-GCM; 32 bytes raw, hex or base64); with a SQL database, the record values",
    ),
    k(
        "DATABASE_BACKUP_INTERVAL_MINUTES",
        "120",
        "Minutes between store backups (JSON engine only: back a SQL database up with its own tools); 0 disables scheduled backups",
    ),
    k("DATABASE_NUMBER_BACKUP_FILES", "10", "Backups kept"),
    k("ENABLE_CORS", "true", "Answer CORS preflight requests"),
    k("CORS_ALLOWED_ORIGINS", "*", "Comma list of allowed origins"),
    k("CORS_ALLOWED_METHODS", "", "Comma list of allowed methods (default GET, POST, PUT, PATCH, DELETE, OPTIONS)"),
    k("CORS_ALLOWED_HEADERS", "", "Comma list of extra allowed headers"),
    k("SECURITY_PASSWORD_MIN_PASSWORD_LENGTH", "12", "Shortest password"),
    k("SECURITY_PASSWORD_MAX_PASSWORD_LENGTH", "128", "Longest password"),
    k("SECURITY_PASSWORD_REQUIRE_UPPERCASE", "true", "Passwords need an upper-case letter"),
    k("SECURITY_PASSWORD_REQUIRE_LOWERCASE", "true", "Passwords need a lower-case letter"),
    k("SECURITY_PASSWORD_REQUIRE_NUMBER", "true", "Passwords need a digit"),
    k("SECURITY_PASSWORD_REQUIRE_SPECIAL_CHAR", "true", "Passwords need a special character"),
    k("BRUTE_FORCE_MAX_LOGIN_ATTEMPTS", "5", "Failed logins from one address before it is locked out of that account"),
    k("BRUTE_FORCE_LOCKOUT_DURATION", "5m", "How long a source address stays locked out of an account"),
    k("BRUTE_FORCE_INCREMENTAL_WAIT", "true", "Double the wait for each further lockout of that address and account"),
    k("SESSION_IDLE_TIMEOUT", "8h", "A browser session unused this long ends"),
    k("SESSION_MAX_AGE", "24h", "A browser session ends this long after its login, used or not"),
    k(
        "OIDC_ISSUER_URL",
        "",
        "Single sign-on: the OpenID provider's issuer URL (its tokens' iss); empty: no OIDC provider from these keys",
    ),
    k("OIDC_CLIENT_ID", "", "Single sign-on: this server's client id at the provider"),
    s("OIDC_CLIENT_SECRET", "Single sign-on: the client's secret (empty for a public client)"),
    k("OIDC_SCOPES", "openid profile email", "Single sign-on: scopes asked for at login (space or comma separated)"),
    k(
        "OIDC_ROLE_MAP",
        "",
        "Single sign-on: provider claims to Hangar roles, [claim:]value=ROLE[|ROLE] separated by commas (a bare value is a group; * is anyone), e.g. admins=SUPER_USER,*=USER",
    ),
    k("OIDC_CLAIM_MAP", "", "Single sign-on: provider claims to Hangar claims, in the OIDC_ROLE_MAP syntax"),
    k("OIDC_GROUPS_CLAIM", "groups", "Single sign-on: the token claim that lists the user's groups"),
    k(
        "OIDC_AUDIENCE",
        "",
        "Single sign-on: the aud machines' access tokens must carry (a resource indicator); the client id when empty",
    ),
    k(
        "OIDC_CLI_CLIENT_ID",
        "",
        "Single sign-on: the public client 'hangar login --sso' uses (device grant, or a loopback redirect with --browser); the client id when empty",
    ),
    k("OIDC_PROVIDER_ID", "sso", "Single sign-on: the id (in URLs) of the provider the OIDC_* keys configure"),
    k("OIDC_PROVIDER_NAME", "Single sign-on", "Single sign-on: the login page's name for that provider"),
    k(
        "OIDC_PROVIDERS_FILE",
        "",
        "Single sign-on: a JSON file listing providers ({id, name, issuer, client_id, client_secret, scopes, role_map, claim_map, groups_claim, audience, cli_client_id}), beside the one of the OIDC_* keys",
    ),
];

/// Keys of the reference service that Hangar accepts but does not honour, with the reason.
/// A value given for one (file, `--KEY=value` flag or environment) is reported at start
/// and by `hangar config check`, never silently dropped; any other unknown key is an error.
pub const REFERENCE_ONLY: &[(&str, &str)] = &[
    (
        "TLS_DISABLE_VALIDATION",
        "outbound TLS is always verified; give hosts and catalogs certificates the system trusts",
    ),
    ("ENCRYPTION_PRIVATE_KEY", "the store is encrypted with DATABASE_ENCRYPTION_KEY_FILE (AES-256-GCM) instead"),
    ("SECURITY_PASSWORD_SALT_PASSWORD", "passwords are always hashed with argon2id and a per-password salt"),
    ("DATABASE_SAVE_INTERVAL_MINUTES", "every change is written to the store when it is made"),
    ("SYSTEM_AUTO_RECOVER_DATABASE", "the store recovers from its journal at every start"),
    ("GHOST_JOB_TIMEOUT_MINUTES", "jobs left running by a stopped server are failed at start"),
    ("CATALOG_COMPRESS_VM", "the reference reads but never uses it; images are chunked and compressed per chunk"),
    ("CATALOG_COMPRESS_VM_RATIO", "the reference reads but never uses it; images are chunked and compressed per chunk"),
    (
        "CATALOG_ENABLE_PROVIDER_CREDENTIALS_OBFUSCATION",
        "provider credentials are sealed in the store and never answered, whatever the caller",
    ),
    ("DISABLE_CATALOG_PROVIDER_STREAMING", "chunks are always downloaded and checked one by one"),
    ("USE_ORCHESTRATOR_RESOURCES", "run a host agent on the orchestrator's machine and add it as a host instead"),
    ("ORCHESTRATOR_PULL_FREQUENCY_SECONDS", "use ORCHESTRATOR_CHECK_INTERVAL"),
    ("ORCHESTRATOR_PUBLIC_URL", "hosts join with `hangar agent join` and the URL given there"),
    ("BASE_URL", "hosts join with `hangar agent join` and the URL given there"),
    ("VIRTUAL_MACHINES_FOLDER", "the reference never reads it; QEMU VMs live in HOST_VMS_FOLDER"),
    ("DISABLE_VM_CACHE_REFRESH", "the host module follows the hypervisor's events and re-lists on its own schedule"),
    (
        "VM_CACHE_REFRESH_INTERVAL_SECONDS",
        "the host module follows the hypervisor's events and re-lists on its own schedule",
    ),
    ("DISABLE_REVERSE_PROXY", "leave reverse_proxy out of ENABLED_MODULES instead"),
    ("REVERSE_PROXY_HOST", "give the listen address in the reverse_proxy block of the file or per proxy host"),
    ("REVERSE_PROXY_PORT", "give the port in the reverse_proxy block of the file or per proxy host"),
    ("REVERSE_PROXY_OPERATION_TIMEOUT", "the reverse proxy's timeouts are fixed"),
    ("REVERSE_PROXY_SHUTDOWN_TIMEOUT", "the reverse proxy's timeouts are fixed"),
    ("REVERSE_PROXY_READ_TIMEOUT", "the reverse proxy's timeouts are fixed"),
    ("REVERSE_PROXY_WRITE_TIMEOUT", "the reverse proxy's timeouts are fixed"),
    ("REVERSE_PROXY_IDLE_TIMEOUT", "the reverse proxy's timeouts are fixed"),
    ("ENABLE_PACKER_PLUGIN", "packer templates are deliberately not served"),
    ("ENABLE_VAGRANT_PLUGIN", "Vagrant boxes are deliberately not served"),
    ("ENABLE_SSH_INSECURE_KEY", "SSH execute is deliberately not served"),
    ("URL_WHITELIST", "there are no server-side URL helpers to guard"),
    ("DISABLE_URL_VALIDATION", "there are no server-side URL helpers to guard"),
    ("ENABLE_CANARY", "there are no canary or beta features"),
    ("ENABLE_BETA", "there are no canary or beta features"),
    ("AMPLITUDE_API_KEY", "Hangar sends no telemetry"),
    ("HMAC_SECRET", "the reference's installer key; use JWT_HMACS_SECRET"),
    ("TOKEN_DURATION_MINUTES", "the reference's installer key; use JWT_DURATION"),
    ("BRUTE_FORCE_LOCK_DURATION", "the name in the reference's help text; use BRUTE_FORCE_LOCKOUT_DURATION"),
];

/// The reference's names of the config file (`--config` overrides), each tried with every
/// extension in [`CONFIG_EXTENSIONS`], in each folder of [`config_folders`], first found wins.
pub const CONFIG_BASE_NAMES: &[&str] = &["prldevops_config", "config", "hangar"];
/// The reference's extensions, in its order, then Hangar's TOML.
pub const CONFIG_EXTENSIONS: &[&str] = &[".local.yaml", ".local.yml", ".local.json", ".yaml", ".yml", ".json", ".toml"];

/// Where the config file is looked for when `--config` is not given: the executable's
/// folder, its `prldevops_config` sub-folder and `/etc/prl-devops-service` (the reference's
/// places), then `/etc/hangar`.
pub fn config_folders(exe: &Path) -> Vec<PathBuf> {
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    vec![
        dir.clone(),
        dir.join("prldevops_config"),
        PathBuf::from("/etc/prl-devops-service"),
        PathBuf::from("/etc/hangar"),
    ]
}

/// The first config file found in `folders` (see [`CONFIG_BASE_NAMES`]).
pub fn find_config_file(folders: &[PathBuf]) -> Option<PathBuf> {
    folders.iter().find_map(|dir| {
        CONFIG_BASE_NAMES
            .iter()
            .find_map(|base| CONFIG_EXTENSIONS.iter().map(|ext| dir.join(format!("{base}{ext}"))).find(|p| p.is_file()))
    })
}

fn reference_only(name: &str) -> Option<(&'static str, &'static str)> {
    let up = name.trim().to_ascii_uppercase().replace('-', "_");
    REFERENCE_ONLY.iter().find(|(k, _)| *k == up).copied()
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "config file",
            Source::Env => "environment",
            Source::Flag => "flag",
        })
    }
}

/// Raw layered values: the file's, then the environment's, then the flags' (no defaults:
/// those are the key table's, read by `crate::settings`).
#[derive(Debug, Clone, Default)]
pub struct Layers {
    values: BTreeMap<&'static str, (String, Source)>,
    /// The file's `[reverse_proxy]` table (the reference's `reverse_proxy:` block), as JSON.
    reverse_proxy: Option<serde_json::Value>,
    /// Reference keys given a value that Hangar does not honour: name, source, reason.
    unhonoured: Vec<(&'static str, Source, &'static str)>,
    /// The config file read, if any.
    file: Option<PathBuf>,
}

/// A config file's raw values: `(name as written, value)`, and its reverse-proxy block.
type FileValues = (Vec<(String, String)>, Option<serde_json::Value>);

fn scalar_text(path: &Path, name: &str, v: &serde_json::Value) -> Result<String> {
    Ok(match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Null => String::new(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(String::from).unwrap_or_else(|| x.to_string()))
            .collect::<Vec<_>>()
            .join(","),
        serde_json::Value::Object(_) => {
            bail!("{}: key {name} has a map as its value; give a plain value", path.display())
        }
    })
}

/// Reads a config file: TOML (Hangar's: keys at the top level, `[reverse_proxy]`), or the
/// reference's YAML or JSON (`.yaml`, `.yml`, `.json`: keys in the `environment:` map, a
/// `reverse_proxy:` block).
fn read_file(path: &Path) -> Result<FileValues> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
    let reference_format = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
    let mut values = Vec::new();
    if !reference_format {
        let table: toml::Table = text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
        let mut rp = None;
        for (k, v) in table {
            if k.eq_ignore_ascii_case("reverse_proxy") {
                if !v.is_table() {
                    bail!("{}: reverse_proxy must be a table ([reverse_proxy])", path.display());
                }
                rp = Some(
                    serde_json::to_value(&v).with_context(|| format!("{}: the reverse_proxy table", path.display()))?,
                );
                continue;
            }
            let j = serde_json::to_value(&v).with_context(|| format!("{}: key {k}", path.display()))?;
            values.push((k.clone(), scalar_text(path, &k, &j)?));
        }
        return Ok((values, rp));
    }
    let doc: serde_json::Value = if name.ends_with(".json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        serde_yaml::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?
    };
    let serde_json::Value::Object(top) = doc else {
        bail!("{}: the file must be a map with an `environment:` map of keys", path.display());
    };
    let mut rp = None;
    for (k, v) in top {
        match k.to_ascii_lowercase().as_str() {
            "environment" => {
                let serde_json::Value::Object(env) = v else {
                    bail!("{}: `environment` must be a map of KEY: value", path.display());
                };
                for (name, value) in env {
                    let text = scalar_text(path, &name, &value)?;
                    values.push((name, text));
                }
            }
            "reverse_proxy" => {
                if !v.is_object() {
                    bail!("{}: reverse_proxy must be a map", path.display());
                }
                rp = Some(v);
            }
            _ => bail!(
                "{}: unknown top-level entry {k:?}; keys go in the `environment:` map, proxies in `reverse_proxy:`",
                path.display()
            ),
        }
    }
    Ok((values, rp))
}

fn key(name: &str) -> Option<&'static Key> {
    let up = name.trim().to_ascii_uppercase().replace('-', "_");
    KEYS.iter().find(|k| k.name == up)
}

impl Layers {
    /// The file, then the process environment, then flags. Unknown keys in the file and
    /// the flags are all reported together.
    #[cfg(test)]
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &[(String, String)],
    ) -> Result<Layers> {
        Layers::load_all(file, &[], env, flags)
    }

    /// The reference's order, then Hangar's own flags: the file (its `environment:` map),
    /// then the reference-style `--KEY=value` flags (`key_flags`), then the process
    /// environment, then `--set KEY=VALUE` / `--port` / `--data-dir` (`flags`). Unknown keys
    /// are all reported together; reference keys Hangar does not honour are recorded
    /// ([`Layers::unhonoured`]).
    pub fn load_all(
        file: Option<&Path>,
        key_flags: &[(String, String)],
        env: &dyn Fn(&str) -> Option<String>,
        flags: &[(String, String)],
    ) -> Result<Layers> {
        let mut l = Layers { file: file.map(Path::to_path_buf), ..Layers::default() };
        let mut unknown = Vec::new();
        let mut given: Vec<(String, String, Source, String)> = Vec::new();
        if let Some(path) = file {
            let (values, rp) = read_file(path)?;
            l.reverse_proxy = rp;
            for (name, v) in values {
                given.push((name.clone(), v, Source::File, format!("{}: unknown key {name:?}", path.display())));
            }
        }
        for (name, v) in key_flags {
            given.push((
                name.clone(),
                v.clone(),
                Source::Flag,
                format!("unknown configuration key {name:?} in --{name}="),
            ));
        }
        for k in KEYS {
            if let Some(v) = env(k.name) {
                given.push((k.name.to_string(), v, Source::Env, String::new()));
            }
        }
        for (k, _) in REFERENCE_ONLY {
            if let Some(v) = env(k) {
                given.push((k.to_string(), v, Source::Env, String::new()));
            }
        }
        for (name, v) in flags {
            given.push((name.clone(), v.clone(), Source::Flag, format!("unknown configuration key {name:?} in --set")));
        }
        for (name, v, source, unknown_message) in given {
            if let Some(k) = key(&name) {
                l.values.insert(k.name, (v, source));
            } else if let Some((k, why)) = reference_only(&name) {
                if !v.trim().is_empty() {
                    l.unhonoured.retain(|(n, _, _)| *n != k);
                    l.unhonoured.push((k, source, why));
                }
            } else {
                unknown.push(unknown_message);
            }
        }
        if !unknown.is_empty() {
            bail!("{}; `hangar config keys` lists the known keys", unknown.join("; "));
        }
        Ok(l)
    }

    /// Reference keys given a value that Hangar does not honour: name, where it was
    /// given, why it is not honoured. `hangar serve` warns about each at start.
    pub fn unhonoured(&self) -> &[(&'static str, Source, &'static str)] {
        &self.unhonoured
    }

    /// The config file these values were read from.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The configuration file's `[reverse_proxy]` table (listeners and routes, the reference's
    /// `reverse_proxy:` block), imported into the store at start; see
    /// `hangar_reverse_proxy::ReverseProxy::import` for how it merges.
    pub fn reverse_proxy_block(&self) -> Option<&serde_json::Value> {
        self.reverse_proxy.as_ref()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|(v, _)| v.as_str()).filter(|v| !v.is_empty())
    }

    /// The value given for `name`, trimmed, and where it came from; `None` when it is not
    /// given or empty.
    pub fn value(&self, name: &str) -> Option<(&str, Source)> {
        self.values.get(name).map(|(v, s)| (v.trim(), *s)).filter(|(v, _)| !v.is_empty())
    }

    #[cfg(test)]
    fn source(&self, name: &str) -> Source {
        self.values.get(name).map(|(_, s)| *s).unwrap_or(Source::Default)
    }

    #[cfg(test)]
    fn bad(&self, name: &str, want: &str) -> anyhow::Error {
        let v = self.get(name).unwrap_or("");
        anyhow::anyhow!("{name}={v:?} (from the {}) is not {want}", self.source(name))
    }

    #[cfg(test)]
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        self.get(name).unwrap_or("").parse().map_err(|_| self.bad(name, "a number"))
    }

    pub fn list(&self, name: &str) -> Vec<String> {
        self.get(name).unwrap_or("").split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
    }
}

/// Default data folder.
pub fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/hangar");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("hangar");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/hangar"),
        None => PathBuf::from(".hangar-data"),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Read a PEM given as PEM text, base64 of the PEM (the reference's form), or a file path.
pub fn read_pem(name: &str, value: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    let v = value.trim();
    if v.starts_with("-----BEGIN") {
        return Ok(v.as_bytes().to_vec());
    }
    if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(v)
        && b.starts_with(b"-----BEGIN")
    {
        return Ok(b);
    }
    let p = Path::new(v);
    if p.exists() {
        return std::fs::read(p).with_context(|| format!("{name}: cannot read {}", p.display()));
    }
    bail!("{name} is neither PEM text, base64 of a PEM, nor a readable file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "api_port = 4000\nlog_level = \"debug\"\njwt_duration = \"1h\"\n").unwrap();
        let env = |k: &str| match k {
            "API_PORT" => Some("5000".to_string()),
            "LOG_LEVEL" => Some("warn".to_string()),
            _ => None,
        };
        let l = Layers::load(Some(&f), &env, &[("api-port".into(), "6000".into())]).unwrap();
        assert_eq!(l.number::<u16>("API_PORT").unwrap(), 6000);
        assert_eq!(l.value("API_PORT"), Some(("6000", Source::Flag)));
        assert_eq!(l.value("LOG_LEVEL"), Some(("warn", Source::Env)));
        assert_eq!(l.value("JWT_DURATION"), Some(("1h", Source::File)));
        // Defaults are not layered values: they stay in the key table.
        assert_eq!(l.get("API_PREFIX"), None);
    }

    #[test]
    fn the_reverse_proxy_table_is_kept_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "api_port = 4000\n[reverse_proxy]\nhost = \"127.0.0.1\"\n[[reverse_proxy.hosts]]\nname = \"web\"\nport = \"8080\"\n[[reverse_proxy.hosts.http_routes]]\npath = \"/\"\ntarget_host = \"10.0.0.2\"\ntarget_port = 80\n",
        )
        .unwrap();
        let l = Layers::load(Some(&f), &|_| None, &[]).unwrap();
        assert_eq!(l.number::<u16>("API_PORT").unwrap(), 4000);
        let rp = l.reverse_proxy_block().unwrap();
        assert_eq!(rp["host"], "127.0.0.1");
        assert_eq!(rp["hosts"][0]["name"], "web");
        assert_eq!(rp["hosts"][0]["http_routes"][0]["target_port"], 80);
        std::fs::write(&f, "reverse_proxy = 1\n").unwrap();
        assert!(Layers::load(Some(&f), &|_| None, &[]).is_err());
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let env = |k: &str| (k == "API_PORT").then(|| "eighty".to_string());
        let l = Layers::load(None, &env, &[]).unwrap();
        let e = l.number::<u16>("API_PORT").unwrap_err().to_string();
        assert!(e.contains("API_PORT") && e.contains("environment"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "no_such_key = 1\nother_key = 2\n").unwrap();
        let e = Layers::load(Some(&f), &|_| None, &[("nope".into(), "1".into())]).unwrap_err().to_string();
        assert!(e.contains("unknown key") && e.contains("no_such_key") && e.contains("other_key"), "{e}");
        assert!(e.contains("\"nope\" in --set"), "{e}");
    }

    #[test]
    fn every_default_is_in_the_table_only_once() {
        let mut names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KEYS.len(), "a key is listed twice");
        assert!(KEYS.iter().all(|k| !k.secret || k.default.is_empty()), "a secret key has a default");
    }
}
