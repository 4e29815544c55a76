//! A namespace that sees 10,000 Services with 3 ready endpoints each: the registry the
//! controller computes is split into shard files that each fit a ConfigMap, materialised as the
//! kubelet lays out the projected volume, and loaded by the config crate as the sidecar loads
//! its directory — and services resolve to their endpoints. Sizes and timings are printed
//! (`--nocapture`), not asserted; docs/ARCHITECTURE.md records them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use isthmus_config::SourceFile;
use isthmus_ctl::configmap::ConfigMapDir;
use isthmus_ctl::controller::registry::registry_json;
use isthmus_ctl::controller::split::{self, MAX_SHARDS};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

const SERVICES: usize = 10_000;
const NAMESPACES: usize = 50;
/// The controller's default budget: 1 MiB less room for metadata.
const BUDGET: usize = 1024 * 1024 - 4096;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 256) as u8, (i % 256) as u8)
}

fn pod_ip(i: usize, replica: usize) -> Ipv4Addr {
    let n = i * 3 + replica;
    Ipv4Addr::new(
        10,
        1 + (n / 65536) as u8,
        (n / 256 % 256) as u8,
        (n % 256) as u8,
    )
}

/// Service `i` in the style of a Deployment's: two named ports, 3 ready pods with the usual
/// labels, owned by a ReplicaSet, with a service account.
fn cluster(count: usize) -> (Vec<Service>, Vec<EndpointSlice>, Vec<Pod>) {
    let (mut services, mut slices, mut pods) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        let ns = format!("team-{:02}", i % NAMESPACES);
        let name = format!("svc-{i:05}");
        services.push(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": vip(i).to_string(), "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "grpc-admin", "port": 9090, "targetPort": 9090},
                ]},
            }))
            .unwrap(),
        );
        let mut endpoints = Vec::new();
        for r in 0..3 {
            let pod = format!("{name}-7d9f8c6b5-{r:05}");
            endpoints.push(json!({
                "addresses": [pod_ip(i, r).to_string()],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
            }));
            pods.push(
                serde_json::from_value(json!({
                    "metadata": {"name": pod, "namespace": ns,
                        "labels": {"app": name, "version": "v1", "pod-template-hash": "7d9f8c6b5"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                            "name": format!("{name}-7d9f8c6b5"), "uid": "u", "controller": true}]},
                    "spec": {"serviceAccountName": name, "containers": []},
                }))
                .unwrap(),
            );
        }
        slices.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080}, {"name": "grpc-admin", "port": 9090}],
            }))
            .unwrap(),
        );
    }
    (services, slices, pods)
}

#[test]
fn ten_thousand_services_split_within_the_configmap_limit_and_load_in_a_sidecar() {
    let (services, slices, pods) = cluster(SERVICES);
    let started = Instant::now();
    let text = registry_json(
        &services.iter().collect::<Vec<_>>(),
        &slices.iter().collect::<Vec<_>>(),
        &pods.iter().collect::<Vec<_>>(),
    );
    let registry_time = started.elapsed();

    let started = Instant::now();
    let entries = split::entries(&text).unwrap();
    let split = split::split(&entries, BUDGET, None).unwrap();
    let split_time = started.elapsed();
    let sizes: Vec<usize> = split.files.iter().map(|f| f.text.len()).collect();
    eprintln!(
        "registry: {SERVICES} services, {} bytes, computed in {registry_time:?}; split into {} \
         shards in {split_time:?}: largest {} bytes, smallest {} (budget {BUDGET})",
        text.len(),
        sizes.len(),
        sizes.iter().max().unwrap(),
        sizes.iter().min().unwrap(),
    );
    assert!(text.len() > BUDGET, "the test must need a split");
    assert!(sizes.len() > 1 && sizes.len() <= MAX_SHARDS);
    assert!(sizes.iter().all(|s| *s <= BUDGET), "{sizes:?}");
    assert_eq!(split.services, SERVICES);

    // The projected volume as the kubelet writes it: one generation holding every source.
    let dir = std::env::temp_dir().join(format!("isthmus-registry-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let volume = ConfigMapDir::new(&dir).unwrap();
    let mut files = split.files.clone();
    files.push(SourceFile::new("config.json", ""));
    let version = volume.write(&files).unwrap();
    // The annotation the controller writes (version_of over every file of the projected
    // volume, by name) is the version the sidecar computes over its directory.
    files.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(version, isthmus_config::source::version_of(&files));

    let started = Instant::now();
    let read = SourceFile::read_dir(&dir).unwrap();
    let snapshot = isthmus_config::load(&read).unwrap();
    let load_time = started.elapsed();
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!(
        "sidecar: read and compiled {} files ({} bytes) in {load_time:?}",
        read.len(),
        read.iter().map(|f| f.text.len()).sum::<usize>()
    );
    assert_eq!(snapshot.version(), version);
    assert_eq!(snapshot.services().len(), SERVICES);
    for i in [0, 1, 4_242, SERVICES - 1] {
        let dst = SocketAddr::new(IpAddr::V4(vip(i)), 80);
        let (service, port) = snapshot.service_port(dst).unwrap();
        assert_eq!(
            service.host(),
            format!("svc-{i:05}.team-{:02}.svc.cluster.local", i % NAMESPACES)
        );
        let route = port.routes.last().unwrap();
        let mut endpoints: Vec<SocketAddr> = route.destinations[0]
            .cluster
            .endpoints
            .iter()
            .map(|e| e.addr)
            .collect();
        endpoints.sort();
        let mut expected: Vec<SocketAddr> = (0..3)
            .map(|r| SocketAddr::new(IpAddr::V4(pod_ip(i, r)), 8080))
            .collect();
        expected.sort();
        assert_eq!(endpoints, expected, "service {i}");
    }
}
