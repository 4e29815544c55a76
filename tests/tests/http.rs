//! HTTP/1.1 end to end: real curl (and raw sockets where curl would refuse to send the
//! bytes) in a client pod, through the client's outbound capture and sidecar, then the server
//! pod's inbound capture and sidecar, to the test app; what arrived is read *at the upstream*
//! (the app's `/headers` and `/__stats`, and the server sidecar's own metrics). The main
//! traffic test runs on io_uring and on epoll; the others on `auto` (the HTTP path is tokio's
//! readiness I/O on either backend once a connection is detected). Framing refusals and
//! server-first protocols are in `http_edges.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_config::SourceFile;
use isthmus_ctl::local::{Mesh, MeshSpec, Pod, PodSpec, HTTP_PORT, HTTP_SERVICE_PORT};
use isthmus_tests::http::{app_stats, parse_headers_echo, tally, Brief, Curl, CurlExit};
use isthmus_tests::probe::wait_metric;
use isthmus_tests::ws::WebSocket;
use isthmus_tests::{binomial_4sigma, metric_sum, prerequisites};

/// `hello`'s subsets and a VirtualService with these `http` rules (YAML lines under `http:`).
fn routes(http: &str) -> SourceFile {
    SourceFile::new(
        "routes.yaml",
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: hello, namespace: mesh}}\n\
             spec:\n  host: hello\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: mesh}}\n\
             spec:\n  hosts: [hello]\n  http:\n{http}"
        ),
    )
}

/// A client pod and `hello`'s pods (`versions`), every sidecar started with `config` loaded;
/// `None` where e2e tests cannot run (recorded as skipped).
fn mesh(backend: &str, versions: &[&str], config: SourceFile) -> Option<Mesh> {
    if !prerequisites() {
        return None;
    }
    let mut pods = vec![PodSpec::meshed("client", None, "v1")];
    for v in versions {
        pods.push(PodSpec::meshed(&format!("hello-{v}"), Some("hello"), v));
    }
    let mut spec = MeshSpec::new(&["hello"], pods);
    spec.proxy_args = vec!["--io-backend".into(), backend.into()];
    spec.config = vec![config];
    Some(Mesh::start(spec).unwrap_or_else(|e| panic!("mesh did not start: {e}")))
}

fn base(mesh: &Mesh) -> String {
    format!("http://{}:{HTTP_SERVICE_PORT}", mesh.vip4("hello"))
}

/// The app's own address, for reading its counters from inside its pod (past its sidecar).
fn local() -> String {
    format!("http://127.0.0.1:{HTTP_PORT}")
}

fn all_ok(briefs: &[Brief]) {
    let bad: Vec<_> = briefs
        .iter()
        .filter(|b| (b.exit, b.status, b.http_version.as_str()) != (CurlExit::Ok, 200, "1.1"))
        .collect();
    assert!(bad.is_empty(), "{} failed, e.g. {:?}", bad.len(), bad[0]);
}

/// Asserts that `pod`'s sidecar counts exactly `want` of `metric{labels}` (after waiting for
/// the last request to be recorded).
fn assert_metric(pod: &Pod, metric: &str, labels: &[(&str, &str)], want: usize) {
    let got = wait_metric(pod, metric, labels, want as f64);
    assert_eq!(got, want as f64, "{}: {metric}{labels:?}", pod.name);
}

const REQUESTS: usize = 1000;
const CANARY: usize = 50;

