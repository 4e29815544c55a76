//! End-to-end: pods are network namespaces, capture is isthmus-init's real iptables rules,
//! sidecars are the real isthmus-proxy binary running as UID 1337, clients are real sockets
//! opened inside the pods. Each scenario runs on io_uring and on the epoll fallback.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_config::SourceFile;
use isthmus_ctl::local::{Mesh, MeshSpec, PodSpec, ECHO_PORT, HTTP_SERVICE_PORT};
use isthmus_tests::{assert_closed_without_data, echo_exact, metric_sum, prerequisites};

const MIB: usize = 1 << 20;

fn mesh(backend: &str, services: &[&str], pods: Vec<PodSpec>) -> Mesh {
    let mut spec = MeshSpec::new(services, pods);
    spec.proxy_args = vec!["--io-backend".into(), backend.into()];
    Mesh::start(spec).unwrap_or_else(|e| panic!("mesh did not start: {e}"))
}

fn backend_metric(mesh: &Mesh, pod: &str) -> String {
    let text = mesh.pod(pod).metrics().unwrap();
    text.lines()
        .find(|l| l.starts_with("isthmus_proxy_io_backend{"))
        .unwrap_or_default()
        .to_string()
}

/// Every port of `hello` (its HTTP port by an `http` rule, the echo port by a `tcp` one) to
/// `subset`.
fn routes(subset: &str) -> Vec<SourceFile> {
    vec![SourceFile::new(
        "routes.yaml",
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: hello, namespace: mesh}}\n\
             spec:\n  host: hello\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: mesh}}\n\
             spec:\n  hosts: [hello]\n  http:\n  - route: [{{destination: {{host: hello, subset: {subset}}}}}]\n\
             \x20 tcp:\n  - route: [{{destination: {{host: hello, subset: {subset}}}}}]\n"
        ),
    )]
}

/// 64 MiB each way, byte-exact, through the client's outbound capture and the server's
/// inbound capture; both sidecars account for the bytes.
fn bulk_transfer(backend: &str, expect_backend: &str) {
    if !prerequisites() {
        return;
    }
    let mesh = mesh(
        backend,
        &["echo"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("server", Some("echo"), "v1"),
        ],
    );
    assert!(
        backend_metric(&mesh, "client").contains(expect_backend),
        "{}",
        backend_metric(&mesh, "client")
    );
    let client = mesh.pod("client");
    let vip = SocketAddr::from((mesh.vip4("echo"), ECHO_PORT));
    let stream = client.connect(vip).unwrap();
    assert_eq!(echo_exact(stream, 64 * MIB), (64 * MIB) as u64);

    let out = client.metrics().unwrap();
    let dest = [
        ("reporter", "source"),
        ("destination_service", "echo.mesh.svc.cluster.local"),
        ("destination_workload", "server"),
    ];
    assert!(
        metric_sum(&out, "istio_tcp_received_bytes_total", &dest) >= (64 * MIB) as f64,
        "{out}"
    );
    assert!(
        metric_sum(&out, "istio_tcp_sent_bytes_total", &dest) >= (64 * MIB) as f64,
        "{out}"
    );
    assert_eq!(
        metric_sum(&out, "istio_tcp_connections_closed_total", &dest),
        1.0,
        "{out}"
    );
    let inbound = mesh.pod("server").metrics().unwrap();
    let me = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
    ];
    assert!(
        metric_sum(&inbound, "istio_tcp_received_bytes_total", &me) >= (64 * MIB) as f64,
        "{inbound}"
    );
    assert!(
        metric_sum(&inbound, "istio_tcp_sent_bytes_total", &me) >= (64 * MIB) as f64,
        "{inbound}"
    );
}

#[test]
fn bulk_transfer_is_byte_exact_through_both_captures_io_uring() {
    bulk_transfer("io-uring", "io_uring");
}

#[test]
fn bulk_transfer_is_byte_exact_through_both_captures_epoll() {
    bulk_transfer("epoll", "epoll");
}

