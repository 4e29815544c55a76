//! Config errors: every problem names the file, the document and the field, so an operator
//! can fix a ConfigMap without guessing.

use std::fmt;

/// Why a config was rejected. The last good snapshot keeps serving when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config directory {dir} does not exist (is the ConfigMap volume mounted?)")]
    MissingDir { dir: String },
    #[error("config directory {dir} changed {attempts} times while being read; waiting for it to settle")]
    Unstable { dir: String, attempts: usize },
    #[error("cannot read config directory {dir}: {source}")]
    ReadDir { dir: String, source: std::io::Error },
    #[error("cannot read {file}: {source}")]
    ReadFile {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", Issues(.0))]
    Invalid(Vec<Issue>),
    /// The compiler failed on its own account (reported by the caller that contained it).
    #[error("{0}")]
    Internal(String),
}

/// One problem in one document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Issue {
    /// `file.yaml`, `file.yaml: document 2` or `file.yaml: VirtualService default/reviews`.
    pub location: String,
    /// Dotted path of the offending field (`spec.tcp[0].route[1].weight`), empty for the whole
    /// document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.field, self.message)
        }
    }
}

struct Issues<'a>(&'a [Issue]);

impl fmt::Display for Issues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The individual problems, for tools that print one per line.
    pub fn issues(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(issues) => issues.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}
