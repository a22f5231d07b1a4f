//! `/ws/subscribe`: the websocket event stream.
//!
//! Envelope as in the reference (`id, event_type, timestamp, message, body`). A client
//! asks for types with `?event_types=a,b`; `global` is always included. A subscriber only
//! gets the types its claims allow (an unknown type is a 400, a type it may not read is a
//! 403), and its credential is checked again every few seconds, so a deleted or disabled
//! user's stream ends promptly. A client message `{"type":"health","message":"ping"}` is
//! answered with `{"event_type":"health","message":"pong"}`.
//!
//! Bounded: one user holds at most [`MAX_STREAMS_PER_USER`] open streams (the next is a 429
//! with `Retry-After`), each stream's buffers are small and capped (a client that does not
//! read within [`SEND_TIMEOUT`] is closed), and client messages are small.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use hangar_core::claims::READ_ONLY;
use hangar_core::{Access, Decision, Event, EventType, Principal};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::routes;

use crate::auth::{self, Credential, RequestContext};
use crate::error::ApiError;
use crate::extract::Query;
use crate::{Api, AppState};

/// Open event streams one user may hold at once.
pub const MAX_STREAMS_PER_USER: usize = 32;
/// A send that does not complete in this time (the client does not read) closes the stream.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffers of one stream: reads, writes before a flush, the most a write may queue, and the
/// largest client message or frame (clients only send pings).
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 8 * 1024;
const MAX_WRITE_BUFFER: usize = 256 * 1024;
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;

/// Counters for connected clients, and the open streams per user.
#[derive(Debug, Default)]
pub struct WsHub {
    pub connected: AtomicUsize,
    pub delivered: AtomicU64,
    per_user: Mutex<HashMap<String, usize>>,
}

/// One user's place among its open streams, given back when dropped.
struct Slot<'a> {
    hub: &'a WsHub,
    user: String,
}

impl WsHub {
    /// Open streams of `user_id` now.
    pub fn streams_of(&self, user_id: &str) -> usize {
        self.per_user.lock().map(|m| m.get(user_id).copied().unwrap_or(0)).unwrap_or(0)
    }

    fn take(&self, user_id: &str) -> Option<Slot<'_>> {
        let mut m = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(user_id.to_string()).or_insert(0);
        if *n >= MAX_STREAMS_PER_USER {
            return None;
        }
        *n += 1;
        Some(Slot { hub: self, user: user_id.to_string() })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut m = self.hub.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

pub fn register(api: Api) -> Api {
    api.add(Access::AnyOf(&[READ_ONLY]), routes!(subscribe))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SubscribeQuery {
    /// Comma-separated event types: global, pdfm, system, system_logs, health,
    /// orchestrator, stats, reverse_proxy, catalog_cache, job_manager, auth.
    pub event_types: Option<String>,
    /// A token, for clients that cannot set headers on a websocket.
    pub access_token: Option<String>,
    /// Same as `access_token`.
    pub authorization: Option<String>,
}

/// Open the event stream (websocket upgrade).
#[utoipa::path(get, path = "/ws/subscribe", tag = "events", params(SubscribeQuery),
    responses((status = 101, description = "Switching to the websocket protocol"), (status = 400, body = crate::ApiErrorBody), (status = 403, body = crate::ApiErrorBody),
        (status = 429, description = "The user already holds the most open streams (Retry-After)", body = crate::ApiErrorBody)))]
async fn subscribe(
    State(s): State<AppState>,
    ctx: RequestContext,
    Query(q): Query<SubscribeQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let principal = ctx.caller()?.clone();
    let mut types = BTreeSet::from([EventType::Global]);
    for t in q.event_types.as_deref().unwrap_or("").split(',').filter(|t| !t.trim().is_empty()) {
        let t: EventType =
            t.parse().map_err(|e: hangar_core::events::UnknownEventType| ApiError::bad_request(e.to_string()))?;
        if let Decision::Forbidden { needed } = t.access().check(Some(&principal)) {
            return Err(ApiError::forbidden(format!("Event type {t} needs {needed}")));
        }
        types.insert(t);
    }
    let credential = ctx.credential.clone();
    if s.ws.streams_of(&principal.user_id) >= MAX_STREAMS_PER_USER {
        return Err(too_many());
    }
    let ws = ws
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE);
    Ok(ws.on_upgrade(move |socket| async move {
        // Taken again here: two upgrades may have passed the check above together.
        let hub = s.ws.clone();
        let Some(_slot) = hub.take(&principal.user_id) else {
            let mut socket = socket;
            let reason = format!("at most {MAX_STREAMS_PER_USER} open streams per user");
            let _ = socket.send(Message::Close(Some(CloseFrame { code: 1008, reason: reason.into() }))).await;
            return;
        };
        run(s, socket, principal, credential, types).await
    }))
}

fn too_many() -> ApiError {
    let mut e = ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        format!(
            "This user already holds {MAX_STREAMS_PER_USER} open event streams, the most allowed; close one (or subscribe to several event types on one stream) and retry"
        ),
    );
    e.retry_after = Some(5);
    e
}

fn visible(e: &Event, p: &Principal, types: &BTreeSet<EventType>) -> bool {
    types.contains(&e.event_type)
        && e.event_type.access().check(Some(p)) == Decision::Allow
        && e.audience.as_ref().is_none_or(|a| *a == p.user_id || p.is_super_user())
}

async fn run(
    s: AppState,
    mut socket: WebSocket,
    mut principal: Principal,
    credential: Option<Credential>,
    types: BTreeSet<EventType>,
) {
    let mut rx = s.bus.subscribe();
    s.ws.connected.fetch_add(1, Ordering::Relaxed);
    let mut recheck = tokio::time::interval(Duration::from_secs(5));
    recheck.tick().await;
    let hello = Event::new(
        EventType::Global,
        "CLIENT_SUBSCRIBED",
        serde_json::json!({"event_types": types.iter().map(|t| t.as_str()).collect::<Vec<_>>(), "user": principal.username}),
    );
    let mut ok = send(&mut socket, &hello).await;
    while ok {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(e) => {
                    if visible(&e, &principal, &types) {
                        ok = send(&mut socket, &e).await;
                        s.ws.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let warn = Event::new(EventType::Global, "EVENTS_DROPPED", serde_json::json!({"dropped": n}));
                    ok = send(&mut socket, &warn).await;
                }
                Err(RecvError::Closed) => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    #[derive(Deserialize)]
                    struct Ping { #[serde(rename = "type")] kind: Option<String>, message: Option<String> }
                    if let Ok(p) = serde_json::from_str::<Ping>(&t)
                        && p.message.as_deref() == Some("ping")
                    {
                        let _ = p.kind;
                        let pong = Event::new(EventType::Health, "pong", serde_json::Value::Null);
                        ok = send(&mut socket, &pong).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = recheck.tick() => {
                let still = match &credential {
                    Some(c) => auth::recheck(&s, c).await.ok(),
                    None => None,
                };
                match still {
                    Some(p) => principal = p,
                    None => {
                        let _ = socket.send(Message::Close(Some(CloseFrame { code: 1008, reason: "credentials no longer valid".into() }))).await;
                        break;
                    }
                }
            }
        }
    }
    s.ws.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Send one event; `false` closes the stream (the client is gone, or does not read).
async fn send(socket: &mut WebSocket, e: &Event) -> bool {
    match serde_json::to_string(e) {
        Ok(text) => {
            matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await, Ok(Ok(())))
        }
        Err(_) => true,
    }
}
