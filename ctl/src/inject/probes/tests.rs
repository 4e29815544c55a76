use serde_json::{json, Value};

use crate::inject::{inject, InjectConfig, InjectError, TemplateError, PROXY_NAME};

/// A Deployment whose one app container `web` has `probes` (merged into the container).
fn deployment(probes: Value, annotations: Value) -> Value {
    let mut web = json!({
        "name": "web",
        "image": "web:1",
        "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
    });
    for (k, v) in probes.as_object().unwrap() {
        web[k] = v.clone();
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"template": {
            "metadata": {"labels": {"app": "web"}, "annotations": annotations},
            "spec": {"containers": [web]},
        }},
    })
}

fn injected(doc: Value, config: &InjectConfig) -> (Value, Vec<String>) {
    let out = inject(vec![doc], config).expect("injects");
    (out.documents.into_iter().next().unwrap(), out.warnings)
}

fn app(doc: &Value) -> &Value {
    doc["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web")
        .unwrap()
}

fn proxy(doc: &Value) -> &Value {
    let spec = &doc["spec"]["template"]["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == PROXY_NAME)
        .expect("a sidecar")
}

fn env<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    proxy(doc)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

/// The sidecar's `ISTHMUS_KUBE_APP_PROBERS`, parsed.
fn probers(doc: &Value) -> Value {
    let text = env(doc, "ISTHMUS_KUBE_APP_PROBERS").expect("the probers variable")["value"]
        .as_str()
        .unwrap();
    serde_json::from_str(text).unwrap()
}

fn rewritten(path: &str) -> Value {
    json!({"path": path, "port": 15020, "scheme": "HTTP"})
}

fn every_kind() -> Value {
    json!({
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": "http", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
            "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 5,
        },
        "readinessProbe": {"tcpSocket": {"port": 8080}, "initialDelaySeconds": 3},
        "startupProbe": {"grpc": {"port": 9090, "service": "web"}, "failureThreshold": 30},
    })
}