/// 1000 keep-alive requests from one curl process split 80/20 between subsets v1 and v2
/// (served-by tally within 4σ of the binomial), `end-user: jason` always to v2, and every
/// request counted once by each side: the client sidecar's `istio_requests_total` with
/// `reporter="source"` per `destination_version`, each server sidecar's with
/// `reporter="destination"`. The client sidecar saw two connections for all of it (one per
/// curl run): keep-alive held through both sidecars.
fn weighted_split_and_header_canary(backend: &str) {
    let config = routes(
        "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: hello, subset: v2}}]\n\
         \x20 - route:\n    - {destination: {host: hello, subset: v1}, weight: 80}\n    - {destination: {host: hello, subset: v2}, weight: 20}\n",
    );
    let Some(mesh) = mesh(backend, &["v1", "v2"], config) else {
        return;
    };
    let client = mesh.pod("client");
    let split = Curl::new(format!("{}/", base(&mesh)))
        .run_many(client, REQUESTS, 1)
        .unwrap();
    all_ok(&split);
    let counts = tally(&split, |b| b.served_by());
    let v1 = counts.get("hello-v1").copied().unwrap_or(0);
    let v2 = counts.get("hello-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, REQUESTS, "{counts:?}");
    eprintln!("80/20 split over {REQUESTS} keep-alive requests: v1 {v1}, v2 {v2}");
    assert!(
        binomial_4sigma(REQUESTS, 0.8).contains(&v1),
        "v1 took {v1} of {REQUESTS}, want {:?}",
        binomial_4sigma(REQUESTS, 0.8)
    );

    let canary = Curl::new(format!("{}/", base(&mesh)))
        .header("end-user", "jason")
        .run_many(client, CANARY, 1)
        .unwrap();
    all_ok(&canary);
    assert_eq!(
        tally(&canary, |b| b.served_by()),
        [("hello-v2".to_string(), CANARY)].into()
    );

    let service = ("destination_service", "hello.mesh.svc.cluster.local");
    for (version, want) in [("v1", v1), ("v2", v2 + CANARY)] {
        let source = [
            ("reporter", "source"),
            service,
            ("destination_version", version),
            ("response_code", "200"),
        ];
        assert_metric(client, "istio_requests_total", &source, want);
        let server = mesh.pod(&format!("hello-{version}"));
        let destination = [("reporter", "destination"), ("response_code", "200")];
        assert_metric(server, "istio_requests_total", &destination, want);
    }
    assert_metric(
        client,
        "istio_requests_total",
        &[("reporter", "source")],
        REQUESTS + CANARY,
    );
    assert_metric(
        client,
        "isthmus_proxy_protocol_detection_total",
        &[
            ("direction", "outbound"),
            ("port", "80"),
            ("outcome", "http1"),
        ],
        2,
    );
}

#[test]
fn weighted_split_and_header_canary_io_uring() {
    weighted_split_and_header_canary("io-uring");
}

#[test]
fn weighted_split_and_header_canary_epoll() {
    weighted_split_and_header_canary("epoll");
}

/// One GET from the client pod; the transfer itself must have succeeded.
fn get(mesh: &Mesh, path: &str, headers: &[(&str, &str)]) -> isthmus_tests::http::CurlResponse {
    let mut curl = Curl::new(format!("{}{path}", base(mesh)));
    for (name, value) in headers {
        curl = curl.header(name, value);
    }
    let r = curl.run(mesh.pod("client")).unwrap();
    assert_eq!(r.exit, CurlExit::Ok, "{path}: {r:?}");
    r
}

/// Retry and timeout rules chosen by an `x-case` header; Istio's default policy otherwise.
fn retry_routes() -> SourceFile {
    routes(
        "  - match: [{headers: {x-case: {exact: explicit}}}]\n    retries: {attempts: 3, retryOn: 5xx}\n\
         \x20   route: [{destination: {host: hello}}]\n\
         \x20 - match: [{headers: {x-case: {exact: per-try}}}]\n    timeout: 5s\n\
         \x20   retries: {attempts: 2, perTryTimeout: 0.2s, retryOn: 5xx}\n    route: [{destination: {host: hello}}]\n\
         \x20 - match: [{headers: {x-case: {exact: route-timeout}}}]\n    timeout: 0.3s\n\
         \x20   route: [{destination: {host: hello}}]\n\
         \x20 - route: [{destination: {host: hello}}]\n",
    )
}

/// Retries as the upstream counts them (the app's `/__stats` read inside the server pod):
/// an explicit `retries` (3 on 5xx: four attempts, the last one 200); Istio's default policy
/// where a route has none (a 503 retried twice, a 500 not at all, an endless 503 three
/// attempts then `URX`); `perTryTimeout` 0.2 s with 2 retries against a 1 s `/delay`
/// (three attempts, then 504 after ≥ 0.6 s; its flag is checked by
/// `per_try_timeout_exhausted_is_flagged_ut`); a route `timeout` of 0.3 s (504 `UT` after
/// ≥ 0.3 s, one attempt). The server sidecar retries nothing itself: it records each attempt
/// once.
#[test]
fn retries_and_timeouts_are_counted_at_the_upstream() {
    let Some(mesh) = mesh("auto", &["v1"], retry_routes()) else {
        return;
    };
    let upstream = mesh.pod("hello-v1");
    let attempts = |key: &str| app_stats(upstream, &local()).unwrap().key(key);

    let r = get(&mesh, "/fail/explicit/3/500", &[("x-case", "explicit")]);
    assert_eq!((r.status, r.header("x-attempt")), (200, Some("4")), "{r:?}");
    assert_eq!(attempts("explicit"), 4);

    let r = get(&mesh, "/fail/dflt/2/503", &[]);
    assert_eq!((r.status, r.header("x-attempt")), (200, Some("3")), "{r:?}");
    assert_eq!(attempts("dflt"), 3);
    let r = get(&mesh, "/fail/dflt500/1/500", &[]);
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(
        attempts("dflt500"),
        1,
        "Istio's default policy retries 503, not 500"
    );
    let r = get(&mesh, "/fail/endless/99/503", &[]);
    assert_eq!((r.status, r.header("x-attempt")), (503, Some("3")), "{r:?}");
    assert_eq!(attempts("endless"), 3);

    let r = get(&mesh, "/delay/1000?key=per-try", &[("x-case", "per-try")]);
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(attempts("per-try"), 3, "one try and two retries");
    assert!(r.time_total >= Duration::from_millis(600), "{r:?}");
    assert!(r.time_total < Duration::from_millis(3000), "{r:?}");

    let r = get(
        &mesh,
        "/delay/3000?key=route-timeout",
        &[("x-case", "route-timeout")],
    );
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        r.time_total >= Duration::from_millis(300) && r.time_total < Duration::from_millis(2500),
        "{r:?}"
    );
    assert_eq!(attempts("route-timeout"), 1);

    let client = mesh.pod("client");
    let flagged = |code: &'static str, flags: &'static str| {
        [
            ("reporter", "source"),
            ("response_code", code),
            ("response_flags", flags),
        ]
    };
    assert_metric(client, "istio_requests_total", &flagged("503", "URX"), 1);
    assert_metric(client, "istio_requests_total", &flagged("504", "UT"), 1);
    assert_metric(
        client,
        "istio_requests_total",
        &[("reporter", "source"), ("response_code", "504")],
        2,
    );
    assert_metric(client, "istio_requests_total", &flagged("500", "-"), 1);
    // The server sidecar saw every attempt, each once: 4 + 3 + 1 + 3 + 3 + 1.
    assert_metric(
        upstream,
        "istio_requests_total",
        &[("reporter", "destination")],
        15,
    );
}

