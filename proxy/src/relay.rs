//! Copying bytes both ways until both sides have finished, with half-close: when one side
//! sends FIN we pass it on (shutdown write) and keep copying the other way.
//!
//! Bounds: a connection with no bytes either way for `idle` ends; once one direction has
//! finished, the other must make progress every `half_close`; the drain's closing phase ends
//! it at once. When either side resets, the other is reset too and both sockets are shut down
//! at once — on io_uring an abandoned read would otherwise keep its socket open until the
//! quiet peer sent something.

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::drain::{self, Phase};
use crate::runtime::{Elapsed, Runtime, Stream};

/// Each direction starts with a small buffer, so an idle connection costs little (a completion
/// read owns its buffer while it waits), and doubles it whenever a read fills it, up to a size
/// that keeps bulk transfers at a few syscalls per megabyte.
const INITIAL_BUFFER: usize = 2 * 1024;
const MAX_BUFFER: usize = 256 * 1024;
/// A grown buffer goes back to the initial size after this long without data.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// The relay's time bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// No bytes either way for this long ends the connection (Istio's
    /// `connectionPool.tcp.idleTimeout`, 1 h by default).
    pub idle: Duration,
    /// After one side has finished sending, the other must send something this often.
    pub half_close: Duration,
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream → upstream.
    pub upstream: u64,
    /// Upstream → downstream.
    pub downstream: u64,
}

/// Which socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached end of stream.
    Finished,
    /// `side` failed (a reset, usually); the other side was reset in turn.
    Failed {
        side: Side,
        error: io::Error,
    },
    IdleTimeout,
    HalfCloseTimeout,
    /// The drain's closing phase.
    Drained,
}

impl End {
    /// The label for `isthmus_proxy_connection_timeouts_total`, when a bound ended it.
    pub fn timeout_label(&self) -> Option<&'static str> {
        match self {
            End::IdleTimeout => Some("idle"),
            End::HalfCloseTimeout => Some("half_close"),
            End::Drained => Some("drain"),
            End::Finished | End::Failed { .. } => None,
        }
    }
}

/// What a half reports when it fails: which of its two sockets, and the error.
struct HalfError {
    side: Side,
    error: io::Error,
}

/// One relayed connection's sockets and counters.
pub struct Ends<'a, D, U> {
    pub downstream: &'a D,
    pub upstream: &'a U,
    /// Bytes to send upstream before anything else: what detection read.
    pub prefix: Vec<u8>,
    pub to_upstream: &'a Counter,
    pub to_downstream: &'a Counter,
    /// Bytes held in relay buffers, process-wide (`isthmus_proxy_relay_buffer_bytes`).
    pub buffers: &'a Gauge,
}

/// Relays until both directions finish, a bound ends it, or either side fails. Counters move
/// as bytes flow, so long connections show in metrics before they close.
pub async fn relay<R: Runtime>(
    ends: Ends<'_, R::Stream, R::Stream>,
    bounds: Bounds,
    drain: &mut drain::Watch,
) -> (Transferred, End) {
    let activity = Cell::new(Instant::now());
    let (up_bytes, down_bytes) = (Cell::new(0u64), Cell::new(0u64));
    // Whether we sent FIN on each socket (a half finished copying into it).
    let (down_fin, up_fin) = (Cell::new(false), Cell::new(false));
    let moved = || Transferred {
        upstream: up_bytes.get(),
        downstream: down_bytes.get(),
    };
    if !ends.prefix.is_empty() {
        let n = ends.prefix.len() as u64;
        if let (Err(error), _) = ends.upstream.write_all(ends.prefix).await {
            let end = End::Failed {
                side: Side::Upstream,
                error,
            };
            abort(ends.downstream, ends.upstream, &end);
            return (moved(), end);
        }
        up_bytes.set(n);
        ends.to_upstream.inc_by(n);
    }
    let up = copy_half::<R, _, _>(
        (ends.downstream, Side::Downstream, &down_fin),
        (ends.upstream, Side::Upstream, &up_fin),
        ends.to_upstream,
        &up_bytes,
        &activity,
        ends.buffers,
    );
    let down = copy_half::<R, _, _>(
        (ends.upstream, Side::Upstream, &up_fin),
        (ends.downstream, Side::Downstream, &down_fin),
        ends.to_downstream,
        &down_bytes,
        &activity,
        ends.buffers,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        let half_closed = up_done || down_done;
        let limit = if half_closed {
            bounds.half_close
        } else {
            bounds.idle
        };
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => break End::Failed { side: e.side, error: e.error },
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => break End::Failed { side: e.side, error: e.error },
            },
            _ = R::sleep_until(activity.get() + limit) => {
                // Activity may have moved the deadline since this timer was set.
                if activity.get() + limit <= Instant::now() {
                    break if half_closed { End::HalfCloseTimeout } else { End::IdleTimeout };
                }
            },
            _ = drain.reached(Phase::Closing) => break End::Drained,
        }
        if up_done && down_done {
            break End::Finished;
        }
    };
    if !matches!(end, End::Finished) {
        abort(ends.downstream, ends.upstream, &end);
    }
    (moved(), end)
}

