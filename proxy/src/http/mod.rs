//! HTTP: the L7 stage that follows detection. HTTP/1 message framing ([`h1`]) is pure code over
//! the connection's owned buffers ([`io`]); [`server`] serves a client connection's requests,
//! each routed by [`router`] on the current snapshot, changed by [`filters`], answered locally
//! ([`local`]) or sent upstream ([`upstream`], over [`pool`]ed connections) with [`retry`]
//! and bodies streamed by [`body`]. L7 runs on tokio's readiness I/O on the worker's thread
//! whatever the L4 backend (docs/ARCHITECTURE.md, "L7 I/O model").

use std::time::Duration;

pub mod access_log;
pub mod body;
pub mod cors;
pub mod decide;
pub mod filters;
pub mod h1;
pub mod h2;
pub mod io;
pub mod local;
pub mod mirror;
pub mod pool;
pub mod record;
pub mod retry;
pub mod router;
pub mod server;
pub mod upstream;

/// The HTTP bounds and defaults every connection shares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: h1::Limits,
    /// A request head must arrive within this once its connection is waited on (slowloris).
    pub header_timeout: Duration,
    /// A keep-alive client connection idle this long is closed (Envoy's HTTP idle timeout).
    pub idle_timeout: Duration,
    /// A body that sends nothing for this long is abandoned (Envoy's stream idle timeout).
    pub stall: Duration,
    /// Request bodies of known length up to this are kept for retries; larger ones are
    /// streamed and not retried once sent.
    pub replay_max: usize,
    /// A body the proxy does not pass on is read and dropped up to this, to keep the
    /// connection; larger ones close it.
    pub discard_max: u64,
    /// Idle upstream connections are closed after this unless the DestinationRule says
    /// otherwise (Istio's `connectionPool.http.idleTimeout`, 1 h).
    pub pool_idle: Duration,
    /// One line per request on stdout, in this format (`--access-log`).
    pub access_log: Option<access_log::Format>,
    /// This workload's labels, for `sourceLabels` matches.
    pub source_labels: Vec<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            limits: h1::Limits::default(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            stall: Duration::from_secs(300),
            replay_max: 64 * 1024,
            discard_max: 64 * 1024,
            pool_idle: Duration::from_secs(3600),
            source_labels: Vec::new(),
            access_log: None,
        }
    }
}
