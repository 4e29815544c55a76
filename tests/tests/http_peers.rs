//! The HTTP, WebSocket and gRPC test peers and their client helpers, proven before the HTTP
//! data path relies on them: real curl, h2load, a WebSocket client and grpcio, run inside pods,
//! through today's sidecars (the service ports are relayed as TCP until HTTP routing lands, so
//! what arrives is exactly what was sent) and, for the counters, straight to the app in its
//! own pod.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use isthmus_ctl::app::{checksum, pattern_byte};
use isthmus_ctl::local::{Mesh, MeshSpec, Pod, PodSpec, HTTP_PORT, HTTP_SERVICE_PORT};
use isthmus_tests::grpc::{self, GrpcClient, GrpcServer, GRPC_PORT};
use isthmus_tests::http::{
    app_stats, parse_headers_echo, tally, Curl, CurlExit, CurlResponse, H2load,
};
use isthmus_tests::traffic::reset_after_request_head;
use isthmus_tests::ws::WebSocket;
use isthmus_tests::{prerequisites, skip};

/// A meshed client, a meshed `hello` pod and an unmeshed pod outside the mesh; `None` when
/// e2e tests cannot run here (recorded as skipped).
fn mesh() -> Option<Mesh> {
    if !prerequisites() {
        return None;
    }
    let mesh = Mesh::start(MeshSpec::new(
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
            PodSpec::unmeshed("outside"),
        ],
    ))
    .unwrap_or_else(|e| panic!("mesh did not start: {e}"));
    Some(mesh)
}

fn base(mesh: &Mesh) -> String {
    format!("http://{}:{HTTP_SERVICE_PORT}", mesh.vip4("hello"))
}

fn get(pod: &Pod, url: String) -> CurlResponse {
    let r = Curl::new(url.clone()).run(pod).unwrap();
    assert_eq!(r.exit, CurlExit::Ok, "{url}: {r:?}");
    r
}

fn pattern(n: u64) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}

/// Every endpoint of the app, by curl from a meshed pod through both sidecars.
#[test]
fn app_endpoints_answer_curl_through_the_sidecars() {
    let Some(mesh) = mesh() else { return };
    let client = mesh.pod("client");
    let base = base(&mesh);

    let r = get(client, format!("{base}/"));
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from hello-v1\n")
    );
    assert_eq!(r.http_version, "1.1");
    assert_eq!(r.served_by(), Some("hello-v1"));

    let r = Curl::new(format!("{base}/headers"))
        .header("X-MiXed-Case", "Value  two")
        .run(client)
        .unwrap();
    let (line, headers) = parse_headers_echo(&r.text());
    assert_eq!(line, "GET /headers HTTP/1.1");
    assert!(
        headers.contains(&("X-MiXed-Case".into(), "Value  two".into())),
        "{headers:?}"
    );

    let r = get(client, format!("{base}/status/503"));
    assert_eq!((r.status, r.header("content-length")), (503, Some("0")));
    assert_eq!(r.served_by(), Some("hello-v1"));
    let r = get(client, format!("{base}/status/204"));
    assert_eq!((r.status, r.header("content-length")), (204, None));
    assert_eq!(get(client, format!("{base}/nowhere")).status, 404);

    let r = get(client, format!("{base}/delay/300"));
    assert!(r.time_total >= Duration::from_millis(300), "{r:?}");
    let r = Curl::new(format!("{base}/delay/3000"))
        .max_time(Duration::from_millis(300))
        .run(client)
        .unwrap();
    assert_eq!((r.exit, r.status), (CurlExit::Timeout, 0), "{r:?}");

    let r = get(client, format!("{base}/bytes/100000"));
    assert_eq!(r.header("content-length"), Some("100000"));
    assert!(r.body == pattern(100_000), "/bytes body differs");

    let r = Curl::new(format!("{base}/stream/100000"))
        .header("TE", "trailers")
        .run(client)
        .unwrap();
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(r.body == pattern(100_000), "/stream body differs");
    assert_eq!(r.trailer("x-checksum"), Some(checksum(&r.body).as_str()));
    let r = get(client, format!("{base}/stream/10"));
    assert_eq!((r.body.len(), r.trailer("x-checksum")), (10, None));

    // HTTP/1.0 has no chunked coding: the sidecar passes the chunks' data on, the body ended
    // by closing the connection (as Envoy does; it does not buffer a body to count it).
    let r = Curl::new(format!("{base}/stream/1000"))
        .http1_0()
        .run(client)
        .unwrap();
    assert_eq!(
        (r.header("transfer-encoding"), r.header("connection")),
        (None, Some("close"))
    );
    assert!(r.body == pattern(1000), "/stream body to HTTP/1.0 differs");
}

