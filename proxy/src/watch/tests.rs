use std::path::PathBuf;

use notify::event::{CreateKind, RenameMode};

use std::time::Instant;

use super::*;
use crate::metrics::Metrics;

const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\n\
                    spec: {hosts: [a], addresses: [10.96.0.1], ports: [{number: 80, name: tcp}]}\n";

fn pacing() -> Pacing {
    Pacing {
        debounce: Duration::from_millis(10),
        max_delay: Duration::from_millis(200),
        resync: Duration::from_secs(60),
        missing_poll: Duration::from_millis(20),
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("isthmus-watch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Polls `done` until it holds or 10 s pass.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn event(kind: EventKind, path: PathBuf) -> notify::Event {
    notify::Event::new(kind).add_path(path)
}

#[test]
fn only_changes_that_matter_are_relevant() {
    let dir = PathBuf::from("/etc/isthmus/config");
    let file = dir.join("mesh.yaml");
    let ours = [
        EventKind::Access(AccessKind::Open(AccessMode::Any)),
        EventKind::Access(AccessKind::Read),
        EventKind::Access(AccessKind::Close(AccessMode::Read)),
        EventKind::Modify(ModifyKind::Metadata(
            notify::event::MetadataKind::AccessTime,
        )),
    ];
    for kind in ours {
        assert!(!is_relevant(&event(kind, file.clone()), &dir), "{kind:?}");
    }
    let changes = [
        EventKind::Access(AccessKind::Close(AccessMode::Write)),
        EventKind::Create(CreateKind::File),
        EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any)),
        EventKind::Remove(notify::event::RemoveKind::File),
    ];
    for kind in changes {
        assert!(is_relevant(&event(kind, file.clone()), &dir), "{kind:?}");
    }
    let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
    assert!(is_relevant(&event(rename, dir.join("..data")), &dir));
    assert!(is_relevant(&event(rename, dir.join("routes.json")), &dir));
    // Kubelet writing the next generation: only its final `..data` rename matters.
    let create = EventKind::Create(CreateKind::File);
    assert!(!is_relevant(
        &event(create, dir.join("..2026_11_22/mesh.yaml")),
        &dir
    ));
    assert!(!is_relevant(&event(create, dir.join("..data_tmp")), &dir));
    assert!(!is_relevant(&event(create, dir.join("notes.txt")), &dir));
    assert!(!is_relevant(
        &event(create, dir.join(".mesh.yaml.swp")),
        &dir
    ));
    // The directory itself going away.
    let removed = EventKind::Remove(notify::event::RemoveKind::Folder);
    assert!(is_relevant(&event(removed, dir.clone()), &dir));
}

/// Found in review: each reload's own reads (open/close events) triggered the next reload,
/// forever — 29 reads in 3 s of an idle 4-service sidecar. An idle watcher reads once.
#[test]
fn an_idle_watcher_reads_the_directory_once() {
    let dir = tempdir("idle");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), GOOD).unwrap();
    let store = ConfigStore::new(Arc::new(Metrics::new()));
    spawn(store.clone(), dir.clone(), pacing()).unwrap();
    eventually("the first load", || store.has_loaded());
    // An observation window, not a wait for a signal: nothing should happen in it. Long
    // enough for dozens of debounce periods (the defect re-read every ~100 ms).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(store.status().reads, 1, "{:?}", store.status());
    // A real change is still seen.
    std::fs::write(
        dir.join("mesh.yaml"),
        GOOD.replace("10.96.0.1", "10.96.0.2"),
    )
    .unwrap();
    eventually("the edit", || store.status().successes == 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A directory that is missing at start is picked up when it appears, and one that is
/// replaced by a new directory is watched anew (edits inside the new one are seen).
#[test]
fn a_directory_that_appears_later_or_is_replaced_is_followed() {
    let dir = tempdir("appears");
    let store = ConfigStore::new(Arc::new(Metrics::new()));
    spawn(store.clone(), dir.clone(), pacing()).unwrap();
    eventually("the missing directory to be reported", || {
        store.status().last_error.is_some()
    });
    assert!(!store.has_loaded());

    // Appears, written in one step (as a volume mount would).
    let staging = tempdir("appears-staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("mesh.yaml"), GOOD).unwrap();
    std::fs::rename(&staging, &dir).unwrap();
    eventually("the config to load", || store.has_loaded());
    let first = store.load().version().to_string();

    // Replaced: moved away, a new directory in its place.
    let old = tempdir("appears-old");
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(
        staging.join("mesh.yaml"),
        GOOD.replace("10.96.0.1", "10.96.0.3"),
    )
    .unwrap();
    std::fs::rename(&staging, &dir).unwrap();
    eventually("the replacement to load", || {
        store.load().version() != first
    });
    let second = store.load().version().to_string();

    // The watch follows the new directory, not the old one.
    std::fs::write(
        old.join("mesh.yaml"),
        GOOD.replace("10.96.0.1", "10.96.0.9"),
    )
    .unwrap();
    std::fs::write(
        dir.join("mesh.yaml"),
        GOOD.replace("10.96.0.1", "10.96.0.4"),
    )
    .unwrap();
    eventually("the edit in the new directory", || {
        store.load().version() != second
    });
    let dump = store.dump().to_string();
    assert!(
        dump.contains("10.96.0.4") && !dump.contains("10.96.0.9"),
        "{dump}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&old).unwrap();
}

/// A burst that never goes quiet still reloads within `max_delay`.
#[tokio::test(start_paused = true)]
async fn settling_is_bounded() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for _ in 0..10_000 {
            if tx.send(()).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let start = tokio::time::Instant::now();
    let settled = settle(
        &mut rx,
        start,
        Duration::from_millis(100),
        Duration::from_millis(300),
    )
    .await;
    assert!(settled);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(295) && waited <= Duration::from_millis(310),
        "{waited:?}"
    );
}
