//! `isthmus-ctl controller`: watches Services, EndpointSlices, Pods and the Istio-API
//! resources (kube-rs watchers into reflector stores, never polling), computes each meshed
//! namespace's routing config ([`desired`], pure) and registry ([`registry`], pure) and writes
//! them into the namespace's `isthmus-config` and `isthmus-registry` ConfigMaps with
//! server-side apply — only when their content changed, debounced.
//!
//! Layout (docs/ARCHITECTURE.md, "The controller"): routing and endpoints live in two
//! ConfigMaps, `isthmus-config` (routing: the Istio documents that apply to the namespace, key
//! `config.json`) and `isthmus-registry` (one `ServiceEntry` per Service the namespace sees, key
//! `registry.json`). The injector mounts both as one projected volume, so the sidecar still
//! reads one directory, and an endpoint change never rewrites routing. The registry ConfigMap
//! carries, in `isthmus.io/config-version`, the version the namespace's sidecars report once
//! both have propagated: `version_of` over the two ConfigMaps' files, exactly as the sidecar
//! hashes its directory (`proxy-status` compares the two).
//!
//! Inputs ([`istio`]): the `networking.istio.io/v1` custom objects and the documents of
//! ConfigMaps labelled `isthmus.io/istio-config: "true"`. Visibility follows Istio's `exportTo`
//! (objects) and `networking.istio.io/exportTo` (Services); the root namespace's `Sidecar` is
//! the default. An invalid resource is left out and reported ([`events`]); a namespace whose
//! assembled config would not compile keeps its last one. Managed ConfigMaps of a namespace
//! that left the mesh are deleted after `gc_grace`.

pub mod admission;
pub mod certs;
pub mod csr;
pub mod desired;
mod events;
pub mod https;
pub mod identity;
pub mod issuer;
pub mod istio;
pub mod lease;
mod reconcile;
pub mod registry;
pub mod registry_check;
pub mod scope;
mod serve;
pub mod shards;
pub mod split;
pub mod webhook;
mod write;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use reconcile::Memory;

/// The field manager of every write (server-side apply).
pub const FIELD_MANAGER: &str = "isthmus-controller";
/// The registry ConfigMap's one key.
pub const REGISTRY_KEY: &str = "registry.json";
/// The version the namespace's sidecars report once routing and registry have propagated.
pub const VERSION_ANNOTATION: &str = "isthmus.io/config-version";
/// The content hash of `registry.json` alone: what decides whether to write.
pub const REGISTRY_HASH_ANNOTATION: &str = "isthmus.io/registry-hash";
/// The content hash of the routing ConfigMap's `config.json`: what decides whether to write.
pub const ROUTING_HASH_ANNOTATION: &str = "isthmus.io/routing-hash";
/// The label on every ConfigMap this controller writes (and may delete).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub use desired::ROUTING_KEY;
pub use istio::ISTIO_CONFIG_LABEL;

