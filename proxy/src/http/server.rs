//! HTTP/1.x from the client's side of the sidecar: one task per connection, its requests one
//! after another (keep-alive), each routed on the snapshot current when it arrives. A request
//! goes through: head read (bounded in size and time) → routing decision → local answer, or
//! upstream attempts (pooled connections, retries, timeouts) → response streamed back →
//! telemetry recorded once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::access_log::RequestLine;
use super::body::{self, BodyError, Chunking};
use super::cors::{self, Cors};
use super::decide::{decide, Decision};
use super::h1::{self, Framing, RequestHead, Version};
use super::io::Conn;
use super::local::{header, Local};
use super::record::{HandleCache, Record};
use super::retry::{self, Attempts};
use super::router::{RequestView, Source};
use super::upstream::{self, Failure};
use super::{filters, Settings};
use super::{h2, mirror};
use crate::breaker;
use crate::drain::{self, Phase};
use crate::outlier;
use crate::route::Target;
use crate::serve::{Context, Direction};
use crate::telemetry::ResponseFlag;

/// Where a connection came in and was going.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub direction: Direction,
    pub peer: SocketAddr,
    pub dst: SocketAddr,
}

/// Serves an HTTP/1 connection until the client closes it, an exchange breaks it, or the
/// drain's closing phase ends it.
pub async fn serve(
    stream: TcpStream,
    prefix: Vec<u8>,
    info: ConnInfo,
    ctx: &Context,
    mut drain: drain::Watch,
) {
    let mut closing = drain.clone();
    tokio::select! {
        _ = serve_requests(stream, prefix, info, ctx, &mut drain) => {}
        _ = closing.reached(Phase::Closing) => {}
    }
}

async fn serve_requests(
    stream: TcpStream,
    prefix: Vec<u8>,
    info: ConnInfo,
    ctx: &Context,
    drain: &mut drain::Watch,
) {
    let settings = &ctx.http;
    let mut down = Conn::new(stream, prefix);
    let mut handles = HandleCache::default();
    loop {
        // Between requests: hold no buffer; close when idle too long, or on drain (inbound).
        let _idle = IdleGuard::new(
            &ctx.metrics.http_idle_connections,
            down.buffered().is_empty(),
        );
        let waited = if info.direction == Direction::Inbound {
            tokio::select! {
                r = tokio::time::timeout(settings.idle_timeout, down.idle()) => r,
                _ = drain.reached(Phase::Draining) => return,
            }
        } else {
            tokio::time::timeout(settings.idle_timeout, down.idle()).await
        };
        if !matches!(waited, Ok(Ok(()))) {
            return;
        }
        drop(_idle);
        let started = Instant::now();
        let (head, len) = match read_head(&mut down, settings).await {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return,
            Err(local) => {
                let mut out = Vec::new();
                local.encode(Version::Http11, false, true, &mut out);
                let _ = down.write_all(&out).await;
                // Counted like any request (Envoy counts its own 400s too): no route was
                // chosen, so the destination is unknown.
                let mut record = Record::new(started);
                record.status = local.status;
                record.flag = match local.status {
                    408 => ResponseFlag::None,
                    _ => ResponseFlag::DownstreamProtocolError,
                };
                record.response_bytes = local.body.len() as u64;
                let target = match info.direction {
                    Direction::Inbound => Target::Inbound,
                    Direction::Outbound => Target::Unregistered("unknown"),
                };
                handles.record(ctx, &target, None, None, &record, info);
                down.linger_close().await;
                return;
            }
        };
        down.consume(len);
        let draining = drain.phase() >= Phase::Draining && info.direction == Direction::Inbound;
        let keep = exchange(&mut down, head, info, ctx, &mut handles, started, draining).await;
        if !keep {
            return;
        }
    }
}

/// Counts a connection as idle between requests while it lives (dropped on every exit path,
/// including the drain's cancellation).
struct IdleGuard<'a>(Option<&'a prometheus_client::metrics::gauge::Gauge>);

impl<'a> IdleGuard<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge, idle: bool) -> Self {
        if idle {
            gauge.inc();
            IdleGuard(Some(gauge))
        } else {
            IdleGuard(None)
        }
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.dec();
        }
    }
}

/// Reads one request head. `Ok(None)`: the client closed (or sent nothing) between requests.
/// `Err`: the answer to send before closing (400/431/501, or 408 when the head is too slow).
async fn read_head(
    down: &mut Conn,
    settings: &Settings,
) -> Result<Option<(RequestHead, usize)>, Local> {
    let deadline = Instant::now() + settings.header_timeout;
    loop {
        if !down.buffered().is_empty() {
            match h1::parse_request(down.buffered(), &settings.limits) {
                Ok(Some(parsed)) => return Ok(Some(parsed)),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("refused request: {e}");
                    return Err(Local::new(e.status(), e.to_string(), ResponseFlag::None));
                }
            }
        }
        match down.fill_until(deadline).await {
            None if down.buffered().is_empty() => return Ok(None),
            None => return Err(Local::new(408, "request head timeout", ResponseFlag::None)),
            Some(Ok(0)) | Some(Err(_)) => return Ok(None),
            Some(Ok(_)) => {}
        }
    }
}

