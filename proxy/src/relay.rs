//! Copying bytes both ways until both sides have finished, with half-close: when one side
//! sends FIN we pass it on (shutdown write) and keep copying the other way.

use std::io;

use prometheus_client::metrics::counter::Counter;

use crate::runtime::Stream;

/// Each direction starts with a small buffer, so an idle connection costs little (a completion
/// read owns its buffer while it waits), and doubles it whenever a read fills it, up to a size
/// that keeps bulk transfers at a few syscalls per megabyte.
const INITIAL_BUFFER: usize = 2 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client → server.
    pub upstream: u64,
    /// Server → client.
    pub downstream: u64,
}

/// Relays between `client` and `server` until both directions reach end of stream, or either
/// fails (then the other is abandoned: a reset on one side must not leave the other hanging).
/// `to_server` / `to_client` count bytes as they flow, so long connections show up in metrics
/// before they close.
pub async fn relay<C: Stream, S: Stream>(
    client: &C,
    server: &S,
    to_server: &Counter,
    to_client: &Counter,
) -> (Transferred, io::Result<()>) {
    let up = copy_half(client, server, to_server);
    let down = copy_half(server, client, to_client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (None, None);
    while up_done.is_none() || down_done.is_none() {
        tokio::select! {
            r = &mut up, if up_done.is_none() => up_done = Some(r),
            r = &mut down, if down_done.is_none() => down_done = Some(r),
        }
        let failed = [&up_done, &down_done]
            .into_iter()
            .flatten()
            .any(|(_, r): &(u64, io::Result<()>)| r.is_err());
        if failed {
            break;
        }
    }
    let transferred = Transferred {
        upstream: up_done.as_ref().map_or(0, |r| r.0),
        downstream: down_done.as_ref().map_or(0, |r| r.0),
    };
    let result = match (up_done, down_done) {
        (Some((_, Err(e))), _) | (_, Some((_, Err(e)))) => Err(e),
        _ => Ok(()),
    };
    (transferred, result)
}

/// One direction: read from `from`, write to `to`; on end of stream, half-close `to`.
async fn copy_half<A: Stream, B: Stream>(
    from: &A,
    to: &B,
    counter: &Counter,
) -> (u64, io::Result<()>) {
    let mut buf = Vec::with_capacity(INITIAL_BUFFER);
    let mut total = 0u64;
    loop {
        let (read, b) = from.read(buf).await;
        buf = b;
        if matches!(read, Ok(n) if n == buf.capacity() && n < MAX_BUFFER) {
            // Filled: the peer is sending faster than this buffer drains. Grow for the next read.
            let mut bigger = Vec::with_capacity((buf.capacity() * 2).min(MAX_BUFFER));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        match read {
            Ok(0) => {
                // A peer that already closed makes shutdown fail with ENOTCONN: harmless.
                let _ = to.shutdown_write();
                return (total, Ok(()));
            }
            Ok(n) => {
                let (written, b) = to.write_all(buf).await;
                buf = b;
                if let Err(e) = written {
                    return (total, Err(e));
                }
                total += n as u64;
                counter.inc_by(n as u64);
            }
            Err(e) => {
                let _ = to.shutdown_write();
                return (total, Err(e));
            }
        }
    }
}