/// What the controller watches and writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watched namespaces; empty: all. With a list, these are also the meshed namespaces;
    /// without, a namespace is meshed when it holds an injected pod or a routing ConfigMap.
    pub namespaces: Vec<String>,
    /// `/healthz`, `/readyz`, `/metrics` (istiod's monitoring port is 15014).
    pub monitoring: SocketAddr,
    /// Quiet time after a change before the registry is recomputed: a rollout's burst of
    /// endpoint changes becomes one write.
    pub debounce: Duration,
    /// The routing ConfigMap this controller writes (key `config.json`).
    pub routing_config_map: String,
    /// The registry ConfigMap this controller writes (key `registry.json`).
    pub registry_config_map: String,
    /// The mesh root namespace: its `Sidecar` without `workloadSelector` is the default of
    /// namespaces that have none.
    pub root_namespace: String,
    /// How long a namespace must be out of the mesh (no injected pod) before its managed
    /// ConfigMaps are deleted: a rollout replacing every pod keeps them.
    pub gc_grace: Duration,
    /// `reportingInstance` of the Events (the pod's name: `$POD_NAME`, else `$HOSTNAME`).
    pub instance: String,
    /// A registry larger than this is not written (the API server refuses ConfigMaps over
    /// 1 MiB): the namespace keeps its last registry and the error is logged and counted.
    pub max_registry_bytes: usize,
    /// How often every namespace's registry ConfigMap is read back and restored if it was
    /// edited or deleted by hand (it is not watched).
    pub resync: Duration,
    /// Leader election (only the leader writes); `None`: always the leader.
    pub leader_election: Option<lease::LeaseOptions>,
    /// The injection webhook; `None`: not served.
    pub webhook: Option<admission::WebhookOptions>,
    /// The CA endpoint (workload certificates); `None`: not served.
    pub ca: Option<issuer::IssuerOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespaces: Vec::new(),
            monitoring: SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 0], 15014)),
            debounce: Duration::from_millis(200),
            routing_config_map: "isthmus-config".into(),
            registry_config_map: "isthmus-registry".into(),
            // The 1 MiB limit less room for the metadata and annotations.
            max_registry_bytes: 1024 * 1024 - 4096,
            resync: Duration::from_secs(300),
            root_namespace: "isthmus-system".into(),
            gc_grace: Duration::from_secs(60),
            instance: std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| FIELD_MANAGER.into()),
            leader_election: None,
            webhook: None,
            ca: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot listen for /healthz, /readyz and /metrics on {addr}: {source} (is another process on that port? --monitoring changes it)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Webhook(#[from] admission::AdmissionError),
    #[error(transparent)]
    Issuer(#[from] issuer::IssuerError),
    #[error("a watcher stopped before its first full list (is the API server reachable, and may the controller's service account list {0}?)")]
    WatcherGone(&'static str),
}

/// Counters and flags the monitoring port serves and the tests read.
#[derive(Debug, Default)]
pub struct Status {
    ready: AtomicBool,
    reconciles: AtomicU64,
    writes: AtomicU64,
    monitoring: std::sync::OnceLock<SocketAddr>,
    webhook: std::sync::OnceLock<SocketAddr>,
    ca: std::sync::OnceLock<SocketAddr>,
    metrics: Metrics,
}

impl Status {
    /// True once every watcher listed its objects and the first reconcile ran (its failed
    /// writes are retried and counted, not held against readiness).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    /// Reconciles completed (with or without errors).
    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Acquire)
    }
    /// The monitoring port's address once bound (port 0 picks a free one).
    pub fn monitoring_addr(&self) -> Option<SocketAddr> {
        self.monitoring.get().copied()
    }
    /// The webhook's address once bound.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.get().copied()
    }
    /// The CA endpoint's address once bound.
    pub fn ca_addr(&self) -> Option<SocketAddr> {
        self.ca.get().copied()
    }
    /// ConfigMap writes (server-side applies) done.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceKindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigMapLabels {
    namespace: String,
    configmap: String,
}

#[derive(Debug)]
struct Metrics {
    reconciles: Family<ResultLabel, Counter>,
    duration: Histogram,
    writes: Family<ResultLabel, Counter>,
    watch_errors: Family<KindLabel, Counter>,
    configmap_bytes: Family<ConfigMapLabels, Gauge>,
    services: Gauge,
    endpoints: Gauge,
    invalid_resources: Family<ResourceKindLabel, Gauge>,
    routing_conflicts: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Family::default(),
            duration: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            writes: Family::default(),
            watch_errors: Family::default(),
            configmap_bytes: Family::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            invalid_resources: Family::default(),
            routing_conflicts: Gauge::default(),
        }
    }
}

impl Metrics {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("isthmus_controller");
        r.register(
            "reconciles",
            "Registry computations, by result",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time to compute the registry and write what changed",
            self.duration.clone(),
        );
        r.register(
            "configmap_writes",
            "Server-side applies of a ConfigMap, by result (ok, error, too_large: not written)",
            self.writes.clone(),
        );
        r.register(
            "watch_errors",
            "Errors of the watchers (each is retried with backoff), by kind",
            self.watch_errors.clone(),
        );
        r.register(
            "configmap_bytes",
            "Size of the data of each ConfigMap written (the API limit is 1 MiB)",
            self.configmap_bytes.clone(),
        );
        r.register(
            "services",
            "Services in the registry",
            self.services.clone(),
        );
        r.register(
            "endpoints",
            "Ready endpoints in the registry",
            self.endpoints.clone(),
        );
        r.register(
            "invalid_resources",
            "Istio resources left out of a namespace's config because they are invalid there (each reported as an Event), by kind",
            self.invalid_resources.clone(),
        );
        r.register(
            "routing_conflicts",
            "Namespaces whose assembled routing config does not compile with their registry (they keep the last one written)",
            self.routing_conflicts.clone(),
        );
    }
}

/// What was last written (or found) in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    /// `None`: no routing config could be assembled and none was there.
    routing_hash: Option<String>,
    registry_hash: String,
    version: String,
}

