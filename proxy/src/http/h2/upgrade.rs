//! HTTP/1 clients to h2 upstreams: a request the HTTP/1 path routed to a port declared HTTP2 or
//! GRPC, or to a cluster whose DestinationRule says `h2UpgradePolicy: UPGRADE`, goes upstream
//! as an h2 stream on the worker's multiplexed connection ([`super::client`]). Its head becomes
//! an h2 HEADERS frame (`host` as `:authority`, connection-specific headers dropped), its body
//! DATA frames (chunked trailers as an h2 trailer block); the response comes back as HTTP/1.1 —
//! with its length when it has one, chunked otherwise (h2 trailers as chunked trailers when the
//! client sent `TE: trailers`), until close to an HTTP/1.0 client.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use ::h2::RecvStream;
use ::http::{Method, Request as H2Request, Uri};
use bytes::Bytes;

use super::client::{self, H2Upstream};
use super::forward::retry_budget;
use super::pump::{self, Moved, PumpError, SideError, Sink};
use super::{to_header_map, to_headers, translate, until, within, UpstreamProtocol};
use crate::breaker;
use crate::http::decide::Forward;
use crate::http::h1::{self, Framing, RequestHead, ResponseHead, Version};
use crate::http::io::Conn;
use crate::http::local::{header, reason, Local};
use crate::http::record::Record;
use crate::http::retry::{self, Attempts};
use crate::http::upstream::Failure;
use crate::outlier;
use crate::serve::Context;
use crate::telemetry::ResponseFlag;

/// Whether an HTTP/1 request routed to `forward` goes upstream in h2.
pub(crate) fn wanted(forward: &Forward<'_>) -> bool {
    UpstreamProtocol::for_forward(forward, false) == UpstreamProtocol::Http2
}

/// The HTTP/1 request, as the HTTP/1 path prepared it for upstream.
pub(crate) struct Request<'a> {
    /// Hop-by-hop headers stripped, header operations applied.
    pub(crate) head: &'a RequestHead,
    /// The body (of known length) is in the client connection's buffer, unconsumed.
    pub(crate) replayable: bool,
    pub(crate) client_version: Version,
    /// The client connection may carry another request after this one.
    pub(crate) keep_alive: bool,
    /// The client sent `TE: trailers`.
    pub(crate) wants_trailers: bool,
}

/// How the response head went.
enum Head {
    Response(::http::response::Parts, RecvStream),
    Failed(Failure),
}

type BodySend<'b> = Pin<Box<dyn Future<Output = Result<(), PumpError>> + 'b>>;

