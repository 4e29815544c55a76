//! Strict parsing: YAML text → typed Istio documents. Each document is read into a generic
//! tree first so that the kind can be checked before the spec, and so that a field error can
//! name its path (`spec.tcp[0].route[0].weight`).

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ConfigError, Issue};
use crate::source::SourceFile;
use crate::wire::{
    AuthorizationPolicySpec, DestinationRuleSpec, Metadata, PeerAuthenticationSpec,
    ServiceEntrySpec, SidecarSpec, VirtualServiceSpec,
};

/// A parsed document and where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: String,
    pub kind: &'static str,
    pub metadata: Metadata,
    pub resource: Resource,
}

#[derive(Debug, Clone)]
pub enum Resource {
    ServiceEntry(ServiceEntrySpec),
    VirtualService(VirtualServiceSpec),
    /// Boxed: a traffic policy is large and DestinationRules are few.
    DestinationRule(Box<DestinationRuleSpec>),
    Sidecar(SidecarSpec),
    PeerAuthentication(PeerAuthenticationSpec),
    /// Boxed: rules are large and policies few.
    AuthorizationPolicy(Box<AuthorizationPolicySpec>),
}

impl Document {
    /// `file.yaml: VirtualService default/reviews`: how every issue names its document.
    pub fn location(&self) -> String {
        format!(
            "{}: {} {}/{}",
            self.file,
            self.kind,
            self.namespace(),
            self.metadata.name
        )
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
}

const NETWORKING: &str = "networking.istio.io";
const NETWORKING_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const SECURITY: &str = "security.istio.io";
const SECURITY_VERSIONS: &[&str] = &["v1", "v1beta1"];

/// Fields users will reach for that are known Istio API but not implemented yet: the error
/// says so instead of only "unknown field".
const NOT_YET: &[(&str, &str)] = &[
    ("tls", "TLS routes arrive with mTLS"),
    ("gateways", "gateways are not part of isthmus"),
    (
        "workloadSelector",
        "workloadSelector is not implemented: a DestinationRule or ServiceEntry applies to \
         every sidecar that loads it",
    ),
    (
        "sourceLabels",
        "sourceLabels matches are not implemented for tcp routes yet",
    ),
    (
        "ingress",
        "Sidecar ingress listeners are not implemented yet",
    ),
    (
        "targetRef",
        "targetRef attaches a policy to a gateway or waypoint, which isthmus does not have; \
         use `selector`",
    ),
    (
        "targetRefs",
        "targetRefs attach a policy to a gateway or waypoint, which isthmus does not have; \
         use `selector`",
    ),
    (
        "provider",
        "the CUSTOM action (external authorization) is not supported yet",
    ),
    (
        "requestPrincipals",
        "request principals come from RequestAuthentication (JWT), which isthmus does not \
         implement yet",
    ),
    (
        "notRequestPrincipals",
        "request principals come from RequestAuthentication (JWT), which isthmus does not \
         implement yet",
    ),
];

/// Kinds that belong to later milestones: named, so the error is not a puzzle.
const KINDS_NOT_YET: &[(&str, &str)] = &[
    ("RequestAuthentication", "is not implemented"),
    ("Gateway", "is not part of isthmus (no ingress gateway)"),
    (
        "WorkloadEntry",
        "is not implemented; use ServiceEntry endpoints",
    ),
    ("WorkloadGroup", "is not implemented"),
    (
        "EnvoyFilter",
        "will never be implemented (there is no Envoy)",
    ),
    ("Telemetry", "is not implemented yet"),
    ("ProxyConfig", "is not implemented yet"),
];

/// Parses every file; collects every issue rather than stopping at the first.
pub fn parse_files(files: &[SourceFile]) -> Result<Vec<Document>, ConfigError> {
    let mut documents = Vec::new();
    let mut issues = Vec::new();
    // The trust bundle is read with the config (it counts in the version), not parsed.
    for file in files
        .iter()
        .filter(|f| crate::source::is_config_file(&f.name))
    {
        parse_file(file, &mut documents, &mut issues);
    }
    if issues.is_empty() {
        Ok(documents)
    } else {
        Err(ConfigError::Invalid(issues))
    }
}

/// The YAML parser's resource budget. The defaults (1,024 documents, 250k nodes) guard a
/// general-purpose parser against document storms, but a mesh registry is one document per
/// service: sized here for a ConfigMap-scale config with room to spare (tens of thousands of
/// services), while alias-expansion and nesting limits stay at their protective defaults.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 50_000_000;
    budget.max_events = 100_000_000;
    budget.max_total_scalar_bytes = 512 * 1024 * 1024;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

fn read_yaml(file: &SourceFile) -> Result<Vec<Value>, String> {
    serde_saphyr::from_multiple_with_options(&file.text, yaml_options())
        .map_err(|e| format!("invalid YAML: {}", first_line(&e.to_string())))
}

/// A JSON document whose spec is left as raw text until its kind is known, so a large
/// registry is deserialized straight into typed specs without building a JSON tree first
/// (the tree's allocations dominated load time).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JsonEnvelope<'a> {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(borrow, default)]
    spec: Option<&'a serde_json::value::RawValue>,
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

/// `*.json`: one document, an array of documents, or a stream of them.
fn read_json(file: &SourceFile) -> Result<Vec<JsonEnvelope<'_>>, String> {
    let text = file.text.trim_start();
    let invalid = |e: serde_json::Error| format!("invalid JSON: {e}");
    if text.starts_with('[') {
        serde_json::from_str(text).map_err(invalid)
    } else {
        serde_json::Deserializer::from_str(text)
            .into_iter::<JsonEnvelope<'_>>()
            .collect::<Result<_, _>>()
            .map_err(invalid)
    }
}

