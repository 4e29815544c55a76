use serde_json::json;

use super::*;

/// A minimal object of `kind` whose pod template (at the kind's pointer) has one app container.
fn workload(api_version: &str, kind: &str) -> Value {
    let template = json!({
        "metadata": {"labels": {"app": "web", "version": "v1"}},
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
    });
    let mut doc = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "web"}});
    match template_pointer(api_version, kind) {
        Some("") => {
            doc["metadata"]["labels"] = template["metadata"]["labels"].clone();
            doc["spec"] = template["spec"].clone();
        }
        Some("/spec/template") => doc["spec"] = json!({"template": template}),
        Some(_) => doc["spec"] = json!({"jobTemplate": {"spec": {"template": template}}}),
        None => unreachable!("{kind} has no template"),
    }
    doc
}

const KINDS: [(&str, &str, &str); 8] = [
    ("v1", "Pod", ""),
    ("apps/v1", "Deployment", "/spec/template"),
    ("apps/v1", "StatefulSet", "/spec/template"),
    ("apps/v1", "DaemonSet", "/spec/template"),
    ("apps/v1", "ReplicaSet", "/spec/template"),
    ("batch/v1", "Job", "/spec/template"),
    ("batch/v1", "CronJob", "/spec/jobTemplate/spec/template"),
    ("v1", "ReplicationController", "/spec/template"),
];

fn one(doc: Value, config: &InjectConfig) -> (Value, Vec<String>) {
    let out = inject(vec![doc], config).expect("injects");
    (out.documents.into_iter().next().unwrap(), out.warnings)
}

fn classic() -> InjectConfig {
    InjectConfig {
        native_sidecar: false,
        ..InjectConfig::default()
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn env<'a>(proxy: &'a Value, name: &str) -> Option<&'a Value> {
    proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

/// The init container's args after the uid/gid pair.
fn capture_args(template: &Value) -> Vec<String> {
    let init = container(&template["spec"]["initContainers"], INIT_NAME);
    init["args"].as_array().unwrap()[2..]
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn with_annotations(pairs: &[(&str, &str)]) -> Value {
    let mut doc = workload("v1", "Pod");
    for (k, v) in pairs {
        doc["metadata"]["annotations"][*k] = json!(v);
    }
    doc
}

fn template_error(doc: Value) -> TemplateError {
    match inject(vec![doc], &InjectConfig::default()) {
        Err(InjectError::Document { reason, .. }) => *reason,
        other => panic!("expected a document error, got {other:?}"),
    }
}

#[test]
fn every_workload_kind_has_its_pod_template_injected() {
    for (api_version, kind, pointer) in KINDS {
        for config in [InjectConfig::default(), classic()] {
            let (doc, warnings) = one(workload(api_version, kind), &config);
            assert!(warnings.is_empty(), "{kind}: {warnings:?}");
            let t = doc.pointer(pointer).unwrap();
            let spec = &t["spec"];
            if config.native_sidecar {
                assert_eq!(
                    names(&spec["initContainers"]),
                    [INIT_NAME, PROXY_NAME],
                    "{kind}"
                );
                assert_eq!(names(&spec["containers"]), ["web"], "{kind}");
            } else {
                assert_eq!(names(&spec["initContainers"]), [INIT_NAME], "{kind}");
                assert_eq!(names(&spec["containers"]), [PROXY_NAME, "web"], "{kind}");
            }
            assert_eq!(
                names(&spec["volumes"]),
                [CONFIG_VOLUME, TOKEN_VOLUME],
                "{kind}"
            );
            assert!(t["metadata"]["annotations"][STATUS_ANNOTATION].is_string());
            let list = if config.native_sidecar {
                &spec["initContainers"]
            } else {
                &spec["containers"]
            };
            let workload = env(container(list, PROXY_NAME), "ISTHMUS_WORKLOAD").unwrap();
            if kind == "Pod" {
                assert_eq!(
                    workload["valueFrom"]["fieldRef"]["fieldPath"],
                    "metadata.name"
                );
            } else {
                assert_eq!(workload["value"], "web", "{kind}");
            }
        }
    }
}

#[test]
fn other_kinds_pass_through_unchanged() {
    let docs = vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}),
        // Same kind name, another API group: not a Kubernetes Deployment.
        json!({"apiVersion": "example.com/v1", "kind": "Deployment", "spec": {"template": {"spec": {}}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "spec": {"hosts": ["web"]}}),
        json!({"just": "data"}),
    ];
    let out = inject(docs.clone(), &InjectConfig::default()).unwrap();
    assert_eq!(out.documents, docs);
    assert!(out.warnings.is_empty());
}

