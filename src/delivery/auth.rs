//! Authentication toward receivers: none, a static bearer token, or OAuth2 (RFC 6749) client
//! credentials (§4.4) or password grant (§4.3) with refresh (§6). Tokens are cached per
//! dataflow, refreshed ahead of `expires_in`, fetched once however many deliveries wait for
//! them (the fetch holds the cache lock), and replaced after a 401. Token requests go through
//! the same delivery core (TLS verification, egress), without the mTLS-only rule: token
//! endpoints are usually not mTLS receivers.
//!
//! Must never: log or return a token or secret (errors carry the status and the OAuth2
//! `error` code only), or send client credentials anywhere but the configured token URL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{DeliveryClient, DeliveryError, ErrorKind, OutboundRequest};
use crate::config::{CredentialsIn, Secret};

/// How a dataflow authenticates.
#[derive(Debug, Default)]
pub enum Authenticator {
    #[default]
    None,
    Bearer(Secret),
    OAuth2(Box<OAuth2>),
}

/// The OAuth2 grant used to get a token.
#[derive(Debug)]
pub enum Grant {
    ClientCredentials,
    Password { username: String, password: Secret },
}

/// An OAuth2 client for one dataflow.
#[derive(Debug)]
pub struct OAuth2 {
    token_url: url::Url,
    client_id: String,
    client_secret: Secret,
    scope: Option<String>,
    credentials_in: CredentialsIn,
    grant: Grant,
    /// The client for the token endpoint (trust and egress of the dataflow, no mTLS-only rule).
    http: DeliveryClient,
    state: Mutex<TokenState>,
    requests: AtomicU64,
}

#[derive(Default)]
struct TokenState {
    access: Option<Secret>,
    refresh: Option<Secret>,
    /// When to fetch a new token (ahead of expiry).
    renew_at: Option<Instant>,
}

impl std::fmt::Debug for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenState")
            .field("has_access", &self.access.is_some())
            .field("has_refresh", &self.refresh.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    /// Seconds, as a number or a numeric string (both are seen in the wild); anything else,
    /// negative or huge is clamped by [`lifetime`].
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
}

/// The longest lifetime a token is trusted for before it is fetched again: servers say
/// "never" with values near `i64::MAX`, which overflow a clock.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The shortest: a token said to expire at once is still used for the request it was fetched for.
const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Largest token response read; a token endpoint that sends more is refused.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// The lifetime `expires_in` stands for, clamped to [`MIN_LIFETIME`, `MAX_LIFETIME`].
fn lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = match expires_in {
        None => return DEFAULT_LIFETIME,
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match secs {
        Some(s) if s.is_finite() => {
            Duration::from_secs_f64(s.clamp(MIN_LIFETIME.as_secs_f64(), MAX_LIFETIME.as_secs_f64()))
        }
        _ => DEFAULT_LIFETIME,
    }
}

#[derive(Deserialize)]
struct TokenError {
    error: Option<String>,
}

/// Lifetime assumed when the server gives no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

impl OAuth2 {
    pub(crate) fn new(
        token_url: url::Url,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
        credentials_in: CredentialsIn,
        grant: Grant,
        http: DeliveryClient,
    ) -> Self {
        OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
            credentials_in,
            grant,
            http,
            state: Mutex::new(TokenState::default()),
            requests: AtomicU64::new(0),
        }
    }

    /// Token requests made so far.
    pub fn token_requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A valid access token: cached, refreshed, or newly granted — one fetch at a time.
    async fn token(&self) -> Result<Secret, DeliveryError> {
        let mut st = self.state.lock().await;
        if let (Some(a), Some(at)) = (&st.access, st.renew_at) {
            if Instant::now() < at {
                return Ok(a.clone());
            }
        }
        if let (Grant::Password { .. }, Some(refresh)) = (&self.grant, st.refresh.clone()) {
            match self
                .fetch(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.expose()),
                ])
                .await
            {
                Ok(t) => return Ok(Self::store(&mut st, t)),
                Err(e) => tracing::warn!(kind = %e.kind(), "token refresh failed; requesting a new token"),
            }
        }
        let t = match &self.grant {
            Grant::ClientCredentials => self.fetch(&[("grant_type", "client_credentials")]).await?,
            Grant::Password { username, password } => {
                self.fetch(&[
                    ("grant_type", "password"),
                    ("username", username),
                    ("password", password.expose()),
                ])
                .await?
            }
        };
        Ok(Self::store(&mut st, t))
    }

    fn store(st: &mut TokenState, t: TokenResponse) -> Secret {
        let lifetime = lifetime(t.expires_in.as_ref());
        // Renew at 90% of the lifetime, and at least 5 s before expiry.
        let ahead = (lifetime / 10).max(Duration::from_secs(5)).min(lifetime);
        st.renew_at = Some(Instant::now() + lifetime - ahead);
        let access = Secret::new(t.access_token);
        st.access = Some(access.clone());
        if let Some(r) = t.refresh_token {
            st.refresh = Some(Secret::new(r));
        }
        access
    }

    /// Forget `used` after the receiver refused it (a newer token is kept).
    async fn invalidate(&self, used: &Secret) {
        let mut st = self.state.lock().await;
        if st.access.as_ref() == Some(used) {
            st.access = None;
            st.renew_at = None;
        }
    }

    /// The token request for `grant`, with the client credentials where configured.
    fn token_request(&self, grant: &[(&str, &str)]) -> Result<OutboundRequest, DeliveryError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.extend_pairs(grant);
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
        match self.credentials_in {
            CredentialsIn::Body => {
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_secret", self.client_secret.expose());
            }
            CredentialsIn::Basic => {
                // RFC 6749 §2.3.1: form-encode both parts before joining them.
                let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&self.client_id), enc(self.client_secret.expose()));
                let mut v = HeaderValue::from_str(&format!("Basic {}", B64.encode(pair))).map_err(|_| {
                    DeliveryError::new(
                        ErrorKind::InvalidRequest,
                        "client credentials are not header-safe",
                    )
                })?;
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        Ok(OutboundRequest {
            method: Method::POST,
            url: self.token_url.clone(),
            headers,
            body: form.finish().into_bytes().into(),
        })
    }

    async fn fetch(&self, grant: &[(&str, &str)]) -> Result<TokenResponse, DeliveryError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = self.token_request(grant)?;
        let d = self.http.send_unauthenticated(req).await.map_err(|e| {
            DeliveryError::new(
                ErrorKind::Auth,
                format!("token request to {} failed: {e}", self.host()),
            )
            .with_source(e)
        })?;
        if d.body.len() > MAX_TOKEN_RESPONSE {
            return Err(DeliveryError::new(
                ErrorKind::Auth,
                format!(
                    "the token endpoint {} sent {} bytes; at most {MAX_TOKEN_RESPONSE} are read",
                    self.host(),
                    d.body.len()
                ),
            ));
        }
        if !d.status.is_success() {
            let code = serde_json::from_slice::<TokenError>(&d.body)
                .ok()
                .and_then(|e| e.error);
            return Err(DeliveryError::new(
                ErrorKind::Auth,
                format!(
                    "the token endpoint {} answered {}{}",
                    self.host(),
                    d.status,
                    code.map(|c| format!(" ({c})")).unwrap_or_default()
                ),
            ));
        }
        let t: TokenResponse = serde_json::from_slice(&d.body).map_err(|e| {
            DeliveryError::new(
                ErrorKind::Auth,
                format!("the token endpoint {} sent an unusable answer: {e}", self.host()),
            )
        })?;
        if t.token_type
            .as_deref()
            .is_some_and(|tt| !tt.eq_ignore_ascii_case("bearer"))
        {
            return Err(DeliveryError::new(
                ErrorKind::Auth,
                "the token endpoint issued a non-Bearer token",
            ));
        }
        Ok(t)
    }

    fn host(&self) -> String {
        self.token_url.host_str().unwrap_or("?").to_owned()
    }
}

