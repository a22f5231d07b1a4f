//! HTTP forwarding: routing, header rules, upgrades, error answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hangar_core::error_chain;
use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, CONNECTION, CONTENT_TYPE, HOST, HeaderMap,
    HeaderName, HeaderValue, ORIGIN, TE, UPGRADE, VARY, WWW_AUTHENTICATE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::ProxyAuth;
use crate::compile::{CompiledCors, CompiledRoute, HostKind, HttpHost};
use crate::config::{Schema, Target};
use crate::dial::VmDialer;
use crate::error::ProxyError;
use crate::events::{EventSink, ProxyEvent};
use crate::listener::ListenerCtx;
use crate::resolve::TargetCache;
use crate::tls::{UpstreamTrust, client_config};

/// The body of every answer: the target's streamed body, or one the proxy made.
pub(crate) type ProxyBody = Either<Incoming, Full<Bytes>>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const TRAILER: HeaderName = HeaderName::from_static("trailer");
const TRANSFER_ENCODING: HeaderName = HeaderName::from_static("transfer-encoding");

/// The pooled clients towards targets, one per way of speaking.
pub(crate) struct Upstreams {
    http: Client<HttpConnector, Incoming>,
    https: Client<HttpsConnector<HttpConnector>, Incoming>,
    https_h1: Client<HttpsConnector<HttpConnector>, Incoming>,
    h2c: Client<HttpConnector, Incoming>,
}

impl Upstreams {
    pub(crate) fn new(trust: &UpstreamTrust, pool_idle: Duration) -> Result<Self, ProxyError> {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(Duration::from_secs(10)));
        let tls = client_config(trust)?;
        let https_conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp.clone());
        let https_h1_conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(tcp.clone());
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new()).timer(TokioTimer::new()).pool_idle_timeout(pool_idle);
        let h2c = {
            let mut b2 = b.clone();
            b2.http2_only(true);
            b2.build(tcp.clone())
        };
        Ok(Upstreams { http: b.build(tcp), https: b.build(https_conn), https_h1: b.build(https_h1_conn), h2c })
    }
}

/// What every listener shares.
pub(crate) struct Shared {
    pub upstreams: Upstreams,
    pub targets: Arc<TargetCache>,
    pub dialer: Option<Arc<dyn VmDialer>>,
    pub auth: Option<Arc<dyn ProxyAuth>>,
    pub events: EventSink,
    /// Time allowed for a client to send a request's head (idle keep-alive included).
    pub header_read: Duration,
    /// Plain HTTP/1.1 requests go through [`crate::h1`] first.
    pub fast_lane: bool,
    /// Upstream connections the fast lane's ended client connections left for the next ones.
    pub idle: crate::h1::IdlePool,
}

/// A future driving one upstream connection.
type UpConn = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The upstream HTTP/1.1 connections a client connection keeps for itself.
///
/// Requests of one HTTP/1 connection come one after the other, so they reuse one upstream
/// connection without a shared pool; the streams of an HTTP/2 connection take a kept
/// connection that is ready, or open one more. These connections are driven by the client
/// connection's own task ([`serve_connection`]), as are hyper's HTTP/2 streams ([`ConnExec`]):
/// no hand-over between tasks per request, and answers ready together leave in one write.
pub(crate) struct Sticky {
    slot: std::sync::Mutex<Vec<(Dest, http1::SendRequest<Incoming>)>>,
    drive: mpsc::UnboundedSender<UpConn>,
}

/// The most upstream connections one client connection keeps.
const STICKY_MAX: usize = 64;

tokio::task_local! {
    /// Where the client connection being served takes futures to drive on its own task.
    static DRIVE: mpsc::UnboundedSender<UpConn>;
}

/// hyper's executor for listeners: a future hyper starts while serving a connection (an
/// HTTP/2 stream) runs on that connection's task, beside it (see [`Sticky`]); elsewhere it is
/// spawned.
#[derive(Clone, Copy, Default)]
pub(crate) struct ConnExec;

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let fut: UpConn = Box::pin(fut);
        match DRIVE.try_with(Clone::clone) {
            Ok(drive) => {
                if let Err(mpsc::error::SendError(fut)) = drive.send(fut) {
                    tokio::spawn(fut);
                }
            }
            Err(_) => {
                tokio::spawn(fut);
            }
        }
    }
}