/// IPv6: a v6 service VIP is captured outbound (SO_ORIGINAL_DST via IP6T), and a v6
/// connection to a meshed pod is captured inbound.
#[test]
fn ipv6_is_captured_outbound_and_inbound() {
    if !prerequisites() {
        return;
    }
    let mesh = mesh(
        "auto",
        &["echo"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("server", Some("echo"), "v1"),
        ],
    );
    let client = mesh.pod("client");
    let vip6 = SocketAddr::from((mesh.vip6("echo"), ECHO_PORT));
    assert_eq!(echo_exact(client.connect(vip6).unwrap(), MIB), MIB as u64);
    let server6 = SocketAddr::from((mesh.pod("server").ipv6, ECHO_PORT));
    assert_eq!(
        echo_exact(client.connect(server6).unwrap(), MIB),
        MIB as u64
    );

    let out = client.metrics().unwrap();
    assert_eq!(
        metric_sum(
            &out,
            "istio_tcp_connections_opened_total",
            &[("destination_service", "echo.mesh.svc.cluster.local")]
        ),
        1.0,
        "{out}"
    );
    assert_eq!(
        metric_sum(
            &out,
            "istio_tcp_connections_opened_total",
            &[("destination_service", "PassthroughCluster")]
        ),
        1.0,
        "{out}"
    );
    let inbound = mesh.pod("server").metrics().unwrap();
    assert_eq!(
        metric_sum(
            &inbound,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        2.0,
        "{inbound}"
    );
}

/// Destinations outside the registry pass through under ALLOW_ANY and are refused under
/// REGISTRY_ONLY; registry services keep working under both.
fn passthrough_and_registry_only(backend: &str) {
    if !prerequisites() {
        return;
    }
    let mesh = mesh(
        backend,
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
            PodSpec::unmeshed("legacy"),
        ],
    );
    let client = mesh.pod("client");
    let legacy = SocketAddr::from((mesh.pod("legacy").ipv4, 8080));
    assert_eq!(
        client.http_get(legacy, "/").unwrap(),
        (200, "hello from legacy\n".into())
    );

    let version = mesh
        .write_config(vec![SourceFile::new(
            "sidecar.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: mesh}\n\
             spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n",
        )])
        .unwrap();
    mesh.wait_for_version(&version, false).unwrap();
    // The connect itself succeeds (the sidecar accepts), then it is closed without a byte.
    let mut refused = client.connect(legacy).unwrap();
    refused
        .write_all(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
        .unwrap();
    assert_closed_without_data(refused);
    let vip = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    assert_eq!(
        client.http_get(vip, "/").unwrap(),
        (200, "hello from hello-v1\n".into())
    );

    let out = client.metrics().unwrap();
    assert_eq!(
        metric_sum(
            &out,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "PassthroughCluster"),
                ("response_flags", "-")
            ]
        ),
        1.0,
        "{out}"
    );
    assert_eq!(
        metric_sum(
            &out,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", "BlackHoleCluster"),
                ("response_flags", "NR")
            ]
        ),
        1.0,
        "{out}"
    );
}

#[test]
fn passthrough_and_registry_only_io_uring() {
    passthrough_and_registry_only("io-uring");
}

#[test]
fn passthrough_and_registry_only_epoll() {
    passthrough_and_registry_only("epoll");
}

