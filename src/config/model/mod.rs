//! The config model, root and shared parts; each section's types live in a file of their own.
//!
//! Every field's default is stated in its doc comment and set in one place (the `default_*`
//! functions next to its type). `config/sallyport.toml` documents each key and is parsed by a
//! test.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod alerts;
mod dataflow;
mod egress;
mod events;
mod identity;
mod listeners;
mod secrets;
mod sidecar;
mod store;
mod telemetry;

pub use alerts::{AlertsConfig, AuditConfig};
pub use dataflow::{
    Aggregation, AggregationKey, AttributeMapping, Auth, Breaker, BreakerSettings, CredentialsIn, Dataflow,
    HealthSettings, RateLimit, SecretFields, Segment,
};
pub use egress::EgressConfig;
pub use events::{default_cert_days as default_event_cert_days, EventsConfig};
pub use identity::{IdentityConfig, PkiConfig, SpiffeSourceConfig};
pub use listeners::{limit_errors, AdminConfig, PublicConfig};
pub use secrets::SecretConfig;
pub use sidecar::{SidecarConfig, SidecarListener, SidecarRoute};
pub use store::StoreConfig;
pub use telemetry::TelemetryConfig;

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
    /// The operational events webhook (paused/resumed dataflows, dead letters, certificates
    /// expiring or rotated). Default: none (events are logged only).
    pub events: Option<EventsConfig>,
    /// Named client identities for dataflows that present their own certificate (a
    /// receiver's own CA, one identity per receiver). Same keys as `[identity]`.
    #[serde(default)]
    pub identities: std::collections::BTreeMap<String, IdentityConfig>,
    #[serde(default)]
    pub pki: PkiConfig,
    /// Secrets by name, for auth and signing settings to refer to (`token_ref = "NAME"`).
    /// API-defined dataflows may use only these. Default: none.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, SecretConfig>,
    /// The localhost sidecar (`sallyport sidecar`). Default: none.
    pub sidecar: Option<SidecarConfig>,
    /// OpenTelemetry traces over OTLP/HTTP. Default: off.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub dataflows: Vec<Dataflow>,
    /// The segment catalog.
    #[serde(default)]
    pub segments: Vec<Segment>,
    /// Directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_true() -> bool {
    true
}
fn default_timeout() -> String {
    "2s".into()
}
