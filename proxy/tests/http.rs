//! HTTP through the proxy as a process, with an explicit listener standing for a captured
//! outbound connection to a service VIP (no iptables, no root): VirtualService routing,
//! retries counted at the upstream, timeouts, faults, redirects and rewrites, framing
//! refusals, keep-alive and protocol switches — against the local mesh's real test app.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

/// The test app (isthmus-ctl's built-in httpbin-like server) on a loopback port. A port from
/// `free_port` can be taken by a concurrent test first: then the app's bind fails and it is
/// started again on another.
fn app(name: &'static str) -> SocketAddr {
    for _ in 0..5 {
        let (http, echo) = (free_port(), free_port());
        let http: SocketAddr = ([127, 0, 0, 1], http).into();
        let (done, failed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = isthmus_ctl::app::serve(name, http, ([127, 0, 0, 1], echo).into());
            let _ = done.send(result);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if failed.try_recv().is_ok() {
                break;
            }
            // Ours when it answers with our name (not another test's server on the port).
            if TcpStream::connect(http).is_ok()
                && get(http, "/", &[]).text() == format!("hello from {name}\n")
            {
                return http;
            }
            assert!(Instant::now() < deadline, "the app did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("the app could not bind a port in 5 attempts")
}

/// `web` at 10.96.0.2:80 (HTTP) with endpoints v1 and v2, subsets for both, `policy` as the
/// DestinationRule's `trafficPolicy`, and `extra` YAML.
fn registry_with_policy(v1: SocketAddr, v2: SocketAddr, policy: &str, extra: &str) -> String {
    // Istio refuses an empty `trafficPolicy`.
    let policy = match policy {
        "{}" => String::new(),
        p => format!("  trafficPolicy: {p}\n"),
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web, namespace: test}}\n\
         spec:\n  hosts: [web]\n  addresses: [10.96.0.2]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n\
         \x20 resolution: STATIC\n  endpoints:\n\
         \x20 - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v1}}}}\n\
         \x20 - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v2}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: test}}\n\
         spec:\n  host: web\n{policy}  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n\
         {extra}",
        v1.port(),
        v2.port()
    )
}

struct Mesh {
    proxy: Proxy,
    listen: SocketAddr,
    v1: SocketAddr,
    v2: SocketAddr,
}

fn mesh(extra: &str) -> Mesh {
    mesh_with(app("v2"), "{}", extra)
}

/// A mesh whose second endpoint is `v2` (an app, or an address nobody listens on) and whose
/// DestinationRule has `policy` as its `trafficPolicy`.
fn mesh_with(v2: SocketAddr, policy: &str, extra: &str) -> Mesh {
    mesh_with_args(v2, policy, extra, &[])
}

fn mesh_with_args(v2: SocketAddr, policy: &str, extra: &str, args: &[&str]) -> Mesh {
    let v1 = app("v1");
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--explicit".into(), format!("{listen}=10.96.0.2:80")]);
    let proxy = start(Options {
        args,
        wait_ready: false,
        ..Options::default()
    });
    proxy.reconfigure(&registry_with_policy(v1, v2, policy, extra));
    proxy.wait_until("ready", |p| p.get("/ready").starts_with("HTTP/1.1 200"));
    Mesh {
        proxy,
        listen,
        v1,
        v2,
    }
}

fn virtual_service(http: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: test}}\n\
         spec:\n  hosts: [web]\n  http:\n{http}"
    )
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    fn served_by(&self) -> &str {
        self.header("x-served-by").unwrap_or("-")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client on one connection.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    fn send_raw(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).unwrap();
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.get_from("web", path, headers)
    }

    fn get_from(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.send_raw(req.as_bytes());
        self.read_response()
    }

    fn read_response(&mut self) -> Response {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no status line: {line:?}"))
            .parse()
            .unwrap();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
        }
        let mut body = Vec::new();
        if let Some(n) = headers.get("content-length") {
            body.resize(n.parse().unwrap(), 0);
            self.reader.read_exact(&mut body).unwrap();
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|v| v == "chunked")
        {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
                if n == 0 {
                    let mut end = String::new();
                    while {
                        end.clear();
                        self.reader.read_line(&mut end).unwrap();
                        end != "\r\n"
                    } {}
                    break;
                }
                let start = body.len();
                body.resize(start + n, 0);
                self.reader.read_exact(&mut body[start..]).unwrap();
                let mut crlf = [0u8; 2];
                self.reader.read_exact(&mut crlf).unwrap();
            }
        }
        Response {
            status,
            headers,
            body,
        }
    }
}

