//! Prometheus metrics. TCP metrics use Istio's standard names and labels so that existing
//! dashboards work; isthmus's own families are prefixed `isthmus_`. Handles are fetched once
//! per connection, never per byte.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value shared between series without copying.
pub type Value = Arc<str>;

/// Istio's TCP metric labels (istio.io "Istio Standard Metrics"), in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Value,
    pub source_workload: Value,
    pub source_canonical_service: Value,
    pub source_canonical_revision: Value,
    pub source_workload_namespace: Value,
    pub source_principal: Value,
    pub source_app: Value,
    pub source_version: Value,
    pub source_cluster: Value,
    pub destination_workload: Value,
    pub destination_workload_namespace: Value,
    pub destination_principal: Value,
    pub destination_app: Value,
    pub destination_version: Value,
    pub destination_service: Value,
    pub destination_canonical_service: Value,
    pub destination_canonical_revision: Value,
    pub destination_service_name: Value,
    pub destination_service_namespace: Value,
    pub destination_cluster: Value,
    pub request_protocol: Value,
    pub response_flags: Value,
    pub connection_security_policy: Value,
}

/// Istio's request metric labels: the connection's, plus the response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    #[prometheus(flatten)]
    pub tcp: TcpLabels,
    pub response_code: u16,
    /// gRPC's status code; empty for requests that are not gRPC.
    pub grpc_response_status: Option<u32>,
}

/// Envoy's default histogram buckets, in milliseconds (Istio's request duration).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// Istio's size buckets: powers of ten from 1 byte to 100 MB.
fn size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Istio's request metrics.
#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration_ms: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    /// gRPC messages (length-prefixed frames in the body), for gRPC requests only.
    pub request_messages: Family<HttpLabels, Counter>,
    pub response_messages: Family<HttpLabels, Counter>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            request_messages: Family::default(),
            response_messages: Family::default(),
        }
    }
}

/// The series of one label set, fetched once and reused by the requests that share it.
#[derive(Clone)]
pub struct HttpHandles {
    pub requests: Counter,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
    /// Request and response message counters: gRPC series only (`None` for plain HTTP, so
    /// no empty message series are exported for it).
    pub messages: Option<(Counter, Counter)>,
}

impl HttpMetrics {
    pub fn handles(&self, labels: &HttpLabels) -> HttpHandles {
        HttpHandles {
            requests: self.requests.get_or_create_owned(labels),
            duration_ms: self.duration_ms.get_or_create_owned(labels),
            request_bytes: self.request_bytes.get_or_create_owned(labels),
            response_bytes: self.response_bytes.get_or_create_owned(labels),
            messages: labels.grpc_response_status.is_some().then(|| {
                (
                    self.request_messages.get_or_create_owned(labels),
                    self.response_messages.get_or_create_owned(labels),
                )
            }),
        }
    }
}

/// Protocol detection outcomes per port (`http1`, `h2`, `tcp`, `timeout`, `closed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectionLabels {
    pub direction: &'static str,
    pub port: u16,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
}

/// A connection the proxy closed without relaying it, and why (`limit`, `no_config`,
/// `not_redirected`, `no_original_dst`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// A relayed connection ended by one of the proxy's bounds (`idle`, `half_close`, `drain`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub direction: &'static str,
    pub timeout: &'static str,
}

/// Every metric family the proxy exports.
pub struct Metrics {
    pub registry: Registry,
    pub tcp: TcpMetrics,
    pub http: HttpMetrics,
    pub detection: Family<DetectionLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub config_version: Family<VersionLabels, Gauge>,
    pub config_last_success: Gauge<f64, AtomicU64>,
    pub io_backend: Family<BackendLabels, Gauge>,
    pub active_connections: Gauge,
    pub http_idle_connections: Gauge,
    pub outlier_ejections: Counter,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub accept_errors: Family<DirectionLabels, Counter>,
    pub connection_timeouts: Family<TimeoutLabels, Counter>,
    pub admin_refused: Counter,
    pub relay_buffer_bytes: Gauge,
    /// Unix time the workload certificate expires; 0 while the sidecar holds none.
    pub certificate_expiry: Gauge<f64, AtomicU64>,
    /// Certificate requests to the CA by result (`success`, `denied`, `unavailable`,
    /// `invalid`, `local_error`).
    pub certificate_requests: Family<ResultLabels, Counter>,
}

#[derive(Clone, Default)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
}