/// The reflector stores, one per watched namespace (or one for all) and kind.
struct Stores {
    services: Vec<Store<Service>>,
    slices: Vec<Store<EndpointSlice>>,
    pods: Vec<Store<Pod>>,
    /// ConfigMaps labelled `isthmus.io/istio-config: "true"`: routing input.
    istio_config_maps: Vec<Store<ConfigMap>>,
    /// The ConfigMaps this controller wrote, metadata only (shard counts, what to delete): with
    /// up to 16 shards per namespace their data would fill the memory limit (found in review).
    managed: Vec<Store<PartialObjectMeta<ConfigMap>>>,
    istio: Vec<istio::KindStores>,
}

/// The controller: build with [`Controller::new`], read its [`Status`], [`Controller::run`] it.
pub struct Controller {
    client: Client,
    options: Options,
    status: Arc<Status>,
    leadership: lease::Leadership,
    /// The mesh CA's roots, published as `trust-bundle.pem` beside each namespace's routing
    /// config; set when this replica runs the CA (`--ca-listen`).
    trust_bundle: Option<isthmus_config::SourceFile>,
}

impl Controller {
    pub fn new(client: Client, options: Options) -> Self {
        Controller {
            client,
            options,
            status: Arc::default(),
            leadership: lease::Leadership::always(),
            trust_bundle: None,
        }
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Runs until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
        let mut registry = prometheus_client::registry::Registry::default();
        self.status.metrics.register(&mut registry);
        let elector = lease::Elector::start(
            &self.client,
            self.options.leader_election.clone(),
            &mut registry,
        );
        self.leadership = elector.leadership();
        let mut leadership = elector.leadership();
        // Stopping releases the Lease, so another replica takes over at once.
        let shutdown = elector.release_after(shutdown);
        let _webhook = match &self.options.webhook {
            Some(options) => {
                let metrics = webhook::Metrics::default();
                metrics.register(&mut registry);
                let webhook =
                    admission::start(&self.client, options, leadership.clone(), metrics).await?;
                let _ = self.status.webhook.set(webhook.addr);
                Some(webhook)
            }
            None => None,
        };
        // Every replica issues: the CA is shared through its Secret.
        let _issuer = match &self.options.ca {
            Some(options) => {
                let metrics = issuer::Metrics::default();
                metrics.register(&mut registry);
                let issuer = issuer::start(&self.client, options, metrics).await?;
                let _ = self.status.ca.set(issuer.server.addr);
                self.trust_bundle = Some(isthmus_config::SourceFile::new(
                    isthmus_config::source::TRUST_BUNDLE,
                    issuer.trust_bundle,
                ));
                Some(issuer.server)
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(self.options.monitoring)
            .await
            .map_err(|source| ControllerError::Bind {
                addr: self.options.monitoring,
                source,
            })?;
        if let Ok(addr) = listener.local_addr() {
            let _ = self.status.monitoring.set(addr);
        }
        tokio::spawn(serve::serve(
            listener,
            self.status.clone(),
            Arc::new(registry),
        ));

        let notify = Arc::new(Notify::new());
        let stores = Stores {
            services: self.watch::<Service>(
                &self.options.namespaces,
                "Service",
                &notify,
                watcher::Config::default(),
            ),
            slices: self.watch::<EndpointSlice>(
                &self.options.namespaces,
                "EndpointSlice",
                &notify,
                watcher::Config::default(),
            ),
            pods: self.watch::<Pod>(
                &self.options.namespaces,
                "Pod",
                &notify,
                watcher::Config::default(),
            ),
            istio_config_maps: self.watch::<ConfigMap>(
                &self.istio_namespaces(),
                "ConfigMap",
                &notify,
                watcher::Config::default().labels(&format!("{ISTIO_CONFIG_LABEL}=true")),
            ),
            // `Api<PartialObjectMeta<_>>` asks for metadata only (PartialObjectMetadataList).
            managed: self.watch::<PartialObjectMeta<ConfigMap>>(
                &self.options.namespaces,
                "ConfigMap",
                &notify,
                watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}")),
            ),
            istio: istio::watch_kinds(
                &self.client,
                &self.istio_namespaces(),
                &notify,
                &self.status,
            ),
        };
        tokio::pin!(shutdown);
        tokio::select! {
            synced = stores.wait_until_ready() => synced?,
            () = &mut shutdown => return Ok(()),
        }
        tracing::info!("watchers synced: computing the namespaces' configs");
        let mut written = Memory::default();
        let mut resync = tokio::time::interval(self.options.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            if !leadership.is_leader() {
                // A follower keeps its stores warm and writes nothing; it is ready (it serves
                // the webhook). A new leader forgets what it wrote before: someone else wrote since.
                self.status.ready.store(true, Ordering::Release);
                written.clear();
                tokio::select! {
                    () = leadership.changed() => continue,
                    () = &mut shutdown => return Ok(()),
                }
            }
            let retry = !self.reconcile(&stores, &mut written).await;
            if let Some(due) = written.gc_due.take() {
                // A namespace's grace ends then: reconcile again without waiting for a change.
                let notify = notify.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(due).await;
                    notify.notify_one();
                });
            }
            // Ready once the first reconcile was attempted, whatever its writes did: a write
            // refused for good (a Terminating namespace, a quota) must not keep the leader out
            // of the webhook Service, where an unready single replica denies every pod create
            // under failurePolicy Fail (found in review). Failed writes are in the metrics.
            self.status.ready.store(true, Ordering::Release);
            if retry {
                // Errors are retried without waiting for a change.
                notify.notify_one();
            }
            let pause = if retry {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            };
            tokio::select! {
                () = async { tokio::time::sleep(pause).await; notify.notified().await } => {}
                _ = resync.tick() => {
                    // Forget what was written: the next reconcile reads every ConfigMap back
                    // (a GET each) and writes only where one differs.
                    written.clear();
                }
                () = &mut shutdown => return Ok(()),
            }
            // Debounce: changes that arrive meanwhile are part of this reconcile (their
            // notification leaves a permit, so at most one more follows).
            tokio::time::sleep(self.options.debounce).await;
        }
    }

    /// Where the Istio inputs are watched: the watched namespaces and, when they are listed,
    /// the root namespace too (its Sidecar is every namespace's default).
    fn istio_namespaces(&self) -> Vec<String> {
        let mut namespaces = self.options.namespaces.clone();
        if !namespaces.is_empty() && !namespaces.contains(&self.options.root_namespace) {
            namespaces.push(self.options.root_namespace.clone());
        }
        namespaces
    }

    /// Starts a watcher of `K` per namespace of `namespaces` (empty: one for all), each
    /// feeding a reflector store and waking the reconciler on every event.
    fn watch<K>(
        &self,
        namespaces: &[String],
        kind: &'static str,
        notify: &Arc<Notify>,
        config: watcher::Config,
    ) -> Vec<Store<K>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let apis: Vec<Api<K>> = if namespaces.is_empty() {
            vec![Api::all(self.client.clone())]
        } else {
            namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect()
        };
        apis.into_iter()
            .map(|api| {
                let (reader, writer) = reflector::store();
                // managedFields are often the bulk of an object and never read here.
                let stream = watcher(api, config.clone())
                    .default_backoff()
                    .modify(|object: &mut K| object.managed_fields_mut().clear())
                    .reflect(writer);
                tokio::spawn(drive(stream, kind, notify.clone(), self.status.clone()));
                reader
            })
            .collect()
    }
}

