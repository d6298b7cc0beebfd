//! A development PKI made with rcgen: a CA, a receiver server certificate for
//! localhost/127.0.0.1, and the gateway's client certificate. For demos, tests and first
//! contact with a receiver — production identities come from the receiver's or your own CA.
//!
//! Must never: write a private key readable by anyone but its owner (keys are created 0600).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}: already exists (pass --force to replace the dev PKI)")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub cn: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub server_auth: bool,
    pub client_auth: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    fn base(cn: &str, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            cn: cn.to_owned(),
            dns: vec![],
            ips: vec![],
            uris: vec![],
            server_auth: false,
            client_auth: false,
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn localhost_server(days: i64) -> Self {
        LeafSpec {
            dns: vec!["localhost".into()],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            server_auth: true,
            ..Self::base("localhost", days)
        }
    }

    /// A client certificate.
    pub fn client(cn: &str, dns: Vec<String>, uris: Vec<String>, days: i64) -> Self {
        LeafSpec {
            dns,
            uris,
            client_auth: true,
            ..Self::base(cn, days)
        }
    }
}

/// PEM text of a certificate and its private key.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// A certificate authority held in memory.
pub struct CertAuthority {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertAuthority {
    /// A new self-signed CA valid for `days`.
    pub fn new(cn: &str, days: i64) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "Sallyport dev PKI");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Issue a leaf certificate with a fresh P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Pem, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.cn.as_str());
        params.distinguished_name = dn;
        for d in &spec.dns {
            params.subject_alt_names.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|_| PkiError::Invalid(format!("'{d}' is not a DNS name")))?,
            ));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for u in &spec.uris {
            params.subject_alt_names.push(SanType::URI(
                u.as_str()
                    .try_into()
                    .map_err(|_| PkiError::Invalid(format!("'{u}' is not a URI")))?,
            ));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Options of `sallyport pki init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub client_cn: String,
    pub client_dns: Vec<String>,
    pub client_uris: Vec<String>,
    pub days: i64,
    pub force: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            client_cn: "sallyport-gateway".into(),
            client_dns: vec!["gateway.sallyport.test".into()],
            client_uris: vec![],
            days: 90,
            force: false,
        }
    }
}

/// The files of a dev PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DevPki {
    /// The file names inside `dir`.
    pub fn paths(dir: &Path) -> Self {
        DevPki {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("receiver.pem"),
            server_key: dir.join("receiver.key"),
            client_cert: dir.join("gateway.pem"),
            client_key: dir.join("gateway.key"),
        }
    }
}

/// Write a dev PKI into `dir`.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<DevPki, PkiError> {
    if opts.days < 1 {
        return Err(PkiError::Invalid("--days must be at least 1".into()));
    }
    let files = DevPki::paths(dir);
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !opts.force {
        for p in [
            &files.ca_cert,
            &files.ca_key,
            &files.server_cert,
            &files.server_key,
            &files.client_cert,
            &files.client_key,
        ] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
    }
    let ca = CertAuthority::new("Sallyport Dev CA", opts.days)?;
    let server = ca.issue(&LeafSpec::localhost_server(opts.days))?;
    let client = ca.issue(&LeafSpec::client(
        &opts.client_cn,
        opts.client_dns.clone(),
        opts.client_uris.clone(),
        opts.days,
    ))?;
    write_public(&files.ca_cert, &ca.cert_pem)?;
    write_private(&files.ca_key, &ca.key_pem)?;
    write_public(&files.server_cert, &server.cert)?;
    write_private(&files.server_key, &server.key)?;
    write_public(&files.client_cert, &client.cert)?;
    write_private(&files.client_key, &client.key)?;
    Ok(files)
}

/// Write a public file (certificate), replacing any old one.
pub fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Write a private key file created with mode 0600 (an existing file is replaced, not
/// reused, so a looser old mode cannot survive).
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// A fresh P-256 key and a PKCS#10 request for a receiver's CA to sign. `sans` are
/// `dns:NAME`, `uri:URI`, `ip:ADDR` or `email:ADDR`. Returns (CSR PEM, key PEM).
pub fn make_csr(cn: &str, sans: &[String]) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    for san in sans {
        let (kind, value) = san.split_once(':').ok_or_else(|| {
            PkiError::Invalid(format!("--san '{san}': expected dns:…, uri:…, ip:… or email:…"))
        })?;
        let bad = || PkiError::Invalid(format!("--san '{san}': not a valid {kind} name"));
        params.subject_alt_names.push(match kind {
            "dns" => SanType::DnsName(value.try_into().map_err(|_| bad())?),
            "uri" => SanType::URI(value.try_into().map_err(|_| bad())?),
            "email" => SanType::Rfc822Name(value.try_into().map_err(|_| bad())?),
            "ip" => SanType::IpAddress(value.parse().map_err(|_| bad())?),
            _ => {
                return Err(PkiError::Invalid(format!(
                    "--san '{san}': kind must be dns, uri, ip or email"
                )))
            }
        });
    }
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((csr, key.serialize_pem()))
}

/// Check a signed chain against the pending key: the leaf must carry the pending key's
/// public key, be valid now, and each certificate must be signed by the next one given.
pub fn check_signed(chain_path: &Path, pending_key: &Path) -> Result<crate::tls::Identity, PkiError> {
    let id =
        crate::tls::Identity::load(chain_path, pending_key).map_err(|e| PkiError::Invalid(e.to_string()))?;
    for pair in id.chain.windows(2) {
        fn parse<'a>(
            der: &'a [u8],
            path: &Path,
        ) -> Result<x509_parser::certificate::X509Certificate<'a>, PkiError> {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c)
                .map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))
        }
        let (child, parent) = (parse(&pair[0], chain_path)?, parse(&pair[1], chain_path)?);
        child.verify_signature(Some(parent.public_key())).map_err(|_| {
            PkiError::Invalid(format!(
                "{}: '{}' is not signed by the next certificate in the chain ('{}')",
                chain_path.display(),
                child.subject(),
                parent.subject()
            ))
        })?;
    }
    Ok(id)
}
