//! Client and server pieces for fault scenarios: a pattern stream that reports how it ended
//! (instead of asserting it completed), short exchanges that return errors for counting, a
//! keep-alive HTTP client, and an upstream that resets.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How a stream ended from the client's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Orderly close (FIN).
    Eof,
    /// Closed with an error other than a timeout: reset, broken pipe, ...
    Error(io::ErrorKind),
    /// Nothing arrived within the read timeout: the stream was left hanging.
    TimedOut,
}

impl End {
    fn of(result: io::Result<usize>) -> Option<End> {
        match result {
            Ok(0) => Some(End::Eof),
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Some(End::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => Some(End::Error(e.kind())),
        }
    }
}

/// A pattern stream that ended: bytes verified in order before the end, and when it ended.
#[derive(Debug)]
pub struct Ended {
    pub verified: u64,
    pub end: End,
    pub at: Instant,
}

/// Byte `pos` of the stream [`crate::echo_exact`] sends.
fn expected(block: &[u8], pos: usize) -> u8 {
    block[pos & (block.len() - 1)] ^ ((pos >> 20) as u8)
}

/// Sends the pattern (up to `total` bytes) on one thread and verifies the echo on this one
/// until the stream ends, however it ends; `progress` follows the verified count. A wrong
/// byte panics: corruption is never an acceptable way for a stream to end.
pub fn echo_until_end(
    stream: TcpStream,
    total: usize,
    read_timeout: Duration,
    progress: &AtomicU64,
) -> Ended {
    let block = crate::pattern_block();
    stream
        .set_read_timeout(Some(read_timeout))
        .expect("timeout");
    stream
        .set_write_timeout(Some(read_timeout))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let send_block = block.clone();
    let sender = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < total {
            let n = (total - sent).min(chunk.len());
            for (i, out) in chunk[..n].iter_mut().enumerate() {
                *out = expected(&send_block, sent + i);
            }
            // The stream is expected to break under us; the reader reports how.
            if writer.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n;
        }
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut reader = stream;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let result = reader.read(&mut buf);
        if let Ok(n) = result {
            for (i, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, expected(&block, got + i), "byte {} differs", got + i);
            }
            got += n;
            progress.store(got as u64, Ordering::Release);
        }
        if let Some(end) = End::of(result) {
            break end;
        }
    };
    let at = Instant::now();
    // Unblocks the sender if it is still writing into a stream nobody reads.
    let _ = reader.shutdown(Shutdown::Both);
    sender.join().expect("sender");
    Ended {
        verified: got as u64,
        end,
        at,
    }
}

/// One short exchange on a new connection: send `msg`, half-close, read the echo to EOF.
/// Returns what came back (compare it: a mismatch is corruption, an `Err` a failure).
pub fn echo_once(addr: SocketAddr, msg: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(msg)?;
    stream.shutdown(Shutdown::Write)?;
    let mut back = Vec::with_capacity(msg.len());
    stream.read_to_end(&mut back)?;
    Ok(back)
}

/// One GET with `connection: close` on a new connection; returns the body of a 200.
pub fn get_once(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    HttpClient::connect(addr, timeout)?.get_last("/")
}

/// An HTTP/1.1 client on one keep-alive connection, enough for the built-in app.
pub struct HttpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    authority: String,
}

impl HttpClient {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<HttpClient> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpClient {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            authority: addr.to_string(),
        })
    }

    /// GET `/`; the body of a 200 response, anything else an error.
    pub fn get(&mut self) -> io::Result<String> {
        self.get_with("/", "")
    }

    /// GET `path` with `connection: close`; the body of a 200 response.
    pub fn get_last(mut self, path: &str) -> io::Result<String> {
        self.get_with(path, "connection: close\r\n")
    }

    fn get_with(&mut self, path: &str, headers: &str) -> io::Result<String> {
        // One write, so that keep-alive requests do not wait on Nagle and delayed ACKs.
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\n{headers}\r\n",
            self.authority
        );
        self.writer.write_all(request.as_bytes())?;
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if status.split(' ').nth(1) != Some("200") {
            return Err(bad(format!("status line {status:?}")));
        }
        let mut length = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or_else(|| bad("no content-length".into()))?;
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        String::from_utf8(body).map_err(|e| bad(e.to_string()))
    }
}

/// An upstream (bind its listener inside a pod) whose first connection echoes `reset_after`
/// bytes and then resets (SO_LINGER 0 close), sending the time of the reset on `reset_at`;
/// later connections echo until EOF. Serves `connections` connections, then returns; gives up
/// after `within`.
pub fn resetting_echo_server(
    listener: TcpListener,
    reset_after: usize,
    connections: usize,
    within: Duration,
    reset_at: std::sync::mpsc::Sender<Instant>,
) -> io::Result<()> {
    let deadline = Instant::now() + within;
    for n in 0..connections {
        let mut stream = accept_until(&listener, deadline)?;
        stream.set_read_timeout(Some(within))?;
        let limit = if n == 0 { reset_after } else { usize::MAX };
        let mut buf = vec![0u8; 64 * 1024];
        let mut echoed = 0usize;
        while echoed < limit {
            let want = (limit - echoed).min(buf.len());
            let got = stream.read(&mut buf[..want])?;
            if got == 0 {
                break;
            }
            stream.write_all(&buf[..got])?;
            echoed += got;
        }
        if n == 0 {
            reset(stream)?;
            let _ = reset_at.send(Instant::now());
        } else {
            stream.shutdown(Shutdown::Write)?;
            // Wait for the client's close so ours is not the active close.
            let _ = stream.read(&mut buf);
        }
    }
    Ok(())
}

/// Accepts one connection, giving up (`TimedOut`) at `deadline`; the stream is blocking.
pub fn accept_until(listener: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) -> io::Result<()> {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)
        .map_err(io::Error::from)
}

/// An HTTP upstream that misbehaves (bind its listener inside a pod): for each of
/// `connections` connections it reads until the end of a request head, then resets without
/// answering (what `retryOn: reset` retries). Gives up after `within`.
pub fn reset_after_request_head(
    listener: TcpListener,
    connections: usize,
    within: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + within;
    for _ in 0..connections {
        let stream = accept_until(&listener, deadline)?;
        stream.set_read_timeout(Some(within))?;
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 && line != "\r\n" {
            line.clear();
        }
        reset(stream)?;
    }
    Ok(())
}
