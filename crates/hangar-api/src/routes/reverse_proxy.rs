//! `/reverse-proxy/...`: the reverse_proxy module (reference §1.7). Proxy hosts are
//! listeners carrying one TCP route or ordered HTTP routes; changes apply at once.
//! Private keys are never returned (`tls.key` shows as `********`). Every route is also
//! served per host through the orchestrator (`/orchestrator/hosts/{id}/reverse-proxy/...`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use hangar_core::Access;
use hangar_core::claims::*;
use hangar_core::path_segment as seg;
use hangar_proxy as proxy;
use hangar_reverse_proxy::ReverseProxy;
use hangar_wire::HttpCall;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::auth::RequestContext;
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::Json;
use crate::mount::{At, Places};
use crate::routes::machines::orchestrator;
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

pub fn register(api: Api) -> Api {
    api.add_at(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), Places::Hosts, routes!(get_config))
        .add_at(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), Places::Hosts, routes!(enable))
        .add_at(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), Places::Hosts, routes!(disable))
        .add_at(Access::AllOf(&[CONFIGURE_REVERSE_PROXY]), Places::Hosts, routes!(restart))
        .add_at(Access::AllOf(&[LIST_REVERSE_PROXY_HOSTS]), Places::Hosts, routes!(list_hosts))
        .add_at(Access::AllOf(&[CREATE_REVERSE_PROXY_HOST]), Places::Hosts, routes!(create_host))
        .add_at(Access::AllOf(&[LIST_REVERSE_PROXY_HOSTS]), Places::Hosts, routes!(get_host))
        .add_at(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST]), Places::Hosts, routes!(update_host))
        .add_at(Access::AllOf(&[DELETE_REVERSE_PROXY_HOST]), Places::Hosts, routes!(delete_host))
        .add_at(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST_HTTP_ROUTE]), Places::Hosts, routes!(upsert_http_route))
        .add_at(Access::AllOf(&[DELETE_REVERSE_PROXY_HOST_HTTP_ROUTE]), Places::Hosts, routes!(delete_http_route))
        .add_at(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST_HTTP_ROUTE]), Places::Hosts, routes!(order_http_routes))
        .add_at(Access::AllOf(&[UPDATE_REVERSE_PROXY_HOST_TCP_ROUTE]), Places::Hosts, routes!(set_tcp_route))
}

fn module(s: &AppState) -> R<&Arc<ReverseProxy>> {
    s.reverse_proxy.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The reverse_proxy module is not running on this server; see GET /health/system",
        )
    })
}

/// Parse a body read as JSON into its request type. The body is read as a `Value` first so
/// that a shape error keeps the answer it always had (422, `Bad <what>: <serde error>`).
fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> R<T> {
    serde_json::from_value(v).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("Bad {what}: {e}")))
}

// ----- request bodies ------------------------------------------------------------------
//
// The routes accept exactly what `hangar_proxy`'s configuration types accept (the reference's
// JSON): every field optional, ports and counts as numbers or numeric strings, an empty string
// (or `---`) meaning "not set", `ssl` accepted for `tls` and `scheme` for `schema`, unknown
// fields ignored (so a host read with GET, `listener` included, can be sent back). Each request
// type deserializes through its `hangar_proxy` twin (`#[serde(from = ...)]`) and converts back
// without loss; the fields below are what the document shows (`#[serde(default)]` on them
// only marks them optional there: the twin's own `default` is what applies). Every conversion
// names every field, so a field added to `hangar_proxy` does not compile here until it is
// documented.

/// TLS termination on a listener. `cert` and `key` are PEM text, or paths to PEM files inside the
/// server's `REVERSE_PROXY_TLS_FOLDER` (other paths are refused); a PEM key is written to a 0600
/// file and never stored or returned. `key: "********"` on an update keeps the stored key.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(from = "proxy::TlsConfig")]
pub struct ProxyTlsRequest {
    #[serde(default)]
    pub enabled: bool,
    /// The certificate chain, leaf first: PEM text or a file path inside `REVERSE_PROXY_TLS_FOLDER`.
    #[serde(default)]
    pub cert: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1): PEM text or a file path inside `REVERSE_PROXY_TLS_FOLDER`.
    #[serde(default)]
    pub key: String,
}

impl From<proxy::TlsConfig> for ProxyTlsRequest {
    fn from(t: proxy::TlsConfig) -> Self {
        let proxy::TlsConfig { enabled, cert, key } = t;
        ProxyTlsRequest { enabled, cert, key }
    }
}

impl From<ProxyTlsRequest> for proxy::TlsConfig {
    fn from(t: ProxyTlsRequest) -> Self {
        let ProxyTlsRequest { enabled, cert, key } = t;
        proxy::TlsConfig { enabled, cert, key }
    }
}

/// CORS answers of an HTTP listener.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(from = "proxy::CorsConfig")]
pub struct ProxyCorsRequest {
    #[serde(default)]
    pub enabled: bool,
    /// Allowed origins; empty or `*` allows any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Methods announced in preflight answers; empty means the usual REST set.
    #[serde(default)]
    pub allowed_methods: Vec<String>,
    /// Headers announced in preflight answers; empty echoes the requested ones.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
}

impl From<proxy::CorsConfig> for ProxyCorsRequest {
    fn from(c: proxy::CorsConfig) -> Self {
        let proxy::CorsConfig { enabled, allowed_origins, allowed_methods, allowed_headers } = c;
        ProxyCorsRequest { enabled, allowed_origins, allowed_methods, allowed_headers }
    }
}

