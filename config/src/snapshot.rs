//! The compiled config: immutable after [`crate::compile`], indexed for the data path's
//! lookups (original destination → service port), shared across cores behind an `Arc`.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::net::IpNet;
use crate::CLUSTER_DOMAIN;

pub(crate) mod authz;
pub(crate) mod authz_match;
mod http;
mod load;
pub(crate) mod peer_auth;
mod policy;
pub(crate) mod security;

pub use authz::{
    principal_namespace, Decision, HeaderLookup, HttpRequest, Request, RuleRef, Verdict,
};
pub use http::{
    Abort, CorsPolicy, DerivePort, Fault, FaultAbort, FaultDelay, HeaderMatch, HeaderOps,
    HttpAction, HttpDestination, HttpMatch, HttpRoute, Mirror, Redirect, RetryOn, RetryPolicy,
    Rewrite, StringMatch,
};
pub use load::{now_ms, ClusterLoad, EndpointLoad};
pub use peer_auth::MtlsMode;
pub use policy::{
    ConnectionPool, ConsistentHash, H2Upgrade, HashAlgorithm, HashKey, LoadBalancer,
    OutlierDetection, RetryBudget, TcpKeepalive, TrafficPolicy,
};
pub use security::{Workload, DEFAULT_ROOT_NAMESPACE};

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
    /// Lowercased host → service, for HTTP routing by `Host`/`:authority`.
    by_host: HashMap<Box<str>, usize>,
    /// `name` → services whose host is `name.<ns>.svc.<domain>`, for short names.
    by_short_name: HashMap<Box<str>, Vec<usize>>,
    /// Port numbers some service serves HTTP (or sniffs) on.
    http_ports: HashSet<u16>,
    /// Endpoint address → (service, endpoint), for naming the workload a connection comes
    /// from (inbound telemetry's `source_*` labels).
    by_endpoint_ip: HashMap<IpAddr, (usize, Endpoint)>,
    /// Endpoint address and port (a pod's target port) → how its service port is served, so
    /// that an inbound connection to a port declared opaque is not sniffed.
    inbound_l7: HashMap<SocketAddr, L7>,
    outbound_policy: OutboundPolicy,
    security: security::Security,
}

impl Snapshot {
    pub(crate) fn new(
        version: String,
        services: Vec<Arc<Service>>,
        outbound_policy: OutboundPolicy,
    ) -> Self {
        let mut by_address = HashMap::new();
        let mut by_host = HashMap::new();
        let mut by_short_name: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut http_ports = HashSet::new();
        let kube_suffix = format!(".{CLUSTER_DOMAIN}");
        for (s, service) in services.iter().enumerate() {
            for (p, port) in service.ports.iter().enumerate() {
                for ip in &service.addresses {
                    by_address.insert(SocketAddr::new(*ip, port.number), (s, p));
                }
                if port.l7() != L7::Opaque {
                    http_ports.insert(port.number);
                }
            }
            for host in &service.hosts {
                let host = host.to_ascii_lowercase();
                if let Some((name, _ns)) = host
                    .strip_suffix(&kube_suffix)
                    .and_then(|rest| rest.split_once('.'))
                    .filter(|(_, ns)| !ns.contains('.'))
                {
                    by_short_name.entry(name.into()).or_default().push(s);
                }
                by_host.insert(host.into_boxed_str(), s);
            }
        }
        let mut by_endpoint_ip = HashMap::new();
        let mut inbound_l7 = HashMap::new();
        for (s, service) in services.iter().enumerate() {
            for port in &service.ports {
                let own = port
                    .routes
                    .iter()
                    .flat_map(|r| r.destinations.iter().map(|d| &d.cluster))
                    .filter(|c| c.service_name == service.name && c.port == port.number);
                for cluster in own {
                    for e in &cluster.endpoints {
                        by_endpoint_ip
                            .entry(e.addr.ip())
                            .or_insert_with(|| (s, e.clone()));
                        inbound_l7.entry(e.addr).or_insert(port.l7());
                    }
                }
            }
        }
        Snapshot {
            version,
            services,
            by_address,
            by_host,
            by_short_name,
            http_ports,
            by_endpoint_ip,
            inbound_l7,
            outbound_policy,
            security: security::Security::default(),
        }
    }

    pub(crate) fn with_security(mut self, security: security::Security) -> Self {
        self.security = security;
        self
    }

