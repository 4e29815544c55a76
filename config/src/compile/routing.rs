//! Routing documents: DestinationRules (subsets, traffic policies) and VirtualServices (TCP
//! and HTTP routes), checked against the registry.

use std::collections::HashMap;
use std::sync::Arc;

use super::http::HttpRouteDraft;
use super::matching::is_dns_label;
use super::policy::ServicePolicy;
use super::{qualify, ClusterKey, Compiler, DestRef, Registry, RouteDraft, Routes, SubsetMap};
use crate::net::IpNet;
use crate::parse::{Document, Resource};
use crate::snapshot::{L4Match, L7};
use crate::wire;

impl Compiler {
    pub(super) fn subsets(
        &mut self,
        documents: &[Document],
        registry: &Registry,
    ) -> (SubsetMap, HashMap<usize, ServicePolicy>) {
        let mut subsets = HashMap::new();
        let mut policies = HashMap::new();
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
            self.export_to(doc, &spec.export_to);
            let ports: Vec<u16> = registry.services[service]
                .ports
                .iter()
                .map(|p| p.number)
                .collect();
            let mut policy = ServicePolicy {
                top: spec
                    .traffic_policy
                    .as_ref()
                    .map(|tp| self.traffic_policy(doc, "spec.trafficPolicy", tp, &ports)),
                subsets: HashMap::new(),
            };
            for (i, subset) in spec.subsets.iter().enumerate() {
                if !is_dns_label(&subset.name) {
                    self.issue(
                        doc,
                        format!("spec.subsets[{i}].name"),
                        format!(
                            "subset name `{}` is invalid (not a DNS-1123 label)",
                            subset.name
                        ),
                    );
                }
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
                if let Some(tp) = &subset.traffic_policy {
                    let field = format!("spec.subsets[{i}].trafficPolicy");
                    let layer = self.traffic_policy(doc, &field, tp, &ports);
                    policy.subsets.insert(subset.name.clone(), layer);
                }
            }
            policies.insert(service, policy);
        }
        (subsets, policies)
    }

    pub(super) fn virtual_services(
        &mut self,
        documents: &[Document],
        registry: &Registry,
        subsets: &SubsetMap,
    ) -> Routes {
        let mut routes = Routes::default();
        let mut owner: HashMap<usize, String> = HashMap::new();
        for doc in documents {
            let Resource::VirtualService(spec) = &doc.resource else {
                continue;
            };
            let vs_name = format!("{}/{}", doc.namespace(), doc.metadata.name);
            self.mesh_only_gateways(doc, "spec.gateways", &spec.gateways);
            self.export_to(doc, &spec.export_to);
            let targets = self.vs_targets(doc, spec, &vs_name, registry, &mut owner);
            if spec.http.is_empty() && spec.tcp.is_empty() {
                self.issue(doc, "spec", "http or tcp routes must be provided");
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
                            .map(|(dest, weight)| {
                                (
                                    ClusterKey {
                                        service: dest.service,
                                        port: dest.port.unwrap_or(port.number),
                                        subset: dest.subset.clone(),
                                    },
                                    *weight,
                                )
                            })
                            .collect::<Vec<_>>();
                        // A destination without a port keeps the incoming port: it must exist there.
                        if let Some((k, _)) =
                            destinations.iter().find(|(k, _)| !has_port(registry, k))
                        {
                            self.missing_port(doc, &format!("{field}.route"), registry, k);
                            continue;
                        }
                        routes
                            .tcp
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
            if !spec.http.is_empty()
                && !targets.iter().any(|&s| {
                    registry.services[s]
                        .ports
                        .iter()
                        .any(|p| L7::of(p.protocol) != L7::Opaque)
                })
                && !targets.is_empty()
            {
                self.issue(
                    doc,
                    "spec.http",
                    "no port of this VirtualService's hosts carries HTTP: declare `protocol: HTTP` \
                     (or HTTP2, GRPC), name the port `http-...`, or leave the protocol unset",
                );
            }
            for (r, route) in spec.http.iter().enumerate() {
                let field = format!("spec.http[{r}]");
                let Some(mut rule) = self.http_rule(doc, &field, route, registry, subsets) else {
                    continue;
                };
                rule.virtual_service = vs_name.clone();
                self.http_match_ports(doc, &field, &rule.matches, &targets, registry);
                let rule = Arc::new(rule);
                for &service in &targets {
                    for port in &registry.services[service].ports {
                        if L7::of(port.protocol) == L7::Opaque {
                            continue;
                        }
                        if let Some(draft) =
                            self.bind_http_rule(doc, &field, &rule, port.number, registry)
                        {
                            routes
                                .http
                                .entry((service, port.number))
                                .or_default()
                                .push(draft);
                        }
                    }
                }
            }
        }
        routes
    }

    /// The services a VirtualService's `hosts` name (a `*.suffix` host names every service
    /// with a host under it); each service may be routed by one VirtualService only.
    fn vs_targets(
        &mut self,
        doc: &Document,
        spec: &wire::VirtualServiceSpec,
        vs_name: &str,
        registry: &Registry,
        owner: &mut HashMap<usize, String>,
    ) -> Vec<usize> {
        let ns = doc.namespace();
        let mut targets = Vec::new();
        if spec.hosts.is_empty() {
            self.issue(
                doc,
                "spec.hosts",
                "at least one host is required (delegate VirtualServices are not supported yet)",
            );
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            let found: Vec<usize> = if h == "*" {
                self.issue(
                    doc,
                    &field,
                    "wildcard host * is not allowed for virtual services bound to the mesh",
                );
                continue;
            } else if let Some(suffix) = h.strip_prefix('*') {
                let suffix = suffix.to_ascii_lowercase();
                let mut found: Vec<usize> = registry
                    .by_host
                    .iter()
                    .filter(|(host, _)| host.len() > suffix.len() && host.ends_with(&suffix))
                    .map(|(_, &s)| s)
                    .collect();
                found.sort_unstable();
                found.dedup();
                found
            } else {
                registry
                    .by_host
                    .get(&qualify(h, ns))
                    .copied()
                    .into_iter()
                    .collect()
            };
            if found.is_empty() {
                let host = qualify(h, ns);
                self.issue(
                    doc,
                    &field,
                    format!("unknown host `{host}`: no ServiceEntry declares it"),
                );
            }
            for s in found {
                if targets.contains(&s) {
                    continue;
                }
                match owner.get(&s) {
                    Some(other) if other != vs_name => {
                        let host = &registry.services[s].hosts[0];
                        self.issue(
                            doc,
                            &field,
                            format!("VirtualService `{other}` already routes `{host}`"),
                        );
                    }
                    _ => {
                        owner.insert(s, vs_name.to_string());
                        targets.push(s);
                    }
                }
            }
        }
        targets
    }

    /// A match `port` must be a port of some host of the VirtualService.
    fn http_match_ports(
        &mut self,
        doc: &Document,
        field: &str,
        matches: &[crate::snapshot::HttpMatch],
        targets: &[usize],
        registry: &Registry,
    ) {
        for (m, attrs) in matches.iter().enumerate() {
            if let Some(p) = attrs.port {
                if !targets
                    .iter()
                    .any(|&s| registry.services[s].ports.iter().any(|q| q.number == p))
                {
                    self.issue(
                        doc,
                        format!("{field}.match[{m}].port"),
                        format!("no host of this VirtualService has port {p}"),
                    );
                }
            }
        }
    }

    /// Binds a rule to one port: the match blocks for that port (none left: the rule does not
    /// apply there) and each destination's cluster. A destination without a port goes to the
    /// service's only port, else to the incoming port (Istio's `GetDestinationCluster`).
    fn bind_http_rule(
        &mut self,
        doc: &Document,
        field: &str,
        rule: &Arc<super::http::HttpRule>,
        port: u16,
        registry: &Registry,
    ) -> Option<HttpRouteDraft> {
        let matches: Vec<_> = rule
            .matches
            .iter()
            .filter(|m| m.port.is_none_or(|p| p == port))
            .cloned()
            .collect();
        if !rule.matches.is_empty() && matches.is_empty() {
            return None;
        }
        let key = |dest: &DestRef| {
            let ports = &registry.services[dest.service].ports;
            let port = match (dest.port, ports.as_slice()) {
                (Some(p), _) => p,
                (None, [only]) => only.number,
                (None, _) => port,
            };
            ClusterKey {
                service: dest.service,
                port,
                subset: dest.subset.clone(),
            }
        };
        let destinations: Vec<ClusterKey> = match &rule.action {
            super::http::RuleAction::Route(ds) => ds.iter().map(|d| key(&d.dest)).collect(),
            _ => Vec::new(),
        };
        let mirrors: Vec<ClusterKey> = rule.mirrors.iter().map(|(d, _)| key(d)).collect();
        let mut ok = true;
        for (k, what) in destinations
            .iter()
            .map(|k| (k, "route"))
            .chain(mirrors.iter().map(|k| (k, "mirror")))
        {
            if !has_port(registry, k) {
                self.missing_port(doc, &format!("{field}.{what}"), registry, k);
                ok = false;
            }
        }
        ok.then(|| HttpRouteDraft {
            rule: Some(rule.clone()),
            matches,
            destinations,
            mirrors,
        })
    }

    fn missing_port(&mut self, doc: &Document, field: &str, registry: &Registry, k: &ClusterKey) {
        self.issue(
            doc,
            field,
            format!(
                "`{}` has no port {}; set destination.port",
                registry.services[k.service].hosts[0], k.port
            ),
        );
    }

    pub(super) fn tcp_route(
        &mut self,
        doc: &Document,
        field: &str,
        route: &wire::TcpRoute,
        targets: &[usize],
        registry: &Registry,
        subsets: &SubsetMap,
    ) -> Option<TcpDraft> {
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
            let dfield = format!("{field}.route[{d}].destination");
            if let Some(r) = self.destination(doc, &dfield, &dest.destination, registry, subsets) {
                destinations.push((r, dest.weight));
            }
        }
        let weights = self.weights(
            doc,
            field,
            &route.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
        );
        if self.issues.len() != before {
            return None;
        }
        let destinations = destinations
            .into_iter()
            .zip(weights)
            .map(|((dest, _), w)| (dest, w))
            .collect();
        Some((matches, destinations))
    }

    /// A `destination` (`field` is its path): the host must be in the registry, the subset
    /// defined by its DestinationRule, the port one of its ports.
    pub(super) fn destination(
        &mut self,
        doc: &Document,
        field: &str,
        dest: &wire::Destination,
        registry: &Registry,
        subsets: &SubsetMap,
    ) -> Option<DestRef> {
        let host = qualify(&dest.host, doc.namespace());
        let Some(&service) = registry.by_host.get(&host) else {
            self.issue(
                doc,
                format!("{field}.host"),
                format!("unknown host `{host}`: no ServiceEntry declares it"),
            );
            return None;
        };
        let mut ok = true;
        if let Some(subset) = &dest.subset {
            if !subsets.contains_key(&(service, subset.clone())) {
                self.issue(
                    doc,
                    format!("{field}.subset"),
                    format!("no DestinationRule for `{host}` defines subset `{subset}`"),
                );
                ok = false;
            }
        }
        let port = match &dest.port {
            Some(sel) => {
                let pfield = format!("{field}.port.number");
                let p = self.port_number(doc, &pfield, sel.number);
                match p {
                    Some(p)
                        if !registry.services[service]
                            .ports
                            .iter()
                            .any(|q| q.number == p) =>
                    {
                        self.issue(doc, &pfield, format!("`{host}` has no port {p}"));
                        ok = false;
                    }
                    None => ok = false,
                    Some(_) => {}
                }
                p
            }
            None => None,
        };
        ok.then(|| DestRef {
            service,
            port,
            subset: dest.subset.clone(),
        })
    }
}

/// A TCP route's matches and weighted destinations, before binding to ports.
type TcpDraft = (Vec<L4Match>, Vec<(DestRef, u32)>);

fn has_port(registry: &Registry, k: &ClusterKey) -> bool {
    registry.services[k.service]
        .ports
        .iter()
        .any(|p| p.number == k.port)
}
