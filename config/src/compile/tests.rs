use std::net::SocketAddr;

use crate::{load, ConfigError, OutboundPolicy, Snapshot, SourceFile};

const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  addresses: [10.96.0.10, "fd00:96::10"]
  ports:
  - {number: 9080, name: tcp-app, protocol: TCP, targetPort: 8080}
  - {number: 9090, name: admin}
  resolution: STATIC
  endpoints:
  - {address: 10.66.0.2, labels: {version: v1}}
  - {address: 10.66.0.3, labels: {version: v2}, ports: {tcp-app: 8081}}
  - {address: 10.66.0.4, labels: {version: v2}, weight: 3}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  addresses: [10.96.0.11]
  ports: [{number: 9080, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 10.66.0.9}]
"#;

fn snapshot(extra: &str) -> Result<Snapshot, Vec<String>> {
    load(&[
        SourceFile::new("registry.yaml", REGISTRY),
        SourceFile::new("routes.yaml", extra),
    ])
    .map_err(|e| e.issues())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn registry_is_indexed_by_vip_and_port() {
    let snap = snapshot("").unwrap();
    let (service, port) = snap.service_port(addr("10.96.0.10:9080")).unwrap();
    assert_eq!(service.host(), "reviews.shop.svc.cluster.local");
    assert_eq!(&*port.name, "tcp-app");
    assert!(snap.service_port(addr("[fd00:96::10]:9090")).is_some());
    assert!(snap.service_port(addr("10.96.0.10:1234")).is_none());
    assert!(snap.service_port(addr("10.66.0.2:8080")).is_none());
    // The implicit route sends to every endpoint, on each endpoint's port for this service port.
    let cluster = &port.routes.last().unwrap().destinations[0].cluster;
    assert_eq!(
        &*cluster.name,
        "outbound|9080||reviews.shop.svc.cluster.local"
    );
    let eps: Vec<String> = cluster
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(eps, ["10.66.0.2:8080", "10.66.0.3:8081", "10.66.0.4:8080"]);
    assert_eq!(cluster.endpoints[2].weight, 3);
    assert_eq!(snap.outbound_policy(), OutboundPolicy::AllowAny);
}

#[test]
fn tcp_routes_with_subsets_and_weights() {
    let snap = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  tcp:
  - match: [{port: 9090}]
    route: [{destination: {host: ratings, port: {number: 9080}}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#,
    )
    .unwrap();
    let (_, app) = snap.service_port(addr("10.96.0.10:9080")).unwrap();
    assert_eq!(app.routes.len(), 2, "the 9090 route does not apply to 9080");
    let split = &app.routes[0];
    assert_eq!(split.virtual_service.as_deref(), Some("shop/reviews"));
    assert_eq!(split.destinations[0].weight, 80);
    assert_eq!(
        &*split.destinations[0].cluster.name,
        "outbound|9080|v1|reviews.shop.svc.cluster.local"
    );
    assert_eq!(split.destinations[0].cluster.endpoints.len(), 1);
    assert_eq!(split.destinations[1].cluster.endpoints.len(), 2);
    let (_, admin) = snap.service_port(addr("10.96.0.10:9090")).unwrap();
    assert_eq!(admin.routes.len(), 3);
    assert!(admin.routes[0].accepts(addr("10.96.0.10:9090")));
    assert_eq!(
        admin.routes[0].destinations[0].cluster.endpoints[0].addr,
        addr("10.66.0.9:9080")
    );
}

#[test]
fn cross_references_are_validated() {
    let issues = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: shop}
spec:
  hosts: [nowhere]
  tcp:
  - route:
    - {destination: {host: reviews, subset: v9}, weight: 50}
    - {destination: {host: reviews, port: {number: 1}}, weight: 30}
"#,
    )
    .unwrap_err();
    let all = issues.join("\n");
    assert!(
        all.contains("spec.hosts[0]: unknown host `nowhere.shop.svc.cluster.local`"),
        "{all}"
    );
    assert!(
        all.contains("spec.tcp[0].route[0].destination.subset: no DestinationRule"),
        "{all}"
    );
    assert!(all.contains("spec.tcp[0].route[1].destination.port.number: `reviews.shop.svc.cluster.local` has no port 1"), "{all}");
    assert!(all.contains("weights add up to 80"), "{all}");
    assert!(
        issues
            .iter()
            .all(|i| i.starts_with("routes.yaml: VirtualService shop/bad")),
        "{all}"
    );
}

