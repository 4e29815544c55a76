//! tokio `AsyncRead`/`AsyncWrite` over owned-buffer completion I/O (tokio-uring or compio, see
//! [`CompletionStream`]), for crates that need those traits (h2). The rules (docs/ARCHITECTURE.md, "L7 I/O model"):
//!
//! - One in-flight read and one in-flight write op live *inside* the adapter. A `poll_*` call
//!   polls the op it finds there; it never creates a new op while one is in flight. (An op
//!   future created per poll and dropped on `Pending` would never complete, and dropping an
//!   in-flight read loses the bytes the kernel may already have put in its buffer.)
//! - Reads complete into the adapter's owned buffer; `poll_read` copies out of it. Bytes that
//!   arrive while the caller is not polling stay in the op and are delivered on the next poll.
//! - A write is accepted by copying into the adapter's owned buffer and returning `Ready(n)`:
//!   a caller that got `Pending` may legitimately offer different bytes on the next call (h2
//!   does), so bytes are only ever taken, never "half submitted".
//! - The buffer is submitted on `poll_flush`, or when it is full; while it is in flight, new
//!   writes fill a second buffer. Order is kept: at most one write op is in flight.
//! - Flush comes in two flavours ([`Flush`]): `Strict` returns `Ready` once the kernel has
//!   completed the write (what tokio's `TcpStream` gives, where a write is a syscall);
//!   `WriteBehind` returns `Ready` once the buffer is submitted (in the ring, owned by the op),
//!   and waits only for the *previous* write: a flush then costs no round trip through the
//!   ring, and an error of a write-behind op is returned by the next write, flush or shutdown.
//!   `poll_shutdown` always waits for every write to complete before sending FIN.
//! - Dropping the adapter with ops in flight is safe: the runtime keeps the buffers alive until
//!   the kernel completes them; only a connection being torn down drops it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A handle to a connected stream on a completion runtime; clones share the socket. Each op
/// takes its own handle and the buffer, so the future is `'static` and can live in the adapter.
pub trait CompletionStream: Clone + 'static {
    /// Reads into `buf` from its start (`buf` is empty); on return `buf.len()` is the count.
    fn read_op(self, buf: Vec<u8>) -> impl Future<Output = (io::Result<usize>, Vec<u8>)> + 'static;
    /// Writes all of `buf`.
    fn write_op(self, buf: Vec<u8>) -> impl Future<Output = (io::Result<()>, Vec<u8>)> + 'static;
    fn shutdown_write(&self) -> io::Result<()>;
}

/// tokio-uring's stream behind an `Rc`.
#[derive(Clone)]
pub struct Uring(pub Rc<tokio_uring::net::TcpStream>);

impl CompletionStream for Uring {
    fn read_op(self, buf: Vec<u8>) -> impl Future<Output = (io::Result<usize>, Vec<u8>)> + 'static {
        async move { self.0.read(buf).await }
    }
    fn write_op(self, buf: Vec<u8>) -> impl Future<Output = (io::Result<()>, Vec<u8>)> + 'static {
        async move { self.0.write_all(buf).await }
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Write)
    }
}

/// compio's stream (its clones share the socket).
impl CompletionStream for compio::net::TcpStream {
    fn read_op(mut self, buf: Vec<u8>) -> impl Future<Output = (io::Result<usize>, Vec<u8>)> + 'static {
        async move {
            let compio::BufResult(r, buf) = compio::io::AsyncRead::read(&mut self, buf).await;
            (r, buf)
        }
    }
    fn write_op(mut self, buf: Vec<u8>) -> impl Future<Output = (io::Result<()>, Vec<u8>)> + 'static {
        async move {
            let compio::BufResult(r, buf) = compio::io::AsyncWriteExt::write_all(&mut self, buf).await;
            (r, buf)
        }
    }
    fn shutdown_write(&self) -> io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // Borrow the fd as a std stream for the (synchronous) shutdown(2), without closing it.
        let std = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(self.as_raw_fd()) });
        std.shutdown(std::net::Shutdown::Write)
    }
}

const READ_BUF: usize = 16 * 1024;
const WRITE_BUF: usize = 16 * 1024;

type ReadOp = Pin<Box<dyn Future<Output = (io::Result<usize>, Vec<u8>)>>>;
type WriteOp = Pin<Box<dyn Future<Output = (io::Result<()>, Vec<u8>)>>>;

// Nothing in the adapter is pinned structurally: ops are boxed, `S` is only cloned.
impl<S> Unpin for CompletionIo<S> {}

/// What `poll_flush` waits for (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    Strict,
    WriteBehind,
}

pub struct CompletionIo<S> {
    stream: S,
    flush: Flush,
    /// Bytes read and not yet handed out: `rbuf[rpos..]`.
    rbuf: Vec<u8>,
    rpos: usize,
    read_op: Option<ReadOp>,
    /// Bytes accepted and not yet submitted.
    wbuf: Vec<u8>,
    write_op: Option<WriteOp>,
    /// The buffer of the last completed write, reused for the next one.
    spare: Vec<u8>,
}

