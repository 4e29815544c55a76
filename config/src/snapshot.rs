//! The compiled config: immutable after [`crate::compile`], indexed for the data path's
//! lookups (original destination → service port), shared across cores behind an `Arc`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::net::IpNet;

/// What happens to outbound traffic whose destination is not in the registry (Istio's
/// `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundPolicy {
    /// Forward to the original destination (Istio's default, `ALLOW_ANY`).
    #[default]
    AllowAny,
    /// Refuse it (`REGISTRY_ONLY`).
    RegistryOnly,
}

#[derive(Debug)]
pub struct Snapshot {
    version: String,
    services: Vec<Arc<Service>>,
    by_address: HashMap<SocketAddr, (usize, usize)>,
    outbound_policy: OutboundPolicy,
}

impl Snapshot {
    pub(crate) fn new(
        version: String,
        services: Vec<Arc<Service>>,
        outbound_policy: OutboundPolicy,
    ) -> Self {
        let mut by_address = HashMap::new();
        for (s, service) in services.iter().enumerate() {
            for (p, port) in service.ports.iter().enumerate() {
                for ip in &service.addresses {
                    by_address.insert(SocketAddr::new(*ip, port.number), (s, p));
                }
            }
        }
        Snapshot {
            version,
            services,
            by_address,
            outbound_policy,
        }
    }

    /// The config of an empty directory: no services, everything passes through.
    pub fn empty() -> Self {
        Snapshot::new(
            crate::source::version_of(&[]),
            Vec::new(),
            OutboundPolicy::AllowAny,
        )
    }

    /// Content hash of the files this snapshot was compiled from.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn outbound_policy(&self) -> OutboundPolicy {
        self.outbound_policy
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The service port an original destination (service VIP and port) belongs to.
    pub fn service_port(&self, dst: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let (s, p) = *self.by_address.get(&dst)?;
        let service = &self.services[s];
        Some((service, &service.ports[p]))
    }

    /// A JSON view for the admin port's `/config_dump`.
    pub fn dump(&self) -> Value {
        let policy = match self.outbound_policy {
            OutboundPolicy::AllowAny => "ALLOW_ANY",
            OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
        };
        json!({
            "version": self.version,
            "outboundTrafficPolicy": policy,
            "services": self.services.iter().map(|s| s.dump()).collect::<Vec<_>>(),
        })
    }
}

/// A service from a ServiceEntry.
#[derive(Debug)]
pub struct Service {
    /// Fully qualified host names; the first is the canonical one used in telemetry.
    pub hosts: Vec<String>,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub mesh_external: bool,
}

impl Service {
    pub fn host(&self) -> &str {
        &self.hosts[0]
    }

    fn dump(&self) -> Value {
        json!({
            "hosts": self.hosts,
            "namespace": self.namespace,
            "name": self.name,
            "addresses": self.addresses,
            "ports": self.ports.iter().map(|p| json!({
                "number": p.number,
                "name": p.name,
                "protocol": p.protocol.as_str(),
                "routes": p.routes.iter().map(TcpRoute::dump).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Debug)]
pub struct ServicePort {
    pub number: u16,
    pub name: String,
    pub protocol: Protocol,
    /// Routes in order; the first whose match accepts the connection wins. The last one is
    /// always a catch-all.
    pub routes: Vec<TcpRoute>,
}

/// The port protocols Istio accepts (case-insensitive in YAML).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Tls,
    Http,
    Http2,
    Https,
    Grpc,
    Mongo,
    Mysql,
    Redis,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "TLS" => Protocol::Tls,
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "HTTPS" => Protocol::Https,
            "GRPC" => Protocol::Grpc,
            "MONGO" => Protocol::Mongo,
            "MYSQL" => Protocol::Mysql,
            "REDIS" => Protocol::Redis,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Https => "HTTPS",
            Protocol::Grpc => "GRPC",
            Protocol::Mongo => "MONGO",
            Protocol::Mysql => "MYSQL",
            Protocol::Redis => "REDIS",
        }
    }
}

#[derive(Debug)]
pub struct TcpRoute {
    /// Empty: matches everything.
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedCluster>,
    /// From the VirtualService (`None` for the implicit default route).
    pub virtual_service: Option<String>,
    ticket: AtomicUsize,
}

impl TcpRoute {
    pub(crate) fn new(
        matches: Vec<L4Match>,
        destinations: Vec<WeightedCluster>,
        virtual_service: Option<String>,
    ) -> Self {
        TcpRoute {
            matches,
            destinations,
            virtual_service,
            ticket: AtomicUsize::new(0),
        }
    }

    pub fn accepts(&self, dst: SocketAddr) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.accepts(dst))
    }

    /// A monotonically increasing number for deterministic weighted selection.
    pub fn next_ticket(&self) -> usize {
        self.ticket.fetch_add(1, Ordering::Relaxed)
    }

    fn dump(&self) -> Value {
        json!({
            "virtualService": self.virtual_service,
            "match": self.matches.iter().map(|m| json!({
                "port": m.port,
                "destinationSubnets": m.destination_subnets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "route": self.destinations.iter().map(|d| json!({
                "cluster": d.cluster.name,
                "weight": d.weight,
                "endpoints": d.cluster.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct L4Match {
    pub destination_subnets: Vec<IpNet>,
    pub port: Option<u16>,
}

impl L4Match {
    pub fn accepts(&self, dst: SocketAddr) -> bool {
        self.port.is_none_or(|p| p == dst.port())
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|n| n.contains(dst.ip())))
    }
}

#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
}

/// A set of endpoints: one service port, optionally narrowed to a subset. Named like Istio's
/// clusters (`outbound|9080|v1|reviews.default.svc.cluster.local`) so operators recognise them.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub host: String,
    pub service_name: String,
    pub service_namespace: String,
    pub port: u16,
    pub subset: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// `resolution: NONE`: no endpoints of its own; connect to the original destination.
    pub passthrough: bool,
    ticket: AtomicUsize,
}

impl Cluster {
    pub(crate) fn new(
        host: &str,
        service_name: &str,
        service_namespace: &str,
        port: u16,
        subset: Option<String>,
        endpoints: Vec<Endpoint>,
        passthrough: bool,
    ) -> Self {
        Cluster {
            name: format!("outbound|{port}|{}|{host}", subset.as_deref().unwrap_or("")),
            host: host.to_string(),
            service_name: service_name.to_string(),
            service_namespace: service_namespace.to_string(),
            port,
            subset,
            endpoints,
            passthrough,
            ticket: AtomicUsize::new(0),
        }
    }

    pub fn next_ticket(&self) -> usize {
        self.ticket.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Address and the port to dial for this service port.
    pub addr: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
}