/// The counters of one connection's label set, fetched when the connection is routed.
pub struct TcpHandles {
    pub closed: Counter,
    /// Bytes sent to the client (Istio: "sent" from the server side of the reporter).
    pub sent: Counter,
    pub received: Counter,
}

impl TcpMetrics {
    pub fn open(&self, labels: &TcpLabels) -> TcpHandles {
        self.opened.get_or_create(labels).inc();
        TcpHandles {
            closed: self.closed.get_or_create_owned(labels),
            sent: self.sent_bytes.get_or_create_owned(labels),
            received: self.received_bytes.get_or_create_owned(labels),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client side of the connection",
            tcp.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client side of the connection",
            tcp.received_bytes.clone(),
        );
        let http = HttpMetrics::default();
        registry.register(
            "istio_requests",
            "Requests, by response code and flags",
            http.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's first byte to the response's last",
            http.duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            http.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            http.response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages sent by the client",
            http.request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages sent by the server",
            http.response_messages.clone(),
        );
        let detection = Family::<DetectionLabels, Counter>::default();
        registry.register(
            "isthmus_proxy_protocol_detection",
            "Protocol detection outcomes per port: http1, h2, tcp (sniffed, not HTTP), timeout \
             (relayed as TCP), closed",
            detection.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "isthmus_config_reloads",
            "Config reload attempts by result (success or failure)",
            config_reloads.clone(),
        );
        let config_version = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "isthmus_config_version",
            "The loaded config version (content hash), value 1",
            config_version.clone(),
        );
        let config_last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "isthmus_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load",
            config_last_success.clone(),
        );
        let io_backend = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "isthmus_proxy_io_backend",
            "The data path's I/O backend (io_uring or epoll), value 1",
            io_backend.clone(),
        );
        let active_connections = Gauge::default();
        registry.register(
            "isthmus_proxy_active_connections",
            "Connections being relayed now",
            active_connections.clone(),
        );
        let http_idle_connections = Gauge::default();
        registry.register(
            "isthmus_proxy_http_idle_connections",
            "Client connections open between HTTP requests (keep-alive, no request in flight); \
             included in isthmus_proxy_active_connections",
            http_idle_connections.clone(),
        );
        let outlier_ejections = Counter::default();
        registry.register(
            "isthmus_proxy_outlier_ejections",
            "Endpoints ejected by outlier detection (DestinationRule outlierDetection)",
            outlier_ejections.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "isthmus_proxy_connections_refused",
            "Connections closed at once, by reason: limit (connection cap), no_config (no config \
             loaded: fail closed), not_redirected, no_original_dst",
            connections_refused.clone(),
        );
        let accept_errors = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "isthmus_proxy_accept_errors",
            "Failed accepts (e.g. out of file descriptors)",
            accept_errors.clone(),
        );
        let connection_timeouts = Family::<TimeoutLabels, Counter>::default();
        registry.register(
            "isthmus_proxy_connection_timeouts",
            "Relayed connections ended by a bound: idle, half_close, drain",
            connection_timeouts.clone(),
        );
        let admin_refused = Counter::default();
        registry.register(
            "isthmus_admin_connections_refused",
            "Admin, readiness and scrape connections refused over the cap",
            admin_refused.clone(),
        );
        let relay_buffer_bytes = Gauge::default();
        registry.register(
            "isthmus_proxy_relay_buffer_bytes",
            "Bytes held in relay buffers (they grow for bulk transfers and shrink when idle)",
            relay_buffer_bytes.clone(),
        );
        let certificate_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "isthmus_proxy_certificate_expiry_timestamp_seconds",
            "Unix time the workload certificate expires (0: none held)",
            certificate_expiry.clone(),
        );
        let certificate_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "isthmus_proxy_certificate_requests",
            "Workload certificate requests to the CA by result: success, denied (the CA \
             refused: 4xx), unavailable (unreachable, TLS failed, 5xx, timeout), invalid (an \
             answer not for this identity or key), local_error (token or root unreadable)",
            certificate_requests.clone(),
        );
        Metrics {
            registry,
            certificate_expiry,
            certificate_requests,
            relay_buffer_bytes,
            connections_refused,
            accept_errors,
            connection_timeouts,
            admin_refused,
            tcp,
            http,
            detection,
            config_reloads,
            config_version,
            config_last_success,
            io_backend,
            active_connections,
            http_idle_connections,
            outlier_ejections,
        }
    }

    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }

    /// OpenMetrics text for the scrape endpoint.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