impl<S: CompletionStream> CompletionIo<S> {
    pub fn new(stream: S, flush: Flush) -> Self {
        CompletionIo {
            stream,
            flush,
            rbuf: Vec::new(),
            rpos: 0,
            read_op: None,
            wbuf: Vec::with_capacity(WRITE_BUF),
            write_op: None,
            spare: Vec::new(),
        }
    }

    /// Polls the in-flight write, if any, to completion; its buffer becomes the spare.
    fn poll_write_op(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(op) = self.write_op.as_mut() {
            let (r, mut buf) = ready!(op.as_mut().poll(cx));
            self.write_op = None;
            buf.clear();
            self.spare = buf;
            r?;
        }
        Poll::Ready(Ok(()))
    }

    /// Submits `wbuf` (the caller made sure no write is in flight) and polls the op once, so
    /// it is in the ring and our waker is registered.
    fn submit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        debug_assert!(self.write_op.is_none());
        let mut next = std::mem::take(&mut self.spare);
        if next.capacity() == 0 {
            next.reserve(WRITE_BUF);
        }
        let buf = std::mem::replace(&mut self.wbuf, next);
        self.write_op = Some(Box::pin(self.stream.clone().write_op(buf)));
        self.poll_write_op(cx)
    }
}

impl<S: CompletionStream> CompletionIo<S> {
    /// Every accepted byte written and completed.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_write_op(cx))?;
            if self.wbuf.is_empty() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.submit(cx))?;
        }
    }
}

impl<S: CompletionStream> AsyncRead for CompletionIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.rpos < this.rbuf.len() {
                let n = out.remaining().min(this.rbuf.len() - this.rpos);
                out.put_slice(&this.rbuf[this.rpos..this.rpos + n]);
                this.rpos += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_op.is_none() {
                let mut buf = std::mem::take(&mut this.rbuf);
                buf.clear();
                if buf.capacity() == 0 {
                    buf.reserve(READ_BUF);
                }
                this.read_op = Some(Box::pin(this.stream.clone().read_op(buf)));
            }
            let (r, buf) = ready!(this.read_op.as_mut().unwrap().as_mut().poll(cx));
            this.read_op = None;
            this.rbuf = buf;
            this.rpos = 0;
            match r {
                Ok(0) => return Poll::Ready(Ok(())), // end of stream
                Ok(_) => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: CompletionStream> AsyncWrite for CompletionIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            let room = WRITE_BUF.saturating_sub(this.wbuf.len());
            if room > 0 || data.is_empty() {
                let n = room.min(data.len());
                this.wbuf.extend_from_slice(&data[..n]);
                return Poll::Ready(Ok(n));
            }
            // Full: wait for the write in flight (if any), then submit this buffer.
            ready!(this.poll_write_op(cx))?;
            if let Poll::Ready(Err(e)) = this.submit(cx) {
                return Poll::Ready(Err(e));
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            let room = WRITE_BUF.saturating_sub(this.wbuf.len());
            if room > 0 || bufs.iter().all(|b| b.is_empty()) {
                let mut taken = 0;
                for b in bufs {
                    let n = (room - taken).min(b.len());
                    this.wbuf.extend_from_slice(&b[..n]);
                    taken += n;
                    if taken == room {
                        break;
                    }
                }
                return Poll::Ready(Ok(taken));
            }
            ready!(this.poll_write_op(cx))?;
            if let Poll::Ready(Err(e)) = this.submit(cx) {
                return Poll::Ready(Err(e));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.flush == Flush::Strict {
            return this.poll_drain(cx);
        }
        // Write-behind: wait for the previous write only if there is something new to submit.
        if this.wbuf.is_empty() {
            // Poll the op in flight (if any) so its error, if it failed, is not delayed further.
            if let Poll::Ready(Err(e)) = this.poll_write_op(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_op(cx))?;
        match this.submit(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Poll::Ready(self.stream.shutdown_write())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// 1 MiB written through the adapter in uneven pieces with flushes in between arrives whole
    /// and in order; 1 MiB sent by the peer is read back whole through small reads; shutdown
    /// sends FIN only after every write completed. Both flush flavours, on tokio-uring.
    #[test]
    fn bytes_arrive_whole_and_in_order() {
        for flush in [Flush::Strict, Flush::WriteBehind] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let data = pattern(1 << 20);
            let peer_data = data.clone();
            let peer = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut w = s.try_clone().unwrap();
                let to_send = peer_data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&to_send).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == peer_data, "bytes written through the adapter differ");
            });
            tokio_uring::start(async move {
                let stream = tokio_uring::net::TcpStream::connect(addr).await.unwrap();
                let mut io = CompletionIo::new(Uring(Rc::new(stream)), flush);
                let mut sent = 0;
                let mut step = 1;
                while sent < data.len() {
                    let end = (sent + step).min(data.len());
                    io.write_all(&data[sent..end]).await.unwrap();
                    if step % 3 == 0 {
                        io.flush().await.unwrap();
                    }
                    sent = end;
                    step = step * 2 % 40_000 + 1;
                }
                let mut back = Vec::new();
                let mut chunk = [0u8; 777];
                loop {
                    let n = io.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    back.extend_from_slice(&chunk[..n]);
                }
                assert!(back == data, "bytes read through the adapter differ");
                io.shutdown().await.unwrap();
            });
            peer.join().unwrap();
        }
    }
}
