//! HTTP/2 and gRPC through the proxy as a process, with explicit listeners standing for
//! captured outbound connections to service VIPs: curl with prior knowledge and h2load (many
//! streams on one connection) against an h2c upstream written here with the h2 crate, h2 to
//! the HTTP/1 test app (translation, chunked trailers to h2 trailers), resets both ways, and
//! a real gRPC client and server (grpcio) — unary, server streaming, and a retry on
//! `UNAVAILABLE` counted at the server.

mod support;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Request, Response};
use isthmus_tests::grpc::{parse_call, peer_script, python, GrpcCall};
use isthmus_tests::http::{parse_h2load, parse_header_dump};
use support::*;

/// Requests seen by the h2 upstream, by path, and the connections it accepted.
#[derive(Default)]
struct Seen {
    paths: Mutex<BTreeMap<String, u64>>,
    connections: AtomicU64,
}

impl Seen {
    fn count(&self, path: &str) -> u64 {
        self.paths.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// An h2c (prior knowledge) server on a loopback port:
/// `/trailers` answers with trailers, `/reset` resets after a first DATA frame,
/// `/refuse/KEY/N` refuses the first N streams (REFUSED_STREAM), `/slow` answers after 2 s
/// (counting `reset CANCEL` if the stream is reset first), `POST` echoes the body, and
/// anything else answers `h2 METHOD PATH` with `x-authority` and `x-set` echoed as headers.
fn h2_upstream() -> (SocketAddr, Arc<Seen>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let seen = shared.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((request, respond))) = conn.accept().await {
                        tokio::spawn(answer(request, respond, seen.clone()));
                    }
                });
            }
        });
    });
    (addr, seen)
}

async fn answer(request: Request<RecvStream>, mut respond: SendResponse<Bytes>, seen: Arc<Seen>) {
    let path = request.uri().path().to_string();
    let attempt = {
        let mut paths = seen.paths.lock().unwrap();
        let n = paths.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let authority = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let set = request.headers().get("x-set").cloned();
    let method = request.method().clone();
    let mut body = request.into_body();
    let mut received = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        received.extend_from_slice(&chunk);
    }
    if path == "/slow" {
        // Answers after 2 s, unless the proxy cancels the stream first.
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        if let Ok(Ok(reason)) = tokio::time::timeout(Duration::from_secs(2), reset).await {
            let mut paths = seen.paths.lock().unwrap();
            *paths.entry(format!("reset {reason:?}")).or_insert(0) += 1;
            return;
        }
    }
    if let Some(rest) = path.strip_prefix("/refuse/") {
        let refusals: u64 = rest.rsplit('/').next().unwrap().parse().unwrap();
        if attempt <= refusals {
            return respond.send_reset(Reason::REFUSED_STREAM);
        }
    }
    let mut head = Response::builder()
        .status(200)
        .header("x-served-by", "h2")
        .header("x-authority", authority);
    if let Some(set) = set {
        head = head.header("x-set", set);
    }
    let Ok(mut send) = respond.send_response(head.body(()).unwrap(), false) else {
        return;
    };
    match path.as_str() {
        "/trailers" => {
            let _ = send.send_data(Bytes::from_static(b"with trailers"), false);
            let mut trailers = HeaderMap::new();
            trailers.insert("x-trailer", "yes".parse().unwrap());
            let _ = send.send_trailers(trailers);
        }
        "/reset" => {
            let _ = send.send_data(Bytes::from_static(b"partial"), false);
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.send_reset(Reason::INTERNAL_ERROR);
        }
        _ if method == http::Method::POST => {
            let _ = send.send_data(received.into(), true);
        }
        _ => {
            let _ = send.send_data(format!("h2 {method} {path}").into(), true);
        }
    }
}

