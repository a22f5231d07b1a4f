//! Port-forward tunnels: a TCP byte stream carried over a websocket.
//!
//! The wire protocol of `GET .../machines/{id}/port-forward/{port}` (host and orchestrator
//! routes, the CLI's `hangar vm port-forward`):
//!
//! * binary frames carry the bytes, in order, both ways;
//! * an **empty** binary frame means "no more bytes from me" (TCP half-close): the receiver
//!   shuts down the write side of its TCP connection and keeps reading;
//! * a close frame ends the tunnel both ways; it is sent once both directions ended;
//! * both sides send a ping every [`PING_EVERY`] so idle proxies keep the connection.
//!
//! This module holds the client side built on `tokio-tungstenite`: [`connect`] opens a
//! tunnel (`ws://` or `wss://` through rustls with the platform verifier, as the rest of
//! Hangar's clients trust), [`splice`] copies between a tunnel and any byte stream,
//! [`into_io`] turns a tunnel into a byte stream, and [`HostTunnels`] opens tunnels to the
//! host that owns a VM with the orchestrator's stored host credentials; it is also the
//! [`hangar_proxy::VmDialer`] the orchestrator's reverse proxy reaches VM targets with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{Instrument, debug, info_span};

use crate::model::HostCredentials;

/// How often each side pings an open tunnel.
pub const PING_EVERY: Duration = Duration::from_secs(30);

/// How long opening a tunnel (TCP, TLS and the websocket handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Size of one read from the byte stream, so the largest binary frame.
const CHUNK: usize = 64 * 1024;

/// A byte stream a tunnel can run over, or that a tunnel is turned into.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// An open tunnel (client side).
pub type Tunnel = WebSocketStream<BoxIo>;

/// Why a tunnel could not be opened or ran into trouble.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The URL is not a usable `ws://`, `wss://`, `http://` or `https://` URL.
    #[error("{0}")]
    Url(String),
    /// No TCP connection (or no answer in time).
    #[error("Cannot reach {addr}: {message}")]
    Connect {
        /// Where we tried to go.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The TLS handshake failed (an untrusted certificate, say).
    #[error("TLS with {host} failed: {message}")]
    Tls {
        /// The server name.
        host: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered the upgrade with an HTTP error (the VM is not running, the port
    /// refused, the caller may not, ...).
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// Anything else on the websocket.
    #[error("websocket: {0}")]
    Protocol(String),
}

/// Bytes moved by [`splice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// From the tunnel into the byte stream.
    pub from_tunnel: u64,
    /// From the byte stream into the tunnel.
    pub to_tunnel: u64,
}

/// The one crypto provider of the workspace, with the platform's trust store (what
/// `reqwest` trusts too, so the CLI's and the orchestrator's HTTP calls and their tunnels
/// accept the same servers; `SSL_CERT_FILE` adds roots on Linux).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls_platform_verifier::BuilderVerifierExt;
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_platform_verifier()
                .map_err(|e| e.to_string())?
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(cfg))
        })
        .clone()
}

/// `http(s)://h:p/api/v1` + `/machines/x/port-forward/22` → `ws(s)://h:p/api/v1/machines/x/port-forward/22`.
pub fn ws_url(api_base: &str, path: &str) -> Result<String, TunnelError> {
    let base = api_base.trim_end_matches('/');
    let url = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}{path}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}{path}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        format!("{base}{path}")
    } else {
        return Err(TunnelError::Url(format!("{api_base:?} is not an http:// or https:// URL")));
    };
    Ok(url)
}

/// The `message` of a JSON error body, or the text itself.
fn message_of(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| text.chars().take(500).collect())
}

/// Open a tunnel at `url` (`ws://` or `wss://`), sending `headers` (the credential) with
/// the upgrade request.
pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Tunnel, TunnelError> {
    connect_with(url, headers, None).await
}

