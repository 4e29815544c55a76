//! HTTP routes and traffic policies: compiled shapes, defaults, precedence, and one table of
//! every validation message.

use std::time::Duration;

use crate::snapshot::{
    Abort, HashAlgorithm, HashKey, HttpAction, LoadBalancer, RetryPolicy, StringMatch,
    TrafficPolicy, L7,
};
use crate::{load, ServicePort, Snapshot, SourceFile};

const SERVICES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  addresses: [10.96.0.10]
  ports:
  - {number: 9080, name: http}
  - {number: 9090, name: grpc-admin}
  - {number: 5432, name: tcp-db}
  - {number: 7000, name: misc}
  resolution: STATIC
  endpoints:
  - {address: 10.66.0.1, labels: {version: v1}}
  - {address: 10.66.0.2, labels: {version: v2}}
  - {address: 10.66.0.3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  addresses: [10.96.0.11]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.66.0.9, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [api.example.com, www.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#;

const SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#;

fn snapshot(extra: &str) -> Result<Snapshot, Vec<String>> {
    load(&[
        SourceFile::new("registry.yaml", SERVICES),
        SourceFile::new("subsets.yaml", SUBSETS),
        SourceFile::new("routes.yaml", extra),
    ])
    .map_err(|e| e.issues())
}

fn port<'a>(snap: &'a Snapshot, host: &str, number: u16) -> &'a ServicePort {
    snap.http_service(host, number, Some("shop"))
        .map(|(_, p)| p)
        .or_else(|| {
            snap.services()
                .iter()
                .find(|s| s.host() == host)
                .and_then(|s| s.ports.iter().find(|p| p.number == number))
        })
        .unwrap_or_else(|| panic!("no {host}:{number}"))
}

fn cluster_names(action: &HttpAction) -> Vec<(String, u32)> {
    match action {
        HttpAction::Route(ds) => ds
            .iter()
            .map(|d| (d.cluster.name.to_string(), d.weight))
            .collect(),
        other => panic!("not a route: {other:?}"),
    }
}

const VS_HEADER: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,gateway-error,429"}
"#;

#[test]
fn http_routes_compile_per_http_port_with_a_catch_all() {
    let snap = snapshot(VS_HEADER).unwrap();
    let http = port(&snap, "reviews.shop.svc.cluster.local", 9080);
    assert_eq!(http.l7(), L7::Http1, "the port name `http` selects HTTP");
    assert!(http.http_routes.len() >= 2);
    let jason = &http.http_routes[0];
    assert_eq!(jason.name.as_deref(), Some("jason"));
    assert_eq!(jason.virtual_service.as_deref(), Some("shop/reviews"));
    let h = &jason.matches[0].headers[0];
    assert_eq!(h.name, "end-user");
    assert!(h.value.as_ref().unwrap().matches("jason"));
    assert_eq!(
        cluster_names(&jason.action),
        [(
            "outbound|9080|v2|reviews.shop.svc.cluster.local".into(),
            100
        )]
    );
    assert_eq!(
        jason.retries,
        RetryPolicy::default(),
        "Istio's default policy"
    );
    assert_eq!(jason.timeout, None);

    let split = &http.http_routes[1];
    assert_eq!(cluster_names(&split.action)[1].1, 10);
    assert_eq!(split.timeout, Some(Duration::from_millis(500)));
    assert_eq!(split.retries.attempts, 3);
    assert_eq!(split.retries.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        split.retries.retry_on.to_string(),
        "5xx,gateway-error,retriable-status-codes,429"
    );

    // A port no VirtualService routes gets the implicit route to the whole service.
    let ratings = &port(&snap, "ratings.shop.svc.cluster.local", 9080).http_routes;
    assert_eq!(ratings.len(), 1);
    assert!(ratings[0].virtual_service.is_none() && ratings[0].matches.is_empty());
    assert_eq!(ratings[0].retries, RetryPolicy::default());
    assert_eq!(
        cluster_names(&ratings[0].action),
        [("outbound|9080||ratings.shop.svc.cluster.local".into(), 100)]
    );
    // grpc-* names HTTP/2; tcp-* is opaque and gets no HTTP routes; `misc` is sniffed.
    let reviews = &snap.services()[0];
    let by = |n: u16| reviews.ports.iter().find(|p| p.number == n).unwrap();
    assert_eq!(by(9090).l7(), L7::Http2);
    assert_eq!(
        by(9090).http_routes[0].name.as_deref(),
        Some("jason"),
        "the VS applies to every HTTP port"
    );
    assert_eq!(by(5432).l7(), L7::Opaque);
    assert!(by(5432).http_routes.is_empty());
    assert_eq!(by(7000).l7(), L7::Detect);
    assert_eq!(
        port(&snap, "ratings.shop.svc.cluster.local", 9080).l7(),
        L7::Http1
    );
}

