use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{ArgAction, Parser, Subcommand};
use isthmus_ctl::inject::{self, InjectConfig};

#[derive(Parser)]
#[command(name = "isthmus-ctl", version, about = "isthmus controller and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (the controller's flags) costs
// nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// A mesh on this machine, pods as network namespaces (needs root and iptables).
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Validate a config directory (or files) as a sidecar would; prints every problem.
    Validate {
        /// Directories or YAML files.
        paths: Vec<PathBuf>,
    },
    /// Add the isthmus init container and sidecar to the pod templates of Kubernetes YAML
    /// (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob), like
    /// `istioctl kube-inject`; other documents pass through. Injecting twice changes nothing.
    Inject {
        /// YAML or JSON with any number of documents; `-` reads stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        /// Inject config, YAML or JSON (hub, tag, proxyImage, initImage, imagePullPolicy,
        /// nativeSidecar, configMap, registryConfigMap, tokenAudience, caAddress, cluster,
        /// proxyResources, initResources).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Image prefix: the images are `{hub}/proxy:{tag}` and `{hub}/init:{tag}` (default
        /// `isthmus`), as docker/build.sh names them.
        #[arg(long)]
        hub: Option<String>,
        /// Image tag (default `dev`; docker/build.sh also tags each build with its commit).
        #[arg(long)]
        tag: Option<String>,
        /// `false` for clusters older than 1.29: the sidecar becomes the first regular
        /// container instead of an init container with `restartPolicy: Always`.
        #[arg(long, value_name = "BOOL", action = ArgAction::Set)]
        native_sidecar: Option<bool>,
        /// The routing ConfigMap, mounted with the registry ConfigMap as the sidecar's config
        /// directory.
        #[arg(long, value_name = "NAME")]
        config_map: Option<String>,
        /// Write the injected YAML here instead of stdout.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Everything a cluster needs to run isthmus — namespace, Istio CRDs, ServiceAccount and
    /// RBAC, the controller's Deployment, Service and PodDisruptionBudget, the injection
    /// webhook's configuration — printed as YAML, or applied with `--apply` (server-side apply,
    /// field manager isthmus-install; reads KUBECONFIG). See docs/INSTALL.md.
    Install {
        /// The install namespace, also the mesh root namespace.
        #[arg(short = 'n', long, default_value = "isthmus-system")]
        namespace: String,
        /// Image prefix: the controller image is `{hub}/ctl:{tag}`, as docker/build.sh names it.
        #[arg(long, default_value = "isthmus")]
        hub: String,
        #[arg(long, default_value = "dev")]
        tag: String,
        /// Controller replicas (one leader writes; every replica serves the webhook).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..))]
        replicas: i32,
        /// The Istio CRDs: `auto` skips one that exists and is not isthmus's (Istio's is never
        /// overwritten), `always` applies them all, `never` leaves them out.
        #[arg(long, value_enum, default_value_t = isthmus_ctl::install::CrdMode::Auto)]
        crds: isthmus_ctl::install::CrdMode,
        /// What the webhook injects: the same file as `isthmus-ctl inject --config` (e.g.
        /// `nativeSidecar: false` for clusters older than 1.29), kept in ConfigMap isthmus-inject.
        #[arg(long, value_name = "FILE")]
        inject_config: Option<PathBuf>,
        /// Apply to the cluster instead of printing.
        #[arg(long)]
        apply: bool,
    },
    /// Removes what `install` made and the ConfigMaps the controller wrote: printed, or deleted
    /// with `--apply`. The Istio CRDs stay unless `--crds isthmus`.
    Uninstall {
        #[arg(short = 'n', long, default_value = "isthmus-system")]
        namespace: String,
        /// `keep` (with every resource of their kinds), or `isthmus`: delete those `install`
        /// made (labelled app.kubernetes.io/managed-by=isthmus-install), never Istio's.
        #[arg(long, value_enum, default_value_t = isthmus_ctl::install::apply::UninstallCrds::Keep)]
        crds: isthmus_ctl::install::apply::UninstallCrds,
        /// Delete instead of printing what would be deleted.
        #[arg(long)]
        apply: bool,
    },
    /// The Kubernetes controller: watches Services, EndpointSlices and Pods and writes each
    /// meshed namespace's registry ConfigMap (server-side apply, only on change). Reads the
    /// cluster from the in-cluster service account or KUBECONFIG.
    Controller {
        /// Watch only these namespaces (repeatable); they are then the meshed ones. Default:
        /// all, a namespace being meshed when it holds an injected pod.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// `/healthz`, `/readyz` and `/metrics` (istiod's monitoring port).
        #[arg(long, default_value = "[::]:15014")]
        monitoring: SocketAddr,
        /// Quiet time after a change before the registry is recomputed.
        #[arg(long, value_name = "MS", default_value_t = 200)]
        debounce_ms: u64,
        /// The routing ConfigMap the controller writes from the Istio resources (the injector
        /// mounts it beside the registry).
        #[arg(long, value_name = "NAME", default_value = "isthmus-config")]
        config_map: String,
        /// The ConfigMap the registry is written to.
        #[arg(long, value_name = "NAME", default_value = "isthmus-registry")]
        registry_config_map: String,
        /// The mesh root namespace: its Sidecar without workloadSelector is the default of
        /// every namespace that has none.
        #[arg(long, value_name = "NS", default_value = "isthmus-system")]
        root_namespace: String,
        /// How long a namespace must have no injected pod before the controller deletes its
        /// ConfigMaps there.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        gc_grace_secs: u64,
        #[command(flatten)]
        replicas: ReplicaFlags,
    },
    /// For every meshed pod, the config version its sidecar serves against the version the
    /// controller wrote for its namespace: SYNCED, STALE, NOT READY (and why) or NO CONFIG.
    /// Asks through the API server (pods/proxy), like kubectl; reads KUBECONFIG.
    ProxyStatus {
        /// Only this namespace (default: the kubeconfig context's namespace).
        #[arg(
            short = 'n',
            long,
            value_name = "NS",
            conflicts_with = "all_namespaces"
        )]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Exit 2 unless every meshed pod is SYNCED (for CI and rollout scripts).
        #[arg(long)]
        check: bool,
        /// Sidecars asked at the same time.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// How long one sidecar may take to answer before it is NOT READY (unreachable).
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        timeout_ms: u64,
        /// The ConfigMap whose `isthmus.io/config-version` is the written version.
        #[arg(long, value_name = "NAME", default_value = "isthmus-registry")]
        registry_config_map: String,
    },
    /// The built-in app the local mesh runs in each pod.
    #[command(hide = true)]
    App {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "[::]:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "[::]:9000")]
        echo: SocketAddr,
    },
    /// Holds a pod's network namespace and nothing else, as the kubelet's pause container
    /// does (the container tests run it as each pod's infra container): waits for SIGTERM or
    /// SIGINT, then exits 0.
    #[command(hide = true)]
    Pause,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Start a mesh, send traffic, change routing live, show metrics, tear down.
    Demo {
        /// Keep the mesh up after the demo until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Local {
            command: LocalCommand::Demo { keep },
        } => isthmus_ctl::local::demo::run(keep).map_err(anyhow::Error::from),
        Command::Validate { paths } => return validate(&paths),
        Command::Inject {
            file,
            config,
            hub,
            tag,
            native_sidecar,
            config_map,
            output,
        } => inject_command(
            &file,
            config.as_deref(),
            InjectFlags {
                hub,
                tag,
                native_sidecar,
                config_map,
            },
            output.as_deref(),
        ),
        Command::Install {
            namespace,
            hub,
            tag,
            replicas,
            crds,
            inject_config,
            apply,
        } => read_install_inject_config(inject_config.as_deref()).and_then(|inject_config| {
            install_command(
                isthmus_ctl::install::InstallOptions {
                    namespace,
                    hub,
                    tag,
                    replicas,
                    crds,
                    inject_config,
                },
                apply,
            )
        }),
        Command::Uninstall {
            namespace,
            crds,
            apply,
        } => uninstall_command(&namespace, crds, apply),
        Command::Controller {
            namespaces,
            monitoring,
            debounce_ms,
            config_map,
            registry_config_map,
            root_namespace,
            gc_grace_secs,
            replicas,
        } => replicas
            .options()
            .and_then(|(leader_election, webhook, ca)| {
                controller(isthmus_ctl::controller::Options {
                    namespaces,
                    monitoring,
                    debounce: std::time::Duration::from_millis(debounce_ms),
                    routing_config_map: config_map,
                    registry_config_map,
                    root_namespace,
                    gc_grace: std::time::Duration::from_secs(gc_grace_secs),
                    leader_election,
                    webhook,
                    ca,
                    ..isthmus_ctl::controller::Options::default()
                })
            }),
        Command::ProxyStatus {
            namespace,
            all_namespaces,
            check,
            concurrency,
            timeout_ms,
            registry_config_map,
        } => {
            let options = isthmus_ctl::proxy_status::Options {
                namespace,
                registry_config_map,
                concurrency,
                timeout: std::time::Duration::from_millis(timeout_ms),
            };
            return match proxy_status(options, all_namespaces) {
                Ok(synced) if check && !synced => ExitCode::from(2),
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("isthmus-ctl: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::App { name, http, echo } => {
            isthmus_ctl::app::serve(&name, http, echo).map_err(anyhow::Error::from)
        }
        Command::Pause => pause().map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The controller's leader election, injection webhook and CA (docs/OPERATIONS.md, "The
/// controller"). The controller's own namespace and name come from the downward API.
#[derive(clap::Args)]
struct ReplicaFlags {
    /// Only the holder of Lease `isthmus-controller` in POD_NAMESPACE writes; `false` for a
    /// single replica.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,
    /// Where the injection webhook is served over HTTPS (path /inject), or `off`.
    #[arg(long, value_name = "ADDR|off", default_value = "[::]:15017")]
    webhook: String,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps equal to its CA.
    #[arg(long, value_name = "NAME", default_value = "isthmus-sidecar-injector")]
    webhook_config: String,
    /// The controller's Service, named in the webhook's serving certificate.
    #[arg(long, value_name = "NAME", default_value = "isthmus-controller")]
    service: String,
    /// The Secret in POD_NAMESPACE holding the controller's CA (`ca.crt`, `ca.key`); made if
    /// absent.
    #[arg(long, value_name = "NAME", default_value = "isthmus-ca")]
    ca_secret: String,
    /// What the webhook injects: the same file as `isthmus-ctl inject --config`.
    #[arg(long, value_name = "FILE")]
    inject_config: Option<PathBuf>,
    /// Image prefix of the injected images (overrides the inject config's).
    #[arg(long)]
    hub: Option<String>,
    /// Image tag of the injected images (overrides the inject config's).
    #[arg(long)]
    tag: Option<String>,
    /// Where the CA issues workload certificates over HTTPS (POST /v1/certificates), or `off`.
    #[arg(long, value_name = "ADDR|off", default_value = "[::]:15012")]
    ca_listen: String,
    /// The trust domain of the workload identities (spiffe://DOMAIN/ns/NS/sa/SA).
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The audience a sidecar's projected token must be for (the injector's token has it).
    #[arg(long, value_name = "AUDIENCE", default_value = "isthmus-ca")]
    token_audience: String,
    /// The controller's namespace: its Lease, its CA Secret, its Service.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "isthmus-system",
        hide = true
    )]
    pod_namespace: String,
    /// This replica's identity in the Lease; the hostname when unset.
    #[arg(long, env = "POD_NAME", hide = true)]
    pod_name: Option<String>,
}

