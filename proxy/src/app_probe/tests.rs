use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use super::*;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// An app that answers every request with the status `status` holds, and keeps the heads it
/// was sent.
async fn app(status: Arc<Mutex<u16>>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(b[0]);
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let code = *status.lock().unwrap();
            let reply = format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\n\r\nok");
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    (port, heads)
}

fn probers(json: serde_json::Value) -> AppProbers {
    AppProbers::parse(&json.to_string(), LOCAL).expect("valid probers")
}

#[tokio::test]
async fn an_http_probe_passes_the_apps_status_through_with_its_path_and_headers() {
    let status = Arc::new(Mutex::new(200));
    let (port, heads) = app(status.clone()).await;
    let p = probers(serde_json::json!({
        "/app-health/web/readyz": {"httpGet": {
            "path": "/healthz?full=1", "port": port, "scheme": "HTTP",
            "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}, {"name": "Host", "value": "web.local"}],
        }, "timeoutSeconds": 2},
    }));
    let answer = p.answer("/app-health/web/readyz").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let head = heads.lock().unwrap()[0].clone();
    assert!(
        head.starts_with("GET /healthz?full=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains("X-Probe: kubelet\r\n"), "{head}");
    assert!(
        head.contains("Host: web.local\r\n") && !head.contains("Host: 127.0.0.1"),
        "{head}"
    );
    assert!(
        head.contains("User-Agent: kube-probe/isthmus\r\n"),
        "{head}"
    );

    *status.lock().unwrap() = 500;
    assert_eq!(p.answer("/app-health/web/readyz").await.status, 500);
    *status.lock().unwrap() = 204;
    assert_eq!(p.answer("/app-health/web/readyz").await.status, 204);
    // A redirect is a success for the kubelet; it is not followed anywhere.
    *status.lock().unwrap() = 302;
    let answer = p.answer("/app-health/web/readyz").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.body.contains("302"));
}

#[tokio::test(start_paused = true)]
async fn a_silent_app_fails_the_probe_at_its_timeout() {
    // Accepts, reads, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let p = probers(serde_json::json!({
        "/app-health/web/livez": {"httpGet": {"path": "/", "port": port}, "timeoutSeconds": 3},
    }));
    let started = tokio::time::Instant::now();
    let answer = p.answer("/app-health/web/livez").await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(
        answer.body.contains("no answer from the app within 3s"),
        "{answer:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[tokio::test]
async fn a_tcp_probe_passes_when_the_app_accepts_and_fails_when_nothing_listens() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap().port();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = probers(serde_json::json!({
        "/app-health/db/livez": {"tcpSocket": {"port": open}},
        "/app-health/db/readyz": {"tcpSocket": {"port": closed}},
    }));
    assert_eq!(p.answer("/app-health/db/livez").await.status, 200);
    let answer = p.answer("/app-health/db/readyz").await;
    assert_eq!(answer.status, 503);
    assert!(
        answer.body.contains("cannot connect to 127.0.0.1:"),
        "{answer:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn an_unknown_container_or_probe_is_404() {
    let p = probers(serde_json::json!({
        "/app-health/web/livez": {"tcpSocket": {"port": 1}},
    }));
    for path in [
        "/app-health/api/livez",
        "/app-health/web/readyz",
        "/app-health/",
    ] {
        let answer = p.answer(path).await;
        assert_eq!(answer.status, 404, "{path}: {answer:?}");
        assert!(answer.body.contains(path));
    }
    assert_eq!(
        AppProbers::default()
            .answer("/app-health/web/livez")
            .await
            .status,
        404
    );
}

/// Found in review: one entry the sidecar could not run (a path with a space, which the kubelet
/// would have URL-escaped) made the sidecar exit, so the pod crash-looped. Such an entry now
/// answers 503 with its reason on its own path; the others still run.
#[tokio::test]
async fn an_entry_the_sidecar_cannot_run_answers_503_with_why_and_the_others_still_work() {
    let (port, _) = app(Arc::new(Mutex::new(200))).await;
    let p = probers(serde_json::json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/health check", "port": port}},
        "/app-health/web/livez": {"httpGet": {"path": "/ok", "port": port}},
        "/app-health/a/livez": {"httpGet": {"port": 8443, "scheme": "HTTPS"}},
        "/app-health/b/livez": {"tcpSocket": {"port": 1}, "grpc": {"port": 1}},
        "/healthz": {"tcpSocket": {"port": 1}},
        "/app-health/c/livez": {"tcpSocket": {"port": 1, "host": "db.local"}},
        "/app-health/d/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "X", "value": "a\r\nInjected: 1"}]}},
        "/app-health/e/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "Bad Name", "value": "v"}]}},
        "/app-health/f/livez": {"httpGet": {"port": "http"}},
    }));
    assert_eq!(p.answer("/app-health/web/livez").await.status, 200);
    for (path, why) in [
        ("/app-health/web/readyz", "spaces"),
        ("/app-health/a/livez", "plain HTTP only"),
        ("/app-health/b/livez", "exactly one"),
        ("/healthz", "must start with /app-health/"),
        ("/app-health/c/livez", "not an IP address"),
        ("/app-health/d/livez", "line break"),
        ("/app-health/e/livez", "not an HTTP token"),
        ("/app-health/f/livez", "invalid type"),
    ] {
        let answer = p.answer(path).await;
        assert_eq!(answer.status, 503, "{path}: {answer:?}");
        assert!(answer.body.contains(why), "{path}: {answer:?}");
    }
    let e = AppProbers::parse("[1]", LOCAL)
        .expect_err("not an object")
        .to_string();
    assert!(e.contains("not a JSON object of probes"), "{e}");
    // Nothing set: no probes, not an error.
    assert!(AppProbers::from_flag(None, None).unwrap().is_empty());
    assert!(AppProbers::from_flag(Some(" "), None).unwrap().is_empty());
}

