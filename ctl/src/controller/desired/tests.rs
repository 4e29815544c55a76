use serde_json::{json, Value};

use super::*;
use crate::controller::istio::Origin;

fn object(kind: &str, ns: &str, name: &str, spec: Value) -> IstioObject {
    IstioObject::new(kind, ns, name, spec, Origin::Object { uid: None })
}

fn keys(objects: &[&IstioObject]) -> Vec<String> {
    objects.iter().map(|o| o.key.to_string()).collect()
}

fn vs(ns: &str, name: &str, host: &str, export_to: Value) -> IstioObject {
    object(
        "VirtualService",
        ns,
        name,
        json!({"hosts": [host], "exportTo": export_to,
               "http": [{"route": [{"destination": {"host": host}}]}]}),
    )
}

/// The registry a sidecar in any namespace of these tests has: reviews in shop, db in data.
fn registry() -> Vec<SourceFile> {
    let entry = |ns: &str, name: &str, ip: &str| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"hosts": [format!("{name}.{ns}.svc.cluster.local")], "addresses": [ip],
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "resolution": "STATIC", "endpoints": [{"address": "10.1.0.1"}]}})
        .to_string()
    };
    vec![SourceFile::new(
        "registry.json",
        format!(
            "{}\n{}\n",
            entry("shop", "reviews", "10.96.0.1"),
            entry("data", "db", "10.96.0.2")
        ),
    )]
}

#[test]
fn export_to_matrix() {
    let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // (exportTo, owner, consumer, visible)
    let cases: &[(&[&str], &str, &str, bool)] = &[
        (&[], "a", "a", true),
        (&[], "a", "b", true),
        (&["*"], "a", "b", true),
        (&["."], "a", "a", true),
        (&["."], "a", "b", false),
        (&["~"], "a", "a", false),
        (&["~"], "a", "b", false),
        (&["b"], "a", "b", true),
        (&["b"], "a", "a", false),
        (&["b"], "a", "c", false),
        (&[".", "c"], "a", "a", true),
        (&[".", "c"], "a", "c", true),
        (&[".", "c"], "a", "b", false),
    ];
    for (export_to, owner, consumer, expected) in cases {
        assert_eq!(
            visible(&list(export_to), owner, consumer),
            *expected,
            "exportTo {export_to:?} of {owner}, seen from {consumer}"
        );
    }
}

#[test]
fn namespaces_see_what_is_exported_to_them() {
    let objects = vec![
        vs("data", "everyone", "db.data.svc.cluster.local", json!([])),
        vs("data", "only-data", "db", json!(["."])),
        vs("data", "nobody", "db", json!(["~"])),
        vs("data", "to-shop", "db", json!(["shop"])),
    ];
    let seen = |ns: &str| keys(&candidates(&objects, ns, "isthmus-system"));
    // Several VirtualServices for one host: these overlap on purpose, shadowing aside.
    assert_eq!(
        seen("data"),
        [
            "VirtualService data/everyone",
            "VirtualService data/only-data"
        ]
    );
    // In shop both imported ones claim db: the first by name wins, the other is shadowed.
    assert_eq!(seen("shop"), ["VirtualService data/everyone"]);
    assert_eq!(seen("web"), ["VirtualService data/everyone"]);
    let exported_to_shop = vec![vs("data", "to-shop", "db", json!(["shop"]))];
    assert_eq!(
        keys(&candidates(&exported_to_shop, "shop", "isthmus-system")),
        ["VirtualService data/to-shop"]
    );
    assert!(candidates(&exported_to_shop, "data", "isthmus-system").is_empty());
}

#[test]
fn a_namespace_own_object_shadows_an_imported_one_for_the_same_host() {
    let dr = |ns: &str, name: &str| {
        object(
            "DestinationRule",
            ns,
            name,
            json!({"host": "reviews.shop.svc.cluster.local", "subsets": [{"name": "v1"}]}),
        )
    };
    let objects = vec![
        dr("shop", "mine"),
        dr("web", "theirs"),
        dr("isthmus-system", "mesh"),
    ];
    let seen = |ns: &str| keys(&candidates(&objects, ns, "isthmus-system"));
    assert_eq!(seen("web"), ["DestinationRule web/theirs"]);
    // Elsewhere the host's own namespace wins over the root namespace and any other.
    assert_eq!(seen("other"), ["DestinationRule shop/mine"]);
    let without_shop = vec![dr("web", "theirs"), dr("isthmus-system", "mesh")];
    assert_eq!(
        keys(&candidates(&without_shop, "other", "isthmus-system")),
        ["DestinationRule isthmus-system/mesh"]
    );
}

