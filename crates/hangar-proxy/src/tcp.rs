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

/// Copy two streams given as read/write halves until both directions end, either errors,
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

/// Splice two TCP connections: on Linux through a pipe per direction with `splice(2)` (the bytes
/// never enter user space), elsewhere, or when no pipe can be had, by [`splice`]'s copies. Same
/// ends as [`splice`]: half-close passed on, idle timeout, cancellation.
pub(crate) async fn splice_tcp(
    client: tokio::net::TcpStream,
    target: tokio::net::TcpStream,
    idle: Duration,
    cancel: &CancellationToken,
) -> io::Result<SpliceEnd> {
    #[cfg(target_os = "linux")]
    if let Ok(pipes) = zero_copy::Pipe::new().and_then(|a| Ok((a, zero_copy::Pipe::new()?))) {
        let act = Activity { start: Instant::now(), last_ms: AtomicU64::new(0) };
        let (up, down) = &pipes;
        let ((cr, cw), (tr, tw)) = (client.into_split(), target.into_split());
        let both = async { tokio::try_join!(zero_copy::pump(cr, tw, up, &act), zero_copy::pump(tr, cw, down, &act)) };
        return tokio::select! {
            r = both => r.map(|(a, b)| SpliceEnd::Done(a, b)),
            _ = idle_watch(&act, idle) => Ok(SpliceEnd::Idle),
            _ = cancel.cancelled() => Ok(SpliceEnd::Cancelled),
        };
    }
    splice(client.into_split(), target.into_split(), idle, cancel).await
}

/// `splice(2)` between two sockets through a pipe.
#[cfg(target_os = "linux")]
mod zero_copy {
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};

    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};
    use tokio::io::{AsyncWriteExt, Interest};
    use tokio::net::TcpStream;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    use super::Activity;

    /// The pipe size asked for: large moves per call for bulk transfers. The kernel may give
    /// less (`/proc/sys/fs/pipe-max-size`, per-user pipe limits); its pages are only taken
    /// while bytes are in flight.
    const PIPE_SIZE: i32 = 1 << 20;

    /// A non-blocking pipe and how many bytes it holds at most.
    pub(super) struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
        cap: usize,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ));
            let cap = cap.ok().and_then(|c| usize::try_from(c).ok()).filter(|&c| c > 0).unwrap_or(64 * 1024);
            Ok(Pipe { r, w, cap })
        }
    }

    fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
    }

    /// Move `src`'s bytes to `dst` until `src` ends, then shut `dst`'s write side (half-close).
    /// The pipe is empty each time it is filled, so "would block" on a fill means `src` has
    /// nothing and on a drain that `dst` is full.
    pub(super) async fn pump(
        src: OwnedReadHalf,
        mut dst: OwnedWriteHalf,
        pipe: &Pipe,
        act: &Activity,
    ) -> io::Result<u64> {
        let (s, d): (&TcpStream, &TcpStream) = (src.as_ref(), dst.as_ref());
        let mut total = 0u64;
        loop {
            let n = loop {
                s.readable().await?;
                match s.try_io(Interest::READABLE, || splice(s, &pipe.w, pipe.cap)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // The peer may already be gone; the other direction decides the outcome then.
                let _ = dst.shutdown().await;
                return Ok(total);
            }
            let mut left = n;
            while left > 0 {
                d.writable().await?;
                match d.try_io(Interest::WRITABLE, || splice(&pipe.r, d, left)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(m) => left -= m.min(left),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
            act.touch();
        }
    }
}