#[test]
fn hosts_resolve_like_envoy_virtual_hosts() {
    let snap = snapshot("").unwrap();
    let host = |h: &str, p: u16, ns: Option<&str>| {
        snap.http_service(h, p, ns)
            .map(|(s, port)| (s.host().to_string(), port.number))
    };
    let reviews = Some(("reviews.shop.svc.cluster.local".to_string(), 9080));
    assert_eq!(host("reviews.shop.svc.cluster.local", 9080, None), reviews);
    assert_eq!(
        host("Reviews.Shop.svc.cluster.local.:9080", 9080, None),
        reviews
    );
    assert_eq!(host("reviews.shop.svc", 9080, Some("other")), reviews);
    assert_eq!(host("reviews.shop", 9080, Some("other")), reviews);
    assert_eq!(host("reviews", 9080, Some("shop")), reviews);
    assert_eq!(host("reviews", 9080, None), reviews, "unambiguous");
    assert_eq!(host("reviews", 9080, Some("other")), None);
    assert_eq!(
        host("reviews:9081", 9080, None),
        None,
        "the port must agree"
    );
    assert_eq!(host("reviews.shop", 5432, None), None, "opaque port");
    assert_eq!(
        host("www.example.com", 80, None),
        Some(("api.example.com".into(), 80))
    );
    assert_eq!(host("example.com", 80, None), None);
    assert_eq!(host("[::1]:80", 80, None), None);
    assert!(snap.has_http_hosts_on(80) && snap.has_http_hosts_on(7000));
    assert!(!snap.has_http_hosts_on(5432));
}

#[test]
fn actions_faults_mirrors_cors_and_rewrites() {
    let snap = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /old}, ignoreUriCase: true}]
    redirect: {uri: /new, authority: ratings.example, redirectCode: 308}
  - match: [{uri: {exact: /teapot}, method: {exact: GET}}, {queryParams: {brew: {}}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - match: [{uri: {regex: "/v[0-9]+/.*"}}]
    rewrite: {uriRegexRewrite: {match: "^/v([0-9]+)/", rewrite: "/api/\\1/"}}
    route: [{destination: {host: ratings}}]
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 100.0}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}
    mirror: {host: reviews, subset: v1, port: {number: 9080}}
    mirrorPercentage: {value: 25.5}
    corsPolicy:
      allowOrigins: [{exact: "https://example.com"}, {regex: ".*\\.example\\.org"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    headers:
      request: {set: {X-Env: prod, ":authority": internal}, remove: [x-debug]}
  - route: [{destination: {host: ratings}, headers: {response: {add: {x-via: isthmus}}}}]
    fault: {abort: {httpStatus: 503}}
    retries: {attempts: 0}
"#,
    )
    .unwrap();
    let routes = &port(&snap, "ratings.shop.svc.cluster.local", 9080).http_routes;
    let HttpAction::Redirect(r) = &routes[0].action else {
        panic!("{:?}", routes[0].action)
    };
    assert_eq!((r.uri.as_deref(), r.code), (Some("/new"), 308));
    assert!(routes[0].matches[0].ignore_uri_case);
    let HttpAction::DirectResponse { status, body } = &routes[1].action else {
        panic!()
    };
    assert_eq!(
        (*status, body.as_deref()),
        (418, Some(&b"short and stout"[..]))
    );
    assert!(
        routes[1].matches[1].query_params[0].1.is_none(),
        "{{}} = present"
    );

    let r = &routes[2];
    let re = r.matches[0].uri.as_ref().unwrap();
    assert!(re.matches("/v2/x") && !re.matches("/x/v2/x"));
    let (regex, to) = r.rewrite.as_ref().unwrap().uri_regex.as_ref().unwrap();
    assert_eq!(
        regex.replace_all("/v2/ratings", to.as_str()),
        "/api/2/ratings"
    );
    let fault = r.fault.as_ref().unwrap();
    assert_eq!(fault.delay.as_ref().unwrap().fixed, Duration::from_secs(7));
    assert_eq!(fault.abort.as_ref().unwrap().kind, Abort::Grpc(14));
    assert_eq!(fault.abort.as_ref().unwrap().percent, 10.0);
    assert_eq!(r.mirrors[0].percent, 25.5);
    assert_eq!(
        &*r.mirrors[0].cluster.name,
        "outbound|9080|v1|reviews.shop.svc.cluster.local"
    );
    let cors = r.cors.as_ref().unwrap();
    assert!(cors.allow_origins[1].matches("https://a.example.org"));
    assert_eq!(cors.max_age, Some(Duration::from_secs(86_400)));
    assert!(!cors.unmatched_preflights_forward);
    assert_eq!(
        r.request_headers.set,
        [
            ("host".to_string(), "internal".to_string()),
            ("x-env".into(), "prod".into())
        ]
    );
    assert_eq!(r.request_headers.remove, ["x-debug"]);

    let last = &routes[3];
    assert_eq!(last.retries.attempts, 0);
    let abort = last.fault.as_ref().unwrap().abort.as_ref().unwrap();
    assert_eq!(
        (abort.kind, abort.percent),
        (Abort::Http(503), 0.0),
        "no percentage: none"
    );
    let HttpAction::Route(ds) = &last.action else {
        panic!()
    };
    assert_eq!(
        ds[0].response_headers.add,
        [("x-via".to_string(), "isthmus".to_string())]
    );
}

