//! OTLP trace export on the real binary: `hangar serve` with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at a receiver on loopback (an axum server in this test that takes
//! `POST /v1/traces` in `application/x-protobuf` and decodes it with `opentelemetry-proto`).
//! Request spans arrive with their method, path and status and the service name `hangar`,
//! `OTEL_EXPORTER_OTLP_HEADERS` reach the receiver, a graceful shutdown flushes the spans
//! still buffered, and no span, attribute or event (nor the log) holds the root password,
//! the bearer token or the header's value.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use reqwest::Method;

/// One span as received: its service, name, attributes and events (name, attributes).
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    attributes: BTreeMap<String, String>,
    events: Vec<(String, BTreeMap<String, String>)>,
}

impl Received {
    /// Every text the span carries, to look for secrets in.
    fn texts(&self) -> Vec<&str> {
        let mut out = vec![self.service.as_str(), self.name.as_str()];
        for (k, v) in &self.attributes {
            out.extend([k.as_str(), v.as_str()]);
        }
        for (name, attrs) in &self.events {
            out.push(name);
            for (k, v) in attrs {
                out.extend([k.as_str(), v.as_str()]);
            }
        }
        out
    }
}

#[derive(Default)]
struct Receiver {
    spans: Vec<Received>,
    /// The value of the `x-otlp-test` header of every export.
    header_values: Vec<String>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

/// The receiver: its base URL and what it got.
async fn receiver() -> (String, Arc<Mutex<Receiver>>) {
    let got = Arc::new(Mutex::new(Receiver::default()));
    let state = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let got = state.clone();
            async move {
                let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                if ct != "application/x-protobuf" {
                    return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                }
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return (StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut got = got.lock().unwrap();
                if let Some(v) = headers.get("x-otlp-test").and_then(|v| v.to_str().ok()) {
                    got.header_values.push(v.to_string());
                }
                for rs in req.resource_spans {
                    let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
                    let service = resource.get("service.name").cloned().unwrap_or_default();
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            got.spans.push(Received {
                                service: service.clone(),
                                name: span.name,
                                attributes: attributes(&span.attributes),
                                events: span
                                    .events
                                    .iter()
                                    .map(|e| (e.name.clone(), attributes(&e.attributes)))
                                    .collect(),
                            });
                        }
                    }
                }
                (StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

/// The request span of `method path`, when it has arrived.
fn request_span(got: &Mutex<Receiver>, method: &str, path: &str) -> Option<Received> {
    got.lock()
        .unwrap()
        .spans
        .iter()
        .find(|s| {
            s.name == "request"
                && s.attributes.get("method").map(String::as_str) == Some(method)
                && s.attributes.get("path").map(String::as_str) == Some(path)
        })
        .cloned()
}

/// The `status` the span's "request done" event recorded.
fn status_of(span: &Received) -> Option<String> {
    span.events.iter().find_map(|(_, attrs)| attrs.get("status").cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_are_exported_over_otlp_without_secrets() {
    let (endpoint, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    // The header goes through Hangar's own configuration (`--set`), the endpoint through the
    // standard environment variable.
    let header_secret = "otlp-header-s3cret";
    let mut server = Server::start_full(
        dir.path(),
        &[("OTEL_EXPORTER_OTLP_HEADERS", &format!("x-otlp-test={header_secret}%20v"))],
        true,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    );
    let c = client();

    let token = login(&c, &server, "root", ROOT_PASSWORD).await;
    let (st, _) = call(&c, Method::GET, &server.api("/auth/users"), &Auth::Bearer(token.clone()), None, &[]).await;
    assert_eq!(st, 200);
    let (st, _) = call(&c, Method::GET, &server.api("/no-such-route"), &Auth::Bearer(token.clone()), None, &[]).await;
    assert_eq!(st, 404);

    // The batch processor exports every OTEL_BSP_SCHEDULE_DELAY (5 s by default; the SDK
    // skips the first tick, so the first export comes after 10 s).
    wait_for("the request spans at the receiver", Duration::from_secs(30), || async {
        request_span(&got, "POST", "/api/v1/auth/token").is_some()
            && request_span(&got, "GET", "/api/v1/no-such-route").is_some()
            && request_span(&got, "GET", "/api/v1/auth/users").is_some()
    })
    .await;
    let login_span = request_span(&got, "POST", "/api/v1/auth/token").unwrap();
    assert_eq!(login_span.service, "hangar", "{login_span:?}");
    assert!(login_span.attributes.contains_key("request_id"), "{login_span:?}");
    assert_eq!(status_of(&login_span).as_deref(), Some("200"), "{login_span:?}");
    let missing = request_span(&got, "GET", "/api/v1/no-such-route").unwrap();
    assert_eq!(status_of(&missing).as_deref(), Some("404"), "{missing:?}");
    let users = request_span(&got, "GET", "/api/v1/auth/users").unwrap();
    assert_eq!(users.attributes.get("user").map(String::as_str), Some("root"), "the caller: {users:?}");
    assert!(
        got.lock().unwrap().header_values.iter().all(|v| v == &format!("{header_secret} v")),
        "OTEL_EXPORTER_OTLP_HEADERS, percent-decoded, goes with every export"
    );

    // A graceful stop exports what is still buffered: this request's span arrives by the
    // time the process has exited, before the next scheduled export.
    let (st, _) = call(&c, Method::GET, &server.api("/flushed-at-shutdown"), &Auth::None, None, &[]).await;
    assert_eq!(st, 404);
    let status = tokio::task::block_in_place(|| server.stop());
    assert!(status.success(), "hangar stopped with {status}: {}", server.log());
    assert!(
        request_span(&got, "GET", "/api/v1/flushed-at-shutdown").is_some(),
        "the span of the last request was not flushed at shutdown"
    );

    let got = got.lock().unwrap();
    assert!(!got.header_values.is_empty());
    for span in &got.spans {
        for t in span.texts() {
            for secret in [ROOT_PASSWORD, token.as_str(), header_secret] {
                assert!(!t.contains(secret), "span {} carries a secret in {t:?}", span.name);
            }
        }
    }
    let log = server.log();
    assert!(log.contains("exporting traces over OTLP"), "{log}");
    assert!(!log.contains(header_secret), "the log holds OTEL_EXPORTER_OTLP_HEADERS: {log}");
}
