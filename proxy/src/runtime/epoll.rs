//! The epoll backend (tokio's reactor), for where io_uring is blocked. It emulates the
//! owned-buffer interface: a read waits for readiness and then reads, so it never holds the
//! kernel to a buffer and every read is cancel-safe.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use super::{Backend, Listener, Runtime, Stream};

/// The epoll backend.
pub struct Epoll;

/// Runs `future` to completion on a new current-thread tokio runtime on this thread.
pub(super) fn block_on<F: Future<Output = ()>>(future: F) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&rt, future);
    Ok(())
}

impl Runtime for Epoll {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;
    const BACKEND: Backend = Backend::Epoll;

    fn listener(std: std::net::TcpListener) -> io::Result<Self::Listener> {
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }
}

impl Stream for tokio::net::TcpStream {
    fn into_tokio(self) -> io::Result<tokio::net::TcpStream> {
        Ok(self)
    }

    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        let result = self.read_ready(&mut buf).await;
        (result, buf)
    }

    async fn read_ready(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        if buf.spare_capacity_mut().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read into a full buffer",
            ));
        }
        loop {
            self.readable().await?;
            match self.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return result,
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut written = 0;
        while written < buf.len() {
            if let Err(e) = self.writable().await {
                return (Err(e), buf);
            }
            match self.try_write(&buf[written..]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn write_all_vectored(&self, bufs: Vec<Vec<u8>>) -> (io::Result<()>, Vec<Vec<u8>>) {
        let total: usize = bufs.iter().map(Vec::len).sum();
        let mut written = 0;
        while written < total {
            if let Err(e) = self.writable().await {
                return (Err(e), bufs);
            }
            // The slices still to send, starting `written` bytes in.
            let mut skip = written;
            let slices: Vec<io::IoSlice<'_>> = bufs
                .iter()
                .filter_map(|b| {
                    if skip >= b.len() {
                        skip -= b.len();
                        None
                    } else {
                        let s = io::IoSlice::new(&b[skip..]);
                        skip = 0;
                        Some(s)
                    }
                })
                .collect();
            match self.try_write_vectored(&slices) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), bufs),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (Err(e), bufs),
            }
        }
        (Ok(()), bufs)
    }
}