/// The test app (HTTP/1 only) on a loopback port.
fn app(name: &'static str) -> SocketAddr {
    let (http, echo) = (free_port(), free_port());
    let http: SocketAddr = ([127, 0, 0, 1], http).into();
    std::thread::spawn(move || {
        let _ = isthmus_ctl::app::serve(name, http, ([127, 0, 0, 1], echo).into());
    });
    wait_listening(http);
    http
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A ServiceEntry `name` at `vip`:`port` (protocol `protocol`) with one endpoint.
fn service(name: &str, vip: &str, port: u16, protocol: &str, endpoint: SocketAddr) -> String {
    let port_name = protocol.to_ascii_lowercase();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  hosts: [{name}]\n  addresses: [{vip}]\n  ports: [{{number: {port}, name: {port_name}, protocol: {protocol}}}]\n\
         \x20 resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{{port_name}: {}}}}}]\n",
        endpoint.port()
    )
}

/// The routes of `h2svc`: `/api` rewritten with header operations, `/timed` to `/slow` with a
/// 0.3 s timeout, the test paths routed, anything else no route (404 NR).
const H2SVC_ROUTES: &str = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
    metadata: {name: h2svc, namespace: test}\nspec:\n  hosts: [h2svc]\n  http:\n\
    \x20 - match: [{uri: {prefix: /api}}]\n    rewrite: {uri: /rewritten}\n\
    \x20   headers: {request: {set: {x-set: one}}, response: {set: {x-resp: three}}}\n\
    \x20   route: [{destination: {host: h2svc}}]\n\
    \x20 - match: [{uri: {prefix: /cors}}]\n\
    \x20   corsPolicy: {allowOrigins: [{exact: 'https://app.example'}], allowMethods: [GET]}\n\
    \x20   mirror: {host: web}\n    mirrorPercentage: {value: 100}\n\
    \x20   route: [{destination: {host: h2svc}}]\n\
    \x20 - match: [{uri: {exact: /timed}}]\n    rewrite: {uri: /slow}\n    timeout: 0.3s\n\
    \x20   route: [{destination: {host: h2svc}}]\n\
    \x20 - match: [{uri: {regex: \"/(hello|trailers|reset|echo|load|slow|refuse/.*)\"}}]\n\
    \x20   route: [{destination: {host: h2svc}}]\n";

struct Mesh {
    proxy: Proxy,
    /// Explicit listeners: h2svc (HTTP2), web (HTTP, the HTTP/1 app), grpc (GRPC).
    h2svc: SocketAddr,
    web: SocketAddr,
    grpc: SocketAddr,
    seen: Arc<Seen>,
    /// The HTTP/1 app behind `web`, asked directly.
    web_app: SocketAddr,
    /// The h2c upstream, and the config the proxy was given.
    h2_upstream: SocketAddr,
    config: String,
}

/// The proxy (with `args` more) and three explicit listeners; `grpc_endpoint` is where the
/// gRPC service's endpoint listens (a server may or may not be started there).
fn mesh(grpc_endpoint: SocketAddr, args: &[&str]) -> Mesh {
    let (h2_addr, seen) = h2_upstream();
    let web_addr = app("web");
    let listen = || -> SocketAddr { ([127, 0, 0, 1], free_port()).into() };
    let (h2svc, web, grpc) = (listen(), listen(), listen());
    let proxy = start(Options {
        args: vec![
            "--explicit".into(),
            format!("{h2svc}=10.96.0.3:80"),
            "--explicit".into(),
            format!("{web}=10.96.0.2:80"),
            "--explicit".into(),
            format!("{grpc}=10.96.0.4:50051"),
        ]
        .into_iter()
        .chain(args.iter().map(|a| a.to_string()))
        .collect(),
        wait_ready: false,
        ..Options::default()
    });
    let config = [
        service("h2svc", "10.96.0.3", 80, "HTTP2", h2_addr),
        service("web", "10.96.0.2", 80, "HTTP", web_addr),
        service("grpc", "10.96.0.4", 50051, "GRPC", grpc_endpoint),
        H2SVC_ROUTES.to_string(),
    ]
    .concat();
    proxy.reconfigure(&config);
    proxy.wait_until("ready", |p| p.get("/ready").starts_with("HTTP/1.1 200"));
    Mesh {
        proxy,
        h2svc,
        web,
        grpc,
        seen,
        web_app: web_addr,
        h2_upstream: h2_addr,
        config,
    }
}

/// What curl got.
#[derive(Debug)]
struct Got {
    exit: i32,
    status: u16,
    version: String,
    headers: Vec<(String, String)>,
    trailers: Vec<(String, String)>,
    body: Vec<u8>,
    error: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// `curl --http2-prior-knowledge` to `http://HOST PATH`, connected to `via`.
fn curl(via: SocketAddr, host: &str, path: &str, args: &[&str]) -> Got {
    curl_as("--http2-prior-knowledge", via, host, path, args)
}

/// curl speaking `version` (`--http1.1`, `--http2-prior-knowledge`).
fn curl_as(version: &str, via: SocketAddr, host: &str, path: &str, args: &[&str]) -> Got {
    let dir = std::env::temp_dir().join(format!(
        "isthmus-h2-curl-{}-{}",
        std::process::id(),
        SCRATCH.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (head, body): (PathBuf, PathBuf) = (dir.join("head"), dir.join("body"));
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "10", version])
        .arg("--connect-to")
        .arg(format!("{host}:80:{}:{}", via.ip(), via.port()))
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code} %{http_version}"])
        .args(args)
        .arg(format!("http://{host}{path}"))
        .output()
        .expect("curl (apt-get install curl)");
    let written = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut w = written.split_whitespace();
    let status = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = w.next().unwrap_or("0").to_string();
    let (blocks, trailers) = parse_header_dump(&std::fs::read_to_string(&head).unwrap_or_default());
    let got = Got {
        exit: out.status.code().unwrap_or(-1),
        status,
        version,
        headers: blocks.last().map(|(_, h)| h.clone()).unwrap_or_default(),
        trailers,
        body: std::fs::read(&body).unwrap_or_default(),
        error: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    got
}

/// The app's request count for `key` (its `/__stats`), asked directly.
fn app_count(app: SocketAddr, key: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(app).unwrap();
    s.write_all(b"GET /__stats HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["keys"][key].as_u64().unwrap_or(0)
}

fn wait_metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    proxy.wait_until(&format!("{name}{labels:?} >= {at_least}"), |p| {
        metric(&p.metrics(), name, labels) >= at_least
    });
    metric(&proxy.metrics(), name, labels)
}

#[test]
fn curl_prior_knowledge_to_h2_and_http1_upstreams() {
    let mesh = mesh(([127, 0, 0, 1], free_port()).into(), &[]);
    // h2 to an h2 upstream (the port is declared HTTP2).
    let r = curl(mesh.h2svc, "h2svc", "/hello", &[]);
    assert_eq!(
        (r.exit, r.status, r.version.as_str()),
        (0, 200, "2"),
        "{r:?}"
    );
    assert_eq!(r.text(), "h2 GET /hello");
    assert_eq!(r.header("x-authority"), Some("h2svc"));
    // Rewrite and header operations.
    let r = curl(mesh.h2svc, "h2svc", "/api/x?q=1", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "h2 GET /rewritten/x");
    assert_eq!(
        (r.header("x-set"), r.header("x-resp")),
        (Some("one"), Some("three"))
    );
    // Trailers pass through h2 to h2; a body goes both ways.
    let r = curl(mesh.h2svc, "h2svc", "/trailers", &[]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "with trailers"),
        "{r:?}"
    );
    assert_eq!(
        r.trailers,
        vec![("x-trailer".to_string(), "yes".to_string())]
    );
    let payload: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let file = std::env::temp_dir().join(format!("isthmus-h2-payload-{}", std::process::id()));
    std::fs::write(&file, &payload).unwrap();
    let data = format!("@{}", file.display());
    let r = curl(mesh.h2svc, "h2svc", "/echo", &["--data-binary", &data]);
    let _ = std::fs::remove_file(&file);
    assert_eq!((r.status, r.body == payload), (200, true), "{r:?}");
    // No rule matches: 404 NR, made by the proxy.
    let r = curl(mesh.h2svc, "h2svc", "/elsewhere", &[]);
    assert_eq!((r.status, r.version.as_str()), (404, "2"), "{r:?}");
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "404"), ("response_flags", "NR")],
        1.0,
    );

    // CORS: a preflight answered here, an allowed request's response with the headers; a
    // bodiless request mirrored to `web` (HTTP/1).
    let origin = ["-H", "origin: https://app.example"];
    let preflight = [
        &origin[..],
        &["-X", "OPTIONS", "-H", "access-control-request-method: GET"],
    ];
    let r = curl(mesh.h2svc, "h2svc", "/cors", &preflight.concat());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        r.header("x-served-by"),
        None,
        "a preflight reached the upstream"
    );
    let r = curl(mesh.h2svc, "h2svc", "/cors?key=mirrored", &origin);
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "h2 GET /cors"),
        "{r:?}"
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    mesh.proxy.wait_until("the mirrored copy at web", |_| {
        app_count(mesh.web_app, "mirrored") == 1
    });

    // h2 to the HTTP/1 app (the port is declared HTTP): translated both ways, chunked
    // trailers arriving as h2 trailers.
    let r = curl(mesh.web, "web", "/stream/100000", &["-H", "te: trailers"]);
    assert_eq!(
        (r.exit, r.status, r.version.as_str()),
        (0, 200, "2"),
        "{r:?}"
    );
    let expected: Vec<u8> = (0..100_000).map(isthmus_ctl::app::pattern_byte).collect();
    assert!(r.body == expected, "body of {} bytes differs", r.body.len());
    let checksum = isthmus_ctl::app::checksum(&expected);
    assert_eq!(
        r.trailers,
        vec![("x-checksum".to_string(), checksum)],
        "{r:?}"
    );
    let r = curl(
        mesh.web,
        "web",
        "/echo",
        &["--data-binary", "hello over h2"],
    );
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello over h2"),
        "{r:?}"
    );
    let r = curl(mesh.web, "web", "/headers", &[]);
    let seen = r.text();
    assert!(seen.starts_with("GET /headers HTTP/1.1"), "{seen}");
    assert!(seen.contains("host: web"), "{seen}");
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[
            ("destination_service_name", "web"),
            ("response_code", "200"),
            ("request_protocol", "http"),
        ],
        3.0,
    );
}

