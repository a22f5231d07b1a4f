//! The HTTP/1.1 fast lane.
//!
//! Most proxied traffic is plain HTTP/1.1 keep-alive: a request head, perhaps a small body, and
//! an answer framed by `Content-Length` or chunked. For those, a client connection forwards the
//! bytes itself: it parses each head with `httparse`, writes the rewritten head (and body) to
//! the upstream connection it keeps for itself in one write, and passes the answer's body
//! through without decoding it. The header rules are those of the hyper path
//! ([`crate::http`]): hop-by-hop headers removed, `X-Forwarded-*` set, the route's header rules
//! applied last.
//!
//! A request with `Connection: close` is served the same way, answered with `connection: close`,
//! and the client connection closed after the answer; the upstream connection stays open and
//! waits in the listeners' shared [`IdlePool`] for the next client connection to the same
//! target (as does the upstream connection of any client connection that ends cleanly).
//!
//! Everything else goes to hyper, with the bytes already read, for the rest of the connection:
//! HTTP/2, HTTP/1.0, upgrades, `Expect`, `Transfer-Encoding` or large request bodies,
//! targets not in origin form, a missing or repeated `Host`,
//! routes that are not plain `http`, unmatched paths, and every head
//! `httparse` refuses (hyper then answers the error). The hand-over happens only between
//! requests, so no message is ever split between the two.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use http::header::ACCESS_CONTROL_ALLOW_ORIGIN;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use httparse::Status;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::AuthRejection;
use crate::compile::{CompiledRoute, HostKind, HostState};
use crate::config::Schema;
use crate::http::{Dest, ProxyService, Reply, Resolved, UpIo, preflight};

