//! A small HTTPS receiver built on rustls + hyper that records every request it gets and the
//! client certificate that came with it. Used by `sallyport demo` and by the tests as "an mTLS
//! receiver written with rustls". Not a production component: it keeps requests in memory.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::tls::{pem, provider, CertFacts, TlsError};

/// Whether the receiver asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Send a CertificateRequest and refuse the handshake without a cert from the CA.
    Required,
    /// Never ask: a plain TLS server (what mTLS-only must refuse).
    NotRequested,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub http_version: String,
    /// The client certificate presented in this connection's handshake.
    pub client_cert: Option<CertFacts>,
}

/// What the receiver does with the n-th request (0-based, across connections).
#[derive(Debug, Clone)]
pub enum Action {
    /// Answer with this status and headers.
    Respond(StatusCode, Vec<(&'static str, String)>),
    /// Wait, then answer with this status.
    Delay(std::time::Duration, StatusCode),
    /// Close the connection without answering.
    Drop,
}

/// Decides the [`Action`] for each request.
pub type Responder = Arc<dyn Fn(usize) -> Action + Send + Sync>;

/// A running receiver; it stops when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Start on `127.0.0.1:0` with a server certificate, trusting client certificates issued
    /// by `client_ca` when `auth` is [`ClientAuth::Required`]. Answers `status` with body `ok`.
    pub async fn start(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        auth: ClientAuth,
        status: StatusCode,
    ) -> Result<Self, TlsError> {
        Self::start_with(
            cert,
            key,
            client_ca,
            auth,
            Arc::new(move |_| Action::Respond(status, vec![])),
        )
        .await
    }

    /// As [`Receiver::start`], with each request's answer decided by `responder`.
    pub async fn start_with(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        auth: ClientAuth,
        responder: Responder,
    ) -> Result<Self, TlsError> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(any, cert, key, client_ca, auth, responder).await
    }

    /// As [`Receiver::start_with`], listening on `addr` (a receiver restarted on its old
    /// port, say, with other settings).
    pub async fn start_on(
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        auth: ClientAuth,
        responder: Responder,
    ) -> Result<Self, TlsError> {
        let chain = pem::load_certs(cert)?;
        let key = pem::load_key(key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = match auth {
            ClientAuth::Required => {
                let mut roots = RootCertStore::empty();
                for c in pem::load_certs(client_ca)? {
                    roots.add(c).map_err(|e| TlsError::BadTrustAnchor {
                        path: client_ca.to_owned(),
                        reason: e.to_string(),
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError::BadTrustAnchor {
                        path: client_ca.to_owned(),
                        reason: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            ClientAuth::NotRequested => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind(addr).await.map_err(|source| TlsError::Read {
            path: addr.to_string().into(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| TlsError::Read {
            path: "127.0.0.1:0".into(),
            source,
        })?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            received.clone(),
            (connections.clone(), peers.clone()),
            responder,
        ));
        Ok(Receiver {
            addr,
            received,
            connections,
            peers,
            task,
        })
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The remote address of every TCP connection accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// TCP connections accepted so far (handshake or not).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.addr.port(), path)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    received: Arc<Mutex<Vec<Received>>>,
    (connections, peers): (Arc<AtomicUsize>, Arc<Mutex<Vec<SocketAddr>>>),
    responder: Responder,
) {
    let seen = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        if let Ok(mut p) = peers.lock() {
            p.push(remote);
        }
        connections.fetch_add(1, Ordering::SeqCst);
        let acceptor = acceptor.clone();
        let received = received.clone();
        let (responder, seen) = (responder.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let (_, conn) = tls.get_ref();
            let client_cert = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| CertFacts::from_der(c).ok());
            let svc = service_fn(move |req: Request<Incoming>| {
                let received = received.clone();
                let client_cert = client_cert.clone();
                let action = responder(seen.fetch_add(1, Ordering::SeqCst));
                async move {
                    let (parts, body) = req.into_parts();
                    let body = match Limited::new(body, 64 * 1024 * 1024).collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => Bytes::new(),
                    };
                    let rec = Received {
                        method: parts.method.to_string(),
                        path_and_query: parts
                            .uri
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        headers: parts
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                            .collect(),
                        body,
                        http_version: format!("{:?}", parts.version),
                        client_cert,
                    };
                    if let Ok(mut r) = received.lock() {
                        r.push(rec);
                    }
                    let (status, headers) = match action {
                        Action::Respond(s, h) => (s, h),
                        Action::Delay(d, s) => {
                            tokio::time::sleep(d).await;
                            (s, vec![])
                        }
                        Action::Drop => return Err(std::io::Error::other("receiver drops the connection")),
                    };
                    let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
                    *res.status_mut() = status;
                    for (k, v) in headers {
                        if let Ok(v) = http::HeaderValue::from_str(&v) {
                            res.headers_mut().insert(k, v);
                        }
                    }
                    Ok::<_, std::io::Error>(res)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