#[test]
fn h2load_many_streams_on_one_connection() {
    let mesh = mesh(([127, 0, 0, 1], free_port()).into(), &[]);
    let url = format!("http://{}/load", mesh.h2svc);
    let out = Command::new("h2load")
        .args(["-n", "1000", "-c", "1", "-m", "50", "-t", "1", &url])
        .stderr(Stdio::inherit())
        .output();
    let Ok(out) = out else {
        return skip("h2load not installed (apt-get install nghttp2-client)");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = parse_h2load(&text).unwrap_or_else(|| panic!("h2load said: {text}"));
    assert_eq!(
        (summary.succeeded, summary.status[0]),
        (1000, 1000),
        "{text}"
    );
    assert_eq!(mesh.seen.count("/load"), 1000);
    // One client connection: its streams share the worker's one upstream connection.
    assert_eq!(mesh.seen.connections.load(Ordering::Relaxed), 1);
    let counted = wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[
            ("destination_service_name", "h2svc"),
            ("response_code", "200"),
        ],
        1000.0,
    );
    assert_eq!(counted, 1000.0);
}

#[test]
fn resets_cross_the_proxy_and_refused_streams_are_retried() {
    let mesh = mesh(([127, 0, 0, 1], free_port()).into(), &[]);
    // The upstream resets after the head and a first DATA frame: the client's stream is
    // reset too (curl: "HTTP/2 stream was not closed cleanly", exit 92).
    let r = curl(mesh.h2svc, "h2svc", "/reset", &[]);
    assert_eq!((r.status, r.exit), (200, 92), "{r:?}");
    assert!(r.error.contains("INTERNAL_ERROR"), "{}", r.error);
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "200"), ("response_flags", "UR")],
        1.0,
    );
    // REFUSED_STREAM twice, then served: Istio's default policy retries refused streams.
    let r = curl(mesh.h2svc, "h2svc", "/refuse/a/2", &[]);
    assert_eq!((r.status, r.exit), (200, 0), "{r:?}");
    assert_eq!(mesh.seen.count("/refuse/a/2"), 3);
    // Three refusals exhaust the two retries: 503, flagged UR,URX (as Envoy writes it).
    let r = curl(mesh.h2svc, "h2svc", "/refuse/b/3", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(mesh.seen.count("/refuse/b/3"), 3);
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UR,URX")],
        1.0,
    );
}

