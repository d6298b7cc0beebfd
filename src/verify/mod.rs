//! `sallyport verify`: is a receiving endpoint ready for mTLS delivery? Each check reports
//! pass / warn / fail with a reason an operator can act on.
//!
//! The chain is judged by a recording verifier that runs the real WebPKI verification, keeps
//! its verdict and the chain, and lets the handshake continue so the rest can still be
//! checked. It is used here only, never on the delivery path.
//!
//! Must never: send profile data (the optional test request carries `{}`), or report an
//! endpoint as mTLS-only when it answered a certless request with 2xx/3xx.

mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use rustls::pki_types::CertificateDer;

use crate::egress::Egress;
use crate::tls::{CertFacts, Identity, Trust};

pub use probe::{alert_name, Probe, ProbeOutcome};

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// What a failed (or warned) check comes down to, so the operator knows whose move it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The receiver refused our client certificate, or will not accept its issuer.
    OurCertificateRejected,
    /// The receiver's certificate is not trusted, expired, or does not name the host.
    ReceiverCertificate,
    /// The receiver's TLS set-up: it does not ask for client certificates, does not require
    /// them, or speaks no TLS version we accept.
    ReceiverSetup,
    /// Name resolution, the egress policy, TCP, or a connection cut or silent.
    Network,
    /// The receiver answered with an HTTP error.
    Http,
}

impl Cause {
    /// How the table names it.
    pub fn label(self) -> &'static str {
        match self {
            Cause::OurCertificateRejected => "our certificate rejected",
            Cause::ReceiverCertificate => "receiver's certificate",
            Cause::ReceiverSetup => "receiver's TLS set-up",
            Cause::Network => "network",
            Cause::Http => "HTTP",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// For a failed or warned check: what kind of problem it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<Cause>,
    /// For a failed or warned check: one line on how to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The post-quantum hybrid key exchange rustls prefers where its provider has it.
pub const PQ_HYBRID: &str = "X25519MLKEM768";

/// Was the post-quantum hybrid group offered on our ClientHello, and accepted?
#[derive(Debug, Clone, Serialize)]
pub struct PostQuantum {
    pub group: &'static str,
    pub offered: bool,
    pub accepted: bool,
    pub note: String,
}

/// The first failure, as the report's one-line answer.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub check: &'static str,
    pub class: Cause,
    pub fix: String,
}

/// Facts of the connection that presented our certificate, beside the checks.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostics {
    /// The CA names the receiver listed in its CertificateRequest (`None`: it sent none).
    pub requested_cas: Option<Vec<String>>,
    /// Whether our chain (its issuers, and its CA certificates) names one of them (`None`:
    /// no certificate of ours, or no names listed).
    pub chain_leads_to_requested_ca: Option<bool>,
    pub key_exchange_group: Option<String>,
    pub post_quantum: PostQuantum,
    pub alpn: Option<String>,
    /// The TLS alert the receiver sent, by its RFC name and number (`bad_certificate (42)`).
    pub alert: Option<String>,
    /// The address our connection left from.
    pub source_address: Option<String>,
    /// The addresses the gateway publishes (`/v1/egress-ips`); `None` without `--config`.
    pub egress_list: Option<Vec<String>>,
    /// Whether `source_address` is one of them (`None` without `--config`, or when the list
    /// is empty).
    pub source_in_egress_list: Option<bool>,
    /// The first failed check: its class and how to fix it.
    pub failure: Option<Failure>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub checks: Vec<Check>,
    pub diagnostics: Diagnostics,
    pub ok: bool,
}

impl Diagnostics {
    fn new(policy: bool, egress: &Egress) -> Self {
        Diagnostics {
            requested_cas: None,
            chain_leads_to_requested_ca: None,
            key_exchange_group: None,
            post_quantum: post_quantum(None),
            alpn: None,
            alert: None,
            source_address: None,
            egress_list: policy.then(|| egress.source_ips().iter().map(ToString::to_string).collect()),
            source_in_egress_list: None,
            failure: None,
        }
    }
}

