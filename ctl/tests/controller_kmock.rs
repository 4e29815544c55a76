//! The controller against kmock, a Kubernetes API emulator served over HTTP on loopback
//! (`kmock_apiserver.py` beside this file says exactly what it emulates and what it does not):
//! Services, EndpointSlices, Pods, Istio custom objects and routing ConfigMaps are created
//! through the API, the controller (in-process, its real kube-rs client and watchers) writes
//! the routing and registry ConfigMaps with server-side apply and reports invalid resources as
//! Events, and the test reads them back and loads them as a sidecar would.
//! Skipped, with the reason, where no Python with kmock is found (scripts/setup-kmock.sh).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_config::SourceFile;
use isthmus_ctl::controller::{
    Controller, ControllerError, Options, Status, ISTIO_CONFIG_LABEL, REGISTRY_HASH_ANNOTATION,
    REGISTRY_KEY, ROUTING_KEY, VERSION_ANNOTATION,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};
use support::kmock::Kmock;

/// kmock without the resources named (comma-separated, as in RESOURCES) and a client of it;
/// `None`, with the test recorded as skipped, where no Python has kmock.
async fn start_kmock(without: &str) -> Option<(Kmock, Client)> {
    let kmock = Kmock::start_without_or_skip(without)?;
    let client = kmock.client().await;
    Some((kmock, client))
}

fn pod(name: &str, hash: &str, ip_label: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop",
            "labels": {"app": "web", "version": ip_label, "pod-template-hash": hash},
            "annotations": {"sidecar.isthmus.io/status": "{}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("web-{hash}"), "uid": "1", "controller": true}],
        },
        "spec": {"serviceAccountName": "web-sa", "containers": [{"name": "web", "image": "web"}]},
    }))
    .unwrap()
}

fn slice(second_ready: bool) -> EndpointSlice {
    let endpoint = |ip: &str, pod: &str, ready: bool| {
        json!({"addresses": [ip], "conditions": {"ready": ready},
               "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
    };
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "admin", "port": 9901, "protocol": "TCP"}],
        "endpoints": [endpoint("10.1.0.1", "web-5f6d-a", true),
                      endpoint("10.1.0.2", "web-5f6d-b", second_ready)],
    }))
    .unwrap()
}

/// A ConfigMap whose documents are routing input of its namespace.
fn istio_config_map(ns: &str, name: &str, yaml: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": {ISTIO_CONFIG_LABEL: "true"}},
        "data": {"mesh.yaml": yaml},
    }))
    .unwrap()
}

const ROUTING: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n";

/// The controller, in this process, until [`Running::stop`].
struct Running {
    status: Arc<Status>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ControllerError>>,
}

fn run_controller(client: &Client, options: Options) -> Running {
    let controller = Controller::new(client.clone(), options);
    let status = controller.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));
    Running { status, stop, task }
}

impl Running {
    /// Stops it and checks it stopped cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rv(cm: &ConfigMap) -> String {
    cm.metadata.resource_version.clone().unwrap_or_default()
}

