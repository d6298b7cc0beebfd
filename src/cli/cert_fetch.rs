//! `sallyport cert fetch`: read a gateway's published client certificates the way a
//! receiver's operator would before trusting them — follow the Adobe-shape endpoint's pages,
//! check every certificate is what the endpoint says it is, print its facts, and write a PEM
//! bundle for the receiver's trust store.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::Failure;
use crate::api::public::ADOBE_PATH;
use crate::tls::{pem, CertFacts};

/// Largest answer read from the gateway.
const MAX_BODY: usize = 4 * 1024 * 1024;

pub(super) async fn run(args: super::CertFetchArgs) -> Result<(), Failure> {
    let super::CertFetchArgs {
        url: base,
        out,
        json,
        ca,
        config,
        insecure_http,
    } = args;
    let base = url::Url::parse(&base).map_err(|e| Failure::usage(format!("{base}: not a URL: {e}")))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(Failure::usage("the gateway URL must be http:// or https://"));
    }
    // A trust bundle is what a receiver will accept client certificates by: fetched over
    // plain HTTP, anyone on the path could have put their own certificate in it.
    if base.scheme() == "http" && out.is_some() && !insecure_http {
        return Err(Failure::usage(
            "--out over http:// would write a trust bundle anyone on the path could have changed: \
             fetch it over https:// (with --ca), or pass --insecure-http and compare the fingerprints out of band",
        ));
    }
    let client = Fetcher::new(&base, ca, config.as_deref())?;
    let mut next = Some(format!("{ADOBE_PATH}?page=0&limit=100"));
    let mut certs: Vec<(String, CertFacts)> = Vec::new();
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        if pages > 100 {
            return Err(Failure::failed("more than 100 pages: refusing to follow further"));
        }
        let url = base
            .join(&path)
            .map_err(|e| Failure::failed(format!("bad _links.next '{path}': {e}")))?;
        if url.origin() != base.origin() {
            return Err(Failure::failed(format!(
                "_links.next points to another origin ({url}); not followed"
            )));
        }
        let doc = client.get_json(&url).await?;
        for (i, r) in doc["results"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            certs.push(
                check(r)
                    .map_err(|e| Failure::failed(format!("result {i} is not a valid certificate: {e}")))?,
            );
        }
        next = doc["_links"]["next"]["href"].as_str().map(str::to_owned);
    }
    if certs.is_empty() {
        return Err(Failure::failed("the gateway published no certificate"));
    }
    let egress = client
        .get_json(&base.join("/v1/egress-ips").map_err(Failure::failed)?)
        .await
        .ok();
    let ips: Vec<String> = egress
        .as_ref()
        .and_then(|e| e["egressIps"].as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if let Some(path) = &out {
        let bundle: String = certs.iter().map(|(pem, _)| pem.as_str()).collect();
        crate::pki::write_public(path, &bundle).map_err(Failure::failed)?;
    }
    let now = time::OffsetDateTime::now_utc();
    if json {
        let list: Vec<Value> = certs.iter().map(|(_, f)| serde_json::json!(f)).collect();
        println!("{}", serde_json::json!({"certificates": list, "egressIps": ips}));
    } else {
        for (_, f) in &certs {
            println!("{}", f.display_name());
            println!(
                "  san dns {:?} ip {:?} uri {:?} email {:?}",
                f.sans.dns, f.sans.ip, f.sans.uri, f.sans.email
            );
            println!("  expires {} ({} days left)", f.not_after, f.days_to_expiry(now));
            println!("  sha256  {}", f.sha256_fingerprint);
        }
        if !ips.is_empty() {
            println!("egress IPs to allowlist: {}", ips.join(", "));
        }
        if let Some(p) = &out {
            println!("wrote {} certificate(s) to {}", certs.len(), p.display());
        }
    }
    Ok(())
}

/// A result must hold one parseable certificate whose CN and expiry match what it claims.
fn check(r: &Value) -> Result<(String, CertFacts), String> {
    let pem_text = r["publicCertificate"].as_str().ok_or("no publicCertificate")?;
    let certs = pem::parse_certs(pem_text.as_bytes(), std::path::Path::new("publicCertificate"))
        .map_err(|e| e.to_string())?;
    let facts = CertFacts::from_der(&certs[0])?;
    let cn = r["certCommonName"].as_str().unwrap_or_default();
    if facts.subject_cn.as_deref() != Some(cn) {
        return Err(format!(
            "certCommonName '{cn}' does not match the certificate's CN {:?}",
            facts.subject_cn
        ));
    }
    let claimed = r["expiryDate"]
        .as_str()
        .and_then(crate::profile::update::rfc3339_to_unix_ms)
        .ok_or("no valid expiryDate")?;
    if claimed / 1000 != facts.not_after.unix_timestamp() {
        return Err("expiryDate does not match the certificate".into());
    }
    Ok((pem_text.to_owned(), facts))
}

/// How the gateway's documents are fetched: through the delivery core's connector either
/// way (its `deny` rules and source pins, with `--config`).
enum Fetcher {
    Plain(std::sync::Arc<crate::egress::Egress>),
    Tls(crate::delivery::DeliveryClient),
}

impl Fetcher {
    fn new(base: &url::Url, ca: Option<PathBuf>, config: Option<&std::path::Path>) -> Result<Self, Failure> {
        // An operator fetching a public document from the gateway they name: any address,
        // but from the pinned source addresses and never a denied one when a config says so.
        let mut rules = crate::config::EgressConfig {
            allow: vec!["0.0.0.0/0".into(), "::/0".into()],
            ..Default::default()
        };
        if let Some(path) = config {
            let cfg = crate::config::Config::load(path).map_err(Failure::usage)?;
            rules.source_ips = cfg.egress.source_ips.clone();
            rules.deny = cfg.egress.deny.clone();
        }
        let egress = std::sync::Arc::new(crate::egress::Egress::from_config(&rules).map_err(Failure::usage)?);
        if base.scheme() == "http" {
            return Ok(Fetcher::Plain(egress));
        }
        let core =
            crate::delivery::Core::new(std::sync::Arc::new(crate::tls::creds::Identities::none()), egress);
        let d = crate::config::DestinationConfig {
            mtls: false,
            ca,
            ..crate::config::DestinationConfig::new("cert-fetch", Some(base.clone()))
        };
        Ok(Fetcher::Tls(core.destination(&d).map_err(Failure::usage)?))
    }

    async fn get_json(&self, url: &url::Url) -> Result<Value, Failure> {
        let (status, body) = match self {
            Fetcher::Tls(c) => {
                let d = c
                    .send(crate::delivery::OutboundRequest {
                        method: http::Method::GET,
                        url: url.clone(),
                        headers: http::HeaderMap::new(),
                        body: bytes::Bytes::new(),
                    })
                    .await
                    .map_err(|e| Failure::failed(format!("{url}: {e}")))?;
                (d.status.as_u16(), d.body)
            }
            Fetcher::Plain(egress) => plain_get(egress, url)
                .await
                .map_err(|e| Failure::failed(format!("{url}: {e}")))?,
        };
        if status != 200 {
            return Err(Failure::failed(format!("{url}: HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| Failure::failed(format!("{url}: not JSON: {e}")))
    }
}

async fn plain_get(egress: &crate::egress::Egress, url: &url::Url) -> Result<(u16, bytes::Bytes), String> {
    let host = url
        .host_str()
        .ok_or("no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::delivery::connect_tcp(egress, &host, port),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let req = http::Request::get(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .body(Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let res = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = http_body_util::Limited::new(res.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