/// [`connect`] with the websocket's buffer sizes (`None`: tungstenite's defaults, a 128 KiB
/// read buffer, for tunnels that carry bulk bytes). tungstenite zero-fills its whole read
/// buffer on every read, so each open websocket keeps that much resident.
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
    config: Option<WebSocketConfig>,
) -> Result<Tunnel, TunnelError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(url, headers, config)).await {
        Ok(r) => r,
        Err(_) => Err(TunnelError::Connect {
            addr: url.to_string(),
            message: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

async fn connect_inner(
    url: &str,
    headers: &[(&str, &str)],
    config: Option<WebSocketConfig>,
) -> Result<Tunnel, TunnelError> {
    let parsed = url::Url::parse(url).map_err(|e| TunnelError::Url(format!("{url:?}: {e}")))?;
    let tls = match parsed.scheme() {
        "ws" => false,
        "wss" => true,
        other => return Err(TunnelError::Url(format!("{url:?}: scheme {other} is not ws or wss"))),
    };
    let port = parsed.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
    let (host, tcp) = match parsed.host() {
        Some(url::Host::Ipv4(a)) => (a.to_string(), tokio::net::TcpStream::connect((a, port)).await),
        Some(url::Host::Ipv6(a)) => (a.to_string(), tokio::net::TcpStream::connect((a, port)).await),
        Some(url::Host::Domain(d)) => (d.to_string(), tokio::net::TcpStream::connect((d, port)).await),
        None => return Err(TunnelError::Url(format!("{url:?} has no host"))),
    };
    let tcp = tcp.map_err(|e| TunnelError::Connect { addr: format!("{host}:{port}"), message: e.to_string() })?;
    let _ = tcp.set_nodelay(true);
    let stream: BoxIo = if tls {
        let cfg = tls_config().map_err(|message| TunnelError::Tls { host: host.clone(), message })?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| TunnelError::Tls { host: host.clone(), message: e.to_string() })?;
        let s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| TunnelError::Tls { host: host.clone(), message: hangar_core::error_chain(&e) })?;
        Box::new(s)
    } else {
        Box::new(tcp)
    };
    let mut req = url.into_client_request().map_err(|e| TunnelError::Url(format!("{url:?}: {e}")))?;
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| TunnelError::Protocol(e.to_string()))?;
        let value = HeaderValue::from_str(v).map_err(|_| TunnelError::Protocol(format!("header {k} is not valid")))?;
        req.headers_mut().insert(name, value);
    }
    match tokio_tungstenite::client_async_with_config(req, stream, config).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => Err(TunnelError::Refused {
            status: resp.status().as_u16(),
            message: resp.body().as_deref().map(message_of).unwrap_or_default(),
        }),
        Err(e) => Err(TunnelError::Protocol(e.to_string())),
    }
}

/// What a websocket message means to a tunnel.
#[derive(Debug)]
pub enum Frame {
    /// Bytes of the stream.
    Data(Bytes),
    /// The peer's half-close (an empty binary frame).
    End,
    /// The peer closed the tunnel (close frame, or the socket ended).
    Close,
    /// Anything else (pings, pongs, text): ignored.
    Other,
}

/// How [`pump`] reads and writes one websocket library's messages.
pub struct Wire<M> {
    /// A binary frame carrying bytes (empty: the half-close).
    pub binary: fn(Bytes) -> M,
    /// A ping.
    pub ping: fn() -> M,
    /// A close frame with a code and a reason.
    pub close: fn(u16, String) -> M,
    /// What a received message means.
    pub frame: fn(M) -> Frame,
}

/// How a [`pump`] ended without an I/O error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PumpEnd {
    /// Both directions ended, then the tunnel was closed.
    Done,
    /// The peer closed the tunnel.
    Closed,
    /// `stop` fired; the tunnel was closed with its code and reason.
    Stopped,
}

