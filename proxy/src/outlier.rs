//! Outlier detection (DestinationRule `outlierDetection`, Envoy's semantics): each endpoint's
//! consecutive errors are counted as responses and connects finish; one that reaches a
//! threshold is ejected for `baseEjectionTime` × the times it has been ejected (capped at
//! 300 s, Envoy's `max_ejection_time`), as long as no more than `maxEjectionPercent` of the
//! cluster is out (at least one may always be ejected). Ejected endpoints are skipped by the
//! balancer ([`crate::balance`]) and come back by themselves when their time is up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use isthmus_config::{now_ms, Cluster, OutlierDetection};

/// Envoy's cap on one ejection.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// How an attempt at an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// The proxy could not get a response: connect failure, reset, timeout (a "local origin"
    /// error).
    LocalFailure,
    /// Connected (TCP): a local-origin success.
    Connected,
}

/// Ejections, for `isthmus_proxy_outlier_ejections_total`; set once at start.
static EJECTIONS: std::sync::OnceLock<prometheus_client::metrics::counter::Counter> =
    std::sync::OnceLock::new();

/// Counts ejections on `counter` (the metrics registry's) from now on.
pub fn count_ejections(counter: prometheus_client::metrics::counter::Counter) {
    let _ = EJECTIONS.set(counter);
}

/// Records an attempt's outcome at `endpoint` of `cluster`; may eject it.
pub fn record(cluster: &Cluster, endpoint: usize, outcome: Outcome) {
    let Some(policy) = cluster.policy.outlier_detection.as_ref() else {
        return;
    };
    let load = cluster.load();
    let Some(e) = load.endpoints.get(endpoint) else {
        return;
    };
    let bump = |counter: &AtomicU32, threshold: Option<u32>| -> bool {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        threshold.is_some_and(|t| t > 0 && n >= t)
    };
    let reset = |counter: &AtomicU32| counter.store(0, Ordering::Relaxed);
    let trip = match outcome {
        Outcome::Status(status) if status >= 500 => {
            let gateway = matches!(status, 502..=504)
                && bump(&e.consecutive_gateway, policy.consecutive_gateway);
            if !matches!(status, 502..=504) {
                reset(&e.consecutive_gateway);
            }
            bump(&e.consecutive_5xx, policy.consecutive_5xx) || gateway
        }
        Outcome::Status(_) => {
            reset(&e.consecutive_5xx);
            reset(&e.consecutive_gateway);
            if !policy.split_external_local_origin_errors {
                reset(&e.consecutive_local);
            }
            false
        }
        Outcome::LocalFailure if policy.split_external_local_origin_errors => {
            bump(&e.consecutive_local, policy.consecutive_local_origin)
        }
        // Not split: a local failure is a 503 (Envoy maps it so), a gateway error.
        Outcome::LocalFailure => {
            let gateway = bump(&e.consecutive_gateway, policy.consecutive_gateway);
            bump(&e.consecutive_5xx, policy.consecutive_5xx) || gateway
        }
        Outcome::Connected => {
            if policy.split_external_local_origin_errors {
                reset(&e.consecutive_local);
            }
            false
        }
    };
    if trip {
        eject(cluster, endpoint, policy);
    }
}

fn eject(cluster: &Cluster, endpoint: usize, policy: &OutlierDetection) {
    let load = cluster.load();
    let now = now_ms();
    let e = &load.endpoints[endpoint];
    for counter in [
        &e.consecutive_5xx,
        &e.consecutive_gateway,
        &e.consecutive_local,
    ] {
        counter.store(0, Ordering::Relaxed);
    }
    if e.is_ejected(now) {
        return;
    }
    let n = load.endpoints.len();
    let ejected = load.endpoints.iter().filter(|e| e.is_ejected(now)).count();
    if ejected > 0 && (ejected + 1) * 100 > policy.max_ejection_percent as usize * n {
        return;
    }
    let times = e.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let duration = policy
        .base_ejection_time
        .saturating_mul(times)
        .min(MAX_EJECTION.max(policy.base_ejection_time));
    e.ejected_until_ms
        .store(now + duration.as_millis() as u64, Ordering::Relaxed);
    if let Some(counter) = EJECTIONS.get() {
        counter.inc();
    }
    tracing::info!(cluster = %cluster.name, endpoint = %cluster.endpoints[endpoint].addr,
        for_ms = duration.as_millis() as u64, times, "outlier ejected");
}

#[cfg(test)]
mod tests {
    use isthmus_config::{load, SourceFile};

    use super::*;

    fn cluster_with(outlier: &str) -> std::sync::Arc<Cluster> {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web, namespace: test}}\n\
             spec:\n  hosts: [web]\n  addresses: [10.96.0.2]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n\
             \x20 endpoints: [{{address: 10.0.0.1}}, {{address: 10.0.0.2}}, {{address: 10.0.0.3}}, {{address: 10.0.0.4}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: test}}\n\
             spec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    outlierDetection: {outlier}\n"
        );
        let snapshot = load(&[SourceFile::new("a.yaml", text)]).unwrap();
        let (_, port) = snapshot
            .service_port("10.96.0.2:80".parse().unwrap())
            .unwrap();
        port.routes[0].destinations[0].cluster.clone()
    }

    #[test]
    fn consecutive_errors_eject_within_the_percentage_and_success_resets() {
        let cluster = cluster_with("{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}");
        let now = now_ms();
        // Two 503s, a 200, two 503s: never three in a row.
        for s in [503, 503, 200, 503, 503] {
            record(&cluster, 0, Outcome::Status(s));
        }
        assert!(!cluster.load().endpoints[0].is_ejected(now));
        record(&cluster, 0, Outcome::Status(500));
        assert!(cluster.load().endpoints[0].is_ejected(now_ms()));
        // The balancer no longer picks it.
        assert!((0..40).all(|_| crate::balance::pick(&cluster, None) != Some(0)));
        // A second may go (2 of 4 = 50 %), a third may not.
        for _ in 0..3 {
            record(&cluster, 1, Outcome::LocalFailure);
            record(&cluster, 2, Outcome::LocalFailure);
        }
        let ejected: Vec<bool> = (0..4)
            .map(|i| cluster.load().endpoints[i].is_ejected(now_ms()))
            .collect();
        assert_eq!(ejected, [true, true, false, false]);
    }
}
