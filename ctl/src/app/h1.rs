//! The app's HTTP/1 wire format: request heads kept exactly as received, bodies read fully
//! (content-length or chunked) and counted, responses written in one buffered write.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// A request head, as received. `line` and `headers` keep the bytes' case and spacing
/// (without the line ends) so `/headers` can show exactly what arrived.
#[derive(Debug)]
pub(super) struct Request {
    pub line: String,
    pub method: String,
    pub target: String,
    pub http10: bool,
    pub headers: Vec<String>,
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A request body, read to its end.
#[derive(Debug, Default)]
pub(super) struct Body {
    /// The bytes, when the endpoint wants them (`/echo`); otherwise empty.
    pub data: Vec<u8>,
    /// Bytes received, kept or not.
    pub len: u64,
    /// Sizes of the chunks of a chunked body, in order.
    pub chunks: Vec<usize>,
}

/// What a response carries after its head.
pub(super) enum Payload {
    /// No body and no `content-length` (1xx, 204, 304).
    None,
    /// A body with `content-length`.
    Bytes(Vec<u8>),
    /// `n` bytes of [`super::pattern_byte`] with `content-length`, written in blocks.
    Pattern(u64),
    /// A chunked body: the data cut at `chunks` (sizes), then the trailers.
    Chunked {
        data: Vec<u8>,
        chunks: Vec<usize>,
        trailers: Vec<(String, String)>,
    },
}

pub(super) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub payload: Payload,
}

/// A request the app refuses (answered 400, connection closed).
#[derive(Debug)]
pub(super) struct BadRequest(pub String);

const MAX_LINE: u64 = 16 * 1024;
const MAX_HEADERS: usize = 200;

impl Request {
    /// The value of the first header named `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Whether any `name` header lists `token` (comma-separated, any case).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter_map(|h| h.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The value of `key` in the query string, if present.
    pub fn query(&self, key: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then_some(v)
        })
    }

    pub fn keep_alive(&self) -> bool {
        if self.http10 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    /// The body's framing (RFC 9112 §6.3): chunked wins; conflicting lengths are refused.
    pub fn framing(&self) -> Result<Framing, BadRequest> {
        if self.header("transfer-encoding").is_some() {
            return if self.has_token("transfer-encoding", "chunked") {
                Ok(Framing::Chunked)
            } else {
                Err(BadRequest("transfer-encoding without chunked".into()))
            };
        }
        let mut length = None;
        for h in &self.headers {
            let Some((n, v)) = h.split_once(':') else {
                continue;
            };
            if n.trim().eq_ignore_ascii_case("content-length") {
                let v: u64 = v
                    .trim()
                    .parse()
                    .map_err(|_| BadRequest(format!("content-length {:?}", v.trim())))?;
                if length.is_some_and(|l| l != v) {
                    return Err(BadRequest("conflicting content-length".into()));
                }
                length = Some(v);
            }
        }
        Ok(length.map_or(Framing::None, Framing::Length))
    }
}

/// Reads one line (up to LF) of at most [`MAX_LINE`] bytes; `None` at end of stream.
fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    (&mut *reader).take(MAX_LINE).read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut short",
        ));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Reads a request head; `Ok(None)` when the peer closed between requests.
pub(super) fn read_head(
    reader: &mut BufReader<TcpStream>,
) -> io::Result<Option<Result<Request, BadRequest>>> {
    let line = loop {
        match read_line(reader)? {
            None => return Ok(None),
            // RFC 9112 §2.2: ignore empty lines before a request line.
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut headers = Vec::new();
    loop {
        let Some(h) = read_line(reader)? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        if h.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Ok(Some(Err(BadRequest("too many headers".into()))));
        }
        headers.push(h);
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(Some(Err(BadRequest(format!("request line {line:?}")))));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Ok(Some(Err(BadRequest(format!("version {version:?}"))))),
    };
    Ok(Some(Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        line: line.clone(),
        http10,
        headers,
    })))
}