/// Whether this build offers [`PQ_HYBRID`] (its crypto provider has the group), and whether
/// `negotiated` is it.
pub fn post_quantum(negotiated: Option<&str>) -> PostQuantum {
    let offered = crate::tls::provider()
        .kx_groups
        .iter()
        .any(|g| g.name() == rustls::NamedGroup::X25519MLKEM768);
    let accepted = negotiated == Some(PQ_HYBRID);
    let note = match (offered, accepted, negotiated) {
        (false, _, _) => "not offered by this build: its crypto provider (ring) has no ML-KEM, so only classical groups (X25519, secp256r1, secp384r1) are offered".to_owned(),
        (true, true, _) => "offered and accepted".to_owned(),
        (true, false, Some(g)) => format!("offered; the receiver chose {g}"),
        (true, false, None) => "offered; no handshake completed".to_owned(),
    };
    PostQuantum {
        group: PQ_HYBRID,
        offered,
        accepted,
        note,
    }
}

/// What to verify with.
pub struct Options {
    pub url: url::Url,
    pub identity: Option<Identity>,
    pub trust: Trust,
    pub timeout: Duration,
    /// What the probes connect through: the config's egress policy and source pins (with
    /// `--config`), else one that lets them go where the operator pointed.
    pub egress: Arc<Egress>,
    /// `egress` is the gateway's policy, to be reported on (with `--config`).
    pub policy: bool,
    /// Send one test request through the delivery core.
    pub send_test: Option<crate::delivery::DeliveryClient>,
}

/// Days to expiry under which a certificate is a warning.
pub const EXPIRY_WARN_DAYS: i64 = 30;