/// A route's target, resolved for one request.
pub(crate) struct Resolved {
    pub dest: Dest,
    /// The target's address; for a dialed VM only a label (written into h2c requests).
    pub authority: Authority,
}

impl Resolved {
    /// How the target is named in errors and events.
    pub(crate) fn describe(&self, route: &CompiledRoute) -> String {
        match (&route.target, &self.dest) {
            (Target::Host { .. }, _) => self.authority.to_string(),
            (Target::Vm { vm_id, port }, Dest::Dial { .. }) => format!("vm {vm_id} port {port} (dialed)"),
            (Target::Vm { vm_id, .. }, Dest::Addr(_)) => format!("{} (vm {vm_id})", self.authority),
        }
    }
}

/// Where a request goes: an address connected over TCP, or a VM reached through the dialer.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Dest {
    Addr(Authority),
    Dial { vm: String, port: u16 },
}

/// A byte stream to a target: a TCP connection, or what a [`VmDialer`] gave.
pub(crate) type UpIo = tokio_util::either::Either<TcpStream, crate::dial::BoxedIo>;

impl Dest {
    /// Open a byte stream to the target.
    pub(crate) async fn connect(&self, dialer: Option<&Arc<dyn VmDialer>>) -> Result<UpIo, std::io::Error> {
        match self {
            Dest::Addr(a) => {
                let stream = TcpStream::connect(a.as_str()).await?;
                let _ = stream.set_nodelay(true);
                Ok(UpIo::Left(stream))
            }
            Dest::Dial { vm, port } => match dialer {
                Some(d) => Ok(UpIo::Right(d.dial(vm, *port).await?)),
                None => Err(std::io::Error::other("no VM dialer is configured")),
            },
        }
    }

    /// Open a byte stream to the target and run an HTTP/1.1 client handshake on it.
    async fn http1(
        &self,
        dialer: Option<&Arc<dyn VmDialer>>,
    ) -> Result<(http1::SendRequest<Incoming>, UpConn), UpstreamError> {
        let io = self.connect(dialer).await.map_err(UpstreamError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await.map_err(UpstreamError::Http)?;
        Ok((
            sender,
            Box::pin(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            }),
        ))
    }
}

async fn dial(dialer: Option<&Arc<dyn VmDialer>>, vm: &str, port: u16) -> Result<crate::dial::BoxedIo, UpstreamError> {
    let Some(d) = dialer else {
        return Err(UpstreamError::Connect(std::io::Error::other("no VM dialer is configured")));
    };
    d.dial(vm, port).await.map_err(UpstreamError::Connect)
}

/// Send one request on a new connection through the dialer (no pooling): upgrades, HTTP/1.0,
/// `Connection: close` and h2c requests to dialed VMs.
async fn send_dialed_once(
    dialer: Option<&Arc<dyn VmDialer>>,
    vm: &str,
    port: u16,
    schema: Schema,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, UpstreamError> {
    if schema == Schema::H2c {
        let io = dial(dialer, vm, port).await?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2c connection ended with an error");
            }
        });
        return sender.send_request(req).await.map_err(UpstreamError::Http);
    }
    let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(pq);
    let (mut sender, conn) = Dest::Dial { vm: vm.to_string(), port }.http1(dialer).await?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(UpstreamError::Http)
}

/// Per-connection request handler.
#[derive(Clone)]
pub(crate) struct ProxyService {
    pub shared: Arc<Shared>,
    pub listener: Arc<ListenerCtx>,
    pub peer_ip: HeaderValue,
    pub tls: bool,
    pub sticky: Option<Arc<Sticky>>,
}

/// Why a target did not answer.
enum UpstreamError {
    Connect(std::io::Error),
    Http(hyper::Error),
    Pooled(hyper_util::client::legacy::Error),
}

