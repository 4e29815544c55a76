//! Which services a namespace's sidecars get: Istio's `Sidecar` egress hosts, resolved per
//! namespace. Pure.
//!
//! The controller writes one registry per namespace, not per pod, so the scope is the union of
//! what any pod of the namespace may import: the namespace's default Sidecar (its own without
//! `workloadSelector`, else the root namespace's without one, else everything) and every Sidecar
//! of the namespace with a `workloadSelector` (a pod it selects imports its hosts instead). A
//! Sidecar without egress hosts imports everything, as in Istio. A larger scope never breaks a
//! pod; it only costs bytes.

use isthmus_config::egress::{EgressHost, EgressHostError};
use serde_json::Value;

/// What the scoping reads of one `Sidecar` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarEgress {
    pub namespace: String,
    pub name: String,
    pub workload_selector: bool,
    /// `spec.egress[].hosts`, all listeners together; empty: the Sidecar imports everything.
    pub hosts: Vec<String>,
}

/// The services one namespace's registry holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    All,
    /// Services matching any of these (sorted and deduplicated, so equal scopes compare equal
    /// and share one split).
    Hosts(Vec<EgressHost>),
}

impl SidecarEgress {
    /// Reads a Sidecar's `spec` as the API server stores it (JSON).
    pub fn from_spec(namespace: &str, name: &str, spec: &Value) -> Self {
        let hosts = spec["egress"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|listener| listener["hosts"].as_array().into_iter().flatten())
            .filter_map(|h| h.as_str().map(str::to_owned))
            .collect();
        SidecarEgress {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            workload_selector: !spec["workloadSelector"].is_null(),
            hosts,
        }
    }
}

impl Scope {
    /// The scope of `namespace` given every Sidecar the controller sees. Hosts that do not
    /// parse are left out of the scope and returned, so the caller can report them.
    pub fn of(
        namespace: &str,
        root_namespace: &str,
        sidecars: &[SidecarEgress],
    ) -> (Scope, Vec<EgressHostError>) {
        let default = |ns: &str| {
            sidecars
                .iter()
                .filter(|s| s.namespace == ns && !s.workload_selector)
                .min_by(|a, b| a.name.cmp(&b.name))
        };
        // Istio allows one selector-less Sidecar per namespace; with several, the first by name
        // (deterministic).
        let namespace_default = default(namespace).or_else(|| default(root_namespace));
        let applicable = namespace_default.into_iter().chain(
            sidecars
                .iter()
                .filter(|s| s.namespace == namespace && s.workload_selector),
        );
        let (mut hosts, mut errors) = (Vec::new(), Vec::new());
        let mut everything = namespace_default.is_none();
        for sidecar in applicable {
            if sidecar.hosts.is_empty() {
                everything = true;
            }
            for text in &sidecar.hosts {
                // `.` is the namespace of the pod the Sidecar applies to: for the root
                // namespace's default, the importing namespace (Istio's rule).
                match EgressHost::parse(text, namespace) {
                    Ok(host) => hosts.push(host),
                    Err(e) => errors.push(e),
                }
            }
        }
        if everything {
            return (Scope::All, errors);
        }
        hosts.sort();
        hosts.dedup();
        (Scope::Hosts(hosts), errors)
    }

    /// Whether a routing document (VirtualService, DestinationRule, ServiceEntry) of
    /// `namespace` with these fully qualified hosts applies here: one of its hosts is in scope
    /// as defined in the document's namespace or, for a Kubernetes service's name
    /// (`<name>.<ns>.svc.cluster.local`), in the service's. A document for services the
    /// namespace does not get would name hosts its registry lacks.
    pub fn admits_config(&self, namespace: &str, hosts: &[String]) -> bool {
        hosts.iter().any(|host| {
            let service_ns = host
                .strip_suffix(isthmus_config::CLUSTER_DOMAIN)
                .and_then(|h| h.strip_suffix('.'))
                .and_then(|h| h.split_once('.'))
                .map(|(_, ns)| ns)
                .filter(|ns| !ns.contains('.'));
            self.admits(namespace, [host.as_str()])
                || service_ns.is_some_and(|ns| self.admits(ns, [host.as_str()]))
        })
    }

    /// Whether a service defined in `namespace` with these host names is in scope.
    pub fn admits<'a>(&self, namespace: &str, hosts: impl IntoIterator<Item = &'a str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Hosts(patterns) => hosts
                .into_iter()
                .any(|h| patterns.iter().any(|p| p.matches(namespace, h))),
        }
    }
}

