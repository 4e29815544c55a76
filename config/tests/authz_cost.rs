//! The policy lookups are on the data path: they must not allocate. A counting allocator (per
//! thread, so the harness's other threads do not count) checks `authorize` and
//! `peer_authentication` on a realistic policy set, on HTTP and on TCP.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;

use isthmus_config::{
    load, HttpRequest, Labels, MtlsMode, Request, Snapshot, SourceFile, Text, Workload,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: isthmus-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: isthmus-system}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [ops]}}]
    to: [{operation: {paths: ["/admin*", "/api/{*}/internal/{**}"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/*"]}}, {source: {ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {methods: [GET, HEAD], hosts: [web.shop.svc.cluster.local, "web.shop.svc.cluster.local:*"]}}]
    when: [{key: "request.headers[x-tenant]", notValues: [blocked]}]
  - to: [{operation: {ports: ["9090"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}]}
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn lookups_do_not_allocate() {
    let counted = allocations_in(|| drop(std::hint::black_box(vec![1u8; 8])));
    assert_eq!(counted, 1, "the counter counts");
    let snap: Snapshot = load(&[SourceFile::new("p.yaml", POLICIES)]).unwrap();
    let labels = Labels::new(vec![(Text::from("app"), Text::from("web"))]);
    let workload = Workload {
        namespace: "shop",
        labels: &labels,
    };
    let headers = vec![("x-tenant", "acme")];
    let http = Request {
        source_principal: Some("cluster.local/ns/shop/sa/frontend"),
        source_namespace: Some("shop"),
        source_ip: ip("10.1.2.3"),
        remote_ip: None,
        destination_ip: ip("10.9.9.9"),
        destination_port: 8080,
        sni: None,
        http: Some(HttpRequest {
            host: "web.shop.svc.cluster.local:8080",
            method: "GET",
            path: "/api/v1/items?page=2",
            headers: &headers,
        }),
    };
    let tcp = Request {
        http: None,
        destination_port: 9090,
        ..http
    };
    let mut decisions = Vec::with_capacity(4);
    let n = allocations_in(|| {
        for request in [&http, &tcp] {
            decisions.push(snap.authorize(workload, request).is_allowed());
        }
        decisions.push(snap.peer_authentication(workload, 8080) == MtlsMode::Permissive);
        decisions.push(snap.peer_authentication(workload, 80) == MtlsMode::Strict);
    });
    // TCP is denied: on TCP the root DENY's HTTP-only `paths` are dropped (Istio), so it denies
    // every non-`ops` source.
    assert_eq!(decisions, [true, false, true, true], "the lookups answered");
    assert_eq!(
        n, 0,
        "allocations in 2 authorize + 2 peer_authentication calls"
    );

    let empty = Snapshot::empty();
    let n = allocations_in(|| assert!(empty.authorize(workload, &http).is_allowed()));
    assert_eq!(n, 0);
}