/// The largest request or response head read (as hyper's default buffer).
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head (as hyper's default).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole and sent with their head; larger ones go to
/// hyper, which streams them.
const MAX_BODY: u64 = 64 * 1024;
/// The most bytes of a chunk-size line or of one trailer field.
const MAX_LINE: usize = 8 * 1024;

/// A byte stream that first yields bytes already read from it.
pub(crate) struct Prefixed<I> {
    pre: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    /// A stream with nothing read from it yet.
    pub(crate) fn new(io: I) -> Self {
        Prefixed { pre: Bytes::new(), io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How one client connection ended in the fast lane.
pub(crate) enum Lane<I> {
    /// Finished: closed by either side, timed out, or stopped by a graceful shutdown.
    Done,
    /// The rest of the connection is hyper's: the stream, with the bytes read but not served.
    Hyper(Prefixed<I>),
}

/// The upstream connection a client connection keeps for itself.
struct Upstream {
    dest: Dest,
    io: UpIo,
    buf: BytesMut,
}

/// What a request head asks for, when the fast lane can serve it.
struct Plan {
    state: Arc<HostState>,
    action: Action,
    head_len: usize,
    body_len: usize,
    head_request: bool,
    /// Safe to send again on a new connection when a kept one turns out closed.
    idempotent: bool,
    /// The client asked to close the connection after this answer (`Connection: close`).
    close: bool,
    /// The request's headers, for a host that requires authentication.
    auth: Option<HeaderMap>,
    /// `Access-Control-Allow-Origin` for the answer, when the host has CORS and allows the
    /// request's origin.
    cors: Option<HeaderValue>,
}

/// What the proxy does with a request.
enum Action {
    /// Forward it by this route (an index into the host's routes).
    Forward(usize),
    /// Answer a CORS preflight itself, with these headers.
    Preflight(Vec<(HeaderName, HeaderValue)>),
}

/// How an answer's body is delimited.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the target closes.
    Close,
}

/// The answer's head, rewritten for the client.
struct Answer {
    framing: Framing,
    /// The target will not take another request on this connection.
    upstream_close: bool,
}

/// Why a target gave no usable answer.
enum Failure {
    Connect(io::Error),
    Other(String),
}

/// Serve `io` until it ends or needs hyper.
pub(crate) async fn serve<I>(io: I, svc: &ProxyService, header_read: Duration, graceful: &CancellationToken) -> Lane<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream: Option<Upstream> = None;
    let lane = serve_requests(io, svc, header_read, graceful, &mut upstream).await;
    // Between two requests: the upstream connection is clean, the next client connection to
    // the same target may use it.
    if let Some(up) = upstream {
        svc.shared.idle.put(up.dest, up.io);
    }
    lane
}

async fn serve_requests<I>(
    mut io: I,
    svc: &ProxyService,
    header_read: Duration,
    graceful: &CancellationToken,
    upstream: &mut Option<Upstream>,
) -> Lane<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut cbuf = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
    let grace = graceful.cancelled();
    tokio::pin!(grace);
    let idle = tokio::time::sleep(header_read);
    tokio::pin!(idle);
    loop {
        // A whole head (and a small body) first.
        idle.as_mut().reset(Instant::now() + header_read);
        let plan = loop {
            if !cbuf.is_empty() {
                match plan(&cbuf, svc, &mut out) {
                    Parsed::Fast(p) if cbuf.len() >= p.head_len + p.body_len => break p,
                    Parsed::Fast(p) => {
                        // The head is whole: the body's reads each get the head's time.
                        cbuf.reserve(p.head_len + p.body_len - cbuf.len());
                        idle.as_mut().reset(Instant::now() + header_read);
                    }
                    Parsed::Partial if cbuf.len() < MAX_HEAD => {}
                    _ => return Lane::Hyper(Prefixed { pre: cbuf.freeze(), io }),
                }
            }
            if cbuf.capacity() - cbuf.len() < 1024 {
                cbuf.reserve(8 * 1024);
            }
            tokio::select! {
                biased;
                // A stopping listener closes its idle connections first, as hyper does, even
                // when a new request is already waiting: after a stop, no new request is served.
                _ = &mut grace, if cbuf.is_empty() => return Lane::Done,
                r = io.read_buf(&mut cbuf) => match r {
                    Ok(0) | Err(_) => return Lane::Done,
                    Ok(_) => {}
                },
                // Also ends heads (and small bodies) sent too slowly.
                _ = &mut idle => return Lane::Done,
            }
        };
        svc.listener.stats.requests.fetch_add(1, Ordering::Relaxed);
        hangar_metrics::metrics().proxy_requests.inc();
        // `out` holds the rewritten head; the body follows it unchanged.
        out.extend_from_slice(&cbuf[plan.head_len..plan.head_len + plan.body_len]);
        cbuf.advance(plan.head_len + plan.body_len);
        let HostKind::Http(host) = &plan.state.kind else { return Lane::Done };
        let keep = match &plan.action {
            Action::Forward(index) => {
                let Some(route) = host.routes.get(*index) else { return Lane::Done };
                let span = tracing::debug_span!("proxy_http", host = %plan.state.key, route = %route.id);
                exchange(&mut io, svc, &plan, route, &mut out, upstream).instrument(span).await
            }
            Action::Preflight(headers) => {
                send_preflight(&mut io, &mut out, headers, plan.cors.as_ref(), plan.close).await
            }
        };
        if !keep || plan.close {
            // Ready for the client's next connection before this one is seen to close.
            if let Some(up) = upstream.take() {
                svc.shared.idle.put(up.dest, up.io);
            }
            let _ = io.shutdown().await;
            return Lane::Done;
        }
        if graceful.is_cancelled() {
            return Lane::Done;
        }
    }
}

/// Forward one request (its head and body in `out`) and its answer; false when the client
/// connection must close.
async fn exchange<I>(
    client: &mut I,
    svc: &ProxyService,
    plan: &Plan,
    route: &CompiledRoute,
    out: &mut Vec<u8>,
    upstream: &mut Option<Upstream>,
) -> bool
where
    I: AsyncWrite + Unpin,
{
    let host_id = plan.state.key.as_str();
    if let Some(headers) = &plan.auth {
        let checked = match (&svc.shared.auth, &plan.state.kind) {
            (Some(auth), HostKind::Http(http)) => auth.authorize(&http.auth_request(host_id, headers, route)).await,
            (Some(_), HostKind::Tcp(_)) => Err(AuthRejection::new("this proxy host does not serve HTTP")),
            (None, _) => {
                Err(AuthRejection::new("this proxy host requires authentication but no authenticator is configured"))
            }
        };
        if let Err(rej) = checked {
            let status = if rej.forbidden { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
            let reply = Reply::error(status, rej.reason, None);
            return send_reply(client, out, reply, plan).await;
        }
    }
    let target = match svc.resolve(host_id, route).await {
        Ok(t) => t,
        Err(reply) => return send_reply(client, out, reply, plan).await,
    };
    let answered = tokio::time::timeout(route.timeout, request(svc, &target, plan, route, out, upstream)).await;
    let answer = match answered {
        Ok(Ok(a)) => a,
        Ok(Err(f)) => {
            *upstream = None;
            let reply = match f {
                Failure::Connect(e) => svc.target_failed(host_id, route, &target, true, &format!("connect: {e}")),
                Failure::Other(m) => svc.target_failed(host_id, route, &target, false, &m),
            };
            return send_reply(client, out, reply, plan).await;
        }
        Err(_) => {
            *upstream = None;
            let reply = svc.target_timed_out(host_id, route, &target);
            return send_reply(client, out, reply, plan).await;
        }
    };
    let Some(up) = upstream.as_mut() else { return false };
    let body = relay_body(client, up, answer.framing, out).await;
    match body {
        Ok(clean) => {
            if answer.upstream_close || !clean || answer.framing == Framing::Close {
                *upstream = None;
            }
            answer.framing != Framing::Close
        }
        Err(e) => {
            tracing::debug!(error = %e, "answer body not relayed");
            *upstream = None;
            false
        }
    }
}

/// Send the request in `out` on the kept upstream connection (or a new one) and read the
/// answer's head; on success `out` holds the client's answer head and `upstream` the connection.
async fn request(
    svc: &ProxyService,
    target: &Resolved,
    plan: &Plan,
    route: &CompiledRoute,
    out: &mut Vec<u8>,
    upstream: &mut Option<Upstream>,
) -> Result<Answer, Failure> {
    let dialer = svc.shared.dialer.as_ref();
    if upstream.as_ref().is_some_and(|u| u.dest != target.dest)
        && let Some(other) = upstream.take()
    {
        svc.shared.idle.put(other.dest, other.io);
    }
    if upstream.as_mut().is_some_and(|u| !plan.idempotent && !still_open(&mut u.io)) {
        *upstream = None;
    }
    if upstream.is_none()
        && let Some(io) = svc.shared.idle.take(&target.dest)
    {
        *upstream = Some(Upstream { dest: target.dest.clone(), io, buf: BytesMut::with_capacity(8 * 1024) });
    }
    loop {
        let reused = upstream.is_some();
        let up = match upstream {
            Some(u) => u,
            None => {
                let io = target.dest.connect(dialer).await.map_err(Failure::Connect)?;
                upstream.insert(Upstream { dest: target.dest.clone(), io, buf: BytesMut::with_capacity(8 * 1024) })
            }
        };
        // A kept connection the target has closed fails at once or ends before any answer;
        // a request that may be repeated then goes again on a new connection.
        let retry = reused && plan.idempotent;
        if let Err(e) = up.io.write_all(out).await {
            if reused {
                *upstream = None;
                continue;
            }
            return Err(Failure::Other(format!("sending the request: {e}")));
        }
        up.buf.clear();
        loop {
            match parse_answer(&up.buf, plan, route, out) {
                Ok(Some((len, answer))) => {
                    up.buf.advance(len);
                    return Ok(answer);
                }
                Ok(None) if up.buf.len() < MAX_HEAD => {}
                Ok(None) => return Err(Failure::Other("the answer's head is too large".into())),
                Err(m) => return Err(Failure::Other(m)),
            }
            if up.buf.capacity() - up.buf.len() < 1024 {
                up.buf.reserve(8 * 1024);
            }
            match up.io.read_buf(&mut up.buf).await {
                Ok(0) | Err(_) if retry && up.buf.is_empty() => break,
                Ok(0) => return Err(Failure::Other("the connection closed before a complete answer".into())),
                Err(e) => return Err(Failure::Other(format!("reading the answer: {e}"))),
                Ok(_) => {}
            }
        }
        *upstream = None;
    }
}

/// Whether a kept connection still looks open: no end of stream, error or stray bytes waiting.
fn still_open(io: &mut UpIo) -> bool {
    let mut probe = [0u8; 1];
    io.read(&mut probe).now_or_never().is_none()
}

/// Parse the answer's head in `buf`: `Some((head length, answer))` with the client's head in
/// `out`, `None` when incomplete. Informational (1xx) answers are skipped, as hyper's client does.
fn parse_answer(
    buf: &[u8],
    plan: &Plan,
    route: &CompiledRoute,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, Answer)>, String> {
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(&buf[at..]) {
            Ok(Status::Complete(n)) => n,
            Ok(Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid answer: {e}")),
        };
        let code = resp.code.unwrap_or(0);
        if code == 101 {
            return Err("the target switched protocols without being asked to".into());
        }
        if (100..200).contains(&code) {
            at += len;
            continue;
        }
        let answer = answer_head(&resp, plan, route, out)?;
        return Ok(Some((at + len, answer)));
    }
}

/// Write the client's answer head into `out` and say how the body is framed.
fn answer_head(
    resp: &httparse::Response<'_, '_>,
    plan: &Plan,
    route: &CompiledRoute,
    out: &mut Vec<u8>,
) -> Result<Answer, String> {
    let code = resp.code.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    // An HTTP/1.0 target closes after each answer unless it says otherwise.
    let mut upstream_close = resp.version == Some(0);
    let mut named: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        let v = h.value;
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(v).ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(tokens(v).last().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    upstream_close &= resp.version != Some(0);
                } else {
                    named.push(t);
                }
            }
        }
    }
    let framing = if plan.head_request || code == 204 || code == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits.
    out.extend_from_slice(&[b'0' + (code / 100 % 10) as u8, b'0' + (code / 10 % 10) as u8, b'0' + (code % 10) as u8]);
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || named.iter().any(|n| name.as_bytes().eq_ignore_ascii_case(n))
            || (chunked.is_some() && name.eq_ignore_ascii_case("content-length"))
            || route.response_headers.iter().any(|(r, _)| name.eq_ignore_ascii_case(r.as_str()))
            || (plan.cors.is_some() && name.eq_ignore_ascii_case("access-control-allow-origin"))
        {
            continue;
        }
        header(out, name.as_bytes(), h.value);
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    for (name, value) in &route.response_headers {
        if let Some(v) = value
            && (plan.cors.is_none() || name != ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            header(out, name.as_str().as_bytes(), v.as_bytes());
        }
    }
    cors_headers(out, plan.cors.as_ref());
    if framing == Framing::Close || plan.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Answer { framing, upstream_close })
}