/// Waits until the proxy's `name{labels}` reaches `at_least`: a request is recorded just after
/// its response is written, so a scrape may come a moment before it.
fn wait_metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    proxy.wait_until(&format!("{name}{labels:?} >= {at_least}"), |p| {
        metric(&p.metrics(), name, labels) >= at_least
    });
    metric(&proxy.metrics(), name, labels)
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    Client::connect(addr).get(path, headers)
}

/// The app's request count for `key` (its `/__stats`), asked directly, not through the proxy.
fn upstream_count(app: SocketAddr, key: &str) -> u64 {
    let stats = get(app, "/__stats", &[]).text();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["keys"][key].as_u64().unwrap_or(0)
}

#[test]
fn keep_alive_requests_route_by_header_and_weight() {
    let mesh = mesh(&virtual_service(
        "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: web, subset: v2}}]\n\
         \x20 - route:\n    - {destination: {host: web, subset: v1}, weight: 70}\n    - {destination: {host: web, subset: v2}, weight: 30}\n",
    ));
    let mut client = Client::connect(mesh.listen);
    for _ in 0..5 {
        let r = client.get("/", &[("end-user", "jason")]);
        assert_eq!((r.status, r.served_by()), (200, "v2"), "{r:?}");
    }
    let n = 1000;
    let v1 = (0..n)
        .filter(|_| client.get("/", &[]).served_by() == "v1")
        .count();
    // 70 % of 1000: within 4 standard deviations of a binomial (σ ≈ 14.5).
    assert!((642..=758).contains(&v1), "v1 took {v1} of {n}");
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[
            ("response_code", "200"),
            ("destination_version", "v2"),
            ("reporter", "source"),
        ],
        5.0,
    );
}

#[test]
fn retries_are_counted_at_the_upstream_and_default_policy_applies() {
    let mesh = mesh(&virtual_service(
        "  - match: [{uri: {prefix: /fail/explicit}}]\n    retries: {attempts: 3, retryOn: 5xx}\n\
         \x20   route: [{destination: {host: web, subset: v1}}]\n\
         \x20 - match: [{uri: {prefix: /fail/none}}]\n    retries: {attempts: 0}\n\
         \x20   route: [{destination: {host: web, subset: v1}}]\n\
         \x20 - route: [{destination: {host: web, subset: v1}}]\n",
    ));
    // Explicit policy: two 500s, then success — three attempts at the upstream.
    let r = get(mesh.listen, "/fail/explicit/2/500", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(upstream_count(mesh.v1, "explicit"), 3);
    // Istio's default policy (no `retries`): 503 is retried twice...
    let r = get(mesh.listen, "/fail/dflt/2/503", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(upstream_count(mesh.v1, "dflt"), 3);
    // ...but a 500 is not.
    let r = get(mesh.listen, "/fail/dflt500/1/500", &[]);
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(upstream_count(mesh.v1, "dflt500"), 1);
    // Exhausted: the last 503 goes back, flagged URX.
    let r = get(mesh.listen, "/fail/dfltx/9/503", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream_count(mesh.v1, "dfltx"), 3);
    // attempts: 0 disables retries.
    let r = get(mesh.listen, "/fail/none/1/503", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(upstream_count(mesh.v1, "none"), 1);
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "URX")],
        1.0,
    );
}

#[test]
fn route_timeout_answers_504_ut_and_fault_delay_is_measured() {
    let mesh = mesh(&virtual_service(
        "  - match: [{uri: {prefix: /delay}}]\n    timeout: 0.3s\n    route: [{destination: {host: web, subset: v1}}]\n\
         \x20 - match: [{uri: {exact: /slow}}]\n    fault: {delay: {fixedDelay: 0.4s, percentage: {value: 100}}}\n\
         \x20   rewrite: {uri: /}\n    route: [{destination: {host: web, subset: v1}}]\n",
    ));
    let started = Instant::now();
    let r = get(mesh.listen, "/delay/3000", &[]);
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let started = Instant::now();
    let r = get(mesh.listen, "/slow", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "hello from v1\n"));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "504"), ("response_flags", "UT")],
        1.0,
    );
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "200"), ("response_flags", "DI")],
        1.0,
    );
}