impl ReplicaFlags {
    fn options(
        self,
    ) -> anyhow::Result<(
        Option<isthmus_ctl::controller::lease::LeaseOptions>,
        Option<isthmus_ctl::controller::admission::WebhookOptions>,
        Option<isthmus_ctl::controller::issuer::IssuerOptions>,
    )> {
        let leader_election = if self.leader_elect {
            let identity = match self.pod_name {
                Some(name) => name,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("no POD_NAME and no hostname: the Lease needs an identity")?
                    .trim()
                    .to_owned(),
            };
            Some(isthmus_ctl::controller::lease::LeaseOptions::new(
                self.pod_namespace.clone(),
                "isthmus-controller".into(),
                identity,
            ))
        } else {
            None
        };
        let ca = if self.ca_listen == "off" {
            None
        } else {
            Some(isthmus_ctl::controller::issuer::IssuerOptions {
                listen: self.ca_listen.parse().with_context(|| {
                    format!("--ca-listen {:?}: not an address or off", self.ca_listen)
                })?,
                namespace: self.pod_namespace.clone(),
                service: self.service.clone(),
                ca_secret: self.ca_secret.clone(),
                trust_domain: self.trust_domain,
                token_audience: self.token_audience,
            })
        };
        let webhook = if self.webhook == "off" {
            None
        } else {
            let listen = self
                .webhook
                .parse()
                .with_context(|| format!("--webhook {:?}: not an address or off", self.webhook))?;
            let mut inject = read_inject_config(self.inject_config.as_deref())?;
            inject.hub = self.hub.unwrap_or(inject.hub);
            inject.tag = self.tag.unwrap_or(inject.tag);
            Some(isthmus_ctl::controller::admission::WebhookOptions {
                listen,
                namespace: self.pod_namespace,
                service: self.service,
                ca_secret: self.ca_secret,
                webhook_config: Some(self.webhook_config).filter(|n| !n.is_empty()),
                inject,
            })
        };
        Ok((leader_election, webhook, ca))
    }
}