/// The Sidecars among Istio documents `(kind, namespace, name, spec)`.
pub fn sidecars<'a>(
    documents: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a Value)>,
) -> Vec<SidecarEgress> {
    documents
        .into_iter()
        .filter(|(kind, ..)| *kind == "Sidecar")
        .map(|(_, ns, name, spec)| SidecarEgress::from_spec(ns, name, spec))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sidecar(ns: &str, name: &str, spec: Value) -> SidecarEgress {
        SidecarEgress::from_spec(ns, name, &spec)
    }

    fn admits(scope: &Scope, ns: &str, name: &str) -> bool {
        scope.admits(ns, [format!("{name}.{ns}.svc.cluster.local").as_str()])
    }

    #[test]
    fn no_sidecar_anywhere_imports_everything() {
        let (scope, errors) = Scope::of("shop", "isthmus-system", &[]);
        assert_eq!(scope, Scope::All);
        assert!(errors.is_empty());
    }

    #[test]
    fn own_default_sidecar_scopes_to_its_egress_hosts() {
        let sidecars = [
            sidecar(
                "shop",
                "default",
                json!({"egress": [{"hosts": ["./*", "istio-system/*"]},
                                  {"hosts": ["*/ratings.prod.svc.cluster.local"]}]}),
            ),
            // The root default does not apply where the namespace has its own.
            sidecar(
                "isthmus-system",
                "default",
                json!({"egress": [{"hosts": ["~/*"]}]}),
            ),
        ];
        let (scope, _) = Scope::of("shop", "isthmus-system", &sidecars);
        assert!(admits(&scope, "shop", "cart"));
        assert!(admits(&scope, "istio-system", "istiod"));
        assert!(admits(&scope, "prod", "ratings"));
        assert!(!admits(&scope, "prod", "reviews"));
    }

    #[test]
    fn root_default_applies_with_dot_meaning_the_importing_namespace() {
        let sidecars = [sidecar(
            "isthmus-system",
            "default",
            json!({"egress": [{"hosts": ["./*", "isthmus-system/*"]}]}),
        )];
        let (shop, _) = Scope::of("shop", "isthmus-system", &sidecars);
        assert!(admits(&shop, "shop", "cart"));
        assert!(admits(&shop, "isthmus-system", "controller"));
        assert!(!admits(&shop, "prod", "reviews"));
        let (prod, _) = Scope::of("prod", "isthmus-system", &sidecars);
        assert!(admits(&prod, "prod", "reviews"));
        assert!(!admits(&prod, "shop", "cart"));
    }

    #[test]
    fn workload_selector_sidecars_widen_the_namespace_scope() {
        let sidecars = [
            sidecar("shop", "default", json!({"egress": [{"hosts": ["./*"]}]})),
            sidecar(
                "shop",
                "payments",
                json!({"workloadSelector": {"labels": {"app": "payments"}},
                       "egress": [{"hosts": ["bank/*"]}]}),
            ),
        ];
        let (scope, _) = Scope::of("shop", "isthmus-system", &sidecars);
        assert!(admits(&scope, "shop", "cart"));
        assert!(admits(&scope, "bank", "ledger"));
        assert!(!admits(&scope, "prod", "reviews"));
        // A selected pod with no egress hosts imports everything: so does the namespace.
        let open = [
            sidecars[0].clone(),
            sidecar(
                "shop",
                "debug",
                json!({"workloadSelector": {"labels": {"app": "debug"}}}),
            ),
        ];
        assert_eq!(Scope::of("shop", "isthmus-system", &open).0, Scope::All);
    }

    #[test]
    fn a_sidecar_without_egress_imports_everything_and_bad_hosts_are_reported() {
        let sidecars = [sidecar("shop", "default", json!({}))];
        assert_eq!(Scope::of("shop", "root", &sidecars).0, Scope::All);
        let sidecars = [sidecar(
            "shop",
            "default",
            json!({"egress": [{"hosts": ["reviews", "./*"]}]}),
        )];
        let (scope, errors) = Scope::of("shop", "root", &sidecars);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("`reviews`"));
        assert!(admits(&scope, "shop", "cart"));
    }

    #[test]
    fn routing_documents_follow_their_hosts() {
        let sidecars = [sidecar(
            "shop",
            "default",
            json!({"egress": [{"hosts": ["./*", "prod/*"]}]}),
        )];
        let (scope, _) = Scope::of("shop", "root", &sidecars);
        let hosts = |h: &str| vec![h.to_owned()];
        // A DestinationRule in shop for a prod service; a VirtualService of shop's own.
        assert!(scope.admits_config("shop", &hosts("reviews.prod.svc.cluster.local")));
        assert!(scope.admits_config("infra", &hosts("reviews.prod.svc.cluster.local")));
        assert!(scope.admits_config("shop", &hosts("api.example.com")));
        assert!(!scope.admits_config("infra", &hosts("db.infra.svc.cluster.local")));
        assert!(!scope.admits_config("infra", &hosts("api.example.com")));
        assert!(Scope::All.admits_config("infra", &hosts("api.example.com")));
    }

    #[test]
    fn equal_scopes_compare_equal() {
        let a = [sidecar(
            "shop",
            "default",
            json!({"egress": [{"hosts": ["b/*", "a/*", "a/*"]}]}),
        )];
        let b = [sidecar(
            "shop",
            "default",
            json!({"egress": [{"hosts": ["a/*", "b/*"]}]}),
        )];
        assert_eq!(Scope::of("shop", "r", &a).0, Scope::of("shop", "r", &b).0);
    }
}
