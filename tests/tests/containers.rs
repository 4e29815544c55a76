//! The images (`docker/build.sh`, built from the binaries under test) run as a kubelet runs a
//! pod: an infra container holding the network namespace (`isthmus-ctl pause`), the init
//! container with NET_ADMIN and NET_RAW only, the sidecar under a seccomp profile with its
//! image's user (1337), every other capability dropped and the config directory mounted
//! read-only, and the app. Two such pods on a network the test creates (internal: no route
//! out), HTTP from the client pod to the server's service VIP through both sidecars.
//!
//! Seccomp: the server's sidecar runs under a profile that refuses io_uring, as the default
//! profiles of Docker 25+ and containerd 2 do, and must fall back to epoll and say so; the
//! client's sidecar runs under the engine's own default profile, whatever it allows (Docker
//! 20.10, as on our machines, still allows io_uring there).
//!
//! The test process is the client: a thread that has entered the client pod's network
//! namespace, so the pod's capture rules apply to it as to any process of the pod.
//! Skipped (recorded, not passed) where no Docker engine answers.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use isthmus_config::SourceFile;
use isthmus_ctl::configmap::ConfigMapDir;
use isthmus_tests::{metric_sum, prerequisites, skip};

const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The app container's probes as the injector hands them to the sidecar.
const APP_PROBERS: &str = r#"{"/app-health/app/readyz": {"httpGet": {"path": "/status/200", "port": 8080}},
  "/app-health/app/livez": {"httpGet": {"path": "/status/500", "port": 8080}, "timeoutSeconds": 2}}"#;

/// A seccomp profile that allows everything but io_uring (refused with EPERM, as Docker 25+
/// and containerd 2 refuse it in their default profiles).
const NO_IO_URING: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [
    {
      "names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
      "action": "SCMP_ACT_ERRNO",
      "errnoRet": 1
    }
  ]
}
"#;

#[test]
fn pods_of_containers_route_through_both_sidecars() {
    if !prerequisites() {
        return;
    }
    if let Err(why) = engine() {
        skip(&format!("no Docker engine: {why}"));
        return;
    }
    let started = Instant::now();
    let tag = images().expect("building the images");
    let mut d = Docker::new().expect("test network");
    run(&mut d, &tag).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("containers test: {:.1} s", started.elapsed().as_secs_f64());
}