#[test]
fn registry_conflicts_are_rejected() {
    let issues = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: clash, namespace: shop}
spec:
  hosts: [reviews]
  addresses: [10.96.0.11, 10.0.0.0/8]
  ports: [{number: 9080, name: a}, {number: 70000, name: a}]
  resolution: STATIC
  endpoints: [{address: nope, ports: {b: 1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec: {hosts: [other]}
"#,
    )
    .unwrap_err();
    let all = issues.join("\n");
    for want in [
        "spec.addresses[1]: CIDR ranges are not implemented yet",
        "spec.ports[1].number: 70000 is not a port number",
        "spec.endpoints[0].address: `nope` is not an IP address",
        "ServiceEntry shop/reviews: metadata.name: duplicate name (also defined in registry.yaml)",
    ] {
        assert!(all.contains(want), "missing {want:?} in\n{all}");
    }
}

#[test]
fn duplicate_hosts_and_addresses_are_rejected() {
    let issues = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup, namespace: shop}
spec:
  hosts: [ratings]
  addresses: [10.96.0.10]
  ports: [{number: 9080, name: tcp}]
"#,
    )
    .unwrap_err();
    let all = issues.join("\n");
    assert!(
        all.contains("host `ratings.shop.svc.cluster.local` is declared by another"),
        "{all}"
    );
    assert!(
        all.contains("10.96.0.10:9080 is already the address of"),
        "{all}"
    );
}

#[test]
fn sidecar_sets_registry_only() {
    let snap = snapshot(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default}\n\
         spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n",
    )
    .unwrap();
    assert_eq!(snap.outbound_policy(), OutboundPolicy::RegistryOnly);
}

/// Egress hosts are checked here and applied by the controller (it writes only the matching
/// services into the namespace's registry).
#[test]
fn sidecar_egress_hosts_are_accepted_and_checked() {
    let sidecar = |hosts: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\n\
             spec: {{egress: [{{hosts: [{hosts}]}}]}}\n"
        )
    };
    assert!(snapshot(&sidecar("'./*', 'istio-system/*', '*/*.example.com'")).is_ok());
    let err = snapshot(&sidecar("reviews")).unwrap_err().join("\n");
    assert!(
        err.contains("spec.egress[0].hosts[0]") && err.contains("namespace/dnsName"),
        "{err}"
    );
}

#[test]
fn empty_config_is_valid_and_versioned() {
    let snap = load(&[]).unwrap();
    assert!(snap.services().is_empty());
    assert_eq!(snap.version(), Snapshot::empty().version());
    let a = snapshot("").unwrap();
    let b = snapshot("# a comment changes the version\n").unwrap();
    assert_ne!(a.version(), b.version());
    assert!(matches!(
        load(&[SourceFile::new("x.yaml", "kind: [")]),
        Err(ConfigError::Invalid(_))
    ));
}

#[test]
fn dump_shows_routes_and_endpoints() {
    let snap = snapshot("").unwrap();
    let dump = snap.dump();
    assert_eq!(
        dump["services"][0]["ports"][0]["routes"][0]["route"][0]["endpoints"][1],
        "10.66.0.3:8081"
    );
}

/// Mangled versions of a valid config (truncated, bytes flipped, lines dropped) must come back
/// as errors or snapshots, never a panic.
#[test]
fn mangled_input_never_panics() {
    let text = format!("{REGISTRY}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: shop}}\nspec: {{hosts: [reviews], tcp: [{{route: [{{destination: {{host: reviews}}}}]}}]}}\n");
    let bytes = text.as_bytes();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..3000 {
        let mut mangled = bytes.to_vec();
        match round % 3 {
            0 => mangled.truncate((next() as usize) % bytes.len()),
            1 => {
                for _ in 0..4 {
                    let i = (next() as usize) % mangled.len();
                    mangled[i] = b"{}[]:-,'\"\n #&*!|>0a"[(next() as usize) % 19];
                }
            }
            _ => {
                let lines: Vec<&str> = text.lines().collect();
                let drop = (next() as usize) % lines.len();
                mangled = lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != drop)
                    .map(|(_, l)| *l)
                    .collect::<Vec<_>>()
                    .join("\n")
                    .into_bytes();
            }
        }
        let text = String::from_utf8_lossy(&mangled).into_owned();
        let _ = load(&[SourceFile::new("m.yaml", text)]);
    }
}

