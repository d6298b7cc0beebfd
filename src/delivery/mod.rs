//! The delivery core: one pooled hyper client per destination profile (trust, client
//! identity, mTLS rule), so a connection made with one identity is never reused for another.
//!
//! Built in one place: a [`Core`] (the process's identities and egress policy) turns each
//! [`DestinationConfig`] — a dataflow, a sidecar route, the forward proxy, the alert webhook,
//! `send`, `verify` — into a [`DeliveryClient`]. Senders that go one request at a time (an
//! export courier, a sidecar app connection) hold a [`Session`] and send through it; every
//! other request goes through the destination's pool. Every outbound TCP connection of the
//! program is made by [`connector::connect_tcp`]: policy checked on every resolved address,
//! source address pinned, connect to the checked address only.
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

use retry::RetryPolicy;

pub use connector::{connect_tcp, PeerInfo};
pub use error::{Blame, DeliveryError, ErrorKind, FailureClass};

use connector::Connector;

use crate::config::DestinationConfig;
use crate::egress::Egress;
use crate::tls::creds::Identities;
use crate::tls::ClientTlsConfig;

/// Boxed error used by bodies and hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type the client takes.
pub type Body = BoxBody<Bytes, BoxError>;

/// The default request timeout (the HTTP API destination doc's 2 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of a receiver's response body is read; more is an error.
pub const MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// The delivery core of one process: its client identities (watched for renewal) and its
/// egress policy. Every destination is made from it by [`Core::destination`].
#[derive(Clone, Debug)]
pub struct Core {
    identities: Arc<Identities>,
    egress: Arc<Egress>,
    /// CA bundle files named by destinations, watched with the identities.
    trusts: Arc<crate::tls::trust::TrustFiles>,
}

impl Core {
    /// The identities and egress policy of a validated config.
    pub fn from_config(cfg: &crate::config::Config) -> Result<Core, String> {
        Ok(Core::new(
            Arc::new(Identities::from_config(cfg)?),
            Arc::new(Egress::from_config(&cfg.egress)?),
        ))
    }

    pub fn new(identities: Arc<Identities>, egress: Arc<Egress>) -> Core {
        Core {
            identities,
            egress,
            trusts: Arc::default(),
        }
    }

    pub fn identities(&self) -> &Arc<Identities> {
        &self.identities
    }

    pub fn egress(&self) -> &Arc<Egress> {
        &self.egress
    }

    /// The one constructor of a destination: its trust, the identity it presents (the one in
    /// force when each connection starts), mTLS rule, timeout, headers, query, auth (secrets
    /// read now), signing and retry policy.
    pub fn destination(&self, d: &DestinationConfig) -> Result<DeliveryClient, String> {
        // A bundle file is watched (reloaded when it changes, shared by the destinations that
        // name it); inline PEM and the webpki roots are fixed.
        let trust = match (&d.ca_pem, &d.ca) {
            (None, Some(path)) => self
                .trusts
                .get(path)
                .map(crate::tls::Trust::Watched)
                .map_err(|e| format!("{}: {e}", d.name))?,
            _ => d.trust().map_err(|e| format!("{}: {e}", d.name))?,
        };
        let mut tls =
            ClientTlsConfig::new(trust, None, crate::tls::client::ALPN_H2_H1).map_err(|e| e.to_string())?;
        if let Some(store) = self.identities.get(d.identity.as_deref()) {
            tls = tls.with_identity_store(store.clone());
        } else if let Some(name) = &d.identity {
            return Err(format!("{}: identity '{name}' is not configured", d.name));
        }
        let base = DestinationSettings {
            name: d.name.clone(),
            tls,
            mtls: d.mtls,
            timeout: d.timeout,
            headers: d.headers.clone(),
            query: d.query.clone(),
            auth: Arc::default(),
            egress: self.egress.clone(),
        };
        let auth = Arc::new(auth::Authenticator::from_config(d, &base)?);
        let signer = match &d.signing {
            Some(source) => Some(
                signing::WebhookSigner::from_secret(
                    source
                        .read()
                        .map_err(|e| format!("{}: signing_secret: {e}", d.name))?
                        .expose(),
                )
                .map_err(|e| format!("{}: signing_secret: {e}", d.name))?,
            ),
            None => None,
        };
        Ok(DeliveryClient::new(
            DestinationSettings { auth, ..base },
            d.retry.clone(),
            signer,
        ))
    }