#[test]
fn the_root_namespace_sidecar_is_the_default_of_namespaces_without_one() {
    let sidecar = |ns: &str, spec: Value| object("Sidecar", ns, "default", spec);
    let objects = vec![
        sidecar(
            "isthmus-system",
            json!({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}),
        ),
        sidecar(
            "shop",
            json!({"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}}),
        ),
        object(
            "Sidecar",
            "web",
            "selected",
            json!({"workloadSelector": {"labels": {"app": "x"}}}),
        ),
    ];
    let seen = |ns: &str| keys(&candidates(&objects, ns, "isthmus-system"));
    assert_eq!(seen("shop"), ["Sidecar shop/default"], "its own wins");
    assert_eq!(
        seen("data"),
        ["Sidecar isthmus-system/default"],
        "the root's default"
    );
    // A Sidecar with a workloadSelector is not a namespace default: the root's still applies
    // (and the selected one is passed on, to be reported: the sidecar cannot select).
    assert_eq!(
        seen("web"),
        ["Sidecar isthmus-system/default", "Sidecar web/selected"]
    );
    assert_eq!(seen("isthmus-system"), ["Sidecar isthmus-system/default"]);
}

#[test]
fn an_invalid_object_is_left_out_and_the_error_names_its_field() {
    let good = vs("shop", "good", "reviews", json!([]));
    let bad_weights = object(
        "VirtualService",
        "data",
        "bad",
        json!({"hosts": ["db"], "http": [{"route": [
            {"destination": {"host": "db"}},
            {"destination": {"host": "db"}}]}]}),
    );
    let objects = [good.clone(), bad_weights];
    let all: Vec<&IstioObject> = objects.iter().collect();
    let assembled = assemble("shop", &all, &registry()).unwrap();
    assert_eq!(assembled.text, format!("{}\n", good.document));
    assert_eq!(assembled.left_out.len(), 1);
    let invalid = &assembled.left_out[0];
    assert_eq!(invalid.key.to_string(), "VirtualService data/bad");
    assert_eq!(invalid.field, "spec.http[0].route");
    assert!(
        invalid.message.contains("total destination weight = 0"),
        "{}",
        invalid.message
    );
    assert_eq!(invalid.consumer.as_deref(), Some("shop"));
    // What is written loads as the sidecar loads it.
    let mut files = registry();
    files.push(SourceFile::new(ROUTING_KEY, assembled.text));
    isthmus_config::load(&files).unwrap();
}

#[test]
fn an_unknown_field_is_caught_alone_with_its_path() {
    let typo = object(
        "VirtualService",
        "shop",
        "typo",
        json!({"hosts": ["reviews"], "http": [{"rout": []}]}),
    );
    let (valid, invalid) = parse_each(vec![typo, vs("shop", "ok", "reviews", json!([]))]);
    assert_eq!(valid.len(), 1);
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].field, "spec.http[0].rout");
    assert!(
        invalid[0].message.contains("rout"),
        "{}",
        invalid[0].message
    );
}

#[test]
fn a_conflict_with_the_registry_fails_the_whole_config() {
    // A ServiceEntry on the address of a Service: the registry's document is the one named.
    let clash = object(
        "ServiceEntry",
        "shop",
        "clash",
        json!({"hosts": ["other.example.com"], "addresses": ["10.96.0.1"],
               "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
               "resolution": "STATIC", "endpoints": [{"address": "10.2.0.1"}]}),
    );
    let objects = [clash];
    let all: Vec<&IstioObject> = objects.iter().collect();
    match assemble("shop", &all, &registry()) {
        // Either the user's document is named (and left out) or the registry's (and the
        // namespace keeps its last config); never a config the sidecar rejects.
        Ok(a) => {
            assert!(a.text.is_empty());
            assert_eq!(a.left_out[0].key.to_string(), "ServiceEntry shop/clash");
        }
        Err(issues) => assert!(!issues.is_empty()),
    }
}

#[test]
fn an_invalid_object_does_not_take_down_a_valid_one_for_the_same_host() {
    // Two VirtualServices for one host in one namespace: the compiler blames the later one
    // for the overlap, the earlier one for its own error; only the invalid one is left out.
    let broken = object(
        "VirtualService",
        "shop",
        "a-broken",
        json!({"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v9"}}]}]}),
    );
    let good = vs("shop", "b-good", "reviews", json!([]));
    let objects = [broken, good.clone()];
    let all: Vec<&IstioObject> = objects.iter().collect();
    let assembled = assemble("shop", &all, &registry()).unwrap();
    assert_eq!(assembled.text, format!("{}\n", good.document));
    let left_out: Vec<String> = assembled
        .left_out
        .iter()
        .map(|i| i.key.to_string())
        .collect();
    assert_eq!(left_out, ["VirtualService shop/a-broken"]);
    assert!(
        assembled.left_out[0].field.ends_with(".subset"),
        "{:?}",
        assembled.left_out[0]
    );
    assert_eq!(assembled.left_out[0].consumer, None, "its own namespace");
}

