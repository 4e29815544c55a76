//! Routing decisions: plain functions of (snapshot, original destination), no I/O, so they are
//! table-tested without sockets. [`plan`] turns a decision into the candidates the connect
//! stage dials.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_config::{Cluster, HashKey, LoadBalancer, OutboundPolicy, Service, Snapshot, TcpRoute};

use crate::balance::{self, pick_weighted};
use crate::metrics::TcpLabels;
use crate::serve::Direction;
use crate::telemetry::{Identity, ResponseFlag};

/// Where a connection goes, decided once from one snapshot. It holds the service and cluster
/// (small `Arc`s), not the snapshot, so a long-lived connection does not keep an old config
/// alive; label sets are built only for the outcome, not for every candidate.
pub struct Plan {
    pub target: Target,
    /// Addresses to try in order, with the endpoint index each is (`None`: the original
    /// destination). Empty means refuse.
    pub candidates: Vec<(SocketAddr, Option<usize>)>,
    /// The response flag when there is no candidate.
    pub failure: ResponseFlag,
}

pub enum Target {
    Inbound,
    Service {
        service: Arc<Service>,
        cluster: Arc<Cluster>,
    },
    /// PassthroughCluster or BlackHoleCluster.
    Unregistered(&'static str),
}

impl Plan {
    pub fn labels(&self, id: &Identity, endpoint: Option<usize>, flag: ResponseFlag) -> TcpLabels {
        match &self.target {
            Target::Inbound => id.inbound(flag),
            Target::Service { service, cluster } => {
                let endpoint = endpoint.and_then(|i| cluster.endpoints.get(i));
                id.outbound(service, cluster, endpoint, flag)
            }
            Target::Unregistered(name) => id.outbound_unregistered(name, flag),
        }
    }

    /// The registry cluster the connection goes to, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        match &self.target {
            Target::Service { cluster, .. } => Some(cluster),
            _ => None,
        }
    }

    /// Istio-style cluster name, for the access log.
    pub fn cluster_name(&self, dst: SocketAddr) -> String {
        match &self.target {
            Target::Inbound => format!("inbound|{}||", dst.port()),
            Target::Service { cluster, .. } => cluster.name.to_string(),
            Target::Unregistered(name) => (*name).to_string(),
        }
    }
}

/// Plans a connection to `dst`: inbound goes to the original destination (the app); outbound
/// follows the snapshot's route and balancer, with up to `attempts` endpoints to try.
pub fn plan(
    snapshot: &Snapshot,
    direction: Direction,
    dst: SocketAddr,
    source: IpAddr,
    attempts: usize,
) -> Plan {
    let passthrough = |target| Plan {
        target,
        candidates: vec![(dst, None)],
        failure: ResponseFlag::UpstreamConnectFailure,
    };
    if direction == Direction::Inbound {
        return passthrough(Target::Inbound);
    }
    match outbound(snapshot, dst) {
        Decision::Cluster {
            service, cluster, ..
        } => {
            let target = Target::Service {
                service: service.clone(),
                cluster: cluster.clone(),
            };
            if cluster.passthrough || cluster.policy.load_balancer == LoadBalancer::Passthrough {
                return passthrough(target);
            }
            if !cluster.dns.is_empty() {
                // Resolved names: round robin from the next address, the others after it.
                let addrs = crate::dns::addresses(cluster);
                let first = if addrs.is_empty() {
                    0
                } else {
                    cluster.next_ticket() % addrs.len()
                };
                let candidates: Vec<_> = (0..addrs.len().min(attempts))
                    .map(|k| (addrs[(first + k) % addrs.len()], None))
                    .collect();
                let failure = if candidates.is_empty() {
                    ResponseFlag::NoHealthyUpstream
                } else {
                    ResponseFlag::UpstreamConnectFailure
                };
                return Plan {
                    target,
                    candidates,
                    failure,
                };
            }
            // A TCP connection's only hash key is its source address.
            let hash = match &cluster.policy.load_balancer {
                LoadBalancer::ConsistentHash(policy) if policy.key == HashKey::SourceIp => {
                    Some(balance::key_hash(source.to_string().as_bytes()))
                }
                _ => None,
            };
            let candidates: Vec<_> = balance::candidates(cluster, attempts, hash)
                .into_iter()
                .map(|i| (cluster.endpoints[i].addr, Some(i)))
                .collect();
            let failure = if candidates.is_empty() {
                ResponseFlag::NoHealthyUpstream
            } else {
                ResponseFlag::UpstreamConnectFailure
            };
            Plan {
                target,
                candidates,
                failure,
            }
        }
        Decision::Passthrough => passthrough(Target::Unregistered("PassthroughCluster")),
        Decision::BlackHole => Plan {
            target: Target::Unregistered("BlackHoleCluster"),
            candidates: Vec::new(),
            failure: ResponseFlag::NoRoute,
        },
    }
}

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Decision<'a> {
    /// A registry service: connect to one of the cluster's endpoints.
    Cluster {
        service: &'a Arc<Service>,
        route: &'a TcpRoute,
        cluster: &'a Arc<Cluster>,
    },
    /// Not in the registry, allowed by `ALLOW_ANY`: connect to the original destination.
    Passthrough,
    /// Not in the registry under `REGISTRY_ONLY`: refuse.
    BlackHole,
}

