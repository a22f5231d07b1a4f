//! The server's log set-up: the console (stderr), the in-memory ring behind `/logs`,
//! `/logs/stream` and `system_logs` events, and, with `LOG_TO_FILE`, the file `hangar.log`.
//! All three get the same lines through the same filter (`LOG_LEVEL`) and format
//! (`LOG_FORMAT`), so the ring and the file hold nothing the console does not.
//! With `OTEL_EXPORTER_OTLP_ENDPOINT`, the spans that pass the same filter (requests, VM
//! commands and creates, transfers, ...) are also exported as traces over OTLP/HTTP
//! (protobuf) by a batch span processor running on the server's tokio runtime; [`shutdown`]
//! flushes it.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};
use hangar_core::{Event, EventBus, EventType, LogRing};
use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Layer, Registry};

use crate::settings::{LogFormat, LogSettings, OtlpSettings};

static RING: OnceLock<LogRing> = OnceLock::new();
/// The OTLP trace pipeline, when `OTEL_EXPORTER_OTLP_ENDPOINT` set one up.
static TRACES: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// The process's log ring (empty until [`init`] feeds it).
pub fn ring() -> LogRing {
    RING.get_or_init(LogRing::default).clone()
}

/// Writes one formatted event into the ring when dropped.
struct RingWriter {
    ring: LogRing,
    level: &'static str,
    buf: Vec<u8>,
}

impl Write for RingWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RingWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        for line in text.lines() {
            self.ring.push(self.level, line);
        }
    }
}

#[derive(Clone)]
struct MakeRing(LogRing);

impl<'a> MakeWriter<'a> for MakeRing {
    type Writer = RingWriter;
    fn make_writer(&'a self) -> RingWriter {
        RingWriter { ring: self.0.clone(), level: "INFO", buf: Vec::new() }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> RingWriter {
        RingWriter { ring: self.0.clone(), level: meta.level().as_str(), buf: Vec::new() }
    }
}

type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

fn layer<W>(format: LogFormat, ansi: bool, w: W) -> Boxed
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let l = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(w);
    match format {
        LogFormat::Json => l.json().boxed(),
        LogFormat::Text => l.boxed(),
    }
}

/// The tracing-opentelemetry layer exporting spans to `o`'s collector. Must run inside the
/// tokio runtime: the batch processor's task is spawned on it (the async reqwest client the
/// exporter uses needs its reactor).
fn otlp_layer(o: &OtlpSettings) -> Result<Boxed> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;

    let headers = o.headers.iter().map(|(name, value)| (name.clone(), value.expose().to_string())).collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(o.traces_url.as_str())
        .with_headers(headers)
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: cannot set up the OTLP trace exporter")?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build())
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(o.service_name.clone()).build())
        .build();
    let tracer = provider.tracer("hangar");
    if TRACES.set(provider).is_err() {
        anyhow::bail!("the OTLP trace exporter is already set up");
    }
    Ok(tracing_opentelemetry::layer().with_tracer(tracer).boxed())
}

/// Export the spans still buffered and stop the OTLP pipeline (graceful shutdown); waits
/// at most `limit` for the collector. Does nothing without `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub async fn shutdown(limit: std::time::Duration) {
    let Some(provider) = TRACES.get().cloned() else { return };
    // The SDK's shutdown blocks until the processor task (on this runtime) has exported:
    // call it from a thread of its own, and do not wait for it past the limit.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(provider.shutdown());
    });
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Ok(()))) => tracing::debug!("OTLP traces flushed"),
        Ok(Ok(Err(e))) => tracing::warn!("OTLP trace export: flushing at shutdown failed: {e}"),
        Ok(Err(_)) => tracing::warn!("OTLP trace export: flushing at shutdown failed"),
        Err(_) => tracing::warn!("OTLP trace export: the collector did not take the last spans within {limit:?}"),
    }
}

/// Install the subscriber for `hangar serve`.
pub fn init(log: &LogSettings) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.filter)
        .with_context(|| format!("LOG_LEVEL={:?} is not a tracing filter", log.filter))?;
    use std::io::IsTerminal;
    let ring = ring();
    let mut layers: Vec<Boxed> = vec![
        layer(log.format, std::io::stderr().is_terminal(), std::io::stderr),
        layer(log.format, false, MakeRing(ring.clone())),
    ];
    if let Some(path) = &log.file {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("LOG_FILE_PATH: cannot create the folder {}", dir.display()))?;
        }
        let mut open = std::fs::OpenOptions::new();
        open.create(true).append(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
        let file = open.open(path).with_context(|| format!("LOG_TO_FILE: cannot open {}", path.display()))?;
        ring.set_file(path);
        layers.push(layer(log.format, false, Mutex::new(file)));
    }
    if let Some(o) = &log.otlp {
        layers.push(otlp_layer(o)?);
    }
    tracing_subscriber::registry().with(layers).with(filter).init();
    if let Some(o) = &log.otlp {
        tracing::info!(endpoint = %o.traces_url, service = %o.service_name, "exporting traces over OTLP/HTTP");
    }
    Ok(())
}

/// Publish every new log line as a `system_logs` event (`System Log`, body
/// `{level, message, time}`) while a stream wants them; the event type is readable only by
/// callers allowed to read logs.
pub fn publish_system_logs(bus: EventBus) {
    let mut rx = ring().subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                // Only while a stream wants them: log lines must not crowd the bus (a full
                // bus makes slow streams drop events).
                Ok(_) if !bus.wanted(EventType::SystemLogs) => {}
                Ok(entry) => {
                    let body = serde_json::to_value(&entry).unwrap_or_default();
                    bus.publish(Event::new(EventType::SystemLogs, "System Log", body));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}
