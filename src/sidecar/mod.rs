//! The sidecar: an app on the same host speaks plain HTTP to a loopback listener; each
//! request is carried out through the delivery core (mTLS-only, egress policy, route auth,
//! pinned source addresses) and audited. Request and response bodies stream both ways; the
//! request body is bounded by `max_body_bytes`.
//!
//! Must never: listen beyond loopback unless configured to, pass the app's `Authorization`
//! on when the route authenticates itself, forward hop-by-hop headers, or buffer a body.

pub mod path;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use std::borrow::Cow;

use crate::audit::{AuditRecord, Outcome};
use crate::config::Config;
use crate::delivery::retry::{jitter, Verdict};
use crate::delivery::{Body, BoxError, Core, DeliveryClient, DeliveryError, ErrorKind, PeerInfo, Session};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// A route's attempts so far, and how many failed (no answer, or a 5xx), for the status page.
#[derive(Debug, Default)]
pub struct RouteCounts {
    pub attempts: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
}

/// Every route's counts in this process, by its audit name (`sidecar:/prefix`,
/// `sidecar[n]:/prefix`): the status page reads them when the sidecar runs beside `serve`.
static ROUTE_COUNTS: std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<RouteCounts>>>,
> = std::sync::OnceLock::new();

fn counts_for(name: &str) -> Arc<RouteCounts> {
    let mut all = ROUTE_COUNTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    all.entry(name.to_owned()).or_default().clone()
}

/// (attempts, failed) of the route named `name` in audit records, if it runs in this process.
pub fn route_counts(name: &str) -> Option<(u64, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let all = ROUTE_COUNTS.get()?.lock().unwrap_or_else(|p| p.into_inner());
    all.get(name)
        .map(|c| (c.attempts.load(Relaxed), c.failed.load(Relaxed)))
}

struct Route {
    prefix: String,
    counts: Arc<RouteCounts>,
    upstream: url::Url,
    /// `upstream`'s path without its trailing `/`: what the rest of a request's path joins.
    base_path: String,
    /// `host:port` of `upstream`, as audit records name it.
    destination: Arc<str>,
    client: DeliveryClient,
    /// The route's name in audit records.
    name: Arc<str>,
    retry_non_idempotent: bool,
    retry_buffer: usize,
}

impl Route {
    /// Retries after the first attempt.
    fn retries(&self) -> u32 {
        self.client.retry().max_attempts.saturating_sub(1)
    }
}

/// Methods a retry cannot make happen twice in effect (RFC 9110 §9.2.2).
fn idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

