//! The HTTP/1.1 keep-alive reverse proxy of one route, written once over owned-buffer
//! completion-style I/O ([`OwnedIo`]) and run on each candidate runtime. Heads are parsed with
//! httparse in place, from the buffer the read returned; the request (head + content-length
//! body) and the response are forwarded by handing the same owned buffer to a write.

use std::future::Future;
use std::io;

/// Initial capacity of each direction's buffer; a head larger than this grows it.
const BUF: usize = 16 * 1024;
/// Larger heads are rejected.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

/// Owned-buffer I/O: the model io_uring imposes (the kernel owns the buffer while the op runs).
#[allow(async_fn_in_trait)]
pub trait OwnedIo {
    /// Reads into `buf`'s spare capacity (the caller guarantees there is some) and appends:
    /// on return `buf.len()` grew by the count read. 0 means end of stream.
    async fn read_append(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// (head length, body length) once the request head is complete.
fn parse_request(buf: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf).map_err(|_| bad("bad request head"))? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(head) => Ok(Some((head, body_length(req.headers)?.unwrap_or(0)))),
    }
}

/// (head length, body length) once the response head is complete.
fn parse_response(buf: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf).map_err(|_| bad("bad response head"))? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(head) => {
            let code = resp.code.unwrap_or(0);
            let body = if code == 204 || code == 304 || (100..200).contains(&code) {
                0
            } else {
                // A read-to-close body is out of scope for this benchmark.
                body_length(resp.headers)?.ok_or_else(|| bad("response without content-length"))?
            };
            Ok(Some((head, body)))
        }
    }
}

fn body_length(headers: &[httparse::Header<'_>]) -> io::Result<Option<usize>> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked bodies are out of scope for this benchmark"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| bad("content-length"))?;
            length = Some(v.trim().parse::<usize>().map_err(|_| bad("content-length"))?);
        }
    }
    Ok(length)
}

/// One read appended to `buf`, growing it first if it is full. Returns the count read.
async fn read_more<S: OwnedIo>(io: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.len() == buf.capacity() {
        buf.reserve(buf.capacity().max(BUF));
    }
    let (r, b) = io.read_append(std::mem::take(buf)).await;
    *buf = b;
    r
}

/// Reads until a complete head is in `buf`; `None` on a clean end of stream before any byte.
async fn read_head<S: OwnedIo>(
    io: &mut S,
    buf: &mut Vec<u8>,
    parse: fn(&[u8]) -> io::Result<Option<(usize, usize)>>,
) -> io::Result<Option<usize>> {
    loop {
        if !buf.is_empty() {
            if let Some((head, body)) = parse(buf)? {
                return Ok(Some(head + body));
            }
            if buf.len() > MAX_HEAD {
                return Err(bad("head too large"));
            }
        }
        if read_more(io, buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
    }
}

async fn read_to<S: OwnedIo>(io: &mut S, buf: &mut Vec<u8>, total: usize) -> io::Result<()> {
    if buf.capacity() < total {
        buf.reserve(total - buf.len());
    }
    while buf.len() < total {
        if read_more(io, buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Serves one downstream connection: request after request (keep-alive), each forwarded over
/// one upstream connection dialled on the first request and kept for the connection's life.
pub async fn serve<S, C, F>(mut down: S, connect: C) -> io::Result<()>
where
    S: OwnedIo,
    C: Fn() -> F,
    F: Future<Output = io::Result<S>>,
{
    let mut dbuf = Vec::with_capacity(BUF);
    let mut ubuf = Vec::with_capacity(BUF);
    let mut upstream: Option<S> = None;
    loop {
        let Some(total) = read_head(&mut down, &mut dbuf, parse_request).await? else {
            return Ok(());
        };
        read_to(&mut down, &mut dbuf, total).await?;
        // Pipelined bytes past this request (rare: no browser or client library pipelines).
        let pipelined = if dbuf.len() > total { dbuf.split_off(total) } else { Vec::new() };
        let up = match upstream {
            Some(ref mut up) => up,
            None => upstream.insert(connect().await?),
        };
        let (r, b) = up.write_all(dbuf).await;
        dbuf = b;
        r?;
        dbuf.clear();
        dbuf.extend_from_slice(&pipelined);

        let total = read_head(up, &mut ubuf, parse_response)
            .await?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        read_to(up, &mut ubuf, total).await?;
        if ubuf.len() != total {
            return Err(bad("upstream sent bytes past its response"));
        }
        let (r, b) = down.write_all(ubuf).await;
        ubuf = b;
        r?;
        ubuf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_lengths() {
        let req = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_request(req).unwrap(), Some((req.len() - 5, 5)));
        assert_eq!(parse_request(&req[..10]).unwrap(), None);
        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(parse_response(resp).unwrap(), Some((resp.len() - 3, 3)));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert_eq!(parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(), Some((27, 0)));
        assert!(parse_request(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }
}