/// Per-try timeouts that use up every retry answer 504 flagged `UT`: docs/OPERATIONS.md
/// gives `UT` to "the route's `timeout` or the per-try timeout", and Envoy flags this case
/// `UT,URX`, as does the proxy.
#[test]
fn per_try_timeout_exhausted_is_flagged_ut() {
    let Some(mesh) = mesh("auto", &["v1"], retry_routes()) else {
        return;
    };
    let r = get(&mesh, "/delay/1000", &[("x-case", "per-try")]);
    assert_eq!(r.status, 504, "{r:?}");
    let client = mesh.pod("client");
    let failed = [("reporter", "source"), ("response_code", "504")];
    assert_metric(client, "istio_requests_total", &failed, 1);
    let text = client.metrics().unwrap();
    let timed_out: f64 = ["UT", "UT,URX"]
        .iter()
        .map(|flags| {
            let labels = [failed[0], failed[1], ("response_flags", *flags)];
            metric_sum(&text, "istio_requests_total", &labels)
        })
        .sum();
    assert_eq!(timed_out, 1.0, "{text}");
}

/// A 50 % abort (HTTP 500) over 1000 keep-alive requests lands within 4σ of the binomial;
/// the aborted ones never reach the upstream (its count is exactly the rest) and are flagged
/// `FI`. A fixed 0.5 s delay is measured by curl (`time_total` ≥ 0.5 s) and flagged `DI`.
#[test]
fn fault_abort_within_bounds_and_delay_measured() {
    let config = routes(
        "  - match: [{headers: {x-case: {exact: delay}}}]\n\
         \x20   fault: {delay: {fixedDelay: 0.5s, percentage: {value: 100}}}\n    route: [{destination: {host: hello}}]\n\
         \x20 - fault: {abort: {httpStatus: 500, percentage: {value: 50}}}\n    route: [{destination: {host: hello}}]\n",
    );
    let Some(mesh) = mesh("auto", &["v1"], config) else {
        return;
    };
    let client = mesh.pod("client");
    let briefs = Curl::new(format!("{}/?key=abort", base(&mesh)))
        .run_many(client, REQUESTS, 1)
        .unwrap();
    let statuses = tally(&briefs, |b| {
        Some(if b.status == 500 { "500" } else { "ok" })
    });
    let aborted = statuses.get("500").copied().unwrap_or(0);
    assert!(
        binomial_4sigma(REQUESTS, 0.5).contains(&aborted),
        "{aborted} of {REQUESTS} aborted"
    );
    eprintln!("50 % abort over {REQUESTS} requests: {aborted} aborted");
    let passed: Vec<_> = briefs.iter().filter(|b| b.status != 500).cloned().collect();
    all_ok(&passed);
    assert!(
        briefs
            .iter()
            .filter(|b| b.status == 500)
            .all(|b| b.served_by().is_none()),
        "an abort came from the upstream"
    );
    let upstream = mesh.pod("hello-v1");
    assert_eq!(
        app_stats(upstream, &local()).unwrap().key("abort"),
        (REQUESTS - aborted) as u64,
        "aborted requests must not reach the upstream"
    );
    let source = |code: &'static str, flags: &'static str| {
        [
            ("reporter", "source"),
            ("response_code", code),
            ("response_flags", flags),
        ]
    };
    assert_metric(
        client,
        "istio_requests_total",
        &source("500", "FI"),
        aborted,
    );
    assert_metric(
        client,
        "istio_requests_total",
        &source("200", "-"),
        REQUESTS - aborted,
    );

    let r = get(&mesh, "/", &[("x-case", "delay")]);
    assert_eq!((r.status, r.served_by()), (200, Some("hello-v1")));
    assert!(r.time_total >= Duration::from_millis(500), "{r:?}");
    eprintln!("0.5 s fault delay: curl time_total {:?}", r.time_total);
    assert_metric(client, "istio_requests_total", &source("200", "DI"), 1);
}

