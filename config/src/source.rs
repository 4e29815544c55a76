//! Reading a mounted ConfigMap directory. Kubelet's layout is
//! `name.yaml -> ..data/name.yaml`, `..data -> ..2026_11_22_02_00_00.123`; following the
//! top-level names and skipping dot-entries reads exactly one consistent generation.

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

    /// Reads every `*.yaml` / `*.yml` / `*.json` file at the top of `dir`, sorted by name. A missing
    /// directory reads as empty: a sidecar that starts before its ConfigMap exists must not
    /// break the pod's traffic.
    pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, ConfigError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ConfigError::ReadDir {
                    dir: dir.display().to_string(),
                    source,
                })
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::ReadDir {
                dir: dir.display().to_string(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.')
                || ![".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e))
            {
                continue;
            }
            let path = entry.path();
            // `metadata` follows symlinks: kubelet's files are links into `..data`.
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
        assert!(SourceFile::read_dir(&dir).unwrap().is_empty());
    }
}