/// Relay the answer's body (its first bytes may already be in `up.buf`) after the head in
/// `out`; `Ok(false)` when the target sent more than the answer (its connection is dropped).
async fn relay_body<I>(client: &mut I, up: &mut Upstream, framing: Framing, out: &mut Vec<u8>) -> io::Result<bool>
where
    I: AsyncWrite + Unpin,
{
    match framing {
        Framing::Empty => {
            client.write_all(out).await?;
            Ok(up.buf.is_empty())
        }
        Framing::Length(mut left) => {
            // The head and what arrived with it in one write.
            let take = left.min(up.buf.len() as u64) as usize;
            out.extend_from_slice(&up.buf[..take]);
            up.buf.advance(take);
            left -= take as u64;
            client.write_all(out).await?;
            while left > 0 {
                up.buf.clear();
                up.buf.reserve(16 * 1024);
                if up.io.read_buf(&mut up.buf).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the target closed mid-answer"));
                }
                let take = left.min(up.buf.len() as u64) as usize;
                client.write_all(&up.buf[..take]).await?;
                up.buf.advance(take);
                left -= take as u64;
            }
            Ok(up.buf.is_empty())
        }
        Framing::Chunked => {
            let mut scan = Chunked::default();
            let n = scan.scan(&up.buf).map_err(io::Error::other)?;
            out.extend_from_slice(&up.buf[..n]);
            up.buf.advance(n);
            client.write_all(out).await?;
            while !scan.done() {
                if up.buf.capacity() - up.buf.len() < 1024 {
                    up.buf.reserve(16 * 1024);
                }
                if up.io.read_buf(&mut up.buf).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the target closed mid-answer"));
                }
                let n = scan.scan(&up.buf).map_err(io::Error::other)?;
                client.write_all(&up.buf[..n]).await?;
                up.buf.advance(n);
            }
            Ok(up.buf.is_empty())
        }
        Framing::Close => {
            out.extend_from_slice(&up.buf);
            up.buf.clear();
            client.write_all(out).await?;
            loop {
                up.buf.clear();
                up.buf.reserve(16 * 1024);
                if up.io.read_buf(&mut up.buf).await? == 0 {
                    return Ok(false);
                }
                client.write_all(&up.buf).await?;
            }
        }
    }
}

