use serde_json::json;

use super::*;

fn service(value: serde_json::Value) -> Service {
    serde_json::from_value(value).unwrap()
}

fn web() -> Service {
    service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"], "ports": [
            {"name": "http-api", "port": 80, "targetPort": "api"},
            {"port": 5432, "appProtocol": "kubernetes.io/h2c"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]},
    }))
}

fn pod(name: &str, owner: Option<(&str, &str)>, labels: serde_json::Value) -> Pod {
    let owners: Vec<_> = owner
        .into_iter()
        .map(|(kind, name)| {
            json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": labels, "ownerReferences": owners},
        "spec": {"serviceAccountName": "web-sa", "containers": []},
    }))
    .unwrap()
}

fn entries(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn workload_names_follow_istio() {
    let rs = pod(
        "web-7d9f-x",
        Some(("ReplicaSet", "web-7d9f")),
        json!({"pod-template-hash": "7d9f"}),
    );
    assert_eq!(workload_name(&rs), "web");
    let cron = pod(
        "report-28912345-q",
        Some(("Job", "report-28912345")),
        json!({}),
    );
    assert_eq!(workload_name(&cron), "report");
    let job = pod("migrate-2-q", Some(("Job", "migrate-2")), json!({}));
    assert_eq!(workload_name(&job), "migrate-2");
    let sts = pod("db-0", Some(("StatefulSet", "db")), json!({}));
    assert_eq!(workload_name(&sts), "db");
    assert_eq!(workload_name(&pod("bare", None, json!({}))), "bare");
}

#[test]
fn ports_addresses_and_protocols() {
    let web = web();
    let text = registry_json(&[&web], &[], &[]);
    let e = &entries(&text)[0];
    assert_eq!(e["spec"]["hosts"], json!(["web.shop.svc.cluster.local"]));
    assert_eq!(e["spec"]["addresses"], json!(["10.96.0.10", "fd00::10"]));
    assert_eq!(
        e["spec"]["ports"],
        json!([
            {"number": 80, "name": "http-api", "protocol": "HTTP"},
            {"number": 5432, "name": "port-5432", "protocol": "HTTP2"},
        ]),
        "UDP ports are not in the registry"
    );
    assert_eq!(e["spec"]["resolution"], "STATIC");
    assert_eq!(e["spec"]["endpoints"], json!([]));
}

#[test]
fn ready_endpoints_with_pod_labels_and_named_target_ports() {
    let web = web();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http-api", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.1.0.2"], "targetRef": {"kind": "Pod", "name": "web-7d9f-x"}},
            {"addresses": ["10.1.0.1"], "conditions": {"ready": false}},
            {"addresses": ["10.1.0.3"], "conditions": {"ready": true}},
        ],
    }))
    .unwrap();
    let other: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "db-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.9.9"]}],
    }))
    .unwrap();
    let pod = pod(
        "web-7d9f-x",
        Some(("ReplicaSet", "web-7d9f")),
        json!({"app": "web", "pod-template-hash": "7d9f"}),
    );
    let text = registry_json(&[&web], &[&other, &slice], &[&pod]);
    let e = &entries(&text)[0];
    assert_eq!(
        e["spec"]["endpoints"],
        json!([
            {"address": "10.1.0.2", "ports": {"http-api": 8080}, "serviceAccount": "web-sa",
             "labels": {"app": "web", "pod-template-hash": "7d9f", "isthmus.io/workload": "web"}},
            {"address": "10.1.0.3", "ports": {"http-api": 8080}},
        ]),
        "ready (or unset) only, sorted, the pod's labels and account where the pod is known"
    );
}

#[test]
fn output_is_sorted_and_external_names_resolve_by_dns() {
    let a = service(
        json!({"metadata": {"name": "a", "namespace": "z"}, "spec": {"clusterIP": "None"}}),
    );
    let b = service(json!({"metadata": {"name": "b", "namespace": "y"}, "spec": {}}));
    let ext = service(json!({"metadata": {"name": "ext", "namespace": "y"},
                             "spec": {"type": "ExternalName", "externalName": "example.com",
                                      "ports": [{"name": "https", "port": 443}]}}));
    let one = registry_json(&[&a, &b, &ext], &[], &[]);
    let two = registry_json(&[&ext, &b, &a], &[], &[]);
    assert_eq!(one, two, "the same inputs in any order give the same bytes");
    let names: Vec<_> = entries(&one)
        .iter()
        .map(|e| e["spec"]["hosts"][0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "b.y.svc.cluster.local",
            "ext.y.svc.cluster.local",
            "a.z.svc.cluster.local"
        ]
    );
    assert_eq!(entries(&one)[2]["spec"]["addresses"], json!([]), "headless");
    let ext = &entries(&one)[1]["spec"];
    assert_eq!(ext["resolution"], "DNS");
    assert_eq!(ext["location"], "MESH_EXTERNAL");
    assert_eq!(ext["endpoints"], json!([{"address": "example.com"}]));
    assert_eq!(
        ext["ports"],
        json!([{"number": 443, "name": "https", "protocol": "HTTPS"}])
    );
    // What the sidecar loads: the external name is an endpoint to resolve.
    let snapshot =
        isthmus_config::load(&[isthmus_config::SourceFile::new("registry.json", one)]).unwrap();
    assert_eq!(snapshot.services().len(), 3);
}

