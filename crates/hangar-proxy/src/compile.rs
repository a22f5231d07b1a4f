//! Checked, ready-to-run forms of the configuration.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use regex::Regex;
use tokio::sync::Semaphore;

use crate::config::{
    BindAddr, CorsConfig, DEFAULT_ROUTE_TIMEOUT_SECS, DEFAULT_TCP_IDLE_SECS, DEFAULT_TCP_MAX_CONNECTIONS, HttpRoute,
    ProxyHost, ReverseProxyConfig, Schema, Target, TcpRoute,
};
use crate::error::ConfigError;

/// One host, checked.
pub(crate) struct CompiledHost {
    pub key: String,
    pub bind: BindAddr,
    pub spec: ProxyHost,
    pub state: Arc<HostState>,
}

/// What a listener consults for each connection and request; swapped as a whole on updates.
pub(crate) struct HostState {
    pub key: String,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub kind: HostKind,
}

pub(crate) enum HostKind {
    Http(HttpHost),
    Tcp(TcpHost),
}

pub(crate) struct HttpHost {
    pub routes: Vec<CompiledRoute>,
    /// `require_auth`, or any of the requirements below.
    pub require_auth: bool,
    pub required_claims: Vec<String>,
    pub required_roles: Vec<String>,
    pub require_vm_owner: bool,
    pub cors: Option<CompiledCors>,
}

pub(crate) struct TcpHost {
    pub route_id: String,
    pub target: Target,
    pub idle: Duration,
    pub limit: Arc<Semaphore>,
}

pub(crate) enum PathMatch {
    Prefix(String),
    Regex(Regex),
}

pub(crate) enum HostMatch {
    /// `name` (any port).
    Name(String),
    /// `name:port`.
    NamePort(String),
    /// `*.suffix` (stored as `.suffix`).
    Suffix(String),
}

pub(crate) struct CompiledRoute {
    pub id: String,
    pub path: PathMatch,
    pub host: Option<HostMatch>,
    pub target: Target,
    /// The authority of a fixed (non-VM) target.
    pub authority: Option<Authority>,
    pub schema: Schema,
    pub request_headers: Vec<(HeaderName, Option<HeaderValue>)>,
    pub response_headers: Vec<(HeaderName, Option<HeaderValue>)>,
    pub timeout: Duration,
}

pub(crate) struct CompiledCors {
    pub any_origin: bool,
    pub origins: Vec<String>,
    pub methods: HeaderValue,
    pub headers: Option<HeaderValue>,
}

impl PathMatch {
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (p.ends_with('/') || path.len() == p.len() || path.as_bytes().get(p.len()) == Some(&b'/'))
            }
        }
    }
}

impl HostMatch {
    /// `host` is the request's `Host` (or `:authority`), possibly with a port.
    pub(crate) fn matches(&self, host: &str) -> bool {
        let name = strip_port(host);
        match self {
            HostMatch::Name(n) => name.eq_ignore_ascii_case(n),
            HostMatch::NamePort(np) => host.eq_ignore_ascii_case(np),
            HostMatch::Suffix(s) => {
                name.len() > s.len() && name.get(name.len() - s.len()..).is_some_and(|t| t.eq_ignore_ascii_case(s))
            }
        }
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

impl CompiledCors {
    /// The `Access-Control-Allow-Origin` value for this request origin, if allowed.
    pub(crate) fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any_origin {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.to_str().ok()?;
        self.origins.iter().any(|a| a.eq_ignore_ascii_case(o)).then(|| origin.clone())
    }
}

fn header_rules(
    host: &str,
    route: &str,
    what: &str,
    rules: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, Option<HeaderValue>)>, ConfigError> {
    rules
        .iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.trim().as_bytes()).map_err(|_| {
                ConfigError::Invalid(format!(
                    "host {host:?}, route {route:?}: {what} name {k:?} is not a valid header name"
                ))
            })?;
            let value = if v.is_empty() {
                None
            } else {
                Some(HeaderValue::from_str(v).map_err(|_| {
                    ConfigError::Invalid(format!(
                        "host {host:?}, route {route:?}: {what} {k:?} has a value that is not a valid header value"
                    ))
                })?)
            };
            Ok((name, value))
        })
        .collect()
}

