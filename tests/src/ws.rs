//! A WebSocket client opened from inside a pod: the RFC 6455 handshake on a raw socket, masked
//! frames out, frames in. The framing is the built-in app's own (`isthmus_ctl::app::ws`), so
//! client and server agree on the wire format by construction; the handshake's accept key is
//! checked against the RFC's formula.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use isthmus_ctl::app::ws::{accept_key, encode_frame, read_frame, OP_BINARY, OP_CLOSE, OP_TEXT};
use isthmus_ctl::local::Pod;

pub use isthmus_ctl::app::ws::Frame;

/// An open WebSocket.
pub struct WebSocket {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The handshake response's header lines (after the status line), as received.
    pub response_headers: Vec<String>,
    mask_seed: u32,
}

impl WebSocket {
    /// Connects from inside `pod` to `addr`, sends the upgrade for `path` with `Host: host`,
    /// and checks the `101` and its `Sec-WebSocket-Accept`. Reads time out after 10 s.
    pub fn connect(pod: &Pod, addr: SocketAddr, host: &str, path: &str) -> Result<Self, String> {
        let stream = pod.connect(addr).map_err(|e| e.to_string())?;
        let fail = |e: io::Error| format!("websocket to {addr}: {e}");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(fail)?;
        let mut writer = stream.try_clone().map_err(fail)?;
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        write!(
            writer,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .map_err(fail)?;
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).map_err(fail)?;
        let mut response_headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(fail)? == 0 {
                return Err(format!("websocket to {addr}: closed during the handshake"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            response_headers.push(line.to_string());
        }
        if status.split(' ').nth(1) != Some("101") {
            return Err(format!(
                "websocket to {addr}: {:?} {response_headers:?}",
                status.trim_end()
            ));
        }
        let accept = response_headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| v.trim())
        });
        if accept != Some(accept_key(key).as_str()) {
            return Err(format!(
                "websocket to {addr}: wrong Sec-WebSocket-Accept {accept:?}"
            ));
        }
        Ok(WebSocket {
            reader,
            writer,
            response_headers,
            mask_seed: 0x9e37_79b9,
        })
    }

    /// The first handshake response header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.response_headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Sends one complete frame, masked (a fresh key each frame, as clients must).
    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.mask_seed ^= self.mask_seed << 13;
        self.mask_seed ^= self.mask_seed >> 17;
        self.mask_seed ^= self.mask_seed << 5;
        let frame = Frame {
            fin: true,
            opcode,
            payload: payload.to_vec(),
        };
        self.writer
            .write_all(&encode_frame(&frame, Some(self.mask_seed.to_be_bytes())))
    }

    /// The next frame; `Ok(None)` if the connection ended cleanly.
    pub fn recv(&mut self) -> io::Result<Option<Frame>> {
        read_frame(&mut self.reader)
    }

    /// Sends `payload` as a text (valid UTF-8) or binary frame and returns the frame that comes back.
    pub fn round_trip(&mut self, payload: &[u8]) -> io::Result<Frame> {
        let opcode = if std::str::from_utf8(payload).is_ok() {
            OP_TEXT
        } else {
            OP_BINARY
        };
        self.send(opcode, payload)?;
        self.recv()?
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }

    /// Exercises an echo peer: a text frame, a 70,000-byte binary frame (a 64-bit length), a
    /// ping answered by a pong, then a close answered by a close. `Err` names the step that
    /// differed.
    pub fn echo_session(mut self) -> Result<(), String> {
        let fail = |step: &str, e: io::Error| format!("{step}: {e}");
        let text = self.round_trip(b"echo me").map_err(|e| fail("text", e))?;
        if (text.opcode, text.payload.as_slice()) != (OP_TEXT, &b"echo me"[..]) {
            return Err(format!("text frame came back as {text:?}"));
        }
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
        let binary = self.round_trip(&big).map_err(|e| fail("binary", e))?;
        if binary.opcode != OP_BINARY || binary.payload != big {
            return Err(format!(
                "binary frame differs: opcode {}, {} bytes",
                binary.opcode,
                binary.payload.len()
            ));
        }
        self.send(0x9, b"ping").map_err(|e| fail("ping", e))?;
        match self.recv().map_err(|e| fail("pong", e))? {
            Some(pong) if (pong.opcode, pong.payload.as_slice()) == (0xA, &b"ping"[..]) => {}
            other => return Err(format!("ping answered with {other:?}")),
        }
        match self.close().map_err(|e| fail("close", e))? {
            Some(close) if close.opcode == OP_CLOSE => Ok(()),
            other => Err(format!("close answered with {other:?}")),
        }
    }

    /// Sends a close (status 1000) and returns the peer's answering frame, if any.
    pub fn close(mut self) -> io::Result<Option<Frame>> {
        self.send(OP_CLOSE, &1000u16.to_be_bytes())?;
        self.recv()
    }
}