    /// Reload every identity and every destination's CA bundle file when it changes (polled
    /// each `every`) or on SIGHUP, until aborted. One watcher per process: every destination
    /// presents and trusts what it loads; a broken file is refused and the old one kept.
    pub async fn watch(self, every: Duration) {
        crate::tls::creds::watch_files(every, |forced| {
            self.identities.reload_all(forced);
            self.trusts.reload_all(forced);
        })
        .await
    }
}

/// How to reach one destination, as the core made it.
#[derive(Debug, Clone)]
pub(crate) struct DestinationSettings {
    /// Name for logs and audit (the dataflow name, or `send`).
    pub(crate) name: String,
    pub(crate) tls: ClientTlsConfig,
    /// Refuse receivers that do not request a client certificate.
    pub(crate) mtls: bool,
    /// Connect + request + response body, all within this.
    pub(crate) timeout: Duration,
    /// Custom headers added to every request (validated by config).
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// Query parameters appended to every request URL.
    pub(crate) query: Vec<(String, String)>,
    /// How requests authenticate (none by default).
    pub(crate) auth: auth::SharedAuth,
    /// Where connections may go and come from (deny-all by default).
    pub(crate) egress: Arc<Egress>,
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
        Some(DeliveryError::for_status(self.status, &self.headers, &self.body))
    }
}

impl DeliveryError {
    /// A receiver's non-2xx answer as a failed delivery: its status, its `Retry-After`, and a
    /// hint when the body says our client certificate was refused.
    pub fn for_status(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> DeliveryError {
        let mut msg = format!("the receiver answered {status}");
        if let Some(hint) = refusal_hint(status, body) {
            msg.push_str(&format!(" ({hint})"));
        }
        let retry_after = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
        DeliveryError::new(ErrorKind::HttpStatus, msg)
            .with_status(status.as_u16())
            .with_retry_after(retry_after)
    }
}

/// nginx (and proxies in front of it) refuse a missing or foreign client certificate with an
/// HTTP 400 after a completed handshake, not a TLS alert. Name that, since it otherwise looks
/// like an ordinary bad request.
fn refusal_hint(status: StatusCode, body: &[u8]) -> Option<&'static str> {
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
enum Via<'a> {
    /// The destination's shared pool.
    Pool,
    /// The sending task's own lane to the destination, when it can have one (see [`lane`]).
    Lane(&'a lane::Lanes),
}

/// The connections of one sender that sends one request at a time — an export courier, a
/// sidecar app connection: a connection of its own per destination (a lane), driven in the
/// sender's own task by [`Session::run`]. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct Session {
    lanes: Arc<lane::Lanes>,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    pub fn new() -> Session {
        Session {
            lanes: lane::Lanes::new(),
        }
    }

    /// Run `work` — which sends through this session — and every connection it opens, in
    /// this task, until `work` ends. Then the session's idle connections are parked with
    /// their destinations for other sessions to take. Until it runs, a session's requests go
    /// through the destinations' pools.
    pub async fn run<F: std::future::Future>(&self, work: F) -> F::Output {
        lane::drive(work, &self.lanes).await
    }

    fn via(&self) -> Via<'_> {
        if self.lanes.running() {
            Via::Lane(&self.lanes)
        } else {
            Via::Pool
        }
    }

    /// [`DeliveryClient::send`], over this session's connection to `to`.
    pub async fn send(&self, to: &DeliveryClient, req: OutboundRequest) -> Result<Delivered, DeliveryError> {
        to.send_via(self.via(), req).await
    }

    /// [`DeliveryClient::send_streaming`], over this session's connection to `to`.
    pub async fn send_streaming(
        &self,
        to: &DeliveryClient,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, DeliveryError> {
        to.send_streaming_via(self.via(), method, url, headers, body)
            .await
    }
}

/// A pooled client for one destination profile.
#[derive(Clone)]
pub struct DeliveryClient {
    /// The pool, tagged with the identity generation it was made for: connections made with
    /// one identity are never reused for another.
    http: Arc<std::sync::RwLock<(u64, Client<Connector, Body>)>>,
    connector: Connector,
    settings: Arc<DestinationSettings>,
    /// Idle connections of sessions that ended, for the next ones (see [`lane`]).
    parked: Arc<lane::Parked>,
    retry: RetryPolicy,
    signer: Option<Arc<signing::WebhookSigner>>,
}

