use serde_json::json;

use super::*;
use crate::controller::scope::SidecarEgress;

/// A registry line like `registry::registry_json` writes, with `endpoints` addresses.
fn line(ns: &str, name: &str, endpoints: &[&str]) -> String {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hosts": [format!("{name}.{ns}.svc.cluster.local")],
            "ports": [{"number": 80, "name": "http"}],
            "resolution": "STATIC",
            "endpoints": endpoints.iter().map(|a| json!({"address": a})).collect::<Vec<_>>(),
        },
    })
    .to_string()
}

/// `count` services over a few namespaces, sorted as the registry is.
fn registry(count: usize, endpoint: &str) -> String {
    let mut lines: Vec<(String, String, String)> = (0..count)
        .map(|i| {
            let (ns, name) = (format!("ns{}", i % 7), format!("svc{i:05}"));
            let text = line(&ns, &name, &["10.0.0.1", endpoint]);
            (ns, name, text)
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, _, l)| l + "\n").collect()
}

fn sizes(split: &Split) -> Vec<usize> {
    split.files.iter().map(|f| f.text.len()).collect()
}

#[test]
fn small_registry_is_one_registry_json() {
    let text = registry(10, "10.0.0.2");
    let split = split(&entries(&text).unwrap(), 1 << 20, None).unwrap();
    assert_eq!(split.files, vec![SourceFile::new("registry.json", text)]);
    assert_eq!(split.services, 10);
}

#[test]
fn every_shard_is_within_budget_and_holds_each_service_once() {
    let text = registry(2000, "10.0.0.2");
    let budget = 64 * 1024;
    let split = split(&entries(&text).unwrap(), budget, None).unwrap();
    let n = split.files.len();
    assert!(
        n.is_power_of_two() && n > 1 && n <= MAX_SHARDS,
        "{n} shards"
    );
    assert!(
        sizes(&split).iter().all(|s| *s <= budget),
        "{:?}",
        sizes(&split)
    );
    let names: Vec<String> = split.files.iter().map(|f| f.name.clone()).collect();
    assert_eq!(names[0], "registry.json");
    assert_eq!(names[1], "registry-1.json");
    let mut lines: Vec<&str> = split.files.iter().flat_map(|f| f.text.lines()).collect();
    assert_eq!(lines.len(), 2000);
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), 2000, "a service is in two shards");
    // The sidecar loads the shards as one registry.
    let snapshot = isthmus_config::load(&split.files).unwrap();
    assert_eq!(snapshot.services().len(), 2000);
}

#[test]
fn one_service_changing_rewrites_exactly_one_shard() {
    let budget = 64 * 1024;
    let before = registry(2000, "10.0.0.2");
    let old = split(&entries(&before).unwrap(), budget, None).unwrap();
    let changed = line("ns3", "svc00003", &["10.0.0.1", "10.9.9.9"]);
    let after = before.replace(
        &line("ns3", "svc00003", &["10.0.0.1", "10.0.0.2"]),
        &changed,
    );
    assert_ne!(before, after);
    let new = split(&entries(&after).unwrap(), budget, Some(old.files.len())).unwrap();
    assert_eq!(old.files.len(), new.files.len());
    let differing: Vec<&str> = old
        .files
        .iter()
        .zip(&new.files)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.name.as_str())
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    // A service added or removed also touches one shard.
    let fewer = after.replacen(&(changed + "\n"), "", 1);
    let removed = split(&entries(&fewer).unwrap(), budget, Some(new.files.len())).unwrap();
    let differing = new
        .files
        .iter()
        .zip(&removed.files)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 1);
}

#[test]
fn growing_splits_each_shard_in_two_and_the_count_holds_while_it_fits() {
    // Lines of 283 bytes: 1000 services are 4 shards of 256 KiB (half full at most), 4000 are 16.
    let budget = 256 * 1024;
    let small = registry(1000, "10.0.0.2");
    let a = split(&entries(&small).unwrap(), budget, None).unwrap();
    assert_eq!(a.files.len(), 4);
    let large = registry(4000, "10.0.0.2");
    let b = split(&entries(&large).unwrap(), budget, Some(4)).unwrap();
    assert_eq!(b.files.len(), 16, "{:?}", sizes(&b));
    // A service of old shard k lands in a new shard ≡ k (mod the old count): each old shard
    // is split, no service moves between old shards.
    for (k, file) in a.files.iter().enumerate() {
        for l in file.text.lines() {
            let shard = b.files.iter().position(|f| f.text.contains(l)).unwrap();
            assert_eq!(shard % 4, k);
        }
    }
    // Halving keeps the larger count (shards still over an eighth full): no re-split...
    let middle = registry(2000, "10.0.0.2");
    let c = split(&entries(&middle).unwrap(), budget, Some(16)).unwrap();
    assert_eq!(c.files.len(), 16);
    // ...where a controller without history picks the natural count.
    let d = split(&entries(&middle).unwrap(), budget, None).unwrap();
    assert_eq!(d.files.len(), 8);
    // Shrinking far does re-split.
    let e = split(&entries(&small).unwrap(), budget, Some(16)).unwrap();
    assert_eq!(e, a);
}

