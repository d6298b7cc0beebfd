//! One receiver, as the delivery core needs it: dataflows, sidecar routes, the forward proxy
//! and the alert and events webhooks are each turned into a [`DestinationConfig`] by the one
//! function here, which also validates them (so `config check` and start-up can never disagree about
//! what a destination means). `delivery::Core::destination` turns it into a ready client.

use std::path::PathBuf;
use std::time::Duration;

use super::parse::{parse_duration, parse_headers, parse_query, HeaderSpec, QuerySpec};
use super::secret::SecretSource;
use super::validate::{check_url, Issues};
use super::{
    Auth, Config, CredentialsIn, Dataflow, Issue, SecretFields, SidecarRoute, RESERVED_HEADERS,
    TIMEOUT_BOUNDS,
};

/// The signing secret of a destination that signs nothing.
const NO_SECRET: SecretFields<'static> = SecretFields {
    what: "signing_secret",
    env: None,
    file: None,
    named: None,
};
use crate::delivery::retry::RetryPolicy;

/// How to reach one receiver: typed and checked, paths resolved against the config file.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Its name in logs and audit records (the dataflow's name, `sidecar:/prefix`, `alerts`,
    /// `events`).
    pub name: String,
    /// Where requests go; `None` for the forward proxy, whose app names the host per request.
    pub endpoint: Option<url::Url>,
    /// Refuse receivers that do not request a client certificate.
    pub mtls: bool,
    /// CA bundle that signs the receiver's certificate; `None` (and no `ca_pem`): the
    /// webpki roots.
    pub ca: Option<PathBuf>,
    /// The CA bundle as PEM text (API-defined dataflows).
    pub ca_pem: Option<String>,
    /// Connect + request + response, all within this.
    pub timeout: Duration,
    /// Headers added to every request.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Query parameters appended to every request URL.
    pub query: Vec<(String, String)>,
    /// How requests authenticate, each secret's source resolved.
    pub auth: AuthConfig,
    /// The named identity presented; `None`: the gateway's `[identity]`.
    pub identity: Option<String>,
    /// Standard Webhooks signing secret, when requests are signed.
    pub signing: Option<SecretSource>,
    /// When a failed request is tried again.
    pub retry: RetryPolicy,
}

impl DestinationConfig {
    /// The receiver certificates this destination trusts: `ca_pem`, else the `ca` file, else
    /// the webpki roots.
    pub fn trust(&self) -> Result<crate::tls::Trust, crate::tls::TlsError> {
        match &self.ca_pem {
            Some(pem) => crate::tls::Trust::from_pem_text(pem, "ca_pem"),
            None => crate::tls::Trust::from_optional_file(self.ca.as_deref()),
        }
    }

    /// A destination with the defaults: mTLS-only, webpki roots, 2 s, no headers, query or
    /// auth, the default identity, unsigned, three attempts.
    pub fn new(name: impl Into<String>, endpoint: Option<url::Url>) -> Self {
        DestinationConfig {
            name: name.into(),
            endpoint,
            mtls: true,
            ca: None,
            ca_pem: None,
            timeout: crate::delivery::DEFAULT_TIMEOUT,
            headers: vec![],
            query: vec![],
            auth: AuthConfig::None,
            identity: None,
            signing: None,
            retry: RetryPolicy::default(),
        }
    }
}

/// How a destination's requests authenticate, each secret's source resolved (read when the
/// destination is made).
#[derive(Debug, Clone)]
pub enum AuthConfig {
    None,
    Bearer {
        token: SecretSource,
    },
    OAuth2 {
        token_url: url::Url,
        client_id: String,
        client_secret: SecretSource,
        scope: Option<String>,
        credentials_in: CredentialsIn,
        /// The password grant's user and password; `None`: client credentials.
        password: Option<(String, SecretSource)>,
    },
}

/// Where a destination was written: what it may read differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The config file: its author controls the host, so `_env` and `_file` secrets and any
    /// CA path are fine.
    ConfigFile,
    /// The admin API or a shared database: secrets only by `[secrets]` name, a CA file only
    /// inside `[admin] dataflow_ca_dir` (or inline PEM). Otherwise whoever holds the admin
    /// token, or can write to the database, could send any secret or file of the process to
    /// a receiver of their choosing.
    Stored,
}