/// Copy a byte stream and a websocket into each other, the two directions running
/// independently (a slow reader on one side never stalls the other direction, so an echo
/// service with full buffers cannot deadlock the tunnel), until both directions ended
/// (then a close frame is sent), the peer closed, or `stop` answers a close code and
/// reason. Pings go out every [`PING_EVERY`]. Both the client ([`splice`]) and the servers'
/// routes use it.
pub async fn pump<M, St, Si, E, I, F>(
    stream: St,
    mut sink: Si,
    io: I,
    wire: Wire<M>,
    stop: F,
) -> (std::io::Result<PumpEnd>, Traffic)
where
    St: futures::Stream<Item = Result<M, E>> + Unpin,
    Si: futures::Sink<M> + Unpin,
    Si::Error: std::fmt::Display,
    E: std::fmt::Display,
    I: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = (u16, String)>,
{
    let io_err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let (mut rd, mut wr) = tokio::io::split(io);
    // To the writer: (message, whether it is the last one: the close).
    let (tx, rx) = tokio::sync::mpsc::channel::<(M, bool)>(8);
    let mut stream = stream;
    let from_tunnel = std::sync::atomic::AtomicU64::new(0);
    let to_tunnel = std::sync::atomic::AtomicU64::new(0);
    let count =
        |c: &std::sync::atomic::AtomicU64, n: usize| c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    // Tunnel -> byte stream. Ok(true): the peer's half-close; Ok(false): the peer closed.
    let tunnel_to_io = async {
        loop {
            match stream.next().await {
                Some(Ok(m)) => match (wire.frame)(m) {
                    Frame::Data(b) => {
                        wr.write_all(&b).await?;
                        count(&from_tunnel, b.len());
                    }
                    Frame::End => {
                        // The peer sends nothing more; our direction goes on until our
                        // byte stream ends (the stream is not read any further).
                        let _ = wr.shutdown().await;
                        return Ok(true);
                    }
                    Frame::Close => {
                        let _ = wr.shutdown().await;
                        return Ok(false);
                    }
                    Frame::Other => {}
                },
                Some(Err(e)) => {
                    let _ = wr.shutdown().await;
                    return Err(io_err(&e));
                }
                None => {
                    let _ = wr.shutdown().await;
                    return Ok(false);
                }
            }
        }
    };
    // Byte stream -> tunnel (through the writer below).
    let data_tx = tx.clone();
    let io_to_tunnel = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = rd.read(&mut buf).await?;
            let msg = (wire.binary)(Bytes::copy_from_slice(&buf[..n]));
            if data_tx.send((msg, false)).await.is_err() {
                return Err(std::io::Error::other("the tunnel's writer ended"));
            }
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            count(&to_tunnel, n);
        }
    };
    // The only writer of the websocket: data, pings, and the last message (after which it
    // ends). It owns the queue's receiver, so once it ended nobody waits for room in the queue.
    let writer = async {
        let mut rx = rx;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            let (msg, last) = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return Ok(()),
                },
                _ = ping.tick() => ((wire.ping)(), false),
            };
            sink.send(msg).await.map_err(|e| io_err(&e))?;
            if last {
                return Ok(());
            }
        }
    };
    tokio::pin!(tunnel_to_io, io_to_tunnel, writer, stop);
    let (mut tunnel_ended, mut io_ended, mut writer_ended) = (false, false, false);
    let mut stop_close = None;
    let end: std::io::Result<PumpEnd> = loop {
        if tunnel_ended && io_ended {
            break Ok(PumpEnd::Done);
        }
        tokio::select! {
            r = &mut tunnel_to_io, if !tunnel_ended => match r {
                Ok(true) => tunnel_ended = true,
                Ok(false) => break Ok(PumpEnd::Closed),
                Err(e) => break Err(e),
            },
            r = &mut io_to_tunnel, if !io_ended => match r {
                Ok(()) => io_ended = true,
                Err(e) => break Err(e),
            },
            r = &mut writer => {
                writer_ended = true;
                match r {
                    Ok(()) => break Ok(PumpEnd::Closed),
                    Err(e) => break Err(e),
                }
            },
            (code, reason) = &mut stop => {
                stop_close = Some((wire.close)(code, reason));
                break Ok(PumpEnd::Stopped);
            }
        }
    };
    // Say goodbye through the writer, unless it ended already (it failed; a finished async
    // block must not be polled again). The last message is a close (both directions done, an
    // error, or stop's code and reason) or, when the peer closed, a ping that only makes the
    // writer end once it sent what it holds. The writer is the only one making room in the queue, so it is
    // driven while the last message waits for room: the queue is full whenever the peer
    // reads slower than the byte stream fills it, and awaiting the send alone then waited
    // forever. The writer ends after the last message; a peer that stopped reading gets 5 s.
    if !writer_ended {
        let last = match &end {
            Ok(PumpEnd::Done) => (wire.close)(1000, "done".into()),
            Err(e) => (wire.close)(1011, e.to_string().chars().take(100).collect()),
            Ok(PumpEnd::Closed) | Ok(PumpEnd::Stopped) => stop_close.unwrap_or_else(wire.ping),
        };
        // The send fails only once the writer ended (and dropped the queue).
        let goodbye = async { tokio::join!(tx.send((last, true)), &mut writer) };
        let _ = tokio::time::timeout(Duration::from_secs(5), goodbye).await;
    }
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    (end, Traffic { from_tunnel: from_tunnel.load(relaxed), to_tunnel: to_tunnel.load(relaxed) })
}

