//! The issuance loop: request at start, renew at half-life, back off on failure, drop the
//! certificate the moment it expires. Each change is swapped into the store whole and shown
//! in metrics and the log.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::client::{self, RequestError};
use super::schedule::{jitter, renew_delay};
use super::{csr, Certified, IdentityStore, Settings, State};
use crate::metrics::{Metrics, ResultLabels};

/// Starts the loop on the current tokio runtime; it runs until the process ends.
pub fn spawn(
    settings: Settings,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(settings, store, metrics))
}

async fn run(settings: Settings, store: Arc<IdentityStore>, metrics: Arc<Metrics>) {
    let mut failures = 0u32;
    loop {
        let started = SystemTime::now();
        store.update_status(|s| s.last_attempt = Some(started));
        let delay = match issue(&settings).await {
            Ok(certified) => {
                failures = 0;
                count(&metrics, "success");
                let not_after = certified.info.not_after;
                tracing::info!(
                    spiffe_id = %certified.info.spiffe_id,
                    serial = %certified.info.serial,
                    not_after = %crate::http::access_log::rfc3339(not_after),
                    "workload certificate issued"
                );
                metrics.certificate_expiry.set(unix_seconds(not_after));
                store.set_certified(Some(Arc::new(certified)));
                let delay = renew_delay(SystemTime::now(), not_after, jitter());
                store.update_status(|s| {
                    s.state = State::Issued;
                    s.last_error = None;
                    s.next_attempt = Some(SystemTime::now() + delay);
                });
                delay
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                count(&metrics, e.result());
                let delay = settings.retry.delay(failures, jitter());
                let held = store.current().is_some();
                tracing::warn!(
                    ca = %settings.ca_address,
                    retry_in = ?delay,
                    keeping_current = held,
                    "workload certificate request failed: {e}"
                );
                let why = e.to_string();
                store.update_status(|s| {
                    s.last_error = Some(why.clone());
                    s.next_attempt = Some(SystemTime::now() + delay);
                });
                delay
            }
        };
        sleep_watching_expiry(&store, &metrics, delay).await;
    }
}

/// One attempt: a new key and CSR, the CA's answer checked against both.
async fn issue(settings: &Settings) -> Result<Certified, RequestError> {
    let request =
        csr::new_request(&settings.spiffe_id).map_err(|e| RequestError::Csr(e.to_string()))?;
    let issued = client::request(settings, &request.csr_pem).await?;
    Certified::new(
        &request.key,
        &settings.spiffe_id,
        &issued.cert_chain,
        &issued.trust_bundle,
        SystemTime::now(),
    )
    .map_err(|e| RequestError::Malformed(e.to_string()))
}

/// Sleeps `delay`; if the held certificate expires first, drops it then (and says so) and
/// sleeps the rest.
async fn sleep_watching_expiry(store: &IdentityStore, metrics: &Metrics, delay: Duration) {
    let wake = Instant::now() + delay;
    if let Some(held) = store.certified.load_full() {
        let left = held
            .info
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left < delay {
            tokio::time::sleep(left).await;
            store.set_certified(None);
            metrics.certificate_expiry.set(0.0);
            store.update_status(|s| s.state = State::Expired);
            tracing::error!(
                serial = %held.info.serial,
                "workload certificate expired before it could be renewed: dropped, this \
                 sidecar has no identity until the CA issues a new one"
            );
        }
    }
    tokio::time::sleep_until(wake).await;
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .certificate_requests
        .get_or_create(&ResultLabels { result })
        .inc();
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
