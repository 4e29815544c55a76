//! DestinationRule traffic policies: each `trafficPolicy` (top level, per port, per subset)
//! validated as Istio's webhook does, then merged per cluster as Istio's
//! `MergeTrafficPolicy` merges them.
//!
//! The merge works on whole components (load balancer, connection pool, outlier detection,
//! TLS), never on their fields:
//! 1. the top-level policy;
//! 2. its `portLevelSettings` entry for the cluster's port *replaces all* components (a
//!    component the entry leaves out falls back to the default, not to the top level);
//! 3. the subset's `trafficPolicy` replaces each component it sets;
//! 4. the subset's `portLevelSettings` entry for the port replaces all components again.
//!
//! `retryBudget` (not port-level in Istio) comes from the subset if set, else the top level.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::Compiler;
use crate::duration;
use crate::parse::Document;
use crate::snapshot::{
    ConnectionPool, ConsistentHash, H2Upgrade, HashAlgorithm, HashKey, LoadBalancer,
    OutlierDetection, RetryBudget, TcpKeepalive, TrafficPolicy,
};
use crate::wire;

/// One `trafficPolicy` (or port-level entry) as written: `None` = component not set.
#[derive(Debug, Clone, Default)]
pub(super) struct Layer {
    lb: Option<Balancing>,
    pool: Option<ConnectionPool>,
    outlier: Option<OutlierDetection>,
    retry_budget: Option<RetryBudget>,
    ports: Vec<(u16, Layer)>,
}

/// The load balancer component: the algorithm and its slow start.
#[derive(Debug, Clone)]
struct Balancing {
    lb: LoadBalancer,
    warmup: Option<Duration>,
    warmup_minimum_percent: f64,
    warmup_aggression: f64,
}

/// The policies of one service's DestinationRule.
#[derive(Debug, Default)]
pub(super) struct ServicePolicy {
    pub top: Option<Layer>,
    pub subsets: HashMap<String, Layer>,
}

impl Layer {
    fn port(&self, port: u16) -> Option<&Layer> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, l)| l)
    }

    /// This layer's components replacing all of `current` (a port-level entry).
    fn replace_all(&self, current: &mut Layer) {
        current.lb = self.lb.clone();
        current.pool = self.pool.clone();
        current.outlier = self.outlier.clone();
    }

    /// This layer's set components replacing those of `current` (a subset policy).
    fn override_set(&self, current: &mut Layer) {
        if self.lb.is_some() {
            current.lb = self.lb.clone();
        }
        if self.pool.is_some() {
            current.pool = self.pool.clone();
        }
        if self.outlier.is_some() {
            current.outlier = self.outlier.clone();
        }
        if self.retry_budget.is_some() {
            current.retry_budget = self.retry_budget;
        }
    }
}

impl ServicePolicy {
    /// The merged, defaulted policy of the cluster for `port` and `subset` (see the module
    /// documentation for the order).
    pub(super) fn resolve(&self, subset: Option<&str>, port: u16) -> TrafficPolicy {
        let mut merged = Layer::default();
        if let Some(top) = &self.top {
            top.override_set(&mut merged);
            if let Some(p) = top.port(port) {
                p.replace_all(&mut merged);
            }
        }
        if let Some(s) = subset.and_then(|name| self.subsets.get(name)) {
            s.override_set(&mut merged);
            if let Some(p) = s.port(port) {
                p.replace_all(&mut merged);
            }
        }
        let defaults = TrafficPolicy::default();
        let lb = merged.lb.unwrap_or(Balancing {
            lb: defaults.load_balancer,
            warmup: defaults.warmup,
            warmup_minimum_percent: defaults.warmup_minimum_percent,
            warmup_aggression: defaults.warmup_aggression,
        });
        TrafficPolicy {
            load_balancer: lb.lb,
            warmup: lb.warmup,
            warmup_minimum_percent: lb.warmup_minimum_percent,
            warmup_aggression: lb.warmup_aggression,
            connection_pool: merged.pool.unwrap_or_default(),
            outlier_detection: merged.outlier,
            retry_budget: merged.retry_budget,
        }
    }
}

