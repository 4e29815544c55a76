//! The config store: the current [`Snapshot`] behind an `ArcSwap`, swapped whole, and the
//! watcher that reloads it from the mounted ConfigMap directory.
//!
//! A connection loads the snapshot once and sees one consistent version for its life; a
//! reload never touches accepted sockets. A bad config is logged with file, field and reason,
//! counted, shown on the admin port, and the last good snapshot keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use isthmus_config::{source::version_of, ConfigError, Snapshot, SourceFile};
use notify::{RecursiveMode, Watcher};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::metrics::{Metrics, ResultLabels, VersionLabels};

/// The last reload outcome, for `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub loaded_at: Option<SystemTime>,
    pub successes: u64,
    pub failures: u64,
    /// The rejected version and why, until a good config loads.
    pub last_error: Option<(String, Vec<String>)>,
}

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    status: Mutex<ReloadStatus>,
    version: watch::Sender<String>,
    metrics: Arc<Metrics>,
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
        let empty = Snapshot::empty();
        let (version, _) = watch::channel(empty.version().to_string());
        Arc::new(ConfigStore {
            current: ArcSwap::from_pointee(empty),
            status: Mutex::new(ReloadStatus::default()),
            version,
            metrics,
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

    pub fn has_loaded(&self) -> bool {
        self.status().loaded_at.is_some()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads `dir` and swaps in its snapshot if it changed and is valid.
    pub async fn reload_from(&self, dir: &Path) -> Reload {
        let files = match SourceFile::read_dir(dir) {
            Ok(files) => files,
            Err(e) => return self.reject(String::from("unreadable"), &e),
        };
        let version = version_of(&files);
        {
            let status = self.status();
            let same_as_loaded = status.loaded_at.is_some() && self.load().version() == version;
            let same_as_rejected = status
                .last_error
                .as_ref()
                .is_some_and(|(v, _)| *v == version);
            if same_as_loaded || same_as_rejected {
                return Reload::Unchanged;
            }
        }
        match isthmus_config::load(&files) {
            Ok(snapshot) => {
                let services = snapshot.services().len();
                self.current.store(Arc::new(snapshot));
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                self.metrics.config_version.clear();
                self.metrics
                    .config_version
                    .get_or_create(&VersionLabels {
                        version: version.clone(),
                    })
                    .set(1);
                let now = SystemTime::now();
                self.metrics.config_last_success.set(
                    now.duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
                {
                    let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    status.loaded_at = Some(now);
                    status.successes += 1;
                    status.last_error = None;
                }
                self.version.send_replace(version.clone());
                release_free_memory();
                tracing::info!(%version, services, files = files.len(), "config loaded");
                Reload::Loaded(version)
            }
            Err(e) => self.reject(version, &e),
        }
    }

    fn reject(&self, version: String, error: &ConfigError) -> Reload {
        let issues = error.issues();
        for issue in &issues {
            tracing::error!(%version, serving = %self.load().version(), "config rejected: {issue}");
        }
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.failures += 1;
        status.last_error = Some((version.clone(), issues));
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
            "reloads": { "success": status.successes, "failure": status.failures },
            "lastError": status.last_error.map(|(version, issues)| json!({"version": version, "issues": issues})),
            "config": snapshot.dump(),
        })
    }
}

/// The control thread (admin, config watcher and parser) yields the CPU to the data path's
/// workers: parsing a large config takes hundreds of milliseconds and must not delay relaying.
/// Called after the workers are spawned, so they keep the default priority.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// Parsing a large config allocates far more than the snapshot keeps; glibc holds on to the
/// freed pages. Hand them back so RSS reflects the snapshot, not the parse.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Watches `dir` and reloads on change. Kubelet updates a ConfigMap volume by writing a new
/// timestamped directory and renaming the `..data` symlink over the old one; plain edits just
/// write files. Both produce a burst of events, so reloads wait until the burst is `debounce`
/// quiet. `resync` re-reads periodically as a safety net for missed events (an unchanged
/// directory costs one read and a hash).
pub async fn watch_dir(
    store: Arc<ConfigStore>,
    dir: PathBuf,
    debounce: Duration,
    resync: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch {}: {e}; re-reading every {resync:?}",
                    dir.display()
                );
                None
            }
        };
    let mut watching = false;
    loop {
        if !watching {
            if let Some(w) = watcher.as_mut() {
                match w.watch(&dir, RecursiveMode::Recursive) {
                    Ok(()) => watching = true,
                    Err(e) => tracing::debug!("not watching {} yet: {e}", dir.display()),
                }
            }
            // A directory that appeared since the last pass may already hold a config.
            store.reload_from(&dir).await;
        }
        match tokio::time::timeout(resync, rx.recv()).await {
            Ok(Some(())) => {
                // Let the burst settle.
                while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                store.reload_from(&dir).await;
            }
            Ok(None) => return,
            Err(_) => {
                store.reload_from(&dir).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\n\
                        spec: {hosts: [a], addresses: [10.96.0.1], ports: [{number: 80, name: tcp}]}\n";

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("isthmus-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn bad_config_keeps_the_last_good_one() {
        let dir = tempdir("keep");
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        std::fs::write(dir.join("mesh.yaml"), GOOD).unwrap();
        let Reload::Loaded(good) = store.reload_from(&dir).await else {
            panic!("not loaded")
        };
        assert_eq!(store.reload_from(&dir).await, Reload::Unchanged);
        std::fs::write(
            dir.join("mesh.yaml"),
            GOOD.replace("number: 80", "number: 0"),
        )
        .unwrap();
        assert!(matches!(store.reload_from(&dir).await, Reload::Rejected(_)));
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
        assert_eq!(store.reload_from(&dir).await, Reload::Unchanged);
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

    #[tokio::test]
    async fn missing_directory_is_an_empty_config() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        let dir = std::env::temp_dir().join("isthmus-state-does-not-exist");
        assert!(matches!(store.reload_from(&dir).await, Reload::Loaded(_)));
        assert!(store.has_loaded());
        assert!(store.load().services().is_empty());
    }
}
