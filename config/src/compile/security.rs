//! PeerAuthentication and AuthorizationPolicy: validated as Istio's webhook validates them
//! (`ValidatePeerAuthentication`, `ValidateAuthorizationPolicy`), and stricter where Istio would
//! accept something that cannot mean what was written (see docs/CONFIG.md), then compiled into
//! the matchers of [`crate::snapshot::Security`].

use std::sync::Arc;

use super::matching::is_dns_label;
use super::Compiler;
use crate::net::IpNet;
use crate::parse::{Document, Resource};
use crate::snapshot::authz::{AuthzPolicies, AuthzPolicy, Condition, Operation, Rule, Source};
use crate::snapshot::authz_match::{Either, Pattern};
use crate::snapshot::peer_auth::{MtlsMode, PeerAuthentication, PeerAuthentications};
use crate::snapshot::security::{Security, Selector};
use crate::wire::{self, AuthzAction, MtlsModeWire};

impl Compiler {
    pub(super) fn security(&mut self, documents: &[Document]) -> Security {
        let mut peer = Vec::new();
        let mut policies = Vec::new();
        for doc in documents {
            match &doc.resource {
                Resource::PeerAuthentication(spec) => {
                    if let Some(pa) = self.peer_authentication(doc, spec) {
                        let created = doc.metadata.creation_timestamp.clone();
                        peer.push((created, pa));
                    }
                }
                Resource::AuthorizationPolicy(spec) => {
                    if let Some(policy) = self.authorization_policy(doc, spec) {
                        policies.push(policy);
                    }
                }
                _ => {}
            }
        }
        // Istio's `sortConfigByCreationTime`: oldest first, then by name, then namespace. RFC 3339
        // UTC timestamps as the API server writes them sort as text; no timestamp (a file) sorts
        // first, as Go's zero time does.
        peer.sort_by(|(ca, a), (cb, b)| {
            (ca, &a.name, &a.namespace).cmp(&(cb, &b.name, &b.namespace))
        });
        policies.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        let mut authorization = (Vec::new(), Vec::new(), Vec::new());
        for (action, policy) in policies {
            match action {
                AuthzAction::Deny => authorization.0.push(policy),
                AuthzAction::Allow => authorization.1.push(policy),
                AuthzAction::Audit => authorization.2.push(policy),
                AuthzAction::Custom => unreachable!("rejected when compiled"),
            }
        }
        Security {
            peer_authentications: PeerAuthentications(peer.into_iter().map(|(_, p)| p).collect()),
            authorization: AuthzPolicies {
                deny: authorization.0.into(),
                allow: authorization.1.into(),
                audit: authorization.2.into(),
            },
            ..Security::default()
        }
    }

    /// `None` selector for an absent or empty `matchLabels` (Istio: namespace-wide).
    fn selector(
        &mut self,
        doc: &Document,
        selector: Option<&wire::WorkloadSelector>,
    ) -> Option<Selector> {
        let labels = &selector?.match_labels;
        for (k, v) in labels {
            if k.is_empty() || k.contains('*') || v.contains('*') {
                self.issue(
                    doc,
                    "spec.selector.matchLabels",
                    format!("invalid label `{k}: {v}` (empty keys and wildcards are not allowed)"),
                );
            }
        }
        (!labels.is_empty()).then(|| {
            Selector(
                labels
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                    .collect(),
            )
        })
    }

    fn peer_authentication(
        &mut self,
        doc: &Document,
        spec: &wire::PeerAuthenticationSpec,
    ) -> Option<PeerAuthentication> {
        let before = self.issues.len();
        let selector = self.selector(doc, spec.selector.as_ref());
        let mut ports = Vec::new();
        if let Some(port_level) = &spec.port_level_mtls {
            if selector.is_none() {
                self.issue(
                    doc,
                    "spec.portLevelMtls",
                    "mesh/namespace peer authentication cannot have port level mTLS: \
                     portLevelMtls needs a workload selector",
                );
            }
            if port_level.is_empty() {
                self.issue(
                    doc,
                    "spec.portLevelMtls",
                    "port level mTLS, if defined, must have at least one element",
                );
            }
            for (port, mtls) in port_level {
                match port.parse::<u16>() {
                    Ok(number) if number > 0 => {
                        if let Some(mode) = mode_of(mtls.mode) {
                            ports.push((number, mode));
                        }
                    }
                    _ => self.issue(
                        doc,
                        format!("spec.portLevelMtls.{port}"),
                        "port must be a number in 1..65535",
                    ),
                }
            }
        }
        (self.issues.len() == before).then(|| PeerAuthentication {
            namespace: Arc::from(doc.namespace()),
            name: doc.metadata.name.as_str().into(),
            selector,
            mode: spec.mtls.as_ref().and_then(|m| mode_of(m.mode)),
            ports: ports.into(),
        })
    }

