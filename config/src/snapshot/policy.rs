//! Compiled DestinationRule traffic policies: one resolved [`TrafficPolicy`] per cluster, every
//! default filled in, so the proxy never consults Istio's defaults itself.

use std::time::Duration;

use serde_json::{json, Value};

use crate::duration::show;

/// The policy of one cluster (service port, optionally a subset), merged as Istio merges it
/// (see `compile/policy.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    /// Slow start: a new endpoint's share ramps up over this long.
    pub warmup: Option<Duration>,
    /// Slow start's starting share of a new endpoint's weight, percent (Envoy default 10).
    pub warmup_minimum_percent: f64,
    /// Slow start's curve (1.0 linear, Envoy's default; larger ramps faster at first).
    pub warmup_aggression: f64,
    pub connection_pool: ConnectionPool,
    /// `None`: no outlier detection (Istio's default).
    pub outlier_detection: Option<OutlierDetection>,
    /// `retryBudget`: retries in flight limited to a share of active requests.
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LoadBalancer {
    RoundRobin,
    /// Istio's default (`simple` unset or `UNSPECIFIED`), and the deprecated `LEAST_CONN`.
    LeastRequest,
    Random,
    /// Connect to the address the client asked for, bypassing endpoint selection.
    Passthrough,
    ConsistentHash(ConsistentHash),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub algorithm: HashAlgorithm,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// Lowercased header name.
    Header(String),
    /// A cookie; when absent from the request and `ttl` is set, the proxy generates one.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
        /// Extra attributes of a generated cookie (`SameSite=Strict`, `Secure`).
        attributes: Vec<(String, Option<String>)>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// Default 1024 (also the deprecated `minimumRingSize`).
    RingHash { minimum_ring_size: u64 },
    /// Default 65537; a prime below 5000011.
    Maglev { table_size: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionPool {
    /// Connections to each upstream cluster (u32::MAX when unset, as Istio sets Envoy's).
    pub max_connections: u32,
    /// `None`: the mesh default, [`ConnectionPool::DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Option<Duration>,
    /// TCP idle timeout; `None`: [`ConnectionPool::DEFAULT_IDLE_TIMEOUT`]; zero disables it.
    pub idle_timeout: Option<Duration>,
    /// `None`: no SO_KEEPALIVE beyond the OS default.
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    /// Requests queued waiting for a connection (u32::MAX when unset).
    pub http1_max_pending_requests: u32,
    /// Active requests to the cluster (u32::MAX when unset).
    pub http2_max_requests: u32,
    /// Requests per upstream connection; 0 = unlimited (1 disables keep-alive).
    pub max_requests_per_connection: u32,
    /// Retries in flight to the cluster (u32::MAX when unset).
    pub max_retries: u32,
    /// Idle timeout of pooled upstream HTTP connections; `None`: Envoy's 1h.
    pub http_idle_timeout: Option<Duration>,
    /// Streams per HTTP/2 connection; `None`: 2^31-1 (Envoy's default).
    pub max_concurrent_streams: Option<u32>,
    pub h2_upgrade_policy: H2Upgrade,
    /// Speak to the upstream in the protocol the client used (HTTP/1.1 or HTTP/2).
    pub use_client_protocol: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Upgrade {
    /// The mesh default: Istio's meshConfig `h2UpgradePolicy` is DO_NOT_UPGRADE.
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// `None`: the OS default (9 on Linux).
    pub probes: Option<u32>,
    /// Idle time before probing; `None`: the OS default (2h on Linux).
    pub time: Option<Duration>,
    /// `None`: the OS default (75s on Linux).
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// Eject after this many consecutive 5xx (5 unless set; `None` when set to 0).
    pub consecutive_5xx: Option<u32>,
    /// Eject after this many consecutive 502/503/504 (`None` unless set to more than 0).
    pub consecutive_gateway: Option<u32>,
    /// With `split_external_local_origin_errors`: eject after this many consecutive locally
    /// originated failures (connect errors, timeouts, resets); 5 unless set.
    pub consecutive_local_origin: Option<u32>,
    pub split_external_local_origin_errors: bool,
    /// Sweep interval (10s unless set).
    pub interval: Duration,
    /// Minimum ejection time, multiplied by the number of ejections (30s unless set).
    pub base_ejection_time: Duration,
    /// At most this share of endpoints ejected at once (10 unless set).
    pub max_ejection_percent: u32,
    /// Outlier detection is suspended while fewer than this share of endpoints are healthy
    /// (0 unless set: never suspended).
    pub min_health_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Retries may be at most this share of active plus pending requests (20 unless set).
    pub percent: f64,
    /// Retries always allowed regardless of the percentage (3 unless set).
    pub min_retry_concurrency: u32,
}

impl ConnectionPool {
    /// Istio's meshConfig `connectTimeout` default.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Istio's default TCP idle timeout.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_connections: u32::MAX,
            connect_timeout: None,
            idle_timeout: None,
            tcp_keepalive: None,
            max_connection_duration: None,
            http1_max_pending_requests: u32::MAX,
            http2_max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            http_idle_timeout: None,
            max_concurrent_streams: None,
            h2_upgrade_policy: H2Upgrade::Default,
            use_client_protocol: false,
        }
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20.0,
            min_retry_concurrency: 3,
        }
    }
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        TrafficPolicy {
            load_balancer: LoadBalancer::LeastRequest,
            warmup: None,
            warmup_minimum_percent: 10.0,
            warmup_aggression: 1.0,
            connection_pool: ConnectionPool::default(),
            outlier_detection: None,
            retry_budget: None,
        }
    }
}