#[test]
fn injecting_an_injected_object_changes_nothing() {
    let annotated = |mut doc: Value, pointer: &str| {
        let t = doc.pointer_mut(pointer).unwrap();
        t["metadata"]["annotations"] = json!({
            "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
            "sidecar.istio.io/proxyCPU": "200m",
        });
        t["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
        t["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        doc
    };
    for (api_version, kind, pointer) in KINDS {
        for config in [InjectConfig::default(), classic()] {
            let input = annotated(workload(api_version, kind), pointer);
            let (once, _) = one(input, &config);
            let (twice, _) = one(once.clone(), &config);
            assert_eq!(once, twice, "{kind}, native {}", config.native_sidecar);
        }
    }
    // Re-injecting with the other mode gives what that mode gives from scratch.
    let (native, _) = one(workload("apps/v1", "Deployment"), &InjectConfig::default());
    let (switched, _) = one(native, &classic());
    let (fresh, _) = one(workload("apps/v1", "Deployment"), &classic());
    assert_eq!(switched, fresh);
}

#[test]
fn the_native_sidecar_exactly() {
    let (doc, _) = one(workload("apps/v1", "Deployment"), &InjectConfig::default());
    let spec = &doc["spec"]["template"]["spec"];
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": period, "timeoutSeconds": 3, "failureThreshold": failures,
        })
    };
    assert_eq!(
        spec["initContainers"][1],
        json!({
            "name": "isthmus-proxy",
            "image": "isthmus/proxy:dev",
            "restartPolicy": "Always",
            "env": [
                {"name": "POD_NAME", "valueFrom": field("metadata.name")},
                {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
                {"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
                {"name": "ISTHMUS_WORKLOAD", "value": "web"},
                {"name": "ISTHMUS_APP", "valueFrom": field("metadata.labels['app']")},
                {"name": "ISTHMUS_APP_VERSION", "valueFrom": field("metadata.labels['version']")},
                {"name": "ISTHMUS_CONFIG_DIR", "value": "/etc/isthmus/config"},
                {"name": "ISTHMUS_CA_ADDRESS", "value": "isthmus-controller.isthmus-system.svc:15012"},
            ],
            "ports": [{"name": "isthmus-stats", "containerPort": 15020, "protocol": "TCP"}],
            "startupProbe": probe(1, 600),
            "readinessProbe": probe(15, 4),
            "resources": {
                "requests": {"cpu": "50m", "memory": "32Mi"},
                "limits": {"cpu": "2", "memory": "256Mi"},
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "privileged": false,
                "readOnlyRootFilesystem": true,
                "runAsGroup": 1337,
                "runAsNonRoot": true,
                "runAsUser": 1337,
            },
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [
                {"name": "isthmus-config", "mountPath": "/etc/isthmus/config", "readOnly": true},
                {"name": "isthmus-token", "mountPath": "/var/run/secrets/isthmus/tokens", "readOnly": true},
            ],
        })
    );
    assert_eq!(
        spec["initContainers"][0],
        json!({
            "name": "isthmus-init",
            "image": "isthmus/init:dev",
            "args": ["--proxy-uid=1337", "--proxy-gid=1337"],
            "resources": {
                "requests": {"cpu": "10m", "memory": "16Mi"},
                "limits": {"cpu": "100m", "memory": "64Mi"},
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "privileged": false,
                "readOnlyRootFilesystem": false,
                "runAsGroup": 0,
                "runAsNonRoot": false,
                "runAsUser": 0,
            },
            "terminationMessagePolicy": "FallbackToLogsOnError",
        })
    );
    // Routing and the registry's 16 possible shards in one directory, each optional.
    let mut config_sources =
        vec![json!({"configMap": {"name": "isthmus-config", "optional": true}})];
    config_sources.push(json!({"configMap": {"name": "isthmus-registry", "optional": true}}));
    for k in 1..16 {
        config_sources.push(
            json!({"configMap": {"name": format!("isthmus-registry-{k}"), "optional": true}}),
        );
    }
    assert_eq!(
        spec["volumes"],
        json!([
            {"name": "isthmus-config", "projected": {"sources": config_sources}},
            {"name": "isthmus-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "isthmus-ca", "expirationSeconds": 43200, "path": "token"}}]}},
        ])
    );
    assert!(!doc.to_string().contains("subPath"));
    let annotations = &doc["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "web"
    );
}

#[test]
fn classic_mode_puts_the_sidecar_first_and_warns_about_app_init_containers() {
    let mut doc = workload("apps/v1", "Deployment");
    doc["spec"]["template"]["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
    let (doc, warnings) = one(doc, &classic());
    let spec = &doc["spec"]["template"]["spec"];
    assert_eq!(names(&spec["initContainers"]), [INIT_NAME, "migrate"]);
    let proxy = &spec["containers"][0];
    assert_eq!(proxy["name"], PROXY_NAME);
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15021);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("migrate") && warnings[0].contains("native sidecars"));
    // `kubectl logs` still defaults to the app.
    assert_eq!(
        doc["spec"]["template"]["metadata"]["annotations"]
            ["kubectl.kubernetes.io/default-container"],
        "web"
    );
    // Native mode: app init containers run after the sidecar is ready, no warning.
    let mut doc = workload("apps/v1", "Deployment");
    doc["spec"]["template"]["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
    let (doc, warnings) = one(doc, &InjectConfig::default());
    assert!(warnings.is_empty());
    assert_eq!(
        names(&doc["spec"]["template"]["spec"]["initContainers"]),
        [INIT_NAME, PROXY_NAME, "migrate"]
    );
}

#[test]
fn traffic_annotations_become_isthmus_init_flags() {
    let cases: [(&str, &str, &str); 6] = [
        (
            "traffic.sidecar.istio.io/includeInboundPorts",
            "*",
            "--inbound-ports=*",
        ),
        (
            "traffic.sidecar.istio.io/includeInboundPorts",
            "9080, 8080,8080",
            "--inbound-ports=8080,9080",
        ),
        (
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "3306",
            "--exclude-inbound-ports=3306",
        ),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.96.0.0/12,10.1.2.3/8",
            "--outbound-ip-ranges=10.96.0.0/12,10.0.0.0/8",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "169.254.169.254/32, fd00::/8",
            "--exclude-outbound-ip-ranges=169.254.169.254/32,fd00::/8",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "5432,6379",
            "--exclude-outbound-ports=5432,6379",
        ),
    ];
    for (annotation, value, flag) in cases {
        let (doc, warnings) = one(
            with_annotations(&[(annotation, value)]),
            &InjectConfig::default(),
        );
        assert!(warnings.is_empty());
        assert_eq!(capture_args(&doc), [flag], "{annotation}={value}");
    }
    // The annotations are kept on the pod, as Istio keeps them.
    let (doc, _) = one(
        with_annotations(&[("traffic.sidecar.istio.io/excludeOutboundPorts", "5432")]),
        &InjectConfig::default(),
    );
    assert_eq!(
        doc["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"],
        "5432"
    );
}

#[test]
fn bad_or_unsupported_annotations_fail_with_the_annotation_named() {
    let e = template_error(with_annotations(&[(
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "5432,http",
    )]));
    assert!(
        matches!(&e, TemplateError::BadAnnotation { annotation, .. }
        if annotation == "traffic.sidecar.istio.io/excludeOutboundPorts"),
        "{e}"
    );
    assert!(e.to_string().contains("\"http\""), "{e}");
    let e = template_error(with_annotations(&[(
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "10.0.0.0/33",
    )]));
    assert!(e.to_string().contains("prefix length 33"), "{e}");
    for unsupported in [
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInterfaces",
        "traffic.sidecar.istio.io/kubevirtInterfaces",
    ] {
        let e = template_error(with_annotations(&[(unsupported, "x")]));
        assert!(
            matches!(&e, TemplateError::Unsupported { annotation, .. } if annotation == unsupported)
        );
    }
    let e = template_error(with_annotations(&[(
        "sidecar.istio.io/interceptionMode",
        "TPROXY",
    )]));
    assert!(e.to_string().contains("REDIRECT only"), "{e}");
    let e = template_error(with_annotations(&[("sidecar.istio.io/status", "{}")]));
    assert_eq!(e, TemplateError::InjectedByIstio);
    let e = template_error(with_annotations(&[("sidecar.istio.io/proxyCPU", "lots")]));
    assert!(e.to_string().contains("sidecar.istio.io/proxyCPU"), "{e}");
    // The error names the document.
    let err = inject(
        vec![
            json!({"kind": "Service"}),
            with_annotations(&[("sidecar.istio.io/inject", "maybe")]),
        ],
        &InjectConfig::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("document 2 (Pod web): "),
        "{err}"
    );
}

#[test]
fn other_istio_annotations_are_ignored_with_a_warning() {
    let (doc, warnings) = one(
        with_annotations(&[
            ("sidecar.istio.io/logLevel", "debug"),
            ("proxy.istio.io/config", "{}"),
            ("sidecar.istio.io/interceptionMode", "REDIRECT"),
            ("example.com/mine", "x"),
        ]),
        &InjectConfig::default(),
    );
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings
        .iter()
        .any(|w| w.contains("sidecar.istio.io/logLevel is ignored")));
    assert!(warnings[0].starts_with("document 1 (Pod web): "));
    assert!(doc["spec"]["initContainers"].is_array());
}

