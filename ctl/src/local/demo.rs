//! `isthmus-ctl local demo`: a mesh of four pods, traffic through it, a routing change applied
//! live through the config directory, a bad config rejected, metrics read back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use isthmus_config::SourceFile;

use super::{
    Mesh, MeshError, MeshSpec, Pod, PodSpec, ECHO_PORT, HTTP_PORT, HTTP_SERVICE_PORT, NAMESPACE,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<(), MeshError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(MeshError::Failed("interrupted".into()))
    } else {
        Ok(())
    }
}

const ROUTE_TO_V2: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: mesh}
spec:
  host: hello
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello, namespace: mesh}
spec:
  hosts: [hello]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route:
    - {destination: {host: hello, subset: v1}}
  - route:
    - {destination: {host: hello, subset: v2}}
    retries: {attempts: 2, retryOn: "5xx"}
  tcp:
  - route:
    - {destination: {host: hello, subset: v2}}
"#;

const BROKEN: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello, namespace: mesh}
spec:
  hosts: [hello]
  http:
  - route:
    - {destination: {host: hello, subset: v3}}
"#;

/// Runs the demo; with `keep`, leaves the mesh up until Ctrl-C.
pub fn run(keep: bool) -> Result<(), MeshError> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    step("Starting a local mesh: pods are network namespaces on a bridge");
    let mesh = Mesh::start(MeshSpec::new(
        &["hello"],
        vec![
            PodSpec::meshed("client", None, "v1"),
            PodSpec::meshed("hello-v1", Some("hello"), "v1"),
            PodSpec::meshed("hello-v2", Some("hello"), "v2"),
            PodSpec::unmeshed("legacy"),
        ],
    ))?;
    for pod in &mesh.pods {
        println!(
            "  pod {:<9} {:<11} {:<14} {}",
            pod.name,
            pod.ipv4.to_string(),
            pod.ipv6.to_string(),
            if pod.spec.sidecar {
                "isthmus-init rules + isthmus-proxy (uid 1337) + app"
            } else {
                "app only (not meshed)"
            }
        );
    }
    let vip = SocketAddr::from((mesh.vip4("hello"), HTTP_SERVICE_PORT));
    println!("  service hello.{NAMESPACE}.svc.cluster.local  VIP {} / {}  ports {HTTP_SERVICE_PORT}, {ECHO_PORT}", mesh.vip4("hello"), mesh.vip6("hello"));
    println!(
        "  config directory (a ConfigMap, kubelet-style): {}",
        mesh.config_dir().display()
    );
    let client = mesh.pod("client");
    interrupted()?;

    step(&format!(
        "client → hello ({vip}): no VirtualService, round robin over v1 and v2"
    ));
    for _ in 0..4 {
        curl(client, vip)?;
    }
    interrupted()?;

    step("Route to v2, except user jason to v1: a DestinationRule + VirtualService (..data symlink swap)");
    let version = mesh.write_config(vec![SourceFile::new("hello-routes.yaml", ROUTE_TO_V2)])?;
    mesh.wait_for_version(&version, false)?;
    println!("  every sidecar reports config version {version} (no restart)");
    for _ in 0..3 {
        curl(client, vip)?;
    }
    curl_as(client, vip, "jason")?;
    interrupted()?;

    let legacy = mesh.pod("legacy");
    let outside = SocketAddr::from((legacy.ipv4, HTTP_PORT));
    step(&format!(
        "client → legacy ({outside}), a pod outside the registry: passed through (ALLOW_ANY)"
    ));
    curl(client, outside)?;
    interrupted()?;

    step("A broken config (a subset no DestinationRule defines) is rejected; v2 routing keeps serving");
    let bad = mesh.write_config(vec![SourceFile::new("hello-routes.yaml", BROKEN)])?;
    let dump = client.wait_for_version(&bad, true)?;
    for issue in dump["lastError"]["issues"].as_array().into_iter().flatten() {
        println!("  rejected: {}", issue.as_str().unwrap_or_default());
    }
    curl(client, vip)?;
    interrupted()?;

    step("The client sidecar's Istio metrics (istio_requests_total, istio_tcp_connections_opened_total)");
    let metrics = client.metrics()?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_requests_total") || l.starts_with("istio_tcp_connections_opened_total")
    }) {
        println!("  {}", summarize(line));
    }
    for line in metrics.lines().filter(|l| {
        l.starts_with("isthmus_config_reloads_total") || l.starts_with("isthmus_proxy_io_backend{")
    }) {
        println!("  {line}");
    }

    if keep {
        step("Mesh is up. Try: ip netns exec <pod namespace> curl http://10.96.0.10/ ; Ctrl-C to tear down");
        for pod in &mesh.pods {
            println!("  {} → ip netns exec {} bash", pod.name, pod.netns().name());
        }
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    step("Tearing down: processes, namespaces, links and rules are removed");
    drop(mesh);
    println!("\ndone.");
    Ok(())
}

fn step(title: &str) {
    println!("\n▶ {title}");
}

/// A real curl from inside the pod when curl is installed, else the built-in client.
fn curl(pod: &Pod, addr: SocketAddr) -> Result<(), MeshError> {
    curl_with(pod, addr, None)
}

/// [`curl`] as user `user` (an `end-user` header, as Istio's request-routing task uses).
fn curl_as(pod: &Pod, addr: SocketAddr, user: &str) -> Result<(), MeshError> {
    curl_with(pod, addr, Some(user))
}

fn curl_with(pod: &Pod, addr: SocketAddr, user: Option<&str>) -> Result<(), MeshError> {
    let url = format!("http://{addr}/");
    let header = user.map(|u| format!("end-user: {u}"));
    let mut command = pod.netns().command("curl", None)?;
    command.args(["-sS", "--max-time", "5", &url]);
    if let Some(h) = &header {
        command.args(["-H", h]);
    }
    let shown = match &header {
        Some(h) => format!("-H '{h}' {url}"),
        None => url.clone(),
    };
    match command.output() {
        Ok(out) if out.status.success() => {
            println!(
                "  $ curl {shown}  →  {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
            Ok(())
        }
        Ok(out) => Err(MeshError::Failed(format!(
            "curl {url} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Err(_) if user.is_some() => {
            println!("  (curl is not installed: the request as {shown} is skipped)");
            Ok(())
        }
        Err(_) => {
            let (status, body) = pod.http_get(addr, "/")?;
            println!("  GET {url}  →  {status} {}", body.trim());
            Ok(())
        }
    }
}

/// The labels that tell the story, from one long Istio series line.
fn summarize(line: &str) -> String {
    let value = line.rsplit(' ').next().unwrap_or("");
    let pick = |key: &str| {
        line.split(&format!("{key}=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    format!(
        "{:<45} version={:<8} flags={:<3} {value}",
        pick("destination_service"),
        pick("destination_version"),
        pick("response_flags")
    )
}
