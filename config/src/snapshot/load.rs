//! What the data path counts per cluster and endpoint while it runs: requests in flight (least
//! request balancing, circuit breaking), open connections, retries in flight, and outlier
//! detection's consecutive errors and ejections. It hangs off the immutable [`Cluster`]
//! because every worker must share it without locks and it must live exactly as long as the
//! endpoint set; a reload that keeps a cluster's endpoints keeps its load (see
//! [`Snapshot::continue_balancing`](crate::Snapshot::continue_balancing)).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use super::Cluster;

/// Live counters of one cluster.
#[derive(Debug, Default)]
pub struct ClusterLoad {
    /// Requests (HTTP) or connections (TCP) in flight to the cluster.
    pub active_requests: AtomicU32,
    /// Upstream connections open to the cluster's endpoints.
    pub connections: AtomicU32,
    /// Retries in flight (`connectionPool.http.maxRetries`).
    pub active_retries: AtomicU32,
    pub endpoints: Box<[EndpointLoad]>,
    /// A consistent-hash ring or Maglev table, built on first use: `(hash, endpoint)` sorted
    /// by hash for a ring, or endpoint per slot for Maglev.
    pub hash_table: OnceLock<Box<[(u64, u32)]>>,
}

/// Live counters of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    pub active_requests: AtomicU32,
    pub consecutive_5xx: AtomicU32,
    pub consecutive_gateway: AtomicU32,
    pub consecutive_local: AtomicU32,
    /// Ejected until this many milliseconds on [`now_ms`]'s clock; 0: not ejected.
    pub ejected_until_ms: AtomicU64,
    /// How many times it has been ejected (the ejection time grows with it).
    pub ejections: AtomicU32,
}

impl ClusterLoad {
    pub fn new(endpoints: usize) -> Self {
        ClusterLoad {
            endpoints: (0..endpoints).map(|_| EndpointLoad::default()).collect(),
            ..ClusterLoad::default()
        }
    }
}

impl EndpointLoad {
    /// Whether the endpoint is ejected at `now` (a millisecond reading of [`now_ms`]).
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }
}

/// Milliseconds on a monotonic clock shared by every thread of the process.
pub fn now_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Cluster {
    /// The cluster's live counters (made on first use, or carried over from the cluster this
    /// one replaced).
    pub fn load(&self) -> &ClusterLoad {
        self.load
            .get_or_init(|| std::sync::Arc::new(ClusterLoad::new(self.endpoints.len())))
    }
}
