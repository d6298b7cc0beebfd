//! Delivery errors: a kind that survives to the audit log and metrics, who is to blame, and
//! whether a retry can help — decided from the kind, never from message text.

use std::error::Error as StdError;
use std::fmt;

use rustls::AlertDescription;
use serde::{Deserialize, Serialize};

type BoxError = Box<dyn StdError + Send + Sync>;

/// What went wrong, as operators count it. The serialised names are those of
/// [`ErrorKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The URL cannot be delivered to (not https, no host, bad port).
    InvalidUrl,
    /// The host name did not resolve.
    Dns,
    /// TCP connect failed (refused, unreachable).
    Connect,
    /// The request did not complete within its timeout.
    Timeout,
    /// The TLS handshake failed for a reason not covered below.
    TlsHandshake,
    /// The server's certificate was not acceptable (untrusted, expired, wrong name).
    ServerCertificate,
    /// mTLS is on and the receiver did not ask for a client certificate.
    MtlsNotRequested,
    /// The receiver refused our client certificate (TLS alert).
    ClientCertRejected,
    /// The connection broke or the peer spoke bad HTTP.
    Protocol,
    /// The receiver answered with a non-2xx status.
    HttpStatus,
    /// The response body exceeded the limit we read.
    ResponseTooLarge,
    /// The request could not be built (bad header, bad body source).
    InvalidRequest,
    /// No credential could be obtained (token endpoint refused or unreachable).
    Auth,
    /// The destination is refused by the egress policy (never retried).
    EgressDenied,
    /// Source addresses are pinned, but none of the destination's address family.
    NoSourceAddress,
    /// The gateway failed inside (a bug caught at the attempt's edge): the attempt is failed,
    /// audited and retried like any other, and the rest of the dataflow goes on.
    Internal,
}

/// The class of a failed attempt, as operators act on it: filter dead letters by it, replay
/// by it, and let it decide whether a dataflow pauses (docs/design-notes.md, "Endpoint
/// health").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The receiver answered and refused (4xx other than 408 and 429): resending as is will
    /// not help.
    Refused,
    /// The receiver could not be reached or could not answer now (5xx, 408, 429, timeout,
    /// reset, refused connection, DNS).
    Unavailable,
    /// TLS or a certificate: the receiver's is untrusted or wrong, or it rejected ours.
    Certificate,
    /// Our own policy refused the attempt (egress denied, mTLS not requested, no source
    /// address of the destination's family).
    Policy,
    /// The gateway failed inside, or could not build the request.
    Internal,
}

impl FailureClass {
    pub const ALL: [FailureClass; 5] = [
        FailureClass::Refused,
        FailureClass::Unavailable,
        FailureClass::Certificate,
        FailureClass::Policy,
        FailureClass::Internal,
    ];

    /// The stable name used in dead letters, filters, events and `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Refused => "refused",
            FailureClass::Unavailable => "unavailable",
            FailureClass::Certificate => "certificate",
            FailureClass::Policy => "policy",
            FailureClass::Internal => "internal",
        }
    }

    /// The class of an attempt that failed with `kind` (and `status`, for HTTP answers).
    pub fn of(kind: ErrorKind, status: Option<u16>) -> FailureClass {
        let refused = |s: u16| (400..500).contains(&s) && s != 408 && s != 429;
        match kind {
            ErrorKind::HttpStatus | ErrorKind::Auth => match status {
                Some(s) if refused(s) => FailureClass::Refused,
                _ => FailureClass::Unavailable,
            },
            ErrorKind::ResponseTooLarge => FailureClass::Refused,
            ErrorKind::Dns | ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Protocol => {
                FailureClass::Unavailable
            }
            ErrorKind::TlsHandshake | ErrorKind::ServerCertificate | ErrorKind::ClientCertRejected => {
                FailureClass::Certificate
            }
            ErrorKind::MtlsNotRequested | ErrorKind::EgressDenied | ErrorKind::NoSourceAddress => {
                FailureClass::Policy
            }
            ErrorKind::InvalidUrl | ErrorKind::InvalidRequest | ErrorKind::Internal => FailureClass::Internal,
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FailureClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FailureClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown failure class '{s}' (one of: {})",
                    FailureClass::ALL.map(FailureClass::as_str).join(", ")
                )
            })
    }
}

/// Who must act to fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    Receiver,
    Network,
    Gateway,
}

