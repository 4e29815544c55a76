//! The local mesh's built-in app: the demo's `hello from NAME` server, and a small
//! httpbin-like test peer for HTTP through the sidecar; beside it a TCP echo server.
//! Blocking threads, one per connection: it is a test peer, not a product.
//!
//! HTTP/1.1 with keep-alive and HTTP/1.0 (closed after the response unless it asked for
//! keep-alive). Request bodies by `content-length` or chunked are always read to the end and
//! counted; `Expect: 100-continue` gets `100 Continue` before the body is read. Every response
//! carries `x-served-by: NAME` and `x-body-bytes: N` (the request body's length). HEAD gets the
//! head alone. An HTTP/1.0 client gets chunked payloads as `content-length` bodies.
//!
//! | request | response |
//! |---|---|
//! | `/` | `hello from NAME\n` |
//! | `/headers` | text/plain: the request line, then every header line exactly as received (case and spacing kept), each ending in `\n` |
//! | `/status/{code}` | that status, empty body (`content-length: 0`; none at all for 204 and 304) |
//! | `/delay/{ms}` | 200 after `ms` milliseconds (at most 60 s) |
//! | `/bytes/{n}` | `n` bytes of [`pattern_byte`], `content-length` |
//! | `/stream/{n}` | the same `n` bytes chunked (16 KiB chunks); with `TE: trailers` in the request, a trailer `x-checksum:` [`checksum`] of the body |
//! | `/echo` | the request body; chunked in, chunked out (same chunk sizes), otherwise `content-length` |
//! | `/fail/{key}/{n}/{code}` | the first `n` requests for `key` get `code` (empty body), later ones 200 `ok`; `x-attempt: K` (1-based) on each |
//! | `/__stats` | JSON `{"total":N,"prefixes":{"/fail":N,..},"keys":{"K":N,..}}`: requests seen since start or `/__reset` |
//! | `/__reset` | zeroes the counters and the `/fail` attempts; 200 |
//! | `GET /ws` with `Upgrade: websocket` | `101`, then every data frame echoed back unmasked (same opcode and FIN), pings answered with pongs, a close echoed and the connection closed |
//! | anything else | 404 |
//!
//! Counting: every request but `/__stats` and `/__reset` adds one to `total`, one to its
//! prefix (the first path segment: `/status/503` counts under `/status`, `/` under `/`) and, if
//! it names a key (`/fail/{key}/..`, or `?key=K` on any path), one to that key. So a test can
//! count the attempts a retry policy made *at the upstream*.

pub mod h1;
pub mod ws;

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use h1::{BadRequest, Payload, Request, Response};

/// Byte `i` of the `/bytes` and `/stream` bodies: printable, with a period of 251 (a prime,
/// so a lost or repeated block of any power-of-two size shows).
pub fn pattern_byte(i: u64) -> u8 {
    const ALNUM: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    ALNUM[(i % 251 % 62) as usize]
}

/// The `x-checksum` trailer of `/stream`: FNV-1a (64-bit) of the body, 16 hex digits.
pub fn checksum(data: &[u8]) -> String {
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Binds both servers, prints `READY` on stdout (the harness's readiness signal), serves forever.
pub fn serve(name: &str, http: SocketAddr, echo: SocketAddr) -> io::Result<()> {
    let http = TcpListener::bind(http)?;
    let echo = TcpListener::bind(echo)?;
    println!("READY");
    io::stdout().flush()?;
    let app = Arc::new(App {
        name: name.to_string(),
        counters: Mutex::default(),
    });
    std::thread::spawn(move || accept(echo, echo_conn));
    accept(http, move |s| http_conn(s, &app));
    Ok(())
}

/// What every connection shares: the name it answers with and the counters.
struct App {
    name: String,
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    total: u64,
    prefixes: BTreeMap<String, u64>,
    keys: BTreeMap<String, u64>,
    /// `/fail` attempts per key.
    attempts: BTreeMap<String, u64>,
}

fn accept(
    listener: TcpListener,
    handle: impl Fn(TcpStream) -> io::Result<()> + Send + Sync + Clone + 'static,
) {
    for stream in listener.incoming().flatten() {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let _ = handle(stream);
        });
    }
}

