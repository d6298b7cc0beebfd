//! The delivery core: one pooled hyper client per destination profile (trust, client
//! identity, mTLS rule), so a connection made with one identity is never reused for another.
//! Every outbound request of Sallyport — exports, sidecar, `send`, OAuth2 token fetches — goes
//! through [`DeliveryClient::send`].
//!
//! Must never: send to a receiver that failed the mTLS-only check, follow a redirect, read an
//! unbounded response body, or log a request body.

pub mod auth;
pub mod connector;
pub mod error;
pub(crate) mod lane;
pub mod retry;
pub mod signing;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use connector::{Connector, PeerInfo};
pub use error::{Blame, DeliveryError, ErrorKind};

use crate::tls::ClientTlsConfig;

/// Boxed error used by bodies and hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type the client takes.
pub type Body = BoxBody<Bytes, BoxError>;

/// The default request timeout (the HTTP API destination doc's 2 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of a receiver's response body is read; more is an error.
pub const MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// How to reach one destination.
#[derive(Debug, Clone)]
pub struct DestinationSettings {
    /// Name for logs and audit (the dataflow name, or `send`).
    pub name: String,
    pub tls: ClientTlsConfig,
    /// Refuse receivers that do not request a client certificate.
    pub mtls: bool,
    /// Connect + request + response body, all within this.
    pub timeout: Duration,
    /// Custom headers added to every request (validated by config).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Query parameters appended to every request URL.
    pub query: Vec<(String, String)>,
    /// How requests authenticate (none by default).
    pub auth: auth::SharedAuth,
    /// Where connections may go and come from (deny-all by default).
    pub egress: Arc<crate::egress::Egress>,
}

impl DestinationSettings {
    /// Settings with the defaults: mTLS-only, 2 s timeout, no extra headers or query.
    pub fn new(name: impl Into<String>, tls: ClientTlsConfig) -> Self {
        DestinationSettings {
            name: name.into(),
            tls,
            mtls: true,
            timeout: DEFAULT_TIMEOUT,
            headers: vec![],
            query: vec![],
            auth: Arc::default(),
            egress: Arc::new(crate::egress::Egress::deny_all()),
        }
    }
}

/// One request to deliver.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub method: Method,
    pub url: url::Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A receiver's answer (any status) and how it was reached.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub latency: Duration,
    pub peer: Option<Arc<PeerInfo>>,
}

impl Delivered {
    /// A non-2xx answer is a failed delivery; redirects are not followed and count as failed.
    pub fn error(&self) -> Option<DeliveryError> {
        if self.status.is_success() {
            return None;
        }
        let mut msg = format!("the receiver answered {}", self.status);
        if let Some(hint) = refusal_hint(self.status, &self.body) {
            msg.push_str(&format!(" ({hint})"));
        }
        let retry_after = self
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
        Some(
            DeliveryError::new(ErrorKind::HttpStatus, msg)
                .with_status(self.status.as_u16())
                .with_retry_after(retry_after),
        )
    }
}

/// nginx (and proxies in front of it) refuse a missing or foreign client certificate with an
/// HTTP 400 after a completed handshake, not a TLS alert. Name that, since it otherwise looks
/// like an ordinary bad request.
fn refusal_hint(status: StatusCode, body: &Bytes) -> Option<&'static str> {
    if status != StatusCode::BAD_REQUEST {
        return None;
    }
    let text = std::str::from_utf8(body.get(..body.len().min(4096))?).ok()?;
    if text.contains("No required SSL certificate was sent") {
        Some("the receiver says no client certificate reached it")
    } else if text.contains("The SSL certificate error") {
        Some("the receiver rejected our client certificate")
    } else {
        None
    }
}

/// Which connection a request goes over.
#[derive(Clone, Copy)]
pub(crate) enum Via<'a> {
    /// The destination's shared pool.
    Pool,
    /// The sending task's own lane to the destination, when it can have one (see [`lane`]).
    Lane(&'a lane::Lanes, &'a Arc<lane::Parked>),
}

/// A pooled client for one destination profile.
#[derive(Clone)]
pub struct DeliveryClient {
    /// The pool, tagged with the identity generation it was made for: connections made with
    /// one identity are never reused for another.
    http: Arc<std::sync::RwLock<(u64, Client<Connector, Body>)>>,
    connector: Connector,
    settings: Arc<DestinationSettings>,
}