/// A redirect answered by the client sidecar (301, `Location` with the new authority and
/// path); a prefix rewrite seen at the upstream (`/headers` shows the rewritten request
/// line, query kept); request header set/add/remove seen at the upstream, response header
/// set/add/remove seen by curl; and a header's name case kept from curl to the app.
#[test]
fn redirect_rewrite_and_header_ops_end_to_end() {
    let config = routes(
        "  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new, authority: other.example}\n\
         \x20 - match: [{uri: {prefix: /api}}]\n    rewrite: {uri: /headers}\n\
         \x20   headers:\n      request: {set: {x-set: one}, add: {x-added: two}, remove: [x-drop]}\n\
         \x20     response: {set: {x-resp: three}, add: {x-resp-added: four}, remove: [x-body-bytes]}\n\
         \x20   route: [{destination: {host: hello}}]\n\
         \x20 - route: [{destination: {host: hello}}]\n",
    );
    let Some(mesh) = mesh("auto", &["v1"], config) else {
        return;
    };
    let r = get(&mesh, "/old/page", &[]);
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("http://other.example/new"));
    assert_eq!(r.served_by(), None, "answered by the sidecar, not the app");

    let r = get(
        &mesh,
        "/api?q=1",
        &[
            ("X-Mixed-Case", "Kept As Sent"),
            ("x-drop", "gone"),
            ("x-set", "replaced"),
        ],
    );
    assert_eq!((r.status, r.served_by()), (200, Some("hello-v1")), "{r:?}");
    let (line, seen) = parse_headers_echo(&r.text());
    assert_eq!(line, "GET /headers?q=1 HTTP/1.1");
    let has = |name: &str, value: &str| seen.iter().any(|(n, v)| n == name && v == value);
    assert!(has("X-Mixed-Case", "Kept As Sent"), "case lost: {seen:?}");
    assert!(has("x-set", "one") && !has("x-set", "replaced"), "{seen:?}");
    assert!(has("x-added", "two"), "{seen:?}");
    assert!(
        !seen.iter().any(|(n, _)| n.eq_ignore_ascii_case("x-drop")),
        "{seen:?}"
    );
    assert_eq!(r.header("x-resp"), Some("three"));
    assert_eq!(r.header("x-resp-added"), Some("four"));
    assert_eq!(r.header("x-body-bytes"), None, "removed from the response");

    // Without a matching rule's ops, the app's own headers come through untouched.
    let r = get(&mesh, "/", &[]);
    assert_eq!(r.header("x-body-bytes"), Some("0"));
    assert_eq!(r.header("x-resp"), None);
}

/// A WebSocket upgrade on the HTTP port is tunnelled by both sidecars: the handshake (101 with
/// the right accept key, from the app), a text and a 70,000-byte binary frame echoed, a ping
/// answered, the close echoed. Each sidecar records the upgrade as one request with code 101.
#[test]
fn websocket_echoes_through_both_sidecars() {
    let Some(mesh) = mesh(
        "auto",
        &["v1"],
        routes("  - route: [{destination: {host: hello}}]\n"),
    ) else {
        return;
    };
    let vip = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    let ws = WebSocket::connect(mesh.pod("client"), vip, "hello", "/ws").unwrap();
    assert_eq!(ws.header("x-served-by"), Some("hello-v1"));
    ws.echo_session().unwrap();

    let upgrade = |reporter| [("reporter", reporter), ("response_code", "101")];
    assert_metric(
        mesh.pod("client"),
        "istio_requests_total",
        &upgrade("source"),
        1,
    );
    assert_metric(
        mesh.pod("hello-v1"),
        "istio_requests_total",
        &upgrade("destination"),
        1,
    );
}
