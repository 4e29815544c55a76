//! The controller's Istio-API inputs: the `networking.istio.io/v1` and `security.istio.io/v1`
//! custom objects (watched as
//! `DynamicObject`s: k8s-openapi has no Istio types) and the documents of ConfigMaps labelled
//! `isthmus.io/istio-config: "true"` — the path for clusters without the Istio CRDs and for
//! users who keep routing in ConfigMaps. Both become [`IstioObject`]s: one document each, in the
//! shape the sidecar reads, with where it came from (what an Event about it is `regarding`).
//!
//! A kind whose CRD is not installed does not block readiness: its first list answers 404, the
//! kind is logged once and treated as empty, and it is probed again every minute, so a CRD
//! installed later is picked up without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::reflector::{store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use super::{drive, Status};

/// The label that makes a ConfigMap's YAML/JSON documents routing input of its namespace.
pub const ISTIO_CONFIG_LABEL: &str = "isthmus.io/istio-config";
/// The API group and version of the routing kinds.
pub const NETWORKING_API_VERSION: &str = "networking.istio.io/v1";
/// The API group and version of the security kinds ([`is_security_kind`]).
pub const SECURITY_API_VERSION: &str = "security.istio.io/v1";
/// The kinds watched, with their resource (plural) names and API group/version.
pub const KINDS: [(&str, &str, &str); 6] = [
    ("VirtualService", "virtualservices", NETWORKING_API_VERSION),
    (
        "DestinationRule",
        "destinationrules",
        NETWORKING_API_VERSION,
    ),
    ("ServiceEntry", "serviceentries", NETWORKING_API_VERSION),
    ("Sidecar", "sidecars", NETWORKING_API_VERSION),
    (
        "PeerAuthentication",
        "peerauthentications",
        SECURITY_API_VERSION,
    ),
    (
        "AuthorizationPolicy",
        "authorizationpolicies",
        SECURITY_API_VERSION,
    ),
];

/// The API group/version of a kind: its [`KINDS`] entry's, networking's for any other (a
/// ConfigMap document's own `apiVersion` replaces it).
pub fn api_version(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map_or(NETWORKING_API_VERSION, |(_, _, api_version)| api_version)
}

/// PeerAuthentication and AuthorizationPolicy: Istio applies a namespace's own and the root
/// namespace's (mesh-wide) ones to its workloads; they have no `exportTo` and no hosts.
pub fn is_security_kind(kind: &str) -> bool {
    api_version(kind) == SECURITY_API_VERSION
}
/// How often a kind whose CRD is missing is looked for again (one list call).
const ABSENT_PROBE: Duration = Duration::from_secs(60);

/// An Istio object's identity within the mesh: what `exportTo`, shadowing and the sidecar's
/// own duplicate check key on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Where a document came from: Events about it are `regarding` this.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// A custom object of the Istio API.
    Object { uid: Option<String> },
    /// A document in the key `key` of a ConfigMap labelled [`ISTIO_CONFIG_LABEL`].
    ConfigMap {
        name: String,
        key: String,
        uid: Option<String>,
    },
}

/// One Istio document: `document` is what goes into the sidecar's config (apiVersion, kind,
/// metadata {name, namespace, and creationTimestamp when known: the sidecar orders
/// PeerAuthentications by it}, spec — nothing else).
#[derive(Debug, Clone, PartialEq)]
pub struct IstioObject {
    pub key: ObjectKey,
    pub origin: Origin,
    pub document: Value,
}

/// A document that cannot be used, and why (`field` is a dotted path, empty for the whole).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Invalid {
    pub key: ObjectKey,
    pub origin: Origin,
    pub field: String,
    pub message: String,
    /// The namespace whose config it was left out of, when not its own (a conflict with what
    /// that namespace imports).
    pub consumer: Option<String>,
}

