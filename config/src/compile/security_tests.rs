//! PeerAuthentication and AuthorizationPolicy: strict parsing, Istio's precedence and Istio's
//! evaluation semantics, table-tested on compiled snapshots.

use std::net::IpAddr;

use crate::snapshot::Text;
use crate::{
    load, HttpRequest, Labels, MtlsMode, Request, RuleRef, Snapshot, SourceFile, Verdict, Workload,
};

fn snapshot(yaml: &str) -> Result<Snapshot, Vec<String>> {
    load(&[SourceFile::new("security.yaml", yaml)]).map_err(|e| e.issues())
}

fn must(yaml: &str) -> Snapshot {
    snapshot(yaml).unwrap_or_else(|e| panic!("{e:#?}"))
}

/// The single issue `yaml` is refused with.
fn refused(yaml: &str) -> String {
    let issues = snapshot(yaml).expect_err("must be refused");
    assert_eq!(issues.len(), 1, "{issues:#?}");
    issues[0].clone()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::new(
        pairs
            .iter()
            .map(|(k, v)| (Text::from(*k), Text::from(*v)))
            .collect(),
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pa(namespace: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {body}\n---\n"
    )
}

fn authz(namespace: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {body}\n---\n"
    )
}

// ---------------------------------------------------------------- strict parsing

#[test]
fn unknown_fields_are_named_by_path() {
    let err = refused(&authz(
        "foo",
        "p",
        "{rules: [{from: [{source: {principal: [a]}}]}]}",
    ));
    assert!(
        err.contains("spec.rules[0].from[0].source") && err.contains("unknown field `principal`"),
        "{err}"
    );
    let err = refused(&pa("foo", "p", "{mtls: {mode: STRICT, strict: true}}"));
    assert!(
        err.contains("spec.mtls") && err.contains("unknown field `strict`"),
        "{err}"
    );
    let err = refused(&pa("foo", "p", "{mtls: {mode: strict}}"));
    assert!(
        err.contains("spec.mtls.mode") && err.contains("unknown variant"),
        "{err}"
    );
}

#[test]
fn unknown_when_key_is_an_error_naming_the_condition() {
    let err = refused(&authz(
        "foo",
        "p",
        "{rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}, {key: 'request.header[x]', values: [a]}]}]}",
    ));
    assert!(
        err.contains(
            "AuthorizationPolicy foo/p: spec.rules[0].when[1].key: unknown key `request.header[x]`"
        ),
        "{err}"
    );
    let err = refused(&authz(
        "foo",
        "p",
        "{rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}",
    ));
    assert!(
        err.contains("when[0].key") && err.contains("not supported"),
        "{err}"
    );
    let err = refused(&authz("foo", "p", "{rules: [{when: [{key: source.ip}]}]}"));
    assert!(err.contains("at least one of values or notValues"), "{err}");
}

#[test]
fn custom_and_request_principals_are_not_supported_yet() {
    let err = refused(&authz("foo", "p", "{action: CUSTOM, rules: [{}]}"));
    assert!(
        err.contains("spec.action: CUSTOM") && err.contains("not supported yet"),
        "{err}"
    );
    let err = refused(&authz(
        "foo",
        "p",
        "{action: CUSTOM, provider: {name: ext}, rules: [{}]}",
    ));
    assert!(
        err.contains("`provider` is not supported") && err.contains("CUSTOM"),
        "{err}"
    );
    let err = refused(&authz(
        "foo",
        "p",
        "{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}",
    ));
    assert!(
        err.contains("spec.rules[0].from[0].source")
            && err.contains("`requestPrincipals` is not supported")
            && err.contains("RequestAuthentication"),
        "{err}"
    );
    let err = refused(&authz(
        "foo",
        "p",
        "{targetRefs: [{kind: Service, group: '', name: x}]}",
    ));
    assert!(err.contains("`targetRefs` is not supported"), "{err}");
}

