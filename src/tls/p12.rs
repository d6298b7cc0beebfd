//! PKCS#12 (`.p12`/`.pfx`) files: a client certificate chain and its key in one
//! password-protected file, as platform teams and Windows/Java tooling hand them out.
//!
//! Parsed by `p12-keystore`, which reads OpenSSL 3's default (PBES2 with AES-256-CBC and
//! PBKDF2-HMAC-SHA256, HMAC-SHA256 integrity) as well as the legacy 3DES/RC2 forms.
//!
//! Must never: put the password in an error, a log line or Debug output; keep the key in a
//! file readable by others (see [`crate::pki::write_private`]).

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{provider, TlsError};

/// What a PKCS#12 file holds: the chain, leaf first, and the leaf's private key (PKCS#8).
pub struct P12Contents {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for P12Contents {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P12Contents")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::P12 {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Read and decrypt the PKCS#12 file at `path`.
pub fn load(path: &Path, password: &str) -> Result<P12Contents, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&data, password, path)
}

/// Decrypt PKCS#12 bytes; `path` only names the source in errors.
pub fn parse(data: &[u8], password: &str, path: &Path) -> Result<P12Contents, TlsError> {
    use p12_keystore::error::Error;
    use p12_keystore::{KeyStore, Pkcs12ImportPolicy};
    let store = KeyStore::from_pkcs12(data, password, Pkcs12ImportPolicy::Relaxed).map_err(|e| match e {
        Error::MacError(_) | Error::UnpadError => bad(
            path,
            "wrong password, or the file is damaged (its integrity check failed)",
        ),
        Error::UnsupportedEncryptionScheme | Error::UnsupportedMacAlgorithm => bad(
            path,
            format!("{e}: re-export it with `openssl pkcs12 -export` (OpenSSL 3's defaults are supported)"),
        ),
        // The crate's messages name structures and algorithms, never the password.
        other => bad(path, format!("not a readable PKCS#12 file: {other}")),
    })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err(bad(path, "no private key with its certificate in the file"));
    };
    let key = PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec());
    let certs: Vec<CertificateDer<'static>> = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(bad(path, "the private key has no certificate in the file"));
    }
    let chain = order_chain(certs, &key)
        .ok_or_else(|| bad(path, "no certificate in the file matches its private key"))?;
    Ok(P12Contents { chain, key })
}

/// The chain leaf first: the certificate whose public key is the key's, then each issuer
/// found in the file, in turn. Certificates that are not on that path are left out.
fn order_chain(
    mut certs: Vec<CertificateDer<'static>>,
    key: &PrivatePkcs8KeyDer<'static>,
) -> Option<Vec<CertificateDer<'static>>> {
    let signing = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.clone_key()))
        .ok()?;
    let ours = signing.public_key();
    let spki = |c: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(c)
            .ok()
            .map(|(_, x)| x.public_key().raw.to_vec())
    };
    let leaf = match &ours {
        Some(ours) => certs
            .iter()
            .position(|c| spki(c).as_deref() == Some(ours.as_ref()))?,
        // A key type whose public half rustls cannot give: the file's first certificate
        // (the key is still checked against it when the identity is loaded).
        None => 0,
    };
    let mut chain = vec![certs.swap_remove(leaf)];
    let names = |c: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(c)
            .ok()
            .map(|(_, x)| (x.subject().as_raw().to_vec(), x.issuer().as_raw().to_vec()))
    };
    while let Some((subject, issuer)) = chain.last().and_then(names) {
        if subject == issuer {
            break;
        }
        let Some(next) = certs
            .iter()
            .position(|c| names(c).is_some_and(|(s, _)| s == issuer))
        else {
            break;
        };
        chain.push(certs.swap_remove(next));
    }
    Some(chain)
}

impl P12Contents {
    /// The chain as PEM text, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_ref()))
            .collect()
    }

    /// The key as a PKCS#8 PEM block.
    pub fn key_pem(&self) -> String {
        pem_block("PRIVATE KEY", self.key.secret_pkcs8_der())
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