#[test]
fn fault_abort_at_half_the_requests_is_within_bounds() {
    let mesh = mesh(&virtual_service(
        "  - fault: {abort: {httpStatus: 418, percentage: {value: 50}}}\n    route: [{destination: {host: web, subset: v1}}]\n",
    ));
    let mut client = Client::connect(mesh.listen);
    let n = 1000;
    let aborted = (0..n)
        .filter(|_| client.get("/", &[]).status == 418)
        .count();
    // Binomial(1000, 0.5): σ ≈ 15.8; 4σ bounds.
    assert!((437..=563).contains(&aborted), "{aborted} of {n} aborted");
    let counted = wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "418"), ("response_flags", "FI")],
        aborted as f64,
    );
    assert_eq!(counted, aborted as f64);
}

#[test]
fn redirect_rewrite_headers_and_direct_response() {
    let mesh = mesh(&virtual_service(
        "  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new, authority: other.example}\n\
         \x20 - match: [{uri: {exact: /canned}}]\n    directResponse: {status: 503, body: {string: unavailable}}\n\
         \x20 - match: [{uri: {prefix: /api}}]\n    rewrite: {uri: /headers}\n\
         \x20   headers:\n      request: {set: {x-set: one}, add: {x-added: two}, remove: [x-drop]}\n      response: {set: {x-resp: three}}\n\
         \x20   route: [{destination: {host: web, subset: v1}}]\n",
    ));
    let r = get(mesh.listen, "/old/page", &[]);
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("http://other.example/new"));
    let r = get(mesh.listen, "/canned", &[]);
    assert_eq!((r.status, r.text().as_str()), (503, "unavailable"));
    let r = get(
        mesh.listen,
        "/api?q=1",
        &[("X-Drop", "gone"), ("X-Case-Kept", "yes")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-resp"), Some("three"));
    let seen = r.text();
    assert!(seen.starts_with("GET /headers?q=1 HTTP/1.1"), "{seen}");
    assert!(
        seen.contains("x-set: one") && seen.contains("x-added: two"),
        "{seen}"
    );
    assert!(!seen.to_ascii_lowercase().contains("x-drop"), "{seen}");
    assert!(
        seen.contains("X-Case-Kept: yes"),
        "header case lost: {seen}"
    );
    // No rule matches: 404 NR.
    let mesh2 = self::mesh(&virtual_service(
        "  - match: [{uri: {exact: /only}}]\n    route: [{destination: {host: web}}]\n",
    ));
    let r = get(mesh2.listen, "/elsewhere", &[]);
    assert_eq!(r.status, 404);
    wait_metric(
        &mesh2.proxy,
        "istio_requests_total",
        &[("response_code", "404"), ("response_flags", "NR")],
        1.0,
    );
}

#[test]
fn smuggling_vectors_are_refused_and_the_connection_closed() {
    let mesh = mesh("");
    let vectors: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nX-Bad: a\rb\r\n\r\n",
    ];
    for raw in vectors {
        let mut client = Client::connect(mesh.listen);
        client.send_raw(raw);
        let r = client.read_response();
        assert!(
            matches!(r.status, 400 | 501),
            "{:?} got {r:?}",
            String::from_utf8_lossy(raw)
        );
        let mut rest = Vec::new();
        let _ = client.reader.read_to_end(&mut rest);
        assert!(rest.is_empty() || r.status == 400, "more after the refusal");
    }
    // A body that is fine still goes through, chunked and with 100-continue.
    let mut client = Client::connect(mesh.listen);
    client.send_raw(b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let r = client.read_response();
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    client.send_raw(
        b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let r = client.read_response();
    assert_eq!(r.status, 100);
    client.send_raw(b"world");
    let r = client.read_response();
    assert_eq!((r.status, r.text().as_str()), (200, "world"));
}

#[test]
fn websocket_upgrade_is_tunnelled() {
    let mesh = mesh("");
    let mut client = Client::connect(mesh.listen);
    client.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    let r = client.read_response();
    assert_eq!(r.status, 101, "{r:?}");
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    // A masked text frame "hi", echoed back unmasked.
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 2];
    frame.extend_from_slice(&mask);
    frame.extend(b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    client.send_raw(&frame);
    let mut echo = [0u8; 4];
    client.reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, &[0x81, 2, b'h', b'i']);
}

#[test]
fn load_balancer_policies_distribute_and_consistent_hash_sticks() {
    // ROUND_ROBIN: exact alternation.
    let mesh = mesh_with(app("v2"), "{loadBalancer: {simple: ROUND_ROBIN}}", "");
    let mut client = Client::connect(mesh.listen);
    let v1 = (0..100)
        .filter(|_| client.get("/", &[]).served_by() == "v1")
        .count();
    assert_eq!(v1, 50);
    // RANDOM and LEAST_REQUEST (Istio's default; sequential requests tie, so both are used):
    // Binomial(1000, 0.5), 4σ bounds.
    for policy in ["{loadBalancer: {simple: RANDOM}}", "{}"] {
        let mesh = mesh_with(app("v2"), policy, "");
        let mut client = Client::connect(mesh.listen);
        let v1 = (0..1000)
            .filter(|_| client.get("/", &[]).served_by() == "v1")
            .count();
        assert!((437..=563).contains(&v1), "{policy}: v1 took {v1} of 1000");
    }
    // Consistent hash on a header: each user sticks to one endpoint; users spread over both.
    for algorithm in [
        "ringHash: {minimumRingSize: 1024}",
        "maglev: {tableSize: 65537}",
    ] {
        let policy = format!(
            "{{loadBalancer: {{consistentHash: {{httpHeaderName: x-user, {algorithm}}}}}}}"
        );
        let mesh = mesh_with(app("v2"), &policy, "");
        let mut client = Client::connect(mesh.listen);
        let mut owners = BTreeMap::new();
        for user in 0..40 {
            let user = format!("user-{user}");
            let seen: std::collections::BTreeSet<String> = (0..5)
                .map(|_| {
                    client
                        .get("/", &[("x-user", &user)])
                        .served_by()
                        .to_string()
                })
                .collect();
            assert_eq!(seen.len(), 1, "{algorithm}: {user} went to {seen:?}");
            *owners.entry(seen.into_iter().next().unwrap()).or_insert(0) += 1;
        }
        assert_eq!(
            owners.len(),
            2,
            "{algorithm}: every user on one endpoint: {owners:?}"
        );
    }
}

#[test]
fn a_missing_hash_cookie_is_made_up_and_then_sticks() {
    let mesh = mesh_with(
        app("v2"),
        "{loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 60s}}}}",
        "",
    );
    let mut owners = std::collections::BTreeSet::new();
    // 20 clients: all on one endpoint by chance is 2 in a million.
    for _ in 0..20 {
        let mut client = Client::connect(mesh.listen);
        let first = client.get("/", &[]);
        let cookie = first
            .header("set-cookie")
            .unwrap_or_else(|| panic!("no cookie made up: {first:?}"))
            .to_string();
        assert!(
            cookie.starts_with("session=\"") && cookie.contains("Max-Age=60"),
            "{cookie}"
        );
        let value = cookie.split(';').next().unwrap().to_string();
        for _ in 0..4 {
            let r = client.get("/", &[("Cookie", &value)]);
            assert_eq!(r.served_by(), first.served_by(), "{value} moved");
            assert_eq!(
                r.header("set-cookie"),
                None,
                "a cookie the client sent was replaced"
            );
        }
        owners.insert(first.served_by().to_string());
    }
    assert_eq!(
        owners.len(),
        2,
        "every made-up cookie hashed to one endpoint: {owners:?}"
    );
}

#[test]
fn circuit_breaker_overflow_answers_503_uo_at_once() {
    // maxConnections 1 + http1MaxPendingRequests 1: two requests in flight, no more.
    let mesh = mesh_with(
        app("v2"),
        "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}",
        "",
    );
    let listen = mesh.listen;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(listen);
                barrier.wait();
                let started = Instant::now();
                let r = client.get("/delay/600", &[]);
                (r.status, started.elapsed())
            })
        })
        .collect();
    let results: Vec<(u16, Duration)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let overflow: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    assert!((1..=2).contains(&ok), "{results:?}");
    assert_eq!(ok + overflow.len(), 8, "{results:?}");
    // Refused at once, not after waiting for the upstream.
    assert!(
        overflow
            .iter()
            .all(|(_, took)| *took < Duration::from_millis(500)),
        "{results:?}"
    );
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UO")],
        overflow.len() as f64,
    );
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint_then_readmits_it() {
    // The second endpoint refuses connections: two consecutive failures eject it for 1 s.
    let dead: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mesh = mesh_with(
        dead,
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 2, interval: 1s, \
         baseEjectionTime: 1s, maxEjectionPercent: 100}}",
        "",
    );
    let mut client = Client::connect(mesh.listen);
    // Every request succeeds: a refused connect is retried (Istio's default policy).
    for _ in 0..6 {
        assert_eq!(client.get("/", &[]).status, 200);
    }
    let ejections = |p: &Proxy| {
        isthmus_tests::probe::gauge(&p.metrics(), "isthmus_proxy_outlier_ejections_total")
            .unwrap_or(0.0)
    };
    mesh.proxy
        .wait_until("an ejection", |p| ejections(p) >= 1.0);
    // Ejected: every request now goes to v1 without a failed attempt first.
    for _ in 0..10 {
        let r = client.get("/", &[]);
        assert_eq!((r.status, r.served_by()), (200, "v1"));
    }
    assert_eq!(
        ejections(&mesh.proxy),
        1.0,
        "ejected again while still ejected"
    );
    // After the ejection time it is tried again, fails twice, and is ejected a second time.
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..6 {
        assert_eq!(client.get("/", &[]).status, 200);
    }
    mesh.proxy
        .wait_until("a second ejection", |p| ejections(p) >= 2.0);
}

