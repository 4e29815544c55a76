//! HTTP/2 and gRPC through both sidecars of a real mesh (pods as network namespaces, real
//! capture): a grpcio client in a meshed pod calls a grpcio server in another by the service
//! VIP — unary, server streaming, and an `UNAVAILABLE` the client's sidecar retries — and both
//! sidecars count the calls as gRPC (reporter source and destination); curl with prior
//! knowledge reaches the HTTP/1 app through the same two sidecars (h2 translated to HTTP/1.1).

use std::time::{Duration, Instant};

use isthmus_ctl::local::{Mesh, MeshSpec, Pod, PodSpec, HTTP_SERVICE_PORT};
use isthmus_tests::grpc::{self, GrpcClient, GrpcServer, GRPC_PORT};
use isthmus_tests::http::{Curl, CurlExit};
use isthmus_tests::{metric_sum, prerequisites, skip};

/// Waits (bounded) until the sidecar of `pod` counts at least `at_least` for `name{labels}`:
/// a request is recorded just after its response is written.
fn wait_metric(pod: &Pod, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = pod.metrics().unwrap_or_default();
        let value = metric_sum(&text, name, labels);
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {name}{labels:?} = {value}, wanted {at_least}:\n{}",
            pod.name,
            text.lines()
                .filter(|l| l.starts_with(name))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn grpc_through_both_sidecars_is_counted_as_grpc() {
    if grpc::python().is_none() {
        return skip("no Python with grpcio (bash scripts/setup.sh python3-grpcio)");
    }
    if !prerequisites() {
        return;
    }
    let mesh = Mesh::start(MeshSpec::new(
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
        ],
    ))
    .unwrap_or_else(|e| panic!("mesh did not start: {e}"));
    let server = GrpcServer::start(mesh.pod("hello-v1"), "hello-v1", GRPC_PORT).unwrap();
    let (client, hello) = (mesh.pod("client"), mesh.pod("hello-v1"));
    let vip = format!("{}:{GRPC_PORT}", mesh.vip4("hello"));

    let calls = GrpcClient::new(vip.as_str(), "Echo")
        .payload("ping")
        .repeat(3)
        .run(client)
        .unwrap_or_else(|e| panic!("{e}\nserver: {}", server.stderr()));
    assert!(calls.iter().all(|c| c.code == "OK"), "{calls:?}");
    let calls = GrpcClient::new(vip.as_str(), "Stream")
        .payload("5")
        .run(client)
        .unwrap();
    assert_eq!(calls[0].messages, ["0", "1", "2", "3", "4"]);
    // A trailers-only UNAVAILABLE: Istio's default retry policy at the client's sidecar.
    let calls = GrpcClient::new(vip.as_str(), "Fail")
        .metadata("x-fail-key", "e2e")
        .metadata("x-fail-count", "1")
        .run(client)
        .unwrap();
    assert_eq!(calls[0].code, "OK", "{calls:?}");
    assert_eq!(calls[0].trailing["x-attempt"], "2");

    let grpc_ok = |reporter| {
        [
            ("reporter", reporter),
            ("request_protocol", "grpc"),
            ("grpc_response_status", "0"),
            ("destination_canonical_service", "hello"),
        ]
    };
    // 3 Echo + 1 Stream + 1 Fail answered OK, as both sidecars saw them.
    wait_metric(client, "istio_requests_total", &grpc_ok("source"), 5.0);
    wait_metric(hello, "istio_requests_total", &grpc_ok("destination"), 5.0);
    // The failed attempt reached the server's sidecar as a call of its own.
    let unavailable = [("reporter", "destination"), ("grpc_response_status", "14")];
    wait_metric(hello, "istio_requests_total", &unavailable, 1.0);
    // Stream's five messages, counted on both sides.
    wait_metric(
        client,
        "istio_response_messages_total",
        &grpc_ok("source"),
        3.0 + 5.0 + 1.0,
    );
    wait_metric(
        hello,
        "istio_request_messages_total",
        &grpc_ok("destination"),
        5.0,
    );

    // h2 with prior knowledge to the HTTP/1 app: the client's sidecar translates.
    let url = format!(
        "http://{}:{HTTP_SERVICE_PORT}/stream/50000",
        mesh.vip4("hello")
    );
    let r = Curl::new(url)
        .http2_prior_knowledge()
        .header("te", "trailers")
        .run(client)
        .unwrap();
    assert_eq!(
        (r.exit, r.status, r.http_version.as_str()),
        (CurlExit::Ok, 200, "2"),
        "{r:?}"
    );
    assert_eq!(r.body.len(), 50_000);
    assert!(r.trailer("x-checksum").is_some(), "{r:?}");
}
