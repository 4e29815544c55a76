//! HTTP/1.x message framing (RFC 9112) on owned buffers: heads parsed in place with httparse,
//! bodies framed by a length or scanned chunk by chunk, and every ambiguity that lets two
//! parsers disagree about where a message ends (request smuggling) refused with 400, 431 or
//! 501 and a closed connection. Header names keep their case; the proxy forwards what it got.
//!
//! Pure: nothing here does I/O, so every rule is table-tested and fuzzed.

use std::fmt;

/// Bounds on what a peer may send before the proxy gives up on it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request or status line plus headers (Envoy's default is 60 KiB).
    pub max_head: usize,
    pub max_headers: usize,
    /// A chunk's extensions, or one trailer section, at most this long.
    pub max_chunk_meta: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 60 * 1024,
            max_headers: 100,
            max_chunk_meta: 8 * 1024,
        }
    }
}

/// HTTP/1.0 or HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// A header as it arrived: the name's case is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: Box<str>,
    pub value: Box<[u8]>,
}

impl Header {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, scanned with [`Chunked`].
    Chunked,
    /// Until the server closes (responses only).
    UntilClose,
    /// After the head the connection carries another protocol (101 Switching Protocols, or a
    /// 2xx answer to CONNECT): bytes both ways.
    Tunnel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Box<str>,
    pub target: Box<str>,
    pub version: Version,
    pub headers: Vec<Header>,
    pub framing: Framing,
    /// Whether the client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header (WebSocket and the like).
    pub upgrade: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: Box<str>,
    pub version: Version,
    pub headers: Vec<Header>,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// Why a message was refused. Each maps to the status the proxy answers with; after any of
/// them the connection is closed (its framing can no longer be trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H1Error {
    /// The head did not fit in [`Limits::max_head`].
    HeadTooLarge,
    TooManyHeaders,
    /// httparse refused it: bad request line, bad header name or value (including obs-fold,
    /// bare CR, control characters).
    Malformed(&'static str),
    /// Several `Content-Length` values that differ, or one that is not a number.
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndTransferEncoding,
    /// A transfer coding other than a final, single `chunked`.
    UnsupportedTransferEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 message.
    TransferEncodingInHttp10,
    /// A chunk size, extension, or line ending that is not exactly as RFC 9112 writes it.
    BadChunk(&'static str),
}

impl H1Error {
    /// The status to answer a request that failed with this.
    pub fn status(&self) -> u16 {
        match self {
            H1Error::HeadTooLarge | H1Error::TooManyHeaders => 431,
            H1Error::UnsupportedTransferEncoding => 501,
            _ => 400,
        }
    }
}

impl fmt::Display for H1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            H1Error::HeadTooLarge => f.write_str("request head too large"),
            H1Error::TooManyHeaders => f.write_str("too many headers"),
            H1Error::Malformed(what) => write!(f, "malformed message: {what}"),
            H1Error::BadContentLength => f.write_str("invalid or conflicting Content-Length"),
            H1Error::LengthAndTransferEncoding => {
                f.write_str("both Content-Length and Transfer-Encoding")
            }
            H1Error::UnsupportedTransferEncoding => {
                f.write_str("unsupported Transfer-Encoding (only a final chunked)")
            }
            H1Error::TransferEncodingInHttp10 => f.write_str("Transfer-Encoding in HTTP/1.0"),
            H1Error::BadChunk(what) => write!(f, "bad chunked encoding: {what}"),
        }
    }
}

impl std::error::Error for H1Error {}

/// Header slots up to this many live on the stack (the default limit fits): no allocation per
/// parse.
const STACK_HEADERS: usize = 100;

/// `limits.max_headers` slots for httparse: the stack array when it is large enough.
fn header_slots<'a, 'h>(
    stack: &'a mut [httparse::Header<'h>; STACK_HEADERS],
    heap: &'a mut Vec<httparse::Header<'h>>,
    limits: &Limits,
) -> &'a mut [httparse::Header<'h>] {
    if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize(limits.max_headers, httparse::EMPTY_HEADER);
        heap
    }
}