    fn authorization_policy(
        &mut self,
        doc: &Document,
        spec: &wire::AuthorizationPolicySpec,
    ) -> Option<(AuthzAction, AuthzPolicy)> {
        let before = self.issues.len();
        let selector = self.selector(doc, spec.selector.as_ref());
        let action = spec.action.unwrap_or(AuthzAction::Allow);
        if action == AuthzAction::Custom {
            self.issue(
                doc,
                "spec.action",
                "CUSTOM (external authorization) is not supported yet: use ALLOW, DENY or AUDIT",
            );
        }
        let rules: Vec<Rule> = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| self.authz_rule(doc, &format!("spec.rules[{i}]"), rule))
            .collect();
        (self.issues.len() == before).then(|| {
            let policy = AuthzPolicy {
                id: format!("{}/{}", doc.namespace(), doc.metadata.name).into(),
                namespace: Arc::from(doc.namespace()),
                selector,
                rules: rules.into(),
            };
            (action, policy)
        })
    }

    fn authz_rule(&mut self, doc: &Document, field: &str, rule: &wire::AuthzRule) -> Rule {
        let mut http_only = false;
        let from = rule.from.as_ref().map(|from| {
            if from.is_empty() {
                self.issue(doc, format!("{field}.from"), "`from` must not be empty");
            }
            from.iter()
                .enumerate()
                .map(|(j, f)| self.authz_source(doc, &format!("{field}.from[{j}].source"), f))
                .collect()
        });
        let to = rule.to.as_ref().map(|to| {
            if to.is_empty() {
                self.issue(doc, format!("{field}.to"), "`to` must not be empty");
            }
            to.iter()
                .enumerate()
                .map(|(j, t)| {
                    let op = self.authz_operation(doc, &format!("{field}.to[{j}].operation"), t);
                    http_only |=
                        !(op.hosts.is_empty() && op.methods.is_empty() && op.paths.is_empty());
                    op
                })
                .collect()
        });
        let when = rule
            .when
            .iter()
            .enumerate()
            .filter_map(|(j, c)| {
                let condition = self.authz_condition(doc, &format!("{field}.when[{j}]"), c)?;
                http_only |= matches!(condition, Condition::RequestHeader(..));
                Some(condition)
            })
            .collect();
        Rule {
            from,
            to,
            when,
            http_only,
        }
    }

    fn authz_source(&mut self, doc: &Document, field: &str, from: &wire::AuthzFrom) -> Source {
        let Some(s) = &from.source else {
            self.issue(doc, field, "`from.source` must not be nil");
            return Source::default();
        };
        let source = Source {
            principals: self.either(
                doc,
                field,
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                pattern,
            ),
            namespaces: self.either(
                doc,
                field,
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                namespace,
            ),
            ip_blocks: self.either(
                doc,
                field,
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                net,
            ),
            remote_ip_blocks: self.either(
                doc,
                field,
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                net,
            ),
        };
        let written = [
            &s.principals,
            &s.not_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        ];
        if written.iter().all(|list| list.is_empty()) {
            self.issue(doc, field, "`from.source` must not be empty");
        }
        source
    }

    fn authz_operation(&mut self, doc: &Document, field: &str, to: &wire::AuthzTo) -> Operation {
        let Some(o) = &to.operation else {
            self.issue(doc, field, "`to.operation` must not be nil");
            return Operation::default();
        };
        let operation = Operation {
            hosts: self.either(
                doc,
                field,
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                pattern,
            ),
            ports: self.either(
                doc,
                field,
                ("ports", &o.ports),
                ("notPorts", &o.not_ports),
                port,
            ),
            methods: self.either(
                doc,
                field,
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                pattern,
            ),
            paths: self.either(
                doc,
                field,
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
                path,
            ),
        };
        let written = [
            &o.hosts,
            &o.not_hosts,
            &o.ports,
            &o.not_ports,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ];
        if written.iter().all(|list| list.is_empty()) {
            self.issue(doc, field, "`to.operation` must not be empty");
        }
        operation
    }

    /// One `when` condition; `None` (with an issue) for a key isthmus does not evaluate.
    fn authz_condition(
        &mut self,
        doc: &Document,
        field: &str,
        c: &wire::AuthzCondition,
    ) -> Option<Condition> {
        if c.values.is_empty() && c.not_values.is_empty() {
            self.issue(
                doc,
                field,
                format!(
                    "at least one of values or notValues must be set for key `{}`",
                    c.key
                ),
            );
        }
        let both = (("values", &c.values[..]), ("notValues", &c.not_values[..]));
        let key = c.key.as_str();
        let condition = match key {
            "source.ip" => Condition::SourceIp(self.either(doc, field, both.0, both.1, net)),
            "remote.ip" => Condition::RemoteIp(self.either(doc, field, both.0, both.1, net)),
            "destination.ip" => {
                Condition::DestinationIp(self.either(doc, field, both.0, both.1, net))
            }
            "destination.port" => {
                Condition::DestinationPort(self.either(doc, field, both.0, both.1, port))
            }
            "source.namespace" => {
                Condition::SourceNamespace(self.either(doc, field, both.0, both.1, namespace))
            }
            "source.principal" => {
                Condition::SourcePrincipal(self.either(doc, field, both.0, both.1, pattern))
            }
            "connection.sni" => {
                Condition::ConnectionSni(self.either(doc, field, both.0, both.1, pattern))
            }
            _ => {
                if let Some(name) = key
                    .strip_prefix("request.headers[")
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    if name.is_empty() || name.contains(['[', ']']) {
                        self.issue(
                            doc,
                            format!("{field}.key"),
                            format!("`{key}`: the header name must be one name in brackets"),
                        );
                        return None;
                    }
                    let values = self.either(doc, field, both.0, both.1, pattern);
                    return Some(Condition::RequestHeader(name.into(), values));
                }
                let message = if key.starts_with("request.auth.") {
                    format!("`{key}` is not supported: it needs RequestAuthentication (JWT), which isthmus does not implement yet")
                } else if key.starts_with("experimental.") {
                    format!("`{key}` is not supported")
                } else {
                    format!(
                        "unknown key `{key}` (isthmus refuses it rather than ignore it): expected \
                         request.headers[NAME], source.ip, remote.ip, source.namespace, \
                         source.principal, destination.ip, destination.port or connection.sni"
                    )
                };
                self.issue(doc, format!("{field}.key"), message);
                return None;
            }
        };
        Some(condition)
    }

    /// Parses a field and its `not*` twin, reporting each bad value at `field.name[i]`.
    fn either<T>(
        &mut self,
        doc: &Document,
        field: &str,
        (name, values): (&str, &[String]),
        (not_name, not_values): (&str, &[String]),
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Either<T> {
        let mut one = |name: &str, list: &[String]| -> Box<[T]> {
            list.iter()
                .enumerate()
                .filter_map(|(i, v)| match parse(v) {
                    Ok(t) => Some(t),
                    Err(message) => {
                        self.issue(doc, format!("{field}.{name}[{i}]"), message);
                        None
                    }
                })
                .collect()
        };
        Either {
            values: one(name, values),
            not_values: one(not_name, not_values),
        }
    }
}