impl From<ProxyCorsRequest> for proxy::CorsConfig {
    fn from(c: ProxyCorsRequest) -> Self {
        let ProxyCorsRequest { enabled, allowed_origins, allowed_methods, allowed_headers } = c;
        proxy::CorsConfig { enabled, allowed_origins, allowed_methods, allowed_headers }
    }
}

/// How the proxy talks to an HTTP target: `http` (HTTP/1.1), `https` (TLS, HTTP/2 or 1.1 by
/// ALPN, the target's certificate verified) or `h2c` (cleartext HTTP/2). Upper case, `h2` and
/// the empty string (`http`) are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyRouteSchema {
    Http,
    Https,
    H2c,
}

impl From<proxy::Schema> for ProxyRouteSchema {
    fn from(s: proxy::Schema) -> Self {
        match s {
            proxy::Schema::Http => ProxyRouteSchema::Http,
            proxy::Schema::Https => ProxyRouteSchema::Https,
            proxy::Schema::H2c => ProxyRouteSchema::H2c,
        }
    }
}

impl From<ProxyRouteSchema> for proxy::Schema {
    fn from(s: ProxyRouteSchema) -> Self {
        match s {
            ProxyRouteSchema::Http => proxy::Schema::Http,
            ProxyRouteSchema::Https => proxy::Schema::Https,
            ProxyRouteSchema::H2c => proxy::Schema::H2c,
        }
    }
}

/// An HTTP route to add, or to replace (the one with the same `id`). The target is either
/// `target_host` or `target_vm_id`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(from = "proxy::HttpRoute")]
pub struct ProxyHttpRouteRequest {
    /// Stable id; generated when empty.
    #[serde(default)]
    pub id: String,
    /// Routes are tried by ascending order, ties in list order.
    #[serde(default)]
    pub order: i64,
    /// Path prefix, matched on segment boundaries; empty means `/`.
    #[serde(default)]
    pub path: String,
    /// A regex matched against the request path, replacing `path` when set.
    pub pattern: Option<String>,
    /// `Host` match: `name` (any port), `name:port` or `*.suffix`.
    pub host_match: Option<String>,
    /// Target host name or IP.
    pub target_host: Option<String>,
    /// Target port (a number or a numeric string); empty means 80 (`http`, `h2c`) or 443 (`https`).
    pub target_port: Option<u16>,
    /// A VM whose address the host module resolves.
    pub target_vm_id: Option<String>,
    /// Protocol towards the target (`scheme` is accepted for this field).
    #[serde(default)]
    pub schema: ProxyRouteSchema,
    /// Headers set on the forwarded request (an empty value removes the header).
    #[serde(default)]
    pub request_headers: BTreeMap<String, String>,
    /// Headers set on the answer (an empty value removes the header).
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    /// Time allowed for the target's answer headers (a number or a numeric string); empty means 60 s.
    pub timeout_seconds: Option<u64>,
}

impl From<proxy::HttpRoute> for ProxyHttpRouteRequest {
    fn from(r: proxy::HttpRoute) -> Self {
        let proxy::HttpRoute {
            id,
            order,
            path,
            pattern,
            host_match,
            target_host,
            target_port,
            target_vm_id,
            schema,
            request_headers,
            response_headers,
            timeout_seconds,
        } = r;
        ProxyHttpRouteRequest {
            id,
            order,
            path,
            pattern,
            host_match,
            target_host,
            target_port,
            target_vm_id,
            schema: schema.into(),
            request_headers,
            response_headers,
            timeout_seconds,
        }
    }
}

impl From<ProxyHttpRouteRequest> for proxy::HttpRoute {
    fn from(r: ProxyHttpRouteRequest) -> Self {
        let ProxyHttpRouteRequest {
            id,
            order,
            path,
            pattern,
            host_match,
            target_host,
            target_port,
            target_vm_id,
            schema,
            request_headers,
            response_headers,
            timeout_seconds,
        } = r;
        proxy::HttpRoute {
            id,
            order,
            path,
            pattern,
            host_match,
            target_host,
            target_port,
            target_vm_id,
            schema: schema.into(),
            request_headers,
            response_headers,
            timeout_seconds,
        }
    }
}

/// The TCP route of a host. The target is either `target_host` or `target_vm_id`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(from = "proxy::TcpRoute")]
pub struct ProxyTcpRouteRequest {
    /// Stable id; generated when empty.
    #[serde(default)]
    pub id: String,
    /// Target host name or IP.
    pub target_host: Option<String>,
    /// Target port (a number or a numeric string; required).
    pub target_port: Option<u16>,
    /// A VM whose address the host module resolves.
    pub target_vm_id: Option<String>,
    /// Close a connection idle this long (a number or a numeric string); empty means 300 s.
    pub idle_timeout_seconds: Option<u64>,
    /// Refuse connections beyond this many at once (a number or a numeric string); empty means 1024.
    pub max_connections: Option<u64>,
}

impl From<proxy::TcpRoute> for ProxyTcpRouteRequest {
    fn from(r: proxy::TcpRoute) -> Self {
        let proxy::TcpRoute { id, target_host, target_port, target_vm_id, idle_timeout_seconds, max_connections } = r;
        ProxyTcpRouteRequest { id, target_host, target_port, target_vm_id, idle_timeout_seconds, max_connections }
    }
}

