//! Routing documents: DestinationRule subsets and VirtualService TCP routes, checked against
//! the registry.

use std::collections::{BTreeMap, HashMap};

use super::{qualify, ClusterKey, Compiler, Registry, RouteDraft};
use crate::net::IpNet;
use crate::parse::{Document, Resource};
use crate::snapshot::L4Match;
use crate::wire;

impl Compiler {
    pub(super) fn subsets(
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

    pub(super) fn virtual_services(
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
    pub(super) fn tcp_route(
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
}