#[test]
fn istio_validation_rules_are_enforced() {
    for (body, field, message) in [
        (
            "{rules: [{from: []}]}",
            "spec.rules[0].from",
            "must not be empty",
        ),
        (
            "{rules: [{from: [{}]}]}",
            "spec.rules[0].from[0].source",
            "must not be nil",
        ),
        (
            "{rules: [{from: [{source: {}}]}]}",
            "spec.rules[0].from[0].source",
            "must not be empty",
        ),
        (
            "{rules: [{to: [{operation: {}}]}]}",
            "spec.rules[0].to[0].operation",
            "must not be empty",
        ),
        (
            "{rules: [{to: [{operation: {ports: ['http']}}]}]}",
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port",
        ),
        (
            "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}",
            "source.ipBlocks[0]",
            "prefix length",
        ),
        (
            "{rules: [{to: [{operation: {paths: ['']}}]}]}",
            "operation.paths[0]",
            "empty value",
        ),
        (
            "{rules: [{to: [{operation: {paths: ['/a/{*}.txt']}}]}]}",
            "operation.paths[0]",
            "`{*}` or `{**}` segment",
        ),
        (
            "{rules: [{to: [{operation: {paths: ['/{**}/a/{*}']}}]}]}",
            "operation.paths[0]",
            "last operator",
        ),
        (
            "{rules: [{to: [{operation: {methods: ['G*T']}}]}]}",
            "operation.methods[0]",
            "a `*` is allowed only",
        ),
        (
            "{rules: [{from: [{source: {namespaces: ['Foo']}}]}]}",
            "source.namespaces[0]",
            "not a namespace",
        ),
        (
            "{selector: {matchLabels: {app: '*'}}}",
            "spec.selector.matchLabels",
            "wildcards",
        ),
    ] {
        let err = refused(&authz("foo", "p", body));
        assert!(
            err.contains(field) && err.contains(message),
            "{body}: {err}"
        );
    }
    for (body, field, message) in [
        (
            "{portLevelMtls: {'8080': {mode: DISABLE}}}",
            "spec.portLevelMtls",
            "needs a workload selector",
        ),
        (
            "{selector: {matchLabels: {app: a}}, portLevelMtls: {}}",
            "spec.portLevelMtls",
            "at least one element",
        ),
        (
            "{selector: {matchLabels: {app: a}}, portLevelMtls: {'0': {mode: STRICT}}}",
            "spec.portLevelMtls.0",
            "1..65535",
        ),
        (
            "{selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: STRICT}}}",
            "spec.portLevelMtls.http",
            "1..65535",
        ),
    ] {
        let err = refused(&pa("foo", "p", body));
        assert!(
            err.contains(field) && err.contains(message),
            "{body}: {err}"
        );
    }
    let err = refused(
        "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n",
    );
    assert!(err.contains("security.istio.io/v1 (or v1beta1)"), "{err}");
}

// ---------------------------------------------------------------- PeerAuthentication

const ROOT: &str = "isthmus-system";

fn mode(snap: &Snapshot, namespace: &str, app: &str, port: u16) -> MtlsMode {
    let labels = labels(&[("app", app)]);
    snap.peer_authentication(
        Workload {
            namespace,
            labels: &labels,
        },
        port,
    )
}

#[test]
fn peer_authentication_defaults_to_permissive() {
    let snap = must("");
    assert_eq!(mode(&snap, "foo", "a", 80), MtlsMode::Permissive);
    let snap = must(&pa("foo", "unset", "{mtls: {mode: UNSET}}"));
    assert_eq!(mode(&snap, "foo", "a", 80), MtlsMode::Permissive);
}

