//! `isthmus-ctl inject` as a user runs it: YAML in, YAML out, warnings and errors on stderr.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use isthmus_ctl::inject::parse_documents;

const INPUT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {sidecar.istio.io/logLevel: debug}
    spec:
      containers: [{name: web, image: \"web:1\"}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: \"0 3 * * *\"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: job, image: \"job:1\"}]
";

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus-ctl"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs isthmus-ctl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn injects_a_stream_from_stdin_and_again_changes_nothing() {
    let first = run(&["-f", "-"], INPUT);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let out = text(&first.stdout);
    let docs = parse_documents(&out).unwrap();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[1]["kind"], "Service");
    let init = |pointer: &str| {
        docs[0]
            .pointer(pointer)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        init("/spec/template/spec/initContainers"),
        ["isthmus-init", "isthmus-proxy"]
    );
    let cron = docs[2]
        .pointer("/spec/jobTemplate/spec/template/spec/initContainers/1/restartPolicy")
        .unwrap();
    assert_eq!(cron, "Always");
    let stderr = text(&first.stderr);
    assert!(
        stderr.contains(
            "warning: document 1 (Deployment web): annotation sidecar.istio.io/logLevel is ignored"
        ),
        "{stderr}"
    );
    let second = run(&["-f", "-"], &out);
    assert!(second.status.success());
    assert_eq!(text(&second.stdout), out);
}

#[test]
fn flags_and_config_file_choose_images_and_mode() {
    let dir = std::env::temp_dir().join(format!("isthmus-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("inject.yaml");
    std::fs::write(&config, "hub: from-file\nconfigMap: mesh-config\n").unwrap();
    let input = dir.join("in.yaml");
    std::fs::write(&input, INPUT).unwrap();
    let output = dir.join("out.yaml");
    let r = run(
        &[
            "-f",
            input.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--tag",
            "t1",
            "--native-sidecar=false",
            "-o",
            output.to_str().unwrap(),
        ],
        "",
    );
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(r.stdout.is_empty());
    let docs = parse_documents(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let spec = docs[0].pointer("/spec/template/spec").unwrap();
    assert_eq!(spec["containers"][0]["name"], "isthmus-proxy");
    assert_eq!(spec["containers"][0]["image"], "from-file/proxy:t1");
    assert_eq!(spec["initContainers"][0]["image"], "from-file/init:t1");
    assert_eq!(
        spec["volumes"][0]["projected"]["sources"][0]["configMap"]["name"],
        "mesh-config"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_annotation_fails_the_whole_input_and_names_the_document() {
    let input = INPUT.replace(
        "sidecar.istio.io/logLevel: debug",
        "traffic.sidecar.istio.io/excludeOutboundPorts: \"5432,postgres\"",
    );
    let r = run(&["-f", "-"], &input);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        r.stdout.is_empty(),
        "nothing is written when a document fails"
    );
    let stderr = text(&r.stderr);
    assert!(
        stderr.contains("document 1 (Deployment web): annotation traffic.sidecar.istio.io/excludeOutboundPorts=\"5432,postgres\""),
        "{stderr}"
    );
}