/// Where a document's spec comes from.
enum Spec<'a> {
    Tree(Value),
    Raw(Option<&'a serde_json::value::RawValue>),
}

impl Spec<'_> {
    fn typed<T: DeserializeOwned>(self) -> Result<T, FieldError> {
        match self {
            Spec::Tree(value) => typed("spec", value),
            Spec::Raw(None) => typed("spec", Value::Null),
            Spec::Raw(Some(raw)) => {
                let mut de = serde_json::Deserializer::from_str(raw.get());
                serde_path_to_error::deserialize(&mut de).map_err(path_error("spec"))
            }
        }
    }
}

fn parse_file(file: &SourceFile, out: &mut Vec<Document>, issues: &mut Vec<Issue>) {
    // One entry per document in the file; `None` for an empty one (e.g. a trailing `---`).
    let documents: Result<Vec<Option<Result<Document, FieldError>>>, String> =
        if file.name.ends_with(".json") {
            read_json(file).map(|docs| {
                docs.into_iter()
                    .map(|doc| Some(json_document(&file.name, doc)))
                    .collect()
            })
        } else {
            read_yaml(file).map(|values| {
                values
                    .into_iter()
                    .map(|value| (!value.is_null()).then(|| parse_document(&file.name, value)))
                    .collect()
            })
        };
    let documents = match documents {
        Ok(documents) => documents,
        Err(message) => {
            issues.push(Issue {
                location: file.name.clone(),
                field: String::new(),
                message,
            });
            return;
        }
    };
    for (index, document) in documents.into_iter().enumerate() {
        match document {
            None => {}
            Some(Ok(doc)) => out.push(doc),
            Some(Err((field, message))) => issues.push(Issue {
                location: format!("{}: document {}", file.name, index + 1),
                field,
                message,
            }),
        }
    }
}

fn json_document(file: &str, doc: JsonEnvelope<'_>) -> Result<Document, FieldError> {
    let metadata = match doc.metadata {
        Some(metadata) => metadata,
        None => typed("metadata", Value::Null)?,
    };
    build_document(
        file,
        doc.api_version,
        doc.kind,
        metadata,
        Spec::Raw(doc.spec),
    )
}

type FieldError = (String, String);

