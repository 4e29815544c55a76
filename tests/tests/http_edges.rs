//! The edges of the HTTP path end to end, through real capture and real sidecars: request
//! smuggling vectors refused by the client's sidecar (raw sockets: curl will not send them),
//! and server-first protocols that must not wait on protocol detection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use isthmus_ctl::local::{Mesh, MeshSpec, Pod, PodSpec, ServicePort, HTTP_PORT, HTTP_SERVICE_PORT};
use isthmus_tests::http::app_stats;
use isthmus_tests::probe::wait_metric;
use isthmus_tests::traffic::{accept_until, End};
use isthmus_tests::{metric_sum, prerequisites};

/// A meshed client and a meshed `hello-v1`, every service declaring `extra` ports beside the
/// default ones.
fn mesh(extra: Vec<ServicePort>) -> Option<Mesh> {
    if !prerequisites() {
        return None;
    }
    let mut spec = MeshSpec::new(
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
        ],
    );
    spec.ports.extend(extra);
    Some(Mesh::start(spec).unwrap_or_else(|e| panic!("mesh did not start: {e}")))
}

/// Everything the peer sends until it ends the connection, and how it ended; a connection
/// still open after `within` ends as `TimedOut` (so a hang is told from a close).
fn read_until_end(stream: &mut std::net::TcpStream, within: Duration) -> (Vec<u8>, End) {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break End::TimedOut
            }
            Err(e) => break End::Error(e.kind()),
        }
    };
    (got, end)
}

/// What a request that a conforming upstream would read as a second request looks like:
/// if any sidecar let a vector's framing through, the app would count key `smuggled`.
const SMUGGLED: &str = "GET /fail/smuggled/0/200 HTTP/1.1\r\nHost: hello\r\n\r\n";

/// Each vector, sent on its own connection from the client pod to the service VIP, is
/// answered by the client's sidecar with the status given (400, or 501 for a transfer coding
/// it does not implement), without the app's `x-served-by`, and the connection is then closed
/// (end of stream or reset within 5 s, not left open). Nothing reaches the upstream: the app
/// counts no request — not the vector, and not the request smuggled in its body — and the
/// server sidecar completed none (a bad chunk is found after the head was streamed on; such
/// a request is cut, recorded there as `DC` without a response). A well-formed chunked
/// request afterwards arrives (the counters do count).
#[test]
fn smuggling_vectors_are_refused_by_the_client_sidecar_and_never_reach_the_upstream() {
    let Some(mesh) = mesh(Vec::new()) else { return };
    let vip = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    let post = |headers: &str, body: &str| {
        format!("POST / HTTP/1.1\r\nHost: hello\r\n{headers}\r\n{body}{SMUGGLED}")
    };
    let vectors: Vec<(&str, String, u16)> = vec![
        ("CL+TE", post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), 400),
        ("TE+CL", post("Transfer-Encoding: chunked\r\nContent-Length: 60\r\n", "0\r\n\r\n"), 400),
        ("TE gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"), 501),
        ("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), 501),
        ("TE twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), 501),
        ("TE xchunked", post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), 501),
        ("TE space before colon", post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), 400),
        ("TE in HTTP/1.0", format!("POST / HTTP/1.0\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"), 400),
        ("CL twice, different", post("Content-Length: 0\r\nContent-Length: 49\r\n", ""), 400),
        ("CL signed", post("Content-Length: +0\r\n", ""), 400),
        ("chunk size not hex", post("Transfer-Encoding: chunked\r\n", "zz\r\nabc\r\n0\r\n\r\n"), 400),
        ("chunk size overflow", post("Transfer-Encoding: chunked\r\n", "10000000000000000\r\nabc\r\n0\r\n\r\n"), 400),
        ("chunk size negative", post("Transfer-Encoding: chunked\r\n", "-1\r\nabc\r\n0\r\n\r\n"), 400),
        ("chunk line bare LF", post("Transfer-Encoding: chunked\r\n", "3\nabc\r\n0\r\n\r\n"), 400),
        ("chunk longer than size", post("Transfer-Encoding: chunked\r\n", "3\r\nabcdef\r\n0\r\n\r\n"), 400),
        ("obs-fold", format!("GET / HTTP/1.1\r\nHost: hello\r\nX-Folded: a\r\n b\r\n\r\n{SMUGGLED}"), 400),
        ("bare CR in a value", format!("GET / HTTP/1.1\r\nHost: hello\r\nX-Bad: a\rTransfer-Encoding: chunked\r\n\r\n{SMUGGLED}"), 400),
        ("NUL in a value", format!("GET / HTTP/1.1\r\nHost: hello\r\nX-Bad: a\0b\r\n\r\n{SMUGGLED}"), 400),
    ];
    let client = mesh.pod("client");
    let upstream = mesh.pod("hello-v1");
    let local = format!("http://127.0.0.1:{HTTP_PORT}");
    for (name, raw, want) in &vectors {
        let mut stream = client.connect(vip).unwrap();
        stream.write_all(raw.as_bytes()).unwrap();
        let (got, end) = read_until_end(&mut stream, Duration::from_secs(5));
        let text = String::from_utf8_lossy(&got);
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert_eq!(status, *want, "{name}: {raw:?} got {text:?}");
        assert!(
            !text.to_ascii_lowercase().contains("x-served-by"),
            "{name}: answered by the app: {text:?}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("HTTP/1.")).count(),
            1,
            "{name}: one response only: {text:?}"
        );
        assert!(
            matches!(
                end,
                End::Eof | End::Error(std::io::ErrorKind::ConnectionReset)
            ),
            "{name}: connection not closed after the refusal: {end:?}"
        );
    }
    let stats = app_stats(upstream, &local).unwrap();
    assert_eq!(
        (stats.total, stats.key("smuggled")),
        (0, 0),
        "reached the upstream: {stats:?}"
    );
    // Heads with a good framing and a bad chunked body are streamed on before the body is
    // read (as Envoy does), then cut: the server sidecar may have seen such a head, but only
    // as a request whose client went away (`DC`, no response), never one that completed.
    let inbound = upstream.metrics().unwrap();
    let destination = ("reporter", "destination");
    let cut = metric_sum(
        &inbound,
        "istio_requests_total",
        &[
            destination,
            ("response_code", "0"),
            ("response_flags", "DC"),
        ],
    );
    assert_eq!(
        metric_sum(&inbound, "istio_requests_total", &[destination]),
        cut,
        "{inbound}"
    );
    let body_vectors = vectors
        .iter()
        .filter(|(n, _, _)| n.starts_with("chunk"))
        .count();
    assert!(cut <= body_vectors as f64, "{inbound}");

    let mut stream = client.connect(vip).unwrap();
    stream
        .write_all(
            b"POST /echo?key=control HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .unwrap();
    let (got, end) = read_until_end(&mut stream, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.contains("hello"), "{text:?}");
    assert_eq!(end, End::Eof);
    let stats = app_stats(upstream, &local).unwrap();
    assert_eq!((stats.total, stats.key("control")), (1, 1), "{stats:?}");
}