/// Answer a CORS preflight: 204 with the preflight's headers.
async fn send_preflight<I: AsyncWrite + Unpin>(
    client: &mut I,
    out: &mut Vec<u8>,
    headers: &[(HeaderName, HeaderValue)],
    cors: Option<&HeaderValue>,
    close: bool,
) -> bool {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 204 No Content\r\n");
    for (name, value) in headers {
        header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if cors.is_some() {
        out.extend_from_slice(b"vary: Origin\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    client.write_all(out).await.is_ok()
}

/// The CORS headers of an answer to an allowed origin.
fn cors_headers(out: &mut Vec<u8>, cors: Option<&HeaderValue>) {
    if let Some(allow) = cors {
        header(out, b"access-control-allow-origin", allow.as_bytes());
        out.extend_from_slice(b"vary: Origin\r\n");
    }
}

/// Send an answer the proxy made, on a connection that then stays open (unless the client
/// asked to close it).
async fn send_reply<I: AsyncWrite + Unpin>(client: &mut I, out: &mut Vec<u8>, reply: Reply, plan: &Plan) -> bool {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(reply.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reply.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    if reply.bearer {
        out.extend_from_slice(b"www-authenticate: Bearer\r\n");
    }
    cors_headers(out, plan.cors.as_ref());
    if plan.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", reply.body.len()).as_bytes());
    out.extend_from_slice(&reply.body);
    client.write_all(out).await.is_ok()
}

/// Idle upstream connections left by fast-lane client connections that ended between requests,
/// for the next client connections to the same target (so a `Connection: close` client costs
/// one new connection, not two). At most [`IDLE_PER_TARGET`] per target, each for at most the
/// manager's pool idle time; a connection is probed ([`still_open`]) before it is used again.
/// On single-threaded runtimes (the manager's I/O threads) connections stay on the thread that
/// opened them.
pub(crate) struct IdlePool {
    idle: Duration,
    conns: std::sync::Mutex<std::collections::HashMap<IdleKey, Vec<(Instant, UpIo)>>>,
}

/// A target, and the thread of a single-threaded runtime.
type IdleKey = (Dest, Option<std::thread::ThreadId>);

/// The most idle connections kept per target (and thread).
const IDLE_PER_TARGET: usize = 128;

impl IdlePool {
    pub(crate) fn new(idle: Duration) -> Self {
        IdlePool { idle, conns: std::sync::Mutex::new(std::collections::HashMap::new()) }
    }

    fn key(dest: Dest) -> IdleKey {
        let local = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        (dest, local.then(|| std::thread::current().id()))
    }

    /// A kept connection to `dest` that still looks open, newest first.
    fn take(&self, dest: &Dest) -> Option<UpIo> {
        if self.idle.is_zero() {
            return None;
        }
        let key = Self::key(dest.clone());
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(&key)?;
        let now = Instant::now();
        while let Some((at, mut io)) = list.pop() {
            if now.duration_since(at) < self.idle && still_open(&mut io) {
                return Some(io);
            }
        }
        None
    }

    /// Keep `io` (clean, between two requests) for the next client connection to `dest`.
    pub(crate) fn put(&self, dest: Dest, io: UpIo) {
        if self.idle.is_zero() {
            return;
        }
        let key = Self::key(dest);
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.entry(key).or_default();
        // Oldest first: drop the expired ones, and the oldest when full.
        let expired = list.iter().take_while(|(at, _)| now.duration_since(*at) >= self.idle).count();
        list.drain(..expired);
        if list.len() >= IDLE_PER_TARGET {
            list.remove(0);
        }
        list.push((now, io));
    }
}

/// What a look at the client's bytes gave.
enum Parsed {
    Fast(Plan),
    Partial,
    Hyper,
}

/// Read a request head from `buf`; when the fast lane can serve it, write the head to send to
/// the target into `out`.
fn plan(buf: &[u8], svc: &ProxyService, out: &mut Vec<u8>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else { return Parsed::Hyper };
    if !target.starts_with('/') || method == "CONNECT" {
        return Parsed::Hyper;
    }
    let mut length: Option<u64> = None;
    let mut host: Option<&[u8]> = None;
    let mut te_trailers = false;
    let mut close = false;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let (mut origin, mut preflight_method, mut preflight_headers) = (None, false, None);
    for h in req.headers.iter() {
        let (name, v) = (h.name, h.value);
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Parsed::Hyper;
            }
            host = Some(v);
        } else if name.eq_ignore_ascii_case("content-length") {
            match parse_length(v) {
                Some(n) if length.is_none() && n <= MAX_BODY => length = Some(n),
                _ => return Parsed::Hyper,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Hyper;
                }
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                    named.push(t);
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Parsed::Hyper;
        } else if name.eq_ignore_ascii_case("te") {
            te_trailers |= tokens(v).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(v);
        } else if name.eq_ignore_ascii_case("origin") {
            origin = origin.or(Some(v));
        } else if name.eq_ignore_ascii_case("access-control-request-method") {
            preflight_method = true;
        } else if name.eq_ignore_ascii_case("access-control-request-headers") {
            preflight_headers = preflight_headers.or(Some(v));
        }
    }
    let Some(host) = host else { return Parsed::Hyper };
    let state = svc.listener.state.load_full();
    let HostKind::Http(http) = &state.kind else { return Parsed::Hyper };
    let origin = match (&http.cors, origin) {
        (Some(_), Some(o)) => match HeaderValue::from_bytes(o) {
            Ok(o) => Some(o),
            Err(_) => return Parsed::Hyper,
        },
        _ => None,
    };
    let cors = http.cors.as_ref().zip(origin.as_ref()).and_then(|(c, o)| c.allow_origin(o));
    let idempotent = matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE");
    let body_len = length.unwrap_or(0) as usize;
    // A CORS preflight is answered here, before routing (browsers send no credentials with it).
    if let (Some(c), Some(o), "OPTIONS", true) = (&http.cors, &origin, method, preflight_method) {
        let requested = preflight_headers.and_then(|v| HeaderValue::from_bytes(v).ok());
        let action = Action::Preflight(preflight(c, o, requested.as_ref()));
        return Parsed::Fast(Plan {
            action,
            head_len,
            body_len,
            head_request: false,
            idempotent,
            close,
            auth: None,
            cors,
            state,
        });
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let host_str = std::str::from_utf8(host).unwrap_or("");
    let Some((index, route)) = http
        .routes
        .iter()
        .enumerate()
        .find(|(_, r)| r.path.matches(path) && r.host.as_ref().is_none_or(|m| m.matches(host_str)))
    else {
        return Parsed::Hyper;
    };
    if route.schema != Schema::Http {
        return Parsed::Hyper;
    }

    // A protected host sees the whole head; its credentials never reach the target.
    let (auth, credentials) = if http.require_auth {
        let mut map = HeaderMap::with_capacity(req.headers.len());
        for h in req.headers.iter() {
            let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value))
            else {
                return Parsed::Hyper;
            };
            map.append(name, value);
        }
        (Some(map), svc.shared.auth.as_ref().map(|a| a.credential_headers()).unwrap_or_default())
    } else {
        (None, Vec::new())
    };
    let rules = &route.request_headers;
    let ruled = |name: &str| rules.iter().any(|(r, _)| name.eq_ignore_ascii_case(r.as_str()));
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("x-forwarded-host")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || named.iter().any(|n| name.as_bytes().eq_ignore_ascii_case(n))
            || ruled(name)
            || credentials.iter().any(|c| name.eq_ignore_ascii_case(c.as_str()))
        {
            continue;
        }
        header(out, name.as_bytes(), h.value);
    }
    if te_trailers && !ruled("te") {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if !ruled("x-forwarded-for") {
        out.extend_from_slice(b"x-forwarded-for: ");
        for prior in &forwarded_for {
            out.extend_from_slice(prior);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(svc.peer_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !ruled("x-forwarded-host") {
        header(out, b"x-forwarded-host", host);
    }
    if !ruled("x-forwarded-proto") {
        header(out, b"x-forwarded-proto", if svc.tls { b"https" } else { b"http" });
    }
    for (name, value) in rules {
        if let Some(v) = value {
            header(out, name.as_str().as_bytes(), v.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    Parsed::Fast(Plan {
        action: Action::Forward(index),
        head_len,
        body_len,
        head_request: method == "HEAD",
        idempotent,
        close,
        auth,
        cors,
        state,
    })
}

/// Headers that belong to one connection, never passed on (besides those `Connection` names).
fn hop_by_hop(name: &str) -> bool {
    ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        || name.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(|t| t.trim_ascii()).filter(|t| !t.is_empty())
}

/// A `Content-Length` value: digits only.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Finds where a chunked body ends, passing its bytes through unchanged.
#[derive(Default)]
struct Chunked {
    state: ChunkState,
    trailer: usize,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    Cr,
    Lf,
    Trailer,
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// How many bytes at the start of `buf` belong to the body (whole size lines and trailer
    /// fields only; the rest waits for more bytes).
    fn scan(&mut self, buf: &[u8]) -> Result<usize, &'static str> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(Status::Complete((n, size))) => {
                        at += n;
                        self.state = if size == 0 { ChunkState::Trailer } else { ChunkState::Data(size) };
                    }
                    Ok(Status::Partial) if rest.len() <= MAX_LINE => return Ok(at),
                    _ => return Err("invalid chunk size line"),
                },
                ChunkState::Data(left) => {
                    let take = left.min(rest.len() as u64);
                    at += take as usize;
                    if take < left {
                        self.state = ChunkState::Data(left - take);
                        return Ok(at);
                    }
                    self.state = ChunkState::Cr;
                }
                ChunkState::Cr | ChunkState::Lf => {
                    let (want, next) =
                        if self.state == ChunkState::Cr { (b'\r', ChunkState::Lf) } else { (b'\n', ChunkState::Size) };
                    match rest.first() {
                        None => return Ok(at),
                        Some(&b) if b == want => {
                            at += 1;
                            self.state = next;
                        }
                        Some(_) => return Err("chunk data not followed by CRLF"),
                    }
                }
                ChunkState::Trailer => match rest.iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        at += p + 1;
                        self.trailer += p + 1;
                        if self.trailer > MAX_HEAD {
                            return Err("trailer section too large");
                        }
                        if p == 0 || (p == 1 && rest[0] == b'\r') {
                            self.state = ChunkState::Done;
                        }
                    }
                    None if rest.len() <= MAX_LINE => return Ok(at),
                    None => return Err("trailer field too long"),
                },
                ChunkState::Done => return Ok(at),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(body: &[u8], piece: usize) -> Result<usize, &'static str> {
        let mut scan = Chunked::default();
        let mut buf = Vec::new();
        let mut total = 0;
        for part in body.chunks(piece) {
            buf.extend_from_slice(part);
            let n = scan.scan(&buf)?;
            buf.drain(..n);
            total += n;
            if scan.done() {
                break;
            }
        }
        assert!(scan.done(), "end of body not found");
        Ok(total)
    }

    #[test]
    fn chunked_bodies_end_where_they_end_whatever_the_reads() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in 1..body.len() {
            assert_eq!(scan_in_pieces(body, piece), Ok(body.len()), "piece size {piece}");
        }
        let mut with_more = body.to_vec();
        with_more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let mut scan = Chunked::default();
        assert_eq!(scan.scan(&with_more), Ok(body.len()), "bytes after the body are not part of it");
        assert!(scan.done());
    }

    #[test]
    fn bad_chunked_framing_is_an_error() {
        for bad in [&b"zz\r\nhello\r\n"[..], b"5\r\nhelloXX0\r\n\r\n", b"5\r\nhello\rX"] {
            assert!(Chunked::default().scan(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'1'; MAX_LINE + 10];
        assert!(Chunked::default().scan(&long).is_err());
    }

    #[test]
    fn content_lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b" 42 "), Some(42));
        for bad in [&b""[..], b"-1", b"+1", b"1,1", b"0x10", b"1 2", b"99999999999999999999"] {
            assert_eq!(parse_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A chunked body with these chunk sizes, extensions and trailers.
    fn chunked(sizes: &[usize], ext: bool, trailers: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let e = if ext { ";x=1" } else { "" };
            b.extend_from_slice(format!("{n:x}{e}\r\n").as_bytes());
            b.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, *n));
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n");
        for t in 0..trailers {
            b.extend_from_slice(format!("X-T{t}: v\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b
    }

    proptest::proptest! {
        /// Any well-framed chunked body ends exactly where it ends, whatever the reads.
        #[test]
        fn chunked_bodies_end_exactly_in_any_reads(
            sizes in proptest::collection::vec(1usize..300, 0..8),
            ext: bool,
            trailers in 0usize..3,
            piece in 1usize..64,
        ) {
            let body = chunked(&sizes, ext, trailers);
            proptest::prop_assert_eq!(scan_in_pieces(&body, piece), Ok(body.len()));
        }

        /// Any bytes: the scanner answers an error or how much belongs to the body (never
        /// more than it was given), the same in one read as in many, and never panics.
        #[test]
        fn any_bytes_scan_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            piece in 1usize..64,
        ) {
            let whole = Chunked::default().scan(&bytes);
            if let Ok(n) = whole {
                proptest::prop_assert!(n <= bytes.len());
            }
            let mut scan = Chunked::default();
            let mut buf = Vec::new();
            let mut total = 0;
            let mut failed = false;
            for part in bytes.chunks(piece) {
                buf.extend_from_slice(part);
                match scan.scan(&buf) {
                    Ok(n) => {
                        proptest::prop_assert!(n <= buf.len());
                        buf.drain(..n);
                        total += n;
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
                if scan.done() {
                    break;
                }
            }
            // A framing error seen in one read is seen in pieces too, and a body that ends
            // in one read ends at the same byte in pieces.
            if whole.is_err() {
                proptest::prop_assert!(failed || !scan.done());
            }
            if scan.done() && !failed {
                let mut once = Chunked::default();
                proptest::prop_assert_eq!(once.scan(&bytes), Ok(total));
            }
        }

        /// Content-Length: digits only, and what it accepts is the number it says.
        #[test]
        fn content_lengths_parse_only_numbers(v in "[ 0-9a-fx+,-]{0,24}") {
            if let Some(n) = parse_length(v.as_bytes()) {
                proptest::prop_assert_eq!(v.trim().parse::<u64>().ok(), Some(n));
            }
        }
    }

    #[test]
    fn hop_by_hop_names() {
        for h in ["Connection", "keep-alive", "TE", "Trailer", "Transfer-Encoding", "upgrade", "Proxy-Authorization"] {
            assert!(hop_by_hop(h), "{h}");
        }
        for h in ["Host", "Content-Length", "proxy", "X-Te", "Trailers-X"] {
            assert!(!hop_by_hop(h), "{h}");
        }
    }
}
