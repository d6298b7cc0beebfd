//! Secrets: read from an environment variable or a file named in the config, never inline,
//! never printed.

use std::fmt;
use std::path::PathBuf;

/// A secret value. `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// Pick the one source from a `*_env` / `*_file` pair; `what` names the key for errors.
    pub fn from_pair(env: Option<&String>, file: Option<&PathBuf>, what: &str) -> Result<Self, String> {
        match (env, file) {
            (Some(e), None) => Ok(SecretSource::Env(e.clone())),
            (None, Some(f)) => Ok(SecretSource::File(f.clone())),
            (Some(_), Some(_)) => Err(format!("set only one of {what}_env and {what}_file")),
            (None, None) => Err(format!("{what}_env or {what}_file is required")),
        }
    }

    /// Read the secret now. A file's trailing newline is dropped; an empty secret is an error.
    pub fn read(&self) -> Result<Secret, String> {
        let value = match self {
            SecretSource::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
            }
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        };
        if value.is_empty() {
            return Err(match self {
                SecretSource::Env(name) => format!("environment variable {name} is empty"),
                SecretSource::File(path) => format!("secret file {} is empty", path.display()),
            });
        }
        Ok(Secret(value))
    }
}
