//! The config watcher: reloads the store when the mounted ConfigMap directory changes, on a
//! thread of its own (at lower priority), so that parsing a large config never runs on a
//! worker or on the thread answering readiness probes.
//!
//! What counts as a change: kubelet's `..data` swap, and a config file (`*.yaml`, `*.yml`,
//! `*.json`) or the trust bundle created, written, renamed or removed at the top of the
//! directory ([`isthmus_config::source::is_versioned_file`]). Opening and
//! reading files is not a change — reacting to those made every reload's own reads trigger
//! the next one. A burst of events is settled (quiet for `debounce`, at most `max_delay` after
//! the first) before one reload; a periodic resync covers missed events. A directory that is
//! missing is polled until it appears, and one that is replaced (a new inode) is watched anew.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::process;
use crate::state::ConfigStore;

/// How the watcher paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Quiet time after the last event of a burst before reloading.
    pub debounce: Duration,
    /// The longest a reload waits after the first event of a burst, however long it lasts.
    pub max_delay: Duration,
    /// Re-read this often even without events.
    pub resync: Duration,
    /// While the directory is missing, look for it this often.
    pub missing_poll: Duration,
}

/// Starts the watcher thread: it loads the first config at once, then follows changes until
/// the process exits.
pub fn spawn(
    store: Arc<ConfigStore>,
    dir: PathBuf,
    pacing: Pacing,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("isthmus-config".into())
        .spawn(move || {
            process::lower_thread_priority();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!("config watcher runtime: {e}"),
            };
            rt.block_on(watch_dir(store, dir, pacing));
        })
}

/// Whether a file-system event can change the config read from `dir`.
pub fn is_relevant(event: &notify::Event, dir: &Path) -> bool {
    let kind_matters = match event.kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        // Written and closed: an in-place edit is complete.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        // Opens, reads and read-only closes are our own reloads reading the files.
        EventKind::Access(_) => false,
        EventKind::Any | EventKind::Other => true,
    };
    kind_matters
        && event.paths.iter().any(|path| {
            if path == dir {
                // The directory itself was removed or moved away.
                return true;
            }
            if path.parent() != Some(dir) {
                return false;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            name == "..data" || isthmus_config::source::is_versioned_file(&name)
        })
}

/// Waits until `events` has been quiet for `debounce`, or `max_delay` has passed since
/// `first`. Returns false if the channel closed.
pub async fn settle(
    events: &mut mpsc::UnboundedReceiver<()>,
    first: tokio::time::Instant,
    debounce: Duration,
    max_delay: Duration,
) -> bool {
    let cap = first + max_delay;
    loop {
        let quiet = (tokio::time::Instant::now() + debounce).min(cap);
        match tokio::time::timeout_at(quiet, events.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < cap => continue,
            Ok(Some(())) | Err(_) => return true,
            Ok(None) => return false,
        }
    }
}

/// The directory's identity: a replaced directory (deleted and recreated, or another moved
/// into its place) has a new one and must be watched again.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

async fn watch_dir(store: Arc<ConfigStore>, dir: PathBuf, pacing: Pacing) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    // Keeps the channel open when no watcher could be made (then resync is all there is).
    let _sender = tx.clone();
    let filter_dir = dir.clone();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| is_relevant(&e, &filter_dir)) {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch {}: {e}; re-reading every {:?}",
                    dir.display(),
                    pacing.resync
                );
                None
            }
        };
    // The identity of the directory the watch was set up on.
    let mut seen: Option<(u64, u64)> = None;
    loop {
        let now = identity(&dir);
        if now != seen || now.is_none() {
            if let (Some(w), Some(_)) = (watcher.as_mut(), seen) {
                let _ = w.unwatch(&dir);
            }
            if let (Some(w), Some(_)) = (watcher.as_mut(), now) {
                if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(
                        "cannot watch {}: {e}; re-reading every {:?}",
                        dir.display(),
                        pacing.resync
                    );
                }
            }
            seen = now;
            // Appeared, replaced, or still missing (the store records that only once).
            store.reload_from(&dir);
        }
        let wait = if seen.is_some() {
            pacing.resync
        } else {
            pacing.missing_poll
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(())) => {
                if !settle(
                    &mut rx,
                    tokio::time::Instant::now(),
                    pacing.debounce,
                    pacing.max_delay,
                )
                .await
                {
                    return;
                }
                // A replaced directory is re-watched and reloaded at the top of the loop.
                if seen.is_some() && identity(&dir) == seen {
                    store.reload_from(&dir);
                }
            }
            Ok(None) => return,
            Err(_) if seen.is_some() => {
                store.reload_from(&dir);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests;
