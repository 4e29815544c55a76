//! The controller's identity and least-privilege permissions: exactly the verbs on exactly the
//! resources it uses, no wildcards; names pinned with `resourceNames` wherever Kubernetes can
//! check them (not for create, nor for a list or watch that does not ask for one name).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crds::{self, KINDS};
use super::{labels, InstallOptions, Manifest, CA_SECRET, CONTROLLER, WEBHOOK_CONFIG};

const READ: &[&str] = &["get", "list", "watch"];

/// ServiceAccount, ClusterRole + binding, Role + binding (install namespace), in apply order.
pub fn manifests(options: &InstallOptions) -> Vec<Manifest> {
    let account = ServiceAccount {
        metadata: meta(Some(&options.namespace)),
        ..ServiceAccount::default()
    };
    vec![
        Manifest::new(&account, "The controller's identity."),
        Manifest::new(
            &cluster_role(),
            "What the controller reads in every namespace, and the ConfigMaps and Events it \
             writes there.",
        ),
        Manifest::new(
            &cluster_role_binding(options),
            "Grants it to the controller.",
        ),
        Manifest::new(
            &role(options),
            "The controller's leader-election Lease and its CA Secret, in the install namespace \
             only.",
        ),
        Manifest::new(&role_binding(options), "Grants it to the controller."),
    ]
}

/// Cluster-wide: what the controller watches, writes and (issue 9) checks.
pub fn cluster_role() -> ClusterRole {
    let istio = |group: &str| {
        let plurals = KINDS.iter().filter(|k| k.group == group);
        rule(group, &plurals.map(|k| k.plural).collect::<Vec<_>>(), READ)
    };
    let webhook = |verbs| PolicyRule {
        resource_names: Some(vec![WEBHOOK_CONFIG.into()]),
        ..rule(
            "admissionregistration.k8s.io",
            &["mutatingwebhookconfigurations"],
            verbs,
        )
    };
    ClusterRole {
        metadata: meta(None),
        rules: Some(vec![
            // The registry's inputs (namespaces themselves are never read: the registry is keyed
            // by the namespaces objects live in).
            rule("", &["services", "pods"], READ),
            rule("discovery.k8s.io", &["endpointslices"], READ),
            // The Istio resources routing is computed from.
            istio(crds::NETWORKING),
            istio(crds::SECURITY),
            // The routing and registry ConfigMaps of every meshed namespace: written with
            // server-side apply (a patch, which creates too), read back on resync, deleted when a
            // namespace leaves the mesh.
            rule(
                "",
                &["configmaps"],
                &["get", "list", "watch", "patch", "delete"],
            ),
            // Invalid Istio resources are reported as Events on them (each one created, never
            // updated).
            rule("events.k8s.io", &["events"], &["create"]),
            // The CA (controller/issuer.rs) checks each sidecar's service-account token.
            rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
            // The injector's configuration, whose caBundle the controller keeps current: by
            // name, list and watch included (its watch asks by field selector metadata.name,
            // which is what lets Kubernetes authorize a named list/watch); written with a replace
            // (update).
            webhook(&["get", "list", "watch", "update"]),
        ]),
        ..ClusterRole::default()
    }
}

/// In the install namespace only: leader election and the CA.
pub fn role(options: &InstallOptions) -> Role {
    Role {
        metadata: meta(Some(&options.namespace)),
        rules: Some(vec![
            rule(
                "coordination.k8s.io",
                &["leases"],
                &["get", "create", "update"],
            ),
            // create cannot be limited by name (the object has none before it exists).
            rule("", &["secrets"], &["create"]),
            PolicyRule {
                resource_names: Some(vec![CA_SECRET.into()]),
                ..rule("", &["secrets"], &["get"])
            },
        ]),
    }
}

fn cluster_role_binding(options: &InstallOptions) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(None),
        role_ref: role_ref("ClusterRole"),
        subjects: Some(vec![subject(options)]),
    }
}

fn role_binding(options: &InstallOptions) -> RoleBinding {
    RoleBinding {
        metadata: meta(Some(&options.namespace)),
        role_ref: role_ref("Role"),
        subjects: Some(vec![subject(options)]),
    }
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..PolicyRule::default()
    }
}

fn role_ref(kind: &str) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: CONTROLLER.into(),
    }
}

fn subject(options: &InstallOptions) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: CONTROLLER.into(),
        namespace: Some(options.namespace.clone()),
        ..Subject::default()
    }
}

fn meta(namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(CONTROLLER.into()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels("controller")),
        ..ObjectMeta::default()
    }
}
