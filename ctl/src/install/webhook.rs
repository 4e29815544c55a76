//! The MutatingWebhookConfiguration that sends pod creations to the controller's injector.

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};

use super::{labels, InstallOptions, CONTROLLER, INJECTION_LABEL, WEBHOOK_CONFIG, WEBHOOK_PATH};

/// Istio's opt-out label (also honoured as an annotation by the injector itself).
pub const OPT_OUT_LABEL: &str = "sidecar.istio.io/inject";

/// Pods created in a namespace labelled `isthmus-injection=enabled`, except those labelled
/// `sidecar.istio.io/inject: "false"`, go to `isthmus-controller.<ns>.svc:443/inject`.
/// `caBundle` is left out: the controller fills it with its CA's certificate (and an apply
/// that does not send the field never takes it back).
pub fn configuration(options: &InstallOptions) -> MutatingWebhookConfiguration {
    let strings = |s: &[&str]| Some(s.iter().map(|s| s.to_string()).collect());
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(WEBHOOK_CONFIG.into()),
            labels: Some(labels("injector")),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "sidecar-injector.isthmus.io".into(),
            client_config: WebhookClientConfig {
                service: Some(ServiceReference {
                    name: CONTROLLER.into(),
                    namespace: options.namespace.clone(),
                    path: Some(WEBHOOK_PATH.into()),
                    port: Some(443),
                }),
                ..WebhookClientConfig::default()
            },
            rules: Some(vec![RuleWithOperations {
                operations: strings(&["CREATE"]),
                api_groups: strings(&[""]),
                api_versions: strings(&["v1"]),
                resources: strings(&["pods"]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_labels: Some([(INJECTION_LABEL.into(), "enabled".into())].into()),
                ..LabelSelector::default()
            }),
            // NotIn also matches pods without the label.
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: OPT_OUT_LABEL.into(),
                    operator: "NotIn".into(),
                    values: strings(&["false"]),
                }]),
                ..LabelSelector::default()
            }),
            // A pod that should have a sidecar and starts without one would bypass the mesh's
            // policy: refuse it instead (Istio's choice too).
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            admission_review_versions: vec!["v1".into()],
            timeout_seconds: Some(10),
            // Called again when a later mutating webhook adds containers, so their probes are
            // rewritten too (injection is idempotent; Istio's choice too).
            reinvocation_policy: Some("IfNeeded".into()),
            match_policy: Some("Equivalent".into()),
            ..MutatingWebhook::default()
        }]),
    }
}
