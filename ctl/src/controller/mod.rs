//! `isthmus-ctl controller`: watches Services, EndpointSlices and Pods (kube-rs watchers into
//! reflector stores, never polling), computes the registry ([`registry`], pure) and writes it
//! into each meshed namespace's `isthmus-registry` ConfigMap with server-side apply — only when
//! its content changed, debounced.
//!
//! Layout (docs/ARCHITECTURE.md, "The controller"): routing and endpoints live in two
//! ConfigMaps, `isthmus-config` (routing: Istio documents; user-written until the routing slice
//! has the controller write it from the Istio CRDs) and `isthmus-registry` (this controller's,
//! one key `registry.json`). The injector mounts both as one projected volume, so the sidecar
//! still reads one directory, and an endpoint change never rewrites routing. The registry
//! ConfigMap carries, in `isthmus.io/config-version`, the version the namespace's sidecars
//! report once both have propagated: `version_of` over the two ConfigMaps' files, exactly as
//! the sidecar hashes its directory (`proxy-status` compares the two).
//!
//! Scope of this slice: every meshed namespace gets the services of every watched namespace
//! (Istio's default `exportTo: "*"`); `exportTo`, the Istio CRDs, the 1 MiB split, leader
//! election and garbage collection of ConfigMaps of namespaces that left the mesh come later.

pub mod admission;
pub mod certs;
pub mod lease;
pub mod registry;
pub mod scope;
mod serve;
pub mod split;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use isthmus_config::SourceFile;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
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

use crate::inject::STATUS_ANNOTATION;

/// The field manager of every write (server-side apply).
pub const FIELD_MANAGER: &str = "isthmus-controller";
/// The registry ConfigMap's one key.
pub const REGISTRY_KEY: &str = "registry.json";
/// The version the namespace's sidecars report once routing and registry have propagated.
pub const VERSION_ANNOTATION: &str = "isthmus.io/config-version";
/// The content hash of `registry.json` alone: what decides whether to write.
pub const REGISTRY_HASH_ANNOTATION: &str = "isthmus.io/registry-hash";

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
    /// The routing ConfigMap (read: its files are part of the version sidecars report).
    pub routing_config_map: String,
    /// The ConfigMap this controller writes.
    pub registry_config_map: String,
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
            leader_election: None,
            webhook: None,
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
    metrics: Metrics,
}

impl Status {
    /// True once every watcher listed its objects and the first reconcile wrote (or found
    /// current) every namespace's registry.
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
    }
}

/// What was last written (or found) in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    registry_hash: String,
    version: String,
}

/// The reflector stores, one per watched namespace (or one for all) and kind.
struct Stores {
    services: Vec<Store<Service>>,
    slices: Vec<Store<EndpointSlice>>,
    pods: Vec<Store<Pod>>,
    config_maps: Vec<Store<ConfigMap>>,
}

/// The controller: build with [`Controller::new`], read its [`Status`], [`Controller::run`] it.
pub struct Controller {
    client: Client,
    options: Options,
    status: Arc<Status>,
    leadership: lease::Leadership,
}