/// An answer worth another attempt: the upstream's own gateway trouble. Any other answer is
/// the app's to see.
fn retry_status(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// How long to wait before the next attempt, when `result` deserves one: the route's
/// [`RetryPolicy`](crate::delivery::retry::RetryPolicy) decides, honouring `Retry-After`. A
/// wait longer than the route's timeout is not made (the app would be left waiting): the
/// answer goes back as it is.
fn retry_delay(
    route: &Route,
    attempt: u32,
    result: &Result<http::Response<Incoming>, DeliveryError>,
) -> Option<std::time::Duration> {
    let answered;
    let error = match result {
        Ok(res) if retry_status(res.status()) => {
            answered = DeliveryError::for_status(res.status(), res.headers(), &[]);
            &answered
        }
        Ok(_) => return None,
        Err(e) if e.retryable() => e,
        Err(_) => return None,
    };
    match route.client.retry().decide(attempt, error, jitter()) {
        Verdict::RetryAfter(d) if d <= route.client.timeout() => Some(d),
        _ => None,
    }
}

/// A configured sidecar, ready to serve.
pub struct Sidecar {
    routes: Vec<Route>,
    /// Forward-proxy mode's client, when enabled.
    forward: Option<Route>,
    max_body: usize,
    x_forwarded: bool,
    audit: mpsc::Sender<Attempt>,
}

type Reply = Response<Body>;

/// Build the sidecar from `[sidecar]`, with audit records written to the config's store.
/// Returns the main listener's sidecar and address.
pub async fn build(cfg: &Config, core: &Core) -> Result<(Arc<Sidecar>, SocketAddr), String> {
    let mut all = build_all(cfg, core, None).await?;
    let (listener, sidecar) = all.remove(0);
    let listen = listener.listen.ok_or("the sidecar has no listen address")?;
    Ok((sidecar, listen))
}

/// Every listener's sidecar (`[sidecar]` first, then `[[sidecar.listeners]]`), sharing one
/// audit writer thread. `store`: the store the process already has open (under `serve`,
/// the engine's), which the audit records go to unless `[sidecar] audit_file` is set. A
/// second handle on the same store would keep a chain head of its own and collide with the
/// engine's appends.
async fn build_all(
    cfg: &Config,
    core: &Core,
    store: Option<Arc<dyn crate::store::Store>>,
) -> Result<Vec<(crate::config::SidecarListener, Arc<Sidecar>)>, String> {
    let sc = cfg
        .sidecar
        .as_ref()
        .ok_or("the config has no [sidecar] section")?;
    let sink = if let (Some(store), None) = (store, &sc.audit_file) {
        crate::audit::writer::Sink::Store(store)
    } else {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || crate::audit::writer::Sink::open_for_sidecar(&cfg))
            .await
            .map_err(|e| e.to_string())??
    };
    let (tx, rx) = mpsc::channel(4096);
    let mut out = Vec::new();
    for (n, (key, l)) in sc.all_listeners().into_iter().enumerate() {
        // Audit names: `sidecar:/prefix` on the main listener, `sidecar[n]:/prefix` on others.
        let label = if n == 0 {
            "sidecar".to_owned()
        } else {
            format!("sidecar[{}]", n - 1)
        };
        let mut routes = Vec::new();
        for (i, r) in l.routes.iter().enumerate() {
            routes.push(route(
                cfg,
                core,
                r,
                &format!("{key}.routes[{i}]"),
                format!("{label}:{}", r.prefix),
                false,
            )?);
        }
        let forward = match &l.forward_proxy {
            Some(f) => Some(route(
                cfg,
                core,
                f,
                &format!("{key}.forward_proxy"),
                format!("{label}:forward"),
                true,
            )?),
            None => None,
        };
        // Longest prefix first.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let sidecar = Arc::new(Sidecar {
            routes,
            forward,
            max_body: sc.max_body_bytes,
            x_forwarded: sc.x_forwarded,
            audit: tx.clone(),
        });
        out.push((l, sidecar));
    }
    crate::audit::writer::start(sink, rx)?;
    Ok(out)
}

/// One route's runtime, made by the delivery core like every other destination.
fn route(
    cfg: &Config,
    core: &Core,
    r: &crate::config::SidecarRoute,
    key: &str,
    name: String,
    forward: bool,
) -> Result<Route, String> {
    let destination = cfg
        .route_destination(&name, r, forward)
        .map_err(|e| format!("{key}: {e}"))?;
    let client = core
        .destination(&destination)
        .map_err(|e| format!("{key}: {e}"))?;
    let upstream = url::Url::parse(&r.upstream).map_err(|e| format!("{key}.upstream: {e}"))?;
    Ok(Route {
        prefix: r.prefix.clone(),
        counts: counts_for(&name),
        destination: crate::delivery::destination(&upstream).into(),
        base_path: upstream.path().trim_end_matches('/').to_owned(),
        upstream,
        client,
        name: name.into(),
        retry_non_idempotent: r.retry_non_idempotent,
        retry_buffer: r.retry_buffer_bytes,
    })
}

/// What the proxy hands the audit writer for one attempt: facts it already holds, shared
/// rather than copied. The writer thread (below the proxy's priority) writes the audit record
/// from it, so the proxying thread allocates nothing for the audit log.
struct Attempt {
    at: i64,
    route: Arc<str>,
    destination: Arc<str>,
    peer: Option<Arc<PeerInfo>>,
    attempt: u32,
    error: Option<ErrorKind>,
    status: Option<u16>,
    latency_ms: f64,
    auth: &'static str,
    /// The request span's trace id, when traces are on.
    trace_id: Option<Arc<str>>,
}