/// `Ok(None)`: the head is not complete yet (read more). `Ok(Some((head, n)))`: the head took
/// the first `n` bytes of `buf`; the body (if any) follows.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<(RequestHead, usize)>, H1Error> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap = Vec::new();
    let mut req = httparse::Request::new(header_slots(&mut stack, &mut heap, limits));
    let Some(n) = head_len(req.parse(buf), buf.len(), limits)? else {
        return Ok(None);
    };
    let version = version(req.version)?;
    let headers = owned(req.headers);
    let method: Box<str> = req.method.unwrap_or_default().into();
    let connection = Tokens::of(&headers, "connection");
    let framing = request_framing(&headers, version)?;
    let upgrade = connection.has("upgrade") && headers.iter().any(|h| h.is("upgrade"));
    let head = RequestHead {
        keep_alive: keep_alive(version, &connection),
        expect_continue: headers
            .iter()
            .any(|h| h.is("expect") && h.value.eq_ignore_ascii_case(b"100-continue")),
        upgrade,
        target: req.path.unwrap_or_default().into(),
        method,
        version,
        headers,
        framing,
    };
    Ok(Some((head, n)))
}

/// Parses a response head to a request with `method`. 1xx responses (other than 101) are
/// returned like any other: the caller forwards them and reads the next head.
pub fn parse_response(
    buf: &[u8],
    method: &str,
    limits: &Limits,
) -> Result<Option<(ResponseHead, usize)>, H1Error> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut heap = Vec::new();
    let mut res = httparse::Response::new(header_slots(&mut stack, &mut heap, limits));
    let Some(n) = head_len(res.parse(buf), buf.len(), limits)? else {
        return Ok(None);
    };
    let version = version(res.version)?;
    // httparse takes any three digits; a status is 100–999 (RFC 9110 §15), and "002" would be
    // forwarded as "2".
    let status = res
        .code
        .filter(|code| *code >= 100)
        .ok_or(H1Error::Malformed("status"))?;
    let headers = owned(res.headers);
    let connection = Tokens::of(&headers, "connection");
    let framing = response_framing(&headers, version, status, method)?;
    let head = ResponseHead {
        keep_alive: keep_alive(version, &connection) && framing != Framing::UntilClose,
        status,
        reason: res.reason.unwrap_or_default().into(),
        version,
        headers,
        framing,
    };
    Ok(Some((head, n)))
}

/// The head's length once httparse has looked at `buffered` bytes: `Ok(None)` to read more,
/// an error past the size limit.
fn head_len(
    parsed: httparse::Result<usize>,
    buffered: usize,
    limits: &Limits,
) -> Result<Option<usize>, H1Error> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n <= limits.max_head => Ok(Some(n)),
        Ok(httparse::Status::Complete(_)) => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) if buffered >= limits.max_head => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(parse_error(e)),
    }
}

fn parse_error(e: httparse::Error) -> H1Error {
    match e {
        httparse::Error::TooManyHeaders => H1Error::TooManyHeaders,
        httparse::Error::HeaderName => H1Error::Malformed("header name"),
        httparse::Error::HeaderValue => H1Error::Malformed("header value"),
        httparse::Error::NewLine => H1Error::Malformed("line ending"),
        httparse::Error::Status => H1Error::Malformed("status"),
        httparse::Error::Token => H1Error::Malformed("method"),
        httparse::Error::Version => H1Error::Malformed("version"),
    }
}

fn version(v: Option<u8>) -> Result<Version, H1Error> {
    match v {
        Some(0) => Ok(Version::Http10),
        Some(1) => Ok(Version::Http11),
        _ => Err(H1Error::Malformed("version")),
    }
}

fn owned(headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers
        .iter()
        .map(|h| Header {
            name: h.name.into(),
            value: h.value.into(),
        })
        .collect()
}

/// The comma-separated tokens of every header named `name`, lower-cased.
struct Tokens(Vec<String>);

impl Tokens {
    fn of(headers: &[Header], name: &str) -> Self {
        Tokens(
            headers
                .iter()
                .filter(|h| h.is(name))
                .flat_map(|h| h.value.split(|b| *b == b','))
                .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect(),
        )
    }

