//! Bodies across the proxy under h2 flow control: data is read from one side, written to the
//! other as the peer's window allows, and only then is the window it took on the reading side
//! released — a slow reader slows its writer, and the proxy holds at most a window per stream.
//! The request body also keeps a copy of what it sent, up to `replay_max`, so that a retry can
//! send it again (Envoy's retry buffer).

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use ::h2::{Reason, RecvStream, SendStream};
use ::http::HeaderMap;
use bytes::Bytes;

use super::MessageCounter;

/// Which side broke a body's passage, and how.
#[derive(Debug)]
pub enum PumpError {
    /// Reading failed: the sending peer reset the stream or its connection failed.
    Source(SideError),
    /// Writing failed: the receiving peer reset the stream or went away.
    Sink(SideError),
    /// Nothing arrived for the stall bound.
    Stalled(Duration),
}

#[derive(Debug)]
pub enum SideError {
    H2(::h2::Error),
    Io(io::Error),
    /// An HTTP/1 body that ended early or broke its framing.
    Framing(String),
}

impl SideError {
    /// The reset to pass on to the other side of the proxy for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            SideError::H2(e) => e.reason().unwrap_or(Reason::INTERNAL_ERROR),
            _ => Reason::INTERNAL_ERROR,
        }
    }
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (side, e) = match self {
            PumpError::Source(e) => ("reading", e),
            PumpError::Sink(e) => ("writing", e),
            PumpError::Stalled(d) => return write!(f, "no body bytes for {d:?}"),
        };
        match e {
            SideError::H2(e) => write!(f, "{side}: {e}"),
            SideError::Io(e) => write!(f, "{side}: {e}"),
            SideError::Framing(e) => write!(f, "{side}: {e}"),
        }
    }
}

/// Sends `data` on an h2 stream as its window allows (never buffering more than the window in
/// h2), `end` on the last piece.
pub async fn send_data(
    to: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), ::h2::Error> {
    if data.is_empty() {
        return if end {
            to.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        to.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| to.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(e),
            None => return Err(Reason::STREAM_CLOSED.into()),
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        to.send_data(piece, end && data.is_empty())?;
    }
    Ok(())
}

/// Ends an h2 stream: with trailers, or an empty DATA frame with END_STREAM.
pub fn finish(to: &mut SendStream<Bytes>, trailers: Option<HeaderMap>) -> Result<(), ::h2::Error> {
    match trailers {
        Some(t) => to.send_trailers(t),
        None => to.send_data(Bytes::new(), true),
    }
}

/// What a response body's passage moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub bytes: u64,
    /// `grpc-status` of the trailers, if any.
    pub grpc_status: Option<u32>,
}

/// Copies an h2 body (data, then trailers) from `from` to `to`, watching `to` for a reset.
/// `counter` counts gRPC messages on the way.
pub async fn h2_to_h2(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    stall: Duration,
    mut counter: Option<&mut MessageCounter>,
) -> Result<Moved, PumpError> {
    let mut total = 0u64;
    loop {
        let next = tokio::select! {
            next = next_data(from, stall) => next?,
            reset = poll_fn(|cx| to.poll_reset(cx)) => {
                let e = reset.map_or_else(|e| e, ::h2::Error::from);
                return Err(PumpError::Sink(SideError::H2(e)));
            }
        };
        let Some(chunk) = next else { break };
        let n = chunk.len();
        total += n as u64;
        if let Some(c) = counter.as_deref_mut() {
            c.feed(&chunk);
        }
        let end = from.is_end_stream();
        send_data(to, chunk, end)
            .await
            .map_err(|e| PumpError::Sink(SideError::H2(e)))?;
        let _ = from.flow_control().release_capacity(n);
        if end {
            return Ok(Moved {
                bytes: total,
                grpc_status: None,
            });
        }
    }
    let trailers = next_trailers(from, stall).await?;
    let grpc_status = trailers.as_ref().and_then(grpc_status_of);
    finish(to, trailers).map_err(|e| PumpError::Sink(SideError::H2(e)))?;
    Ok(Moved {
        bytes: total,
        grpc_status,
    })
}

/// The `grpc-status` of an h2 header block (trailers, or a trailers-only response's head).
pub fn grpc_status_of(map: &HeaderMap) -> Option<u32> {
    map.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The next DATA payload, or `None` at the end of the data.
pub async fn next_data(from: &mut RecvStream, stall: Duration) -> Result<Option<Bytes>, PumpError> {
    match tokio::time::timeout(stall, from.data()).await {
        Err(_) => Err(PumpError::Stalled(stall)),
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(e))) => Err(PumpError::Source(SideError::H2(e))),
    }
}

pub async fn next_trailers(
    from: &mut RecvStream,
    stall: Duration,
) -> Result<Option<HeaderMap>, PumpError> {
    match tokio::time::timeout(stall, from.trailers()).await {
        Err(_) => Err(PumpError::Stalled(stall)),
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(PumpError::Source(SideError::H2(e))),
    }
}

