//! HTTP APIs the gateway serves: [`public`] (unauthenticated: health; certificate and egress
//! documents) and [`admin`] (token-protected: ingest, dataflows, dead letters, metrics).
//!
//! Must never: read a request body without a limit, answer an admin request without a valid
//! token, or put a secret or a payload in a log line or an error body.

pub mod admin;
pub mod public;
pub mod ui;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A response with a buffered body.
pub type Reply = Response<Full<Bytes>>;
/// A request handler.
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A JSON answer.
pub fn json_reply(status: StatusCode, body: &serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON error: `{"error": {"status": …, "message": …}}`.
pub fn error_reply(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json_reply(status, &error_value(status, None, &message.to_string()))
}

/// The body of every error Sallyport answers with, the admin API's and the sidecar's alike:
/// `{"error": {"status": …, "kind": …, "message": …}}` (`kind` when the error has one).
pub fn error_body(status: StatusCode, kind: Option<&str>, message: &str) -> Bytes {
    Bytes::from(error_value(status, kind, message).to_string())
}

/// [`error_body`] as a JSON value, for answers that add fields (`issues`).
pub fn error_value(status: StatusCode, kind: Option<&str>, message: &str) -> serde_json::Value {
    let mut error = json!({"status": status.as_u16(), "message": message});
    if let Some(kind) = kind {
        error["kind"] = json!(kind);
    }
    json!({ "error": error })
}

/// Read a body up to `limit` bytes; more is a 413.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Reply> {
    limited(body, limit)
        .ok_or_else(|| too_large(limit))?
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| {
            let (status, message) = body_failure(e, limit);
            error_reply(status, message)
        })
}

pub(crate) fn too_large(limit: usize) -> Reply {
    let (status, message) = too_large_failure(limit);
    error_reply(status, message)
}

pub(crate) fn too_large_failure(limit: usize) -> (StatusCode, String) {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} bytes"),
    )
}

/// `body` cut off at `limit` bytes; `None` at once when its declared length is longer, so a
/// client is not left sending what will be refused.
pub(crate) fn limited(body: Incoming, limit: usize) -> Option<Limited<Incoming>> {
    (hyper::body::Body::size_hint(&body).lower() <= limit as u64).then(|| Limited::new(body, limit))
}

/// Why a body could not be read: too large (413), or broken off (400).
pub(crate) fn body_failure(
    e: Box<dyn std::error::Error + Send + Sync>,
    limit: usize,
) -> (StatusCode, String) {
    if e.is::<http_body_util::LengthLimitError>() {
        too_large_failure(limit)
    } else {
        (StatusCode::BAD_REQUEST, format!("reading the request body: {e}"))
    }
}

/// Bind `addr`; the error names the listener.
pub async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{what} listener {addr}: {e}"))
}

/// A TLS acceptor for a listener's own server certificate (HTTP/2 and HTTP/1.1 by ALPN).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let chain = crate::tls::pem::load_certs(cert).map_err(|e| e.to_string())?;
    let key = crate::tls::pem::load_key(key).map_err(|e| e.to_string())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serve HTTP/1.1 and HTTP/2 on `listener` (over TLS when `tls` is given) until `shutdown`
/// turns true, holding connections within `limits` (see [`crate::listener`]). `what` names
/// the listener in log lines.
pub async fn serve(
    what: &str,
    listener: TcpListener,
    handler: Handler,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: crate::listener::Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    crate::listener::serve(what, listener, limits, stop, move |tcp, _, conn| {
        let (handler, tls) = (handler.clone(), tls.clone());
        async move {
            let tracker = conn.tracker();
            let svc = {
                let tracker = tracker.clone();
                service_fn(move |req| {
                    let (handler, in_flight) = (handler.clone(), tracker.request(&req));
                    async move { Ok::<_, Infallible>(in_flight.body(handler(req).await)) }
                })
            };
            let builder = crate::listener::http_builder();
            conn.run(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = tracker.handshake(acceptor.accept(tcp)).await {
                            let io = TokioIo::new(tracker.io(stream));
                            let _ = builder.serve_connection(io, svc).await;
                        }
                    }
                    None => {
                        let io = TokioIo::new(tracker.io(tcp));
                        let _ = builder.serve_connection(io, svc).await;
                    }
                }
            })
            .await;
        }
    })
    .await;
}
