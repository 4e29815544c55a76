//! Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it:
//! the holder renews the Lease every couple of seconds; another replica takes it only once it
//! is absent, released, or expired — seen unchanged by this replica for `leaseDurationSeconds`
//! (its own monotonic clock only, never the holder's `renewTime`, so a skewed clock cannot
//! steal a live lease). Every write is a PUT carrying the resourceVersion it read: of
//! two replicas racing for the same Lease exactly one succeeds, the other gets 409.
//!
//! Only the leader writes ConfigMaps, Events and the webhook configuration's caBundle; every
//! replica watches, serves the webhook and answers /healthz and /readyz. A leader that cannot
//! renew within the renew deadline (shorter than the lease) stops writing before anyone else
//! may take over.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// Where the Lease is and who we are.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// The controller's own namespace (`POD_NAMESPACE`).
    pub namespace: String,
    pub name: String,
    /// `POD_NAME`, else the hostname: unique per replica.
    pub identity: String,
    /// How long a lease lasts without renewal (client-go's default: 15 s).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops writing (shorter than the lease, so
    /// it stops before another replica may take over).
    pub renew_deadline: Duration,
    /// How often the leader renews and the others try.
    pub retry_period: Duration,
}

impl LeaseOptions {
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        LeaseOptions {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this replica may write now. Cheap to clone and to ask.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// The sender of [`Leadership::always`], kept so `changed` waits rather than fails.
    _always: Option<Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// Leader from the start, for good (`--leader-elect=false`: one replica, or tests).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        Leadership {
            rx,
            _always: Some(Arc::new(tx)),
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes on the next gain or loss of leadership.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the election while it lives: [`Elector::leadership`] follows the Lease. Dropped, it
/// stops renewing; [`Elector::release_after`] also gives the Lease up on a clean shutdown, so
/// another replica takes over at once instead of after the lease duration.
pub struct Elector {
    leadership: Leadership,
    gauge: Gauge,
    tx: Option<Arc<watch::Sender<bool>>>,
    task: Option<(tokio::task::JoinHandle<()>, Api<Lease>, LeaseOptions)>,
}

impl Elector {
    /// Starts electing with `options`, or is the leader for good without them
    /// (`--leader-elect=false`). Registers `isthmus_controller_leader` (1 while leader).
    pub fn start(
        client: &kube::Client,
        options: Option<LeaseOptions>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let gauge = Gauge::default();
        registry.register(
            "isthmus_controller_leader",
            "1 while this replica holds the Lease and writes (always 1 without leader election)",
            gauge.clone(),
        );
        let Some(options) = options else {
            gauge.set(1);
            return Elector {
                leadership: Leadership::always(),
                gauge,
                tx: None,
                task: None,
            };
        };
        let (tx, rx) = watch::channel(false);
        let tx = Arc::new(tx);
        let api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
        let task = tokio::spawn(elect(
            api.clone(),
            options.clone(),
            tx.clone(),
            gauge.clone(),
        ));
        Elector {
            leadership: Leadership { rx, _always: None },
            gauge,
            tx: Some(tx),
            task: Some((task, api, options)),
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// `shutdown`, then the Lease released (if held): what the controller waits on to stop.
    pub async fn release_after(mut self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        let Some((task, api, options)) = self.task.take() else {
            return;
        };
        task.abort();
        let _ = task.await;
        self.step_down();
        if let Err(e) = release(&api, &options).await {
            tracing::warn!(lease = %options.name, error = %e, "releasing the Lease failed: another replica takes over once it expires");
        }
    }
}

impl Elector {
    /// Stops writing now (the renewing task is gone).
    fn step_down(&self) {
        if let Some(tx) = &self.tx {
            tx.send_replace(false);
            self.gauge.set(0);
        }
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        if let Some((task, _, _)) = &self.task {
            task.abort();
        }
        self.step_down();
    }
}

/// Gives the Lease up if we hold it (client-go's ReleaseOnCancel): no holder, renewed now,
/// one second long.
async fn release(api: &Api<Lease>, options: &LeaseOptions) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&options.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(options.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Timestamp::try_from(SystemTime::now()).ok().map(MicroTime);
    api.replace(&options.name, &PostParams::default(), &lease)
        .await?;
    tracing::info!(lease = %options.name, identity = %options.identity, "released the Lease");
    Ok(())
}

/// The record as last seen, and when this replica first saw it so.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

async fn elect(api: Api<Lease>, options: LeaseOptions, tx: Arc<watch::Sender<bool>>, gauge: Gauge) {
    let set = |leader: bool| {
        if *tx.borrow() != leader {
            if leader {
                tracing::info!(lease = %options.name, identity = %options.identity, "became the leader: writing");
            } else {
                tracing::warn!(lease = %options.name, identity = %options.identity, "no longer the leader: stopped writing");
            }
            tx.send_replace(leader);
        }
        gauge.set(i64::from(leader));
    };
    let mut observed: Option<Observed> = None;
    let mut renewed: Option<Instant> = None;
    loop {
        // A hung API call must not keep a leader writing past its deadline: bounded, and the
        // renewal counts from when it was sent (the renewTime it carries).
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            options.renew_deadline,
            try_acquire_or_renew(&api, &options, &mut observed),
        )
        .await
        .unwrap_or_else(|_| Err(timed_out()));
        match attempt {
            Ok(true) => {
                renewed = Some(started);
                set(true);
            }
            Ok(false) => set(false),
            Err(e) => {
                let stale = renewed.is_none_or(|at| at.elapsed() >= options.renew_deadline);
                tracing::warn!(lease = %options.name, error = %e, "reading or renewing the Lease failed (may the controller get, create and update leases in its namespace?)");
                if stale {
                    set(false);
                }
            }
        }
        tokio::time::sleep(options.retry_period).await;
    }
}

fn timed_out() -> kube::Error {
    kube::Error::Service(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer from the API server within the renew deadline",
    )))
}

/// One round: `Ok(true)` when we hold the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    options: &LeaseOptions,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = SystemTime::now();
    let Some(mut lease) = api.get_opt(&options.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(options.name.clone()),
                namespace: Some(options.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec(options, now, None, 0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let record = (current.holder_identity.clone(), current.renew_time.clone());
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record,
            since: Instant::now(),
        });
    }
    let ours = current.holder_identity.as_deref() == Some(options.identity.as_str());
    if !ours && !expired(&current, observed.as_ref()) {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let acquired = if ours {
        current.acquire_time.clone()
    } else {
        None
    };
    lease.spec = Some(spec(options, now, acquired, transitions));
    match api
        .replace(&options.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        // Someone else wrote since our read: they won this round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Free to take: released (no holder), or seen unchanged by this replica for the lease's
/// duration. Only this replica's own observation counts — never the holder's `renewTime` read
/// against our clock, which client-go does not trust either: a replica whose clock runs ahead
/// would take a live Lease, and two would write (found in review). A Lease first seen just now
/// is therefore waited out for one duration before it is taken.
fn expired(spec: &LeaseSpec, observed: Option<&Observed>) -> bool {
    if spec.holder_identity.as_deref().unwrap_or("").is_empty() {
        return true;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    observed.is_some_and(|o| o.since.elapsed() > duration)
}

fn spec(
    options: &LeaseOptions,
    now: SystemTime,
    acquired: Option<MicroTime>,
    transitions: i32,
) -> LeaseSpec {
    let now = Timestamp::try_from(now)
        .map(MicroTime)
        .unwrap_or(MicroTime(Timestamp::UNIX_EPOCH));
    LeaseSpec {
        holder_identity: Some(options.identity.clone()),
        lease_duration_seconds: Some(options.lease_duration.as_secs() as i32),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed_secs_ago: u64) -> LeaseSpec {
        let at = SystemTime::now() - Duration::from_secs(renewed_secs_ago);
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::try_from(at).unwrap())),
            ..LeaseSpec::default()
        }
    }

    fn seen(spec: &LeaseSpec, secs_ago: u64) -> Observed {
        Observed {
            record: (spec.holder_identity.clone(), spec.renew_time.clone()),
            since: Instant::now() - Duration::from_secs(secs_ago),
        }
    }

    #[test]
    fn a_lease_seen_changing_within_its_duration_is_not_expired() {
        let spec = held("a", 3);
        assert!(!expired(&spec, Some(&seen(&spec, 3))));
    }

    #[test]
    fn a_released_lease_is_expired_at_once() {
        assert!(expired(&held("", 0), None));
        assert!(expired(&LeaseSpec::default(), None));
    }

    #[test]
    fn a_record_seen_unchanged_for_the_duration_is_expired_whatever_its_clock_says() {
        // The holder's clock runs ahead: renewTime looks fresh, but it has not changed.
        let spec = held("a", 0);
        assert!(expired(&spec, Some(&seen(&spec, 16))));
    }

    /// Found in review: `renewTime` compared with this replica's clock counted too, so a
    /// replica whose clock ran more than the lease duration ahead took a live Lease on its
    /// first look, and two replicas wrote.
    #[test]
    fn a_live_lease_is_not_taken_by_a_replica_whose_clock_runs_ahead() {
        // Renewed "20 s ago" by our clock (ours is ahead), first seen just now.
        let spec = held("a", 20);
        assert!(!expired(&spec, Some(&seen(&spec, 0))));
        assert!(!expired(&spec, None));
    }

    #[test]
    fn always_is_leader() {
        assert!(Leadership::always().is_leader());
    }
}
