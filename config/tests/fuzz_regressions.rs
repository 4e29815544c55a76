//! Inputs from the config fuzz targets (`fuzz/`), replayed on every `cargo test`.
//!
//! A crash found by `fuzz/run.sh` becomes a `#[test]` here: the minimized input's exact bytes,
//! loaded the way its target loads them, asserting a clean result (an error that names the
//! file, or the right snapshot), never a panic. The committed seed corpora are replayed too,
//! so the fuzzers' starting points stay loadable without cargo-fuzz or a nightly toolchain.

use std::path::PathBuf;

use isthmus_config::{load, ConfigError, SourceFile};

/// Loads `files` the way the fuzz targets do and checks what they check on an error: at least
/// one issue, and every issue names one of the files.
fn load_cleanly(files: &[SourceFile]) -> Result<(), Vec<String>> {
    match load(files) {
        Ok(_) => Ok(()),
        Err(e @ ConfigError::Invalid(_)) => {
            let issues = e.issues();
            assert!(!issues.is_empty(), "an error without issues");
            for issue in &issues {
                assert!(
                    files.iter().any(|f| issue.starts_with(&f.name)),
                    "issue names no file: {issue:?}"
                );
            }
            Err(issues)
        }
        Err(other) => panic!("loading text cannot fail to read: {other}"),
    }
}

fn corpus(target: &str) -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("corpus file");
            (
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[test]
fn yaml_seed_corpus_loads_cleanly() {
    for (path, text) in corpus("config_yaml") {
        eprintln!("{path}");
        let _ = load_cleanly(&[SourceFile::new("fuzz.yaml", text)]);
    }
}

#[test]
fn json_seed_corpus_loads_cleanly() {
    for (path, text) in corpus("config_json") {
        eprintln!("{path}");
        let _ = load_cleanly(&[SourceFile::new("fuzz.json", text)]);
    }
}
