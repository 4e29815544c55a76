//! The sidecar's side of the kubelet's probes, as a process: the app's rewritten probes answered
//! on the stats port, and `isthmus-proxy wait` (the classic sidecar's postStart hook).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: kubelet\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// An app answering every request with the status `status` holds.
fn app(status: Arc<AtomicU16>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let code = status.load(Ordering::Relaxed);
            let _ = write!(s, "HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
        }
    });
    port
}

fn wait_command(proxy: &Proxy, timeout_secs: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"));
    c.args(["wait", "--address", &proxy.readiness.to_string()])
        .args([
            "--timeout-secs",
            &timeout_secs.to_string(),
            "--period-ms",
            "20",
        ]);
    c
}

#[test]
fn app_probes_are_answered_on_the_stats_port_with_the_apps_verdict() {
    let status = Arc::new(AtomicU16::new(200));
    let port = app(status.clone());
    let probers = format!(
        r#"{{"/app-health/web/readyz": {{"httpGet": {{"path": "/ready", "port": {port}}}, "timeoutSeconds": 2}},
            "/app-health/web/livez": {{"tcpSocket": {{"port": {port}}}}}}}"#
    );
    let proxy = start(Options {
        endpoint: Some(greeter("db")),
        env: vec![("ISTHMUS_KUBE_APP_PROBERS", &probers)],
        ..Options::default()
    });
    let reply = get(proxy.stats, "/app-health/web/readyz");
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    status.store(500, Ordering::Relaxed);
    let reply = get(proxy.stats, "/app-health/web/readyz");
    assert!(
        reply.starts_with("HTTP/1.1 500 Internal Server Error"),
        "{reply}"
    );
    assert!(get(proxy.stats, "/app-health/web/livez").starts_with("HTTP/1.1 200"));
    let reply = get(proxy.stats, "/app-health/api/livez");
    assert!(
        reply.starts_with("HTTP/1.1 404") && reply.contains("/app-health/api/livez"),
        "{reply}"
    );
    // Only the stats port answers them; the readiness port is the sidecar's own.
    assert!(get(proxy.readiness, "/app-health/web/livez").starts_with("HTTP/1.1 404"));
}

/// Found in review: an entry the sidecar could not run (here a path with a space, which the
/// kubelet would have URL-escaped) made the process exit, and the pod crash-looped. The sidecar
/// now runs: that path answers 503 with the reason, the other probes work, the log names it.
#[test]
fn an_app_probe_the_sidecar_cannot_run_answers_503_and_the_sidecar_keeps_running() {
    let port = app(Arc::new(AtomicU16::new(200)));
    let probers = format!(
        r#"{{"/app-health/web/readyz": {{"httpGet": {{"path": "/health check", "port": {port}}}}},
            "/app-health/web/livez": {{"tcpSocket": {{"port": {port}}}}}}}"#
    );
    let proxy = start(Options {
        endpoint: Some(greeter("db")),
        env: vec![("ISTHMUS_KUBE_APP_PROBERS", &probers)],
        ..Options::default()
    });
    let reply = get(proxy.stats, "/app-health/web/readyz");
    assert!(
        reply.starts_with("HTTP/1.1 503") && reply.contains("spaces"),
        "{reply}"
    );
    assert!(get(proxy.stats, "/app-health/web/livez").starts_with("HTTP/1.1 200"));
    assert!(proxy.get("/ready").starts_with("HTTP/1.1 200"));
    let log = proxy.log();
    assert!(
        log.contains("/app-health/web/readyz") && log.contains("cannot be run"),
        "{log}"
    );
}

#[test]
fn wait_fails_before_the_proxy_is_ready_and_succeeds_once_it_is() {
    let server = greeter("db");
    let proxy = start(Options {
        endpoint: None,
        wait_ready: false,
        ..Options::default()
    });
    // No config yet: not ready within the bound, and the proxy's reason is passed on.
    let out = wait_command(&proxy, 1).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not ready after") && stderr.contains("no config loaded"),
        "{stderr}"
    );

    let mut waiting = wait_command(&proxy, 30)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(waiting.try_wait().unwrap().is_none());
    write_config(&proxy.dir, &config(server));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = waiting.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "wait did not return once the proxy was ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    waiting
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(status.success(), "{status:?} {stdout}");
    assert!(stdout.contains("isthmus-proxy is ready"), "{stdout}");
    assert!(proxy.get("/ready").starts_with("HTTP/1.1 200"));
}

#[test]
fn wait_names_what_it_could_not_reach() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
        .args([
            "wait",
            "--address",
            &closed.to_string(),
            "--timeout-secs",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to {closed}")),
        "{stderr}"
    );
}
