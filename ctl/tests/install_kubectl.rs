//! What `isthmus-ctl install` prints, read back by kubectl's own typed decoding, and the
//! controller command line it writes accepted by the controller. No API server with OpenAPI
//! is reachable here, so kubectl's `set ... --local` commands do the decoding: they decode a
//! document into its Go type offline (a wrong type fails with "unable to decode") and those
//! that apply to the kind print it back, so a dropped (misspelled) field shows too. The CRDs
//! are not in kubectl's scheme (apiextensions is a separate client): they are checked by the
//! kmock test and by construction from k8s-openapi's types. Skipped where kubectl is missing.

#[allow(dead_code)] // only the skip record is used here
mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-ctl");

/// An inject config file for `--inject-config`; removed on drop.
struct InjectFile(std::path::PathBuf);

impl InjectFile {
    fn new(text: &str) -> InjectFile {
        let thread = std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "-");
        let path = std::env::temp_dir().join(format!(
            "isthmus-inject-{}-{thread}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        InjectFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for InjectFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn kubectl_missing() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
}

/// `isthmus-ctl install ARGS`, as the documents it prints.
fn printed(args: &[&str]) -> Vec<Value> {
    let out = Command::new(BIN)
        .arg("install")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("---\n")
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .collect()
}

/// kubectl's answer to a `set` command run on `doc` offline: stdout on success, stderr else.
fn kubectl_local(doc: &Value, set: &[&str]) -> Result<String, String> {
    let mut child = Command::new("kubectl")
        .arg("set")
        .args(set)
        .args(["--local", "-f", "-", "-o", "json"])
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
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Decodes `doc` with kubectl's Go types; the document kubectl printed back, where the kind
/// has a `set` command that prints (others are decoded, then refused by `set selector`, which
/// only then checks the kind).
fn kubectl_decode(doc: &Value) -> Result<Option<Value>, String> {
    let kind = doc["kind"].as_str().unwrap();
    let printed = match kind {
        "Deployment" => kubectl_local(doc, &["env", "ISTHMUS_KUBECTL_CHECK=1"])?,
        "Service" => kubectl_local(doc, &["selector", "app=isthmus-controller"])?,
        "ClusterRoleBinding" | "RoleBinding" => {
            kubectl_local(doc, &["subject", "--group=isthmus-kubectl-check"])?
        }
        _ => {
            return match kubectl_local(doc, &["selector", "a=b"]) {
                Err(e) if e.contains("setting a selector is only supported for Services") => {
                    Ok(None)
                }
                Err(e) => Err(e),
                Ok(_) => panic!("kubectl set selector accepted a {kind}"),
            };
        }
    };
    Ok(Some(serde_json::from_str(&printed).unwrap()))
}

/// Every field of `ours` is in `theirs` with the same value; kubectl adds defaults, its env
/// variable and its subject, so `theirs` may hold more (lists: extra items at the end).
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
            let extended = path.ends_with("/env") || path.ends_with("/subjects");
            if a.len() < b.len() && !extended {
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

#[test]
fn kubectl_decodes_every_printed_manifest() {
    if kubectl_missing() {
        support::kmock::skip("kubectl is not installed");
        return;
    }
    let inject = InjectFile::new("nativeSidecar: false\n");
    let docs = printed(&[
        "--hub",
        "registry.example/mesh",
        "--tag",
        "1.0",
        "--inject-config",
        inject.path(),
    ]);
    assert_eq!(docs.len(), 17);
    let mut printed_back = 0;
    for doc in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        let name = format!("{}/{}", doc["kind"], doc["metadata"]["name"]);
        match kubectl_decode(doc) {
            Err(e) => panic!("kubectl cannot decode {name}: {e}"),
            Ok(None) => {}
            Ok(Some(theirs)) => {
                printed_back += 1;
                if let Err(path) = contained(doc, &theirs, String::new()) {
                    panic!("{name}: {path} did not survive kubectl's decoding:\n{theirs:#}");
                }
            }
        }
    }
    assert_eq!(printed_back, 4, "Deployment, Service and both bindings");
}

/// The check above can fail: a wrong type in a document kubectl only decodes is refused.
#[test]
fn kubectl_decoding_refuses_a_wrong_type() {
    if kubectl_missing() {
        support::kmock::skip("kubectl is not installed");
        return;
    }
    let mut docs = printed(&[]);
    let role = docs
        .iter_mut()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    role["rules"][0]["verbs"] = Value::String("get".into());
    let err = kubectl_decode(role).unwrap_err();
    assert!(err.contains("unable to decode"), "{err}");
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["serviceAcountName"] = "typo".into();
    let theirs = kubectl_decode(deployment).unwrap().unwrap();
    assert!(contained(deployment, &theirs, String::new())
        .unwrap_err()
        .ends_with("serviceAcountName"));
}

/// The Deployment's args, followed by `--help`, are accepted by this build's `isthmus-ctl`:
/// clap refuses an unknown flag before it looks at `--help`.
#[test]
fn the_deployment_passes_only_flags_the_controller_has() {
    let inject = InjectFile::new("nativeSidecar: false\n");
    let docs = printed(&["--inject-config", inject.path()]);
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "controller");
    let out = Command::new(BIN)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "isthmus-ctl {} refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = Command::new(BIN)
        .args(["controller", "--no-such-flag", "x", "--help"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn crds_never_prints_no_crd_and_uninstall_prints_its_plan() {
    let docs = printed(&["--crds", "never", "--replicas", "1"]);
    assert!(docs.iter().all(|d| d["kind"] != "CustomResourceDefinition"));
    assert!(docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"));
    let out = Command::new(BIN).arg("uninstall").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[1],
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/isthmus-sidecar-injector"
    );
    assert!(text.contains("Istio CRDs: kept"));
}

#[test]
fn an_inject_config_with_a_typo_is_refused_before_anything_is_printed() {
    let inject = InjectFile::new("nativeSidcar: false\n");
    let out = Command::new(BIN)
        .args(["install", "--inject-config", inject.path()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nativeSidcar"), "{err}");
}
