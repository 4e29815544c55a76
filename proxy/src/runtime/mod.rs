//! The I/O runtime seam. The data path is generic over [`Runtime`]: one implementation on
//! io_uring ([`uring`], tokio-uring) and one on epoll ([`epoll`], tokio). tokio-uring has no
//! active maintainer, so nothing outside this module names it; moving to another
//! completion-based runtime means writing one more impl here.
//!
//! Both runtimes are single-threaded: the proxy runs one per core (thread-per-core), each with
//! its own `SO_REUSEPORT` listeners. Tasks and timers go through [`Runtime::spawn`] and
//! [`Runtime::sleep_until`], never through tokio calls in the stages.
//!
//! Cancellation: dropping an in-flight io_uring read loses whatever it read meanwhile, so a
//! read that may be abandoned (a timeout, a sniff, a buffer shrink) uses
//! [`Stream::read_ready`], which waits for readiness without a buffer and then reads
//! synchronously — safe to drop at any await point, on both backends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub mod epoll;
pub mod uring;

pub use epoll::Epoll;
pub use uring::Uring;

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
        BackendChoice::IoUring => uring::probe()
            .map(|()| (Backend::IoUring, None))
            .map_err(RuntimeError::IoUringUnavailable),
        BackendChoice::Auto => match uring::probe() {
            Ok(()) => Ok((Backend::IoUring, None)),
            Err(e) => Ok((Backend::Epoll, Some(e))),
        },
    }
}

/// A connected TCP stream with completion-style, owned-buffer I/O (the io_uring model, which
/// epoll can emulate and not the other way round).
#[allow(async_fn_in_trait)]
pub trait Stream: AsRawFd + 'static {
    /// Reads into `buf`'s spare capacity (after clearing it); on return `buf.len()` is the
    /// number of bytes read. On io_uring the buffer is in the kernel's hands until the read
    /// completes: do not drop this future unless the connection is being torn down.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Waits until the socket is readable, then reads what is there into `buf`'s spare
    /// capacity (appending). Holds no buffer while waiting and is safe to drop (time out,
    /// race) at any point: nothing read is ever lost.
    async fn read_ready(&self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// Writes all of `bufs`, in order, with as few system calls as the backend allows (one
    /// `writev` when the socket takes it all): a head and a body without copying them
    /// together.
    async fn write_all_vectored(&self, bufs: Vec<Vec<u8>>) -> (io::Result<()>, Vec<Vec<u8>>);
    /// Sends FIN: the peer sees end of stream, and we may still read.
    fn shutdown_write(&self) -> io::Result<()> {
        with_socket(self, |s| s.shutdown(std::net::Shutdown::Write))
    }
    /// Ends the read direction: a read in flight completes (with end of stream) and the peer
    /// is told nothing.
    fn shutdown_read(&self) -> io::Result<()> {
        with_socket(self, |s| s.shutdown(std::net::Shutdown::Read))
    }
    /// Ends both directions now: in-flight operations on the socket complete at once (so a
    /// completion backend releases the descriptor), and the peer sees FIN.
    fn shutdown_both(&self) -> io::Result<()> {
        with_socket(self, |s| s.shutdown(std::net::Shutdown::Both))
    }
    /// Whether the connection was ended by a reset rather than a FIN, after a read returned
    /// end of stream. The kernel reports a reset's error to one system call only: if a write
    /// took it, the read sees plain end of stream. The TCP state still tells: CLOSE after a
    /// reset, CLOSE_WAIT after a FIN — unless we had sent our own FIN first (then a normal
    /// close also ends in CLOSE), which the caller knows and says with `we_sent_fin`.
    fn was_reset(&self, we_sent_fin: bool) -> bool {
        if we_sent_fin {
            return false;
        }
        let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
        let rc = unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        // SAFETY: zero-initialised, and filled by the kernel where rc == 0.
        rc == 0 && unsafe { info.assume_init() }.tcpi_state == TCP_CLOSE
    }
    /// Moves the connection onto tokio's readiness reactor, where L7 runs (docs/ARCHITECTURE.md,
    /// "L7 I/O model"). A completion stream's descriptor is duplicated and the original closed.
    fn into_tokio(self) -> io::Result<tokio::net::TcpStream>
    where
        Self: Sized,
    {
        crate::http::io::to_tokio(self)
    }
    /// Makes the coming close send RST instead of FIN: how a reset on one side is passed on
    /// to the other.
    fn reset_on_close(&self) -> io::Result<()> {
        with_socket(self, |s| s.set_linger(Some(Duration::ZERO)))
    }
}

