//! The install namespace and the controller's Deployment, Service and PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, Namespace, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    labels, InstallOptions, Manifest, CA_PORT, CA_SECRET, CONTROLLER, INJECT_CONFIG_MAP,
    MONITORING_PORT, WEBHOOK_CONFIG, WEBHOOK_PORT,
};

/// The controller image's user (docker/build.sh: `USER 65532`, distroless' nonroot).
pub const CONTROLLER_UID: i64 = 65532;
/// Where the inject config is mounted in the controller, and its key.
const INJECT_DIR: &str = "/etc/isthmus/inject";
const INJECT_KEY: &str = "config.yaml";
/// On the pod template: the inject config's hash, so a changed config rolls the controller
/// (it reads the file once, at start).
pub const INJECT_CONFIG_HASH: &str = "isthmus.io/inject-config-hash";

/// Deployment, Service and (with two replicas or more) the PodDisruptionBudget.
pub fn manifests(options: &InstallOptions) -> Vec<Manifest> {
    let mut out = Vec::new();
    if let Some(text) = &options.inject_config {
        out.push(Manifest::new(
            &inject_config_map(options, text),
            "What the webhook injects (install --inject-config), mounted into the controller.",
        ));
    }
    out.extend([
        Manifest::new(
            &deployment(options),
            "The controller: writes each meshed namespace's ConfigMaps (the leader only) and \
             serves the injection webhook (every replica).",
        ),
        Manifest::new(
            &service(options),
            "Monitoring (15014), the injection webhook (443 -> 15017, TLS) and the CA (15012, TLS).",
        ),
    ]);
    if options.replicas >= 2 {
        out.push(Manifest::new(
            &disruption_budget(options),
            "Keeps one controller up through node drains: pod creation in injected namespaces \
             fails while no webhook answers (failurePolicy Fail).",
        ));
    }
    out
}

/// The install namespace. Its pods meet the `restricted` Pod Security Standard, so it is
/// enforced there; it is never labelled for injection (the controller cannot inject itself).
pub fn namespace(options: &InstallOptions) -> Namespace {
    let mut labels = labels("controller");
    labels.insert(
        "pod-security.kubernetes.io/enforce".into(),
        "restricted".into(),
    );
    Namespace {
        metadata: ObjectMeta {
            name: Some(options.namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// The controller's command line: `controller` and the flags that tie it to these manifests.
pub fn controller_args(options: &InstallOptions) -> Vec<String> {
    let mut args: Vec<String> = [
        "controller",
        "--root-namespace",
        &options.namespace,
        "--webhook",
        &format!("[::]:{WEBHOOK_PORT}"),
        "--webhook-config",
        WEBHOOK_CONFIG,
        "--service",
        CONTROLLER,
        "--ca-secret",
        CA_SECRET,
        "--ca-listen",
        &format!("[::]:{CA_PORT}"),
        // The images the webhook injects: the same hub and tag as the controller's own.
        "--hub",
        &options.hub,
        "--tag",
        &options.tag,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if options.inject_config.is_some() {
        args.extend([
            "--inject-config".into(),
            format!("{INJECT_DIR}/{INJECT_KEY}"),
        ]);
    }
    args
}

/// `install --inject-config`'s file as the ConfigMap the controller mounts.
pub fn inject_config_map(options: &InstallOptions, text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(INJECT_CONFIG_MAP.into()),
            namespace: Some(options.namespace.clone()),
            labels: Some(labels("controller")),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(INJECT_KEY.to_string(), text.to_string())])),
        ..ConfigMap::default()
    }
}

/// `app: isthmus-controller`: the selector of the Deployment, Service and PDB.
pub fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app".into(), CONTROLLER.into())])
}

pub fn deployment(options: &InstallOptions) -> Deployment {
    let mut pod_labels = labels("controller");
    pod_labels.extend(selector_labels());
    // The webhook's objectSelector skips pods labelled so: a controller pod is never sent to
    // the webhook it serves, whatever namespace it runs in.
    pod_labels.insert("sidecar.istio.io/inject".into(), "false".into());
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            ..ObjectFieldSelector::default()
        }),
        ..EnvVarSource::default()
    };
    let env = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(field(path)),
        ..EnvVar::default()
    };
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http-monitoring".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let quantities = |cpu: Option<&str>, memory: &str| {
        let mut q = BTreeMap::from([("memory".to_string(), Quantity(memory.into()))]);
        if let Some(cpu) = cpu {
            q.insert("cpu".into(), Quantity(cpu.into()));
        }
        q
    };
    let container = Container {
        name: "controller".into(),
        image: Some(format!("{}/ctl:{}", options.hub, options.tag)),
        args: Some(controller_args(options)),
        volume_mounts: options.inject_config.as_ref().map(|_| {
            vec![VolumeMount {
                name: "inject-config".into(),
                mount_path: INJECT_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]
        }),
        env: Some(vec![
            env("POD_NAME", "metadata.name"),
            env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![
            port("http-monitoring", MONITORING_PORT),
            port("https-webhook", WEBHOOK_PORT),
            port("https-ca", CA_PORT),
        ]),
        liveness_probe: Some(probe("/healthz")),
        readiness_probe: Some(probe("/readyz")),
        // No CPU limit: throttling a controller only delays reconciles and webhook answers.
        // Memory grows with the number of watched Services, EndpointSlices and Pods.
        resources: Some(ResourceRequirements {
            requests: Some(quantities(Some("100m"), "128Mi")),
            limits: Some(quantities(None, "1Gi")),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(CONTROLLER_UID),
            run_as_group: Some(CONTROLLER_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: meta(options),
        spec: Some(DeploymentSpec {
            replicas: Some(options.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations(options)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(CONTROLLER.into()),
                    containers: vec![container],
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(runtime_default()),
                        ..PodSecurityContext::default()
                    }),
                    volumes: options.inject_config.as_ref().map(|_| {
                        vec![Volume {
                            name: "inject-config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: INJECT_CONFIG_MAP.into(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        }]
                    }),
                    // Replicas on different nodes where there are several; ScheduleAnyway so
                    // a one-node cluster still runs them all.
                    topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                        max_skew: 1,
                        topology_key: "kubernetes.io/hostname".into(),
                        when_unsatisfiable: "ScheduleAnyway".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels()),
                            ..LabelSelector::default()
                        }),
                        ..TopologySpreadConstraint::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

pub fn service(options: &InstallOptions) -> Service {
    let service_port = |name: &str, port: i32, target: i32| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: meta(options),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels()),
            ports: Some(vec![
                service_port("http-monitoring", MONITORING_PORT, MONITORING_PORT),
                service_port("https-webhook", 443, WEBHOOK_PORT),
                service_port("https-ca", CA_PORT, CA_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

pub fn disruption_budget(options: &InstallOptions) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(options),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// The controller's own scrape annotations, and the inject config's hash when there is one.
fn pod_annotations(options: &InstallOptions) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".into(), "true".into()),
        ("prometheus.io/port".into(), MONITORING_PORT.to_string()),
        ("prometheus.io/path".into(), "/metrics".into()),
    ]);
    if let Some(text) = &options.inject_config {
        let file = isthmus_config::SourceFile::new(INJECT_KEY, text.clone());
        annotations.insert(
            INJECT_CONFIG_HASH.into(),
            isthmus_config::source::version_of(&[file]),
        );
    }
    annotations
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    }
}

fn meta(options: &InstallOptions) -> ObjectMeta {
    ObjectMeta {
        name: Some(CONTROLLER.into()),
        namespace: Some(options.namespace.clone()),
        labels: Some(labels("controller")),
        ..ObjectMeta::default()
    }
}
