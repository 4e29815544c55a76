//! Validation and compilation: typed documents → [`Snapshot`]. Every cross-reference (hosts,
//! subsets, ports, weights) is checked here, off the data path, so that a snapshot that exists
//! is one the proxy can serve.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::error::{ConfigError, Issue};
use crate::parse::{Document, Resource};
use crate::snapshot::{
    Cluster, DnsName, Endpoint, L4Match, Labels, OutboundPolicy, Protocol, Service, ServicePort,
    Snapshot, TcpRoute, Text, TrafficPolicy, WeightedCluster, L7,
};
use crate::wire::OutboundMode;
use crate::CLUSTER_DOMAIN;

/// Qualifies a short host name (`reviews`) against the document's namespace, as Istio does
/// (`reviews.default.svc.cluster.local`). Names with a dot are taken as written.
pub fn qualify(host: &str, namespace: &str) -> String {
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.{CLUSTER_DOMAIN}")
    }
}

/// Compiles parsed documents; `version` is the content hash of the files they came from.
pub fn compile(documents: Vec<Document>, version: String) -> Result<Snapshot, ConfigError> {
    let mut c = Compiler::default();
    c.check_unique_names(&documents);
    let policy = c.outbound_policy(&documents);
    let registry = c.registry(&documents);
    let (subsets, policies) = c.subsets(&documents, &registry);
    let routes = c.virtual_services(&documents, &registry, &subsets);
    let security = c.security(&documents);
    if !c.issues.is_empty() {
        return Err(ConfigError::Invalid(c.issues));
    }
    let Routes {
        tcp: mut routes,
        http: mut http_routes,
    } = routes;
    let mut interner = Interner::default();
    let shared: Vec<Shared> = registry
        .services
        .iter()
        .map(|d| Shared::new(d, &mut interner))
        .collect();
    // Clusters are shared between routes that name the same (service, port, subset); most
    // have no DestinationRule and share one default policy.
    let default_policy = Arc::new(TrafficPolicy::default());
    let mut clusters: HashMap<ClusterKey, Arc<Cluster>> = HashMap::new();
    let mut cluster_for = |key: &ClusterKey| -> Arc<Cluster> {
        clusters
            .entry(key.clone())
            .or_insert_with(|| {
                let policy = match policies.get(&key.service) {
                    Some(p) => {
                        let resolved = p.resolve(key.subset.as_deref(), key.port);
                        if resolved == *default_policy {
                            default_policy.clone()
                        } else {
                            Arc::new(resolved)
                        }
                    }
                    None => default_policy.clone(),
                };
                Arc::new(build_cluster(
                    &registry.services[key.service],
                    &shared[key.service],
                    key,
                    &subsets,
                    policy,
                ))
            })
            .clone()
    };
    let mut services = Vec::with_capacity(registry.services.len());
    for (index, draft) in registry.services.iter().enumerate() {
        let mut ports = Vec::with_capacity(draft.ports.len());
        for port in &draft.ports {
            let mut drafts = routes.remove(&(index, port.number)).unwrap_or_default();
            // The implicit catch-all: the whole service, as without a VirtualService.
            drafts.push(RouteDraft {
                matches: Vec::new(),
                destinations: vec![(
                    ClusterKey {
                        service: index,
                        port: port.number,
                        subset: None,
                    },
                    100,
                )],
                virtual_service: None,
            });
            let mut compiled = Vec::with_capacity(drafts.len());
            for route in drafts {
                let destinations = route
                    .destinations
                    .iter()
                    .map(|(key, weight)| WeightedCluster {
                        cluster: cluster_for(key),
                        weight: *weight,
                    })
                    .collect();
                compiled.push(TcpRoute::new(
                    route.matches,
                    destinations,
                    route.virtual_service,
                ));
            }
            let http = if L7::of(port.protocol) == L7::Opaque {
                Vec::new()
            } else {
                let mut drafts = http_routes
                    .remove(&(index, port.number))
                    .unwrap_or_default();
                // Istio: a VirtualService's http rules are the whole route table of its
                // hosts (no rule matches → 404 NR); only a port no VirtualService routes gets
                // the implicit route to the whole service.
                if drafts.is_empty() {
                    drafts.push(http::HttpRouteDraft::catch_all(ClusterKey {
                        service: index,
                        port: port.number,
                        subset: None,
                    }));
                }
                drafts
                    .into_iter()
                    .map(|d| d.build(&mut cluster_for))
                    .collect()
            };
            ports.push(ServicePort {
                number: port.number,
                name: interner.get(&port.name),
                protocol: port.protocol,
                routes: compiled,
                http_routes: http,
            });
        }
        services.push(Arc::new(Service {
            hosts: shared[index].hosts.clone(),
            name: shared[index].name.clone(),
            namespace: shared[index].namespace.clone(),
            addresses: draft.addresses.clone(),
            ports,
            mesh_external: draft.mesh_external,
        }));
    }
    Ok(Snapshot::new(version, services, policy).with_security(security))
}

