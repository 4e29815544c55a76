//! `install --apply` and `uninstall --apply` against kmock (`kmock_apiserver.py`: list, get,
//! create, server-side apply as a recursive merge, delete; no field ownership): every object
//! is read back, applying twice changes nothing, `--crds auto` leaves an existing Istio CRD
//! alone, uninstall removes what install and the controller made and nothing else.
//! Skipped, with the reason, where no Python with kmock is found (scripts/setup-kmock.sh).

mod support;

use std::collections::BTreeMap;

use isthmus_ctl::install::apply::{install, uninstall, UninstallCrds};
use isthmus_ctl::install::{manifests, CrdMode, InstallOptions, Manifest};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::Client;
use serde_json::{json, Value};
use support::kmock::Kmock;

fn kmock() -> Option<Kmock> {
    Kmock::start_or_skip()
}

/// The object as the server holds it now, or `None`.
async fn get(client: &Client, manifest: &Manifest) -> Option<Value> {
    let api: Api<DynamicObject> = match manifest.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &manifest.resource),
        None => Api::all_with(client.clone(), &manifest.resource),
    };
    let object = api.get_opt(manifest.name()).await.unwrap()?;
    Some(serde_json::to_value(object).unwrap())
}

/// Every field we sent is in what the server holds, with the same value.
fn contained(ours: &Value, theirs: &Value, path: &str) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}/{k}");
                contained(v, b.get(k).unwrap_or_else(|| panic!("{p} missing")), &p);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                contained(x, y, &format!("{path}/{i}"));
            }
        }
        (a, b) => assert_eq!(a, b, "{path}"),
    }
}

/// Everything but resourceVersion (which every write stamps anew).
fn without_version(mut object: Value) -> Value {
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    object
}

async fn apply(client: &Client, options: &InstallOptions) -> Vec<String> {
    let mut lines = Vec::new();
    install(client, options, |line| lines.push(line))
        .await
        .unwrap();
    lines
}

#[tokio::test]
async fn install_applies_every_object_and_applying_twice_changes_nothing() {
    let Some(kmock) = kmock() else { return };
    let client = kmock.client().await;
    let options = InstallOptions::default();
    let made = manifests(&options);
    let lines = apply(&client, &options).await;
    assert_eq!(lines.len(), made.len(), "{lines:#?}");
    let mut first = BTreeMap::new();
    for manifest in &made {
        let Some(object) = get(&client, manifest).await else {
            panic!("{} was not created", manifest.display_name());
        };
        contained(&manifest.object, &object, &manifest.display_name());
        first.insert(manifest.display_name(), without_version(object));
    }
    let again = apply(&client, &options).await;
    assert_eq!(again, lines, "the second apply says the same");
    for manifest in &made {
        let object = get(&client, manifest).await.unwrap();
        assert_eq!(
            without_version(object),
            first[&manifest.display_name()],
            "{} changed on the second apply",
            manifest.display_name()
        );
    }
}

#[tokio::test]
async fn crds_auto_leaves_an_existing_istio_crd_alone_and_updates_its_own() {
    let Some(kmock) = kmock() else { return };
    let client = kmock.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Istio's, as its Helm chart labels it, with a schema of its own.
    let mut istio: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "virtualservices.networking.istio.io",
                     "labels": {"app.kubernetes.io/managed-by": "Helm", "app": "istio-pilot"}},
        "spec": {"group": "networking.istio.io", "scope": "Namespaced",
                 "names": {"kind": "VirtualService", "plural": "virtualservices"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                   "description": "istio's own"}}}]},
    }))
    .unwrap();
    istio = crds.create(&PostParams::default(), &istio).await.unwrap();
    // An old Istio's, without v1.
    let old_istio: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "sidecars.networking.istio.io"},
        "spec": {"group": "networking.istio.io", "scope": "Namespaced",
                 "names": {"kind": "Sidecar", "plural": "sidecars"},
                 "versions": [{"name": "v1alpha3", "served": true, "storage": true}]},
    }))
    .unwrap();
    crds.create(&PostParams::default(), &old_istio)
        .await
        .unwrap();
    let lines = apply(&client, &InstallOptions::default()).await;
    assert!(
        lines.contains(
            &"customresourcedefinition.apiextensions.k8s.io/sidecars.networking.istio.io exists \
              (managed by another installer): left alone (--crds auto); WARNING: it does not \
              serve v1, which the controller reads (upgrade Istio's CRDs, or --crds always)"
                .to_string()
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &"customresourcedefinition.apiextensions.k8s.io/virtualservices.networking.istio.io \
              exists (managed by Helm): left alone (--crds auto)"
                .to_string()
        ),
        "{lines:#?}"
    );
    let after = crds
        .get("virtualservices.networking.istio.io")
        .await
        .unwrap();
    assert_eq!(
        after.metadata.resource_version,
        istio.metadata.resource_version
    );
    assert_eq!(after.spec.versions.len(), 1, "Istio's CRD was not touched");
    // The others were made, and isthmus's own are applied again (an upgrade) next time.
    assert!(crds
        .get_opt("destinationrules.networking.istio.io")
        .await
        .unwrap()
        .is_some());
    let applied_again = apply(&client, &InstallOptions::default()).await;
    assert!(applied_again.contains(
        &"customresourcedefinition.apiextensions.k8s.io/destinationrules.networking.istio.io applied"
            .to_string()
    ));
    // --crds always applies over it (the operator said so).
    let always = InstallOptions {
        crds: CrdMode::Always,
        ..InstallOptions::default()
    };
    apply(&client, &always).await;
    let taken = crds
        .get("virtualservices.networking.istio.io")
        .await
        .unwrap();
    assert_eq!(taken.spec.versions.len(), 3);
}

