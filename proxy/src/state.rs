//! The config store: the current [`Snapshot`] behind an `ArcSwap`, swapped whole. The
//! watcher that feeds it from the mounted ConfigMap directory is [`crate::watch`].
//!
//! A connection loads the snapshot once and sees one consistent version for its life; a
//! reload never touches accepted sockets. A bad config is logged with file, field and reason,
//! counted, shown on the admin port, and the last good snapshot keeps serving. Until a first
//! config has loaded, [`ConfigStore::has_loaded`] is false: the pod is not ready and the
//! policy stage refuses traffic (fail closed).

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use isthmus_config::{source::version_of, ConfigError, Snapshot, SourceFile};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::metrics::{Metrics, ResultLabels, VersionLabels};
use crate::process;

/// The last reload outcome, for `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub loaded_at: Option<SystemTime>,
    pub successes: u64,
    pub failures: u64,
    /// How many times the directory was read (the watcher's cost, visible).
    pub reads: u64,
    /// The rejected version (or what could not be read) and why, until a good config loads.
    pub last_error: Option<(String, Vec<String>)>,
}

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    /// Set once the first config loads; read by every connection, so not behind the mutex.
    loaded: AtomicBool,
    status: Mutex<ReloadStatus>,
    version: watch::Sender<String>,
    metrics: Arc<Metrics>,
    /// Where this sidecar's balancers start when a cluster is new (random per process).
    balancer_seed: u64,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Loaded(String),
    Unchanged,
    Rejected(String),
}

impl ConfigStore {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self::with_seed(metrics, seed)
    }

    pub fn with_seed(metrics: Arc<Metrics>, balancer_seed: u64) -> Arc<Self> {
        let empty = Snapshot::empty();
        let (version, _) = watch::channel(empty.version().to_string());
        Arc::new(ConfigStore {
            current: ArcSwap::from_pointee(empty),
            loaded: AtomicBool::new(false),
            status: Mutex::new(ReloadStatus::default()),
            version,
            metrics,
            balancer_seed,
        })
    }

    /// The snapshot new connections route with.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Subscribes to version changes (long-lived connections can re-check policy).
    pub fn subscribe(&self) -> watch::Receiver<String> {
        self.version.subscribe()
    }

    /// Whether a config has ever loaded. Until then the sidecar is not ready and refuses
    /// traffic whose policy it cannot know.
    pub fn has_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn status(&self) -> ReloadStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `dir` and swaps in its snapshot if it changed and is valid.
    pub fn reload_from(&self, dir: &Path) -> Reload {
        self.lock().reads += 1;
        let files = match SourceFile::read_dir(dir) {
            Ok(files) => files,
            Err(e) => return self.reject(String::from("unreadable"), &e),
        };
        let version = version_of(&files);
        {
            let status = self.lock();
            let same_as_loaded = status.loaded_at.is_some() && self.load().version() == version;
            let same_as_rejected = status
                .last_error
                .as_ref()
                .is_some_and(|(v, _)| *v == version);
            if same_as_loaded || same_as_rejected {
                return Reload::Unchanged;
            }
        }
        let loaded = process::contain(|| {
            inject_compile_panic();
            isthmus_config::load(&files)
        })
        .unwrap_or_else(|panic| {
            Err(ConfigError::Internal(format!(
                "isthmus could not compile this config (a bug: please report it): {panic}"
            )))
        });
        match loaded {
            Ok(snapshot) => {
                snapshot.continue_balancing(&self.load(), self.balancer_seed);
                let services = snapshot.services().len();
                self.current.store(Arc::new(snapshot));
                self.record_success(&version);
                self.version.send_replace(version.clone());
                process::release_free_memory();
                tracing::info!(%version, services, files = files.len(), "config loaded");
                Reload::Loaded(version)
            }
            Err(e) => self.reject(version, &e),
        }
    }

    fn record_success(&self, version: &str) {
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        self.metrics.config_version.clear();
        self.metrics
            .config_version
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
        let now = SystemTime::now();
        self.metrics.config_last_success.set(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        let mut status = self.lock();
        status.loaded_at = Some(now);
        status.successes += 1;
        status.last_error = None;
        self.loaded.store(true, Ordering::Release);
    }

    /// Records a rejection once: the same bad config (or the same read error) seen again on a
    /// resync is not logged or counted again.
    fn reject(&self, version: String, error: &ConfigError) -> Reload {
        let issues = error.issues();
        {
            let mut status = self.lock();
            if status.last_error.as_ref() == Some(&(version.clone(), issues.clone())) {
                return Reload::Unchanged;
            }
            status.failures += 1;
            status.last_error = Some((version.clone(), issues.clone()));
        }
        let loaded = self.has_loaded();
        for issue in &issues {
            if loaded {
                tracing::error!(%version, serving = %self.load().version(), "config rejected, the last good config keeps serving: {issue}");
            } else {
                tracing::error!(%version, "no config loaded; refusing traffic and not ready: {issue}");
            }
        }
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
        Reload::Rejected(version)
    }

    /// The `/config_dump` document: what is serving, and what was last rejected.
    pub fn dump(&self) -> Value {
        let status = self.status();
        let snapshot = self.load();
        json!({
            "version": snapshot.version(),
            "loaded": status.loaded_at.is_some(),
            "loadedAt": status.loaded_at.map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()),
            "reloads": { "success": status.successes, "failure": status.failures, "directoryReads": status.reads },
            "lastError": status.last_error.map(|(version, issues)| json!({"version": version, "issues": issues})),
            "config": snapshot.dump(),
        })
    }
}

