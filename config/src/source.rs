//! Reading a mounted ConfigMap directory. Kubelet's layout is
//! `name.yaml -> ..data/name.yaml`, `..data -> ..2026_11_22_02_00_00.123`, and an update
//! writes a new generation directory and renames `..data` over the old link. Following each
//! top-level link separately could read one file from the old generation and the next from
//! the new, so when `..data` exists it is resolved once and the files are read from the
//! generation directory it names: one consistent generation.

use std::path::{Path, PathBuf};

use crate::error::ConfigError;

/// One config file: its name (for error messages) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        SourceFile {
            name: name.into(),
            text: text.into(),
        }
    }

    /// Reads every `*.yaml` / `*.yml` / `*.json` file of one generation of `dir`, and the
    /// mesh's [`TRUST_BUNDLE`], sorted by name. A missing directory is an error ([`ConfigError::MissingDir`]), not an empty
    /// config: a sidecar must not mistake "no ConfigMap mounted" for "no policy".
    ///
    /// Kubelet deletes the old generation right after swapping `..data`, possibly while we
    /// read it: a generation whose files vanish, or that `..data` no longer names once read,
    /// is read again from the new one — never returned partial (a partial read used to load
    /// as an empty config, dropping every route and a `REGISTRY_ONLY` policy with them).
    pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, ConfigError> {
        for _ in 0..READ_ATTEMPTS {
            let current = generation(dir)?;
            match read_files(dir, current.as_deref()) {
                Ok(files) if current.is_none() || generation(dir)? == current => return Ok(files),
                Ok(_) | Err(Partial::Vanished) => continue,
                Err(Partial::Failed(e)) => return Err(e),
            }
        }
        Err(ConfigError::Unstable {
            dir: dir.display().to_string(),
            attempts: READ_ATTEMPTS,
        })
    }
}

/// The mesh's trust bundle (PEM roots) the controller publishes beside the config: read with
/// the config so that it counts in the generation's [`version_of`] (a rotated bundle shows as
/// a new version until every sidecar has it), but not parsed as config ([`is_config_file`]).
pub const TRUST_BUNDLE: &str = "trust-bundle.pem";

/// Whether a file of the config directory holds config documents (`*.yaml`, `*.yml`,
/// `*.json`; dot-files are kubelet's).
pub fn is_config_file(name: &str) -> bool {
    !name.starts_with('.') && [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e))
}

/// Whether a file of the config directory is read, counts in the version, and is a change when
/// it changes: config files and the trust bundle.
pub fn is_versioned_file(name: &str) -> bool {
    is_config_file(name) || name == TRUST_BUNDLE
}

/// How many times a directory that keeps changing under the reader is read before giving up
/// (until the next change event or resync).
const READ_ATTEMPTS: usize = 10;

/// Why one read of a generation did not complete.
enum Partial {
    /// The generation was replaced while being read: read the new one.
    Vanished,
    Failed(ConfigError),
}

/// The generation directory `dir/..data` names, or `None` for a plain directory.
fn generation(dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
    let link = dir.join("..data");
    match std::fs::symlink_metadata(&link) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(read_dir_error(dir, source)),
        Ok(_) => {}
    }
    match std::fs::canonicalize(&link) {
        Ok(target) => Ok(Some(target)),
        // A dangling `..data` (its generation deleted under us): whatever it names next.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(link)),
        Err(source) => Err(read_dir_error(dir, source)),
    }
}

fn read_dir_error(dir: &Path, source: std::io::Error) -> ConfigError {
    ConfigError::ReadDir {
        dir: dir.display().to_string(),
        source,
    }
}

