//! HTTP/2 requests to an HTTP/1.1 upstream: the h2 request becomes an HTTP/1.1 head (`host`
//! from `:authority`; a body with `content-length` when the client declared one, chunked
//! otherwise, its trailers as chunked trailers) on a pooled upstream connection (the HTTP/1
//! path's pool), and the response comes back as h2: hop-by-hop headers dropped, the body
//! as DATA frames under flow control, chunked trailers as an h2 trailer block.

use std::time::{Duration, Instant};

use ::h2::SendStream;
use ::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use super::pump::{self, PumpError, RequestBody, SideError, Sink};
use super::{within, MessageCounter};
use crate::http::h1::{self, Chunked, Framing, Header, Limits, RequestHead, ResponseHead, Version};
use crate::http::io::Conn;
use crate::http::local::header;
use crate::http::upstream::{self, Failure, Up, Upstream};
use crate::http::Settings;

/// An h2 request's head as HTTP/1.1: `host` from `:authority`, first; no body framing.
pub fn head(method: &str, target: &str, authority: &str, headers: &[Header]) -> RequestHead {
    let mut all = Vec::with_capacity(headers.len() + 2);
    all.push(header("host", authority.as_bytes()));
    all.extend(headers.iter().filter(|h| !h.is("host")).cloned());
    RequestHead {
        method: method.into(),
        target: target.into(),
        version: Version::Http11,
        headers: all,
        framing: Framing::Empty,
        keep_alive: true,
        expect_continue: false,
        upgrade: false,
    }
}

/// The HTTP/1.1 request head for an h2 request, encoded, and whether its body goes chunked
/// (it does when the client declared no `content-length`).
pub fn request_head(
    method: &str,
    target: &str,
    authority: &str,
    headers: &[Header],
    body: &RequestBody,
) -> (Vec<u8>, bool) {
    let mut head = head(method, target, authority, headers);
    let has_length = headers.iter().any(|h| h.is("content-length"));
    let chunked = !body.is_empty() && !has_length;
    if chunked {
        head.headers.push(header("transfer-encoding", b"chunked"));
    } else if body.is_empty() && !has_length && !matches!(method, "GET" | "HEAD" | "DELETE") {
        head.headers.push(header("content-length", b"0"));
    }
    let mut out = Vec::with_capacity(512);
    h1::encode_request_head(&head, &mut out);
    (out, chunked)
}

/// One attempt: a pooled or new connection, the head, the body as it arrives, the response
/// head — all within `deadline`.
pub async fn send(
    up: &Upstream,
    head: &[u8],
    chunked: bool,
    body: &mut RequestBody,
    method: &str,
    deadline: Option<Instant>,
    settings: &Settings,
) -> Result<(Up, ResponseHead), Failure> {
    let attempt = async {
        let (mut conn, reused, used) = upstream::checkout(up).await?;
        conn.write_all(head)
            .await
            .map_err(|e| upstream::write_failure(&e, reused))?;
        if !body.is_empty() {
            let sink = Sink::H1 {
                conn: &mut conn,
                chunked,
            };
            body.send(sink, settings.stall).await.map_err(|e| match e {
                PumpError::Sink(SideError::Io(e)) => upstream::write_failure(&e, reused),
                PumpError::Sink(_) => Failure::Closed { reused },
                _ => Failure::Downstream,
            })?;
        }
        let response = upstream::read_response(&mut conn, method, reused, settings).await?;
        Ok((Up::new(conn, up.addr, used, up.max_requests), response))
    };
    within(deadline, attempt)
        .await
        .unwrap_or(Err(Failure::Timeout { per_try: false }))
}

/// An HTTP/1 response head's headers as an h2 block (hop-by-hop ones dropped).
pub fn response_headers(head: &mut ResponseHead) -> Vec<Header> {
    h1::strip_hop_by_hop(&mut head.headers);
    std::mem::take(&mut head.headers)
}

/// The h2 side of a translated response body.
struct Out<'a> {
    to: &'a mut SendStream<Bytes>,
    total: u64,
    counter: Option<&'a mut MessageCounter>,
}

impl Out<'_> {
    async fn data(&mut self, data: &[u8], end: bool) -> Result<(), PumpError> {
        self.total += data.len() as u64;
        if let Some(c) = self.counter.as_deref_mut() {
            c.feed(data);
        }
        pump::send_data(self.to, Bytes::copy_from_slice(data), end)
            .await
            .map_err(|e| PumpError::Sink(SideError::H2(e)))
    }

    fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), PumpError> {
        pump::finish(self.to, trailers).map_err(|e| PumpError::Sink(SideError::H2(e)))
    }
}

