//! Raw TCP forwarding with half-close and an idle timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Copy buffers start small (idle interactive connections such as SSH stay cheap) and double
/// while reads fill them, up to `MAX_BUF` for bulk transfers (fewer, larger syscalls).
const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 512 * 1024;

/// The time of the last byte moved, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Copy one direction; at end of input, shut the write side down (half-close) and return.
async fn pump<R, W>(mut r: R, mut w: W, act: &Activity) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MIN_BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // The peer may already be gone; the other direction decides the outcome then.
            let _ = w.shutdown().await;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        act.touch();
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

async fn idle_watch(act: &Activity, idle: Duration) {
    loop {
        let deadline = act.last() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// How a spliced connection ended.
#[derive(Debug)]
pub(crate) enum SpliceEnd {
    /// Both directions reached end of input: bytes client→target, target→client.
    Done(u64, u64),
    /// No byte moved for the idle timeout.
    Idle,
    /// The listener was shut down.
    Cancelled,
}

/// Splice two streams given as read/write halves until both directions end, either errors,
/// nothing moves for `idle`, or `cancel` fires.
pub(crate) async fn splice<CR, CW, TR, TW>(
    (cr, cw): (CR, CW),
    (tr, tw): (TR, TW),
    idle: Duration,
    cancel: &CancellationToken,
) -> io::Result<SpliceEnd>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    TR: AsyncRead + Unpin,
    TW: AsyncWrite + Unpin,
{
    let act = Activity { start: Instant::now(), last_ms: AtomicU64::new(0) };
    let both = async { tokio::try_join!(pump(cr, tw, &act), pump(tr, cw, &act)) };
    tokio::select! {
        r = both => r.map(|(a, b)| SpliceEnd::Done(a, b)),
        _ = idle_watch(&act, idle) => Ok(SpliceEnd::Idle),
        _ = cancel.cancelled() => Ok(SpliceEnd::Cancelled),
    }
}
