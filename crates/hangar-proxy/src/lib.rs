//! Hangar's reverse-proxy engine.
//!
//! A [`ProxyManager`] runs one listener per [`ProxyHost`] of a [`ReverseProxyConfig`]:
//!
//! * **HTTP hosts** (hyper 1, HTTP/1.1 and HTTP/2 on the same port, optional TLS with ALPN)
//!   route each request through an ordered list of [`HttpRoute`]s (path prefix or regex, optional
//!   `Host` match) to a target `host:port` or a VM, over HTTP/1.1, HTTPS (HTTP/2 or 1.1 by ALPN)
//!   or cleartext HTTP/2. Websockets and other `Upgrade`s pass through. Hop-by-hop headers are
//!   removed, `X-Forwarded-For/-Host/-Proto` set, per-route header rules and timeouts applied;
//!   failures answer 502 (target unreachable) or 504 (timeout) with a JSON body
//!   `{code, error, message, target}`.
//! * **TCP hosts** splice bytes both ways with half-close, an idle timeout and a connection limit.
//!
//! Seams for the rest of Hangar:
//! * [`TargetResolver`] turns VM ids into IPs, with a change feed so a VM that got a new address
//!   is reached by the next connection, no restart needed;
//! * [`VmDialer`] reaches VM targets by another path than their IP (a tunnel through the host
//!   that owns the VM), when one is given to [`ProxyManagerBuilder::vm_dialer`];
//! * [`ProxyAuth`] checks requests to hosts with `require_auth` (401 `{code, error, message}`
//!   otherwise);
//! * [`ProxyEvent`]s go out on a broadcast channel ([`ProxyManager::subscribe`]).
//!
//! The crate has no API routes and no Hangar API types: the HTTP layer stores the configuration
//! and calls [`ProxyManager::apply`].

mod auth;
mod compile;
mod config;
mod cork;
mod dial;
mod error;
mod events;
mod h1;
mod http;
mod listener;
mod manager;
mod resolve;
mod tcp;
mod tls;

pub use auth::{AuthRejection, AuthRequest, ProxyAuth};
pub use config::{
    BindAddr, CorsConfig, DEFAULT_ROUTE_TIMEOUT_SECS, DEFAULT_TCP_IDLE_SECS, DEFAULT_TCP_MAX_CONNECTIONS, HttpRoute,
    ProxyHost, ReverseProxyConfig, Schema, Target, TcpRoute, TlsConfig,
};
pub use dial::{BoxedIo, UpstreamIo, VmDialer};
pub use error::{ConfigError, ProxyError, ResolveError};
pub use events::ProxyEvent;
pub use manager::{
    ApplyReport, ListenerKind, ListenerState, ListenerStatus, ProxyManager, ProxyManagerBuilder, ProxyStatus,
};
pub use resolve::{MapResolver, TargetResolver};
pub use tls::UpstreamTrust;
