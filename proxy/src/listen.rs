//! Listening: binding the per-worker sockets, the accept loop (connection cap, drain,
//! rate-limited error logs) and the first stage of a connection, its original destination.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::Instrument;

use crate::drain::{self, Phase};
use crate::metrics::DirectionLabels;
use crate::runtime::{Listener, Runtime};
use crate::serve::{self, Context, Direction};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot bind {addr}: {source} (is another proxy running in this pod, or the port excluded from capture?)")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Where a listener's connections were headed before capture.
#[derive(Debug, Clone, Copy)]
pub enum OrigDst {
    /// Read it from conntrack (`SO_ORIGINAL_DST`): the iptables REDIRECT case.
    Redirect,
    /// A fixed destination: an explicit listener (no iptables), as used by benchmarks and tests.
    Fixed(SocketAddr),
}

/// Why a connection has no usable original destination. Such connections are closed at once
/// and counted under `isthmus_proxy_connections_refused_total{reason}`.
#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    #[error("refusing a connection to {0} that was not redirected by iptables (a direct connection to a capture port would loop)")]
    NotRedirected(SocketAddr),
    #[error("no original destination (is isthmus-init's REDIRECT in place?): {0}")]
    Unavailable(io::Error),
}

impl OrigDstError {
    pub fn reason(&self) -> &'static str {
        match self {
            OrigDstError::NotRedirected(_) => "not_redirected",
            OrigDstError::Unavailable(_) => "no_original_dst",
        }
    }
}

/// Binds `count` sockets on `addr` with `SO_REUSEPORT`, one per worker, so the kernel spreads
/// connections across cores without a shared accept queue.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, ListenError> {
    (0..count)
        .map(|_| bind_one(addr).map_err(|source| ListenError::Bind { addr, source }))
        .collect()
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Whether this host has IPv6 at all (a pod on an IPv4-only cluster may not).
pub fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, None)
        .and_then(|s| s.bind(&SocketAddr::from((Ipv6Addr::LOCALHOST, 0)).into()))
        .is_ok()
}

/// The proxy's connection slots: a cap on the connections held open at once, shared by every
/// worker (one atomic add and subtract per connection).
pub struct Slots {
    open: AtomicUsize,
    cap: usize,
}

/// One taken slot, given back when the connection's task ends.
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Slots {
            open: AtomicUsize::new(0),
            cap,
        })
    }

    /// Connections open now, over all workers.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn take(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |open| {
                (open < self.cap).then_some(open + 1)
            });
        taken.ok().map(|_| Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs at most once per period, counting what it held back: a descriptor shortage makes
/// every accept fail, and one line per failure would flood the log.
pub struct LogLimiter {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(period: Duration) -> Self {
        LogLimiter {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last line)` when a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now < t + self.period) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Accepts on one worker's listener until the drain says stop (inbound stops when draining
/// starts, outbound only when connections are being closed, so the app can finish its calls),
/// then drops the listener, closing it.
pub async fn accept_loop<R: Runtime>(
    listener: R::Listener,
    direction: Direction,
    orig: OrigDst,
    ctx: Arc<Context>,
    slots: Arc<Slots>,
    mut drain: drain::Watch,
) {
    let stop_at = match direction {
        Direction::Inbound => Phase::Draining,
        Direction::Outbound => Phase::Closing,
    };
    let mut errors = LogLimiter::new(Duration::from_secs(5));
    let mut refusals = LogLimiter::new(Duration::from_secs(5));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.reached(stop_at) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) = slots.take() else {
                    // Counted before the close, so whoever sees the close sees the count.
                    ctx.metrics.refused(direction.as_str(), "limit");
                    drop(stream);
                    if let Some(held) = refusals.allow(Instant::now()) {
                        tracing::warn!(?direction, cap = slots.cap, held_back = held,
                            "connection refused: the proxy holds its maximum of open connections (--max-connections)");
                    }
                    continue;
                };
                let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
                let span = tracing::debug_span!("conn", id, ?direction, %peer);
                let ctx = ctx.clone();
                let drain = drain.clone();
                R::spawn(
                    async move {
                        serve::connection::<R>(stream, peer, direction, orig, &ctx, drain).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                ctx.metrics
                    .accept_errors
                    .get_or_create(&DirectionLabels {
                        direction: direction.as_str(),
                    })
                    .inc();
                if let Some(held) = errors.allow(Instant::now()) {
                    tracing::warn!(?direction, held_back = held,
                        "accept failed: {e} (out of file descriptors? check ulimit -n and --max-connections)");
                }
                // Out of descriptors or memory: back off rather than spin; the kernel keeps
                // the pending connections queued meanwhile.
                R::sleep_until(Instant::now() + Duration::from_millis(20)).await;
            }
        }
    }
    tracing::debug!(?direction, "listener closed");
}

/// The original destination of an accepted connection: the stage after accept.
pub fn original_destination(
    stream: &impl AsRawFd,
    orig: OrigDst,
    own_ports: &[u16],
) -> Result<SocketAddr, OrigDstError> {
    if let OrigDst::Fixed(dst) = orig {
        return Ok(dst);
    }
    let local = local_addr(stream).map_err(OrigDstError::Unavailable)?;
    let dst = original_dst(stream, local).map_err(OrigDstError::Unavailable)?;
    if dst == local || own_ports.contains(&dst.port()) {
        return Err(OrigDstError::NotRedirected(dst));
    }
    Ok(dst)
}

/// The destination the client dialled before iptables redirected it to us.
pub fn original_dst(fd: &impl AsRawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    // SAFETY: the fd belongs to a stream that outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    original_dst_fd(fd.as_fd(), local)
}

fn original_dst_fd(fd: BorrowedFd<'_>, local: SocketAddr) -> io::Result<SocketAddr> {
    if local.is_ipv4() {
        let raw = getsockopt(&fd, sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(raw.sin_port),
        )))
    } else {
        let raw = getsockopt(&fd, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(raw.sin6_port),
            0,
            0,
        )))
    }
}

/// The local address of an accepted socket.
pub fn local_addr(fd: &impl AsRawFd) -> io::Result<SocketAddr> {
    // SAFETY: as above.
    let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_and_return() {
        let slots = Slots::new(2);
        let a = slots.take().unwrap();
        let _b = slots.take().unwrap();
        assert!(slots.take().is_none());
        drop(a);
        assert!(slots.take().is_some());
    }

    #[test]
    fn log_limiter_holds_back_and_counts() {
        let mut limiter = LogLimiter::new(Duration::from_secs(5));
        let t = Instant::now();
        assert_eq!(limiter.allow(t), Some(0));
        for i in 1..100 {
            assert_eq!(limiter.allow(t + Duration::from_millis(i)), None);
        }
        assert_eq!(limiter.allow(t + Duration::from_secs(6)), Some(99));
    }
}
