//! The one connector every outbound connection uses: resolve → egress policy on every
//! resolved address → bind the pinned source address → connect to a checked address
//! ([`connect_tcp`], also used by `verify` and `cert fetch`) → TLS with a per-connection
//! client-auth probe → mTLS-only check. Nothing is written to a receiver that failed the
//! check: the connection is dropped before hyper sees it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::error::{classify_rustls, DeliveryError, ErrorKind};
use crate::egress::Egress;
use crate::tls::{CertFacts, ClientTlsConfig};

/// What the connection that carried a response looked like. Attached to every response's
/// extensions, so callers (audit, `send --json`) see the peer they actually talked to.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub tls_version: String,
    pub cipher_suite: String,
    pub alpn: Option<String>,
    /// The receiver sent a CertificateRequest.
    pub client_cert_requested: bool,
    /// We answered it with our certificate.
    pub client_cert_presented: bool,
    /// Facts of the receiver's leaf certificate.
    pub server_certificate: Option<CertFacts>,
    /// Length of the chain the receiver sent.
    pub server_chain_len: usize,
    /// The two addresses' IPs as text, written once per connection: every audit record of a
    /// request on it carries them.
    #[serde(skip)]
    remote_ip: String,
    #[serde(skip)]
    local_ip: String,
}

impl PeerInfo {
    /// What an audit record says of the connection an attempt went over: the receiver's IP,
    /// our source IP and the SHA-256 of the receiver's certificate. `None`s when no connection
    /// was made.
    pub fn audit_facts(peer: Option<&PeerInfo>) -> (Option<String>, Option<String>, Option<String>) {
        let (remote, local, cert) = Self::audit_facts_ref(peer);
        (
            remote.map(str::to_owned),
            local.map(str::to_owned),
            cert.map(str::to_owned),
        )
    }

    /// [`PeerInfo::audit_facts`], borrowed.
    pub fn audit_facts_ref(peer: Option<&PeerInfo>) -> (Option<&str>, Option<&str>, Option<&str>) {
        match peer {
            Some(p) => (
                Some(p.remote_ip.as_str()),
                Some(p.local_ip.as_str()),
                p.server_certificate
                    .as_ref()
                    .map(|c| c.sha256_fingerprint.as_str()),
            ),
            None => (None, None, None),
        }
    }
}

/// Connector settings for one destination profile (trust, identity, mTLS rule).
#[derive(Clone, Debug)]
pub(crate) struct Connector {
    tls: ClientTlsConfig,
    require_client_auth: bool,
    connect_timeout: Duration,
    egress: Arc<Egress>,
    alerts: Arc<AlertLog>,
}

/// The last TLS alert a receiver sent right after the handshake, kept beside the pool.
///
/// In TLS 1.3 a receiver that refuses our client certificate says so with an alert after our
/// side considers the handshake complete; HTTP/2 (h2) turns the resulting I/O error into a
/// string, so the typed cause cannot travel back with the failed request. The connection
/// records it here instead, and the client reads it when a request fails without a typed
/// cause. Connections of one pool share one identity and destination, so an alert seen on
/// one explains a failure on another made in the same moment.
#[derive(Debug, Default)]
pub(crate) struct AlertLog(std::sync::Mutex<Option<(std::time::Instant, rustls::AlertDescription)>>);

impl AlertLog {
    fn record(&self, alert: rustls::AlertDescription) {
        if let Ok(mut a) = self.0.lock() {
            *a = Some((std::time::Instant::now(), alert));
        }
    }

    /// An alert seen within `window`, if any.
    pub(crate) fn recent(&self, window: Duration) -> Option<rustls::AlertDescription> {
        let a = self.0.lock().ok()?;
        a.filter(|(at, _)| at.elapsed() <= window).map(|(_, d)| d)
    }
}

impl Connector {
    pub(crate) fn new(
        tls: ClientTlsConfig,
        require_client_auth: bool,
        connect_timeout: Duration,
        egress: Arc<Egress>,
    ) -> Self {
        Connector {
            tls,
            require_client_auth,
            connect_timeout,
            egress,
            alerts: Arc::default(),
        }
    }

    pub(crate) fn alerts(&self) -> &AlertLog {
        &self.alerts
    }

