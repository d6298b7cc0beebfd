//! Secrets declared once, by name: `[secrets.NAME] env = "VAR"` or `file = "path"`. Dataflows
//! defined through the admin API (or found in a shared database) may refer to these names
//! only, never to an environment variable or a file of their own choosing.

use std::path::PathBuf;

use serde::Deserialize;

/// One named secret: exactly one of `env` and `file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// The environment variable holding it.
    pub env: Option<String>,
    /// The file holding it (trailing newline dropped).
    pub file: Option<PathBuf>,
}
