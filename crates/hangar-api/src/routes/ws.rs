//! `/ws/subscribe`: the websocket event stream.
//!
//! Envelope as in the reference (`id, event_type, timestamp, message, body`). A client
//! asks for types with `?event_types=a,b`; `global` is always included. A subscriber only
//! gets the types its claims allow (an unknown type is a 400, a type it may not read is a
//! 403), and its credential is checked again every few seconds, so a deleted or disabled
//! user's stream ends promptly. A client message `{"type":"health","message":"ping"}` is
//! answered with `{"event_type":"health","message":"pong"}`.

use std::collections::BTreeSet;
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

/// Counters for connected clients.
#[derive(Debug, Default)]
pub struct WsHub {
    pub connected: AtomicUsize,
    pub delivered: AtomicU64,
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
    responses((status = 101, description = "Switching to the websocket protocol"), (status = 400, body = crate::ApiErrorBody), (status = 403, body = crate::ApiErrorBody)))]
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
    Ok(ws.on_upgrade(move |socket| run(s, socket, principal, credential, types)))
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

async fn send(socket: &mut WebSocket, e: &Event) -> bool {
    match serde_json::to_string(e) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => true,
    }
}