/// Workload selector > namespace > mesh; `UNSET` (or no `mtls`) inherits the level above.
#[test]
fn peer_authentication_precedence_matrix() {
    use MtlsMode::*;
    let mesh = |m: &str| pa(ROOT, "mesh", &format!("{{mtls: {{mode: {m}}}}}"));
    let ns = |m: &str| pa("foo", "ns", &format!("{{mtls: {{mode: {m}}}}}"));
    let wl = |m: &str| {
        pa(
            "foo",
            "finance",
            &format!("{{selector: {{matchLabels: {{app: finance}}}}, mtls: {{mode: {m}}}}}"),
        )
    };
    // (config, finance in foo, other app in foo, app in bar)
    let cases = [
        (mesh("STRICT"), Strict, Strict, Strict),
        (mesh("STRICT") + &ns("DISABLE"), Disable, Disable, Strict),
        (mesh("STRICT") + &ns("UNSET"), Strict, Strict, Strict),
        (mesh("DISABLE") + &wl("STRICT"), Strict, Disable, Disable),
        (
            mesh("STRICT") + &ns("PERMISSIVE") + &wl("UNSET"),
            Permissive,
            Permissive,
            Strict,
        ),
        (
            mesh("UNSET") + &ns("UNSET") + &wl("DISABLE"),
            Disable,
            Permissive,
            Permissive,
        ),
        (
            ns("STRICT") + &wl("PERMISSIVE"),
            Permissive,
            Strict,
            Permissive,
        ),
        (
            mesh("DISABLE") + &pa("foo", "nomode", "{selector: {matchLabels: {app: finance}}}"),
            Disable,
            Disable,
            Disable,
        ),
    ];
    for (config, finance, other, bar) in cases {
        let snap = must(&config);
        assert_eq!(mode(&snap, "foo", "finance", 80), finance, "{config}");
        assert_eq!(mode(&snap, "foo", "other", 80), other, "{config}");
        assert_eq!(mode(&snap, "bar", "finance", 80), bar, "{config}");
    }
}

#[test]
fn port_level_mtls_overrides_only_its_port_and_unset_inherits() {
    use MtlsMode::*;
    let snap = must(
        &(pa(ROOT, "mesh", "{mtls: {mode: PERMISSIVE}}")
            + &pa("foo", "ns", "{mtls: {mode: STRICT}}")
            + &pa(
                "foo",
                "finance",
                "{selector: {matchLabels: {app: finance}}, mtls: {mode: UNSET}, \
             portLevelMtls: {8080: {mode: DISABLE}, '9090': {mode: UNSET}}}",
            )),
    );
    assert_eq!(mode(&snap, "foo", "finance", 8080), Disable);
    assert_eq!(
        mode(&snap, "foo", "finance", 9090),
        Strict,
        "UNSET port inherits"
    );
    assert_eq!(
        mode(&snap, "foo", "finance", 80),
        Strict,
        "UNSET workload inherits"
    );
    assert_eq!(mode(&snap, "foo", "other", 8080), Strict);
}

#[test]
fn oldest_policy_wins_among_equals_and_root_selectors_are_ignored() {
    let with_time = |ns: &str, name: &str, time: &str, body: &str| {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n\
             metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{time}'}}\nspec: {body}\n---\n"
        )
    };
    let snap = must(
        &(with_time(
            "foo",
            "a-new",
            "2024-05-02T00:00:00Z",
            "{mtls: {mode: DISABLE}}",
        ) + &with_time(
            "foo",
            "z-old",
            "2024-05-01T00:00:00Z",
            "{mtls: {mode: STRICT}}",
        )),
    );
    assert_eq!(mode(&snap, "foo", "x", 80), MtlsMode::Strict, "oldest wins");
    let snap = must(
        &(with_time("foo", "a", "2024-05-01T00:00:00Z", "{mtls: {mode: STRICT}}")
            + &pa("foo", "b-untimed", "{mtls: {mode: DISABLE}}")),
    );
    assert_eq!(
        mode(&snap, "foo", "x", 80),
        MtlsMode::Disable,
        "no timestamp: Go's zero time"
    );
    let snap = must(
        &(pa(
            "foo",
            "b",
            "{selector: {matchLabels: {app: x}}, mtls: {mode: DISABLE}}",
        ) + &pa(
            "foo",
            "a",
            "{selector: {matchLabels: {app: x}}, mtls: {mode: STRICT}}",
        )),
    );
    assert_eq!(
        mode(&snap, "foo", "x", 80),
        MtlsMode::Strict,
        "same age: by name"
    );
    let snap = must(&pa(
        ROOT,
        "sel",
        "{selector: {matchLabels: {app: x}}, mtls: {mode: STRICT}}",
    ));
    assert_eq!(mode(&snap, "foo", "x", 80), MtlsMode::Permissive);
    assert_eq!(mode(&snap, ROOT, "x", 80), MtlsMode::Permissive);
    let snap = must(&pa("mesh", "m", "{mtls: {mode: STRICT}}")).with_root_namespace("mesh");
    assert_eq!(
        mode(&snap, "foo", "x", 80),
        MtlsMode::Strict,
        "a custom root namespace"
    );
}

