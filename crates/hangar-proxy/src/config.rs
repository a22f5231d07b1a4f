//! The configuration model: what the API layer stores and hands to [`crate::ProxyManager::apply`].
//!
//! Field names follow the reference service (`reverse_proxy` config block and the
//! `reverse_proxy_hosts` table), so its JSON is accepted as is: ports may be numbers or strings
//! (`"port": "8080"`), empty strings mean "not set", `scheme` is accepted for `schema` and `ssl`
//! for `tls`. Ports are written back as numbers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The whole reverse-proxy configuration of one Hangar host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReverseProxyConfig {
    /// When false, [`crate::ProxyManager::apply`] stops every listener. Defaults to true.
    pub enabled: bool,
    /// The bind address used by proxy hosts whose own `host` is empty (reference default `0.0.0.0`).
    pub host: String,
    /// The reference's reverse-proxy port (default 5080). Kept for compatibility: the engine
    /// itself only opens the listeners of [`ReverseProxyConfig::hosts`].
    #[serde(deserialize_with = "de_port_opt")]
    pub port: Option<u16>,
    /// One listener each.
    pub hosts: Vec<ProxyHost>,
}

impl Default for ReverseProxyConfig {
    fn default() -> Self {
        ReverseProxyConfig { enabled: true, host: "0.0.0.0".into(), port: Some(5080), hosts: Vec::new() }
    }
}

/// One listener (`host:port`) with either one TCP route or a list of HTTP routes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyHost {
    /// Stable id; when empty the manager keys the listener by `name`, then by its address.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Bind address (an IP or a name); empty means [`ReverseProxyConfig::host`].
    pub host: String,
    /// Bind port; empty means 80 (as in the reference), `0` means any free port (see the status).
    #[serde(deserialize_with = "de_port_opt")]
    pub port: Option<u16>,
    /// TLS termination on the listener.
    #[serde(alias = "ssl")]
    pub tls: TlsConfig,
    /// CORS answers for browsers (HTTP listeners only).
    pub cors: CorsConfig,
    /// Routes tried by ascending `order`, then in list order.
    pub http_routes: Vec<HttpRoute>,
    /// Raw TCP forwarding; excludes `http_routes`.
    pub tcp_route: Option<TcpRoute>,
    /// When set, every HTTP request must pass [`crate::ProxyAuth::authorize`] (401 otherwise).
    pub require_auth: bool,
    /// Claims a caller must hold (403 otherwise). Setting any requirement implies `require_auth`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<String>,
    /// Roles a caller must hold (403 otherwise). Setting any requirement implies `require_auth`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required_roles: Vec<String>,
    /// Requests a route sends to a VM (`target_vm_id`) must come from that VM's owner (or a
    /// caller who may manage every VM); 403 otherwise. Implies `require_auth`.
    #[serde(skip_serializing_if = "is_false")]
    pub require_vm_owner: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ProxyHost {
    /// The key the manager uses for this host: `id`, else `name`, else `host:port`.
    pub fn key(&self) -> String {
        if !self.id.is_empty() {
            self.id.clone()
        } else if !self.name.is_empty() {
            self.name.clone()
        } else {
            format!("{}:{}", self.host, self.port.unwrap_or(80))
        }
    }

    /// Whether HTTP requests must carry a credential: `require_auth`, or any requirement of
    /// claims, roles or the VM's owner.
    pub fn needs_auth(&self) -> bool {
        self.require_auth || self.has_requirements()
    }

    /// Whether the host requires claims, roles or the VM's owner.
    pub fn has_requirements(&self) -> bool {
        !self.required_claims.is_empty() || !self.required_roles.is_empty() || self.require_vm_owner
    }
}

/// TLS settings of a listener. `cert` and `key` are PEM text or paths to PEM files.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Serve TLS on this listener.
    pub enabled: bool,
    /// The certificate chain, leaf first: PEM text (`-----BEGIN CERTIFICATE-----...`) or a file path.
    pub cert: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1): PEM text or a file path.
    pub key: String,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.contains("-----BEGIN") { "<pem>" } else { self.key.as_str() };
        f.debug_struct("TlsConfig")
            .field("enabled", &self.enabled)
            .field("cert", &self.cert.len())
            .field("key", &key)
            .finish()
    }
}

