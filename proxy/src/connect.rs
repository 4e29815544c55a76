//! The connect stage: dial the plan's candidates in order, each attempt bounded, all of them
//! together bounded by one deadline. TLS origination (mTLS to meshed endpoints) slots in here.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::runtime::{Elapsed, Runtime};
use crate::telemetry::ResponseFlag;

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct ConnectPolicy {
    /// One attempt's limit before the next candidate is tried.
    pub attempt_timeout: Duration,
    /// All attempts together (Istio's `connectTimeout`, 10 s by default).
    pub deadline: Duration,
    /// How many candidates to try.
    pub attempts: usize,
}

/// What secures the upstream connection. Plaintext today; mutual TLS with the peer's
/// expected SPIFFE identity arrives with the mTLS issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    None,
}

/// A connected upstream.
pub struct Connected<S> {
    pub stream: S,
    pub addr: SocketAddr,
    /// The endpoint's index in its cluster (`None`: the original destination).
    pub endpoint: Option<usize>,
    pub tls: UpstreamTls,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no endpoint to connect to")]
    NoCandidates,
    #[error("{attempts} connect attempt(s) failed, the last to {addr}: {error}")]
    Failed {
        attempts: usize,
        addr: SocketAddr,
        error: io::Error,
    },
    #[error("connect deadline of {deadline:?} passed after {attempts} attempt(s)")]
    Deadline { deadline: Duration, attempts: usize },
}

impl ConnectError {
    pub fn flag(&self) -> ResponseFlag {
        match self {
            ConnectError::NoCandidates => ResponseFlag::NoHealthyUpstream,
            ConnectError::Failed { .. } | ConnectError::Deadline { .. } => {
                ResponseFlag::UpstreamConnectFailure
            }
        }
    }
}

/// Tries `candidates` (address, endpoint index) in order until one connects.
pub async fn connect<R: Runtime>(
    candidates: &[(SocketAddr, Option<usize>)],
    policy: &ConnectPolicy,
) -> Result<Connected<R::Stream>, ConnectError> {
    let overall = Instant::now() + policy.deadline;
    let mut last = None;
    for (attempt, &(addr, endpoint)) in candidates.iter().take(policy.attempts.max(1)).enumerate() {
        let now = Instant::now();
        if now >= overall {
            return Err(ConnectError::Deadline {
                deadline: policy.deadline,
                attempts: attempt,
            });
        }
        let until = (now + policy.attempt_timeout).min(overall);
        let error = match R::deadline(until, R::connect(addr)).await {
            Ok(Ok(stream)) => {
                return Ok(Connected {
                    stream,
                    addr,
                    endpoint,
                    tls: UpstreamTls::None,
                })
            }
            Ok(Err(e)) => e,
            Err(Elapsed) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        };
        tracing::debug!(%addr, "connect failed: {error}");
        last = Some((attempt + 1, addr, error));
    }
    match last {
        None => Err(ConnectError::NoCandidates),
        Some(_) if Instant::now() >= overall => Err(ConnectError::Deadline {
            deadline: policy.deadline,
            attempts: candidates.len().min(policy.attempts.max(1)),
        }),
        Some((attempts, addr, error)) => Err(ConnectError::Failed {
            attempts,
            addr,
            error,
        }),
    }
}
