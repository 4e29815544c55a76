//! Each meshed namespace's routing config as a pure function of the Istio objects: which
//! objects a namespace sees (Istio's `exportTo`, the root namespace's default `Sidecar`, one
//! object per host across namespaces), and the config assembled from them, checked with the
//! sidecar's own compiler so that what is written is what a sidecar accepts. No I/O.
//!
//! The sidecar compiles every document it is given as one flat set: it takes the namespaces
//! in the documents only to qualify short host names, and allows one `Sidecar`. So the
//! controller does the scoping: a namespace's config holds exactly the documents Istio would
//! apply to its pods.

use std::collections::{BTreeMap, HashMap};

use isthmus_config::{ConfigError, Issue, SourceFile};

use super::istio::{is_security_kind, Invalid, IstioObject, ObjectKey};

/// The routing ConfigMap's one key: a JSON stream, one document per line.
pub const ROUTING_KEY: &str = "config.json";

/// Istio's `exportTo` (on VirtualService, DestinationRule, ServiceEntry, and as the Service
/// annotation `networking.istio.io/exportTo`): empty means `*`; `.` is the owner's namespace;
/// `~` is nobody; other entries are namespace names. The owner's namespace is not implied.
pub fn visible(export_to: &[String], owner: &str, consumer: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => owner == consumer,
            "~" => false,
            ns => ns == consumer,
        })
}

/// The documents a namespace's sidecars are given, in the order they are written: the
/// namespace's own, then those of the root namespace, then the rest by namespace and name.
///
/// - VirtualService, DestinationRule, ServiceEntry: visible to `ns` by `exportTo`.
/// - Sidecar: the namespace's own; without one that has no `workloadSelector`, the root
///   namespace's (Istio: "a Sidecar in the root namespace without workloadSelector is the
///   default for namespaces that have none"). Sidecars are never exported.
/// - PeerAuthentication, AuthorizationPolicy: the namespace's own and the root namespace's
///   (mesh-wide); never another namespace's (they have no `exportTo`). The sidecar applies the
///   scopes' precedence itself.
/// - A host claimed by the namespace's own object shadows other namespaces' objects of the
///   same kind for that host; between imported ones Istio's order decides (for a
///   DestinationRule: the host's own namespace, then the root namespace, then any other), and
///   an object that loses any of its hosts is left out of this namespace's config — not
///   invalid, just not Istio's choice here.
pub fn candidates<'a>(objects: &'a [IstioObject], ns: &str, root: &str) -> Vec<&'a IstioObject> {
    let own_default = objects
        .iter()
        .any(|o| o.key.namespace == ns && o.is_namespace_sidecar());
    let mut own = Vec::new();
    let mut imported = Vec::new();
    for object in objects {
        let key = &object.key;
        if is_security_kind(&key.kind) {
            if key.namespace == ns {
                own.push(object);
            } else if key.namespace == root {
                imported.push(object);
            }
        } else if key.kind == "Sidecar" {
            if key.namespace == ns
                || (!own_default && key.namespace == root && object.is_namespace_sidecar())
            {
                own.push(object);
            }
        } else if visible(&object.export_to(), &key.namespace, ns) {
            if key.namespace == ns {
                own.push(object);
            } else {
                imported.push(object);
            }
        }
    }
    // Host claims: the namespace's own first (never shadowed), then imported by rank.
    let rank = |object: &IstioObject, host: &str| -> (u8, String, String) {
        let host_ns = host.split('.').nth(1).unwrap_or_default();
        let r = if object.key.namespace == host_ns {
            0
        } else if object.key.namespace == root {
            1
        } else {
            2
        };
        (r, object.key.namespace.clone(), object.key.name.clone())
    };
    let mut claims: HashMap<(&str, String), (u8, String, String)> = HashMap::new();
    for object in &own {
        for host in object.hosts() {
            claims.insert(
                (object.key.kind.as_str(), host),
                (0, String::new(), String::new()),
            );
        }
    }
    // A set: a namespace may import thousands of objects (istio#26060 had 30k VirtualServices).
    let own_hosts: std::collections::HashSet<(&str, String)> = claims.keys().cloned().collect();
    for object in &imported {
        for host in object.hosts() {
            let r = rank(object, &host);
            let slot = (object.key.kind.as_str(), host);
            if own_hosts.contains(&slot) {
                continue;
            }
            let best = claims.entry(slot).or_insert_with(|| r.clone());
            if r < *best {
                *best = r;
            }
        }
    }
    imported.retain(|object| {
        object.hosts().into_iter().all(|host| {
            let slot = (object.key.kind.as_str(), host.clone());
            !own_hosts.contains(&slot) && claims.get(&slot) == Some(&rank(object, &host))
        })
    });
    imported.sort_by_key(|o| {
        (
            o.key.namespace != root,
            o.key.namespace.clone(),
            o.key.name.clone(),
        )
    });
    own.extend(imported);
    own
}