/// Per-host CORS answers. When enabled, preflight requests (`OPTIONS` with
/// `Access-Control-Request-Method`) are answered by the proxy, and other answers to requests
/// carrying an allowed `Origin` get `Access-Control-Allow-Origin`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CorsConfig {
    /// Answer CORS at all.
    pub enabled: bool,
    /// Allowed origins; empty or `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Methods announced in preflight answers; empty means the usual REST set.
    pub allowed_methods: Vec<String>,
    /// Headers announced in preflight answers; empty echoes the requested ones.
    pub allowed_headers: Vec<String>,
}

/// How the proxy talks to an HTTP target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    /// Plain HTTP/1.1.
    #[default]
    #[serde(alias = "HTTP", alias = "")]
    Http,
    /// TLS, HTTP/2 or HTTP/1.1 as negotiated by ALPN; the target's certificate is verified
    /// against the platform trust store (or the roots given to the manager).
    #[serde(alias = "HTTPS")]
    Https,
    /// Cleartext HTTP/2 with prior knowledge (gRPC servers and the like).
    #[serde(alias = "h2", alias = "H2C", alias = "H2")]
    H2c,
}

impl Schema {
    /// The URI scheme used towards the target.
    pub fn uri_scheme(self) -> &'static str {
        match self {
            Schema::Https => "https",
            Schema::Http | Schema::H2c => "http",
        }
    }
}

/// One HTTP route of a proxy host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpRoute {
    /// Stable id (used in events and error bodies).
    pub id: String,
    /// Routes are tried by ascending order, ties in list order.
    pub order: i64,
    /// Path prefix, matched on segment boundaries: `/api` matches `/api` and `/api/x`, not
    /// `/apix` (a prefix ending in `/` matches anything under it). Empty means `/`.
    pub path: String,
    /// Optional regex matched against the request path; when set it replaces `path`.
    #[serde(deserialize_with = "de_opt_string", skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Optional `Host` match: `name` (any port), `name:port`, or `*.suffix`.
    #[serde(deserialize_with = "de_opt_string", skip_serializing_if = "Option::is_none")]
    pub host_match: Option<String>,
    /// Target host name or IP; exclusive with `target_vm_id`.
    #[serde(deserialize_with = "de_opt_string", skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    /// Target port; empty means 80 (http, h2c) or 443 (https).
    #[serde(deserialize_with = "de_port_opt")]
    pub target_port: Option<u16>,
    /// A VM whose address is found through the [`crate::TargetResolver`].
    #[serde(deserialize_with = "de_opt_string", skip_serializing_if = "Option::is_none")]
    pub target_vm_id: Option<String>,
    /// Protocol towards the target.
    #[serde(alias = "scheme")]
    pub schema: Schema,
    /// Headers set on the forwarded request (an empty value removes the header).
    pub request_headers: BTreeMap<String, String>,
    /// Headers set on the answer (an empty value removes the header).
    pub response_headers: BTreeMap<String, String>,
    /// Time allowed for the target to answer with its headers; empty means 60 s.
    #[serde(deserialize_with = "de_u64_opt")]
    pub timeout_seconds: Option<u64>,
}

/// The TCP route of a proxy host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TcpRoute {
    /// Stable id.
    pub id: String,
    /// Target host name or IP; exclusive with `target_vm_id`.
    #[serde(deserialize_with = "de_opt_string", skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    /// Target port (required).
    #[serde(deserialize_with = "de_port_opt")]
    pub target_port: Option<u16>,
    /// A VM whose address is found through the [`crate::TargetResolver`].
    #[serde(deserialize_with = "de_opt_string", skip_serializing_if = "Option::is_none")]
    pub target_vm_id: Option<String>,
    /// A connection with no byte moving either way for this long is closed; empty means 300 s.
    #[serde(deserialize_with = "de_u64_opt")]
    pub idle_timeout_seconds: Option<u64>,
    /// Connections beyond this many at once are refused (closed at accept); empty means 1024.
    #[serde(deserialize_with = "de_u64_opt")]
    pub max_connections: Option<u64>,
}