impl crate::audit::writer::Record for Attempt {
    /// The audit record this attempt makes, borrowing what it holds.
    fn as_record(&self) -> AuditRecord<'_> {
        let (resolved_ip, source_ip, peer_cert_sha256) = PeerInfo::audit_facts_ref(self.peer.as_deref());
        let text = |s: &'static str| Cow::Borrowed(s);
        AuditRecord {
            at: self.at,
            dataflow: Cow::Borrowed(&self.route),
            destination: Cow::Borrowed(&self.destination),
            resolved_ip: resolved_ip.map(Cow::Borrowed),
            source_ip: source_ip.map(Cow::Borrowed),
            profile_id: text(""),
            // Bodies stream through unread; their hash is not taken.
            payload_sha256: text(""),
            idempotency_key: text(""),
            attempt: self.attempt,
            outcome: if self.error.is_none() {
                Outcome::Proxied
            } else {
                Outcome::Failed
            },
            error_kind: self.error,
            http_status: self.status,
            latency_ms: self.latency_ms,
            peer_cert_sha256: peer_cert_sha256.map(Cow::Borrowed),
            auth: text(self.auth),
            trigger: None,
            trace_id: self.trace_id.as_deref().map(Cow::Borrowed),
        }
    }
}

/// Serve on `listener` until the task is aborted, with the default limits of `[sidecar]`.
pub async fn serve(sidecar: Arc<Sidecar>, listener: tokio::net::TcpListener) {
    serve_with_limits(sidecar, listener, crate::config::SidecarConfig::default_limits()).await;
}

/// Serve on `listener` until the task is aborted, holding connections within `limits`.
pub async fn serve_with_limits(
    sidecar: Arc<Sidecar>,
    listener: tokio::net::TcpListener,
    limits: crate::listener::Limits,
) {
    let stop = std::future::pending();
    crate::listener::serve("sidecar", listener, limits, stop, move |tcp, peer, conn| {
        // A response can leave in two writes (its head, then a body chunk that came later from
        // upstream). With Nagle's algorithm the second waits for the app's ACK of the first,
        // which the app's kernel delays (40 ms on Linux) while the response is incomplete.
        let _ = tcp.set_nodelay(true);
        serve_connection(sidecar.clone(), tcp, peer, conn)
    })
    .await;
}

/// Serve on a Unix socket until the task is aborted, holding connections within `limits`.
pub async fn serve_unix(
    sidecar: Arc<Sidecar>,
    listener: tokio::net::UnixListener,
    limits: crate::listener::Limits,
) {
    let stop = std::future::pending();
    crate::listener::serve("sidecar", listener, limits, stop, move |stream, _, conn| {
        serve_connection(sidecar.clone(), stream, None, conn)
    })
    .await;
}

/// Bind the sidecar's Unix socket, readable and writable by its owner only.
pub fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    // Replace a stale socket from an earlier run, never any other kind of file.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{}: exists and is not a socket", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Created under a 0077 umask, so the socket is never reachable by others, not even for
    // the moment between bind and chmod. The umask is the process's: this runs at start-up,
    // before anything else creates files. The chmod after is belt and braces.
    #[cfg(target_os = "linux")]
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let bound = tokio::net::UnixListener::bind(path);
    #[cfg(target_os = "linux")]
    rustix::process::umask(previous);
    let listener = bound.map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

async fn serve_connection<S>(
    sc: Arc<Sidecar>,
    stream: S,
    peer: Option<std::net::IpAddr>,
    conn: crate::listener::Conn,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let session = Session::new();
    let svc_session = session.clone();
    let tracker = conn.tracker();
    let svc_tracker = tracker.clone();
    let svc = service_fn(move |req| {
        let (sc, session) = (sc.clone(), svc_session.clone());
        let in_flight = svc_tracker.request(&req);
        async move { Ok::<_, Infallible>(in_flight.body(sc.handle(req, peer, &session).await)) }
    });
    let mut builder = crate::listener::http_builder();
    // A response head and its first body chunk go out with one `send`, not a `writev` of
    // both, which costs more (bench/RESULTS.md, "Socket writes").
    builder.http1().writev(false);
    // Boxed as `dyn Future + Send`: passed generically, rustc cannot prove the connection
    // future `Send` (its body-error bounds are higher-ranked).
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(builder.serve_connection(TokioIo::new(tracker.io(stream)), svc));
    // The watchdog inside the session: a connection it closes still parks its idle upstream
    // connections for other sessions.
    let _ = session.run(conn.run(server)).await;
}

