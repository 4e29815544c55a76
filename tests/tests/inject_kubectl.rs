//! What `isthmus-ctl inject` writes, read back by kubectl's own typed decoding. No API server is
//! reachable here, so `kubectl create --dry-run=client` cannot run (it downloads the OpenAPI
//! schema first); `kubectl set env --local` decodes each workload into its Go type offline and
//! prints it back. Every field we wrote must survive that: a misspelled field would be dropped
//! and a wrong type rejected. Skipped where kubectl is not installed.

use std::io::Write;
use std::process::{Command, Stdio};

use isthmus_ctl::inject::{inject, parse_documents, InjectConfig};
use serde_json::{json, Value};

/// A Pod with annotations and probes (rewritten to the sidecar), then each controller kind
/// around the same pod template.
fn workloads() -> Vec<Value> {
    let pod = parse_documents(
        "\
apiVersion: v1
kind: Pod
metadata:
  name: p
  labels: {app: p, version: v1}
  annotations:
    traffic.sidecar.istio.io/excludeOutboundIPRanges: 169.254.169.254/32
    sidecar.istio.io/proxyCPULimit: \"1\"
spec:
  initContainers: [{name: migrate, image: \"m:1\"}]
  containers:
  - name: app
    image: \"app:1\"
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /ready, port: http}}
    livenessProbe: {tcpSocket: {port: 8080}, timeoutSeconds: 2}
    startupProbe: {grpc: {port: 9090}}
",
    )
    .unwrap()
    .remove(0);
    let mut template = json!({"metadata": pod["metadata"].clone(), "spec": pod["spec"].clone()});
    template["metadata"].as_object_mut().unwrap().remove("name");
    let selector = json!({"matchLabels": {"app": "p"}});
    let mut docs = vec![pod];
    for kind in ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"] {
        let mut doc = json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "w"},
            "spec": {"selector": selector, "template": template}});
        if kind == "StatefulSet" {
            doc["spec"]["serviceName"] = json!("w");
        }
        docs.push(doc);
    }
    template["spec"]["restartPolicy"] = json!("Never");
    docs.push(
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
        "spec": {"template": template}}),
    );
    docs.push(
        json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": template}}}}),
    );
    docs
}

#[test]
fn kubectl_decodes_every_injected_field() {
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        isthmus_tests::skip("kubectl is not installed");
        return;
    }
    for native_sidecar in [true, false] {
        let config = InjectConfig {
            native_sidecar,
            image_pull_policy: Some("IfNotPresent".into()),
            cluster: Some("east".into()),
            ..InjectConfig::default()
        };
        let docs = inject(workloads(), &config).unwrap();
        assert_eq!(docs.documents.len(), 7);
        for doc in &docs.documents {
            // The rewritten probes and (classic) the wait hook are among what is checked.
            let text = doc.to_string();
            assert!(text.contains("/app-health/app/startupz"), "{text}");
            assert_eq!(text.contains("postStart"), !native_sidecar, "{text}");
            let decoded = kubectl_round_trip(doc);
            if let Err(path) = contained(doc, &decoded, String::new()) {
                panic!(
                    "{} (native {native_sidecar}): {path} did not survive kubectl's decoding:\n{decoded:#}",
                    doc["kind"]
                );
            }
        }
    }
}

fn kubectl_round_trip(doc: &Value) -> Value {
    let mut child = Command::new("kubectl")
        .args([
            "set",
            "env",
            "--local",
            "-f",
            "-",
            "-o",
            "json",
            "ISTHMUS_KUBECTL_CHECK=1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(doc.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl rejected {}: {}",
        doc["kind"],
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every field of `ours` is in `theirs` with the same value (kubectl adds defaults and its env
/// variable, so `theirs` may hold more). Lists are compared item by item, and the env lists
/// kubectl appended to are compared on our items only.
fn contained(ours: &Value, theirs: &Value, path: String) -> Result<(), String> {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}/{k}");
                contained(v, b.get(k).ok_or_else(|| p.clone())?, p)?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) if a.len() <= b.len() => {
            if a.len() < b.len() && !path.ends_with("/env") {
                return Err(path);
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                contained(x, y, format!("{path}/{i}"))?;
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        _ => Err(path),
    }
}
