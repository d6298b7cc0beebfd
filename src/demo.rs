//! `sallyport demo`: the whole export flow on one machine. Generates a dev PKI in a temporary
//! directory, starts an in-process receiver that requires the gateway's client certificate,
//! ingests sample profile updates into an embedded store, lets the export engine deliver one
//! JSON per changed profile over mTLS, and shows what the receiver saw. Then shows the
//! mTLS-only rule refusing a receiver that does not ask for a client certificate.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};
use serde_json::json;

use crate::config::Config;
use crate::config::DestinationConfig;
use crate::delivery::{Core, ErrorKind, OutboundRequest};
use crate::export::Engine;
use crate::pki::{self, InitOptions};
use crate::receiver::{ClientAuth, Receiver};
use crate::tls::creds::{Identities, IdentityStore};

const MAPPED: &str = "5b998cb9-9488-4ec3-8d95-fa8338ced490";
const UNMAPPED_SAME_POLICY: &str = "a1b2c3d4-0000-4000-8000-000000000001";

/// Run the demo; exit 0 when every step behaved as it should.
pub async fn run(profiles: usize) -> ExitCode {
    match demo(profiles.max(1)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sallyport demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Sample NDJSON: `n` profiles qualifying for the mapped segment (every other one also in an
/// unmapped segment of the same merge policy), one profile outside every mapped segment, and
/// a second write to profile 0 that coalesces with its first.
pub fn sample_ndjson(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let mut segments = vec![
            json!({"id": MAPPED, "status": "realized", "lastQualificationTime": "2026-11-25T10:00:00Z"}),
        ];
        if i % 2 == 0 {
            segments.push(json!({"id": UNMAPPED_SAME_POLICY, "status": "realized", "lastQualificationTime": "2026-11-20T08:00:00Z"}));
        }
        let line = json!({
            "profileId": format!("demo-{i}"),
            "identityMap": {"ecid": [{"id": format!("1457500653634928640461964808573{i:04}")}]},
            "attributes": {"person": {"name": {"firstName": format!("Jo{i}"), "lastName": "Unmapped"}},
                           "personalEmail": {"address": format!("jo{i}@example.com")}},
            "segments": segments
        });
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{}",
        json!({"profileId": "outsider", "attributes": {"person": {"name": {"firstName": "Nobody"}}}})
    );
    let _ = writeln!(
        out,
        "{}",
        json!({"profileId": "demo-0", "attributes": {"person": {"name": {"firstName": "Joanna"}}}})
    );
    out
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

    let config = format!(
        r#"
[identity]
cert = "gateway.pem"
key = "gateway.key"
[store]
url = "sqlite://demo.db"
[egress]
allow = ["127.0.0.0/8"]   # the demo's receivers are local: loopback must be allowed explicitly
[[segments]]
id = "{MAPPED}"
name = "First name equals John"
created_at = "2022-03-29T11:28:45Z"
updated_at = "2022-03-29T11:28:50Z"
[[segments]]
id = "{UNMAPPED_SAME_POLICY}"
name = "Watched Back to the Future"
[[dataflows]]
name = "demo-receiver"
endpoint = "{endpoint}"
ca = "ca.pem"
headers = "x-tenant:demo"
query = "source=sallyport-demo"
include_segment_names = true
include_segment_timestamps = true
attributes = [
  {{ source = "person.name.firstName", target = "firstName" }},
  {{ source = "personalEmail.address", target = "person.email" }},
]
segments = ["{MAPPED}"]
"#,
        endpoint = receiver.url("/profiles")
    );
    let cfg_path = dir.path().join("sallyport.toml");
    std::fs::write(&cfg_path, config)?;
    let cfg = Config::load(&cfg_path)?;
    let engine = Engine::open(&cfg).await?;
    let workers = engine.spawn_workers();
    println!("3. export engine on an embedded SQLite store; dataflow 'demo-receiver' maps 2 attributes and 1 segment");

    let ndjson = sample_ndjson(profiles);
    let report = engine.ingest(ndjson.as_bytes()).await?;
    println!(
        "4. ingested {} update(s) ({} rejected): {profiles} profile(s) qualify for the mapped segment, \
         1 is outside it, profile demo-0 is written twice",
        report.accepted, report.rejected
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.pending().await? > 0 || receiver.received().len() < profiles {
        if Instant::now() > deadline {
            anyhow::bail!(
                "deliveries did not complete: {} received, {} pending",
                receiver.received().len(),
                engine.pending().await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers.iter().for_each(|w| w.abort());

    println!(
        "5. the receiver got {} JSON object(s) over {} connection(s):",
        receiver.received().len(),
        receiver.connections()
    );
    for (i, r) in receiver.received().iter().enumerate() {
        let cert = r.client_cert.as_ref();
        if i == 0 {
            println!(
                "   client certificate seen by the receiver: CN={} SAN dns={:?} uri={:?}",
                cert.map_or("none", |c| c.display_name()),
                cert.map(|c| &c.sans.dns),
                cert.map(|c| &c.sans.uri),
            );
            let pretty: serde_json::Value = serde_json::from_slice(&r.body)?;
            println!(
                "   {} {} {} — first payload:",
                r.http_version, r.method, r.path_and_query
            );
            for l in serde_json::to_string_pretty(&pretty)?.lines() {
                println!("     {l}");
            }
        } else {
            println!(
                "   {} {} {} ({} bytes)",
                r.http_version,
                r.method,
                r.path_and_query,
                r.body.len()
            );
        }
    }
    if receiver.received().len() != profiles {
        anyhow::bail!(
            "expected {profiles} deliveries (one per changed profile), got {}",
            receiver.received().len()
        );
    }
    println!("   demo-0 was written twice before delivery and sent once, with its latest state; 'outsider' was not sent");

    let plain = Receiver::start(
        &files.server_cert,
        &files.server_key,
        &files.ca_cert,
        ClientAuth::NotRequested,
        StatusCode::OK,
    )
    .await?;
    println!(
        "6. a plain-TLS receiver on {} that does not ask for a client certificate:",
        plain.addr
    );
    let core = Core::new(
        std::sync::Arc::new(Identities::one(
            IdentityStore::from_files(&files.client_cert, &files.client_key).map_err(anyhow::Error::msg)?,
        )),
        std::sync::Arc::new(crate::egress::Egress::allowing(&["127.0.0.0/8"]).map_err(anyhow::Error::msg)?),
    );
    let url = url::Url::parse(&plain.url("/profiles"))?;
    let plain_destination = DestinationConfig {
        ca: Some(files.ca_cert.clone()),
        ..DestinationConfig::new("demo-plain", Some(url.clone()))
    };
    let refused = core
        .destination(&plain_destination)
        .map_err(anyhow::Error::msg)?
        .send(OutboundRequest {
            method: Method::POST,
            url,
            headers: HeaderMap::new(),
            body: ndjson
                .lines()
                .next()
                .unwrap_or_default()
                .as_bytes()
                .to_vec()
                .into(),
        })
        .await;
    match refused {
        Err(e) if e.kind() == ErrorKind::MtlsNotRequested => {
            println!("   refused as it must be: {e}");
            println!("   the plain receiver got {} request(s)", plain.received().len());
        }
        other => anyhow::bail!("expected the mTLS-only refusal, got {other:?}"),
    }
    println!("demo ok");
    Ok(())
}