impl ErrorKind {
    /// The stable name used in audit records, metrics and `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidUrl => "invalid_url",
            ErrorKind::Dns => "dns",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TlsHandshake => "tls_handshake",
            ErrorKind::ServerCertificate => "server_certificate",
            ErrorKind::MtlsNotRequested => "mtls_not_requested",
            ErrorKind::ClientCertRejected => "client_cert_rejected",
            ErrorKind::Protocol => "protocol",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::ResponseTooLarge => "response_too_large",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Auth => "auth",
            ErrorKind::EgressDenied => "egress_denied",
            ErrorKind::NoSourceAddress => "no_source_address",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn blame(self) -> Blame {
        match self {
            ErrorKind::InvalidUrl
            | ErrorKind::InvalidRequest
            | ErrorKind::EgressDenied
            | ErrorKind::NoSourceAddress
            | ErrorKind::Internal => Blame::Gateway,
            ErrorKind::Dns | ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Protocol => Blame::Network,
            ErrorKind::TlsHandshake
            | ErrorKind::ServerCertificate
            | ErrorKind::MtlsNotRequested
            | ErrorKind::ClientCertRejected
            | ErrorKind::HttpStatus
            | ErrorKind::ResponseTooLarge
            | ErrorKind::Auth => Blame::Receiver,
        }
    }

    /// Whether sending the same request again may succeed without anyone changing config.
    /// A receiver that is not mTLS-only, or a malformed request, will not fix itself.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            ErrorKind::InvalidUrl
                | ErrorKind::InvalidRequest
                | ErrorKind::MtlsNotRequested
                | ErrorKind::EgressDenied
                | ErrorKind::NoSourceAddress
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed delivery attempt.
#[derive(Debug)]
pub struct DeliveryError {
    kind: ErrorKind,
    message: String,
    status: Option<u16>,
    retry_after: Option<std::time::Duration>,
    source: Option<BoxError>,
}

impl DeliveryError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DeliveryError {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub(crate) fn with_retry_after(mut self, after: Option<std::time::Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// The receiver's `Retry-After`, when it sent one with a failed answer.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The HTTP status, for [`ErrorKind::HttpStatus`].
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    pub fn retryable(&self) -> bool {
        self.kind.retryable()
    }

    pub fn class(&self) -> FailureClass {
        FailureClass::of(self.kind, self.status)
    }

    /// Classify an error that came out of hyper or the connector by walking its cause chain:
    /// our own connector errors keep their kind; rustls and io errors are mapped by type.
    pub(crate) fn classify(err: BoxError, context: &str) -> Self {
        let (kind, detail) = classify_chain(err.as_ref());
        DeliveryError {
            kind,
            message: format!("{context}: {detail}"),
            status: None,
            retry_after: None,
            source: Some(err),
        }
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl StdError for DeliveryError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn StdError + 'static))
    }
}

fn classify_chain(err: &(dyn StdError + 'static)) -> (ErrorKind, String) {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    let mut fallback = (ErrorKind::Protocol, err.to_string());
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<DeliveryError>() {
            return (d.kind, d.message.clone());
        }
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return classify_rustls(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // rustls errors reach hyper wrapped in io::Error.
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return classify_rustls(t);
            }
            if io.kind() == std::io::ErrorKind::TimedOut {
                fallback = (ErrorKind::Timeout, io.to_string());
            } else {
                fallback = (ErrorKind::Protocol, io.to_string());
            }
        }
        cur = e.source();
    }
    fallback
}

/// Map a rustls error to a kind and an operator-facing sentence.
pub(crate) fn classify_rustls(err: &rustls::Error) -> (ErrorKind, String) {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(c) => (
            ErrorKind::ServerCertificate,
            format!("the receiver's certificate was rejected: {c:?}"),
        ),
        E::AlertReceived(
            a @ (AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired),
        ) => (
            ErrorKind::ClientCertRejected,
            format!("the receiver refused our client certificate (TLS alert {a:?})"),
        ),
        other => (ErrorKind::TlsHandshake, format!("TLS failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_kind_through_io_wrapping() {
        let tls = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let e = DeliveryError::classify(Box::new(io), "sending");
        assert_eq!(e.kind(), ErrorKind::ClientCertRejected);
        let inner = DeliveryError::new(ErrorKind::MtlsNotRequested, "no CertificateRequest");
        let e = DeliveryError::classify(Box::new(inner), "connecting");
        assert_eq!(e.kind(), ErrorKind::MtlsNotRequested);
        assert!(!e.retryable());
    }
}