/// Debug builds only: `ISTHMUS_INJECT_FAULT=config-panic` makes compiling panic, so a test
/// can check that such a bug rejects the config instead of killing the sidecar.
fn inject_compile_panic() {
    #[cfg(debug_assertions)]
    if std::env::var("ISTHMUS_INJECT_FAULT").as_deref() == Ok("config-panic") {
        panic!("injected fault: config compile panics");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    pub(crate) const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\n\
                        spec: {hosts: [a], addresses: [10.96.0.1], ports: [{number: 80, name: tcp}]}\n";

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("isthmus-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bad_config_keeps_the_last_good_one() {
        let dir = tempdir("keep");
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        std::fs::write(dir.join("mesh.yaml"), GOOD).unwrap();
        let Reload::Loaded(good) = store.reload_from(&dir) else {
            panic!("not loaded")
        };
        assert_eq!(store.reload_from(&dir), Reload::Unchanged);
        std::fs::write(
            dir.join("mesh.yaml"),
            GOOD.replace("number: 80", "number: 0"),
        )
        .unwrap();
        assert!(matches!(store.reload_from(&dir), Reload::Rejected(_)));
        assert_eq!(store.load().version(), good);
        assert_eq!(store.load().services().len(), 1);
        let status = store.status();
        assert_eq!((status.successes, status.failures), (1, 1));
        let issues = &status.last_error.as_ref().unwrap().1;
        assert!(
            issues[0].contains("mesh.yaml: ServiceEntry default/a: spec.ports[0].number"),
            "{issues:?}"
        );
        // The same bad file again is not counted twice.
        assert_eq!(store.reload_from(&dir), Reload::Unchanged);
        let text = store.metrics.encode();
        assert!(
            text.contains("isthmus_config_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(&format!("isthmus_config_version{{version=\"{good}\"}} 1")),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found in review: a missing directory read as an empty config, so the sidecar became
    /// ready and passed every connection through without knowing the policy.
    #[test]
    fn missing_directory_is_not_a_config() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        let dir = std::env::temp_dir().join("isthmus-state-does-not-exist");
        assert!(matches!(store.reload_from(&dir), Reload::Rejected(_)));
        assert!(!store.has_loaded());
        let dump = store.dump();
        assert_eq!(dump["loaded"], false);
        let why = dump["lastError"]["issues"][0].as_str().unwrap();
        assert!(why.contains("does not exist"), "{why}");
        // Polling a still-missing directory is not a new failure each time.
        assert_eq!(store.reload_from(&dir), Reload::Unchanged);
        assert_eq!(store.status().failures, 1);
    }

    #[test]
    fn invalid_first_config_is_not_loaded() {
        let dir = tempdir("first-bad");
        std::fs::write(dir.join("mesh.yaml"), "kind: [").unwrap();
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        assert!(matches!(store.reload_from(&dir), Reload::Rejected(_)));
        assert!(!store.has_loaded());
        std::fs::write(dir.join("mesh.yaml"), GOOD).unwrap();
        assert!(matches!(store.reload_from(&dir), Reload::Loaded(_)));
        assert!(store.has_loaded());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
