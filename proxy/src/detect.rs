//! Protocol detection: the stage between the original destination and policy. A port whose
//! protocol is declared, or that needs no L7 handling, is not read at all (server-first
//! protocols must never wait on us). Otherwise the first bytes are read once, with a deadline,
//! into the connection's prefix buffer; they are classified there and replayed upstream by
//! the relay (or parsed in place by the HTTP stage) — never read twice, never copied.
//!
//! Until HTTP routing lands (issue 7) no port needs detection, so the data path calls
//! [`Classified::skipped`]; [`sniff`] and [`classify`] are the mechanism it will switch on.

use std::io;
use std::time::{Duration, Instant};

use crate::runtime::{Elapsed, Runtime, Stream};

/// What a connection speaks, as far as the proxy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Bytes: relayed as they are.
    Opaque,
    Http1,
    Http2,
}

/// How the protocol was settled, counted per port once detection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not read: declared, or no L7 config needs it.
    Skipped,
    /// Read and recognised (or recognised as not HTTP).
    Sniffed,
    /// The client sent too little before the deadline: relayed as opaque TCP.
    TimedOut,
    /// The client closed before sending enough to tell.
    Closed,
}

/// A classified connection: the protocol and the bytes read to decide it, to be replayed.
#[derive(Debug)]
pub struct Classified {
    pub protocol: Protocol,
    pub prefix: Vec<u8>,
    pub outcome: Outcome,
}

impl Classified {
    pub fn skipped(protocol: Protocol) -> Self {
        Classified {
            protocol,
            prefix: Vec::new(),
            outcome: Outcome::Skipped,
        }
    }
}

/// A verdict on the bytes seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies a connection's first bytes: the HTTP/2 preface, an HTTP/1.x request line, or
/// neither. Pure; `NeedMore` while a prefix could still become either.
pub fn classify(bytes: &[u8]) -> Verdict {
    if bytes.is_empty() {
        return Verdict::NeedMore;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return if bytes.len() >= H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        // Too many headers for our zero-slot array means the request line parsed.
        Ok(_) | Err(httparse::Error::TooManyHeaders) if request.version.is_some() => {
            Verdict::Is(Protocol::Http1)
        }
        Ok(httparse::Status::Partial) => Verdict::NeedMore,
        _ => Verdict::Is(Protocol::Opaque),
    }
}

/// Reads the first bytes of `stream` (up to `limit`, until `deadline`) and classifies them.
/// Cancel-safe reads only: a deadline never loses bytes.
pub async fn sniff<R: Runtime>(
    stream: &R::Stream,
    deadline: Instant,
    limit: usize,
) -> io::Result<Classified> {
    let mut prefix = Vec::with_capacity(limit.min(1024));
    loop {
        if prefix.len() == prefix.capacity() {
            if prefix.len() >= limit {
                return Ok(done(Protocol::Opaque, prefix, Outcome::Sniffed));
            }
            prefix.reserve((limit - prefix.len()).min(prefix.len().max(1024)));
        }
        match R::deadline(deadline, stream.read_ready(&mut prefix)).await {
            Err(Elapsed) => return Ok(done(Protocol::Opaque, prefix, Outcome::TimedOut)),
            Ok(Ok(0)) => return Ok(done(Protocol::Opaque, prefix, Outcome::Closed)),
            Ok(Ok(_)) => match classify(&prefix) {
                Verdict::Is(protocol) => return Ok(done(protocol, prefix, Outcome::Sniffed)),
                Verdict::NeedMore => continue,
            },
            Ok(Err(e)) => return Err(e),
        }
    }
}

fn done(protocol: Protocol, prefix: Vec<u8>, outcome: Outcome) -> Classified {
    Classified {
        protocol,
        prefix,
        outcome,
    }
}

/// The default time a client has to send enough to classify its connection (Istio's
/// `protocolDetectionTimeout` is 100 ms by default; we wait a little longer for slow links).
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        use Protocol::*;
        use Verdict::*;
        let cases: &[(&[u8], Verdict)] = &[
            (b"", NeedMore),
            (b"PRI * HTTP/2", NeedMore),
            (H2_PREFACE, Is(Http2)),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Is(Http1)),
            (b"GET /x HTTP/1.0\r\n", Is(Http1)),
            (b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n", Is(Http1)),
            (b"GET /long/path/that/continues", NeedMore),
            (b"GE", NeedMore),
            (b"\x16\x03\x01\x02\x00\x01", Is(Opaque)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Is(Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Is(Opaque)),
            (b"GET / HTTP/9.9\r\n", Is(Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
