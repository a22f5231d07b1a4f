//! `/logs`, `/logs/stream`: the server's own log (reference §1.8), and the per-host forms
//! `/orchestrator/hosts/{id}/logs` and `.../logs/stream` read from the host through the
//! orchestrator.
//!
//! Only a SUPER_USER reads logs, as in the reference. The lines come from the binary's log
//! ring (the same lines the console gets, so nothing the log itself does not hold) or, when
//! `LOG_TO_FILE` is on, from the end of `hangar.log`. The stream re-checks its credential like
//! `/ws/subscribe` and ends (1008) when the caller is no longer a super user.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hangar_core::{Access, LogRing};
use hangar_wire::events::LogLines;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::routes;

use crate::auth::{self, Credential, RequestContext};
use crate::error::{ApiError, ApiErrorBody};
use crate::extract::{Path, Query};
use crate::routes::ws::SEND_TIMEOUT;
use crate::{Api, AppState};

type R<T> = Result<T, ApiError>;

/// Lines answered when the caller does not say.
pub const DEFAULT_LINES: usize = 1000;
/// Most lines one answer carries.
pub const MAX_LINES: usize = 10_000;
/// Most bytes read from the end of the log file.
const MAX_FILE_TAIL: u64 = 4 * 1024 * 1024;

pub fn register(api: Api) -> Api {
    api.add(Access::SuperUser, routes!(get_logs))
        .add(Access::SuperUser, routes!(stream_logs))
        .add(Access::SuperUser, routes!(host_logs))
        .add(Access::SuperUser, routes!(host_log_stream))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct LogsQuery {
    /// How many of the most recent lines (default 1000, at most 10000).
    pub lines: Option<usize>,
}

fn text(lines: &LogLines) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], lines.to_text()).into_response()
}

/// The last `limit` lines of the log file.
fn file_tail(path: &std::path::Path, limit: usize) -> std::io::Result<Vec<String>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(MAX_FILE_TAIL);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_TAIL).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    Ok(lines[lines.len().saturating_sub(limit)..].iter().map(|l| l.to_string()).collect())
}

async fn recent(ring: &LogRing, limit: usize) -> R<LogLines> {
    let lines = match ring.file() {
        Some(path) => {
            let p = path.clone();
            let read = tokio::task::spawn_blocking(move || file_tail(&p, limit))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("Log reader failed: {e}")))?;
            read.map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Cannot read the log file {}: {e}", path.display()),
                )
            })?
        }
        None => ring.recent(limit),
    };
    Ok(LogLines { lines })
}

/// The server's recent log lines, oldest first, as plain text (the end of `hangar.log` when
/// `LOG_TO_FILE` is on, else the in-memory ring of recent lines).
#[utoipa::path(get, path = "/logs", tag = "logs", params(LogsQuery),
    responses((status = 200, description = "Log lines, one per line", body = String, content_type = "text/plain"), (status = 403, body = ApiErrorBody)))]
async fn get_logs(State(s): State<AppState>, Query(q): Query<LogsQuery>) -> R<Response> {
    let limit = q.lines.unwrap_or(DEFAULT_LINES).clamp(1, MAX_LINES);
    Ok(text(&recent(&s.logs, limit).await?))
}

/// Live log lines (websocket upgrade): every new line as one text message.
#[utoipa::path(get, path = "/logs/stream", tag = "logs",
    responses((status = 101, description = "Switching to the websocket protocol"), (status = 403, body = ApiErrorBody)))]
async fn stream_logs(State(s): State<AppState>, ctx: RequestContext, ws: WebSocketUpgrade) -> R<Response> {
    ctx.caller()?;
    let credential = ctx.credential.clone();
    let ws = ws.max_message_size(4 * 1024).max_frame_size(4 * 1024);
    // Subscribe before answering 101: a line logged once the client holds the socket is sent.
    let source = Source::Ring(s.logs.subscribe());
    Ok(ws.on_upgrade(move |socket| relay(s, socket, credential, source)))
}

/// Where a log stream's lines come from: this server's ring, or a host through the orchestrator.
enum Source {
    Ring(tokio::sync::broadcast::Receiver<hangar_core::logs::LogEntry>),
    Host(tokio::sync::mpsc::Receiver<String>),
}

impl Source {
    /// The next line; `None` when the source has ended.
    async fn next(&mut self) -> Option<String> {
        match self {
            Source::Ring(rx) => loop {
                match rx.recv().await {
                    Ok(entry) => return Some(entry.message),
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            },
            Source::Host(rx) => rx.recv().await,
        }
    }
}

async fn relay(s: AppState, mut socket: WebSocket, credential: Option<Credential>, mut source: Source) {
    let mut recheck = tokio::time::interval(Duration::from_secs(5));
    recheck.tick().await;
    loop {
        tokio::select! {
            line = source.next() => match line {
                Some(line) => {
                    let sent = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(line.into()))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                }
                None => {
                    let _ = socket.send(Message::Close(Some(CloseFrame { code: 1011, reason: "the log stream ended".into() }))).await;
                    break;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = recheck.tick() => {
                let still = match &credential {
                    Some(c) => auth::recheck(&s, c).await.ok().filter(|p| p.is_super_user()),
                    None => None,
                };
                if still.is_none() {
                    let _ = socket.send(Message::Close(Some(CloseFrame { code: 1008, reason: "credentials no longer valid".into() }))).await;
                    break;
                }
            }
        }
    }
}

/// A host's recent log lines, read from the host now through the orchestrator (plain text).
#[utoipa::path(get, path = "/orchestrator/hosts/{id}/logs", tag = "orchestrator", params(("id" = String, Path, description = "Host id or name")),
    responses((status = 200, description = "The host's log lines, one per line", body = String, content_type = "text/plain"),
        (status = 404, body = ApiErrorBody), (status = 502, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn host_logs(State(s): State<AppState>, Path(id): Path<String>) -> R<Response> {
    Ok(text(&orchestrator(&s)?.host_logs(&id).await.map_err(ApiError::from_domain)?))
}

fn orchestrator(s: &AppState) -> R<&std::sync::Arc<hangar_orchestrator::HttpOrchestrator>> {
    s.orchestrator.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The orchestrator module is not running on this server; see GET /health/system",
        )
    })
}

/// A host's live log lines (websocket upgrade), relayed from the host's `/logs/stream`
/// through the orchestrator; the host's stream is opened before the upgrade, so a host that
/// refuses or cannot be reached is an HTTP error, not an empty stream.
#[utoipa::path(get, path = "/orchestrator/hosts/{id}/logs/stream", tag = "orchestrator", params(("id" = String, Path, description = "Host id or name")),
    responses((status = 101, description = "Switching to the websocket protocol"), (status = 403, body = ApiErrorBody),
        (status = 404, body = ApiErrorBody), (status = 502, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
async fn host_log_stream(
    State(s): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> R<Response> {
    ctx.caller()?;
    let lines = orchestrator(&s)?.host_log_lines(&id).await.map_err(ApiError::from_domain)?;
    let credential = ctx.credential.clone();
    let ws = ws.max_message_size(4 * 1024).max_frame_size(4 * 1024);
    Ok(ws.on_upgrade(move |socket| relay(s, socket, credential, Source::Host(lines))))
}