#[test]
fn resource_and_image_annotations_override_the_config() {
    let (doc, _) = one(
        with_annotations(&[
            ("sidecar.istio.io/proxyCPU", "200m"),
            ("sidecar.istio.io/proxyMemory", "64Mi"),
            ("sidecar.istio.io/proxyCPULimit", "1"),
            ("sidecar.istio.io/proxyMemoryLimit", "1Gi"),
            ("sidecar.istio.io/proxyImage", "registry.local/proxy:dev"),
        ]),
        &InjectConfig::default(),
    );
    let proxy = container(&doc["spec"]["initContainers"], PROXY_NAME);
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "200m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
    );
    assert_eq!(proxy["image"], "registry.local/proxy:dev");
    // Limits left unset in the config are left out.
    let config = InjectConfig {
        proxy_resources: Resources::default(),
        ..InjectConfig::default()
    };
    let (doc, _) = one(
        with_annotations(&[("sidecar.istio.io/proxyCPU", "1")]),
        &config,
    );
    let proxy = container(&doc["spec"]["initContainers"], PROXY_NAME);
    assert_eq!(proxy["resources"], json!({"requests": {"cpu": "1"}}));
}

#[test]
fn quantities() {
    for ok in [
        "1", "100m", "0.5", "1.5Gi", "64Mi", "1e3", "2E-2", "500k", "10n",
    ] {
        assert!(annotations::is_quantity(ok), "{ok}");
    }
    for bad in ["", "m", "-1", "1.2.3", "1mi", "1 Gi", "lots", "1e", "0x10"] {
        assert!(!annotations::is_quantity(bad), "{bad}");
    }
}