/// The fields a destination is written with in the config file, borrowed from whichever
/// table holds them.
pub(super) struct Written<'a> {
    pub endpoint: Option<&'a str>,
    pub mtls: bool,
    pub ca: Option<&'a PathBuf>,
    pub ca_pem: Option<&'a String>,
    pub timeout: &'a str,
    pub headers: Option<&'a HeaderSpec>,
    pub query: Option<&'a QuerySpec>,
    pub auth: &'a Auth,
    pub identity: Option<&'a String>,
    pub signing: SecretFields<'a>,
    pub max_attempts: u32,
    pub no_retry_on_4xx: bool,
    pub retry_schedule: Option<&'a Vec<String>>,
    pub origin: Origin,
}

impl<'a> Written<'a> {
    pub(super) fn dataflow(df: &'a Dataflow, origin: Origin) -> Self {
        Written {
            endpoint: Some(&df.endpoint),
            mtls: df.mtls,
            ca: df.ca.as_ref(),
            ca_pem: df.ca_pem.as_ref(),
            timeout: &df.timeout,
            headers: df.headers.as_ref(),
            query: df.query.as_ref(),
            auth: &df.auth,
            identity: df.identity.as_ref(),
            signing: SecretFields {
                what: "signing_secret",
                env: df.signing_secret_env.as_ref(),
                file: df.signing_secret_file.as_ref(),
                named: df.signing_secret_ref.as_ref(),
            },
            max_attempts: df.max_attempts,
            no_retry_on_4xx: df.no_retry_on_4xx,
            retry_schedule: df.retry_schedule.as_ref(),
            origin,
        }
    }

    /// A sidecar route: its `upstream` is the endpoint (for the forward proxy it is checked
    /// but not used). The sidecar retries by its own rules (`retries`), so one attempt here.
    pub(super) fn route(r: &'a SidecarRoute) -> Self {
        Written {
            endpoint: Some(&r.upstream),
            mtls: r.mtls,
            ca: r.ca.as_ref(),
            ca_pem: None,
            timeout: &r.timeout,
            headers: r.headers.as_ref(),
            query: r.query.as_ref(),
            auth: &r.auth,
            identity: r.identity.as_ref(),
            signing: NO_SECRET,
            max_attempts: 1,
            no_retry_on_4xx: false,
            retry_schedule: None,
            origin: Origin::ConfigFile,
        }
    }
}

impl Config {
    /// A configured dataflow as a destination.
    pub fn dataflow_destination(&self, df: &Dataflow) -> Result<DestinationConfig, String> {
        self.destination(&df.name, &Written::dataflow(df, Origin::ConfigFile))
            .map_err(|issues| joined(&format!("dataflow {}", df.name), issues))
    }

    /// A sidecar route (or, with `forward`, a forward proxy) as a destination named `name`.
    pub fn route_destination(
        &self,
        name: &str,
        r: &SidecarRoute,
        forward: bool,
    ) -> Result<DestinationConfig, String> {
        let mut d = self
            .destination(name, &Written::route(r))
            .map_err(|issues| joined(name, issues))?;
        // The app waits for the answer: short waits between attempts (the sidecar retries
        // only connection failures, timeouts and 502/503/504).
        d.retry = RetryPolicy {
            max_attempts: 1 + r.retries,
            no_retry_on_4xx: true,
            base: Duration::from_millis(50),
            cap: Duration::from_secs(1),
            schedule: None,
        };
        if forward {
            d.endpoint = None;
        }
        Ok(d)
    }

    /// The alert webhook as a destination, when one is configured.
    pub fn alerts_destination(&self) -> Option<Result<DestinationConfig, String>> {
        self.alerts_destination_issues()
            .map(|r| r.map_err(|issues| joined("alerts", issues)))
    }