/// Default HTTP route timeout.
pub const DEFAULT_ROUTE_TIMEOUT_SECS: u64 = 60;
/// Default TCP idle timeout.
pub const DEFAULT_TCP_IDLE_SECS: u64 = 300;
/// Default TCP connection limit.
pub const DEFAULT_TCP_MAX_CONNECTIONS: u64 = 1024;

/// Where a route sends its traffic, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A host name or IP and a port.
    Host {
        /// Name or IP literal.
        host: String,
        /// Port.
        port: u16,
    },
    /// A VM (resolved to an IP for each new connection) and a port.
    Vm {
        /// The VM id given to the resolver.
        vm_id: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Host { host, port } => write!(f, "{host}:{port}"),
            Target::Vm { vm_id, port } => write!(f, "vm {vm_id} port {port}"),
        }
    }
}

fn target_of(
    what: &str,
    host: &Option<String>,
    vm: &Option<String>,
    port: Option<u16>,
    default_port: Option<u16>,
) -> Result<Target, ConfigError> {
    let port = match port.or(default_port) {
        Some(0) | None => {
            return Err(ConfigError::Invalid(format!("{what}: target_port must be between 1 and 65535")));
        }
        Some(p) => p,
    };
    match (host, vm) {
        (Some(_), Some(_)) => {
            Err(ConfigError::Invalid(format!("{what}: set either target_host or target_vm_id, not both")))
        }
        (None, None) => Err(ConfigError::Invalid(format!("{what}: needs a target_host or a target_vm_id"))),
        (Some(h), None) => {
            let h = h.trim().trim_start_matches('[').trim_end_matches(']');
            if h.is_empty() || h.contains('/') || h.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid(format!("{what}: target_host {h:?} is not a host name or IP")));
            }
            Ok(Target::Host { host: h.to_string(), port })
        }
        (None, Some(v)) => Ok(Target::Vm { vm_id: v.clone(), port }),
    }
}

impl HttpRoute {
    /// The configured target, checked.
    pub fn target(&self) -> Result<Target, ConfigError> {
        let default_port = match self.schema {
            Schema::Https => 443,
            Schema::Http | Schema::H2c => 80,
        };
        target_of(
            &format!("http route {:?}", self.id),
            &self.target_host,
            &self.target_vm_id,
            self.target_port,
            Some(default_port),
        )
    }
}

impl TcpRoute {
    /// The configured target, checked.
    pub fn target(&self) -> Result<Target, ConfigError> {
        target_of(&format!("tcp route {:?}", self.id), &self.target_host, &self.target_vm_id, self.target_port, None)
    }
}

/// The address a host's listener binds, as configured (`host` may be a name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BindAddr {
    /// IP literal or name.
    pub host: String,
    /// Port; 0 is any free port.
    pub port: u16,
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl BindAddr {
    /// Whether two listeners cannot both bind: same port, and the same host or either one the
    /// wildcard address. Port 0 never conflicts.
    pub fn conflicts_with(&self, other: &BindAddr) -> bool {
        if self.port == 0 || self.port != other.port {
            return false;
        }
        let unspecified = |h: &str| h.parse::<IpAddr>().map(|ip| ip.is_unspecified()).unwrap_or(false);
        self.host.eq_ignore_ascii_case(&other.host) || unspecified(&self.host) || unspecified(&other.host)
    }
}

impl ReverseProxyConfig {
    /// The bind address of `host` under this configuration.
    pub fn bind_addr(&self, host: &ProxyHost) -> BindAddr {
        let h = if host.host.trim().is_empty() { self.host.trim() } else { host.host.trim() };
        let h = if h.is_empty() { "0.0.0.0" } else { h };
        BindAddr { host: h.trim_start_matches('[').trim_end_matches(']').to_string(), port: host.port.unwrap_or(80) }
    }