fn tungstenite_wire() -> Wire<Message> {
    Wire {
        binary: Message::Binary,
        ping: || Message::Ping(Bytes::new()),
        close: |code, reason| Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() })),
        frame: |m| match m {
            Message::Binary(b) if b.is_empty() => Frame::End,
            Message::Binary(b) => Frame::Data(b),
            Message::Close(_) => Frame::Close,
            _ => Frame::Other,
        },
    }
}

/// Copy bytes both ways between the tunnel `ws` and the byte stream `io` until both
/// directions ended (see the module documentation for half-close and close), then close
/// the tunnel.
pub async fn splice<S, I>(ws: WebSocketStream<S>, io: I) -> std::io::Result<Traffic>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, stream) = ws.split();
    let (end, traffic) = pump(stream, sink, io, tungstenite_wire(), std::future::pending()).await;
    end.map(|_| traffic)
}

/// Turn a tunnel into a byte stream: the tunnel is spliced (on a task) with one end of an
/// in-memory pipe and the other end is returned. Shutting down its write side sends the
/// half-close; dropping it ends the tunnel.
pub fn into_io<S>(ws: WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mine, theirs) = tokio::io::duplex(CHUNK * 4);
    tokio::spawn(async move {
        if let Err(e) = splice(ws, theirs).await {
            debug!(error = %e, "tunnel ended with an error");
        }
    });
    mine
}

/// A shared HTTP client for logins to hosts.
fn http() -> Result<reqwest::Client, TunnelError> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(TunnelError::Protocol)
}

/// Opens tunnels to a VM's port through the host that owns the VM, with the host's stored
/// credentials (an API key as `X-Api-Key`, or a login whose token is kept and renewed once
/// when the host refuses it).
pub struct HostTunnels {
    scheduler: crate::Scheduler,
    tokens: Mutex<HashMap<String, String>>,
    /// One login at a time: tunnels opened together share it.
    logins: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for HostTunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTunnels").finish_non_exhaustive()
    }
}

/// Why [`HostTunnels::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HostTunnelError {
    /// The orchestrator does not know the VM or its host.
    #[error(transparent)]
    Orchestrator(#[from] crate::OrchestratorError),
    /// The host could not be reached or refused the tunnel.
    #[error("Host {host}: {source}")]
    Host {
        /// The host's id.
        host: String,
        /// What happened.
        source: TunnelError,
    },
}

impl HostTunnels {
    /// Tunnels through the hosts of `scheduler`'s registry.
    pub fn new(scheduler: crate::Scheduler) -> Arc<Self> {
        Arc::new(HostTunnels { scheduler, tokens: Mutex::new(HashMap::new()), logins: tokio::sync::Mutex::new(()) })
    }

    /// The id of the host that runs `vm`.
    pub async fn host_of(&self, vm: &str) -> crate::Result<crate::Host> {
        let host_id = self.scheduler.host_of(vm).await?;
        self.scheduler.registry().get(&host_id)
    }

    async fn login(&self, base: &str, username: &str, password: &str) -> Result<String, TunnelError> {
        let url = format!("{base}/v1/auth/token");
        let resp = http()?
            .post(&url)
            .json(&hangar_wire::LoginRequest::password(username, password))
            .send()
            .await
            .map_err(|e| TunnelError::Connect { addr: url.clone(), message: hangar_core::error_chain(&e) })?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if status != StatusCode::OK {
            return Err(TunnelError::Refused {
                status: status.as_u16(),
                message: format!("login refused: {}", message_of(&body)),
            });
        }
        serde_json::from_slice::<hangar_wire::TokenResponse>(&body)
            .map(|t| t.token)
            .map_err(|e| TunnelError::Protocol(format!("the host's login answer is not a token: {e}")))
    }