#[test]
fn inject_false_and_host_network_pods_are_left_alone() {
    let skipped = [
        with_annotations(&[("sidecar.istio.io/inject", "false")]),
        with_annotations(&[("sidecar.istio.io/inject", "False")]),
        {
            let mut d = workload("v1", "Pod");
            d["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
            d
        },
        {
            let mut d = workload("apps/v1", "Deployment");
            d["spec"]["template"]["metadata"]["annotations"] =
                json!({"sidecar.istio.io/inject": false});
            d
        },
        {
            let mut d = workload("v1", "Pod");
            d["spec"]["hostNetwork"] = json!(true);
            d
        },
    ];
    for doc in skipped {
        let (out, warnings) = one(doc.clone(), &InjectConfig::default());
        assert_eq!(out, doc);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("not injected"), "{warnings:?}");
    }
    let (out, _) = one(
        with_annotations(&[("sidecar.istio.io/inject", "true")]),
        &InjectConfig::default(),
    );
    assert!(out["spec"]["initContainers"].is_array());
}

#[test]
fn user_scrape_annotations_are_kept_with_a_warning() {
    let (doc, warnings) = one(
        with_annotations(&[
            ("prometheus.io/port", "9090"),
            ("prometheus.io/scrape", "true"),
        ]),
        &InjectConfig::default(),
    );
    let a = &doc["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/port"], "9090");
    assert_eq!(a["prometheus.io/path"], "/stats/prometheus");
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("prometheus.io/port=\"9090\" is kept"));
}