fn controller(options: isthmus_ctl::controller::Options) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default().await.context(
            "no Kubernetes client config: in a pod, is a service account token mounted? \
             outside, is KUBECONFIG set?",
        )?;
        // Registered now, not when `run` first polls `shutdown`: a SIGTERM while the CA and the
        // servers start (the Lease may be held by then) is a clean stop, not the default death.
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        let shutdown = async {
            let mut term = match term {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        isthmus_ctl::controller::Controller::new(client, options)
            .run(shutdown)
            .await
            .map_err(anyhow::Error::from)
    })
}

/// Prints the proxy-status table and summary; true when every meshed pod is SYNCED.
fn proxy_status(
    mut options: isthmus_ctl::proxy_status::Options,
    all_namespaces: bool,
) -> anyhow::Result<bool> {
    use isthmus_ctl::proxy_status::{all_synced, collect, render, summary};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut config = kube::Config::infer()
            .await
            .context("no Kubernetes client config: is KUBECONFIG set?")?;
        // A 503 from pods/proxy is the answer (the sidecar is unreachable), not an overloaded
        // API server: kube-rs's default retries would turn it into a timeout.
        config.default_retry = false;
        let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
        if !all_namespaces && options.namespace.is_none() {
            options.namespace = Some(client.default_namespace().to_owned());
        }
        let rows = collect(&client, &options).await?;
        print!("{}", render(&rows));
        println!("{}", summary(&rows));
        Ok(all_synced(&rows))
    })
}

