//! Command-line flags. Names follow Istio's where users know them; pod identity comes from
//! the downward-API environment the injector sets.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use crate::policy::BeforeConfig;
use crate::runtime::BackendChoice;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "isthmus-proxy", version, about = "The isthmus sidecar proxy")]
pub struct Args {
    /// Directory of Istio API YAML files (the mounted ConfigMap).
    #[arg(
        long,
        env = "ISTHMUS_CONFIG_DIR",
        default_value = "/etc/isthmus/config"
    )]
    pub config_dir: PathBuf,
    /// I/O backend of the data path.
    #[arg(long, env = "ISTHMUS_IO_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub io_backend: BackendChoice,
    /// Worker threads (one runtime each), like Istio's proxy concurrency.
    #[arg(long, env = "ISTHMUS_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Admin endpoints, bound to 127.0.0.1 only.
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// Prometheus scrape port (`/stats/prometheus`).
    #[arg(long, default_value_t = 15020)]
    pub stats_port: u16,
    /// Readiness port (`/healthz/ready`).
    #[arg(long, default_value_t = 15021)]
    pub readiness_port: u16,
    /// Do not bind the capture listeners (15001/15006): explicit listeners only.
    #[arg(long)]
    pub no_capture: bool,
    /// An explicit outbound listener, `LISTEN=DESTINATION`: connections to LISTEN are routed
    /// as if the app had dialled DESTINATION (no iptables needed). Repeatable.
    #[arg(long = "explicit", value_name = "LISTEN=DESTINATION")]
    pub explicit: Vec<ExplicitListener>,
    /// How long one connect attempt may take before the next endpoint is tried.
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// How long all connect attempts of one connection may take together (Istio's
    /// `connectionPool.tcp.connectTimeout`, 10 s).
    #[arg(long, default_value_t = 10_000)]
    pub connect_deadline_ms: u64,
    /// How many endpoints to try when connects fail.
    #[arg(long, default_value_t = 3)]
    pub connect_attempts: usize,
    /// A relayed connection with no bytes in either direction for this long is closed
    /// (Istio's `connectionPool.tcp.idleTimeout`, 1 h).
    #[arg(long, default_value_t = 3600)]
    pub idle_timeout_secs: u64,
    /// Once one side of a connection has finished sending (FIN), the other must send
    /// something at least this often or the connection is closed (HAProxy's
    /// `timeout client-fin`/`server-fin`).
    #[arg(long, default_value_t = 60)]
    pub half_close_timeout_secs: u64,
    /// Connections the proxy holds open at once, over all workers (each takes two file
    /// descriptors); more are closed at accept and counted. 0: as many as the file descriptor
    /// limit carries (half of it, less a reserve for listeners and the admin endpoints); a
    /// larger value is capped there, with a warning.
    #[arg(long, env = "ISTHMUS_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// What outbound traffic does before the first config has loaded. Inbound traffic is
    /// always refused then (fail closed).
    #[arg(long, value_enum, default_value_t = BeforeConfig::Deny)]
    pub outbound_before_config: BeforeConfig,
    /// On SIGTERM or /quitquitquit, how long to wait for open connections before closing them
    /// and exiting.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout_secs: u64,
    /// Quiet time after a burst of file events before reloading.
    #[arg(long, default_value_t = 100)]
    pub config_debounce_ms: u64,
    /// The longest a reload waits after the first event of a burst that does not go quiet.
    #[arg(long, default_value_t = 1000)]
    pub config_debounce_max_ms: u64,
    /// Re-read the config directory this often even without events.
    #[arg(long, default_value_t = 30)]
    pub config_resync_secs: u64,
    /// An admin, readiness or scrape request must arrive whole within this.
    #[arg(long, default_value_t = 5000)]
    pub admin_request_timeout_ms: u64,
    /// Connections open at once on each admin endpoint; more are closed.
    #[arg(long, default_value_t = 64)]
    pub admin_max_connections: usize,
    /// Access log: one line per HTTP request on stdout (Istio's format), and one per TCP
    /// connection in the log (target `access`).
    #[arg(long, env = "ISTHMUS_ACCESS_LOG")]
    pub access_log: bool,
    /// How long an HTTP client has to send a whole request head once its connection is waited
    /// on (slowloris bound); past it: 408 and close.
    #[arg(long, default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,
    /// How often names of `resolution: DNS` ServiceEntries are resolved again (they are also
    /// resolved whenever the config changes).
    #[arg(long, default_value_t = 30)]
    pub dns_refresh_secs: u64,
    /// The HTTP access log's encoding: Istio's default text line, or JSON with Istio's fields.
    #[arg(long, env = "ISTHMUS_ACCESS_LOG_FORMAT", value_enum, default_value_t = crate::http::access_log::Format::Text)]
    pub access_log_format: crate::http::access_log::Format,
    /// Log filter, e.g. `info` or `info,isthmus_proxy=debug`.
    #[arg(long, env = "ISTHMUS_LOG", default_value = "info")]
    pub log: String,
    #[arg(long, env = "ISTHMUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// This workload's name (Istio's `source_workload` label).
    #[arg(long, env = "ISTHMUS_WORKLOAD", default_value = "unknown")]
    pub workload: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "ISTHMUS_APP", default_value = "unknown")]
    pub app: String,
    #[arg(
        long = "app-version",
        env = "ISTHMUS_APP_VERSION",
        default_value = "unknown"
    )]
    pub app_version: String,
    #[arg(long, env = "ISTHMUS_CLUSTER", default_value = "Kubernetes")]
    pub cluster: String,
    /// The app's original probes, JSON keyed by `/app-health/<container>/livez|readyz|startupz`
    /// (the injector sets it when it rewrites the app's probes to this sidecar's port 15020).
    #[arg(long, env = crate::app_probe::ENV, hide_env_values = true)]
    pub app_probers: Option<String>,
    /// The pod's IP (downward API): where app probes go, as the kubelet's would. 127.0.0.1 if
    /// unset.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// The mesh CA, `host:port` (the controller's `--ca-listen`; the injector's is
    /// `isthmus-controller.isthmus-system.svc:15012`). Setting it turns on the workload
    /// identity, when the token file exists: a key made in memory, a certificate from the CA.
    #[arg(long, env = "ISTHMUS_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM roots the CA's TLS certificate must chain to; default: `trust-bundle.pem` in the
    /// config directory (the controller publishes it there).
    #[arg(long, env = "ISTHMUS_CA_ROOT")]
    pub ca_root: Option<PathBuf>,
    /// The name the CA's TLS certificate must carry.
    #[arg(long, default_value = "isthmus-controller.isthmus-system.svc")]
    pub ca_server_name: String,
    /// The projected service-account token (audience `isthmus-ca`) sent to the CA; re-read
    /// for every request.
    #[arg(
        long,
        env = "ISTHMUS_CA_TOKEN",
        default_value = "/var/run/secrets/isthmus/tokens/token"
    )]
    pub ca_token: PathBuf,
    /// SPIFFE trust domain of the workload identity.
    #[arg(long, env = "ISTHMUS_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The pod's service account (downward API): the `sa` of its SPIFFE identity.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// Validity asked of the CA for the workload certificate (it caps at 7 days); renewed at
    /// half of it.
    #[arg(long, default_value_t = 86_400)]
    pub cert_validity_secs: u64,
    /// First retry delay after a failed certificate request; doubles up to
    /// `--ca-retry-max-secs`.
    #[arg(long, default_value_t = 1000)]
    pub ca_retry_initial_ms: u64,
    #[arg(long, default_value_t = 60)]
    pub ca_retry_max_secs: u64,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands other than running the proxy.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Wait until the proxy in this pod is ready, then exit 0; non-zero at the deadline. The
    /// classic sidecar's postStart hook: the kubelet starts the app containers only after it
    /// returns (Istio's `pilot-agent wait`).
    Wait(crate::wait::WaitArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplicitListener {
    pub listen: SocketAddr,
    pub destination: SocketAddr,
}

impl FromStr for ExplicitListener {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, destination) = s.split_once('=').ok_or_else(|| {
            format!("`{s}`: expected LISTEN=DESTINATION, e.g. 0.0.0.0:8000=10.96.0.10:80")
        })?;
        Ok(ExplicitListener {
            listen: listen.parse().map_err(|e| format!("`{listen}`: {e}"))?,
            destination: destination
                .parse()
                .map_err(|e| format!("`{destination}`: {e}"))?,
        })
    }
}
