//! `[public]` and `[admin]`: the gateway's two HTTP listeners.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// Default `127.0.0.1:8443`.
    #[serde(default = "default_public_listen")]
    pub listen: SocketAddr,
    /// Serve the public listener over TLS with this server certificate chain. Default: plain
    /// HTTP (the documents it serves are public).
    pub tls_cert: Option<PathBuf>,
    /// The key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for PublicConfig {
    fn default() -> Self {
        PublicConfig {
            listen: default_public_listen(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Default `127.0.0.1:8444`.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Environment variable holding the admin bearer token.
    pub token_env: Option<String>,
    /// File holding the admin bearer token.
    pub token_file: Option<PathBuf>,
    /// Where the CA bundles of API-defined dataflows live: their `ca` is a file name inside
    /// it (no other path is read for them; or they give `ca_pem` inline). Default: none.
    pub dataflow_ca_dir: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_env: None,
            token_file: None,
            dataflow_ca_dir: None,
        }
    }
}

fn default_public_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8444))
}
