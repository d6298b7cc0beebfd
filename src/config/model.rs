//! The config model. Every field's default is stated in its doc comment and set in one place
//! (the `default_*` functions below). `config/sallyport.toml` documents each key and is
//! parsed by a test.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::parse::{parse_duration, HeaderSpec, QuerySpec};
use super::secret::SecretSource;
use super::Issue;

/// Headers a dataflow may not set: the gateway owns them.
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// Shortest and longest per-dataflow timeout accepted.
pub const TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The client certificate the gateway presents. Required when any dataflow has mtls on.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// Unauthenticated listener (certificate, egress IPs, health).
    #[serde(default)]
    pub public: PublicConfig,
    /// Token-protected listener (ingest, dataflows, dead letters, metrics).
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub egress: EgressConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Named client identities for dataflows that present their own certificate (a
    /// receiver's own CA, one identity per receiver). Same keys as `[identity]`.
    #[serde(default)]
    pub identities: std::collections::BTreeMap<String, IdentityConfig>,
    #[serde(default)]
    pub pki: PkiConfig,
    /// The localhost sidecar (`sallyport sidecar`). Default: none.
    pub sidecar: Option<SidecarConfig>,
    #[serde(default)]
    pub dataflows: Vec<Dataflow>,
    /// The segment catalog.
    #[serde(default)]
    pub segments: Vec<Segment>,
    /// Directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

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
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_env: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (default `sqlite://var/sallyport.db`) or `postgres://user@host:port/db`
    /// (several instances may share one PostgreSQL database). Put no password here: use
    /// `password_env` or `password_file`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// PostgreSQL password from this environment variable. Default: none (trust/peer auth).
    pub password_env: Option<String>,
    /// PostgreSQL password from this file. Default: none.
    pub password_file: Option<PathBuf>,
    /// PostgreSQL schema holding Sallyport's tables (created when missing). Default `public`.
    pub schema: Option<String>,
    /// This instance's name in leases and its audit chain (PostgreSQL). Default: the host name.
    pub instance: Option<String>,
    /// How long a claimed delivery stays leased to the instance that claimed it; after that,
    /// another instance may take it over (an instance that died). Default `"30s"`.
    #[serde(default = "default_lease")]
    pub lease: String,
    /// PostgreSQL connections per instance. Default 4.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// CA bundle for the PostgreSQL server's certificate. When set, every connection is TLS
    /// (required, verified, host name checked). Default: none — plaintext, for a database on
    /// the same host or a trusted private network.
    pub ca: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: default_store_url(),
            password_env: None,
            password_file: None,
            schema: None,
            instance: None,
            lease: default_lease(),
            pool_size: default_pool_size(),
            ca: None,
        }
    }
}

impl StoreConfig {
    /// The validated lease (validation guarantees it parses).
    pub fn lease(&self) -> Duration {
        parse_duration(&self.lease).unwrap_or(Duration::from_secs(30))
    }

    /// The URL with any password replaced, fit for a log line or an error.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("REDACTED"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) => "(unparseable URL)".into(),
        }
    }
}

fn default_lease() -> String {
    "30s".into()
}
fn default_pool_size() -> usize {
    4
}

/// Alert rules, evaluated every `interval`; a firing alert is logged and, when `webhook` is
/// set, POSTed as JSON through the delivery core (as the HTTP API destination's dataflow
/// alerts do).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// `https://…` receiving alert JSON. Default: log only.
    pub webhook: Option<String>,
    /// CA bundle for the webhook receiver. Default: webpki roots.
    pub ca: Option<PathBuf>,
    /// Refuse a webhook receiver that does not request a client certificate. Default `true`.
    #[serde(default = "default_true")]
    pub mtls: bool,
    /// Fire when failed attempts / attempts in `window` reach this. Default `0.5`.
    #[serde(default = "default_failure_ratio")]
    pub failure_ratio: f64,
    /// …and at least this many attempts happened in `window`. Default `20`.
    #[serde(default = "default_min_attempts")]
    pub min_attempts: u64,
    /// Fire when more than this many dead letters appear in `window`. Default `0`.
    #[serde(default)]
    pub dead_letters: u64,
    /// Sliding window. Default `"5m"`.
    #[serde(default = "default_window")]
    pub window: String,
    /// Days before the client certificate expires at which to alert. Default `[30, 7]`.
    #[serde(default = "default_cert_days")]
    pub cert_expiry_days: Vec<i64>,
    /// How often rules are evaluated. Default `"30s"`.
    #[serde(default = "default_interval")]
    pub interval: String,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook: None,
            ca: None,
            mtls: true,
            failure_ratio: default_failure_ratio(),
            min_attempts: default_min_attempts(),
            dead_letters: 0,
            window: default_window(),
            cert_expiry_days: default_cert_days(),
            interval: default_interval(),
        }
    }
}

