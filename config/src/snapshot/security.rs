//! The compiled security policies of a snapshot (PeerAuthentication, AuthorizationPolicy) and
//! what both need: the workload a sidecar serves and Istio's three scopes (mesh-wide in the
//! root namespace, namespace-wide, selected by workload labels).

use serde_json::{json, Map, Value};

use super::authz::{AuthzPolicies, AuthzPolicy};
use super::peer_auth::PeerAuthentications;
use super::Labels;

/// The namespace whose policies without a selector apply mesh-wide (Istio's root namespace,
/// `--root-namespace` of the controller).
pub const DEFAULT_ROOT_NAMESPACE: &str = "isthmus-system";

/// The workload a sidecar serves: policies are selected by its namespace and its labels.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

/// A `selector.matchLabels` that is not empty: every pair must be among the workload's labels
/// (the same rule as a DestinationRule subset's labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector(pub(crate) Box<[(Box<str>, Box<str>)]>);

impl Selector {
    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(&**v))
    }

    fn dump(selector: Option<&Selector>) -> Value {
        selector.map_or(Value::Null, |s| {
            let labels: Map<String, Value> =
                s.0.iter()
                    .map(|(k, v)| (k.to_string(), json!(&**v)))
                    .collect();
            Value::Object(labels)
        })
    }
}

/// Everything security-related in a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Security {
    pub(crate) root_namespace: Box<str>,
    pub(crate) peer_authentications: PeerAuthentications,
    pub(crate) authorization: AuthzPolicies,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            peer_authentications: PeerAuthentications::default(),
            authorization: AuthzPolicies::default(),
        }
    }
}

impl Security {
    /// The `security` part of `/config_dump`: which policies are loaded, in evaluation order.
    pub(crate) fn dump(&self) -> Value {
        let mode = |m: Option<super::MtlsMode>| m.map_or("UNSET".to_string(), |m| m.to_string());
        let peer: Vec<Value> = self
            .peer_authentications
            .0
            .iter()
            .map(|p| {
                let ports: Map<String, Value> = p
                    .ports
                    .iter()
                    .map(|(port, m)| (port.to_string(), json!(m.to_string())))
                    .collect();
                json!({
                    "policy": format!("{}/{}", p.namespace, p.name),
                    "selector": Selector::dump(p.selector.as_ref()),
                    "mode": mode(p.mode),
                    "portLevelMtls": ports,
                })
            })
            .collect();
        let authz = |action: &str, list: &[AuthzPolicy]| -> Vec<Value> {
            list.iter()
                .map(|p| {
                    json!({
                        "policy": &*p.id,
                        "action": action,
                        "selector": Selector::dump(p.selector.as_ref()),
                        "rules": p.rules.len(),
                    })
                })
                .collect()
        };
        let a = &self.authorization;
        let mut policies = authz("DENY", &a.deny);
        policies.extend(authz("ALLOW", &a.allow));
        policies.extend(authz("AUDIT", &a.audit));
        json!({
            "rootNamespace": &*self.root_namespace,
            "peerAuthentications": peer,
            "authorizationPolicies": policies,
        })
    }
}
