//! The TOML configuration: model (serde), defaults in one place, and validation that reports
//! every problem at once with its key path (`dataflows[2].endpoint: …`).
//!
//! Must never: hold a secret inline (secrets come from `*_env` or `*_file`), print a secret
//! (see [`Secret`]), or let a bad config start anything.

mod destination;
mod model;
mod parse;
mod secret;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use destination::{AuthConfig, DestinationConfig};
pub use model::*;
/// Entry point for the header/query syntax fuzz target.
pub use parse::fuzz_entry as syntax_fuzz_entry;
pub use parse::{parse_duration, parse_headers, parse_query, HeaderSpec, QuerySpec};
pub use secret::{Secret, SecretSource};
pub use validate::check_url;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Key path, e.g. `dataflows[2].endpoint`.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: {} problem(s):\n{}", issues.len(), issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid { file: PathBuf, issues: Vec<Issue> },
}

impl ConfigError {
    /// The individual problems (one for read and syntax errors).
    pub fn issues(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { issues, .. } => issues.iter().map(Issue::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

impl Config {
    /// Read, parse and validate a config file. Relative paths in it are taken relative to the
    /// file's own directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Parse a config file without validating it: for `pki csr`/`pki install`, which create
    /// the very files validation would ask for.
    pub fn parse_unvalidated(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            file: path.to_owned(),
            message: syntax_message(&text, &e),
        })?;
        cfg.base_dir = path.parent().unwrap_or_else(|| Path::new(".")).to_owned();
        Ok(cfg)
    }

    /// Parse and validate TOML text; `file` names it in errors, `base` anchors relative paths.
    pub fn from_toml(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: syntax_message(text, &e),
        })?;
        cfg.base_dir = base.to_owned();
        let issues = cfg.validate();
        if issues.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                issues,
            })
        }
    }

    /// Resolve a path from the config relative to the config file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The dataflow named `name`.
    pub fn dataflow(&self, name: &str) -> Option<&Dataflow> {
        self.dataflows.iter().find(|d| d.name == name)
    }
}

fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let upto = &text[..span.start.min(text.len())];
            let line = upto.matches('\n').count() + 1;
            let col = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

/// Entry point for the config fuzz target: any input must give Ok or a typed error, never a
/// panic.
pub fn fuzz_entry(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text, Path::new("fuzz.toml"), Path::new("/nonexistent"));
    }
}

/// Whether a `Content-Type` says JSON (`application/json`, or any `+json` type).
pub fn is_json_content_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}