impl std::fmt::Debug for DeliveryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryClient")
            .field("settings", &self.settings)
            .finish()
    }
}

impl DeliveryClient {
    pub fn new(settings: DestinationSettings) -> Self {
        let connector = Connector::new(
            settings.tls.clone(),
            settings.mtls,
            settings.timeout,
            settings.egress.clone(),
        );
        let http = Self::pool_for(connector.clone());
        let generation = settings.tls.identity_generation();
        DeliveryClient {
            http: Arc::new(std::sync::RwLock::new((generation, http))),
            connector,
            settings: Arc::new(settings),
        }
    }

    pub fn settings(&self) -> &DestinationSettings {
        &self.settings
    }

    /// Send one request and read the answer, all within the destination's timeout.
    /// Any HTTP answer is `Ok`; see [`Delivered::error`] for the delivery verdict.
    pub async fn send(&self, req: OutboundRequest) -> Result<Delivered, DeliveryError> {
        self.send_via(Via::Pool, req).await
    }

    /// [`send`](Self::send), over the connection `via` names.
    pub(crate) async fn send_via(
        &self,
        via: Via<'_>,
        req: OutboundRequest,
    ) -> Result<Delivered, DeliveryError> {
        let auth = &self.settings.auth;
        let credential = auth.credential().await?;
        let first = self.send_once(via, req.clone(), credential.as_ref()).await?;
        // A 401 with an OAuth2 token: the token was revoked or expired early. Once, with a
        // fresh one.
        if first.status == http::StatusCode::UNAUTHORIZED {
            if let Some(used) = &credential {
                if auth.refused(used).await {
                    let fresh = auth.credential().await?;
                    return self.send_once(via, req, fresh.as_ref()).await;
                }
            }
        }
        Ok(first)
    }

    /// Send without this destination's auth (the token endpoint's own requests).
    pub async fn send_unauthenticated(&self, req: OutboundRequest) -> Result<Delivered, DeliveryError> {
        self.send_once(Via::Pool, req, None).await
    }