    /// Check the whole configuration without touching the network. TLS material is loaded
    /// and regexes compiled, so a configuration that validates can be applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::compile::compile_config(self).map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// Lenient deserializers for the reference's JSON.

struct PortVisitor;

impl<'de> Visitor<'de> for PortVisitor {
    type Value = Option<u16>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number between 0 and 65535, as a number or a string")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(PortVisitor)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        u16::try_from(v).map(Some).map_err(|_| E::custom(format!("port {v} is out of range (0-65535)")))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u16::try_from(v).map(Some).map_err(|_| E::custom(format!("port {v} is out of range (0-65535)")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let t = v.trim();
        if t.is_empty() {
            return Ok(None);
        }
        let n: i64 = t.parse().map_err(|_| E::custom(format!("port {v:?} is not a number")))?;
        self.visit_i64(n)
    }
}

fn de_port_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    d.deserialize_option(PortVisitor)
}

struct U64Visitor;

impl<'de> Visitor<'de> for U64Visitor {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer, as a number or a string")
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(U64Visitor)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v).map(Some).map_err(|_| E::custom(format!("{v} must not be negative")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let t = v.trim();
        if t.is_empty() {
            return Ok(None);
        }
        t.parse().map(Some).map_err(|_| E::custom(format!("{v:?} is not a non-negative integer")))
    }
}

fn de_u64_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_option(U64Visitor)
}

fn de_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(v.and_then(|s| if s.trim().is_empty() || s.trim() == "---" { None } else { Some(s) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_json_is_accepted() {
        let json = r#"{
            "enabled": true, "host": "0.0.0.0", "port": "5080",
            "hosts": [{
                "id": "h1", "name": "web", "host": "127.0.0.1", "port": "8080",
                "ssl": {"enabled": false, "cert": "", "key": ""},
                "http_routes": [{"id": "r1", "order": 1, "path": "/api", "pattern": "",
                    "target_vm_id": "", "target_host": "10.0.0.2", "target_port": "3000",
                    "scheme": "http", "request_headers": {}, "response_headers": {"X-A": "b"}}],
                "host_id": "ignored"
            }, {
                "name": "ssh", "port": 2222,
                "tcp_route": {"target_vm_id": "vm-1", "target_port": "22"}
            }]
        }"#;
        let c: ReverseProxyConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.port, Some(5080));
        assert_eq!(c.hosts[0].port, Some(8080));
        let r = &c.hosts[0].http_routes[0];
        assert_eq!(r.pattern, None);
        assert_eq!(r.target().unwrap(), Target::Host { host: "10.0.0.2".into(), port: 3000 });
        assert_eq!(
            c.hosts[1].tcp_route.as_ref().unwrap().target().unwrap(),
            Target::Vm { vm_id: "vm-1".into(), port: 22 }
        );
        assert_eq!(c.bind_addr(&c.hosts[1]), BindAddr { host: "0.0.0.0".into(), port: 2222 });
        c.validate().unwrap();
    }

    #[test]
    fn bad_ports_are_named() {
        let e = serde_json::from_str::<ProxyHost>(r#"{"port": "70000"}"#).unwrap_err().to_string();
        assert!(e.contains("70000 is out of range"), "{e}");
        let e = serde_json::from_str::<ProxyHost>(r#"{"port": "eighty"}"#).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn conflicts() {
        let a = BindAddr { host: "0.0.0.0".into(), port: 80 };
        let b = BindAddr { host: "127.0.0.1".into(), port: 80 };
        let c = BindAddr { host: "127.0.0.2".into(), port: 80 };
        assert!(a.conflicts_with(&b));
        assert!(!b.conflicts_with(&c));
        assert!(!BindAddr { host: "x".into(), port: 0 }.conflicts_with(&BindAddr { host: "x".into(), port: 0 }));
    }
}
