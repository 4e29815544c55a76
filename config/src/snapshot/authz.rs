//! AuthorizationPolicy evaluation, with Istio's semantics:
//! 1. CUSTOM (not supported: rejected when loading) → DENY → ALLOW;
//! 2. a matching DENY policy denies;
//! 3. no ALLOW policy applies to the workload → allow;
//! 4. a matching ALLOW policy allows; ALLOW policies apply and none matches → deny.
//!
//! AUDIT policies never change the decision; the first that matches is reported with it.
//!
//! A policy applies to a workload when it is in the workload's namespace or in the root
//! namespace (mesh-wide) and, if it has a selector, the selector matches the workload's labels
//! (a root-namespace selector matches workloads in every namespace). A policy matches when one
//! of its rules matches; no rules match nothing (so an ALLOW policy without rules allows
//! nothing, and a rule `{}` matches everything). Within a rule `from`, `to` and `when` are
//! ANDed, the entries of `from` (and of `to`) ORed, the fields of one entry ANDed, a field's
//! values ORed, and a `not*` field matches when none of its values does.
//!
//! **TCP (no HTTP attributes).** Istio builds the TCP filter from the same policies and treats
//! HTTP-only fields (`hosts`, `methods`, `paths`, their `not*` forms, `request.headers[...]`)
//! by action (istio/istio `pilot/pkg/security/authz/model`, `rule.checkError`): in an ALLOW
//! policy a rule with any HTTP-only field is dropped ("a smaller allow policy, less likely to
//! allow"), so it never matches TCP; in a DENY or AUDIT policy only the HTTP-only *field* is
//! dropped and the rest of the rule still applies ("a wider deny policy, more likely to deny").
//! Istio's concept page says it in one line: "a DENY rule with HTTP-only fields still denies".
//! isthmus evaluates exactly that: an unknowable HTTP-only condition is false for ALLOW and
//! ignored (true) for DENY and AUDIT.

use std::net::IpAddr;

use super::authz_match::{nets_match, ports_match, strings_match, Either, Pattern};
use super::security::{Selector, Workload};
use super::{Snapshot, Text};
use crate::net::IpNet;

/// What is known about one connection or request when it is authorized.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The peer's verified SPIFFE identity without `spiffe://`
    /// (`cluster.local/ns/default/sa/sleep`); `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The namespace in the peer's identity; `None` for plaintext.
    pub source_namespace: Option<&'a str>,
    /// The downstream peer's address (`ipBlocks`, `source.ip`).
    pub source_ip: IpAddr,
    /// The original client's address (`remoteIpBlocks`, `remote.ip`), e.g. from
    /// `X-Forwarded-For`; `None`: the same as `source_ip`.
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// TLS SNI of the downstream connection.
    pub sni: Option<&'a str>,
    /// `None` on TCP: HTTP-only conditions are then unknown (see the module doc).
    pub http: Option<HttpRequest<'a>>,
}

/// The namespace in a SPIFFE principal `TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT` (without
/// `spiffe://`): how Istio derives `source.namespace` from the peer's identity.
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    let (_domain, ns_key, namespace, sa_key, account) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let well_formed = ns_key == "ns" && sa_key == "sa" && parts.next().is_none();
    (well_formed && !namespace.is_empty() && !account.is_empty()).then_some(namespace)
}

/// The HTTP attributes of a request.
#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    /// `Host` / `:authority`, as sent: a `:port` the client sent is part of it, as in Istio
    /// (a policy lists `name` and `name:*` to cover both).
    pub host: &'a str,
    pub method: &'a str,
    /// The normalized path; a query (`?…`) or fragment is ignored, as Istio matches Envoy's
    /// `url_path`.
    pub path: &'a str,
    pub headers: &'a dyn HeaderLookup,
}