#[test]
fn the_export_to_annotation_limits_which_registries_hold_a_service() {
    let svc = |name: &str, export_to: Option<&str>| {
        let mut annotations = serde_json::Map::new();
        if let Some(e) = export_to {
            annotations.insert(EXPORT_TO_ANNOTATION.into(), json!(e));
        }
        service(
            json!({"metadata": {"name": name, "namespace": "shop", "annotations": annotations},
                       "spec": {"clusterIP": "None"}}),
        )
    };
    let (all, own, client, none) = (
        svc("all", None),
        svc("own", Some(".")),
        svc("client", Some(" client , .")),
        svc("none", Some("~")),
    );
    let registry = registry_entries(&[&all, &own, &client, &none], &[], &[]);
    let names = |ns: &str| -> Vec<String> {
        entries(&registry_for(&registry, ns))
            .iter()
            .map(|e| e["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names("shop"), ["all", "client", "own"]);
    assert_eq!(names("client"), ["all", "client"]);
    assert_eq!(names("other"), ["all"]);
    assert_eq!(
        registry_for(&registry, "shop") + &registry_for(&registry, "x"),
        registry_json(&[&all, &own, &client], &[], &[]) + &registry_json(&[&all], &[], &[]),
        "the per-namespace registry is the whole one filtered"
    );
}

/// Found in review: kube-dns serves 53 over UDP and TCP. Both were listed as port 53, a
/// ServiceEntry the sidecar rejects — and kube-dns is in every namespace's registry, so every
/// sidecar in the cluster rejected its whole config and never became ready. Only TCP ports are
/// written; a Service with no TCP port is left out.
#[test]
fn kube_dns_loads_in_a_sidecar_its_udp_ports_left_out() {
    let dns = service(json!({
        "metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
        ]},
    }));
    let syslog = service(json!({
        "metadata": {"name": "syslog", "namespace": "kube-system"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "syslog", "port": 514, "protocol": "UDP"}]},
    }));
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "kube-dns-1", "namespace": "kube-system",
                     "labels": {"kubernetes.io/service-name": "kube-dns"}},
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                  {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                  {"name": "metrics", "port": 9153, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.0.5"]}],
    }))
    .unwrap();
    let text = registry_json(&[&dns, &syslog], &[&slice], &[]);
    let entries = entries(&text);
    assert_eq!(entries.len(), 1, "a UDP-only Service is left out: {text}");
    let e = &entries[0];
    assert_eq!(
        e["spec"]["ports"],
        json!([
            {"number": 53, "name": "dns-tcp", "targetPort": 53},
            {"number": 9153, "name": "metrics", "targetPort": 9153},
        ])
    );
    assert_eq!(
        e["spec"]["endpoints"],
        json!([{"address": "10.1.0.5", "ports": {"dns-tcp": 53, "metrics": 9153}}])
    );
    let snapshot = isthmus_config::load(&[isthmus_config::SourceFile::new(
        crate::controller::REGISTRY_KEY,
        text,
    )]);
    assert!(snapshot.is_ok(), "a sidecar loads it: {snapshot:?}");
}

/// An ExternalName Service on 53 over TCP and UDP (an external DNS server) is a valid Service:
/// its entry keeps the TCP port only and loads.
#[test]
fn an_external_name_on_tcp_and_udp_keeps_its_tcp_port_and_loads() {
    let dns = service(json!({
        "metadata": {"name": "legacy-dns", "namespace": "data"},
        "spec": {"type": "ExternalName", "externalName": "dns.example.com", "ports": [
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "dns-udp", "port": 53, "protocol": "UDP"}]},
    }));
    let text = registry_json(&[&dns], &[], &[]);
    assert_eq!(
        entries(&text)[0]["spec"]["ports"],
        json!([{"number": 53, "name": "dns-tcp"}])
    );
    let snapshot = isthmus_config::load(&[isthmus_config::SourceFile::new(
        crate::controller::REGISTRY_KEY,
        text,
    )]);
    assert!(snapshot.is_ok(), "{snapshot:?}");
}