fn json_error(status: StatusCode, kind: &str, message: &str) -> Reply {
    let body = crate::api::error_body(status, Some(kind), message);
    let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Remove hop-by-hop headers (and any the `Connection` header names), in place.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<&str> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .collect();
    // Names are found among the keys present (usually none), then removed by key.
    let doomed: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| {
            HOP_BY_HOP.contains(&k.as_str()) || named.iter().any(|n| n.eq_ignore_ascii_case(k.as_str()))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

impl Sidecar {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Option<std::net::IpAddr>,
        session: &Session,
    ) -> Reply {
        let started = Instant::now();
        let path = req.uri().path();
        // Absolute-form (`GET http://host/path`): forward-proxy mode, sent as https. Only an
        // HTTP/1 request target says that: HTTP/2 always fills `:authority`, and its requests
        // go by route like any other.
        let forward = match req.version() {
            http::Version::HTTP_09 | http::Version::HTTP_10 | http::Version::HTTP_11 => {
                req.uri().authority().map(|a| a.to_string())
            }
            _ => None,
        };
        let (route, url, forwarded) = match (forward, &self.forward) {
            (Some(authority), Some(fwd)) => {
                let target = format!(
                    "https://{authority}{}",
                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                );
                match crate::config::check_url(&target) {
                    Ok(u) => (fwd, u, true),
                    Err(e) => return json_error(StatusCode::BAD_REQUEST, "invalid_url", &e),
                }
            }
            (Some(_), None) => {
                return json_error(
                    StatusCode::FORBIDDEN,
                    "forward_proxy_off",
                    "forward-proxy mode is not enabled",
                )
            }
            (None, _) => {
                let Some((route, rest)) = self
                    .routes
                    .iter()
                    .find_map(|r| path::strip_prefix(path, &r.prefix).map(|rest| (r, rest)))
                else {
                    return json_error(
                        StatusCode::NOT_FOUND,
                        "no_route",
                        "no sidecar route matches this path",
                    );
                };
                let joined = match path::join(&route.base_path, rest) {
                    Ok(j) => j,
                    Err(e) => return json_error(StatusCode::BAD_REQUEST, e.kind(), e.message()),
                };
                let mut url = route.upstream.clone();
                url.set_path(&joined);
                url.set_query(req.uri().query());
                (route, url, false)
            }
        };
        // A lane (this app connection's own upstream connection) for one-at-a-time HTTP/1
        // requests to a route; forward-proxy requests name their host each time, and HTTP/2
        // streams run side by side, so those use the route's pool.
        let on_lane =
            !forwarded && req.version() <= http::Version::HTTP_11 && req.method() != http::Method::CONNECT;

        let destination: Arc<str> = if forwarded {
            crate::delivery::destination(&url).into()
        } else {
            route.destination.clone()
        };
        let (parts, body) = req.into_parts();
        // The request's span when traces are on: its URL without query values, never a header.
        let span = crate::telemetry::HttpSpan::client(
            "sallyport.route",
            &route.name,
            &route.client,
            &parts.method,
            &url,
        );
        let trace_id: Option<Arc<str>> = span.as_ref().map(|s| s.trace_id().into());
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(http::header::HOST);
        if route.client.authenticates() {
            headers.remove(http::header::AUTHORIZATION);
        }
        if self.x_forwarded {
            if let Some(ip) = peer {
                if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
                    headers.insert("x-forwarded-for", v);
                }
            }
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        let limit = self.max_body;
        // A request that may be retried keeps its (small) body to send again; any other
        // streams through once.
        let may_retry = route.retries() > 0 && (idempotent(&parts.method) || route.retry_non_idempotent);
        let keep = route.retry_buffer.min(limit);
        let small = hyper::body::Body::is_end_stream(&body)
            || hyper::body::Body::size_hint(&body)
                .exact()
                .is_some_and(|n| n <= keep as u64);
        let (mut streamed, replay) = if may_retry && small {
            match Limited::new(body, keep).collect().await {
                Ok(b) => (None, Some(b.to_bytes())),
                Err(e) => return json_error(StatusCode::BAD_REQUEST, "request_body", &e.to_string()),
            }
        } else {
            let b: Body = Limited::new(body, limit).map_err(|e| -> BoxError { e }).boxed();
            (Some(b), None)
        };
        let attempts = if replay.is_some() { 1 + route.retries() } else { 1 };
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let body = match (&replay, streamed.take()) {
                (Some(bytes), _) => Full::new(bytes.clone()).map_err(|never| match never {}).boxed(),
                (None, Some(b)) => b,
                (None, None) => unreachable_body(),
            };
            // The last attempt takes the headers; an earlier one sends a copy.
            let hdrs = if attempt < attempts {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            let (method, url) = (parts.method.clone(), url.clone());
            let result = if on_lane {
                session
                    .send_streaming(&route.client, method, url, hdrs, body)
                    .await
            } else {
                route.client.send_streaming(method, url, hdrs, body).await
            };
            let again = if attempt < attempts {
                retry_delay(route, attempt, &result)
            } else {
                None
            };
            self.audit_attempt(route, &destination, attempt, &result, started, trace_id.clone())
                .await;
            let Some(delay) = again else {
                break result;
            };
            drop(result);
            tokio::time::sleep(delay).await;
        };
        if let Some(span) = span {
            let (status, peer) = match &result {
                Ok(res) => (
                    Some(res.status().as_u16()),
                    res.extensions().get::<Arc<PeerInfo>>(),
                ),
                Err(e) => (e.status(), None),
            };
            span.end(crate::telemetry::HttpOutcome {
                resend_count: attempt - 1,
                status,
                peer: peer.map(|p| p.as_ref()),
                error: result.as_ref().err().map(DeliveryError::kind),
            });
        }
        match result {
            Ok(res) => {
                let (mut rparts, rbody) = res.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                let body: Body = rbody.map_err(|e| -> BoxError { Box::new(e) }).boxed();
                Response::from_parts(rparts, body)
            }
            Err(e) => self.error_reply(&e, forwarded),
        }
    }

    /// One audit record per attempt, as exports write them. When the writer falls behind, the
    /// request waits for room in its queue: a record is never dropped to keep the pace.
    async fn audit_attempt(
        &self,
        route: &Route,
        destination: &Arc<str>,
        attempt: u32,
        result: &Result<http::Response<Incoming>, DeliveryError>,
        started: Instant,
        trace_id: Option<Arc<str>>,
    ) {
        let (status, error, peer) = match result {
            Ok(res) => (
                Some(res.status().as_u16()),
                None,
                res.extensions().get::<Arc<PeerInfo>>().cloned(),
            ),
            Err(e) => (None, Some(e.kind()), None),
        };
        route
            .counts
            .attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if error.is_some() || status.is_some_and(|s| s >= 500) {
            route
                .counts
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let record = Attempt {
            at: crate::store::now_ms(),
            route: route.name.clone(),
            destination: destination.clone(),
            peer,
            attempt,
            error,
            status,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            auth: route.client.auth_kind(),
            trace_id,
        };
        let record = match self.audit.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(r)) => r,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("the sidecar audit writer has stopped; a record was not written");
                return;
            }
        };
        // Wait for room in a task of its own: an app that hangs up meanwhile cancels this
        // request, not its record.
        let tx = self.audit.clone();
        let queued = tokio::spawn(async move { tx.send(record).await.is_ok() }).await;
        if !matches!(queued, Ok(true)) {
            tracing::error!("the sidecar audit writer has stopped; a record was not written");
        }
    }

    /// The proxy's own errors: typed, in JSON, never the upstream's words.
    fn error_reply(&self, e: &DeliveryError, forwarded: bool) -> Reply {
        let status = match e.kind() {
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // In forward mode the app chose the host: a refused one is the app's 403.
            ErrorKind::EgressDenied if forwarded => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        };
        json_error(status, e.kind().as_str(), &e.to_string())
    }
}