    /// Sets the mesh root namespace (default [`DEFAULT_ROOT_NAMESPACE`]): its policies
    /// without a selector apply mesh-wide.
    pub fn with_root_namespace(mut self, namespace: &str) -> Self {
        self.security.root_namespace = namespace.into();
        self
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

    /// The registry's endpoint at `ip` and the namespace of its service: who a connection
    /// from `ip` comes from, when it is a meshed workload.
    pub fn workload_at(&self, ip: IpAddr) -> Option<(&Endpoint, &Text)> {
        self.by_endpoint_ip
            .get(&ip)
            .map(|(s, e)| (e, &self.services[*s].namespace))
    }

    /// How the registry serves the port an inbound connection arrived on (`dst`: the pod's
    /// address and target port), when some service's endpoint is there.
    pub fn inbound_l7(&self, dst: SocketAddr) -> Option<L7> {
        self.inbound_l7.get(&dst).copied()
    }

    /// Every name a DNS cluster of this snapshot resolves.
    pub fn dns_names(&self) -> std::collections::BTreeSet<DnsName> {
        let mut names = std::collections::BTreeSet::new();
        for service in &self.services {
            for port in &service.ports {
                let tcp = port
                    .routes
                    .iter()
                    .flat_map(|r| r.destinations.iter().map(|d| &d.cluster));
                let http = port.http_routes.iter().flat_map(|r| r.clusters());
                for cluster in tcp.chain(http) {
                    names.extend(cluster.dns.iter().cloned());
                }
            }
        }
        names
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

    /// The service and HTTP-capable port a request's `Host` (or `:authority`) names, as Envoy's
    /// virtual hosts match it in Istio: case-insensitive, an optional `:port` that must be
    /// `port`, a trailing dot ignored; the fully qualified name, or a Kubernetes short form
    /// (`name.ns.svc`, `name.ns`, and `name` in `client_namespace` or, when that is unknown,
    /// in the one namespace that has such a service). Ports declared opaque (TCP, TLS, ...)
    /// are not HTTP-routed.
    pub fn http_service(
        &self,
        host: &str,
        port: u16,
        client_namespace: Option<&str>,
    ) -> Option<(&Arc<Service>, &ServicePort)> {
        let (name, host_port) = split_host_port(host)?;
        if host_port.is_some_and(|p| p != port) {
            return None;
        }
        let name = name.strip_suffix('.').unwrap_or(name);
        // Hosts are nearly always lower case already: no copy then.
        let name: std::borrow::Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        let index = self.resolve_host(&name, client_namespace)?;
        let service = &self.services[index];
        let sp = service
            .ports
            .iter()
            .find(|p| p.number == port && p.l7() != L7::Opaque)?;
        Some((service, sp))
    }

    /// Whether some service serves HTTP (or an unspecified protocol) on `port`: a connection
    /// to an address outside the VIP table on such a port may be HTTP to one of them.
    pub fn has_http_hosts_on(&self, port: u16) -> bool {
        self.http_ports.contains(&port)
    }

    fn resolve_host(&self, name: &str, client_namespace: Option<&str>) -> Option<usize> {
        if let Some(&s) = self.by_host.get(name) {
            return Some(s);
        }
        let qualified = match name.split('.').count() {
            1 => match client_namespace {
                Some(ns) => format!("{name}.{ns}.{CLUSTER_DOMAIN}"),
                None => {
                    return match self.by_short_name.get(name).map(Vec::as_slice) {
                        Some([only]) => Some(*only),
                        _ => None,
                    }
                }
            },
            2 => format!("{name}.{CLUSTER_DOMAIN}"),
            // `name.ns.svc` + the rest of the cluster domain.
            3 if name.ends_with(".svc") => {
                format!("{name}{}", CLUSTER_DOMAIN.strip_prefix("svc").unwrap_or(""))
            }
            _ => return None,
        };
        self.by_host.get(qualified.as_str()).copied()
    }

    /// Carries the balancers' positions over from `previous`, the snapshot this one replaces:
    /// a cluster whose endpoints did not change, and a route whose destinations did not
    /// change, continue their round robin where they were. Everything else starts at an offset
    /// derived from `seed` (random per sidecar), so that neither a reload nor a fleet of
    /// sidecars starting together sends every first connection to the same endpoint.
    pub fn continue_balancing(&self, previous: &Snapshot, seed: u64) {
        let mut old_clusters: HashMap<&str, &Cluster> = HashMap::new();
        let mut old_routes: HashMap<(SocketAddr, usize), &TcpRoute> = HashMap::new();
        let mut old_http: HashMap<(&str, u16, usize), &HttpRoute> = HashMap::new();
        for (&addr, &(s, p)) in &previous.by_address {
            for (r, route) in previous.services[s].ports[p].routes.iter().enumerate() {
                old_routes.insert((addr, r), route);
                for d in &route.destinations {
                    old_clusters.insert(&d.cluster.name, &d.cluster);
                }
            }
        }
        for service in &previous.services {
            for port in &service.ports {
                for (r, route) in port.http_routes.iter().enumerate() {
                    old_http.insert((service.host(), port.number, r), route);
                    for cluster in route.clusters() {
                        old_clusters.insert(&cluster.name, cluster);
                    }
                }
            }
        }
        let offset = |name: &str| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (seed, name).hash(&mut h);
            h.finish() as usize
        };
        let continue_cluster = |cluster: &Cluster| {
            let start = match old_clusters.get(&*cluster.name) {
                Some(old) if old.same_endpoints(cluster) => {
                    // Requests in flight, ejections and the hash ring go on as they were.
                    if let Some(load) = old.load.get() {
                        let _ = cluster.load.set(load.clone());
                    }
                    old.ticket.load(Ordering::Relaxed)
                }
                _ => offset(&cluster.name),
            };
            cluster.ticket.store(start, Ordering::Relaxed);
        };
        for (&addr, &(s, p)) in &self.by_address {
            for (r, route) in self.services[s].ports[p].routes.iter().enumerate() {
                let start = match old_routes.get(&(addr, r)) {
                    Some(old) if old.same_destinations(route) => old.ticket.load(Ordering::Relaxed),
                    _ => offset(&format!("{addr}/{r}")),
                };
                route.ticket.store(start, Ordering::Relaxed);
                for d in &route.destinations {
                    continue_cluster(&d.cluster);
                }
            }
        }
        for service in &self.services {
            for port in &service.ports {
                for (r, route) in port.http_routes.iter().enumerate() {
                    let key = (service.host(), port.number, r);
                    let start = match old_http.get(&key) {
                        Some(old) if old.same_destinations(route) => {
                            old.ticket.load(Ordering::Relaxed)
                        }
                        _ => offset(&format!("http/{}/{}/{r}", key.0, key.1)),
                    };
                    route.ticket.store(start, Ordering::Relaxed);
                    for cluster in route.clusters() {
                        continue_cluster(cluster);
                    }
                }
            }
        }
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
            "security": self.security.dump(),
        })
    }
}

