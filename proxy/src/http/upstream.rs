//! One attempt at an upstream: a pooled or new connection, the request head (and a
//! replayable body from the client's buffer, or the streamed one), then the response head.
//! Failures are classified so that the retry policy and the response flags can tell a refused
//! connect from a reset, a stale pooled connection, or a timeout.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::body::{self, BodyError, Chunking};
use super::h1::{self, Framing, ResponseHead};
use super::io::Conn;
use super::pool::{self, Checked};
use super::Settings;
use crate::telemetry::ResponseFlag;

/// Where an attempt goes and the connection-pool settings that apply.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    pub pool_idle: Duration,
    /// `maxRequestsPerConnection`; 0 = unlimited.
    pub max_requests: u32,
    /// `connectionPool.tcp.tcpKeepalive` for new connections.
    pub keepalive: Option<isthmus_config::TcpKeepalive>,
    /// `connectionPool.tcp.maxConnectionDuration`: not reused after it.
    pub max_duration: Option<Duration>,
}

/// Why an attempt produced no response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connect was refused or timed out: nothing was sent.
    Connect,
    /// The upstream closed before a response head. `reused`: on a pooled connection, which
    /// the server may have closed while it sat idle (retried once on a new one).
    Closed { reused: bool },
    /// The upstream reset the connection.
    Reset,
    /// An h2 upstream refused the stream (REFUSED_STREAM): it did not process the request.
    RefusedStream,
    /// The attempt's deadline passed; `per_try` when it was the per-try timeout.
    Timeout { per_try: bool },
    /// The response head was not valid HTTP/1.
    Malformed,
    /// The client went away (or stalled) while its body was being sent.
    Downstream,
    /// The client's body broke HTTP/1 framing (a bad chunk): answered 400, connection closed.
    BadRequestBody,
    /// No endpoint to try.
    NoHealthyUpstream,
}

impl Failure {
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Failure::Connect => ResponseFlag::UpstreamConnectFailure,
            Failure::Closed { .. } | Failure::Malformed => {
                ResponseFlag::UpstreamConnectionTermination
            }
            Failure::Reset | Failure::RefusedStream => ResponseFlag::UpstreamRemoteReset,
            Failure::Timeout { .. } => ResponseFlag::UpstreamRequestTimeout,
            Failure::Downstream => ResponseFlag::DownstreamConnectionTermination,
            Failure::BadRequestBody => ResponseFlag::DownstreamProtocolError,
            Failure::NoHealthyUpstream => ResponseFlag::NoHealthyUpstream,
        }
    }

    /// Failures a retry policy can act on (the flag becomes `URX` once retries ran out).
    pub fn is_retriable_kind(&self) -> bool {
        matches!(
            self,
            Failure::Connect
                | Failure::Closed { .. }
                | Failure::Reset
                | Failure::RefusedStream
                | Failure::Timeout { .. }
        )
    }
}

/// A connection in use for one exchange.
pub struct Up {
    pub conn: Conn,
    addr: SocketAddr,
    used: u32,
    max_requests: u32,
}

impl Up {
    /// A checked-out connection about to carry an exchange (`used`: its exchanges so far).
    pub(crate) fn new(conn: Conn, addr: SocketAddr, used: u32, max_requests: u32) -> Self {
        Up {
            conn,
            addr,
            used,
            max_requests,
        }
    }

    /// Back to the pool after a complete exchange (unless it has carried its maximum).
    pub fn give_back(self, idle: Duration) {
        let used = self.used + 1;
        if self.max_requests != 0 && used >= self.max_requests {
            return;
        }
        pool::put(
            Checked {
                conn: self.conn,
                addr: self.addr,
                reused: true,
                used,
            },
            idle,
        );
    }
}

pub(crate) async fn checkout(up: &Upstream) -> Result<(Conn, bool, u32), Failure> {
    if let Some(c) = pool::take(up.addr) {
        return Ok((c.conn, true, c.used));
    }
    match tokio::time::timeout(up.connect_timeout, TcpStream::connect(up.addr)).await {
        Ok(Ok(stream)) => {
            if let Some(keepalive) = &up.keepalive {
                crate::connect::set_keepalive(&stream, keepalive);
            }
            let mut conn = Conn::new(stream, Vec::new());
            if let Some(max_age) = up.max_duration {
                conn.retire_after(max_age);
            }
            Ok((conn, false, 0))
        }
        Ok(Err(e)) => {
            tracing::debug!(addr = %up.addr, "connect failed: {e}");
            Err(Failure::Connect)
        }
        Err(_) => Err(Failure::Connect),
    }
}

