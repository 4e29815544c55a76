//! The whole mesh on one machine: each pod a network namespace on a bridge (held in its own
//! "node" namespace, so nothing touches the host's network), with isthmus-init's rules, an
//! isthmus-proxy sidecar running as UID 1337, and the built-in app. The controller's part —
//! writing the registry for the pods — is done here from the mesh's own spec.
//!
//! Everything is removed on drop: processes, namespaces (and with them links, bridge and rules).

pub mod demo;
mod lifecycle;
mod pod;

pub use pod::Pod;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use isthmus_config::SourceFile;

use crate::configmap::ConfigMapDir;
use crate::netns::{Netns, NetnsError};

/// The port the built-in app serves HTTP on, and its service port.
pub const HTTP_PORT: u16 = 8080;
pub const HTTP_SERVICE_PORT: u16 = 80;
/// The built-in app's TCP echo port (service port too).
pub const ECHO_PORT: u16 = 9000;
/// The service port declared `protocol: GRPC` (same target port). Nothing listens there
/// unless a test starts a gRPC peer in the pod (`isthmus_tests::grpc::GrpcServer`).
pub const GRPC_PORT: u16 = 50051;
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
    /// `RLIMIT_NOFILE` (soft and hard) for the sidecar; `None` inherits ours.
    pub nofile: Option<u64>,
}

impl PodSpec {
    pub fn meshed(name: &str, app: Option<&str>, version: &str) -> Self {
        PodSpec {
            name: name.into(),
            app: app.map(Into::into),
            version: version.into(),
            sidecar: true,
            nofile: None,
        }
    }

    pub fn unmeshed(name: &str) -> Self {
        PodSpec {
            name: name.into(),
            app: None,
            version: "v1".into(),
            sidecar: false,
            nofile: None,
        }
    }

    /// An unmeshed pod that backs `app`: an endpoint without a sidecar (no inbound capture).
    pub fn unmeshed_endpoint(name: &str, app: &str) -> Self {
        PodSpec {
            app: Some(app.into()),
            ..PodSpec::unmeshed(name)
        }
    }

    /// The sidecar's file descriptor limit.
    pub fn with_nofile(mut self, nofile: u64) -> Self {
        self.nofile = Some(nofile);
        self
    }
}

/// A port every service of the mesh declares in the generated registry (a Kubernetes
/// Service's `ports` entry); each pod's app must serve its target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub number: u16,
    /// The port's name; Istio reads the protocol from its prefix when none is declared.
    pub name: String,
    /// `protocol:` (HTTP, TCP, GRPC, ...); `None` leaves it to the name, or to detection.
    pub protocol: Option<String>,
    /// The endpoints' port, if not the same number.
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn new(number: u16, name: &str) -> Self {
        ServicePort {
            number,
            name: name.into(),
            protocol: None,
            target_port: None,
        }
    }

    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = Some(protocol.into());
        self
    }

    pub fn target(mut self, port: u16) -> Self {
        self.target_port = Some(port);
        self
    }

    /// What every service gets unless a spec says otherwise: HTTP on 80 (the app's 8080), the
    /// TCP echo, and gRPC.
    pub fn defaults() -> Vec<ServicePort> {
        vec![
            ServicePort::new(HTTP_SERVICE_PORT, "http")
                .protocol("HTTP")
                .target(HTTP_PORT),
            ServicePort::new(ECHO_PORT, "tcp-echo").protocol("TCP"),
            ServicePort::new(GRPC_PORT, "grpc").protocol("GRPC"),
        ]
    }

    /// The registry's flow-style entry.
    fn yaml(&self) -> String {
        let mut entry = format!("{{number: {}, name: {}", self.number, self.name);
        if let Some(protocol) = &self.protocol {
            let _ = write!(entry, ", protocol: {protocol}");
        }
        if let Some(port) = self.target_port {
            let _ = write!(entry, ", targetPort: {port}");
        }
        entry + "}"
    }
}

/// How to build a mesh.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    pub pods: Vec<PodSpec>,
    /// Services, by app name; each gets a VIP and the pods whose `app` matches.
    pub services: Vec<String>,
    /// The namespace of the services and pods (what short host names resolve in).
    pub namespace: String,
    /// The ports every service declares.
    pub ports: Vec<ServicePort>,
    /// Extra flags for every sidecar (e.g. `--io-backend epoll`).
    pub proxy_args: Vec<String>,
    /// Where the binaries are; defaults to the directory of the running executable.
    pub bin_dir: Option<PathBuf>,
    /// User config files written beside the generated registry.
    pub config: Vec<SourceFile>,
    /// Run sidecars under a seccomp filter that blocks io_uring, like Docker's and
    /// containerd's default profiles.
    pub block_io_uring: bool,
    /// The mesh writes no registry: the config directory ([`Mesh::config_dir`], empty at
    /// start) is someone else's to write, as a kubelet materialises the controller's
    /// ConfigMaps (tests/tests/controller.rs). `services` and `config` are then unused.
    pub external_config: bool,
}

impl MeshSpec {
    pub fn new(services: &[&str], pods: Vec<PodSpec>) -> Self {
        MeshSpec {
            pods,
            services: services.iter().map(|s| s.to_string()).collect(),
            namespace: NAMESPACE.into(),
            ports: ServicePort::defaults(),
            proxy_args: Vec::new(),
            bin_dir: None,
            config: Vec::new(),
            block_io_uring: false,
            external_config: false,
        }
    }
}