#[test]
fn equal_inputs_give_equal_bytes() {
    let text = registry(500, "10.0.0.2");
    let a = split(&entries(&text).unwrap(), 16 * 1024, None).unwrap();
    let b = split(&entries(&text.clone()).unwrap(), 16 * 1024, None).unwrap();
    assert_eq!(a, b);
    assert!(a.files.len() > 1);
}

#[test]
fn more_than_sixteen_shards_is_refused_with_the_way_out() {
    let text = registry(2000, "10.0.0.2");
    let err = split(&entries(&text).unwrap(), 8 * 1024, None).unwrap_err();
    assert!(
        matches!(err, SplitError::TooLarge { services: 2000, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Sidecar"), "{err}");
    // One service larger than a whole ConfigMap cannot be placed either.
    let big = line("ns", "big", &["10.0.0.1"; 400]);
    let err = split(&entries(&big).unwrap(), 1024, None).unwrap_err();
    assert!(matches!(err, SplitError::TooLarge { services: 1, .. }));
}

#[test]
fn scoping_comes_before_splitting() {
    let text = registry(2000, "10.0.0.2");
    let sidecars = [SidecarEgress::from_spec(
        "ns1",
        "default",
        &json!({"egress": [{"hosts": ["./*", "ns2/svc00002.ns2.svc.cluster.local"]}]}),
    )];
    let (scope, _) = Scope::of("ns1", "isthmus-system", &sidecars);
    let all = split(&entries(&text).unwrap(), 64 * 1024, None).unwrap();
    let entries = entries(&text).unwrap();
    let scoped = split(
        entries.iter().filter(|e| e.in_scope(&scope)),
        64 * 1024,
        None,
    )
    .unwrap();
    // 2000 services over 7 namespaces: ns1 holds 286 of them, plus the one named in ns2.
    assert_eq!(scoped.services, 287);
    assert!(scoped.files.len() < all.files.len());
    let snapshot = isthmus_config::load(&scoped.files).unwrap();
    assert!(snapshot
        .services()
        .iter()
        .all(|s| &*s.namespace == "ns1" || s.host() == "svc00002.ns2.svc.cluster.local"));
}

#[test]
fn malformed_lines_are_named() {
    let err = entries("{\"kind\":\"ServiceEntry\"}\n").unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn shard_names_round_trip() {
    let names: Vec<String> = shard_config_maps("isthmus-registry").collect();
    assert_eq!(names.len(), MAX_SHARDS);
    assert_eq!(names[0], "isthmus-registry");
    assert_eq!(names[15], "isthmus-registry-15");
    for (k, name) in names.iter().enumerate() {
        assert_eq!(shard_of("isthmus-registry", name), Some(k));
    }
    for other in [
        "isthmus-registry-16",
        "isthmus-registry-01",
        "isthmus-registry-x",
        "isthmus-config",
    ] {
        assert_eq!(shard_of("isthmus-registry", other), None, "{other}");
    }
}

#[test]
fn shard_keys_round_trip() {
    for k in 0..MAX_SHARDS {
        assert_eq!(shard_of_key(&shard_key(k)), Some(k));
    }
    for other in [
        "registry-16.json",
        "registry-01.json",
        "registry.yaml",
        "config.json",
    ] {
        assert_eq!(shard_of_key(other), None, "{other}");
    }
}

/// The injector mounts every possible shard as an optional source: a shard ConfigMap that does
/// not exist is a file that is not there, and the sidecar loads the rest.
#[test]
fn a_missing_shard_is_simply_absent() {
    let text = registry(2000, "10.0.0.2");
    let split = split(&entries(&text).unwrap(), 64 * 1024, None).unwrap();
    let without_one: Vec<SourceFile> = split
        .files
        .iter()
        .filter(|f| f.name != "registry-1.json")
        .cloned()
        .collect();
    let snapshot = isthmus_config::load(&without_one).unwrap();
    let missing = split.files[1].text.lines().count();
    assert_eq!(snapshot.services().len(), 2000 - missing);
}
