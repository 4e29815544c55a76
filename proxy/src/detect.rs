//! Protocol detection: the stage between the original destination and policy. A port whose
//! protocol is declared, or that needs no L7 handling, is not read at all (server-first
//! protocols must never wait on us). Otherwise the first bytes are read once, with a deadline,
//! into the connection's prefix buffer; they are classified there and replayed upstream by
//! the relay (or parsed in place by the HTTP stage) — never read twice, never copied.
//!
//! [`plan`] decides per connection whether to read at all: a port declared opaque, a
//! well-known server-first port, or an unregistered destination with no HTTP service on its
//! port is never read.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use isthmus_config::{Snapshot, L7};

use crate::serve::Direction;

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
    // Only the request line decides, and only once it has ended: a version followed by more
    // bytes on the same line (`HTTP/1.1H`) is not HTTP, whatever TCP's segmenting showed first.
    let line_end = bytes.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(end) => &bytes[..=end],
        None => bytes,
    };
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(line) {
        // Too many headers for our zero-slot array means the request line parsed.
        Ok(_) | Err(httparse::Error::TooManyHeaders)
            if request.version.is_some() && line_end.is_some() =>
        {
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

/// Ports where the server speaks first or the protocol is known not to be HTTP: never
/// sniffed, so a client waiting for a greeting is not made to wait for our timeout
/// (Linkerd's default opaque ports: SMTP, submission, MySQL, Galera, PostgreSQL, Redis,
/// Elasticsearch transport, memcached).
pub const SERVER_FIRST_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Whether and how long to read a connection before choosing its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Do not read: the protocol is this.
    Skip(Protocol),
    /// Read up to this long; what cannot be classified by then is opaque TCP.
    Sniff(Duration),
    /// The port is declared HTTP: read the request for up to this long; anything else is
    /// refused (400), never relayed around HTTP routing and policy.
    Expect(Duration),
}

/// Decides from the snapshot whether a connection to `dst` needs its first bytes read.
/// `declared_wait` is how long a port declared HTTP waits for its first request (it is not
/// relayed as TCP at the sniffing timeout: the client is expected to speak first).
pub fn plan(
    snapshot: &Snapshot,
    direction: Direction,
    dst: SocketAddr,
    declared_wait: Duration,
) -> Plan {
    if SERVER_FIRST_PORTS.contains(&dst.port()) {
        return Plan::Skip(Protocol::Opaque);
    }
    if direction == Direction::Inbound {
        // A port the registry declares opaque is not read; HTTP-declared ones wait for the
        // request like outbound; unknown ones are sniffed.
        return match snapshot.inbound_l7(dst) {
            Some(L7::Opaque) => Plan::Skip(Protocol::Opaque),
            Some(L7::Http1 | L7::Http2) => Plan::Expect(declared_wait),
            Some(L7::Detect) | None => Plan::Sniff(SNIFF_TIMEOUT),
        };
    }
    match snapshot.service_port(dst) {
        Some((_, port)) => match port.l7() {
            L7::Opaque => Plan::Skip(Protocol::Opaque),
            L7::Http1 | L7::Http2 => Plan::Expect(declared_wait),
            L7::Detect => Plan::Sniff(SNIFF_TIMEOUT),
        },
        None if snapshot.has_http_hosts_on(dst.port()) => Plan::Sniff(SNIFF_TIMEOUT),
        None => Plan::Skip(Protocol::Opaque),
    }
}

impl Classified {
    /// The detection outcome's metric label.
    pub fn outcome_label(&self) -> &'static str {
        match (self.outcome, self.protocol) {
            (Outcome::TimedOut, _) => "timeout",
            (Outcome::Closed, _) => "closed",
            (_, Protocol::Http1) => "http1",
            (_, Protocol::Http2) => "h2",
            (_, Protocol::Opaque) => "tcp",
        }
    }
}

/// How many bytes detection reads at most before calling a connection opaque: an HTTP/1
/// request line longer than this is relayed as TCP.
pub const SNIFF_LIMIT: usize = 8 * 1024;

/// The default time a client has to send enough to classify its connection (Istio's
/// `protocolDetectionTimeout` is 100 ms by default; we wait a little longer for slow links).
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_ports_decide_whether_and_how_long_to_read() {
        let text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: web, namespace: t}\n\
            spec:\n  hosts: [web]\n  addresses: [10.96.0.2]\n  resolution: STATIC\n\
            \x20 ports: [{number: 80, name: http, targetPort: 8080}, {number: 81, name: tcp-x, targetPort: 8081}, {number: 82, name: x, targetPort: 8082}]\n\
            \x20 endpoints: [{address: 10.0.0.5}]\n";
        let snapshot =
            isthmus_config::load(&[isthmus_config::SourceFile::new("a.yaml", text)]).unwrap();
        let wait = Duration::from_secs(10);
        let plan = |d: Direction, dst: &str| super::plan(&snapshot, d, dst.parse().unwrap(), wait);
        use Direction::*;
        assert_eq!(plan(Outbound, "10.96.0.2:80"), Plan::Expect(wait));
        assert_eq!(plan(Outbound, "10.96.0.2:81"), Plan::Skip(Protocol::Opaque));
        assert_eq!(plan(Outbound, "10.96.0.2:82"), Plan::Sniff(SNIFF_TIMEOUT));
        // Inbound, by the pod's target port.
        assert_eq!(plan(Inbound, "10.0.0.5:8080"), Plan::Expect(wait));
        assert_eq!(plan(Inbound, "10.0.0.5:8081"), Plan::Skip(Protocol::Opaque));
        assert_eq!(plan(Inbound, "10.0.0.5:8082"), Plan::Sniff(SNIFF_TIMEOUT));
        assert_eq!(plan(Inbound, "10.0.0.5:9999"), Plan::Sniff(SNIFF_TIMEOUT));
        assert_eq!(plan(Inbound, "10.0.0.5:3306"), Plan::Skip(Protocol::Opaque));
        // Unregistered destinations: read only where some service serves HTTP on the port.
        assert_eq!(plan(Outbound, "192.0.2.1:80"), Plan::Sniff(SNIFF_TIMEOUT));
        assert_eq!(
            plan(Outbound, "192.0.2.1:443"),
            Plan::Skip(Protocol::Opaque)
        );
    }

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
            (b"GET /headers HTTP/1.1", NeedMore),
            (b"GET /headers HTTP/1.1H", Is(Opaque)),
            (b"GET / HTTP/1.1\r\n\0", Is(Http1)),
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