// ---------------------------------------------------------------- AuthorizationPolicy

/// A request to the `httpbin` workload in `foo`.
struct Call {
    principal: Option<&'static str>,
    source_ip: &'static str,
    port: u16,
    http: Option<(&'static str, &'static str)>,
    headers: Vec<(&'static str, &'static str)>,
}

/// `from` is a service account `ns/sa` (mTLS) or `-` (plaintext); `http` (method, path).
fn call(from: &str, port: u16, http: Option<(&'static str, &'static str)>) -> Call {
    let principal = (from != "-").then(|| {
        let (ns, sa) = from.split_once('/').unwrap();
        &*Box::leak(format!("cluster.local/ns/{ns}/sa/{sa}").into_boxed_str())
    });
    Call {
        principal,
        source_ip: "10.1.2.3",
        port,
        http,
        headers: Vec::new(),
    }
}

/// The decision for `c` to the `app` workload in `namespace`, as text: `allow`/`deny`, then
/// `policy#rule` or why no policy decided; and the AUDIT policy that matched.
fn decide_in(snap: &Snapshot, namespace: &str, app: &str, c: &Call) -> (String, Option<String>) {
    let workload_labels = labels(&[("app", app)]);
    let source_namespace = c.principal.and_then(|p| p.split('/').nth(2));
    let decision = snap.authorize(
        Workload {
            namespace,
            labels: &workload_labels,
        },
        &Request {
            source_principal: c.principal,
            source_namespace,
            source_ip: ip(c.source_ip),
            remote_ip: None,
            destination_ip: ip("10.9.9.9"),
            destination_port: c.port,
            sni: None,
            http: c.http.map(|(method, path)| HttpRequest {
                host: "httpbin.foo:8000",
                method,
                path,
                headers: &c.headers,
            }),
        },
    );
    let named = |r: RuleRef<'_>| format!("{}#{}", r.policy, r.rule);
    let verdict = match decision.verdict {
        Verdict::AllowedWithoutPolicy => "allow (no ALLOW policy)".to_string(),
        Verdict::Allowed(r) => format!("allow {}", named(r)),
        Verdict::Denied(r) => format!("deny {}", named(r)),
        Verdict::DeniedNoAllowMatch => "deny (no ALLOW matched)".to_string(),
    };
    assert_eq!(decision.is_allowed(), verdict.starts_with("allow"));
    (verdict, decision.audit.map(named))
}

fn verdict(snap: &Snapshot, c: &Call) -> String {
    decide_in(snap, "foo", "httpbin", c).0
}

fn allowed(snap: &Snapshot, c: &Call) -> bool {
    verdict(snap, c).starts_with("allow")
}

#[test]
fn no_policy_allows_without_work_and_says_so() {
    let snap = must("");
    let d = decide_in(&snap, "foo", "httpbin", &call("-", 80, None));
    assert_eq!(d.0, "allow (no ALLOW policy)");
    // A policy elsewhere does not apply here.
    let snap = must(&authz("bar", "deny-all", "{}"));
    assert_eq!(
        verdict(&snap, &call("-", 80, None)),
        "allow (no ALLOW policy)"
    );
    assert!(!snap.has_authorization_for(Workload {
        namespace: "foo",
        labels: &labels(&[])
    }));
}

