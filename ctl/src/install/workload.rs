//! The install namespace and the controller's Deployment, Service and PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Namespace,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, TopologySpreadConstraint,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    labels, InstallOptions, Manifest, CA_SECRET, CONTROLLER, MONITORING_PORT, WEBHOOK_CONFIG,
    WEBHOOK_PORT,
};

/// The controller image's user (docker/build.sh: `USER 65532`, distroless' nonroot).
pub const CONTROLLER_UID: i64 = 65532;

/// Deployment, Service and (with two replicas or more) the PodDisruptionBudget.
pub fn manifests(options: &InstallOptions) -> Vec<Manifest> {
    let mut out = vec![
        Manifest::new(
            &deployment(options),
            "The controller: writes each meshed namespace's ConfigMaps (the leader only) and \
             serves the injection webhook (every replica).",
        ),
        Manifest::new(
            &service(options),
            "Monitoring (15014) and the injection webhook (443 -> 15017, TLS).",
        ),
    ];
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
/// The mesh root namespace is the controller's default, `isthmus-system`, until it has a flag.
pub fn controller_args(options: &InstallOptions) -> Vec<String> {
    [
        "controller",
        "--webhook",
        &format!("[::]:{WEBHOOK_PORT}"),
        "--webhook-config",
        WEBHOOK_CONFIG,
        "--service",
        CONTROLLER,
        "--ca-secret",
        CA_SECRET,
        // The images the webhook injects: the same hub and tag as the controller's own.
        "--hub",
        &options.hub,
        "--tag",
        &options.tag,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
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
        env: Some(vec![
            env("POD_NAME", "metadata.name"),
            env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![
            port("http-monitoring", MONITORING_PORT),
            port("https-webhook", WEBHOOK_PORT),
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
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".into(), "true".into()),
                        ("prometheus.io/port".into(), MONITORING_PORT.to_string()),
                        ("prometheus.io/path".into(), "/metrics".into()),
                    ])),
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