#[test]
fn health_check_messages_are_encoded_and_decoded_as_protobuf() {
    assert_eq!(&health_request("")[..], [0, 0, 0, 0, 0]);
    assert_eq!(
        &health_request("db")[..],
        [0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']
    );
    let long = "s".repeat(200);
    assert_eq!(&health_request(&long)[5..8], [0x0a, 0xc8, 0x01]);
    assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
    assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
    assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
    assert_eq!(serving_status(&[1, 0, 0, 0, 0]), None, "compressed");
    assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08]), None, "truncated");
}

/// A grpc.health.v1 server over h2c: `SERVING` for the empty service, `NOT_SERVING` for
/// every other; `padding` bytes follow the response message.
async fn health_server(padding: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut conn = ::h2::server::handshake(s).await.unwrap();
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Check");
                    let mut body = request.into_body();
                    let mut message = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        message.extend_from_slice(&chunk);
                    }
                    let status = if message.len() == 5 { 1 } else { 2 };
                    let response = ::http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(response, false).unwrap();
                    let mut data = vec![0, 0, 0, 0, 2, 0x08, status];
                    data.resize(data.len() + padding, 0);
                    send.send_data(Bytes::from(data), false).unwrap();
                    let mut trailers = ::http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    send.send_trailers(trailers).unwrap();
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_grpc_probe_passes_on_serving_only() {
    let port = health_server(0).await;
    let p = probers(serde_json::json!({
        "/app-health/api/livez": {"grpc": {"port": port}},
        "/app-health/api/readyz": {"grpc": {"port": port, "service": "db"}},
    }));
    let answer = p.answer("/app-health/api/livez").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = p.answer("/app-health/api/readyz").await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.body.contains("status 2, not SERVING"), "{answer:?}");
}

/// Found in review: the gRPC health response was read whole, however large, within the timeout.
#[tokio::test]
async fn a_grpc_health_response_over_64_kib_fails_the_probe() {
    let port = health_server(1024 * 1024).await;
    let p = probers(serde_json::json!({
        "/app-health/api/livez": {"grpc": {"port": port}, "timeoutSeconds": 10},
    }));
    let answer = p.answer("/app-health/api/livez").await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.body.contains("over 64 KiB"), "{answer:?}");
}