/// A routing change arrives through a kubelet-style `..data` swap: no restart, new connections
/// follow the new route, an open connection keeps working. Then a bad config is rejected with
/// file, field and reason while the last good one keeps serving.
fn live_routing_change(backend: &str) {
    if !prerequisites() {
        return;
    }
    let mesh = mesh(
        backend,
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
            PodSpec::meshed("hello-v2", Some("hello"), "v2"),
        ],
    );
    let client = mesh.pod("client");
    let http = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    let echo = SocketAddr::from((mesh.vip4("hello"), ECHO_PORT));
    let pid_before = client_proxy_pid(&mesh);

    let v1 = mesh.write_config(routes("v1")).unwrap();
    mesh.wait_for_version(&v1, false).unwrap();
    for _ in 0..4 {
        assert_eq!(
            client.http_get(http, "/").unwrap().1,
            "hello from hello-v1\n"
        );
    }
    let mut open = client.connect(echo).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    roundtrip(&mut open, b"before the change");

    let v2 = mesh.write_config(routes("v2")).unwrap();
    mesh.wait_for_version(&v2, false).unwrap();
    for _ in 0..4 {
        assert_eq!(
            client.http_get(http, "/").unwrap().1,
            "hello from hello-v2\n"
        );
    }
    roundtrip(&mut open, b"after the change: still connected");

    // Garbage YAML, then a config that parses but names a subset nobody defines.
    let garbage = mesh
        .write_config(vec![SourceFile::new("routes.yaml", "kind: [unclosed")])
        .unwrap();
    let dump = client.wait_for_version(&garbage, true).unwrap();
    assert_eq!(
        dump["version"],
        v2.as_str(),
        "the last good config must keep serving"
    );
    assert!(
        dump["lastError"]["issues"][0]
            .as_str()
            .unwrap()
            .starts_with("routes.yaml: invalid YAML"),
        "{dump}"
    );
    let mut bad = routes("v3");
    bad[0].text = bad[0].text.replace("[{name: v1", "[{name: v9");
    let bad_version = mesh.write_config(bad).unwrap();
    let dump = client.wait_for_version(&bad_version, true).unwrap();
    let issues: Vec<&str> = dump["lastError"]["issues"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.as_str())
        .collect();
    for rule in ["http", "tcp"] {
        let want = format!("routes.yaml: VirtualService mesh/hello: spec.{rule}[0].route[0].destination.subset: no DestinationRule");
        assert!(
            issues.iter().any(|i| i.starts_with(&want)),
            "{want} not in {issues:?}"
        );
    }
    assert_eq!(
        client.http_get(http, "/").unwrap().1,
        "hello from hello-v2\n"
    );
    roundtrip(&mut open, b"after a rejected config");
    let text = client.metrics().unwrap();
    assert_eq!(
        metric_sum(
            &text,
            "isthmus_config_reloads_total",
            &[("result", "failure")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "isthmus_config_version", &[("version", &v2)]),
        1.0,
        "{text}"
    );

    // Fixed again: loads, and the error is cleared.
    let v1_again = mesh.write_config(routes("v1")).unwrap();
    let dump = client.wait_for_version(&v1_again, false).unwrap();
    assert!(dump["lastError"].is_null(), "{dump}");
    assert_eq!(
        client.http_get(http, "/").unwrap().1,
        "hello from hello-v1\n"
    );
    assert_eq!(
        client_proxy_pid(&mesh),
        pid_before,
        "the sidecar must not restart"
    );
}

