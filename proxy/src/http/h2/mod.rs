//! HTTP/2 and gRPC through the sidecar, with the `h2` crate on tokio's readiness I/O (the L7
//! I/O decision, docs/ARCHITECTURE.md). A client connection whose first bytes are the h2
//! preface is served by [`server`]: each stream is its own task on the worker's thread, routed
//! by the same [`super::decide::decide`] as HTTP/1, and forwarded to an h2 upstream over a
//! per-worker multiplexed connection ([`client`]) or translated to HTTP/1.1 ([`translate`]).
//! Bodies stream both ways under h2 flow control ([`pump`]): a window is released only once its
//! bytes have been passed on, so a slow reader slows its writer and nothing piles up here.
//!
//! Which protocol goes upstream ([`UpstreamProtocol::choose`]): h2 when the service port is
//! declared HTTP2/GRPC, when the port is sniffed (`L7::Detect`, inbound, passthrough) — Istio's
//! "use the client's protocol" — or when the DestinationRule says `useClientProtocol`;
//! otherwise HTTP/1.1.

pub mod client;
pub mod forward;
pub mod pump;
pub mod server;
pub mod translate;
pub mod upgrade;

use std::io;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use ::http::{HeaderMap, HeaderName, HeaderValue};
use isthmus_config::{Cluster, L7};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::decide::Forward;
use super::h1::Header;
use super::local::{header, Local};
use crate::route::Target;

pub use server::serve;

/// Streams one client connection may have open at once (our SETTINGS_MAX_CONCURRENT_STREAMS).
/// Envoy advertises 2^31-1; a bound keeps one connection from holding a worker's memory
/// hostage. 100 is the RFC 9113 recommended minimum and what most servers (nginx 128, Go 250)
/// are near; a client that wants more opens another connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Per-stream receive window (h2's default is 64 KiB - 1; larger windows let a single stream
/// fill a fast link without round trips, at the price of this much buffering per stream).
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Connection receive window: a few streams' worth.
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// A TCP stream whose first bytes (the preface detection read) are replayed before the socket.
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    stream: TcpStream,
}

impl Prefixed {
    pub fn new(stream: TcpStream, prefix: Vec<u8>) -> Self {
        let _ = stream.set_nodelay(true);
        Prefixed {
            prefix,
            pos: 0,
            stream,
        }
    }

    /// Makes the coming close a reset.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.prefix.len() {
            let n = (me.prefix.len() - me.pos).min(buf.remaining());
            buf.put_slice(&me.prefix[me.pos..me.pos + n]);
            me.pos += n;
            if me.pos == me.prefix.len() {
                me.prefix = Vec::new();
                me.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Which protocol a request goes upstream in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

impl UpstreamProtocol {
    /// For a request from an h2 client (`client_h2`) or an HTTP/1 one, routed to `forward`.
    pub(crate) fn for_forward(forward: &Forward<'_>, client_h2: bool) -> Self {
        let port_l7 = match &forward.target {
            Target::Service { service, cluster } => service
                .ports
                .iter()
                .find(|p| p.number == cluster.port)
                .map(|p| p.l7()),
            _ => None,
        };
        Self::choose(forward.cluster.map(|c| &**c), port_l7, client_h2)
    }

    /// For a request from an h2 client (`client_h2`) or an HTTP/1 one, to `cluster` (`None`:
    /// inbound or passthrough, where the app's protocol is not declared: the client's is used).
    pub fn choose(cluster: Option<&Cluster>, port_l7: Option<L7>, client_h2: bool) -> Self {
        let client = if client_h2 {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        };
        let Some(cluster) = cluster else {
            return client;
        };
        let pool = &cluster.policy.connection_pool;
        if pool.use_client_protocol {
            return client;
        }
        match port_l7 {
            Some(L7::Http2) => UpstreamProtocol::Http2,
            Some(L7::Http1) if pool.h2_upgrade_policy == isthmus_config::H2Upgrade::Upgrade => {
                UpstreamProtocol::Http2
            }
            Some(L7::Http1) => UpstreamProtocol::Http1,
            _ => client,
        }
    }
}

/// Waits until `deadline`, or forever without one.
pub(crate) async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs `f` until `deadline`: `None` if the deadline came first.
pub(crate) async fn within<T>(
    deadline: Option<std::time::Instant>,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), f).await.ok(),
        None => Some(f.await),
    }
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2): connection-specific ones. `te` is allowed only as
/// `trailers`, and is handled by the caller.
const CONNECTION_SPECIFIC: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// An h2 header block as the shared HTTP/1 header list (routing, filters and header ops work
/// on that). Names arrive lower-cased from h2.
pub fn to_headers(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(name, value)| Header {
            name: name.as_str().into(),
            value: value.as_bytes().into(),
        })
        .collect()
}