#[tokio::test]
async fn uninstall_removes_what_install_and_the_controller_made_and_nothing_else() {
    let Some(kmock) = kmock() else { return };
    let client = kmock.client().await;
    let options = InstallOptions::default();
    apply(&client, &options).await;
    let configmap = |name: &str, managed_by: Option<&str>| -> ConfigMap {
        let labels = managed_by.map(|m| json!({"app.kubernetes.io/managed-by": m}));
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "data": {"k": "v"},
        }))
        .unwrap()
    };
    let shop: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    let pp = PostParams::default();
    shop.create(
        &pp,
        &configmap("isthmus-registry", Some("isthmus-controller")),
    )
    .await
    .unwrap();
    shop.create(
        &pp,
        &configmap("isthmus-config", Some("isthmus-controller")),
    )
    .await
    .unwrap();
    shop.create(&pp, &configmap("app-settings", None))
        .await
        .unwrap();
    shop.create(&pp, &configmap("helm-thing", Some("Helm")))
        .await
        .unwrap();

    let mut lines = Vec::new();
    uninstall(&client, &options, UninstallCrds::Keep, |l| lines.push(l))
        .await
        .unwrap();
    assert_eq!(
        lines[0],
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/isthmus-sidecar-injector deleted"
    );
    for manifest in manifests(&options) {
        let present = get(&client, &manifest).await.is_some();
        let kept = matches!(manifest.kind(), "Namespace" | "CustomResourceDefinition");
        assert_eq!(present, kept, "{}", manifest.display_name());
    }
    let mut left: Vec<String> = shop
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|cm| cm.metadata.name)
        .collect();
    left.sort();
    assert_eq!(left, ["app-settings", "helm-thing"]);
    assert!(lines.contains(&"configmap/isthmus-registry -n shop deleted".to_string()));

    // Again: everything is already gone, which is not an error; then the CRDs install made.
    let mut again = Vec::new();
    uninstall(&client, &options, UninstallCrds::Isthmus, |l| again.push(l))
        .await
        .unwrap();
    assert!(again[0].ends_with("not found"), "{again:#?}");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

#[tokio::test]
async fn uninstall_never_deletes_istios_crds() {
    let Some(kmock) = kmock() else { return };
    let client = kmock.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut istio = isthmus_ctl::install::crds::all().remove(0);
    istio.metadata.labels = Some([("app".to_string(), "istio-pilot".to_string())].into());
    crds.create(&PostParams::default(), &istio).await.unwrap();
    let mut lines = Vec::new();
    let options = InstallOptions::default();
    uninstall(&client, &options, UninstallCrds::Isthmus, |l| lines.push(l))
        .await
        .unwrap();
    assert!(lines.contains(
        &"customresourcedefinition.apiextensions.k8s.io/virtualservices.networking.istio.io is not isthmus's: left alone"
            .to_string()
    ));
    assert!(crds
        .get_opt("virtualservices.networking.istio.io")
        .await
        .unwrap()
        .is_some());
}

/// The documented alternative to `--apply`: `isthmus-ctl install | kubectl apply --server-side`.
/// kubectl finds every kind and scope through discovery and sends every document (comments
/// and all); what it stored is what `install` meant.
#[tokio::test]
async fn kubectl_applies_the_printed_manifests() {
    let kubectl = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    if !kubectl.is_ok_and(|o| o.status.success()) {
        support::kmock::skip("kubectl is not installed");
        return;
    }
    let Some(kmock) = kmock() else { return };
    let dir = std::env::temp_dir().join(format!("isthmus-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kmock.kubeconfig()).unwrap();
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_isthmus-ctl"))
        .arg("install")
        .output()
        .unwrap();
    assert!(printed.status.success());
    let manifest_file = dir.join("install.yaml");
    std::fs::write(&manifest_file, &printed.stdout).unwrap();
    let applied = std::process::Command::new("kubectl")
        .args([
            "apply",
            "--server-side",
            "--field-manager=isthmus-install",
            // kmock serves no OpenAPI document to validate against.
            "--validate=false",
            "-f",
        ])
        .arg(&manifest_file)
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let out = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let client = kmock.client().await;
    let made = manifests(&InstallOptions::default());
    assert_eq!(out.lines().count(), made.len(), "{out}");
    for manifest in &made {
        let object = get(&client, manifest)
            .await
            .unwrap_or_else(|| panic!("kubectl did not create {}", manifest.display_name()));
        contained(&manifest.object, &object, &manifest.display_name());
    }
}