fn default_failure_ratio() -> f64 {
    0.5
}
fn default_min_attempts() -> u64 {
    20
}
fn default_window() -> String {
    "5m".into()
}
fn default_cert_days() -> Vec<i64> {
    vec![30, 7]
}
fn default_audit_rotate() -> u64 {
    256 * 1024 * 1024
}

fn default_interval() -> String {
    "30s".into()
}

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
    /// one and a port for another). `max_body_bytes` and `x_forwarded` apply to all.
    #[serde(default)]
    pub listeners: Vec<SidecarListener>,
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

fn default_sidecar_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18090))
}
fn default_sidecar_threads() -> usize {
    1
}
fn default_sidecar_max_body() -> usize {
    16 * 1024 * 1024
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

/// The audit log's optional HMAC key (without one, the chain still detects edits, deletions
/// and reorders, but a writer with database access could recompute it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Environment variable holding the audit HMAC key. Default: none.
    pub key_env: Option<String>,
    /// File holding the audit HMAC key. Default: none.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Static source addresses outbound connections bind to. Default: none (OS chooses).
    #[serde(default)]
    pub source_ips: Vec<IpAddr>,
    /// Destinations allowed: host names, `*.suffix` wildcards, CIDRs. Default: none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Destinations denied even if allowed. Default: none.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// One HTTP destination ("dataflow").
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dataflow {
    pub name: String,
    /// `https://host[:port]/path`.
    pub endpoint: String,
    /// Refuse receivers that do not request a client certificate. Default `true`.
    #[serde(default = "default_true")]
    pub mtls: bool,
    /// CA bundle that signs the receiver's certificate. Default: the webpki roots.
    pub ca: Option<PathBuf>,
    /// Connect + request timeout. Default `"2s"`.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Custom headers, `"h1:v1,h2:v2"` or a table. Default none.
    pub headers: Option<HeaderSpec>,
    /// Query parameters, `"p1=v1&p2=v2"` or a table. Default none.
    pub query: Option<QuerySpec>,
    /// Add segment names to `segmentMembership`. Default `false`.
    #[serde(default)]
    pub include_segment_names: bool,
    /// Add createdAt/updatedAt/mappingCreatedAt/mappingUpdatedAt. Default `false`.
    #[serde(default)]
    pub include_segment_timestamps: bool,
    /// Authentication. Default `{ kind = "none" }`.
    #[serde(default)]
    pub auth: Auth,
    /// Mapped attributes (source path → target path).
    #[serde(default)]
    pub attributes: Vec<AttributeMapping>,
    /// Mapped segment ids.
    #[serde(default)]
    pub segments: Vec<String>,
    /// A named identity from `[identities]` to present to this receiver. Default: the
    /// gateway's `[identity]`.
    pub identity: Option<String>,
    /// Attempts per delivery before it becomes a dead letter (the first try plus retries).
    /// Default 3, as the HTTP API destination does; 1..=10.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Make 4xx answers other than 408 and 429 final (dead letter at once). Default `false`.
    #[serde(default)]
    pub no_retry_on_4xx: bool,
    /// Standard Webhooks signing secret (`whsec_…`), from the environment. Default: unsigned.
    pub signing_secret_env: Option<String>,
    /// Standard Webhooks signing secret, from a file.
    pub signing_secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeMapping {
    pub source: String,
    pub target: String,
}

/// Where OAuth2 client credentials go (RFC 6749 §2.3.1 allows both).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsIn {
    /// In the form body (`client_id`, `client_secret`). The default.
    #[default]
    Body,
    /// In an HTTP Basic `Authorization` header.
    Basic,
}

/// Authentication toward a receiver.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    #[default]
    None,
    Bearer {
        token_env: Option<String>,
        token_file: Option<PathBuf>,
    },
    #[serde(rename = "oauth2_client_credentials")]
    OAuth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret_env: Option<String>,
        client_secret_file: Option<PathBuf>,
        scope: Option<String>,
        #[serde(default)]
        credentials_in: CredentialsIn,
    },
    #[serde(rename = "oauth2_password")]
    OAuth2Password {
        token_url: String,
        client_id: String,
        client_secret_env: Option<String>,
        client_secret_file: Option<PathBuf>,
        username: String,
        password_env: Option<String>,
        password_file: Option<PathBuf>,
        scope: Option<String>,
        #[serde(default)]
        credentials_in: CredentialsIn,
    },
}

