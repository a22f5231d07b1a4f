//! Server configuration: a TOML file, then environment variables, then flags, in rising
//! precedence. Keys are the reference service's names (`API_PORT`, `DATABASE_FOLDER`, ...);
//! in the TOML file they may be written in lower case. Every key is listed in [`KEYS`]
//! with its default and meaning, which is also what the README's configuration table
//! shows (`hangar config keys`). [`Layers`] holds the raw values given; the typed
//! settings, with the defaults of this table, are parsed from them once, in
//! `crate::settings`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

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
    k(
        "DATABASE_ENCRYPTION_KEY_FILE",
        "",
        "Key file that encrypts the store at rest (AES-256-GCM; 32 bytes raw, hex or base64)",
    ),
    k("DATABASE_BACKUP_INTERVAL_MINUTES", "120", "Minutes between store backups; 0 disables scheduled backups"),
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
];

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
}

fn key(name: &str) -> Option<&'static Key> {
    let up = name.trim().to_ascii_uppercase().replace('-', "_");
    KEYS.iter().find(|k| k.name == up)
}

impl Layers {
    /// The file, then the process environment, then flags. Unknown keys in the file and
    /// the flags are all reported together.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &[(String, String)],
    ) -> Result<Layers> {
        let mut l = Layers::default();
        let mut unknown = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            let table: toml::Table = text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
            for (name, v) in table {
                if name.eq_ignore_ascii_case("reverse_proxy") {
                    if !v.is_table() {
                        bail!("{}: reverse_proxy must be a table ([reverse_proxy])", path.display());
                    }
                    l.reverse_proxy = Some(
                        serde_json::to_value(&v)
                            .with_context(|| format!("{}: the reverse_proxy table", path.display()))?,
                    );
                    continue;
                }
                let Some(k) = key(&name) else {
                    unknown.push(format!("{}: unknown key {name:?}", path.display()));
                    continue;
                };
                let value = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().map(String::from).unwrap_or_else(|| x.to_string()))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => bail!("{}: key {name} has an unsupported value {other}", path.display()),
                };
                l.values.insert(k.name, (value, Source::File));
            }
        }
        for k in KEYS {
            if let Some(v) = env(k.name) {
                l.values.insert(k.name, (v, Source::Env));
            }
        }
        for (name, v) in flags {
            match key(name) {
                Some(k) => {
                    l.values.insert(k.name, (v.clone(), Source::Flag));
                }
                None => unknown.push(format!("unknown configuration key {name:?} in --set")),
            }
        }
        if !unknown.is_empty() {
            bail!("{}; `hangar config keys` lists the known keys", unknown.join("; "));
        }
        Ok(l)
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

    fn source(&self, name: &str) -> Source {
        self.values.get(name).map(|(_, s)| *s).unwrap_or(Source::Default)
    }

    fn bad(&self, name: &str, want: &str) -> anyhow::Error {
        let v = self.get(name).unwrap_or("");
        anyhow!("{name}={v:?} (from the {}) is not {want}", self.source(name))
    }

    pub fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(String::from)
    }

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