    /// The host's login token and whether it is new: the cached one, or a new login when
    /// there is none or the cached one was `refused`. A caller that waited for another's
    /// login takes its token, so tunnels opened together log in once.
    async fn token(
        &self,
        host: &str,
        base: &str,
        username: &str,
        password: &str,
        refused: Option<&str>,
    ) -> Result<(String, bool), TunnelError> {
        let cached = || {
            self.tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(host)
                .filter(|t| Some(t.as_str()) != refused)
                .cloned()
        };
        if let Some(t) = cached() {
            return Ok((t, false));
        }
        let _one = self.logins.lock().await;
        if let Some(t) = cached() {
            return Ok((t, true));
        }
        let t = self.login(base, username, password).await?;
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), t.clone());
        Ok((t, true))
    }

    /// Open a tunnel to `port` of `vm` on the host that owns it.
    pub async fn open(&self, vm: &str, port: u16) -> Result<Tunnel, HostTunnelError> {
        let host = self.host_of(vm).await?;
        let span = info_span!("orchestrator.tunnel", vm, port, host = %host.id);
        self.open_on(&host, vm, port).instrument(span).await
    }

    async fn open_on(&self, host: &crate::Host, vm: &str, port: u16) -> Result<Tunnel, HostTunnelError> {
        let herr = |source| HostTunnelError::Host { host: host.id.clone(), source };
        let creds = self.scheduler.registry().credentials(&host.id)?;
        // Registered URLs carry the API prefix (`http://h:3080/api`); accept `.../api/v1` too.
        let trimmed = host.url.trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
        let path = format!("/v1/machines/{}/port-forward/{port}", segment(vm));
        let url = ws_url(base, &path).map_err(herr)?;
        match creds {
            None => connect(&url, &[]).await.map_err(herr),
            Some(HostCredentials::ApiKey { api_key }) => connect(&url, &[("x-api-key", &api_key)]).await.map_err(herr),
            Some(HostCredentials::Basic { username, password }) => {
                let (token, fresh) = self.token(&host.id, base, &username, &password, None).await.map_err(herr)?;
                match connect(&url, &[("authorization", &format!("Bearer {token}"))]).await {
                    Err(TunnelError::Refused { status: 401, .. }) if !fresh => {
                        debug!("the host refused the cached token; logging in again");
                        let (token, _) =
                            self.token(&host.id, base, &username, &password, Some(&token)).await.map_err(herr)?;
                        connect(&url, &[("authorization", &format!("Bearer {token}"))]).await.map_err(herr)
                    }
                    other => other.map_err(herr),
                }
            }
        }
    }
}

/// The reverse proxy on an orchestrator reaches VM targets through their hosts.
#[async_trait::async_trait]
impl hangar_proxy::VmDialer for HostTunnels {
    async fn dial(&self, vm: &str, port: u16) -> std::io::Result<hangar_proxy::BoxedIo> {
        let tunnel = self.open(vm, port).await.map_err(|e| {
            debug!(vm, port, error = %e, "no tunnel to the VM");
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string())
        })?;
        Ok(Box::new(into_io(tunnel)))
    }
}