impl From<ProxyTcpRouteRequest> for proxy::TcpRoute {
    fn from(r: ProxyTcpRouteRequest) -> Self {
        let ProxyTcpRouteRequest { id, target_host, target_port, target_vm_id, idle_timeout_seconds, max_connections } =
            r;
        proxy::TcpRoute { id, target_host, target_port, target_vm_id, idle_timeout_seconds, max_connections }
    }
}

/// A proxy host to create or to replace: one listener (`host:port`) with either one TCP route
/// or HTTP routes.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(from = "proxy::ProxyHost")]
pub struct ProxyHostRequest {
    /// Stable id; generated when empty on create, kept on update.
    #[serde(default)]
    pub id: String,
    /// Display name, unique among hosts.
    #[serde(default)]
    pub name: String,
    /// Bind address (an IP or a name); empty means the module's `host`.
    #[serde(default)]
    pub host: String,
    /// Bind port (a number or a numeric string); empty means 80, `0` any free port.
    pub port: Option<u16>,
    /// TLS termination on the listener (`ssl` is accepted for this field).
    #[serde(default)]
    pub tls: ProxyTlsRequest,
    /// CORS answers (HTTP listeners only).
    #[serde(default)]
    pub cors: ProxyCorsRequest,
    /// Routes tried by ascending `order`, then in list order.
    #[serde(default)]
    pub http_routes: Vec<ProxyHttpRouteRequest>,
    /// Raw TCP forwarding; excludes `http_routes`.
    pub tcp_route: Option<ProxyTcpRouteRequest>,
    /// Require a Hangar token or API key on every HTTP request (401 otherwise).
    #[serde(default)]
    pub require_auth: bool,
    /// Claims the caller must hold (403 otherwise); implies `require_auth`.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Roles the caller must hold (403 otherwise); implies `require_auth`.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Requests a route sends to a VM must come from the VM's owner (or a SUPER_USER or holder of
    /// MANAGE_ALL_VMS); 403 otherwise. Implies `require_auth`.
    #[serde(default)]
    pub require_vm_owner: bool,
}

impl From<proxy::ProxyHost> for ProxyHostRequest {
    fn from(h: proxy::ProxyHost) -> Self {
        let proxy::ProxyHost {
            id,
            name,
            host,
            port,
            tls,
            cors,
            http_routes,
            tcp_route,
            require_auth,
            required_claims,
            required_roles,
            require_vm_owner,
        } = h;
        ProxyHostRequest {
            id,
            name,
            host,
            port,
            tls: tls.into(),
            cors: cors.into(),
            http_routes: http_routes.into_iter().map(Into::into).collect(),
            tcp_route: tcp_route.map(Into::into),
            require_auth,
            required_claims,
            required_roles,
            require_vm_owner,
        }
    }
}

impl From<ProxyHostRequest> for proxy::ProxyHost {
    fn from(h: ProxyHostRequest) -> Self {
        let ProxyHostRequest {
            id,
            name,
            host,
            port,
            tls,
            cors,
            http_routes,
            tcp_route,
            require_auth,
            required_claims,
            required_roles,
            require_vm_owner,
        } = h;
        proxy::ProxyHost {
            id,
            name,
            host,
            port,
            tls: tls.into(),
            cors: cors.into(),
            http_routes: http_routes.into_iter().map(Into::into).collect(),
            tcp_route: tcp_route.map(Into::into),
            require_auth,
            required_claims,
            required_roles,
            require_vm_owner,
        }
    }
}

// ----- answers ---------------------------------------------------------------------------
//
// Fields are declared in alphabetical order: these answers used to be built as
// `serde_json::Value`s (whose keys are sorted), and declaring them so keeps every answer
// byte for byte what it was. `null` and absent fields are as before too: optional strings of
// routes are left out when not set, unset ports, timeouts and `tcp_route` are `null`.

/// TLS of a listener as answered: a non-empty `key` is always `********`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyTls {
    pub cert: String,
    pub enabled: bool,
    /// `********` when a key is set, else empty.
    pub key: String,
}