/// Checks each object alone with the sidecar's parser (schema, field names, kinds): the ones
/// it rejects are left out everywhere and reported with the field the parser names.
pub fn parse_each(objects: Vec<IstioObject>) -> (Vec<IstioObject>, Vec<Invalid>) {
    let mut valid = Vec::with_capacity(objects.len());
    let mut invalid = Vec::new();
    for object in objects {
        let file = SourceFile::new(ROUTING_KEY, object.document.to_string());
        match isthmus_config::parse::parse_files(std::slice::from_ref(&file)) {
            Ok(_) => valid.push(object),
            Err(e) => invalid.extend(issues(e).into_iter().map(|issue| Invalid {
                key: object.key.clone(),
                origin: object.origin.clone(),
                field: issue.field,
                message: issue.message,
                consumer: None,
            })),
        }
    }
    (valid, invalid)
}

/// A namespace's routing config that its sidecars accept, with the objects left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// `config.json`: one document per line, in [`candidates`] order.
    pub text: String,
    pub left_out: Vec<Invalid>,
}

/// Assembles `ns`'s routing config from its candidates and checks it as its sidecars will load
/// it (the routing file beside the namespace's registry files). The first object the compiler
/// names in an issue is left out and the rest compiled again, until it compiles; issues that
/// name no candidate (a conflict with the registry) fail the whole: `Err` with the issues, and
/// the caller keeps the last config written. A compile per invalid object: they are few, and
/// the caller compiles again only when the inputs change.
pub fn assemble(
    ns: &str,
    candidates: &[&IstioObject],
    registry: &[SourceFile],
) -> Result<Assembled, Vec<Issue>> {
    if candidates.is_empty() {
        // The registry alone must load too (found in review: it was never checked, and a
        // namespace without Istio objects got whatever the registry held).
        let mut files = registry.to_vec();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        return match isthmus_config::load(&files) {
            Ok(_) => Ok(Assembled {
                text: String::new(),
                left_out: Vec::new(),
            }),
            Err(e) => Err(issues(e)),
        };
    }
    let mut kept: Vec<&IstioObject> = candidates.to_vec();
    let mut left_out = Vec::new();
    loop {
        let text = routing_text(&kept);
        let mut files = vec![SourceFile::new(ROUTING_KEY, text.clone())];
        files.extend(registry.iter().cloned());
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let issues = match isthmus_config::load(&files) {
            Ok(_) => return Ok(Assembled { text, left_out }),
            Err(e) => issues(e),
        };
        let named: BTreeMap<ObjectKey, Vec<&Issue>> =
            issues.iter().fold(BTreeMap::new(), |mut named, issue| {
                if let Some(key) = issue_object(issue) {
                    named.entry(key).or_default().push(issue);
                }
                named
            });
        // One object per pass, the first in order: the compiler names the later of two
        // conflicting documents, so an invalid object is left out before the one it shadows
        // (which may well be valid on its own) is blamed for the conflict.
        let Some(position) = kept.iter().position(|o| named.contains_key(&o.key)) else {
            return Err(issues);
        };
        let object = kept.remove(position);
        for issue in &named[&object.key] {
            left_out.push(Invalid {
                key: object.key.clone(),
                origin: object.origin.clone(),
                field: issue.field.clone(),
                message: issue.message.clone(),
                consumer: (object.key.namespace != ns).then(|| ns.to_owned()),
            });
        }
    }
}

/// The routing file's text: each document's JSON on one line.
pub fn routing_text(objects: &[&IstioObject]) -> String {
    let mut text = String::new();
    for object in objects {
        text.push_str(&object.document.to_string());
        text.push('\n');
    }
    text
}

fn issues(error: ConfigError) -> Vec<Issue> {
    match error {
        ConfigError::Invalid(issues) => issues,
        other => vec![Issue {
            location: ROUTING_KEY.into(),
            field: String::new(),
            message: other.to_string(),
        }],
    }
}

/// The object an issue names: its location is `<file>: <Kind> <namespace>/<name>`
/// ([`isthmus_config::parse::Document::location`]). Any file: a registry document with the
/// kind, namespace and name of a candidate (a ServiceEntry named like a Service of its
/// namespace) is a duplicate the candidate is blamed for — the Service is not the user's to
/// rename.
fn issue_object(issue: &Issue) -> Option<ObjectKey> {
    let (_file, rest) = issue.location.split_once(": ")?;
    let (kind, path) = rest.split_once(' ')?;
    let (namespace, name) = path.split_once('/')?;
    Some(ObjectKey {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests;
