//! Each Service's registry entry checked alone, the way a sidecar loads it (parse and compile),
//! before it goes into any namespace's registry: a Service the sidecar rejects (once: an
//! ExternalName Service serving one port over TCP and UDP listed the port twice) would
//! otherwise make every sidecar that sees it refuse its whole config. Rejected entries are left
//! out and reported as invalid `Service`s. Found in review: the registry was never validated on
//! its own.

use std::collections::HashMap;

use isthmus_config::{ConfigError, Issue, SourceFile};

use super::istio::{Invalid, ObjectKey, Origin};
use super::registry::RegistryEntry;
use super::REGISTRY_KEY;

/// The kind invalid Services are reported as (Events regarding the core/v1 Service).
pub const SERVICE_KIND: &str = "Service";

/// The verdicts of the last check, by entry line: a compile per Service is cheap, but a
/// reconcile must not recompile 10k unchanged entries.
#[derive(Debug, Default)]
pub struct EntryChecks {
    verdicts: HashMap<String, Vec<Issue>>,
    /// How many entries were compiled (tests count them).
    compiled: usize,
}

impl EntryChecks {
    /// The entries a sidecar accepts alone, and the problems of those it does not. Verdicts of
    /// entries no longer present are forgotten.
    pub fn check(&mut self, entries: Vec<RegistryEntry>) -> (Vec<RegistryEntry>, Vec<Invalid>) {
        let mut verdicts = HashMap::with_capacity(entries.len());
        let mut valid = Vec::with_capacity(entries.len());
        let mut invalid = Vec::new();
        for entry in entries {
            let issues = match self.verdicts.remove(&entry.line) {
                Some(issues) => issues,
                None => {
                    self.compiled += 1;
                    compile_alone(&entry.line)
                }
            };
            invalid.extend(issues.iter().map(|issue| Invalid {
                key: ObjectKey {
                    kind: SERVICE_KIND.to_owned(),
                    namespace: entry.namespace.clone(),
                    name: entry.name.clone(),
                },
                origin: Origin::Object { uid: None },
                field: issue.field.clone(),
                message: issue.message.clone(),
                consumer: None,
            }));
            let ok = issues.is_empty();
            verdicts.insert(entry.line.clone(), issues);
            if ok {
                valid.push(entry);
            }
        }
        self.verdicts = verdicts;
        (valid, invalid)
    }
}

/// The issues the sidecar's loader finds in one registry line (none: it loads).
fn compile_alone(line: &str) -> Vec<Issue> {
    match isthmus_config::load(&[SourceFile::new(REGISTRY_KEY, line.to_owned())]) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(issues)) => issues,
        Err(other) => vec![Issue {
            location: REGISTRY_KEY.into(),
            field: String::new(),
            message: other.to_string(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;
    use crate::controller::registry::registry_entries;

    fn service(name: &str, spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn entries() -> Vec<RegistryEntry> {
        let good = service(
            "reviews",
            json!({"clusterIP": "10.0.0.7", "ports": [{"name": "http", "port": 80}]}),
        );
        // A Service the sidecar rejects: port 53 twice. The API server refuses such a Service
        // today (and the registry keeps only TCP ports, so TCP+UDP no longer does it); the
        // check is the net for whatever else a future Service shape or registry bug produces.
        let dns = service(
            "legacy-dns",
            json!({"type": "ExternalName", "externalName": "dns.example.com", "ports": [
                {"name": "dns-a", "port": 53, "protocol": "TCP"},
                {"name": "dns-b", "port": 53, "protocol": "TCP"},
            ]}),
        );
        registry_entries(&[&good, &dns], &[], &[])
    }

    /// Found in review: a Service whose entry the sidecar rejects was written into every
    /// namespace's registry; now it is left out and reported, the others kept.
    #[test]
    fn a_service_the_sidecar_rejects_is_left_out_and_reported() {
        let all = entries();
        assert_eq!(all.len(), 2, "both Services make an entry");
        let (valid, invalid) = EntryChecks::default().check(all);
        let names: Vec<&str> = valid.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["reviews"]);
        assert!(!invalid.is_empty());
        assert!(invalid.iter().all(|i| i.key
            == ObjectKey {
                kind: "Service".into(),
                namespace: "shop".into(),
                name: "legacy-dns".into()
            }));
        assert!(
            invalid
                .iter()
                .any(|i| i.message.contains("duplicate port 53")),
            "{invalid:?}"
        );
        let lines: String = valid.iter().map(|e| e.line.as_str()).collect();
        isthmus_config::load(&[SourceFile::new(REGISTRY_KEY, lines)]).expect("the rest loads");
    }

    #[test]
    fn unchanged_entries_are_not_compiled_again() {
        let mut checks = EntryChecks::default();
        checks.check(entries());
        assert_eq!(checks.compiled, 2);
        let (valid, invalid) = checks.check(entries());
        assert_eq!(checks.compiled, 2, "verdicts are reused");
        assert_eq!(valid.len(), 1);
        assert!(!invalid.is_empty(), "a cached rejection is still reported");
        let mut changed = entries();
        let dns = changed.iter_mut().find(|e| e.name == "legacy-dns").unwrap();
        dns.line = dns.line.replace("dns.example.com", "dns2.example.com");
        checks.check(changed);
        assert_eq!(checks.compiled, 3, "only the changed entry is compiled");
    }
}