/// Istio: "an ALLOW policy with no rules allows nothing" (`spec: {}` is deny-all) and a rule
/// `{}` matches every request (allow-all).
#[test]
fn empty_rules_allow_nothing_and_an_empty_rule_matches_everything() {
    let snap = must(&authz("foo", "allow-nothing", "{}"));
    let d = decide_in(
        &snap,
        "foo",
        "httpbin",
        &call("bar/sleep", 80, Some(("GET", "/"))),
    );
    assert_eq!(d.0, "deny (no ALLOW matched)");
    let snap =
        must(&(authz("foo", "allow-nothing", "{}") + &authz("foo", "allow-all", "{rules: [{}]}")));
    let d = decide_in(&snap, "foo", "httpbin", &call("-", 80, None));
    assert_eq!(d.0, "allow foo/allow-all#0");
    // A DENY policy without rules never matches.
    let snap = must(&authz("foo", "deny-nothing", "{action: DENY}"));
    assert!(allowed(&snap, &call("-", 80, None)));
}

/// The HTTP matrix: principals × namespaces × paths × methods.
#[test]
fn http_allow_matrix() {
    let snap = must(&authz(
        "foo",
        "httpbin",
        r#"{selector: {matchLabels: {app: httpbin}}, action: ALLOW, rules: [
            {from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}, {source: {namespaces: [test]}}],
             to: [{operation: {methods: [GET], paths: ["/info*"]}}, {operation: {methods: [POST], paths: [/data]}}]},
            {from: [{source: {principals: ["*"], notNamespaces: [test, dev]}}],
             to: [{operation: {paths: ["/api/{*}/items/{**}"], notMethods: [DELETE]}}]}]}"#,
    ));
    let cases: &[(&str, &str, &str, bool)] = &[
        ("default/sleep", "GET", "/info", true),
        ("default/sleep", "GET", "/info/x?y=1", true),
        ("default/sleep", "POST", "/info", false),
        ("default/sleep", "POST", "/data", true),
        ("default/sleep", "POST", "/data/x", false),
        ("default/other", "GET", "/info", false),
        ("test/anyone", "GET", "/infox", true),
        ("test/anyone", "PUT", "/data", false),
        ("-", "GET", "/info", false),
        // rule 1: any mTLS peer outside test and dev, templated paths, not DELETE
        ("prod/app", "GET", "/api/v1/items/", true),
        ("prod/app", "PATCH", "/api/v1/items/a/b", true),
        ("prod/app", "DELETE", "/api/v1/items/a", false),
        ("prod/app", "GET", "/api/v1/x/items/a", false),
        ("prod/app", "GET", "/api//items/a", false),
        ("dev/app", "GET", "/api/v1/items/a", false),
        ("-", "GET", "/api/v1/items/a", false),
    ];
    for (from, method, path, want) in cases {
        let c = call(from, 8000, Some((method, path)));
        assert_eq!(allowed(&snap, &c), *want, "{from} {method} {path}");
    }
    // The selector: another workload in foo has no policy.
    assert!(
        decide_in(&snap, "foo", "other", &call("-", 80, Some(("GET", "/"))))
            .0
            .starts_with("allow")
    );
    let d = decide_in(
        &snap,
        "foo",
        "httpbin",
        &call("prod/app", 8000, Some(("GET", "/api/v/items/"))),
    );
    assert_eq!(d.0, "allow foo/httpbin#1");
}

/// DENY before ALLOW; AUDIT is reported and changes nothing; `not*` forms; `when`.
#[test]
fn deny_before_allow_and_audit_does_not_decide() {
    let snap = must(
        &(authz(
            "foo",
            "allow-ns",
            "{rules: [{from: [{source: {namespaces: [foo, bar]}}]}]}",
        ) + &authz(
            "foo",
            "deny-admin",
            r#"{action: DENY, rules: [{to: [{operation: {paths: ["/admin*"], notPaths: [/admin/health]}}]},
                    {when: [{key: 'request.headers[x-block]', values: ['*']}]}]}"#,
        ) + &authz(
            "foo",
            "audit-post",
            "{action: AUDIT, rules: [{to: [{operation: {methods: [POST]}}]}]}",
        )),
    );
    let d = decide_in(
        &snap,
        "foo",
        "httpbin",
        &call("bar/a", 80, Some(("GET", "/admin/users"))),
    );
    assert_eq!(d.0, "deny foo/deny-admin#0");
    assert!(allowed(
        &snap,
        &call("bar/a", 80, Some(("GET", "/admin/health")))
    ));
    assert!(!allowed(&snap, &call("baz/a", 80, Some(("GET", "/")))));
    let mut c = call("bar/a", 80, Some(("GET", "/")));
    c.headers = vec![("X-Block", "1")];
    let d = decide_in(&snap, "foo", "httpbin", &c);
    assert_eq!(d.0, "deny foo/deny-admin#1");
    let d = decide_in(
        &snap,
        "foo",
        "httpbin",
        &call("bar/a", 80, Some(("POST", "/x"))),
    );
    assert_eq!(d.0, "allow foo/allow-ns#0");
    assert_eq!(d.1, Some("foo/audit-post#0".to_string()));
    let d = decide_in(
        &snap,
        "foo",
        "httpbin",
        &call("baz/a", 80, Some(("POST", "/x"))),
    );
    assert_eq!(d.0, "deny (no ALLOW matched)", "AUDIT does not allow");
    assert!(d.1.is_some());
}

