//! The injection webhook's answers to the AdmissionReview fixtures in fixtures/admission/, and
//! the webhook and `isthmus-ctl inject` injecting a pod identically: the JSONPatch the webhook
//! returns, applied to the pod, gives exactly the CLI's output for that pod.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine as _;
use isthmus_ctl::controller::webhook::{review, Verdict};
use isthmus_ctl::inject::{parse_documents, InjectConfig};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/admission");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

fn answer(name: &str) -> (Value, Verdict) {
    let body = fixture(name);
    let (answer, verdict) = review(&body, &InjectConfig::default()).unwrap();
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"], sent["request"]["uid"],
        "the response names the request"
    );
    (answer["response"].clone(), verdict)
}

fn pod_of(name: &str) -> Value {
    let sent: Value = serde_json::from_slice(&fixture(name)).unwrap();
    sent["request"]["object"].clone()
}

/// RFC 6902 add, remove and replace (all the webhook emits), as the API server applies them.
fn apply_patch(doc: &mut Value, ops: &[Value]) {
    for op in ops {
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no {parent}"));
        match (op["op"].as_str().unwrap(), target) {
            ("add", Value::Object(map)) | ("replace", Value::Object(map)) => {
                map.insert(last, op["value"].clone());
            }
            ("remove", Value::Object(map)) => {
                map.remove(&last).unwrap();
            }
            ("add", Value::Array(list)) => {
                let at = if last == "-" {
                    list.len()
                } else {
                    last.parse().unwrap()
                };
                list.insert(at, op["value"].clone());
            }
            ("replace", Value::Array(list)) => {
                list[last.parse::<usize>().unwrap()] = op["value"].clone()
            }
            ("remove", Value::Array(list)) => {
                list.remove(last.parse().unwrap());
            }
            (op, _) => panic!("unexpected op {op} at {path}"),
        }
    }
}

fn patched(response: &Value, pod: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let mut pod = pod.clone();
    apply_patch(&mut pod, &ops);
    pod
}

/// What `isthmus-ctl inject` prints for `pod`, parsed back.
fn cli_injected(pod: &Value) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus-ctl"))
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pod.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut docs = parse_documents(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

#[test]
fn plain_pod_is_patched_into_exactly_what_the_cli_injects() {
    let (response, verdict) = answer("plain-pod.json");
    assert_eq!(verdict, Verdict::Injected);
    assert_eq!(response["allowed"], true);
    let pod = pod_of("plain-pod.json");
    let webhook = patched(&response, &pod);
    assert_ne!(webhook, pod, "something was injected");
    assert_eq!(webhook, cli_injected(&pod));
    // The ReplicaSet's pod reports its Deployment as its workload, in both.
    let proxy = webhook["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "isthmus-proxy")
        .unwrap();
    assert!(
        proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "ISTHMUS_WORKLOAD" && e["value"] == "web"),
        "{proxy}"
    );
}

#[test]
fn already_injected_pod_comes_out_as_the_plain_pod_injected() {
    let (response, verdict) = answer("injected-pod.json");
    assert_eq!(verdict, Verdict::Injected);
    let pod = pod_of("injected-pod.json");
    let reinjected = match response.get("patch") {
        Some(_) => patched(&response, &pod),
        None => pod.clone(),
    };
    assert_eq!(reinjected, cli_injected(&pod));
    assert_eq!(reinjected, cli_injected(&pod_of("plain-pod.json")));
}

/// The fixture's review is allowed with no patch.
fn assert_allowed_unchanged(name: &str) {
    let (response, verdict) = answer(name);
    assert_eq!(verdict, Verdict::Skipped);
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
}

#[test]
fn opted_out_pod_is_allowed_unchanged() {
    assert_allowed_unchanged("opted-out-pod.json");
    assert_eq!(
        cli_injected(&pod_of("opted-out-pod.json")),
        pod_of("opted-out-pod.json")
    );
}

#[test]
fn pod_with_a_bad_traffic_annotation_is_denied_naming_it() {
    let (response, verdict) = answer("bad-traffic-annotation-pod.json");
    assert_eq!(verdict, Verdict::Denied);
    assert_eq!(response["allowed"], false);
    assert!(response.get("patch").is_none());
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("traffic.sidecar.istio.io/excludeOutboundPorts"),
        "{message}"
    );
}

#[test]
fn a_service_is_allowed_unchanged() {
    assert_allowed_unchanged("service.json");
}
