//! `[events]`: where operational events (a dataflow paused or resumed, a dead letter, a client
//! certificate expiring or rotated) are POSTed, signed with Standard Webhooks.

use std::path::PathBuf;

use serde::Deserialize;

use super::{default_timeout, default_true};

/// The operational events webhook. Without this table events are only logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// `https://…` receiving each event as JSON. Required.
    pub webhook: String,
    /// CA bundle for the webhook receiver. Default: webpki roots.
    pub ca: Option<PathBuf>,
    /// Refuse a webhook receiver that does not request a client certificate. Default `true`.
    #[serde(default = "default_true")]
    pub mtls: bool,
    /// Standard Webhooks secret (`whsec_…`): exactly one of `signing_secret_env`,
    /// `signing_secret_file` or `signing_secret_ref` (a `[secrets]` name) is required, so a
    /// receiver can always tell our events from forged ones.
    pub signing_secret_env: Option<String>,
    pub signing_secret_file: Option<PathBuf>,
    pub signing_secret_ref: Option<String>,
    /// Connect + request + response for one attempt. Default `"2s"`; 100ms..60s.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Attempts per event (a failed one is tried again with backoff). Default `4`; 1..=10.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Events waiting to be sent; when full, a new event is logged and not sent. Default
    /// `1024`; 1..=1000000.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Days before a client certificate expires at which `certificate.expiring` is sent (once
    /// per threshold and certificate). Default `[30, 7]`.
    #[serde(default = "default_cert_days")]
    pub cert_expiry_days: Vec<i64>,
}

impl EventsConfig {
    /// The signing secret's fields, as a destination reads them.
    pub fn signing_secret(&self) -> super::SecretFields<'_> {
        super::SecretFields {
            what: "signing_secret",
            env: self.signing_secret_env.as_ref(),
            file: self.signing_secret_file.as_ref(),
            named: self.signing_secret_ref.as_ref(),
        }
    }
}

fn default_max_attempts() -> u32 {
    4
}
fn default_queue() -> usize {
    1024
}
/// The `certificate.expiring` thresholds without an `[events]` table (events are then logged).
pub fn default_cert_days() -> Vec<i64> {
    vec![30, 7]
}
