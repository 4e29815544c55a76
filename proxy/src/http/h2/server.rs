//! HTTP/2 from the client's side of the sidecar: the connection's frames are driven by its
//! accept loop, and each stream is a task of its own on the worker's thread (bounded by
//! [`super::MAX_CONCURRENT_STREAMS`]), routed on the snapshot current when it arrives — the
//! same decision, filters and local answers as HTTP/1 ([`crate::http::decide::decide`]).
//! Drain: an inbound connection gets GOAWAY when draining starts and its streams finish; any
//! connection is closed when the drain's closing phase comes. An idle connection (no stream
//! for the idle timeout) is sent GOAWAY too.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use ::h2::server::SendResponse;
use ::h2::{Reason, RecvStream};
use ::http::{Request, Response, StatusCode};
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::forward::{self, Exchange};
use super::translate;
use super::{grpc_local, is_grpc, to_header_map, to_headers, Prefixed, MAX_CONCURRENT_STREAMS};
use super::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::drain::{self, Phase};
use crate::http::access_log::RequestLine;
use crate::http::cors::{self, Cors};
use crate::http::decide::{decide, Decision};
use crate::http::local::{header, Local};
use crate::http::record::{HandleCache, Record};
use crate::http::retry;
use crate::http::router::{RequestView, Source};
use crate::http::server::ConnInfo;
use crate::http::{filters, mirror};
use crate::route::Target;
use crate::serve::{Context, Direction};
use crate::telemetry::ResponseFlag;

/// Serves an h2 connection (its preface already read into `prefix`) until the client closes
/// it, it fails, or the drain ends it.
pub async fn serve(
    stream: TcpStream,
    prefix: Vec<u8>,
    info: ConnInfo,
    ctx: &Arc<Context>,
    drain: drain::Watch,
) {
    let settings = &ctx.http;
    let io = Prefixed::new(stream, prefix);
    let handshake = ::h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(settings.limits.max_head as u32)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(settings.header_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return tracing::debug!(peer = %info.peer, "h2 handshake failed: {e}"),
        Err(_) => return tracing::debug!(peer = %info.peer, "h2 handshake timed out"),
    };
    let cache = Rc::new(RefCell::new(HandleCache::default()));
    let mut streams = JoinSet::new();
    let (mut draining, mut closing) = (drain.clone(), drain);
    let mut going_away = false;
    let mut idle_since = Some(Instant::now());
    loop {
        let idle_deadline = idle_since.map(|t| t + settings.idle_timeout);
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    idle_since = None;
                    let (ctx, cache) = (ctx.clone(), cache.clone());
                    streams.spawn_local(async move {
                        serve_stream(&ctx, info, &cache, request, respond).await;
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %info.peer, "h2 connection error: {e}");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_since = Some(Instant::now());
                }
            }
            _ = draining.reached(Phase::Draining),
                if info.direction == Direction::Inbound && !going_away => {
                going_away = true;
                conn.graceful_shutdown();
            }
            _ = closing.reached(Phase::Closing) => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                // Let the GOAWAY out, briefly.
                let flushed = std::future::poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(std::time::Duration::from_millis(100), flushed).await;
                break;
            }
            _ = super::until(idle_deadline), if idle_deadline.is_some() && !going_away => {
                going_away = true;
                conn.graceful_shutdown();
            }
        }
    }
    // Streams still running (a connection error, or closing) end with their connection.
    streams.shutdown().await;
}

