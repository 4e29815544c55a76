//! Sidecar injection, offline (`isthmus-ctl inject`, like `istioctl kube-inject`) and — through
//! the same pure functions — in the mutating webhook to come.
//!
//! The input is a list of Kubernetes documents as generic JSON trees (what YAML and JSON both
//! parse into); each workload's pod template gets the init container, the sidecar, their volumes
//! and the scrape annotations ([`pod`]), everything else passes through untouched. Injection first
//! removes whatever an earlier injection added, then adds it anew, so injecting an injected
//! object changes nothing, and re-injecting with a new config or new annotations updates it.
//! The webhook will call [`inject_template`] on the Pod it is shown and send
//! [`patch::json_patch`] of before and after.

mod annotations;
pub mod patch;
mod pod;
mod probes;

use serde_json::{Map, Value};

pub use annotations::TRAFFIC_ANNOTATIONS;
pub use pod::{
    Outcome, Workload, CONFIG_MOUNT, CONFIG_VOLUME, INIT_NAME, PROXY_NAME, PROXY_UID,
    STATUS_ANNOTATION, TOKEN_MOUNT, TOKEN_VOLUME,
};
pub use probes::{PROBERS_ENV, PROBE_PORT};

/// The controller's CA endpoint (`--ca-listen [::]:15012`) in the install namespace.
pub const DEFAULT_CA_ADDRESS: &str = "isthmus-controller.isthmus-system.svc:15012";

/// What is injected, and from which images. Read from `--config FILE` (YAML or JSON, these field
/// names in camelCase); every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InjectConfig {
    /// Registry and repository prefix of the images: `{hub}/proxy:{tag}` and
    /// `{hub}/init:{tag}`, the names `docker/build.sh` gives them.
    pub hub: String,
    /// `dev` by default: `docker/build.sh` tags every build `dev` and `<git short sha>`.
    pub tag: String,
    /// Overrides `{hub}/proxy:{tag}`.
    pub proxy_image: Option<String>,
    /// Overrides `{hub}/init:{tag}`.
    pub init_image: Option<String>,
    /// Left out (Kubernetes' default: `Always` for `:latest`, else `IfNotPresent`) unless set.
    pub image_pull_policy: Option<String>,
    /// The sidecar as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes ≥ 1.29); `false` makes it the first regular container.
    pub native_sidecar: bool,
    /// The routing ConfigMap: Istio documents, mounted as the sidecar's config directory
    /// together with `registry_config_map` (one projected volume, one directory).
    pub config_map: String,
    /// The registry ConfigMap `isthmus-ctl controller` writes (optional in the volume: a pod
    /// starts before the controller has written its namespace's registry, with no services).
    pub registry_config_map: String,
    /// Audience of the projected service-account token the sidecar will present to the CA.
    pub token_audience: String,
    /// The mesh CA, `host:port`, given to the sidecar as `ISTHMUS_CA_ADDRESS` (it then asks
    /// for its certificate, trusting `trust-bundle.pem` of its config directory); empty: no
    /// workload identity.
    pub ca_address: String,
    /// `ISTHMUS_CLUSTER` (Istio's cluster id); left to the proxy's default (`Kubernetes`) if unset.
    pub cluster: Option<String>,
    pub proxy_resources: Resources,
    pub init_resources: Resources,
}

/// A container's `resources`, CPU and memory only.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub requests: Quantities,
    pub limits: Quantities,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quantities {
    pub cpu: Option<String>,
    pub memory: Option<String>,
}

/// The documents after injection, and what the operator should know about them.
#[derive(Debug, Clone, PartialEq)]
pub struct Injected {
    pub documents: Vec<Value>,
    pub warnings: Vec<String>,
}

/// Why a document could not be injected. Nothing is written when any document fails.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {index} ({kind} {name}): {reason}")]
    Document {
        /// 1-based, as an operator counts documents in the file.
        index: usize,
        kind: String,
        name: String,
        reason: Box<TemplateError>,
    },
    #[error("invalid inject config: {0}")]
    Config(String),
    #[error("invalid YAML: {0}")]
    Yaml(String),
}

