//! Port-forward: a TCP connection to a VM's port carried over a websocket, like
//! `kubectl port-forward` (`hangar vm port-forward VM LOCAL:REMOTE` is the client).
//!
//! * `GET /machines/{id}/port-forward/{port}` (host module): the host connects to the VM's
//!   current IP address and `port`, then upgrades; the websocket carries the byte stream.
//! * `GET /orchestrator/machines/{id}/port-forward/{port}`: the orchestrator opens the same
//!   route on the host that owns the VM (with its stored host credentials) and relays.
//!
//! Both need `EXECUTE_COMMAND_VM`, like running a command in the VM; the orchestrator also
//! checks the caller may use the VM's host (its required roles and claims), as its execute
//! route does. The connection to the VM is made before the upgrade, so a VM that is not
//! running answers 409, a port that refuses answers 502, and a VM that does not answer in
//! time 504, each with a message. On the websocket, binary frames carry the bytes, an empty
//! binary frame is a half-close and a close frame ends the tunnel (the protocol is spelled
//! out in `hangar_orchestrator::tunnel`). The server pings every 30 s and checks the
//! caller's credential again every [`RECHECK_EVERY`]: a disabled user, a revoked key, a
//! password change or a lost claim closes the tunnel with code 1008; the expiry of the login
//! token it opened with does not (a session outlives its token, not a revocation).

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::Response;
use futures::StreamExt;
use hangar_core::VmAction;
use hangar_orchestrator::tunnel::{Frame, HostTunnelError, PumpEnd, TunnelError, Wire, into_io, pump};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{Instrument, debug, info, info_span};
use utoipa_axum::routes;

use crate::auth::{Credential, RequestContext, recheck};
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::Path;
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

/// How often an open tunnel checks its caller's credential again.
pub const RECHECK_EVERY: Duration = Duration::from_secs(10);

/// How long the host waits for the VM to accept the connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn register(api: Api) -> Api {
    api.add(VmAction::PortForward.access(), routes!(host_port_forward))
        .add(VmAction::PortForward.access(), routes!(orchestrator_port_forward))
}

/// Open a TCP tunnel to `port` of the VM (websocket upgrade; binary frames carry the bytes,
/// an empty binary frame is a half-close).
#[utoipa::path(get, path = "/machines/{id}/port-forward/{port}", tag = "machines",
    params(("id" = String, Path, description = "VM id or name"), ("port" = u16, Path, description = "TCP port in the VM")),
    responses((status = 101, description = "Switching to the websocket protocol; the tunnel is open"),
        (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody, description = "The VM is not running or has no IP address"),
        (status = 502, body = ApiErrorBody, description = "The VM refused the connection"),
        (status = 504, body = ApiErrorBody, description = "The VM did not answer in time")))]
async fn host_port_forward(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, port)): Path<(String, u16)>,
    ws: WebSocketUpgrade,
) -> R<Response> {
    let h = super::machines::host(&s)?;
    let caller = ctx.caller()?.clone();
    let vm = h.port_forward(&caller, &ctx.actor, &id, port).await.map_err(ApiError::from_domain)?;
    let ip = vm.ip_addresses.iter().find(|i| i.is_ipv4()).or(vm.ip_addresses.first()).copied().ok_or_else(|| {
        ApiError::new(StatusCode::CONFLICT, format!("VM {} has no IP address yet; try again once it booted", vm.name))
    })?;
    let span = info_span!("port_forward", vm = %vm.id, port, user = %caller.username);
    let addr = SocketAddr::new(ip, port);
    let tcp =
        match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).instrument(span.clone()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("VM {} refused a connection on port {port}: {e}", vm.name),
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "VM {} did not accept a connection on port {port} within {} s",
                        vm.name,
                        DIAL_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
    let _ = tcp.set_nodelay(true);
    let credential = ctx.credential.clone();
    Ok(ws.on_upgrade(move |socket| run(s, socket, tcp, credential).instrument(span)))
}