/// Where a request body goes: an h2 stream, or an HTTP/1 connection (chunked or as is).
pub enum Sink<'a> {
    H2(&'a mut SendStream<Bytes>),
    H1 {
        conn: &'a mut crate::http::io::Conn,
        chunked: bool,
    },
}

impl Sink<'_> {
    /// The next DATA payload of `from`, or the sink's reset if it comes first.
    async fn next_from(
        &mut self,
        from: &mut RecvStream,
        stall: Duration,
    ) -> Result<Option<Bytes>, PumpError> {
        match self {
            Sink::H2(to) => tokio::select! {
                next = next_data(from, stall) => next,
                reset = poll_fn(|cx| to.poll_reset(cx)) => Err(PumpError::Sink(SideError::H2(
                    reset.map_or_else(|e| e, ::h2::Error::from),
                ))),
            },
            Sink::H1 { .. } => next_data(from, stall).await,
        }
    }

    pub(crate) async fn data(&mut self, chunk: Bytes) -> Result<(), SideError> {
        match self {
            Sink::H2(to) => send_data(to, chunk, false).await.map_err(SideError::H2),
            Sink::H1 { conn, chunked } => {
                if chunk.is_empty() {
                    return Ok(());
                }
                if *chunked {
                    let mut out = Vec::with_capacity(chunk.len() + 16);
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(&chunk);
                    out.extend_from_slice(b"\r\n");
                    conn.write_all(&out).await.map_err(SideError::Io)
                } else {
                    conn.write_all(&chunk).await.map_err(SideError::Io)
                }
            }
        }
    }

    pub(crate) async fn end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), SideError> {
        match self {
            Sink::H2(to) => finish(to, trailers.cloned()).map_err(SideError::H2),
            Sink::H1 {
                conn,
                chunked: true,
            } => {
                let mut out = b"0\r\n".to_vec();
                for (name, value) in trailers.into_iter().flatten() {
                    out.extend_from_slice(name.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
                conn.write_all(&out).await.map_err(SideError::Io)
            }
            Sink::H1 { chunked: false, .. } => Ok(()),
        }
    }
}

/// The downstream request body, read once, with what was read kept for retries while it fits
/// in `limit`.
pub struct RequestBody {
    pub recv: RecvStream,
    kept: Vec<Bytes>,
    kept_len: usize,
    limit: usize,
    /// Something was read that is no longer kept: another attempt cannot send the body.
    /// Shared so that it can be read while an attempt is sending.
    overflowed: Rc<Cell<bool>>,
    /// The whole body (and its trailers) has been read.
    ended: bool,
    trailers: Option<HeaderMap>,
    /// Data bytes read from the client.
    pub bytes: u64,
    /// gRPC messages read, for gRPC requests.
    pub messages: Option<MessageCounter>,
}

impl RequestBody {
    pub fn new(recv: RecvStream, limit: usize, grpc: bool) -> Self {
        let ended = recv.is_end_stream();
        RequestBody {
            recv,
            kept: Vec::new(),
            kept_len: 0,
            limit,
            overflowed: Rc::new(Cell::new(false)),
            ended,
            trailers: None,
            bytes: 0,
            messages: grpc.then(MessageCounter::default),
        }
    }

    /// No body at all (END_STREAM on the request headers).
    pub fn is_empty(&self) -> bool {
        self.ended && self.bytes == 0 && self.trailers.is_none()
    }

    /// Whether another attempt can send the body from its start.
    pub fn replayable(&self) -> bool {
        !self.overflowed.get()
    }

    /// A view of [`RequestBody::replayable`] that stays readable while the body is sending.
    pub fn replayable_flag(&self) -> Replayable {
        Replayable(self.overflowed.clone())
    }

    /// Sends the body (what was kept, then the rest as it arrives) and its end.
    pub async fn send(&mut self, mut to: Sink<'_>, stall: Duration) -> Result<(), PumpError> {
        for chunk in self.kept.clone() {
            to.data(chunk).await.map_err(PumpError::Sink)?;
        }
        if !self.ended {
            while let Some(chunk) = to.next_from(&mut self.recv, stall).await? {
                let n = chunk.len();
                self.bytes += n as u64;
                if let Some(c) = self.messages.as_mut() {
                    c.feed(&chunk);
                }
                let keep = !self.overflowed.get() && self.kept_len + n <= self.limit;
                if keep {
                    // In our custody now: the client's window can open at once.
                    self.kept.push(chunk.clone());
                    self.kept_len += n;
                    let _ = self.recv.flow_control().release_capacity(n);
                } else {
                    self.overflowed.set(true);
                    self.kept = Vec::new();
                }
                to.data(chunk).await.map_err(PumpError::Sink)?;
                if !keep {
                    let _ = self.recv.flow_control().release_capacity(n);
                }
            }
            self.trailers = next_trailers(&mut self.recv, stall).await?;
            self.ended = true;
        }
        to.end(self.trailers.as_ref())
            .await
            .map_err(PumpError::Sink)
    }
}

/// Whether a request body can still be sent again from its start.
#[derive(Clone)]
pub struct Replayable(Rc<Cell<bool>>);

impl Replayable {
    pub fn get(&self) -> bool {
        !self.0.get()
    }
}
