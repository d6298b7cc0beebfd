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
}

impl Dataflow {
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