fn echo_conn(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(std::net::Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

/// One connection: requests in turn until the peer closes or a response closes it.
fn http_conn(stream: TcpStream, app: &App) -> io::Result<()> {
    let writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let req = match h1::read_head(&mut reader)? {
            None => return Ok(()),
            Some(Ok(req)) => req,
            Some(Err(BadRequest(why))) => {
                let resp = Response::text(400, format!("bad request: {why}\n"));
                return app.finish(resp).write(&writer, false, false, true);
            }
        };
        let framing = match req.framing() {
            Ok(f) => f,
            Err(BadRequest(why)) => {
                let resp = Response::text(400, format!("bad request: {why}\n"));
                return app.finish(resp).write(&writer, false, req.http10, true);
            }
        };
        if req.path() == "/ws" && req.has_token("upgrade", "websocket") {
            return websocket(&req, reader, writer, app);
        }
        if framing != h1::Framing::None && !req.http10 && req.has_token("expect", "100-continue") {
            (&writer).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = h1::read_body(&mut reader, framing, req.path() == "/echo")?;
        let close = !req.keep_alive();
        let resp = app.respond(&req, body);
        app.finish(resp)
            .write(&writer, req.method == "HEAD", req.http10, close)?;
        if close {
            return Ok(());
        }
    }
}

impl App {
    /// The headers every response carries.
    fn finish(&self, resp: Response) -> Response {
        resp.header("x-served-by", self.name.as_str())
    }

    fn respond(&self, req: &Request, body: h1::Body) -> Response {
        let path = req.path();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let resp = match segments.as_slice() {
            ["__stats"] => return self.stats().header("x-body-bytes", body.len.to_string()),
            ["__reset"] => {
                *self.lock() = Counters::default();
                Response::text(200, "reset\n")
            }
            _ => {
                let key = match segments.as_slice() {
                    ["fail", key, ..] => Some(*key),
                    _ => req.query("key"),
                };
                self.count(segments[0], key);
                self.endpoint(req, &segments, &body)
            }
        };
        resp.header("x-body-bytes", body.len.to_string())
    }

    fn endpoint(&self, req: &Request, segments: &[&str], body: &h1::Body) -> Response {
        let number = |s: &str| s.parse::<u64>().ok();
        match segments {
            [""] => Response::text(200, format!("hello from {}\n", self.name)),
            ["headers"] => {
                let mut text = format!("{}\n", req.line);
                for h in &req.headers {
                    text.push_str(h);
                    text.push('\n');
                }
                Response::text(200, text)
            }
            ["status", code] => match code.parse::<u16>() {
                Ok(code @ (204 | 304)) => Response::new(code, Payload::None),
                Ok(code @ 200..=599) => Response::new(code, Payload::Bytes(Vec::new())),
                _ => Response::text(400, format!("bad status {code:?}\n")),
            },
            ["delay", ms] => match number(ms) {
                Some(ms) => {
                    let ms = ms.min(60_000);
                    std::thread::sleep(Duration::from_millis(ms));
                    Response::text(200, format!("delayed {ms} ms\n"))
                }
                None => Response::text(400, format!("bad delay {ms:?}\n")),
            },
            ["bytes", n] => match number(n) {
                Some(n) => Response::new(200, Payload::Pattern(n))
                    .header("content-type", "application/octet-stream"),
                None => Response::text(400, format!("bad length {n:?}\n")),
            },
            ["stream", n] => match number(n) {
                Some(n) if n <= 1 << 30 => {
                    let data: Vec<u8> = (0..n).map(pattern_byte).collect();
                    let chunks = vec![16 * 1024; (n as usize).div_ceil(16 * 1024)];
                    let trailers = if req.has_token("te", "trailers") {
                        vec![("x-checksum".to_string(), checksum(&data))]
                    } else {
                        Vec::new()
                    };
                    Response::new(
                        200,
                        Payload::Chunked {
                            data,
                            chunks,
                            trailers,
                        },
                    )
                    .header("content-type", "application/octet-stream")
                }
                _ => Response::text(400, format!("bad length {n:?}\n")),
            },
            ["echo"] => {
                let data = body.data.clone();
                let payload = if req.has_token("transfer-encoding", "chunked") {
                    Payload::Chunked {
                        data,
                        chunks: body.chunks.clone(),
                        trailers: Vec::new(),
                    }
                } else {
                    Payload::Bytes(data)
                };
                Response::new(200, payload).header("content-type", "application/octet-stream")
            }
            ["fail", key, n, code] => match (number(n), code.parse::<u16>()) {
                (Some(n), Ok(code @ 200..=599)) => {
                    let attempt = {
                        let mut counters = self.lock();
                        let a = counters.attempts.entry(key.to_string()).or_default();
                        *a += 1;
                        *a
                    };
                    let resp = if attempt <= n {
                        Response::new(code, Payload::Bytes(Vec::new()))
                    } else {
                        Response::text(200, "ok\n")
                    };
                    resp.header("x-attempt", attempt.to_string())
                }
                _ => Response::text(400, "use /fail/{key}/{n}/{code}\n"),
            },
            _ => Response::text(404, format!("no such endpoint: {}\n", req.path())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, first_segment: &str, key: Option<&str>) {
        let mut counters = self.lock();
        counters.total += 1;
        *counters
            .prefixes
            .entry(format!("/{first_segment}"))
            .or_default() += 1;
        if let Some(key) = key {
            *counters.keys.entry(key.to_string()).or_default() += 1;
        }
    }

    fn stats(&self) -> Response {
        let counters = self.lock();
        let json = serde_json::json!({
            "total": counters.total,
            "prefixes": counters.prefixes,
            "keys": counters.keys,
        });
        Response::text(200, format!("{json}\n")).header("content-type", "application/json")
    }
}

/// The handshake (RFC 6455 §4.2.2), then the echo.
fn websocket(
    req: &Request,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    app: &App,
) -> io::Result<()> {
    app.count("ws", req.query("key"));
    let key = req.header("sec-websocket-key");
    let (Some(key), true, false) = (key, req.method == "GET", req.http10) else {
        let resp = Response::text(400, "bad websocket handshake\n");
        return app.finish(resp).write(&writer, false, req.http10, true);
    };
    let resp = Response::new(101, Payload::None)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", ws::accept_key(key));
    app.finish(resp).write(&writer, false, false, false)?;
    ws::echo(reader, writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_has_period_251() {
        let first: Vec<u8> = (0..251).map(pattern_byte).collect();
        assert!((251..502).map(pattern_byte).eq(first.iter().copied()));
        for shift in [1u64, 62, 64, 4096, 65536] {
            assert!(
                (0..251).any(|i| pattern_byte(i) != pattern_byte(i + shift)),
                "shift {shift} undetected"
            );
        }
    }

    #[test]
    fn checksum_is_fnv1a_64() {
        assert_eq!(checksum(b""), "cbf29ce484222325");
        assert_eq!(checksum(b"a"), "af63dc4c8601ec8c");
    }
}