impl From<proxy::TlsConfig> for ProxyTls {
    fn from(t: proxy::TlsConfig) -> Self {
        let proxy::TlsConfig { enabled, cert, key } = t;
        let key = if key.is_empty() { key } else { "********".into() };
        ProxyTls { cert, enabled, key }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyCors {
    pub allowed_headers: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub enabled: bool,
}

impl From<proxy::CorsConfig> for ProxyCors {
    fn from(c: proxy::CorsConfig) -> Self {
        let proxy::CorsConfig { enabled, allowed_origins, allowed_methods, allowed_headers } = c;
        ProxyCors { allowed_headers, allowed_methods, allowed_origins, enabled }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyHttpRoute {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_match: Option<String>,
    pub id: String,
    pub order: i64,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    pub request_headers: BTreeMap<String, String>,
    pub response_headers: BTreeMap<String, String>,
    pub schema: ProxyRouteSchema,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    /// A text, as the reference answers it; `null` when not set (80 or 443 by `schema`).
    #[serde(with = "port_text", default)]
    #[schema(value_type = Option<String>)]
    pub target_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_vm_id: Option<String>,
    /// `null` when not set (60 s).
    pub timeout_seconds: Option<u64>,
}

impl From<proxy::HttpRoute> for ProxyHttpRoute {
    fn from(r: proxy::HttpRoute) -> Self {
        let proxy::HttpRoute {
            id,
            order,
            path,
            pattern,
            host_match,
            target_host,
            target_port,
            target_vm_id,
            schema,
            request_headers,
            response_headers,
            timeout_seconds,
        } = r;
        ProxyHttpRoute {
            host_match,
            id,
            order,
            path,
            pattern,
            request_headers,
            response_headers,
            schema: schema.into(),
            target_host,
            target_port,
            target_vm_id,
            timeout_seconds,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyTcpRoute {
    pub id: String,
    /// `null` when not set (300 s).
    pub idle_timeout_seconds: Option<u64>,
    /// `null` when not set (1024).
    pub max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_host: Option<String>,
    /// A text, as the reference answers it.
    #[serde(with = "port_text", default)]
    #[schema(value_type = Option<String>)]
    pub target_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_vm_id: Option<String>,
}

impl From<proxy::TcpRoute> for ProxyTcpRoute {
    fn from(r: proxy::TcpRoute) -> Self {
        let proxy::TcpRoute { id, target_host, target_port, target_vm_id, idle_timeout_seconds, max_connections } = r;
        ProxyTcpRoute { id, idle_timeout_seconds, max_connections, target_host, target_port, target_vm_id }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProxyListenerKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProxyListenerState {
    /// Accepting connections (`local_address` is set).
    Running,
    /// Could not start (`error` says why); applying again retries.
    Failed,
}

/// The state of one host's listener.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyListener {
    /// Connections open now.
    pub active_connections: u64,
    /// Configured address.
    pub address: String,
    /// Why the listener failed (when `state` is `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The host's id.
    pub id: String,
    pub kind: ProxyListenerKind,
    /// The bound `ip:port` (when `state` is `running`; useful with port 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_address: Option<String>,
    pub name: String,
    /// TCP connections refused because of `max_connections`.
    pub refused_connections: u64,
    /// HTTP requests received since start.
    pub requests: u64,
    pub state: ProxyListenerState,
    /// TLS on the listener.
    pub tls: bool,
    /// Connections accepted since start.
    pub total_connections: u64,
}

impl From<&proxy::ListenerStatus> for ProxyListener {
    fn from(l: &proxy::ListenerStatus) -> Self {
        let proxy::ListenerStatus {
            id,
            name,
            address,
            kind,
            tls,
            state,
            active_connections,
            total_connections,
            requests,
            refused_connections,
        } = l;
        let (state, local_address, error) = match state {
            proxy::ListenerState::Running { local_address } => {
                (ProxyListenerState::Running, Some(local_address.to_string()), None)
            }
            proxy::ListenerState::Failed { error } => (ProxyListenerState::Failed, None, Some(error.clone())),
        };
        ProxyListener {
            active_connections: *active_connections,
            address: address.clone(),
            error,
            id: id.clone(),
            kind: match kind {
                proxy::ListenerKind::Http => ProxyListenerKind::Http,
                proxy::ListenerKind::Tcp => ProxyListenerKind::Tcp,
            },
            local_address,
            name: name.clone(),
            refused_connections: *refused_connections,
            requests: *requests,
            state,
            tls: *tls,
            total_connections: *total_connections,
        }
    }
}

/// Ports in answers are texts (`"8080"`), as the reference answers them: Go clients (the
/// Terraform provider) fail a whole answer on a number there. Read back (an orchestrator reads
/// a host's answer) as a text or a number; `null` or `""` is "not set".
mod port_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(port: &Option<u16>, s: S) -> Result<S::Ok, S::Error> {
        match port {
            Some(p) => s.serialize_str(&p.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        let bad = |v: &dyn std::fmt::Display| D::Error::custom(format!("port {v} is not between 0 and 65535"));
        match Option::<Value>::deserialize(d)? {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) if t.trim().is_empty() => Ok(None),
            Some(Value::String(t)) => t.trim().parse().map(Some).map_err(|_| bad(&t)),
            Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()).map(Some).ok_or_else(|| bad(&n)),
            Some(other) => Err(bad(&other)),
        }
    }
}

/// A proxy host as answered: the private key hidden, the listener's state added.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyHost {
    pub cors: ProxyCors,
    /// Bind address; empty means the module's `host`.
    pub host: String,
    pub http_routes: Vec<ProxyHttpRoute>,
    pub id: String,
    /// The listener's state; absent when the proxy has no listener for the host (disabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<ProxyListener>,
    pub name: String,
    /// Bind port, a text as the reference answers it; `null` when not set (80).
    #[serde(with = "port_text", default)]
    #[schema(value_type = Option<String>)]
    pub port: Option<u16>,
    pub require_auth: bool,
    /// Requests to VM targets need the VM's owner; absent when not set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_vm_owner: bool,
    /// Claims a caller must hold; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<String>,
    /// Roles a caller must hold; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_roles: Vec<String>,
    /// `null` for an HTTP host.
    pub tcp_route: Option<ProxyTcpRoute>,
    pub tls: ProxyTls,
}

impl ProxyHost {
    fn view(h: proxy::ProxyHost, status: &proxy::ProxyStatus) -> Self {
        let listener = status.listener(&h.id).map(ProxyListener::from);
        let proxy::ProxyHost {
            id,
            name,
            host,
            port,
            tls,
            cors,
            http_routes,
            tcp_route,
            require_auth,
            required_claims,
            required_roles,
            require_vm_owner,
        } = h;
        ProxyHost {
            cors: cors.into(),
            host,
            http_routes: http_routes.into_iter().map(Into::into).collect(),
            id,
            listener,
            name,
            port,
            require_auth,
            require_vm_owner,
            required_claims,
            required_roles,
            tcp_route: tcp_route.map(Into::into),
            tls: tls.into(),
        }
    }
}

/// The state of every listener.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProxyStatus {
    /// Whether the last applied configuration was enabled.
    pub enabled: bool,
    pub listeners: Vec<ProxyListener>,
}

impl From<&proxy::ProxyStatus> for ProxyStatus {
    fn from(s: &proxy::ProxyStatus) -> Self {
        let proxy::ProxyStatus { enabled, listeners } = s;
        ProxyStatus { enabled: *enabled, listeners: listeners.iter().map(ProxyListener::from).collect() }
    }
}

/// The module's configuration and the state of every listener.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReverseProxyConfig {
    pub enabled: bool,
    /// Bind address of hosts whose own `host` is empty.
    pub host: String,
    pub hosts: Vec<ProxyHost>,
    /// The reference's reverse-proxy port (kept for compatibility), a text as it answers it.
    #[serde(with = "port_text", default)]
    #[schema(value_type = Option<String>)]
    pub port: Option<u16>,
    pub status: ProxyStatus,
}

async fn view(m: &ReverseProxy, h: proxy::ProxyHost) -> ProxyHost {
    ProxyHost::view(h, &m.status().await)
}

// ----- routes ----------------------------------------------------------------------------
//
// Every route is also mounted per host through the orchestrator
// (`/orchestrator/hosts/{id}/reverse-proxy/...`, [`Places::Hosts`]): one handler reads its
// place from [`At`]; per host, the body is parsed here as on the host (ports as strings and
// all), forwarded as the `hangar_proxy` type it became, and the host's answer read back as
// the same answer type this module serves. The orchestrator checks that the caller may use
// the host and calls it with its own stored credentials.

/// Forward a reverse-proxy call to `host` through the orchestrator; changes are audited there.
async fn forward<T: serde::de::DeserializeOwned>(
    s: &AppState,
    ctx: &RequestContext,
    host: &str,
    audit: Option<&str>,
    method: &'static str,
    path: String,
    body: Option<Value>,
) -> R<T> {
    let call = HttpCall { method, path, body, timeout: Duration::from_secs(60) };
    orchestrator(s)?
        .forward_to_host(ctx.caller()?, host, audit.map(|a| (&ctx.actor, a)), &call)
        .await
        .map_err(ApiError::from_domain)
}

/// A `hangar_proxy` value as a request body to a host.
fn body<T: Serialize>(v: &T) -> R<Option<Value>> {
    serde_json::to_value(v).map(Some).map_err(|e| ApiError::internal(e.to_string()))
}

fn host_path(id: &str) -> String {
    format!("/reverse-proxy/hosts/{}", seg(id))
}

/// The module's configuration and the state of every listener.
#[utoipa::path(get, path = "/reverse-proxy", tag = "reverse_proxy", responses((status = 200, body = ReverseProxyConfig)))]
async fn get_config(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<ReverseProxyConfig>> {
    if let Some(host) = at.place.host() {
        return forward(&s, &ctx, host, None, "GET", "/reverse-proxy".into(), None).await.map(axum::Json);
    }
    let m = module(&s)?;
    let cfg = m.config().await.map_err(ApiError::from_domain)?;
    let status = m.status().await;
    let proxy::ReverseProxyConfig { enabled, host, port, hosts } = cfg;
    Ok(axum::Json(ReverseProxyConfig {
        enabled,
        host,
        hosts: hosts.into_iter().map(|h| ProxyHost::view(h, &status)).collect(),
        port,
        status: (&status).into(),
    }))
}

/// Enable, disable or restart: `verb` names the route.
async fn switch(s: &AppState, ctx: &RequestContext, at: &At, verb: &'static str) -> R<StatusCode> {
    if let Some(host) = at.place.host() {
        let audit = format!("reverse_proxy.{verb}");
        let _: IgnoredAny = forward(s, ctx, host, Some(&audit), "PUT", format!("/reverse-proxy/{verb}"), None).await?;
        return Ok(StatusCode::ACCEPTED);
    }
    let m = module(s)?;
    match verb {
        "enable" => m.set_enabled(&ctx.actor, true).await,
        "disable" => m.set_enabled(&ctx.actor, false).await,
        _ => m.restart(&ctx.actor).await,
    }
    .map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(put, path = "/reverse-proxy/enable", tag = "reverse_proxy", responses((status = 202)))]
async fn enable(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    switch(&s, &ctx, &at, "enable").await
}

#[utoipa::path(put, path = "/reverse-proxy/disable", tag = "reverse_proxy", responses((status = 202)))]
async fn disable(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    switch(&s, &ctx, &at, "disable").await
}

#[utoipa::path(put, path = "/reverse-proxy/restart", tag = "reverse_proxy", responses((status = 202)))]
async fn restart(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    switch(&s, &ctx, &at, "restart").await
}

#[utoipa::path(get, path = "/reverse-proxy/hosts", tag = "reverse_proxy", responses((status = 200, body = Vec<ProxyHost>)))]
async fn list_hosts(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<Vec<ProxyHost>>> {
    if let Some(host) = at.place.host() {
        return forward(&s, &ctx, host, None, "GET", "/reverse-proxy/hosts".into(), None).await.map(axum::Json);
    }
    let m = module(&s)?;
    let cfg = m.config().await.map_err(ApiError::from_domain)?;
    let status = m.status().await;
    Ok(axum::Json(cfg.hosts.into_iter().map(|h| ProxyHost::view(h, &status)).collect()))
}

/// Create a proxy host: `{name, host, port, tls{enabled, cert, key}, cors, http_routes[...] | tcp_route{...}, require_auth}`.
#[utoipa::path(post, path = "/reverse-proxy/hosts", tag = "reverse_proxy", request_body = ProxyHostRequest,
    responses((status = 201, body = ProxyHost), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn create_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(b): Json<Value>,
) -> R<(StatusCode, axum::Json<ProxyHost>)> {
    let host: proxy::ProxyHost = parse::<ProxyHostRequest>(b, "proxy host")?.into();
    if let Some(on) = at.place.host() {
        let h = forward(
            &s,
            &ctx,
            on,
            Some("reverse_proxy.create_host"),
            "POST",
            "/reverse-proxy/hosts".into(),
            body(&host)?,
        )
        .await?;
        return Ok((StatusCode::CREATED, axum::Json(h)));
    }
    let m = module(&s)?;
    let h = m.create_host(&ctx.actor, host).await.map_err(ApiError::from_domain)?;
    Ok((StatusCode::CREATED, axum::Json(view(m, h).await)))
}

#[utoipa::path(get, path = "/reverse-proxy/hosts/{rp_host_id}", tag = "reverse_proxy", params(("rp_host_id" = String, Path, description = "Proxy host id")),
    responses((status = 200, body = ProxyHost), (status = 404, body = ApiErrorBody)))]
async fn get_host(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<axum::Json<ProxyHost>> {
    let id = at.param("rp_host_id")?;
    if let Some(on) = at.place.host() {
        return forward(&s, &ctx, on, None, "GET", host_path(id), None).await.map(axum::Json);
    }
    let m = module(&s)?;
    let h = m.get_host(id).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, h).await))
}

#[utoipa::path(put, path = "/reverse-proxy/hosts/{rp_host_id}", tag = "reverse_proxy", params(("rp_host_id" = String, Path, description = "Proxy host id")),
    request_body = ProxyHostRequest, responses((status = 200, body = ProxyHost)))]