/// Reads the body to its end; keeps the bytes only if `keep`.
pub(super) fn read_body(
    reader: &mut BufReader<TcpStream>,
    framing: Framing,
    keep: bool,
) -> io::Result<Body> {
    let mut body = Body::default();
    match framing {
        Framing::None => {}
        Framing::Length(n) => read_exact_into(reader, n, keep, &mut body)?,
        Framing::Chunked => loop {
            let line = read_line(reader)?.ok_or(io::ErrorKind::UnexpectedEof)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
            })?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(reader)?
                    .ok_or(io::ErrorKind::UnexpectedEof)?
                    .is_empty()
                {}
                break;
            }
            read_exact_into(reader, size, keep, &mut body)?;
            body.chunks.push(size as usize);
            if !read_line(reader)?
                .ok_or(io::ErrorKind::UnexpectedEof)?
                .is_empty()
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk data longer than its size",
                ));
            }
        },
    }
    Ok(body)
}

fn read_exact_into(
    reader: &mut BufReader<TcpStream>,
    n: u64,
    keep: bool,
    body: &mut Body,
) -> io::Result<()> {
    let copied = if keep {
        (&mut *reader).take(n).read_to_end(&mut body.data)? as u64
    } else {
        io::copy(&mut (&mut *reader).take(n), &mut io::sink())?
    };
    body.len += copied;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

impl Response {
    pub fn new(status: u16, payload: Payload) -> Self {
        Response {
            status,
            headers: Vec::new(),
            payload,
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response::new(status, Payload::Bytes(body.into().into_bytes()))
            .header("content-type", "text/plain")
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// Writes the response in one buffered write (a response split over small writes waits
    /// on Nagle and the peer's delayed ACK on keep-alive connections). HTTP/1.0 peers get a
    /// chunked payload as a `content-length` body; HEAD gets the head alone.
    pub fn write(
        self,
        stream: &TcpStream,
        head_only: bool,
        http10: bool,
        close: bool,
    ) -> io::Result<()> {
        let mut out = io::BufWriter::with_capacity(64 * 1024, stream);
        write!(out, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status))?;
        for (n, v) in &self.headers {
            write!(out, "{n}: {v}\r\n")?;
        }
        let payload = match self.payload {
            Payload::Chunked { data, .. } if http10 => Payload::Bytes(data),
            p => p,
        };
        match &payload {
            Payload::None => {}
            Payload::Bytes(b) => write!(out, "content-length: {}\r\n", b.len())?,
            Payload::Pattern(n) => write!(out, "content-length: {n}\r\n")?,
            Payload::Chunked { trailers, .. } => {
                out.write_all(b"transfer-encoding: chunked\r\n")?;
                for (n, _) in trailers {
                    write!(out, "trailer: {n}\r\n")?;
                }
            }
        }
        if close {
            out.write_all(b"connection: close\r\n")?;
        }
        out.write_all(b"\r\n")?;
        if !head_only {
            match payload {
                Payload::None => {}
                Payload::Bytes(b) => out.write_all(&b)?,
                Payload::Pattern(n) => {
                    let mut block = Vec::with_capacity(64 * 1024);
                    let mut at = 0u64;
                    while at < n {
                        let len = (n - at).min(64 * 1024);
                        block.clear();
                        block.extend((at..at + len).map(super::pattern_byte));
                        out.write_all(&block)?;
                        at += len;
                    }
                }
                Payload::Chunked {
                    data,
                    chunks,
                    trailers,
                } => {
                    let mut rest = &data[..];
                    for size in chunks {
                        let (chunk, tail) = rest.split_at(size.min(rest.len()));
                        if !chunk.is_empty() {
                            write!(out, "{:x}\r\n", chunk.len())?;
                            out.write_all(chunk)?;
                            out.write_all(b"\r\n")?;
                        }
                        rest = tail;
                    }
                    out.write_all(b"0\r\n")?;
                    for (n, v) in trailers {
                        write!(out, "{n}: {v}\r\n")?;
                    }
                    out.write_all(b"\r\n")?;
                }
            }
        }
        out.flush()
    }
}

/// A reason phrase: informational only (RFC 9112 §4: clients ignore it), so a few suffice.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        404 => "Not Found",
        _ => "Status",
    }
}