/// Run every check against the endpoint.
pub async fn run(opts: Options) -> Report {
    let mut checks = Vec::new();
    let mut push = |name, status, detail: String| {
        checks.push(Check {
            name,
            status,
            detail,
            class: None,
            fix: None,
        })
    };
    let mut diag = Diagnostics::new(opts.policy, &opts.egress);
    let host = opts
        .url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = opts.url.port_or_known_default().unwrap_or(443);
    let ctx = Context {
        host: host.clone(),
        port,
        presented: opts.identity.is_some(),
        trust: opts.trust.describe(),
    };
    let finish = |url: &url::Url, mut checks: Vec<Check>, mut diag: Diagnostics, seen: Seen| {
        explain(&mut checks, &ctx, &seen);
        diag.failure = checks.iter().find(|c| c.status == Status::Fail).and_then(|c| {
            Some(Failure {
                check: c.name,
                class: c.class?,
                fix: c.fix.clone()?,
            })
        });
        Report {
            url: url.to_string(),
            ok: checks.iter().all(|c| c.status != Status::Fail),
            checks,
            diagnostics: diag,
        }
    };
    let mut seen = Seen::default();

    // 1. Resolution and destination policy. The probes connect through the delivery core's
    // connector, to allowed addresses only, from the pinned source address: a refused
    // destination is a failed check, never a connection.
    let egress = &opts.egress;
    let addrs = match tokio::time::timeout(opts.timeout, egress.resolve(&host, port)).await {
        Ok(Ok(a)) if !a.is_empty() => a,
        Ok(Ok(_)) => {
            push("dns", Status::Fail, format!("{host} resolved to no address"));
            return finish(&opts.url, checks, diag, seen);
        }
        Ok(Err(e)) => {
            push("dns", Status::Fail, format!("{host} does not resolve: {e}"));
            return finish(&opts.url, checks, diag, seen);
        }
        Err(_) => {
            push(
                "dns",
                Status::Fail,
                format!("resolving {host} took longer than {:?}", opts.timeout),
            );
            return finish(&opts.url, checks, diag, seen);
        }
    };
    let listed = addrs
        .iter()
        .map(|a| a.ip().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let (allowed, denied): (Vec<_>, Vec<_>) = addrs
        .iter()
        .map(|a| (a.ip(), egress.check(&host, a.ip())))
        .partition(|(_, verdict)| verdict.is_ok());
    if allowed.is_empty() {
        let why = denied
            .into_iter()
            .find_map(|(_, v)| v.err())
            .map_or_else(|| "no address allowed".to_owned(), |d| d.to_string());
        push(
            "dns",
            Status::Fail,
            format!("{host} → {listed}; {why}; no connection was made"),
        );
        return finish(&opts.url, checks, diag, seen);
    }
    let allowed_list = allowed
        .iter()
        .map(|(ip, _)| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if opts.policy {
        let sources = egress.source_ips();
        let from = if sources.is_empty() {
            String::new()
        } else {
            format!(
                ", from {}",
                sources
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        push(
            "dns",
            Status::Pass,
            format!("{host} → {listed}; the egress policy allows {allowed_list}{from}"),
        );
    } else {
        push(
            "dns",
            Status::Pass,
            format!("{host} → {listed} (no --config: egress policy not applied)"),
        );
    }

    // 2.–5., 7. A connection presenting our certificate (if any).
    let ours = Probe::new(opts.trust.clone(), opts.identity.as_ref(), opts.timeout);
    let with_cert = ours.run(egress, &host, port).await;
    report_connection(&mut push, &with_cert, opts.timeout, &host, opts.identity.as_ref());
    describe_connection(&mut diag, &with_cert, opts.identity.as_ref());
    seen.alert = with_cert.alert;
    seen.chain_failed = matches!(with_cert.chain_verdict, Some(Err(_)));
    let Some(tls) = &with_cert.tls else {
        return finish(&opts.url, checks, diag, seen);
    };

    // 6. mTLS-only: a second connection without a certificate must be refused.
    let bare = Probe::new(opts.trust.clone(), None, opts.timeout)
        .run(egress, &host, port)
        .await;
    match (&bare.tls, &bare.http) {
        (None, _) => push("mtls_only", Status::Pass, format!("refused without a client certificate: {}", bare.error_text())),
        (Some(_), Some(Ok(code))) if (200..400).contains(code) => push(
            "mtls_only",
            Status::Fail,
            format!("endpoint is not mTLS-only: it answered HTTP {code} to a request without a client certificate"),
        ),
        (Some(_), Some(Ok(code))) => push("mtls_only", Status::Pass, format!("refused at the HTTP layer without a client certificate (HTTP {code})")),
        (Some(_), Some(Err(e))) => push("mtls_only", Status::Pass, format!("refused without a client certificate: {e}")),
        (Some(_), None) => push("mtls_only", Status::Warn, "the certless connection gave no answer in time".into()),
    }

    // 7b. A certificate from a CA nobody trusts must be refused too.
    if tls.client_cert_requested {
        match throwaway_identity() {
            Ok(foreign) => {
                let f = Probe::new(opts.trust.clone(), Some(&foreign), opts.timeout)
                    .run(egress, &host, port)
                    .await;
                match (&f.tls, &f.http) {
                    (Some(_), Some(Ok(code))) if (200..400).contains(code) => push(
                        "foreign_cert_refused",
                        Status::Fail,
                        format!(
                            "a self-signed client certificate from an unknown CA was accepted (HTTP {code})"
                        ),
                    ),
                    _ => push(
                        "foreign_cert_refused",
                        Status::Pass,
                        format!("a self-signed certificate is refused: {}", f.error_text()),
                    ),
                }
            }
            Err(e) => push(
                "foreign_cert_refused",
                Status::Warn,
                format!("could not make a throwaway certificate: {e}"),
            ),
        }
    }

    // 8. One test request through the delivery core.
    if let Some(client) = opts.send_test {
        let started = Instant::now();
        let req = crate::delivery::OutboundRequest {
            method: http::Method::POST,
            url: opts.url.clone(),
            headers: {
                let mut h = http::HeaderMap::new();
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                h
            },
            body: bytes::Bytes::from_static(b"{}"),
        };
        match client.send(req).await {
            Ok(d) if d.status.is_success() => push(
                "send_test",
                Status::Pass,
                format!(
                    "HTTP {} in {} ms",
                    d.status.as_u16(),
                    started.elapsed().as_millis()
                ),
            ),
            Ok(d) => {
                seen.send_test = Some(
                    d.error()
                        .map_or(crate::delivery::ErrorKind::HttpStatus, |e| e.kind()),
                );
                push(
                    "send_test",
                    Status::Fail,
                    d.error().map_or_else(|| d.status.to_string(), |e| e.to_string()),
                )
            }
            Err(e) => {
                seen.send_test = Some(e.kind());
                push("send_test", Status::Fail, e.to_string())
            }
        }
    }
    finish(&opts.url, checks, diag, seen)
}

fn report_connection(
    push: &mut impl FnMut(&'static str, Status, String),
    p: &ProbeOutcome,
    budget: Duration,
    host: &str,
    identity: Option<&Identity>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match p.connect {
        Some(d) => push(
            "tcp_connect",
            if d < budget { Status::Pass } else { Status::Fail },
            format!(
                "{:.1} ms to {} (from {})",
                ms(d),
                p.remote.map_or("?".into(), |r| r.to_string()),
                p.local.map_or("?".into(), |l| l.ip().to_string())
            ),
        ),
        None => {
            push("tcp_connect", Status::Fail, p.error_text());
            return;
        }
    }
    let Some(tls) = &p.tls else {
        push("tls_handshake", Status::Fail, p.error_text());
        if !p.chain.is_empty() {
            report_chain(push, p, host);
        }
        return;
    };
    let old = matches!(tls.version.as_str(), "TLSv1_0" | "TLSv1_1");
    push(
        "tls_handshake",
        if old || tls.elapsed >= budget {
            Status::Fail
        } else {
            Status::Pass
        },
        format!(
            "{} {} ALPN {} in {:.1} ms",
            tls.version,
            tls.cipher,
            tls.alpn.as_deref().unwrap_or("none"),
            ms(tls.elapsed)
        ),
    );
    report_chain(push, p, host);
    // 5. Client certificate request and acceptable CAs.
    if tls.client_cert_requested {
        let names: Vec<String> = tls.acceptable_issuers.iter().map(|d| decode_dn(d)).collect();
        let leads = identity.and_then(|i| chain_leads_to(&i.chain, &tls.acceptable_issuers));
        let detail = if names.is_empty() {
            "the server requested a client certificate (no CA names listed)".to_owned()
        } else {
            format!(
                "the server requested a client certificate; acceptable CAs: {}{}",
                names.join("; "),
                match &leads {
                    Some(Some(ca)) => format!(" (our chain leads to {ca})"),
                    Some(None) => " (our chain does NOT lead to any of them)".to_owned(),
                    None => String::new(),
                }
            )
        };
        let status = if matches!(leads, Some(None)) {
            Status::Warn
        } else {
            Status::Pass
        };
        push("client_cert_requested", status, detail);
    } else {
        push(
            "client_cert_requested",
            Status::Fail,
            "the server did not request a client certificate (no CertificateRequest)".into(),
        );
    }
    // 7. Our certificate accepted?
    if identity.is_some() && tls.client_cert_requested {
        match &p.http {
            Some(Ok(400)) | Some(Ok(495)) | Some(Ok(496)) => push(
                "client_cert_accepted",
                Status::Fail,
                format!(
                    "the server refused our certificate at the HTTP layer (HTTP {})",
                    p.http_code_text()
                ),
            ),
            Some(Ok(code)) => push(
                "client_cert_accepted",
                Status::Pass,
                format!("handshake accepted; HTTP {code} to a test GET"),
            ),
            Some(Err(e)) => push(
                "client_cert_accepted",
                Status::Fail,
                format!("the server refused our certificate: {e}"),
            ),
            None => push(
                "client_cert_accepted",
                Status::Warn,
                "handshake accepted; no HTTP answer in time".into(),
            ),
        }
    }
}

fn report_chain(push: &mut impl FnMut(&'static str, Status, String), p: &ProbeOutcome, host: &str) {
    let now = time::OffsetDateTime::now_utc();
    let facts: Vec<CertFacts> = p
        .chain
        .iter()
        .filter_map(|c| CertFacts::from_der(c).ok())
        .collect();
    let described = facts
        .iter()
        .map(|f| {
            format!(
                "{} (issuer {}; SAN dns {:?} ip {:?}; {} days left)",
                f.display_name(),
                f.issuer,
                f.sans.dns,
                f.sans.ip,
                f.days_to_expiry(now)
            )
        })
        .collect::<Vec<_>>()
        .join(" ← ");
    match &p.chain_verdict {
        Some(Err(e)) => push(
            "server_certificate",
            Status::Fail,
            format!("{e} for {host}: {described}"),
        ),
        Some(Ok(())) => {
            let soonest = facts
                .iter()
                .map(|f| f.days_to_expiry(now))
                .min()
                .unwrap_or(i64::MAX);
            if soonest < EXPIRY_WARN_DAYS {
                push(
                    "server_certificate",
                    Status::Warn,
                    format!("trusted and valid for {host}, but expires in {soonest} days: {described}"),
                );
            } else {
                push(
                    "server_certificate",
                    Status::Pass,
                    format!("trusted and valid for {host}: {described}"),
                );
            }
        }
        None => push(
            "server_certificate",
            Status::Fail,
            "no certificate was received".into(),
        ),
    }
}

fn decode_dn(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::x509::X509Name::from_der(der)
        .map_or_else(|_| format!("<{} bytes>", der.len()), |(_, n)| n.to_string())
}

/// Whether `chain` (ours, leaf first) leads to one of the CA names a receiver asked for:
/// `None` when it listed none, `Some(None)` when ours leads to none of them, else the name
/// it leads to. A chain leads to a CA when one of its certificates was issued by it, or is
/// it. Names are compared as DER, and as text (an encoding may differ, e.g. PrintableString
/// against UTF8String, for the same name).
pub fn chain_leads_to(chain: &[CertificateDer<'_>], requested: &[Vec<u8>]) -> Option<Option<String>> {
    use x509_parser::prelude::FromDer;
    if requested.is_empty() {
        return None;
    }
    let wanted: Vec<(&[u8], String)> = requested.iter().map(|d| (d.as_slice(), decode_dn(d))).collect();
    for (i, der) in chain.iter().enumerate() {
        let Ok((_, c)) = x509_parser::certificate::X509Certificate::from_der(der) else {
            continue;
        };
        let mut names = vec![c.issuer()];
        if i > 0 {
            names.push(c.subject());
        }
        for name in names {
            let text = name.to_string();
            if let Some((_, hit)) = wanted.iter().find(|(raw, t)| *raw == name.as_raw() || *t == text) {
                return Some(Some(hit.clone()));
            }
        }
    }
    Some(None)
}

/// What the verification connection shows beside the checks.
fn describe_connection(diag: &mut Diagnostics, p: &ProbeOutcome, identity: Option<&Identity>) {
    diag.alert = p.alert.map(probe::alert_name);
    if let Some(local) = p.local {
        let ip = local.ip().to_string();
        diag.source_in_egress_list = diag
            .egress_list
            .as_ref()
            .filter(|l| !l.is_empty())
            .map(|l| l.contains(&ip));
        diag.source_address = Some(ip);
    }
    let Some(tls) = &p.tls else {
        return;
    };
    diag.key_exchange_group = tls.key_exchange_group.clone();
    diag.post_quantum = post_quantum(tls.key_exchange_group.as_deref());
    diag.alpn = tls.alpn.clone();
    if tls.client_cert_requested {
        diag.requested_cas = Some(tls.acceptable_issuers.iter().map(|d| decode_dn(d)).collect());
        diag.chain_leads_to_requested_ca = identity
            .and_then(|i| chain_leads_to(&i.chain, &tls.acceptable_issuers))
            .map(|hit| hit.is_some());
    }
}

/// What `explain` needs to know about the run.
struct Context {
    host: String,
    port: u16,
    presented: bool,
    trust: String,
}

/// What the connections saw that decides a failure's class.
#[derive(Default)]
struct Seen {
    alert: Option<rustls::AlertDescription>,
    chain_failed: bool,
    send_test: Option<crate::delivery::ErrorKind>,
}

/// Alerts by which a receiver says it does not accept the certificate we presented (or
/// wanted one we did not present).
fn refuses_our_certificate(a: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        a,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::DecryptError
    )
}

const FIX_OUR_CERT: &str = "give the receiver's operator the CA that issued our certificate (`sallyport cert fetch` prints what to trust), or present an identity issued by one of the CAs it asks for";

/// Give every failed or warned check its class and one line on how to fix it.
fn explain(checks: &mut [Check], ctx: &Context, seen: &Seen) {
    use crate::delivery::ErrorKind as K;
    let hostport = format!("{}:{}", ctx.host, ctx.port);
    for c in checks.iter_mut().filter(|c| c.status != Status::Pass) {
        let (class, fix) = match c.name {
            "dns" if c.detail.contains("egress policy") || c.detail.contains("no connection was made") => (
                Cause::Network,
                format!("allow {} (or its address) in [egress] allow, or point at a host the policy allows", ctx.host),
            ),
            "dns" => (
                Cause::Network,
                format!("check the host name {} and this machine's resolver", ctx.host),
            ),
            "tcp_connect" => (
                Cause::Network,
                format!("check that the receiver listens on {hostport} and that firewalls let our source address through"),
            ),
            "tls_handshake" => match seen.alert {
                Some(a) if ctx.presented && refuses_our_certificate(a) => {
                    (Cause::OurCertificateRejected, FIX_OUR_CERT.to_owned())
                }
                _ if c.detail.contains("TLS 1.0/1.1") => {
                    (Cause::ReceiverSetup, "the receiver must offer TLS 1.2 or 1.3".to_owned())
                }
                _ if seen.chain_failed => (
                    Cause::ReceiverCertificate,
                    format!("the receiver's certificate must chain to {} and name {}", ctx.trust, ctx.host),
                ),
                Some(_) => (
                    Cause::ReceiverSetup,
                    "compare the receiver's TLS settings with ours: TLS 1.2/1.3, groups X25519, P-256, P-384".to_owned(),
                ),
                None => (
                    Cause::Network,
                    format!("the connection to {hostport} was cut or went silent: look for a proxy or load balancer in front that does not speak TLS"),
                ),
            },
            "server_certificate" => {
                let fix = if c.detail.contains("does not name this host") {
                    format!("the receiver's certificate must name {} in its subjectAltName (or use the host name it names)", ctx.host)
                } else if c.detail.contains("expired") || c.detail.contains("expires") || c.detail.contains("not valid yet") {
                    "the receiver must renew its certificate".to_owned()
                } else {
                    format!("trust the CA that issued the receiver's certificate (--ca, or the dataflow's ca; now: {})", ctx.trust)
                };
                (Cause::ReceiverCertificate, fix)
            }
            "client_cert_requested" if c.status == Status::Warn => (Cause::OurCertificateRejected, FIX_OUR_CERT.to_owned()),
            "client_cert_requested" => (
                Cause::ReceiverSetup,
                "the receiver must request client certificates (nginx: ssl_client_certificate and ssl_verify_client on)".to_owned(),
            ),
            "client_cert_accepted" => (Cause::OurCertificateRejected, FIX_OUR_CERT.to_owned()),
            "mtls_only" | "foreign_cert_refused" => (
                Cause::ReceiverSetup,
                "the receiver must refuse connections without a client certificate from the CA it trusts (nginx: ssl_verify_client on, not optional)".to_owned(),
            ),
            "send_test" => match seen.send_test {
                Some(K::ClientCertRejected) => (Cause::OurCertificateRejected, FIX_OUR_CERT.to_owned()),
                Some(K::ServerCertificate) => (
                    Cause::ReceiverCertificate,
                    format!("the receiver's certificate must chain to {} and name {}", ctx.trust, ctx.host),
                ),
                Some(K::MtlsNotRequested) | Some(K::TlsHandshake) => (
                    Cause::ReceiverSetup,
                    "the receiver must request client certificates over TLS 1.2 or 1.3".to_owned(),
                ),
                Some(K::HttpStatus) | Some(K::Auth) | Some(K::ResponseTooLarge) | Some(K::InvalidRequest) => (
                    Cause::Http,
                    "the receiver answered the test POST of `{}` with an error: check the URL path, its authentication and what body it expects".to_owned(),
                ),
                _ => (
                    Cause::Network,
                    format!("check that {hostport} is reachable from our source address within the timeout"),
                ),
            },
            _ => continue,
        };
        c.class = Some(class);
        c.fix = Some(fix);
    }
}

/// A self-signed client certificate from a CA no receiver trusts.
fn throwaway_identity() -> Result<Identity, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ca = crate::pki::CertAuthority::new("Sallyport verify throwaway CA", 1).map_err(|e| e.to_string())?;
    let pem = ca
        .issue(&crate::pki::LeafSpec::client(
            "sallyport-verify-throwaway",
            vec![],
            vec![],
            1,
        ))
        .map_err(|e| e.to_string())?;
    let (c, k) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    crate::pki::write_public(&c, &pem.cert).map_err(|e| e.to_string())?;
    crate::pki::write_private(&k, &pem.key).map_err(|e| e.to_string())?;
    Identity::load(&c, &k).map_err(|e| e.to_string())
}

/// Render the compact table.
pub fn table(r: &Report) -> String {
    let mut out = format!("{}\n", r.url);
    for c in &r.checks {
        let s = match c.status {
            Status::Pass => "pass",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("  {s:<4}  {:<22} {}\n", c.name, c.detail));
        if let (Some(class), Some(fix)) = (c.class, &c.fix) {
            out.push_str(&format!("        {:<22} {}: {fix}\n", "", class.label()));
        }
    }
    let d = &r.diagnostics;
    if let Some(cas) = &d.requested_cas {
        let leads = match d.chain_leads_to_requested_ca {
            Some(true) => "; our chain leads to one of them",
            Some(false) => "; our chain leads to NONE of them",
            None => "",
        };
        let cas = if cas.is_empty() {
            "(none listed)".to_owned()
        } else {
            cas.join("; ")
        };
        out.push_str(&format!("  requested CAs: {cas}{leads}\n"));
    }
    if let Some(g) = &d.key_exchange_group {
        out.push_str(&format!(
            "  key exchange: {g}; {}: {}\n",
            d.post_quantum.group, d.post_quantum.note
        ));
    }
    if let Some(a) = &d.alert {
        out.push_str(&format!("  TLS alert from the receiver: {a}\n"));
    }
    if let Some(src) = &d.source_address {
        let listed = match (d.source_in_egress_list, &d.egress_list) {
            (Some(true), _) => " (in the published egress list)".to_owned(),
            (Some(false), Some(l)) => format!(" (NOT in the published egress list: {})", l.join(", ")),
            (_, Some(_)) => " (no egress list published: egress.source_ips is empty)".to_owned(),
            (_, None) => " (no --config: egress list not checked)".to_owned(),
        };
        out.push_str(&format!("  source address: {src}{listed}\n"));
    }
    if let Some(f) = &d.failure {
        out.push_str(&format!(
            "  first failure: {} ({}): {}\n",
            f.check,
            f.class.label(),
            f.fix
        ));
    }
    out.push_str(if r.ok {
        "ready for mTLS delivery\n"
    } else {
        "NOT ready: see the failed checks\n"
    });
    out
}
