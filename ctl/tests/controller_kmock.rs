//! The controller against kmock, a Kubernetes API emulator served over HTTP on loopback
//! (`kmock_apiserver.py` beside this file says exactly what it emulates and what it does not):
//! Services, EndpointSlices, Pods and a routing ConfigMap are created through the API, the
//! controller (in-process, its real kube-rs client and watchers) writes the registry ConfigMap
//! with server-side apply, and the test reads it back and loads it as a sidecar would.
//! Skipped, with the reason, where no Python with kmock is found (scripts/setup-kmock.sh).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_config::SourceFile;
use isthmus_ctl::controller::{
    Controller, Options, REGISTRY_HASH_ANNOTATION, REGISTRY_KEY, VERSION_ANNOTATION,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::{json, Value};

/// Records the test as skipped for scripts/test.sh's summary, as `isthmus_tests::skip` does
/// (that crate depends on isthmus-ctl: a dev-dependency back would build isthmus-ctl twice).
fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("ISTHMUS_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// The Python that has kmock: `$ISTHMUS_KMOCK_PYTHON`, the venv scripts/setup-kmock.sh makes
/// under target/, or `python3`.
fn kmock_python() -> Option<String> {
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/kmock-venv/bin/python"
    );
    let candidates = std::env::var("ISTHMUS_KMOCK_PYTHON")
        .ok()
        .into_iter()
        .chain([venv.to_owned(), "python3".to_owned()]);
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import kmock"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The emulator process; killed on drop.
struct Kmock {
    child: Child,
    port: u16,
}

impl Kmock {
    fn start(python: &str) -> Kmock {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kmock_apiserver.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kmock");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Ok(port) = line.trim().parse() else {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("kmock did not start: {line:?} {err}");
        };
        Kmock { child, port }
    }

    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::from_yaml(&format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: kmock, cluster: {{server: \"http://127.0.0.1:{}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\ncontexts: [{{name: kmock, context: {{cluster: kmock, user: test}}}}]\n\
             current-context: kmock\n",
            self.port
        ))
        .unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        Client::try_from(config).unwrap()
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

const ROUTING: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n";

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
    let Some(python) = kmock_python() else {
        skip("no Python with kmock (run scripts/setup-kmock.sh, or set ISTHMUS_KMOCK_PYTHON)");
        return;
    };
    let kmock = Kmock::start(&python);
    let client = kmock.client().await;
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
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    slices.create(&pp, &slice(false)).await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    let routing: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "isthmus-config", "namespace": "shop"},
        "data": {"mesh.yaml": ROUTING},
    }))
    .unwrap();
    config_maps.create(&pp, &routing).await.unwrap();

    let controller = Controller::new(
        client.clone(),
        Options {
            monitoring: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(50),
            max_registry_bytes: 4096,
            resync: Duration::from_secs(3),
            ..Options::default()
        },
    );
    let status = controller.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    // 1. The registry appears, loads as a sidecar loads it, and its version annotation is the
    //    version that sidecar reports.
    let registry = wait_for("the registry ConfigMap", async || {
        config_maps.get_opt("isthmus-registry").await.unwrap()
    })
    .await;
    let routing = config_maps.get("isthmus-config").await.unwrap();
    let files = sidecar_files(&routing, &registry);
    let snapshot = isthmus_config::load(&files).unwrap();
    let annotations = registry.metadata.annotations.clone().unwrap();
    assert_eq!(annotations[VERSION_ANNOTATION], snapshot.version());
    let hosts: Vec<&str> = snapshot.services().iter().map(|s| s.host()).collect();
    assert_eq!(
        hosts,
        ["db.data.svc.cluster.local", "web.shop.svc.cluster.local"]
    );
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
        metrics.contains("isthmus_controller_configmap_writes_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("isthmus_controller_configmap_bytes{"),
        "{metrics}"
    );
    assert_eq!(status.writes(), 1);

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
        rv(&routing)
    );
    assert_eq!(status.writes(), 2);
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
    assert_eq!(status.writes(), 2, "unchanged registry written again");
    assert_eq!(
        rv(&config_maps.get("isthmus-registry").await.unwrap()),
        rv(&registry2)
    );

    // 4. Routing changes: registry.json is unchanged, the version sidecars will report is not.
    config_maps
        .patch(
            "isthmus-config",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"mesh.yaml": ROUTING.replace("REGISTRY_ONLY", "ALLOW_ANY")}}),
            ),
        )
        .await
        .unwrap();
    let routing3 = config_maps.get("isthmus-config").await.unwrap();
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
    assert_eq!(status.writes(), 3);
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
        3,
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
    assert_eq!(status.writes(), 4);

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