/// A running `grpc_server.py` on a loopback port, killed on drop.
struct GrpcPeer(std::process::Child);

impl Drop for GrpcPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpc_call(python: &PathBuf, target: SocketAddr, method: &str, args: &[&str]) -> Vec<GrpcCall> {
    let out = Command::new(python)
        .arg(peer_script("grpc_client.py"))
        .arg(target.to_string())
        .arg(method)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| parse_call(l).unwrap())
        .collect()
}

#[test]
fn grpc_unary_streaming_and_status_retry() {
    let Some(python) = python() else {
        return skip("no Python with grpcio (apt-get install python3-grpcio)");
    };
    let port = free_port();
    let mut server = Command::new(python)
        .arg(peer_script("grpc_server.py"))
        .args(["g1", &port.to_string(), "--host", "127.0.0.1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let _server = GrpcPeer(server);
    // READY once listening (grpcio's import alone takes seconds on a loaded machine).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(
        ready.as_deref().map(str::trim),
        Ok("READY"),
        "grpc_server.py"
    );
    let endpoint: SocketAddr = ([127, 0, 0, 1], port).into();
    let mesh = mesh(endpoint, &[]);

    let calls = grpc_call(
        python,
        mesh.grpc,
        "Echo",
        &["--payload", "hi", "--repeat", "3"],
    );
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(
            (call.code.as_str(), call.payload.as_deref()),
            ("OK", Some("hi"))
        );
        assert_eq!(
            call.trailing.get("x-served-by").map(String::as_str),
            Some("g1")
        );
    }
    let calls = grpc_call(python, mesh.grpc, "Stream", &["--payload", "5"]);
    assert_eq!(calls[0].code, "OK", "{calls:?}");
    assert_eq!(calls[0].messages, ["0", "1", "2", "3", "4"]);
    // UNAVAILABLE twice (trailers-only answers), then OK: Istio's default policy retries
    // `unavailable`; the server saw three attempts.
    let calls = grpc_call(
        python,
        mesh.grpc,
        "Fail",
        &[
            "--metadata",
            "x-fail-key=k1",
            "--metadata",
            "x-fail-count=2",
        ],
    );
    assert_eq!(calls[0].code, "OK", "{calls:?}");
    let count = grpc_call(python, mesh.grpc, "Count", &[]);
    let seen: serde_json::Value =
        serde_json::from_str(count[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(seen["keys"]["k1"], 3, "{seen}");

    let grpc_ok = [
        ("request_protocol", "grpc"),
        ("grpc_response_status", "0"),
        ("destination_service_name", "grpc"),
    ];
    wait_metric(&mesh.proxy, "istio_requests_total", &grpc_ok, 6.0);
    // Messages: 3 Echo + 1 Stream + 1 Fail + 1 Count requests; 3 + 5 + 1 + 1 responses.
    wait_metric(&mesh.proxy, "istio_request_messages_total", &grpc_ok, 6.0);
    wait_metric(&mesh.proxy, "istio_response_messages_total", &grpc_ok, 10.0);
}

#[test]
fn timeouts_and_client_cancels_reset_the_upstream_stream() {
    let mesh = mesh(([127, 0, 0, 1], free_port()).into(), &[]);
    // The route's timeout: 504 UT, and the upstream stream is cancelled.
    let started = Instant::now();
    let r = curl(mesh.h2svc, "h2svc", "/timed", &[]);
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[("response_code", "504"), ("response_flags", "UT")],
        1.0,
    );
    mesh.proxy.wait_until("the upstream stream reset", |_| {
        mesh.seen.count("reset CANCEL") >= 1
    });
    // The client gives up (its connection closes): the upstream stream is cancelled too.
    let r = curl(mesh.h2svc, "h2svc", "/slow", &["--max-time", "0.5"]);
    assert_eq!(r.exit, 28, "{r:?}");
    mesh.proxy.wait_until("the upstream stream reset", |_| {
        mesh.seen.count("reset CANCEL") >= 2
    });
}

#[test]
fn http1_clients_reach_an_h2_upstream() {
    // h2svc's port is declared HTTP2: an HTTP/1.1 client's requests go upstream in h2.
    let mesh = mesh(([127, 0, 0, 1], free_port()).into(), &[]);
    let h1 = |path: &str, args: &[&str]| curl_as("--http1.1", mesh.h2svc, "h2svc", path, args);
    let r = h1("/hello", &[]);
    assert_eq!((r.status, r.version.as_str()), (200, "1.1"), "{r:?}");
    assert_eq!(r.text(), "h2 GET /hello");
    assert_eq!(r.header("x-authority"), Some("h2svc"));
    assert_eq!(mesh.seen.connections.load(Ordering::Relaxed), 1);
    // h2 trailers come back as chunked trailers to a client that asked for them.
    let r = h1("/trailers", &["-H", "te: trailers"]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "with trailers"),
        "{r:?}"
    );
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        r.trailers,
        vec![("x-trailer".to_string(), "yes".to_string())]
    );
    // Bodies both ways, by length and chunked.
    let r = h1("/echo", &["--data-binary", "by length"]);
    assert_eq!((r.status, r.text().as_str()), (200, "by length"), "{r:?}");
    let chunked = [
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        "in chunks",
    ];
    let r = h1("/echo", &chunked);
    assert_eq!((r.status, r.text().as_str()), (200, "in chunks"), "{r:?}");
    // REFUSED_STREAM retried for an HTTP/1 client too; an upstream reset mid-body resets it.
    let r = h1("/refuse/h1/1", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(mesh.seen.count("/refuse/h1/1"), 2);
    let r = h1("/reset", &[]);
    assert_ne!(r.exit, 0, "{r:?}");
    wait_metric(
        &mesh.proxy,
        "istio_requests_total",
        &[
            ("destination_service_name", "h2svc"),
            ("response_code", "200"),
        ],
        5.0,
    );
}

