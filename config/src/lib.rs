//! isthmus-config: the config model shared by the proxy and the controller.
//!
//! Users and the controller write Istio API documents (ServiceEntry, VirtualService,
//! DestinationRule, Sidecar, PeerAuthentication, AuthorizationPolicy); this crate parses them strictly ([`parse`]), validates and
//! compiles them ([`compile`]) into an immutable, pre-indexed [`Snapshot`] that the data path
//! reads without locks. Nothing here touches the network; the only I/O is [`source`], which
//! reads a ConfigMap directory the way kubelet lays it out.

pub mod app_probe;
pub mod compile;
pub mod duration;
pub mod egress;
pub mod error;
pub mod net;
pub mod parse;
pub mod snapshot;
pub mod source;
pub mod wire;

pub use compile::compile;
pub use error::{ConfigError, Issue};
pub use net::IpNet;
pub use snapshot::{
    now_ms, Abort, Cluster, ClusterLoad, ConnectionPool, ConsistentHash, CorsPolicy, DerivePort,
    DnsName, Endpoint, EndpointLoad, Fault, FaultAbort, FaultDelay, H2Upgrade, HashAlgorithm,
    HashKey, HeaderMatch, HeaderOps, HttpAction, HttpDestination, HttpMatch, HttpRoute, L4Match,
    Labels, LoadBalancer, Mirror, OutboundPolicy, OutlierDetection, Protocol, Redirect,
    RetryBudget, RetryOn, RetryPolicy, Rewrite, Service, ServicePort, Snapshot, StringMatch,
    TcpKeepalive, TcpRoute, Text, TrafficPolicy, WeightedCluster, L7,
};
pub use snapshot::{
    principal_namespace, Decision, HeaderLookup, HttpRequest, MtlsMode, Request, RuleRef, Verdict,
    Workload, DEFAULT_ROOT_NAMESPACE,
};
pub use source::SourceFile;

/// The DNS suffix short host names are qualified with, as in a default Kubernetes cluster.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Parses, validates and compiles a set of config files into a snapshot.
pub fn load(files: &[SourceFile]) -> Result<Snapshot, ConfigError> {
    let documents = parse::parse_files(files)?;
    compile(documents, source::version_of(files))
}