/// What a sidecar in `shop` would load: the projected volume's files, routing and registry.
fn sidecar_files(routing: &ConfigMap, registry: &ConfigMap) -> Vec<SourceFile> {
    let mut files: Vec<SourceFile> = [routing, registry]
        .iter()
        .flat_map(|cm| cm.data.clone().unwrap_or_default())
        .map(|(k, v)| SourceFile::new(k, v))
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_configmap_follows_services_endpoints_and_pods() {
    let Some((_kmock, client)) = start_kmock("").await else {
        return;
    };
    let pp = PostParams::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.create(&pp, &pod("web-5f6d-a", "5f6d", "v1"))
        .await
        .unwrap();
    pods.create(&pp, &pod("web-5f6d-b", "5f6d", "v1"))
        .await
        .unwrap();
    let service = |ns: &str, name: &str, ip: &str| -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "admin", "port": 9901, "appProtocol": "grpc", "protocol": "TCP"}]},
        }))
        .unwrap()
    };
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(&pp, &service("shop", "web", "10.96.0.10"))
        .await
        .unwrap();
    // Another namespace: its service is in shop's registry, but nothing is meshed there.
    Api::<Service>::namespaced(client.clone(), "data")
        .create(&pp, &service("data", "db", "10.96.0.20"))
        .await
        .unwrap();
    // Found in review: a Service whose entry the sidecar rejects went into every registry,
    // which then loaded nowhere. It is left out and reported; the rest is written. (Port 53
    // twice over TCP: a real API server refuses this Service, kmock does not — it stands for
    // any entry the sidecar rejects.)
    let legacy_dns: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "legacy-dns", "namespace": "data"},
        "spec": {"type": "ExternalName", "externalName": "dns.example.com", "ports": [
            {"name": "dns-a", "port": 53, "protocol": "TCP"},
            {"name": "dns-b", "port": 53, "protocol": "TCP"}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "data")
        .create(&pp, &legacy_dns)
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    slices.create(&pp, &slice(false)).await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    // The user's routing: a labelled ConfigMap, whose documents the controller writes into
    // the namespace's isthmus-config.
    config_maps
        .create(&pp, &istio_config_map("shop", "routes", ROUTING))
        .await
        .unwrap();

    let controller = run_controller(
        &client,
        Options {
            monitoring: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(50),
            max_registry_bytes: 4096,
            resync: Duration::from_secs(3),
            ..Options::default()
        },
    );
    let status = controller.status.clone();

    // 1. The registry appears, loads as a sidecar loads it, and its version annotation is the
    //    version that sidecar reports.
    let registry = wait_for("the registry ConfigMap", async || {
        config_maps.get_opt("isthmus-registry").await.unwrap()
    })
    .await;
    let routing = config_maps.get("isthmus-config").await.unwrap();
    assert!(
        routing.data.as_ref().unwrap()[ROUTING_KEY].contains("REGISTRY_ONLY"),
        "the labelled ConfigMap's Sidecar is in the routing config"
    );
    let files = sidecar_files(&routing, &registry);
    let snapshot = isthmus_config::load(&files).unwrap();
    let annotations = registry.metadata.annotations.clone().unwrap();
    assert_eq!(annotations[VERSION_ANNOTATION], snapshot.version());
    let hosts: Vec<&str> = snapshot.services().iter().map(|s| s.host()).collect();
    assert_eq!(
        hosts,
        ["db.data.svc.cluster.local", "web.shop.svc.cluster.local"],
        "legacy-dns is left out"
    );
    let event = wait_for("the Event on the rejected Service", async || {
        Api::<Event>::namespaced(client.clone(), "data")
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("legacy-dns"))
    })
    .await;
    let regarding = event.regarding.unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("Service"));
    assert_eq!(regarding.api_version.as_deref(), Some("v1"));
    assert_eq!(event.reason.as_deref(), Some("InvalidConfig"));
    let note = event.note.unwrap();
    assert!(note.contains("duplicate port 53"), "{note}");
    let monitoring = status.monitoring_addr().unwrap();
    wait_for("the invalid Service counted", async || {
        http_get(monitoring, "/metrics")
            .await
            .contains("isthmus_controller_invalid_resources{kind=\"Service\"} 1")
            .then_some(())
    })
    .await;
    assert!(snapshot
        .service_port("10.96.0.10:80".parse().unwrap())
        .is_some());
    let text = &registry.data.as_ref().unwrap()[REGISTRY_KEY];
    let web: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["metadata"]["name"] == "web")
        .unwrap();
    assert_eq!(
        web["spec"]["endpoints"],
        json!([{"address": "10.1.0.1", "ports": {"admin": 9901, "http": 8080},
                "serviceAccount": "web-sa",
                "labels": {"app": "web", "version": "v1", "pod-template-hash": "5f6d",
                           "isthmus.io/workload": "web"}}]),
        "only the ready endpoint, with its pod's labels, workload and service account"
    );
    assert_eq!(web["spec"]["ports"][1]["protocol"], "GRPC");
    assert_eq!(web["spec"]["ports"][0]["protocol"], "HTTP");
    // Nothing is written where nothing is meshed.
    assert!(Api::<ConfigMap>::namespaced(client.clone(), "data")
        .get_opt("isthmus-registry")
        .await
        .unwrap()
        .is_none());
    let monitoring = status.monitoring_addr().unwrap();
    wait_for("ready", async || status.ready().then_some(())).await;
    assert!(http_get(monitoring, "/readyz")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(http_get(monitoring, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    let metrics = http_get(monitoring, "/metrics").await;
    assert!(
        metrics.contains("isthmus_controller_configmap_writes_total{result=\"ok\"} 2"),
        "routing and registry: {metrics}"
    );
    assert!(
        metrics.contains("isthmus_controller_configmap_bytes{"),
        "{metrics}"
    );
    assert_eq!(status.writes(), 2);

    // 2. An endpoint becomes ready: only the registry ConfigMap is written.
    slices
        .patch(
            "web-x1",
            &PatchParams::default(),
            &Patch::Merge(&slice(true)),
        )
        .await
        .unwrap();
    let registry2 = wait_for("the second endpoint", async || {
        let cm = config_maps.get("isthmus-registry").await.unwrap();
        cm.data.as_ref().unwrap()[REGISTRY_KEY]
            .contains("10.1.0.2")
            .then_some(cm)
    })
    .await;
    assert_ne!(rv(&registry2), rv(&registry));
    assert_eq!(
        rv(&config_maps.get("isthmus-config").await.unwrap()),
        rv(&routing),
        "an endpoint change does not rewrite routing"
    );
    assert_eq!(status.writes(), 3);
    let files = sidecar_files(&routing, &registry2);
    let snapshot = isthmus_config::load(&files).unwrap();
    assert_eq!(
        registry2.metadata.annotations.as_ref().unwrap()[VERSION_ANNOTATION],
        snapshot.version()
    );

    // 3. A change that does not touch the registry (a pod annotation): reconciled, not written.
    let reconciles = status.reconciles();
    pods.patch(
        "web-5f6d-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"note": "touched"}}})),
    )
    .await
    .unwrap();
    wait_for("a reconcile", async || {
        (status.reconciles() > reconciles).then_some(())
    })
    .await;
    assert_eq!(status.writes(), 3, "unchanged registry written again");
    assert_eq!(
        rv(&config_maps.get("isthmus-registry").await.unwrap()),
        rv(&registry2)
    );

    // 4. Routing changes: registry.json is unchanged, the version sidecars will report is not.
    config_maps
        .patch(
            "routes",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"mesh.yaml": ROUTING.replace("REGISTRY_ONLY", "ALLOW_ANY")}}),
            ),
        )
        .await
        .unwrap();
    let routing3 = wait_for("the new routing", async || {
        let cm = config_maps.get("isthmus-config").await.unwrap();
        cm.data.as_ref().unwrap()[ROUTING_KEY]
            .contains("ALLOW_ANY")
            .then_some(cm)
    })
    .await;
    let expected = isthmus_config::source::version_of(&sidecar_files(&routing3, &registry2));
    let registry3 = wait_for("the new version", async || {
        let cm = config_maps.get("isthmus-registry").await.unwrap();
        (cm.metadata.annotations.as_ref().unwrap()[VERSION_ANNOTATION] == expected).then_some(cm)
    })
    .await;
    assert_eq!(registry3.data, registry2.data);
    assert_eq!(
        registry3.metadata.annotations.as_ref().unwrap()[REGISTRY_HASH_ANNOTATION],
        registry2.metadata.annotations.as_ref().unwrap()[REGISTRY_HASH_ANNOTATION]
    );

    // 5. A registry that does not fit is not written; the namespace keeps its last one.
    let ports: Vec<Value> = (0..60)
        .map(|i| json!({"name": format!("tcp-a-rather-long-port-name-{i}"), "port": 10000 + i}))
        .collect();
    let big: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "big", "namespace": "data"},
        "spec": {"clusterIP": "10.96.0.30", "ports": ports},
    }))
    .unwrap();
    let data_services: Api<Service> = Api::namespaced(client.clone(), "data");
    data_services.create(&pp, &big).await.unwrap();
    wait_for("too_large", async || {
        http_get(monitoring, "/metrics")
            .await
            .contains("isthmus_controller_configmap_writes_total{result=\"too_large\"} 1")
            .then_some(())
    })
    .await;
    assert_eq!(status.writes(), 5);
    assert_eq!(
        rv(&config_maps.get("isthmus-registry").await.unwrap()),
        rv(&registry3)
    );
    let reconciles = status.reconciles();
    data_services
        .delete("big", &Default::default())
        .await
        .unwrap();
    wait_for("a reconcile", async || {
        (status.reconciles() > reconciles).then_some(())
    })
    .await;
    assert_eq!(
        status.writes(),
        5,
        "back to what is there: nothing to write"
    );

    // 6. The registry ConfigMap deleted by hand is restored by the periodic resync.
    config_maps
        .delete("isthmus-registry", &Default::default())
        .await
        .unwrap();
    let restored = wait_for("the restored registry", async || {
        config_maps.get_opt("isthmus-registry").await.unwrap()
    })
    .await;
    assert_eq!(restored.data, registry3.data);
    assert_eq!(status.writes(), 6);

    // 7. Found in review: a hand edit of the data that leaves the hash annotations was never
    //    repaired. The resync compares the data there, routing and registry alike.
    let routing_before = config_maps.get("isthmus-config").await.unwrap();
    for (name, key) in [
        ("isthmus-registry", REGISTRY_KEY),
        ("isthmus-config", ROUTING_KEY),
    ] {
        config_maps
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {key: "{}\n"}})),
            )
            .await
            .unwrap();
    }
    let repaired = wait_for("the edited ConfigMaps repaired", async || {
        let registry = config_maps.get("isthmus-registry").await.unwrap();
        let routing = config_maps.get("isthmus-config").await.unwrap();
        (registry.data == registry3.data && routing.data == routing_before.data).then_some(registry)
    })
    .await;
    assert_eq!(repaired.data, registry3.data);
    assert_eq!(
        status.writes(),
        8,
        "exactly the two edited ConfigMaps rewritten"
    );

    controller.stop().await;
}