/// One stream: routed, answered locally or forwarded, recorded once.
async fn serve_stream(
    ctx: &Context,
    info: ConnInfo,
    cache: &RefCell<HandleCache>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let settings = &ctx.http;
    let (parts, recv) = request.into_parts();
    let mut headers = to_headers(&parts.headers);
    let mut authority = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => headers
            .iter()
            .find(|h| h.is("host"))
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
            .unwrap_or_default(),
    };
    let scheme = parts.uri.scheme_str().unwrap_or("http").to_string();
    let mut target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let method = parts.method.as_str();
    let grpc = is_grpc(&headers);
    let mut record = Record::new(started);
    let mut answer = |local: &Local, target: &Target, cluster, record: &mut Record| {
        let local = if grpc {
            grpc_local(local)
        } else {
            local.clone()
        };
        record.status = local.status;
        record.flag = local.flag;
        record.grpc_status = retry::grpc_status_of(&local.headers);
        record.response_bytes = send_local(&mut respond, &local, method == "HEAD");
        cache
            .borrow_mut()
            .record(ctx, target, cluster, None, record, info);
    };
    let blackhole = Target::Unregistered("BlackHoleCluster");
    if parts.method == ::http::Method::CONNECT {
        let local = Local::new(
            501,
            "CONNECT over HTTP/2 is not supported",
            ResponseFlag::None,
        );
        return answer(&local, &blackhole, None, &mut record);
    }
    let snapshot = ctx.store.load();
    let (path, query) = RequestView::split_target(&target);
    let view = RequestView {
        method,
        path,
        query,
        authority: &authority,
        scheme: &scheme,
        headers: &headers,
        port: info.dst.port(),
    };
    let source = Source {
        labels: &settings.source_labels,
        namespace: &ctx.identity.namespace,
    };
    let decision = decide(&snapshot, info, &target, &view, &source);
    if settings.access_log.is_some() {
        let route = match &decision {
            Decision::Forward(f) => f.route.and_then(|r| r.name.clone()),
            Decision::Local(_) => None,
        };
        let line = RequestLine::new(&view, &target, "HTTP/2", route, started);
        record.line = Some(Box::new(line));
    }
    let forward = match decision {
        Decision::Local(local) => return answer(&local, &blackhole, None, &mut record),
        Decision::Forward(f) => f,
    };

    // CORS: an allowed preflight is answered here; an allowed request's response gets the
    // `Access-Control-*` headers.
    let cors_headers = match forward.route.and_then(|r| r.cors.as_ref()) {
        Some(policy) => match cors::check(policy, &view) {
            Cors::Preflight(local) => {
                return answer(&local, &forward.target, forward.cluster, &mut record)
            }
            Cors::Allowed(headers) => headers,
            Cors::None => Vec::new(),
        },
        None => Vec::new(),
    };

    // Fault injection: abort answers at once, delay waits first.
    if let Some(local) = forward.inject_fault(&mut record).await {
        return answer(&local, &forward.target, forward.cluster, &mut record);
    }

    // The request as it goes upstream.
    if let Some(rule) = forward.route.and_then(|r| r.rewrite.as_ref()) {
        let mut rewritten = None;
        filters::rewrite(rule, forward.matched, &mut target, &mut rewritten);
        if let Some(a) = rewritten {
            authority = a;
        }
    }
    headers.retain(|h| !h.is("host"));
    forward.request_header_ops(&mut headers);
    if !headers.iter().any(|h| h.is("x-forwarded-proto")) {
        headers.push(header("x-forwarded-proto", scheme.as_bytes()));
    }
    let uri = ::http::Uri::builder()
        .scheme(scheme.as_str())
        .authority(authority.as_str())
        .path_and_query(target.as_str())
        .build();
    let Ok(uri) = uri else {
        let local = Local::new(400, "invalid :authority or :path", ResponseFlag::None);
        return answer(&local, &forward.target, forward.cluster, &mut record);
    };
    // Mirrors get a copy of a request without a body (one with a body is not in hand yet);
    // they never slow it down.
    if let Some(route) = forward.route.filter(|r| !r.mirrors.is_empty()) {
        if recv.is_end_stream() {
            let head = translate::head(method, &target, &authority, &headers);
            let connect_timeout = ctx.connect.attempt_timeout;
            mirror::send(&route.mirrors, &head, &[], settings, connect_timeout);
        }
    }
    let exchange = Exchange {
        ctx,
        info,
        method: parts.method.clone(),
        uri,
        authority,
        target,
        headers,
        grpc,
        settings,
        cors_headers,
    };
    let endpoint = forward::run(exchange, &forward, recv, &mut respond, &mut record).await;
    let (target, cluster) = (&forward.target, forward.cluster);
    cache
        .borrow_mut()
        .record(ctx, target, cluster, endpoint, &record, info);
}

/// Sends a locally made response; returns the body bytes sent. A gRPC answer has no body and
/// goes as one HEADERS frame (trailers-only).
pub fn send_local(respond: &mut SendResponse<Bytes>, local: &Local, head_only: bool) -> u64 {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(local.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = to_header_map(&local.headers);
    let body = !local.body.is_empty() && !head_only;
    if !local.body.is_empty() {
        response.headers_mut().insert(
            ::http::header::CONTENT_LENGTH,
            ::http::HeaderValue::from(local.body.len()),
        );
    }
    let Ok(mut send) = respond.send_response(response, !body) else {
        return 0;
    };
    if body {
        let _ = send.send_data(Bytes::copy_from_slice(&local.body), true);
        return local.body.len() as u64;
    }
    0
}