impl Compiler {
    /// Validates and compiles one `trafficPolicy`; `ports` are the service's port numbers.
    pub(super) fn traffic_policy(
        &mut self,
        doc: &Document,
        field: &str,
        tp: &wire::TrafficPolicy,
        ports: &[u16],
    ) -> Layer {
        if tp.load_balancer.is_none()
            && tp.connection_pool.is_none()
            && tp.outlier_detection.is_none()
            && tp.tls.is_none()
            && tp.port_level_settings.is_empty()
            && tp.tunnel.is_none()
            && tp.proxy_protocol.is_none()
            && tp.retry_budget.is_none()
        {
            self.issue(doc, field, "traffic policy must have at least one field");
        }
        if tp.tunnel.is_some() {
            self.issue(
                doc,
                format!("{field}.tunnel"),
                "tunnel is not supported: isthmus does not tunnel upstream connections",
            );
        }
        if tp.proxy_protocol.is_some() {
            self.issue(
                doc,
                format!("{field}.proxyProtocol"),
                "proxyProtocol is not supported yet",
            );
        }
        let mut layer = self.components(
            doc,
            field,
            tp.load_balancer.as_ref(),
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
            tp.tls.as_ref(),
        );
        layer.retry_budget = tp.retry_budget.as_ref().and_then(|b| {
            let d = RetryBudget::default();
            let percent = match b.percent {
                Some(p) => self.percent(doc, &format!("{field}.retryBudget.percent"), p)?,
                None => d.percent,
            };
            Some(RetryBudget {
                percent,
                min_retry_concurrency: b.min_retry_concurrency.unwrap_or(d.min_retry_concurrency),
            })
        });
        let mut seen = HashSet::new();
        for (i, pl) in tp.port_level_settings.iter().enumerate() {
            let pfield = format!("{field}.portLevelSettings[{i}]");
            let Some(sel) = &pl.port else {
                self.issue(doc, &pfield, "portTrafficPolicy must have valid port");
                continue;
            };
            let Some(port) = self.port_number(doc, &format!("{pfield}.port.number"), sel.number)
            else {
                continue;
            };
            if !ports.contains(&port) {
                self.issue(
                    doc,
                    format!("{pfield}.port.number"),
                    format!("the host has no port {port}"),
                );
            }
            if !seen.insert(port) {
                self.issue(
                    doc,
                    format!("{pfield}.port.number"),
                    format!("duplicate port {port}"),
                );
            }
            if pl.load_balancer.is_none()
                && pl.connection_pool.is_none()
                && pl.outlier_detection.is_none()
                && pl.tls.is_none()
            {
                self.issue(
                    doc,
                    &pfield,
                    "port traffic policy must have at least one field",
                );
            }
            let port_layer = self.components(
                doc,
                &pfield,
                pl.load_balancer.as_ref(),
                pl.connection_pool.as_ref(),
                pl.outlier_detection.as_ref(),
                pl.tls.as_ref(),
            );
            layer.ports.push((port, port_layer));
        }
        layer
    }

    fn components(
        &mut self,
        doc: &Document,
        field: &str,
        lb: Option<&wire::LoadBalancerSettings>,
        pool: Option<&wire::ConnectionPoolSettings>,
        outlier: Option<&wire::OutlierDetection>,
        tls: Option<&wire::ClientTlsSettings>,
    ) -> Layer {
        if let Some(tls) = tls {
            self.client_tls(doc, &format!("{field}.tls"), tls);
        }
        Layer {
            lb: lb.and_then(|lb| self.load_balancer(doc, &format!("{field}.loadBalancer"), lb)),
            pool: pool.map(|p| self.connection_pool(doc, &format!("{field}.connectionPool"), p)),
            outlier: outlier
                .map(|o| self.outlier_detection(doc, &format!("{field}.outlierDetection"), o)),
            retry_budget: None,
            ports: Vec::new(),
        }
    }

    /// Every TLS field parses; only plaintext (`DISABLE`, the default) is implemented.
    fn client_tls(&mut self, doc: &Document, field: &str, tls: &wire::ClientTlsSettings) {
        match tls.mode {
            None | Some(wire::TlsMode::Disable) => {}
            Some(mode) => self.issue(
                doc,
                format!("{field}.mode"),
                format!(
                    "TLS mode {mode:?} is not supported yet: mTLS arrives with issue 9 \
                     (only DISABLE is accepted)"
                ),
            ),
        }
    }