impl UpstreamError {
    fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) => true,
            UpstreamError::Http(_) => false,
            UpstreamError::Pooled(e) => e.is_connect(),
        }
    }
    fn message(&self) -> String {
        match self {
            UpstreamError::Connect(e) => format!("connect: {e}"),
            UpstreamError::Http(e) => error_chain(e),
            UpstreamError::Pooled(e) => error_chain(e),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u16,
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

/// An answer the proxy makes itself: a JSON error body `{code, error, message[, target]}`.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// Sent as `WWW-Authenticate: Bearer` (401 answers).
    pub bearer: bool,
}

impl Reply {
    pub(crate) fn error(status: StatusCode, message: String, target: Option<String>) -> Reply {
        let error = match status.as_u16() {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            502 => "bad_gateway",
            504 => "gateway_timeout",
            _ => "internal_error",
        };
        let body = serde_json::to_vec(&ErrorBody { code: status.as_u16(), error, message, target }).unwrap_or_default();
        Reply { status, body, bearer: status == StatusCode::UNAUTHORIZED }
    }

    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from(self.body))));
        *r.status_mut() = self.status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.bearer {
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A JSON error answer `{code, error, message[, target]}`.
pub(crate) fn error_response(status: StatusCode, message: String, target: Option<String>) -> Response<ProxyBody> {
    Reply::error(status, message, target).into_response()
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Remove hop-by-hop headers: the fixed list, every `Proxy-*` header and every header named in
/// `Connection`. Returns whether `TE: trailers` was asked for (it may be passed on).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // One pass over the names first: most messages carry none of these, or only `Connection`,
    // and each removal costs a lookup.
    const FIXED: [HeaderName; 4] = [KEEP_ALIVE, TRAILER, TRANSFER_ENCODING, UPGRADE];
    let (mut conn, mut te, mut proxy) = (false, false, false);
    let mut fixed = [false; 4];
    for k in headers.keys() {
        match k.as_str() {
            "connection" => conn = true,
            "te" => te = true,
            "keep-alive" => fixed[0] = true,
            "trailer" => fixed[1] = true,
            "transfer-encoding" => fixed[2] = true,
            "upgrade" => fixed[3] = true,
            n if n.starts_with("proxy-") => proxy = true,
            _ => {}
        }
    }
    let te_trailers = te && has_token(headers, &TE, "trailers");
    if conn {
        // `Connection: keep-alive` and `close` name no other header; collect only real names.
        let mut named: Vec<HeaderName> = Vec::new();
        for t in headers.get_all(CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
            let t = t.trim();
            if t.is_empty() || t.eq_ignore_ascii_case("keep-alive") || t.eq_ignore_ascii_case("close") {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                named.push(n);
            }
        }
        for n in named {
            headers.remove(n);
        }
        headers.remove(CONNECTION);
    }
    if te {
        headers.remove(TE);
    }
    for (name, present) in FIXED.into_iter().zip(fixed) {
        if present {
            headers.remove(name);
        }
    }
    if proxy {
        let names: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
        for n in names {
            headers.remove(n);
        }
    }
    te_trailers
}

/// The headers of the answer to a CORS preflight from `origin` (none when it is not allowed).
pub(crate) fn preflight(
    cors: &CompiledCors,
    origin: &HeaderValue,
    requested_headers: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    let Some(allow) = cors.allow_origin(origin) else { return Vec::new() };
    let mut h = vec![(ACCESS_CONTROL_ALLOW_ORIGIN, allow), (ACCESS_CONTROL_ALLOW_METHODS, cors.methods.clone())];
    if let Some(allowed) = cors.headers.clone().or_else(|| requested_headers.cloned()) {
        h.push((ACCESS_CONTROL_ALLOW_HEADERS, allowed));
    }
    h.push((ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600")));
    h
}

fn apply_rules(headers: &mut HeaderMap, rules: &[(HeaderName, Option<HeaderValue>)]) {
    for (name, value) in rules {
        match value {
            Some(v) => {
                headers.insert(name.clone(), v.clone());
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

impl ProxyService {
    /// Answer one request.
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        self.listener.stats.requests.fetch_add(1, Ordering::Relaxed);
        hangar_metrics::metrics().proxy_requests.inc();
        let state = self.listener.state.load_full();
        let HostKind::Http(host) = &state.kind else {
            return error_response(StatusCode::BAD_GATEWAY, "this listener forwards raw TCP".into(), None);
        };
        let origin = if host.cors.is_some() { req.headers().get(ORIGIN).cloned() } else { None };
        let mut resp = self.route(&state.key, host, req).await;
        if let (Some(cors), Some(origin)) = (&host.cors, origin)
            && let Some(allow) = cors.allow_origin(&origin)
        {
            resp.headers_mut().insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
            resp.headers_mut().append(VARY, HeaderValue::from_static("Origin"));
        }
        resp
    }

    async fn route(&self, host_id: &str, host: &HttpHost, req: Request<Incoming>) -> Response<ProxyBody> {
        // CORS preflight is answered here (browsers send no credentials with it).
        if let Some(cors) = &host.cors
            && req.method() == Method::OPTIONS
            && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
            && let Some(origin) = req.headers().get(ORIGIN)
        {
            let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
            *r.status_mut() = StatusCode::NO_CONTENT;
            for (name, value) in preflight(cors, origin, req.headers().get(ACCESS_CONTROL_REQUEST_HEADERS)) {
                r.headers_mut().insert(name, value);
            }
            return r;
        }

        // Two `Host` headers make the target ambiguous (and one could be smuggled past a
        // `host_match`): refused, as RFC 9112 section 3.2 asks.
        if req.headers().get_all(HOST).iter().nth(1).is_some() {
            return error_response(
                StatusCode::BAD_REQUEST,
                "the request has more than one Host header; send exactly one".into(),
                None,
            );
        }
        let host_hv: Option<HeaderValue> = req
            .headers()
            .get(HOST)
            .cloned()
            .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        let host_str = host_hv.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
        let path = req.uri().path();
        let Some(route) =
            host.routes.iter().find(|r| r.path.matches(path) && r.host.as_ref().is_none_or(|m| m.matches(host_str)))
        else {
            return error_response(StatusCode::NOT_FOUND, format!("no route of this proxy host matches {path}"), None);
        };

        if host.require_auth {
            let Some(auth) = &self.shared.auth else {
                return unauthorized(
                    "this proxy host requires authentication but no authenticator is configured".into(),
                );
            };
            if let Err(rej) = auth.authorize(&host.auth_request(host_id, req.headers(), route)).await {
                return if rej.forbidden {
                    error_response(StatusCode::FORBIDDEN, rej.reason, None)
                } else {
                    unauthorized(rej.reason)
                };
            }
        }

        let span = tracing::debug_span!("proxy_http", host = host_id, route = %route.id, method = %req.method(), path);
        self.forward(host_id, host, route, req, host_hv).instrument(span).await
    }

    async fn forward(
        &self,
        host_id: &str,
        host: &HttpHost,
        route: &CompiledRoute,
        mut req: Request<Incoming>,
        host_hv: Option<HeaderValue>,
    ) -> Response<ProxyBody> {
        let dialer = self.shared.dialer.as_ref();
        let target = match self.resolve(host_id, route).await {
            Ok(t) => t,
            Err(reply) => return reply.into_response(),
        };
        let authority = target.authority.clone();

        // Upgrades (websocket and others) exist in HTTP/1.1 only.
        let upgrade = if req.version() <= Version::HTTP_11 && has_token(req.headers(), &CONNECTION, "upgrade") {
            req.headers().get(UPGRADE).cloned()
        } else {
            None
        };
        let downstream_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        // HTTP/2 streams run side by side: they take a kept connection only when it is idle.
        let concurrent = req.version() == Version::HTTP_2;
        let sticky = match &self.sticky {
            Some(s)
                if route.schema == Schema::Http
                    && upgrade.is_none()
                    && (req.version() == Version::HTTP_11 || concurrent)
                    && !has_token(req.headers(), &CONNECTION, "close") =>
            {
                Some(s.clone())
            }
            _ => None,
        };

        let (mut parts, body) = req.into_parts();
        let h = &mut parts.headers;
        let te_trailers = strip_hop_by_hop(h);
        if let Some(up) = &upgrade {
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, up.clone());
        }
        if te_trailers {
            h.insert(TE, HeaderValue::from_static("trailers"));
        }
        if host.require_auth
            && let Some(auth) = &self.shared.auth
        {
            for n in auth.credential_headers() {
                h.remove(n);
            }
        }
        // X-Forwarded-*: For is the client's list plus the socket peer; Host and Proto are ours.
        let xff = {
            let prior: Vec<&str> = h.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
            if prior.is_empty() {
                self.peer_ip.clone()
            } else {
                let mut s = prior.join(", ");
                s.push_str(", ");
                s.push_str(self.peer_ip.to_str().unwrap_or(""));
                HeaderValue::from_str(&s).unwrap_or_else(|_| self.peer_ip.clone())
            }
        };
        h.insert(X_FORWARDED_FOR, xff);
        match &host_hv {
            Some(v) => h.insert(X_FORWARDED_HOST, v.clone()),
            None => h.remove(X_FORWARDED_HOST),
        };
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if self.tls { "https" } else { "http" }));
        match route.schema {
            Schema::H2c => {
                h.remove(HOST);
            }
            Schema::Http | Schema::Https => {
                if !h.contains_key(HOST) {
                    // HTTP/2 clients send :authority instead; HTTP/1.0 ones may send nothing.
                    let v = host_hv.or_else(|| HeaderValue::from_str(authority.as_str()).ok());
                    if let Some(v) = v {
                        h.insert(HOST, v);
                    }
                }
            }
        }
        apply_rules(h, &route.request_headers);

        let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = if sticky.is_some() {
            // The connection's own HTTP/1.1 client writes the URI as given: origin-form.
            Uri::from(pq)
        } else {
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(if route.schema == Schema::Https { Scheme::HTTPS } else { Scheme::HTTP });
            uri.authority = Some(authority.clone());
            uri.path_and_query = Some(pq);
            match Uri::from_parts(uri) {
                Ok(u) => u,
                Err(e) => {
                    return error_response(StatusCode::BAD_GATEWAY, format!("cannot build target URI: {e}"), None);
                }
            }
        };
        parts.version = if route.schema == Schema::H2c { Version::HTTP_2 } else { Version::HTTP_11 };
        let out = Request::from_parts(parts, body);

        let ups = &self.shared.upstreams;
        let send = async {
            if let Some(sticky) = &sticky {
                return send_sticky(sticky, target.dest.clone(), dialer, out, concurrent).await;
            }
            if let Dest::Dial { vm, port } = &target.dest {
                return send_dialed_once(dialer, vm, *port, route.schema, out).await;
            }
            let fut = match (route.schema, upgrade.is_some()) {
                (Schema::Http, _) => ups.http.request(out),
                (Schema::Https, false) => ups.https.request(out),
                (Schema::Https, true) => ups.https_h1.request(out),
                (Schema::H2c, _) => ups.h2c.request(out),
            };
            fut.await.map_err(UpstreamError::Pooled)
        };
        let mut resp = match tokio::time::timeout(route.timeout, send).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return self.target_failed(host_id, route, &target, e.is_connect(), &e.message()).into_response();
            }
            Err(_) => return self.target_timed_out(host_id, route, &target).into_response(),
        };

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            let hard = self.listener.hard.clone();
            let span = tracing::debug_span!("proxy_upgrade", host = host_id, route = %route.id, target = %target.describe(route));
            self.listener.conns.spawn(
                async move {
                    let (d, u) = tokio::join!(down, up);
                    match (d, u) {
                        (Ok(d), Ok(u)) => {
                            let mut d = TokioIo::new(d);
                            let mut u = TokioIo::new(u);
                            tokio::select! {
                                r = tokio::io::copy_bidirectional(&mut d, &mut u) => match r {
                                    Ok((a, b)) => tracing::debug!(to_target = a, to_client = b, "upgraded connection closed"),
                                    Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
                                },
                                _ = hard.cancelled() => tracing::debug!("upgraded connection cut at shutdown"),
                            }
                        }
                        (d, u) => tracing::debug!(client = ?d.err(), target = ?u.err(), "upgrade did not complete"),
                    }
                }
                .instrument(span),
            );
        }
        let (mut parts, body) = resp.into_parts();
        let resp_upgrade = if switching { parts.headers.get(UPGRADE).cloned() } else { None };
        strip_hop_by_hop(&mut parts.headers);
        if let Some(up) = resp_upgrade {
            parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, up);
        }
        apply_rules(&mut parts.headers, &route.response_headers);
        parts.version = Version::HTTP_11;
        Response::from_parts(parts, Either::Left(body))
    }

    /// Resolve a route's target for one request: a VM's current address, or its dialer.
    pub(crate) async fn resolve(&self, host_id: &str, route: &CompiledRoute) -> Result<Resolved, Reply> {
        let dialer = self.shared.dialer.is_some();
        match (&route.target, &route.authority) {
            (Target::Vm { vm_id, port }, _) if dialer => Ok(Resolved {
                dest: Dest::Dial { vm: vm_id.clone(), port: *port },
                // Only written into h2c requests' :authority; the dialer decides where bytes go.
                authority: Authority::try_from(format!("{vm_id}:{port}"))
                    .or_else(|_| Authority::try_from(format!("localhost:{port}")))
                    .unwrap_or_else(|_| Authority::from_static("localhost")),
            }),
            (_, Some(a)) => Ok(Resolved { dest: Dest::Addr(a.clone()), authority: a.clone() }),
            (Target::Vm { vm_id, port }, None) => match self.shared.targets.ip(vm_id).await {
                Ok(ip) => match Authority::try_from(SocketAddr::new(ip, *port).to_string()) {
                    Ok(a) => Ok(Resolved { dest: Dest::Addr(a.clone()), authority: a }),
                    Err(_) => Err(Reply::error(StatusCode::BAD_GATEWAY, format!("bad address {ip}"), None)),
                },
                Err(e) => {
                    let target = route.target.to_string();
                    self.route_failed(host_id, route, &target, &e.to_string());
                    Err(Reply::error(
                        StatusCode::BAD_GATEWAY,
                        format!("target {target} cannot be reached: {e}"),
                        Some(target),
                    ))
                }
            },
            (Target::Host { .. }, None) => {
                Err(Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "route target has no address".into(), None))
            }
        }
    }

    /// A target that did not answer: a VM's address is forgotten after a connect error (it may
    /// have a new one), the event stream is told, and the client gets a 502.
    pub(crate) fn target_failed(
        &self,
        host_id: &str,
        route: &CompiledRoute,
        target: &Resolved,
        connect: bool,
        msg: &str,
    ) -> Reply {
        if let (Target::Vm { vm_id, .. }, Dest::Addr(_)) = (&route.target, &target.dest)
            && connect
        {
            self.shared.targets.forget(vm_id);
        }
        let desc = target.describe(route);
        self.route_failed(host_id, route, &desc, msg);
        let what = if connect { "refused or unreachable" } else { "failed" };
        Reply::error(StatusCode::BAD_GATEWAY, format!("target {desc} {what}: {msg}"), Some(desc))
    }

    /// A target that did not answer within the route's timeout: 504.
    pub(crate) fn target_timed_out(&self, host_id: &str, route: &CompiledRoute, target: &Resolved) -> Reply {
        let msg = format!("no answer within {} s", route.timeout.as_secs());
        let desc = target.describe(route);
        self.route_failed(host_id, route, &desc, &msg);
        Reply::error(StatusCode::GATEWAY_TIMEOUT, format!("target {desc} timed out: {msg}"), Some(desc))
    }

    fn route_failed(&self, host_id: &str, route: &CompiledRoute, target: &str, error: &str) {
        hangar_metrics::metrics().proxy_upstream_errors.inc();
        tracing::warn!(host = host_id, route = %route.id, target, error, "proxy target failed");
        self.shared.events.send(ProxyEvent::RouteFailed {
            host_id: host_id.to_string(),
            route_id: route.id.clone(),
            target: target.to_string(),
            error: error.to_string(),
        });
    }
}

