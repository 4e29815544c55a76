use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::apply::{uninstall_plan, UninstallCrds};
use super::*;

fn all(options: &InstallOptions) -> Vec<Manifest> {
    manifests(options)
}

fn find<'a>(manifests: &'a [Manifest], kind: &str) -> &'a Value {
    &manifests
        .iter()
        .find(|m| m.kind() == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
        .object
}

/// `(apiGroup, resource, resourceNames, verb)` for every permission a role grants.
fn permissions(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let names = strings(&rule["resourceNames"]).join(",");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), names.clone(), verb));
                }
            }
        }
    }
    out
}

fn expect(spec: &[(&str, &[&str], &str, &[&str])]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for (group, resources, names, verbs) in spec {
        for resource in *resources {
            for verb in *verbs {
                out.insert((
                    group.to_string(),
                    resource.to_string(),
                    names.to_string(),
                    verb.to_string(),
                ));
            }
        }
    }
    out
}

#[test]
fn manifests_are_in_apply_order_with_every_object_once() {
    let kinds: Vec<String> = all(&InstallOptions::default())
        .iter()
        .map(|m| format!("{}/{}", m.kind(), m.name()))
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace/isthmus-system",
            "CustomResourceDefinition/virtualservices.networking.istio.io",
            "CustomResourceDefinition/destinationrules.networking.istio.io",
            "CustomResourceDefinition/serviceentries.networking.istio.io",
            "CustomResourceDefinition/sidecars.networking.istio.io",
            "CustomResourceDefinition/peerauthentications.security.istio.io",
            "CustomResourceDefinition/authorizationpolicies.security.istio.io",
            "ServiceAccount/isthmus-controller",
            "ClusterRole/isthmus-controller",
            "ClusterRoleBinding/isthmus-controller",
            "Role/isthmus-controller",
            "RoleBinding/isthmus-controller",
            "Deployment/isthmus-controller",
            "Service/isthmus-controller",
            "PodDisruptionBudget/isthmus-controller",
            "MutatingWebhookConfiguration/isthmus-sidecar-injector",
        ]
    );
}

#[test]
fn every_object_is_labelled_as_installed_by_isthmus() {
    for m in all(&InstallOptions::default()) {
        assert_eq!(
            m.object["metadata"]["labels"][MANAGED_BY],
            MANAGED_BY_INSTALL,
            "{}",
            m.display_name()
        );
        assert!(m.object["apiVersion"].is_string() && m.object["kind"] == m.kind());
    }
}

#[test]
fn crds_never_leaves_them_out_and_one_replica_has_no_disruption_budget() {
    let options = InstallOptions {
        crds: CrdMode::Never,
        replicas: 1,
        ..InstallOptions::default()
    };
    let kinds: Vec<String> = all(&options).iter().map(|m| m.kind().to_owned()).collect();
    assert!(!kinds.iter().any(|k| k == "CustomResourceDefinition"));
    // minAvailable 1 of 1 would block every node drain.
    assert!(!kinds.iter().any(|k| k == "PodDisruptionBudget"));
    assert_eq!(kinds.len(), 9);
}

/// Found in review: namespaces get/list/watch, configmaps create/update, events patch and the
/// webhook configuration's patch were granted but never called (server-side apply is a patch;
/// the caBundle is written with a replace).
#[test]
fn cluster_role_grants_exactly_what_the_controller_uses() {
    let manifests = all(&InstallOptions::default());
    let granted = permissions(find(&manifests, "ClusterRole"));
    let read: &[&str] = &["get", "list", "watch"];
    let wanted = expect(&[
        ("", &["services", "pods"], "", read),
        ("discovery.k8s.io", &["endpointslices"], "", read),
        (
            "networking.istio.io",
            &[
                "virtualservices",
                "destinationrules",
                "serviceentries",
                "sidecars",
            ],
            "",
            read,
        ),
        (
            "security.istio.io",
            &["peerauthentications", "authorizationpolicies"],
            "",
            read,
        ),
        (
            "",
            &["configmaps"],
            "",
            &["get", "list", "watch", "patch", "delete"],
        ),
        ("events.k8s.io", &["events"], "", &["create"]),
        ("authentication.k8s.io", &["tokenreviews"], "", &["create"]),
        (
            "admissionregistration.k8s.io",
            &["mutatingwebhookconfigurations"],
            WEBHOOK_CONFIG,
            &["get", "list", "watch", "update"],
        ),
    ]);
    assert_eq!(granted, wanted);
}

