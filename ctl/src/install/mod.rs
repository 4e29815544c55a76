//! `isthmus-ctl install` / `uninstall`: everything a cluster needs to run the controller, built
//! from typed k8s-openapi objects (so every field name and type is Kubernetes' own), printed as
//! YAML or applied with server-side apply ([`apply`]).
//!
//! What is made, in apply order: the namespace (also the mesh root namespace), the Istio CRDs
//! the controller reads ([`crds`]), the ServiceAccount and least-privilege RBAC ([`rbac`]), the
//! controller's Deployment, Service and PodDisruptionBudget ([`workload`]) and the injection
//! webhook's configuration ([`webhook`]). Order matters only for a first install: the webhook
//! configuration comes last, so no pod creation is sent to a webhook whose backend does not
//! exist yet.

use std::collections::BTreeMap;

use kube::core::ApiResource;
use kube::Resource;
use serde::Serialize;
use serde_json::Value;

pub mod apply;
pub mod crds;
pub mod rbac;
pub mod webhook;
pub mod workload;

#[cfg(test)]
mod tests;

/// The field manager of every server-side apply `install` makes.
pub const FIELD_MANAGER: &str = "isthmus-install";
/// Every object `install` makes carries `app.kubernetes.io/managed-by: isthmus-install`: how
/// `install --crds auto` and `uninstall` tell isthmus's CRDs from Istio's.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_INSTALL: &str = "isthmus-install";
/// The label the controller puts on the ConfigMaps it writes (`uninstall` deletes those).
pub const MANAGED_BY_CONTROLLER: &str = "isthmus-controller";
/// The controller's Deployment, ServiceAccount, Service, Lease, PDB and RBAC objects' name.
pub const CONTROLLER: &str = "isthmus-controller";
/// The MutatingWebhookConfiguration whose caBundle the controller keeps patched.
pub const WEBHOOK_CONFIG: &str = "isthmus-sidecar-injector";
/// The Secret (in the install namespace) holding the controller's CA.
pub const CA_SECRET: &str = "isthmus-ca";
/// The namespace label that turns injection on, as Istio's `istio-injection=enabled`.
pub const INJECTION_LABEL: &str = "isthmus-injection";
/// The controller's monitoring port (istiod's): `/healthz`, `/readyz`, `/metrics`.
pub const MONITORING_PORT: i32 = 15014;
/// The port the controller serves the injection webhook on (TLS, path [`WEBHOOK_PATH`]).
pub const WEBHOOK_PORT: i32 = 15017;
pub const WEBHOOK_PATH: &str = "/inject";
/// The port the controller's CA issues workload certificates on (TLS; istiod's CA port).
pub const CA_PORT: i32 = 15012;
/// The ConfigMap holding `install --inject-config`'s file, mounted into the controller.
pub const INJECT_CONFIG_MAP: &str = "isthmus-inject";

/// What `install` makes; the command-line flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// The install namespace, which is also the mesh root namespace.
    pub namespace: String,
    /// Image prefix: the controller image is `{hub}/ctl:{tag}`, as docker/build.sh names it.
    pub hub: String,
    pub tag: String,
    pub replicas: i32,
    pub crds: CrdMode,
    /// What the webhook injects (`isthmus-ctl inject --config`'s file, as text): kept in a
    /// ConfigMap the controller mounts. `None`: the injector's defaults.
    pub inject_config: Option<String>,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            namespace: "isthmus-system".into(),
            hub: "isthmus".into(),
            tag: "dev".into(),
            replicas: 2,
            crds: CrdMode::Auto,
            inject_config: None,
        }
    }
}

/// Whether `install` makes the Istio CRDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CrdMode {
    /// Printed (with a comment); applied only where the CRD does not exist or is isthmus's own
    /// — a cluster with Istio already has them, and Istio's are never overwritten.
    #[default]
    Auto,
    /// Printed and applied whatever is there.
    Always,
    /// Left out.
    Never,
}

/// One object to print or apply: its JSON (with apiVersion and kind), the API resource it is
/// sent to, and a line saying why it is there (printed as a YAML comment above it).
#[derive(Debug, Clone)]
pub struct Manifest {
    pub resource: ApiResource,
    pub object: Value,
    pub comment: String,
}

impl Manifest {
    /// A typed object, type-erased: k8s-openapi serializes apiVersion and kind itself.
    pub fn new<K>(object: &K, comment: impl Into<String>) -> Manifest
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        Manifest {
            resource: ApiResource::erase::<K>(&()),
            object: serde_json::to_value(object).expect("k8s-openapi objects serialize"),
            comment: comment.into(),
        }
    }

    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.object["metadata"]["namespace"].as_str()
    }

    pub fn kind(&self) -> &str {
        &self.resource.kind
    }

    /// `kind.group/name [-n namespace]`, as kubectl names objects.
    pub fn display_name(&self) -> String {
        object_name(&self.resource, self.namespace(), self.name())
    }
}

/// `deployment.apps/isthmus-controller -n isthmus-system`, as kubectl names objects.
pub fn object_name(resource: &ApiResource, namespace: Option<&str>, name: &str) -> String {
    let kind = resource.kind.to_lowercase();
    let group = if resource.group.is_empty() {
        String::new()
    } else {
        format!(".{}", resource.group)
    };
    match namespace {
        Some(ns) => format!("{kind}{group}/{name} -n {ns}"),
        None => format!("{kind}{group}/{name}"),
    }
}

/// Every object `install` makes, in apply order.
pub fn manifests(options: &InstallOptions) -> Vec<Manifest> {
    let mut out = vec![Manifest::new(
        &workload::namespace(options),
        format!(
            "The install namespace, also the mesh root namespace (mesh-wide Istio resources go \
             here); the controller keeps its Lease and the CA Secret `{CA_SECRET}` in it."
        ),
    )];
    if options.crds != CrdMode::Never {
        let comment = match options.crds {
            CrdMode::Auto => {
                "Istio CRD. With --crds auto, `install --apply` skips it where it exists already \
                 and is not isthmus's (a cluster with Istio has it: Istio's is never overwritten)."
            }
            _ => "Istio CRD (--crds always).",
        };
        out.extend(crds::all().iter().map(|crd| Manifest::new(crd, comment)));
    }
    out.extend(rbac::manifests(options));
    out.extend(workload::manifests(options));
    out.push(Manifest::new(
        &webhook::configuration(options),
        "Sidecar injection: pods created in namespaces labelled isthmus-injection=enabled. The \
         controller fills in caBundle with its own CA's certificate.",
    ));
    out
}

/// The manifests as one multi-document YAML stream, each document under its comment.
pub fn to_yaml(manifests: &[Manifest]) -> String {
    let mut out = String::new();
    for manifest in manifests {
        out.push_str("---\n");
        for line in textwrap(&manifest.comment, 98) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str(
            &serde_saphyr::to_string(&manifest.object).expect("JSON values serialize as YAML"),
        );
    }
    out
}

/// The labels every object `install` makes carries.
pub fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "isthmus".into()),
        ("app.kubernetes.io/part-of".into(), "isthmus".into()),
        ("app.kubernetes.io/component".into(), component.into()),
        (MANAGED_BY.into(), MANAGED_BY_INSTALL.into()),
    ])
}

/// Greedy word wrap for the comments (no dependency for 10 lines).
fn textwrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("never empty");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}
