//! The io_uring backend (tokio-uring 0.5). Reads and writes are completion operations on
//! owned buffers; readiness waits (for reads that may be abandoned) go through tokio's
//! reactor, which tokio-uring runs underneath.

use std::cell::OnceCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_uring::buf::BoundedBuf;

use super::{Backend, Listener, Runtime, Stream};

/// The io_uring backend.
pub struct Uring;

/// A tokio-uring stream, plus a readiness registration made the first time a cancel-safe read
/// is needed (most connections never need one).
pub struct UringStream {
    // Declared first: deregistered from epoll before the socket is closed.
    ready: OnceCell<AsyncFd<Fd>>,
    inner: tokio_uring::net::TcpStream,
}

/// The socket's descriptor as epoll sees it; owned (and closed) by `UringStream::inner`.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Ring setup for a worker. COOP_TASKRUN: completions are processed when the worker next
/// enters the kernel instead of interrupting it (no IPI per completion from the CPU that took
/// the packet); SINGLE_ISSUER: only the worker thread submits, letting the kernel skip locking.
fn builder() -> tokio_uring::Builder {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_coop_taskrun().setup_single_issuer();
    let mut builder = tokio_uring::builder();
    builder.uring_builder(&ring);
    builder
}

/// Creates (and drops) a ring: the same `io_uring_setup` the workers will make, so seccomp's
/// EPERM or ENOSYS and `io_uring_disabled` show up here rather than in a worker.
pub(super) fn probe() -> io::Result<()> {
    tokio_uring::Runtime::new(&builder()).map(drop)
}

/// Runs `future` to completion on a new ring on this thread.
pub(super) fn block_on<F: Future<Output = ()>>(future: F) -> io::Result<()> {
    let rt = tokio_uring::Runtime::new(&builder())?;
    rt.block_on(future);
    Ok(())
}

impl Runtime for Uring {
    type Stream = UringStream;
    type Listener = tokio_uring::net::TcpListener;
    const BACKEND: Backend = Backend::IoUring;

    fn listener(std: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(std))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio_uring::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(UringStream::new(stream))
    }
}

impl Listener for tokio_uring::net::TcpListener {
    type Stream = UringStream;

    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio_uring::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok((UringStream::new(stream), peer))
    }
}

impl UringStream {
    fn new(inner: tokio_uring::net::TcpStream) -> Self {
        UringStream {
            ready: OnceCell::new(),
            inner,
        }
    }

    fn registration(&self) -> io::Result<&AsyncFd<Fd>> {
        if let Some(fd) = self.ready.get() {
            return Ok(fd);
        }
        // SAFETY: the descriptor is `inner`'s, which is open for as long as this stream
        // exists, and the registration (declared first) is dropped before `inner`.
        let fd = unsafe {
            AsyncFd::register_with_interest(Fd(self.inner.as_raw_fd()), Interest::READABLE)?
        };
        Ok(self.ready.get_or_init(|| fd))
    }
}

impl AsRawFd for UringStream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Stream for UringStream {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        self.inner.read(buf).await
    }

    async fn read_ready(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let registration = self.registration()?;
        loop {
            let mut guard = registration.readable().await?;
            // A synchronous, non-blocking recv: nothing is in flight when this future is
            // dropped at the await above.
            match guard.try_io(|fd| recv_nonblocking(fd.get_ref().0, buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        self.inner.write_all(buf).await
    }

    async fn write_all_vectored(&self, bufs: Vec<Vec<u8>>) -> (io::Result<()>, Vec<Vec<u8>>) {
        let total: usize = bufs.iter().map(Vec::len).sum();
        let (written, bufs) = self.inner.writev(bufs).await;
        let mut written = match written {
            Ok(n) if n == total => return (Ok(()), bufs),
            Ok(n) => n,
            Err(e) => return (Err(e), bufs),
        };
        // A short writev (full socket buffer): finish each remaining piece in order.
        let mut done = Vec::with_capacity(bufs.len());
        let mut result = Ok(());
        for buf in bufs {
            let skip = written.min(buf.len());
            written -= skip;
            if skip == buf.len() || result.is_err() {
                done.push(buf);
                continue;
            }
            let (r, slice) = self.inner.write_all(buf.slice(skip..)).await;
            result = r;
            done.push(slice.into_inner());
        }
        (result, done)
    }
}

/// `recv(MSG_DONTWAIT)` into `buf`'s spare capacity.
pub(super) fn recv_nonblocking(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    if spare.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "read into a full buffer",
        ));
    }
    // SAFETY: recv writes at most `spare.len()` bytes into memory we own and have not
    // initialised; `set_len` then covers exactly the bytes it wrote.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
