//! Owned-buffer I/O for L7, on tokio's readiness reactor (the L7 I/O decision in
//! docs/ARCHITECTURE.md): bytes are read into the connection's own `Vec`, parsed there in
//! place (httparse takes `&[u8]`), and written from it — no copy into a second buffer, no
//! AsyncRead shim. An idle keep-alive connection holds no buffer at all.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::runtime::Stream;

/// How long, and how much, a connection closed after an error response keeps reading.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// How much is read at a time: large enough for a typical head and a slice of body.
const READ_SIZE: usize = 16 * 1024;

/// Moves an accepted stream of either backend onto tokio's reactor. On epoll it already is;
/// an io_uring stream's descriptor is duplicated (the completion side closes the original),
/// so both backends serve L7 the same way on the same worker.
pub fn to_tokio<S: Stream>(stream: S) -> io::Result<TcpStream> {
    // SAFETY: the descriptor belongs to `stream`, alive for the call.
    let fd = nix::unistd::dup(unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) })?;
    drop(stream);
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

/// A TCP connection with a read buffer whose unconsumed bytes are `buffered()`.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` before `pos` have been consumed.
    pos: usize,
    /// Bytes read from the socket (prefix excluded), for telemetry.
    pub read_total: u64,
    /// After this instant the connection is not reused (`maxConnectionDuration`).
    retire_at: Option<Instant>,
}

impl Conn {
    /// `prefix`: bytes already read from the stream (detection), parsed as if just read.
    pub fn new(stream: TcpStream, prefix: Vec<u8>) -> Self {
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            buf: prefix,
            pos: 0,
            read_total: 0,
            retire_at: None,
        }
    }

    /// Retires the connection from reuse `max_age` from now (DestinationRule
    /// `connectionPool.tcp.maxConnectionDuration`).
    pub fn retire_after(&mut self, max_age: std::time::Duration) {
        self.retire_at = Some(Instant::now() + max_age);
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        debug_assert!(self.pos <= self.buf.len());
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Reads more bytes after those buffered. `Ok(0)`: the peer closed its side.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        self.read_total += n as u64;
        Ok(n)
    }

    /// [`Conn::fill`], or `None` at `deadline`. Cancel-safe: tokio's `read_buf` on a socket
    /// reads nothing unless it completes.
    pub async fn fill_until(&mut self, deadline: Instant) -> Option<io::Result<usize>> {
        tokio::time::timeout_at(deadline.into(), self.fill())
            .await
            .ok()
    }

    /// Waits for the peer to send something while holding no buffer: what a keep-alive
    /// connection does between requests.
    pub async fn idle(&mut self) -> io::Result<()> {
        if self.buffered().is_empty() {
            self.buf = Vec::new();
            self.pos = 0;
            self.stream.readable().await?;
        }
        Ok(())
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(&mut self.stream, bytes).await
    }

    /// Writes the first `n` buffered bytes to `to` and consumes them: body bytes go from one
    /// connection's buffer straight to the other socket.
    pub async fn pass(&mut self, n: usize, to: &mut Conn) -> io::Result<()> {
        let end = self.pos + n;
        AsyncWriteExt::write_all(&mut to.stream, &self.buf[self.pos..end]).await?;
        self.consume(n);
        Ok(())
    }

    /// Whether a pooled, idle connection is still usable: nothing unexpected to read and the
    /// peer has not closed it.
    pub fn is_reusable(&self) -> bool {
        if !self.buffered().is_empty() || self.retire_at.is_some_and(|t| Instant::now() >= t) {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
    }

    /// Closes after an error response without losing it: a close with unread input sends
    /// RST, which can destroy the response in the client's receive queue before it is read.
    /// So: FIN first, then read and drop what the client still sends, for a short while.
    pub async fn linger_close(&mut self) {
        self.shutdown_write();
        let deadline = Instant::now() + LINGER;
        let mut read = 0usize;
        while read < LINGER_BYTES {
            self.buf.clear();
            self.pos = 0;
            match self.fill_until(deadline).await {
                Some(Ok(n)) if n > 0 => read += n,
                _ => break,
            }
        }
    }

    /// Makes the coming close a reset: how a broken exchange is passed on.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
    }

    /// Bytes both ways between this connection and `other` until either closes (a tunnel).
    pub async fn copy_bidirectional(&mut self, other: &mut TcpStream) -> io::Result<(u64, u64)> {
        tokio::io::copy_bidirectional(&mut self.stream, other).await
    }

    /// Bytes buffered (for the memory gauge).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let mut buf = self.buf;
        buf.drain(..self.pos);
        (self.stream, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_retired_or_closed_connection_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        let mut conn = Conn::new(client.unwrap(), Vec::new());
        assert!(conn.is_reusable());
        conn.retire_after(std::time::Duration::from_secs(3600));
        assert!(conn.is_reusable(), "retired before its time");
        conn.retire_after(std::time::Duration::ZERO);
        assert!(!conn.is_reusable(), "reused past maxConnectionDuration");
        let fresh = {
            let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
            drop(accepted.unwrap());
            Conn::new(client.unwrap(), Vec::new())
        };
        // The server closed it: seen as soon as the FIN is in.
        fresh.stream.readable().await.unwrap();
        assert!(!fresh.is_reusable(), "a connection the server closed");
        drop(server);
    }
}
