//! What the controller publishes for issue 9 against kmock: the CA's root as `trust-bundle.pem`
//! beside `config.json` in a meshed namespace's routing ConfigMap (counted in the version the
//! sidecars report), and the security.istio.io kinds scoped as Istio does — the namespace's own
//! and the root namespace's, with `metadata.creationTimestamp` kept.

mod support;

use std::time::Duration;

use isthmus_config::SourceFile;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{json, Value};
use support::controller::{ca_options, ca_pem, spawn, wait_for, NS};
use support::kmock::Kmock;

fn security(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

async fn create(client: &kube::Client, resource: &ApiResource, ns: &str, name: &str, spec: Value) {
    let mut object = DynamicObject::new(name, resource).within(ns);
    object.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-22T10:00:00Z".parse().unwrap(),
        ));
    object.data = json!({ "spec": spec });
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_and_the_security_policies_reach_a_meshed_namespace() {
    let Some(kmock) = Kmock::start_or_skip() else {
        return;
    };
    let client = kmock.client().await;
    let pa = security("PeerAuthentication", "peerauthentications");
    let ap = security("AuthorizationPolicy", "authorizationpolicies");
    create(
        &client,
        &pa,
        NS,
        "mesh",
        json!({"mtls": {"mode": "STRICT"}}),
    )
    .await;
    create(
        &client,
        &ap,
        "shop",
        "allow-shop",
        json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
    )
    .await;
    // Another namespace's policy never reaches shop.
    create(
        &client,
        &pa,
        "data",
        "data",
        json!({"mtls": {"mode": "DISABLE"}}),
    )
    .await;
    let mut options = ca_options();
    options.namespaces = vec!["shop".into(), "data".into()];
    let (status, stop, task) = spawn(&client, options);
    wait_for("ready", Duration::from_secs(30), async || {
        status.ready().then_some(())
    })
    .await;
    let ca = ca_pem(&client).await;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    let routing = config_maps.get("isthmus-config").await.unwrap();
    let data = routing.data.clone().unwrap();
    assert_eq!(
        data["trust-bundle.pem"], ca,
        "the CA's root, as in Secret isthmus-ca"
    );
    let documents: Vec<Value> = data["config.json"]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<String> = documents
        .iter()
        .map(|d| {
            format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "AuthorizationPolicy shop/allow-shop",
            "PeerAuthentication isthmus-system/mesh"
        ]
    );
    for document in &documents {
        assert_eq!(document["apiVersion"], "security.istio.io/v1");
        assert_eq!(
            document["metadata"]["creationTimestamp"],
            "2026-11-22T10:00:00Z"
        );
    }

    // The version announced is the one a sidecar computes from the mounted directory, bundle
    // included, and its config loads (the bundle is not parsed as config).
    let registry = config_maps.get("isthmus-registry").await.unwrap();
    let mut files: Vec<SourceFile> = [&routing, &registry]
        .iter()
        .flat_map(|cm| cm.data.clone().unwrap_or_default())
        .map(|(k, v)| SourceFile::new(k, v))
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let snapshot = isthmus_config::load(&files).expect("loads as a sidecar loads it");
    let announced = &registry.metadata.annotations.as_ref().unwrap()["isthmus.io/config-version"];
    assert_eq!(announced, snapshot.version());
    let without_bundle: Vec<SourceFile> = files
        .iter()
        .filter(|f| f.name != "trust-bundle.pem")
        .cloned()
        .collect();
    assert_ne!(
        announced,
        &isthmus_config::source::version_of(&without_bundle)
    );

    let data_routing = Api::<ConfigMap>::namespaced(client.clone(), "data")
        .get("isthmus-config")
        .await
        .unwrap();
    let data_config = &data_routing.data.as_ref().unwrap()["config.json"];
    assert!(
        data_config.contains("\"namespace\":\"data\""),
        "{data_config}"
    );
    assert!(!data_config.contains("allow-shop"), "{data_config}");

    let _ = stop.send(());
    let _ = task.await;
}
