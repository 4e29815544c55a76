//! The compiled security policies of a snapshot (PeerAuthentication, AuthorizationPolicy) and
//! what both need: the workload a sidecar serves and Istio's three scopes (mesh-wide in the
//! root namespace, namespace-wide, selected by workload labels).

use super::authz::AuthzPolicies;
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