fn run(d: &mut Docker, tag: &str) -> Result<()> {
    let server_ip = d.ip(20);
    let client_ip = d.ip(21);
    let config = ConfigMapDir::new(d.dir.join("config")).context("config dir")?;
    config
        .write(&[registry(server_ip, client_ip)])
        .context("writing the config")?;
    let profile = d.dir.join("no-io-uring.json");
    std::fs::write(&profile, NO_IO_URING).context("writing the seccomp profile")?;

    // The init container without NET_ADMIN fails and says what to grant.
    let infra = d.infra("client", client_ip, tag)?;
    let out = d.output(&[
        "run",
        "--rm",
        "--network",
        &format!("container:{infra}"),
        "--cap-drop",
        "ALL",
        &format!("isthmus/init:{tag}"),
    ])?;
    assert!(
        !out.status.success(),
        "isthmus-init without NET_ADMIN succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NET_ADMIN"),
        "the error does not name NET_ADMIN: {stderr}"
    );

    let server = d.pod("server", server_ip, tag, config.path(), Some(&profile))?;
    let client = d.pod("client", client_ip, tag, config.path(), None)?;

    // Readiness on 15021 over the pod's address, as the kubelet probes it.
    for (pod, ip) in [(&server, server_ip), (&client, client_ip)] {
        let (status, body) = pod.get(SocketAddr::from((ip, 15021)), "/healthz/ready")?;
        assert_eq!(status, 200, "{} not ready: {body}", pod.name);
    }

    // The app's rewritten probes, as the kubelet sends them to the pod's address: the
    // sidecar (in its image, as 1337, read-only) runs the originals against the app.
    for (path, want) in [
        ("/app-health/app/readyz", 200),
        ("/app-health/app/livez", 500),
    ] {
        let (status, body) = server.get(SocketAddr::from((server_ip, 15020)), path)?;
        assert_eq!(status, want, "{path}: {body}");
    }
    // The classic sidecar's postStart hook, run as the kubelet runs it (exec in the sidecar's
    // container): the image has the command, and it returns once the proxy is ready.
    let hook = d.output(&[
        "exec",
        &format!("{}-proxy", server.container),
        "/usr/local/bin/isthmus-proxy",
        "wait",
        "--timeout-secs",
        "10",
    ])?;
    assert!(
        hook.status.success() && String::from_utf8_lossy(&hook.stdout).contains("ready"),
        "the wait hook: {hook:?}"
    );

    // Both sidecars run as 1337, under a seccomp filter, with no capability.
    for pod in [&server, &client] {
        let status = d.proxy_status(pod)?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            field("Uid:").starts_with("1337\t1337"),
            "{} sidecar Uid: {}",
            pod.name,
            field("Uid:")
        );
        assert!(field("Gid:").starts_with("1337\t1337"), "{}", pod.name);
        assert_eq!(
            field("Seccomp:"),
            "2",
            "{} sidecar not under seccomp",
            pod.name
        );
        assert_eq!(field("CapEff:"), "0000000000000000", "{}", pod.name);
    }

    // HTTP from the client pod to the service VIP: client sidecar → server sidecar → app.
    const REQUESTS: usize = 5;
    for i in 0..REQUESTS {
        let (status, body) =
            client.get(SocketAddr::from((SERVICE_VIP, 80)), &format!("/?n={i}"))?;
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from server\n"),
            "request {i}"
        );
    }
    // Each sidecar counted them: the client's as the service's, the server's as coming from
    // the client's workload (known from the registry by the peer address the capture kept).
    let source = [
        ("reporter", "source"),
        ("response_code", "200"),
        ("source_workload", "client"),
        ("destination_service", "server.mesh.svc.cluster.local"),
    ];
    client.wait_metric(client_ip, "istio_requests_total", &source, REQUESTS)?;
    let destination = [
        ("reporter", "destination"),
        ("response_code", "200"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    server.wait_metric(server_ip, "istio_requests_total", &destination, REQUESTS)?;

    // io_uring refused by seccomp: epoll, reported in the metric and, with the reason, the log.
    let metrics = server.metrics(server_ip)?;
    let backend = |m: &str, b| metric_sum(m, "isthmus_proxy_io_backend", &[("backend", b)]);
    assert_eq!(backend(&metrics, "epoll"), 1.0, "server sidecar: {metrics}");
    assert_eq!(backend(&metrics, "io_uring"), 0.0);
    let log = d.logs(&format!("{}-proxy", server.container))?;
    assert!(
        log.contains("io_uring unavailable") && log.contains("seccomp"),
        "the server sidecar's log does not say why it runs on epoll:\n{log}"
    );
    // The engine's own default profile: one backend, and the log agrees with the metric.
    let metrics = client.metrics(client_ip)?;
    let log = d.logs(&format!("{}-proxy", client.container))?;
    let uring = backend(&metrics, "io_uring") == 1.0;
    assert_eq!(
        backend(&metrics, "epoll") + backend(&metrics, "io_uring"),
        1.0
    );
    assert_eq!(uring, !log.contains("io_uring unavailable"), "{log}");
    eprintln!(
        "the engine's default seccomp profile {} io_uring",
        if uring { "allows" } else { "blocks" }
    );
    Ok(())
}

/// The registry the controller would write: the server's service, and the client's so that
/// its sidecar knows its own workload.
fn registry(server: Ipv4Addr, client: Ipv4Addr) -> SourceFile {
    let mut yaml = String::new();
    for (name, vip, ip) in [
        ("server", SERVICE_VIP, server),
        ("client", Ipv4Addr::new(10, 96, 0, 11), client),
    ] {
        let _ = write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: {name}, namespace: mesh}}\n\
             spec:\n  hosts: [{name}.mesh.svc.cluster.local]\n  addresses: [{vip}]\n\
             \x20 location: MESH_INTERNAL\n  resolution: STATIC\n\
             \x20 ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]\n\
             \x20 endpoints:\n  - {{address: {ip}, labels: {{app: {name}, version: v1, isthmus.io/workload: {name}}}}}\n"
        );
    }
    SourceFile::new("registry.yaml", yaml)
}