/// Send on the connection's own upstream connection, opening one when there is none for this
/// target or the last one closed.
async fn send_sticky(
    sticky: &Sticky,
    dest: Dest,
    dialer: Option<&Arc<dyn VmDialer>>,
    mut req: Request<Incoming>,
    concurrent: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    // The low-level client writes the URI as given: origin-form (Host is already set).
    if req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    let kept = {
        let mut slot = sticky.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.retain(|(_, s)| !s.is_closed());
        let ready = slot.iter().position(|(d, s)| *d == dest && s.is_ready());
        // One request at a time (HTTP/1.1): the kept connection finishes the previous answer.
        let busy = || if concurrent { None } else { slot.iter().position(|(d, _)| *d == dest) };
        ready.or_else(busy).map(|i| slot.swap_remove(i).1)
    };
    let mut kept = match kept {
        Some(mut s) => s.ready().await.ok().map(|_| s),
        None => None,
    };
    loop {
        let (mut sender, reused) = match kept.take() {
            Some(s) => (s, true),
            None => {
                let (sender, conn) = dest.http1(dialer).await?;
                if let Err(mpsc::error::SendError(conn)) = sticky.drive.send(conn) {
                    tokio::spawn(conn);
                }
                (sender, false)
            }
        };
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let mut slot = sticky.slot.lock().unwrap_or_else(|e| e.into_inner());
                if slot.len() < STICKY_MAX {
                    slot.push((dest, sender));
                }
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                // The kept connection closed before taking the request: use a new one.
                Some(r) if reused => req = r,
                _ => return Err(UpstreamError::Http(e.into_error())),
            },
        }
    }
}

