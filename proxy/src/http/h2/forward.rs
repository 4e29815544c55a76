//! One h2 stream's upstream attempts: an endpoint per attempt, the request over h2 or
//! translated to HTTP/1.1, its body streamed while the response head is awaited (gRPC
//! streams are full duplex), then the response streamed back. Retries follow the route's
//! policy (Istio's default when it has none): on a retriable status or trailers-only
//! `grpc-status`, on connect failure, REFUSED_STREAM or a reset — only while the request body
//! is still wholly kept (up to `replay_max`). Resets cross the proxy both ways: an upstream
//! reset resets the client's stream with the same reason, a client's reset drops the upstream
//! stream (h2 sends RST_STREAM CANCEL for it).

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Instant;

use ::h2::server::SendResponse;
use ::h2::{Reason, RecvStream, SendStream};
use ::http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use bytes::Bytes;

use super::client::{self, H2Upstream};
use super::pump::{self, Moved, PumpError, Replayable, RequestBody, SideError, Sink};
use super::server::send_local;
use super::translate;
use super::{
    grpc_local, to_header_map, to_headers, until, within, MessageCounter, UpstreamProtocol,
};
use crate::breaker::{self, InFlight};
use crate::http::decide::Forward;
use crate::http::h1::{Framing, Header};
use crate::http::local::Local;
use crate::http::record::Record;
use crate::http::retry::{self, Attempts};
use crate::http::server::ConnInfo;
use crate::http::upstream::{self, Failure, Upstream};
use crate::http::Settings;
use crate::outlier;
use crate::serve::Context;
use crate::telemetry::ResponseFlag;

/// The request as it goes upstream (after routing, rewrites and header operations).
pub(crate) struct Exchange<'a> {
    pub(crate) ctx: &'a Context,
    pub(crate) info: ConnInfo,
    pub(crate) method: Method,
    /// Absolute: `:scheme`, `:authority` and `:path` of the upstream request.
    pub(crate) uri: Uri,
    pub(crate) authority: String,
    /// Path and query.
    pub(crate) target: String,
    pub(crate) headers: Vec<Header>,
    pub(crate) grpc: bool,
    pub(crate) settings: &'a Settings,
    /// CORS headers the response gets (an allowed cross-origin request).
    pub(crate) cors_headers: Vec<Header>,
}

/// How one attempt ended.
enum AttemptEnd {
    /// A response went to the client (completely or not: `record` says).
    Done,
    /// The response is one the policy retries; a retry was counted.
    Retry,
    /// No response head.
    Failed(Failure),
}