/// A body for an attempt that cannot happen (a streamed body is sent once, and only once).
fn unreachable_body() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

/// Build the sidecar and start serving on every listener (TCP or Unix socket). Returns the
/// server tasks.
pub async fn start(cfg: &Config, core: &Core) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    start_with_store(cfg, core, None).await
}

/// [`start`] inside a process that has `store` open already (`serve`): audit records go
/// to it (unless `[sidecar] audit_file` is set), one chain head for both writers.
pub async fn start_with_store(
    cfg: &Config,
    core: &Core,
    store: Option<Arc<dyn crate::store::Store>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let all = build_all(cfg, core, store).await?;
    let limits = match cfg.sidecar.as_ref().map(crate::config::SidecarConfig::limits) {
        Some(Ok(limits)) => limits,
        Some(Err(e)) => return Err(crate::config::limit_errors("sidecar", e)),
        None => crate::config::SidecarConfig::default_limits(),
    };
    let mut tasks = Vec::new();
    for (l, sidecar) in all {
        let routes = sidecar.routes.len() + usize::from(sidecar.forward.is_some());
        if routes == 0 {
            // Only `[sidecar]` itself can be empty (when all routes live on other listeners):
            // a listener that could only answer 404 is not opened.
            continue;
        }
        let task = match (&l.unix_socket, l.listen) {
            (Some(path), _) => {
                let path = cfg.path(path);
                let listener = bind_unix(&path)?;
                eprintln!(
                    "sallyport: sidecar on unix:{} ({routes} route(s))",
                    path.display()
                );
                tokio::spawn(serve_unix(sidecar, listener, limits))
            }
            (None, Some(listen)) => {
                if !listen.ip().is_loopback() {
                    eprintln!("sallyport: WARNING: the sidecar listens on {listen}, beyond loopback: anything that reaches it can send through the gateway");
                }
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| format!("sidecar listener {listen}: {e}"))?;
                eprintln!("sallyport: sidecar on http://{listen} ({routes} route(s))");
                tokio::spawn(serve_with_limits(sidecar, listener, limits))
            }
            (None, None) => return Err("a sidecar listener has neither listen nor unix_socket".into()),
        };
        tasks.push(task);
    }
    Ok(tasks)
}