fn pattern(value: &str) -> Result<Pattern, String> {
    Pattern::parse(value).map_err(|e| e.to_string())
}

fn path(value: &str) -> Result<Pattern, String> {
    Pattern::parse_path(value).map_err(|e| e.to_string())
}

/// Istio matches `namespaces` inside the principal (`*/ns/<value>/*`); isthmus matches the
/// namespace itself, so a value must be a namespace name, optionally with a leading or trailing
/// `*`.
fn namespace(value: &str) -> Result<Pattern, String> {
    let parsed = pattern(value)?;
    let bare = value.trim_start_matches('*').trim_end_matches('*');
    let valid = if value.contains('*') {
        bare.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    } else {
        is_dns_label(value)
    };
    if !valid {
        return Err(format!(
            "`{value}` is not a namespace name (or a `*` pattern of one)"
        ));
    }
    Ok(parsed)
}

fn net(value: &str) -> Result<IpNet, String> {
    value.parse::<IpNet>().map_err(|e| e.to_string())
}

fn port(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .map_err(|_| format!("`{value}` is not a port number (0..65535)"))
}

fn mode_of(mode: MtlsModeWire) -> Option<MtlsMode> {
    match mode {
        MtlsModeWire::Unset => None,
        MtlsModeWire::Disable => Some(MtlsMode::Disable),
        MtlsModeWire::Permissive => Some(MtlsMode::Permissive),
        MtlsModeWire::Strict => Some(MtlsMode::Strict),
    }
}
