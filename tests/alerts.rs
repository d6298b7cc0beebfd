//! Alert rules end to end: a failing dataflow raises failure-ratio and dead-letter alerts and
//! a short-lived client certificate raises the expiry alert, each POSTed once to an alert
//! webhook over mTLS (through the delivery core) — and not repeated while still firing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use sallyport::alerts::Alerts;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::pki::{self, InitOptions};
use sallyport::receiver::{ClientAuth, Receiver};
use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_dataflow_and_expiring_certificate_raise_alerts_once() {
    let tmp = tempfile::tempdir().unwrap();
    // A client certificate with 10 days left: past the 30-day threshold, not the 7-day one.
    let f = pki::init(
        tmp.path(),
        &InitOptions {
            days: 10,
            ..InitOptions::default()
        },
    )
    .unwrap();
    let failing = Receiver::start(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        StatusCode::BAD_GATEWAY,
    )
    .await
    .unwrap();
    let hook = Receiver::start(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await
    .unwrap();
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[store]\nurl = \"sqlite://a.db\"\n\
         [alerts]\nwebhook = \"{}\"\nca = \"ca.pem\"\nwindow = \"30s\"\ninterval = \"100ms\"\nmin_attempts = 3\n\
         failure_ratio = 0.5\ndead_letters = 0\n[[segments]]\nid = \"s1\"\nname = \"S\"\n\
         [[dataflows]]\nname = \"flaky\"\nendpoint = \"{}\"\nca = \"ca.pem\"\nsegments = [\"s1\"]\nmax_attempts = 1\n\
         breaker = {{ enabled = false }}\n",
        hook.url("/alerts"),
        failing.url("/in")
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("alerts.toml"), tmp.path()).unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let workers = engine.spawn_workers();
    let alerts = tokio::spawn(
        Alerts::from_config(&cfg, engine.core())
            .unwrap()
            .run(engine.clone()),
    );
    let mut batch = String::new();
    for i in 0..4 {
        batch += &(json!({"profileId": format!("p{i}"), "segments": [{"id": "s1", "status": "realized"}]})
            .to_string()
            + "\n");
    }
    engine.ingest(batch.as_bytes()).await.unwrap();

    let rules = || -> Vec<String> {
        hook.received()
            .iter()
            .map(|r| {
                serde_json::from_slice::<Value>(&r.body).unwrap()["rule"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    wait_until("three alerts", Duration::from_secs(15), || rules().len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // still firing: no repeats
    alerts.abort();
    workers.iter().for_each(|w| w.abort());
    let mut got = rules();
    got.sort();
    assert_eq!(got, ["cert_expiry", "dead_letters", "failure_ratio"]);
    let bodies: Vec<Value> = hook
        .received()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    let ratio = bodies.iter().find(|b| b["rule"] == "failure_ratio").unwrap();
    assert_eq!(ratio["dataflow"], "flaky");
    assert_eq!(ratio["value"], 1.0);
    let cert = bodies.iter().find(|b| b["rule"] == "cert_expiry").unwrap();
    assert_eq!(cert["threshold"], 30.0);
    assert!(cert["value"].as_f64().unwrap() <= 10.0);
    // The webhook saw the gateway's client certificate: alerts go through the delivery core.
    assert!(hook.received()[0].client_cert.is_some());
    let metrics = engine.metrics_text().await;
    assert!(
        metrics.contains("sallyport_deliveries_total{dataflow=\"flaky\",outcome=\"dead_letter\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("sallyport_delivery_errors_total{dataflow=\"flaky\",kind=\"http_status\"} 4"));
    assert!(metrics.contains("sallyport_client_cert_expiry_seconds "));
}
