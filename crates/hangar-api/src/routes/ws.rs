//! `/ws/subscribe`: the websocket event stream.
//!
//! Envelope as in the reference (`id, event_type, timestamp, message, body`). A client
//! asks for types with `?event_types=a,b`; `global` is always included. A subscriber only
//! gets the types its claims allow (an unknown type is a 400, a type it may not read is a
//! 403), and its credential is checked again every few seconds, so a deleted or disabled
//! user's stream ends promptly. A client message `{"type":"health","message":"ping"}` is
//! answered with `{"event_type":"health","message":"pong"}`.
//!
//! `/ws/clients`, `/ws/stats` and `/ws/unsubscribe` (reference shapes) show and change open
//! streams: a caller sees and changes only its own streams, a super user every stream. A
//! stream's id is in the body of its first event (`CLIENT_SUBSCRIBED`, `client_id`).
//!
//! Bounded: one user holds at most [`MAX_STREAMS_PER_USER`] open streams (the next is a 429
//! with `Retry-After`), each stream's buffers are small and capped (a client that does not
//! read within [`SEND_TIMEOUT`] is closed), and client messages are small.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use chrono::{DateTime, Utc};
use hangar_core::claims::READ_ONLY;
use hangar_core::{Access, Decision, Event, EventType, Principal};
use hangar_wire::events::{EventClientInfo, EventEmitterStats, UnsubscribeRequest, UnsubscribeResponse};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::routes;

use crate::auth::{self, Credential, RequestContext};
use crate::error::ApiError;
use crate::extract::{Json, Query};
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
#[derive(Debug)]
pub struct WsHub {
    pub connected: AtomicUsize,
    pub delivered: AtomicU64,
    per_user: Mutex<HashMap<String, usize>>,
    clients: Mutex<HashMap<String, Arc<Mutex<Client>>>>,
    started: DateTime<Utc>,
}

impl Default for WsHub {
    fn default() -> Self {
        WsHub {
            connected: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            per_user: Mutex::default(),
            clients: Mutex::default(),
            started: Utc::now(),
        }
    }
}

/// One open stream: who holds it and what it receives now.
#[derive(Debug)]
struct Client {
    user_id: String,
    username: String,
    connected_at: DateTime<Utc>,
    last_ping_at: Option<DateTime<Utc>>,
    last_pong_at: Option<DateTime<Utc>>,
    types: BTreeSet<EventType>,
    queue_depth: usize,
}

/// Removes a stream from the hub's list when dropped.
struct Registered<'a> {
    hub: &'a WsHub,
    id: String,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.hub.clients.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

fn lock(c: &Mutex<Client>) -> std::sync::MutexGuard<'_, Client> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

fn info(id: &str, c: &Client) -> EventClientInfo {
    EventClientInfo {
        id: id.to_string(),
        user_id: c.user_id.clone(),
        username: c.username.clone(),
        connected_at: c.connected_at,
        last_ping_at: c.last_ping_at,
        last_pong_at: c.last_pong_at,
        event_subscriptions: c.types.iter().map(|t| t.as_str().to_string()).collect(),
        is_alive: true,
        queue_depth: c.queue_depth,
    }
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

    fn register(&self, id: &str, client: Client) -> (Registered<'_>, Arc<Mutex<Client>>) {
        let c = Arc::new(Mutex::new(client));
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), c.clone());
        (Registered { hub: self, id: id.to_string() }, c)
    }

    /// The open streams `p` may see: its own, or every one for a super user.
    pub fn clients_for(&self, p: &Principal) -> Vec<EventClientInfo> {
        let all: Vec<(String, Arc<Mutex<Client>>)> = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<EventClientInfo> = all
            .iter()
            .filter_map(|(id, c)| {
                let c = lock(c);
                (p.is_super_user() || c.user_id == p.user_id).then(|| info(id, &c))
            })
            .collect();
        out.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then(a.id.cmp(&b.id)));
        out
    }

    /// Hub statistics: counts over every stream, the streams themselves as [`Self::clients_for`].
    pub fn stats_for(&self, p: &Principal) -> EventEmitterStats {
        let all: Vec<Arc<Mutex<Client>>> =
            self.clients.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut type_stats = std::collections::BTreeMap::new();
        let mut total_subscriptions = 0;
        for c in &all {
            for t in &lock(c).types {
                *type_stats.entry(t.as_str().to_string()).or_insert(0) += 1;
                total_subscriptions += 1;
            }
        }
        let up = (Utc::now() - self.started).num_seconds().max(0);
        EventEmitterStats {
            total_clients: all.len(),
            total_subscriptions,
            type_stats,
            clients: self.clients_for(p),
            messages_sent: self.delivered.load(Ordering::Relaxed),
            start_time: self.started,
            uptime: format!("{}h{}m{}s", up / 3600, up % 3600 / 60, up % 60),
        }
    }

    /// Drop `types` from stream `id`, which must be `p`'s own unless `p` is a super user.
    pub fn unsubscribe(&self, p: &Principal, id: &str, types: &[EventType]) -> Result<Vec<String>, ApiError> {
        let c = self.clients.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        let c = c.ok_or_else(|| ApiError::not_found(format!("No open event stream {id:?} of yours")))?;
        let mut c = lock(&c);
        if c.user_id != p.user_id && !p.is_super_user() {
            return Err(ApiError::not_found(format!("No open event stream {id:?} of yours")));
        }
        let mut removed = 0;
        for t in types {
            if *t != EventType::Global && c.types.remove(t) {
                removed += 1;
            }
        }
        if removed == 0 {
            return Err(ApiError::bad_request(
                "The stream is not subscribed to any of these event types (global cannot be dropped)",
            ));
        }
        Ok(c.types.iter().map(|t| t.as_str().to_string()).collect())
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
        .add(Access::AnyOf(&[READ_ONLY]), routes!(unsubscribe))
        .add(Access::AnyOf(&[READ_ONLY]), routes!(clients))
        .add(Access::AnyOf(&[READ_ONLY]), routes!(stats))
}

