//! Istio's published samples load unchanged and compile to what Istio would do with them
//! (fixtures and their origin: `tests/istio-samples/README.md`).

use std::path::PathBuf;
use std::time::Duration;

use isthmus_config::{
    load, Abort, HttpAction, HttpRoute, LoadBalancer, Snapshot, SourceFile, TrafficPolicy,
};

fn fixture(path: &str) -> SourceFile {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/istio-samples")
        .join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()));
    SourceFile::new(path, text)
}

/// The registry, plus the given sample files.
fn bookinfo(samples: &[&str]) -> Snapshot {
    let mut files = vec![fixture("services.yaml")];
    files.extend(samples.iter().map(|s| fixture(s)));
    load(&files).unwrap_or_else(|e| panic!("{samples:?} did not load: {e}"))
}

fn routes<'a>(snap: &'a Snapshot, service: &str) -> &'a [HttpRoute] {
    let (_, port) = snap
        .http_service(service, 9080, Some("default"))
        .or_else(|| snap.http_service(service, 8000, Some("default")))
        .unwrap_or_else(|| panic!("no HTTP service {service}"));
    &port.http_routes
}

/// (subset, weight) of each destination.
fn split(route: &HttpRoute) -> Vec<(String, u32)> {
    let HttpAction::Route(ds) = &route.action else {
        panic!("not a route: {:?}", route.action)
    };
    ds.iter()
        .map(|d| (d.cluster.subset.clone().unwrap_or_default(), d.weight))
        .collect()
}

fn subsets(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(s, w)| (s.to_string(), *w)).collect()
}

const RULES: &str = "bookinfo/destination-rule-all.yaml";

#[test]
fn all_v1() {
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-all-v1.yaml"]);
    for service in ["productpage", "reviews", "ratings", "details"] {
        let r = routes(&snap, service);
        assert_eq!(split(&r[0]), subsets(&[("v1", 100)]), "{service}");
        let eps = &r[0].destinations()[0].cluster.endpoints;
        assert_eq!(eps.len(), 1, "{service}: only the v1 pod");
        assert_eq!(
            r[0].virtual_service.as_deref(),
            Some(&*format!("default/{service}"))
        );
    }
}

#[test]
fn jason_gets_v2_everyone_else_v3() {
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-reviews-jason-v2-v3.yaml"]);
    let r = routes(&snap, "reviews");
    let m = &r[0].matches[0].headers[0];
    assert_eq!(m.name, "end-user");
    assert!(m.value.as_ref().unwrap().matches("jason"));
    assert!(!m.value.as_ref().unwrap().matches("jasonx"));
    assert_eq!(split(&r[0]), subsets(&[("v2", 100)]));
    assert!(r[1].matches.is_empty());
    assert_eq!(split(&r[1]), subsets(&[("v3", 100)]));
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-reviews-test-v2.yaml"]);
    assert_eq!(split(&routes(&snap, "reviews")[1]), subsets(&[("v1", 100)]));
}

#[test]
fn weighted_splits() {
    for (file, want) in [
        (
            "virtual-service-reviews-50-v3.yaml",
            [("v1", 50), ("v3", 50)],
        ),
        (
            "virtual-service-reviews-90-10.yaml",
            [("v1", 90), ("v2", 10)],
        ),
        (
            "virtual-service-reviews-80-20.yaml",
            [("v1", 80), ("v2", 20)],
        ),
        (
            "virtual-service-reviews-v2-v3.yaml",
            [("v2", 50), ("v3", 50)],
        ),
    ] {
        let snap = bookinfo(&[RULES, &format!("bookinfo/{file}")]);
        assert_eq!(
            split(&routes(&snap, "reviews")[0]),
            subsets(&want),
            "{file}"
        );
    }
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-reviews-v3.yaml"]);
    assert_eq!(split(&routes(&snap, "reviews")[0]), subsets(&[("v3", 100)]));
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-details-v2.yaml"]);
    let d = &routes(&snap, "details")[0];
    assert_eq!(split(d), subsets(&[("v2", 100)]));
    assert!(
        d.destinations()[0].cluster.endpoints.is_empty(),
        "no v2 pod in the registry"
    );
}