/// `sallyport sidecar`: serve until SIGINT/SIGTERM. Identities renewed on disk (or on
/// SIGHUP) are presented on new upstream connections without a restart.
pub async fn run(cfg: Config) -> Result<(), String> {
    let core = Core::from_config(&cfg)?;
    // Traces when [telemetry] names a collector; flushed before the process exits.
    let telemetry = crate::telemetry::Telemetry::start(&cfg)?;
    let mut tasks = start(&cfg, &core).await?;
    // The sidecar owns the identities: their rotation and expiry are its events to send.
    let (events, sender) = crate::events::Events::from_config(&cfg, &core)?;
    tasks.extend(sender);
    tasks.push(events.watch_certificates(
        core.identities(),
        crate::events::cert_expiry_days(&cfg),
        crate::events::CERT_CHECK_INTERVAL,
    ));
    tasks.push(tokio::spawn(core.watch(IDENTITY_POLL)));
    crate::signals::shutdown().await;
    tasks.iter().for_each(|t| t.abort());
    if let Some(t) = telemetry {
        t.shutdown().await;
    }
    Ok(())
}

/// How often identity files are checked for renewal.
pub const IDENTITY_POLL: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hop_by_hop_header_and_those_connection_names_are_stripped_and_no_other() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "close, X-Named"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("x-named", "1"),
            ("authorization", "Bearer kept"),
            ("content-type", "application/json"),
            ("x-keep", "1"),
            ("te-not", "1"),
        ] {
            h.append(
                http::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type", "te-not", "x-keep"]);
    }
}