impl Auth {
    pub fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Bearer { .. } => "bearer",
            Auth::OAuth2ClientCredentials { .. } => "oauth2_client_credentials",
            Auth::OAuth2Password { .. } => "oauth2_password",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub id: String,
    pub name: String,
    /// Default `"default"`.
    #[serde(default = "default_merge_policy")]
    pub merge_policy: String,
    /// RFC 3339.
    pub created_at: Option<String>,
    /// RFC 3339.
    pub updated_at: Option<String>,
}

fn default_public_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8444))
}
fn default_store_url() -> String {
    "sqlite://var/sallyport.db".into()
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> String {
    "2s".into()
}
fn default_max_attempts() -> u32 {
    3
}
fn default_merge_policy() -> String {
    "default".into()
}

// === impl Dataflow ===

impl Dataflow {
    /// The validated timeout (validation guarantees it parses).
    pub fn timeout(&self) -> Duration {
        parse_duration(&self.timeout).unwrap_or(crate::delivery::DEFAULT_TIMEOUT)
    }
}

// === validation ===

pub(super) struct Issues(pub(super) Vec<Issue>);

impl Issues {
    pub(super) fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Issue {
            key: key.into(),
            reason: reason.into(),
        });
    }
}

impl Config {
    /// Every problem in the config, each with its key path. Empty means valid.
    pub fn validate(&self) -> Vec<Issue> {
        let mut out = Issues(Vec::new());
        if let Some(id) = &self.identity {
            self.validate_identity(&mut out, "identity", id);
        }
        for (name, id) in &self.identities {
            if name == "default" {
                out.push(
                    format!("identities.{name}"),
                    "'default' names the [identity] table; choose another name",
                );
            } else if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                out.push(
                    format!("identities.{name}"),
                    "names are letters, digits, '-' or '_'",
                );
            }
            self.validate_identity(&mut out, &format!("identities.{name}"), id);
        }
        if let (Some(_), Some(_)) = (&self.admin.token_env, &self.admin.token_file) {
            out.push("admin", "set only one of token_env and token_file");
        }
        for (what, list) in [("allow", &self.egress.allow), ("deny", &self.egress.deny)] {
            for (i, rule) in list.iter().enumerate() {
                if let Err(e) = crate::egress::Rule::parse(rule) {
                    out.push(format!("egress.{what}[{i}]"), e);
                }
            }
        }
        match (&self.public.tls_cert, &self.public.tls_key) {
            (Some(c), Some(k)) => {
                self.check_file(&mut out, "public.tls_cert", c);
                self.check_file(&mut out, "public.tls_key", k);
            }
            (None, None) => {}
            _ => out.push("public", "set both tls_cert and tls_key, or neither"),
        }
        if let Some(sc) = &self.sidecar {
            if !(1..=64).contains(&sc.threads) {
                out.push("sidecar.threads", "must be between 1 and 64");
            }
            for (n, (lkey, l)) in sc.all_listeners().into_iter().enumerate() {
                self.validate_sidecar_listener(&mut out, &lkey, n, &l);
            }
        }
        let a = &self.alerts;
        if let Some(Err(issues)) = self.alerts_destination_issues() {
            for i in issues {
                let key = if i.key == "endpoint" {
                    "webhook"
                } else {
                    i.key.as_str()
                };
                out.push(format!("alerts.{key}"), i.reason);
            }
        } else if let (None, Some(ca)) = (&a.webhook, &a.ca) {
            self.check_file(&mut out, "alerts.ca", ca);
        }
        if !(a.failure_ratio > 0.0 && a.failure_ratio <= 1.0) {
            out.push(
                "alerts.failure_ratio",
                format!("{} is outside (0, 1]", a.failure_ratio),
            );
        }
        for (key, v) in [("alerts.window", &a.window), ("alerts.interval", &a.interval)] {
            if let Err(e) = parse_duration(v) {
                out.push(key, e);
            }
        }
        if self.audit.key_env.is_some() || self.audit.key_file.is_some() {
            self.check_secret(
                &mut out,
                "audit",
                "key",
                self.audit.key_env.as_ref(),
                self.audit.key_file.as_ref(),
            );
        }
        if !(self.store.url.starts_with("sqlite://")
            || self.store.url.starts_with("postgres://")
            || self.store.url.starts_with("postgresql://"))
        {
            out.push(
                "store.url",
                format!(
                    "'{}' must start with sqlite:// or postgres://",
                    self.store.redacted_url()
                ),
            );
        }
        let pg = !self.store.url.starts_with("sqlite://");
        if pg && url::Url::parse(&self.store.url).is_ok_and(|u| u.password().is_some()) {
            out.push(
                "store.url",
                "holds a password; use store.password_env or store.password_file instead",
            );
        }
        if self.store.password_env.is_some() || self.store.password_file.is_some() {
            self.check_secret(
                &mut out,
                "store",
                "password",
                self.store.password_env.as_ref(),
                self.store.password_file.as_ref(),
            );
        }
        match parse_duration(&self.store.lease) {
            Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) => {}
            _ => out.push(
                "store.lease",
                format!("'{}' must be a duration from 1s to 1h", self.store.lease),
            ),
        }
        if pg {
            let sslmode = url::Url::parse(&self.store.url).ok().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "sslmode")
                    .map(|(_, v)| v.into_owned())
            });
            match (&self.store.ca, sslmode.as_deref()) {
                (Some(_), Some("disable")) => out.push("store.ca", "set, but the URL says sslmode=disable"),
                (Some(ca), _) => self.check_file(&mut out, "store.ca", ca),
                (None, Some("require" | "verify-ca" | "verify-full")) => out.push(
                    "store.url",
                    "sslmode asks for TLS: set store.ca to the CA bundle that verifies the server",
                ),
                _ => {}
            }
        }
        if !(1..=64).contains(&self.store.pool_size) {
            out.push("store.pool_size", "must be from 1 to 64");
        }
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if let Some(schema) = &self.store.schema {
            if !(ident_ok(schema) && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
                out.push(
                    "store.schema",
                    format!("'{schema}' must be 1-63 letters, digits or '_'"),
                );
            }
        }
        if let Some(instance) = &self.store.instance {
            if !ident_ok(instance) {
                out.push(
                    "store.instance",
                    format!("'{instance}' must be 1-63 letters, digits, '.', '-' or '_'"),
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, df) in self.dataflows.iter().enumerate() {
            let key = format!("dataflows[{i}]");
            if df.name.is_empty()
                || !df
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                out.push(
                    format!("{key}.name"),
                    format!("'{}' must be non-empty letters, digits, '-' or '_'", df.name),
                );
            } else if !names.insert(df.name.as_str()) {
                out.push(
                    format!("{key}.name"),
                    format!("'{}' is used by another dataflow", df.name),
                );
            }
            self.validate_dataflow(&mut out, &key, df);
        }
        for (i, s) in self.segments.iter().enumerate() {
            for (field, v) in [("created_at", &s.created_at), ("updated_at", &s.updated_at)] {
                if let Some(v) = v {
                    if time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).is_err()
                    {
                        out.push(
                            format!("segments[{i}].{field}"),
                            format!("'{v}' is not an RFC 3339 time"),
                        );
                    }
                }
            }
        }
        out.0
    }

    fn validate_identity(&self, out: &mut Issues, key: &str, id: &IdentityConfig) {
        self.check_file(out, &format!("{key}.cert"), &id.cert);
        self.check_file(out, &format!("{key}.key"), &id.key);
        match (&id.next_cert, &id.next_key) {
            (Some(c), Some(k)) => {
                self.check_file(out, &format!("{key}.next_cert"), c);
                self.check_file(out, &format!("{key}.next_key"), k);
                if id.switch_at.is_none() && id.switch_before_expiry.is_none() {
                    out.push(key, "next_cert needs switch_at or switch_before_expiry");
                }
            }
            (None, None) => {}
            _ => out.push(key, "set both next_cert and next_key, or neither"),
        }
        if let Some(t) = &id.switch_at {
            if time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_err() {
                out.push(
                    format!("{key}.switch_at"),
                    format!("'{t}' is not an RFC 3339 time"),
                );
            }
        }
        if let Some(d) = &id.switch_before_expiry {
            if let Err(e) = parse_duration(d) {
                out.push(format!("{key}.switch_before_expiry"), e);
            }
        }
    }

    /// The identity config a dataflow presents: its named one, else the gateway's.
    pub fn identity_for(&self, df: &Dataflow) -> Option<&IdentityConfig> {
        match &df.identity {
            Some(name) => self.identities.get(name),
            None => self.identity.as_ref(),
        }
    }

    fn validate_dataflow(&self, out: &mut Issues, key: &str, df: &Dataflow) {
        self.validate_destination(out, key, &super::destination::Written::dataflow(df));
        for (j, a) in df.attributes.iter().enumerate() {
            for (field, path) in [("source", &a.source), ("target", &a.target)] {
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    out.push(
                        format!("{key}.attributes[{j}].{field}"),
                        format!("'{path}' is not a dotted path like person.name.firstName"),
                    );
                }
            }
        }
        for (j, s) in df.segments.iter().enumerate() {
            if !self.segments.iter().any(|c| &c.id == s) {
                out.push(
                    format!("{key}.segments[{j}]"),
                    format!("segment '{s}' is not in the [[segments]] catalog"),
                );
            }
        }
    }

    pub(super) fn validate_auth(&self, out: &mut Issues, key: &str, auth: &Auth) {
        match auth {
            Auth::None => {}
            Auth::Bearer {
                token_env,
                token_file,
            } => {
                self.check_secret(out, key, "token", token_env.as_ref(), token_file.as_ref());
            }
            Auth::OAuth2ClientCredentials {
                token_url,
                client_id,
                client_secret_env,
                client_secret_file,
                ..
            } => {
                check_token_url(out, key, token_url);
                if client_id.is_empty() {
                    out.push(format!("{key}.client_id"), "must not be empty");
                }
                self.check_secret(
                    out,
                    key,
                    "client_secret",
                    client_secret_env.as_ref(),
                    client_secret_file.as_ref(),
                );
            }
            Auth::OAuth2Password {
                token_url,
                client_id,
                client_secret_env,
                client_secret_file,
                username,
                password_env,
                password_file,
                ..
            } => {
                check_token_url(out, key, token_url);
                if client_id.is_empty() {
                    out.push(format!("{key}.client_id"), "must not be empty");
                }
                if username.is_empty() {
                    out.push(format!("{key}.username"), "must not be empty");
                }
                self.check_secret(
                    out,
                    key,
                    "client_secret",
                    client_secret_env.as_ref(),
                    client_secret_file.as_ref(),
                );
                self.check_secret(
                    out,
                    key,
                    "password",
                    password_env.as_ref(),
                    password_file.as_ref(),
                );
            }
        }
    }

    /// A destination's problems, under `key`.
    fn validate_destination(&self, out: &mut Issues, key: &str, w: &super::destination::Written<'_>) {
        if let Err(issues) = self.destination(key, w) {
            for i in issues {
                out.push(format!("{key}.{}", i.key), i.reason);
            }
        }
    }

    /// A secret must come from exactly one source, and that source must be readable now.
    fn check_secret(
        &self,
        out: &mut Issues,
        key: &str,
        what: &str,
        env: Option<&String>,
        file: Option<&PathBuf>,
    ) {
        let file = file.map(|f| self.path(f));
        match SecretSource::from_pair(env, file.as_ref(), what).and_then(|s| s.read()) {
            Ok(_) => {}
            Err(e) => out.push(format!("{key}.{what}"), e),
        }
    }

    /// One sidecar listener: where it listens, and each route as a dataflow would be checked.
    fn validate_sidecar_listener(&self, out: &mut Issues, lkey: &str, n: usize, l: &SidecarListener) {
        match (&l.listen, &l.unix_socket) {
            // The main [sidecar] listener always has an address (default loopback); its
            // unix_socket, when set, is used instead.
            (_, Some(path)) => match self.path(path).parent() {
                Some(dir) if dir.is_dir() => {}
                _ => out.push(
                    format!("{lkey}.unix_socket"),
                    format!("{}: its directory does not exist", path.display()),
                ),
            },
            (Some(addr), None) => {
                if !addr.ip().is_loopback() && !l.allow_non_loopback {
                    out.push(
                        format!("{lkey}.listen"),
                        format!("{addr} is not loopback; set allow_non_loopback = true to expose it"),
                    );
                }
            }
            (None, None) => out.push(lkey, "set listen or unix_socket"),
        }
        if l.routes.is_empty() && l.forward_proxy.is_none() && n > 0 {
            out.push(
                format!("{lkey}.routes"),
                "a listener needs routes or forward_proxy",
            );
        }
        let labelled = l
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("{lkey}.routes[{i}]"), r, true))
            .chain(
                l.forward_proxy
                    .iter()
                    .map(|r| (format!("{lkey}.forward_proxy"), r, false)),
            );
        for (key, r, routed) in labelled {
            if r.retries > 5 {
                out.push(format!("{key}.retries"), "at most 5");
            }
            if r.retry_buffer_bytes > 16 * 1024 * 1024 {
                out.push(format!("{key}.retry_buffer_bytes"), "at most 16 MiB");
            }
            if routed && !r.prefix.starts_with('/') {
                out.push(
                    format!("{key}.prefix"),
                    format!("'{}' must start with /", r.prefix),
                );
            }
            self.validate_destination(out, &key, &super::destination::Written::route(r));
        }
    }

    pub(super) fn check_file(&self, out: &mut Issues, key: &str, p: &Path) {
        let full = self.path(p);
        if !full.is_file() {
            out.push(key, format!("{} does not exist or is not a file", full.display()));
        }
    }

    /// The secret source for a `*_env`/`*_file` pair, with the file resolved.
    pub fn secret_source(
        &self,
        env: Option<&String>,
        file: Option<&PathBuf>,
        what: &str,
    ) -> Result<SecretSource, String> {
        let file = file.map(|f| self.path(f));
        SecretSource::from_pair(env, file.as_ref(), what)
    }
}

/// Parse a delivery URL with a real URL parser and refuse what must never be a destination:
/// userinfo (`user@host` tricks), fragments, no host.
pub fn check_url(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry user:password@ (credentials belong in auth)".into());
    }
    if url.host().is_none() {
        return Err(format!("'{s}' has no host"));
    }
    if url.fragment().is_some() {
        return Err("must not have a #fragment".into());
    }
    Ok(url)
}

pub(super) fn check_token_url(out: &mut Issues, key: &str, s: &str) {
    match check_url(s) {
        Err(e) => out.push(format!("{key}.token_url"), e),
        Ok(u) if u.scheme() != "https" => out.push(format!("{key}.token_url"), "scheme must be https"),
        // The HTTP API destination doc allows at most one query parameter in the token URL.
        Ok(u) if u.query_pairs().count() > 1 => out.push(
            format!("{key}.token_url"),
            "at most one query parameter is allowed",
        ),
        Ok(_) => {}
    }
}