fn compile_route(host: &str, r: &HttpRoute) -> Result<CompiledRoute, ConfigError> {
    let target = r.target().map_err(|e| ConfigError::Invalid(format!("host {host:?}, {e}")))?;
    let path = match &r.pattern {
        Some(p) => PathMatch::Regex(Regex::new(p).map_err(|source| ConfigError::Regex {
            host: host.to_string(),
            route: r.id.clone(),
            pattern: p.clone(),
            source,
        })?),
        None => {
            let p = r.path.trim();
            let p = if p.is_empty() { "/" } else { p };
            if !p.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "host {host:?}, route {:?}: path {p:?} must start with '/'",
                    r.id
                )));
            }
            PathMatch::Prefix(p.to_string())
        }
    };
    let host_match = match r.host_match.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(h) if h.starts_with("*.") => Some(HostMatch::Suffix(h[1..].to_string())),
        Some(h) if strip_port(h) != h => Some(HostMatch::NamePort(h.to_string())),
        Some(h) => Some(HostMatch::Name(h.to_string())),
    };
    let authority = match &target {
        Target::Host { .. } => Some(target.to_string().parse::<Authority>().map_err(|_| {
            ConfigError::Invalid(format!("host {host:?}, route {:?}: target {target} is not a valid authority", r.id))
        })?),
        Target::Vm { .. } => None,
    };
    let timeout = match r.timeout_seconds {
        Some(0) => {
            return Err(ConfigError::Invalid(format!(
                "host {host:?}, route {:?}: timeout_seconds must be at least 1",
                r.id
            )));
        }
        Some(s) => s,
        None => DEFAULT_ROUTE_TIMEOUT_SECS,
    };
    Ok(CompiledRoute {
        id: r.id.clone(),
        path,
        host: host_match,
        target,
        authority,
        schema: r.schema,
        request_headers: header_rules(host, &r.id, "request header", &r.request_headers)?,
        response_headers: header_rules(host, &r.id, "response header", &r.response_headers)?,
        timeout: Duration::from_secs(timeout),
    })
}

fn compile_tcp(host: &str, r: &TcpRoute) -> Result<TcpHost, ConfigError> {
    let target = r.target().map_err(|e| ConfigError::Invalid(format!("host {host:?}, {e}")))?;
    let idle = match r.idle_timeout_seconds {
        Some(0) => return Err(ConfigError::Invalid(format!("host {host:?}: idle_timeout_seconds must be at least 1"))),
        Some(s) => s,
        None => DEFAULT_TCP_IDLE_SECS,
    };
    let max = match r.max_connections {
        Some(0) => return Err(ConfigError::Invalid(format!("host {host:?}: max_connections must be at least 1"))),
        Some(m) => m,
        None => DEFAULT_TCP_MAX_CONNECTIONS,
    };
    let max = usize::try_from(max).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
    Ok(TcpHost {
        route_id: r.id.clone(),
        target,
        idle: Duration::from_secs(idle),
        limit: Arc::new(Semaphore::new(max)),
    })
}

fn compile_cors(c: &CorsConfig) -> Result<Option<CompiledCors>, ConfigError> {
    if !c.enabled {
        return Ok(None);
    }
    let any_origin = c.allowed_origins.is_empty() || c.allowed_origins.iter().any(|o| o.trim() == "*");
    let methods = if c.allowed_methods.is_empty() {
        "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS".to_string()
    } else {
        c.allowed_methods.join(", ")
    };
    let methods = HeaderValue::from_str(&methods)
        .map_err(|_| ConfigError::Invalid("cors.allowed_methods is not a valid header value".into()))?;
    let headers = if c.allowed_headers.is_empty() {
        None
    } else {
        Some(
            HeaderValue::from_str(&c.allowed_headers.join(", "))
                .map_err(|_| ConfigError::Invalid("cors.allowed_headers is not a valid header value".into()))?,
        )
    };
    Ok(Some(CompiledCors {
        any_origin,
        origins: c.allowed_origins.iter().map(|o| o.trim().to_string()).collect(),
        methods,
        headers,
    }))
}

fn trimmed(names: &[String]) -> Vec<String> {
    names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()
}

impl HttpHost {
    /// What [`crate::ProxyAuth::authorize`] checks for a request that `route` serves.
    pub(crate) fn auth_request<'a>(
        &'a self,
        host_id: &'a str,
        headers: &'a http::HeaderMap,
        route: &'a CompiledRoute,
    ) -> crate::auth::AuthRequest<'a> {
        let vm_owner_of = match &route.target {
            Target::Vm { vm_id, .. } if self.require_vm_owner => Some(vm_id.as_str()),
            _ => None,
        };
        crate::auth::AuthRequest {
            host_id,
            headers,
            required_claims: &self.required_claims,
            required_roles: &self.required_roles,
            vm_owner_of,
        }
    }
}

