//! The unauthenticated listener: health and readiness (the certificate and egress-IP
//! documents join it with the identity and egress work). Answers GET only.

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;

use super::{error_reply, json_reply, Handler};
use crate::export::Engine;

/// Where Adobe publishes its HTTP destination's certificate; Sallyport answers the same.
pub const ADOBE_PATH: &str = "/data/core/mtls/v1/certificate/public-certificate";
/// Largest `limit` a page may ask for.
pub const MAX_LIMIT: usize = 100;

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// PEM text of DER certificates.
pub fn pem_of(chain: &[rustls_pki_types::CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for c in chain {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The identity a request asks for with `?identity=NAME` (the gateway's own by default).
fn identity(
    engine: &Engine,
    query: Option<&str>,
) -> Result<Arc<crate::tls::creds::IdentityStore>, Box<super::Reply>> {
    let name = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "identity")
        .map_or_else(|| crate::tls::creds::DEFAULT.to_owned(), |(_, v)| v.into_owned());
    engine.identity_named(&name).ok_or_else(|| {
        Box::new(error_reply(
            StatusCode::NOT_FOUND,
            format!("no client identity named '{name}'"),
        ))
    })
}

/// One certificate with every fact receivers pin or check.
fn certificate_doc(role: crate::tls::creds::Role, id: &crate::tls::Identity) -> serde_json::Value {
    let f = &id.facts;
    json!({
        "role": role, "subjectCn": f.subject_cn, "subject": f.subject, "sans": f.sans, "issuer": f.issuer,
        "serial": f.serial, "notBefore": rfc3339(f.not_before), "notAfter": rfc3339(f.not_after),
        "sha256Fingerprint": f.sha256_fingerprint, "pem": pem_of(&id.chain),
    })
}

/// `GET …/public-certificate?page=N&limit=M`, in Adobe's shape. `page` counts from 0.
fn adobe_certificates(store: &crate::tls::creds::IdentityStore, query: Option<&str>) -> super::Reply {
    let (mut page, mut limit) = (0usize, 10usize);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "page" => match v.parse::<usize>() {
                Ok(p) => page = p,
                Err(_) => {
                    return error_reply(
                        StatusCode::BAD_REQUEST,
                        format!("page must be a whole number from 0, not '{v}'"),
                    )
                }
            },
            "limit" => match v.parse::<usize>() {
                Ok(l) if (1..=MAX_LIMIT).contains(&l) => limit = l,
                _ => {
                    return error_reply(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be 1..={MAX_LIMIT}, not '{v}'"),
                    )
                }
            },
            _ => {}
        }
    }
    let all = store.published();
    let total = all.len();
    let results: Vec<serde_json::Value> = all
        .iter()
        .skip(page.saturating_mul(limit))
        .take(limit)
        .map(|(_, id)| {
            json!({
                "certCommonName": id.facts.subject_cn,
                "publicCertificate": pem_of(&id.chain[..1]),
                "expiryDate": rfc3339(id.facts.not_after),
            })
        })
        .collect();
    // Adobe's shape: each link is {"href", "templated"}, or null at either end.
    let link = |p: usize| json!({"href": format!("{ADOBE_PATH}?page={p}&limit={limit}"), "templated": false});
    let next = ((page + 1).saturating_mul(limit) < total).then(|| link(page + 1));
    let prev = (page > 0).then(|| link((page - 1).min(total.div_ceil(limit).saturating_sub(1))));
    json_reply(
        StatusCode::OK,
        &json!({"results": results, "total": total, "count": results.len(), "_links": {"next": next, "prev": prev}}),
    )
}

/// The public API's handler.
pub fn handler(engine: Engine, egress_ips: Vec<std::net::IpAddr>) -> Handler {
    let egress_doc = Arc::new(crate::egress::egress_ips_document(&egress_ips));
    Arc::new(move |req| {
        let engine = engine.clone();
        let egress_doc = egress_doc.clone();
        Box::pin(async move {
            if req.method() != Method::GET {
                return error_reply(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here");
            }
            match req.uri().path() {
                "/healthz" => json_reply(StatusCode::OK, &json!({"status": "ok"})),
                "/v1/egress-ips" => json_reply(StatusCode::OK, &egress_doc),
                ADOBE_PATH => match identity(&engine, req.uri().query()) {
                    Ok(store) => adobe_certificates(&store, req.uri().query()),
                    Err(reply) => *reply,
                },
                "/v1/certificate" => match identity(&engine, req.uri().query()) {
                    Ok(store) => json_reply(
                        StatusCode::OK,
                        &json!({"certificates": store.published().iter().map(|(role, id)| certificate_doc(*role, id)).collect::<Vec<_>>()}),
                    ),
                    Err(reply) => *reply,
                },
                "/readyz" => match engine.pending().await {
                    Ok(pending) => json_reply(
                        StatusCode::OK,
                        &json!({"status": "ready", "pendingDeliveries": pending}),
                    ),
                    Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, format!("store not ready: {e}")),
                },
                _ => error_reply(StatusCode::NOT_FOUND, "no such resource"),
            }
        })
    })
}