#[test]
fn namespaced_role_covers_only_the_lease_and_the_ca_secret() {
    let manifests = all(&InstallOptions::default());
    let role = find(&manifests, "Role");
    assert_eq!(role["metadata"]["namespace"], "isthmus-system");
    let wanted = expect(&[
        (
            "coordination.k8s.io",
            &["leases"],
            "",
            &["get", "create", "update"],
        ),
        ("", &["secrets"], "", &["create"]),
        ("", &["secrets"], CA_SECRET, &["get"]),
    ]);
    assert_eq!(permissions(role), wanted);
}

#[test]
fn no_role_has_a_wildcard_and_bindings_name_the_controller_account() {
    let manifests = all(&InstallOptions::default());
    for kind in ["ClusterRole", "Role"] {
        for (group, resource, names, verb) in permissions(find(&manifests, kind)) {
            for field in [group, resource, names, verb] {
                assert!(!field.contains('*'), "{kind}: {field}");
            }
        }
    }
    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = find(&manifests, kind);
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": CONTROLLER})
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": "isthmus-system"}])
        );
    }
}

#[test]
fn webhook_selects_labelled_namespaces_and_skips_opted_out_pods() {
    let manifests = all(&InstallOptions::default());
    let config = find(&manifests, "MutatingWebhookConfiguration");
    let webhooks = config["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1);
    let hook = &webhooks[0];
    assert_eq!(
        hook["namespaceSelector"],
        json!({"matchLabels": {"isthmus-injection": "enabled"}})
    );
    assert_eq!(
        hook["objectSelector"],
        json!({"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]})
    );
    assert_eq!(
        hook["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["pods"], "scope": "Namespaced"}])
    );
    assert_eq!(
        hook["clientConfig"],
        json!({"service": {"name": "isthmus-controller", "namespace": "isthmus-system",
                           "path": "/inject", "port": 443}}),
        "no caBundle: the controller owns it"
    );
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["timeoutSeconds"], 10);
    assert_eq!(
        hook["reinvocationPolicy"], "IfNeeded",
        "found in review: containers added by a later webhook must get their probes rewritten too"
    );
}

#[test]
fn controller_runs_non_root_read_only_without_capabilities() {
    let options = InstallOptions {
        hub: "registry.example/mesh".into(),
        tag: "abc123".into(),
        replicas: 3,
        ..InstallOptions::default()
    };
    let manifests = all(&options);
    let deployment = find(&manifests, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], CONTROLLER);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], "registry.example/mesh/ctl:abc123");
    assert_eq!(
        c["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
               "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(c["args"][0], "controller");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| args[args.iter().position(|a| *a == name).unwrap() + 1];
    assert_eq!(flag("--root-namespace"), "isthmus-system");
    assert_eq!(flag("--webhook"), "[::]:15017");
    assert_eq!(flag("--ca-listen"), "[::]:15012");
    assert_eq!(flag("--webhook-config"), WEBHOOK_CONFIG);
    assert_eq!(flag("--hub"), "registry.example/mesh");
    assert_eq!(flag("--tag"), "abc123");
    assert_eq!(
        c["env"],
        json!([
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ])
    );
    assert_eq!(
        c["ports"],
        json!([
            {"name": "http-monitoring", "containerPort": 15014, "protocol": "TCP"},
            {"name": "https-webhook", "containerPort": 15017, "protocol": "TCP"},
            {"name": "https-ca", "containerPort": 15012, "protocol": "TCP"},
        ])
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http-monitoring");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    // Replicas spread over nodes, the controller never injected, selectors agree.
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["labelSelector"]["matchLabels"]["app"], CONTROLLER);
    let template_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(template_labels["sidecar.istio.io/inject"], "false");
    assert_eq!(template_labels["app"], CONTROLLER);
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        json!({"app": CONTROLLER})
    );
    let service = find(&manifests, "Service");
    assert_eq!(service["spec"]["selector"], json!({"app": CONTROLLER}));
    assert_eq!(
        service["spec"]["ports"],
        json!([
            {"name": "http-monitoring", "port": 15014, "targetPort": 15014, "protocol": "TCP"},
            {"name": "https-webhook", "port": 443, "targetPort": 15017, "protocol": "TCP"},
            {"name": "https-ca", "port": 15012, "targetPort": 15012, "protocol": "TCP"},
        ])
    );
    let pdb = find(&manifests, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        json!({"app": CONTROLLER})
    );
}

#[test]
fn crds_are_structural_istio_named_and_serve_every_istio_version() {
    let manifests = all(&InstallOptions::default());
    let vs = manifests
        .iter()
        .find(|m| m.name() == "virtualservices.networking.istio.io")
        .unwrap();
    let spec = &vs.object["spec"];
    assert_eq!(spec["group"], "networking.istio.io");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["shortNames"], json!(["vs"]));
    let versions: Vec<(&str, bool)> = spec["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["storage"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        versions,
        [("v1", true), ("v1beta1", false), ("v1alpha3", false)]
    );
    let schema = &spec["versions"][0]["schema"]["openAPIV3Schema"];
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["properties"]["spec"]["type"], "object");
    assert_eq!(
        schema["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    assert_eq!(spec["versions"][0]["subresources"], json!({"status": {}}));
}

#[test]
fn printed_yaml_has_one_commented_document_per_object() {
    let manifests = all(&InstallOptions::default());
    let yaml = to_yaml(&manifests);
    assert_eq!(yaml.matches("---\n").count(), manifests.len());
    let docs: Vec<&str> = yaml.split("---\n").skip(1).collect();
    for (doc, manifest) in docs.iter().zip(&manifests) {
        assert!(doc.starts_with("# "), "{doc}");
        let body: String = doc
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed: Value = serde_saphyr::from_str(&body).unwrap();
        assert_eq!(parsed, manifest.object);
    }
    assert!(yaml.contains("--crds auto"));
}

#[test]
fn uninstall_plan_removes_the_webhook_first_and_keeps_crds_by_default() {
    let options = InstallOptions::default();
    let plan = uninstall_plan(&options, UninstallCrds::Keep);
    assert_eq!(
        plan[0],
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/isthmus-sidecar-injector"
    );
    assert!(plan.contains(&"deployment.apps/isthmus-controller -n isthmus-system".to_string()));
    assert!(plan
        .contains(&"lease.coordination.k8s.io/isthmus-controller -n isthmus-system".to_string()));
    assert!(plan.contains(&"secret/isthmus-ca -n isthmus-system".to_string()));
    assert!(plan.contains(&"configmap/isthmus-inject -n isthmus-system".to_string()));
    assert!(!plan
        .iter()
        .any(|l| l.starts_with("customresourcedefinition")));
    let purge = uninstall_plan(&options, UninstallCrds::Isthmus);
    assert_eq!(
        purge
            .iter()
            .filter(|l| l.starts_with("customresourcedefinition") && l.contains("if labelled"))
            .count(),
        6
    );
}

#[test]
fn an_inject_config_is_mounted_and_a_change_rolls_the_controller() {
    let with = |text: &str| InstallOptions {
        inject_config: Some(text.into()),
        ..InstallOptions::default()
    };
    let manifests = all(&with("nativeSidecar: false\n"));
    let configmap = find(&manifests, "ConfigMap");
    assert_eq!(configmap["metadata"]["name"], INJECT_CONFIG_MAP);
    assert_eq!(configmap["metadata"]["namespace"], "isthmus-system");
    assert_eq!(configmap["data"]["config.yaml"], "nativeSidecar: false\n");
    let position = |kind: &str| manifests.iter().position(|m| m.kind() == kind).unwrap();
    assert!(position("ConfigMap") < position("Deployment"));
    let deployment = find(&manifests, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"],
        json!([{"name": "inject-config", "configMap": {"name": INJECT_CONFIG_MAP}}])
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "inject-config", "mountPath": "/etc/isthmus/inject", "readOnly": true}])
    );
    let args = c["args"].as_array().unwrap();
    assert_eq!(
        args[args.len() - 2..],
        [
            json!("--inject-config"),
            json!("/etc/isthmus/inject/config.yaml")
        ]
    );
    let hash = |m: &[Manifest]| {
        find(m, "Deployment")["spec"]["template"]["metadata"]["annotations"]
            [workload::INJECT_CONFIG_HASH]
            .clone()
    };
    assert!(hash(&manifests).is_string());
    assert_eq!(
        hash(&manifests),
        hash(&all(&with("nativeSidecar: false\n")))
    );
    assert_ne!(hash(&manifests), hash(&all(&with("nativeSidecar: true\n"))));
    // Without one: no ConfigMap, no volume, no flag, no hash.
    let plain = all(&InstallOptions::default());
    assert!(!plain.iter().any(|m| m.kind() == "ConfigMap"));
    let pod = &find(&plain, "Deployment")["spec"]["template"]["spec"];
    assert!(pod["volumes"].is_null());
    assert!(!pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .contains(&json!("--inject-config")));
    assert!(hash(&plain).is_null());
}
