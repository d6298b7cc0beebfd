//! One verification connection: TCP connect (through the delivery core's connector: policy
//! checked, source address pinned), a TLS handshake whose chain is recorded (and
//! judged by the real WebPKI verifier without aborting), then a plain HTTP/1.1 `GET /` to see
//! how the server answers — an alert, a close, or a status line.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::egress::Egress;

use crate::tls::{provider, ClientTlsConfig, Identity, Trust};

/// A verification connection's settings.
pub struct Probe {
    trust: Trust,
    identity: Option<Identity>,
    timeout: Duration,
}

/// What the handshake negotiated.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
    pub alpn: Option<String>,
    pub elapsed: Duration,
    pub client_cert_requested: bool,
    pub acceptable_issuers: Vec<Vec<u8>>,
    /// The key-exchange group negotiated (`X25519`, `secp256r1`, `X25519MLKEM768`…).
    pub key_exchange_group: Option<String>,
}

/// What one probe saw.
#[derive(Debug, Clone)]
pub struct ProbeOutcome {
    /// The address connected to (none when no connection was made).
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connect: Option<Duration>,
    pub tls: Option<TlsInfo>,
    pub chain: Vec<CertificateDer<'static>>,
    /// The WebPKI verdict on the chain (host name, trust, validity).
    pub chain_verdict: Option<Result<(), String>>,
    /// The HTTP status of `GET /`, or why there was none.
    pub http: Option<Result<u16, String>>,
    pub error: Option<String>,
    /// The TLS alert the server sent, during the handshake or right after it.
    pub alert: Option<rustls::AlertDescription>,
}

impl ProbeOutcome {
    pub fn error_text(&self) -> String {
        self.error
            .clone()
            .or_else(|| self.http.as_ref().and_then(|h| h.as_ref().err().cloned()))
            .unwrap_or_else(|| "no error".into())
    }
    pub fn http_code_text(&self) -> String {
        match &self.http {
            Some(Ok(c)) => c.to_string(),
            _ => "?".into(),
        }
    }
}

/// The chain the server sent and the WebPKI verdict on it.
type Seen = (Vec<CertificateDer<'static>>, Result<(), String>);

#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Seen>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map(|_| ())
            .map_err(|e| describe(&e));
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        if let Ok(mut s) = self.seen.lock() {
            *s = Some((chain, verdict));
        }
        // Verify-only: keep going so the other checks can run; the verdict is reported.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the certificate is not valid yet".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the certificate does not name this host".into()
            }
            CertificateError::UnknownIssuer => {
                "the certificate is not issued by a trusted CA (unknown issuer)".into()
            }
            CertificateError::BadSignature => {
                "the certificate's signature does not verify against the trusted CA".into()
            }
            other => format!("the certificate is not acceptable: {other:?}"),
        },
        other => other.to_string(),
    }
}

/// The TLS alert inside an I/O error from rustls, if that is what it is.
fn alert_of(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => Some(*a),
        _ => None,
    }
}

/// An alert as RFC 8446 names it (`bad_certificate`), with its number.
pub fn alert_name(a: rustls::AlertDescription) -> String {
    let camel: Vec<char> = format!("{a:?}").chars().collect();
    let mut snake = String::with_capacity(camel.len() + 4);
    for (i, &ch) in camel.iter().enumerate() {
        // A word starts at an upper-case letter after a lower-case one, or at the last
        // capital of an acronym (`UnknownPSKIdentity` → `unknown_psk_identity`).
        let prev_lower = i > 0 && !camel[i - 1].is_ascii_uppercase();
        let ends_acronym = i > 0 && camel.get(i + 1).is_some_and(char::is_ascii_lowercase);
        if ch.is_ascii_uppercase() && i > 0 && (prev_lower || ends_acronym) {
            snake.push('_');
        }
        snake.push(ch.to_ascii_lowercase());
    }
    format!("{snake} ({})", u8::from(a))
}

fn alert_text(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion))
        | Some(rustls::Error::PeerIncompatible(_)) => {
            "the server offers no TLS version Sallyport accepts (TLS 1.2 or 1.3); TLS 1.0/1.1 are refused"
                .into()
        }
        Some(rustls::Error::AlertReceived(a)) => format!("the server sent TLS alert {}", alert_name(*a)),
        Some(other) => other.to_string(),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
        None => e.to_string(),
    }
}

impl Probe {
    pub fn new(trust: Trust, identity: Option<&Identity>, timeout: Duration) -> Self {
        Probe {
            trust,
            identity: identity.cloned(),
            timeout,
        }
    }