#[test]
fn mirror_gets_a_copy_and_cors_is_answered() {
    let mesh = mesh(&virtual_service(
        "  - route: [{destination: {host: web, subset: v1}}]\n\
         \x20   mirror: {host: web, subset: v2}\n    mirrorPercentage: {value: 100}\n\
         \x20   corsPolicy:\n      allowOrigins: [{exact: 'https://app.example'}]\n\
         \x20     allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      maxAge: 24h\n\
         \x20     exposeHeaders: [x-served-by]\n",
    ));
    let mut client = Client::connect(mesh.listen);
    for _ in 0..5 {
        let r = client.get("/?key=mirrored", &[]);
        assert_eq!((r.status, r.served_by()), (200, "v1"));
    }
    assert_eq!(upstream_count(mesh.v1, "mirrored"), 5);
    // The copies arrive at v2 on their own time: wait for them.
    mesh.proxy.wait_until("mirrored copies at v2", |_| {
        upstream_count(mesh.v2, "mirrored") == 5
    });
    // A preflight from the allowed origin is answered by the proxy, with the policy.
    let preflight = "OPTIONS /x HTTP/1.1\r\nHost: web\r\nOrigin: https://app.example\r\n\
                     Access-Control-Request-Method: POST\r\n\r\n";
    client.send_raw(preflight.as_bytes());
    let r = client.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(r.header("access-control-max-age"), Some("86400"));
    assert_eq!(r.served_by(), "-", "a preflight reached the upstream");
    // An actual request from it gets the headers; another origin does not.
    let r = client.get("/", &[("Origin", "https://app.example")]);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-served-by")
    );
    let r = client.get("/", &[("Origin", "https://evil.example")]);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn access_log_lines_in_istio_text_and_json() {
    for format in ["text", "json"] {
        let mesh = mesh_with_args(
            app("v2"),
            "{}",
            &virtual_service(
                "  - name: to-v1\n    route: [{destination: {host: web, subset: v1}}]\n",
            ),
            &["--access-log", "--access-log-format", format],
        );
        let r = get(
            mesh.listen,
            "/bytes/10",
            &[("User-Agent", "curl/8.5.0"), ("x-request-id", "r-1")],
        );
        assert_eq!(r.status, 200);
        mesh.proxy.wait_until("an access log line", |p| {
            std::fs::read_to_string(&p.out).is_ok_and(|t| t.ends_with('\n'))
        });
        let line = std::fs::read_to_string(&mesh.proxy.out).unwrap();
        let line = line.trim_end();
        let upstream = format!("{}", mesh.v1);
        if format == "text" {
            assert!(line.starts_with('['), "{line}");
            let rest = line.split_once("] ").unwrap().1;
            assert!(
                rest.starts_with("\"GET /bytes/10 HTTP/1.1\" 200 - - - \"-\" 0 10 "),
                "{line}"
            );
            assert!(
                rest.contains(&format!("\"curl/8.5.0\" \"r-1\" \"web\" \"{upstream}\" outbound|80|v1|web.test.svc.cluster.local ")),
                "{line}"
            );
            assert!(rest.ends_with(" - to-v1"), "{line}");
        } else {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["method"], "GET");
            assert_eq!(v["response_code"], 200);
            assert_eq!(v["bytes_sent"], 10);
            assert_eq!(v["upstream_host"], upstream.as_str());
            assert_eq!(
                v["upstream_cluster"],
                "outbound|80|v1|web.test.svc.cluster.local"
            );
            assert_eq!(v["route_name"], "to-v1");
        }
    }
}