    fn load_balancer(
        &mut self,
        doc: &Document,
        field: &str,
        lb: &wire::LoadBalancerSettings,
    ) -> Option<Balancing> {
        let before = self.issues.len();
        let algorithm = match (&lb.simple, &lb.consistent_hash) {
            (Some(_), Some(_)) => {
                self.issue(
                    doc,
                    field,
                    "only one of simple or consistentHash may be set",
                );
                None
            }
            (_, Some(ch)) => self
                .consistent_hash(doc, &format!("{field}.consistentHash"), ch)
                .map(LoadBalancer::ConsistentHash),
            (Some(wire::SimpleLb::RoundRobin), None) => Some(LoadBalancer::RoundRobin),
            (Some(wire::SimpleLb::Random), None) => Some(LoadBalancer::Random),
            (Some(wire::SimpleLb::Passthrough), None) => Some(LoadBalancer::Passthrough),
            // UNSPECIFIED, LEAST_CONN (deprecated alias) and LEAST_REQUEST: Istio's default.
            (_, None) => Some(LoadBalancer::LeastRequest),
        };
        if let Some(loc) = &lb.locality_lb_setting {
            self.locality(doc, &format!("{field}.localityLbSetting"), loc);
        }
        let defaults = TrafficPolicy::default();
        let mut balancing = Balancing {
            lb: algorithm?,
            warmup: None,
            warmup_minimum_percent: defaults.warmup_minimum_percent,
            warmup_aggression: defaults.warmup_aggression,
        };
        if let Some(w) = &lb.warmup {
            let wfield = format!("{field}.warmup");
            match w.duration.as_deref() {
                Some(text) => {
                    balancing.warmup = self.duration(doc, &format!("{wfield}.duration"), text)
                }
                None => self.issue(doc, format!("{wfield}.duration"), "duration is required"),
            }
            if let Some(p) = w.minimum_percent {
                balancing.warmup_minimum_percent = self
                    .percent(doc, &format!("{wfield}.minimumPercent"), p)
                    .unwrap_or(0.0);
            }
            if let Some(a) = w.aggression {
                if a < 1.0 {
                    self.issue(
                        doc,
                        format!("{wfield}.aggression"),
                        "aggression should be greater than or equal to 1",
                    );
                }
                balancing.warmup_aggression = a;
            }
        } else if let Some(text) = &lb.warmup_duration_secs {
            balancing.warmup = self.duration(doc, &format!("{field}.warmupDurationSecs"), text);
        }
        (self.issues.len() == before).then_some(balancing)
    }

