use std::time::SystemTime;

use tokio::io::duplex;
use tokio::net::TcpStream;

use super::*;

/// Answers 200 with the request's body.
struct Echo;

impl Handler for Echo {
    async fn handle(&self, request: Request) -> Response {
        Response::text(200, request.body)
    }
}

fn limits(read_timeout: Duration) -> Limits {
    Limits {
        max_head: 1024,
        max_body: 1024,
        read_timeout,
        idle_timeout: Duration::from_secs(5),
    }
}

/// Sends `request` a byte every `gap` to a connection served with `limits`; what came back.
async fn dripped(request: &[u8], gap: Duration, limits: Limits) -> String {
    let (mut client, server) = duplex(64 * 1024);
    let served = tokio::spawn(async move { connection(server, limits, &Echo).await });
    for byte in request {
        if client.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply).await;
    let _ = served.await;
    String::from_utf8_lossy(&reply).into_owned()
}

/// Found in review: the deadline was per read, so a client sending a byte at a time, each
/// under the read timeout, held its connection and buffer for as long as it liked.
#[tokio::test]
async fn a_request_dripped_past_its_deadline_is_cut_though_each_read_is_quick() {
    let request =
        b"POST /x HTTP/1.1\r\nconnection: close\r\ncontent-length: 20\r\n\r\n01234567890123456789";
    let gap = Duration::from_millis(10);
    // ~80 bytes at 10 ms each: every read well under 300 ms, the whole request well over.
    let reply = dripped(request, gap, limits(Duration::from_millis(300))).await;
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    // The same drip within a deadline it fits is answered.
    let reply = dripped(request, gap, limits(Duration::from_secs(30))).await;
    assert!(
        reply.starts_with("HTTP/1.1 200 ") && reply.ends_with("01234567890123456789"),
        "{reply}"
    );
}

/// Whether the server closed `stream` within `within` (EOF or reset) rather than keeping it.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Found in review: connections were unbounded; each may buffer ~4 MiB, so hundreds of them
/// exhausted the controller's memory. Beyond the cap a connection is closed at once, and a
/// slot is free again once a connection ends.
#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let ca = CertificateAuthority::generate(SystemTime::now()).unwrap();
    let cert = Arc::new(ServingCert::new(&ca, vec!["server.test".into()]).unwrap());
    let acceptor = TlsAcceptor::from(Arc::new(certs::server_config(cert).unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = limits(Duration::from_secs(5));
    let server = tokio::spawn(serve_capped(
        listener,
        acceptor,
        limits,
        Arc::new(Echo),
        "test",
        2,
    ));
    // Two connections that never start their TLS handshake hold both slots.
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(5)).await,
        "the third is refused"
    );
    assert!(
        !closed_within(&mut first, Duration::from_millis(200)).await,
        "the first is held"
    );
    assert!(
        !closed_within(&mut second, Duration::from_millis(50)).await,
        "the second is held"
    );
    drop(first);
    // The slot frees once the server sees the first one go; a new connection is then kept.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut next = TcpStream::connect(addr).await.unwrap();
        if !closed_within(&mut next, Duration::from_millis(200)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot came free after a connection ended"
        );
    }
    server.abort();
}
