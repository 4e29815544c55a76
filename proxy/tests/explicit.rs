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