/// Open a TCP tunnel to `port` of a VM on any host of the fleet, through that host.
#[utoipa::path(get, path = "/orchestrator/machines/{id}/port-forward/{port}", tag = "orchestrator",
    params(("id" = String, Path, description = "VM id"), ("port" = u16, Path, description = "TCP port in the VM")),
    responses((status = 101, description = "Switching to the websocket protocol; the tunnel is open"),
        (status = 400, body = ApiErrorBody), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
        (status = 409, body = ApiErrorBody, description = "The VM is not running or has no IP address"),
        (status = 502, body = ApiErrorBody, description = "The VM refused the connection, or its host could not be reached"),
        (status = 504, body = ApiErrorBody, description = "The VM did not answer in time")))]
async fn orchestrator_port_forward(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path((id, port)): Path<(String, u16)>,
    ws: WebSocketUpgrade,
) -> R<Response> {
    let o = super::machines::orchestrator(&s)?;
    let caller = ctx.caller()?.clone();
    let (host, id) = o.port_forward(&caller, &ctx.actor, &id, port).await.map_err(ApiError::from_domain)?;
    let span = info_span!("orchestrator.port_forward", vm = %id, port, host = %host.id, user = %caller.username);
    let tunnel = o.open_tunnel(&id, port).instrument(span.clone()).await.map_err(|e| host_error(&host.name, e))?;
    let credential = ctx.credential.clone();
    Ok(ws.on_upgrade(move |socket| run(s, socket, into_io(tunnel), credential).instrument(span)))
}

/// The host's answer, as the orchestrator's caller should see it.
fn host_error(host: &str, e: HostTunnelError) -> ApiError {
    match e {
        HostTunnelError::Orchestrator(e) => ApiError::from_domain(e),
        HostTunnelError::Host { source: TunnelError::Refused { status, message }, .. } => {
            let status = match status {
                // The host refused the orchestrator's own credential: not the caller's fault.
                401 | 403 => StatusCode::BAD_GATEWAY,
                s => StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
            };
            ApiError::new(status, format!("Host {host}: {message}"))
        }
        HostTunnelError::Host { source, .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, format!("Host {host}: {source}"))
        }
    }
}

/// Whether the credential still authenticates a caller who may forward ports.
async fn still_allowed(s: &AppState, credential: &Option<Credential>) -> bool {
    let Some(c) = credential else { return false };
    match recheck(s, c).await {
        Ok(p) => VmAction::PortForward.access().check(Some(&p)) == hangar_core::Decision::Allow,
        Err(_) => false,
    }
}

async fn run<I>(s: AppState, socket: WebSocket, io: I, credential: Option<Credential>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    info!("tunnel open");
    match splice(&s, socket, io, &credential).await {
        Ok((from_client, to_client)) => info!(from_client, to_client, "tunnel closed"),
        Err(e) => debug!(error = %e, "tunnel ended with an error"),
    }
}

fn wire() -> Wire<Message> {
    Wire {
        binary: Message::Binary,
        ping: || Message::Ping(Bytes::new()),
        close: |code, reason| Message::Close(Some(CloseFrame { code, reason: reason.into() })),
        frame: |m| match m {
            Message::Binary(b) if b.is_empty() => Frame::End,
            Message::Binary(b) => Frame::Data(b),
            Message::Close(_) => Frame::Close,
            _ => Frame::Other,
        },
    }
}

/// Copy between the caller's websocket and the VM's byte stream (see the module docs), the
/// two directions independent (`hangar_orchestrator::tunnel::pump`); the caller's credential
/// is checked again every [`RECHECK_EVERY`] and the tunnel closed (1008) when it no longer
/// allows port forwarding.
async fn splice<I>(s: &AppState, ws: WebSocket, io: I, credential: &Option<Credential>) -> std::io::Result<(u64, u64)>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, stream) = ws.split();
    let recheck = async {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK_EVERY, RECHECK_EVERY);
        loop {
            every.tick().await;
            if !still_allowed(s, credential).await {
                return (1008, "credentials no longer valid".to_string());
            }
        }
    };
    let (end, traffic) = pump(stream, sink, io, wire(), recheck).await;
    if let Ok(PumpEnd::Stopped) = end {
        info!("tunnel closed: credentials no longer valid");
    }
    end.map(|_| (traffic.from_tunnel, traffic.to_tunnel))
}
