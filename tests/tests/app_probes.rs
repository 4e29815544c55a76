//! The kubelet's probes of a meshed app, end to end: the injector rewrites a pod's probes, the
//! sidecar is given what the injector gave it, the "kubelet" (an unmeshed pod: no mesh
//! certificate, no capture of its own) sends each rewritten probe to the pod IP's :15020, which
//! inbound capture leaves alone, and the sidecar runs the app's original probe against the app.
//! Skipped, with the reason, without root (the netns harness).

use std::net::IpAddr;
use std::time::Duration;

use isthmus_ctl::inject::{inject, InjectConfig, PROBERS_ENV};
use isthmus_ctl::local::{Mesh, MeshSpec, PodSpec, ECHO_PORT, HTTP_PORT};
use isthmus_tests::http::{app_stats, Curl};
use isthmus_tests::{metric_sum, prerequisites};
use serde_json::json;

/// What the kubelet gets for `GET http://ip:port/path`; 0 when nothing answered.
fn kubelet_get(mesh: &Mesh, ip: IpAddr, port: u16, path: &str) -> u16 {
    Curl::new(format!("http://{ip}:{port}{path}"))
        .max_time(Duration::from_secs(5))
        .run(mesh.pod("kubelet"))
        .map_or(0, |r| r.status)
}

#[test]
fn the_kubelet_reaches_the_apps_probes_through_the_sidecar_while_inbound_capture_is_on() {
    if !prerequisites() {
        return;
    }
    // The injector's output for a pod whose app probes name ports as the app serves them here.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": {"containers": [
        {"name": "web", "image": "web", "ports": [{"name": "http", "containerPort": HTTP_PORT}],
         "readinessProbe": {"httpGet": {"path": "/status/200", "port": "http"}},
         "livenessProbe": {"httpGet": {"path": "/status/503", "port": HTTP_PORT}, "timeoutSeconds": 2},
         "startupProbe": {"tcpSocket": {"port": ECHO_PORT}}},
        {"name": "gone", "image": "gone", "livenessProbe": {"tcpSocket": {"port": 9999}}},
    ]}});
    let injected = inject(vec![pod], &InjectConfig::default())
        .unwrap()
        .documents
        .remove(0);
    let spec = &injected["spec"];
    let proxy = &spec["initContainers"][1];
    let probers = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == PROBERS_ENV)
        .expect("the probes were rewritten")["value"]
        .as_str()
        .unwrap()
        .to_string();
    // Where the kubelet now sends each probe.
    let probe = |container: usize, field: &str| {
        let get = &spec["containers"][container][field]["httpGet"];
        (
            get["port"].as_u64().unwrap() as u16,
            get["path"].as_str().unwrap().to_string(),
        )
    };

    let mut mesh_spec = MeshSpec::new(
        &["web"],
        vec![
            PodSpec::meshed("web", Some("web"), "v1"),
            PodSpec::unmeshed("kubelet"),
        ],
    );
    mesh_spec.proxy_args = vec!["--app-probers".into(), probers];
    let mesh = Mesh::start(mesh_spec).unwrap_or_else(|e| panic!("mesh did not start: {e}"));
    let pod = mesh.pod("web");
    let ip = pod.ip(false);
    let reached = || {
        app_stats(pod, &format!("http://127.0.0.1:{HTTP_PORT}"))
            .unwrap()
            .prefix("/status")
    };
    let inbound = || {
        metric_sum(
            &pod.metrics().unwrap(),
            "istio_requests_total",
            &[("reporter", "destination")],
        )
    };

    // Inbound capture is on: the kubelet's request to the app's own port is the sidecar's.
    let (app_before, inbound_before) = (reached(), inbound());
    assert_eq!(kubelet_get(&mesh, ip, HTTP_PORT, "/status/200"), 200);
    assert_eq!(inbound(), inbound_before + 1.0);
    assert_eq!(reached(), app_before + 1);

    // The rewritten probes: the app's verdicts, not through inbound capture.
    let (app_before, inbound_before) = (reached(), inbound());
    let kubelet = |(port, path): (u16, String)| kubelet_get(&mesh, ip, port, &path);
    assert_eq!(kubelet(probe(0, "readinessProbe")), 200);
    assert_eq!(kubelet(probe(0, "livenessProbe")), 503);
    assert_eq!(
        reached(),
        app_before + 2,
        "both HTTP probes reached the app"
    );
    assert_eq!(
        inbound(),
        inbound_before,
        "and none went through inbound capture"
    );
    assert_eq!(kubelet(probe(0, "startupProbe")), 200);
    // Nothing listens on the port this tcpSocket probe names: it fails, where the kubelet's own
    // connect would have been accepted by the capture listener.
    assert_eq!(kubelet(probe(1, "livenessProbe")), 503);
    assert_eq!(kubelet_get(&mesh, ip, 15020, "/app-health/nope/livez"), 404);
}
