//! Reading a mounted ConfigMap directory. Kubelet's layout is
//! `name.yaml -> ..data/name.yaml`, `..data -> ..2026_11_22_02_00_00.123`, and an update
//! writes a new generation directory and renames `..data` over the old link. Following each
//! top-level link separately could read one file from the old generation and the next from
//! the new, so when `..data` exists it is resolved once and the files are read from the
//! generation directory it names: one consistent generation.

use std::path::Path;

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

    /// Reads every `*.yaml` / `*.yml` / `*.json` file of one generation of `dir`, sorted by
    /// name. A missing directory is an error ([`ConfigError::MissingDir`]), not an empty
    /// config: a sidecar must not mistake "no ConfigMap mounted" for "no policy".
    pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, ConfigError> {
        let read_err = |source| ConfigError::ReadDir {
            dir: dir.display().to_string(),
            source,
        };
        let generation = match std::fs::canonicalize(dir.join("..data")) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dir.to_path_buf(),
            Err(source) => return Err(read_err(source)),
        };
        let entries = match std::fs::read_dir(&generation) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::MissingDir {
                    dir: dir.display().to_string(),
                })
            }
            Err(source) => return Err(read_err(source)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.')
                || ![".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e))
            {
                continue;
            }
            let path = entry.path();
            // `metadata` follows symlinks (a hand-made directory may link its files anywhere).
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                _ => continue,
            }
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                file: name.clone(),
                source,
            })?;
            files.push(SourceFile { name, text });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }
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