/// Why one pod template could not be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{path}` must be {expected}")]
    Shape {
        path: String,
        expected: &'static str,
    },
    #[error("annotation {annotation}={value:?}: {reason}")]
    BadAnnotation {
        annotation: String,
        value: String,
        reason: String,
    },
    #[error("annotation {annotation} is not supported by isthmus ({why}); remove it, or exclude this workload with sidecar.istio.io/inject: \"false\"")]
    Unsupported {
        annotation: String,
        why: &'static str,
    },
    #[error("the pod is already injected by Istio (sidecar.istio.io/status is set): two sidecars would both capture its traffic; remove Istio's injection first")]
    InjectedByIstio,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            hub: "isthmus".into(),
            tag: "dev".into(),
            proxy_image: None,
            init_image: None,
            image_pull_policy: None,
            native_sidecar: true,
            config_map: "isthmus-config".into(),
            registry_config_map: "isthmus-registry".into(),
            token_audience: "isthmus-ca".into(),
            ca_address: DEFAULT_CA_ADDRESS.into(),
            cluster: None,
            // isthmus idles at ~5 MB (README, Performance); Istio asks 100m/128Mi for Envoy.
            proxy_resources: Resources::new(("50m", "32Mi"), ("2", "256Mi")),
            init_resources: Resources::new(("10m", "16Mi"), ("100m", "64Mi")),
        }
    }
}

impl InjectConfig {
    pub fn proxy_image(&self) -> String {
        self.proxy_image
            .clone()
            .unwrap_or_else(|| format!("{}/proxy:{}", self.hub, self.tag))
    }

    pub fn init_image(&self) -> String {
        self.init_image
            .clone()
            .unwrap_or_else(|| format!("{}/init:{}", self.hub, self.tag))
    }

    /// Checks what Kubernetes would otherwise reject pod by pod.
    pub fn validate(&self) -> Result<(), InjectError> {
        let quantities = [
            ("proxyResources", &self.proxy_resources),
            ("initResources", &self.init_resources),
        ];
        for (field, r) in quantities {
            for (kind, q) in [("requests", &r.requests), ("limits", &r.limits)] {
                for (name, v) in [("cpu", &q.cpu), ("memory", &q.memory)] {
                    if let Some(v) = v {
                        if !annotations::is_quantity(v) {
                            return Err(InjectError::Config(format!(
                                "{field}.{kind}.{name}: {v:?} is not a Kubernetes quantity (e.g. 100m, 1, 64Mi)"
                            )));
                        }
                    }
                }
            }
        }
        if let Some(p) = &self.image_pull_policy {
            if !matches!(p.as_str(), "Always" | "IfNotPresent" | "Never") {
                return Err(InjectError::Config(format!(
                    "imagePullPolicy: {p:?} is not Always, IfNotPresent or Never"
                )));
            }
        }
        if self.config_map.is_empty()
            || self.registry_config_map.is_empty()
            || self.token_audience.is_empty()
        {
            return Err(InjectError::Config(
                "configMap, registryConfigMap and tokenAudience must not be empty".into(),
            ));
        }
        let host_port = self.ca_address.rsplit_once(':');
        if !self.ca_address.is_empty()
            && !host_port
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        {
            return Err(InjectError::Config(format!(
                "caAddress: {:?} is not host:port (empty disables the workload identity)",
                self.ca_address
            )));
        }
        Ok(())
    }
}

impl Resources {
    fn new(requests: (&str, &str), limits: (&str, &str)) -> Self {
        let q = |(cpu, memory): (&str, &str)| Quantities {
            cpu: Some(cpu.into()),
            memory: Some(memory.into()),
        };
        Resources {
            requests: q(requests),
            limits: q(limits),
        }
    }
}

/// Injects every pod template in `documents`; other documents come back unchanged, in order.
/// `kind: List` documents are injected item by item.
pub fn inject(documents: Vec<Value>, config: &InjectConfig) -> Result<Injected, InjectError> {
    config.validate()?;
    let mut warnings = Vec::new();
    let mut out = Vec::with_capacity(documents.len());
    for (i, mut doc) in documents.into_iter().enumerate() {
        inject_document(&mut doc, i + 1, config, &mut warnings)?;
        out.push(doc);
    }
    Ok(Injected {
        documents: out,
        warnings,
    })
}

/// Injects one pod template (an object with `metadata` and `spec`, a Pod's or a workload's
/// `spec.template`) in place. The webhook's entry point.
pub fn inject_template(
    template: &mut Value,
    workload: &Workload,
    config: &InjectConfig,
) -> Result<Outcome, TemplateError> {
    pod::inject(template, workload, config)
}