/// Stop receiving some event types on an open stream (the caller's own; any for a super user).
#[utoipa::path(post, path = "/ws/unsubscribe", tag = "events", request_body = UnsubscribeRequest,
    responses((status = 200, body = UnsubscribeResponse), (status = 400, body = crate::ApiErrorBody), (status = 404, body = crate::ApiErrorBody)))]
async fn unsubscribe(
    State(s): State<AppState>,
    ctx: RequestContext,
    Json(req): Json<UnsubscribeRequest>,
) -> Result<axum::Json<UnsubscribeResponse>, ApiError> {
    if req.event_types.is_empty() {
        return Err(ApiError::bad_request("event_types is required"));
    }
    let mut types = Vec::new();
    for t in &req.event_types {
        types.push(t.parse::<EventType>().map_err(|e| ApiError::bad_request(e.to_string()))?);
    }
    let subscriptions = s.ws.unsubscribe(ctx.caller()?, &req.client_id, &types)?;
    Ok(axum::Json(UnsubscribeResponse { client_id: req.client_id, subscriptions }))
}

/// Open event streams: the caller's own, every one for a super user.
#[utoipa::path(get, path = "/ws/clients", tag = "events", responses((status = 200, body = Vec<EventClientInfo>)))]
async fn clients(State(s): State<AppState>, ctx: RequestContext) -> Result<axum::Json<Vec<EventClientInfo>>, ApiError> {
    Ok(axum::Json(s.ws.clients_for(ctx.caller()?)))
}

/// Event hub statistics; `clients` lists the caller's own streams (every one for a super user).
#[utoipa::path(get, path = "/ws/stats", tag = "events", responses((status = 200, body = EventEmitterStats)))]
async fn stats(State(s): State<AppState>, ctx: RequestContext) -> Result<axum::Json<EventEmitterStats>, ApiError> {
    Ok(axum::Json(s.ws.stats_for(ctx.caller()?)))
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

fn visible(e: &Event, p: &Principal, client: &Mutex<Client>) -> bool {
    lock(client).types.contains(&e.event_type)
        && e.event_type.access().check(Some(p)) == Decision::Allow
        && e.may_reach(p)
}

async fn run(
    s: AppState,
    mut socket: WebSocket,
    mut principal: Principal,
    credential: Option<Credential>,
    types: BTreeSet<EventType>,
) {
    let mut rx = s.bus.subscribe();
    let _interest = s.bus.interest(types.iter().copied());
    let hub = s.ws.clone();
    let client_id = uuid::Uuid::now_v7().to_string();
    let (_registered, client) = hub.register(
        &client_id,
        Client {
            user_id: principal.user_id.clone(),
            username: principal.username.clone(),
            connected_at: Utc::now(),
            last_ping_at: None,
            last_pong_at: None,
            types: types.clone(),
            queue_depth: 0,
        },
    );
    s.ws.connected.fetch_add(1, Ordering::Relaxed);
    let mut recheck = tokio::time::interval(Duration::from_secs(5));
    recheck.tick().await;
    let hello = Event::new(
        EventType::Global,
        "CLIENT_SUBSCRIBED",
        serde_json::json!({"client_id": client_id, "event_types": types.iter().map(|t| t.as_str()).collect::<Vec<_>>(), "user": principal.username}),
    );
    let mut ok = send(&mut socket, &hello).await;
    while ok {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(e) => {
                    lock(&client).queue_depth = rx.len();
                    if visible(&e, &principal, &client) {
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
                        lock(&client).last_ping_at = Some(Utc::now());
                        lock(&client).last_pong_at = Some(Utc::now());
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
