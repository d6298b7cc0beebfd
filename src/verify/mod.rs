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

use crate::egress::Egress;
use crate::tls::{CertFacts, Identity, Trust};

pub use probe::{Probe, ProbeOutcome};

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub checks: Vec<Check>,
    pub ok: bool,
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
    let mut push = |name, status, detail: String| checks.push(Check { name, status, detail });
    let host = opts
        .url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = opts.url.port_or_known_default().unwrap_or(443);
    let finish = |url: &url::Url, checks: Vec<Check>| Report {
        url: url.to_string(),
        ok: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    };

    // 1. Resolution and destination policy. The probes connect through the delivery core's
    // connector, to allowed addresses only, from the pinned source address: a refused
    // destination is a failed check, never a connection.
    let egress = &opts.egress;
    let addrs = match tokio::time::timeout(opts.timeout, egress.resolve(&host, port)).await {
        Ok(Ok(a)) if !a.is_empty() => a,
        Ok(Ok(_)) => {
            push("dns", Status::Fail, format!("{host} resolved to no address"));
            return finish(&opts.url, checks);
        }
        Ok(Err(e)) => {
            push("dns", Status::Fail, format!("{host} does not resolve: {e}"));
            return finish(&opts.url, checks);
        }
        Err(_) => {
            push(
                "dns",
                Status::Fail,
                format!("resolving {host} took longer than {:?}", opts.timeout),
            );
            return finish(&opts.url, checks);
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
        return finish(&opts.url, checks);
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
    let Some(tls) = &with_cert.tls else {
        return finish(&opts.url, checks);
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
            Ok(d) => push(
                "send_test",
                Status::Fail,
                d.error().map_or_else(|| d.status.to_string(), |e| e.to_string()),
            ),
            Err(e) => push("send_test", Status::Fail, e.to_string()),
        }
    }
    finish(&opts.url, checks)
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
        let ours = identity.and_then(|i| i.chain.first()).and_then(|c| issuer_der(c));
        let listed = ours
            .as_ref()
            .is_some_and(|o| tls.acceptable_issuers.iter().any(|d| d == o));
        let detail = if names.is_empty() {
            "the server requested a client certificate (no CA names listed)".to_owned()
        } else {
            format!(
                "the server requested a client certificate; acceptable CAs: {}{}",
                names.join("; "),
                if identity.is_some() {
                    if listed {
                        " (our issuer is listed)"
                    } else {
                        " (our issuer is NOT listed)"
                    }
                } else {
                    ""
                }
            )
        };
        let status = if identity.is_some() && !names.is_empty() && !listed {
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

fn issuer_der(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some(c.issuer().as_raw().to_vec())
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
    }
    out.push_str(if r.ok {
        "ready for mTLS delivery\n"
    } else {
        "NOT ready: see the failed checks\n"
    });
    out
}