impl std::fmt::Debug for DeliveryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryClient")
            .field("settings", &self.settings)
            .finish()
    }
}

impl DeliveryClient {
    fn new(
        settings: DestinationSettings,
        retry: RetryPolicy,
        signer: Option<signing::WebhookSigner>,
    ) -> Self {
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
            parked: Arc::default(),
            retry,
            signer: signer.map(Arc::new),
        }
    }

    /// The destination's name in logs and audit records.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The kind of authentication its requests carry (`none`, `bearer`, …), for audit records.
    pub fn auth_kind(&self) -> &'static str {
        self.settings.auth.kind()
    }

    /// Whether requests carry credentials of the gateway's own (the app's must not pass).
    pub fn authenticates(&self) -> bool {
        !matches!(*self.settings.auth, auth::Authenticator::None)
    }

    /// OAuth2 token requests made so far, when the destination uses OAuth2.
    pub fn token_requests(&self) -> Option<u64> {
        match &*self.settings.auth {
            auth::Authenticator::OAuth2(o) => Some(o.token_requests()),
            _ => None,
        }
    }

    /// Connect + request + response (the response head, when the body streams).
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// When a failed request is tried again.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The Standard Webhooks signer, when requests are signed.
    pub fn signer(&self) -> Option<&signing::WebhookSigner> {
        self.signer.as_deref()
    }

    /// Send one request and read the answer, all within the destination's timeout.
    /// Any HTTP answer is `Ok`; see [`Delivered::error`] for the delivery verdict.
    pub async fn send(&self, req: OutboundRequest) -> Result<Delivered, DeliveryError> {
        self.send_via(Via::Pool, req).await
    }

    /// [`send`](Self::send), over the connection `via` names.
    async fn send_via(&self, via: Via<'_>, req: OutboundRequest) -> Result<Delivered, DeliveryError> {
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
    pub(crate) async fn send_unauthenticated(
        &self,
        req: OutboundRequest,
    ) -> Result<Delivered, DeliveryError> {
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
            Via::Lane(lanes) if lanes.available(&self.parked) => {
                lanes.send(&self.parked, self, request).await
            }
            _ => self
                .pool()
                .request(request)
                .await
                .map_err(|e| self.send_error(Box::new(e))),
        }
    }

    /// Send a request whose body streams, and return the answer with its body still
    /// streaming (the sidecar), over the destination's pool. The timeout covers connecting
    /// and the response head; the body then flows at the pace of both ends. No 401 retry: a
    /// stream cannot be sent twice.
    pub async fn send_streaming(
        &self,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, DeliveryError> {
        self.send_streaming_via(Via::Pool, method, url, headers, body)
            .await
    }

    async fn send_streaming_via(
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
    /// `url` as a request to it is sent: with the destination's configured query appended.
    pub fn append_query(&self, url: &mut url::Url) {
        if !self.settings.query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in &self.settings.query {
                q.append_pair(k, v);
            }
        }
    }

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
        self.append_query(&mut url);
        let uri: Uri = url
            .as_str()
            .parse()
            // Named without its query: the configured query may carry a secret.
            .map_err(|e| {
                let at = format!("{}{}", url.origin().ascii_serialization(), url.path());
                DeliveryError::new(ErrorKind::InvalidUrl, format!("{at}: {e}"))
            })?;
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
        Via::Lane(lanes) => lanes.within(limit, exchange).await,
        Via::Pool => tokio::time::timeout(limit, exchange).await.ok(),
    }
}

/// `work`'s output, or what it panicked with: a bug in one attempt must not end the task that
/// runs many (an export courier holds a leased row, and would die with it after every lease).
pub async fn catch_panic<F: std::future::Future>(work: F) -> Result<F::Output, String> {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::task::Poll;
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        },
    )
    .await
}

/// The text a panic carried, when it is text.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// `host:port` of a delivery URL, as audit records name the destination.
pub fn destination(url: &url::Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(443)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_inside_an_attempt_comes_back_as_its_message() {
        let ok = catch_panic(async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let failed = catch_panic(async {
            tokio::task::yield_now().await;
            if ok.is_ok() {
                panic!("a limit the attempt relied on");
            }
            0
        })
        .await;
        assert_eq!(failed, Err("a limit the attempt relied on".to_owned()));
    }
}
