//! Upstream HTTP/2 connections: per endpoint and per worker, multiplexed, so that a worker
//! sends all its streams to an endpoint over one connection (more only when the
//! DestinationRule's `maxConcurrentStreams` is reached). A connection's driver is its own task
//! on the worker; a connection that is closed, or was told GOAWAY, is dropped from the map and
//! the next request dials a new one. Idle connections are closed after the pool's idle timeout
//! (swept when the endpoint is next used).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ::h2::client::SendRequest;
use ::h2::Reason;
use bytes::Bytes;
use tokio::net::TcpStream;

use super::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::http::upstream::Failure;

/// Where an attempt goes and the pool settings that apply.
pub struct H2Upstream {
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    pub idle: Duration,
    /// Streams one connection may carry at once (`maxConcurrentStreams`); `None`: as many as
    /// the server allows (h2 queues beyond its SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams: Option<u32>,
}

struct Entry {
    send: SendRequest<Bytes>,
    closed: Rc<Cell<bool>>,
    in_flight: Rc<Cell<u32>>,
    last_used: Instant,
}

thread_local! {
    static CONNECTIONS: RefCell<HashMap<SocketAddr, Vec<Entry>>> = RefCell::new(HashMap::new());
    /// One dial at a time per endpoint: streams that arrive together while the first
    /// connection is being made wait for it instead of each dialling their own.
    static DIALS: RefCell<HashMap<SocketAddr, Rc<tokio::sync::Mutex<()>>>> =
        RefCell::new(HashMap::new());
    static SWEPT: Cell<Instant> = Cell::new(Instant::now());
}

/// How often every endpoint's idle connections are swept (on the next checkout).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// A stream's hold on its connection: counted in flight while it lives.
pub struct Slot {
    in_flight: Rc<Cell<u32>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
    }
}

/// A connection ready for one more stream.
pub struct Checked {
    pub send: SendRequest<Bytes>,
    /// An existing connection (its server may have closed it meanwhile: a failure before any
    /// response is retried once on a new one).
    pub reused: bool,
    pub slot: Slot,
}

/// A connection with room for a stream: an open one to `up.addr`, else a new one.
pub async fn checkout(up: &H2Upstream) -> Result<Checked, Failure> {
    if let Some(checked) = ready_pooled(up).await {
        return Ok(checked);
    }
    let lock = DIALS.with(|d| d.borrow_mut().entry(up.addr).or_default().clone());
    let _dialling = lock.lock().await;
    if let Some(checked) = ready_pooled(up).await {
        return Ok(checked);
    }
    dial(up).await
}

/// A pooled connection ready for a stream. One that refuses (it was told GOAWAY, or failed)
/// is dropped from the pool at once, so that the next request does not try it again.
async fn ready_pooled(up: &H2Upstream) -> Option<Checked> {
    loop {
        let (send, slot, closed) = pooled(up)?;
        match send.ready().await {
            Ok(send) => {
                return Some(Checked {
                    send,
                    reused: true,
                    slot,
                })
            }
            Err(e) => {
                tracing::debug!(addr = %up.addr, "pooled h2 connection refused a stream: {e}");
                closed.set(true);
            }
        }
    }
}

fn pooled(up: &H2Upstream) -> Option<(SendRequest<Bytes>, Slot, Rc<Cell<bool>>)> {
    CONNECTIONS.with(|all| {
        let mut all = all.borrow_mut();
        let now = Instant::now();
        let live = |e: &Entry| {
            !e.closed.get() && (e.in_flight.get() > 0 || now.duration_since(e.last_used) < up.idle)
        };
        // Now and then every endpoint's list, so that connections to endpoints no longer
        // used are closed too.
        if SWEPT.with(|s| now.duration_since(s.get()) >= SWEEP_EVERY) {
            SWEPT.with(|s| s.set(now));
            all.retain(|_, list| {
                list.retain(live);
                !list.is_empty()
            });
        }
        let list = all.get_mut(&up.addr)?;
        list.retain(live);
        let room = |e: &&mut Entry| up.max_streams.is_none_or(|m| e.in_flight.get() < m);
        let entry = list.iter_mut().find(room)?;
        entry.last_used = now;
        entry.in_flight.set(entry.in_flight.get() + 1);
        Some((
            entry.send.clone(),
            Slot {
                in_flight: entry.in_flight.clone(),
            },
            entry.closed.clone(),
        ))
    })
}

async fn dial(up: &H2Upstream) -> Result<Checked, Failure> {
    let connected = async {
        let stream = TcpStream::connect(up.addr).await.map_err(|e| {
            tracing::debug!(addr = %up.addr, "connect failed: {e}");
            Failure::Connect
        })?;
        let _ = stream.set_nodelay(true);
        ::h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| {
                tracing::debug!(addr = %up.addr, "h2 handshake failed: {e}");
                Failure::Connect
            })
    };
    let (send, connection) = tokio::time::timeout(up.connect_timeout, connected)
        .await
        .map_err(|_| Failure::Connect)??;
    let closed = Rc::new(Cell::new(false));
    let done = closed.clone();
    let addr = up.addr;
    tokio::task::spawn_local(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, "upstream h2 connection ended: {e}");
        }
        done.set(true);
    });
    let in_flight = Rc::new(Cell::new(1));
    CONNECTIONS.with(|all| {
        all.borrow_mut().entry(up.addr).or_default().push(Entry {
            send: send.clone(),
            closed,
            in_flight: in_flight.clone(),
            last_used: Instant::now(),
        })
    });
    let send = send.ready().await.map_err(|e| failure(&e, false))?;
    Ok(Checked {
        send,
        reused: false,
        slot: Slot { in_flight },
    })
}

/// How an upstream h2 error counts for retries and response flags.
pub fn failure(e: &::h2::Error, reused: bool) -> Failure {
    if e.reason() == Some(Reason::REFUSED_STREAM) {
        return Failure::RefusedStream;
    }
    if e.is_go_away() && e.is_remote() {
        // Streams above the GOAWAY's last stream id were not processed: safe to send again.
        return Failure::Closed { reused: true };
    }
    if e.is_io() {
        return Failure::Closed { reused };
    }
    if e.is_reset() && e.is_remote() {
        return Failure::Reset;
    }
    Failure::Malformed
}

/// Open upstream h2 connections on this worker (tests and the memory view).
pub fn open_count() -> usize {
    CONNECTIONS.with(|all| {
        all.borrow()
            .values()
            .flat_map(|l| l.iter())
            .filter(|e| !e.closed.get())
            .count()
    })
}
