//! Istio's security documentation examples (`tests/istio-samples/security/`, each file naming
//! its page) load unchanged and decide what the pages say Istio decides.

use std::net::IpAddr;
use std::path::PathBuf;

use isthmus_config::{
    load, HttpRequest, Labels, MtlsMode, Request, Snapshot, SourceFile, Text, Workload,
};

fn sample(name: &str) -> Snapshot {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/istio-samples/security")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    load(&[SourceFile::new(name, text)]).unwrap_or_else(|e| panic!("{name} did not load: {e}"))
}

fn app(name: &str) -> Labels {
    Labels::new(vec![(Text::from("app"), Text::from(name))])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Whether a call from service account `ns/sa` (`-`: plaintext) to the `app` workload in
/// `namespace` on `port` is allowed; `http`: (method, path, x-token header).
fn allowed(
    snap: &Snapshot,
    namespace: &str,
    app_name: &str,
    from: &str,
    port: u16,
    http: Option<(&str, &str, Option<&str>)>,
) -> bool {
    let principal = (from != "-").then(|| {
        let (ns, sa) = from.split_once('/').unwrap();
        format!("cluster.local/ns/{ns}/sa/{sa}")
    });
    let headers: Vec<(&str, &str)> = http
        .and_then(|(_, _, token)| token)
        .map(|t| vec![("x-token", t)])
        .unwrap_or_default();
    let labels = app(app_name);
    snap.authorize(
        Workload {
            namespace,
            labels: &labels,
        },
        &Request {
            source_principal: principal.as_deref(),
            source_namespace: from.split_once('/').map(|(ns, _)| ns),
            source_ip: ip("10.0.0.1"),
            remote_ip: None,
            destination_ip: ip("10.0.0.2"),
            destination_port: port,
            sni: None,
            http: http.map(|(method, path, _)| HttpRequest {
                host: "svc",
                method,
                path,
                headers: &headers,
            }),
        },
    )
    .is_allowed()
}

#[test]
fn peer_authentication_reference_examples() {
    let snap = sample("peer-authentication.yaml");
    let mode = |ns: &str, a: &str, port| {
        snap.peer_authentication(
            Workload {
                namespace: ns,
                labels: &app(a),
            },
            port,
        )
    };
    assert_eq!(mode("strict-ns", "any", 80), MtlsMode::Strict);
    assert_eq!(mode("foo", "any", 80), MtlsMode::Permissive);
    assert_eq!(mode("foo", "finance", 80), MtlsMode::Strict);
    assert_eq!(mode("foo", "finance", 8080), MtlsMode::Disable);
    // "inherit mTLS mode from namespace (or mesh) settings, and overwrite settings for port 8080"
    assert_eq!(mode("foo", "ledger", 80), MtlsMode::Permissive);
    assert_eq!(mode("foo", "ledger", 8080), MtlsMode::Disable);
}

/// authz-http: after `allow-nothing` and the four viewers, bookinfo's own calls (GET along the
/// service accounts) work and nothing else does.
#[test]
fn authz_http_task() {
    let snap = sample("authz-http.yaml");
    let get = Some(("GET", "/productpage", None));
    assert!(allowed(&snap, "default", "productpage", "-", 9080, get));
    assert!(!allowed(
        &snap,
        "default",
        "productpage",
        "-",
        9080,
        Some(("POST", "/", None))
    ));
    assert!(allowed(
        &snap,
        "default",
        "details",
        "default/bookinfo-productpage",
        9080,
        get
    ));
    assert!(!allowed(
        &snap,
        "default",
        "details",
        "default/sleep",
        9080,
        get
    ));
    assert!(allowed(
        &snap,
        "default",
        "reviews",
        "default/bookinfo-productpage",
        9080,
        get
    ));
    assert!(allowed(
        &snap,
        "default",
        "ratings",
        "default/bookinfo-reviews",
        9080,
        get
    ));
    assert!(!allowed(
        &snap,
        "default",
        "ratings",
        "default/bookinfo-productpage",
        9080,
        get
    ));
    assert!(
        !allowed(
            &snap,
            "default",
            "other",
            "default/bookinfo-productpage",
            9080,
            get
        ),
        "allow-nothing"
    );
}

/// authz-tcp: the three steps of the task and the outcomes it shows.
#[test]
fn authz_tcp_task() {
    let snap = sample("authz-tcp-allow.yaml");
    assert!(allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9000, None));
    assert!(allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9001, None));
    assert!(!allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9002, None));
    // "all requests are denied": the ALLOW rule has an HTTP-only field.
    let snap = sample("authz-tcp-allow-http-only.yaml");
    assert!(!allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9000, None));
    assert!(!allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9001, None));
    // Port 9000 denied (the HTTP-only field is ignored in DENY), 9001 allowed.
    let snap = sample("authz-tcp-deny-http-only.yaml");
    assert!(!allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9000, None));
    assert!(allowed(&snap, "foo", "tcp-echo", "foo/sleep", 9001, None));
}

/// authz-deny: GET without `x-token: admin` is denied; with it, only `/ip` is allowed.
#[test]
fn authz_deny_task() {
    let snap = sample("authz-deny.yaml");
    let call = |method, path, token| {
        allowed(
            &snap,
            "foo",
            "httpbin",
            "foo/sleep",
            8000,
            Some((method, path, token)),
        )
    };
    assert!(!call("GET", "/ip", None));
    assert!(!call("GET", "/ip", Some("guest")));
    assert!(call("GET", "/ip", Some("admin")));
    assert!(
        !call("GET", "/get", Some("admin")),
        "allow-path-ip allows only /ip"
    );
    assert!(call("POST", "/ip", None));
}
