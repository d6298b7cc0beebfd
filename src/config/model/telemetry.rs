//! `[telemetry]`: OpenTelemetry traces exported over OTLP/HTTP (protobuf). Off unless
//! `otlp_endpoint` is set.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// Where spans go. Without `otlp_endpoint` no span is made and nothing is exported.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP traces URL, `http://…` or `https://…`, used as given
    /// (e.g. `"http://127.0.0.1:4318/v1/traces"`). Default: none (traces off).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource. Default `"sallyport"`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Headers sent with each export (e.g. a tenant id). Plain values: put credentials in
    /// `header_secrets`. Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers whose values are `[secrets]` names (e.g. `authorization = "otlp_token"`).
    /// Default: none.
    #[serde(default)]
    pub header_secrets: BTreeMap<String, String>,
    /// CA bundle for an `https://` collector. Default: webpki roots.
    pub ca: Option<PathBuf>,
    /// One export request, connect to response. Default `"10s"`; 100ms..60s.
    #[serde(default = "default_export_timeout")]
    pub timeout: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: default_service_name(),
            headers: BTreeMap::new(),
            header_secrets: BTreeMap::new(),
            ca: None,
            timeout: default_export_timeout(),
        }
    }
}

fn default_service_name() -> String {
    "sallyport".into()
}
fn default_export_timeout() -> String {
    "10s".into()
}
