//! The server's log set-up: the console (stderr), the in-memory ring behind `/logs`,
//! `/logs/stream` and `system_logs` events, and, with `LOG_TO_FILE`, the file `hangar.log`.
//! All three get the same lines through the same filter (`LOG_LEVEL`) and format
//! (`LOG_FORMAT`), so the ring and the file hold nothing the console does not.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};
use hangar_core::{Event, EventBus, EventType, LogRing};
use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Layer, Registry};

use crate::settings::{LogFormat, LogSettings};

static RING: OnceLock<LogRing> = OnceLock::new();

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
    tracing_subscriber::registry().with(layers).with(filter).init();
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