/// Text shared by everything built from one service: its names and each endpoint's labels.
struct Shared {
    hosts: Vec<Text>,
    name: Text,
    namespace: Text,
    labels: Vec<Labels>,
    accounts: Vec<Option<Text>>,
}

impl Shared {
    fn new(draft: &ServiceDraft, interner: &mut Interner) -> Self {
        Shared {
            hosts: draft.hosts.iter().map(|h| Text::from(h.as_str())).collect(),
            name: Text::from(draft.name.as_str()),
            namespace: interner.get(&draft.namespace),
            labels: draft
                .endpoints
                .iter()
                .map(|e| {
                    Labels::new(
                        e.labels
                            .iter()
                            .map(|(k, v)| (interner.get(k), interner.get(v)))
                            .collect(),
                    )
                })
                .collect(),
            accounts: draft
                .endpoints
                .iter()
                .map(|e| e.service_account.as_deref().map(|a| interner.get(a)))
                .collect(),
        }
    }
}

/// Stores each distinct string once (namespaces, label keys and values, port names).
#[derive(Default)]
struct Interner(HashMap<String, Text>);

impl Interner {
    fn get(&mut self, s: &str) -> Text {
        if let Some(text) = self.0.get(s) {
            return text.clone();
        }
        let text = Text::from(s);
        self.0.insert(s.to_string(), text.clone());
        text
    }
}

