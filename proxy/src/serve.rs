//! The life of a connection: accept → original destination → plan (route, balance) → connect
//! → relay → outcome recorded once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_config::{Cluster, Service, Snapshot};
use tracing::Instrument;

use crate::balance;
use crate::listen::{self, OrigDst};
use crate::metrics::{Metrics, TcpLabels};
use crate::relay;
use crate::route::{self, Decision};
use crate::runtime::{Listener, Runtime};
use crate::state::ConfigStore;
use crate::telemetry::{Identity, ResponseFlag};

/// Which capture listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the app to the mesh (port 15001).
    Outbound,
    /// From the mesh to the app (port 15006).
    Inbound,
}

/// Everything a worker needs, shared by all workers.
pub struct Context {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub identity: Identity,
    pub connect_timeout: Duration,
    /// How many endpoints to try when connects fail.
    pub connect_attempts: usize,
    pub access_log: bool,
    /// The proxy's own ports: a destination on one of them would loop.
    pub own_ports: Vec<u16>,
    pub next_id: AtomicU64,
}

/// Accepts forever on one worker's listener.
pub async fn accept_loop<R: Runtime>(
    listener: R::Listener,
    direction: Direction,
    orig: OrigDst,
    ctx: Arc<Context>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
                let span = tracing::debug_span!("conn", id, ?direction, %peer);
                tokio::task::spawn_local(
                    async move { handle::<R>(stream, peer, direction, orig, &ctx).await }
                        .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors or memory: back off rather than spin.
                tracing::warn!(?direction, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Where a connection goes, decided once from one snapshot. It holds the service and cluster
/// (small `Arc`s), not the snapshot, so a long-lived connection does not keep an old config
/// alive; label sets are built only for the outcome, not for every candidate.
struct Plan {
    target: Target,
    /// Addresses to try in order, with the endpoint index each is (`None`: the original
    /// destination). Empty means refuse.
    candidates: Vec<(SocketAddr, Option<usize>)>,
    /// The response flag when no candidate could be reached (or there was none).
    failure: ResponseFlag,
}

enum Target {
    Inbound,
    Service {
        service: Arc<Service>,
        cluster: Arc<Cluster>,
    },
    /// PassthroughCluster or BlackHoleCluster.
    Unregistered(&'static str),
}

impl Plan {
    fn labels(&self, id: &Identity, endpoint: Option<usize>, flag: ResponseFlag) -> TcpLabels {
        match &self.target {
            Target::Inbound => id.inbound(flag),
            Target::Service { service, cluster } => {
                let endpoint = endpoint.and_then(|i| cluster.endpoints.get(i));
                id.outbound(service, cluster, endpoint, flag)
            }
            Target::Unregistered(name) => id.outbound_unregistered(name, flag),
        }
    }

    /// Istio-style cluster name, for the access log.
    fn cluster_name(&self, dst: SocketAddr) -> String {
        match &self.target {
            Target::Inbound => format!("inbound|{}||", dst.port()),
            Target::Service { cluster, .. } => cluster.name.to_string(),
            Target::Unregistered(name) => (*name).to_string(),
        }
    }
}

fn plan(snapshot: &Snapshot, ctx: &Context, direction: Direction, dst: SocketAddr) -> Plan {
    let passthrough = |target| Plan {
        target,
        candidates: vec![(dst, None)],
        failure: ResponseFlag::UpstreamConnectFailure,
    };
    if direction == Direction::Inbound {
        return passthrough(Target::Inbound);
    }
    match route::outbound(snapshot, dst) {
        Decision::Cluster {
            service, cluster, ..
        } => {
            let target = Target::Service {
                service: service.clone(),
                cluster: cluster.clone(),
            };
            if cluster.passthrough {
                return passthrough(target);
            }
            let candidates: Vec<_> = balance::candidates(cluster, ctx.connect_attempts)
                .into_iter()
                .map(|i| (cluster.endpoints[i].addr, Some(i)))
                .collect();
            let failure = if candidates.is_empty() {
                ResponseFlag::NoHealthyUpstream
            } else {
                ResponseFlag::UpstreamConnectFailure
            };
            Plan {
                target,
                candidates,
                failure,
            }
        }
        Decision::Passthrough => passthrough(Target::Unregistered("PassthroughCluster")),
        Decision::BlackHole => Plan {
            target: Target::Unregistered("BlackHoleCluster"),
            candidates: Vec::new(),
            failure: ResponseFlag::NoRoute,
        },
    }
}

async fn handle<R: Runtime>(
    client: R::Stream,
    peer: SocketAddr,
    direction: Direction,
    orig: OrigDst,
    ctx: &Context,
) {
    let started = Instant::now();
    let dst = match orig {
        OrigDst::Fixed(dst) => dst,
        OrigDst::Redirect => {
            let local = match listen::local_addr(&client) {
                Ok(local) => local,
                Err(e) => return tracing::debug!("local address: {e}"),
            };
            match listen::original_dst(&client, local) {
                Ok(dst) if dst == local || ctx.own_ports.contains(&dst.port()) => {
                    // Not redirected (a direct connection to the capture port): forwarding it
                    // would connect to ourselves.
                    return tracing::warn!(%dst, "refusing a connection that was not redirected by iptables");
                }
                Ok(dst) => dst,
                Err(e) => {
                    return tracing::warn!(
                        "no original destination (is isthmus-init's REDIRECT in place?): {e}"
                    )
                }
            }
        }
    };
    // One snapshot for the whole connection: a reload never changes a connection's route.
    let plan = plan(&ctx.store.load(), ctx, direction, dst);

    let mut connected = None;
    for &(addr, endpoint) in &plan.candidates {
        match tokio::time::timeout(ctx.connect_timeout, R::connect(addr)).await {
            Ok(Ok(server)) => {
                connected = Some((server, addr, endpoint));
                break;
            }
            Ok(Err(e)) => tracing::debug!(%addr, "connect failed: {e}"),
            Err(_) => tracing::debug!(%addr, "connect timed out after {:?}", ctx.connect_timeout),
        }
    }
    let Some((server, upstream, endpoint)) = connected else {
        let handles = ctx
            .metrics
            .tcp
            .open(&plan.labels(&ctx.identity, None, plan.failure));
        handles.closed.inc();
        if ctx.access_log {
            tracing::info!(target: "access", ?direction, %peer, %dst, cluster = %plan.cluster_name(dst),
                flags = plan.failure.as_str(), "connection refused");
        }
        return;
    };
    let labels = plan.labels(&ctx.identity, endpoint, ResponseFlag::None);
    let handles = ctx.metrics.tcp.open(&labels);
    ctx.metrics.active_connections.inc();
    let (moved, result) = relay::relay(&client, &server, &handles.received, &handles.sent).await;
    ctx.metrics.active_connections.dec();
    handles.closed.inc();
    if ctx.access_log {
        tracing::info!(target: "access", ?direction, %peer, %dst, %upstream, cluster = %plan.cluster_name(dst),
            flags = %labels.response_flags, sent = moved.downstream, received = moved.upstream,
            duration_ms = started.elapsed().as_millis() as u64,
            error = result.as_ref().err().map(|e| e.to_string()), "connection closed");
    }
}
