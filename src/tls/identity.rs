//! The client identity the gateway presents: a certificate chain and the key that matches
//! its leaf, checked before use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{pem, provider, CertFacts, TlsError};

/// A loaded, validated client identity.
///
/// Guarantees: the chain is non-empty, the key matches the leaf's public key, and the leaf
/// was valid at load time.
#[derive(Clone)]
pub struct Identity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    /// Facts of the leaf certificate.
    pub facts: CertFacts,
    pub(crate) certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Identity {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert_path", &self.cert_path)
            .field("subject", &self.facts.subject)
            .field("fingerprint", &self.facts.sha256_fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Load and validate a chain (leaf first) and its private key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        Self::load_at(cert_path, key_path, OffsetDateTime::now_utc())
    }

    /// As [`Identity::load`], judging validity at `now`.
    pub fn load_at(cert_path: &Path, key_path: &Path, now: OffsetDateTime) -> Result<Self, TlsError> {
        let chain = pem::load_certs(cert_path)?;
        let key = pem::load_key(key_path)?;
        Self::from_parts(cert_path, key_path, chain, key, now)
    }

    /// Load and validate the chain and key of a PKCS#12 file (`password` never appears in
    /// an error).
    pub fn load_p12(path: &Path, password: &str) -> Result<Self, TlsError> {
        Self::load_p12_parts(path, super::p12::load(path, password)?)
    }

    /// Validate what a PKCS#12 file at `path` held.
    pub fn load_p12_parts(path: &Path, p: super::p12::P12Contents) -> Result<Self, TlsError> {
        Self::from_parts(
            path,
            path,
            p.chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(p.key),
            OffsetDateTime::now_utc(),
        )
    }

    /// Validate an X.509-SVID pushed by a SPIFFE Workload API agent; `origin` (the agent's
    /// socket and the SPIFFE ID) stands for the file in errors and in `cert_path`.
    pub fn from_svid(
        origin: &Path,
        chain: Vec<CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Self::from_parts(origin, origin, chain, key, OffsetDateTime::now_utc())
    }

    fn from_parts(
        cert_path: &Path,
        key_path: &Path,
        chain: Vec<CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
        now: OffsetDateTime,
    ) -> Result<Self, TlsError> {
        let facts = CertFacts::from_der(&chain[0]).map_err(|reason| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            index: 0,
            reason,
        })?;
        check_validity(cert_path, &facts, now)?;
        let certified = CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            },
            other => TlsError::BadKey {
                path: key_path.to_owned(),
                reason: other.to_string(),
            },
        })?;
        Ok(Identity {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            chain,
            facts,
            certified: Arc::new(certified),
        })
    }

    /// The identity as rustls uses it.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

/// Refuse a certificate outside its validity window at `now`.
pub fn check_validity(path: &Path, facts: &CertFacts, now: OffsetDateTime) -> Result<(), TlsError> {
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    if now > facts.not_after {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            subject: facts.display_name().to_owned(),
            not_after: fmt(facts.not_after),
        });
    }
    if now < facts.not_before {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            subject: facts.display_name().to_owned(),
            not_before: fmt(facts.not_before),
        });
    }
    Ok(())
}