    fn consistent_hash(
        &mut self,
        doc: &Document,
        field: &str,
        ch: &wire::ConsistentHashLb,
    ) -> Option<ConsistentHash> {
        let mut keys = Vec::new();
        if let Some(h) = &ch.http_header_name {
            keys.push(HashKey::Header(h.to_ascii_lowercase()));
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                self.issue(
                    doc,
                    format!("{field}.httpCookie.name"),
                    "name required for HttpCookie",
                );
            }
            let ttl = c.ttl.as_deref().and_then(|t| match duration::parse(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.issue(doc, format!("{field}.httpCookie.ttl"), e);
                    None
                }
            });
            keys.push(HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl,
                attributes: c
                    .attributes
                    .iter()
                    .map(|a| (a.name.clone(), a.value.clone()))
                    .collect(),
            });
        }
        if ch.use_source_ip == Some(true) {
            keys.push(HashKey::SourceIp);
        }
        if let Some(q) = &ch.http_query_parameter_name {
            keys.push(HashKey::QueryParameter(q.clone()));
        }
        let names = "httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName";
        if keys.len() != 1 {
            let message = if keys.is_empty() {
                format!("consistentHash needs one of {names}")
            } else {
                format!("only one of {names} may be set")
            };
            self.issue(doc, field, message);
            return None;
        }
        let algorithm = match (ch.minimum_ring_size, &ch.ring_hash, &ch.maglev) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                self.issue(
                    doc,
                    field,
                    "only one of minimumRingSize or maglev/ringHash can be specified",
                );
                return None;
            }
            (_, Some(_), Some(_)) => {
                self.issue(doc, field, "only one of ringHash or maglev may be set");
                return None;
            }
            (_, _, Some(m)) => {
                let size = m.table_size.unwrap_or(0);
                let f = format!("{field}.maglev.tableSize");
                if size == 0 {
                    self.issue(doc, &f, "tableSize must be set for maglev");
                    return None;
                }
                if size >= 5_000_011 {
                    self.issue(doc, &f, "tableSize must be less than 5000011 for maglev");
                    return None;
                }
                if !is_prime(size) {
                    self.issue(doc, &f, "tableSize must be a prime number for maglev");
                    return None;
                }
                HashAlgorithm::Maglev { table_size: size }
            }
            (deprecated, ring, None) => {
                let size = ring
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(deprecated);
                HashAlgorithm::RingHash {
                    minimum_ring_size: size.filter(|s| *s > 0).unwrap_or(1024),
                }
            }
        };
        Some(ConsistentHash {
            key: keys.pop()?,
            algorithm,
        })
    }

    /// Parsed and checked, not applied: a sidecar's endpoints are one locality (docs/CONFIG.md).
    fn locality(&mut self, doc: &Document, field: &str, loc: &wire::LocalityLbSetting) {
        if !loc.distribute.is_empty() && !loc.failover.is_empty() {
            self.issue(
                doc,
                field,
                "can not simultaneously set distribute and failover",
            );
        }
        for (i, d) in loc.distribute.iter().enumerate() {
            let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            if sum != 100 {
                self.issue(
                    doc,
                    format!("{field}.distribute[{i}].to"),
                    format!("total weight {sum} != 100"),
                );
            }
        }
    }

    fn connection_pool(
        &mut self,
        doc: &Document,
        field: &str,
        cp: &wire::ConnectionPoolSettings,
    ) -> ConnectionPool {
        let mut pool = ConnectionPool::default();
        if cp.tcp.is_none() && cp.http.is_none() {
            self.issue(doc, field, "connection pool must have at least one field");
        }
        if let Some(tcp) = &cp.tcp {
            let f = format!("{field}.tcp");
            if let Some(n) = self.limit(doc, &format!("{f}.maxConnections"), tcp.max_connections) {
                pool.max_connections = n;
            }
            pool.connect_timeout =
                self.opt_duration(doc, &format!("{f}.connectTimeout"), &tcp.connect_timeout);
            pool.max_connection_duration = self.opt_duration(
                doc,
                &format!("{f}.maxConnectionDuration"),
                &tcp.max_connection_duration,
            );
            // `0s` disables the idle timeout (Istio skips its bounds check for it).
            pool.idle_timeout = match tcp.idle_timeout.as_deref().map(duration::parse) {
                Some(Ok(d)) if d.is_zero() => Some(d),
                Some(_) => self.opt_duration(doc, &format!("{f}.idleTimeout"), &tcp.idle_timeout),
                None => None,
            };
            if let Some(ka) = &tcp.tcp_keepalive {
                pool.tcp_keepalive = Some(TcpKeepalive {
                    probes: ka.probes,
                    time: self.opt_duration(doc, &format!("{f}.tcpKeepalive.time"), &ka.time),
                    interval: self.opt_duration(
                        doc,
                        &format!("{f}.tcpKeepalive.interval"),
                        &ka.interval,
                    ),
                });
            }
        }
        if let Some(http) = &cp.http {
            let f = format!("{field}.http");
            if let Some(n) = self.limit(
                doc,
                &format!("{f}.http1MaxPendingRequests"),
                http.http1_max_pending_requests,
            ) {
                pool.http1_max_pending_requests = n;
            }
            if let Some(n) = self.limit(
                doc,
                &format!("{f}.http2MaxRequests"),
                http.http2_max_requests,
            ) {
                pool.http2_max_requests = n;
            }
            if let Some(n) = self.limit(
                doc,
                &format!("{f}.maxRequestsPerConnection"),
                http.max_requests_per_connection,
            ) {
                pool.max_requests_per_connection = n;
            }
            if let Some(n) = self.limit(doc, &format!("{f}.maxRetries"), http.max_retries) {
                pool.max_retries = n;
            }
            pool.max_concurrent_streams = self.limit(
                doc,
                &format!("{f}.maxConcurrentStreams"),
                http.max_concurrent_streams,
            );
            pool.http_idle_timeout =
                self.opt_duration(doc, &format!("{f}.idleTimeout"), &http.idle_timeout);
            pool.h2_upgrade_policy = match http.h2_upgrade_policy {
                None | Some(wire::H2UpgradePolicy::Default) => H2Upgrade::Default,
                Some(wire::H2UpgradePolicy::DoNotUpgrade) => H2Upgrade::DoNotUpgrade,
                Some(wire::H2UpgradePolicy::Upgrade) => H2Upgrade::Upgrade,
            };
            pool.use_client_protocol = http.use_client_protocol.unwrap_or(false);
            if pool.use_client_protocol && pool.h2_upgrade_policy == H2Upgrade::Upgrade {
                self.issue(
                    doc,
                    &f,
                    "use client protocol must not be true when h2UpgradePolicy is UPGRADE",
                );
            }
        }
        pool
    }

    /// An Istio int32 limit: negative is an error, 0 means "unset" (`None`).
    fn limit(&mut self, doc: &Document, field: &str, value: Option<i64>) -> Option<u32> {
        match value {
            Some(v) if v < 0 => {
                self.issue(doc, field, "must be non-negative");
                None
            }
            Some(v) if v > i64::from(i32::MAX) => {
                self.issue(
                    doc,
                    field,
                    format!("{v} is out of range (at most 2147483647)"),
                );
                None
            }
            Some(0) | None => None,
            Some(v) => Some(v as u32),
        }
    }

    fn opt_duration(
        &mut self,
        doc: &Document,
        field: &str,
        text: &Option<String>,
    ) -> Option<Duration> {
        text.as_deref().and_then(|t| self.duration(doc, field, t))
    }

    fn outlier_detection(
        &mut self,
        doc: &Document,
        field: &str,
        od: &wire::OutlierDetection,
    ) -> OutlierDetection {
        let mut out = OutlierDetection::default();
        let split = od.split_external_local_origin_errors.unwrap_or(false);
        if !split && od.consecutive_local_origin_failures.is_some_and(|n| n > 0) {
            self.issue(
                doc,
                format!("{field}.consecutiveLocalOriginFailures"),
                "outlier detection consecutive local origin failures is specified, but split \
                 external local origin errors is set to false",
            );
        }
        // The deprecated `consecutiveErrors` counts gateway errors only, as in Istio.
        match od.consecutive_errors {
            Some(n) if n < 0 => self.issue(
                doc,
                format!("{field}.consecutiveErrors"),
                "must be non-negative",
            ),
            Some(n) if n > 0 => {
                out.consecutive_gateway = Some(u32::try_from(n).unwrap_or(u32::MAX));
                out.consecutive_5xx = None;
            }
            _ => {}
        }
        if let Some(n) = od.consecutive_5xx_errors {
            out.consecutive_5xx = (n > 0).then_some(n);
        }
        if let Some(n) = od.consecutive_gateway_errors {
            out.consecutive_gateway = (n > 0).then_some(n);
        }
        out.split_external_local_origin_errors = split;
        if split {
            out.consecutive_local_origin = Some(
                od.consecutive_local_origin_failures
                    .filter(|n| *n > 0)
                    .unwrap_or(5),
            );
        }
        if let Some(d) = self.opt_duration(doc, &format!("{field}.interval"), &od.interval) {
            out.interval = d;
        }
        if let Some(d) = self.opt_duration(
            doc,
            &format!("{field}.baseEjectionTime"),
            &od.base_ejection_time,
        ) {
            out.base_ejection_time = d;
        }
        if let Some(p) = self.whole_percent(
            doc,
            &format!("{field}.maxEjectionPercent"),
            od.max_ejection_percent,
        ) {
            if p > 0 {
                out.max_ejection_percent = p;
            }
        }
        if let Some(p) = self.whole_percent(
            doc,
            &format!("{field}.minHealthPercent"),
            od.min_health_percent,
        ) {
            out.min_health_percent = p;
        }
        out
    }

    fn whole_percent(&mut self, doc: &Document, field: &str, value: Option<i64>) -> Option<u32> {
        let v = value?;
        if (0..=100).contains(&v) {
            Some(v as u32)
        } else {
            self.issue(doc, field, format!("percentage {v} is not in range 0..100"));
            None
        }
    }
}

/// Envoy's primality test for Maglev table sizes (Istio copies it).
fn is_prime(x: u64) -> bool {
    if x != 0 && x < 4 {
        return true;
    }
    if x & 1 == 0 {
        return false;
    }
    let mut factor = 3;
    while factor * factor <= x {
        if x.is_multiple_of(factor) {
            return false;
        }
        factor += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::is_prime;

    #[test]
    fn maglev_sizes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(3));
        assert!(!is_prime(65536) && !is_prime(9) && !is_prime(0));
    }
}