    fn has(&self, token: &str) -> bool {
        self.0.iter().any(|t| t == token)
    }
}

fn keep_alive(version: Version, connection: &Tokens) -> bool {
    match version {
        Version::Http11 => !connection.has("close"),
        Version::Http10 => connection.has("keep-alive"),
    }
}

/// RFC 9112 §6.3 for requests: TE (only a final, single `chunked`) or CL, never both;
/// otherwise no body.
fn request_framing(headers: &[Header], version: Version) -> Result<Framing, H1Error> {
    match (
        transfer_encoding(headers, version)?,
        content_length(headers)?,
    ) {
        (Some(_), Some(_)) => Err(H1Error::LengthAndTransferEncoding),
        (Some(true), None) => Ok(Framing::Chunked),
        (Some(false), None) => Err(H1Error::UnsupportedTransferEncoding),
        (None, Some(0)) | (None, None) => Ok(Framing::Empty),
        (None, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// RFC 9112 §6.3 for responses.
fn response_framing(
    headers: &[Header],
    version: Version,
    status: u16,
    method: &str,
) -> Result<Framing, H1Error> {
    if status == 101 || (method.eq_ignore_ascii_case("CONNECT") && (200..300).contains(&status)) {
        return Ok(Framing::Tunnel);
    }
    if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304
    {
        return Ok(Framing::Empty);
    }
    match (
        transfer_encoding(headers, version)?,
        content_length(headers)?,
    ) {
        (Some(_), Some(_)) => Err(H1Error::LengthAndTransferEncoding),
        (Some(true), None) => Ok(Framing::Chunked),
        // A response coded otherwise runs until the server closes (§6.3 rule 4).
        (Some(false), None) | (None, None) => Ok(Framing::UntilClose),
        (None, Some(0)) => Ok(Framing::Empty),
        (None, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// `None`: no Transfer-Encoding. `Some(true)`: exactly one coding, `chunked`. `Some(false)`:
/// any other coding list.
fn transfer_encoding(headers: &[Header], version: Version) -> Result<Option<bool>, H1Error> {
    if !headers.iter().any(|h| h.is("transfer-encoding")) {
        return Ok(None);
    }
    if version == Version::Http10 {
        return Err(H1Error::TransferEncodingInHttp10);
    }
    let codings = Tokens::of(headers, "transfer-encoding");
    Ok(Some(codings.0.len() == 1 && codings.0[0] == "chunked"))
}

/// All `Content-Length` values (several headers, or a list in one) must be the same number.
fn content_length(headers: &[Header]) -> Result<Option<u64>, H1Error> {
    let mut length = None;
    for header in headers.iter().filter(|h| h.is("content-length")) {
        for part in header.value.split(|b| *b == b',') {
            let digits = trim(part);
            if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(H1Error::BadContentLength);
            }
            let n = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::BadContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// `bytes` without leading and trailing spaces and tabs (optional whitespace).
pub(crate) fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// Headers that concern one connection only (RFC 9110 §7.6.1), never forwarded: the fixed
/// set plus every name listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut Vec<Header>) {
    const FIXED: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
    ];
    let listed = Tokens::of(headers, "connection");
    headers.retain(|h| !FIXED.iter().any(|f| h.is(f)) && !listed.has(&h.name.to_ascii_lowercase()));
}

/// Scans a chunked body (RFC 9112 §7.1) as it arrives, so that its end is known exactly and
/// malformed framing is refused before a byte of it is forwarded. It does not copy: it says
/// how many bytes of the input belong to the body and which of them are chunk data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    /// Bytes of the current size line, extensions or trailer section seen so far.
    meta: usize,
    max_meta: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: extensions until CR.
    Extension {
        size: u64,
    },
    /// Expecting LF after the size line's CR.
    SizeLf {
        size: u64,
    },
    /// `remaining` data bytes of the current chunk.
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section; `line_empty`: nothing yet on the current line.
    Trailer {
        line_empty: bool,
    },
    TrailerLf {
        line_empty: bool,
    },
    Done,
}

/// What [`Chunked::scan`] found in one input.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// How many input bytes belong to the body (framing included); the rest, if `done`, is
    /// the next message.
    pub consumed: usize,
    /// Ranges of the input that are chunk data.
    pub data: Vec<std::ops::Range<usize>>,
    /// The last chunk and the trailer section have been read.
    pub done: bool,
}

impl Chunked {
    pub fn new(limits: &Limits) -> Self {
        Chunked {
            state: State::Size { size: 0, digits: 0 },
            meta: 0,
            max_meta: limits.max_chunk_meta,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds the next bytes of the body.
    pub fn scan(&mut self, input: &[u8]) -> Result<Scanned, H1Error> {
        let mut out = Scanned::default();
        let mut i = 0;
        while i < input.len() {
            if let State::Data { remaining } = self.state {
                let take = remaining.min((input.len() - i) as u64) as usize;
                out.data.push(i..i + take);
                i += take;
                self.state = if remaining == take as u64 {
                    State::DataCr
                } else {
                    State::Data {
                        remaining: remaining - take as u64,
                    }
                };
                continue;
            }
            if self.state == State::Done {
                break;
            }
            self.step(input[i])?;
            i += 1;
        }
        out.consumed = i;
        out.done = self.state == State::Done;
        Ok(out)
    }

    fn step(&mut self, b: u8) -> Result<(), H1Error> {
        self.meta += 1;
        if self.meta > self.max_meta {
            return Err(H1Error::BadChunk("chunk line or trailers too long"));
        }
        self.state = match self.state {
            State::Size { size, digits } => match hex(b) {
                Some(d) if digits < 16 => State::Size {
                    size: (size << 4) | u64::from(d),
                    digits: digits + 1,
                },
                Some(_) => return Err(H1Error::BadChunk("chunk size too large")),
                None if digits == 0 => return Err(H1Error::BadChunk("chunk size")),
                None if b == b';' || b == b' ' || b == b'\t' => State::Extension { size },
                None if b == b'\r' => State::SizeLf { size },
                None => return Err(H1Error::BadChunk("chunk size")),
            },
            State::Extension { size } => match b {
                b'\r' => State::SizeLf { size },
                b'\n' => return Err(H1Error::BadChunk("bare LF")),
                b if b < 0x20 && b != b'\t' || b == 0x7f => {
                    return Err(H1Error::BadChunk("control character in chunk extension"))
                }
                _ => State::Extension { size },
            },
            State::SizeLf { size } => match b {
                b'\n' => {
                    self.meta = 0;
                    if size == 0 {
                        State::Trailer { line_empty: true }
                    } else {
                        State::Data { remaining: size }
                    }
                }
                _ => return Err(H1Error::BadChunk("CR without LF")),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(H1Error::BadChunk("chunk data longer than its size")),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.meta = 0;
                    State::Size { size: 0, digits: 0 }
                }
                _ => return Err(H1Error::BadChunk("CR without LF")),
            },
            State::Trailer { line_empty } => match b {
                b'\r' => State::TrailerLf { line_empty },
                b'\n' => return Err(H1Error::BadChunk("bare LF")),
                _ => State::Trailer { line_empty: false },
            },
            State::TrailerLf { line_empty } => match b {
                b'\n' if line_empty => State::Done,
                b'\n' => State::Trailer { line_empty: true },
                _ => return Err(H1Error::BadChunk("CR without LF")),
            },
            State::Data { .. } | State::Done => unreachable!("handled by scan"),
        };
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Writes a request head as HTTP/1.1 text, header names as they arrived.
pub fn encode_request_head(head: &RequestHead, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(match head.version {
        Version::Http10 => b" HTTP/1.0\r\n",
        Version::Http11 => b" HTTP/1.1\r\n",
    });
    encode_headers(&head.headers, out);
}

/// Writes a response head, header names as they arrived.
pub fn encode_response_head(head: &ResponseHead, out: &mut Vec<u8>) {
    out.extend_from_slice(match head.version {
        Version::Http10 => b"HTTP/1.0 ",
        Version::Http11 => b"HTTP/1.1 ",
    });
    out.extend_from_slice(head.status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    encode_headers(&head.headers, out);
}

fn encode_headers(headers: &[Header], out: &mut Vec<u8>) {
    for h in headers {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
