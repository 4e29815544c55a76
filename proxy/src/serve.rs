//! The life of a connection: accept → original destination → plan (route, balance) → connect
//! → relay → outcome recorded once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_config::Snapshot;
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

/// Where to connect and how to report it.
struct Plan {
    /// Endpoints to try, in order; empty means refuse.
    targets: Vec<(SocketAddr, TcpLabels)>,
    /// Labels for when no target could be reached (or there was none).
    failed: TcpLabels,
    cluster: String,
}

fn plan(snapshot: &Snapshot, ctx: &Context, direction: Direction, dst: SocketAddr) -> Plan {
    let id = &ctx.identity;
    match direction {
        Direction::Inbound => Plan {
            targets: vec![(dst, id.inbound(ResponseFlag::None))],
            failed: id.inbound(ResponseFlag::UpstreamConnectFailure),
            cluster: format!("inbound|{}||", dst.port()),
        },
        Direction::Outbound => match route::outbound(snapshot, dst) {
            Decision::Cluster {
                service, cluster, ..
            } => {
                if cluster.passthrough {
                    return Plan {
                        targets: vec![(
                            dst,
                            id.outbound(service, cluster, None, ResponseFlag::None),
                        )],
                        failed: id.outbound(
                            service,
                            cluster,
                            None,
                            ResponseFlag::UpstreamConnectFailure,
                        ),
                        cluster: cluster.name.to_string(),
                    };
                }
                let candidates = balance::candidates(cluster, ctx.connect_attempts);
                let failed_flag = if candidates.is_empty() {
                    ResponseFlag::NoHealthyUpstream
                } else {
                    ResponseFlag::UpstreamConnectFailure
                };
                Plan {
                    targets: candidates
                        .into_iter()
                        .map(|e| {
                            (
                                e.addr,
                                id.outbound(service, cluster, Some(e), ResponseFlag::None),
                            )
                        })
                        .collect(),
                    failed: id.outbound(service, cluster, None, failed_flag),
                    cluster: cluster.name.to_string(),
                }
            }
            Decision::Passthrough => Plan {
                targets: vec![(
                    dst,
                    id.outbound_unregistered("PassthroughCluster", ResponseFlag::None),
                )],
                failed: id.outbound_unregistered(
                    "PassthroughCluster",
                    ResponseFlag::UpstreamConnectFailure,
                ),
                cluster: "PassthroughCluster".into(),
            },
            Decision::BlackHole => Plan {
                targets: Vec::new(),
                failed: id.outbound_unregistered("BlackHoleCluster", ResponseFlag::NoRoute),
                cluster: "BlackHoleCluster".into(),
            },
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
    let snapshot = ctx.store.load();
    let plan = plan(&snapshot, ctx, direction, dst);
    drop(snapshot);

    let mut connected = None;
    for (addr, labels) in &plan.targets {
        match tokio::time::timeout(ctx.connect_timeout, R::connect(*addr)).await {
            Ok(Ok(server)) => {
                connected = Some((server, *addr, labels));
                break;
            }
            Ok(Err(e)) => tracing::debug!(%addr, "connect failed: {e}"),
            Err(_) => tracing::debug!(%addr, "connect timed out after {:?}", ctx.connect_timeout),
        }
    }
    let Some((server, upstream, labels)) = connected else {
        let handles = ctx.metrics.tcp.open(&plan.failed);
        handles.closed.inc();
        if ctx.access_log {
            tracing::info!(target: "access", ?direction, %peer, %dst, cluster = %plan.cluster,
                flags = %plan.failed.response_flags, "connection refused");
        }
        return;
    };
    let handles = ctx.metrics.tcp.open(labels);
    ctx.metrics.active_connections.inc();
    let (moved, result) = relay::relay(&client, &server, &handles.received, &handles.sent).await;
    ctx.metrics.active_connections.dec();
    handles.closed.inc();
    if ctx.access_log {
        tracing::info!(target: "access", ?direction, %peer, %dst, %upstream, cluster = %plan.cluster,
            flags = %labels.response_flags, sent = moved.downstream, received = moved.upstream,
            duration_ms = started.elapsed().as_millis() as u64,
            error = result.as_ref().err().map(|e| e.to_string()), "connection closed");
    }
}
