//! The proxy as a process, through its life: fail-closed before a config exists, the
//! connection cap, drain to the deadline, and supervision of its workers.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// Found in review: a missing config directory read as an empty config — ready, everything
/// passed through. Now: not ready, the reason on /ready and /config_dump, connections closed
/// and counted; the directory appearing later is picked up without a restart.
#[test]
fn no_config_means_not_ready_and_refused_until_one_appears() {
    let server = greeter("server-a");
    let proxy = start(Options {
        endpoint: None,
        wait_ready: false,
        ..Options::default()
    });
    proxy.wait_until("the missing directory to be reported", |p| {
        p.get("/config_dump").contains("does not exist")
    });
    let ready = proxy.get("/ready");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("does not exist"),
        "{ready}"
    );
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    assert!(matches!(expect_closed(&mut s), Closed::Eof | Closed::Reset));
    proxy.wait_until("the refusal to be counted", |p| {
        metric(
            &p.metrics(),
            "isthmus_proxy_connections_refused_total",
            &[("reason", "no_config")],
        ) >= 1.0
    });

    write_config(&proxy.dir, &config(server));
    proxy.wait_until("ready", |p| p.get("/ready").starts_with("HTTP/1.1 200"));
    assert_eq!(greeting(proxy.listen), "server-a");
}

/// An invalid first config is no config either: not ready, refused, the file and field named.
#[test]
fn an_invalid_first_config_fails_closed() {
    let proxy = start(Options {
        endpoint: None,
        wait_ready: false,
        ..Options::default()
    });
    write_config(&proxy.dir, &config(([127, 0, 0, 1], 0).into()));
    proxy.wait_until("the rejection", |p| {
        p.get("/config_dump")
            .contains("mesh.yaml: ServiceEntry test/db")
    });
    assert!(proxy.get("/ready").starts_with("HTTP/1.1 503"));
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    assert!(matches!(expect_closed(&mut s), Closed::Eof | Closed::Reset));
}

/// Over the cap, a connection is closed at accept and counted; a freed slot is usable again.
#[test]
fn the_connection_cap_refuses_and_counts() {
    let server = greeter("capped");
    let proxy = start(Options {
        endpoint: Some(server),
        args: ["--workers", "1", "--max-connections", "2"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    });
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(proxy.listen).unwrap();
            let mut line = [0u8; 7];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"capped\n");
            s
        })
        .collect();
    let mut third = TcpStream::connect(proxy.listen).unwrap();
    assert!(
        matches!(expect_closed(&mut third), Closed::Eof | Closed::Reset),
        "a connection over the cap was served"
    );
    let metrics = proxy.metrics();
    assert_eq!(
        metric(
            &metrics,
            "isthmus_proxy_connections_refused_total",
            &[("reason", "limit")]
        ),
        1.0,
        "{metrics}"
    );
    held.pop();
    proxy.wait_until("a slot to free up", |p| {
        p.metrics().contains("isthmus_proxy_active_connections 1")
    });
    assert_eq!(greeting(proxy.listen), "capped");
}

/// On SIGTERM a connection that does not finish is closed at the drain deadline (the client
/// sees the close, not silence), and the process exits 0.
#[test]
fn drain_closes_what_is_left_at_the_deadline() {
    let server = greeter("draining");
    let mut proxy = start(Options {
        endpoint: Some(server),
        args: ["--drain-timeout-secs", "1"].map(String::from).to_vec(),
        ..Options::default()
    });
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    let mut line = [0u8; 9];
    s.read_exact(&mut line).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(matches!(expect_closed(&mut s), Closed::Eof | Closed::Reset));
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert!(status.success(), "{status:?}\n{}", proxy.log());
    assert!(proxy.log().contains("drain"), "{}", proxy.log());
}

/// A worker that stops serving takes the process down with a non-zero exit and says why
/// (faults injected by debug builds only).
#[test]
fn a_dead_worker_exits_the_process_non_zero() {
    for (fault, says) in [
        ("worker-exit", "worker died"),
        ("worker-panic", "injected fault: worker 0 panics"),
    ] {
        let server = greeter("doomed");
        let mut proxy = start(Options {
            endpoint: Some(server),
            env: vec![("ISTHMUS_INJECT_FAULT", fault)],
            wait_ready: false,
            ..Options::default()
        });
        let status = proxy
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{fault}: the process kept running\n{}", proxy.log()));
        assert!(!status.success(), "{fault}: {status:?}");
        let log = proxy.log();
        assert!(log.contains(says), "{fault}:\n{log}");
    }
}

/// Found in review: `--no-capture` without an `--explicit` listener left the workers nothing
/// to serve, and the proxy exited blaming a "worker died". It is a usage error, said as one,
/// before anything is bound.
#[test]
fn no_listener_at_all_is_a_usage_error_not_a_dead_worker() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
        .args([
            "--no-capture",
            "--config-dir",
            "/nonexistent",
            "--admin-port",
            "0",
        ])
        .args(["--stats-port", "0", "--readiness-port", "0"])
        .output()
        .expect("run isthmus-proxy");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("needs at least one --explicit listener"),
        "{stderr}"
    );
    assert!(!stderr.contains("worker"), "{stderr}");
}

/// A bug that panics while compiling a config rejects that config; the sidecar lives on (a
/// panic anywhere else aborts). Injected by debug builds only.
#[test]
fn a_panic_while_compiling_a_config_rejects_it_and_the_proxy_lives() {
    let server = greeter("survivor");
    let mut proxy = start(Options {
        endpoint: Some(server),
        env: vec![("ISTHMUS_INJECT_FAULT", "config-panic")],
        wait_ready: false,
        ..Options::default()
    });
    proxy.wait_until("the rejection", |p| {
        p.get("/config_dump")
            .contains("injected fault: config compile panics")
    });
    assert!(proxy.get("/ready").starts_with("HTTP/1.1 503"));
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "{}",
        proxy.log()
    );
}
