//! Validation and compilation: typed documents → [`Snapshot`]. Every cross-reference (hosts,
//! subsets, ports, weights) is checked here, off the data path, so that a snapshot that exists
//! is one the proxy can serve.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::error::{ConfigError, Issue};
use crate::net::IpNet;
use crate::parse::{Document, Resource};
use crate::snapshot::{
    Cluster, Endpoint, L4Match, OutboundPolicy, Protocol, Service, ServicePort, Snapshot, TcpRoute,
    WeightedCluster,
};
use crate::wire::{self, OutboundMode, Resolution};
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
    let subsets = c.subsets(&documents, &registry);
    let routes = c.virtual_services(&documents, &registry, &subsets);
    if !c.issues.is_empty() {
        return Err(ConfigError::Invalid(c.issues));
    }
    let mut routes = routes;
    // Clusters are shared between routes that name the same (service, port, subset).
    let mut clusters: HashMap<ClusterKey, Arc<Cluster>> = HashMap::new();
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
                let mut destinations = Vec::with_capacity(route.destinations.len());
                for (key, weight) in route.destinations {
                    let cluster = clusters
                        .entry(key.clone())
                        .or_insert_with(|| {
                            Arc::new(build_cluster(
                                &registry.services[key.service],
                                &key,
                                &subsets,
                            ))
                        })
                        .clone();
                    destinations.push(WeightedCluster { cluster, weight });
                }
                compiled.push(TcpRoute::new(
                    route.matches,
                    destinations,
                    route.virtual_service,
                ));
            }
            ports.push(ServicePort {
                number: port.number,
                name: port.name.clone(),
                protocol: port.protocol,
                routes: compiled,
            });
        }
        services.push(Arc::new(Service {
            hosts: draft.hosts.clone(),
            name: draft.name.clone(),
            namespace: draft.namespace.clone(),
            addresses: draft.addresses.clone(),
            ports,
            mesh_external: draft.mesh_external,
        }));
    }
    Ok(Snapshot::new(version, services, policy))
}