/// `TCP_CLOSE` in the kernel's TCP state numbering (include/net/tcp_states.h).
const TCP_CLOSE: u8 = 7;

/// Runs a socket option call on `stream`'s descriptor.
fn with_socket<S: AsRawFd + ?Sized, T>(
    stream: &S,
    f: impl FnOnce(socket2::SockRef<'_>) -> io::Result<T>,
) -> io::Result<T> {
    // SAFETY: the descriptor belongs to `stream`, which outlives this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    f(socket2::SockRef::from(&fd))
}

/// A listening socket.
#[allow(async_fn_in_trait)]
pub trait Listener: 'static {
    type Stream: Stream;
    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)>;
}

/// One backend: how to listen, how to dial, how to run tasks and timers.
#[allow(async_fn_in_trait)]
pub trait Runtime: 'static {
    type Stream: Stream;
    type Listener: Listener<Stream = Self::Stream>;
    const BACKEND: Backend;
    fn listener(std: std::net::TcpListener) -> io::Result<Self::Listener>;
    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream>;

    /// Runs `task` on this worker's runtime (both backends run on tokio's current-thread
    /// scheduler, so this is `spawn_local`).
    fn spawn<F: Future<Output = ()> + 'static>(task: F) {
        tokio::task::spawn_local(task);
    }

    /// Completes at `deadline`.
    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> {
        tokio::time::sleep_until(deadline.into())
    }

    /// `future`, or `Err(Elapsed)` if it has not finished by `deadline`. `future` is dropped on
    /// expiry: use it only with cancel-safe futures ([`Stream::read_ready`], connects).
    async fn deadline<F: Future>(deadline: Instant, future: F) -> Result<F::Output, Elapsed> {
        tokio::time::timeout_at(deadline.into(), future)
            .await
            .map_err(|_| Elapsed)
    }
}

/// A deadline passed before the operation finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline passed")]
pub struct Elapsed;

/// The read side of a stream split for two tasks (an L7 reader and writer, say).
pub struct ReadHalf<S>(Rc<S>);

/// The write side of a split stream.
pub struct WriteHalf<S>(Rc<S>);

/// Splits `stream` into halves that can move into separate tasks on the same worker; the
/// socket closes when both are dropped.
pub fn split<S: Stream>(stream: S) -> (ReadHalf<S>, WriteHalf<S>) {
    let shared = Rc::new(stream);
    (ReadHalf(shared.clone()), WriteHalf(shared))
}

impl<S: Stream> ReadHalf<S> {
    pub async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        self.0.read(buf).await
    }

    pub async fn read_ready(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.0.read_ready(buf).await
    }
}

impl<S: Stream> WriteHalf<S> {
    pub async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        self.0.write_all(buf).await
    }

    pub async fn write_all_vectored(&self, bufs: Vec<Vec<u8>>) -> (io::Result<()>, Vec<Vec<u8>>) {
        self.0.write_all_vectored(bufs).await
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        self.0.shutdown_write()
    }
}

/// Why a worker thread ended. Workers run until the process exits, so any of these is a
/// failure the supervisor acts on.
#[derive(Debug)]
pub enum WorkerExit {
    /// Its runtime could not be built.
    Runtime(io::Error),
    /// Its future returned (every listener task ended).
    Returned,
}

/// Starts `workers` threads, each running one single-threaded runtime of `backend` and the
/// future `make(index)` builds on that thread (so it need not be `Send`). When a worker ends,
/// `on_exit(index, why)` is called on its thread.
pub fn start_workers<M, F, E>(
    backend: Backend,
    workers: usize,
    make: M,
    on_exit: E,
) -> Result<Vec<std::thread::JoinHandle<()>>, RuntimeError>
where
    M: Fn(usize) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = ()> + 'static,
    E: Fn(usize, WorkerExit) + Send + Sync + Clone + 'static,
{
    (0..workers)
        .map(|index| {
            let make = make.clone();
            let on_exit = on_exit.clone();
            std::thread::Builder::new()
                .name(format!("isthmus-worker-{index}"))
                .spawn(move || {
                    let result = match backend {
                        Backend::IoUring => uring::block_on(make(index)),
                        Backend::Epoll => epoll::block_on(make(index)),
                    };
                    on_exit(
                        index,
                        match result {
                            Ok(()) => WorkerExit::Returned,
                            Err(e) => WorkerExit::Runtime(e),
                        },
                    );
                })
                .map_err(RuntimeError::Thread)
        })
        .collect()
}

#[cfg(test)]
mod tests;