impl IstioObject {
    /// A document in the sidecar's shape. `namespace` is the object's (a ConfigMap's document
    /// is its ConfigMap's).
    pub fn new(kind: &str, namespace: &str, name: &str, spec: Value, origin: Origin) -> Self {
        IstioObject {
            key: ObjectKey {
                kind: kind.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            origin,
            document: json!({
                "apiVersion": api_version(kind),
                "kind": kind,
                "metadata": {"name": name, "namespace": namespace},
                "spec": spec,
            }),
        }
    }

    /// A watched custom object; `None` without a name or namespace.
    pub fn from_dynamic(kind: &str, object: &DynamicObject) -> Option<Self> {
        let spec = object.data.get("spec").cloned().unwrap_or(json!({}));
        let mut istio = IstioObject::new(
            kind,
            object.metadata.namespace.as_deref()?,
            object.metadata.name.as_deref()?,
            spec,
            Origin::Object {
                uid: object.metadata.uid.clone(),
            },
        );
        if let Some(created) = &object.metadata.creation_timestamp {
            istio.set_creation_timestamp(json!(created));
        }
        Some(istio)
    }

    /// Keeps `metadata.creationTimestamp` in the document: of the security kinds only (a
    /// routing document's would change the config's version with every re-creation).
    fn set_creation_timestamp(&mut self, created: Value) {
        if is_security_kind(&self.key.kind) && !created.is_null() {
            self.document["metadata"]["creationTimestamp"] = created;
        }
    }

    /// `spec.exportTo` (VirtualService, DestinationRule, ServiceEntry); empty means `*`.
    pub fn export_to(&self) -> Vec<String> {
        string_list(&self.document["spec"]["exportTo"])
    }

    /// The hosts the document claims, fully qualified: `spec.hosts` (VirtualService,
    /// ServiceEntry) or `spec.host` (DestinationRule).
    pub fn hosts(&self) -> Vec<String> {
        let spec = &self.document["spec"];
        let mut hosts = string_list(&spec["hosts"]);
        hosts.extend(spec["host"].as_str().map(str::to_owned));
        hosts
            .iter()
            .map(|h| isthmus_config::compile::qualify(h, &self.key.namespace))
            .collect()
    }

    /// A Sidecar without `workloadSelector`: the default of its namespace (or, in the root
    /// namespace, of every namespace without one).
    pub fn is_namespace_sidecar(&self) -> bool {
        self.key.kind == "Sidecar" && self.document["spec"].get("workloadSelector").is_none()
    }
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// The documents of a ConfigMap labelled [`ISTIO_CONFIG_LABEL`], as objects of its namespace,
/// and the ones that cannot be read (bad YAML, no kind or name, another namespace).
pub fn from_config_map(config_map: &ConfigMap) -> (Vec<IstioObject>, Vec<Invalid>) {
    let (mut objects, mut invalid) = (Vec::new(), Vec::new());
    let (Some(ns), Some(cm_name)) = (
        config_map.metadata.namespace.as_deref(),
        config_map.metadata.name.as_deref(),
    ) else {
        return (objects, invalid);
    };
    let uid = config_map.metadata.uid.clone();
    for (key, text) in config_map.data.iter().flatten() {
        if !isthmus_config::source::is_config_file(key) {
            continue;
        }
        let origin = Origin::ConfigMap {
            name: cm_name.to_owned(),
            key: key.clone(),
            uid: uid.clone(),
        };
        let problem = |field: &str, message: String| Invalid {
            key: ObjectKey {
                kind: "ConfigMap".into(),
                namespace: ns.to_owned(),
                name: cm_name.to_owned(),
            },
            origin: origin.clone(),
            field: field.to_owned(),
            message,
            consumer: None,
        };
        // YAML is a superset of JSON: one reader for both (a JSON stream of several documents
        // is read by the sidecar too, so it is split here by serde_json).
        let documents: Result<Vec<Value>, String> = if key.ends_with(".json") {
            serde_json::Deserializer::from_str(text)
                .into_iter::<Value>()
                .collect::<Result<Vec<Value>, _>>()
                .map(|docs| {
                    docs.into_iter()
                        .flat_map(|d| match d {
                            Value::Array(items) => items,
                            other => vec![other],
                        })
                        .collect()
                })
                .map_err(|e| format!("invalid JSON: {e}"))
        } else {
            serde_saphyr::from_multiple::<Value>(text).map_err(|e| {
                let e = e.to_string();
                format!("invalid YAML: {}", e.lines().next().unwrap_or_default())
            })
        };
        let documents = match documents {
            Ok(documents) => documents,
            Err(message) => {
                invalid.push(problem(&format!("data.{key}"), message));
                continue;
            }
        };
        for (index, document) in documents.into_iter().enumerate() {
            if document.is_null() {
                continue;
            }
            let field = format!("data.{key}: document {}", index + 1);
            let (Some(kind), Some(name)) = (
                document["kind"].as_str(),
                document["metadata"]["name"].as_str(),
            ) else {
                invalid.push(problem(
                    &field,
                    "a document needs kind and metadata.name".into(),
                ));
                continue;
            };
            match document["metadata"]["namespace"].as_str() {
                Some(other) if other != ns => {
                    invalid.push(problem(
                        &field,
                        format!("metadata.namespace `{other}` is not the ConfigMap's namespace `{ns}` (a ConfigMap's documents belong to its namespace)"),
                    ));
                    continue;
                }
                _ => {}
            }
            let mut object = IstioObject::new(
                kind,
                ns,
                name,
                document.get("spec").cloned().unwrap_or(json!({})),
                origin.clone(),
            );
            object.set_creation_timestamp(document["metadata"]["creationTimestamp"].clone());
            // Everything else is kept as written, so the sidecar's strict parser judges it
            // (an unknown apiVersion or field is an error there, reported here).
            if let (Some(out), Some(doc)) = (object.document.as_object_mut(), document.as_object())
            {
                for (k, v) in doc {
                    if k != "metadata" && k != "spec" {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            objects.push(object);
        }
    }
    (objects, invalid)
}

/// The stores of one watched kind and whether its CRD was found.
pub struct KindStores {
    pub kind: &'static str,
    pub stores: Vec<Store<DynamicObject>>,
    /// `Some(false)` once the first list answered 404; `Some(true)` once it listed.
    found: watch::Receiver<Option<bool>>,
}

impl KindStores {
    /// Ready when listed, or when its CRD is known to be missing.
    pub async fn wait_until_ready(&self) -> bool {
        let mut found = self.found.clone();
        let Ok(found) = found.wait_for(Option::is_some).await.map(|f| *f) else {
            return false;
        };
        if found == Some(true) {
            for store in &self.stores {
                if store.wait_until_ready().await.is_err() {
                    return false;
                }
            }
        }
        true
    }

    pub fn objects(&self) -> Vec<IstioObject> {
        self.stores
            .iter()
            .flat_map(Store::state)
            .filter_map(|o| IstioObject::from_dynamic(self.kind, &o))
            .collect()
    }
}

/// Starts the watchers of every Istio kind, in `namespaces` (empty: all).
pub fn watch_kinds(
    client: &Client,
    namespaces: &[String],
    notify: &Arc<Notify>,
    status: &Arc<Status>,
) -> Vec<KindStores> {
    KINDS
        .iter()
        .map(|(kind, plural, api_version)| {
            let (group, version) = api_version.split_once('/').unwrap_or_default();
            let resource = ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: (*api_version).into(),
                kind: (*kind).into(),
                plural: (*plural).into(),
            };
            let apis: Vec<Api<DynamicObject>> = if namespaces.is_empty() {
                vec![Api::all_with(client.clone(), &resource)]
            } else {
                namespaces
                    .iter()
                    .map(|ns| Api::namespaced_with(client.clone(), ns, &resource))
                    .collect()
            };
            let (found_tx, found) = watch::channel(None);
            let found_tx = Arc::new(found_tx);
            let stores = apis
                .into_iter()
                .map(|api| {
                    let writer = Writer::new(resource.clone());
                    let reader = writer.as_reader();
                    tokio::spawn(watch_kind(
                        api,
                        kind,
                        writer,
                        found_tx.clone(),
                        notify.clone(),
                        status.clone(),
                    ));
                    reader
                })
                .collect();
            KindStores {
                kind,
                stores,
                found,
            }
        })
        .collect()
}

/// Probes the kind (one list) until its CRD exists, then watches it into `writer`.
async fn watch_kind(
    api: Api<DynamicObject>,
    kind: &'static str,
    writer: Writer<DynamicObject>,
    found: Arc<watch::Sender<Option<bool>>>,
    notify: Arc<Notify>,
    status: Arc<Status>,
) {
    let mut logged = false;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if !logged {
                    tracing::info!(kind, "the {kind} CRD ({}) is not installed: treated as empty, looked for again every minute", api_version(kind));
                    logged = true;
                }
                found.send_if_modified(|f| {
                    let changed = f.is_none();
                    f.get_or_insert(false);
                    changed
                });
                tokio::time::sleep(ABSENT_PROBE).await;
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, "listing {kind} failed; retrying (may the controller list {} resources?)", api_version(kind));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    if logged {
        tracing::info!(kind, "the {kind} CRD is installed now: watching it");
    }
    found.send_replace(Some(true));
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|object: &mut DynamicObject| object.managed_fields_mut().clear())
        .reflect(writer);
    drive(stream, kind, notify, status).await;
}

/// Every Istio object of the cluster: the custom objects, then the ConfigMaps' documents. A
/// ConfigMap document with the kind, namespace and name of a custom object is left out and
/// reported (the custom object wins: it is the API's own). Sorted by key.
pub fn collect(
    kinds: &[KindStores],
    config_maps: &[Arc<ConfigMap>],
) -> (Vec<IstioObject>, Vec<Invalid>) {
    let mut by_key: BTreeMap<ObjectKey, IstioObject> = BTreeMap::new();
    let mut invalid = Vec::new();
    for object in kinds.iter().flat_map(KindStores::objects) {
        by_key.insert(object.key.clone(), object);
    }
    // The watch's label selector already chose these; checked again so that an API server
    // that ignores selectors (the test emulator does) cannot make the controller read its own.
    let labelled = config_maps.iter().filter(|cm| {
        cm.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ISTIO_CONFIG_LABEL))
            .is_some_and(|v| v == "true")
    });
    for config_map in labelled {
        let (objects, problems) = from_config_map(config_map);
        invalid.extend(problems);
        for object in objects {
            if let Some(first) = by_key.get(&object.key) {
                let message = match &first.origin {
                    Origin::Object { .. } => {
                        "duplicate: a custom object of this kind and name exists".to_owned()
                    }
                    Origin::ConfigMap { name, key, .. } => {
                        format!("duplicate: also defined in ConfigMap {name}, key {key}")
                    }
                };
                invalid.push(Invalid {
                    key: object.key.clone(),
                    origin: object.origin.clone(),
                    field: "metadata.name".into(),
                    message,
                    consumer: None,
                });
                continue;
            }
            by_key.insert(object.key.clone(), object);
        }
    }
    (by_key.into_values().collect(), invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_map(data: &[(&str, &str)]) -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": "routes", "namespace": "shop", "uid": "u1"},
            "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap()
    }