fn policy_of(snap: &Snapshot, subset: Option<&str>, number: u16) -> TrafficPolicy {
    let p = snap.services()[0]
        .ports
        .iter()
        .find(|p| p.number == number)
        .unwrap();
    let want = format!(
        "outbound|{number}|{}|reviews.shop.svc.cluster.local",
        subset.unwrap_or("")
    );
    for route in &p.http_routes {
        for c in route.clusters() {
            if *c.name == want {
                return (*c.policy).clone();
            }
        }
    }
    panic!("no cluster {want}")
}

#[test]
fn traffic_policy_defaults_and_precedence() {
    // Without a trafficPolicy: Istio's defaults.
    let snap = snapshot(VS_HEADER).unwrap();
    let p = policy_of(&snap, Some("v2"), 9080);
    assert_eq!(p, TrafficPolicy::default());
    assert_eq!(p.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(p.connection_pool.max_connections, u32::MAX);
    assert!(p.outlier_detection.is_none());

    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100}}
    outlierDetection: {consecutive5xxErrors: 7}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: RANDOM}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: X-User}}
      portLevelSettings:
      - port: {number: 9090}
        connectionPool: {http: {http1MaxPendingRequests: 1}}
  - name: v3
    labels: {version: v3}
    trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}
"#;
    let vs = VS_HEADER.replace(
        "subset: v2}}]",
        "subset: v2}}]\n  - match: [{port: 9090}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - match: [{uri: {prefix: /all}}]\n    route: [{destination: {host: reviews}}]",
    );
    let snap = load(&[
        SourceFile::new("registry.yaml", SERVICES),
        SourceFile::new("dr.yaml", dr),
        SourceFile::new("vs.yaml", vs),
    ])
    .map_err(|e| e.issues())
    .unwrap();
    // Top level on 9080, for the service and a subset without its own policy.
    let top = policy_of(&snap, None, 9080);
    assert_eq!(top.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(top.connection_pool.max_connections, 100);
    assert_eq!(
        top.outlier_detection.as_ref().unwrap().consecutive_5xx,
        Some(7)
    );
    assert_eq!(policy_of(&snap, Some("v1"), 9080), top);
    // A port-level entry replaces every component: pool and outlier fall back to defaults.
    let port = policy_of(&snap, None, 9090);
    assert_eq!(port.load_balancer, LoadBalancer::Random);
    assert_eq!(port.connection_pool.max_connections, u32::MAX);
    assert!(port.outlier_detection.is_none());
    // A subset overrides the components it sets and keeps the others.
    let v2 = policy_of(&snap, Some("v2"), 9080);
    let LoadBalancer::ConsistentHash(h) = &v2.load_balancer else {
        panic!()
    };
    assert_eq!(h.key, HashKey::Header("x-user".into()));
    assert_eq!(
        h.algorithm,
        HashAlgorithm::RingHash {
            minimum_ring_size: 1024
        }
    );
    assert_eq!(v2.connection_pool.max_connections, 100);
    // ...and its own port-level entry replaces everything on that port.
    let v2_9090 = policy_of(&snap, Some("v2"), 9090);
    assert_eq!(v2_9090.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(v2_9090.connection_pool.http1_max_pending_requests, 1);
    assert!(v2_9090.outlier_detection.is_none());
    // LEAST_CONN is LEAST_REQUEST.
    assert_eq!(
        policy_of(&snap, Some("v3"), 9080).load_balancer,
        LoadBalancer::LeastRequest
    );
}

#[test]
fn outlier_and_pool_defaults() {
    let snap = snapshot(&format!(
        "{VS_HEADER}---\n{}",
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s}}
      http: {http2MaxRequests: 1000, maxRequestsPerConnection: 10, h2UpgradePolicy: UPGRADE}
    outlierDetection: {interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
"#
    ))
    .unwrap();
    let c = &port(&snap, "ratings.shop.svc.cluster.local", 9080).http_routes[0].destinations()[0]
        .cluster;
    let p = &c.policy;
    let o = p.outlier_detection.as_ref().unwrap();
    assert_eq!(o.consecutive_5xx, Some(5), "Envoy's default when enabled");
    assert_eq!(o.consecutive_gateway, None);
    assert_eq!(
        (o.interval, o.base_ejection_time),
        (Duration::from_secs(1), Duration::from_secs(180))
    );
    assert_eq!((o.max_ejection_percent, o.min_health_percent), (100, 0));
    let pool = &p.connection_pool;
    assert_eq!(pool.connect_timeout, Some(Duration::from_millis(30)));
    assert_eq!(pool.http2_max_requests, 1000);
    assert_eq!(pool.max_requests_per_connection, 10);
    assert_eq!(pool.http1_max_pending_requests, u32::MAX);
    assert_eq!(
        pool.tcp_keepalive.unwrap().interval,
        Some(Duration::from_secs(75))
    );
    let dump = snap.dump().to_string();
    assert!(dump.contains(r#""http2MaxRequests":1000"#), "{dump}");
    assert!(dump.contains(r#""httpRoutes""#) && dump.contains(r#""loadBalancer":"LEAST_REQUEST""#));
}

/// Every validation message, with the path it names.
#[test]
fn validation_messages() {
    let vs = |http: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: t, namespace: shop}}\n\
             spec:\n  hosts: [ratings]\n  http:\n{http}"
        )
    };
    let dr = |policy: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: t, namespace: shop}}\n\
             spec:\n  host: ratings\n  trafficPolicy:\n{policy}"
        )
    };
    let dest = "route: [{destination: {host: ratings}}]";
    let cases: Vec<(String, &str)> = vec![
        (vs(&format!("  - {{{dest}, redirect: {{uri: /x}}}}\n")), "spec.http[0]: HTTP route cannot contain both route and redirect"),
        (vs(&format!("  - {{{dest}, directResponse: {{status: 200}}}}\n")), "spec.http[0]: HTTP route cannot contain both route and directResponse"),
        (vs("  - {redirect: {uri: /x}, directResponse: {status: 200}}\n"), "both redirect and directResponse"),
        (vs("  - {redirect: {uri: /x}, rewrite: {uri: /y}}\n"), "both rewrite and redirect"),
        (vs("  - {directResponse: {status: 200}, fault: {abort: {httpStatus: 500}}}\n"), "both fault and directResponse"),
        (vs("  - {name: nothing}\n"), "spec.http[0]: HTTP route, redirect or directResponse is required"),
        (vs("  - {delegate: {name: d}}\n"), "spec.http[0].delegate: delegate is not supported yet"),
        (vs(&format!("  - {{{dest}, match: [{{uri: {{regex: \"a(\"}}}}]}}\n")), "spec.http[0].match[0].uri: invalid regex `a(`"),
        (vs(&format!("  - {{{dest}, match: [{{uri: {{exact: /a, prefix: /b}}}}]}}\n")), "spec.http[0].match[0].uri: only one of exact, prefix or regex may be set"),
        (vs(&format!("  - {{{dest}, match: [{{method: {{prefix: \"\"}}}}]}}\n")), "match[0].method: prefix string match should not be empty"),
        (vs(&format!("  - {{{dest}, match: [{{headers: {{\"bad header\": {{exact: x}}}}}}]}}\n")), "headers.bad header: header name `bad header` is not a valid header name"),
        (vs(&format!("  - {{{dest}, match: [{{headers: {{\"@request.auth.claims.group\": {{exact: x}}}}}}]}}\n")), "JWT claim based routing is only supported for gateways"),
        (vs(&format!("  - {{{dest}, match: [{{port: 1234}}]}}\n")), "spec.http[0].match[0].port: no host of this VirtualService has port 1234"),
        (vs(&format!("  - {{{dest}, match: [{{gateways: [my-gateway]}}]}}\n")), "spec.http[0].match[0].gateways[0]: gateway `my-gateway` is not supported: isthmus has no gateways"),
        (vs(&format!("  - {{{dest}, match: [{{sourceNamespace: Bad_NS}}]}}\n")), "sourceNamespace match `Bad_NS` is invalid"),
        (vs("  - route: [{destination: {host: ratings}, weight: 0}, {destination: {host: ratings}, weight: 0}]\n"), "spec.http[0].route: total destination weight = 0"),
        (vs("  - route: [{destination: {host: ratings}, weight: -1}]\n"), "spec.http[0].route[0].weight: weight -1 is out of range"),
        (vs("  - route: [{destination: {host: nowhere}}]\n"), "spec.http[0].route[0].destination.host: unknown host `nowhere.shop.svc.cluster.local`"),
        (vs("  - route: [{destination: {host: reviews, subset: v9}}]\n"), "spec.http[0].route[0].destination.subset: no DestinationRule for `reviews.shop.svc.cluster.local` defines subset `v9`"),
        (format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: two, namespace: shop}}\nspec: {{hosts: [two.shop], ports: [{{number: 81, name: http-a}}, {{number: 82, name: http-b}}]}}\n---\n{}", vs("  - route: [{destination: {host: two.shop}}]\n")), "spec.http[0].route: `two.shop` has no port 9080; set destination.port"),
        (vs(&format!("  - {{{dest}, timeout: 0s}}\n")), "spec.http[0].timeout: duration must be at least 1ms"),
        (vs(&format!("  - {{{dest}, timeout: \"5\"}}\n")), "spec.http[0].timeout: `5`: missing unit"),
        (vs(&format!("  - {{{dest}, retries: {{attempts: 0, perTryTimeout: 1s}}}}\n")), "spec.http[0].retries: retry policy configured when attempts are set to 0"),
        (vs(&format!("  - {{{dest}, retries: {{attempts: -1}}}}\n")), "spec.http[0].retries.attempts: attempts cannot be negative"),
        (vs(&format!("  - {{{dest}, retries: {{attempts: 2, perTryTimeout: 0s}}}}\n")), "spec.http[0].retries.perTryTimeout: duration must be at least 1ms"),
        (vs(&format!("  - {{{dest}, retries: {{attempts: 2, retryOn: \"5xx,sometimes\"}}}}\n")), "spec.http[0].retries.retryOn: `sometimes` is not a valid retryOn policy"),
        (vs(&format!("  - {{{dest}, retries: {{attempts: 2, retryOn: \"599\"}}}}\n")), "`599` is not a valid retryOn policy"),
        (vs(&format!("  - {{{dest}, fault: {{}}}}\n")), "spec.http[0].fault: HTTP fault injection must have an abort and/or a delay"),
        (vs(&format!("  - {{{dest}, fault: {{abort: {{httpStatus: 600}}}}}}\n")), "spec.http[0].fault.abort.httpStatus: HTTP status 600 is not in range 200-599"),
        (vs(&format!("  - {{{dest}, fault: {{abort: {{grpcStatus: NOPE}}}}}}\n")), "fault.abort.grpcStatus: gRPC status `NOPE` is not supported"),
        (vs(&format!("  - {{{dest}, fault: {{abort: {{http2Error: x}}}}}}\n")), "HTTP/2 abort fault injection is not supported"),
        (vs(&format!("  - {{{dest}, fault: {{abort: {{percentage: {{value: 5}}}}}}}}\n")), "spec.http[0].fault.abort: abort needs httpStatus or grpcStatus"),
        (vs(&format!("  - {{{dest}, fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 101}}}}}}}}\n")), "fault.delay.percentage.value: percentage must be between 0 and 100 (it is 101)"),
        (vs(&format!("  - {{{dest}, fault: {{delay: {{fixedDelay: 1s, percent: -5}}}}}}\n")), "fault.delay.percent: percentage must be between 0 and 100"),
        (vs(&format!("  - {{{dest}, fault: {{delay: {{exponentialDelay: 1s}}}}}}\n")), "exponentialDelay is not supported"),
        (vs(&format!("  - {{{dest}, fault: {{delay: {{percent: 5}}}}}}\n")), "spec.http[0].fault.delay: fixedDelay is required"),
        (vs("  - redirect: {redirectCode: 301}\n"), "redirect must specify uri, authority, scheme, port or derivePort"),
        (vs("  - redirect: {uri: /x, redirectCode: 200}\n"), "spec.http[0].redirect.redirectCode: 200 is not a valid redirect code, must be 3xx"),
        (vs("  - redirect: {scheme: ftp}\n"), "redirect.scheme: invalid redirect scheme, must be \"http\" or \"https\""),
        (vs("  - redirect: {port: 80, derivePort: FROM_REQUEST_PORT}\n"), "only one of port or derivePort may be set"),
        (vs("  - redirect: {port: 70000}\n"), "spec.http[0].redirect.port: 70000 is not a port number"),
        (vs("  - directResponse: {status: 99}\n"), "spec.http[0].directResponse.status: HTTP status 99 is not in range 200-599"),
        (vs("  - directResponse: {status: 200, body: {bytes: \"!!\"}}\n"), "directResponse.body.bytes: not valid base64"),
        (vs("  - directResponse: {status: 200, body: {string: a, bytes: YQ==}}\n"), "only one of string or bytes may be set"),
        (vs(&format!("  - {{{dest}, rewrite: {{}}}}\n")), "rewrite must specify at least one of uri, uriRegexRewrite or authority"),
        (vs(&format!("  - {{{dest}, rewrite: {{uri: /a, uriRegexRewrite: {{match: a, rewrite: b}}}}}}\n")), "rewrite may only contain one of uri or uriRegexRewrite"),
        (vs(&format!("  - {{{dest}, rewrite: {{uriRegexRewrite: {{match: a}}}}}}\n")), "uriRegexRewrite requires both match and rewrite"),
        (vs(&format!("  - {{{dest}, rewrite: {{authority: a}}, headers: {{request: {{set: {{host: b}}}}}}}}\n")), "authority header cannot be set multiple times"),
        (vs(&format!("  - {{{dest}, headers: {{response: {{set: {{\":status\": \"200\"}}}}}}}}\n")), "header `:status` cannot be changed here"),
        (vs(&format!("  - {{{dest}, headers: {{request: {{remove: [host]}}}}}}\n")), "headers.request.remove[0]: header `host` cannot be changed here"),
        (vs(&format!("  - {{{dest}, headers: {{request: {{add: {{x-a: \"a\\r\\nb: c\"}}}}}}}}\n")), "header value must not contain CR, LF or NUL"),
        (vs(&format!("  - {{{dest}, mirror: {{host: ratings}}, mirrors: [{{destination: {{host: ratings}}}}]}}\n")), "HTTP route cannot contain both mirror and mirrors"),
        (vs(&format!("  - {{{dest}, mirror: {{host: ratings}}, mirrorPercentage: {{value: 150}}}}\n")), "mirrorPercentage.value: percentage must be between 0 and 100"),
        (vs(&format!("  - {{{dest}, mirror_percent: 50}}\n")), "mirrorPercentage applies to `mirror`"),
        (vs(&format!("  - {{{dest}, mirrors: [{{destination: {{host: ratings}}, percentage: {{value: -1}}}}]}}\n")), "mirrors[0].percentage.value: percentage must be between 0 and 100"),
        (vs(&format!("  - {{{dest}, corsPolicy: {{allowOrigins: [{{}}]}}}}\n")), "corsPolicy.allowOrigins[0]: an empty match is not a valid CORS allowed origin"),
        (vs(&format!("  - {{{dest}, corsPolicy: {{allowMethods: [FETCH]}}}}\n")), "corsPolicy.allowMethods[0]: `FETCH` is not a supported HTTP method"),
        (vs(&format!("  - {{{dest}, corsPolicy: {{allowHeaders: [\"a b\"]}}}}\n")), "corsPolicy.allowHeaders[0]: `a b` is not a valid header name"),
        (vs(&format!("  - {{{dest}, corsPolicy: {{maxAge: 1.5s}}}}\n")), "corsPolicy.maxAge: maxAge is accurate only to seconds precision"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t, namespace: shop}\nspec: {hosts: [ratings], gateways: [istio-system/gw], http: [{route: [{destination: {host: ratings}}]}]}\n".into(), "spec.gateways[0]: gateway `istio-system/gw` is not supported"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t, namespace: shop}\nspec: {hosts: [\"*\"], http: [{route: [{destination: {host: ratings}}]}]}\n".into(), "spec.hosts[0]: wildcard host * is not allowed"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t, namespace: shop}\nspec: {http: [{route: [{destination: {host: ratings}}]}]}\n".into(), "spec.hosts: at least one host is required (delegate VirtualServices are not supported yet)"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t, namespace: shop}\nspec: {hosts: [ratings], exportTo: [\"Not A Namespace\"], http: [{route: [{destination: {host: ratings}}]}]}\n".into(), "spec.exportTo[0]: `Not A Namespace` is not `.`, `*`, `~` or a namespace name"),
        ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: t, namespace: shop}\nspec: {hosts: [db.shop], ports: [{number: 5432, name: db, protocol: TCP}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t, namespace: shop}\nspec: {hosts: [db.shop], http: [{route: [{destination: {host: db.shop}}]}]}\n".into(), "spec.http: no port of this VirtualService's hosts carries HTTP"),
        (dr("    {}\n"), "spec.trafficPolicy: traffic policy must have at least one field"),
        (dr("    tls: {mode: ISTIO_MUTUAL}\n"), "spec.trafficPolicy.tls.mode: TLS mode IstioMutual is not supported yet: mTLS arrives with issue 9"),
        (dr("    tunnel: {targetHost: a, targetPort: 1}\n"), "spec.trafficPolicy.tunnel: tunnel is not supported"),
        (dr("    proxyProtocol: {version: V1}\n"), "proxyProtocol is not supported yet"),
        (dr("    loadBalancer: {simple: ROUND_ROBIN, consistentHash: {useSourceIp: true}}\n"), "loadBalancer: only one of simple or consistentHash may be set"),
        (dr("    loadBalancer: {consistentHash: {}}\n"), "consistentHash: consistentHash needs one of httpHeaderName"),
        (dr("    loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIp: true}}\n"), "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set"),
        (dr("    loadBalancer: {consistentHash: {httpCookie: {ttl: 0s}}}\n"), "httpCookie.name: name required for HttpCookie"),
        (dr("    loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65536}}}\n"), "maglev.tableSize: tableSize must be a prime number for maglev"),
        (dr("    loadBalancer: {consistentHash: {useSourceIp: true, maglev: {}}}\n"), "tableSize must be set for maglev"),
        (dr("    loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 10, ringHash: {}}}\n"), "only one of minimumRingSize or maglev/ringHash"),
        (dr("    loadBalancer: {simple: RANDOM, warmup: {minimumPercent: 10}}\n"), "loadBalancer.warmup.duration: duration is required"),
        (dr("    loadBalancer: {simple: RANDOM, warmup: {duration: 10s, aggression: 0.5}}\n"), "aggression should be greater than or equal to 1"),
        (dr("    loadBalancer: {localityLbSetting: {distribute: [{from: a, to: {b: 50}}]}}\n"), "localityLbSetting.distribute[0].to: total weight 50 != 100"),
        (dr("    connectionPool: {}\n"), "spec.trafficPolicy.connectionPool: connection pool must have at least one field"),
        (dr("    connectionPool: {tcp: {maxConnections: -1}}\n"), "connectionPool.tcp.maxConnections: must be non-negative"),
        (dr("    connectionPool: {http: {http2MaxRequests: 3000000000}}\n"), "http2MaxRequests: 3000000000 is out of range"),
        (dr("    connectionPool: {http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true}}\n"), "use client protocol must not be true when h2UpgradePolicy is UPGRADE"),
        (dr("    connectionPool: {tcp: {connectTimeout: 1us}}\n"), "connectionPool.tcp.connectTimeout: duration must be at least 1ms"),
        (dr("    outlierDetection: {consecutiveLocalOriginFailures: 3}\n"), "consecutive local origin failures is specified, but split external local origin errors is set to false"),
        (dr("    outlierDetection: {maxEjectionPercent: 101}\n"), "outlierDetection.maxEjectionPercent: percentage 101 is not in range 0..100"),
        (dr("    retryBudget: {percent: 120}\n"), "retryBudget.percent: percentage must be between 0 and 100"),
        (dr("    portLevelSettings: [{loadBalancer: {simple: RANDOM}}]\n"), "portLevelSettings[0]: portTrafficPolicy must have valid port"),
        (dr("    portLevelSettings: [{port: {number: 1234}, loadBalancer: {simple: RANDOM}}]\n"), "portLevelSettings[0].port.number: the host has no port 1234"),
        (dr("    portLevelSettings: [{port: {number: 9080}}]\n"), "portLevelSettings[0]: port traffic policy must have at least one field"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: t, namespace: shop}\nspec: {host: ratings, subsets: [{name: V_1}]}\n".into(), "spec.subsets[0].name: subset name `V_1` is invalid"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: t, namespace: shop}\nspec: {host: ratings, workloadSelector: {matchLabels: {a: b}}}\n".into(), "field `workloadSelector` is not supported: workloadSelector is not implemented"),
        (vs("  - route: [{destination: {host: ratings}}]\n    tls: []\n").replace("    tls", "  tls"), "field `tls` is not supported: TLS routes arrive with mTLS"),
    ];
    for (text, want) in &cases {
        let issues = match snapshot(text) {
            Ok(_) => panic!("loaded, but wanted {want:?}"),
            Err(issues) => issues.join("\n"),
        };
        assert!(issues.contains(want), "want {want:?}, got:\n{issues}");
    }
}