/// Check one host and build its state.
pub(crate) fn compile_host(cfg: &ReverseProxyConfig, h: &ProxyHost) -> Result<CompiledHost, ConfigError> {
    let key = h.key();
    let kind = match (&h.tcp_route, h.http_routes.is_empty()) {
        (Some(_), false) => {
            return Err(ConfigError::Invalid(format!(
                "host {key:?} has a tcp_route and http_routes; a listener carries one or the other"
            )));
        }
        (Some(t), true) => {
            if h.needs_auth() {
                return Err(ConfigError::Invalid(format!(
                    "host {key:?}: require_auth, required_claims, required_roles and require_vm_owner apply to HTTP \
                     routes; a tcp_route cannot check credentials"
                )));
            }
            HostKind::Tcp(compile_tcp(&key, t)?)
        }
        (None, _) => {
            let mut seen = HashSet::new();
            let mut routes = Vec::with_capacity(h.http_routes.len());
            for r in &h.http_routes {
                if !r.id.is_empty() && !seen.insert(r.id.as_str()) {
                    return Err(ConfigError::Invalid(format!("host {key:?}: two http routes have the id {:?}", r.id)));
                }
                routes.push((r.order, compile_route(&key, r)?));
            }
            // Stable sort: ties keep list order.
            routes.sort_by_key(|(o, _)| *o);
            HostKind::Http(HttpHost {
                routes: routes.into_iter().map(|(_, r)| r).collect(),
                require_auth: h.needs_auth(),
                required_claims: trimmed(&h.required_claims),
                required_roles: trimmed(&h.required_roles),
                require_vm_owner: h.require_vm_owner,
                cors: compile_cors(&h.cors)?,
            })
        }
    };
    let tls = if h.tls.enabled {
        let alpn: &[&[u8]] = match kind {
            HostKind::Http(_) => &[b"h2", b"http/1.1"],
            HostKind::Tcp(_) => &[],
        };
        Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&key, &h.tls, alpn)?))
    } else {
        None
    };
    let bind = cfg.bind_addr(h);
    Ok(CompiledHost { key: key.clone(), bind, spec: h.clone(), state: Arc::new(HostState { key, tls, kind }) })
}

/// Check a whole configuration and build every host's state.
pub(crate) fn compile_config(cfg: &ReverseProxyConfig) -> Result<Vec<CompiledHost>, ConfigError> {
    let mut out: Vec<CompiledHost> = Vec::with_capacity(cfg.hosts.len());
    for h in &cfg.hosts {
        let c = compile_host(cfg, h)?;
        for o in &out {
            if o.key == c.key {
                return Err(ConfigError::Invalid(format!("two hosts have the id {:?}", c.key)));
            }
            if o.bind.conflicts_with(&c.bind) {
                return Err(ConfigError::AddressConflict {
                    first: o.key.clone(),
                    second: c.key.clone(),
                    addr: c.bind.to_string(),
                });
            }
        }
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: &str) -> Result<CompiledRoute, ConfigError> {
        compile_route("h", &serde_json::from_str(json).unwrap())
    }

    #[test]
    fn prefix_matches_on_segments() {
        let p = PathMatch::Prefix("/api".into());
        assert!(p.matches("/api") && p.matches("/api/x"));
        assert!(!p.matches("/apix") && !p.matches("/ap"));
        let root = PathMatch::Prefix("/".into());
        assert!(root.matches("/anything"));
    }

    #[test]
    fn host_matching() {
        assert!(HostMatch::Name("a.test".into()).matches("A.test:8080"));
        assert!(HostMatch::NamePort("a.test:81".into()).matches("a.test:81"));
        assert!(!HostMatch::NamePort("a.test:81".into()).matches("a.test:82"));
        assert!(HostMatch::Suffix(".test".into()).matches("x.test:1"));
        assert!(!HostMatch::Suffix(".test".into()).matches("test"));
        assert_eq!(strip_port("[::1]:80"), "::1");
    }

    #[test]
    fn route_errors_are_clear() {
        let e = route(r#"{"id":"r","pattern":"(","target_host":"x","target_port":1}"#).err().unwrap().to_string();
        assert!(e.contains("does not compile"), "{e}");
        let e = route(r#"{"id":"r","target_port":1}"#).err().unwrap().to_string();
        assert!(e.contains("needs a target_host or a target_vm_id"), "{e}");
        let e = route(r#"{"id":"r","target_host":"a","target_vm_id":"v"}"#).err().unwrap().to_string();
        assert!(e.contains("not both"), "{e}");
        let e = route(r#"{"id":"r","target_host":"a","target_port":"0"}"#).err().unwrap().to_string();
        assert!(e.contains("between 1 and 65535"), "{e}");
        let e = route(r#"{"id":"r","target_host":"a","request_headers":{"bad name":"x"}}"#).err().unwrap().to_string();
        assert!(e.contains("not a valid header name"), "{e}");
        assert_eq!(route(r#"{"target_host":"a","schema":"https"}"#).ok().unwrap().authority.unwrap().as_str(), "a:443");
    }

    #[test]
    fn host_errors_are_clear() {
        let cfg: ReverseProxyConfig = serde_json::from_str(
            r#"{"hosts":[{"id":"a","port":80,"tcp_route":{"target_host":"x","target_port":1},
                 "http_routes":[{"target_host":"x"}]}]}"#,
        )
        .unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("one or the other"));
        let cfg: ReverseProxyConfig = serde_json::from_str(
            r#"{"hosts":[{"id":"a","host":"0.0.0.0","port":80},{"id":"b","host":"127.0.0.1","port":"80"}]}"#,
        )
        .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("\"a\" and \"b\" both listen on 127.0.0.1:80"), "{e}");
        let cfg: ReverseProxyConfig =
            serde_json::from_str(r#"{"hosts":[{"id":"a","port":80,"tls":{"enabled":true,"cert":"/nonexistent.pem","key":"/nonexistent.key"}}]}"#)
                .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("TLS") && e.contains("/nonexistent.pem"), "{e}");
    }
}