/// Entry point for the token-response fuzz target: any body a token endpoint may send is
/// either refused or gives a lifetime within bounds, never a panic.
pub fn fuzz_entry(data: &[u8]) {
    if let Ok(t) = serde_json::from_slice::<TokenResponse>(data) {
        let l = lifetime(t.expires_in.as_ref());
        assert!(l >= MIN_LIFETIME && l <= MAX_LIFETIME.max(DEFAULT_LIFETIME));
        let mut st = TokenState::default();
        let _ = OAuth2::store(&mut st, t);
        assert!(st.renew_at.is_some());
    }
}

impl Authenticator {
    /// A destination's authenticator, with its secrets read now. Its token requests go out
    /// through a destination of their own made from `base`: the same trust, identity (when
    /// the token endpoint asks for one) and egress, without the mTLS-only rule or the
    /// destination's headers and query.
    pub(crate) fn from_config(
        d: &crate::config::DestinationConfig,
        base: &super::DestinationSettings,
    ) -> Result<Self, String> {
        use crate::config::AuthConfig;
        let read = |source: &crate::config::SecretSource, what: &str| {
            source.read().map_err(|e| format!("{}: auth.{what}: {e}", d.name))
        };
        let token_client = || {
            DeliveryClient::new(
                super::DestinationSettings {
                    name: format!("{}-token", d.name),
                    mtls: false,
                    headers: vec![],
                    query: vec![],
                    auth: Arc::default(),
                    ..base.clone()
                },
                super::retry::RetryPolicy::default(),
                None,
            )
        };
        Ok(match &d.auth {
            AuthConfig::None => Authenticator::None,
            AuthConfig::Bearer { token } => Authenticator::Bearer(read(token, "token")?),
            AuthConfig::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
                credentials_in,
                password,
            } => {
                let grant = match password {
                    None => Grant::ClientCredentials,
                    Some((username, password)) => Grant::Password {
                        username: username.clone(),
                        password: read(password, "password")?,
                    },
                };
                Authenticator::OAuth2(Box::new(OAuth2::new(
                    token_url.clone(),
                    client_id.clone(),
                    read(client_secret, "client_secret")?,
                    scope.clone(),
                    *credentials_in,
                    grant,
                    token_client(),
                )))
            }
        })
    }

    /// The auth kind as audit records and metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Authenticator::None => "none",
            Authenticator::Bearer(_) => "bearer",
            Authenticator::OAuth2(o) => match o.grant {
                Grant::ClientCredentials => "oauth2_client_credentials",
                Grant::Password { .. } => "oauth2_password",
            },
        }
    }

    /// The credential to send now, if any.
    pub(crate) async fn credential(&self) -> Result<Option<Secret>, DeliveryError> {
        match self {
            Authenticator::None => Ok(None),
            Authenticator::Bearer(t) => Ok(Some(t.clone())),
            Authenticator::OAuth2(o) => o.token().await.map(Some),
        }
    }

    /// After a 401 with `used`: drop it; true when a fresh one may succeed.
    pub(crate) async fn refused(&self, used: &Secret) -> bool {
        match self {
            Authenticator::OAuth2(o) => {
                o.invalidate(used).await;
                true
            }
            _ => false,
        }
    }
}

/// The `Authorization` header for a bearer credential, marked sensitive (never printed by
/// http's Debug).
pub(crate) fn bearer_header(token: &Secret) -> Result<HeaderValue, DeliveryError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| DeliveryError::new(ErrorKind::Auth, "the access token is not header-safe"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Shared handle.
pub type SharedAuth = Arc<Authenticator>;