/// Runs the attempts and streams the response back. Returns the endpoint of the last attempt.
pub(crate) async fn run(
    x: Exchange<'_>,
    forward: &Forward<'_>,
    recv: RecvStream,
    respond: &mut SendResponse<Bytes>,
    record: &mut Record,
) -> Option<usize> {
    let settings = x.settings;
    let protocol = UpstreamProtocol::for_forward(forward, true);
    let mut body = RequestBody::new(recv, settings.replay_max, x.grpc);
    let mut attempts = Attempts::new(forward.route, true, false);
    let route_deadline = forward.route_deadline();
    let max_streams = forward
        .cluster
        .and_then(|c| c.policy.connection_pool.max_concurrent_streams);
    let h2_headers = to_header_map(&x.headers);
    let mut out = Out {
        respond,
        record,
        forward,
        head_only: x.method == Method::HEAD,
        grpc: x.grpc,
        endpoint: None,
        retries: Vec::new(),
        cors_headers: &x.cors_headers,
    };
    // Circuit breaking: over the cluster's limits, 503 UO at once.
    let _admitted = match forward.cluster.map(|c| breaker::admit_request(c)) {
        Some(None) => {
            out.local(&Local::failure(ResponseFlag::UpstreamOverflow));
            return None;
        }
        Some(admitted) => admitted,
        None => None,
    };
    let result = loop {
        let Some((addr, picked)) = forward.next_endpoint(x.info.dst) else {
            break Err(Failure::NoHealthyUpstream);
        };
        out.endpoint = picked;
        let _at_endpoint = forward
            .cluster
            .zip(picked)
            .and_then(|(c, i)| breaker::at_endpoint(c, i));
        let try_deadline = attempts.deadline(route_deadline);
        let deadlines = (try_deadline, route_deadline);
        let up = forward.upstream(addr, x.ctx);
        let end = match protocol {
            UpstreamProtocol::Http2 => {
                let up = H2Upstream {
                    addr,
                    connect_timeout: up.connect_timeout,
                    idle: up.pool_idle,
                    max_streams,
                };
                let (headers, body) = (&h2_headers, &mut body);
                h2_attempt(&x, &up, headers, body, &mut out, &mut attempts, deadlines).await
            }
            UpstreamProtocol::Http1 => {
                h1_attempt(&x, &up, &mut body, &mut out, &mut attempts, deadlines).await
            }
        };
        match end {
            AttemptEnd::Done => break Ok(()),
            AttemptEnd::Retry => attempts.backoff().await,
            AttemptEnd::Failed(f) => {
                if f.is_retriable_kind() {
                    forward.observe(out.endpoint, outlier::Outcome::LocalFailure);
                }
                if body.replayable() && attempts.retry_on_failure(&f) && out.retry_budget() {
                    attempts.backoff().await;
                    continue;
                }
                break Err(f);
            }
        }
    };
    out.record.request_bytes = body.bytes;
    out.record.request_messages = body.messages.as_ref().map_or(0, |m| m.messages);
    let Err(failure) = result else {
        return out.endpoint;
    };
    if failure == Failure::Downstream {
        out.record.flag = ResponseFlag::DownstreamConnectionTermination;
        out.respond.send_reset(Reason::CANCEL);
        return out.endpoint;
    }
    let mut local = Local::failure(failure.flag());
    if attempts.retried() && failure.is_retriable_kind() {
        local.flag = failure.flag().retries_exhausted();
    }
    out.local(&local);
    out.endpoint
}

/// The client's side of the exchange, and what is recorded of it.
struct Out<'a, 'r> {
    respond: &'a mut SendResponse<Bytes>,
    record: &'a mut Record,
    forward: &'a Forward<'r>,
    head_only: bool,
    grpc: bool,
    /// The endpoint of the current attempt.
    endpoint: Option<usize>,
    cors_headers: &'a [Header],
    /// Retries in flight, counted against the cluster's `maxRetries` over every worker.
    retries: Vec<InFlight<'r>>,
}

impl Out<'_, '_> {
    /// Answers with a response made here (trailers-only for gRPC).
    fn local(&mut self, local: &Local) {
        let local = if self.grpc {
            grpc_local(local)
        } else {
            local.clone()
        };
        self.record.status = local.status;
        self.record.flag = local.flag;
        self.record.grpc_status = retry::grpc_status_of(&local.headers);
        self.record.response_bytes = send_local(self.respond, &local, self.head_only);
    }

    fn retry_budget(&mut self) -> bool {
        retry_budget(self.forward, &mut self.retries)
    }

    /// A response head arrived: outlier detection sees its status, and it is retried if the
    /// policy, the body and the retry budget allow.
    fn retry_on_status(
        &mut self,
        attempts: &mut Attempts<'_>,
        status: u16,
        grpc: Option<u32>,
        replayable: bool,
    ) -> bool {
        self.forward
            .observe(self.endpoint, outlier::Outcome::Status(status));
        replayable && attempts.retry_on_status(status, grpc) && self.retry_budget()
    }

    /// Sends the response head (the route's and destination's response header operations
    /// applied). `None` when the client has gone.
    fn head(
        &mut self,
        status: u16,
        mut headers: Vec<Header>,
        end: bool,
        grpc_status: Option<u32>,
        attempts: &Attempts<'_>,
    ) -> Option<SendStream<Bytes>> {
        if attempts.retried() && attempts.was_retriable_status(status, grpc_status) {
            self.record.flag = ResponseFlag::UpstreamRetryLimitExceeded;
        }
        self.record.status = status;
        self.record.grpc_status = grpc_status;
        self.forward.response_header_ops(&mut headers);
        headers.extend(self.cors_headers.iter().cloned());
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        *response.headers_mut() = to_header_map(&headers);
        match self.respond.send_response(response, end || self.head_only) {
            Ok(send) => Some(send),
            Err(_) => {
                self.record.flag = ResponseFlag::DownstreamConnectionTermination;
                None
            }
        }
    }

