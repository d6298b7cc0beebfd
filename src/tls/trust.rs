//! CA bundles read from files and watched like identities: a bundle changed on disk (or on
//! SIGHUP) is checked, then swapped in for new connections; a broken one is refused with a log
//! line and the previous trust stays in use.
//!
//! Every destination of a process that names the same bundle file shares one [`TrustFile`]
//! ([`TrustFiles`] keeps them by path), and one watcher reloads them with the identities. A
//! connection's server certificate is verified by [`ReloadingVerifier`], which asks the
//! bundle in force when the handshake runs, so no rustls config has to be rebuilt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{pem, provider, TlsError};

/// One bundle as loaded: its anchors and the WebPKI verifier built on them.
struct Loaded {
    roots: Arc<RootCertStore>,
    verifier: Arc<WebPkiServerVerifier>,
}

/// A CA bundle file, reloaded when its content changes.
pub struct TrustFile {
    path: PathBuf,
    current: RwLock<Arc<Loaded>>,
    /// SHA-256 of the file last looked at (a refused file too, so it is reported once).
    stamp: Mutex<Option<Vec<u8>>>,
    /// Successful reloads so far.
    generation: AtomicU64,
}

impl std::fmt::Debug for TrustFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustFile")
            .field("path", &self.path)
            .field("generation", &self.generation())
            .finish()
    }
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Parse a bundle: every certificate must be a usable trust anchor, and there must be one.
fn parse(path: &Path, bytes: &[u8]) -> Result<Loaded, TlsError> {
    let certs = pem::parse_certs(bytes, path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::BadTrustAnchor {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::BadTrustAnchor {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Loaded { roots, verifier })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl TrustFile {
    /// Load and check the bundle at `path`.
    pub fn load(path: &Path) -> Result<Arc<Self>, TlsError> {
        let bytes = read(path)?;
        let loaded = parse(path, &bytes)?;
        Ok(Arc::new(TrustFile {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            stamp: Mutex::new(Some(digest(&bytes))),
            generation: AtomicU64::new(0),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The anchors in force.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current().roots.clone()
    }

    /// Changes each time a new bundle is swapped in.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Read the file again if its content changed (or when `force`): a valid bundle is
    /// swapped in, a broken one refused (logged; the previous trust stays). Returns whether
    /// it changed.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let bytes = match read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
                if stamp.is_some() || force {
                    tracing::error!(path = %self.path.display(), error = %e, "refused the CA bundle; the previous trust stays in use");
                }
                *stamp = None;
                return Err(e.to_string());
            }
        };
        let now = Some(digest(&bytes));
        {
            let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *stamp == now && !force {
                return Ok(false);
            }
            *stamp = now;
        }
        match parse(&self.path, &bytes) {
            Ok(loaded) => {
                let anchors = loaded.roots.len();
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
                self.generation.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %self.path.display(), anchors, "CA bundle reloaded; new connections use it");
                Ok(true)
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "refused the new CA bundle; the previous trust stays in use");
                Err(e.to_string())
            }
        }
    }
}

/// Verifies a server's certificate against the bundle in force when the handshake runs.
#[derive(Debug)]
pub struct ReloadingVerifier(pub Arc<TrustFile>);

impl ServerCertVerifier for ReloadingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .current()
            .verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().verifier.supported_verify_schemes()
    }
}

/// The watched CA bundles of one process, by path.
#[derive(Debug, Default)]
pub struct TrustFiles {
    by_path: Mutex<HashMap<PathBuf, Arc<TrustFile>>>,
}

impl TrustFiles {
    /// The watched bundle at `path`: the one already loaded (and kept current by the
    /// watcher), else loaded and checked now.
    pub fn get(&self, path: &Path) -> Result<Arc<TrustFile>, TlsError> {
        let mut by_path = self.by_path.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = by_path.get(path) {
            return Ok(t.clone());
        }
        let t = TrustFile::load(path)?;
        by_path.insert(path.to_owned(), t.clone());
        Ok(t)
    }

    /// Reload every bundle whose file changed (all of them when `force`).
    pub fn reload_all(&self, force: bool) {
        let files: Vec<_> = self
            .by_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for f in files {
            let _ = f.reload(force);
        }
    }
}
