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
    /// How many candidates were dialled.
    pub fn attempts(&self) -> usize {
        match self {
            ConnectError::NoCandidates => 0,
            ConnectError::Failed { attempts, .. } | ConnectError::Deadline { attempts, .. } => {
                *attempts
            }
        }
    }

    pub fn flag(&self) -> ResponseFlag {
        match self {
            ConnectError::NoCandidates => ResponseFlag::NoHealthyUpstream,
            ConnectError::Failed { .. } | ConnectError::Deadline { .. } => {
                ResponseFlag::UpstreamConnectFailure
            }
        }
    }
}

/// Applies a DestinationRule's `tcpKeepalive` to an upstream socket (unset fields keep the
/// OS defaults).
pub fn set_keepalive(socket: &impl std::os::fd::AsRawFd, keepalive: &isthmus_config::TcpKeepalive) {
    let mut params = socket2::TcpKeepalive::new();
    if let Some(time) = keepalive.time {
        params = params.with_time(time);
    }
    if let Some(interval) = keepalive.interval {
        params = params.with_interval(interval);
    }
    if let Some(probes) = keepalive.probes {
        params = params.with_retries(probes);
    }
    // SAFETY: the descriptor belongs to `socket`, alive for the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket.as_raw_fd()) };
    if let Err(e) = socket2::SockRef::from(&fd).set_tcp_keepalive(&params) {
        tracing::debug!("setting TCP keepalive failed: {e}");
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::runtime::{Epoll, Uring};
    use crate::test_support::{on_worker, skip_unless_io_uring};

    /// A local address whose connects hang (SYNs dropped): a listener with a full backlog
    /// that never accepts. Returned with what keeps it full.
    fn black_hole() -> (SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        // Fill the accept queue; later connects are not answered.
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                fillers.push(s);
            }
        }
        (addr, fillers, socket)
    }

    /// Runs `connect` on a worker of backend `R`; returns what it gave and how long it took.
    fn connect_on<R: Runtime>(
        candidates: Vec<(SocketAddr, Option<usize>)>,
        policy: ConnectPolicy,
    ) -> (Result<SocketAddr, String>, Duration) {
        on_worker::<R, _, _, _>(move || {
            let candidates = candidates.clone();
            async move {
                let started = Instant::now();
                let result = connect::<R>(&candidates, &policy)
                    .await
                    .map(|c| c.addr)
                    .map_err(|e| e.to_string());
                (result, started.elapsed())
            }
        })
    }

    /// Attempts that hang are cut at the attempt timeout, and all of them together at the
    /// deadline: three hanging candidates at 300 ms each with a 400 ms deadline give up after
    /// ~400 ms, not 900 ms; a listening candidate after a refused one is reached.
    fn deadline_bounds_all_attempts<R: Runtime>() {
        let (hole, _fillers, _keep) = black_hole();
        let policy = ConnectPolicy {
            attempt_timeout: Duration::from_millis(300),
            deadline: Duration::from_millis(400),
            attempts: 3,
        };
        let (result, took) = connect_on::<R>(vec![(hole, None); 3], policy);
        let error = result.unwrap_err();
        assert!(error.contains("deadline of 400ms"), "{error}");
        assert!(
            took >= Duration::from_millis(390) && took < Duration::from_millis(850),
            "{took:?}"
        );

        let refused = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let open = TcpListener::bind("127.0.0.1:0").unwrap();
        let open_addr = open.local_addr().unwrap();
        let (result, _) = connect_on::<R>(vec![(refused, Some(0)), (open_addr, Some(1))], policy);
        assert_eq!(result, Ok(open_addr));
    }

    #[test]
    fn epoll_deadline_bounds_all_attempts() {
        deadline_bounds_all_attempts::<Epoll>();
    }

    #[test]
    fn io_uring_deadline_bounds_all_attempts() {
        if skip_unless_io_uring() {
            return;
        }
        deadline_bounds_all_attempts::<Uring>();
    }
}