fn build_cluster(
    service: &ServiceDraft,
    shared: &Shared,
    key: &ClusterKey,
    subsets: &SubsetMap,
    policy: Arc<TrafficPolicy>,
) -> Cluster {
    let selector = key
        .subset
        .as_ref()
        .and_then(|name| subsets.get(&(key.service, name.clone())));
    let port = service
        .ports
        .iter()
        .find(|p| p.number == key.port)
        .expect("cluster keys are built from validated ports");
    let selected = service.endpoints.iter().enumerate().filter(|(_, e)| {
        selector.is_none_or(|sel| sel.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
    });
    let mut endpoints = Vec::new();
    let mut dns = Vec::new();
    for (i, e) in selected {
        let port_number = e.ports.get(&port.name).copied().unwrap_or(port.target_port);
        match &e.address {
            Address::Ip(ip) => endpoints.push(Endpoint {
                addr: SocketAddr::new(*ip, port_number),
                weight: e.weight,
                labels: shared.labels[i].clone(),
                service_account: shared.accounts[i].clone(),
            }),
            Address::Name(name) => dns.push(DnsName {
                name: Text::from(name.as_str()),
                port: port_number,
                first_only: service.dns_first_only,
            }),
        }
    }
    let mut cluster = Cluster::new(
        shared.hosts[0].clone(),
        shared.name.clone(),
        shared.namespace.clone(),
        key.port,
        key.subset.clone(),
        endpoints,
        service.passthrough,
        policy,
    );
    cluster.dns = dns;
    cluster
}

/// Subset labels by (service, subset name).
type SubsetMap = HashMap<(usize, String), BTreeMap<String, String>>;

/// A validated `destination`: the service, an explicit port, a subset.
#[derive(Debug, Clone)]
struct DestRef {
    service: usize,
    port: Option<u16>,
    subset: Option<String>,
}

/// Routes of every (service index, port), from the VirtualServices.
#[derive(Default)]
struct Routes {
    tcp: HashMap<(usize, u16), Vec<RouteDraft>>,
    http: HashMap<(usize, u16), Vec<http::HttpRouteDraft>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClusterKey {
    service: usize,
    port: u16,
    subset: Option<String>,
}

#[derive(Debug, Clone)]
struct RouteDraft {
    matches: Vec<L4Match>,
    destinations: Vec<(ClusterKey, u32)>,
    virtual_service: Option<String>,
}

struct PortDraft {
    number: u16,
    name: String,
    /// Declared, or implied by the name; `None`: detected per connection.
    protocol: Option<Protocol>,
    target_port: u16,
}

/// An endpoint's address: an IP, or (`resolution: DNS`) a name the sidecar resolves.
#[derive(Debug, Clone)]
enum Address {
    Ip(IpAddr),
    Name(String),
}

struct EndpointDraft {
    address: Address,
    ports: HashMap<String, u16>,
    labels: BTreeMap<String, String>,
    service_account: Option<String>,
    weight: u32,
}

struct ServiceDraft {
    hosts: Vec<String>,
    name: String,
    namespace: String,
    addresses: Vec<IpAddr>,
    ports: Vec<PortDraft>,
    endpoints: Vec<EndpointDraft>,
    mesh_external: bool,
    passthrough: bool,
    /// `resolution: DNS_ROUND_ROBIN`: only the first address a name resolves to is used.
    dns_first_only: bool,
}

#[derive(Default)]
struct Registry {
    services: Vec<ServiceDraft>,
    by_host: HashMap<String, usize>,
}

#[derive(Default)]
struct Compiler {
    issues: Vec<Issue>,
    seen: HashSet<Issue>,
}

impl Compiler {
    fn issue(&mut self, doc: &Document, field: impl Into<String>, message: impl Into<String>) {
        let issue = Issue {
            location: doc.location(),
            field: field.into(),
            message: message.into(),
        };
        // A rule instantiated for several ports reports the same problem once.
        if self.seen.insert(issue.clone()) {
            self.issues.push(issue);
        }
    }

    /// `exportTo`: visibility across namespaces. The controller applies it when it assembles a
    /// sidecar's config; here the values are only checked (`.`, `*`, `~` or a namespace).
    fn export_to(&mut self, doc: &Document, export_to: &[String]) {
        for (i, ns) in export_to.iter().enumerate() {
            if !matches!(ns.as_str(), "." | "*" | "~") && !matching::is_dns_label(ns) {
                self.issue(
                    doc,
                    format!("spec.exportTo[{i}]"),
                    format!("`{ns}` is not `.`, `*`, `~` or a namespace name"),
                );
            }
        }
    }

    fn check_unique_names(&mut self, documents: &[Document]) {
        let mut seen: HashMap<(&str, &str, &str), &str> = HashMap::new();
        for doc in documents {
            let key = (doc.kind, doc.namespace(), doc.metadata.name.as_str());
            if let Some(first) = seen.insert(key, doc.file.as_str()) {
                self.issue(
                    doc,
                    "metadata.name",
                    format!("duplicate name (also defined in {first})"),
                );
            }
        }
    }

    fn outbound_policy(&mut self, documents: &[Document]) -> OutboundPolicy {
        let mut policy = None;
        for doc in documents {
            let Resource::Sidecar(spec) = &doc.resource else {
                continue;
            };
            if policy.is_some() {
                self.issue(doc, "", "only one Sidecar is supported per config");
                continue;
            }
            for (i, listener) in spec.egress.iter().enumerate() {
                for (j, host) in listener.hosts.iter().enumerate() {
                    if let Err(e) = crate::egress::EgressHost::parse(host, doc.namespace()) {
                        self.issue(doc, format!("spec.egress[{i}].hosts[{j}]"), e.to_string());
                    }
                }
            }
            policy = Some(
                match spec.outbound_traffic_policy.as_ref().map(|p| p.mode) {
                    Some(OutboundMode::RegistryOnly) => OutboundPolicy::RegistryOnly,
                    Some(OutboundMode::AllowAny) | None => OutboundPolicy::AllowAny,
                },
            );
        }
        policy.unwrap_or_default()
    }

    /// Istio's rule: one destination may omit its weight (100); several must add up to 100.
    fn weights(&mut self, doc: &Document, field: &str, weights: &[Option<u32>]) -> Vec<u32> {
        if weights.len() == 1 {
            return vec![weights[0].unwrap_or(100).max(1)];
        }
        let resolved: Vec<u32> = weights.iter().map(|w| w.unwrap_or(0)).collect();
        // Summed wide: u32 weights from user YAML must not wrap to a plausible 100.
        let sum: u64 = resolved.iter().map(|w| u64::from(*w)).sum();
        if sum != 100 {
            self.issue(
                doc,
                format!("{field}.route"),
                format!("weights add up to {sum}, must add up to 100"),
            );
        }
        resolved
    }
}

mod http;
#[cfg(test)]
mod http_tests;
mod matching;
mod policy;
mod registry;
mod route_policy;
mod routing;
mod security;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