    async fn send_once(
        &self,
        via: Via<'_>,
        req: OutboundRequest,
        credential: Option<&crate::config::Secret>,
    ) -> Result<Delivered, DeliveryError> {
        let started = Instant::now();
        let timeout = self.settings.timeout;
        let mut request = self.build(req)?;
        if let Some(c) = credential {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, auth::bearer_header(c)?);
        }
        let fut = async {
            let res = self.request(via, request).await?;
            let (parts, body) = res.into_parts();
            let peer = parts.extensions.get::<Arc<PeerInfo>>().cloned();
            let body = Limited::new(body, MAX_RESPONSE_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        DeliveryError::new(
                            ErrorKind::ResponseTooLarge,
                            format!("the response body is larger than {MAX_RESPONSE_BODY} bytes"),
                        )
                    } else {
                        DeliveryError::classify(e, "reading the response")
                    }
                })?
                .to_bytes();
            Ok(Delivered {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
                latency: started.elapsed(),
                peer,
            })
        };
        let fut = std::pin::pin!(fut);
        within(via, timeout, fut).await.ok_or_else(|| {
            DeliveryError::new(
                ErrorKind::Timeout,
                format!("no complete answer within {timeout:?}"),
            )
        })?
    }

    /// The pool for the identity in force now; a new, empty one after a reload or rotation
    /// (requests in flight finish on the old one).
    fn pool(&self) -> Client<Connector, Body> {
        let generation = self.settings.tls.identity_generation();
        if let Ok(p) = self.http.read() {
            if p.0 == generation {
                return p.1.clone();
            }
        }
        let mut p = self.http.write().unwrap_or_else(|e| e.into_inner());
        if p.0 != generation {
            *p = (generation, Self::pool_for(self.connector.clone()));
        }
        p.1.clone()
    }

    fn pool_for(connector: Connector) -> Client<Connector, Body> {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector)
    }

    /// A failure without a typed cause that follows a TLS alert from this destination is
    /// that alert: the receiver refused our client credentials after the handshake.
    fn explain(&self, e: DeliveryError) -> DeliveryError {
        if !matches!(e.kind(), ErrorKind::Protocol | ErrorKind::TlsHandshake) {
            return e;
        }
        match self.connector.alerts().recent(self.settings.timeout) {
            Some(alert) => DeliveryError::new(
                ErrorKind::ClientCertRejected,
                format!(
                    "the receiver refused our client certificate (TLS alert {alert:?} after the handshake)"
                ),
            )
            .with_source(e),
            None => e,
        }
    }

    fn build(&self, req: OutboundRequest) -> Result<Request<Body>, DeliveryError> {
        let body: Body = Full::new(req.body).map_err(|never| match never {}).boxed();
        self.build_with(req.method, req.url, req.headers, body)
    }

    /// Exchange `request` over the connection `via` names, up to the response head. A lane
    /// that cannot be had now (the destination has its most open already) gives way to the
    /// pool.
    async fn request(
        &self,
        via: Via<'_>,
        request: Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, DeliveryError> {
        match via {
            Via::Lane(lanes, parked) if lanes.available(parked) => lanes.send(parked, self, request).await,
            _ => self
                .pool()
                .request(request)
                .await
                .map_err(|e| self.send_error(Box::new(e))),
        }
    }

    /// Send a request whose body streams, and return the answer with its body still
    /// streaming (the sidecar), over the connection `via` names. The timeout covers
    /// connecting and the response head; the body then flows at the pace of both ends. No 401
    /// retry: a stream cannot be sent twice.
    pub(crate) async fn send_streaming(
        &self,
        via: Via<'_>,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, DeliveryError> {
        let credential = self.settings.auth.credential().await?;
        let mut request = self.build_with(method, url, headers, body)?;
        if let Some(c) = &credential {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, auth::bearer_header(c)?);
        }
        let timeout = self.settings.timeout;
        within(via, timeout, std::pin::pin!(self.request(via, request)))
            .await
            .ok_or_else(|| DeliveryError::new(ErrorKind::Timeout, format!("no answer within {timeout:?}")))?
    }

    /// The connector this destination's connections are made with: the same egress policy,
    /// source address, trust, identity and mTLS-only check as the pool's.
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Changes when the client identity is reloaded or rotated: a connection made under an
    /// earlier generation must not carry another request.
    pub(crate) fn identity_generation(&self) -> u64 {
        self.settings.tls.identity_generation()
    }

    /// A failed exchange as the delivery error it stands for (a TLS alert that explains it
    /// included).
    pub(crate) fn send_error(&self, e: BoxError) -> DeliveryError {
        self.explain(DeliveryError::classify(e, "sending the request"))
    }

    fn build_with(
        &self,
        method: Method,
        url: url::Url,
        req_headers: HeaderMap,
        body: Body,
    ) -> Result<Request<Body>, DeliveryError> {
        let mut url = url;
        if url.scheme() != "https" {
            return Err(DeliveryError::new(
                ErrorKind::InvalidUrl,
                format!("{url}: only https URLs are delivered to"),
            ));
        }
        if !self.settings.query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in &self.settings.query {
                q.append_pair(k, v);
            }
        }
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|e| DeliveryError::new(ErrorKind::InvalidUrl, format!("{url}: {e}")))?;
        let mut builder = Request::builder().method(method).uri(uri);
        let headers = builder
            .headers_mut()
            .ok_or_else(|| DeliveryError::new(ErrorKind::InvalidRequest, "the request could not be built"))?;
        if self.settings.headers.is_empty() {
            *headers = req_headers;
        } else {
            for (name, value) in &self.settings.headers {
                headers.append(name.clone(), value.clone());
            }
            // Per-request headers win over configured ones of the same name.
            for name in req_headers.keys() {
                headers.remove(name);
            }
            headers.extend(req_headers);
        }
        builder
            .body(body)
            .map_err(|e| DeliveryError::new(ErrorKind::InvalidRequest, e.to_string()))
    }
}

/// `exchange`, or `None` once `limit` has passed: on the timer the lane's task shares among
/// its exchanges (see [`lane::Lanes::within`]), or on one of its own.
async fn within<F: std::future::Future>(
    via: Via<'_>,
    limit: Duration,
    exchange: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    match via {
        Via::Lane(lanes, _) => lanes.within(limit, exchange).await,
        Via::Pool => tokio::time::timeout(limit, exchange).await.ok(),
    }
}

/// `host:port` of a delivery URL, as audit records name the destination.
pub fn destination(url: &url::Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(443)
    )
}