#[test]
fn fault_injection() {
    // The deprecated integer `percent` still counts.
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-ratings-test-delay.yaml"]);
    let r = routes(&snap, "ratings");
    let delay = r[0].fault.as_ref().unwrap().delay.as_ref().unwrap();
    assert_eq!(
        (delay.fixed, delay.percent),
        (Duration::from_secs(7), 100.0)
    );
    assert!(r[1].fault.is_none());

    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-ratings-test-abort.yaml"]);
    let abort = routes(&snap, "ratings")[0]
        .fault
        .as_ref()
        .unwrap()
        .abort
        .clone()
        .unwrap();
    assert_eq!((abort.kind, abort.percent), (Abort::Http(500), 100.0));

    // Brings its own DestinationRule for details.
    let snap = bookinfo(&["bookinfo/fault-injection-details-v1.yaml"]);
    let abort = routes(&snap, "details")[0]
        .fault
        .as_ref()
        .unwrap()
        .abort
        .clone()
        .unwrap();
    assert_eq!((abort.kind, abort.percent), (Abort::Http(555), 100.0));
}

#[test]
fn destination_rule_policy() {
    let snap = bookinfo(&[
        "bookinfo/destination-rule-reviews.yaml",
        "bookinfo/virtual-service-reviews-v3.yaml",
    ]);
    let cluster = &routes(&snap, "reviews")[0].destinations()[0].cluster;
    assert_eq!(cluster.policy.load_balancer, LoadBalancer::Random);
    // Without a DestinationRule: Istio's defaults (LEAST_REQUEST, no limits).
    let snap = bookinfo(&[RULES, "bookinfo/virtual-service-all-v1.yaml"]);
    let cluster = &routes(&snap, "ratings")[0].destinations()[0].cluster;
    assert_eq!(*cluster.policy, TrafficPolicy::default());
}

#[test]
fn task_request_timeouts() {
    let snap = bookinfo(&[RULES, "tasks/request-timeouts.yaml"]);
    assert_eq!(
        routes(&snap, "reviews")[0].timeout,
        Some(Duration::from_millis(500))
    );
    let delay = routes(&snap, "ratings")[0]
        .fault
        .clone()
        .unwrap()
        .delay
        .unwrap();
    assert_eq!(
        (delay.fixed, delay.percent),
        (Duration::from_secs(2), 100.0)
    );
}

#[test]
fn task_circuit_breaking() {
    let snap = bookinfo(&["tasks/circuit-breaking.yaml"]);
    let policy = &routes(&snap, "httpbin")[0].destinations()[0].cluster.policy;
    let pool = &policy.connection_pool;
    assert_eq!(pool.max_connections, 1);
    assert_eq!(pool.http1_max_pending_requests, 1);
    assert_eq!(pool.max_requests_per_connection, 1);
    let o = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(o.consecutive_5xx, Some(1));
    assert_eq!(o.interval, Duration::from_secs(1));
    assert_eq!(o.base_ejection_time, Duration::from_secs(180));
    assert_eq!(o.max_ejection_percent, 100);
}

#[test]
fn task_mirroring() {
    let snap = bookinfo(&["tasks/mirroring.yaml"]);
    let r = &routes(&snap, "httpbin")[0];
    assert_eq!(split(r), subsets(&[("v1", 100)]));
    assert_eq!(r.mirrors.len(), 1);
    assert_eq!(r.mirrors[0].cluster.subset.as_deref(), Some("v2"));
    assert_eq!(r.mirrors[0].percent, 100.0);
    assert_eq!(
        r.mirrors[0].cluster.endpoints[0].addr.to_string(),
        "10.244.0.52:8080"
    );
}

#[test]
fn task_cors_retries_rewrite() {
    let snap = bookinfo(&["tasks/cors-retries-rewrite.yaml"]);
    let r = routes(&snap, "httpbin");
    assert_eq!(r[0].name.as_deref(), Some("legacy-catalog"));
    assert_eq!(r[0].matches.len(), 2);
    assert!(r[0].matches[1]
        .uri
        .as_ref()
        .unwrap()
        .matches("/consumercatalog/x"));
    assert_eq!(
        r[0].rewrite.as_ref().unwrap().uri.as_deref(),
        Some("/newcatalog")
    );
    assert_eq!(r[0].retries.attempts, 3);
    assert_eq!(
        r[0].retries.retry_on.to_string(),
        "gateway-error,connect-failure,refused-stream"
    );
    let cors = r[1].cors.as_ref().unwrap();
    assert!(cors.allow_origins[0].matches("https://example.com"));
    assert_eq!(cors.allow_methods, ["POST", "GET"]);
    assert_eq!(cors.max_age, Some(Duration::from_secs(86_400)));
    assert_eq!(cors.allow_credentials, Some(false));
    // Default retries on the route without `retries`.
    assert_eq!(r[1].retries.attempts, 2);
}