/// Serves the request over h2. Returns whether the client connection may carry another
/// request, and the endpoint of the last attempt.
pub(crate) async fn exchange(
    down: &mut Conn,
    req: Request<'_>,
    forward: &Forward<'_>,
    ctx: &Context,
    dst: std::net::SocketAddr,
    record: &mut Record,
) -> (bool, Option<usize>) {
    let settings = &ctx.http;
    let head = req.head;
    let authority = head
        .headers
        .iter()
        .find(|h| h.is("host"))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_default();
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(&*head.target)
        .build();
    let (Ok(uri), Ok(method)) = (uri, Method::from_bytes(head.method.as_bytes())) else {
        let local = Local::new(400, "invalid Host or request target", ResponseFlag::None);
        return (answer(down, &req, &local, false, record).await, None);
    };
    let headers = to_header_map(&head.headers);
    let _admitted = match forward.cluster.map(|c| breaker::admit_request(c)) {
        Some(None) => {
            let local = Local::failure(ResponseFlag::UpstreamOverflow);
            return (answer(down, &req, &local, false, record).await, None);
        }
        Some(admitted) => admitted,
        None => None,
    };
    let mut retries = Vec::new();
    let mut attempts = Attempts::new(forward.route, req.replayable, false);
    let route_deadline = forward.route_deadline();
    let max_streams = forward
        .cluster
        .and_then(|c| c.policy.connection_pool.max_concurrent_streams);
    let mut endpoint = None;
    // The body went (in part) to an attempt and is not in the client's buffer any more.
    let mut consumed = false;
    let outcome = loop {
        let Some((addr, picked)) = forward.next_endpoint(dst) else {
            break Err(Failure::NoHealthyUpstream);
        };
        endpoint = picked;
        let _at_endpoint = forward
            .cluster
            .zip(picked)
            .and_then(|(c, i)| breaker::at_endpoint(c, i));
        let try_deadline = attempts.deadline(route_deadline);
        let base = forward.upstream(addr, ctx);
        let up = H2Upstream {
            addr,
            connect_timeout: base.connect_timeout,
            idle: base.pool_idle,
            max_streams,
        };
        let mut request = H2Request::new(());
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers.clone();
        let attempt = attempt(
            down,
            &req,
            &up,
            request,
            try_deadline,
            settings,
            &mut consumed,
        );
        let failure = match attempt.await {
            Head::Response(parts, recv) => {
                let status = parts.status.as_u16();
                forward.observe(endpoint, outlier::Outcome::Status(status));
                let grpc = pump::grpc_status_of(&parts.headers);
                if attempts.retry_on_status(status, grpc) && retry_budget(forward, &mut retries) {
                    attempts.backoff().await;
                    continue;
                }
                break Ok((parts, recv));
            }
            Head::Failed(f) => f,
        };
        if failure.is_retriable_kind() {
            forward.observe(endpoint, outlier::Outcome::LocalFailure);
        }
        if attempts.retry_on_failure(&failure) && retry_budget(forward, &mut retries) {
            attempts.backoff().await;
            continue;
        }
        break Err(failure);
    };
    if req.replayable && !consumed {
        if let Framing::Length(n) = head.framing {
            down.consume(n as usize);
            record.request_bytes = n;
        }
    }
    let (parts, mut recv) = match outcome {
        Ok(response) => response,
        Err(Failure::Downstream) => {
            record.flag = ResponseFlag::DownstreamConnectionTermination;
            return (false, endpoint);
        }
        Err(failure) => {
            let mut local = Local::failure(failure.flag());
            if attempts.retried() && failure.is_retriable_kind() {
                local.flag = failure.flag().retries_exhausted();
            }
            // The connection carries on only if the body was in hand (or there was none).
            let keep = answer(down, &req, &local, req.replayable, record).await;
            return (keep, endpoint);
        }
    };

    // The response, as HTTP/1.1.
    let status = parts.status.as_u16();
    let grpc = pump::grpc_status_of(&parts.headers);
    if attempts.retried() && attempts.was_retriable_status(status, grpc) {
        record.flag = ResponseFlag::UpstreamRetryLimitExceeded;
    }
    record.status = status;
    record.grpc_status = grpc;
    let mut headers = to_headers(&parts.headers);
    forward.response_header_ops(&mut headers);
    let bodiless = &*head.method == "HEAD" || matches!(status, 100..=199 | 204 | 304);
    let has_length = headers.iter().any(|h| h.is("content-length"));
    let (framing, mut keep) = if bodiless {
        (Framing::Empty, req.keep_alive)
    } else if recv.is_end_stream() {
        if !has_length {
            headers.push(header("content-length", b"0"));
        }
        (Framing::Empty, req.keep_alive)
    } else if has_length {
        // Passed on as it comes; h2 has checked it against the declared length.
        (Framing::Length(0), req.keep_alive)
    } else if req.client_version == Version::Http11 {
        headers.push(header("transfer-encoding", b"chunked"));
        (Framing::Chunked, req.keep_alive)
    } else {
        (Framing::UntilClose, false)
    };
    if !keep {
        headers.push(header("connection", b"close"));
    }
    let mut out = Vec::with_capacity(512);
    h1::encode_response_head(
        &ResponseHead {
            status,
            reason: reason(status).into(),
            version: Version::Http11,
            headers,
            framing,
            keep_alive: keep,
        },
        &mut out,
    );
    if down.write_all(&out).await.is_err() {
        record.flag = ResponseFlag::DownstreamConnectionTermination;
        return (false, endpoint);
    }
    if framing == Framing::Empty {
        return (keep, endpoint);
    }
    let sink = Sink::H1 {
        conn: down,
        chunked: framing == Framing::Chunked,
    };
    let moving = body_to_h1(&mut recv, sink, req.wants_trailers, settings.stall);
    let ended = within(route_deadline, moving)
        .await
        .unwrap_or(Err(PumpError::Stalled(settings.stall)));
    match ended {
        Ok(moved) => {
            record.response_bytes = moved.bytes;
            if moved.grpc_status.is_some() {
                record.grpc_status = moved.grpc_status;
            }
        }
        Err(e) => {
            tracing::debug!("response body: {e}");
            record.flag = match e {
                PumpError::Sink(_) => ResponseFlag::DownstreamConnectionTermination,
                _ if route_deadline.is_some_and(|d| Instant::now() >= d) => {
                    ResponseFlag::UpstreamRequestTimeout
                }
                _ => ResponseFlag::UpstreamRemoteReset,
            };
            down.reset_on_close();
            keep = false;
        }
    }
    (keep, endpoint)
}

