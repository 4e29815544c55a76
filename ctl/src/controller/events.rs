//! Reporting invalid Istio resources where their authors look: a Kubernetes Event
//! (events.k8s.io/v1, type Warning, reason `InvalidConfig`) regarding the object — or the
//! ConfigMap that holds the document — with a note naming the field and the problem, and a log
//! line naming namespace, kind, name and field. Both only when an object's problem changes, not
//! on every reconcile; an object that becomes valid is forgotten, so a relapse is reported.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use super::istio::{api_version, Invalid, ObjectKey, Origin};
use super::registry_check::SERVICE_KIND;

/// The Event's reason.
pub const INVALID_REASON: &str = "InvalidConfig";
/// The Event's `reportingController`.
pub const REPORTING_CONTROLLER: &str = "isthmus.io/controller";
/// The API server refuses notes longer than 1 kB.
const MAX_NOTE: usize = 1000;

/// What was reported, per object (and origin): the note of its last Event.
#[derive(Debug, Default)]
pub struct Reporter {
    reported: HashMap<(ObjectKey, Origin), String>,
}

impl Reporter {
    /// Reports what changed since the last call: an Event and a log line for each object whose
    /// note differs from the last one reported. An Event that cannot be written is logged and
    /// tried again on the next call.
    pub async fn report(&mut self, client: &Client, instance: &str, invalid: &[Invalid]) {
        let notes = notes(invalid);
        self.reported.retain(|key, _| notes.contains_key(key));
        for ((key, origin), note) in notes {
            if self.reported.get(&(key.clone(), origin.clone())) == Some(&note) {
                continue;
            }
            tracing::warn!(namespace = %key.namespace, kind = %key.kind, name = %key.name, problem = %note,
                "invalid Istio resource left out of the config");
            match post(client, instance, &key, &origin, &note).await {
                Ok(()) => {
                    self.reported.insert((key, origin), note);
                }
                Err(e) => {
                    tracing::warn!(namespace = %key.namespace, error = %e, "writing an Event failed; retrying (may the controller create events.k8s.io events?)");
                }
            }
        }
    }
}

/// One note per object: its first problem (sorted, so stable), and how many more there are.
pub fn notes(invalid: &[Invalid]) -> BTreeMap<(ObjectKey, Origin), String> {
    let mut by_object: BTreeMap<(ObjectKey, Origin), Vec<&Invalid>> = BTreeMap::new();
    for problem in invalid {
        by_object
            .entry((problem.key.clone(), problem.origin.clone()))
            .or_default()
            .push(problem);
    }
    by_object
        .into_iter()
        .map(|(object, mut problems)| {
            problems.sort();
            problems.dedup_by(|a, b| a.field == b.field && a.message == b.message);
            let first = problems[0];
            let mut note = String::new();
            if let Origin::ConfigMap { key, .. } = &object.1 {
                if object.0.kind != "ConfigMap" {
                    note.push_str(&format!("{key}: {}: ", object.0));
                }
            }
            if !first.field.is_empty() {
                note.push_str(&first.field);
                note.push_str(": ");
            }
            note.push_str(&first.message);
            // Which importing namespace is not named: the note (the Event's identity) must not
            // change as namespaces join or leave (found in review: a new Event each time).
            if first.consumer.is_some() {
                note.push_str(" (in the config of a namespace that imports it)");
            }
            if problems.len() > 1 {
                note.push_str(&format!(" (and {} more)", problems.len() - 1));
            }
            if note.len() > MAX_NOTE {
                let mut end = MAX_NOTE;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            (object, note)
        })
        .collect()
}

/// What the Event is about: the custom object, or the ConfigMap holding the document.
fn regarding(key: &ObjectKey, origin: &Origin) -> ObjectReference {
    match origin {
        Origin::Object { uid } => ObjectReference {
            // A Service whose registry entry the sidecar rejects is core/v1.
            api_version: Some(if key.kind == SERVICE_KIND {
                "v1".into()
            } else {
                api_version(&key.kind).into()
            }),
            kind: Some(key.kind.clone()),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            uid: uid.clone(),
            ..ObjectReference::default()
        },
        Origin::ConfigMap { name, uid, .. } => ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            namespace: Some(key.namespace.clone()),
            name: Some(name.clone()),
            uid: uid.clone(),
            ..ObjectReference::default()
        },
    }
}

async fn post(
    client: &Client,
    instance: &str,
    key: &ObjectKey,
    origin: &Origin,
    note: &str,
) -> Result<(), kube::Error> {
    let regarding = regarding(key, origin);
    let now = k8s_openapi::jiff::Timestamp::now();
    // Unique per object and time, as kubectl's recorder names them.
    let name = format!(
        "{}.{:x}",
        regarding.name.as_deref().unwrap_or("isthmus"),
        now.as_nanosecond()
    );
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(key.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding),
        note: Some(note.to_owned()),
        reason: Some(INVALID_REASON.into()),
        type_: Some("Warning".into()),
        action: Some("Validate".into()),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.to_owned()),
        ..Event::default()
    };
    Api::<Event>::namespaced(client.clone(), &key.namespace)
        .create(&PostParams::default(), &event)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(name: &str, field: &str, message: &str, origin: Origin) -> Invalid {
        Invalid {
            key: ObjectKey {
                kind: "VirtualService".into(),
                namespace: "shop".into(),
                name: name.into(),
            },
            origin,
            field: field.into(),
            message: message.into(),
            consumer: None,
        }
    }

    #[test]
    fn one_note_per_object_naming_the_field() {
        let object = Origin::Object { uid: None };
        let in_cm = Origin::ConfigMap {
            name: "routes".into(),
            key: "vs.yaml".into(),
            uid: None,
        };
        let notes = notes(&[
            invalid(
                "a",
                "spec.http[0].route",
                "weights add up to 120",
                object.clone(),
            ),
            invalid("a", "spec.hosts", "at least one host", object.clone()),
            invalid("a", "spec.hosts", "at least one host", object.clone()),
            invalid("b", "spec.tcp", "bad", in_cm),
        ]);
        let notes: Vec<&String> = notes.values().collect();
        assert_eq!(
            notes,
            [
                "spec.hosts: at least one host (and 1 more)",
                "vs.yaml: VirtualService shop/b: spec.tcp: bad"
            ]
        );
    }

    /// Found in review: the note named the first importing namespace, so a namespace joining
    /// the mesh made a new Event for an unchanged problem.
    #[test]
    fn the_note_does_not_change_with_the_importing_namespaces() {
        let object = Origin::Object { uid: None };
        let conflict = |consumer: &str| Invalid {
            consumer: Some(consumer.into()),
            ..invalid("a", "spec.hosts", "shadowed", object.clone())
        };
        let before = notes(&[conflict("web")]);
        let after = notes(&[conflict("api"), conflict("web"), conflict("zoo")]);
        assert_eq!(before, after);
        assert!(!before.values().next().unwrap().contains("web"));
    }
}
