//! The webhook's answer: a JSON Patch (RFC 6902) that turns the object the API server sent into
//! the injected one. Computed from before and after, so the injector stays one pure function.

use serde_json::{json, Map, Value};

/// Operations that turn `before` into `after`. Lists are compared from both ends, so containers
/// and volumes inserted at the front or appended become `add` operations at their index, and
/// the user's entries are not rewritten.
pub fn json_patch(before: &Value, after: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff(before, after, &mut String::new(), &mut ops);
    ops
}

fn diff(before: &Value, after: &Value, path: &mut String, ops: &mut Vec<Value>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => diff_objects(b, a, path, ops),
        (Value::Array(b), Value::Array(a)) => diff_arrays(b, a, path, ops),
        _ => ops.push(json!({"op": "replace", "path": path.as_str(), "value": after})),
    }
}

fn diff_objects(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
    path: &mut String,
    ops: &mut Vec<Value>,
) {
    let len = path.len();
    for key in before.keys().filter(|k| !after.contains_key(*k)) {
        push_key(path, key);
        ops.push(json!({"op": "remove", "path": path.as_str()}));
        path.truncate(len);
    }
    for (key, value) in after {
        push_key(path, key);
        match before.get(key) {
            None => ops.push(json!({"op": "add", "path": path.as_str(), "value": value})),
            Some(old) => diff(old, value, path, ops),
        }
        path.truncate(len);
    }
}

fn diff_arrays(before: &[Value], after: &[Value], path: &mut String, ops: &mut Vec<Value>) {
    let prefix = before.iter().zip(after).take_while(|(b, a)| b == a).count();
    let suffix = before[prefix..]
        .iter()
        .rev()
        .zip(after[prefix..].iter().rev())
        .take_while(|(b, a)| b == a)
        .count();
    let old = &before[prefix..before.len() - suffix];
    let new = &after[prefix..after.len() - suffix];
    let len = path.len();
    if old.len() == new.len() {
        for (i, (b, a)) in old.iter().zip(new).enumerate() {
            path.push_str(&format!("/{}", prefix + i));
            diff(b, a, path, ops);
            path.truncate(len);
        }
        return;
    }
    // Highest index first, so each removal leaves the indices of the next ones valid.
    for i in (prefix..prefix + old.len()).rev() {
        ops.push(json!({"op": "remove", "path": format!("{path}/{i}")}));
    }
    for (i, value) in new.iter().enumerate() {
        let at = format!("{path}/{}", prefix + i);
        ops.push(json!({"op": "add", "path": at, "value": value}));
    }
}

/// Appends `/key`, escaped as RFC 6901 asks (`~` → `~0`, `/` → `~1`: annotation keys have `/`).
fn push_key(path: &mut String, key: &str) {
    path.push('/');
    path.push_str(&key.replace('~', "~0").replace('/', "~1"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `add`/`remove`/`replace` as the API server would.
    fn apply(doc: &mut Value, ops: &[Value]) {
        for op in ops {
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
            let last = last.replace("~1", "/").replace("~0", "~");
            if path.is_empty() {
                *doc = op["value"].clone();
                continue;
            }
            let target = doc.pointer_mut(parent).expect("parent exists");
            match (op["op"].as_str().unwrap(), target) {
                ("add", Value::Array(a)) => a.insert(last.parse().unwrap(), op["value"].clone()),
                ("remove", Value::Array(a)) => {
                    a.remove(last.parse().unwrap());
                }
                ("replace", Value::Array(a)) => {
                    a[last.parse::<usize>().unwrap()] = op["value"].clone()
                }
                ("add" | "replace", Value::Object(m)) => {
                    m.insert(last, op["value"].clone());
                }
                ("remove", Value::Object(m)) => {
                    m.remove(&last).expect("removed key exists");
                }
                (op, t) => panic!("cannot {op} at {path} in {t}"),
            }
        }
    }

    fn round_trip(before: Value, after: Value) -> Vec<Value> {
        let ops = json_patch(&before, &after);
        let mut patched = before;
        apply(&mut patched, &ops);
        assert_eq!(patched, after, "ops: {ops:#?}");
        ops
    }

    /// The webhook's path: the Pod the API server sends, injected, answered with a patch.
    #[test]
    fn an_injected_pod_as_a_patch() {
        use crate::inject::{inject_template, InjectConfig, Outcome, Workload};
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-6f7d9-", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web:1"}],
                     "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}]},
        });
        for native_sidecar in [true, false] {
            let config = InjectConfig {
                native_sidecar,
                ..InjectConfig::default()
            };
            let mut injected = pod.clone();
            let outcome =
                inject_template(&mut injected, &Workload::Named("web".into()), &config).unwrap();
            assert!(matches!(outcome, Outcome::Injected { .. }));
            let ops = round_trip(pod.clone(), injected.clone());
            // The user's container and volume are not touched.
            assert!(ops.iter().all(|o| o["op"] == "add"), "{ops:#?}");
            // Injecting the injected pod needs no patch.
            let mut again = injected.clone();
            inject_template(&mut again, &Workload::Named("web".into()), &config).unwrap();
            assert!(json_patch(&injected, &again).is_empty());
        }
    }

    #[test]
    fn equal_documents_need_no_patch() {
        let v = json!({"a": [1, {"b": 2}]});
        assert!(json_patch(&v, &v).is_empty());
    }

    #[test]
    fn inserts_at_the_front_and_appends_as_adds() {
        let ops = round_trip(
            json!({"spec": {"initContainers": [{"name": "user"}], "volumes": [{"name": "v"}]}}),
            json!({"spec": {
                "initContainers": [{"name": "i"}, {"name": "p"}, {"name": "user"}],
                "volumes": [{"name": "v"}, {"name": "c"}, {"name": "t"}],
            }}),
        );
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers/0",
                "/spec/initContainers/1",
                "/spec/volumes/1",
                "/spec/volumes/2"
            ]
        );
        assert!(ops.iter().all(|o| o["op"] == "add"));
    }

    #[test]
    fn escapes_keys_and_handles_removals_and_replacements() {
        let ops = round_trip(
            json!({"metadata": {"annotations": {"old": "x", "a~b": "1"}}, "n": 1, "l": [1, 2, 3, 4]}),
            json!({"metadata": {"annotations": {"prometheus.io/scrape": "true", "a~b": "2"}}, "n": "1", "l": [1, 4]}),
        );
        assert!(ops.contains(&json!({"op": "add", "path": "/metadata/annotations/prometheus.io~1scrape", "value": "true"})));
        assert!(ops.contains(
            &json!({"op": "replace", "path": "/metadata/annotations/a~0b", "value": "2"})
        ));
        round_trip(json!([1, 2]), json!({"a": 1}));
        round_trip(
            json!({"l": [{"a": 1}, {"b": 2}]}),
            json!({"l": [{"a": 2}, {"b": 3}]}),
        );
        round_trip(json!({"l": [1, 2, 3]}), json!({"l": []}));
    }
}