#[test]
fn closing_ends_h2_connections_with_goaway() {
    let mut mesh = mesh(
        ([127, 0, 0, 1], free_port()).into(),
        &["--drain-timeout-secs", "1"],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(mesh.proxy.child.id() as i32);
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(mesh.h2svc).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = Request::get("http://h2svc/slow").body(()).unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Outbound keeps working while draining; the drain timeout (1 s) then closes
        // everything: the connection gets GOAWAY and ends, the stream with it.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
        assert!(ended.is_ok(), "the h2 connection outlived the drain");
        assert!(response.await.is_err(), "the slow stream completed");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    });
    let status = mesh.proxy.wait_exit(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn upgrade_policy_and_client_protocol_choose_h2_on_an_http_port() {
    // `h2up` at 10.96.0.5:80 is declared HTTP, and its endpoint speaks only h2.
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let explicit = format!("{listen}=10.96.0.5:80");
    let mesh = mesh(
        ([127, 0, 0, 1], free_port()).into(),
        &["--explicit", &explicit],
    );
    let with_pool = |pool: &str| {
        let rule = format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: h2up, namespace: test}}\nspec:\n  host: h2up\n\
             \x20 trafficPolicy: {{connectionPool: {{http: {{{pool}}}}}}}\n"
        );
        let h2up = service("h2up", "10.96.0.5", 80, "HTTP", mesh.h2_upstream);
        mesh.proxy
            .reconfigure(&[mesh.config.as_str(), &h2up, &rule].concat());
    };
    let h1 = || curl_as("--http1.1", listen, "h2up", "/hello", &[]);
    let h2 = || curl(listen, "h2up", "/hello", &[]);
    // Istio's default (DO_NOT_UPGRADE): HTTP/1.1 upstream, which this endpoint refuses.
    with_pool("maxRequestsPerConnection: 0");
    assert_eq!(h1().status, 503);
    assert_eq!(
        h2().status,
        503,
        "an h2 client to an HTTP port goes upstream in HTTP/1.1"
    );
    // UPGRADE: h2 upstream for both.
    with_pool("h2UpgradePolicy: UPGRADE");
    let r = h1();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "h2 GET /hello"),
        "{r:?}"
    );
    assert_eq!(h2().status, 200);
    // useClientProtocol: the client's protocol.
    with_pool("useClientProtocol: true");
    assert_eq!(h2().status, 200);
    assert_eq!(h1().status, 503);
}