fn unauthorized(reason: String) -> Response<ProxyBody> {
    error_response(StatusCode::UNAUTHORIZED, reason, None)
}

/// The HTTP server settings of listeners.
pub(crate) fn server_builder(header_read_timeout: Duration) -> auto::Builder<ConnExec> {
    let mut b = auto::Builder::new(ConnExec);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(1024 * 1024)
        .keep_alive(true);
    b.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serve one accepted (and, for TLS, handshaken) connection until it ends, or until `graceful`
/// asks it to finish its requests, or `hard` cuts it.
pub(crate) async fn serve_connection<I>(
    io: I,
    mut svc: ProxyService,
    builder: &auto::Builder<ConnExec>,
    graceful: CancellationToken,
    hard: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Plain HTTP/1.1 first; hyper takes over, with the bytes read, for anything else.
    let io = if svc.shared.fast_lane {
        tokio::select! {
            lane = crate::h1::serve(io, &svc, svc.shared.header_read, &graceful) => match lane {
                crate::h1::Lane::Done => return,
                crate::h1::Lane::Hyper(io) => io,
            },
            _ = hard.cancelled() => return,
        }
    } else {
        crate::h1::Prefixed::new(io)
    };
    let (drive, mut to_drive) = mpsc::unbounded_channel::<UpConn>();
    svc.sticky = Some(Arc::new(Sticky { slot: std::sync::Mutex::new(Vec::new()), drive: drive.clone() }));
    // One reference count per request rather than a clone of every field.
    let svc = Arc::new(svc);
    let service = hyper::service::service_fn(move |req| {
        let svc = svc.clone();
        async move { Ok::<_, Infallible>(svc.handle(req).await) }
    });
    // hyper's writes go out once per poll of this task (see `cork`): answers ready together
    // leave in one write (and one TLS record).
    let (cork, io) = crate::cork::cork(io);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let cut = hard.clone();
    // Upstream connections and HTTP/2 streams of this client connection, driven here; dropped
    // with it.
    let serve = async move {
        let mut upstream = FuturesUnordered::<UpConn>::new();
        let mut closing = false;
        loop {
            tokio::select! {
                biased;
                // First, so that an idle connection of a stopping listener closes even when a new
                // request is already waiting (in-flight requests finish).
                _ = graceful.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                    break;
                }
                Some(c) = to_drive.recv() => upstream.push(c),
                Some(()) = upstream.next(), if !upstream.is_empty() => {}
                _ = hard.cancelled() => break,
            }
        }
    };
    let serve = DRIVE.scope(drive, serve);
    tokio::pin!(serve);
    std::future::poll_fn(|cx| {
        let done = serve.as_mut().poll(cx);
        // A write error is kept for hyper, which sees it on its next call.
        let _ = cork.poll_uncork(cx);
        done
    })
    .await;
    // What is left (an upgraded connection's answer, a last frame) goes out before the tunnel,
    // if any, writes straight.
    cork.open();
    tokio::select! {
        _ = std::future::poll_fn(|cx| cork.poll_uncork(cx)) => {}
        _ = cut.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert(TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert!(strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("content-length", HeaderValue::from_static("3"));
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-length"));

        let mut h = HeaderMap::new();
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1, "{h:?}");
    }
}
