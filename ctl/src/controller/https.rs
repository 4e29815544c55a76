//! The controller's HTTPS servers (the injection webhook, the CA): HTTP/1.1 by hand over
//! tokio-rustls. Their clients (the API server, sidecars) send one body per request with a
//! `content-length`, on kept-alive connections. Heads and bodies are bounded, each request has
//! one deadline (head and body together), connections are capped, and anything else gets a 4xx
//! and the connection closed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::certs::{self, CertError, CertificateAuthority, ServingCert};

/// Bounds on what one request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
    /// A request's head (from its first byte) and body must arrive, together, within this: a
    /// client dripping a byte at a time cannot hold a connection (and its buffer) longer.
    pub read_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections one server holds at once: each may buffer a request of up to
/// `max_head + max_body`, so this bounds the server's memory (128 × ~4 MiB for the webhook,
/// within the controller's 1Gi limit). Its clients (the API server, sidecars asking for
/// certificates) need far fewer; beyond it a connection is closed at once, and counted.
pub const MAX_CONNECTIONS: usize = 128;

/// What a server of the controller starts from: the CA of Secret `ca_secret` (made if absent),
/// a serving certificate for the Service's names issued from it, and the bound listener.
pub struct Bound {
    pub ca: Arc<CertificateAuthority>,
    pub cert: Arc<ServingCert>,
    pub acceptor: TlsAcceptor,
    pub listener: TcpListener,
    pub addr: SocketAddr,
}

/// Why [`bind`] failed: the CA or certificate, or the address (the caller names its flag).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("cannot listen on {addr}: {source} (is another process on that port?)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Loads (or makes) the CA, issues the serving certificate for `<service>.<namespace>.svc` and
/// binds `listen`.
pub async fn bind(
    client: &kube::Client,
    namespace: &str,
    service: &str,
    ca_secret: &str,
    listen: SocketAddr,
) -> Result<Bound, BindError> {
    let ca = Arc::new(certs::load_or_create(client, namespace, ca_secret).await?);
    let names = ServingCert::service_names(service, namespace);
    let cert = Arc::new(ServingCert::new(&ca, names)?);
    let tls = certs::server_config(cert.clone())?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| BindError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(listen);
    Ok(Bound {
        ca,
        cert,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        listener,
        addr,
    })
}

/// A running server: its address and tasks (the server's and its helpers', aborted on drop).
pub struct Running {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn new(addr: SocketAddr, tasks: Vec<JoinHandle<()>>) -> Self {
        Running { addr, tasks }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One request, parsed as far as the servers need.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The target without its query.
    pub path: String,
    /// Lowercased names, trimmed values.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    close: bool,
}

impl Request {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a handler answers.
#[derive(Debug)]
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(code: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            code,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    pub fn json(code: u16, body: &serde_json::Value) -> Self {
        Response {
            code,
            content_type: "application/json",
            body: body.to_string().into_bytes(),
        }
    }
}

/// A server's requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
    /// The answer to a request refused before [`Handler::handle`] (malformed, too large, too
    /// slow), with `message` saying why; the connection is closed after it.
    fn refused(&self, code: u16, message: &'static str) -> Response {
        Response::text(code, message)
    }
}

enum Read {
    Request(Request),
    /// The peer closed (or went idle) between requests.
    Closed,
    /// Answer with this status and close.
    Refuse(u16, &'static str),
}

/// Serves `handler` on `listener` over TLS until the task is dropped; `what` names the server
/// in logs.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    handler: Arc<H>,
    what: &'static str,
) {
    serve_capped(listener, acceptor, limits, handler, what, MAX_CONNECTIONS).await
}

/// [`serve`] with at most `max_connections` at once.
async fn serve_capped<H: Handler>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    handler: Arc<H>,
    what: &'static str,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let refused = AtomicU64::new(0);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(server = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            let total = refused.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8, …: a flood is visible without flooding the log.
            if total.is_power_of_two() {
                tracing::warn!(server = what, %peer, refused = total, max_connections, "too many connections: closed at once");
            }
            continue;
        };
        let (acceptor, handler) = (acceptor.clone(), handler.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(server = what, %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            if let Err(e) = connection(tls, limits, handler.as_ref()).await {
                tracing::debug!(server = what, %peer, error = %e, "connection ended");
            }
        });
    }
}

/// Requests on one connection, kept alive until the peer closes, idles or errs.
pub async fn connection<S: AsyncRead + AsyncWrite + Unpin, H: Handler>(
    mut stream: S,
    limits: Limits,
    handler: &H,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let request = match read_request(&mut stream, &mut buf, limits).await? {
            Read::Request(r) => r,
            Read::Closed => return Ok(()),
            Read::Refuse(code, message) => {
                let response = handler.refused(code, message);
                respond(&mut stream, &response, true).await?;
                return Ok(());
            }
        };
        let close = request.close;
        let response = handler.handle(request).await;
        respond(&mut stream, &response, close).await?;
        if close {
            return Ok(());
        }
    }
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: Limits,
) -> std::io::Result<Read> {
    let mut chunk = vec![0u8; 16 * 1024];
    // Set at the request's first byte (already here if pipelined after the last one).
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + limits.read_timeout);
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > limits.max_head {
            return Ok(Read::Refuse(431, "request head too large\n"));
        }
        let read = match deadline {
            None => tokio::time::timeout(limits.idle_timeout, stream.read(&mut chunk)).await,
            Some(at) => tokio::time::timeout_at(at, stream.read(&mut chunk)).await,
        };
        match read {
            Err(_) if deadline.is_none() => return Ok(Read::Closed),
            Err(_) => return Ok(Read::Refuse(408, "request head not received in time\n")),
            Ok(Ok(0)) => return Ok(Read::Closed),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                deadline.get_or_insert_with(|| Instant::now() + limits.read_timeout);
            }
            Ok(Err(e)) => return Err(e),
        }
    };
    let deadline = deadline.unwrap_or_else(|| Instant::now() + limits.read_timeout);
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target, version) = (
        first.next().unwrap_or("").to_owned(),
        first.next().unwrap_or("").to_owned(),
        first.next().unwrap_or(""),
    );
    if !version.starts_with("HTTP/1.") {
        return Ok(Read::Refuse(400, "not an HTTP/1.x request\n"));
    }
    let mut length = 0usize;
    let mut close = version == "HTTP/1.0";
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Ok(Read::Refuse(400, "malformed header line\n"));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => match value.parse() {
                Ok(n) => length = n,
                Err(_) => return Ok(Read::Refuse(400, "bad content-length\n")),
            },
            "transfer-encoding" => {
                return Ok(Read::Refuse(411, "send the body with a content-length\n"))
            }
            "connection" if value.eq_ignore_ascii_case("close") => close = true,
            _ => {}
        }
        headers.push((name, value.to_owned()));
    }
    if length > limits.max_body {
        return Ok(Read::Refuse(413, "body too large\n"));
    }
    buf.drain(..head_end);
    while buf.len() < length {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Ok(Read::Refuse(408, "request not received in time\n")),
            Ok(Ok(0)) => return Ok(Read::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    let path = target.split('?').next().unwrap_or("").to_owned();
    Ok(Read::Request(Request {
        method,
        path,
        headers,
        body,
        close,
    }))
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &Response,
    close: bool,
) -> std::io::Result<()> {
    let code = response.code;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        response.content_type,
        response.body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&response.body);
    stream.write_all(&out).await?;
    stream.flush().await?;
    if close {
        stream.shutdown().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
