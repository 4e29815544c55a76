//! Istio `Sidecar` egress hosts: `namespace/dnsName`, which services a sidecar imports.
//!
//! The namespace part is a namespace name, `*` (any), `.` (the Sidecar's own) or `~` (none);
//! the `dnsName` an exact FQDN, a wildcard in its left-most label (`*.example.com`: any name
//! ending in `.example.com`, Istio's suffix rule) or `*` (every service of the namespace).
//! The namespace is the one a service is defined in (a Kubernetes Service's, a ServiceEntry's),
//! not the one in its host name. Pure: the controller scopes each namespace's registry with it,
//! and a sidecar that implements egress listeners must use the same rules.

/// One parsed egress host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EgressHost {
    namespace: NamespaceSelector,
    name: NamePattern,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum NamespaceSelector {
    Any,
    /// `~`: imports nothing (Istio's way to declare a Sidecar that needs no services).
    Nothing,
    /// A namespace by name; `.` is resolved to the Sidecar's own when parsed.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum NamePattern {
    Any,
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressHostError {
    #[error("egress host `{0}` must be `namespace/dnsName` (e.g. `./*`, `*/reviews.prod.svc.cluster.local`, `istio-system/*`)")]
    NoNamespace(String),
    #[error("egress host `{0}`: a wildcard is allowed only as the whole left-most label (`*.example.com`) or as the whole name (`*`)")]
    Wildcard(String),
}

impl EgressHost {
    /// Parses `text` as written in a Sidecar of `sidecar_namespace` (which `.` names).
    pub fn parse(text: &str, sidecar_namespace: &str) -> Result<Self, EgressHostError> {
        let (namespace, name) = text
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .ok_or_else(|| EgressHostError::NoNamespace(text.to_owned()))?;
        let namespace = match namespace {
            "*" => NamespaceSelector::Any,
            "~" => NamespaceSelector::Nothing,
            "." => NamespaceSelector::Named(sidecar_namespace.to_owned()),
            ns => NamespaceSelector::Named(ns.to_owned()),
        };
        let name = name.to_ascii_lowercase();
        let name = if name == "*" {
            NamePattern::Any
        } else if let Some(suffix) = name.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                return Err(EgressHostError::Wildcard(text.to_owned()));
            }
            NamePattern::Suffix(suffix.to_owned())
        } else if name.contains('*') {
            return Err(EgressHostError::Wildcard(text.to_owned()));
        } else {
            NamePattern::Exact(name)
        };
        Ok(EgressHost { namespace, name })
    }

    /// Whether a service defined in `namespace` under the host name `host` is imported.
    pub fn matches(&self, namespace: &str, host: &str) -> bool {
        let namespace_matches = match &self.namespace {
            NamespaceSelector::Any => true,
            NamespaceSelector::Nothing => false,
            NamespaceSelector::Named(ns) => ns == namespace,
        };
        namespace_matches
            && match &self.name {
                NamePattern::Any => true,
                NamePattern::Suffix(suffix) => {
                    host.len() > suffix.len()
                        && host
                            .get(host.len() - suffix.len()..)
                            .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
                }
                NamePattern::Exact(name) => host.eq_ignore_ascii_case(name),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> EgressHost {
        EgressHost::parse(text, "shop").unwrap()
    }

    #[test]
    fn namespace_part_selects_where_the_service_is_defined() {
        let fqdn = "reviews.prod.svc.cluster.local";
        assert!(host("*/reviews.prod.svc.cluster.local").matches("prod", fqdn));
        assert!(host("*/reviews.prod.svc.cluster.local").matches("other", fqdn));
        assert!(host("prod/*").matches("prod", fqdn));
        assert!(!host("prod/*").matches("shop", "cart.shop.svc.cluster.local"));
        assert!(host("./*").matches("shop", "cart.shop.svc.cluster.local"));
        assert!(!host("./*").matches("prod", fqdn));
        assert!(!host("~/*").matches("prod", fqdn));
        assert!(!host("~/*").matches("shop", "cart.shop.svc.cluster.local"));
    }

    #[test]
    fn dns_name_is_exact_a_left_most_wildcard_suffix_or_everything() {
        assert!(host("*/*.example.com").matches("ext", "api.example.com"));
        assert!(host("*/*.example.com").matches("ext", "a.b.example.com"));
        assert!(!host("*/*.example.com").matches("ext", "example.com"));
        assert!(!host("*/*.example.com").matches("ext", "badexample.com"));
        assert!(host("*/API.Example.com").matches("ext", "api.example.com"));
        assert!(!host("*/api.example.com").matches("ext", "www.api.example.com"));
        assert!(host("*/*").matches("any", "anything.at.all"));
    }

    #[test]
    fn malformed_hosts_are_refused_with_the_form_expected() {
        for bad in ["reviews", "/x", "ns/", "ns/a.*.com", "ns/*foo.com", "ns/*."] {
            let err = EgressHost::parse(bad, "shop").unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