/// Build the destination settings of a configured dataflow: its trust (or `ca_override`),
/// the gateway identity, mTLS rule, timeout, headers and query.
pub fn settings_for_dataflow(
    cfg: &crate::config::Config,
    df: &crate::config::Dataflow,
    ca_override: Option<&std::path::Path>,
) -> Result<DestinationSettings, String> {
    settings_for_dataflow_with(cfg, df, ca_override, None)
}

/// As [`settings_for_dataflow`], presenting the identity `creds` has in force (rotation and
/// hot reload) instead of the files as they are now.
pub fn settings_for_dataflow_with(
    cfg: &crate::config::Config,
    df: &crate::config::Dataflow,
    ca_override: Option<&std::path::Path>,
    creds: Option<&Arc<crate::tls::creds::IdentityStore>>,
) -> Result<DestinationSettings, String> {
    let identity = match (creds, cfg.identity_for(df)) {
        (Some(c), _) => Some(c.presented()),
        (None, Some(id)) => Some(
            crate::tls::Identity::load(&cfg.path(&id.cert), &cfg.path(&id.key))
                .map_err(|e| format!("identity: {e}"))?,
        ),
        (None, None) => None,
    };
    let ca = ca_override
        .map(ToOwned::to_owned)
        .or_else(|| df.ca.as_ref().map(|c| cfg.path(c)));
    let trust = crate::tls::Trust::from_optional_file(ca.as_deref()).map_err(|e| e.to_string())?;
    let mut tls = ClientTlsConfig::new(trust, identity.as_ref(), crate::tls::client::ALPN_H2_H1)
        .map_err(|e| e.to_string())?;
    if let Some(c) = creds {
        tls = tls.with_identity_store(c.clone());
    }
    let headers = df
        .parsed_headers()
        .map_err(|e| format!("dataflow {}: headers: {e}", df.name))?;
    let query = df
        .parsed_query()
        .map_err(|e| format!("dataflow {}: query: {e}", df.name))?;
    let egress = Arc::new(crate::egress::Egress::from_config(&cfg.egress)?);
    let auth = Arc::new(authenticator(cfg, df, &tls, &egress)?);
    Ok(DestinationSettings {
        mtls: df.mtls,
        timeout: df.timeout(),
        headers,
        query,
        auth,
        egress,
        ..DestinationSettings::new(df.name.clone(), tls)
    })
}

/// The dataflow's authenticator, with its secrets read now.
fn authenticator(
    cfg: &crate::config::Config,
    df: &crate::config::Dataflow,
    tls: &ClientTlsConfig,
    egress: &Arc<crate::egress::Egress>,
) -> Result<auth::Authenticator, String> {
    use crate::config::Auth;
    let secret = |env: &Option<String>, file: &Option<std::path::PathBuf>, what: &str| {
        cfg.secret_source(env.as_ref(), file.as_ref(), what)
            .and_then(|s| s.read())
            .map_err(|e| format!("dataflow {}: auth.{what}: {e}", df.name))
    };
    let token_client = || {
        // The token endpoint: same trust and egress, our certificate if it asks, no mTLS-only rule.
        DeliveryClient::new(DestinationSettings {
            mtls: false,
            timeout: df.timeout(),
            egress: egress.clone(),
            ..DestinationSettings::new(format!("{}-token", df.name), tls.clone())
        })
    };
    let url = |u: &str| url::Url::parse(u).map_err(|e| format!("dataflow {}: auth.token_url: {e}", df.name));
    Ok(match &df.auth {
        Auth::None => auth::Authenticator::None,
        Auth::Bearer {
            token_env,
            token_file,
        } => auth::Authenticator::Bearer(secret(token_env, token_file, "token")?),
        Auth::OAuth2ClientCredentials {
            token_url,
            client_id,
            client_secret_env,
            client_secret_file,
            scope,
            credentials_in,
        } => auth::Authenticator::OAuth2(Box::new(auth::OAuth2::new(
            url(token_url)?,
            client_id.clone(),
            secret(client_secret_env, client_secret_file, "client_secret")?,
            scope.clone(),
            *credentials_in,
            auth::Grant::ClientCredentials,
            token_client(),
        ))),
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
        } => auth::Authenticator::OAuth2(Box::new(auth::OAuth2::new(
            url(token_url)?,
            client_id.clone(),
            secret(client_secret_env, client_secret_file, "client_secret")?,
            scope.clone(),
            *credentials_in,
            auth::Grant::Password {
                username: username.clone(),
                password: secret(password_env, password_file, "password")?,
            },
            token_client(),
        ))),
    })
}