    /// Records how the response body's passage ended, passing a failure on as a reset.
    fn body_end(
        &mut self,
        send: &mut SendStream<Bytes>,
        ended: Result<Moved, PumpError>,
        counter: Option<MessageCounter>,
        route_deadline: Option<Instant>,
    ) {
        self.record.response_messages = counter.map_or(0, |c| c.messages);
        let e = match ended {
            Ok(moved) => {
                self.record.response_bytes = moved.bytes;
                if moved.grpc_status.is_some() {
                    self.record.grpc_status = moved.grpc_status;
                }
                return;
            }
            Err(e) => e,
        };
        tracing::debug!("response body: {e}");
        self.record.flag = match &e {
            PumpError::Sink(_) => ResponseFlag::DownstreamConnectionTermination,
            _ if route_deadline.is_some_and(|d| Instant::now() >= d) => {
                ResponseFlag::UpstreamRequestTimeout
            }
            PumpError::Source(SideError::H2(h)) if h.is_reset() => {
                ResponseFlag::UpstreamRemoteReset
            }
            _ => ResponseFlag::UpstreamConnectionTermination,
        };
        let reason = match &e {
            PumpError::Source(side) => side.reason(),
            _ => Reason::CANCEL,
        };
        send.send_reset(reason);
    }
}

type BodySend<'b> = Pin<Box<dyn std::future::Future<Output = Result<(), PumpError>> + 'b>>;

