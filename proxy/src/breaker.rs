//! Circuit breaking (DestinationRule `connectionPool`), counted per cluster over every worker:
//! a request over `http2MaxRequests` in flight, or over `maxConnections` +
//! `http1MaxPendingRequests` (HTTP/1 carries one request per connection, so requests beyond
//! the connections are the pending ones), is refused at once with 503 `UO`; a TCP connection
//! over `maxConnections` is closed with `UO`. Retries beyond `maxRetries` in flight are not
//! made, nor beyond a `retryBudget`. Guards give back what they took when dropped, on every
//! path.

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

/// Admits one more retry to `cluster`, or `None` when `maxRetries` are in flight — or, with a
/// `retryBudget`, when retries would exceed its share of the requests in flight (but never
/// fewer than its `minRetryConcurrency`), as Envoy's retry budget.
pub fn admit_retry(cluster: &Cluster) -> Option<InFlight<'_>> {
    let load = cluster.load();
    let mut limit = u64::from(cluster.policy.connection_pool.max_retries);
    if let Some(budget) = &cluster.policy.retry_budget {
        let active = f64::from(load.active_requests.load(Ordering::Relaxed));
        let share = (active * budget.percent / 100.0) as u64;
        limit = limit.min(share.max(u64::from(budget.min_retry_concurrency)));
    }
    take(&load.active_retries, limit)
}

/// Counts a request in flight at one endpoint (least-request balancing) while it lives.
pub fn at_endpoint(cluster: &Cluster, endpoint: usize) -> Option<InFlight<'_>> {
    cluster.load().endpoints.get(endpoint).map(|e| {
        e.active_requests.fetch_add(1, Ordering::Relaxed);
        InFlight(&e.active_requests)
    })
}

#[cfg(test)]
mod tests {
    use isthmus_config::{load, SourceFile};

    use super::*;

    fn cluster(policy: &str) -> std::sync::Arc<Cluster> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web, namespace: test}}\n\
             spec:\n  hosts: [web]\n  addresses: [10.96.0.2]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n\
             \x20 endpoints: [{{address: 10.0.0.1}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: test}}\n\
             spec:\n  host: web\n  trafficPolicy: {policy}\n"
        );
        let snapshot = load(&[SourceFile::new("a.yaml", text)]).unwrap();
        let (_, port) = snapshot
            .service_port("10.96.0.2:80".parse().unwrap())
            .unwrap();
        port.routes[0].destinations[0].cluster.clone()
    }

    #[test]
    fn limits_refuse_past_them_and_guards_give_back() {
        let c = cluster(
            "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}",
        );
        let a = admit_request(&c).unwrap();
        let b = admit_request(&c).unwrap();
        assert!(admit_request(&c).is_none(), "a third request in flight");
        drop(a);
        let _c = admit_request(&c).expect("a guard gave its slot back");
        drop(b);
        let conn = admit_connection(&c).unwrap();
        assert!(admit_connection(&c).is_none());
        drop(conn);
        assert!(admit_connection(&c).is_some());
    }

    #[test]
    fn a_retry_budget_bounds_retries_by_the_requests_in_flight() {
        let c = cluster("{connectionPool: {http: {maxRetries: 10}}, retryBudget: {percent: 50, minRetryConcurrency: 1}}");
        let _in_flight: Vec<_> = (0..4).map(|_| admit_request(&c).unwrap()).collect();
        let r1 = admit_retry(&c).unwrap();
        let _r2 = admit_retry(&c).unwrap();
        assert!(
            admit_retry(&c).is_none(),
            "50 % of 4 requests in flight is 2 retries"
        );
        drop(r1);
        assert!(admit_retry(&c).is_some());
        // With nothing in flight, the minimum concurrency still allows one.
        let idle = cluster("{retryBudget: {percent: 50, minRetryConcurrency: 1}}");
        let _one = admit_retry(&idle).unwrap();
        assert!(admit_retry(&idle).is_none());
    }
}