    pub(super) fn alerts_destination_issues(&self) -> Option<Result<DestinationConfig, Vec<Issue>>> {
        let a = &self.alerts;
        let w = a.webhook.as_ref()?;
        let timeout = "2s".to_owned();
        let written = Written {
            endpoint: Some(w),
            mtls: a.mtls,
            ca: a.ca.as_ref(),
            ca_pem: None,
            timeout: &timeout,
            headers: None,
            query: None,
            auth: &Auth::None,
            identity: None,
            signing: NO_SECRET,
            max_attempts: 1,
            no_retry_on_4xx: false,
            retry_schedule: None,
            origin: Origin::ConfigFile,
        };
        Some(self.destination("alerts", &written))
    }

    /// The operational events webhook as a destination, when `[events]` is configured. Its
    /// retry policy is the sender's: `max_attempts`, backoff from 500 ms, capped at 30 s.
    pub fn events_destination(&self) -> Option<Result<DestinationConfig, String>> {
        self.events_destination_issues()
            .map(|r| r.map_err(|issues| joined("events", issues)))
    }

    pub(super) fn events_destination_issues(&self) -> Option<Result<DestinationConfig, Vec<Issue>>> {
        let e = self.events.as_ref()?;
        let written = Written {
            endpoint: Some(&e.webhook),
            mtls: e.mtls,
            ca: e.ca.as_ref(),
            ca_pem: None,
            timeout: &e.timeout,
            headers: None,
            query: None,
            auth: &Auth::None,
            identity: None,
            signing: e.signing_secret(),
            max_attempts: e.max_attempts,
            no_retry_on_4xx: false,
            retry_schedule: None,
            origin: Origin::ConfigFile,
        };
        Some(self.destination("events", &written).map(|mut d| {
            d.retry.cap = Duration::from_secs(30);
            d
        }))
    }

