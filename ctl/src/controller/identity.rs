//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, parsed
//! and derived strictly. Pure (std only) so the fuzz target includes this file as is.
//!
//! Stricter than the SPIFFE spec on purpose: the path must be exactly `/ns/<ns>/sa/<sa>` with
//! names Kubernetes could have made (a namespace is a DNS-1123 label, a service account a
//! DNS-1123 subdomain), so an identity that no pod can run as is never signed.

use std::fmt;

/// Why a SPIFFE ID or a TokenReview username is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not a spiffe:// URI")]
    NotSpiffe,
    #[error("trust domain {0:?}: lowercase letters, digits, '.', '-' and '_', 1 to 255 of them")]
    TrustDomain(String),
    #[error("the path is not /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("namespace {0:?} is not a DNS-1123 label")]
    Namespace(String),
    #[error("service account {0:?} is not a DNS-1123 subdomain")]
    ServiceAccount(String),
    #[error("username {0:?} is not system:serviceaccount:<namespace>:<name>")]
    NotAServiceAccount(String),
}

/// A workload's identity: the trust domain and the pod's namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// The identity of `service_account` in `namespace`, every part checked.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        if !is_trust_domain(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.to_owned()));
        }
        if !is_dns1123_label(namespace) {
            return Err(IdentityError::Namespace(namespace.to_owned()));
        }
        if !is_dns1123_subdomain(service_account) {
            return Err(IdentityError::ServiceAccount(service_account.to_owned()));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`: no port, user, query, fragment, percent
    /// escapes, empty or extra segments, and no uppercase (SPIFFE IDs compare byte for byte).
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or(IdentityError::NotSpiffe)?;
        let (trust_domain, path) = rest.split_once('/').ok_or(IdentityError::Path)?;
        let mut segments = path.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                SpiffeId::new(trust_domain, namespace, service_account)
            }
            _ if !is_trust_domain(trust_domain) => {
                Err(IdentityError::TrustDomain(trust_domain.to_owned()))
            }
            _ => Err(IdentityError::Path),
        }
    }

    /// The identity a TokenReview's `status.user.username` proves:
    /// `system:serviceaccount:<ns>:<sa>` (any other user — a person, a node — proves none).
    pub fn from_username(username: &str, trust_domain: &str) -> Result<Self, IdentityError> {
        let not = || IdentityError::NotAServiceAccount(username.to_owned());
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(not)?;
        let (namespace, service_account) = rest.split_once(':').ok_or_else(not)?;
        SpiffeId::new(trust_domain, namespace, service_account)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// SPIFFE's trust domain characters (lowercase only), at most 255.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Kubernetes' DNS-1123 label: 1 to 63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|&b| alnum(b) || b == b'-')
        }
        _ => false,
    }
}

/// Kubernetes' DNS-1123 subdomain: at most 253, dot-separated DNS-1123 labels.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_identity_round_trips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web.v1").unwrap();
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web.v1");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web.v1");
        assert_eq!(
            SpiffeId::from_username("system:serviceaccount:shop:web.v1", "cluster.local"),
            Ok(id)
        );
    }

    #[test]
    fn anything_a_pod_cannot_run_as_is_refused() {
        for uri in [
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/shop/sa/web/",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/we%62",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns/shop/sa/web#f",
            "spiffe://cluster.local:443/ns/shop/sa/web",
            "spiffe://user@cluster.local/ns/shop/sa/web",
            "spiffe://Cluster.local/ns/shop/sa/web",
            "spiffe:///ns/shop/sa/web",
            "spiffe://cluster.local/sa/web/ns/shop",
            "SPIFFE://cluster.local/ns/shop/sa/web",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/-shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web..v1",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri} was accepted");
        }
        let long_label = "a".repeat(64);
        assert!(SpiffeId::new("cluster.local", &long_label, "web").is_err());
        assert!(SpiffeId::new("cluster.local", "shop", &"a.".repeat(127)).is_err());
    }

    #[test]
    fn only_service_account_users_prove_an_identity() {
        for user in [
            "system:node:worker-1",
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount:shop:web:extra",
            "system:serviceaccount::web",
            "system:serviceaccounts:shop",
        ] {
            assert!(
                SpiffeId::from_username(user, "cluster.local").is_err(),
                "{user} was accepted"
            );
        }
    }
}