#[test]
fn config_overrides_and_validation() {
    let config: InjectConfig = serde_saphyr::from_str(
        "hub: registry.local/mesh\ntag: abc123\nimagePullPolicy: Never\nconfigMap: mesh\ncluster: east\nnativeSidecar: false\nproxyResources:\n  limits: {memory: 128Mi}\n",
    )
    .unwrap();
    assert_eq!(config.proxy_image(), "registry.local/mesh/proxy:abc123");
    assert_eq!(config.init_image(), "registry.local/mesh/init:abc123");
    let (doc, _) = one(workload("v1", "Pod"), &config);
    let proxy = container(&doc["spec"]["containers"], PROXY_NAME);
    assert_eq!(proxy["imagePullPolicy"], "Never");
    assert_eq!(proxy["resources"], json!({"limits": {"memory": "128Mi"}}));
    assert_eq!(env(proxy, "ISTHMUS_CLUSTER").unwrap()["value"], "east");
    assert_eq!(
        doc["spec"]["volumes"][0]["projected"]["sources"][0]["configMap"]["name"],
        "mesh"
    );
    assert!(serde_saphyr::from_str::<InjectConfig>("hubb: x\n").is_err());
    let bad = InjectConfig {
        init_resources: Resources::new(("1", "lots"), ("1", "1")),
        ..InjectConfig::default()
    };
    let e = inject(vec![], &bad).unwrap_err();
    assert!(
        e.to_string().contains("initResources.requests.memory"),
        "{e}"
    );
}

#[test]
fn the_ca_address_is_configurable_and_empty_turns_the_identity_off() {
    let ca_env = |config: &InjectConfig| {
        let (doc, _) = one(workload("v1", "Pod"), config);
        let proxy = container(&doc["spec"]["initContainers"], PROXY_NAME);
        env(proxy, "ISTHMUS_CA_ADDRESS").map(|e| e["value"].clone())
    };
    let config: InjectConfig = serde_saphyr::from_str("caAddress: ca.mesh.svc:8443\n").unwrap();
    assert_eq!(ca_env(&config), Some(json!("ca.mesh.svc:8443")));
    let off: InjectConfig = serde_saphyr::from_str("caAddress: ''\n").unwrap();
    assert_eq!(ca_env(&off), None);
    for bad in ["ca.mesh.svc", ":15012", "ca:port"] {
        let config = InjectConfig {
            ca_address: bad.into(),
            ..InjectConfig::default()
        };
        let e = inject(vec![], &config).unwrap_err();
        assert!(e.to_string().contains("caAddress"), "{bad}: {e}");
    }
}