fn networking(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn custom_object(resource: &ApiResource, ns: &str, name: &str, spec: Value) -> DynamicObject {
    let mut object = DynamicObject::new(name, resource).within(ns);
    object.data = json!({"spec": spec});
    object
}

/// The documents of a routing ConfigMap's `config.json`, as `Kind namespace/name`.
fn routing_documents(cm: &ConfigMap) -> Vec<String> {
    cm.data.as_ref().unwrap()[ROUTING_KEY]
        .lines()
        .map(|l| {
            let d: Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_configmap_is_written_from_istio_objects_and_invalid_ones_become_events() {
    let Some((_kmock, client)) = start_kmock("").await else {
        return;
    };
    let pp = PostParams::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.create(&pp, &pod("web-5f6d-a", "5f6d", "v1"))
        .await
        .unwrap();
    let reviews: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 9080}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(&pp, &reviews)
        .await
        .unwrap();
    let vs = networking("VirtualService", "virtualservices");
    let shop_vs: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &vs);
    let route = |host: &str| json!({"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]});
    shop_vs
        .create(
            &pp,
            &custom_object(&vs, "shop", "reviews", route("reviews")),
        )
        .await
        .unwrap();
    // Not for shop: a VirtualService kept to its own namespace.
    Api::<DynamicObject>::namespaced_with(client.clone(), "data", &vs)
        .create(
            &pp,
            &custom_object(
                &vs,
                "data",
                "private",
                json!({"hosts": ["reviews.shop.svc.cluster.local"], "exportTo": ["."],
                       "http": [{"route": [{"destination": {"host": "reviews.shop.svc.cluster.local"}}]}]}),
            ),
        )
        .await
        .unwrap();
    // The mesh-wide default Sidecar, in the root namespace.
    let sidecar = networking("Sidecar", "sidecars");
    Api::<DynamicObject>::namespaced_with(client.clone(), "isthmus-system", &sidecar)
        .create(
            &pp,
            &custom_object(
                &sidecar,
                "isthmus-system",
                "default",
                json!({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}}),
            ),
        )
        .await
        .unwrap();
    // A user's routing ConfigMap that is not the controller's: never deleted by it.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    config_maps
        .create(&pp, &istio_config_map("shop", "routes", ""))
        .await
        .unwrap();

    let controller = run_controller(
        &client,
        Options {
            monitoring: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(50),
            gc_grace: Duration::from_millis(300),
            ..Options::default()
        },
    );
    let status = controller.status.clone();

    // 1. The custom object is in shop's routing config, with the root namespace's Sidecar and
    //    without what data keeps to itself; routing and registry load as a sidecar loads them.
    let routing = wait_for("the routing ConfigMap", async || {
        config_maps.get_opt("isthmus-config").await.unwrap()
    })
    .await;
    assert_eq!(
        routing_documents(&routing),
        [
            "Sidecar isthmus-system/default",
            "VirtualService shop/reviews"
        ]
    );
    let registry = wait_for("the registry ConfigMap", async || {
        config_maps.get_opt("isthmus-registry").await.unwrap()
    })
    .await;
    let snapshot = isthmus_config::load(&sidecar_files(&routing, &registry)).unwrap();
    assert_eq!(
        registry.metadata.annotations.as_ref().unwrap()[VERSION_ANNOTATION],
        snapshot.version()
    );
    wait_for("ready", async || status.ready().then_some(())).await;

    // 2. An invalid VirtualService: left out (the ConfigMap is not rewritten), reported as a
    //    Warning Event regarding it whose note names the field, and counted.
    let writes = status.writes();
    shop_vs
        .create(
            &pp,
            &custom_object(
                &vs,
                "shop",
                "broken",
                json!({"hosts": ["reviews"], "http": [{"route": [
                    {"destination": {"host": "reviews", "subset": "v9"}}]}]}),
            ),
        )
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "shop");
    let event = wait_for("the Event", async || {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken"))
    })
    .await;
    let regarding = event.regarding.unwrap();
    assert_eq!(regarding.kind.as_deref(), Some("VirtualService"));
    assert_eq!(
        regarding.api_version.as_deref(),
        Some("networking.istio.io/v1")
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("InvalidConfig"));
    let note = event.note.unwrap();
    assert!(
        note.starts_with("spec.http[0].route[0].destination.subset"),
        "{note}"
    );
    let monitoring = status.monitoring_addr().unwrap();
    // Counted in the same reconcile, just after the Event.
    wait_for("the invalid_resources gauge", async || {
        http_get(monitoring, "/metrics")
            .await
            .contains("isthmus_controller_invalid_resources{kind=\"VirtualService\"} 1")
            .then_some(())
    })
    .await;
    assert_eq!(
        status.writes(),
        writes,
        "nothing rewritten {}",
        http_get(monitoring, "/metrics").await
    );
    assert_eq!(
        rv(&config_maps.get("isthmus-config").await.unwrap()),
        rv(&routing)
    );
    // Reported once, not on every reconcile.
    let reconciles = status.reconciles();
    pods.patch(
        "web-5f6d-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"note": "touched"}}})),
    )
    .await
    .unwrap();
    wait_for("a reconcile", async || {
        (status.reconciles() > reconciles).then_some(())
    })
    .await;
    let reported = events.list(&Default::default()).await.unwrap().items.len();
    assert_eq!(reported, 1, "one Event for one problem");

    // 3. The namespace leaves the mesh (its last injected pod goes): after the grace, the
    //    controller's ConfigMaps there are deleted; the user's stays.
    pods.delete("web-5f6d-a", &Default::default())
        .await
        .unwrap();
    wait_for("the managed ConfigMaps deleted", async || {
        let left = config_maps.list(&Default::default()).await.unwrap();
        let names: Vec<String> = left
            .items
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        (names == ["routes"]).then_some(())
    })
    .await;

    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_istio_crd_does_not_block_readiness_and_the_root_namespace_is_watched() {
    let Some((_kmock, client)) =
        start_kmock("networking.istio.io/v1/sidecars,networking.istio.io/v1/destinationrules")
            .await
    else {
        return;
    };
    let pp = PostParams::default();
    Api::<Pod>::namespaced(client.clone(), "shop")
        .create(&pp, &pod("web-5f6d-a", "5f6d", "v1"))
        .await
        .unwrap();
    // The ConfigMap path stands in for the missing kinds: the mesh-wide Sidecar, in the root
    // namespace, which is watched though only shop is listed.
    let root_sidecar = ROUTING.replace("namespace: shop", "namespace: isthmus-system");
    Api::<ConfigMap>::namespaced(client.clone(), "isthmus-system")
        .create(
            &pp,
            &istio_config_map("isthmus-system", "mesh", &root_sidecar),
        )
        .await
        .unwrap();
    let controller = run_controller(
        &client,
        Options {
            namespaces: vec!["shop".into()],
            monitoring: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(50),
            ..Options::default()
        },
    );
    let status = controller.status.clone();
    wait_for("ready", async || status.ready().then_some(())).await;
    let routing = Api::<ConfigMap>::namespaced(client.clone(), "shop")
        .get("isthmus-config")
        .await
        .unwrap();
    assert_eq!(
        routing_documents(&routing),
        ["Sidecar isthmus-system/default"]
    );
    assert!(
        Api::<ConfigMap>::namespaced(client.clone(), "isthmus-system")
            .get_opt("isthmus-config")
            .await
            .unwrap()
            .is_none(),
        "the root namespace is read, not meshed"
    );
    controller.stop().await;
}

/// The shard ConfigMaps of `shop`'s registry, by name.
async fn registry_shards(
    config_maps: &Api<ConfigMap>,
) -> std::collections::BTreeMap<String, ConfigMap> {
    config_maps
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|cm| {
            cm.metadata
                .name
                .as_deref()
                .is_some_and(|n| n == "isthmus-registry" || n.starts_with("isthmus-registry-"))
        })
        .map(|cm| (cm.metadata.name.clone().unwrap(), cm))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_over_one_configmap_is_split_into_shards_and_scoped_by_a_sidecar() {
    let Some((_kmock, client)) = start_kmock("").await else {
        return;
    };
    let pp = PostParams::default();
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let service = |i: usize, port: u16| -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i:02}"), "namespace": "shop"},
            "spec": {"clusterIP": format!("10.96.1.{i}"), "ports": [
                {"name": "http", "port": port}, {"name": "grpc-api", "port": 9090},
                {"name": "tcp-admin", "port": 9901}]},
        }))
        .unwrap()
    };
    for i in 0..40 {
        services.create(&pp, &service(i, 80)).await.unwrap();
    }
    const BUDGET: usize = 8192;
    let controller = run_controller(
        &client,
        Options {
            namespaces: vec!["shop".into()],
            monitoring: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(50),
            max_registry_bytes: BUDGET,
            ..Options::default()
        },
    );
    let status = controller.status.clone();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");

    // 1. About 20 KB of registry: several shards (a power of two, at most half full on
    //    average), each within the budget, every Service in exactly one, and the version on
    //    `isthmus-registry` is the one a sidecar computes over the whole projected directory.
    wait_for("ready", async || status.ready().then_some(())).await;
    let shards = registry_shards(&config_maps).await;
    let n = shards.len();
    assert!(n > 1 && n.is_power_of_two(), "{n} shards");
    let expected: Vec<String> = std::iter::once("isthmus-registry".to_owned())
        .chain((1..n).map(|k| format!("isthmus-registry-{k}")))
        .collect();
    let mut names: Vec<String> = shards.keys().cloned().collect();
    names.sort_by_key(|name| expected.iter().position(|e| e == name));
    assert_eq!(names, expected);
    let registry = &shards["isthmus-registry"];
    let annotations = registry.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["isthmus.io/registry-shards"], n.to_string());
    let mut files: Vec<SourceFile> = shards
        .values()
        .chain(
            config_maps
                .get_opt("isthmus-config")
                .await
                .unwrap()
                .as_ref(),
        )
        .flat_map(|cm| cm.data.clone().unwrap_or_default())
        .map(|(k, v)| SourceFile::new(k, v))
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(files.iter().all(|f| f.text.len() <= BUDGET));
    let snapshot = isthmus_config::load(&files).unwrap();
    assert_eq!(snapshot.services().len(), 40);
    assert_eq!(annotations[VERSION_ANNOTATION], snapshot.version());

    // 2. One Service changes: exactly one shard is rewritten (and `isthmus-registry`, whose
    //    version annotation moves, if it is not that one).
    let writes = status.writes();
    services
        .patch(
            "svc-07",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"ports": [{"name": "http", "port": 8080}]}})),
        )
        .await
        .unwrap();
    let after = wait_for("the new version", async || {
        let now = registry_shards(&config_maps).await;
        (now["isthmus-registry"]
            .metadata
            .annotations
            .as_ref()
            .unwrap()[VERSION_ANNOTATION]
            != annotations[VERSION_ANNOTATION])
            .then_some(now)
    })
    .await;
    let changed: Vec<&String> = after
        .iter()
        .filter(|(name, cm)| cm.data != shards[*name].data)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(
        status.writes() - writes,
        if changed[0] == "isthmus-registry" {
            1
        } else {
            2
        }
    );

    // 3. A Sidecar scopes shop to two of its Services: one shard is enough, the others are
    //    deleted, and the registry holds just those two.
    let sidecar = networking("Sidecar", "sidecars");
    Api::<DynamicObject>::namespaced_with(client.clone(), "shop", &sidecar)
        .create(
            &pp,
            &custom_object(
                &sidecar,
                "shop",
                "default",
                json!({"egress": [{"hosts": ["./svc-01.shop.svc.cluster.local",
                                             "*/svc-02.shop.svc.cluster.local"]}]}),
            ),
        )
        .await
        .unwrap();
    let scoped = wait_for("one shard", async || {
        let now = registry_shards(&config_maps).await;
        (now.len() == 1).then_some(now)
    })
    .await;
    let text = &scoped["isthmus-registry"].data.as_ref().unwrap()["registry.json"];
    let hosts: Vec<&str> = text
        .lines()
        .map(|l| {
            l.split("\"hosts\":[\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        hosts,
        [
            "svc-01.shop.svc.cluster.local",
            "svc-02.shop.svc.cluster.local"
        ]
    );
    assert_eq!(
        scoped["isthmus-registry"]
            .metadata
            .annotations
            .as_ref()
            .unwrap()["isthmus.io/registry-shards"],
        "1"
    );

    controller.stop().await;
}
