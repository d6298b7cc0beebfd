//! `[identity]` and `[identities]` (the client certificates presented), and `[pki]`.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA), unencrypted, mode 0600.
    pub key: PathBuf,
    /// The certificate to rotate to, published at once so receivers can trust it ahead of
    /// use. Default: none.
    pub next_cert: Option<PathBuf>,
    /// Its key.
    pub next_key: Option<PathBuf>,
    /// When to switch to `next` (RFC 3339). Default: only by `switch_before_expiry`.
    pub switch_at: Option<String>,
    /// Switch when `current` is within this of expiry, e.g. `"14d"`. Default: none.
    pub switch_before_expiry: Option<String>,
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