    /// The one conversion from what the config file says to a [`DestinationConfig`]: every
    /// problem is reported, keyed relative to the destination's table (`endpoint`,
    /// `auth.token`, …).
    pub(super) fn destination(&self, name: &str, w: &Written<'_>) -> Result<DestinationConfig, Vec<Issue>> {
        let mut out = Issues(Vec::new());
        let endpoint = match w.endpoint.map(check_url) {
            None => None,
            Some(Err(reason)) => {
                out.push("endpoint", reason);
                None
            }
            Some(Ok(url)) if url.scheme() != "https" => {
                out.push(
                    "endpoint",
                    if w.mtls {
                        "scheme must be https when mtls = true"
                    } else {
                        "scheme must be https: Sallyport never sends profile data in clear text"
                    },
                );
                None
            }
            Some(Ok(url)) => Some(url),
        };
        if let Some(id) = w.identity {
            if !self.identities.contains_key(id) {
                out.push("identity", format!("'{id}' is not in [identities]"));
            }
        } else if w.mtls && self.identity.is_none() {
            out.push("mtls", "mtls = true needs an [identity] with cert and key");
        }
        let ca = match (w.ca, w.ca_pem, w.origin) {
            (Some(_), Some(_), _) => {
                out.push("ca", "set ca or ca_pem, not both");
                None
            }
            (Some(ca), None, Origin::ConfigFile) => {
                self.check_file(&mut out, "ca", ca);
                Some(self.path(ca))
            }
            (Some(ca), None, Origin::Stored) => self.stored_ca(ca).map_err(|e| out.push("ca", e)).ok(),
            (None, _, _) => None,
        };
        if let Some(pem) = w.ca_pem {
            if let Err(e) = crate::tls::Trust::from_pem_text(pem, "ca_pem") {
                out.push("ca_pem", e.to_string());
            }
        }
        let timeout = match parse_duration(w.timeout) {
            Err(e) => {
                out.push("timeout", e);
                crate::delivery::DEFAULT_TIMEOUT
            }
            Ok(d) if d < TIMEOUT_BOUNDS.0 || d > TIMEOUT_BOUNDS.1 => {
                out.push(
                    "timeout",
                    format!(
                        "{:?} is outside {:?}..={:?}",
                        d, TIMEOUT_BOUNDS.0, TIMEOUT_BOUNDS.1
                    ),
                );
                d
            }
            Ok(d) => d,
        };
        let mut reserved = RESERVED_HEADERS.to_vec();
        if !matches!(w.auth, Auth::None) {
            reserved.push("authorization");
        }
        let headers = w
            .headers
            .map_or(Ok(vec![]), |h| parse_headers(h, &reserved))
            .unwrap_or_else(|e| {
                out.push("headers", e);
                vec![]
            });
        let query = w.query.map_or(Ok(vec![]), parse_query).unwrap_or_else(|e| {
            out.push("query", e);
            vec![]
        });
        let auth = self.auth_config(&mut out, w.auth, w.origin);
        if !(1..=10).contains(&w.max_attempts) {
            out.push("max_attempts", format!("{} is outside 1..=10", w.max_attempts));
        }
        let schedule = w.retry_schedule.map(|steps| {
            if steps.is_empty() || steps.len() > 20 {
                out.push("retry_schedule", "give 1 to 20 waits, like [\"1s\", \"10s\", \"1m\"]");
            }
            if w.max_attempts != 3 {
                out.push(
                    "retry_schedule",
                    "give max_attempts or retry_schedule, not both (a schedule tries once plus once per wait)",
                );
            }
            let parsed: Vec<Duration> = steps
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match parse_duration(s) {
                    Ok(d) if d <= Duration::from_secs(7 * 24 * 3600) => Some(d),
                    Ok(_) => {
                        out.push(format!("retry_schedule[{i}]"), format!("'{s}' is longer than 7 days"));
                        None
                    }
                    Err(e) => {
                        out.push(format!("retry_schedule[{i}]"), e);
                        None
                    }
                })
                .collect();
            std::sync::Arc::<[Duration]>::from(parsed)
        });
        let signing = if w.signing.env.is_some() || w.signing.file.is_some() || w.signing.named.is_some() {
            match self.secret(&w.signing, w.origin) {
                Ok(source) => {
                    let checked = source.read().and_then(|s| {
                        crate::delivery::signing::WebhookSigner::from_secret(s.expose()).map(|_| ())
                    });
                    if let Err(e) = checked {
                        out.push("signing_secret", e);
                    }
                    Some(source)
                }
                Err(e) => {
                    out.push("signing_secret", e);
                    None
                }
            }
        } else {
            None
        };
        if !out.0.is_empty() {
            return Err(out.0);
        }
        Ok(DestinationConfig {
            name: name.to_owned(),
            endpoint,
            mtls: w.mtls,
            ca,
            ca_pem: w.ca_pem.cloned(),
            timeout,
            headers,
            query,
            auth: auth.unwrap_or(AuthConfig::None),
            identity: w.identity.cloned(),
            signing,
            retry: RetryPolicy {
                max_attempts: schedule.as_ref().map_or(w.max_attempts, |s| s.len() as u32 + 1),
                no_retry_on_4xx: w.no_retry_on_4xx,
                schedule,
                ..RetryPolicy::default()
            },
        })
    }

    /// `auth` checked (token URL, client id, user name, each secret readable now) and resolved;
    /// `None` when it has problems (they are in `out`).
    fn auth_config(&self, out: &mut Issues, auth: &Auth, origin: Origin) -> Option<AuthConfig> {
        let before = out.0.len();
        let mut sources = Vec::new();
        for fields in auth.secret_fields() {
            match self
                .secret(&fields, origin)
                .and_then(|src| src.read().map(|_| src))
            {
                Ok(src) => sources.push(src),
                Err(e) => out.push(format!("auth.{}", fields.what), e),
            }
        }
        let token_url = |out: &mut Issues, u: &str| match check_url(u) {
            Err(e) => {
                out.push("auth.token_url", e);
                None
            }
            Ok(u) if u.scheme() != "https" => {
                out.push("auth.token_url", "scheme must be https");
                None
            }
            // The HTTP API destination doc allows at most one query parameter in the token URL.
            Ok(u) if u.query_pairs().count() > 1 => {
                out.push("auth.token_url", "at most one query parameter is allowed");
                None
            }
            Ok(u) => Some(u),
        };
        let nonempty = |out: &mut Issues, key: &str, v: &str| {
            if v.is_empty() {
                out.push(format!("auth.{key}"), "must not be empty");
            }
        };
        let config = match auth {
            Auth::None => Some(AuthConfig::None),
            Auth::Bearer { .. } => sources.pop().map(|token| AuthConfig::Bearer { token }),
            Auth::OAuth2ClientCredentials {
                token_url: url,
                client_id,
                scope,
                credentials_in,
                ..
            } => {
                let url = token_url(out, url);
                nonempty(out, "client_id", client_id);
                match (url, sources.pop()) {
                    (Some(token_url), Some(client_secret)) => Some(AuthConfig::OAuth2 {
                        token_url,
                        client_id: client_id.clone(),
                        client_secret,
                        scope: scope.clone(),
                        credentials_in: *credentials_in,
                        password: None,
                    }),
                    _ => None,
                }
            }
            Auth::OAuth2Password {
                token_url: url,
                client_id,
                username,
                scope,
                credentials_in,
                ..
            } => {
                let url = token_url(out, url);
                nonempty(out, "client_id", client_id);
                nonempty(out, "username", username);
                let password = sources.pop();
                match (url, sources.pop(), password) {
                    (Some(token_url), Some(client_secret), Some(password)) => Some(AuthConfig::OAuth2 {
                        token_url,
                        client_id: client_id.clone(),
                        client_secret,
                        scope: scope.clone(),
                        credentials_in: *credentials_in,
                        password: Some((username.clone(), password)),
                    }),
                    _ => None,
                }
            }
        };
        config.filter(|_| out.0.len() == before)
    }

    /// Where one secret is read from: exactly one of `_env`, `_file` and `_ref` (a name in
    /// `[secrets]`); only `_ref` for a destination from the admin API or the database.
    pub(super) fn secret(&self, f: &SecretFields<'_>, origin: Origin) -> Result<SecretSource, String> {
        let what = f.what;
        match (f.env, f.file, f.named) {
            (None, None, Some(name)) => {
                let declared = self
                    .secrets
                    .get(name)
                    .ok_or_else(|| format!("{what}_ref '{name}' is not declared in [secrets]"))?;
                self.secret_source(declared.env.as_ref(), declared.file.as_ref(), "secret")
                    .map_err(|e| format!("[secrets.{name}]: {e}"))
            }
            (None, None, None) if origin == Origin::Stored => {
                Err(format!("{what}_ref (a secret declared in [secrets]) is required"))
            }
            (_, _, _) if origin == Origin::Stored && (f.env.is_some() || f.file.is_some()) => Err(format!(
                "a dataflow defined through the admin API names its secrets from [secrets] only: \
                 use {what}_ref, not {what}_env or {what}_file"
            )),
            (env, file, None) => self.secret_source(env, file, what),
            _ => Err(format!("set only one of {what}_env, {what}_file and {what}_ref")),
        }
    }

    /// An API-defined dataflow's CA file: a plain relative name inside `[admin]
    /// dataflow_ca_dir`, that stays inside it once symbolic links are followed.
    fn stored_ca(&self, ca: &std::path::Path) -> Result<PathBuf, String> {
        let dir = self.admin.dataflow_ca_dir.as_ref().ok_or(
            "a dataflow defined through the admin API may name a CA file only when [admin] dataflow_ca_dir is set; \
             give the bundle inline as ca_pem instead",
        )?;
        let plain = ca
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(format!(
                "'{}' must be a file name inside [admin] dataflow_ca_dir (no absolute path, no ..)",
                ca.display()
            ));
        }
        let dir = self
            .path(dir)
            .canonicalize()
            .map_err(|e| format!("[admin] dataflow_ca_dir: {e}"))?;
        let file = dir
            .join(ca)
            .canonicalize()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        if !file.starts_with(&dir) || !file.is_file() {
            return Err(format!(
                "'{}' is not a file inside [admin] dataflow_ca_dir",
                ca.display()
            ));
        }
        Ok(file)
    }
}

/// Issues keyed relative to a destination, as one message naming it.
fn joined(what: &str, issues: Vec<Issue>) -> String {
    let list: Vec<String> = issues.iter().map(Issue::to_string).collect();
    format!("{what}: {}", list.join("; "))
}
