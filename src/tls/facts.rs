//! What a certificate says about itself, read with x509-parser: the facts receivers pin and
//! operators check (subject CN, SANs by kind, issuer, serial, validity, SHA-256 fingerprint).

use std::net::IpAddr;

use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Subject alternative names grouped by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Sans {
    pub dns: Vec<String>,
    pub ip: Vec<String>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
}

impl Sans {
    /// True when the certificate carries no SAN of any kind.
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ip.is_empty() && self.uri.is_empty() && self.email.is_empty()
    }
}

/// The facts of one X.509 certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertFacts {
    /// First subject common name, if any.
    pub subject_cn: Option<String>,
    /// The whole subject DN in RFC 4514 order as x509-parser prints it.
    pub subject: String,
    pub issuer: String,
    /// Serial number, colon-separated hex.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub sans: Sans,
    /// SHA-256 over the DER, colon-separated upper-case hex (the form `openssl x509
    /// -fingerprint -sha256` prints).
    pub sha256_fingerprint: String,
    /// True when basicConstraints says CA:TRUE.
    pub is_ca: bool,
}

impl CertFacts {
    /// Read the facts of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let subject_cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut sans = Sans::default();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.dns.push((*d).to_owned()),
                    GeneralName::URI(u) => sans.uri.push((*u).to_owned()),
                    GeneralName::RFC822Name(e) => sans.email.push((*e).to_owned()),
                    GeneralName::IPAddress(b) => sans.ip.push(ip_to_string(b)),
                    _ => {}
                }
            }
        }
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        Ok(CertFacts {
            subject_cn,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: {
                // DER puts a 00 byte before a positive number whose top bit is set; the serial
                // is the number, as `openssl x509 -serial` prints it.
                let raw = match cert.raw_serial() {
                    [0, rest @ ..] if !rest.is_empty() => rest,
                    raw => raw,
                };
                x509_parser::utils::format_serial(raw)
            },
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            sans,
            sha256_fingerprint: sha256_fingerprint(der),
            is_ca,
        })
    }

    /// A short name for messages: the CN, else the subject DN.
    pub fn display_name(&self) -> &str {
        self.subject_cn.as_deref().unwrap_or(&self.subject)
    }

    /// Whole days from `now` until `not_after` (negative once expired).
    pub fn days_to_expiry(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }
}

/// SHA-256 of `der` as colon-separated upper-case hex.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(95);
    for (i, b) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02X}"));
    }
    out
}

fn ip_to_string(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(bytes);
            IpAddr::from(a).to_string()
        }
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            IpAddr::from(a).to_string()
        }
        // Name constraints carry address+mask; a SAN should not, but say what it is.
        _ => format!("<{} bytes>", bytes.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_matches_known_sha256_of_empty_input() {
        assert_eq!(
            sha256_fingerprint(b""),
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }

    /// A serial whose first byte has its top bit set is stored with a 00 byte in front (DER);
    /// the serial shown is the number, as `openssl x509 -serial` shows it.
    #[test]
    fn serial_is_the_number_without_the_der_sign_byte() {
        let facts = |serial: &[u8]| {
            let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).expect("params");
            p.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = p.self_signed(&key).expect("cert");
            CertFacts::from_der(cert.der()).expect("facts").serial
        };
        assert_eq!(facts(&[0x97, 0xf8, 0x01]), "97:f8:01");
        assert_eq!(facts(&[0x17, 0xf8]), "17:f8");
    }
}