    /// Open one TLS connection to the authority of `uri`.
    pub(crate) async fn connect(&self, uri: &Uri) -> Result<TlsConn, DeliveryError> {
        let target = Target::from_uri(uri)?;
        tokio::time::timeout(self.connect_timeout, self.connect_target(&target))
            .await
            .map_err(|_| {
                DeliveryError::new(
                    ErrorKind::Timeout,
                    format!(
                        "connecting to {}:{} took longer than {:?}",
                        target.host, target.port, self.connect_timeout
                    ),
                )
            })?
    }

    async fn connect_target(&self, target: &Target) -> Result<TlsConn, DeliveryError> {
        let tcp = connect_tcp(&self.egress, &target.host, target.port).await?;
        let _ = tcp.set_nodelay(true);
        let remote_addr = tcp
            .peer_addr()
            .map_err(|e| DeliveryError::new(ErrorKind::Connect, format!("peer address: {e}")))?;
        let local_addr = tcp
            .local_addr()
            .map_err(|e| DeliveryError::new(ErrorKind::Connect, format!("local address: {e}")))?;

        let (cfg, probe) = self.tls.for_connection();
        let tls = TlsConnector::from(cfg)
            .connect(target.server_name.clone(), Socket(tcp))
            .await
            .map_err(|e| handshake_error(e, target))?;

        let (_, conn) = tls.get_ref();
        if self.require_client_auth && !probe.requested() {
            // Drop the connection: not one byte of the request goes to this receiver.
            return Err(DeliveryError::new(
                ErrorKind::MtlsNotRequested,
                format!(
                    "{}:{} did not request a client certificate during the TLS handshake; \
                     this dataflow is mTLS-only, so nothing was sent",
                    target.host, target.port
                ),
            ));
        }
        let chain = conn.peer_certificates().unwrap_or_default();
        let (tls_version, cipher_suite, alpn) = crate::tls::client::negotiated(conn);
        let peer = PeerInfo {
            remote_addr,
            local_addr,
            tls_version,
            cipher_suite,
            alpn,
            client_cert_requested: probe.requested(),
            client_cert_presented: probe.presented(),
            server_certificate: chain.first().and_then(|c| CertFacts::from_der(c).ok()),
            server_chain_len: chain.len(),
            remote_ip: remote_addr.ip().to_string(),
            local_ip: local_addr.ip().to_string(),
        };
        let h2 = peer.alpn.as_deref() == Some("h2");
        Ok(TlsConn {
            io: TokioIo::new(tls),
            peer: Arc::new(peer),
            h2,
            alerts: self.alerts.clone(),
        })
    }
}

struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Target {
    fn from_uri(uri: &Uri) -> Result<Self, DeliveryError> {
        if uri.scheme_str() != Some("https") {
            return Err(DeliveryError::new(
                ErrorKind::InvalidUrl,
                format!("{uri}: only https URLs are delivered to"),
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| DeliveryError::new(ErrorKind::InvalidUrl, format!("{uri}: no host")))?;
        // Uri keeps IPv6 literals bracketed.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|e| {
            DeliveryError::new(
                ErrorKind::InvalidUrl,
                format!("{host}: not a valid TLS server name: {e}"),
            )
        })?;
        Ok(Target {
            host,
            port,
            server_name,
        })
    }
}

/// A TCP connection to `host:port` as the egress policy allows it: every resolved address is
/// checked, only allowed ones are tried (in the resolver's order), each from the pinned source
/// address of its family when `egress.source_ips` is set. No caller connects any other way.
pub async fn connect_tcp(egress: &Egress, host: &str, port: u16) -> Result<TcpStream, DeliveryError> {
    let addrs = egress
        .resolve(host, port)
        .await
        .map_err(|e| DeliveryError::new(ErrorKind::Dns, format!("resolving {host}: {e}")).with_source(e))?;
    if addrs.is_empty() {
        return Err(DeliveryError::new(
            ErrorKind::Dns,
            format!("{host} resolved to no address"),
        ));
    }
    // Check every resolved address; connect only to checked ones, by address.
    let mut allowed = Vec::with_capacity(addrs.len());
    let mut first_denial = None;
    for addr in addrs {
        match egress.check(host, addr.ip()) {
            Ok(()) => allowed.push(addr),
            Err(d) => {
                tracing::warn!(host = %host, addr = %addr.ip(), "{d}");
                first_denial.get_or_insert(d);
            }
        }
    }
    if allowed.is_empty() {
        let d = first_denial.map_or_else(|| "no address".to_owned(), |d| d.to_string());
        return Err(DeliveryError::new(ErrorKind::EgressDenied, d));
    }
    let mut last_err = None;
    for addr in allowed {
        let source = egress
            .source_for(&addr)
            .map_err(|e| DeliveryError::new(ErrorKind::NoSourceAddress, e))?;
        match connect_from(source, addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some((addr, e)),
        }
    }
    match last_err {
        Some((addr, e)) => {
            Err(DeliveryError::new(ErrorKind::Connect, format!("connecting to {addr}: {e}")).with_source(e))
        }
        None => Err(DeliveryError::new(
            ErrorKind::Dns,
            format!("{host} resolved to no address"),
        )),
    }
}

