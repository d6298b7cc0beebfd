//! `[[dataflows]]` (HTTP destinations, their mapping and auth) and the `[[segments]]` catalog.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{default_timeout, default_true};
use crate::config::parse::{parse_duration, HeaderSpec, QuerySpec};

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
    /// Standard Webhooks signing secret declared in `[secrets]`, by name.
    pub signing_secret_ref: Option<String>,
    /// The receiver's CA bundle as PEM text, instead of `ca` (for API-defined dataflows, which
    /// may name a file only inside `[admin] dataflow_ca_dir`). Default: none.
    pub ca_pem: Option<String>,
    /// Waits before each retry of a stored failure, e.g. `["1s", "10s", "1m", "10m", "1h"]`:
    /// a delivery is tried once plus once per entry (so not with `max_attempts`). Default: none
    /// (`max_attempts` with jittered backoff from 0.5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_schedule: Option<Vec<String>>,
    /// Requests per second to this receiver, with a burst. Default: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Deliveries in flight at once, at most (each over a connection of its own). Default 64;
    /// 1..=1024.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// When the dataflow pauses itself, and how it probes for recovery.
    #[serde(default)]
    pub breaker: Breaker,
    /// How profiles are combined into requests. Default `{ kind = "none" }`: one per request.
    #[serde(default, skip_serializing_if = "Aggregation::is_none")]
    pub aggregation: Aggregation,
    /// A minijinja (Jinja) template file that renders each request's body. Default: none (the
    /// HTTP API destination's JSON). API-defined dataflows give `template_inline` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PathBuf>,
    /// The template's text, instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_inline: Option<String>,
    /// The request's `Content-Type`. Default `application/json` (a template's output must then
    /// parse as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// How a dataflow combines profiles into requests, as the Destination SDK's aggregation
/// policies do.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    /// One profile per request.
    #[default]
    None,
    /// As many profiles as are due, up to `max_users_per_request` per request, sent at once.
    BestEffort {
        /// 1..=1000. Default 10.
        #[serde(default = "default_max_users")]
        max_users_per_request: u32,
        /// One identity per request: a profile with several identities is split. Default false.
        #[serde(default)]
        split_user_by_id: bool,
        /// Profiles in one request share this key. Default: none (any profiles together).
        #[serde(default)]
        aggregation_key: AggregationKey,
    },
    /// Batches that wait up to `max_batch_age` to fill to `max_events_in_batch`.
    Configurable {
        /// How long a batch may wait, e.g. `"30s"`, `"30m"` (1 s ..= 24 h).
        max_batch_age: String,
        /// 1..=10000.
        max_events_in_batch: u32,
        #[serde(default)]
        aggregation_key: AggregationKey,
    },
}

impl Aggregation {
    pub fn is_none(&self) -> bool {
        matches!(self, Aggregation::None)
    }
}

fn default_max_users() -> u32 {
    10
}

/// What the profiles of one request share (the Destination SDK's `aggregationKey`).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AggregationKey {
    /// One request per mapped segment. Default false.
    #[serde(default)]
    pub include_segment_id: bool,
    /// …and per segment status (`realized`, `exited`). Default false.
    #[serde(default)]
    pub include_segment_status: bool,
    /// Group by identity namespace. Default false.
    #[serde(default)]
    pub include_identity: bool,
    /// With `include_identity`: one identity namespace per request. Default false.
    #[serde(default)]
    pub one_identity_per_group: bool,
    /// With `include_identity`: namespaces that travel together, e.g. `[["IDFA", "GAID"],
    /// ["EMAIL"]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Vec<String>>,
}

/// A dataflow's request rate: `per_second`, with bursts of up to `burst` (default: one
/// second's worth).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: Option<u32>,
}

/// The circuit breaker: the dataflow pauses after `consecutive_failures` receiver-unavailable
/// failures in a row, or when they are `failure_ratio` of at least `min_attempts` attempts in
/// `window`; at once on a certificate or policy failure. Paused, it keeps queueing and sends one
/// probe delivery after `probe_interval`, doubling up to `max_probe_interval`; a probe that
/// succeeds resumes it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Breaker {
    /// Default `true`. Off, failures go through retries to dead letters as they come.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Default 3 (with the default three attempts, a receiver that is down pauses the
    /// dataflow before any delivery becomes a dead letter).
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// Default 0.5.
    #[serde(default = "default_ratio")]
    pub failure_ratio: f64,
    /// Default 20.
    #[serde(default = "default_min_attempts")]
    pub min_attempts: u32,
    /// Default `"30s"`.
    #[serde(default = "default_window")]
    pub window: String,
    /// Default `"1s"`.
    #[serde(default = "default_probe")]
    pub probe_interval: String,
    /// Default `"10s"`.
    #[serde(default = "default_max_probe")]
    pub max_probe_interval: String,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            enabled: true,
            consecutive_failures: default_consecutive(),
            failure_ratio: default_ratio(),
            min_attempts: default_min_attempts(),
            window: default_window(),
            probe_interval: default_probe(),
            max_probe_interval: default_max_probe(),
        }
    }
}

fn default_max_in_flight() -> usize {
    64
}
fn default_consecutive() -> u32 {
    3
}
fn default_ratio() -> f64 {
    0.5
}
fn default_min_attempts() -> u32 {
    20
}
fn default_window() -> String {
    "30s".into()
}
fn default_probe() -> String {
    "1s".into()
}
fn default_max_probe() -> String {
    "10s".into()
}