/// Ends both sockets now. A failed side's peer is reset (RST on close), passing the reset on;
/// shutting both down completes any operation still in flight on them, so the descriptors
/// close when this connection's task ends rather than when a quiet peer next sends.
fn abort<D: Stream, U: Stream>(downstream: &D, upstream: &U, end: &End) {
    // A failed socket is done with; its peer gets RST, not FIN. Only the peer's read can
    // still be in flight (the half writing to it ended with the failure), and shutting down
    // just the read side completes it without sending FIN first.
    match end {
        End::Failed {
            side: Side::Downstream,
            ..
        } => {
            let _ = downstream.shutdown_both();
            reset(upstream);
        }
        End::Failed {
            side: Side::Upstream,
            ..
        } => {
            let _ = upstream.shutdown_both();
            reset(downstream);
        }
        _ => {
            let _ = downstream.shutdown_both();
            let _ = upstream.shutdown_both();
        }
    }
}

/// Arranges for `stream` to close with RST, and completes any read in flight on it.
fn reset<S: Stream>(stream: &S) {
    let _ = stream.reset_on_close();
    let _ = stream.shutdown_read();
}

/// A relay buffer whose capacity is accounted in a gauge for as long as it lives. The
/// accounted size is kept apart from `bytes`, which is lent to the backend during a read.
struct Buffer<'a> {
    bytes: Vec<u8>,
    accounted: usize,
    gauge: &'a Gauge,
}

impl<'a> Buffer<'a> {
    fn new(capacity: usize, gauge: &'a Gauge) -> Self {
        let mut buffer = Buffer {
            bytes: Vec::new(),
            accounted: 0,
            gauge,
        };
        buffer.resize(capacity);
        buffer
    }

    /// Replaces the buffer with an empty one of `capacity`.
    fn resize(&mut self, capacity: usize) {
        self.bytes = Vec::with_capacity(capacity);
        let now = self.bytes.capacity();
        self.gauge.inc_by(now as i64 - self.accounted as i64);
        self.accounted = now;
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        self.gauge.dec_by(self.accounted as i64);
    }
}

/// One direction: read from `from`, write to `to`; on end of stream, half-close `to` — unless
/// `from` was reset, which is passed on as a reset. `*_fin`: whether we sent FIN on that socket.
async fn copy_half<R: Runtime, A: Stream, B: Stream>(
    (from, from_side, from_fin): (&A, Side, &Cell<bool>),
    (to, to_side, to_fin): (&B, Side, &Cell<bool>),
    counter: &Counter,
    total: &Cell<u64>,
    activity: &Cell<Instant>,
    gauge: &Gauge,
) -> Result<(), HalfError> {
    let mut buf = Buffer::new(INITIAL_BUFFER, gauge);
    loop {
        let read = if buf.bytes.capacity() > INITIAL_BUFFER {
            // A grown buffer is not left pinned in a read while the peer is quiet: wait for
            // data without it (cancel-safe), and shrink back if none comes soon.
            buf.bytes.clear();
            let until = Instant::now() + SHRINK_AFTER;
            match R::deadline(until, from.read_ready(&mut buf.bytes)).await {
                Ok(read) => read,
                Err(Elapsed) => {
                    buf.resize(INITIAL_BUFFER);
                    continue;
                }
            }
        } else {
            let (read, b) = from.read(std::mem::take(&mut buf.bytes)).await;
            buf.bytes = b;
            read
        };
        let n = match read {
            Ok(0) if from.was_reset(from_fin.get()) => {
                return Err(HalfError {
                    side: from_side,
                    error: io::ErrorKind::ConnectionReset.into(),
                })
            }
            Ok(0) => {
                // A peer that already closed makes shutdown fail with ENOTCONN: harmless.
                let _ = to.shutdown_write();
                to_fin.set(true);
                return Ok(());
            }
            Ok(n) => n,
            Err(error) => {
                return Err(HalfError {
                    side: from_side,
                    error,
                })
            }
        };
        activity.set(Instant::now());
        // Counted as received, before the write: bytes a failed write loses were still moved
        // from this side.
        total.set(total.get() + n as u64);
        counter.inc_by(n as u64);
        let filled = n == buf.bytes.capacity() && n < MAX_BUFFER;
        let (written, b) = to.write_all(std::mem::take(&mut buf.bytes)).await;
        buf.bytes = b;
        if let Err(error) = written {
            return Err(HalfError {
                side: to_side,
                error,
            });
        }
        activity.set(Instant::now());
        if filled {
            // Filled: the peer sends faster than this buffer drains. Grow for the next read.
            let grown = (buf.bytes.capacity() * 2).min(MAX_BUFFER);
            buf.resize(grown);
        }
    }
}

#[cfg(test)]
mod tests;
