//! PEM loading with rustls-pki-types' `PemObject` (rustls-pemfile is unmaintained:
//! RUSTSEC-2025-0134). Every error names the file; nothing here sniffs: a section is parsed
//! by its label or rejected.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn not_pem(path: &Path, err: pem::Error) -> TlsError {
    TlsError::NotPem {
        path: path.to_owned(),
        reason: err.to_string(),
    }
}

/// Load every CERTIFICATE block of a PEM file, in order (a chain is leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read(path)?, path)
}

/// Parse every CERTIFICATE block of PEM text; `path` only names the source in errors.
pub fn parse_certs(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    for (index, cert) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(TlsError::BadCertificate {
                path: path.to_owned(),
                index,
                reason: e.to_string(),
            });
        }
    }
    Ok(certs)
}

/// Load the one private key of a PEM file: PKCS#8, SEC1 EC or PKCS#1 RSA.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(&read(path)?, path)
}

/// Parse the private key of PEM text; `path` only names the source in errors.
pub fn parse_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mut found = None;
    let mut encrypted = false;
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| not_pem(path, e))?;
        let key = match kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
            _ => continue,
        };
        if found.is_some() {
            return Err(TlsError::BadKey {
                path: path.to_owned(),
                reason: "more than one private key in the file".into(),
            });
        }
        found = Some(key);
    }
    if found.is_none() {
        // `ENCRYPTED PRIVATE KEY` is not a SectionKind; look for the label to say why.
        encrypted = bytes
            .windows(b"ENCRYPTED PRIVATE KEY".len())
            .any(|w| w == b"ENCRYPTED PRIVATE KEY")
            || bytes
                .windows(b"Proc-Type: 4,ENCRYPTED".len())
                .any(|w| w == b"Proc-Type: 4,ENCRYPTED");
    }
    match found {
        Some(key) => Ok(key),
        None if encrypted => Err(TlsError::EncryptedKey {
            path: path.to_owned(),
        }),
        None => Err(TlsError::NoKey {
            path: path.to_owned(),
        }),
    }
}

/// Entry point for the PEM/certificate fuzz target: any bytes must give Ok or a typed error,
/// never a panic — through PEM parsing, key parsing and certificate facts.
pub fn fuzz_entry(data: &[u8]) {
    let path = Path::new("fuzz.pem");
    if let Ok(certs) = parse_certs(data, path) {
        for c in &certs {
            let _ = super::CertFacts::from_der(c);
        }
    }
    let _ = parse_key(data, path);
    let _ = super::CertFacts::from_der(data);
}