async fn update_host(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(b): Json<Value>,
) -> R<axum::Json<ProxyHost>> {
    let id = at.param("rp_host_id")?;
    let host: proxy::ProxyHost = parse::<ProxyHostRequest>(b, "proxy host")?.into();
    if let Some(on) = at.place.host() {
        return forward(&s, &ctx, on, Some("reverse_proxy.update_host"), "PUT", host_path(id), body(&host)?)
            .await
            .map(axum::Json);
    }
    let m = module(&s)?;
    let h = m.update_host(&ctx.actor, id, host).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, h).await))
}

#[utoipa::path(delete, path = "/reverse-proxy/hosts/{rp_host_id}", tag = "reverse_proxy", params(("rp_host_id" = String, Path, description = "Proxy host id")),
    responses((status = 202), (status = 404, body = ApiErrorBody)))]
async fn delete_host(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    let id = at.param("rp_host_id")?;
    if let Some(on) = at.place.host() {
        let _: IgnoredAny =
            forward(&s, &ctx, on, Some("reverse_proxy.delete_host"), "DELETE", host_path(id), None).await?;
        return Ok(StatusCode::ACCEPTED);
    }
    module(&s)?.delete_host(&ctx.actor, id).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

/// Add an HTTP route, or replace the one with the same `id`.
#[utoipa::path(post, path = "/reverse-proxy/hosts/{rp_host_id}/http_routes", tag = "reverse_proxy", params(("rp_host_id" = String, Path, description = "Proxy host id")),
    request_body = ProxyHttpRouteRequest, responses((status = 200, body = ProxyHost)))]
