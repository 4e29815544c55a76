//! Writing a config directory exactly as kubelet updates a mounted ConfigMap: files go into a
//! new timestamped directory, a `..data_tmp` symlink to it is renamed over `..data` (one atomic
//! step), and the visible names are links through `..data`. The proxy must see every update as
//! one whole generation; the local mesh and the tests use this to prove it does.

use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use isthmus_config::SourceFile;

/// A ConfigMap-style directory.
#[derive(Debug)]
pub struct ConfigMapDir {
    dir: PathBuf,
    generation: AtomicU64,
}

impl ConfigMapDir {
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(ConfigMapDir {
            dir,
            generation: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Atomically replaces the whole content with `files`. Returns the config version the
    /// proxy will report for it.
    pub fn write(&self, files: &[SourceFile]) -> io::Result<String> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let stamp = format!(
            "..{}_{generation}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let data = self.dir.join(&stamp);
        std::fs::create_dir(&data)?;
        for file in files {
            std::fs::write(data.join(&file.name), &file.text)?;
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&stamp, &tmp)?;
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        // Visible names: add links for new files, drop links for removed ones.
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !files.iter().any(|f| f.name == name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        for file in files {
            let link = self.dir.join(&file.name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(&file.name), &link)?;
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        let mut sorted = files.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(isthmus_config::source::version_of(&sorted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_generations_and_reads_back_whole() {
        let dir = std::env::temp_dir().join(format!("isthmus-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cm = ConfigMapDir::new(&dir).unwrap();
        let v1 = cm
            .write(&[
                SourceFile::new("b.yaml", "1"),
                SourceFile::new("a.yaml", "1"),
            ])
            .unwrap();
        let read = SourceFile::read_dir(&dir).unwrap();
        assert_eq!(isthmus_config::source::version_of(&read), v1);
        let v2 = cm.write(&[SourceFile::new("a.yaml", "2")]).unwrap();
        let read = SourceFile::read_dir(&dir).unwrap();
        assert_eq!(read, vec![SourceFile::new("a.yaml", "2")]);
        assert_eq!(isthmus_config::source::version_of(&read), v2);
        // Only the live generation is left.
        let stamps = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(stamps, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