use hangar_core::path_segment as segment;

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    #[test]
    fn urls_turn_into_websocket_urls() {
        assert_eq!(ws_url("http://h:1/api/v1", "/x").unwrap(), "ws://h:1/api/v1/x");
        assert_eq!(ws_url("https://h/api/v1/", "/x").unwrap(), "wss://h/api/v1/x");
        assert!(ws_url("ftp://h", "/x").is_err());
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    /// Both directions full at once (8 MB through a streaming echo), then the half-close,
    /// over a real websocket on loopback, on both runtime flavours. The previous splice, which
    /// wrote one direction while it held the other, deadlocked here every time. Until the
    /// pump drove its writer while saying goodbye this also hung now and then (about one run
    /// in six on a current-thread runtime; multi-threaded runs were only luckier): the echo side's
    /// byte stream ended while its writer was blocked on the socket with the queue to it full
    /// (8 messages), and the pump then awaited room for its close without polling the writer,
    /// the only one making room, so the last few hundred KB never left (both sockets idle with
    /// empty buffers). The tests with a full queue below pin that down without timing luck.
    #[tokio::test(flavor = "current_thread")]
    async fn splice_carries_bytes_and_half_close_both_ways() {
        splice_round_trip().await;
    }

    /// [`splice_carries_bytes_and_half_close_both_ways`] multi-threaded, like the servers and the CLI.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_carries_bytes_and_half_close_both_ways_multi_thread() {
        splice_round_trip().await;
    }

    async fn splice_round_trip() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Server side: accept the websocket and turn it into a byte stream that echoes.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            // A streaming echo: it writes back while it reads, so both directions are full
            // at once (a tunnel that serialises them deadlocks here).
            let (mut r, mut w) = tokio::io::split(into_io(ws));
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let ws = connect(&format!("ws://{addr}/"), &[]).await.unwrap();
        let (mut mine, theirs) = tokio::io::duplex(1 << 16);
        let pump = tokio::spawn(splice(ws, theirs));
        let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let p = payload.clone();
            let (mut r, mut w) = tokio::io::split(mine);
            let t = tokio::spawn(async move {
                w.write_all(&p).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            let w = t.await.unwrap();
            mine = r.unsplit(w);
            back
        };
        assert_eq!(writer.len(), payload.len());
        assert!(writer == payload, "the echoed bytes differ");
        drop(mine);
        let traffic = pump.await.unwrap().unwrap();
        assert_eq!(traffic, Traffic { from_tunnel: 8_000_000, to_tunnel: 8_000_000 });
    }

    /// A byte stream that reads the given chunks, one a read, then its end, and takes any write.
    struct Chunks(VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(chunk) = self.0.pop_front() {
                buf.put_slice(&chunk);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The pump's goodbye when its queue to the writer is full: a peer that does not read yet
    /// (a rendezvous channel: it holds one message, then the writer waits), a byte stream of
    /// 8 chunks and its end, so the writer holds chunk 1 and the queue (8) chunks 2 to 8 and
    /// the half-close. `stop` fires once that is so; otherwise the peer's half-close ended
    /// the other direction already. Then the peer reads everything: it must get the chunks,
    /// the half-close and the close, and the pump must end.
    async fn goodbye_with_a_full_queue(by_stop: bool) -> (PumpEnd, Vec<Message>) {
        let peer_end: Vec<Result<Message, std::io::Error>> =
            if by_stop { Vec::new() } else { vec![Ok(Message::Binary(Bytes::new()))] };
        let stream = futures::stream::iter(peer_end).chain(futures::stream::pending());
        let (sink, sent) = futures::channel::mpsc::channel::<Message>(0);
        let io = Chunks((1..=8u8).map(|i| vec![i; 100]).collect());
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = fired.await;
            (4000, "stop".to_string())
        };
        let pump = pump(stream, sink, io, tungstenite_wire(), stop);
        tokio::pin!(pump);
        // Everything that can go without the peer reading goes in a few polls.
        for _ in 0..16 {
            assert!(futures::poll!(&mut pump).is_pending());
        }
        if by_stop {
            let _ = fire.send(());
            for _ in 0..16 {
                assert!(futures::poll!(&mut pump).is_pending());
            }
        }
        let both = async { tokio::join!(pump, sent.collect::<Vec<Message>>()) };
        let ((end, traffic), sent) =
            tokio::time::timeout(Duration::from_secs(10), both).await.expect("the pump hung saying goodbye");
        assert_eq!(traffic.to_tunnel, 800);
        let mut sent = sent.into_iter();
        for i in 1..=8u8 {
            assert_eq!(sent.next(), Some(Message::Binary(Bytes::from(vec![i; 100]))));
        }
        assert_eq!(sent.next(), Some(Message::Binary(Bytes::new())), "the half-close");
        (end.expect("the pump failed"), sent.collect())
    }

    #[tokio::test]
    async fn the_goodbye_drives_the_writer_when_the_queue_is_full() {
        let (end, rest) = goodbye_with_a_full_queue(false).await;
        assert_eq!(end, PumpEnd::Done);
        assert_eq!(rest, vec![(tungstenite_wire().close)(1000, "done".into())]);
    }

    #[tokio::test]
    async fn stop_drives_the_writer_when_the_queue_is_full() {
        let (end, rest) = goodbye_with_a_full_queue(true).await;
        assert_eq!(end, PumpEnd::Stopped);
        assert_eq!(rest, vec![(tungstenite_wire().close)(4000, "stop".into())]);
    }

    /// A writer that failed (the peer went away) ended the pump; the goodbye must not poll it again.
    #[tokio::test]
    async fn a_failed_writer_ends_the_pump_with_its_error() {
        let (sink, sent) = futures::channel::mpsc::channel::<Message>(0);
        drop(sent);
        let io = Chunks(VecDeque::from([vec![1u8; 100]]));
        let stream = futures::stream::pending::<Result<Message, std::io::Error>>();
        let (end, _) = pump(stream, sink, io, tungstenite_wire(), std::future::pending()).await;
        assert!(end.is_err(), "{end:?}");
    }

    #[tokio::test]
    async fn a_refused_upgrade_carries_the_status_and_message() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = tcp.read(&mut buf).await.unwrap();
            let body = r#"{"message":"VM x is not running"}"#;
            let resp = format!(
                "HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(resp.as_bytes()).await.unwrap();
        });
        match connect(&format!("ws://{addr}/"), &[]).await {
            Err(TunnelError::Refused { status, message }) => {
                assert_eq!(status, 409);
                assert_eq!(message, "VM x is not running");
            }
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("expected a refusal, the upgrade succeeded"),
        }
    }
}
