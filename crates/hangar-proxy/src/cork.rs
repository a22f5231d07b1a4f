//! Corked writes for the connections hyper serves.
//!
//! hyper flushes often: its HTTP/2 server writes and flushes every DATA frame of a response
//! body on its own, so ten answers ready together cost ten writes (and, under TLS, ten records).
//! [`cork`] puts a buffer under hyper: what hyper writes and flushes while the connection's task
//! is polled is kept, and [`Cork::poll_uncork`] writes it out in one write when that poll ends
//! (see `http::serve_connection`), as an event loop that writes what it has before it waits.
//! Nothing waits longer than the poll that produced it, and large writes go straight through.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes kept: beyond, hyper's writes wait for the buffer to go out (backpressure), and
/// a write as large goes straight through.
const CORK_MAX: usize = 64 * 1024;

struct State<I> {
    io: I,
    buf: Vec<u8>,
    /// How much of `buf` is written already.
    pos: usize,
    /// Whether flushes wait for [`Cork::poll_uncork`].
    corked: bool,
    /// Bytes went to `io` since its last flush (TLS may still hold some).
    unflushed: bool,
    /// An error of a write made by [`Cork::poll_uncork`], for hyper's next call.
    error: Option<io::Error>,
}

impl<I: AsyncWrite + Unpin> State<I> {
    fn kept(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Write out what is kept.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        while self.pos < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
            self.unflushed = true;
        }
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_drain_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// The stream hyper serves: reads pass through, writes are kept until the poll ends.
pub(crate) struct Corked<I>(Arc<Mutex<State<I>>>);

/// The connection task's handle on a [`Corked`] stream.
pub(crate) struct Cork<I>(Arc<Mutex<State<I>>>);

/// Wrap `io`; the [`Cork`] writes out what the [`Corked`] stream kept.
pub(crate) fn cork<I>(io: I) -> (Cork<I>, Corked<I>) {
    let state =
        Arc::new(Mutex::new(State { io, buf: Vec::new(), pos: 0, corked: true, unflushed: false, error: None }));
    (Cork(state.clone()), Corked(state))
}

fn lock<I>(state: &Mutex<State<I>>) -> MutexGuard<'_, State<I>> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl<I: AsyncWrite + Unpin> Cork<I> {
    /// Write out and flush what was kept. Pending leaves the task's waker with the stream; an
    /// error is kept for hyper's next read, write or flush, and the task woken to make one.
    pub(crate) fn poll_uncork(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.0);
        if st.kept() == 0 && !st.unflushed {
            return Poll::Ready(Ok(()));
        }
        match ready!(st.poll_drain_flush(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let kind = e.kind();
                st.error = Some(e);
                cx.waker().wake_by_ref();
                Poll::Ready(Err(kind.into()))
            }
        }
    }

    /// Stop keeping writes: from now on every write and flush goes straight out (what an
    /// upgraded connection's tunnel writes after the connection's task is gone).
    pub(crate) fn open(&self) {
        lock(&self.0).corked = false;
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Corked<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.0);
        if let Some(e) = st.error.take() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut st.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Corked<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut st = lock(&self.0);
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !st.corked || st.kept() + len > CORK_MAX {
            ready!(st.poll_drain(cx))?;
            if !st.corked || len > CORK_MAX {
                st.unflushed = true;
                return Pin::new(&mut st.io).poll_write_vectored(cx, bufs);
            }
        } else if let Some(e) = st.error.take() {
            return Poll::Ready(Err(e));
        }
        for b in bufs {
            st.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.0);
        if st.corked {
            // Written out when the connection's task ends this poll.
            return match st.error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Ready(Ok(())),
            };
        }
        st.poll_drain_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.0);
        ready!(st.poll_drain_flush(cx))?;
        Pin::new(&mut st.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn kept_until_uncorked_then_straight_through() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (cork, mut w) = cork(a);
        w.write_all(b"one ").await.unwrap();
        w.flush().await.unwrap();
        w.write_all(b"two").await.unwrap();
        let mut got = [0u8; 16];
        // Nothing left yet.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut got)).await.is_err());
        std::future::poll_fn(|cx| cork.poll_uncork(cx)).await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"one two");
        // Large writes are not copied.
        let big = vec![7u8; CORK_MAX + 1];
        w.write_all(&big).await.unwrap();
        let mut back = vec![0u8; big.len()];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(back, big);
        // Open: flushes write out.
        w.write_all(b"x").await.unwrap();
        cork.open();
        w.write_all(b"y").await.unwrap();
        w.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"xy");
        w.shutdown().await.unwrap();
        assert_eq!(b.read(&mut got).await.unwrap(), 0);
    }
}