/// One attempt over an h2 upstream connection.
async fn h2_attempt(
    x: &Exchange<'_>,
    up: &H2Upstream,
    headers: &HeaderMap,
    body: &mut RequestBody,
    out: &mut Out<'_, '_>,
    attempts: &mut Attempts<'_>,
    (try_deadline, route_deadline): (Option<Instant>, Option<Instant>),
) -> AttemptEnd {
    let checked = match within(try_deadline, client::checkout(up)).await {
        Some(Ok(checked)) => checked,
        Some(Err(f)) => return AttemptEnd::Failed(f),
        None => return AttemptEnd::Failed(Failure::Timeout { per_try: false }),
    };
    let (mut send, reused, _slot) = (checked.send, checked.reused, checked.slot);
    let mut request = Request::new(());
    *request.method_mut() = x.method.clone();
    *request.uri_mut() = x.uri.clone();
    *request.headers_mut() = headers.clone();
    let no_body = body.is_empty();
    let (response, mut up_send) = match send.send_request(request, no_body) {
        Ok(sent) => sent,
        Err(e) => return AttemptEnd::Failed(client::failure(&e, reused)),
    };
    let replayable: Replayable = body.replayable_flag();
    let stall = x.settings.stall;
    let mut sending: Option<BodySend<'_>> =
        (!no_body).then(|| Box::pin(body.send(Sink::H2(&mut up_send), stall)) as BodySend<'_>);
    let mut response = std::pin::pin!(response);
    let head = loop {
        tokio::select! {
            sent = poll_opt(&mut sending) => {
                sending = None;
                if let Err(e) = sent {
                    if !matches!(e, PumpError::Sink(_)) {
                        tracing::debug!("request body: {e}");
                        return AttemptEnd::Failed(Failure::Downstream);
                    }
                    // The upstream reset the stream: its response future says how.
                }
            }
            head = &mut response => break head,
            _ = poll_fn(|cx| out.respond.poll_reset(cx)) => {
                return AttemptEnd::Failed(Failure::Downstream);
            }
            _ = until(try_deadline) => {
                return AttemptEnd::Failed(Failure::Timeout { per_try: false });
            }
        }
    };
    let (parts, mut up_recv) = match head {
        Ok(response) => response.into_parts(),
        Err(e) => return AttemptEnd::Failed(client::failure(&e, reused)),
    };
    let status = parts.status.as_u16();
    let head_grpc = pump::grpc_status_of(&parts.headers);
    if out.retry_on_status(attempts, status, head_grpc, replayable.get()) {
        return AttemptEnd::Retry;
    }
    let end = up_recv.is_end_stream();
    let Some(mut down_send) =
        out.head(status, to_headers(&parts.headers), end, head_grpc, attempts)
    else {
        return AttemptEnd::Done;
    };
    if end || out.head_only {
        return AttemptEnd::Done;
    }
    let mut counter = out.grpc.then(MessageCounter::default);
    let ended = {
        let moving = pump::h2_to_h2(&mut up_recv, &mut down_send, stall, counter.as_mut());
        let mut moving = std::pin::pin!(moving);
        loop {
            tokio::select! {
                sent = poll_opt(&mut sending) => {
                    sending = None;
                    if let Err(e) = sent {
                        if !matches!(e, PumpError::Sink(_)) {
                            // The client reset its stream: the response cannot reach it.
                            break Err(PumpError::Sink(SideError::Framing(e.to_string())));
                        }
                    }
                }
                moved = &mut moving => break moved,
                _ = until(route_deadline) => break Err(PumpError::Stalled(stall)),
            }
        }
    };
    drop(sending);
    out.body_end(&mut down_send, ended, counter, route_deadline);
    AttemptEnd::Done
}

/// Polls an optional boxed future; pending forever when there is none.
async fn poll_opt(f: &mut Option<BodySend<'_>>) -> Result<(), PumpError> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// One attempt over an HTTP/1.1 upstream connection: the translation path.
async fn h1_attempt(
    x: &Exchange<'_>,
    up: &Upstream,
    body: &mut RequestBody,
    out: &mut Out<'_, '_>,
    attempts: &mut Attempts<'_>,
    (try_deadline, route_deadline): (Option<Instant>, Option<Instant>),
) -> AttemptEnd {
    let settings = x.settings;
    let (head, chunked) =
        translate::request_head(x.method.as_str(), &x.target, &x.authority, &x.headers, body);
    let method = x.method.as_str();
    let sent = translate::send(up, &head, chunked, body, method, try_deadline, settings).await;
    let (mut conn, mut response) = match sent {
        Ok(sent) => sent,
        Err(f) => return AttemptEnd::Failed(f),
    };
    let grpc = retry::grpc_status_of(&response.headers);
    if out.retry_on_status(attempts, response.status, grpc, body.replayable()) {
        upstream::finish_discarded(conn, &response, method, settings, up.pool_idle).await;
        return AttemptEnd::Retry;
    }
    let framing = if out.head_only {
        Framing::Empty
    } else {
        response.framing
    };
    let keep_alive = response.keep_alive && framing != Framing::UntilClose;
    let end = framing == Framing::Empty;
    let headers = translate::response_headers(&mut response);
    let Some(mut down_send) = out.head(response.status, headers, end, grpc, attempts) else {
        conn.conn.reset_on_close();
        return AttemptEnd::Done;
    };
    if end {
        if keep_alive {
            conn.give_back(up.pool_idle);
        }
        return AttemptEnd::Done;
    }
    let mut counter = out.grpc.then(MessageCounter::default);
    let moving = translate::body_to_h2(
        &mut conn.conn,
        framing,
        &mut down_send,
        settings,
        counter.as_mut(),
    );
    let ended = match within(route_deadline, moving).await {
        Some(Ok(bytes)) => Ok(Moved {
            bytes,
            grpc_status: None,
        }),
        Some(Err(e)) => Err(e),
        None => Err(PumpError::Stalled(settings.stall)),
    };
    if ended.is_ok() && keep_alive {
        conn.give_back(up.pool_idle);
    }
    out.body_end(&mut down_send, ended, counter, route_deadline);
    AttemptEnd::Done
}

/// Whether the cluster's `maxRetries` allows one more retry in flight (held in `retries`).
pub(super) fn retry_budget<'r>(forward: &Forward<'r>, retries: &mut Vec<InFlight<'r>>) -> bool {
    let Some(cluster) = forward.cluster else {
        return true;
    };
    match breaker::admit_retry(cluster) {
        Some(guard) => {
            retries.push(guard);
            true
        }
        None => false,
    }
}