/// Request headers by name (case-insensitive). Several values of one header are one value
/// joined with `,`, as Envoy's header matcher sees them.
pub trait HeaderLookup {
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl HeaderLookup for Vec<(&str, &str)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

/// Which rule of which policy matched: `policy` is `namespace/name`, `rule` the index in
/// `spec.rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef<'s> {
    pub policy: &'s str,
    pub rule: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'s> {
    /// No ALLOW policy applies to the workload (and no DENY matched).
    AllowedWithoutPolicy,
    Allowed(RuleRef<'s>),
    Denied(RuleRef<'s>),
    /// ALLOW policies apply and none matched.
    DeniedNoAllowMatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'s> {
    pub verdict: Verdict<'s>,
    /// The first AUDIT policy that matched: the request is to be audited.
    pub audit: Option<RuleRef<'s>>,
}

impl Decision<'_> {
    pub fn is_allowed(&self) -> bool {
        matches!(
            self.verdict,
            Verdict::AllowedWithoutPolicy | Verdict::Allowed(_)
        )
    }

    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<RuleRef<'_>> {
        match self.verdict {
            Verdict::Allowed(r) | Verdict::Denied(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Deny,
    Audit,
}

/// The policies by action, each sorted by `namespace/name`.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthzPolicies {
    pub(crate) deny: Box<[AuthzPolicy]>,
    pub(crate) allow: Box<[AuthzPolicy]>,
    pub(crate) audit: Box<[AuthzPolicy]>,
}

impl AuthzPolicies {
    pub(crate) fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AuthzPolicy {
    /// `namespace/name`.
    pub(crate) id: Box<str>,
    pub(crate) namespace: Text,
    pub(crate) selector: Option<Selector>,
    pub(crate) rules: Box<[Rule]>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Rule {
    /// `None`: no `from` (any source).
    pub(crate) from: Option<Box<[Source]>>,
    pub(crate) to: Option<Box<[Operation]>>,
    pub(crate) when: Box<[Condition]>,
    /// Some field needs HTTP attributes: on TCP the rule never matches in an ALLOW policy.
    pub(crate) http_only: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Source {
    pub(crate) principals: Either<Pattern>,
    pub(crate) namespaces: Either<Pattern>,
    pub(crate) ip_blocks: Either<IpNet>,
    pub(crate) remote_ip_blocks: Either<IpNet>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Operation {
    pub(crate) hosts: Either<Pattern>,
    pub(crate) ports: Either<u16>,
    pub(crate) methods: Either<Pattern>,
    pub(crate) paths: Either<Pattern>,
}

#[derive(Debug, Clone)]
pub(crate) enum Condition {
    RequestHeader(Box<str>, Either<Pattern>),
    SourceIp(Either<IpNet>),
    RemoteIp(Either<IpNet>),
    SourceNamespace(Either<Pattern>),
    SourcePrincipal(Either<Pattern>),
    DestinationIp(Either<IpNet>),
    DestinationPort(Either<u16>),
    ConnectionSni(Either<Pattern>),
}

impl Source {
    fn matches(&self, r: &Request<'_>) -> bool {
        strings_match(&self.principals, r.source_principal)
            && strings_match(&self.namespaces, r.source_namespace)
            && nets_match(&self.ip_blocks, r.source_ip)
            && nets_match(&self.remote_ip_blocks, r.remote_ip.unwrap_or(r.source_ip))
    }
}

impl Operation {
    /// `lenient`: HTTP-only fields count as matching when the request has no HTTP attributes
    /// (DENY and AUDIT on TCP).
    fn matches(&self, r: &Request<'_>, lenient: bool) -> bool {
        if !ports_match(&self.ports, r.destination_port) {
            return false;
        }
        let Some(http) = &r.http else {
            return lenient
                || (self.hosts.is_empty() && self.methods.is_empty() && self.paths.is_empty());
        };
        // Istio's `HostMatcher`: case-insensitive, on `:authority` as sent (a `:port` included).
        self.hosts.check(|p| p.matches_ignoring_case(http.host))
            && strings_match(&self.methods, Some(http.method))
            && strings_match(&self.paths, Some(url_path(http.path)))
    }
}

/// The path without its query or fragment (Envoy's `url_path`).
fn url_path(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

impl Condition {
    fn matches(&self, r: &Request<'_>, lenient: bool) -> bool {
        match self {
            Condition::RequestHeader(name, values) => match &r.http {
                Some(http) => strings_match(values, http.headers.header(name)),
                None => lenient,
            },
            Condition::SourceIp(nets) => nets_match(nets, r.source_ip),
            Condition::RemoteIp(nets) => nets_match(nets, r.remote_ip.unwrap_or(r.source_ip)),
            Condition::SourceNamespace(p) => strings_match(p, r.source_namespace),
            Condition::SourcePrincipal(p) => strings_match(p, r.source_principal),
            Condition::DestinationIp(nets) => nets_match(nets, r.destination_ip),
            Condition::DestinationPort(ports) => ports_match(ports, r.destination_port),
            Condition::ConnectionSni(p) => strings_match(p, r.sni),
        }
    }
}

impl Rule {
    fn matches(&self, r: &Request<'_>, action: Action) -> bool {
        let lenient = action != Action::Allow;
        if r.http.is_none() && self.http_only && !lenient {
            return false;
        }
        self.from
            .as_ref()
            .is_none_or(|from| from.iter().any(|s| s.matches(r)))
            && self
                .to
                .as_ref()
                .is_none_or(|to| to.iter().any(|o| o.matches(r, lenient)))
            && self.when.iter().all(|c| c.matches(r, lenient))
    }
}

impl AuthzPolicy {
    fn applies_to(&self, workload: &Workload<'_>, root: &str) -> bool {
        (*self.namespace == *workload.namespace || &*self.namespace == root)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(workload.labels))
    }

    fn first_match(&self, r: &Request<'_>, action: Action) -> Option<RuleRef<'_>> {
        self.rules
            .iter()
            .position(|rule| rule.matches(r, action))
            .map(|rule| RuleRef {
                policy: &self.id,
                rule,
            })
    }
}

/// The first rule of the first policy in `list` that applies to `workload` and matches.
fn first_match<'s>(
    list: &'s [AuthzPolicy],
    workload: &Workload<'_>,
    root: &str,
    request: &Request<'_>,
    action: Action,
) -> Option<RuleRef<'s>> {
    list.iter()
        .filter(|p| p.applies_to(workload, root))
        .find_map(|p| p.first_match(request, action))
}

impl Snapshot {
    /// Whether `request` to `workload` is allowed, and which policy said so. Without any
    /// AuthorizationPolicy in the snapshot this is one check; it never allocates.
    pub fn authorize(&self, workload: Workload<'_>, request: &Request<'_>) -> Decision<'_> {
        let policies = &self.security.authorization;
        let allowed = Decision {
            verdict: Verdict::AllowedWithoutPolicy,
            audit: None,
        };
        if policies.is_empty() {
            return allowed;
        }
        let root = &*self.security.root_namespace;
        let audit = first_match(&policies.audit, &workload, root, request, Action::Audit);
        if let Some(rule) = first_match(&policies.deny, &workload, root, request, Action::Deny) {
            return Decision {
                verdict: Verdict::Denied(rule),
                audit,
            };
        }
        let mut any_allow = false;
        for policy in policies.allow.iter() {
            if !policy.applies_to(&workload, root) {
                continue;
            }
            any_allow = true;
            if let Some(rule) = policy.first_match(request, Action::Allow) {
                return Decision {
                    verdict: Verdict::Allowed(rule),
                    audit,
                };
            }
        }
        Decision {
            verdict: if any_allow {
                Verdict::DeniedNoAllowMatch
            } else {
                Verdict::AllowedWithoutPolicy
            },
            audit,
        }
    }

    /// Whether some AuthorizationPolicy applies to `workload`: when none does, a sidecar can
    /// skip authorization entirely.
    pub fn has_authorization_for(&self, workload: Workload<'_>) -> bool {
        let policies = &self.security.authorization;
        let root = &*self.security.root_namespace;
        [&policies.deny, &policies.allow]
            .into_iter()
            .flat_map(|list| list.iter())
            .any(|p| p.applies_to(&workload, root))
    }
}
