//! rustls client configuration for outbound connections, and the probe that tells whether
//! the server asked for a client certificate.
//!
//! rustls calls [`ResolvesClientCert::resolve`] only when the server sent a
//! CertificateRequest, and passes the server's acceptable CA names. A fresh probe is
//! attached to each connection, so after the handshake we know whether *this* server asked.
//! Session resumption is disabled: a resumed handshake carries no CertificateRequest, so the
//! probe could not tell (and a pooled connection makes resumption rare anyway).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use super::{pem, provider, Identity, TlsError};

/// Which server certificates to trust.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The Mozilla root set compiled in (webpki-roots): public receivers.
    WebPki,
    /// Only the CA certificates of a PEM bundle: private receivers.
    Bundle {
        path: PathBuf,
        roots: Arc<RootCertStore>,
    },
    /// A CA bundle file watched for changes: new connections verify with the bundle in force
    /// when they start (see [`super::trust`]).
    Watched(Arc<super::trust::TrustFile>),
}

impl Trust {
    /// Load a CA bundle; every certificate in it becomes a trust anchor.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        Self::from_certs(path, pem::load_certs(path)?)
    }

    /// A CA bundle given as PEM text; `label` names it in errors.
    pub fn from_pem_text(pem_text: &str, label: &str) -> Result<Self, TlsError> {
        let path = Path::new(label);
        let certs = pem::parse_certs(pem_text.as_bytes(), path)?;
        Self::from_certs(path, certs)
    }

    fn from_certs(
        path: &Path,
        certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::BadTrustAnchor {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        }
        Ok(Trust::Bundle {
            path: path.to_owned(),
            roots: Arc::new(roots),
        })
    }

    /// `Some(path)` → that bundle; `None` → the webpki roots.
    pub fn from_optional_file(path: Option<&Path>) -> Result<Self, TlsError> {
        path.map_or(Ok(Trust::WebPki), Self::from_pem_file)
    }

    pub(crate) fn root_store(&self) -> Arc<RootCertStore> {
        match self {
            Trust::WebPki => Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
            Trust::Bundle { roots, .. } => roots.clone(),
            Trust::Watched(t) => t.roots(),
        }
    }

    /// Changes each time a watched bundle is reloaded (0 for a fixed trust).
    pub fn generation(&self) -> u64 {
        match self {
            Trust::Watched(t) => t.generation(),
            _ => 0,
        }
    }

    /// A short description for logs and reports.
    pub fn describe(&self) -> String {
        match self {
            Trust::WebPki => "webpki roots".into(),
            Trust::Bundle { path, .. } => path.display().to_string(),
            Trust::Watched(t) => t.path().display().to_string(),
        }
    }
}

/// What one handshake revealed about the server's demand for a client certificate.
#[derive(Debug, Default)]
pub struct ClientAuthProbe {
    inner: Mutex<ProbeState>,
}

#[derive(Debug, Default, Clone)]
struct ProbeState {
    requested: bool,
    acceptable_issuers: Vec<Vec<u8>>,
    presented: bool,
}

impl ClientAuthProbe {
    fn state(&self) -> ProbeState {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }
    /// True when the server sent a CertificateRequest.
    pub fn requested(&self) -> bool {
        self.state().requested
    }
    /// True when we answered it with a certificate.
    pub fn presented(&self) -> bool {
        self.state().presented
    }
    /// The DER-encoded distinguished names the server listed as acceptable issuers.
    pub fn acceptable_issuers(&self) -> Vec<Vec<u8>> {
        self.state().acceptable_issuers
    }
}

#[derive(Debug)]
struct ProbingResolver {
    key: Option<Arc<CertifiedKey>>,
    probe: Arc<ClientAuthProbe>,
}

impl ResolvesClientCert for ProbingResolver {
    fn resolve(&self, hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        if let Ok(mut s) = self.probe.inner.lock() {
            s.requested = true;
            s.acceptable_issuers = hints.iter().map(|h| h.to_vec()).collect();
            s.presented = self.key.is_some();
        }
        self.key.clone()
    }

