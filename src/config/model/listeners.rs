//! `[public]` and `[admin]`: the gateway's two HTTP listeners; and the limits every listener
//! (these two and the sidecar's) takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::parse::parse_duration;
use crate::listener::Limits;

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
    /// Connections held at once (1 to 1,000,000). At the cap a new connection closes the one
    /// that has waited longest without a request in flight, or is closed itself when every
    /// connection has one. Receivers and health checkers fetch a few small documents: 1024
    /// is far more than they need, small enough that what the connections hold (tens of KiB
    /// each with TLS) stays a few tens of MiB. Keep it under the process's file limit
    /// (`ulimit -n`). Default 1024.
    #[serde(default = "default_public_max_connections")]
    pub max_connections: usize,
    /// How long a connection may take to send a complete request head: from the end of the
    /// TLS handshake (or accept) for the first, from its first byte for later ones. 100ms to
    /// 5m. Default `"10s"`.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: String,
    /// How long a keep-alive connection may wait, after an exchange, before its next request
    /// begins (HTTP/1.1) or its next stream opens (HTTP/2); then it is closed. 100ms to 1h.
    /// Default `"60s"`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// How long the TLS handshake may take, when `tls_cert` is set. 100ms to 5m. Default
    /// `"10s"`.
    #[serde(default = "default_tls_handshake_timeout")]
    pub tls_handshake_timeout: String,
}

impl Default for PublicConfig {
    fn default() -> Self {
        PublicConfig {
            listen: default_public_listen(),
            tls_cert: None,
            tls_key: None,
            max_connections: default_public_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            tls_handshake_timeout: default_tls_handshake_timeout(),
        }
    }
}

impl PublicConfig {
    /// The listener's limits; each problem under its key in `[public]`.
    pub fn limits(&self) -> Result<Limits, Vec<(&'static str, String)>> {
        limits(
            self.max_connections,
            &self.header_read_timeout,
            &self.idle_timeout,
            Some(&self.tls_handshake_timeout),
        )
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
    /// Connections held at once (1 to 1,000,000), as `[public] max_connections`. Operators'
    /// tools and the ingest feeding it need a handful: 256 leaves room for parallel
    /// ingest. Default 256.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// As `[public] header_read_timeout`. Default `"10s"`.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: String,
    /// As `[public] idle_timeout`. Default `"60s"`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_env: None,
            token_file: None,
            dataflow_ca_dir: None,
            max_connections: default_admin_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

impl AdminConfig {
    /// The listener's limits; each problem under its key in `[admin]`.
    pub fn limits(&self) -> Result<Limits, Vec<(&'static str, String)>> {
        limits(
            self.max_connections,
            &self.header_read_timeout,
            &self.idle_timeout,
            None,
        )
    }
}

fn default_public_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8444))
}
fn default_public_max_connections() -> usize {
    1024
}
fn default_admin_max_connections() -> usize {
    256
}
pub(super) fn default_header_read_timeout() -> String {
    "10s".into()
}
pub(super) fn default_idle_timeout() -> String {
    "60s".into()
}
fn default_tls_handshake_timeout() -> String {
    "10s".into()
}

/// Problems from a `limits()` method as one line, each under `section.key`.
pub fn limit_errors(section: &str, issues: Vec<(&'static str, String)>) -> String {
    issues
        .into_iter()
        .map(|(key, reason)| format!("{section}.{key}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Most connections a listener may be configured to hold.
const MAX_CONNECTIONS: usize = 1_000_000;

/// A listener's limits from its keys, each checked; problems are named by key. Without a TLS
/// key (a listener that never serves TLS), the handshake limit is the header limit.
pub(super) fn limits(
    max_connections: usize,
    header_read_timeout: &str,
    idle_timeout: &str,
    tls_handshake_timeout: Option<&str>,
) -> Result<Limits, Vec<(&'static str, String)>> {
    let mut issues = Vec::new();
    if !(1..=MAX_CONNECTIONS).contains(&max_connections) {
        issues.push(("max_connections", format!("must be from 1 to {MAX_CONNECTIONS}")));
    }
    let ms = Duration::from_millis;
    let mut duration = |key: &'static str, v: &str, longest: Duration, bounds: &str| match parse_duration(v) {
        Ok(d) if d >= ms(100) && d <= longest => d,
        Ok(_) => {
            issues.push((key, format!("'{v}' must be a duration from {bounds}")));
            longest
        }
        Err(e) => {
            issues.push((key, e));
            longest
        }
    };
    let five_minutes = Duration::from_secs(300);
    let header_read_timeout = duration(
        "header_read_timeout",
        header_read_timeout,
        five_minutes,
        "100ms to 5m",
    );
    let idle_timeout = duration(
        "idle_timeout",
        idle_timeout,
        Duration::from_secs(3600),
        "100ms to 1h",
    );
    let tls_handshake_timeout = match tls_handshake_timeout {
        Some(v) => duration("tls_handshake_timeout", v, five_minutes, "100ms to 5m"),
        None => header_read_timeout,
    };
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Limits {
        max_connections,
        header_read_timeout,
        idle_timeout,
        tls_handshake_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limits_are_valid_and_as_documented() {
        let public = PublicConfig::default()
            .limits()
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(public.max_connections, 1024);
        assert_eq!(public.header_read_timeout, Duration::from_secs(10));
        assert_eq!(public.idle_timeout, Duration::from_secs(60));
        assert_eq!(public.tls_handshake_timeout, Duration::from_secs(10));
        let admin = AdminConfig::default()
            .limits()
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(admin.max_connections, 256);
    }

    #[test]
    fn out_of_bounds_limits_are_named_by_key() {
        let e = limits(0, "50ms", "2h", Some("nope")).expect_err("out of bounds");
        let keys: Vec<&str> = e.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "max_connections",
                "header_read_timeout",
                "idle_timeout",
                "tls_handshake_timeout"
            ]
        );
    }
}