/// Serves one request. Returns whether the connection may carry another.
async fn exchange(
    down: &mut Conn,
    mut head: RequestHead,
    info: ConnInfo,
    ctx: &Context,
    handles: &mut HandleCache,
    started: Instant,
    draining: bool,
) -> bool {
    let settings = &ctx.http;
    let snapshot = ctx.store.load();
    let authority_owned = head
        .headers
        .iter()
        .find(|h| h.is("host"))
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_default();
    let (path, query) = RequestView::split_target(&head.target);
    let view = RequestView {
        method: &head.method,
        path,
        query,
        authority: &authority_owned,
        scheme: "http",
        headers: &head.headers,
        port: info.dst.port(),
    };
    let source = Source {
        labels: &settings.source_labels,
        namespace: &ctx.identity.namespace,
    };
    let decision = decide(&snapshot, info, &head.target, &view, &source);
    let mut record = Record::new(started);
    if settings.access_log.is_some() {
        let route = match &decision {
            Decision::Forward(f) => f.route.and_then(|r| r.name.clone()),
            Decision::Local(_) => None,
        };
        let protocol = match head.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        let line = RequestLine::new(&view, &head.target, protocol, route, started);
        record.line = Some(Box::new(line));
    }
    let head_only = &*head.method == "HEAD";
    let forward = match decision {
        Decision::Local(local) => {
            let keep = answer_locally(down, &head, &local, settings, draining).await;
            record.status = local.status;
            record.flag = local.flag;
            record.response_bytes = if head_only {
                0
            } else {
                local.body.len() as u64
            };
            handles.record(
                ctx,
                &Target::Unregistered("BlackHoleCluster"),
                None,
                None,
                &record,
                info,
            );
            return keep;
        }
        Decision::Forward(f) => f,
    };
    let finish = |handles: &mut HandleCache, endpoint: Option<usize>, record: &Record| {
        handles.record(
            ctx,
            &forward.target,
            forward.cluster,
            endpoint,
            record,
            info,
        )
    };

    // CORS: an allowed preflight is answered here; an allowed request's response gets the
    // `Access-Control-*` headers.
    let cors_headers = match forward.route.and_then(|r| r.cors.as_ref()) {
        Some(policy) => match cors::check(policy, &view) {
            Cors::Preflight(local) => {
                let keep = answer_locally(down, &head, &local, settings, draining).await;
                record.status = local.status;
                finish(handles, None, &record);
                return keep;
            }
            Cors::Allowed(headers) => headers,
            Cors::None => Vec::new(),
        },
        None => Vec::new(),
    };

    // Fault injection: abort answers at once, delay waits first.
    if let Some(local) = forward.inject_fault(&mut record).await {
        let keep = answer_locally(down, &head, &local, settings, draining).await;
        record.status = local.status;
        record.grpc_status = retry::grpc_status_of(&local.headers);
        record.flag = ResponseFlag::FaultInjected;
        finish(handles, None, &record);
        return keep;
    }

    // Build the request as it goes upstream.
    let mut authority = None;
    if let Some(rule) = forward.route.and_then(|r| r.rewrite.as_ref()) {
        let mut target = head.target.to_string();
        filters::rewrite(rule, forward.matched, &mut target, &mut authority);
        head.target = target.into();
    }
    let upgrade = head.upgrade || &*head.method == "CONNECT";
    let upgrade_protocol = head.headers.iter().find(|h| h.is("upgrade")).cloned();
    let wants_trailers = head.headers.iter().any(|h| {
        h.is("te")
            && h.value
                .windows(8)
                .any(|w| w.eq_ignore_ascii_case(b"trailers"))
    });
    let client_version = head.version;
    let client_keep_alive = head.keep_alive;
    let expect_continue = head.expect_continue;
    h1::strip_hop_by_hop(&mut head.headers);
    head.headers.retain(|h| !h.is("expect"));
    if let Some(a) = authority {
        filters::apply_header_ops(
            &isthmus_config::HeaderOps {
                set: vec![("host".into(), a)],
                add: vec![],
                remove: vec![],
            },
            &mut head.headers,
        );
    }
    forward.request_header_ops(&mut head.headers);
    // HTTP/1.0 may come without Host; it goes upstream as HTTP/1.1, which requires one: the
    // address the client asked for.
    if !head.headers.iter().any(|h| h.is("host")) {
        head.headers
            .push(header("host", info.dst.to_string().as_bytes()));
    }
    if !head.headers.iter().any(|h| h.is("x-forwarded-proto")) {
        head.headers.push(header("x-forwarded-proto", b"http"));
    }
    if wants_trailers {
        head.headers.push(header("te", b"trailers"));
    }
    if upgrade {
        if let Some(u) = upgrade_protocol {
            head.headers.push(header("connection", b"upgrade"));
            head.headers.push(u);
        }
    }
    if head.framing == Framing::Chunked {
        head.headers.push(header("transfer-encoding", b"chunked"));
    }
    head.version = Version::Http11;

    // Expect: 100-continue is answered here, as Envoy does: the body follows at once.
    if expect_continue
        && client_version == Version::Http11
        && down
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return false;
    }

    // The body stays in the client connection's buffer when it is small enough to replay.
    let replayable = match head.framing {
        Framing::Empty => true,
        Framing::Length(n) if n as usize <= settings.replay_max => {
            if let Err(e) = body::buffer_length(down, n as usize, settings.stall).await {
                record.flag = ResponseFlag::DownstreamConnectionTermination;
                tracing::debug!("request body: {e}");
                finish(handles, None, &record);
                return false;
            }
            true
        }
        _ => false,
    };

    // Mirrors get a copy of a request whose body is in hand; they never slow it down.
    if let Some(route) = forward
        .route
        .filter(|r| !r.mirrors.is_empty() && replayable)
    {
        let body = match head.framing {
            Framing::Length(n) => &down.buffered()[..n as usize],
            _ => &[],
        };
        let connect_timeout = ctx.connect.attempt_timeout;
        mirror::send(&route.mirrors, &head, body, settings, connect_timeout);
    }

    // A port declared HTTP2/GRPC, or `h2UpgradePolicy: UPGRADE`: upstream in h2.
    if !upgrade && h2::upgrade::wanted(&forward) {
        let request = h2::upgrade::Request {
            head: &head,
            replayable,
            client_version,
            keep_alive: client_keep_alive && !draining,
            wants_trailers,
        };
        let (keep, endpoint) =
            h2::upgrade::exchange(down, request, &forward, ctx, info.dst, &mut record).await;
        finish(handles, endpoint, &record);
        return keep;
    }

    let mut attempts = Attempts::new(forward.route, replayable, upgrade);
    let route_deadline = forward.route_deadline();
    let pool_idle = forward.pool_idle(settings);
    let mut head_bytes = Vec::with_capacity(512);
    h1::encode_request_head(&head, &mut head_bytes);

    // Circuit breaking: over the cluster's limits, 503 UO at once.
    let _admitted = match forward.cluster.map(|c| breaker::admit_request(c)) {
        Some(None) => {
            let local = Local::failure(ResponseFlag::UpstreamOverflow);
            let keep = answer_locally(down, &head, &local, settings, draining).await;
            record.status = local.status;
            record.flag = local.flag;
            finish(handles, None, &record);
            return keep;
        }
        Some(admitted) => admitted,
        None => None,
    };
    // Retries in flight count against `maxRetries`, over every worker.
    let mut retries = Vec::new();
    let retry_budget = |held: &mut Vec<_>| match forward.cluster {
        None => true,
        Some(cluster) => match breaker::admit_retry(cluster) {
            Some(guard) => {
                held.push(guard);
                true
            }
            None => false,
        },
    };
    let outcome = loop {
        let Some((addr, endpoint)) = forward.next_endpoint(info.dst) else {
            break Err((Failure::NoHealthyUpstream, None));
        };
        let _at_endpoint = forward
            .cluster
            .zip(endpoint)
            .and_then(|(c, i)| breaker::at_endpoint(c, i));
        let try_deadline = attempts.deadline(route_deadline);
        let upstream = forward.upstream(addr, ctx);
        let body_len = match head.framing {
            Framing::Length(n) if replayable => n as usize,
            _ => 0,
        };
        let result = upstream::send(
            &upstream,
            down,
            &head_bytes,
            body_len,
            if replayable {
                Framing::Empty
            } else {
                head.framing
            },
            &head.method,
            try_deadline,
            settings,
        )
        .await;
        match result {
            Ok((up, response)) => {
                forward.observe(endpoint, outlier::Outcome::Status(response.status));
                let grpc = retry::grpc_status_of(&response.headers);
                if attempts.retry_on_status(response.status, grpc) && retry_budget(&mut retries) {
                    upstream::finish_discarded(up, &response, &head.method, settings, pool_idle)
                        .await;
                    attempts.backoff().await;
                    continue;
                }
                break Ok((up, response, endpoint));
            }
            Err(failure) => {
                if failure.is_retriable_kind() {
                    forward.observe(endpoint, outlier::Outcome::LocalFailure);
                }
                if attempts.retry_on_failure(&failure) && retry_budget(&mut retries) {
                    attempts.backoff().await;
                    continue;
                }
                break Err((failure, endpoint));
            }
        }
    };
    if replayable {
        if let Framing::Length(n) = head.framing {
            down.consume(n as usize);
            record.request_bytes = n;
        }
    }
    let (mut up, response, endpoint) = match outcome {
        Ok(ok) => ok,
        Err((failure, endpoint)) => {
            let flag = if attempts.retried() && failure.is_retriable_kind() {
                failure.flag().retries_exhausted()
            } else {
                failure.flag()
            };
            let mut local = Local::failure(failure.flag());
            local.flag = flag;
            let keep = match failure {
                Failure::Downstream => {
                    local.flag = ResponseFlag::DownstreamConnectionTermination;
                    local.status = 0;
                    false
                }
                Failure::BadRequestBody => {
                    let mut out = Vec::new();
                    local.encode(Version::Http11, false, true, &mut out);
                    let _ = down.write_all(&out).await;
                    down.linger_close().await;
                    false
                }
                _ => answer_locally(down, &head, &local, settings, draining).await && replayable,
            };
            record.status = local.status;
            record.flag = local.flag;
            finish(handles, endpoint, &record);
            return keep;
        }
    };
    if attempts.retried()
        && attempts.was_retriable_status(response.status, retry::grpc_status_of(&response.headers))
    {
        record.flag = ResponseFlag::UpstreamRetryLimitExceeded;
    }
    record.status = response.status;
    record.grpc_status = retry::grpc_status_of(&response.headers);

    // A protocol switch (WebSocket) or CONNECT: the head goes back, then bytes both ways.
    let tunnel = response.framing == Framing::Tunnel;
    let mut out = Vec::with_capacity(512);
    let mut response = response;
    let mut close = !client_keep_alive || draining;
    let chunking = if client_version == Version::Http10 {
        Chunking::Strip
    } else {
        Chunking::Keep
    };
    if !tunnel {
        h1::strip_hop_by_hop(&mut response.headers);
        forward.response_header_ops(&mut response.headers);
        response.headers.extend(cors_headers);
        match response.framing {
            Framing::Chunked if chunking == Chunking::Keep => {
                response
                    .headers
                    .push(header("transfer-encoding", b"chunked"));
            }
            Framing::Chunked | Framing::UntilClose => close = true,
            _ => {}
        }
        if close {
            response.headers.push(header("connection", b"close"));
        } else if client_version == Version::Http10 {
            response.headers.push(header("connection", b"keep-alive"));
        }
    }
    response.version = Version::Http11;
    h1::encode_response_head(&response, &mut out);
    if down.write_all(&out).await.is_err() {
        record.flag = ResponseFlag::DownstreamConnectionTermination;
        finish(handles, endpoint, &record);
        up.conn.reset_on_close();
        return false;
    }
    if tunnel {
        finish(handles, endpoint, &record);
        upstream::tunnel(down, up.conn).await;
        return false;
    }
    let framing = if head_only {
        Framing::Empty
    } else {
        response.framing
    };
    let body = body::forward(
        &mut up.conn,
        down,
        framing,
        chunking,
        &settings.limits,
        settings.stall,
    );
    let forwarded = match route_deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), body)
            .await
            .unwrap_or(Err(BodyError::Stalled(Duration::ZERO))),
        None => body.await,
    };
    match forwarded {
        Ok(n) => {
            record.response_bytes = n;
            if response.keep_alive && framing != Framing::UntilClose {
                up.give_back(pool_idle);
            }
        }
        Err(e) => {
            tracing::debug!("response body: {e}");
            record.flag = match e {
                BodyError::Write(_) => ResponseFlag::DownstreamConnectionTermination,
                BodyError::Stalled(_) if route_deadline.is_some_and(|d| Instant::now() >= d) => {
                    ResponseFlag::UpstreamRequestTimeout
                }
                _ => ResponseFlag::UpstreamConnectionTermination,
            };
            down.reset_on_close();
            close = true;
        }
    }
    finish(handles, endpoint, &record);
    !close
}

/// Sends a locally made response. The request's body is read and dropped first (up to a
/// bound) so that the connection can carry the next request; otherwise it closes.
async fn answer_locally(
    down: &mut Conn,
    head: &RequestHead,
    local: &Local,
    settings: &Settings,
    draining: bool,
) -> bool {
    let drained = body::discard(
        down,
        head.framing,
        &settings.limits,
        settings.discard_max,
        settings.stall,
    )
    .await
    .unwrap_or(false);
    let keep = drained && head.keep_alive && !draining;
    let mut out = Vec::with_capacity(256 + local.body.len());
    local.encode(Version::Http11, &*head.method == "HEAD", !keep, &mut out);
    down.write_all(&out).await.is_ok() && keep
}
