//! What a request leaves behind: Istio's request metrics (series handles cached per
//! connection) and the access log line, recorded once when it ends — the seam where tracing
//! will attach.

use std::sync::Arc;
use std::time::Instant;

use isthmus_config::Cluster;

use super::access_log::{self, RequestLine};
use super::server::ConnInfo;
use crate::metrics::{HttpHandles, HttpLabels};
use crate::route::Target;
use crate::serve::Context;
use crate::telemetry::{Identity, ResponseFlag};

/// What one request did, for telemetry.
pub(crate) struct Record {
    pub(crate) started: Instant,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    pub(crate) status: u16,
    pub(crate) flag: ResponseFlag,
    pub(crate) grpc_status: Option<u32>,
    /// gRPC messages each way (counted on gRPC series only).
    pub(crate) request_messages: u64,
    pub(crate) response_messages: u64,
    /// The request as the access log shows it (only when it is on).
    pub(crate) line: Option<Box<RequestLine>>,
}

impl Record {
    pub(crate) fn new(started: Instant) -> Self {
        Record {
            started,
            request_bytes: 0,
            response_bytes: 0,
            status: 0,
            flag: ResponseFlag::None,
            grpc_status: None,
            request_messages: 0,
            response_messages: 0,
            line: None,
        }
    }
}

/// Metric handles by (cluster, endpoint, status, flag) for one connection: a keep-alive
/// connection's requests mostly share one series, fetched once.
#[derive(Default)]
pub(crate) struct HandleCache {
    entries: Vec<(CacheKey, HttpHandles)>,
}

struct CacheKey {
    /// Held, so that the pointer compared is never a freed cluster's.
    cluster: Option<Arc<Cluster>>,
    target: &'static str,
    endpoint: Option<usize>,
    status: u16,
    grpc: Option<u32>,
    flag: ResponseFlag,
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        let same_cluster = match (&self.cluster, &other.cluster) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_cluster
            && self.target == other.target
            && self.endpoint == other.endpoint
            && self.status == other.status
            && self.grpc == other.grpc
            && self.flag == other.flag
    }
}

/// At most this many series cached per connection.
const CACHED_SERIES: usize = 8;

impl HandleCache {
    pub(crate) fn record(
        &mut self,
        ctx: &Context,
        target: &Target,
        cluster: Option<&Arc<Cluster>>,
        endpoint: Option<usize>,
        record: &Record,
        info: ConnInfo,
    ) {
        let key = CacheKey {
            cluster: cluster.cloned(),
            target: match target {
                Target::Inbound => "inbound",
                Target::Service { .. } => "service",
                Target::Unregistered(name) => name,
            },
            endpoint,
            status: record.status,
            grpc: record.grpc_status,
            flag: record.flag,
        };
        let found = self.entries.iter().position(|(k, _)| *k == key);
        let handles = match found {
            Some(i) => &self.entries[i].1,
            None => {
                let mut tcp = match target {
                    Target::Inbound => {
                        let mut labels = ctx.identity.inbound(record.flag);
                        let snapshot = ctx.store.load();
                        Identity::with_source(&mut labels, snapshot.workload_at(info.peer.ip()));
                        labels
                    }
                    Target::Service { service, cluster } => {
                        let endpoint = endpoint.and_then(|i| cluster.endpoints.get(i));
                        ctx.identity
                            .outbound(service, cluster, endpoint, record.flag)
                    }
                    Target::Unregistered(name) => {
                        ctx.identity.outbound_unregistered(name, record.flag)
                    }
                };
                tcp.request_protocol = Arc::from(if record.grpc_status.is_some() {
                    "grpc"
                } else {
                    "http"
                });
                let labels = HttpLabels {
                    tcp,
                    response_code: record.status,
                    grpc_response_status: record.grpc_status,
                };
                let handles = ctx.metrics.http.handles(&labels);
                if self.entries.len() >= CACHED_SERIES {
                    self.entries.remove(0);
                }
                self.entries.push((key, handles));
                &self.entries.last().expect("just pushed").1
            }
        };
        handles.requests.inc();
        handles
            .duration_ms
            .observe(record.started.elapsed().as_secs_f64() * 1000.0);
        handles.request_bytes.observe(record.request_bytes as f64);
        handles.response_bytes.observe(record.response_bytes as f64);
        if let Some((request, response)) = &handles.messages {
            request.inc_by(record.request_messages);
            response.inc_by(record.response_messages);
        }
        if let (Some(format), Some(line)) = (ctx.http.access_log, record.line.as_deref()) {
            let endpoint_addr = match target {
                Target::Service { cluster, .. } => endpoint
                    .and_then(|i| cluster.endpoints.get(i))
                    .map(|e| e.addr),
                Target::Inbound | Target::Unregistered("PassthroughCluster") => Some(info.dst),
                Target::Unregistered(_) => None,
            };
            let cluster_name = match target {
                Target::Inbound => format!("inbound|{}||", info.dst.port()),
                Target::Service { cluster, .. } => cluster.name.to_string(),
                Target::Unregistered(name) => (*name).to_string(),
            };
            access_log::write(
                format,
                &access_log::Entry {
                    request: line,
                    code: record.status,
                    flags: record.flag.as_str(),
                    bytes_received: record.request_bytes,
                    bytes_sent: record.response_bytes,
                    duration_ms: record.started.elapsed().as_millis() as u64,
                    upstream_host: endpoint_addr,
                    cluster: &cluster_name,
                    downstream_local: info.dst,
                    downstream_remote: info.peer,
                },
            );
        }
    }
}
