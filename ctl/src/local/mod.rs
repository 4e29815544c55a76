//! The whole mesh on one machine: each pod a network namespace on a bridge (held in its own
//! "node" namespace, so nothing touches the host's network), with isthmus-init's rules, an
//! isthmus-proxy sidecar running as UID 1337, and the built-in app. The controller's part —
//! writing the registry for the pods — is done here from the mesh's own spec.
//!
//! Everything is removed on drop: processes, namespaces (and with them links, bridge and rules).

pub mod demo;
mod pod;

pub use pod::Pod;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use isthmus_config::SourceFile;

use crate::configmap::ConfigMapDir;
use crate::netns::{Netns, NetnsError};

/// The port the built-in app serves HTTP on, and its service port.
pub const HTTP_PORT: u16 = 8080;
pub const HTTP_SERVICE_PORT: u16 = 80;
/// The built-in app's TCP echo port (service port too).
pub const ECHO_PORT: u16 = 9000;
/// The namespace the generated registry puts services in.
pub const NAMESPACE: &str = "mesh";
pub const PROXY_UID: u32 = 1337;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// A pod to create.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    /// The service (`app` label) it backs, if any.
    pub app: Option<String>,
    pub version: String,
    /// Whether it gets isthmus-init and a sidecar; unmeshed pods are plain hosts.
    pub sidecar: bool,
}

impl PodSpec {
    pub fn meshed(name: &str, app: Option<&str>, version: &str) -> Self {
        PodSpec {
            name: name.into(),
            app: app.map(Into::into),
            version: version.into(),
            sidecar: true,
        }
    }

    pub fn unmeshed(name: &str) -> Self {
        PodSpec {
            name: name.into(),
            app: None,
            version: "v1".into(),
            sidecar: false,
        }
    }
}

/// How to build a mesh.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    pub pods: Vec<PodSpec>,
    /// Services, by app name; each gets a VIP and the pods whose `app` matches.
    pub services: Vec<String>,
    /// Extra flags for every sidecar (e.g. `--io-backend epoll`).
    pub proxy_args: Vec<String>,
    /// Where the binaries are; defaults to the directory of the running executable.
    pub bin_dir: Option<PathBuf>,
    /// User config files written beside the generated registry.
    pub config: Vec<SourceFile>,
    /// Run sidecars under a seccomp filter that blocks io_uring, like Docker's and
    /// containerd's default profiles.
    pub block_io_uring: bool,
}

impl MeshSpec {
    pub fn new(services: &[&str], pods: Vec<PodSpec>) -> Self {
        MeshSpec {
            pods,
            services: services.iter().map(|s| s.to_string()).collect(),
            proxy_args: Vec::new(),
            bin_dir: None,
            config: Vec::new(),
            block_io_uring: false,
        }
    }
}

/// A running mesh.
pub struct Mesh {
    pub pods: Vec<Pod>,
    services: Vec<(String, Ipv4Addr, Ipv6Addr)>,
    /// Every pod's spec and addresses, known before the pods exist so the registry can be
    /// written first and every sidecar starts with it.
    plan: Vec<(PodSpec, Ipv4Addr, Ipv6Addr)>,
    config: ConfigMapDir,
    user_config: std::sync::Mutex<Vec<SourceFile>>,
    work_dir: PathBuf,
    keep_work_dir: bool,
    _node: Netns,
}

static RUN: AtomicU32 = AtomicU32::new(0);

impl Mesh {
    /// Creates every pod, starts the apps and sidecars, and waits until all are ready.
    pub fn start(spec: MeshSpec) -> Result<Mesh, MeshError> {
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        let bin_dir = match &spec.bin_dir {
            Some(dir) => dir.clone(),
            None => default_bin_dir()?,
        };
        for bin in ["isthmus-proxy", "isthmus-init", "isthmus-ctl"] {
            if !bin_dir.join(bin).exists() {
                return Err(MeshError::Failed(format!(
                    "{} not found: build the workspace first (cargo build --workspace)",
                    bin_dir.join(bin).display()
                )));
            }
        }
        let work_dir = std::env::temp_dir().join(format!("isthmus-local-{tag}"));
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).map_err(io_err("creating the work directory"))?;
        let config =
            ConfigMapDir::new(work_dir.join("config")).map_err(io_err("config directory"))?;

