//! The I/O runtime seam. The data path is generic over [`Runtime`]: one implementation on
//! io_uring (tokio-uring) and one on epoll (tokio). tokio-uring has no active maintainer, so
//! nothing outside this module names it; moving to another completion-based runtime (compio)
//! means writing one more impl here.
//!
//! Both runtimes are single-threaded: the proxy runs one per core (thread-per-core), each with
//! its own `SO_REUSEPORT` listeners, and tasks are spawned with `spawn_local`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// Which I/O backend the data path runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// What the operator asked for with `--io-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// io_uring where the kernel and seccomp allow it, else epoll.
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "io_uring is unavailable ({0}); it is blocked by the container runtime's default seccomp \
         profile or by kernel.io_uring_disabled. Use --io-backend auto or epoll"
    )]
    IoUringUnavailable(io::Error),
    #[error("cannot start a worker runtime: {0}")]
    Build(io::Error),
    #[error("cannot spawn worker thread: {0}")]
    Thread(io::Error),
}

/// Resolves the choice against what this kernel and process allow. Returns the backend and,
/// when auto fell back, why.
pub fn select(choice: BackendChoice) -> Result<(Backend, Option<io::Error>), RuntimeError> {
    match choice {
        BackendChoice::Epoll => Ok((Backend::Epoll, None)),
        BackendChoice::IoUring => probe_io_uring()
            .map(|()| (Backend::IoUring, None))
            .map_err(RuntimeError::IoUringUnavailable),
        BackendChoice::Auto => match probe_io_uring() {
            Ok(()) => Ok((Backend::IoUring, None)),
            Err(e) => Ok((Backend::Epoll, Some(e))),
        },
    }
}

/// Creates (and drops) a ring: the same `io_uring_setup` the workers will make, so seccomp's
/// EPERM or ENOSYS and `io_uring_disabled` show up here rather than in a worker.
fn probe_io_uring() -> io::Result<()> {
    tokio_uring::Runtime::new(&uring_builder()).map(drop)
}

/// Ring setup for a worker. COOP_TASKRUN: completions are processed when the worker next
/// enters the kernel instead of interrupting it (no IPI per completion from the CPU that took
/// the packet); SINGLE_ISSUER: only the worker thread submits, letting the kernel skip locking.
fn uring_builder() -> tokio_uring::Builder {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_coop_taskrun().setup_single_issuer();
    let mut builder = tokio_uring::builder();
    builder.uring_builder(&ring);
    builder
}

/// A connected TCP stream with completion-style, owned-buffer I/O (the io_uring model, which
/// epoll can emulate and not the other way round).
#[allow(async_fn_in_trait)]
pub trait Stream: AsRawFd + 'static {
    /// Reads into `buf`'s capacity; on return `buf.len()` is the number of bytes read.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// Sends FIN: the peer sees end of stream, and we may still read.
    fn shutdown_write(&self) -> io::Result<()>;
}

/// A listening socket.
#[allow(async_fn_in_trait)]
pub trait Listener: 'static {
    type Stream: Stream;
    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)>;
}

/// One backend: how to listen and how to dial.
#[allow(async_fn_in_trait)]
pub trait Runtime: 'static {
    type Stream: Stream;
    type Listener: Listener<Stream = Self::Stream>;
    const BACKEND: Backend;
    fn listener(std: std::net::TcpListener) -> io::Result<Self::Listener>;
    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream>;
}

/// Starts `workers` threads, each running one single-threaded runtime of `backend` and the
/// future `make(index)` builds on that thread (so it need not be `Send`).
pub fn start_workers<M, F>(
    backend: Backend,
    workers: usize,
    make: M,
) -> Result<Vec<std::thread::JoinHandle<()>>, RuntimeError>
where
    M: Fn(usize) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = ()> + 'static,
{
    (0..workers)
        .map(|index| {
            let make = make.clone();
            std::thread::Builder::new()
                .name(format!("isthmus-worker-{index}"))
                .spawn(move || match backend {
                    Backend::IoUring => match tokio_uring::Runtime::new(&uring_builder()) {
                        Ok(rt) => rt.block_on(make(index)),
                        Err(e) => tracing::error!(worker = index, "io_uring runtime failed: {e}"),
                    },
                    Backend::Epoll => {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => tokio::task::LocalSet::new().block_on(&rt, make(index)),
                            Err(e) => tracing::error!(worker = index, "epoll runtime failed: {e}"),
                        }
                    }
                })
                .map_err(RuntimeError::Thread)
        })
        .collect()
}

// ------------------------------------------------------------------ io_uring

/// The io_uring backend (tokio-uring).
pub struct Uring;

impl Runtime for Uring {
    type Stream = tokio_uring::net::TcpStream;
    type Listener = tokio_uring::net::TcpListener;
    const BACKEND: Backend = Backend::IoUring;

    fn listener(std: std::net::TcpListener) -> io::Result<Self::Listener> {
        Ok(tokio_uring::net::TcpListener::from_std(std))
    }

    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio_uring::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listener for tokio_uring::net::TcpListener {
    type Stream = tokio_uring::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio_uring::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }
}

impl Stream for tokio_uring::net::TcpStream {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        tokio_uring::net::TcpStream::read(self, buf).await
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        tokio_uring::net::TcpStream::write_all(self, buf).await
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

// ------------------------------------------------------------------ epoll

/// The epoll backend (tokio's reactor), for where io_uring is blocked.
pub struct Epoll;

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
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        buf.clear();
        loop {
            if let Err(e) = self.readable().await {
                return (Err(e), buf);
            }
            match self.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return (result, buf),
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

    fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Through each backend over loopback: the worker dials us, we send a message and FIN, the
    /// worker echoes it back and closes its side. Exercises connect, read, write_all and
    /// shutdown_write the way the relay uses them.
    fn echo_roundtrip<R: Runtime>() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handles = start_workers(R::BACKEND, 1, move |_| async move {
            let stream = R::connect(addr).await.unwrap();
            let mut buf = Vec::with_capacity(4);
            let mut echoed = Vec::new();
            loop {
                let (n, b) = stream.read(buf).await;
                if n.unwrap() == 0 {
                    break;
                }
                echoed.extend_from_slice(&b);
                let (r, b) = stream.write_all(b).await;
                r.unwrap();
                buf = b;
            }
            stream.shutdown_write().unwrap();
            assert_eq!(echoed, b"hello, backend");
        })
        .unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        peer.write_all(b"hello, backend").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        peer.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello, backend");
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn epoll_backend_relays_and_half_closes() {
        echo_roundtrip::<Epoll>();
    }

    #[test]
    fn io_uring_backend_relays_and_half_closes_where_available() {
        if select(BackendChoice::IoUring).is_err() {
            eprintln!("io_uring unavailable here; skipped");
            return;
        }
        echo_roundtrip::<Uring>();
    }
}