/// One attempt: the stream opened, the body sent (from the client's buffer, or streamed from
/// its connection), the response head awaited — within `deadline`.
async fn attempt(
    down: &mut Conn,
    req: &Request<'_>,
    up: &H2Upstream,
    request: H2Request<()>,
    deadline: Option<Instant>,
    settings: &crate::http::Settings,
    consumed: &mut bool,
) -> Head {
    let checked = match within(deadline, client::checkout(up)).await {
        Some(Ok(checked)) => checked,
        Some(Err(f)) => return Head::Failed(f),
        None => return Head::Failed(Failure::Timeout { per_try: false }),
    };
    let (mut send, reused, _slot) = (checked.send, checked.reused, checked.slot);
    let framing = req.head.framing;
    let no_body = framing == Framing::Empty;
    let (response, mut up_send) = match send.send_request(request, no_body) {
        Ok(sent) => sent,
        Err(e) => return Head::Failed(client::failure(&e, reused)),
    };
    let mut sending: Option<BodySend<'_>> = match framing {
        Framing::Empty => None,
        Framing::Length(n) if req.replayable => {
            let body = Bytes::copy_from_slice(&down.buffered()[..n as usize]);
            Some(Box::pin(async move {
                pump::send_data(&mut up_send, body, true)
                    .await
                    .map_err(|e| PumpError::Sink(SideError::H2(e)))
            }))
        }
        _ => {
            *consumed = true;
            Some(Box::pin(async move {
                translate::body_to_h2(down, framing, &mut up_send, settings, None)
                    .await
                    .map(|_| ())
            }))
        }
    };
    let mut response = std::pin::pin!(response);
    let head = loop {
        tokio::select! {
            sent = poll_opt(&mut sending) => {
                sending = None;
                match sent {
                    Err(PumpError::Source(SideError::Framing(_))) if *consumed => {
                        return Head::Failed(Failure::BadRequestBody);
                    }
                    Err(PumpError::Source(_) | PumpError::Stalled(_)) => {
                        return Head::Failed(Failure::Downstream);
                    }
                    // An upstream reset: its response future says how.
                    _ => {}
                }
            }
            head = &mut response => break head,
            _ = until(deadline) => return Head::Failed(Failure::Timeout { per_try: false }),
        }
    };
    match head {
        Ok(response) => {
            let (parts, recv) = response.into_parts();
            Head::Response(parts, recv)
        }
        Err(e) => Head::Failed(client::failure(&e, reused)),
    }
}

async fn poll_opt(f: &mut Option<BodySend<'_>>) -> Result<(), PumpError> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// An h2 response body to the HTTP/1 client; the trailers only if it asked for them.
async fn body_to_h1(
    from: &mut RecvStream,
    mut to: Sink<'_>,
    wants_trailers: bool,
    stall: std::time::Duration,
) -> Result<Moved, PumpError> {
    let mut bytes = 0u64;
    while let Some(chunk) = pump::next_data(from, stall).await? {
        let n = chunk.len();
        bytes += n as u64;
        to.data(chunk).await.map_err(PumpError::Sink)?;
        let _ = from.flow_control().release_capacity(n);
    }
    let trailers = pump::next_trailers(from, stall).await?;
    let grpc_status = trailers.as_ref().and_then(pump::grpc_status_of);
    let passed = trailers.as_ref().filter(|_| wants_trailers);
    to.end(passed).await.map_err(PumpError::Sink)?;
    Ok(Moved { bytes, grpc_status })
}

/// Answers the HTTP/1 client with a response made here. `whole`: the request's body was read
/// (or kept), so the connection can carry the next request.
async fn answer(
    down: &mut Conn,
    req: &Request<'_>,
    local: &Local,
    whole: bool,
    record: &mut Record,
) -> bool {
    let keep = whole && req.keep_alive;
    let mut out = Vec::with_capacity(256 + local.body.len());
    local.encode(
        Version::Http11,
        &*req.head.method == "HEAD",
        !keep,
        &mut out,
    );
    record.status = local.status;
    record.flag = local.flag;
    record.grpc_status = retry::grpc_status_of(&local.headers);
    down.write_all(&out).await.is_ok() && keep
}
