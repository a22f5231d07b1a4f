//! One listener: its accept loop, its connections, its counters.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::compile::{HostKind, HostState, TcpHost};
use crate::config::{BindAddr, Target};
use crate::events::ProxyEvent;
use crate::http::{ProxyService, Shared, serve_connection};
use crate::tcp::{SpliceEnd, splice, splice_tcp};

/// Counters of one listener.
#[derive(Default)]
pub(crate) struct Stats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub requests: AtomicU64,
    pub refused: AtomicU64,
}

/// What a running listener's tasks share.
pub(crate) struct ListenerCtx {
    pub key: String,
    pub state: ArcSwap<HostState>,
    pub stats: Stats,
    /// Connections and upgraded tunnels.
    pub conns: TaskTracker,
    /// Stop accepting; connections finish what they are doing.
    pub graceful: CancellationToken,
    /// Cut everything.
    pub hard: CancellationToken,
}

/// Timeouts used by listeners.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ListenerTimeouts {
    pub tls_handshake: Duration,
    pub connect: Duration,
}

/// A started listener.
pub(crate) struct Running {
    pub local: SocketAddr,
    pub ctx: Arc<ListenerCtx>,
    pub accept: Vec<JoinHandle<()>>,
}

struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bind and start accepting: on the calling runtime when `io` is empty, else one listening
/// socket per runtime of `io` (`SO_REUSEPORT`, so the kernel spreads connections over them).
pub(crate) async fn start(
    key: &str,
    bind: &BindAddr,
    state: Arc<HostState>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<crate::http::ConnExec>>,
    timeouts: ListenerTimeouts,
    io: &[tokio::runtime::Handle],
) -> io::Result<Running> {
    let ctx = Arc::new(ListenerCtx {
        key: key.to_string(),
        state: ArcSwap::new(state),
        stats: Stats::default(),
        conns: TaskTracker::new(),
        graceful: CancellationToken::new(),
        hard: CancellationToken::new(),
    });
    if io.is_empty() {
        let listener = TcpListener::bind((bind.host.as_str(), bind.port)).await?;
        let local = listener.local_addr()?;
        let span = tracing::info_span!("proxy_listener", host = key, address = %local);
        let accept = tokio::spawn(accept_loop(listener, ctx.clone(), shared, builder, timeouts).instrument(span));
        tracing::info!(host = key, address = %local, "proxy listener started");
        return Ok(Running { local, ctx, accept: vec![accept] });
    }
    let mut addr = tokio::net::lookup_host((bind.host.as_str(), bind.port))
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} has no address", bind.host)))?;
    // Bind every socket before listening on any, so a failure leaves nothing behind.
    let mut sockets = Vec::with_capacity(io.len());
    for _ in io {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if io.len() > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        // With port 0, the others join the port the first one got.
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    let local = addr;
    let mut accept = Vec::with_capacity(io.len());
    let mut listening = Vec::with_capacity(io.len());
    for (socket, rt) in sockets.into_iter().zip(io) {
        let span = tracing::info_span!("proxy_listener", host = key, address = %local);
        let (ctx, shared, builder) = (ctx.clone(), shared.clone(), builder.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        listening.push(rx);
        // The listener registers with the reactor of the runtime it is created on.
        accept.push(
            rt.spawn(
                async move {
                    match socket.listen(1024) {
                        Ok(listener) => {
                            let _ = tx.send(Ok(()));
                            accept_loop(listener, ctx, shared, builder, timeouts).await
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                }
                .instrument(span),
            ),
        );
    }
    // Return once every socket accepts connections.
    for rx in listening {
        let r = rx.await.unwrap_or_else(|_| Err(io::Error::other("the proxy's I/O thread stopped")));
        if let Err(e) = r {
            ctx.graceful.cancel();
            for h in accept {
                let _ = h.await;
            }
            return Err(e);
        }
    }
    tracing::info!(host = key, address = %local, threads = io.len(), "proxy listener started");
    Ok(Running { local, ctx, accept })
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<crate::http::ConnExec>>,
    timeouts: ListenerTimeouts,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.graceful.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                ctx.conns.spawn(handle_conn(stream, peer, ctx.clone(), shared.clone(), builder.clone(), timeouts));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = ctx.graceful.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    tracing::info!("proxy listener stopped accepting");
}

async fn handle_conn(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<crate::http::ConnExec>>,
    timeouts: ListenerTimeouts,
) {
    let _ = stream.set_nodelay(true);
    let state = ctx.state.load_full();
    ctx.stats.total.fetch_add(1, Ordering::Relaxed);
    ctx.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&ctx.stats.active);
    match &state.kind {
        HostKind::Tcp(t) => {
            let Ok(_permit) = t.limit.clone().try_acquire_owned() else {
                ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(host = %ctx.key, %peer, "connection refused: the tcp route's max_connections is reached");
                return;
            };
            let span = tracing::info_span!("proxy_tcp", host = %ctx.key, %peer, target = %t.target);
            tcp_conn(stream, &state, t, &ctx, &shared, timeouts).instrument(span).await;
        }
        HostKind::Http(_) => {
            let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
            let svc = ProxyService { shared, listener: ctx.clone(), peer_ip, tls: state.tls.is_some(), sticky: None };
            let (graceful, hard) = (ctx.graceful.clone(), ctx.hard.clone());
            match &state.tls {
                None => serve_connection(stream, svc, &builder, graceful, hard).await,
                Some(acc) => match tokio::time::timeout(timeouts.tls_handshake, acc.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(tls, svc, &builder, graceful, hard).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        }
    }
}

async fn tcp_conn(
    client: TcpStream,
    state: &HostState,
    t: &TcpHost,
    ctx: &ListenerCtx,
    shared: &Shared,
    timeouts: ListenerTimeouts,
) {
    let fail = |target: String, error: String| {
        tracing::warn!(%target, %error, "tcp target failed");
        shared.events.send(ProxyEvent::RouteFailed {
            host_id: ctx.key.clone(),
            route_id: t.route_id.clone(),
            target,
            error,
        });
    };
    if let (Target::Vm { vm_id, port }, Some(dialer)) = (&t.target, &shared.dialer) {
        let desc = t.target.to_string();
        let upstream = match tokio::time::timeout(timeouts.connect, dialer.dial(vm_id, *port)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail(desc, format!("dial: {e}")),
            Err(_) => return fail(desc, "dial timed out".into()),
        };
        let result = splice_with(client, tokio::io::split(upstream), state, t, ctx, timeouts).await;
        return log_end(&desc, t, result);
    }
    let (addr, vm): (SocketAddr, Option<&str>) = match &t.target {
        Target::Vm { vm_id, port } => match shared.targets.ip(vm_id).await {
            Ok(ip) => (SocketAddr::new(ip, *port), Some(vm_id.as_str())),
            Err(e) => return fail(t.target.to_string(), e.to_string()),
        },
        Target::Host { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => (a, None),
                None => return fail(t.target.to_string(), "name has no address".into()),
            },
            Err(e) => return fail(t.target.to_string(), e.to_string()),
        },
    };
    let upstream = match tokio::time::timeout(timeouts.connect, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if let Some(vm) = vm {
                shared.targets.forget(vm);
            }
            return fail(addr.to_string(), e.to_string());
        }
        Err(_) => {
            if let Some(vm) = vm {
                shared.targets.forget(vm);
            }
            return fail(addr.to_string(), "connect timed out".into());
        }
    };
    let _ = upstream.set_nodelay(true);
    let result = match &state.tls {
        None => splice_tcp(client, upstream, t.idle, &ctx.hard).await,
        Some(_) => splice_with(client, upstream.into_split(), state, t, ctx, timeouts).await,
    };
    log_end(&addr.to_string(), t, result);
}

/// Splice the client (after the TLS handshake, when the listener has TLS) with the target's halves.
async fn splice_with<TR, TW>(
    client: TcpStream,
    (ur, uw): (TR, TW),
    state: &HostState,
    t: &TcpHost,
    ctx: &ListenerCtx,
    timeouts: ListenerTimeouts,
) -> io::Result<SpliceEnd>
where
    TR: tokio::io::AsyncRead + Unpin,
    TW: tokio::io::AsyncWrite + Unpin,
{
    match &state.tls {
        None => {
            let (cr, cw) = client.into_split();
            splice((cr, cw), (ur, uw), t.idle, &ctx.hard).await
        }
        Some(acc) => match tokio::time::timeout(timeouts.tls_handshake, acc.accept(client)).await {
            Ok(Ok(tls)) => {
                let (cr, cw) = tokio::io::split(tls);
                splice((cr, cw), (ur, uw), t.idle, &ctx.hard).await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        },
    }
}

fn log_end(addr: &str, t: &TcpHost, result: io::Result<SpliceEnd>) {
    match result {
        Ok(SpliceEnd::Done(up, down)) => {
            tracing::debug!(%addr, to_target = up, to_client = down, "tcp connection closed")
        }
        Ok(SpliceEnd::Idle) => {
            tracing::debug!(%addr, idle_s = t.idle.as_secs(), "tcp connection closed after idle timeout")
        }
        Ok(SpliceEnd::Cancelled) => tracing::debug!(%addr, "tcp connection cut at shutdown"),
        Err(e) => tracing::debug!(%addr, error = %e, "tcp connection ended with an error"),
    }
}
