//! `isthmus-proxy wait`: block until the sidecar in this pod is ready. The classic (non-native)
//! sidecar runs it as its postStart hook: the kubelet does not start the next container until
//! the hook returns, so the app starts only once the proxy has bound its listeners and loaded a
//! config (Istio's `holdApplicationUntilProxyStarts` with `pilot-agent wait`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::app_probe::{get_request, http_status};

#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Ask this often.
    #[arg(long, default_value_t = 200)]
    pub period_ms: u64,
    /// The sidecar's readiness endpoint.
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub address: SocketAddr,
    #[arg(long, default_value = "/healthz/ready")]
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the proxy at {address} is not ready after {waited:?} (last answer: {last}); see the isthmus-proxy container's log")]
    NotReady {
        address: SocketAddr,
        waited: Duration,
        last: String,
    },
    #[error("cannot start the wait's runtime: {0}")]
    Runtime(std::io::Error),
}

/// Asks the readiness endpoint every `period_ms` until it answers 200 (returns how long that
/// took) or `timeout_secs` have passed.
pub fn wait(args: &WaitArgs) -> Result<Duration, WaitError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WaitError::Runtime)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let period = Duration::from_millis(args.period_ms.max(1));
    let request = get_request(args.address, &args.path, &[]);
    runtime.block_on(async {
        loop {
            // One attempt may not outlive the deadline, nor hang on a stuck peer.
            let budget = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), Duration::from_secs(2));
            let last = match tokio::time::timeout(budget, http_status(args.address, &request, 512))
                .await
            {
                Ok(Ok(answer)) if answer.status == 200 => return Ok(started.elapsed()),
                Ok(Ok(answer)) => format!("{} {}", answer.status, answer.body.trim()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {budget:?}"),
            };
            if Instant::now() + period > deadline {
                return Err(WaitError::NotReady {
                    address: args.address,
                    waited: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(period).await;
        }
    })
}