/// The TCP matrix: principals × ports, and Istio's treatment of HTTP-only fields on TCP.
#[test]
fn tcp_allow_matrix_and_http_only_fields() {
    let snap = must(&authz(
        "foo",
        "tcp",
        r#"{rules: [
            {from: [{source: {principals: [cluster.local/ns/foo/sa/db-client]}}], to: [{operation: {ports: ["5432"]}}]},
            {from: [{source: {principals: ["*"]}}], to: [{operation: {ports: ["9000"], notPorts: ["9001"]}}]},
            {to: [{operation: {ports: ["8080"], methods: [GET]}}]}]}"#,
    ));
    let cases: &[(&str, u16, bool)] = &[
        ("foo/db-client", 5432, true),
        ("foo/other", 5432, false),
        ("-", 5432, false),
        ("foo/other", 9000, true),
        ("-", 9000, false),
        ("foo/db-client", 6000, false),
        // rule 2 has an HTTP-only field: in an ALLOW policy it never matches TCP
        ("foo/db-client", 8080, false),
        ("-", 8080, false),
    ];
    for (from, port, want) in cases {
        assert_eq!(
            allowed(&snap, &call(from, *port, None)),
            *want,
            "{from} :{port}"
        );
    }
    assert!(
        allowed(&snap, &call("-", 8080, Some(("GET", "/")))),
        "the same rule on HTTP"
    );

    // In a DENY policy the HTTP-only field is ignored on TCP and the rest still applies.
    let snap = must(&authz(
        "foo",
        "deny",
        r#"{action: DENY, rules: [{from: [{source: {notNamespaces: [foo]}}], to: [{operation: {ports: ["8080"], paths: [/admin]}}]}]}"#,
    ));
    assert!(
        !allowed(&snap, &call("bar/x", 8080, None)),
        "DENY with HTTP-only fields still denies TCP"
    );
    assert!(allowed(&snap, &call("foo/x", 8080, None)));
    assert!(allowed(&snap, &call("bar/x", 9000, None)));
    assert!(
        allowed(&snap, &call("bar/x", 8080, Some(("GET", "/")))),
        "on HTTP the path counts"
    );
}

#[test]
fn ip_blocks_when_conditions_and_scopes() {
    let snap = must(
        &(authz(
            "foo",
            "ips",
            r#"{rules: [{from: [{source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.2.0/24]}}]},
                {when: [{key: destination.port, values: ["7000"]}, {key: source.ip, notValues: [10.1.2.3]}]},
                {when: [{key: source.principal, values: ["*/sa/ops"]}, {key: destination.ip, values: [10.9.0.0/16]}]}]}"#,
        ) + &authz(ROOT, "mesh-deny", "{action: DENY, selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {principals: [cluster.local/ns/evil/sa/x]}}]}]}")),
    );
    let mut c = call("-", 80, None);
    c.source_ip = "10.1.9.9";
    assert!(allowed(&snap, &c));
    c.source_ip = "10.1.2.9";
    assert!(!allowed(&snap, &c), "notIpBlocks");
    c.source_ip = "10.1.2.3";
    c.port = 7000;
    assert!(!allowed(&snap, &c), "source.ip notValues");
    c.source_ip = "10.2.0.1";
    assert!(allowed(&snap, &c), "destination.port");
    assert!(
        allowed(&snap, &call("x/ops", 80, None)),
        "source.principal and destination.ip"
    );
    // The root-namespace DENY with a selector applies in every namespace, to matching labels.
    let evil = call("evil/x", 80, None);
    let d = decide_in(&snap, "elsewhere", "httpbin", &evil);
    assert_eq!(d.0, "deny isthmus-system/mesh-deny#0");
    assert!(decide_in(&snap, "elsewhere", "other", &evil)
        .0
        .starts_with("allow"));
}