    // Always true, so rustls keeps the transcript for client auth and calls `resolve`
    // whenever the server asks, even when we have nothing to present (verify's probe).
    fn has_certs(&self) -> bool {
        true
    }
}

/// Where a connection's client certificate comes from.
#[derive(Clone)]
enum KeySource {
    Fixed(Option<Arc<CertifiedKey>>),
    /// The identity in force when the connection starts (rotation, hot reload).
    Store(Arc<super::creds::IdentityStore>),
}

/// A base client configuration from which each connection gets its own probed copy.
#[derive(Clone)]
pub struct ClientTlsConfig {
    base: Arc<ClientConfig>,
    key: KeySource,
    trust: Trust,
}

impl std::fmt::Debug for ClientTlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTlsConfig")
            .field("trust", &self.trust.describe())
            .field("client_cert", &self.has_identity())
            .finish()
    }
}

/// What a completed handshake negotiated: TLS version, cipher suite and ALPN protocol, as
/// reports and audit records name them.
pub fn negotiated(conn: &rustls::ClientConnection) -> (String, String, Option<String>) {
    (
        conn.protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        conn.negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        conn.alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    )
}

/// ALPN protocols offered: HTTP/2 when the receiver supports it, else HTTP/1.1.
pub const ALPN_H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];

impl ClientTlsConfig {
    /// TLS 1.2 and 1.3 only, server verified against `trust`, `identity` presented when
    /// asked for.
    pub fn new(trust: Trust, identity: Option<&Identity>, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let key = KeySource::Fixed(identity.map(Identity::certified_key));
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(trust.root_store())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.resumption = Resumption::disabled();
        if let Trust::Watched(t) = &trust {
            cfg.dangerous()
                .set_certificate_verifier(Arc::new(super::trust::ReloadingVerifier(t.clone())));
        }
        Ok(ClientTlsConfig {
            base: Arc::new(cfg),
            key,
            trust,
        })
    }

    /// Replace the certificate verifier (used by `verify` to record chains it rejects).
    pub fn with_verifier(mut self, verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>) -> Self {
        let mut cfg = (*self.base).clone();
        cfg.dangerous().set_certificate_verifier(verifier);
        self.base = Arc::new(cfg);
        self
    }

    /// The config for one connection, and the probe that will record its handshake.
    pub fn for_connection(&self) -> (Arc<ClientConfig>, Arc<ClientAuthProbe>) {
        let probe = Arc::new(ClientAuthProbe::default());
        let mut cfg = (*self.base).clone();
        let key = match &self.key {
            KeySource::Fixed(k) => k.clone(),
            KeySource::Store(s) => Some(s.certified_key()),
        };
        cfg.client_auth_cert_resolver = Arc::new(ProbingResolver {
            key,
            probe: probe.clone(),
        });
        (Arc::new(cfg), probe)
    }

    /// True when a client certificate will be presented when asked for.
    pub fn has_identity(&self) -> bool {
        !matches!(self.key, KeySource::Fixed(None))
    }

    /// Changes when the identity presented on new connections changes, or the trust they
    /// verify the receiver with (0 when both are fixed): pools and lanes start afresh when it
    /// does, so no connection made under the old identity or trust is reused.
    pub fn identity_generation(&self) -> u64 {
        let identity = match &self.key {
            KeySource::Fixed(_) => 0,
            KeySource::Store(s) => s.generation(),
        };
        identity.wrapping_add(self.trust.generation().wrapping_shl(32))
    }

    /// Present the identity `store` has in force when each connection starts.
    pub fn with_identity_store(mut self, store: Arc<super::creds::IdentityStore>) -> Self {
        self.key = KeySource::Store(store);
        self
    }

    pub fn trust(&self) -> &Trust {
        &self.trust
    }
}
