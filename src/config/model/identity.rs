//! `[identity]` and `[identities]` (the client certificates presented), and `[pki]`.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM chain, leaf first (or `p12`).
    #[serde(default)]
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA), unencrypted, mode 0600 (or `p12`).
    #[serde(default)]
    pub key: PathBuf,
    /// A PKCS#12 file holding the chain and key, instead of `cert` and `key`; re-read when it
    /// changes, like them.
    pub p12: Option<PathBuf>,
    /// Environment variable holding the PKCS#12 password. Default: no password.
    pub p12_password_env: Option<String>,
    /// File holding the PKCS#12 password (trailing newline dropped).
    pub p12_password_file: Option<PathBuf>,
    /// The certificate to rotate to, published at once so receivers can trust it ahead of
    /// use. Default: none.
    pub next_cert: Option<PathBuf>,
    /// Its key.
    pub next_key: Option<PathBuf>,
    /// When to switch to `next` (RFC 3339). Default: only by `switch_before_expiry`.
    pub switch_at: Option<String>,
    /// Switch when `current` is within this of expiry, e.g. `"14d"`. Default: none.
    pub switch_before_expiry: Option<String>,
    /// Take the identity from a SPIFFE Workload API agent instead of files:
    /// `spiffe = { socket = "unix:///run/spire/agent.sock" }`. The agent pushes each renewed
    /// X.509-SVID; no `cert`, `key`, `p12` or `next_*` then.
    pub spiffe: Option<SpiffeSourceConfig>,
}

/// Where a SPIFFE Workload API agent listens, and which of its SVIDs to present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiffeSourceConfig {
    /// The agent's Workload API socket, `unix:///absolute/path` (local only).
    pub socket: String,
    /// The SPIFFE ID of the SVID to present when the agent serves several
    /// (`spiffe://trust.domain/path`). Default: the agent's first (default) SVID.
    pub spiffe_id: Option<String>,
}

/// Where `sallyport pki csr` keeps the keys it generates until `pki install`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// Directory for pending private keys (created 0700, keys 0600). Default `"keys"`.
    #[serde(default = "default_key_dir")]
    pub key_dir: PathBuf,
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            key_dir: default_key_dir(),
        }
    }
}

fn default_key_dir() -> PathBuf {
    PathBuf::from("keys")
}
