//! Shared checks for the fuzz targets: each target turns its input into config files or
//! planner flags and hands them here, so the invariants are stated once.

use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_config::source::version_of;
use isthmus_config::{Snapshot, SourceFile};

pub mod plan;

/// Loads `files` and checks what must hold for any input: no panic, the same answer twice,
/// a snapshot carrying the files' content hash, and an error that names the file(s) it is
/// about (every issue starts with one of the file names).
pub fn check_load(files: &[SourceFile]) {
    let first = isthmus_config::load(files);
    let second = isthmus_config::load(files);
    match (&first, &second) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.version(), version_of(files));
            assert_eq!(a.dump(), b.dump(), "loading twice gave different snapshots");
            check_servable(a);
            b.continue_balancing(a, 7);
        }
        (Err(a), Err(b)) => {
            let issues = a.issues();
            assert!(!issues.is_empty(), "an error without issues: {a:?}");
            assert_eq!(issues, b.issues(), "loading twice gave different issues");
            for issue in &issues {
                assert!(
                    files.iter().any(|f| issue.starts_with(&f.name)),
                    "issue names no file: {issue:?}"
                );
            }
            let _ = a.to_string();
        }
        _ => panic!("loading twice gave Ok once and Err once"),
    }
}

/// The file extensions `config_multi` picks from: the ones a ConfigMap directory is read for.
const EXTENSIONS: [&str; 3] = ["yaml", "json", "yml"];

/// At most this many files from one input.
pub const MAX_FILES: usize = 8;

/// Splits fuzz input into config files: NUL-separated chunks, each starting with one byte
/// that picks the file's name (`f0`..`f3`, so names can repeat) and extension. Chunks that
/// are not UTF-8 are dropped, as `SourceFile::read_dir` would refuse them.
pub fn split_files(data: &[u8]) -> Vec<SourceFile> {
    data.split(|b| *b == 0)
        .take(MAX_FILES)
        .filter_map(|chunk| {
            let (&pick, body) = chunk.split_first()?;
            let text = std::str::from_utf8(body).ok()?;
            let ext = EXTENSIONS[usize::from(pick) % EXTENSIONS.len()];
            let stem = usize::from(pick) / EXTENSIONS.len() % 4;
            Some(SourceFile::new(format!("f{stem}.{ext}"), text))
        })
        .collect()
}

/// What the compiler promises the data path ("a snapshot that exists is one the proxy can
/// serve"): every service has a host; every VIP:port finds its own service and port; every
/// port ends in a catch-all route; every route has destinations whose weights can be split
/// (one destination, or several adding up to 100); endpoint weights are at least 1.
fn check_servable(snapshot: &Snapshot) {
    for service in snapshot.services() {
        assert!(!service.host().is_empty(), "empty host in {service:?}");
        for port in &service.ports {
            for ip in &service.addresses {
                let dst = SocketAddr::new(*ip, port.number);
                let (found, found_port) = snapshot.service_port(dst).expect("VIP:port not indexed");
                assert!(Arc::ptr_eq(found, service), "{dst} maps to another service");
                assert_eq!(found_port.number, port.number);
            }
            let last = port.routes.last().expect("a port without routes");
            assert!(last.matches.is_empty(), "last route is not a catch-all");
            for route in &port.routes {
                assert!(
                    !route.destinations.is_empty(),
                    "a route without destinations"
                );
                if route.destinations.len() > 1 {
                    let sum: u64 = route.destinations.iter().map(|d| u64::from(d.weight)).sum();
                    assert_eq!(sum, 100, "weights of {route:?}");
                }
                for d in &route.destinations {
                    assert!(d.weight >= 1 || route.destinations.len() > 1);
                    assert!(d.cluster.endpoints.iter().all(|e| e.weight >= 1));
                }
                for ip in &service.addresses {
                    let _ = route.accepts(SocketAddr::new(*ip, port.number));
                }
            }
        }
    }
}