/// A dataflow's pacing and breaker settings, checked and parsed.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// (per second, burst).
    pub rate_limit: Option<(u32, u32)>,
    pub max_in_flight: usize,
    /// `None` when the breaker is off.
    pub breaker: Option<BreakerSettings>,
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub consecutive_failures: u32,
    pub failure_ratio: f64,
    pub min_attempts: u32,
    pub window: Duration,
    pub probe_interval: Duration,
    pub max_probe_interval: Duration,
}

impl Dataflow {
    /// Pacing and breaker settings, or every problem as (key under the dataflow, reason).
    pub fn health_settings(&self) -> Result<HealthSettings, Vec<(String, String)>> {
        let mut issues = Vec::new();
        let rate_limit = match &self.rate_limit {
            None => None,
            Some(r) => {
                let burst = r.burst.unwrap_or(r.per_second);
                if r.per_second == 0 || r.per_second > 1_000_000 {
                    issues.push((
                        "rate_limit.per_second".into(),
                        format!("{} is outside 1..=1000000", r.per_second),
                    ));
                }
                if burst == 0 || burst > 1_000_000 {
                    issues.push((
                        "rate_limit.burst".into(),
                        format!("{burst} is outside 1..=1000000"),
                    ));
                }
                Some((r.per_second.max(1), burst.max(1)))
            }
        };
        if !(1..=1024).contains(&self.max_in_flight) {
            issues.push((
                "max_in_flight".into(),
                format!("{} is outside 1..=1024", self.max_in_flight),
            ));
        }
        let b = &self.breaker;
        let mut duration = |key: &str, v: &str| match parse_duration(v) {
            Ok(d) if d >= Duration::from_millis(10) && d <= Duration::from_secs(24 * 3600) => d,
            Ok(_) => {
                issues.push((format!("breaker.{key}"), format!("'{v}' is outside 10ms..=24h")));
                Duration::from_secs(1)
            }
            Err(e) => {
                issues.push((format!("breaker.{key}"), e));
                Duration::from_secs(1)
            }
        };
        let settings = BreakerSettings {
            consecutive_failures: b.consecutive_failures,
            failure_ratio: b.failure_ratio,
            min_attempts: b.min_attempts,
            window: duration("window", &b.window),
            probe_interval: duration("probe_interval", &b.probe_interval),
            max_probe_interval: duration("max_probe_interval", &b.max_probe_interval),
        };
        if !(1..=10_000).contains(&b.consecutive_failures) {
            issues.push((
                "breaker.consecutive_failures".into(),
                format!("{} is outside 1..=10000", b.consecutive_failures),
            ));
        }
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            issues.push((
                "breaker.failure_ratio".into(),
                format!("{} is outside (0, 1]", b.failure_ratio),
            ));
        }
        if b.min_attempts == 0 {
            issues.push(("breaker.min_attempts".into(), "must be at least 1".into()));
        }
        if settings.max_probe_interval < settings.probe_interval {
            issues.push((
                "breaker.max_probe_interval".into(),
                "must not be shorter than probe_interval".into(),
            ));
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(HealthSettings {
            rate_limit,
            max_in_flight: self.max_in_flight,
            breaker: b.enabled.then_some(settings),
        })
    }

    /// The validated timeout (validation guarantees it parses).
    pub fn timeout(&self) -> Duration {
        parse_duration(&self.timeout).unwrap_or(crate::delivery::DEFAULT_TIMEOUT)
    }
}

fn default_max_attempts() -> u32 {
    3
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
        /// A secret declared in `[secrets]`, by name (the only form an API-defined dataflow
        /// may use).
        token_ref: Option<String>,
    },
    #[serde(rename = "oauth2_client_credentials")]
    OAuth2ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret_env: Option<String>,
        client_secret_file: Option<PathBuf>,
        client_secret_ref: Option<String>,
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
        client_secret_ref: Option<String>,
        username: String,
        password_env: Option<String>,
        password_file: Option<PathBuf>,
        password_ref: Option<String>,
        scope: Option<String>,
        #[serde(default)]
        credentials_in: CredentialsIn,
    },
}

/// Where one secret of an auth (or signing) setting is to be read from, as written: an
/// environment variable, a file, or a secret declared in `[secrets]` by name.
#[derive(Debug, Clone, Copy)]
pub struct SecretFields<'a> {
    /// The key's stem: `token`, `client_secret`, `password`, `signing_secret`.
    pub what: &'static str,
    pub env: Option<&'a String>,
    pub file: Option<&'a PathBuf>,
    pub named: Option<&'a String>,
}

impl Auth {
    /// Every secret this auth reads, in the order its keys are documented.
    pub fn secret_fields(&self) -> Vec<SecretFields<'_>> {
        fn f<'a>(
            what: &'static str,
            env: &'a Option<String>,
            file: &'a Option<PathBuf>,
            named: &'a Option<String>,
        ) -> SecretFields<'a> {
            SecretFields {
                what,
                env: env.as_ref(),
                file: file.as_ref(),
                named: named.as_ref(),
            }
        }
        match self {
            Auth::None => vec![],
            Auth::Bearer {
                token_env,
                token_file,
                token_ref,
            } => vec![f("token", token_env, token_file, token_ref)],
            Auth::OAuth2ClientCredentials {
                client_secret_env,
                client_secret_file,
                client_secret_ref,
                ..
            } => vec![f(
                "client_secret",
                client_secret_env,
                client_secret_file,
                client_secret_ref,
            )],
            Auth::OAuth2Password {
                client_secret_env,
                client_secret_file,
                client_secret_ref,
                password_env,
                password_file,
                password_ref,
                ..
            } => vec![
                f(
                    "client_secret",
                    client_secret_env,
                    client_secret_file,
                    client_secret_ref,
                ),
                f("password", password_env, password_file, password_ref),
            ],
        }
    }

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

fn default_merge_policy() -> String {
    "default".into()
}