impl Stores {
    async fn wait_until_ready(&self) -> Result<(), ControllerError> {
        async fn all<K>(stores: &[Store<K>], kind: &'static str) -> Result<(), ControllerError>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            for store in stores {
                store
                    .wait_until_ready()
                    .await
                    .map_err(|_| ControllerError::WatcherGone(kind))?;
            }
            Ok(())
        }
        all(&self.services, "services").await?;
        all(&self.slices, "endpointslices").await?;
        all(&self.pods, "pods").await?;
        all(&self.istio_config_maps, "configmaps").await?;
        all(&self.managed, "configmaps").await?;
        for kind in &self.istio {
            if !kind.wait_until_ready().await {
                return Err(ControllerError::WatcherGone(kind.kind));
            }
        }
        Ok(())
    }
}

/// Drives one watcher; every event (applied to its store by `reflect`) wakes the reconciler.
async fn drive<S, K>(stream: S, kind: &'static str, notify: Arc<Notify>, status: Arc<Status>)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    tokio::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => notify.notify_one(),
            Err(e) => {
                status
                    .metrics
                    .watch_errors
                    .get_or_create(&KindLabel { kind })
                    .inc();
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
            }
        }
    }
}

fn state<K>(stores: &[Store<K>]) -> Vec<Arc<K>>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    stores.iter().flat_map(Store::state).collect()
}