/// A TCP connection to exactly `addr`, from `source` when pinned.
async fn connect_from(source: Option<std::net::IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(src) = source {
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.connect(addr).await
}

fn handshake_error(e: std::io::Error, target: &Target) -> DeliveryError {
    let where_ = format!("TLS handshake with {}:{}", target.host, target.port);
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => {
            let (kind, detail) = classify_rustls(t);
            DeliveryError::new(kind, format!("{where_}: {detail}")).with_source(e)
        }
        None if e.kind() == std::io::ErrorKind::UnexpectedEof
            || e.kind() == std::io::ErrorKind::ConnectionReset =>
        {
            DeliveryError::new(
                ErrorKind::TlsHandshake,
                format!("{where_}: the receiver closed the connection during the handshake"),
            )
            .with_source(e)
        }
        None => DeliveryError::new(ErrorKind::TlsHandshake, format!("{where_}: {e}")).with_source(e),
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TlsConn;
    type Error = DeliveryError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, DeliveryError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(&uri).await })
    }
}

/// The TCP stream under a delivery connection's TLS: rustls's `write_vectored` of a single
/// chunk (a request's records usually are one) goes out with `send`, which is cheaper than
/// `writev` (bench/RESULTS.md, "Socket writes").
struct Socket(TcpStream);

impl tokio::io::AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let tcp = Pin::new(&mut self.get_mut().0);
        match bufs {
            [one] => tcp.poll_write(cx, one),
            _ => tcp.poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// A TLS connection with the facts of its handshake, as hyper-util's pool needs it.
pub struct TlsConn {
    io: TokioIo<TlsStream<Socket>>,
    peer: Arc<PeerInfo>,
    h2: bool,
    alerts: Arc<AlertLog>,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The facts of this connection, to attach to each response it carries.
    pub fn peer_shared(&self) -> Arc<PeerInfo> {
        self.peer.clone()
    }

    /// ALPN chose HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.h2
    }
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(self.peer.clone());
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &r {
            this.note_alert(e);
        }
        r
    }
}

impl TlsConn {
    fn note_alert(&self, e: &std::io::Error) {
        if let Some(rustls::Error::AlertReceived(d)) = e.get_ref().and_then(|e| e.downcast_ref()) {
            self.alerts.record(*d);
        }
    }

    /// In TLS 1.3 a receiver refuses our client certificate *after* our side of the handshake
    /// is done: the alert is waiting in the socket when our first write fails with a broken
    /// pipe or reset. Read once to surface that alert as the error, so the failure is counted
    /// as `client_cert_rejected` instead of a bare broken pipe.
    fn explain<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        use std::io::ErrorKind as K;
        let Poll::Ready(Err(err)) = r else { return r };
        if !matches!(
            err.kind(),
            K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted
        ) {
            return Poll::Ready(Err(err));
        }
        let mut buf = [0u8; 256];
        let mut rb = tokio::io::ReadBuf::new(&mut buf);
        match tokio::io::AsyncRead::poll_read(Pin::new(self.io.inner_mut()), cx, &mut rb) {
            Poll::Ready(Err(alert)) if alert.get_ref().is_some_and(|e| e.is::<rustls::Error>()) => {
                self.note_alert(&alert);
                Poll::Ready(Err(alert))
            }
            _ => Poll::Ready(Err(err)),
        }
    }
}

impl Write for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.explain(cx, r)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.explain(cx, r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.explain(cx, r)
    }
}