/// Found in review: `4294967295 + 101` wrapped to 100 in a u32 sum and passed validation on
/// release builds (a debug build panicked instead — at startup that killed the sidecar).
#[test]
fn weights_that_overflow_u32_are_rejected_not_wrapped() {
    let issues = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: huge, namespace: shop}
spec:
  hosts: [reviews]
  tcp:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 4294967295}
    - {destination: {host: reviews, subset: v2}, weight: 101}
"#,
    )
    .unwrap_err();
    let all = issues.join("\n");
    assert!(
        all.contains("spec.tcp[0].route: weights add up to 4294967396, must add up to 100"),
        "{all}"
    );
}

/// Found in review: every reload restarted round robin at 0, so after each reload an 80/20
/// split began on its first destination, and every sidecar's first connection went to the
/// same endpoint.
#[test]
fn balancers_continue_across_reloads_and_start_apart_per_sidecar() {
    fn port_of(snap: &Snapshot) -> &crate::ServicePort {
        snap.service_port(addr("10.96.0.10:9080")).unwrap().1
    }
    let old = snapshot("").unwrap();
    old.continue_balancing(&Snapshot::empty(), 1);
    let route = port_of(&old).routes.last().unwrap();
    let cluster = &route.destinations[0].cluster;
    for _ in 0..5 {
        cluster.next_ticket();
        route.next_ticket();
    }
    let (cluster_next, route_next) = (cluster.next_ticket() + 1, route.next_ticket() + 1);

    // Same endpoints after the reload: the positions carry over.
    let same = snapshot("").unwrap();
    same.continue_balancing(&old, 2);
    let route2 = port_of(&same).routes.last().unwrap();
    assert_eq!(route2.destinations[0].cluster.next_ticket(), cluster_next);
    assert_eq!(route2.next_ticket(), route_next);

    // Another sidecar (another seed) starts elsewhere than this one did.
    let fresh = |seed| {
        let snap = snapshot("").unwrap();
        snap.continue_balancing(&Snapshot::empty(), seed);
        let route = port_of(&snap).routes.last().unwrap();
        route.destinations[0].cluster.next_ticket()
    };
    let starts: std::collections::HashSet<usize> = (0..8).map(fresh).collect();
    assert!(starts.len() > 1, "every seed started at the same ticket");

    // A changed endpoint set starts at the seed's offset, not where the old one was.
    let changed = load(&[SourceFile::new(
        "registry.yaml",
        REGISTRY.replace("10.66.0.4", "10.66.0.5"),
    )])
    .unwrap();
    changed.continue_balancing(&old, 1);
    let c = &port_of(&changed).routes.last().unwrap().destinations[0].cluster;
    assert_eq!(c.next_ticket(), fresh(1));
}

#[test]
fn dns_services_resolve_their_endpoints_or_hosts() {
    let text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: egress}\n\
        spec:\n  hosts: [api.example.com]\n  location: MESH_EXTERNAL\n  ports: [{number: 443, name: tls}]\n\
        \x20 resolution: DNS\n---\n\
        apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: egress}\n\
        spec:\n  hosts: [db.example.com]\n  addresses: [10.96.5.5]\n  ports: [{number: 5432, name: tcp-pg}]\n\
        \x20 resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: primary.db.example.com}, {address: 10.1.1.1}]\n";
    let snapshot = crate::load(&[SourceFile::new("dns.yaml", text)]).unwrap();
    let names: Vec<String> = snapshot
        .dns_names()
        .into_iter()
        .map(|n| format!("{}:{} {}", n.name, n.port, n.first_only))
        .collect();
    assert_eq!(
        names,
        [
            "api.example.com:443 false",
            "primary.db.example.com:5432 true"
        ]
    );
    let (_, port) = snapshot
        .service_port("10.96.5.5:5432".parse().unwrap())
        .unwrap();
    let cluster = &port.routes[0].destinations[0].cluster;
    assert_eq!(cluster.endpoints.len(), 1, "the IP endpoint stays static");
    let wildcard = text.replace("[api.example.com]", "['*.example.com']");
    let err = crate::load(&[SourceFile::new("dns.yaml", wildcard)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wildcard hosts cannot be resolved by DNS"),
        "{err}"
    );
    let bad = text.replace("primary.db.example.com", "not a name");
    let err = crate::load(&[SourceFile::new("dns.yaml", bad)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not an IP address or a DNS name"), "{err}");
}
