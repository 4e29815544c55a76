//! The exact API requests of a namespace's write, against a mocked client: kube-rs over a tower
//! service that records every request and answers as the API server would (404 for a missing
//! ConfigMap, an empty list, the applied object back). What kmock cannot show — the field
//! manager, `force`, the apply content type and the body sent — is asserted here.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use isthmus_config::SourceFile;
use kube::client::Body;
use serde_json::{json, Value};

use super::NamespaceFiles;
use crate::controller::{Controller, Options};

/// One request as the API server received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// A kube client whose requests are recorded in the returned log and answered by `answer`.
fn mocked_client() -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen = log.clone();
    let service = tower::service_fn(move |request: http::Request<Body>| {
        let seen = seen.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let request = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                body,
            };
            let (status, answer) = answer(&request);
            seen.lock().unwrap().push(request);
            let response = http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(answer.to_string().into_bytes()))
                .expect("response");
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(response)
        }
    });
    (kube::Client::new(service, "default"), log)
}

/// The API server's answers for an empty namespace.
fn answer(request: &Seen) -> (u16, Value) {
    let named = request.path.rsplit('/').next().unwrap_or_default();
    match request.method.as_str() {
        "GET" if named == "configmaps" => (
            200,
            json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "1"}, "items": []}),
        ),
        "GET" => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                   "message": format!("configmaps \"{named}\" not found"), "code": 404}),
        ),
        "PATCH" => {
            let mut object = request.body.clone();
            object["metadata"]["resourceVersion"] = json!("2");
            (200, object)
        }
        _ => (405, json!({"kind": "Status", "code": 405})),
    }
}

fn files() -> NamespaceFiles {
    NamespaceFiles {
        routing: Some(SourceFile::new(
            "config.json",
            "{\"apiVersion\":\"networking.istio.io/v1\",\"kind\":\"VirtualService\"}\n",
        )),
        registry: vec![SourceFile::new(
            "registry.json",
            "{\"apiVersion\":\"networking.istio.io/v1\",\"kind\":\"ServiceEntry\"}\n",
        )],
        trust_bundle: Some(SourceFile::new(
            isthmus_config::source::TRUST_BUNDLE,
            "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n",
        )),
    }
}

#[tokio::test]
async fn a_namespace_is_written_by_server_side_apply_as_isthmus_controller_and_only_once() {
    let (client, log) = mocked_client();
    let controller = Controller::new(client, Options::default());
    let files = files();
    let desired = files.written();

    let written = controller
        .write_namespace("shop", &files, None)
        .await
        .expect("written");
    assert_eq!(written, desired);

    let seen = log.lock().unwrap().clone();
    let writes: Vec<&Seen> = seen.iter().filter(|r| r.method != "GET").collect();
    assert!(
        writes.iter().all(|r| r.method == "PATCH"),
        "only server-side applies write: {writes:#?}"
    );
    let paths: Vec<&str> = writes.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/shop/configmaps/isthmus-config",
            "/api/v1/namespaces/shop/configmaps/isthmus-registry",
        ],
        "routing first, then the registry that announces the version"
    );
    for write in &writes {
        assert_eq!(write.content_type, "application/apply-patch+yaml");
        let mut query: Vec<&str> = write.query.split('&').filter(|p| !p.is_empty()).collect();
        query.sort_unstable();
        assert_eq!(query, ["fieldManager=isthmus-controller", "force=true"]);
        let metadata = &write.body["metadata"];
        assert_eq!(write.body["apiVersion"], "v1");
        assert_eq!(write.body["kind"], "ConfigMap");
        assert_eq!(metadata["namespace"], "shop");
        assert_eq!(
            metadata["labels"],
            json!({"app.kubernetes.io/managed-by": "isthmus-controller"})
        );
        // Nothing the API server owns is sent (a server-side apply claims every field it sends).
        for owned in [
            "resourceVersion",
            "uid",
            "managedFields",
            "creationTimestamp",
        ] {
            assert!(metadata.get(owned).is_none(), "{owned} sent: {metadata}");
        }
        assert!(write.body.get("status").is_none());
    }
    let routing = &writes[0].body;
    assert_eq!(
        routing["data"],
        json!({
            "config.json": files.routing.as_ref().unwrap().text,
            "trust-bundle.pem": files.trust_bundle.as_ref().unwrap().text,
        }),
        "the trust bundle beside the routing config"
    );
    assert_eq!(
        routing["metadata"]["annotations"]["isthmus.io/routing-hash"],
        json!(desired.routing_hash.clone().unwrap())
    );
    let registry = &writes[1].body;
    assert_eq!(
        registry["data"],
        json!({"registry.json": files.registry[0].text})
    );
    assert_eq!(
        registry["metadata"]["annotations"]["isthmus.io/config-version"],
        json!(desired.version),
        "the version the sidecars will report, on the registry: {registry}"
    );

    // The same content again: nothing is sent at all.
    log.lock().unwrap().clear();
    controller
        .write_namespace("shop", &files, Some(&written))
        .await
        .expect("unchanged");
    assert!(log.lock().unwrap().is_empty(), "{:#?}", log.lock().unwrap());

    // A rotated bundle: the routing ConfigMap and the version change, as the sidecar's do.
    let mut rotated = files;
    rotated
        .trust_bundle
        .as_mut()
        .unwrap()
        .text
        .push_str("new root\n");
    let now = controller
        .write_namespace("shop", &rotated, Some(&written))
        .await
        .expect("rotated");
    assert_ne!(now.version, written.version);
    let seen = log.lock().unwrap().clone();
    let paths: Vec<&str> = seen
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/shop/configmaps/isthmus-config",
            "/api/v1/namespaces/shop/configmaps/isthmus-registry",
        ]
    );
}

#[test]
fn the_version_is_what_a_sidecar_computes_from_the_mounted_directory() {
    let files = files();
    let dir = std::env::temp_dir().join(format!("isthmus-written-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let all = files
        .routing
        .iter()
        .chain(&files.registry)
        .chain(&files.trust_bundle);
    for file in all {
        std::fs::write(dir.join(&file.name), &file.text).unwrap();
    }
    let read = SourceFile::read_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(read.len(), 3, "{read:?}");
    assert_eq!(
        isthmus_config::source::version_of(&read),
        files.written().version
    );
}
