//! The registry: ServiceEntry documents validated into service drafts, indexed by host.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::{qualify, Address, Compiler, EndpointDraft, PortDraft, Registry, ServiceDraft};
use crate::net::IpNet;
use crate::parse::{Document, Resource};
use crate::snapshot::Protocol;
use crate::wire::{self, Resolution};

impl Compiler {
    pub(super) fn registry(&mut self, documents: &[Document]) -> Registry {
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
        self.export_to(doc, &spec.export_to);
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
            // Istio's protocol selection: the declared protocol, else the port name's prefix,
            // else unspecified (detected per connection).
            let protocol = match p.protocol.as_deref() {
                None => Protocol::from_port_name(&p.name),
                Some(s) => Protocol::parse(s).or_else(|| {
                    self.issue(doc, format!("{field}.protocol"), format!("unknown protocol `{s}` (HTTP, HTTPS, HTTP2, GRPC, GRPC-Web, TLS, TCP, MONGO, MYSQL, REDIS)"));
                    None
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
        let dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if dns && hosts.iter().any(|h| h.starts_with('*')) {
            self.issue(
                doc,
                "spec.hosts",
                "wildcard hosts cannot be resolved by DNS",
            );
        }
        if resolution == Resolution::None && !spec.endpoints.is_empty() {
            self.issue(doc, "spec.endpoints", "endpoints need `resolution: STATIC`");
        }
        let mut endpoints = Vec::new();
        for (i, e) in spec.endpoints.iter().enumerate() {
            let field = format!("spec.endpoints[{i}]");
            let address = match e.address.parse::<IpAddr>() {
                Ok(a) => Address::Ip(a),
                Err(_) if dns && is_dns_name(&e.address) => Address::Name(e.address.clone()),
                Err(_) => {
                    let expected = if dns {
                        "an IP address or a DNS name"
                    } else {
                        "an IP address (names need `resolution: DNS`)"
                    };
                    self.issue(
                        doc,
                        format!("{field}.address"),
                        format!("`{}` is not {expected}", e.address),
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
        // DNS without endpoints: the hosts themselves are resolved (Istio's behaviour).
        if dns && spec.endpoints.is_empty() {
            for host in spec.hosts.iter().filter(|h| !h.starts_with('*')) {
                endpoints.push(EndpointDraft {
                    address: Address::Name(host.clone()),
                    ports: HashMap::new(),
                    labels: Default::default(),
                    service_account: None,
                    weight: 1,
                });
            }
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
            dns_first_only: resolution == Resolution::DnsRoundRobin,
        })
    }

    pub(super) fn port_number(&mut self, doc: &Document, field: &str, n: u32) -> Option<u16> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.issue(doc, field, format!("{n} is not a port number (1-65535)"));
                None
            }
        }
    }
}

/// A hostname as DNS allows it: dot-separated labels of letters, digits and hyphens.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        })
}