/// Request bodies in both framings, `Expect: 100-continue`, and the counters that tell a
/// test how many attempts reached the upstream.
#[test]
fn app_echoes_bodies_and_counts_attempts_at_the_upstream() {
    let Some(mesh) = mesh() else { return };
    let client = mesh.pod("client");
    let base = base(&mesh);
    let body = pattern(200_000);

    let r = Curl::new(format!("{base}/echo"))
        .body(body.clone())
        .header("expect", "")
        .run(client)
        .unwrap();
    assert_eq!(r.header("content-length"), Some("200000"));
    assert!(r.body == body, "echo by length differs");
    assert!(r.interim.is_empty(), "{:?}", r.interim);

    let r = Curl::new(format!("{base}/echo"))
        .body(body.clone())
        .chunked()
        .header("expect", "100-continue")
        .run(client)
        .unwrap();
    assert_eq!(r.interim, vec![100], "{r:?}");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("x-body-bytes"), Some("200000"));
    assert!(r.body == body, "chunked echo differs");

    // Counted at the upstream: read from inside its own pod, past its sidecar.
    let upstream = mesh.pod("hello-v1");
    let local = format!("http://127.0.0.1:{HTTP_PORT}");
    get(upstream, format!("{local}/__reset"));
    // Through the sidecars, Istio's default retry policy (no VirtualService) retries the two
    // 503s: the first call answers 200 after 3 attempts, the next two at once — 5 in all.
    let codes: Vec<u16> = (0..3)
        .map(|_| get(client, format!("{base}/fail/k1/2/503")).status)
        .collect();
    assert_eq!(codes, [200, 200, 200]);
    let stats = app_stats(upstream, &local).unwrap();
    assert_eq!(
        (stats.total, stats.key("k1"), stats.prefix("/fail")),
        (5, 5, 5)
    );

    // Many requests from one curl process: one after another, then 8 at a time.
    let sequential = Curl::new(format!("{base}/?key=many"))
        .run_many(client, 500, 1)
        .unwrap();
    let parallel = Curl::new(format!("{base}/?key=many"))
        .run_many(client, 500, 8)
        .unwrap();
    for briefs in [&sequential, &parallel] {
        assert_eq!(
            tally(briefs, |b| b.served_by()),
            [("hello-v1".to_string(), 500)].into()
        );
        assert!(briefs
            .iter()
            .all(|b| (b.exit, b.status) == (CurlExit::Ok, 200)));
    }
    assert_eq!(app_stats(upstream, &local).unwrap().key("many"), 1000);
    get(upstream, format!("{local}/__reset"));
    assert_eq!(app_stats(upstream, &local).unwrap().total, 0);
}

/// Refused, timed-out and reset connections read as different curl exits (direct, in a
/// pod without a sidecar, so only the peers decide how the connection ends).
#[test]
fn curl_exits_tell_refused_timeout_and_reset_apart() {
    let Some(mesh) = mesh() else { return };
    let outside = mesh.pod("outside");
    let r = Curl::new("http://127.0.0.1:1/").run(outside).unwrap();
    assert_eq!((r.exit, r.status), (CurlExit::Refused, 0), "{r:?}");

    let r = Curl::new(format!("http://127.0.0.1:{HTTP_PORT}/delay/2000"))
        .max_time(Duration::from_millis(200))
        .run(outside)
        .unwrap();
    assert_eq!((r.exit, r.status), (CurlExit::Timeout, 0), "{r:?}");

    let listener = outside
        .netns()
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server =
        std::thread::spawn(move || reset_after_request_head(listener, 1, Duration::from_secs(10)));
    let r = Curl::new(format!("http://127.0.0.1:{port}/"))
        .run(outside)
        .unwrap();
    assert_eq!((r.exit, r.status), (CurlExit::Reset, 0), "{r:?}");
    assert!(r.error.contains("reset"), "{r:?}");
    server.join().unwrap().unwrap();
}

#[test]
fn websocket_echoes_frames_through_the_sidecars() {
    let Some(mesh) = mesh() else { return };
    let vip = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    let mut ws = WebSocket::connect(mesh.pod("client"), vip, "hello", "/ws").unwrap();
    assert_eq!(ws.header("x-served-by"), Some("hello-v1"));
    let text = ws.round_trip(b"hello over websocket").unwrap();
    assert_eq!(
        (text.opcode, text.payload.as_slice()),
        (1, &b"hello over websocket"[..])
    );
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8 | 0x80).collect();
    let binary = ws.round_trip(&big).unwrap();
    assert_eq!(binary.opcode, 2);
    assert!(binary.payload == big, "70000-byte binary frame differs");
    ws.send(0x9, b"ping").unwrap();
    let pong = ws.recv().unwrap().unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"ping"[..]));
    let close = ws.close().unwrap().unwrap();
    assert_eq!(close.opcode, 0x8);
}

