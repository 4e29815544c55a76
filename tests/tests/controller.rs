//! The controller end to end, as in a cluster: the real `isthmus-ctl controller` binary against
//! kmock (the Kubernetes API emulator of ctl/tests/kmock_apiserver.py), **kubectl** as the
//! client that creates and deletes the Service, EndpointSlice and Pods, the ConfigMaps the
//! controller writes materialised the way a kubelet does ([`ConfigMapDir`]: a new generation
//! and one `..data` swap per change seen), real isthmus-proxy sidecars in network-namespace
//! pods reading that directory, and `isthmus-ctl proxy-status` run as a process, asking the
//! sidecars through kmock's pods/proxy forwarder.
//!
//! The control plane (kmock, the controller, kubectl, proxy-status) runs in the mesh's "node"
//! namespace: loopback there is theirs, and every pod address is reachable from it, as pod IPs
//! are from a real API server. Skipped, with the reason, without root (the netns harness),
//! kubectl, or a Python with kmock (scripts/setup-kmock.sh).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use isthmus_config::SourceFile;
use isthmus_ctl::configmap::ConfigMapDir;
use isthmus_ctl::controller::split::shard_config_maps;
use isthmus_ctl::local::{default_bin_dir, Mesh, MeshSpec, PodSpec, HTTP_PORT};
use isthmus_ctl::netns::Netns;
use isthmus_tests::{prerequisites, skip};
use serde_json::{json, Value};

const NS: &str = "shop";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const ROUTING: &str = "isthmus-config";
const REGISTRY: &str = "isthmus-registry";
const VERSION_ANNOTATION: &str = "isthmus.io/config-version";

/// The Python that has kmock: `$ISTHMUS_KMOCK_PYTHON`, the venv scripts/setup-kmock.sh makes
/// under target/, or `python3`.
fn kmock_python() -> Option<String> {
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/kmock-venv/bin/python"
    );
    std::env::var("ISTHMUS_KMOCK_PYTHON")
        .ok()
        .into_iter()
        .chain([venv.to_owned(), "python3".to_owned()])
        .find(|python| {
            Command::new(python)
                .args(["-c", "import kmock"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

fn kubectl_installed() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A process of the control plane; killed and reaped on drop.
struct Process {
    name: &'static str,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Some(mut err) = self.child.stderr.take() {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                eprintln!("==== {} stderr\n{text}", self.name);
            }
        }
    }
}

/// The kubeconfig and the controller's log; removed unless the test failed.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> WorkDir {
        let dir =
            std::env::temp_dir().join(format!("isthmus-controller-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        WorkDir(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} (kubeconfig, controller.log)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The API server: kmock in the node namespace; its kubeconfig in `dir`.
fn start_kmock(node: &Netns, python: &str, dir: &Path) -> (Process, PathBuf) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ctl/tests/kmock_apiserver.py"
    );
    let mut child = node
        .command(python, None)
        .unwrap()
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
    let process = Process {
        name: "kmock",
        child,
    };
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("kmock did not start: {line:?}"));
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: kmock, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\ncontexts: [{{name: kmock, context: {{cluster: kmock, user: test, namespace: {NS}}}}}]\n\
             current-context: kmock\n"
        ),
    )
    .unwrap();
    (process, kubeconfig)
}

/// kubectl (and the other clients) in the node namespace, against kmock.
struct Cluster<'a> {
    node: &'a Netns,
    kubeconfig: PathBuf,
    bin_dir: PathBuf,
}