/// Reads the config files of `generation` (kubelet's layout) or of `dir` itself.
fn read_files(dir: &Path, generation: Option<&Path>) -> Result<Vec<SourceFile>, Partial> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let from = generation.unwrap_or(dir);
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if gone(&e) && generation.is_some() => return Err(Partial::Vanished),
        Err(e) if gone(&e) => {
            return Err(Partial::Failed(ConfigError::MissingDir {
                dir: dir.display().to_string(),
            }))
        }
        Err(source) => return Err(Partial::Failed(read_dir_error(dir, source))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if gone(&e) && generation.is_some() => return Err(Partial::Vanished),
            Err(source) => return Err(Partial::Failed(read_dir_error(dir, source))),
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_versioned_file(&name) {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks (a hand-made directory may link its files anywhere).
        let read = std::fs::metadata(&path).and_then(|meta| {
            if meta.is_file() {
                std::fs::read_to_string(&path).map(Some)
            } else {
                Ok(None)
            }
        });
        match read {
            Ok(Some(text)) => files.push(SourceFile { name, text }),
            Ok(None) => {}
            // In a generation, a vanished file means the generation is being deleted; in a
            // plain directory, a file deleted while listing is simply not there any more.
            Err(e) if gone(&e) && generation.is_some() => return Err(Partial::Vanished),
            Err(e) if gone(&e) => {}
            Err(source) => {
                return Err(Partial::Failed(ConfigError::ReadFile {
                    file: name,
                    source,
                }))
            }
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// A stable content hash of a config generation (FNV-1a over names and texts), shown by every
/// proxy so that propagation can be checked: same files, same version, on every pod.
pub fn version_of(files: &[SourceFile]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for file in files {
        feed(file.name.as_bytes());
        feed(&[0]);
        feed(file.text.as_bytes());
        feed(&[0]);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_depends_on_names_and_text() {
        let a = [SourceFile::new("a.yaml", "x")];
        let b = [SourceFile::new("b.yaml", "x")];
        let c = [SourceFile::new("a.yaml", "y")];
        assert_eq!(version_of(&a), version_of(&a.clone()));
        assert_ne!(version_of(&a), version_of(&b));
        assert_ne!(version_of(&a), version_of(&c));
        assert_eq!(version_of(&[]).len(), 16);
    }

    #[test]
    fn trust_bundle_is_read_and_versioned_but_not_parsed_as_config() {
        let dir = std::env::temp_dir().join(format!("isthmus-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "").unwrap();
        std::fs::write(
            dir.join(TRUST_BUNDLE),
            "-----BEGIN CERTIFICATE-----\nnot yaml: [\n",
        )
        .unwrap();
        std::fs::write(dir.join("other.pem"), "ignored").unwrap();
        let files = SourceFile::read_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", TRUST_BUNDLE]);
        let without_bundle = &files[..1];
        assert_ne!(version_of(&files), version_of(without_bundle));
        let snapshot = crate::load(&files).expect("the bundle is not parsed as config");
        assert_eq!(snapshot.version(), version_of(&files));
    }

    #[test]
    fn reads_kubelet_layout_and_skips_dot_entries() {
        let dir = std::env::temp_dir().join(format!("isthmus-src-{}", std::process::id()));
        let data = dir.join("..2026_01_01");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("mesh.yaml"), "kind: x").unwrap();
        std::fs::write(data.join("notes.txt"), "ignored").unwrap();
        std::os::unix::fs::symlink("..2026_01_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/mesh.yaml", dir.join("mesh.yaml")).unwrap();
        let files = SourceFile::read_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(files, vec![SourceFile::new("mesh.yaml", "kind: x")]);
        assert!(matches!(
            SourceFile::read_dir(&dir),
            Err(ConfigError::MissingDir { .. })
        ));
    }

    /// Found by the flapping fault test: kubelet (like our local mesh) deletes the old
    /// generation right after the swap, and a reader that had resolved `..data` to it read
    /// some or none of its files — an empty config loaded. A reader racing a writer that swaps
    /// generations as fast as it can must only ever see whole generations.
    #[test]
    fn a_generation_replaced_while_read_is_read_again_not_partially() {
        let root = std::env::temp_dir().join(format!("isthmus-src-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        const FILES: usize = 8;
        let dir = root.clone();
        let write_generation = move |n: usize| {
            let name = format!("..gen_{n}");
            std::fs::create_dir(dir.join(&name)).unwrap();
            for f in 0..FILES {
                std::fs::write(dir.join(&name).join(format!("f{f}.yaml")), format!("{n}")).unwrap();
            }
            let tmp = dir.join("..data_tmp");
            std::os::unix::fs::symlink(&name, &tmp).unwrap();
            std::fs::rename(&tmp, dir.join("..data")).unwrap();
            if n > 0 {
                std::fs::remove_dir_all(dir.join(format!("..gen_{}", n - 1))).unwrap();
            }
        };
        write_generation(0);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let write_generation = write_generation.clone();
            std::thread::spawn(move || {
                let mut n = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                    write_generation(n);
                    n += 1;
                }
            })
        };
        let (mut whole, mut unstable) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        while std::time::Instant::now() < deadline {
            match SourceFile::read_dir(&root) {
                Ok(files) => {
                    assert_eq!(files.len(), FILES, "a partial generation was returned");
                    assert!(
                        files.iter().all(|f| f.text == files[0].text),
                        "files from two generations"
                    );
                    whole += 1;
                }
                Err(ConfigError::Unstable { .. }) => unstable += 1,
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(whole > 10, "{whole} whole reads, {unstable} gave up");
    }

    /// Between kubelet renaming `..data` to a new generation and relinking the top-level
    /// names, the top-level links may still point at the old generation's files (or at none):
    /// the files are read from the generation `..data` names, all of them from the same one.
    #[test]
    fn reads_one_generation_through_data_link() {
        let dir = std::env::temp_dir().join(format!("isthmus-src-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (generation, text) in [("..old", "old"), ("..new", "new")] {
            std::fs::create_dir_all(dir.join(generation)).unwrap();
            std::fs::write(dir.join(generation).join("a.yaml"), text).unwrap();
            std::fs::write(dir.join(generation).join("b.yaml"), text).unwrap();
        }
        // Mid-update: `..data` already names the new generation, a top-level link still names
        // an old file directly.
        std::os::unix::fs::symlink("..new", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..old/a.yaml", dir.join("a.yaml")).unwrap();
        let files = SourceFile::read_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            files,
            vec![
                SourceFile::new("a.yaml", "new"),
                SourceFile::new("b.yaml", "new")
            ]
        );
    }
}
