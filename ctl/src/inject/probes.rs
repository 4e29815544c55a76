//! The app's probes through the sidecar (Istio's `rewriteAppHTTPProbers`).
//!
//! The kubelet probes from the node, without a mesh certificate: once inbound mTLS is STRICT its
//! HTTP probes to the app's port would be refused by the sidecar, and a `tcpSocket` probe would
//! succeed whenever the sidecar runs (its capture listener accepts every port). So each app
//! container's `httpGet`, `tcpSocket` and `grpc` liveness, readiness and startup probes become
//! `GET :15020/app-health/<container>/livez|readyz|startupz` — a port outside capture — and the
//! originals go to the sidecar in `ISTHMUS_KUBE_APP_PROBERS` (Istio's format: JSON keyed by
//! those paths, ports as numbers), which runs them against the app and answers with the result.
//!
//! Re-injection first puts the originals back from the previous sidecar's variable, so a
//! rewritten probe is never rewritten twice, and turning the annotation off restores the pod's
//! own probes exactly (a named port is kept as `portName` in the entry for that).

use serde_json::{json, Map, Value};

use super::pod::PROXY_NAME;

/// The sidecar's variable holding the original probes (read by isthmus-proxy).
pub const PROBERS_ENV: &str = "ISTHMUS_KUBE_APP_PROBERS";
/// The sidecar's port that answers rewritten probes (Istio's agent port).
pub const PROBE_PORT: u16 = 15020;
const PATH_PREFIX: &str = "/app-health/";
/// The probe fields rewritten, and the last segment of each one's path (Istio's names).
const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];
const HANDLERS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The original probes an earlier injection left on its sidecar, by path; empty if none.
pub(super) fn stored(spec: &Map<String, Value>) -> Map<String, Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| spec.get(*key)?.as_array())
        .flatten()
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_NAME))
        .filter_map(|c| c.get("env")?.as_array())
        .flatten()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(PROBERS_ENV))
        .and_then(|e| e.get("value")?.as_str())
        .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok())
        .unwrap_or_default()
}

/// Puts back every probe an earlier injection rewrote, from `stored`.
pub(super) fn restore(spec: &mut Map<String, Value>, stored: &Map<String, Value>) {
    if stored.is_empty() {
        return;
    }
    for_each_probe(spec, |container, kind, probe| {
        let path = probe_path(container, kind);
        let rewritten = probe.get("httpGet").is_some_and(|get| {
            get.get("port") == Some(&json!(PROBE_PORT))
                && get.get("path").and_then(Value::as_str) == Some(path.as_str())
        });
        let Some(entry) = stored.get(&path).filter(|_| rewritten) else {
            return;
        };
        let Some((handler, mut original)) = HANDLERS
            .iter()
            .find_map(|h| Some((*h, entry.get(*h)?.clone())))
        else {
            return;
        };
        if let Some(name) = entry.get("portName") {
            original["port"] = name.clone();
        }
        probe.remove("httpGet");
        probe.insert(handler.into(), original);
    });
}