#[test]
fn accepted_and_ignored_fields_load() {
    snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: t, namespace: shop}
spec:
  hosts: ["*.example.com"]
  gateways: [mesh]
  exportTo: ["."]
  http:
  - match: [{gateways: [mesh], statPrefix: web, sourceLabels: {app: a}, withoutHeaders: {x-a: {regex: "*"}}}]
    route: [{destination: {host: api.example.com}}]
    retries: {attempts: 1, retryRemoteLocalities: true, retryIgnorePreviousHosts: false, backoff: 100ms}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: t, namespace: shop}
spec:
  host: api.example.com
  exportTo: ["*"]
  trafficPolicy:
    tls: {mode: DISABLE, sni: ignored.example.com}
    loadBalancer:
      simple: LEAST_REQUEST
      localityLbSetting: {enabled: true, failover: [{from: a, to: b}]}
      warmupDurationSecs: 30s
"#,
    )
    .unwrap();
}

#[test]
fn string_match_semantics() {
    let snap = snapshot(&vs_with_match(
        "{uri: {prefix: \"\"}, headers: {x-present: {}}}",
    ))
    .unwrap();
    let m = &port(&snap, "ratings.shop.svc.cluster.local", 9080).http_routes[0].matches[0];
    assert!(matches!(&m.uri, Some(StringMatch::Prefix(p)) if p.is_empty()));
    assert!(m.headers[0].value.is_none(), "{{}}: presence");
}

fn vs_with_match(m: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: t, namespace: shop}}\n\
         spec: {{hosts: [ratings], http: [{{match: [{m}], route: [{{destination: {{host: ratings}}}}]}}]}}\n"
    )
}