/// Passes an HTTP/1 response body to the h2 stream: DATA as it arrives, chunked trailers as
/// h2 trailers. Returns the data bytes.
pub async fn body_to_h2(
    conn: &mut Conn,
    framing: Framing,
    to: &mut SendStream<Bytes>,
    settings: &Settings,
    counter: Option<&mut MessageCounter>,
) -> Result<u64, PumpError> {
    let stall = settings.stall;
    let mut out = Out {
        to,
        total: 0,
        counter,
    };
    match framing {
        Framing::Empty | Framing::Tunnel => out.data(&[], true).await?,
        Framing::Length(n) => {
            let mut left = n;
            while left > 0 {
                if conn.buffered().is_empty() {
                    more(conn, stall).await?;
                }
                let take = (conn.buffered().len() as u64).min(left) as usize;
                left -= take as u64;
                out.data(&conn.buffered()[..take], left == 0).await?;
                conn.consume(take);
            }
        }
        Framing::UntilClose => loop {
            let n = conn.buffered().len();
            if n > 0 {
                out.data(conn.buffered(), false).await?;
                conn.consume(n);
            }
            if !more(conn, stall).await.map(|_| true).or_else(closed_ok)? {
                out.data(&[], true).await?;
                break;
            }
        },
        Framing::Chunked => {
            let mut scanner = Chunked::new(&settings.limits);
            let mut tail = Vec::new();
            loop {
                if conn.buffered().is_empty() {
                    more(conn, stall).await?;
                }
                let scanned = scanner
                    .scan(conn.buffered())
                    .map_err(|e| PumpError::Source(SideError::Framing(e.to_string())))?;
                let input = &conn.buffered()[..scanned.consumed];
                for range in &scanned.data {
                    out.data(&input[range.clone()], false).await?;
                }
                keep_tail(&mut tail, input, &scanned.data, &settings.limits);
                conn.consume(scanned.consumed);
                if scanned.done {
                    out.finish(parse_trailers(&tail))?;
                    break;
                }
            }
        }
    }
    Ok(out.total)
}

/// `Ok(false)` for a clean close (the end of an until-close body), other errors as they are.
fn closed_ok(e: PumpError) -> Result<bool, PumpError> {
    match e {
        PumpError::Source(SideError::Framing(ref why)) if why == CLOSED => Ok(false),
        e => Err(e),
    }
}

const CLOSED: &str = "upstream closed in the middle of the body";

/// Reads more of the upstream response.
async fn more(conn: &mut Conn, stall: Duration) -> Result<(), PumpError> {
    match conn.fill_until(Instant::now() + stall).await {
        None => Err(PumpError::Stalled(stall)),
        Some(Ok(0)) => Err(PumpError::Source(SideError::Framing(CLOSED.into()))),
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(PumpError::Source(SideError::Io(e))),
    }
}

/// Keeps the bytes after the last chunk data seen: once the body is done they are the end of
/// the last chunk, the last-chunk line and the trailer section.
fn keep_tail(tail: &mut Vec<u8>, input: &[u8], data: &[std::ops::Range<usize>], limits: &Limits) {
    let from = match data.last() {
        Some(last) => {
            tail.clear();
            last.end
        }
        None => 0,
    };
    if tail.len() + (input.len() - from) <= 2 * limits.max_chunk_meta + 16 {
        tail.extend_from_slice(&input[from..]);
    }
}

/// The trailer fields of a chunked body's end (`[CRLF] 0[;ext] CRLF *(field CRLF) CRLF`).
pub fn parse_trailers(tail: &[u8]) -> Option<HeaderMap> {
    let tail = tail.strip_prefix(b"\r\n").unwrap_or(tail);
    let mut lines = tail.split(|b| *b == b'\n').skip(1);
    let mut map = HeaderMap::new();
    for line in lines.by_ref() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(&line[..colon]);
        let value = HeaderValue::from_bytes(h1::trim(&line[colon + 1..]));
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        }
    }
    (!map.is_empty()).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_trailers_become_an_h2_block() {
        let limits = Limits::default();
        let body = b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\ngrpc-status: 0\r\n\r\n";
        for split in [1, 3, 7, body.len()] {
            let mut scanner = Chunked::new(&limits);
            let mut tail = Vec::new();
            let mut data = Vec::new();
            let mut buf: Vec<u8> = Vec::new();
            for piece in body.chunks(split) {
                buf.extend_from_slice(piece);
                let scanned = scanner.scan(&buf).unwrap();
                for r in &scanned.data {
                    data.extend_from_slice(&buf[r.clone()]);
                }
                keep_tail(&mut tail, &buf[..scanned.consumed], &scanned.data, &limits);
                buf.drain(..scanned.consumed);
            }
            assert_eq!(data, b"hello");
            let t = parse_trailers(&tail).expect("trailers");
            assert_eq!(t["x-checksum"], "abc", "split {split}");
            assert_eq!(t["grpc-status"], "0");
        }
        assert!(parse_trailers(b"0\r\n\r\n").is_none());
    }
}