/// Picks the route and cluster for an outbound connection to `dst`.
pub fn outbound(snapshot: &Snapshot, dst: SocketAddr) -> Decision<'_> {
    let Some((service, port)) = snapshot.service_port(dst) else {
        return match snapshot.outbound_policy() {
            OutboundPolicy::AllowAny => Decision::Passthrough,
            OutboundPolicy::RegistryOnly => Decision::BlackHole,
        };
    };
    // The compiler always appends a catch-all route, so a match exists.
    let Some(route) = port.routes.iter().find(|r| r.accepts(dst)) else {
        return Decision::BlackHole;
    };
    let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
    let index = pick_weighted(route.next_ticket(), &weights).unwrap_or(0);
    Decision::Cluster {
        service,
        route,
        cluster: &route.destinations[index].cluster,
    }
}

#[cfg(test)]
mod tests {
    use isthmus_config::{load, SourceFile};

    use super::*;

    const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  addresses: [10.96.0.20]
  ports: [{number: 80, name: tcp, targetPort: 8080}, {number: 81, name: tcp-alt}]
  resolution: STATIC
  endpoints:
  - {address: 10.66.0.2, labels: {version: v1}}
  - {address: 10.66.0.3, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  tcp:
  - match: [{port: 80}]
    route:
    - {destination: {host: echo, subset: v1}, weight: 75}
    - {destination: {host: echo, subset: v2}, weight: 25}
"#;

    fn snapshot(extra: &str) -> Snapshot {
        load(&[
            SourceFile::new("a.yaml", CONFIG),
            SourceFile::new("b.yaml", extra),
        ])
        .unwrap()
    }

    fn cluster_of(d: Decision<'_>) -> String {
        match d {
            Decision::Cluster { cluster, .. } => cluster.name.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn weighted_split_is_exact_over_a_cycle() {
        let snap = snapshot("");
        let dst: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let picks: Vec<String> = (0..100).map(|_| cluster_of(outbound(&snap, dst))).collect();
        let v1 = picks.iter().filter(|c| c.contains("|v1|")).count();
        assert_eq!(v1, 75);
        assert_eq!(picks.len() - v1, 25);
    }

    #[test]
    fn unmatched_port_falls_back_to_the_whole_service() {
        let snap = snapshot("");
        let name = cluster_of(outbound(&snap, "10.96.0.20:81".parse().unwrap()));
        assert_eq!(name, "outbound|81||echo.demo.svc.cluster.local");
    }

    #[test]
    fn unknown_destinations_follow_the_outbound_policy() {
        let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
        assert!(matches!(
            outbound(&snapshot(""), dst),
            Decision::Passthrough
        ));
        assert!(matches!(
            outbound(&Snapshot::empty(), dst),
            Decision::Passthrough
        ));
        let strict = snapshot(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\n\
             spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n",
        );
        assert!(matches!(outbound(&strict, dst), Decision::BlackHole));
        // Registry services still route under REGISTRY_ONLY.
        let name = cluster_of(outbound(&strict, "10.96.0.20:81".parse().unwrap()));
        assert!(name.starts_with("outbound|81|"), "{name}");
    }
}