impl Controller {
    pub fn new(client: Client, options: Options) -> Self {
        Controller {
            client,
            options,
            status: Arc::default(),
            leadership: lease::Leadership::always(),
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
            services: self.watch::<Service>("Service", &notify, None),
            slices: self.watch::<EndpointSlice>("EndpointSlice", &notify, None),
            pods: self.watch::<Pod>("Pod", &notify, None),
            // Only the routing ConfigMap matters (its files are part of the version); the
            // field selector keeps the others off the wire.
            config_maps: self.watch::<ConfigMap>(
                "ConfigMap",
                &notify,
                Some(&format!(
                    "metadata.name={}",
                    self.options.routing_config_map
                )),
            ),
        };
        tokio::pin!(shutdown);
        tokio::select! {
            synced = stores.wait_until_ready() => synced?,
            () = &mut shutdown => return Ok(()),
        }
        tracing::info!("watchers synced: computing the registry");
        let mut written: HashMap<String, Written> = HashMap::new();
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
            if retry {
                // Errors are retried without waiting for a change.
                notify.notify_one();
            } else {
                self.status.ready.store(true, Ordering::Release);
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

    /// Starts a watcher of `K` per watched namespace (or one for all), each feeding a reflector
    /// store and waking the reconciler on every event.
    fn watch<K>(
        &self,
        kind: &'static str,
        notify: &Arc<Notify>,
        fields: Option<&str>,
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
        let apis: Vec<Api<K>> = if self.options.namespaces.is_empty() {
            vec![Api::all(self.client.clone())]
        } else {
            self.options
                .namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect()
        };
        let config = match fields {
            Some(fields) => watcher::Config::default().fields(fields),
            None => watcher::Config::default(),
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

    /// Computes the registry and applies it where it changed. Returns false when a write
    /// failed (the reconcile is retried).
    async fn reconcile(&self, stores: &Stores, written: &mut HashMap<String, Written>) -> bool {
        let started = Instant::now();
        let services = state(&stores.services);
        let slices = state(&stores.slices);
        let pods = state(&stores.pods);
        let config_maps = state(&stores.config_maps);
        let text = registry::registry_json(
            &services.iter().map(Arc::as_ref).collect::<Vec<_>>(),
            &slices.iter().map(Arc::as_ref).collect::<Vec<_>>(),
            &pods.iter().map(Arc::as_ref).collect::<Vec<_>>(),
        );
        let metrics = &self.status.metrics;
        metrics.services.set(text.lines().count() as i64);
        metrics
            .endpoints
            .set(text.matches("\"address\":").count() as i64);
        let registry_file = SourceFile::new(REGISTRY_KEY, text);
        let registry_hash =
            isthmus_config::source::version_of(std::slice::from_ref(&registry_file));

        let routing: HashMap<&str, &ConfigMap> = config_maps
            .iter()
            .filter(|cm| cm.metadata.name.as_deref() == Some(&self.options.routing_config_map))
            .filter_map(|cm| Some((cm.metadata.namespace.as_deref()?, cm.as_ref())))
            .collect();
        let meshed: BTreeSet<String> = if self.options.namespaces.is_empty() {
            pods.iter()
                .filter(|p| {
                    p.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
                })
                .filter_map(|p| p.metadata.namespace.clone())
                .chain(routing.keys().map(|ns| (*ns).to_owned()))
                .collect()
        } else {
            self.options.namespaces.iter().cloned().collect()
        };

        let mut ok = true;
        for ns in &meshed {
            let mut files = routing_files(routing.get(ns.as_str()).copied());
            files.retain(|f| f.name != REGISTRY_KEY);
            files.push(registry_file.clone());
            files.sort_by(|a, b| a.name.cmp(&b.name));
            let desired = Written {
                registry_hash: registry_hash.clone(),
                version: isthmus_config::source::version_of(&files),
            };
            if written.get(ns) == Some(&desired) {
                continue;
            }
            if registry_file.text.len() > self.options.max_registry_bytes {
                // Not retried until the registry changes: remembered as if written.
                metrics
                    .writes
                    .get_or_create(&ResultLabel {
                        result: "too_large",
                    })
                    .inc();
                tracing::error!(namespace = %ns, bytes = registry_file.text.len(), limit = self.options.max_registry_bytes,
                    "the registry does not fit in one ConfigMap: not written, the namespace keeps its last registry \
                     (watch fewer namespaces with --namespace; splitting and Sidecar scoping come later)");
                written.insert(ns.clone(), desired);
                continue;
            }
            if !self.leadership.is_leader() {
                // Lost the Lease mid-reconcile: stop writing at once.
                ok = false;
                break;
            }
            match self.apply(ns, &registry_file, &desired).await {
                Ok(()) => {
                    written.insert(ns.clone(), desired);
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(namespace = %ns, error = %e, "writing the registry ConfigMap failed; retrying (may the controller patch configmaps there?)");
                }
            }
        }
        written.retain(|ns, _| meshed.contains(ns));
        self.status.reconciles.fetch_add(1, Ordering::AcqRel);
        metrics
            .reconciles
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        metrics.duration.observe(started.elapsed().as_secs_f64());
        ok
    }

    /// Writes one namespace's registry ConfigMap with server-side apply — unless what is
    /// there already carries the desired hashes (a restarted controller rewrites nothing).
    async fn apply(
        &self,
        ns: &str,
        registry_file: &SourceFile,
        desired: &Written,
    ) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let name = &self.options.registry_config_map;
        let current = api.get_opt(name).await?;
        let annotations = current
            .as_ref()
            .and_then(|cm| cm.metadata.annotations.as_ref());
        let has = |key: &str, value: &str| {
            annotations.and_then(|a| a.get(key)).map(String::as_str) == Some(value)
        };
        let bytes = registry_file.text.len() as i64;
        let labels = ConfigMapLabels {
            namespace: ns.to_owned(),
            configmap: name.clone(),
        };
        if has(REGISTRY_HASH_ANNOTATION, &desired.registry_hash)
            && has(VERSION_ANNOTATION, &desired.version)
        {
            self.status
                .metrics
                .configmap_bytes
                .get_or_create(&labels)
                .set(bytes);
            return Ok(());
        }
        let config_map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([
                    (VERSION_ANNOTATION.to_owned(), desired.version.clone()),
                    (
                        REGISTRY_HASH_ANNOTATION.to_owned(),
                        desired.registry_hash.clone(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                REGISTRY_KEY.to_owned(),
                registry_file.text.clone(),
            )])),
            ..ConfigMap::default()
        };
        let result = api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&config_map),
            )
            .await;
        let metrics = &self.status.metrics;
        metrics
            .writes
            .get_or_create(&ResultLabel {
                result: if result.is_ok() { "ok" } else { "error" },
            })
            .inc();
        result?;
        self.status.writes.fetch_add(1, Ordering::AcqRel);
        metrics.configmap_bytes.get_or_create(&labels).set(bytes);
        tracing::info!(namespace = %ns, version = %desired.version, bytes, "registry written");
        Ok(())
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
        all(&self.config_maps, "configmaps").await
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

/// The routing ConfigMap's files as kubelet materialises them, restricted to the names the
/// sidecar reads (`SourceFile::read_dir`).
fn routing_files(config_map: Option<&ConfigMap>) -> Vec<SourceFile> {
    config_map
        .and_then(|cm| cm.data.as_ref())
        .into_iter()
        .flatten()
        .filter(|(name, _)| {
            !name.starts_with('.') && [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e))
        })
        .map(|(name, text)| SourceFile::new(name.clone(), text.clone()))
        .collect()
}