impl Cluster<'_> {
    fn run(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = self.node.command(program, None).unwrap();
        command
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// `kubectl ARGS`; panics with its stderr unless it succeeds.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(Path::new("kubectl"), args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl create` of a JSON object (no OpenAPI document to validate against).
    fn create(&self, object: &Value) {
        self.kubectl(
            &["create", "--validate=false", "-f", "-"],
            Some(&object.to_string()),
        );
    }

    /// Every ConfigMap of the namespace.
    fn config_maps(&self) -> Vec<Value> {
        let list: Value = serde_json::from_str(
            &self.kubectl(&["get", "configmaps", "-n", NS, "-o", "json"], None),
        )
        .unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// A ConfigMap of the namespace, or `None` while it does not exist.
    fn config_map(&self, name: &str) -> Option<Value> {
        let out = self.run(
            Path::new("kubectl"),
            &["get", "configmap", name, "-n", NS, "-o", "json"],
            None,
        );
        if out.status.success() {
            return Some(serde_json::from_slice(&out.stdout).unwrap());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("NotFound"), "kubectl get {name}: {err}");
        None
    }

    /// `isthmus-ctl proxy-status -n shop --check`: the exit code and each pod's STATUS.
    fn proxy_status(&self) -> (i32, Vec<(String, String)>) {
        let out = self.run(
            &self.bin_dir.join("isthmus-ctl"),
            &["proxy-status", "-n", NS, "--check", "--timeout-ms", "10000"],
            None,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 2,
            "proxy-status failed ({code}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = stdout.lines();
        let header = lines.next().unwrap_or_default();
        let status_at = header.find("STATUS").expect("a STATUS column");
        let rows = lines
            .take_while(|l| !l.contains("meshed pod(s)"))
            .map(|l| {
                let name = l.split_whitespace().next().unwrap_or_default().to_owned();
                (name, l[status_at..].trim().to_owned())
            })
            .collect();
        (code, rows)
    }
}

/// What a kubelet does for the pods' projected volume: every mounted ConfigMap that exists,
/// all keys as files of one generation, written again whenever one of them changed.
struct Kubelet {
    dir: ConfigMapDir,
    seen: Vec<Option<String>>,
}

/// The ConfigMaps the injector's projected volume mounts, every one optional: routing, the
/// registry and its shards.
fn mounted() -> Vec<String> {
    std::iter::once(ROUTING.to_owned())
        .chain(shard_config_maps(REGISTRY))
        .collect()
}

impl Kubelet {
    /// Re-materialises the directory if any mounted ConfigMap changed since the last sync;
    /// returns the written version and the controller's version annotation, which must agree.
    fn sync(&mut self, cluster: &Cluster) -> Option<(String, String)> {
        let all = cluster.config_maps();
        let maps: Vec<Option<&Value>> = mounted()
            .iter()
            .map(|name| {
                all.iter()
                    .find(|cm| cm["metadata"]["name"] == name.as_str())
            })
            .collect();
        let versions: Vec<Option<String>> = maps
            .iter()
            .map(|cm| {
                cm.as_ref()
                    .map(|cm| cm["metadata"]["resourceVersion"].to_string())
            })
            .collect();
        if versions == self.seen {
            return None;
        }
        self.seen = versions;
        let annotation = maps[1]?["metadata"]["annotations"][VERSION_ANNOTATION]
            .as_str()?
            .to_owned();
        let files: Vec<SourceFile> = maps
            .iter()
            .flatten()
            .filter_map(|cm| cm["data"].as_object())
            .flatten()
            .map(|(key, text)| SourceFile::new(key.clone(), text.as_str().unwrap_or_default()))
            .collect();
        let written = self.dir.write(&files).unwrap();
        Some((written, annotation))
    }

    /// Syncs on every change seen until the directory holds the version the controller
    /// announced, and that version differs from `previous`: the controller writes routing and
    /// registry as separate objects, so a kubelet may see one before the other (and the
    /// sidecars load that in-between version); it converges on the next sync. Bounded.
    fn sync_until_announced(&mut self, cluster: &Cluster, previous: Option<&str>) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Some((written, announced)) = self.sync(cluster) {
                if written == announced && Some(written.as_str()) != previous {
                    return written;
                }
                last = Some((written, announced));
            }
            assert!(
                Instant::now() < deadline,
                "the materialised directory never matched the controller's version \
                 (last written, announced: {last:?}); ConfigMaps: {:#?}",
                cluster.config_maps()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn pod_object(name: &str, app: &str, version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
            "labels": {"app": app, "version": version},
            "annotations": {"sidecar.isthmus.io/status": "{}"}},
        "spec": {"serviceAccountName": app, "containers": [{"name": app, "image": app}]},
    })
}

/// The status a kubelet reports for a running, ready pod at `ip`.
fn ready_status(ip: Ipv4Addr) -> String {
    json!({"status": {"phase": "Running", "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}]}})
    .to_string()
}

/// The Service's EndpointSlice as the endpoint controller writes it.
fn endpoints(backends: &[(&str, Ipv4Addr)]) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}})
        })
        .collect();
    json!({"endpoints": endpoints})
}