fn parse_document(file: &str, value: Value) -> Result<Document, FieldError> {
    let Value::Object(mut map) = value else {
        return Err((String::new(), "a document must be a mapping".into()));
    };
    let api_version = take_string(&mut map, "apiVersion")?;
    let kind = take_string(&mut map, "kind")?;
    let metadata: Metadata = typed("metadata", map.remove("metadata").unwrap_or(Value::Null))?;
    let spec = map.remove("spec").unwrap_or(Value::Null);
    map.remove("status"); // copied from a cluster: harmless, never read
    if let Some(key) = map.keys().next() {
        return Err((key.clone(), "unknown top-level field".into()));
    }
    build_document(file, api_version, kind, metadata, Spec::Tree(spec))
}

/// Checks the kind and apiVersion and reads the spec as that kind's type.
fn build_document(
    file: &str,
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec<'_>,
) -> Result<Document, FieldError> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let named = |k: &'static str| -> Result<&'static str, FieldError> {
        if group != NETWORKING || !NETWORKING_VERSIONS.contains(&version) {
            return Err((
                "apiVersion".into(),
                format!("{k} must be {NETWORKING}/v1 (or v1beta1, v1alpha3), got `{api_version}`"),
            ));
        }
        Ok(k)
    };
    let security = |k: &'static str| -> Result<&'static str, FieldError> {
        if group != SECURITY || !SECURITY_VERSIONS.contains(&version) {
            return Err((
                "apiVersion".into(),
                format!("{k} must be {SECURITY}/v1 (or v1beta1), got `{api_version}`"),
            ));
        }
        Ok(k)
    };
    let (kind, resource) = match kind.as_str() {
        "ServiceEntry" => (
            named("ServiceEntry")?,
            Resource::ServiceEntry(spec.typed()?),
        ),
        "VirtualService" => (
            named("VirtualService")?,
            Resource::VirtualService(spec.typed()?),
        ),
        "DestinationRule" => (
            named("DestinationRule")?,
            Resource::DestinationRule(Box::new(spec.typed()?)),
        ),
        "Sidecar" => (named("Sidecar")?, Resource::Sidecar(spec.typed()?)),
        "PeerAuthentication" => (
            security("PeerAuthentication")?,
            Resource::PeerAuthentication(spec.typed()?),
        ),
        "AuthorizationPolicy" => (
            security("AuthorizationPolicy")?,
            Resource::AuthorizationPolicy(Box::new(spec.typed()?)),
        ),
        other => {
            let why = KINDS_NOT_YET
                .iter()
                .find(|(k, _)| *k == other)
                .map(|(_, why)| format!("kind `{other}` {why}"))
                .unwrap_or_else(|| {
                    format!(
                        "unknown kind `{other}`: expected ServiceEntry, VirtualService, \
                         DestinationRule, Sidecar, PeerAuthentication or AuthorizationPolicy"
                    )
                });
            return Err(("kind".into(), why));
        }
    };
    if metadata.name.is_empty() {
        return Err(("metadata.name".into(), "must not be empty".into()));
    }
    Ok(Document {
        file: file.to_string(),
        kind,
        metadata,
        resource,
    })
}

fn take_string(map: &mut serde_json::Map<String, Value>, key: &str) -> Result<String, FieldError> {
    match map.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err((key.into(), "must be a string".into())),
        None => Err((key.into(), "is required".into())),
    }
}

/// Deserializes `value` as `T`, reporting the full path of the first bad field.
fn typed<T: DeserializeOwned>(root: &str, value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(path_error(root))
}

fn path_error<E: std::fmt::Display>(
    root: &str,
) -> impl FnOnce(serde_path_to_error::Error<E>) -> FieldError + '_ {
    move |e| {
        let inner = e.path().to_string();
        let path = if inner == "." {
            root.to_string()
        } else {
            format!("{root}.{inner}")
        };
        // serde_json appends a position inside the spec's text; the path says more.
        let message = e.inner().to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        (path, explain(message))
    }
}