    /// Connect to `host:port` through `egress` (SNI and verification for `host`) and look.
    pub async fn run(&self, egress: &Egress, host: &str, port: u16) -> ProbeOutcome {
        let mut out = ProbeOutcome {
            remote: None,
            local: None,
            connect: None,
            tls: None,
            chain: vec![],
            chain_verdict: None,
            http: None,
            error: None,
            alert: None,
        };
        let started = Instant::now();
        let connect = crate::delivery::connect_tcp(egress, host, port);
        let tcp = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                out.error = Some(format!("TCP connect to {host}:{port} failed: {e}"));
                return out;
            }
            Err(_) => {
                out.error = Some(format!(
                    "TCP connect to {host}:{port} took longer than {:?}",
                    self.timeout
                ));
                return out;
            }
        };
        out.connect = Some(started.elapsed());
        out.remote = tcp.peer_addr().ok();
        out.local = tcp.local_addr().ok();

        let verifier =
            match WebPkiServerVerifier::builder_with_provider(self.trust.root_store(), provider()).build() {
                Ok(v) => v,
                Err(e) => {
                    out.error = Some(format!("trust anchors unusable: {e}"));
                    return out;
                }
            };
        let recorder = Arc::new(Recorder {
            inner: verifier,
            seen: Mutex::new(None),
        });
        let tls = match ClientTlsConfig::new(self.trust.clone(), self.identity.as_ref(), &[b"http/1.1"]) {
            Ok(t) => t.with_verifier(recorder.clone()),
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        let (cfg, probe) = tls.for_connection();
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            out.error = Some(format!("{host} is not a valid TLS server name"));
            return out;
        };
        let hs_started = Instant::now();
        let handshake = tokio::time::timeout(self.timeout, TlsConnector::from(cfg).connect(name, tcp)).await;
        if let Ok(mut s) = recorder.seen.lock() {
            if let Some((chain, verdict)) = s.take() {
                out.chain = chain;
                out.chain_verdict = Some(verdict);
            }
        }
        let mut stream = match handshake {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                out.alert = alert_of(&e);
                out.error = Some(format!("TLS handshake failed: {}", alert_text(&e)));
                return out;
            }
            Err(_) => {
                out.error = Some(format!(
                    "no TLS handshake within {:?} (the server accepted TCP but did not answer)",
                    self.timeout
                ));
                return out;
            }
        };
        let (_, conn) = stream.get_ref();
        let (version, cipher, alpn) = crate::tls::client::negotiated(conn);
        out.tls = Some(TlsInfo {
            version,
            cipher,
            alpn,
            elapsed: hs_started.elapsed(),
            client_cert_requested: probe.requested(),
            acceptable_issuers: probe.acceptable_issuers(),
            key_exchange_group: conn
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
        });

        let request = format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sallyport-verify\r\nConnection: close\r\n\r\n"
        );
        let exchange = async {
            stream.write_all(request.as_bytes()).await?;
            stream.flush().await?;
            let mut buf = vec![0u8; 512];
            let mut got = 0;
            loop {
                let n = stream.read(&mut buf[got..]).await?;
                if n == 0 {
                    break;
                }
                got += n;
                if buf[..got].windows(2).any(|w| w == b"\r\n") || got == buf.len() {
                    break;
                }
            }
            Ok::<_, std::io::Error>(buf[..got].to_vec())
        };
        out.http = Some(match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(format!("no HTTP answer within {:?}", self.timeout)),
            Ok(Err(e)) => {
                out.alert = alert_of(&e);
                Err(alert_text(&e))
            }
            Ok(Ok(bytes)) if bytes.is_empty() => {
                Err("the server closed the connection before any HTTP answer".into())
            }
            Ok(Ok(bytes)) => {
                let line = String::from_utf8_lossy(&bytes);
                line.split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u16>().ok())
                    .filter(|_| line.starts_with("HTTP/"))
                    .ok_or_else(|| "the server answered something that is not HTTP".to_owned())
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::alert_name;
    use rustls::AlertDescription as A;

    #[test]
    fn alerts_are_named_as_the_rfcs_name_them() {
        assert_eq!(alert_name(A::UnknownCA), "unknown_ca (48)");
        assert_eq!(alert_name(A::BadCertificate), "bad_certificate (42)");
        assert_eq!(alert_name(A::CertificateRequired), "certificate_required (116)");
        assert_eq!(alert_name(A::UnknownPSKIdentity), "unknown_psk_identity (115)");
        assert_eq!(alert_name(A::ProtocolVersion), "protocol_version (70)");
    }
}