/// A greeter bound inside `pod` on `port`: for each of `connections` connections it sends
/// `GREETING` at once, then echoes one line. Gives up after 10 s.
fn greeter(pod: &Pod, port: u16, connections: usize) -> std::thread::JoinHandle<()> {
    let listener = pod
        .netns()
        .run(move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..connections {
            let mut stream = accept_until(&listener, deadline).unwrap();
            stream.write_all(GREETING).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut line = [0u8; 64];
            let n = stream.read(&mut line).unwrap();
            stream.write_all(&line[..n]).unwrap();
        }
    })
}

const GREETING: &[u8] = b"220 greeter ready\r\n";

/// Connects from `client` to `addr`, sends nothing, and returns how long the greeting took;
/// then checks a line is relayed both ways after it.
fn greeted(client: &Pod, addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = client.connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = vec![0u8; GREETING.len()];
    stream
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{addr}: no greeting within 5 s: {e}"));
    let took = started.elapsed();
    assert_eq!(got, GREETING, "{addr}");
    stream.write_all(b"QUIT\r\n").unwrap();
    let mut back = [0u8; 6];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"QUIT\r\n");
    took
}

/// A server-first protocol does not hang behind protocol detection (`detect::plan`):
/// - on a service port declared with no protocol (`greet`, 7000), both sidecars sniff: the
///   client's outbound sidecar and the server's inbound one each wait their 200 ms detection
///   timeout, then relay as TCP. The greeting arrives within 1 s of connecting, unprompted,
///   and each sidecar counts `outcome="timeout"` once on port 7000;
/// - on a well-known server-first port (3306, MySQL) to the pod's address, no sidecar reads
///   at all: the greeting arrives within 1 s and neither sidecar has a detection series for
///   port 3306 (skipped connections are not counted).
#[test]
fn server_first_protocols_get_their_greeting_without_sending() {
    let Some(mesh) = mesh(vec![ServicePort::new(7000, "greet")]) else {
        return;
    };
    let (client, server) = (mesh.pod("client"), mesh.pod("hello-v1"));
    let greeters = [greeter(server, 7000, 1), greeter(server, 3306, 1)];

    let sniffed = greeted(client, SocketAddr::from((mesh.vip4("hello"), 7000)));
    assert!(sniffed < Duration::from_secs(1), "port 7000: {sniffed:?}");
    eprintln!("greeting on 7000 (sniffed by both sidecars) after {sniffed:?}");
    for (pod, direction) in [(client, "outbound"), (server, "inbound")] {
        let labels = [
            ("direction", direction),
            ("port", "7000"),
            ("outcome", "timeout"),
        ];
        let n = wait_metric(pod, "isthmus_proxy_protocol_detection_total", &labels, 1.0);
        assert_eq!(n, 1.0, "{}: {labels:?}", pod.name);
    }

    let skipped = greeted(client, SocketAddr::from((server.ipv4, 3306)));
    assert!(skipped < Duration::from_secs(1), "port 3306: {skipped:?}");
    eprintln!("greeting on 3306 (not sniffed) after {skipped:?}");
    for greeter in greeters {
        greeter.join().unwrap();
    }
    for pod in [client, server] {
        let text = pod.metrics().unwrap();
        assert!(
            !text.contains("port=\"3306\""),
            "{}: a detection series for 3306:\n{text}",
            pod.name
        );
    }
}