/// A service from a ServiceEntry.
#[derive(Debug)]
pub struct Service {
    /// Fully qualified host names; the first is the canonical one used in telemetry.
    pub hosts: Vec<Text>,
    pub name: Text,
    pub namespace: Text,
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
            "hosts": self.hosts.iter().map(|h| h.as_ref()).collect::<Vec<&str>>(),
            "namespace": self.namespace.as_ref(),
            "name": self.name.as_ref(),
            "addresses": self.addresses,
            "ports": self.ports.iter().map(|p| json!({
                "number": p.number,
                "name": p.name.as_ref(),
                "protocol": p.protocol.map(Protocol::as_str),
                "l7": format!("{:?}", p.l7()),
                "routes": p.routes.iter().map(TcpRoute::dump).collect::<Vec<_>>(),
                "httpRoutes": p.http_routes.iter().map(HttpRoute::dump).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Debug)]
pub struct ServicePort {
    pub number: u16,
    pub name: Text,
    /// The declared `protocol`, else the one the port name implies (Istio's protocol
    /// selection: `http-web`, `grpc`, ...); `None`: unspecified, detected per connection.
    pub protocol: Option<Protocol>,
    /// TCP routes in order; the first whose match accepts the connection wins. The last one is
    /// always a catch-all.
    pub routes: Vec<TcpRoute>,
    /// HTTP routes in order, for ports whose [`ServicePort::l7`] is not opaque; the first whose
    /// match accepts the request wins; none matching is a 404 `NR`, as in Istio. A port no
    /// VirtualService routes gets one catch-all route to its own cluster with Istio's default
    /// retry policy. Empty on opaque ports.
    pub http_routes: Vec<HttpRoute>,
}

/// How the proxy treats a port's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L7 {
    /// Declared TCP, TLS, HTTPS, MONGO, MYSQL or REDIS: bytes relayed as they are.
    Opaque,
    /// Declared HTTP: HTTP/1.1 (an HTTP/2 prior-knowledge client is still served).
    Http1,
    /// Declared HTTP2, GRPC or GRPC-Web: HTTP/2 upstream.
    Http2,
    /// Unspecified: sniff HTTP/1, HTTP/2 or opaque per connection.
    Detect,
}

impl ServicePort {
    pub fn l7(&self) -> L7 {
        L7::of(self.protocol)
    }
}

impl L7 {
    pub fn of(protocol: Option<Protocol>) -> L7 {
        match protocol {
            None => L7::Detect,
            Some(Protocol::Http) => L7::Http1,
            Some(Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb) => L7::Http2,
            Some(
                Protocol::Tcp
                | Protocol::Tls
                | Protocol::Https
                | Protocol::Mongo
                | Protocol::Mysql
                | Protocol::Redis,
            ) => L7::Opaque,
        }
    }
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
    GrpcWeb,
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
            "GRPC-WEB" => Protocol::GrpcWeb,
            "MONGO" => Protocol::Mongo,
            "MYSQL" => Protocol::Mysql,
            "REDIS" => Protocol::Redis,
            _ => return None,
        })
    }

    /// Istio's protocol selection by port name: `<protocol>[-<suffix>]`, case-insensitive
    /// (`http`, `http-web`, `grpc-api`, `tcp-db`). `grpc-web` as a whole name counts too.
    pub fn from_port_name(name: &str) -> Option<Protocol> {
        if name.eq_ignore_ascii_case("grpc-web")
            || name
                .get(..9)
                .is_some_and(|h| h.eq_ignore_ascii_case("grpc-web-"))
        {
            return Some(Protocol::GrpcWeb);
        }
        let prefix = name.split('-').next().unwrap_or(name);
        Protocol::parse(prefix)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Https => "HTTPS",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
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

    fn same_destinations(&self, other: &TcpRoute) -> bool {
        self.destinations.len() == other.destinations.len()
            && self
                .destinations
                .iter()
                .zip(&other.destinations)
                .all(|(a, b)| a.weight == b.weight && a.cluster.name == b.cluster.name)
    }

    fn dump(&self) -> Value {
        json!({
            "virtualService": self.virtual_service.as_deref(),
            "match": self.matches.iter().map(|m| json!({
                "port": m.port,
                "destinationSubnets": m.destination_subnets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "route": self.destinations.iter().map(|d| json!({
                "cluster": d.cluster.name.as_ref(),
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
    pub name: Box<str>,
    /// Shared with the service: a cluster costs no copies of its service's names.
    pub host: Text,
    pub service_name: Text,
    pub service_namespace: Text,
    pub port: u16,
    pub subset: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// `resolution: NONE`: no endpoints of its own; connect to the original destination.
    pub passthrough: bool,
    /// The DestinationRule policy for this cluster, merged and defaulted.
    pub policy: Arc<TrafficPolicy>,
    ticket: AtomicUsize,
    /// `resolution: DNS`: names the sidecar resolves (their addresses are the endpoints);
    /// empty otherwise.
    pub dns: Vec<DnsName>,
    /// Live counters ([`Cluster::load`]), shared with the cluster this one replaced when the
    /// endpoints are the same.
    load: std::sync::OnceLock<Arc<ClusterLoad>>,
}

impl Cluster {
    // One argument per field of a plain record, called from one place (the compiler).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        host: Text,
        service_name: Text,
        service_namespace: Text,
        port: u16,
        subset: Option<String>,
        endpoints: Vec<Endpoint>,
        passthrough: bool,
        policy: Arc<TrafficPolicy>,
    ) -> Self {
        Cluster {
            name: format!("outbound|{port}|{}|{host}", subset.as_deref().unwrap_or("")).into(),
            host,
            service_name,
            service_namespace,
            port,
            subset,
            endpoints,
            passthrough,
            policy,
            ticket: AtomicUsize::new(0),
            dns: Vec::new(),
            load: std::sync::OnceLock::new(),
        }
    }

    pub fn next_ticket(&self) -> usize {
        self.ticket.fetch_add(1, Ordering::Relaxed)
    }

    fn same_endpoints(&self, other: &Cluster) -> bool {
        self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|(a, b)| a.addr == b.addr && a.weight == b.weight)
    }
}

/// A name a DNS cluster resolves, with the port to dial on its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName {
    pub name: Text,
    pub port: u16,
    /// `DNS_ROUND_ROBIN`: only the first address is used (Envoy's logical DNS).
    pub first_only: bool,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Address and the port to dial for this service port.
    pub addr: SocketAddr,
    pub weight: u32,
    pub labels: Labels,
    pub service_account: Option<Text>,
}

/// `host[:port]` → (host, port); IPv6 literals in brackets. `None` for a malformed port.
fn split_host_port(host: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        return match tail.strip_prefix(':') {
            Some(p) => Some((ip, Some(p.parse().ok()?))),
            None if tail.is_empty() => Some((ip, None)),
            None => None,
        };
    }
    match host.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => Some((name, Some(p.parse().ok()?))),
        _ => Some((host, None)),
    }
}

/// Shared immutable text: names repeated across a snapshot (namespaces, label keys and
/// values, hosts) are stored once.
pub type Text = Arc<str>;

/// An endpoint's labels, sorted by key, shared by every cluster (subset) the endpoint is in.
/// A slice, not a map: endpoints have a handful of labels, and a map node costs ~0.5 KB.
#[derive(Debug, Clone, Default)]
pub struct Labels(Arc<[(Text, Text)]>);

impl Labels {
    pub fn new(mut pairs: Vec<(Text, Text)>) -> Self {
        pairs.sort();
        Labels(pairs.into())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_ref())
    }

    /// The shared value, for label sets that keep it (metrics) without copying.
    pub fn get_shared(&self, key: &str) -> Option<&Text> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}
