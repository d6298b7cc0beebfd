//! `sallyport demo`: a real mTLS delivery on one machine. Generates a dev PKI in a temporary
//! directory, starts an in-process receiver that requires the gateway's client certificate,
//! delivers sample profiles through the delivery core, and shows what the receiver saw. Then
//! shows the mTLS-only rule refusing a receiver that does not ask for a certificate.

use std::process::ExitCode;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::json;

use crate::delivery::{DeliveryClient, DestinationSettings, OutboundRequest};
use crate::pki::{self, InitOptions};
use crate::receiver::{ClientAuth, Receiver};
use crate::tls::{client::ALPN_H2_H1, ClientTlsConfig, Identity, Trust};

/// Run the demo; exit 0 when every step behaved as it should.
pub async fn run(profiles: usize) -> ExitCode {
    match demo(profiles).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sallyport demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A sample profile in the HTTP API destination's export shape.
pub fn sample_profile(i: usize) -> serde_json::Value {
    json!({
        "person": {"name": {"firstName": format!("Jo{i}"), "lastName": "Example"}},
        "personalEmail": {"address": format!("jo{i}@example.com")},
        "segmentMembership": {"ups": {
            "5b998cb9-9488-4ec3-8d95-fa8338ced490": {
                "lastQualificationTime": "2026-11-25T10:00:00Z", "status": "realized"
            }
        }},
        "identityMap": {"ecid": [{"id": format!("1457289{i:04}")}]}
    })
}

async fn demo(profiles: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("sallyport-demo-").tempdir()?;
    let files = pki::init(
        dir.path(),
        &InitOptions {
            client_uris: vec!["spiffe://sallyport.test/gateway".into()],
            ..InitOptions::default()
        },
    )?;
    println!(
        "1. dev PKI in {} (CA, receiver cert for localhost, gateway client cert)",
        dir.path().display()
    );

    let receiver = Receiver::start(
        &files.server_cert,
        &files.server_key,
        &files.ca_cert,
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await?;
    println!(
        "2. mTLS receiver on {} (requires a client certificate from the dev CA)",
        receiver.addr
    );

    let identity = Identity::load(&files.client_cert, &files.client_key)?;
    let tls = ClientTlsConfig::new(Trust::from_pem_file(&files.ca_cert)?, Some(&identity), ALPN_H2_H1)?;
    let client = DeliveryClient::new(DestinationSettings {
        query: vec![("source".into(), "sallyport-demo".into())],
        ..DestinationSettings::new("demo", tls.clone())
    });
    println!("3. delivering {profiles} sample profile(s) through the delivery core:");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for i in 0..profiles {
        let body = serde_json::to_vec(&sample_profile(i))?;
        let d = client
            .send(OutboundRequest {
                method: Method::POST,
                url: url::Url::parse(&receiver.url("/profiles"))?,
                headers: headers.clone(),
                body: body.into(),
            })
            .await?;
        if let Some(e) = d.error() {
            anyhow::bail!("delivery {i} failed: {e}");
        }
        let peer = d.peer.as_deref();
        println!(
            "   profile {i}: {} in {:.1} ms over {} {} (ALPN {}), receiver cert CN={} sha256={}…",
            d.status,
            d.latency.as_secs_f64() * 1000.0,
            peer.map_or("?", |p| p.tls_version.as_str()),
            peer.map_or("?", |p| p.cipher_suite.as_str()),
            peer.and_then(|p| p.alpn.as_deref()).unwrap_or("none"),
            peer.and_then(|p| p.server_certificate.as_ref())
                .map_or("?", |c| c.display_name()),
            peer.and_then(|p| p.server_certificate.as_ref())
                .map_or("?", |c| &c.sha256_fingerprint[..23]),
        );
    }
    println!("4. the receiver got:");
    for r in receiver.received() {
        let cert = r.client_cert.as_ref();
        println!(
            "   {} {} {} ({} bytes) from client CN={} SAN dns={:?} uri={:?}",
            r.http_version,
            r.method,
            r.path_and_query,
            r.body.len(),
            cert.map_or("none", |c| c.display_name()),
            cert.map(|c| &c.sans.dns),
            cert.map(|c| &c.sans.uri),
        );
        println!("     body: {}", String::from_utf8_lossy(&r.body));
    }
    println!(
        "   {} request(s) over {} connection(s) (keep-alive)",
        receiver.received().len(),
        receiver.connections()
    );
    if receiver.received().len() != profiles {
        anyhow::bail!(
            "the receiver saw {} requests, expected {profiles}",
            receiver.received().len()
        );
    }

    let plain = Receiver::start(
        &files.server_cert,
        &files.server_key,
        &files.ca_cert,
        ClientAuth::NotRequested,
        StatusCode::OK,
    )
    .await?;
    println!(
        "5. a plain-TLS receiver on {} that does not ask for a client certificate:",
        plain.addr
    );
    let client = DeliveryClient::new(DestinationSettings::new("demo-plain", tls));
    let refused = client
        .send(OutboundRequest {
            method: Method::POST,
            url: url::Url::parse(&plain.url("/profiles"))?,
            headers,
            body: serde_json::to_vec(&sample_profile(0))?.into(),
        })
        .await;
    match refused {
        Err(e) if e.kind() == crate::delivery::ErrorKind::MtlsNotRequested => {
            println!("   refused as it must be: {e}");
            println!("   the plain receiver got {} request(s)", plain.received().len());
        }
        other => anyhow::bail!("expected the mTLS-only refusal, got {other:?}"),
    }
    println!("demo ok");
    Ok(())
}