#[test]
fn dns_egress_routes_by_host_to_resolved_endpoints() {
    // A MESH_EXTERNAL service with `resolution: DNS` and no address of its own: requests are
    // routed by their Host, to what its endpoint's name resolves to (here `localhost`, from
    // /etc/hosts through the system resolver).
    let external = app("external");
    let mesh = mesh(&format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external-api, namespace: test}}\n\
         spec:\n  hosts: [api.external.example]\n  location: MESH_EXTERNAL\n\
         \x20 ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n\
         \x20 endpoints: [{{address: localhost, ports: {{http: {}}}}}]\n",
        external.port()
    ));
    let mut client = Client::connect(mesh.listen);
    // The first resolution runs on the resolver thread as the config loads.
    mesh.proxy.wait_until("the name resolved", |_| {
        Client::connect(mesh.listen)
            .get_from("api.external.example", "/", &[])
            .status
            == 200
    });
    for _ in 0..10 {
        let r = client.get_from("api.external.example", "/", &[]);
        assert_eq!((r.status, r.served_by()), (200, "external"), "{r:?}");
    }
    // The service's own host still goes where it did.
    assert_eq!(client.get("/", &[]).status, 200);
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[
            ("destination_service", "api.external.example"),
            ("response_code", "200"),
        ],
        10.0,
    );
}