fn roundtrip(stream: &mut std::net::TcpStream, msg: &[u8]) {
    stream.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

fn client_proxy_pid(mesh: &Mesh) -> u64 {
    let dump: serde_json::Value =
        serde_json::from_str(&mesh.pod("client").admin("/config_dump").unwrap()).unwrap();
    dump["proxy"]["pid"].as_u64().unwrap()
}

#[test]
fn live_routing_change_and_bad_config_io_uring() {
    live_routing_change("io-uring");
}

#[test]
fn live_routing_change_and_bad_config_epoll() {
    live_routing_change("epoll");
}

/// Where seccomp blocks io_uring (Docker's and containerd's default profiles), `auto` starts
/// on epoll, says so, and serves.
#[test]
fn io_uring_blocked_by_seccomp_falls_back_to_epoll() {
    if !prerequisites() {
        return;
    }
    let mut spec = MeshSpec::new(
        &["echo"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("server", Some("echo"), "v1"),
        ],
    );
    spec.block_io_uring = true;
    let mesh = Mesh::start(spec).unwrap();
    assert!(
        backend_metric(&mesh, "client").contains("epoll"),
        "{}",
        backend_metric(&mesh, "client")
    );
    assert!(
        mesh.pod("client")
            .log("proxy.log")
            .contains("io_uring unavailable"),
        "{}",
        mesh.pod("client").log("proxy.log")
    );
    let vip = SocketAddr::from((mesh.vip4("echo"), ECHO_PORT));
    assert_eq!(
        echo_exact(mesh.pod("client").connect(vip).unwrap(), 4 * MIB),
        (4 * MIB) as u64
    );
}

/// Forcing io_uring where it is blocked is a clear start-up error, not a crash.
#[test]
fn forcing_io_uring_where_blocked_fails_clearly() {
    if !prerequisites() {
        return;
    }
    let mut spec = MeshSpec::new(&[], vec![PodSpec::meshed("client", None, "v1")]);
    spec.block_io_uring = true;
    spec.proxy_args = vec!["--io-backend".into(), "io-uring".into()];
    let err = Mesh::start(spec)
        .err()
        .expect("the sidecar must refuse to start");
    let text = err.to_string();
    assert!(
        text.contains("io_uring is unavailable") && text.contains("seccomp"),
        "{text}"
    );
}

/// Tearing a mesh down leaves no namespace and no process behind.
#[test]
fn teardown_leaves_nothing_behind() {
    if !prerequisites() {
        return;
    }
    let mesh = mesh(
        "auto",
        &["echo"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::unmeshed("other"),
        ],
    );
    let names: Vec<String> = mesh
        .pods
        .iter()
        .map(|p| p.netns().name().to_string())
        .collect();
    let pid = client_proxy_pid(&mesh);
    drop(mesh);
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for name in names {
        assert!(!list.contains(&name), "{name} still exists:\n{list}");
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sidecar {pid} still running"
    );
}

/// SIGTERM: readiness fails at once, open and new outbound connections keep working, and the
/// sidecar exits 0 as soon as the last connection closes (not after the drain timeout).
#[test]
fn sigterm_drains_then_exits_when_idle() {
    if !prerequisites() {
        return;
    }
    let mut spec = MeshSpec::new(
        &["echo"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("server", Some("echo"), "v1"),
        ],
    );
    spec.proxy_args = vec!["--drain-timeout-secs".into(), "60".into()];
    let mut mesh = Mesh::start(spec).unwrap();
    let vip = SocketAddr::from((mesh.vip4("echo"), ECHO_PORT));
    let mut open = mesh.pod("client").connect(vip).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    roundtrip(&mut open, b"before SIGTERM");

    let pid = mesh.pod("client").proxy_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let ready = SocketAddr::from(([127, 0, 0, 1], 15021));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = mesh
            .pod("client")
            .http_get(ready, "/healthz/ready")
            .unwrap();
        if status == 503 {
            assert_eq!(body, "DRAINING\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never turned 503"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    roundtrip(&mut open, b"while draining");
    assert_eq!(
        echo_exact(mesh.pod("client").connect(vip).unwrap(), MIB),
        MIB as u64,
        "outbound must keep working while draining"
    );
    let client = mesh.pods.iter_mut().find(|p| p.name == "client").unwrap();
    assert_eq!(
        client.wait_proxy_exit(Duration::from_millis(300)),
        None,
        "exited with a connection open"
    );
    drop(open);
    let status = client
        .wait_proxy_exit(Duration::from_secs(10))
        .expect("sidecar did not exit after its last connection closed");
    assert!(status.success(), "{status}");
}

/// The README's first command: the demo runs on this machine and shows what it says — round
/// robin, then the HTTP routing change (v2, end-user jason to v1), the passthrough, the
/// rejected config with the last good one still serving, the metrics — and leaves nothing.
#[test]
fn the_readme_demo_runs_as_it_says() {
    if !prerequisites() {
        return;
    }
    let ctl = isthmus_ctl::local::default_bin_dir()
        .unwrap()
        .join("isthmus-ctl");
    let out = std::process::Command::new(ctl)
        .args(["local", "demo"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let routed = text
        .split("▶ Route to v2")
        .nth(1)
        .and_then(|rest| rest.split("▶ client → legacy").next())
        .unwrap_or_default();
    assert_eq!(routed.matches("hello from hello-v2").count(), 3, "{text}");
    assert!(
        routed.contains("end-user: jason' http://10.96.0.10:80/  →  hello from hello-v1"),
        "{text}"
    );
    assert!(text.contains("hello from legacy"), "{text}");
    let broken = text.split("▶ A broken config").nth(1).unwrap_or_default();
    assert!(
        broken.contains("rejected: hello-routes.yaml: VirtualService mesh/hello: spec.http[0]"),
        "{text}"
    );
    assert!(
        broken.contains("→  hello from hello-v2"),
        "the last good config did not keep serving:\n{text}"
    );
    assert!(text.contains("hello.mesh.svc.cluster.local"), "{text}");
    assert!(text.trim_end().ends_with("done."), "{text}");
}
