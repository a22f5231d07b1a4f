//! The server's own recent log lines, for `/logs`, `/logs/stream` and `system_logs` events.
//!
//! A [`LogRing`] keeps the last lines in memory (bounded in lines and in bytes) and hands new
//! ones to live readers through a bounded broadcast (a slow reader loses lines, never slows
//! the logger). It is fed by the binary's tracing set-up with the very lines the console gets,
//! so it holds nothing the log itself does not (secrets never reach the log). When the log is
//! also written to a file (`LOG_TO_FILE`), the ring knows that file's path.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// Lines kept by [`LogRing::default`].
pub const DEFAULT_LINES: usize = 2000;
/// Longest line kept; longer ones are cut (marked with `…`).
pub const MAX_LINE_BYTES: usize = 8 * 1024;

#[derive(Debug)]
struct Inner {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
    tx: broadcast::Sender<LogEntry>,
    file: Mutex<Option<PathBuf>>,
}

/// One new line on the live feed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LogEntry {
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The whole formatted line, as the console shows it.
    pub message: String,
    pub time: chrono::DateTime<chrono::Utc>,
}

/// A bounded ring of recent log lines with a live feed. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct LogRing {
    inner: Arc<Inner>,
}

impl Default for LogRing {
    fn default() -> Self {
        LogRing::new(DEFAULT_LINES)
    }
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(256);
        LogRing {
            inner: Arc::new(Inner {
                lines: Mutex::new(VecDeque::new()),
                capacity: capacity.max(1),
                tx,
                file: Mutex::new(None),
            }),
        }
    }

    /// Add one line of `level` (a trailing newline is dropped; an empty line is ignored).
    pub fn push(&self, level: &str, line: &str) {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            return;
        }
        let line = if line.len() > MAX_LINE_BYTES {
            let mut end = MAX_LINE_BYTES;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &line[..end])
        } else {
            line.to_string()
        };
        {
            let mut q = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.inner.capacity {
                q.pop_front();
            }
            q.push_back(line.clone());
        }
        let _ = self.inner.tx.send(LogEntry { level: level.to_string(), message: line, time: chrono::Utc::now() });
    }

    /// The last `limit` lines, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<String> {
        let q = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().skip(q.len().saturating_sub(limit)).cloned().collect()
    }

    /// New lines from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LogEntry> {
        self.inner.tx.subscribe()
    }

    /// Record the file the log is also written to.
    pub fn set_file(&self, path: &Path) {
        *self.inner.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.to_path_buf());
    }

    /// The file the log is also written to, when `LOG_TO_FILE` is on.
    pub fn file(&self) -> Option<PathBuf> {
        self.inner.file.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_feeds_readers() {
        let r = LogRing::new(3);
        let mut rx = r.subscribe();
        for i in 0..5 {
            r.push("INFO", &format!("line {i}\n"));
        }
        r.push("INFO", "\n");
        assert_eq!(r.recent(10), vec!["line 2", "line 3", "line 4"]);
        assert_eq!(r.recent(1), vec!["line 4"]);
        assert_eq!(rx.try_recv().unwrap().message, "line 0");
        let long = "é".repeat(MAX_LINE_BYTES);
        r.push("WARN", &long);
        assert!(r.recent(1)[0].len() <= MAX_LINE_BYTES + 3);
    }
}