async fn upsert_http_route(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(b): Json<Value>,
) -> R<axum::Json<ProxyHost>> {
    let id = at.param("rp_host_id")?;
    let route: proxy::HttpRoute = parse::<ProxyHttpRouteRequest>(b, "HTTP route")?.into();
    if let Some(on) = at.place.host() {
        let path = format!("{}/http_routes", host_path(id));
        return forward(&s, &ctx, on, Some("reverse_proxy.upsert_http_route"), "POST", path, body(&route)?)
            .await
            .map(axum::Json);
    }
    let m = module(&s)?;
    let h = m.upsert_http_route(&ctx.actor, id, route).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, h).await))
}

#[utoipa::path(delete, path = "/reverse-proxy/hosts/{rp_host_id}/http_routes/{http_route_id}", tag = "reverse_proxy",
    params(("rp_host_id" = String, Path, description = "Proxy host id"), ("http_route_id" = String, Path)), responses((status = 202)))]
async fn delete_http_route(State(s): State<AppState>, ctx: RequestContext, at: At) -> R<StatusCode> {
    let (id, route) = (at.param("rp_host_id")?, at.param("http_route_id")?);
    if let Some(on) = at.place.host() {
        let path = format!("{}/http_routes/{}", host_path(id), seg(route));
        let _: IgnoredAny =
            forward(&s, &ctx, on, Some("reverse_proxy.delete_http_route"), "DELETE", path, None).await?;
        return Ok(StatusCode::ACCEPTED);
    }
    module(&s)?.delete_http_route(&ctx.actor, id, route).await.map_err(ApiError::from_domain)?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RouteOrder {
    /// Every route id of the host, first tried first.
    pub order: Vec<String>,
}

#[utoipa::path(put, path = "/reverse-proxy/hosts/{rp_host_id}/http_routes/order", tag = "reverse_proxy", params(("rp_host_id" = String, Path, description = "Proxy host id")),
    request_body = RouteOrder, responses((status = 200, body = ProxyHost)))]