/// A running mesh.
pub struct Mesh {
    pub pods: Vec<Pod>,
    services: Vec<(String, Ipv4Addr, Ipv6Addr)>,
    ports: Vec<ServicePort>,
    /// Every pod's spec and addresses, known before the pods exist so the registry can be
    /// written first and every sidecar starts with it.
    plan: Vec<Planned>,
    /// The next free address slot (slots of removed pods are not reused).
    next_slot: u8,
    config: ConfigMapDir,
    user_config: std::sync::Mutex<Vec<SourceFile>>,
    external_config: bool,
    work_dir: PathBuf,
    keep_work_dir: bool,
    launch: Launch,
    _node: Netns,
}

/// A pod in the registry: its spec, address slot and addresses.
struct Planned {
    spec: PodSpec,
    slot: u8,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Planned {
    fn new(spec: PodSpec, slot: u8) -> Self {
        let n = 20 + slot;
        Planned {
            spec,
            slot,
            ipv4: Ipv4Addr::new(10, 66, 0, n),
            ipv6: Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, u16::from(n)),
        }
    }
}

/// What starting a pod needs beyond its spec, kept for pods added later.
struct Launch {
    tag: String,
    namespace: String,
    bin_dir: PathBuf,
    proxy_args: Vec<String>,
    block_io_uring: bool,
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
        let plan: Vec<Planned> = spec
            .pods
            .iter()
            .enumerate()
            .map(|(i, pod)| Planned::new(pod.clone(), i as u8))
            .collect();
        let mut mesh = Mesh {
            pods: Vec::new(),
            services,
            ports: spec.ports.clone(),
            next_slot: plan.len() as u8,
            plan,
            config,
            user_config: std::sync::Mutex::new(spec.config.clone()),
            external_config: spec.external_config,
            work_dir,
            keep_work_dir: false,
            launch: Launch {
                tag,
                namespace: spec.namespace.clone(),
                bin_dir,
                proxy_args: spec.proxy_args.clone(),
                block_io_uring: spec.block_io_uring,
            },
            _node: node,
        };
        if !mesh.external_config {
            mesh.write_files().map_err(io_err("writing the config"))?;
        }

        for planned in &mesh.plan {
            let pod = mesh.create_pod(planned)?;
            mesh.pods.push(pod);
        }
        for pod in &mut mesh.pods {
            if pod.spec.sidecar {
                pod.wait_ready()?;
            }
        }
        Ok(mesh)
    }

    /// Creates the pod's namespace and link, starts its app, and, if meshed, runs isthmus-init
    /// and starts its sidecar (not waiting for it to be ready).
    fn create_pod(&self, planned: &Planned) -> Result<Pod, MeshError> {
        let Planned {
            spec,
            slot,
            ipv4,
            ipv6,
        } = planned;
        let netns = Netns::create(&format!("isth{}-{}", self.launch.tag, spec.name))?;
        let peer = format!("veth{slot}");
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
            ipv4: *ipv4,
            ipv6: *ipv6,
            spec: spec.clone(),
            processes: Vec::new(),
            netns,
            log_dir,
        };
        // The app first: it is serving before its sidecar takes traffic.
        pod.start_app(&self.launch.bin_dir)?;
        if spec.sidecar {
            pod.start_sidecar(&self.launch, self.config.path())?;
        }
        Ok(pod)
    }

    /// The generated registry: a ServiceEntry per service, its endpoints the pods of its app.
    fn registry(&self) -> SourceFile {
        let mut yaml = String::new();
        let namespace = &self.launch.namespace;
        for (name, vip4, vip6) in &self.services {
            let _ = write!(
                yaml,
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
                 spec:\n  hosts: [{name}.{namespace}.svc.cluster.local]\n  addresses: [{vip4}, \"{vip6}\"]\n  location: MESH_INTERNAL\n\
                 \x20 resolution: STATIC\n  ports:\n"
            );
            for port in &self.ports {
                let _ = writeln!(yaml, "  - {}", port.yaml());
            }
            let members: Vec<_> = self
                .plan
                .iter()
                .filter(|p| p.spec.app.as_deref() == Some(name))
                .collect();
            if members.is_empty() {
                yaml.push_str("  endpoints: []\n");
                continue;
            }
            yaml.push_str("  endpoints:\n");
            for Planned { spec, ipv4, .. } in members {
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
        if self.external_config {
            return Err(std::io::Error::other(
                "the config directory is external (MeshSpec::external_config)",
            ));
        }
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

    /// The "node": the namespace holding the pods' bridge, from which every pod address is
    /// reachable (where a test runs what a cluster's control plane would).
    pub fn node(&self) -> &Netns {
        &self._node
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
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
        self.pods.clear(); // kills every pod's processes, then deletes its namespace
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

#[cfg(test)]
mod tests {
    use super::ServicePort;

    #[test]
    fn service_ports_render_as_registry_entries() {
        let yaml: Vec<String> = ServicePort::defaults()
            .iter()
            .map(ServicePort::yaml)
            .collect();
        assert_eq!(
            yaml,
            [
                "{number: 80, name: http, protocol: HTTP, targetPort: 8080}",
                "{number: 9000, name: tcp-echo, protocol: TCP}",
                "{number: 50051, name: grpc, protocol: GRPC}",
            ]
        );
        assert_eq!(
            ServicePort::new(7000, "greet").yaml(),
            "{number: 7000, name: greet}"
        );
    }
}