    #[test]
    fn config_map_documents_become_objects_of_its_namespace() {
        let cm = config_map(&[
            ("vs.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec: {hosts: [reviews]}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: other}\nspec: {}\n"),
            ("notes.txt", "ignored"),
            ("bad.yaml", "a: [b"),
        ]);
        let (objects, invalid) = from_config_map(&cm);
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].key.to_string(), "VirtualService shop/r");
        assert_eq!(
            objects[0].hosts(),
            ["reviews.shop.svc.cluster.local".to_owned()]
        );
        assert_eq!(invalid.len(), 2, "{invalid:?}");
        assert!(
            invalid[0].field == "data.bad.yaml" && invalid[0].message.starts_with("invalid YAML")
        );
        assert!(invalid[1]
            .message
            .contains("`other` is not the ConfigMap's namespace"));
    }

    #[test]
    fn security_kinds_keep_their_api_version_and_creation_timestamp() {
        let dynamic: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "p", "namespace": "shop", "uid": "u2",
                         "creationTimestamp": "2026-11-22T10:00:00Z"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }))
        .unwrap();
        let object = IstioObject::from_dynamic("PeerAuthentication", &dynamic).unwrap();
        assert_eq!(object.document["apiVersion"], "security.istio.io/v1");
        assert_eq!(
            object.document["metadata"]["creationTimestamp"],
            "2026-11-22T10:00:00Z"
        );
        let cm = config_map(&[(
            "policy.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, creationTimestamp: '2026-11-22T11:00:00Z'}\nspec: {}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, creationTimestamp: '2026-11-22T11:00:00Z'}\nspec: {}\n",
        )]);
        let (objects, invalid) = from_config_map(&cm);
        assert!(invalid.is_empty(), "{invalid:?}");
        assert_eq!(
            objects[0].document["metadata"]["creationTimestamp"],
            "2026-11-22T11:00:00Z"
        );
        assert!(objects[1].document["metadata"]
            .get("creationTimestamp")
            .is_none());
        assert!(is_security_kind("AuthorizationPolicy") && !is_security_kind("Sidecar"));
    }
}
