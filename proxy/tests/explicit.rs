//! The proxy as a process with explicit listeners (no iptables, no root): routing from the
//! config directory, a server-first protocol, hot reload, and refusal of unreachable endpoints
//! — on each backend, checking the backend that actually ran.

mod support;

use std::net::TcpStream;

use support::*;

fn scenario(backend: &str, reported: &str) {
    let (a, b) = (greeter("server-a"), greeter("server-b"));
    let proxy = start(Options {
        backend,
        endpoint: Some(a),
        ..Options::default()
    });
    let metrics = proxy.metrics();
    assert_eq!(
        metric(
            &metrics,
            "isthmus_proxy_io_backend",
            &[("backend", reported)]
        ),
        1.0,
        "asked for {backend}, the proxy reports:\n{metrics}"
    );
    // Server-first: the greeting arrives although the client never sends a byte.
    assert_eq!(greeting(proxy.listen), "server-a");

    proxy.reconfigure(&config(b));
    assert_eq!(greeting(proxy.listen), "server-b");

    // An endpoint nobody listens on: the client's connection is closed (not left hanging),
    // and counted as UF.
    proxy.reconfigure(&config(([127, 0, 0, 1], free_port()).into()));
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    assert!(
        matches!(expect_closed(&mut s), Closed::Eof | Closed::Reset),
        "the connection was not closed"
    );
    let metrics = proxy.metrics();
    assert!(
        metric(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "UF")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[test]
fn explicit_listener_routes_reloads_and_refuses_io_uring() {
    if let Err(e) = isthmus_proxy::runtime::select(isthmus_proxy::runtime::BackendChoice::IoUring) {
        return skip(&e.to_string());
    }
    scenario("io-uring", "io_uring");
}

#[test]
fn explicit_listener_routes_reloads_and_refuses_epoll() {
    scenario("epoll", "epoll");
}

/// The DestinationRule's `connectionPool.tcp.idleTimeout` ends an idle relayed connection (the
/// default is 1 h), and its `tcpKeepalive` is set on the upstream socket (seen with `ss`).
#[test]
fn destination_rule_tcp_idle_timeout_and_keepalive_apply_to_relayed_connections() {
    let (server, proxy) = db_with_policy(
        "{connectionPool: {tcp: {idleTimeout: 1s, tcpKeepalive: {time: 7s, interval: 3s, probes: 4}}}}",
    );
    let mut stream = TcpStream::connect(proxy.listen).unwrap();
    let mut greeting = [0u8; 3];
    std::io::Read::read_exact(&mut stream, &mut greeting).unwrap();
    assert_eq!(&greeting, b"db\n");
    // The proxy's socket to the server has keepalive on, with the rule's idle time.
    let ss = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", "dst", &server.to_string()])
        .output();
    match ss {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("timer:(keepalive,"),
                "no keepalive timer on the upstream socket:\n{text}"
            );
        }
        _ => skip("`ss` (iproute2) is not installed: the keepalive check needs it"),
    }
    let started = std::time::Instant::now();
    assert!(matches!(
        expect_closed(&mut stream),
        Closed::Eof | Closed::Reset
    ));
    let idle = started.elapsed();
    assert!(
        idle >= std::time::Duration::from_millis(900) && idle < std::time::Duration::from_secs(4),
        "{idle:?}"
    );
}

/// `connectionPool.tcp.maxConnectionDuration` ends a relayed connection that is still busy.
#[test]
fn destination_rule_max_connection_duration_ends_a_busy_connection() {
    use std::io::{Read, Write};
    let (_server, proxy) = db_with_policy("{connectionPool: {tcp: {maxConnectionDuration: 1s}}}");
    let mut stream = TcpStream::connect(proxy.listen).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).unwrap();
    // Echo a byte every 100 ms until the proxy ends the connection (bounded: 50 rounds).
    let mut ended = None;
    for _ in 0..50 {
        let mut byte = [0u8; 1];
        let echoed = stream.write_all(b"x").and_then(|_| stream.read(&mut byte));
        match echoed {
            Ok(1) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Ok(_) | Err(_) => {
                ended = Some(started.elapsed());
                break;
            }
        }
    }
    let ended = ended.expect("the connection outlived its maximum duration");
    assert!(
        ended >= std::time::Duration::from_millis(900) && ended < std::time::Duration::from_secs(3),
        "{ended:?}"
    );
    let metrics = proxy.metrics();
    assert_eq!(
        metric(
            &metrics,
            "isthmus_proxy_connection_timeouts_total",
            &[("timeout", "max_duration")]
        ),
        1.0,
        "{metrics}"
    );
}

/// A greeter behind the `db` service, and a proxy whose DestinationRule for `db` has `policy`
/// as its `trafficPolicy`.
fn db_with_policy(policy: &str) -> (std::net::SocketAddr, Proxy) {
    let server = greeter("db");
    let proxy = start(Options {
        endpoint: Some(server),
        ..Options::default()
    });
    proxy.reconfigure(&format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db, namespace: test}}\n\
         spec:\n  host: db\n  trafficPolicy: {policy}\n",
        config(server)
    ));
    (server, proxy)
}
