//! Streaming HTTP/1 bodies from one connection to the other as they arrive: never a whole
//! body in memory. Framing is checked on the way (a chunked body is scanned byte-exactly), so
//! a message's end is known for certain before the connection is reused.

use std::io;
use std::time::{Duration, Instant};

use super::h1::{Chunked, Framing, H1Error, Limits};
use super::io::Conn;

/// Why a body did not make it across.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The sending side closed before the body ended.
    #[error("connection closed in the middle of the body")]
    Truncated,
    #[error("reading the body: {0}")]
    Read(io::Error),
    #[error("writing the body: {0}")]
    Write(io::Error),
    #[error("no body bytes for {0:?}")]
    Stalled(Duration),
    #[error(transparent)]
    Framing(#[from] H1Error),
}

/// How a chunked body is passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// As it came: chunk sizes, extensions and trailers included (HTTP/1.1 to HTTP/1.1).
    Keep,
    /// Chunk data only (to an HTTP/1.0 client, which has no chunked coding: the connection's
    /// close ends the body).
    Strip,
}

/// Forwards the body framed by `framing` from `from` to `to`. Each read waits at most
/// `stall`. Returns the body's bytes as sent.
pub async fn forward(
    from: &mut Conn,
    to: &mut Conn,
    framing: Framing,
    chunking: Chunking,
    limits: &Limits,
    stall: Duration,
) -> Result<u64, BodyError> {
    match framing {
        Framing::Empty | Framing::Tunnel => Ok(0),
        Framing::Length(n) => forward_length(from, to, n, stall).await,
        Framing::UntilClose => forward_until_close(from, to, stall).await,
        Framing::Chunked => forward_chunked(from, to, chunking, limits, stall).await,
    }
}

async fn more(from: &mut Conn, stall: Duration) -> Result<(), BodyError> {
    match from.fill_until(Instant::now() + stall).await {
        None => Err(BodyError::Stalled(stall)),
        Some(Ok(0)) => Err(BodyError::Truncated),
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(BodyError::Read(e)),
    }
}

async fn forward_length(
    from: &mut Conn,
    to: &mut Conn,
    length: u64,
    stall: Duration,
) -> Result<u64, BodyError> {
    let mut left = length;
    while left > 0 {
        if from.buffered().is_empty() {
            more(from, stall).await?;
        }
        let n = (from.buffered().len() as u64).min(left) as usize;
        from.pass(n, to).await.map_err(BodyError::Write)?;
        left -= n as u64;
    }
    Ok(length)
}

async fn forward_until_close(
    from: &mut Conn,
    to: &mut Conn,
    stall: Duration,
) -> Result<u64, BodyError> {
    let mut total = 0u64;
    loop {
        let n = from.buffered().len();
        if n > 0 {
            from.pass(n, to).await.map_err(BodyError::Write)?;
            total += n as u64;
        }
        match from.fill_until(Instant::now() + stall).await {
            None => return Err(BodyError::Stalled(stall)),
            Some(Ok(0)) => return Ok(total),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(BodyError::Read(e)),
        }
    }
}

async fn forward_chunked(
    from: &mut Conn,
    to: &mut Conn,
    chunking: Chunking,
    limits: &Limits,
    stall: Duration,
) -> Result<u64, BodyError> {
    let mut scanner = Chunked::new(limits);
    let mut total = 0u64;
    let mut data = Vec::new();
    loop {
        if from.buffered().is_empty() {
            more(from, stall).await?;
        }
        let scanned = scanner.scan(from.buffered())?;
        match chunking {
            Chunking::Keep => {
                from.pass(scanned.consumed, to)
                    .await
                    .map_err(BodyError::Write)?;
                total += scanned.consumed as u64;
            }
            Chunking::Strip => {
                data.clear();
                for range in &scanned.data {
                    data.extend_from_slice(&from.buffered()[range.clone()]);
                }
                to.write_all(&data).await.map_err(BodyError::Write)?;
                total += data.len() as u64;
                from.consume(scanned.consumed);
            }
        }
        if scanned.done {
            return Ok(total);
        }
    }
}

/// Reads until the first `length` body bytes are buffered in `from` (for a body that may be
/// replayed on retry: it stays in the connection's buffer, no copy).
pub async fn buffer_length(
    from: &mut Conn,
    length: usize,
    stall: Duration,
) -> Result<(), BodyError> {
    while from.buffered().len() < length {
        more(from, stall).await?;
    }
    Ok(())
}

/// Reads and drops a body (a request answered locally, or a response not passed on), so the
/// connection can carry the next message. Gives up past `max` bytes: `Ok(false)`, and the
/// caller closes the connection instead.
pub async fn discard(
    from: &mut Conn,
    framing: Framing,
    limits: &Limits,
    max: u64,
    stall: Duration,
) -> Result<bool, BodyError> {
    match framing {
        Framing::Empty => Ok(true),
        Framing::Tunnel | Framing::UntilClose => Ok(false),
        Framing::Length(n) if n > max => Ok(false),
        Framing::Length(n) => {
            let mut left = n;
            while left > 0 {
                if from.buffered().is_empty() {
                    more(from, stall).await?;
                }
                let take = (from.buffered().len() as u64).min(left) as usize;
                from.consume(take);
                left -= take as u64;
            }
            Ok(true)
        }
        Framing::Chunked => {
            let mut scanner = Chunked::new(limits);
            let mut seen = 0u64;
            loop {
                if from.buffered().is_empty() {
                    more(from, stall).await?;
                }
                let scanned = scanner.scan(from.buffered())?;
                from.consume(scanned.consumed);
                seen += scanned.consumed as u64;
                if scanned.done {
                    return Ok(true);
                }
                if seen > max {
                    return Ok(false);
                }
            }
        }
    }
}