fn install_command(
    options: isthmus_ctl::install::InstallOptions,
    apply: bool,
) -> anyhow::Result<()> {
    if !apply {
        print!(
            "{}",
            isthmus_ctl::install::to_yaml(&isthmus_ctl::install::manifests(&options))
        );
        return Ok(());
    }
    with_cluster(async |client| {
        isthmus_ctl::install::apply::install(&client, &options, |line| println!("{line}"))
            .await
            .map_err(anyhow::Error::from)
    })
}

/// The file's text, checked as the controller will read it (a typo fails here, not in the pod).
fn read_install_inject_config(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    read_inject_config(Some(path))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text))
}

fn uninstall_command(
    namespace: &str,
    crds: isthmus_ctl::install::apply::UninstallCrds,
    apply: bool,
) -> anyhow::Result<()> {
    let options = isthmus_ctl::install::InstallOptions {
        namespace: namespace.to_owned(),
        ..Default::default()
    };
    if !apply {
        println!("# isthmus-ctl uninstall --apply would delete, in this order:");
        for line in isthmus_ctl::install::apply::uninstall_plan(&options, crds) {
            println!("{line}");
        }
        return Ok(());
    }
    with_cluster(async |client| {
        isthmus_ctl::install::apply::uninstall(&client, &options, crds, |line| println!("{line}"))
            .await
            .map_err(anyhow::Error::from)
    })
}

/// Runs `work` on a current-thread runtime with a client for the cluster KUBECONFIG (or the
/// in-cluster account) names: the setup every one-shot cluster command shares.
fn with_cluster<T>(work: impl AsyncFnOnce(kube::Client) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("no Kubernetes client config: is KUBECONFIG set?")?;
        work(client).await
    })
}

/// Blocks SIGTERM and SIGINT and waits for one. As PID 1 in a container a signal without a
/// handler is ignored, so waiting for it synchronously is what lets `docker stop` end us at once.
fn pause() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    signals.wait()?;
    Ok(())
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let mut files = Vec::new();
    for path in paths {
        let read = if path.is_dir() {
            isthmus_config::SourceFile::read_dir(path)
        } else {
            std::fs::read_to_string(path)
                .map(|text| {
                    vec![isthmus_config::SourceFile::new(
                        path.display().to_string(),
                        text,
                    )]
                })
                .map_err(|source| isthmus_config::ConfigError::ReadFile {
                    file: path.display().to_string(),
                    source,
                })
        };
        match read {
            Ok(mut f) => files.append(&mut f),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match isthmus_config::load(&files) {
        Ok(snapshot) => {
            println!(
                "ok: {} file(s), {} service(s), version {}",
                files.len(),
                snapshot.services().len(),
                snapshot.version()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for issue in e.issues() {
                eprintln!("error: {issue}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Command-line overrides of the inject config file.
struct InjectFlags {
    hub: Option<String>,
    tag: Option<String>,
    native_sidecar: Option<bool>,
    config_map: Option<String>,
}

fn inject_command(
    file: &std::path::Path,
    config_file: Option<&std::path::Path>,
    flags: InjectFlags,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut config = read_inject_config(config_file)?;
    config.hub = flags.hub.unwrap_or(config.hub);
    config.tag = flags.tag.unwrap_or(config.tag);
    config.native_sidecar = flags.native_sidecar.unwrap_or(config.native_sidecar);
    config.config_map = flags.config_map.unwrap_or(config.config_map);
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let documents = inject::parse_documents(&text)?;
    let injected = inject::inject(documents, &config)?;
    for warning in &injected.warnings {
        eprintln!("isthmus-ctl inject: warning: {warning}");
    }
    let yaml = inject::to_yaml(&injected.documents)?;
    match output {
        Some(path) => {
            std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{yaml}");
            Ok(())
        }
    }
}

/// The inject config file (`inject --config`, `controller --inject-config`); defaults without.
fn read_inject_config(path: Option<&std::path::Path>) -> anyhow::Result<InjectConfig> {
    let Some(path) = path else {
        return Ok(InjectConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