/// Which backends answer 20 requests from the client to the Service's VIP, by name.
fn answering(mesh: &Mesh) -> BTreeSet<String> {
    (0..20)
        .map(|_| {
            let (status, body) = mesh
                .pod("client")
                .http_get(SocketAddr::from((VIP, 80)), "/")
                .unwrap();
            assert_eq!(status, 200, "{body}");
            body.trim()
                .strip_prefix("hello from ")
                .unwrap_or_else(|| panic!("not the app: {body:?}"))
                .to_owned()
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn statuses(rows: &[(String, String)]) -> Vec<(&str, &str)> {
    rows.iter().map(|(n, s)| (n.as_str(), s.as_str())).collect()
}

#[test]
fn controller_writes_what_sidecars_route_by_and_proxy_status_follows_propagation() {
    if !prerequisites() {
        return;
    }
    if !kubectl_installed() {
        skip("kubectl is not installed");
        return;
    }
    let Some(python) = kmock_python() else {
        skip("no Python with kmock (run scripts/setup-kmock.sh, or set ISTHMUS_KMOCK_PYTHON)");
        return;
    };
    let mut spec = MeshSpec::new(
        &[],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("web-a", Some("web"), "v1"),
            PodSpec::meshed("web-b", Some("web"), "v2"),
            PodSpec::unmeshed("no-sidecar"),
        ],
    );
    spec.namespace = NS.into();
    spec.external_config = true;
    let mesh = Mesh::start(spec).unwrap_or_else(|e| panic!("mesh did not start: {e}"));
    let work = WorkDir::new();
    let (_kmock, kubeconfig) = start_kmock(mesh.node(), &python, &work.0);
    let cluster = Cluster {
        node: mesh.node(),
        kubeconfig,
        bin_dir: default_bin_dir().unwrap(),
    };
    let ip = |pod: &str| mesh.pod(pod).ipv4;

    // What the cluster's users and kubelets do, through kubectl.
    cluster.create(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"clusterIP": VIP.to_string(), "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT}]},
    }));
    for (pod, app, version) in [
        ("client", "client", "v1"),
        ("web-a", "web", "v1"),
        ("web-b", "web", "v2"),
    ] {
        cluster.create(&pod_object(pod, app, version));
        cluster.kubectl(
            &[
                "patch",
                "pod",
                pod,
                "--subresource=status",
                "--type=merge",
                "-p",
                &ready_status(ip(pod)),
            ],
            None,
        );
    }
    let mut slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x7k2p", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}],
    });
    slice["endpoints"] =
        endpoints(&[("web-a", ip("web-a")), ("web-b", ip("web-b"))])["endpoints"].clone();
    cluster.create(&slice);

    // Before the controller: the sidecars serve their empty start-up config, nothing is
    // written for the namespace.
    let (code, rows) = cluster.proxy_status();
    assert_eq!(code, 2, "--check passed with nothing written: {rows:?}");
    assert_eq!(
        statuses(&rows),
        [
            ("client", "NO CONFIG"),
            ("web-a", "NO CONFIG"),
            ("web-b", "NO CONFIG")
        ]
    );

    let mut controller_args = vec![
        "controller",
        "--namespace",
        NS,
        "--monitoring",
        "127.0.0.1:15014",
    ];
    let help = cluster.run(
        &cluster.bin_dir.join("isthmus-ctl"),
        &["controller", "--help"],
        None,
    );
    if String::from_utf8_lossy(&help.stdout).contains("--leader-elect") {
        controller_args.push("--leader-elect=false");
    }
    let mut controller = cluster
        .node
        .command(cluster.bin_dir.join("isthmus-ctl"), None)
        .unwrap();
    controller
        .args(&controller_args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.0.join("controller.log")).unwrap());
    let _controller = Process {
        name: "controller",
        child: controller.spawn().expect("starting the controller"),
    };

    // The registry appears; the kubelet materialises it; every sidecar loads it.
    let mut kubelet = Kubelet {
        dir: ConfigMapDir::new(mesh.config_dir()).unwrap(),
        seen: Vec::new(),
    };
    let first = kubelet.sync_until_announced(&cluster, None);
    let registry = cluster.config_map(REGISTRY).unwrap();
    let text = registry["data"]["registry.json"].as_str().unwrap();
    assert!(
        text.contains(&ip("web-a").to_string()) && text.contains(&ip("web-b").to_string()),
        "{text}"
    );
    mesh.wait_for_version(&first, false).unwrap();
    assert_eq!(answering(&mesh), set(&["web-a", "web-b"]));
    let (code, rows) = cluster.proxy_status();
    assert_eq!(
        statuses(&rows),
        [
            ("client", "SYNCED"),
            ("web-a", "SYNCED"),
            ("web-b", "SYNCED")
        ]
    );
    assert_eq!(code, 0);

    // web-b is deleted; the endpoint controller drops it from the slice. Its netns pod keeps
    // running: if it still answered, the sidecar would be routing by a stale registry.
    cluster.kubectl(&["delete", "pod", "web-b", "-n", NS, "--wait=false"], None);
    cluster.kubectl(
        &[
            "patch",
            "endpointslice",
            "web-x7k2p",
            "-n",
            NS,
            "--type=merge",
            "-p",
            &endpoints(&[("web-a", ip("web-a"))]).to_string(),
        ],
        None,
    );
    // The controller writes a registry without web-b (maybe after one without its pod's
    // labels: the two deletions are separate events); until the kubelet syncs, every pod
    // still serves the first one and is STALE.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let registry = cluster.config_map(REGISTRY).unwrap();
        let text = registry["data"]["registry.json"]
            .as_str()
            .unwrap()
            .to_owned();
        if !text.contains(&ip("web-b").to_string()) {
            break text;
        }
        assert!(Instant::now() < deadline, "the registry kept web-b: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(text.contains(&ip("web-a").to_string()), "{text}");
    let (code, rows) = cluster.proxy_status();
    assert_eq!(statuses(&rows), [("client", "STALE"), ("web-a", "STALE")]);
    assert_eq!(code, 2);

    let second = kubelet.sync_until_announced(&cluster, Some(&first));
    assert_ne!(second, first);
    for pod in ["client", "web-a"] {
        mesh.pod(pod).wait_for_version(&second, false).unwrap();
    }
    assert_eq!(answering(&mesh), set(&["web-a"]));
    let (code, rows) = cluster.proxy_status();
    assert_eq!(statuses(&rows), [("client", "SYNCED"), ("web-a", "SYNCED")]);
    assert_eq!(code, 0);

    // Two injected pods whose sidecars cannot answer: one the kubelet has not reported ready,
    // one ready at the address of a pod where nothing serves 15020 (refused at once), so the
    // API server's forwarder says why.
    cluster.create(&pod_object("web-c", "web", "v1"));
    cluster.create(&pod_object("web-d", "web", "v1"));
    cluster.kubectl(
        &[
            "patch",
            "pod",
            "web-d",
            "--subresource=status",
            "--type=merge",
            "-p",
            &ready_status(ip("no-sidecar")),
        ],
        None,
    );
    let (code, rows) = cluster.proxy_status();
    assert_eq!(code, 2);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(
        rows[2],
        ("web-c".into(), "NOT READY (pod not ready)".into())
    );
    assert_eq!(rows[3].0, "web-d");
    assert!(
        rows[3]
            .1
            .starts_with("NOT READY (sidecar unreachable: error trying to reach service"),
        "{rows:?}"
    );
}