#[test]
fn a_slow_request_head_gets_408_and_a_closed_connection() {
    let mesh = mesh_with_args(app("v2"), "{}", "", &["--http-header-timeout-ms", "300"]);
    let mut client = Client::connect(mesh.listen);
    // Half a head, then nothing (slowloris): answered 408 at the deadline, then closed.
    client.send_raw(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ");
    let started = Instant::now();
    let r = client.read_response();
    assert_eq!(r.status, 408, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    assert_eq!(
        client.reader.read_to_end(&mut rest).unwrap_or(0),
        0,
        "the connection stayed open"
    );
}

#[test]
fn not_http_on_an_http_port_is_refused_and_refusals_are_counted() {
    let mesh = mesh("");
    // Bytes that are not HTTP on a port declared HTTP: 400, closed, never relayed.
    let mut client = Client::connect(mesh.listen);
    client.send_raw(b"GARBAGE\r\n\r\n");
    let r = client.read_response();
    assert_eq!((r.status, r.served_by()), (400, "-"), "{r:?}");
    let mut rest = Vec::new();
    assert_eq!(client.reader.read_to_end(&mut rest).unwrap_or(0), 0);
    wait_metric(
        &mesh.proxy,
        "isthmus_proxy_connections_refused_total",
        &[("reason", "not_http")],
        1.0,
    );
    // A request the proxy refuses itself is counted (400 DPE).
    let mut client = Client::connect(mesh.listen);
    client.send_raw(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_eq!(client.read_response().status, 400);
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "400"), ("response_flags", "DPE")],
        1.0,
    );
    // HTTP/1.0 without Host goes upstream as HTTP/1.1 with the address asked for as Host.
    let mut client = Client::connect(mesh.listen);
    client.send_raw(b"GET /headers HTTP/1.0\r\n\r\n");
    let r = client.read_response();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.text().to_ascii_lowercase().contains("host: 10.96.0.2:80"),
        "{}",
        r.text()
    );
}

/// An upstream that accepts `CONNECT` with 200 and then echoes bytes: what an HTTP proxy or a
/// tunnel endpoint behind the sidecar does.
fn connect_endpoint() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut stream = reader.into_inner();
                stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
                let mut buf = [0u8; 1024];
                loop {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    stream.write_all(&buf[..n])?;
                }
            });
        }
    });
    addr
}

#[test]
fn connect_is_tunnelled_as_bytes_after_the_upstream_accepts_it() {
    let mesh = mesh_with(
        connect_endpoint(),
        "{}",
        &virtual_service("  - route: [{destination: {host: web, subset: v2}}]\n"),
    );
    let mut client = Client::connect(mesh.listen);
    client.send_raw(b"CONNECT backend.example:443 HTTP/1.1\r\nHost: backend.example:443\r\n\r\n");
    let r = client.read_response();
    assert_eq!(r.status, 200, "{r:?}");
    // From here on the connection is a byte stream both ways.
    client.send_raw(b"\x16\x03\x01 not http at all \x00\xff");
    let mut echoed = [0u8; 22];
    client.reader.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"\x16\x03\x01 not http at all \x00\xff");
}
