//! TLS material and TLS configuration for every connection Sallyport makes.
//!
//! Owns: loading certificate chains and private keys from PEM ([`pem`]), reading the facts
//! of a certificate ([`facts`]), the gateway's client identity ([`identity`]) and the rustls
//! client configuration with its client-auth probe ([`client`]); identities streamed by a SPIFFE
//! Workload API agent ([`spiffe`]).
//!
//! Must never: log key material, accept an expired identity, or build a rustls config with
//! a crypto provider other than ring (two providers make `ClientConfig::builder()` panic).

pub mod client;
pub mod creds;
pub mod facts;
pub mod identity;
pub mod p12;
pub mod pem;
pub mod spiffe;
pub mod trust;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::{ClientAuthProbe, ClientTlsConfig, Trust};
pub use facts::{CertFacts, Sans};
pub use identity::Identity;

/// The one crypto provider Sallyport uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Problems with TLS material, each naming the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not PEM: {reason}")]
    NotPem { path: PathBuf, reason: String },
    #[error("{path}: no CERTIFICATE block found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found (expected a PKCS#8, SEC1 EC or PKCS#1 RSA PEM block)")]
    NoKey { path: PathBuf },
    #[error("{path}: the private key is encrypted; Sallyport needs an unencrypted key file readable only by its user (decrypt with `openssl pkcs8 -in KEY -out KEY.plain`)")]
    EncryptedKey { path: PathBuf },
    #[error("{path}: certificate #{index} is not valid X.509: {reason}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{path}: the private key is not usable: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: certificate '{subject}' expired at {not_after}")]
    Expired {
        path: PathBuf,
        subject: String,
        not_after: String,
    },
    #[error("{path}: certificate '{subject}' is not valid before {not_before}")]
    NotYetValid {
        path: PathBuf,
        subject: String,
        not_before: String,
    },
    #[error("{path}: no usable trust anchor: {reason}")]
    BadTrustAnchor { path: PathBuf, reason: String },
    #[error("{path}: PKCS#12: {reason}")]
    P12 { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}