/// The header list as an h2 header block: connection-specific headers dropped, `te` kept only
/// as `trailers`, names lower-cased, invalid names or values (which HTTP/1 may carry) dropped.
pub fn to_header_map(headers: &[Header]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        if CONNECTION_SPECIFIC.iter().any(|c| h.is(c)) {
            continue;
        }
        if h.is("te") && !h.value.eq_ignore_ascii_case(b"trailers") {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    map
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto|;...]`).
pub fn is_grpc(headers: &[Header]) -> bool {
    headers.iter().any(|h| {
        h.is("content-type")
            && h.value.len() >= 16
            && h.value[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

/// Envoy's HTTP → gRPC status mapping for responses the proxy makes itself
/// (`Grpc::Utility::httpToGrpcStatus`).
pub fn grpc_status_for_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A local answer to a gRPC request, as Envoy sends it: a trailers-only response, HTTP 200,
/// the status mapped into `grpc-status` and the text into `grpc-message`. An answer that is
/// already gRPC (a fault's `grpc-status`) is kept.
pub fn grpc_local(local: &Local) -> Local {
    if local.headers.iter().any(|h| h.is("grpc-status")) {
        return local.clone();
    }
    let mut out = Local::new(200, Vec::new(), local.flag);
    out.headers
        .push(header("content-type", b"application/grpc"));
    out.headers.push(header(
        "grpc-status",
        grpc_status_for_http(local.status).to_string().as_bytes(),
    ));
    if !local.body.is_empty() {
        // grpc-message is percent-encoded; Envoy's texts are plain ASCII without '%'.
        let text: Vec<u8> = local
            .body
            .iter()
            .copied()
            .filter(|b| (0x20..0x7f).contains(b) && *b != b'%')
            .collect();
        out.headers.push(header("grpc-message", &text));
    }
    for h in &local.headers {
        if !h.is("content-type") && !h.is("grpc-status") {
            out.headers.push(h.clone());
        }
    }
    out
}

/// Counts gRPC length-prefixed messages (1 byte flag, 4 bytes big-endian length, payload) in
/// a byte stream that arrives in arbitrary pieces.
#[derive(Debug, Default, Clone)]
pub struct MessageCounter {
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix_seen: u8,
    length: u32,
    /// Payload bytes of the current message still to come.
    left: u64,
    pub messages: u64,
}

impl MessageCounter {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let take = (self.left).min(data.len() as u64) as usize;
                self.left -= take as u64;
                data = &data[take..];
                continue;
            }
            // In the prefix: byte 0 is the flag, bytes 1..5 the length.
            if self.prefix_seen > 0 {
                self.length = (self.length << 8) | u32::from(data[0]);
            }
            self.prefix_seen += 1;
            data = &data[1..];
            if self.prefix_seen == 5 {
                self.messages += 1;
                self.left = u64::from(self.length);
                self.prefix_seen = 0;
                self.length = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_grpc_messages_split_anywhere() {
        // Three messages: 3 bytes, 0 bytes, 300 bytes.
        let mut stream = vec![
            0, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0, 1, 0, 0, 1, 44,
        ];
        stream.extend(std::iter::repeat_n(7u8, 300));
        for split in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut counter = MessageCounter::default();
            for piece in stream.chunks(split) {
                counter.feed(piece);
            }
            assert_eq!(counter.messages, 3, "pieces of {split}");
            assert_eq!((counter.left, counter.prefix_seen), (0, 0));
        }
    }

    #[test]
    fn local_answers_to_grpc_are_trailers_only() {
        let nr = grpc_local(&Local::failure(crate::telemetry::ResponseFlag::NoRoute));
        assert_eq!(nr.status, 200);
        assert!(nr.body.is_empty());
        assert_eq!(super::super::retry::grpc_status_of(&nr.headers), Some(12));
        let ut = grpc_local(&Local::failure(
            crate::telemetry::ResponseFlag::UpstreamRequestTimeout,
        ));
        assert_eq!(super::super::retry::grpc_status_of(&ut.headers), Some(14));
        assert!(ut
            .headers
            .iter()
            .any(|h| h.is("grpc-message") && &*h.value == b"upstream request timeout"));
    }

    #[test]
    fn header_maps_drop_connection_specific_headers() {
        let headers = vec![
            header("Connection", b"keep-alive"),
            header("TE", b"trailers"),
            header("te", b"gzip"),
            header("Host", b"web"),
            header("X-Kept", b"1"),
            header("bad name", b"x"),
        ];
        let map = to_header_map(&headers);
        let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(map["te"], "trailers");
    }

    #[test]
    fn upstream_protocol_follows_port_policy_and_client() {
        use UpstreamProtocol::*;
        assert_eq!(UpstreamProtocol::choose(None, None, true), Http2);
        assert_eq!(UpstreamProtocol::choose(None, None, false), Http1);
    }
}