/// Whether a Docker engine answers.
fn engine() -> Result<()> {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Builds the images from the binaries under test, once per set of binaries (the tag is a
/// hash of their sizes and times), and removes the test images of older binaries.
fn images() -> Result<String> {
    let bin_dir = isthmus_ctl::local::default_bin_dir()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for bin in ["isthmus-proxy", "isthmus-init", "isthmus-ctl"] {
        let meta = std::fs::metadata(bin_dir.join(bin)).with_context(|| {
            format!(
                "{bin} not in {}: cargo build --workspace",
                bin_dir.display()
            )
        })?;
        (meta.len(), meta.modified()?).hash(&mut hasher);
    }
    let tag = format!("test-{:012x}", hasher.finish() & 0xffff_ffff_ffff);
    let listed = docker(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        "--filter",
        "reference=isthmus/*:test-*",
    ])?;
    // Newest first. The images of the last few sets of binaries stay: another checkout's test
    // run (a CI clone beside a work tree) may be using them right now.
    let mut kept: Vec<&str> = Vec::new();
    let stale: Vec<&str> = listed
        .lines()
        .filter(|r| {
            let t = r.rsplit(':').next().unwrap_or_default();
            if t == tag || kept.contains(&t) {
                return false;
            }
            if kept.len() < 3 {
                kept.push(t);
                return false;
            }
            true
        })
        .collect();
    if !stale.is_empty() {
        let _ = docker(&[&["rmi"][..], &stale].concat());
    }
    let refs: Vec<String> = ["proxy", "init", "ctl"]
        .iter()
        .map(|n| format!("isthmus/{n}:{tag}"))
        .collect();
    let have = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}"])
        .args(&refs)
        .output()?
        .status
        .success();
    if !have {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/build.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .args(["--tag", &tag, "--quiet"])
            .output()?;
        if !out.status.success() {
            bail!(
                "docker/build.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(tag)
}

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output()?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Everything the test created; removed on drop, whether the test passed or not.
struct Docker {
    prefix: String,
    network: Option<String>,
    subnet: u8,
    containers: Vec<String>,
    dir: PathBuf,
}

/// A running pod: its infra container's name and the process holding its network namespace.
struct Pod {
    name: String,
    container: String,
    ns_pid: u32,
}

impl Docker {
    /// Creates the pods' network: internal (no route out of it), on a /24 of 10.67.0.0/16.
    fn new() -> Result<Docker> {
        let prefix = format!("isth-c{}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut d = Docker {
            network: None,
            subnet: 0,
            containers: Vec::new(),
            dir,
            prefix,
        };
        let first = (std::process::id() % 200) as u8;
        let mut last_err = String::new();
        for i in 0..10u8 {
            let subnet = first.wrapping_add(i * 7) % 250;
            match docker(&[
                "network",
                "create",
                "--internal",
                "--subnet",
                &format!("10.67.{subnet}.0/24"),
                &format!("{}-net", d.prefix),
            ]) {
                Ok(_) => {
                    d.network = Some(format!("{}-net", d.prefix));
                    d.subnet = subnet;
                    return Ok(d);
                }
                // Another network (an earlier run's, someone else's) has this subnet.
                Err(e) => last_err = e.to_string(),
            }
        }
        bail!("no free subnet for the test network: {last_err}")
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 67, self.subnet, host)
    }

    fn output(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new("docker").args(args).output()?)
    }

    /// `docker run -d --name NAME ARGS...`, recorded for cleanup.
    fn start(&mut self, name: &str, args: &[&str]) -> Result<()> {
        self.containers.push(name.to_string());
        docker(&[&["run", "-d", "--name", name][..], args].concat())?;
        Ok(())
    }

    /// The pod's infra container, holding its network namespace on the test network.
    fn infra(&mut self, pod: &str, ip: Ipv4Addr, tag: &str) -> Result<String> {
        let name = format!("{}-{pod}", self.prefix);
        let network = self.network.clone().unwrap_or_default();
        self.start(
            &name,
            &[
                "--network",
                &network,
                "--ip",
                &ip.to_string(),
                "--cap-drop",
                "ALL",
                &format!("isthmus/ctl:{tag}"),
                "pause",
            ],
        )?;
        Ok(name)
    }

    /// A pod as a kubelet starts it: infra (if not yet there), init (to completion), app,
    /// sidecar; waits until the sidecar is ready.
    fn pod(
        &mut self,
        pod: &str,
        ip: Ipv4Addr,
        tag: &str,
        config: &Path,
        seccomp: Option<&Path>,
    ) -> Result<Pod> {
        let infra = format!("{}-{pod}", self.prefix);
        if !self.containers.contains(&infra) {
            self.infra(pod, ip, tag)?;
        }
        let netns = format!("container:{infra}");
        let init = docker(&[
            "run",
            "--rm",
            "--network",
            &netns,
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            &format!("isthmus/init:{tag}"),
        ]);
        // isthmus-init reports on stderr; docker's stdout is empty either way.
        init.with_context(|| format!("isthmus-init in {pod}"))?;
        self.start(
            &format!("{infra}-app"),
            &[
                "--network",
                &netns,
                "--cap-drop",
                "ALL",
                "--read-only",
                &format!("isthmus/ctl:{tag}"),
                "app",
                "--name",
                pod,
            ],
        )?;
        let mount = format!("{}:/etc/isthmus/config:ro", config.display());
        let seccomp = seccomp.map(|p| format!("seccomp={}", p.display()));
        let mut args = vec!["--network", &netns, "--cap-drop", "ALL", "--read-only"];
        if let Some(opt) = &seccomp {
            args.extend(["--security-opt", opt]);
        }
        let image = format!("isthmus/proxy:{tag}");
        args.extend(["-v", &mount, &image]);
        args.extend(["--workload", pod, "--namespace", "mesh", "--app", pod]);
        args.extend(["--app-version", "v1"]);
        // What the injector gives a sidecar whose app has HTTP probes (one failing).
        args.extend(["--app-probers", APP_PROBERS]);
        self.start(&format!("{infra}-proxy"), &args)?;
        let ns_pid = docker(&["inspect", "--format", "{{.State.Pid}}", &infra])?
            .parse()
            .context("infra pid")?;
        let pod = Pod {
            name: pod.to_string(),
            container: infra,
            ns_pid,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match pod.get(SocketAddr::from((ip, 15021)), "/healthz/ready") {
                Ok((200, _)) => return Ok(pod),
                other if Instant::now() > deadline => {
                    bail!(
                        "{} not ready after 20 s ({other:?}):\n{}",
                        pod.name,
                        self.logs(&format!("{}-proxy", pod.container))?
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `/proc/PID/status` of the sidecar's process, as the host sees it.
    fn proxy_status(&self, pod: &Pod) -> Result<String> {
        let name = format!("{}-proxy", pod.container);
        let pid = docker(&["inspect", "--format", "{{.State.Pid}}", &name])?;
        Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?)
    }

    fn logs(&self, container: &str) -> Result<String> {
        let out = self.output(&["logs", container])?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.containers {
                let logs = self.logs(c).unwrap_or_default();
                eprintln!("==== {c}\n{logs}");
            }
        }
        if !self.containers.is_empty() {
            let mut cmd = Command::new("docker");
            cmd.args(["rm", "-f"]).args(&self.containers);
            let _ = cmd.output();
        }
        if let Some(net) = &self.network {
            if let Err(e) = docker(&["network", "rm", net]) {
                eprintln!("warning: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pod {
    /// Runs `f` on a thread inside the pod's network namespace (its capture rules apply).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.ns_pid))?;
        std::thread::spawn(move || -> Result<T> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// One HTTP/1.1 GET from inside the pod; (status, body).
    fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n");
        let response = self.run(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            Ok(response)
        })??;
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no HTTP response from {addr}: {response:?}"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    fn metrics(&self, ip: Ipv4Addr) -> Result<String> {
        let (status, body) = self.get(SocketAddr::from((ip, 15020)), "/stats/prometheus")?;
        if status != 200 {
            bail!("{}: /stats/prometheus answered {status}", self.name);
        }
        Ok(body)
    }

    /// Waits (bounded) until the sidecar's `metric` with `labels` sums to `want`.
    fn wait_metric(
        &self,
        ip: Ipv4Addr,
        metric: &str,
        labels: &[(&str, &str)],
        want: usize,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics(ip)?;
            let got = metric_sum(&text, metric, labels);
            if got == want as f64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} sidecar: {metric}{labels:?} = {got}, want {want}:\n{text}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