fn build_cluster(
    service: &ServiceDraft,
    key: &ClusterKey,
    subsets: &HashMap<(usize, String), BTreeMap<String, String>>,
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
    let endpoints = service
        .endpoints
        .iter()
        .filter(|e| selector.is_none_or(|sel| sel.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
        .map(|e| Endpoint {
            addr: SocketAddr::new(
                e.address,
                e.ports.get(&port.name).copied().unwrap_or(port.target_port),
            ),
            weight: e.weight,
            labels: e.labels.clone(),
            service_account: e.service_account.clone(),
        })
        .collect();
    Cluster::new(
        &service.hosts[0],
        &service.name,
        &service.namespace,
        key.port,
        key.subset.clone(),
        endpoints,
        service.passthrough,
    )
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
    protocol: Protocol,
    target_port: u16,
}

struct EndpointDraft {
    address: IpAddr,
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
}

#[derive(Default)]
struct Registry {
    services: Vec<ServiceDraft>,
    by_host: HashMap<String, usize>,
}

#[derive(Default)]
struct Compiler {
    issues: Vec<Issue>,
}

impl Compiler {
    fn issue(&mut self, doc: &Document, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            location: doc.location(),
            field: field.into(),
            message: message.into(),
        });
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
            policy = Some(
                match spec.outbound_traffic_policy.as_ref().map(|p| p.mode) {
                    Some(OutboundMode::RegistryOnly) => OutboundPolicy::RegistryOnly,
                    Some(OutboundMode::AllowAny) | None => OutboundPolicy::AllowAny,
                },
            );
        }
        policy.unwrap_or_default()
    }

    fn registry(&mut self, documents: &[Document]) -> Registry {
        let mut registry = Registry::default();
        let mut taken: HashMap<SocketAddr, String> = HashMap::new();
        for doc in documents {
            let Resource::ServiceEntry(spec) = &doc.resource else {
                continue;
            };
            let Some(draft) = self.service_entry(doc, spec) else {
                continue;
            };
            let index = registry.services.len();
            let mut ok = true;
            for host in &draft.hosts {
                if registry.by_host.contains_key(host) {
                    self.issue(
                        doc,
                        "spec.hosts",
                        format!("host `{host}` is declared by another ServiceEntry"),
                    );
                    ok = false;
                }
            }
            for ip in &draft.addresses {
                for port in &draft.ports {
                    let addr = SocketAddr::new(*ip, port.number);
                    if let Some(other) = taken.get(&addr) {
                        self.issue(
                            doc,
                            "spec.addresses",
                            format!("{addr} is already the address of `{other}`"),
                        );
                        ok = false;
                    }
                }
            }
            if !ok {
                continue;
            }
            for ip in &draft.addresses {
                for port in &draft.ports {
                    taken.insert(SocketAddr::new(*ip, port.number), draft.hosts[0].clone());
                }
            }
            for host in &draft.hosts {
                registry.by_host.insert(host.clone(), index);
            }
            registry.services.push(draft);
        }
        registry
    }

    fn service_entry(
        &mut self,
        doc: &Document,
        spec: &wire::ServiceEntrySpec,
    ) -> Option<ServiceDraft> {
        let before = self.issues.len();
        let ns = doc.namespace().to_string();
        if spec.hosts.is_empty() {
            self.issue(doc, "spec.hosts", "at least one host is required");
        }
        for (i, host) in spec.hosts.iter().enumerate() {
            if host.contains('*') {
                self.issue(
                    doc,
                    format!("spec.hosts[{i}]"),
                    "wildcard hosts are not implemented yet",
                );
            }
        }
        let hosts: Vec<String> = spec.hosts.iter().map(|h| qualify(h, &ns)).collect();
        let mut addresses = Vec::new();
        for (i, a) in spec.addresses.iter().enumerate() {
            match a.parse::<IpNet>() {
                Ok(net) if net.is_host() => addresses.push(net.addr),
                Ok(_) => self.issue(
                    doc,
                    format!("spec.addresses[{i}]"),
                    "CIDR ranges are not implemented yet; list service VIPs",
                ),
                Err(e) => self.issue(doc, format!("spec.addresses[{i}]"), e.to_string()),
            }
        }
        let mut ports = Vec::new();
        let mut names = HashSet::new();
        for (i, p) in spec.ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let Some(number) = self.port_number(doc, &format!("{field}.number"), p.number) else {
                continue;
            };
            if p.name.is_empty() {
                self.issue(doc, format!("{field}.name"), "must not be empty");
            } else if !names.insert(p.name.clone()) {
                self.issue(
                    doc,
                    format!("{field}.name"),
                    format!("duplicate port name `{}`", p.name),
                );
            }
            if ports.iter().any(|q: &PortDraft| q.number == number) {
                self.issue(
                    doc,
                    format!("{field}.number"),
                    format!("duplicate port {number}"),
                );
            }
            let protocol = match p.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => Protocol::parse(s).unwrap_or_else(|| {
                    self.issue(doc, format!("{field}.protocol"), format!("unknown protocol `{s}` (HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO, MYSQL, REDIS)"));
                    Protocol::Tcp
                }),
            };
            let target_port = match p.target_port {
                Some(t) => self
                    .port_number(doc, &format!("{field}.targetPort"), t)
                    .unwrap_or(number),
                None => number,
            };
            ports.push(PortDraft {
                number,
                name: p.name.clone(),
                protocol,
                target_port,
            });
        }
        let resolution = spec.resolution.unwrap_or(if spec.endpoints.is_empty() {
            Resolution::None
        } else {
            Resolution::Static
        });
        match resolution {
            Resolution::Static | Resolution::None => {}
            Resolution::Dns | Resolution::DnsRoundRobin => self.issue(
                doc,
                "spec.resolution",
                "DNS resolution is not implemented yet; use STATIC with endpoints",
            ),
        }
        if resolution == Resolution::None && !spec.endpoints.is_empty() {
            self.issue(doc, "spec.endpoints", "endpoints need `resolution: STATIC`");
        }
        let mut endpoints = Vec::new();
        for (i, e) in spec.endpoints.iter().enumerate() {
            let field = format!("spec.endpoints[{i}]");
            let address = match e.address.parse::<IpAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.issue(
                        doc,
                        format!("{field}.address"),
                        format!("`{}` is not an IP address", e.address),
                    );
                    continue;
                }
            };
            let mut eports = HashMap::new();
            for (name, number) in &e.ports {
                if !names.contains(name) {
                    self.issue(
                        doc,
                        format!("{field}.ports.{name}"),
                        "names no port of this ServiceEntry",
                    );
                }
                if let Some(n) = self.port_number(doc, &format!("{field}.ports.{name}"), *number) {
                    eports.insert(name.clone(), n);
                }
            }
            let weight = e.weight.unwrap_or(1);
            if weight == 0 {
                self.issue(doc, format!("{field}.weight"), "must be at least 1");
            }
            endpoints.push(EndpointDraft {
                address,
                ports: eports,
                labels: e.labels.clone(),
                service_account: e.service_account.clone(),
                weight,
            });
        }
        (self.issues.len() == before).then(|| ServiceDraft {
            hosts,
            name: doc.metadata.name.clone(),
            namespace: ns,
            addresses,
            ports,
            endpoints,
            mesh_external: spec.location == Some(wire::Location::MeshExternal),
            passthrough: resolution == Resolution::None,
        })
    }

    fn port_number(&mut self, doc: &Document, field: &str, n: u32) -> Option<u16> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.issue(doc, field, format!("{n} is not a port number (1-65535)"));
                None
            }
        }
    }

    fn subsets(
        &mut self,
        documents: &[Document],
        registry: &Registry,
    ) -> HashMap<(usize, String), BTreeMap<String, String>> {
        let mut subsets = HashMap::new();
        let mut seen_hosts = HashMap::new();
        for doc in documents {
            let Resource::DestinationRule(spec) = &doc.resource else {
                continue;
            };
            let host = qualify(&spec.host, doc.namespace());
            let Some(&service) = registry.by_host.get(&host) else {
                self.issue(
                    doc,
                    "spec.host",
                    format!("unknown host `{host}`: no ServiceEntry declares it"),
                );
                continue;
            };
            if let Some(other) = seen_hosts.insert(service, doc.metadata.name.clone()) {
                self.issue(
                    doc,
                    "spec.host",
                    format!("DestinationRule `{other}` already applies to `{host}`"),
                );
                continue;
            }
            for (i, subset) in spec.subsets.iter().enumerate() {
                if subsets
                    .insert((service, subset.name.clone()), subset.labels.clone())
                    .is_some()
                {
                    self.issue(
                        doc,
                        format!("spec.subsets[{i}].name"),
                        format!("duplicate subset `{}`", subset.name),
                    );
                }
            }
        }
        subsets
    }

    fn virtual_services(
        &mut self,
        documents: &[Document],
        registry: &Registry,
        subsets: &HashMap<(usize, String), BTreeMap<String, String>>,
    ) -> HashMap<(usize, u16), Vec<RouteDraft>> {
        let mut routes: HashMap<(usize, u16), Vec<RouteDraft>> = HashMap::new();
        let mut owner: HashMap<usize, String> = HashMap::new();
        for doc in documents {
            let Resource::VirtualService(spec) = &doc.resource else {
                continue;
            };
            let ns = doc.namespace();
            let vs_name = format!("{ns}/{}", doc.metadata.name);
            let mut targets = Vec::new();
            if spec.hosts.is_empty() {
                self.issue(doc, "spec.hosts", "at least one host is required");
            }
            for (i, h) in spec.hosts.iter().enumerate() {
                let host = qualify(h, ns);
                match registry.by_host.get(&host) {
                    Some(&s) => {
                        if let Some(other) = owner.insert(s, vs_name.clone()) {
                            self.issue(
                                doc,
                                format!("spec.hosts[{i}]"),
                                format!("VirtualService `{other}` already routes `{host}`"),
                            );
                        } else {
                            targets.push(s);
                        }
                    }
                    None => self.issue(
                        doc,
                        format!("spec.hosts[{i}]"),
                        format!("unknown host `{host}`: no ServiceEntry declares it"),
                    ),
                }
            }
            for (r, route) in spec.tcp.iter().enumerate() {
                let field = format!("spec.tcp[{r}]");
                let Some(draft) = self.tcp_route(doc, &field, route, &targets, registry, subsets)
                else {
                    continue;
                };
                for &service in &targets {
                    for port in &registry.services[service].ports {
                        let applies = draft.0.is_empty()
                            || draft
                                .0
                                .iter()
                                .any(|m| m.port.is_none_or(|p| p == port.number));
                        if !applies {
                            continue;
                        }
                        let destinations = draft
                            .1
                            .iter()
                            .map(|(dest_service, dest_port, subset, weight)| {
                                (
                                    ClusterKey {
                                        service: *dest_service,
                                        port: dest_port.unwrap_or(port.number),
                                        subset: subset.clone(),
                                    },
                                    *weight,
                                )
                            })
                            .collect::<Vec<_>>();
                        // A destination without a port keeps the incoming port: it must exist there.
                        let missing = destinations.iter().find(|(k, _)| {
                            !registry.services[k.service]
                                .ports
                                .iter()
                                .any(|p| p.number == k.port)
                        });
                        if let Some((k, _)) = missing {
                            self.issue(
                                doc,
                                format!("{field}.route"),
                                format!(
                                    "`{}` has no port {}; set destination.port",
                                    registry.services[k.service].hosts[0], k.port
                                ),
                            );
                            continue;
                        }
                        routes
                            .entry((service, port.number))
                            .or_default()
                            .push(RouteDraft {
                                matches: draft.0.clone(),
                                destinations,
                                virtual_service: Some(vs_name.clone()),
                            });
                    }
                }
            }
        }
        routes
    }

    #[allow(clippy::type_complexity)]
    fn tcp_route(
        &mut self,
        doc: &Document,
        field: &str,
        route: &wire::TcpRoute,
        targets: &[usize],
        registry: &Registry,
        subsets: &HashMap<(usize, String), BTreeMap<String, String>>,
    ) -> Option<(Vec<L4Match>, Vec<(usize, Option<u16>, Option<String>, u32)>)> {
        let before = self.issues.len();
        let mut matches = Vec::new();
        for (m, attrs) in route.matches.iter().enumerate() {
            let mfield = format!("{field}.match[{m}]");
            let port = attrs
                .port
                .and_then(|p| self.port_number(doc, &format!("{mfield}.port"), p));
            if let Some(p) = port {
                if !targets
                    .iter()
                    .any(|&s| registry.services[s].ports.iter().any(|q| q.number == p))
                {
                    self.issue(
                        doc,
                        format!("{mfield}.port"),
                        format!("no host of this VirtualService has port {p}"),
                    );
                }
            }
            let mut nets = Vec::new();
            for (i, s) in attrs.destination_subnets.iter().enumerate() {
                match s.parse::<IpNet>() {
                    Ok(n) => nets.push(n),
                    Err(e) => self.issue(
                        doc,
                        format!("{mfield}.destinationSubnets[{i}]"),
                        e.to_string(),
                    ),
                }
            }
            matches.push(L4Match {
                destination_subnets: nets,
                port,
            });
        }
        if route.route.is_empty() {
            self.issue(
                doc,
                format!("{field}.route"),
                "at least one destination is required",
            );
        }
        let mut destinations = Vec::new();
        for (d, dest) in route.route.iter().enumerate() {
            let dfield = format!("{field}.route[{d}]");
            let host = qualify(&dest.destination.host, doc.namespace());
            let Some(&service) = registry.by_host.get(&host) else {
                self.issue(
                    doc,
                    format!("{dfield}.destination.host"),
                    format!("unknown host `{host}`: no ServiceEntry declares it"),
                );
                continue;
            };
            if let Some(subset) = &dest.destination.subset {
                if !subsets.contains_key(&(service, subset.clone())) {
                    self.issue(
                        doc,
                        format!("{dfield}.destination.subset"),
                        format!("no DestinationRule for `{host}` defines subset `{subset}`"),
                    );
                }
            }
            let port = match &dest.destination.port {
                Some(sel) => {
                    let p = self.port_number(
                        doc,
                        &format!("{dfield}.destination.port.number"),
                        sel.number,
                    );
                    if let Some(p) = p {
                        if !registry.services[service]
                            .ports
                            .iter()
                            .any(|q| q.number == p)
                        {
                            self.issue(
                                doc,
                                format!("{dfield}.destination.port.number"),
                                format!("`{host}` has no port {p}"),
                            );
                        }
                    }
                    p
                }
                None => None,
            };
            destinations.push((service, port, dest.destination.subset.clone(), dest.weight));
        }
        let weights = self.weights(
            doc,
            field,
            &destinations.iter().map(|d| d.3).collect::<Vec<_>>(),
        );
        if self.issues.len() != before {
            return None;
        }
        let destinations = destinations
            .into_iter()
            .zip(weights)
            .map(|((s, p, sub, _), w)| (s, p, sub, w))
            .collect();
        Some((matches, destinations))
    }

    /// Istio's rule: one destination may omit its weight (100); several must add up to 100.
    fn weights(&mut self, doc: &Document, field: &str, weights: &[Option<u32>]) -> Vec<u32> {
        if weights.len() == 1 {
            return vec![weights[0].unwrap_or(100).max(1)];
        }
        let resolved: Vec<u32> = weights.iter().map(|w| w.unwrap_or(0)).collect();
        let sum: u32 = resolved.iter().sum();
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

#[cfg(test)]
mod tests;