impl TrafficPolicy {
    /// For `/config_dump`: the load balancer always, everything else only where it differs
    /// from the default.
    pub fn dump(&self) -> Value {
        let lb = match &self.load_balancer {
            LoadBalancer::RoundRobin => json!("ROUND_ROBIN"),
            LoadBalancer::LeastRequest => json!("LEAST_REQUEST"),
            LoadBalancer::Random => json!("RANDOM"),
            LoadBalancer::Passthrough => json!("PASSTHROUGH"),
            LoadBalancer::ConsistentHash(h) => json!({
                "consistentHash": format!("{:?}", h.key),
                "algorithm": format!("{:?}", h.algorithm),
            }),
        };
        let mut m = serde_json::Map::new();
        m.insert("loadBalancer".into(), lb);
        if let Some(w) = self.warmup {
            m.insert("warmup".into(), json!(show(w)));
        }
        if self.connection_pool != ConnectionPool::default() {
            let p = &self.connection_pool;
            let mut pool = serde_json::Map::new();
            let d = ConnectionPool::default();
            let mut limit = |k: &str, v: u32, dv: u32| {
                if v != dv {
                    pool.insert(k.into(), json!(v));
                }
            };
            limit("maxConnections", p.max_connections, d.max_connections);
            limit(
                "http1MaxPendingRequests",
                p.http1_max_pending_requests,
                d.http1_max_pending_requests,
            );
            limit(
                "http2MaxRequests",
                p.http2_max_requests,
                d.http2_max_requests,
            );
            limit(
                "maxRequestsPerConnection",
                p.max_requests_per_connection,
                d.max_requests_per_connection,
            );
            limit("maxRetries", p.max_retries, d.max_retries);
            for (k, v) in [
                ("connectTimeout", p.connect_timeout),
                ("idleTimeout", p.idle_timeout),
                ("maxConnectionDuration", p.max_connection_duration),
                ("httpIdleTimeout", p.http_idle_timeout),
            ] {
                if let Some(v) = v {
                    pool.insert(k.into(), json!(show(v)));
                }
            }
            if let Some(s) = p.max_concurrent_streams {
                pool.insert("maxConcurrentStreams".into(), json!(s));
            }
            if p.h2_upgrade_policy != H2Upgrade::Default {
                pool.insert(
                    "h2UpgradePolicy".into(),
                    json!(format!("{:?}", p.h2_upgrade_policy)),
                );
            }
            if p.use_client_protocol {
                pool.insert("useClientProtocol".into(), json!(true));
            }
            if let Some(k) = p.tcp_keepalive {
                pool.insert("tcpKeepalive".into(), json!(format!("{k:?}")));
            }
            m.insert("connectionPool".into(), pool.into());
        }
        if let Some(o) = &self.outlier_detection {
            m.insert(
                "outlierDetection".into(),
                json!({
                    "consecutive5xx": o.consecutive_5xx,
                    "consecutiveGateway": o.consecutive_gateway,
                    "consecutiveLocalOrigin": o.consecutive_local_origin,
                    "interval": show(o.interval),
                    "baseEjectionTime": show(o.base_ejection_time),
                    "maxEjectionPercent": o.max_ejection_percent,
                    "minHealthPercent": o.min_health_percent,
                }),
            );
        }
        if let Some(b) = self.retry_budget {
            m.insert(
                "retryBudget".into(),
                json!({"percent": b.percent, "minRetryConcurrency": b.min_retry_concurrency}),
            );
        }
        m.into()
    }
}
