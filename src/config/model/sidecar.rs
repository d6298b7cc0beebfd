//! `[sidecar]`: the localhost listeners, their routes and the forward proxy.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::listeners::{default_header_read_timeout, default_idle_timeout};
use super::{default_timeout, default_true, Auth};
use crate::config::parse::{HeaderSpec, QuerySpec};
use crate::listener::Limits;

/// A plain-HTTP listener on loopback whose routes carry an app's requests out through the
/// delivery core (mTLS, egress policy, auth, audit).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Default `127.0.0.1:18090`.
    #[serde(default = "default_sidecar_listen")]
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` (prints a warning). Default `false`.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Largest request body streamed to an upstream. Default 16 MiB.
    #[serde(default = "default_sidecar_max_body")]
    pub max_body_bytes: usize,
    /// Add `X-Forwarded-For` and `X-Forwarded-Proto`. Default `false`.
    #[serde(default)]
    pub x_forwarded: bool,
    /// Threads that run `sallyport sidecar` (1 to 64): with 1, everything runs on one
    /// thread, as a one-worker nginx or HAProxy sidecar does; the audit log's writes keep a
    /// thread of their own either way. Under `serve` the sidecar shares the export engine's
    /// runtime and this is not used. Default 1.
    #[serde(default = "default_sidecar_threads")]
    pub threads: usize,
    /// Listen on this Unix socket (created mode 0600; an existing socket file is replaced)
    /// instead of `listen`. Default: none.
    pub unix_socket: Option<PathBuf>,
    /// Write the sidecar's audit records to this append-only file (JSON lines, hash-chained
    /// like the store's audit log, created mode 0600) instead of the store: each batch is one
    /// write, much cheaper than the store's inserts. `audit verify` and `audit export` read
    /// it too. Default: none (the store).
    pub audit_file: Option<PathBuf>,
    /// Rotate the audit file when it reaches this many bytes: it is renamed
    /// `<audit_file>.<last record's seq, 12 digits>` and a new file continues the chain (its
    /// first record links to the segment's last). Ship or archive segments as you like;
    /// `audit verify` checks the segments still there. 0: never. Default 256 MiB.
    #[serde(default = "default_audit_rotate")]
    pub audit_file_rotate_bytes: u64,
    /// Longest matching prefix wins.
    #[serde(default)]
    pub routes: Vec<SidecarRoute>,
    /// Forward-proxy mode: absolute-form requests (`POST http://host/path`) are sent as
    /// `https://host/path` when the host passes the egress policy. `upstream` is ignored;
    /// `prefix` must be `/`. Default: off.
    pub forward_proxy: Option<SidecarRoute>,
    /// More listeners, each with routes of its own (e.g. one per app, or a Unix socket for
    /// one and a port for another). `max_body_bytes`, `x_forwarded` and the connection
    /// limits below apply to all.
    #[serde(default)]
    pub listeners: Vec<SidecarListener>,
    /// Connections each sidecar listener holds at once (1 to 1,000,000). At the cap a new
    /// connection closes the one that has waited longest without a request in flight, or is
    /// closed itself when every connection has one. Apps on the host keep pools of
    /// keep-alive connections (several workers, each with its pool): 4096 leaves them room
    /// while bounding what a runaway local client can hold. Keep it under the process's file
    /// limit (`ulimit -n`). Default 4096.
    #[serde(default = "default_sidecar_max_connections")]
    pub max_connections: usize,
    /// How long an app connection may take to send a complete request head: from accept for
    /// the first, from its first byte for later ones. 100ms to 5m. Default `"10s"`.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: String,
    /// How long a keep-alive app connection may wait, after an exchange, before its next
    /// request begins (HTTP/1.1) or its next stream opens (HTTP/2); then it is closed. Apps'
    /// pools should drop idle connections sooner. 100ms to 1h. Default `"60s"`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
}

fn default_sidecar_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18090))
}
fn default_sidecar_threads() -> usize {
    1
}
fn default_sidecar_max_body() -> usize {
    16 * 1024 * 1024
}
fn default_audit_rotate() -> u64 {
    256 * 1024 * 1024
}
fn default_sidecar_max_connections() -> usize {
    4096
}

/// One more sidecar listener: a loopback address or a Unix socket, and its routes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarListener {
    /// A TCP address; loopback unless `allow_non_loopback`. Set this or `unix_socket`.
    pub listen: Option<SocketAddr>,
    /// A Unix socket path (created mode 0600). Set this or `listen`.
    pub unix_socket: Option<PathBuf>,
    #[serde(default)]
    pub allow_non_loopback: bool,
    #[serde(default)]
    pub routes: Vec<SidecarRoute>,
    pub forward_proxy: Option<SidecarRoute>,
}

impl SidecarConfig {
    /// Each sidecar listener's limits; each problem under its key in `[sidecar]`.
    pub fn limits(&self) -> Result<Limits, Vec<(&'static str, String)>> {
        super::listeners::limits(
            self.max_connections,
            &self.header_read_timeout,
            &self.idle_timeout,
            None,
        )
    }

    /// The limits a `[sidecar]` section with none of their keys has.
    pub fn default_limits() -> Limits {
        match super::listeners::limits(
            default_sidecar_max_connections(),
            &default_header_read_timeout(),
            &default_idle_timeout(),
            None,
        ) {
            Ok(limits) => limits,
            Err(_) => unreachable!("the default limits are valid"),
        }
    }

    /// Every listener with its config key: `[sidecar]` itself first, then `[[sidecar.listeners]]`.
    pub fn all_listeners(&self) -> Vec<(String, SidecarListener)> {
        let main = SidecarListener {
            listen: Some(self.listen),
            unix_socket: self.unix_socket.clone(),
            allow_non_loopback: self.allow_non_loopback,
            routes: self.routes.clone(),
            forward_proxy: self.forward_proxy.clone(),
        };
        std::iter::once(("sidecar".to_owned(), main))
            .chain(
                self.listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (format!("sidecar.listeners[{i}]"), l.clone())),
            )
            .collect()
    }
}

/// One route: requests under `prefix` go to `upstream` (prefix stripped), with the same
/// settings a dataflow has.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarRoute {
    /// Path prefix, starting with `/`.
    pub prefix: String,
    /// `https://host[:port][/base]`.
    pub upstream: String,
    /// Default `true`.
    #[serde(default = "default_true")]
    pub mtls: bool,
    pub ca: Option<PathBuf>,
    /// Default `"2s"` (connect + response head; bodies then stream).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    pub headers: Option<HeaderSpec>,
    pub query: Option<QuerySpec>,
    #[serde(default)]
    pub auth: Auth,
    pub identity: Option<String>,
    /// Retries after a failed attempt (connection error, timeout, TLS error, or a 502/503/504
    /// answer), for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) whose body is
    /// at most `retry_buffer_bytes`. Default 2; 0 turns retries off.
    #[serde(default = "default_sidecar_retries")]
    pub retries: u32,
    /// Retry other methods too (POST, PATCH): only for upstreams that deduplicate. Default `false`.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// A retried request's body is held in memory to be sent again, up to this size; a larger
    /// one streams through once, unretried. Default 65536.
    #[serde(default = "default_retry_buffer")]
    pub retry_buffer_bytes: usize,
}

fn default_sidecar_retries() -> u32 {
    2
}
fn default_retry_buffer() -> usize {
    65_536
}