#[test]
fn a_pod_without_app_or_version_labels_leaves_them_to_the_proxy() {
    let mut doc = workload("v1", "Pod");
    doc["metadata"].as_object_mut().unwrap().remove("labels");
    let (doc, _) = one(doc, &InjectConfig::default());
    let proxy = container(&doc["spec"]["initContainers"], PROXY_NAME);
    assert!(env(proxy, "ISTHMUS_APP").is_none());
    assert!(env(proxy, "ISTHMUS_APP_VERSION").is_none());
}

#[test]
fn malformed_templates_are_errors_not_panics() {
    let mut d = workload("apps/v1", "Deployment");
    d["spec"]["template"] = json!("x");
    assert!(
        matches!(template_error(d), TemplateError::Shape { path, .. } if path == "spec.template")
    );
    let mut d = workload("v1", "Pod");
    d["spec"]["containers"] = json!({"name": "x"});
    let e = template_error(d);
    assert!(e.to_string().contains("spec.containers"), "{e}");
    let mut d = workload("v1", "Pod");
    d["metadata"]["annotations"] = json!(["x"]);
    assert!(template_error(d)
        .to_string()
        .contains("metadata.annotations"));
}

#[test]
fn yaml_streams_keep_their_documents_in_order() {
    let text = "\
# comments are lost
apiVersion: v1
kind: Service
metadata: {name: a}
---
---
apiVersion: v1
kind: Pod
metadata:
  name: p
  annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: \"5432\"}
spec:
  containers: [{name: app, image: \"app:1\", env: [{name: A, value: \"yes\"}, {name: B, value: on}]}]
  volumes: [{name: v, secret: {secretName: s, defaultMode: 0644}}]
---
apiVersion: v1
kind: List
items:
- {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}, spec: {template: {spec: {containers: []}}}}
";
    let docs = parse_documents(text).unwrap();
    assert_eq!(docs.len(), 3, "the empty document is dropped");
    // Scalars resolve as Kubernetes (go-yaml, YAML 1.1) resolves them.
    assert_eq!(docs[1]["spec"]["containers"][0]["env"][0]["value"], "yes");
    assert_eq!(docs[1]["spec"]["containers"][0]["env"][1]["value"], true);
    assert_eq!(
        docs[1]["spec"]["volumes"][0]["secret"]["defaultMode"],
        0o644
    );
    let out = inject(docs, &InjectConfig::default()).unwrap();
    let yaml = to_yaml(&out.documents).unwrap();
    assert_eq!(yaml.matches("\n---\n").count(), 2);
    assert!(!yaml.contains("comments"));
    assert!(yaml.contains("value: \"yes\""), "{yaml}");
    let back = parse_documents(&yaml).unwrap();
    assert_eq!(back, out.documents);
    assert_eq!(back[0]["kind"], "Service");
    assert_eq!(
        back[1]["spec"]["initContainers"][0]["args"][2],
        "--exclude-outbound-ports=5432"
    );
    assert_eq!(
        names(&back[2]["items"][0]["spec"]["template"]["spec"]["initContainers"]),
        [INIT_NAME, PROXY_NAME]
    );
    // Strings that read as other types in YAML 1.1 stay strings.
    let tricky = vec![json!({"a": ["on", "0644", "1e3", "null", "~", "-", "yes", "", "12:30"]})];
    assert_eq!(parse_documents(&to_yaml(&tricky).unwrap()).unwrap(), tricky);
}
