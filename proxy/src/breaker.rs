//! Circuit breaking (DestinationRule `connectionPool`), counted per cluster over every worker:
//! a request over `http2MaxRequests` in flight, or over `maxConnections` +
//! `http1MaxPendingRequests` (HTTP/1 carries one request per connection, so requests beyond
//! the connections are the pending ones), is refused at once with 503 `UO`; a TCP connection
//! over `maxConnections` is closed with `UO`. Retries beyond `maxRetries` in flight are not
//! made. Guards give back what they took when dropped, on every path.

use std::sync::atomic::{AtomicU32, Ordering};

use isthmus_config::Cluster;

/// A request (or TCP connection) counted against its cluster's limits while it lives.
pub struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts `counter` up unless it is at `limit` already.
fn take(counter: &AtomicU32, limit: u64) -> Option<InFlight<'_>> {
    let mut current = counter.load(Ordering::Relaxed);
    loop {
        if u64::from(current) >= limit {
            return None;
        }
        match counter.compare_exchange_weak(
            current,
            current + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(InFlight(counter)),
            Err(now) => current = now,
        }
    }
}

/// Admits an HTTP request to `cluster`, or `None`: overflow (`UO`).
pub fn admit_request(cluster: &Cluster) -> Option<InFlight<'_>> {
    let pool = &cluster.policy.connection_pool;
    let limit = u64::from(pool.http2_max_requests)
        .min(u64::from(pool.max_connections) + u64::from(pool.http1_max_pending_requests));
    take(&cluster.load().active_requests, limit)
}

/// Admits a TCP connection to `cluster`, or `None`: overflow (`UO`).
pub fn admit_connection(cluster: &Cluster) -> Option<InFlight<'_>> {
    let pool = &cluster.policy.connection_pool;
    take(&cluster.load().connections, u64::from(pool.max_connections))
}

/// Admits one more retry to `cluster`, or `None` when `maxRetries` are in flight.
pub fn admit_retry(cluster: &Cluster) -> Option<InFlight<'_>> {
    take(
        &cluster.load().active_retries,
        u64::from(cluster.policy.connection_pool.max_retries),
    )
}

/// Counts a request in flight at one endpoint (least-request balancing) while it lives.
pub fn at_endpoint(cluster: &Cluster, endpoint: usize) -> Option<InFlight<'_>> {
    cluster.load().endpoints.get(endpoint).map(|e| {
        e.active_requests.fetch_add(1, Ordering::Relaxed);
        InFlight(&e.active_requests)
    })
}