/// Adds "not implemented yet" context to serde's unknown-field message when the field is real
/// Istio API that isthmus has not built yet.
fn explain(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, _)) = rest.split_once('`') {
            if let Some((_, why)) = NOT_YET.iter().find(|(f, _)| *f == field) {
                return format!("field `{field}` is not supported: {why}");
            }
        }
    }
    message.to_string()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Document>, Vec<String>> {
        parse_files(&[SourceFile::new("mesh.yaml", text)]).map_err(|e| e.issues())
    }

    #[test]
    fn parses_multi_document_files() {
        let docs = parse(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a, namespace: shop}\n\
             spec: {hosts: [a.shop.svc.cluster.local], ports: [{number: 80, name: http}]}\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: b}\n\
             spec: {host: a, subsets: [{name: v1, labels: {version: v1}}]}\n---\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].location(), "mesh.yaml: ServiceEntry shop/a");
        assert_eq!(docs[1].namespace(), "default");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let err = parse(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
             spec: {hosts: [a], tcp: [{route: [{destination: {host: a}, weigth: 5}]}]}\n",
        )
        .unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(
            err[0].starts_with("mesh.yaml: document 1: spec.tcp[0].route[0]"),
            "{err:?}"
        );
        assert!(err[0].contains("unknown field `weigth`"), "{err:?}");
    }

    #[test]
    fn not_yet_implemented_fields_and_kinds_say_so() {
        let err = parse(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
             spec: {hosts: [a], tls: []}\n---\n\
             apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: p}\nspec: {}\n",
        )
        .unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(
            err[0].contains("`tls` is not supported: TLS routes arrive with mTLS"),
            "{err:?}"
        );
        assert!(
            err[1].contains("document 2: kind: kind `RequestAuthentication` is not implemented"),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_is_rejected_clearly() {
        let err = parse("{ this is: [not yaml").unwrap_err();
        assert!(err[0].starts_with("mesh.yaml: invalid YAML"), "{err:?}");
        let err = parse("- a\n- b\n").unwrap_err();
        assert!(err[0].contains("a document must be a mapping"), "{err:?}");
        let err = parse("kind: ServiceEntry\nmetadata: {name: a}\n").unwrap_err();
        assert!(err[0].contains("apiVersion: is required"), "{err:?}");
        let err = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n").unwrap_err();
        assert!(err[0].contains("unknown kind `ConfigMap`"), "{err:?}");
        let err = parse("apiVersion: v1\nkind: ServiceEntry\nmetadata: {name: a}\n").unwrap_err();
        assert!(err[0].contains("apiVersion: ServiceEntry must be networking.istio.io/v1"));
    }

    /// A registry is one document per service: far more than a generic parser's budget allows.
    #[test]
    fn large_registries_parse() {
        let doc = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec: {hosts: [a]}\n---\n";
        let docs = parse(&doc.repeat(5_000)).unwrap();
        assert_eq!(docs.len(), 5_000);
    }

    #[test]
    fn alias_bombs_are_still_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..12 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("l{}", i - 1)
            };
            bomb.push_str(&format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let err = parse(&bomb).unwrap_err();
        assert!(err[0].contains("invalid YAML"), "{err:?}");
    }

    #[test]
    fn json_files_hold_documents_arrays_or_streams() {
        let doc = r#"{"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "a"}, "spec": {"hosts": ["a"]}}"#;
        let named = |n: &str| doc.replace("\"a\"}", &format!("\"{n}\"}}"));
        let files = [
            SourceFile::new("one.json", doc),
            SourceFile::new("array.json", format!("[{}, {}]", named("b"), named("c"))),
            SourceFile::new("stream.json", format!("{}\n{}", named("d"), named("e"))),
        ];
        let docs = parse_files(&files).unwrap();
        let names: Vec<&str> = docs.iter().map(|d| d.metadata.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        let err = parse_files(&[SourceFile::new("bad.json", "{\"kind\": ")])
            .unwrap_err()
            .issues();
        assert!(err[0].starts_with("bad.json: invalid JSON"), "{err:?}");
        let err = parse_files(&[SourceFile::new("f.json", doc.replace("hosts", "hostz"))])
            .unwrap_err()
            .issues();
        assert!(err[0].contains("unknown field `hostz`"), "{err:?}");
    }

    #[test]
    fn empty_input_is_no_documents() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("---\n").unwrap().is_empty());
    }
}
