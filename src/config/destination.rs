//! One receiver, as the delivery core needs it: dataflows, sidecar routes, the forward proxy
//! and the alert webhook are each turned into a [`DestinationConfig`] by the one function
//! here, which also validates them (so `config check` and start-up can never disagree about
//! what a destination means). `delivery::Core::destination` turns it into a ready client.

use std::path::PathBuf;
use std::time::Duration;

use super::parse::{parse_duration, parse_headers, parse_query, HeaderSpec, QuerySpec};
use super::secret::SecretSource;
use super::validate::{check_url, Issues};
use super::{Auth, Config, Dataflow, Issue, SidecarRoute, RESERVED_HEADERS, TIMEOUT_BOUNDS};
use crate::delivery::retry::RetryPolicy;

/// How to reach one receiver: typed and checked, paths resolved against the config file.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Its name in logs and audit records (the dataflow's name, `sidecar:/prefix`, `alerts`).
    pub name: String,
    /// Where requests go; `None` for the forward proxy, whose app names the host per request.
    pub endpoint: Option<url::Url>,
    /// Refuse receivers that do not request a client certificate.
    pub mtls: bool,
    /// CA bundle that signs the receiver's certificate; `None`: the webpki roots.
    pub ca: Option<PathBuf>,
    /// Connect + request + response, all within this.
    pub timeout: Duration,
    /// Headers added to every request.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Query parameters appended to every request URL.
    pub query: Vec<(String, String)>,
    /// How requests authenticate, with secret files resolved.
    pub auth: Auth,
    /// The named identity presented; `None`: the gateway's `[identity]`.
    pub identity: Option<String>,
    /// Standard Webhooks signing secret, when requests are signed.
    pub signing: Option<SecretSource>,
    /// When a failed request is tried again.
    pub retry: RetryPolicy,
}

impl DestinationConfig {
    /// A destination with the defaults: mTLS-only, webpki roots, 2 s, no headers, query or
    /// auth, the default identity, unsigned, three attempts.
    pub fn new(name: impl Into<String>, endpoint: Option<url::Url>) -> Self {
        DestinationConfig {
            name: name.into(),
            endpoint,
            mtls: true,
            ca: None,
            timeout: crate::delivery::DEFAULT_TIMEOUT,
            headers: vec![],
            query: vec![],
            auth: Auth::None,
            identity: None,
            signing: None,
            retry: RetryPolicy::default(),
        }
    }
}

/// The fields a destination is written with in the config file, borrowed from whichever
/// table holds them.
pub(super) struct Written<'a> {
    pub endpoint: Option<&'a str>,
    pub mtls: bool,
    pub ca: Option<&'a PathBuf>,
    pub timeout: &'a str,
    pub headers: Option<&'a HeaderSpec>,
    pub query: Option<&'a QuerySpec>,
    pub auth: &'a Auth,
    pub identity: Option<&'a String>,
    pub signing_env: Option<&'a String>,
    pub signing_file: Option<&'a PathBuf>,
    pub max_attempts: u32,
    pub no_retry_on_4xx: bool,
}

impl<'a> Written<'a> {
    pub(super) fn dataflow(df: &'a Dataflow) -> Self {
        Written {
            endpoint: Some(&df.endpoint),
            mtls: df.mtls,
            ca: df.ca.as_ref(),
            timeout: &df.timeout,
            headers: df.headers.as_ref(),
            query: df.query.as_ref(),
            auth: &df.auth,
            identity: df.identity.as_ref(),
            signing_env: df.signing_secret_env.as_ref(),
            signing_file: df.signing_secret_file.as_ref(),
            max_attempts: df.max_attempts,
            no_retry_on_4xx: df.no_retry_on_4xx,
        }
    }

    /// A sidecar route: its `upstream` is the endpoint (for the forward proxy it is checked
    /// but not used). The sidecar retries by its own rules (`retries`), so one attempt here.
    pub(super) fn route(r: &'a SidecarRoute) -> Self {
        Written {
            endpoint: Some(&r.upstream),
            mtls: r.mtls,
            ca: r.ca.as_ref(),
            timeout: &r.timeout,
            headers: r.headers.as_ref(),
            query: r.query.as_ref(),
            auth: &r.auth,
            identity: r.identity.as_ref(),
            signing_env: None,
            signing_file: None,
            max_attempts: 1,
            no_retry_on_4xx: false,
        }
    }
}

impl Config {
    /// A configured dataflow as a destination.
    pub fn dataflow_destination(&self, df: &Dataflow) -> Result<DestinationConfig, String> {
        self.destination(&df.name, &Written::dataflow(df))
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
            timeout: &timeout,
            headers: None,
            query: None,
            auth: &Auth::None,
            identity: None,
            signing_env: None,
            signing_file: None,
            max_attempts: 1,
            no_retry_on_4xx: false,
        };
        Some(self.destination("alerts", &written))
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
        if let Some(ca) = w.ca {
            self.check_file(&mut out, "ca", ca);
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
        self.validate_auth(&mut out, "auth", w.auth);
        if !(1..=10).contains(&w.max_attempts) {
            out.push("max_attempts", format!("{} is outside 1..=10", w.max_attempts));
        }
        let signing = if w.signing_env.is_some() || w.signing_file.is_some() {
            let file = w.signing_file.map(|f| self.path(f));
            let source = SecretSource::from_pair(w.signing_env, file.as_ref(), "signing_secret");
            let checked = source
                .clone()
                .and_then(|s| s.read())
                .and_then(|s| crate::delivery::signing::WebhookSigner::from_secret(s.expose()).map(|_| ()));
            if let Err(e) = checked {
                out.push("signing_secret", e);
            }
            source.ok()
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
            ca: w.ca.map(|c| self.path(c)),
            timeout,
            headers,
            query,
            auth: self.resolved_auth(w.auth),
            identity: w.identity.cloned(),
            signing,
            retry: RetryPolicy {
                max_attempts: w.max_attempts,
                no_retry_on_4xx: w.no_retry_on_4xx,
                ..RetryPolicy::default()
            },
        })
    }

    /// `auth` with its secret files resolved against the config file's directory.
    fn resolved_auth(&self, auth: &Auth) -> Auth {
        let file = |f: &Option<PathBuf>| f.as_ref().map(|p| self.path(p));
        match auth.clone() {
            Auth::None => Auth::None,
            Auth::Bearer {
                token_env,
                token_file,
            } => Auth::Bearer {
                token_env,
                token_file: file(&token_file),
            },
            Auth::OAuth2ClientCredentials {
                token_url,
                client_id,
                client_secret_env,
                client_secret_file,
                scope,
                credentials_in,
            } => Auth::OAuth2ClientCredentials {
                token_url,
                client_id,
                client_secret_env,
                client_secret_file: file(&client_secret_file),
                scope,
                credentials_in,
            },
            Auth::OAuth2Password {
                token_url,
                client_id,
                client_secret_env,
                client_secret_file,
                username,
                password_env,
                password_file,
                scope,
                credentials_in,
            } => Auth::OAuth2Password {
                token_url,
                client_id,
                client_secret_env,
                client_secret_file: file(&client_secret_file),
                username,
                password_env,
                password_file: file(&password_file),
                scope,
                credentials_in,
            },
        }
    }
}

/// Issues keyed relative to a destination, as one message naming it.
fn joined(what: &str, issues: Vec<Issue>) -> String {
    let list: Vec<String> = issues.iter().map(Issue::to_string).collect();
    format!("{what}: {}", list.join("; "))
}
