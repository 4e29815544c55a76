//! PeerAuthentication resolved for one workload and port, as Istio's
//! `ComposePeerAuthentication` resolves it:
//! - three levels: mesh (root namespace, no selector), namespace (no selector) and workload
//!   (a selector matching the workload's labels, in the workload's namespace);
//! - at each level the oldest policy wins (creation time, then name, then namespace — Istio's
//!   sort); a policy without `metadata.creationTimestamp` (a file, not a cluster object) counts
//!   as older than any with one, as Go's zero time does in Istio;
//! - applied mesh → namespace → workload → `portLevelMtls`, each `UNSET` (or missing) mode
//!   inheriting the one before; nothing set at all is `PERMISSIVE`;
//! - a selector policy in the root namespace is ignored, as Istio documents ("PeerAuthentication
//!   policies with workload selectors are ignored when deployed in the root namespace").

use std::fmt;

use super::security::{Selector, Workload};
use super::Snapshot;
use super::Text;

/// How a workload's inbound port accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Plaintext only: mTLS is not terminated.
    Disable,
    /// mTLS and plaintext both accepted (Istio's default).
    Permissive,
    /// mTLS only.
    Strict,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        })
    }
}

/// One compiled PeerAuthentication; `None` modes are `UNSET`.
#[derive(Debug, Clone)]
pub(crate) struct PeerAuthentication {
    pub(crate) namespace: Text,
    pub(crate) name: Box<str>,
    pub(crate) selector: Option<Selector>,
    pub(crate) mode: Option<MtlsMode>,
    /// Only on a selector policy; `UNSET` entries are dropped (they inherit).
    pub(crate) ports: Box<[(u16, MtlsMode)]>,
}

/// Every PeerAuthentication, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerAuthentications(pub(crate) Box<[PeerAuthentication]>);

impl Snapshot {
    /// The mTLS mode of `workload`'s inbound `port` (the port the workload listens on, not a
    /// service port).
    pub fn peer_authentication(&self, workload: Workload<'_>, port: u16) -> MtlsMode {
        let security = &self.security;
        let root = &*security.root_namespace;
        let (mut mesh, mut namespace, mut selected) = (None, None, None);
        for policy in security.peer_authentications.0.iter() {
            let level = match &policy.selector {
                None if &*policy.namespace == root => &mut mesh,
                None if *policy.namespace == *workload.namespace => &mut namespace,
                Some(selector)
                    if &*policy.namespace != root
                        && *policy.namespace == *workload.namespace
                        && selector.matches(workload.labels) =>
                {
                    &mut selected
                }
                _ => continue,
            };
            // Sorted oldest first: the first policy of a level wins.
            level.get_or_insert(policy);
        }
        let mut mode = MtlsMode::Permissive;
        for policy in [mesh, namespace, selected].into_iter().flatten() {
            mode = policy.mode.unwrap_or(mode);
        }
        if let Some(policy) = selected {
            if let Some((_, port_mode)) = policy.ports.iter().find(|(p, _)| *p == port) {
                mode = *port_mode;
            }
        }
        mode
    }
}