pub(crate) fn write_failure(e: &io::Error, reused: bool) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionReset if !reused => Failure::Reset,
        _ => Failure::Closed { reused },
    }
}

/// Sends the request and reads the response head. `body_len` bytes of the client's buffer
/// are a replayable body sent with the head (left in the buffer); `streamed` is the framing
/// of a body read from the client as it is sent (not replayable).
#[allow(clippy::too_many_arguments)]
pub async fn send(
    up: &Upstream,
    down: &mut Conn,
    head: &[u8],
    body_len: usize,
    streamed: Framing,
    method: &str,
    deadline: Option<Instant>,
    settings: &Settings,
) -> Result<(Up, ResponseHead), Failure> {
    let attempt = async {
        let (mut conn, reused, used) = checkout(up).await?;
        if body_len > 0 && body_len <= 16 * 1024 {
            let mut first = Vec::with_capacity(head.len() + body_len);
            first.extend_from_slice(head);
            first.extend_from_slice(&down.buffered()[..body_len]);
            conn.write_all(&first).await
        } else if body_len > 0 {
            match conn.write_all(head).await {
                Ok(()) => conn.write_all(&down.buffered()[..body_len]).await,
                Err(e) => Err(e),
            }
        } else {
            conn.write_all(head).await
        }
        .map_err(|e| write_failure(&e, reused))?;
        if streamed != Framing::Empty {
            body::forward(
                down,
                &mut conn,
                streamed,
                Chunking::Keep,
                &settings.limits,
                settings.stall,
            )
            .await
            .map_err(|e| match e {
                BodyError::Write(e) => write_failure(&e, reused),
                BodyError::Framing(_) => Failure::BadRequestBody,
                _ => Failure::Downstream,
            })?;
        }
        let response = read_response(&mut conn, method, reused, settings).await?;
        Ok((
            Up {
                conn,
                addr: up.addr,
                used,
                max_requests: up.max_requests,
            },
            response,
        ))
    };
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), attempt)
            .await
            .unwrap_or(Err(Failure::Timeout { per_try: false })),
        None => attempt.await,
    }
}

/// Reads a response head; interim 1xx responses (other than 101) are dropped: the client's
/// `Expect: 100-continue` was answered by the proxy.
pub(crate) async fn read_response(
    conn: &mut Conn,
    method: &str,
    reused: bool,
    settings: &Settings,
) -> Result<ResponseHead, Failure> {
    let mut received = false;
    loop {
        if !conn.buffered().is_empty() {
            match h1::parse_response(conn.buffered(), method, &settings.limits) {
                Ok(Some((head, n))) => {
                    conn.consume(n);
                    if (100..200).contains(&head.status) && head.status != 101 {
                        received = true;
                        continue;
                    }
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("bad response head: {e}");
                    return Err(Failure::Malformed);
                }
            }
        }
        match conn.fill().await {
            Ok(0) => {
                return Err(Failure::Closed {
                    reused: reused && !received && conn.buffered().is_empty(),
                })
            }
            Ok(_) => received = true,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(if reused && !received {
                    Failure::Closed { reused: true }
                } else {
                    Failure::Reset
                })
            }
            Err(_) => return Err(Failure::Reset),
        }
    }
}

/// Reads and drops the body of a response that will not be passed on (it is being retried),
/// returning the connection to the pool when that leaves it reusable.
pub async fn finish_discarded(
    mut up: Up,
    response: &ResponseHead,
    method: &str,
    settings: &Settings,
    idle: Duration,
) {
    let framing = if method == "HEAD" {
        Framing::Empty
    } else {
        response.framing
    };
    let done = body::discard(
        &mut up.conn,
        framing,
        &settings.limits,
        settings.discard_max,
        settings.stall,
    )
    .await
    .unwrap_or(false);
    if done && response.keep_alive {
        up.give_back(idle);
    }
}

/// After `101 Switching Protocols` (or a 2xx answer to CONNECT): bytes both ways until either
/// side closes, what each side had buffered passed on first.
pub async fn tunnel(down: &mut Conn, up: Conn) {
    let (mut up_stream, up_rest) = up.into_parts();
    let down_rest = down.buffered().to_vec();
    let n = down_rest.len();
    down.consume(n);
    use tokio::io::AsyncWriteExt;
    if !up_rest.is_empty() && down.write_all(&up_rest).await.is_err() {
        return;
    }
    if !down_rest.is_empty() && up_stream.write_all(&down_rest).await.is_err() {
        return;
    }
    let _ = down.copy_bidirectional(&mut up_stream).await;
}