/// The workload name the sidecar reports, as Istio derives it from a pod: the Deployment of a
/// ReplicaSet-owned pod (the owner's name less its `pod-template-hash`), another controller's
/// own name, or the pod's name (downward API) for a bare pod — which is what `isthmus-ctl
/// inject` and the webhook both give a Pod, so they inject a pod identically.
pub fn workload_of_pod(pod: &Value) -> Workload {
    let owner = pod
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .and_then(|refs| {
            refs.iter()
                .find(|r| r.get("controller") == Some(&Value::Bool(true)))
        });
    let Some(owner) = owner else {
        return Workload::PodName;
    };
    let (Some(kind), Some(name)) = (
        owner.get("kind").and_then(Value::as_str),
        owner.get("name").and_then(Value::as_str),
    ) else {
        return Workload::PodName;
    };
    let hash = pod
        .pointer("/metadata/labels/pod-template-hash")
        .and_then(Value::as_str);
    let name = match (kind, hash) {
        ("ReplicaSet", Some(hash)) => name
            .strip_suffix(hash)
            .and_then(|n| n.strip_suffix('-'))
            .unwrap_or(name),
        _ => name,
    };
    Workload::Named(name.to_owned())
}

/// Parses a YAML (or JSON) stream of any number of documents. Empty documents are dropped.
/// Plain scalars resolve as Kubernetes resolves them (YAML 1.1, through go-yaml): an unquoted
/// `on` or `yes` is `true`, `0644` is octal — so the output carries the values the API server
/// would have received from the input.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, InjectError> {
    let mut options = serde_saphyr::Options::default();
    options.legacy_octal_numbers = true;
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| InjectError::Yaml(e.to_string()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Writes documents as one YAML stream, `---` between documents. Keys come out sorted (as
/// `kubectl get -o yaml` prints them) and comments of the input are lost.
pub fn to_yaml(documents: &[Value]) -> Result<String, InjectError> {
    serde_saphyr::to_string_multiple(documents).map_err(|e| InjectError::Yaml(e.to_string()))
}

fn inject_document(
    doc: &mut Value,
    index: usize,
    config: &InjectConfig,
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    let kind = str_at(doc, "/kind").unwrap_or("").to_string();
    let name = str_at(doc, "/metadata/name").unwrap_or("").to_string();
    let fail = |reason| InjectError::Document {
        index,
        kind: kind.clone(),
        name: name.clone(),
        reason: Box::new(reason),
    };
    if kind == "List" {
        if let Some(Value::Array(items)) = doc.get_mut("items") {
            for item in items {
                inject_document(item, index, config, warnings)?;
            }
        }
        return Ok(());
    }
    let api_version = str_at(doc, "/apiVersion").unwrap_or("");
    let Some(pointer) = template_pointer(api_version, &kind) else {
        return Ok(());
    };
    let workload = if kind == "Pod" {
        workload_of_pod(doc)
    } else if name.is_empty() {
        Workload::PodName
    } else {
        Workload::Named(name.clone())
    };
    let template = match doc.pointer_mut(pointer) {
        Some(t @ Value::Object(_)) => t,
        _ => {
            let path = pointer.trim_start_matches('/').replace('/', ".");
            return Err(fail(shape(&path, "an object")));
        }
    };
    match pod::inject(template, &workload, config).map_err(fail)? {
        Outcome::Injected { warnings: w } => {
            warnings.extend(
                w.into_iter()
                    .map(|w| format!("document {index} ({kind} {name}): {w}")),
            );
        }
        Outcome::Skipped(why) => warnings.push(format!(
            "document {index} ({kind} {name}): not injected: {why}"
        )),
    }
    Ok(())
}

/// Where a kind keeps its pod template; `None` for kinds that have none (passed through).
fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("", "ReplicationController")
        | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn shape(path: &str, expected: &'static str) -> TemplateError {
    TemplateError::Shape {
        path: if path.is_empty() {
            "(the object)".into()
        } else {
            path.into()
        },
        expected,
    }
}

/// The object at `key`, created empty if absent.
fn object_at<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a mut Map<String, Value>, TemplateError> {
    let v = parent
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if v.is_null() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().ok_or_else(|| shape(path, "an object"))
}

/// The array at `key`, created empty if absent.
fn array_at<'a>(
    parent: &'a mut Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a mut Vec<Value>, TemplateError> {
    let v = parent
        .entry(key.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    if v.is_null() {
        *v = Value::Array(Vec::new());
    }
    v.as_array_mut().ok_or_else(|| shape(path, "a list"))
}

#[cfg(test)]
mod tests;