/// grpcio client and server in two namespaces: straight to the pod from outside the mesh
/// (through the server's inbound capture), and by the service VIP from a meshed pod.
#[test]
fn grpc_peers_call_each_other_across_namespaces() {
    if grpc::python().is_none() {
        return skip("no Python with grpcio (bash scripts/setup.sh python3-grpcio)");
    }
    let Some(mesh) = mesh() else { return };
    let server = GrpcServer::start(mesh.pod("hello-v1"), "hello-v1", GRPC_PORT).unwrap();
    let direct = format!("{}:{GRPC_PORT}", mesh.pod("hello-v1").ipv4);
    let vip = format!("{}:{GRPC_PORT}", mesh.vip4("hello"));
    for (pod, target) in [("outside", &direct), ("client", &vip)] {
        let pod = mesh.pod(pod);
        let calls = GrpcClient::new(target.as_str(), "Echo")
            .payload("ping")
            .authority("hello.mesh.svc.cluster.local")
            .run(pod)
            .unwrap_or_else(|e| panic!("{e}\nserver: {}", server.stderr()));
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].code.as_str(), calls[0].payload.as_deref()),
            ("OK", Some("ping"))
        );
        assert_eq!(calls[0].trailing["x-served-by"], "hello-v1");

        let calls = GrpcClient::new(target.as_str(), "Stream")
            .payload("5")
            .run(pod)
            .unwrap();
        assert_eq!(calls[0].messages, ["0", "1", "2", "3", "4"]);

        let key = format!("k-{}", pod.name);
        let calls = GrpcClient::new(target.as_str(), "Fail")
            .metadata("x-fail-key", &key)
            .metadata("x-fail-count", "2")
            .repeat(3)
            .run(pod)
            .unwrap();
        let codes: Vec<&str> = calls.iter().map(|c| c.code.as_str()).collect();
        if pod.name == "client" {
            // The client's sidecar retries a trailers-only UNAVAILABLE (Istio's default
            // policy): the first call succeeds at its third attempt.
            assert_eq!(codes, ["OK", "OK", "OK"]);
            assert_eq!(calls[0].trailing["x-attempt"], "3");
        } else {
            assert_eq!(codes, ["UNAVAILABLE", "UNAVAILABLE", "OK"]);
            assert_eq!(calls[2].trailing["x-attempt"], "3");
        }
    }
    // curl speaks it too: HTTP/2 with prior knowledge, the status in the trailers.
    let r = Curl::new(format!("http://{direct}/isthmus.Test/Echo"))
        .http2_prior_knowledge()
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(grpc::frame(b"raw"))
        .run(mesh.pod("outside"))
        .unwrap();
    assert_eq!(
        (r.exit, r.http_version.as_str()),
        (CurlExit::Ok, "2"),
        "{r:?}"
    );
    assert_eq!(r.trailer("grpc-status"), Some("0"), "{r:?}");
    assert_eq!(r.body, grpc::frame(b"raw"));
    let count = GrpcClient::new(direct.as_str(), "Count")
        .run(mesh.pod("outside"))
        .unwrap();
    let counts: serde_json::Value =
        serde_json::from_str(count[0].payload.as_deref().unwrap()).unwrap();
    // Fail from the client: 3 attempts for its first call, 1 each for the next two.
    assert_eq!(counts["total"], 13, "{counts}");
    assert_eq!(counts["keys"]["k-client"], 5, "{counts}");
}

#[test]
fn h2load_runs_http1_load_against_the_app() {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("h2load").exists()));
    if !found {
        return skip("no h2load (bash scripts/setup.sh nghttp2-client)");
    }
    let Some(mesh) = mesh() else { return };
    let summary = H2load::new(format!("{}/", base(&mesh)))
        .h1()
        .requests(400)
        .clients(4)
        .run(mesh.pod("client"))
        .unwrap();
    assert_eq!(
        (summary.succeeded, summary.failed, summary.status[0]),
        (400, 0, 400),
        "{summary:?}"
    );
    let failing = H2load::new(format!("{}/status/503", base(&mesh)))
        .h1()
        .requests(50)
        .run(mesh.pod("client"))
        .unwrap();
    assert_eq!(failing.status[3], 50, "{failing:?}");
}
