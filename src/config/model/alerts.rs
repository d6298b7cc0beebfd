//! `[alerts]` (rules and their webhook) and `[audit]` (the audit log's HMAC key).

use std::path::PathBuf;

use serde::Deserialize;

use super::default_true;

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
fn default_interval() -> String {
    "30s".into()
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