#[test]
fn http_tcp_and_grpc_probes_go_through_the_sidecar_exactly() {
    let (doc, warnings) = injected(
        deployment(every_kind(), json!({})),
        &InjectConfig::default(),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let web = app(&doc);
    assert_eq!(
        web["livenessProbe"],
        json!({"httpGet": rewritten("/app-health/web/livez"),
               "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 5})
    );
    assert_eq!(
        web["readinessProbe"],
        json!({"httpGet": rewritten("/app-health/web/readyz"), "initialDelaySeconds": 3})
    );
    assert_eq!(
        web["startupProbe"],
        json!({"httpGet": rewritten("/app-health/web/startupz"), "failureThreshold": 30})
    );
    // The originals, named port resolved (its name kept to restore it), timeout carried.
    assert_eq!(
        probers(&doc),
        json!({
            "/app-health/web/livez": {
                "httpGet": {"path": "/live", "port": 8080, "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                "portName": "http", "timeoutSeconds": 2,
            },
            "/app-health/web/readyz": {"tcpSocket": {"port": 8080}},
            "/app-health/web/startupz": {"grpc": {"port": 9090, "service": "web"}},
        })
    );
    // Sent to the pod's IP, as the kubelet would.
    assert_eq!(
        env(&doc, "POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
}

#[test]
fn reinjection_neither_rewrites_twice_nor_loses_the_originals() {
    for config in [
        InjectConfig::default(),
        InjectConfig {
            native_sidecar: false,
            ..InjectConfig::default()
        },
    ] {
        let (once, _) = injected(deployment(every_kind(), json!({})), &config);
        let (twice, warnings) = injected(once.clone(), &config);
        assert_eq!(once, twice, "native {}", config.native_sidecar);
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}

#[test]
fn opting_out_leaves_probes_alone_and_restores_rewritten_ones_exactly() {
    let original = deployment(every_kind(), json!({}));
    let opted_out = json!({"sidecar.istio.io/rewriteAppHTTPProbers": "false"});
    let (doc, warnings) = injected(
        deployment(every_kind(), opted_out.clone()),
        &InjectConfig::default(),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(app(&doc), app(&original));
    assert!(env(&doc, "ISTHMUS_KUBE_APP_PROBERS").is_none());
    assert!(env(&doc, "POD_IP").is_none());

    // Injected with rewriting, then the annotation turns it off: the pod's own probes are back,
    // named port and all.
    let (mut doc, _) = injected(original.clone(), &InjectConfig::default());
    doc["spec"]["template"]["metadata"]["annotations"] = opted_out;
    let (doc, _) = injected(doc, &InjectConfig::default());
    assert_eq!(app(&doc), app(&original));
    assert!(env(&doc, "ISTHMUS_KUBE_APP_PROBERS").is_none());

    let bad = json!({"sidecar.istio.io/rewriteAppHTTPProbers": "maybe"});
    match inject(
        vec![deployment(every_kind(), bad)],
        &InjectConfig::default(),
    ) {
        Err(InjectError::Document { reason, .. }) => assert!(
            matches!(*reason, TemplateError::BadAnnotation { ref annotation, .. } if annotation == "sidecar.istio.io/rewriteAppHTTPProbers"),
            "{reason}"
        ),
        other => panic!("expected a bad annotation, got {other:?}"),
    }
}

#[test]
fn probes_the_sidecar_cannot_run_are_left_with_a_warning() {
    let probes = json!({
        "livenessProbe": {"httpGet": {"path": "/", "port": 8443, "scheme": "HTTPS"}},
        "readinessProbe": {"httpGet": {"path": "/", "port": "metrics"}},
        "startupProbe": {"tcpSocket": {"port": 5432, "host": "10.0.0.9"}},
    });
    let (doc, warnings) = injected(
        deployment(probes.clone(), json!({})),
        &InjectConfig::default(),
    );
    let web = app(&doc);
    for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(web[field], probes[field], "{field}");
    }
    assert!(env(&doc, "ISTHMUS_KUBE_APP_PROBERS").is_none());
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].contains("livenessProbe") && warnings[0].contains("scheme HTTPS"));
    assert!(warnings[1].contains("no container port is named \"metrics\""));
    assert!(warnings[2].contains("names a host"));
    assert!(warnings.iter().all(|w| w.contains("STRICT")));
}

/// Found in review: an httpGet the sidecar cannot send (a path with a space, which the kubelet
/// URL-escapes; a header name that is not a token) was handed to it and made it exit. Such a
/// probe is now left to the kubelet, with a warning, and the others are still rewritten.
#[test]
fn http_probes_the_sidecar_cannot_send_are_left_to_the_kubelet_with_a_warning() {
    let probes = json!({
        "livenessProbe": {"httpGet": {"path": "/health check", "port": 8080}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080,
                           "httpHeaders": [{"name": "Bad Name", "value": "v"}]}},
        "startupProbe": {"httpGet": {"path": "/started", "port": 8080}},
    });
    let (doc, warnings) = injected(
        deployment(probes.clone(), json!({})),
        &InjectConfig::default(),
    );
    let web = app(&doc);
    assert_eq!(web["livenessProbe"], probes["livenessProbe"]);
    assert_eq!(web["readinessProbe"], probes["readinessProbe"]);
    assert_eq!(
        web["startupProbe"]["httpGet"],
        rewritten("/app-health/web/startupz")
    );
    let entries = probers(&doc);
    let entries = entries.as_object().unwrap();
    assert_eq!(
        entries.keys().collect::<Vec<_>>(),
        ["/app-health/web/startupz"]
    );
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("livenessProbe") && warnings[0].contains("spaces"));
    assert!(warnings[1].contains("readinessProbe") && warnings[1].contains("not an HTTP token"));
}

#[test]
fn exec_probes_and_the_sidecars_own_probes_are_not_touched() {
    let probes = json!({"livenessProbe": {"exec": {"command": ["true"]}}});
    let (doc, warnings) = injected(
        deployment(probes.clone(), json!({})),
        &InjectConfig::default(),
    );
    assert!(warnings.is_empty());
    assert_eq!(app(&doc)["livenessProbe"], probes["livenessProbe"]);
    assert!(env(&doc, "ISTHMUS_KUBE_APP_PROBERS").is_none());
    assert_eq!(
        proxy(&doc)["readinessProbe"]["httpGet"]["path"],
        "/healthz/ready"
    );
}

#[test]
fn the_classic_sidecar_holds_the_app_until_it_is_ready() {
    let classic = InjectConfig {
        native_sidecar: false,
        ..InjectConfig::default()
    };
    let (doc, _) = injected(deployment(json!({}), json!({})), &classic);
    assert_eq!(
        doc["spec"]["template"]["spec"]["containers"][0]["name"],
        PROXY_NAME
    );
    assert_eq!(
        proxy(&doc)["lifecycle"],
        json!({"postStart": {"exec": {"command":
            ["/usr/local/bin/isthmus-proxy", "wait", "--timeout-secs", "60"]}}})
    );
    // A native sidecar needs no hook: its startup probe holds the app.
    let (doc, _) = injected(deployment(json!({}), json!({})), &InjectConfig::default());
    assert!(proxy(&doc).get("lifecycle").is_none());
}