#[test]
fn a_service_entry_named_like_a_service_is_left_out_not_the_namespace() {
    // The registry's entry for Service shop/reviews and a user's ServiceEntry of that name:
    // the sidecar reports the registry's document as the duplicate; the user's is blamed.
    let same_name = object(
        "ServiceEntry",
        "shop",
        "reviews",
        json!({"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}],
               "resolution": "DNS"}),
    );
    let objects = [same_name];
    let all: Vec<&IstioObject> = objects.iter().collect();
    let assembled = assemble("shop", &all, &registry()).unwrap();
    assert!(assembled.text.is_empty());
    assert_eq!(assembled.left_out.len(), 1, "{:?}", assembled.left_out);
    assert_eq!(
        assembled.left_out[0].key.to_string(),
        "ServiceEntry shop/reviews"
    );
    assert_eq!(assembled.left_out[0].field, "metadata.name");
}

fn peer_authentication(ns: &str, name: &str, mode: &str) -> IstioObject {
    object(
        "PeerAuthentication",
        ns,
        name,
        json!({"mtls": {"mode": mode}}),
    )
}

fn authorization_policy(ns: &str, name: &str, spec: Value) -> IstioObject {
    object("AuthorizationPolicy", ns, name, spec)
}

#[test]
fn security_policies_apply_in_their_namespace_and_from_the_root_only() {
    let allow_shop =
        json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]});
    let objects = vec![
        peer_authentication("isthmus-system", "mesh", "STRICT"),
        peer_authentication("shop", "shop", "PERMISSIVE"),
        authorization_policy("shop", "allow-shop", allow_shop.clone()),
        authorization_policy("data", "allow-shop", allow_shop),
        peer_authentication("data", "data", "DISABLE"),
    ];
    let shop = candidates(&objects, "shop", "isthmus-system");
    assert_eq!(
        keys(&shop),
        [
            "PeerAuthentication shop/shop",
            "AuthorizationPolicy shop/allow-shop",
            "PeerAuthentication isthmus-system/mesh",
        ]
    );
    let data = candidates(&objects, "data", "isthmus-system");
    assert_eq!(
        keys(&data),
        [
            "AuthorizationPolicy data/allow-shop",
            "PeerAuthentication data/data",
            "PeerAuthentication isthmus-system/mesh",
        ]
    );
    let root = candidates(&objects, "isthmus-system", "isthmus-system");
    assert_eq!(keys(&root), ["PeerAuthentication isthmus-system/mesh"]);
    // What is written is what the sidecar accepts: security.istio.io/v1 documents.
    let assembled = assemble("shop", &shop, &registry()).expect("compiles");
    assert!(assembled.left_out.is_empty(), "{:?}", assembled.left_out);
    assert_eq!(
        assembled
            .text
            .matches("\"apiVersion\":\"security.istio.io/v1\"")
            .count(),
        3,
        "{}",
        assembled.text
    );
}

#[test]
fn an_invalid_authorization_policy_is_left_out_with_its_field() {
    let objects = vec![
        authorization_policy(
            "shop",
            "bad-when",
            json!({"rules": [{"when": [{"key": "request.bogus", "values": ["x"]}]}]}),
        ),
        authorization_policy("shop", "bad-field", json!({"bogus": true})),
        peer_authentication("shop", "shop", "STRICT"),
    ];
    // Schema: caught alone.
    let (valid, invalid) = parse_each(objects);
    assert_eq!(invalid.len(), 1, "{invalid:?}");
    assert_eq!(
        invalid[0].key.to_string(),
        "AuthorizationPolicy shop/bad-field"
    );
    // Semantics (an unknown `when` key): caught when the namespace's config is compiled.
    let shop = candidates(&valid, "shop", "isthmus-system");
    let assembled = assemble("shop", &shop, &registry()).expect("compiles without it");
    assert_eq!(assembled.left_out.len(), 1, "{:?}", assembled.left_out);
    let left_out = &assembled.left_out[0];
    assert_eq!(
        left_out.key.to_string(),
        "AuthorizationPolicy shop/bad-when"
    );
    assert!(
        left_out.field.contains("when") || left_out.message.contains("request.bogus"),
        "{left_out:?}"
    );
    assert!(!assembled.text.contains("bad-when") && assembled.text.contains("PeerAuthentication"));
}

/// Found in review: with no Istio objects `assemble` returned Ok without compiling, so a
/// registry the sidecar rejects (two Services on one address) was written as it was.
#[test]
fn a_registry_that_does_not_load_fails_even_without_istio_objects() {
    let mut files = registry();
    files[0].text = files[0].text.replace("10.96.0.2", "10.96.0.1");
    let issues = assemble("shop", &[], &files).expect_err("the registry alone does not load");
    assert!(!issues.is_empty());
    assert_eq!(
        assemble("shop", &[], &registry()).ok().map(|a| a.text),
        Some(String::new())
    );
}