async fn order_http_routes(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(b): Json<RouteOrder>,
) -> R<axum::Json<ProxyHost>> {
    let id = at.param("rp_host_id")?;
    if let Some(on) = at.place.host() {
        let path = format!("{}/http_routes/order", host_path(id));
        return forward(&s, &ctx, on, Some("reverse_proxy.order_http_routes"), "PUT", path, body(&b)?)
            .await
            .map(axum::Json);
    }
    let m = module(&s)?;
    let h = m.order_http_routes(&ctx.actor, id, b.order).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, h).await))
}

#[utoipa::path(post, path = "/reverse-proxy/hosts/{rp_host_id}/tcp_route", tag = "reverse_proxy", params(("rp_host_id" = String, Path, description = "Proxy host id")),
    request_body = ProxyTcpRouteRequest, responses((status = 200, body = ProxyHost)))]
async fn set_tcp_route(
    State(s): State<AppState>,
    ctx: RequestContext,
    at: At,
    Json(b): Json<Value>,
) -> R<axum::Json<ProxyHost>> {
    let id = at.param("rp_host_id")?;
    let route: proxy::TcpRoute = parse::<ProxyTcpRouteRequest>(b, "TCP route")?.into();
    if let Some(on) = at.place.host() {
        let path = format!("{}/tcp_route", host_path(id));
        return forward(&s, &ctx, on, Some("reverse_proxy.set_tcp_route"), "POST", path, body(&route)?)
            .await
            .map(axum::Json);
    }
    let m = module(&s)?;
    let h = m.set_tcp_route(&ctx.actor, id, route).await.map_err(ApiError::from_domain)?;
    Ok(axum::Json(view(m, h).await))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    /// An answer as it was built before these types: the host as a `Value`, a non-empty key
    /// hidden, the listener added.
    fn untyped_view(h: &proxy::ProxyHost, status: &proxy::ProxyStatus) -> Value {
        let mut v = serde_json::to_value(h).unwrap();
        if let Some(k) = v.pointer_mut("/tls/key")
            && k.as_str().is_some_and(|s| !s.is_empty())
        {
            *k = json!("********");
        }
        if let Some(l) = status.listener(&h.id)
            && let Some(o) = v.as_object_mut()
        {
            o.insert("listener".into(), serde_json::to_value(l).unwrap());
        }
        // Ports are answered as texts, as the reference answers them.
        let text = |p: &mut Value| {
            if let Some(n) = p.as_u64() {
                *p = json!(n.to_string());
            }
        };
        v.get_mut("port").map(text);
        if let Some(t) = v.pointer_mut("/tcp_route/target_port") {
            text(t);
        }
        for r in v.get_mut("http_routes").and_then(Value::as_array_mut).into_iter().flatten() {
            r.get_mut("target_port").map(text);
        }
        v
    }

    fn host_bodies() -> Vec<Value> {
        vec![
            json!({}),
            // The reference's shapes: ports as strings, `ssl`, `scheme`, empty strings, unknown fields.
            json!({"id": "h1", "name": "web", "host": "127.0.0.1", "port": "8080",
                "ssl": {"enabled": false, "cert": "", "key": ""},
                "http_routes": [{"id": "r1", "order": 1, "path": "/api", "pattern": "",
                    "target_vm_id": "", "target_host": "10.0.0.2", "target_port": "3000",
                    "scheme": "http", "request_headers": {}, "response_headers": {"X-A": "b"}}],
                "host_id": "ignored"}),
            json!({"name": "ssh", "port": 2222, "tcp_route": {"target_vm_id": "vm-1", "target_port": "22",
                "target_host": "---", "idle_timeout_seconds": "30", "max_connections": 5}}),
            json!({"id": "h2", "name": "full", "host": "", "port": null, "require_auth": true,
                "required_claims": ["LIST_VM"], "required_roles": ["USER"], "require_vm_owner": true,
                "tls": {"enabled": true, "cert": "/c.pem", "key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"},
                "cors": {"enabled": true, "allowed_origins": ["*"], "allowed_methods": ["GET"], "allowed_headers": []},
                "http_routes": [
                    {"path": "/", "target_host": "a", "schema": "HTTPS", "timeout_seconds": "5", "host_match": "*.x"},
                    {"path": "/g", "target_vm_id": "vm", "target_port": 50051, "schema": "h2", "pattern": "^/g/.*"},
                    {"schema": "", "order": -3}
                ],
                "tcp_route": null}),
            // A host read with GET and sent back: the listener and the hidden key are accepted.
            json!({"id": "h3", "port": 0, "tls": {"enabled": true, "key": "********"},
                "listener": {"id": "h3", "state": "running", "local_address": "127.0.0.1:1"}}),
            // Refused, with the same message as before.
            json!({"name": "x", "port": 70000}),
            json!({"port": "eighty"}),
            json!({"http_routes": [{"schema": "ftp"}]}),
            json!({"http_routes": [{"timeout_seconds": -1}]}),
            json!({"tcp_route": {"max_connections": "many"}}),
            json!({"require_auth": "yes"}),
            json!([]),
            json!(null),
            json!("host"),
        ]
    }

    /// Each request type accepts exactly what its `hangar_proxy` twin accepts, converts to the
    /// same value, and refuses with the same message.
    fn same_as_proxy<D, P>(body: &Value)
    where
        D: serde::de::DeserializeOwned + Into<P>,
        P: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let typed = serde_json::from_value::<D>(body.clone()).map(Into::into).map_err(|e| e.to_string());
        let direct = serde_json::from_value::<P>(body.clone()).map_err(|e| e.to_string());
        assert_eq!(typed, direct, "{body}");
    }

    #[test]
    fn requests_accept_what_the_proxy_types_accept() {
        let mut ok = 0;
        for body in host_bodies() {
            same_as_proxy::<ProxyHostRequest, proxy::ProxyHost>(&body);
            ok += serde_json::from_value::<proxy::ProxyHost>(body.clone()).is_ok() as usize;
            for r in body.get("http_routes").and_then(Value::as_array).into_iter().flatten() {
                same_as_proxy::<ProxyHttpRouteRequest, proxy::HttpRoute>(r);
            }
            if let Some(t) = body.get("tcp_route") {
                same_as_proxy::<ProxyTcpRouteRequest, proxy::TcpRoute>(t);
            }
            same_as_proxy::<ProxyHttpRouteRequest, proxy::HttpRoute>(&body);
            same_as_proxy::<ProxyTcpRouteRequest, proxy::TcpRoute>(&body);
        }
        // The five meant to be accepted, and `[]` (serde reads a struct from an empty sequence too).
        assert_eq!(ok, 6, "the accepted samples parse");
    }

    /// An orchestrator reads a host's answer: ports as texts, or as numbers from a host that
    /// answered them so before.
    #[test]
    fn answer_ports_read_back_as_texts_or_numbers() {
        let read = |port: Value| {
            serde_json::from_value::<ProxyTcpRoute>(json!({"id": "t", "idle_timeout_seconds": null,
                "max_connections": null, "target_port": port}))
            .map(|r| r.target_port)
            .map_err(|e| e.to_string())
        };
        assert_eq!(read(json!("22")), Ok(Some(22)));
        assert_eq!(read(json!(22)), Ok(Some(22)));
        assert_eq!(read(json!("")), Ok(None));
        assert_eq!(read(Value::Null), Ok(None));
        assert!(read(json!("70000")).is_err() && read(json!(-1)).is_err() && read(json!(true)).is_err());
        let route = ProxyTcpRoute {
            id: "t".into(),
            idle_timeout_seconds: None,
            max_connections: None,
            target_host: None,
            target_port: Some(22),
            target_vm_id: None,
        };
        assert_eq!(serde_json::to_value(&route).unwrap()["target_port"], "22");
    }

    #[test]
    fn answers_are_byte_for_byte_what_they_were() {
        let hosts: Vec<proxy::ProxyHost> =
            host_bodies().into_iter().filter_map(|b| serde_json::from_value(b).ok()).collect();
        let listener = |id: &str, state: proxy::ListenerState| proxy::ListenerStatus {
            id: id.into(),
            name: format!("{id}-name"),
            address: "0.0.0.0:8080".into(),
            kind: proxy::ListenerKind::Http,
            tls: true,
            state,
            active_connections: 1,
            total_connections: 2,
            requests: 3,
            refused_connections: 4,
        };
        let status = proxy::ProxyStatus {
            enabled: true,
            listeners: vec![
                listener("h1", proxy::ListenerState::Running { local_address: "127.0.0.1:8080".parse().unwrap() }),
                listener("h2", proxy::ListenerState::Failed { error: "address in use".into() }),
                listener("h3", proxy::ListenerState::Running { local_address: "[::1]:443".parse().unwrap() }),
                listener("other", proxy::ListenerState::Failed { error: "x".into() }),
            ],
        };
        for h in &hosts {
            let typed = serde_json::to_string(&ProxyHost::view(h.clone(), &status)).unwrap();
            assert_eq!(typed, serde_json::to_string(&untyped_view(h, &status)).unwrap());
        }
        let old_config = json!({"enabled": false, "host": "0.0.0.0", "port": "5080",
            "hosts": hosts.iter().map(|h| untyped_view(h, &status)).collect::<Vec<_>>(), "status": status});
        let new_config = ReverseProxyConfig {
            enabled: false,
            host: "0.0.0.0".into(),
            hosts: hosts.iter().map(|h| ProxyHost::view(h.clone(), &status)).collect(),
            port: Some(5080),
            status: (&status).into(),
        };
        assert_eq!(serde_json::to_string(&new_config).unwrap(), serde_json::to_string(&old_config).unwrap());
        let no_port = ReverseProxyConfig { port: None, hosts: Vec::new(), ..new_config };
        assert!(serde_json::to_string(&no_port).unwrap().contains(r#""port":null"#));
    }
}