// ---------------------------------------------------------------- Istio's own examples

/// Istio's documentation examples, quoted in `tests/istio-samples/security/`, load unchanged
/// (except where they use what isthmus refuses: see the README there).
#[test]
fn istio_reference_example_evaluates_as_documented() {
    // From the AuthorizationPolicy reference, without its `request.auth.claims` condition
    // (JWT is not supported).
    let snap = must(&authz(
        "foo",
        "httpbin",
        r#"{action: ALLOW, rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}, {source: {namespaces: ["test"]}}],
            to: [{operation: {methods: ["GET"], paths: ["/info*"]}}, {operation: {methods: ["POST"], paths: ["/data"]}}]}]}"#,
    ));
    assert!(allowed(
        &snap,
        &call("default/sleep", 80, Some(("GET", "/info/a")))
    ));
    assert!(allowed(&snap, &call("test/x", 80, Some(("POST", "/data")))));
    assert!(!allowed(
        &snap,
        &call("default/other", 80, Some(("GET", "/info")))
    ));
}

#[test]
fn principal_namespace_is_the_identitys() {
    use crate::principal_namespace;
    assert_eq!(
        principal_namespace("cluster.local/ns/shop/sa/web"),
        Some("shop")
    );
    assert_eq!(principal_namespace("td/ns/shop/sa/web/extra"), None);
    assert_eq!(principal_namespace("td/sa/web/ns/shop"), None);
    assert_eq!(principal_namespace("td/ns//sa/web"), None);
    assert_eq!(principal_namespace("web"), None);
}

/// `/config_dump` lists the loaded policies in evaluation order.
#[test]
fn dump_lists_policies() {
    let snap = must(
        &(pa(ROOT, "mesh", "{mtls: {mode: STRICT}}")
            + &pa(
                "foo",
                "web",
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}}}",
            )
            + &authz("foo", "allow", "{rules: [{}, {}]}")
            + &authz("foo", "deny", "{action: DENY}")),
    );
    let dump = snap.dump()["security"].clone();
    assert_eq!(dump["rootNamespace"], "isthmus-system");
    assert_eq!(
        dump["peerAuthentications"],
        serde_json::json!([
            {"policy": "isthmus-system/mesh", "selector": null, "mode": "STRICT", "portLevelMtls": {}},
            {"policy": "foo/web", "selector": {"app": "web"}, "mode": "UNSET", "portLevelMtls": {"8080": "DISABLE"}},
        ])
    );
    assert_eq!(
        dump["authorizationPolicies"],
        serde_json::json!([
            {"policy": "foo/deny", "action": "DENY", "selector": null, "rules": 0},
            {"policy": "foo/allow", "action": "ALLOW", "selector": null, "rules": 2},
        ])
    );
}

/// Istio's `HostMatcher`: case-insensitive on `:authority` as sent, so a `:port` is part of it.
#[test]
fn hosts_match_the_authority_as_sent() {
    let snap = must(&authz(
        "foo",
        "hosts",
        r#"{rules: [{to: [{operation: {hosts: [HTTPBIN.foo, "httpbin.foo:*"], notHosts: ["*:9999"]}}]}]}"#,
    ));
    // `call` sends `Host: httpbin.foo:8000`.
    assert!(allowed(&snap, &call("-", 80, Some(("GET", "/")))));
    let snap = must(&authz(
        "foo",
        "hosts",
        "{rules: [{to: [{operation: {hosts: [httpbin.foo]}}]}]}",
    ));
    assert!(
        !allowed(&snap, &call("-", 80, Some(("GET", "/")))),
        "the port is part of the host"
    );
}
