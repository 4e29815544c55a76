//! The local mesh's built-in app: an HTTP server that says who it is, and a TCP echo server.
//! Blocking threads: it is a test peer, not a product.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

/// Binds both servers, prints `READY` on stdout (the harness's readiness signal), serves forever.
pub fn serve(name: &str, http: SocketAddr, echo: SocketAddr) -> io::Result<()> {
    let http = TcpListener::bind(http)?;
    let echo = TcpListener::bind(echo)?;
    println!("READY");
    io::stdout().flush()?;
    let name = name.to_string();
    std::thread::spawn(move || accept(echo, echo_conn));
    accept(http, move |s| http_conn(s, &name));
    Ok(())
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

/// HTTP/1.1 with keep-alive; any path answers `hello from NAME`.
fn http_conn(stream: TcpStream, name: &str) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let body = format!("hello from {name}\n");
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let http10 = line.trim_end().ends_with("HTTP/1.0");
        let mut close = http10;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower == "connection: close" {
                close = true;
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        io::copy(&mut (&mut reader).take(length as u64), &mut io::sink())?;
        // One write: a response split over several small writes waits on Nagle and the
        // peer's delayed ACK (40 ms) on keep-alive connections.
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-served-by: {name}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        writer.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}
