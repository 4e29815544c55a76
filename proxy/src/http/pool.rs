//! Upstream HTTP/1 connections kept open between requests, per endpoint, per worker. A worker
//! is one thread with its own pool: no locks, and a connection is reused by the core that
//! made it. Idle connections expire (Istio's `connectionPool.http.idleTimeout`, 1 h by
//! default) and each endpoint keeps a bounded number of them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::io::Conn;

/// Idle connections kept per endpoint and worker; more are closed when they come back.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

struct Idle {
    conn: Conn,
    /// When it is closed if nothing takes it (its cluster's idle timeout after it came back).
    expires: Instant,
    /// Requests this connection has carried (`maxRequestsPerConnection`).
    used: u32,
}

struct Pool {
    idle: HashMap<SocketAddr, Vec<Idle>>,
    /// A sweeper task is running on this worker.
    sweeping: bool,
}

/// How often a worker's pool is swept of expired connections and of those the server closed,
/// while it holds any.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        idle: HashMap::new(),
        sweeping: false,
    });
}

/// An upstream connection checked out for one exchange.
pub struct Checked {
    pub conn: Conn,
    pub addr: SocketAddr,
    /// Taken from the pool (it may have been closed by the server meanwhile: a failure before
    /// any response byte is retried on a new connection).
    pub reused: bool,
    pub used: u32,
}

/// The most recently returned live connection to `addr`, if any has not expired.
pub fn take(addr: SocketAddr) -> Option<Checked> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            if now < idle.expires && idle.conn.is_reusable() {
                return Some(Checked {
                    conn: idle.conn,
                    addr,
                    reused: true,
                    used: idle.used,
                });
            }
        }
        pool.idle.remove(&addr);
        None
    })
}

/// Returns a connection after a complete exchange that left it reusable; it is closed after
/// `idle_timeout` if nothing takes it.
pub fn put(checked: Checked, idle_timeout: Duration) {
    let start_sweeper = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let list = pool.idle.entry(checked.addr).or_default();
        if list.len() >= MAX_IDLE_PER_ENDPOINT {
            list.remove(0);
        }
        list.push(Idle {
            conn: checked.conn,
            expires: Instant::now() + idle_timeout,
            used: checked.used,
        });
        !std::mem::replace(&mut pool.sweeping, true)
    });
    if start_sweeper {
        tokio::task::spawn_local(sweep());
    }
}

/// Closes expired connections and those the server closed, every [`SWEEP_EVERY`], until the
/// pool is empty.
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let empty = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let now = Instant::now();
            pool.idle.retain(|_, list| {
                list.retain(|i| now < i.expires && i.conn.is_reusable());
                !list.is_empty()
            });
            let empty = pool.idle.is_empty();
            if empty {
                pool.sweeping = false;
            }
            empty
        });
        if empty {
            return;
        }
    }
}

/// Idle connections held by this worker (tests and the memory view).
pub fn idle_count() -> usize {
    POOL.with(|pool| pool.borrow().idle.values().map(Vec::len).sum())
}