        let node = Netns::create(&format!("isth{tag}-node"))?;
        node.exec_ip(&["link", "add", "br0", "type", "bridge"])?;
        node.exec_ip(&["addr", "add", "10.66.0.1/24", "dev", "br0"])?;
        node.exec_ip(&["addr", "add", "fd00:66::1/64", "dev", "br0", "nodad"])?;
        node.exec_ip(&["link", "set", "br0", "up"])?;

        let services = spec
            .services
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let n = 10 + i as u8;
                (
                    name.clone(),
                    Ipv4Addr::new(10, 96, 0, n),
                    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(n)),
                )
            })
            .collect();
        let plan = spec
            .pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let n = 20 + i as u8;
                (
                    pod.clone(),
                    Ipv4Addr::new(10, 66, 0, n),
                    Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, u16::from(n)),
                )
            })
            .collect();
        let mut mesh = Mesh {
            pods: Vec::new(),
            services,
            plan,
            config,
            user_config: std::sync::Mutex::new(spec.config.clone()),
            work_dir,
            keep_work_dir: false,
            _node: node,
        };
        mesh.write_files().map_err(io_err("writing the config"))?;

        for i in 0..mesh.plan.len() {
            let pod = mesh.create_pod(&tag, i, &bin_dir, &spec)?;
            mesh.pods.push(pod);
        }
        for pod in &mut mesh.pods {
            if pod.spec.sidecar {
                pod.wait_ready()?;
            }
        }
        Ok(mesh)
    }

    fn create_pod(
        &self,
        tag: &str,
        index: usize,
        bin_dir: &Path,
        mesh: &MeshSpec,
    ) -> Result<Pod, MeshError> {
        let (spec, ipv4, ipv6) = &self.plan[index];
        let (ipv4, ipv6) = (*ipv4, *ipv6);
        let netns = Netns::create(&format!("isth{tag}-{}", spec.name))?;
        let peer = format!("veth{index}");
        crate::netns::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            self._node.name(),
        ])?;
        self._node
            .exec_ip(&["link", "set", &peer, "master", "br0", "up"])?;
        netns.exec_ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        netns.exec_ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
        netns.exec_ip(&["link", "set", "eth0", "up"])?;
        netns.exec_ip(&["route", "add", "default", "via", "10.66.0.1"])?;
        netns.exec_ip(&["-6", "route", "add", "default", "via", "fd00:66::1"])?;
        let log_dir = self.work_dir.join(&spec.name);
        std::fs::create_dir_all(&log_dir).map_err(io_err("pod log directory"))?;
        let mut pod = Pod {
            name: spec.name.clone(),
            ipv4,
            ipv6,
            spec: spec.clone(),
            processes: Vec::new(),
            netns,
            log_dir,
        };

        // The app first: it prints READY once bound, so the pod is serving before its sidecar
        // takes traffic.
        let mut app = pod.netns.command(bin_dir.join("isthmus-ctl"), None)?;
        app.args([
            "app",
            "--name",
            &spec.name,
            "--http",
            &format!("[::]:{HTTP_PORT}"),
            "--echo",
            &format!("[::]:{ECHO_PORT}"),
        ])
        .stdout(Stdio::piped())
        .stderr(log_file(&pod.log_dir, "app.log")?);
        let mut child = app.spawn().map_err(io_err("starting the app"))?;
        let ready = child.stdout.take().map(|out| {
            BufReader::new(out)
                .lines()
                .next()
                .and_then(Result::ok)
                .unwrap_or_default()
        });
        pod.processes.push(("app".into(), child));
        if ready.as_deref() != Some("READY") {
            return Err(MeshError::Failed(format!(
                "app in {} did not start: {}",
                spec.name,
                pod.log("app.log")
            )));
        }

        if spec.sidecar {
            let out = pod
                .netns
                .command(bin_dir.join("isthmus-init"), None)?
                .output()
                .map_err(io_err("running isthmus-init"))?;
            if !out.status.success() {
                return Err(MeshError::Failed(format!(
                    "isthmus-init in {} failed: {}",
                    spec.name,
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let mut proxy = pod
                .netns
                .command(bin_dir.join("isthmus-proxy"), Some(PROXY_UID))?;
            proxy
                .arg("--config-dir")
                .arg(self.config.path())
                .args([
                    "--workload",
                    &spec.name,
                    "--namespace",
                    NAMESPACE,
                    "--app",
                    spec.app.as_deref().unwrap_or(&spec.name),
                    "--app-version",
                    &spec.version,
                ])
                .args(["--access-log", "--config-debounce-ms", "20"])
                .args(&mesh.proxy_args)
                .stdout(Stdio::null())
                .stderr(log_file(&pod.log_dir, "proxy.log")?);
            if mesh.block_io_uring {
                crate::seccomp::deny_io_uring(&mut proxy);
            }
            let child = proxy.spawn().map_err(io_err("starting isthmus-proxy"))?;
            pod.processes.push(("proxy".into(), child));
        }
        Ok(pod)
    }

    /// The generated registry: a ServiceEntry per service, its endpoints the pods of its app.
    fn registry(&self) -> SourceFile {
        let mut yaml = String::new();
        for (name, vip4, vip6) in &self.services {
            let _ = write!(
                yaml,
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
                 spec:\n  hosts: [{name}.{NAMESPACE}.svc.cluster.local]\n  addresses: [{vip4}, \"{vip6}\"]\n  location: MESH_INTERNAL\n\
                 \x20 resolution: STATIC\n  ports:\n  - {{number: {HTTP_SERVICE_PORT}, name: http, protocol: HTTP, targetPort: {HTTP_PORT}}}\n\
                 \x20 - {{number: {ECHO_PORT}, name: tcp-echo, protocol: TCP}}\n"
            );
            let members: Vec<_> = self
                .plan
                .iter()
                .filter(|(spec, ..)| spec.app.as_deref() == Some(name))
                .collect();
            if members.is_empty() {
                yaml.push_str("  endpoints: []\n");
                continue;
            }
            yaml.push_str("  endpoints:\n");
            for (spec, ipv4, _) in members {
                let _ = writeln!(
                    yaml,
                    "  - {{address: {ipv4}, labels: {{app: {name}, version: {}, isthmus.io/workload: {}}}}}",
                    spec.version, spec.name
                );
            }
        }
        SourceFile::new("registry.yaml", yaml)
    }

    fn write_files(&self) -> std::io::Result<String> {
        let mut files = vec![self.registry()];
        files.extend(
            self.user_config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        self.config.write(&files)
    }

    /// Replaces the user config (everything but the registry) the kubelet way, and returns the
    /// version every sidecar will report once it has the update.
    pub fn write_config(&self, files: Vec<SourceFile>) -> Result<String, MeshError> {
        *self.user_config.lock().unwrap_or_else(|p| p.into_inner()) = files;
        self.write_files().map_err(io_err("writing the config"))
    }

    pub fn config_dir(&self) -> &Path {
        self.config.path()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn vip4(&self, service: &str) -> Ipv4Addr {
        self.services
            .iter()
            .find(|s| s.0 == service)
            .map(|s| s.1)
            .unwrap_or_else(|| panic!("no service {service}"))
    }

    pub fn vip6(&self, service: &str) -> Ipv6Addr {
        self.services
            .iter()
            .find(|s| s.0 == service)
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("no service {service}"))
    }

    /// Waits until every sidecar reports `version` as loaded (or as rejected, if `rejected`).
    pub fn wait_for_version(&self, version: &str, rejected: bool) -> Result<(), MeshError> {
        for pod in self.pods.iter().filter(|p| p.spec.sidecar) {
            pod.wait_for_version(version, rejected)?;
        }
        Ok(())
    }

    /// Keep the work directory (logs, config) after drop, e.g. when a test failed.
    pub fn keep_logs(&mut self) -> &Path {
        self.keep_work_dir = true;
        &self.work_dir
    }

    /// Every pod's logs, for a failing test's output.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for pod in &self.pods {
            for file in ["proxy.log", "app.log"] {
                let _ = writeln!(out, "==== {}/{file}\n{}", pod.name, pod.log(file));
            }
        }
        out
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for pod in &mut self.pods {
            for (_, child) in &mut pod.processes {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.pods.clear(); // deletes the pod namespaces
        if !self.keep_work_dir {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, MeshError> {
    std::fs::File::create(dir.join(name)).map_err(io_err(format!("creating {name}")))
}

/// The directory holding the workspace's binaries: next to this executable, or one level up
/// for test executables in `target/<profile>/deps`.
pub fn default_bin_dir() -> Result<PathBuf, MeshError> {
    let exe = std::env::current_exe().map_err(io_err("locating the executable"))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        Ok(dir.parent().map(Path::to_path_buf).unwrap_or(dir))
    } else {
        Ok(dir)
    }
}