/// Rewrites the app containers' probes to the sidecar's port; returns the originals by path
/// (the sidecar's [`PROBERS_ENV`]) and says why any probe was left as it is.
pub(super) fn rewrite(
    spec: &mut Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Map<String, Value> {
    let mut probers = Map::new();
    for_each_probe(spec, |container, kind, probe| {
        let ports = named_ports(container);
        let name = container_name(container);
        match original(probe, &ports) {
            Ok(Some(mut entry)) => {
                let path = probe_path(container, kind);
                if let Some(timeout) = probe.get("timeoutSeconds") {
                    entry.insert("timeoutSeconds".into(), timeout.clone());
                }
                for h in HANDLERS {
                    probe.remove(h);
                }
                probe.insert(
                    "httpGet".into(),
                    json!({"path": path, "port": PROBE_PORT, "scheme": "HTTP"}),
                );
                probers.insert(path, Value::Object(entry));
            }
            Ok(None) => {}
            Err(why) => warnings.push(format!(
                "container {name}: {kind} is not rewritten to go through the sidecar ({why}), \
                 so the kubelet probes the app directly; that fails once inbound mTLS is STRICT"
            )),
        }
    });
    probers
}

/// Whether `sidecar.istio.io/rewriteAppHTTPProbers` (default true) lets probes be rewritten.
pub(super) fn rewrite_wanted(value: &str) -> Option<bool> {
    // Go's strconv.ParseBool, as Istio reads it.
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// The sidecar's entry for one probe: its handler with the port as a number. `Ok(None)` for
/// probes with nothing to rewrite (exec, none); `Err` for those the sidecar cannot run.
fn original(
    probe: &Map<String, Value>,
    ports: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, String> {
    let Some((handler, spec)) = HANDLERS
        .iter()
        .find_map(|h| Some((*h, probe.get(*h)?.as_object()?)))
    else {
        return Ok(None);
    };
    if handler == "httpGet" {
        let scheme = spec.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
        if !scheme.eq_ignore_ascii_case("HTTP") {
            return Err(format!(
                "scheme {scheme}: the sidecar probes over plain HTTP only"
            ));
        }
        if spec
            .get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| p.starts_with(PATH_PREFIX))
            && spec.get("port") == Some(&json!(PROBE_PORT))
        {
            // Already the sidecar's (the earlier injection's originals are gone): leave it.
            return Ok(None);
        }
        http_get_sendable(spec)?;
    }
    if spec
        .get("host")
        .and_then(Value::as_str)
        .is_some_and(|h| !h.is_empty())
    {
        return Err("it names a host: it does not probe this pod".into());
    }
    let mut entry = spec.clone();
    match spec.get("port") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|p| (1..=65535).contains(&p)) => {}
        Some(Value::String(name)) => {
            let Some(number) = ports.get(name) else {
                return Err(format!("no container port is named {name:?}"));
            };
            entry.insert("port".into(), number.clone());
        }
        other => return Err(format!("port {other:?} is not a port")),
    }
    let mut out = Map::new();
    out.insert(handler.into(), Value::Object(entry));
    if let Some(Value::String(name)) = spec.get("port") {
        out.insert("portName".into(), json!(name));
    }
    Ok(Some(out))
}

/// Whether the sidecar can send this `httpGet` as it is (the rule it applies itself, from
/// isthmus-config): an entry it cannot send would fail that probe, so it is not handed over.
fn http_get_sendable(spec: &Map<String, Value>) -> Result<(), String> {
    let path = match spec.get("path") {
        None | Some(Value::Null) => "",
        Some(Value::String(path)) => path,
        Some(other) => return Err(format!("path {other} is not a string")),
    };
    let mut headers = Vec::new();
    for header in spec
        .get("httpHeaders")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = |key| header.get(key).and_then(Value::as_str);
        let (Some(name), Some(value)) = (text("name"), text("value")) else {
            return Err(format!(
                "httpHeaders entry {header} is not a name and a value"
            ));
        };
        headers.push((name, value));
    }
    match isthmus_config::app_probe::http_get_problem(path, headers) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// Calls `f(container, kind, probe)` for every probe of every app container.
fn for_each_probe(
    spec: &mut Map<String, Value>,
    mut f: impl FnMut(&Map<String, Value>, &str, &mut Map<String, Value>),
) {
    let Some(Value::Array(containers)) = spec.get_mut("containers") else {
        return;
    };
    for container in containers.iter_mut().filter_map(Value::as_object_mut) {
        if container_name(container) == PROXY_NAME {
            continue;
        }
        for (field, _) in KINDS {
            let Some(mut probe) = container.get(field).and_then(Value::as_object).cloned() else {
                continue;
            };
            f(container, field, &mut probe);
            container.insert(field.into(), Value::Object(probe));
        }
    }
}

fn probe_path(container: &Map<String, Value>, field: &str) -> String {
    let suffix = KINDS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or("livez", |(_, s)| s);
    format!("{PATH_PREFIX}{}/{suffix}", container_name(container))
}

fn container_name(container: &Map<String, Value>) -> &str {
    container.get("name").and_then(Value::as_str).unwrap_or("")
}

/// `ports[].name` → `containerPort`.
fn named_ports(container: &Map<String, Value>) -> Map<String, Value> {
    container
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_string(),
                p.get("containerPort")?.clone(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests;
