//! Operational events end to end: a dead letter, a renewed client certificate and one nearing
//! expiry each reach an `[events]` webhook over mTLS (through the delivery core), signed with
//! Standard Webhooks — checked with the reference Python library (`standardwebhooks` from
//! PyPI), not with our own signer. A bad `[events]` table is refused by `config check`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use sallyport::config::Config;
use sallyport::delivery::Core;
use sallyport::events::Events;
use sallyport::export::Engine;
use sallyport::pki::{self, InitOptions};
use sallyport::receiver::{Action, ClientAuth, Receiver};
use support::events::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_sent_as_a_signed_event_the_reference_library_verifies() {
    let python = tokio::task::spawn_blocking(reference_python).await.unwrap();
    let pki = RcgenPki::new();
    let f = &pki.files;
    let failing = pki.receiver(ClientAuth::Required, StatusCode::BAD_GATEWAY).await;
    // The webhook refuses the first attempt: the event is tried again, under the same id.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let hook = Receiver::start_with(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        Arc::new(move |_| {
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                Action::Respond(StatusCode::SERVICE_UNAVAILABLE, vec![])
            } else {
                Action::Respond(StatusCode::OK, vec![])
            }
        }),
    )
    .await
    .unwrap();
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n\
         [store]\nurl = \"sqlite://a.db\"\n{}\
         [[segments]]\nid = \"s1\"\nname = \"S\"\n\
         [[dataflows]]\nname = \"flaky\"\nendpoint = \"{}\"\nca = \"ca.pem\"\nsegments = [\"s1\"]\nmax_attempts = 1\n",
        events_table(pki.dir.path(), &hook),
        failing.url("/in")
    );
    let cfg = Config::from_toml(&text, Path::new("events.toml"), pki.dir.path()).unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let (events, sender) = Events::from_config(&cfg, engine.core()).unwrap();
    assert!(sender.is_some());
    engine.set_events(events);
    let workers = engine.spawn_workers();
    engine.ingest(&s1_profiles(0, 1)).await.unwrap();

    wait_until("the dead-letter event, retried", Duration::from_secs(15), || {
        events_of(&hook, "delivery.dead_lettered").len() >= 2
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    let got = events_of(&hook, "delivery.dead_lettered");
    assert_eq!(got.len(), 2, "one refused attempt, one taken");
    let (first, second) = (&got[0].0, &got[1].0);
    let id = header(second, "webhook-id").unwrap();
    assert!(id.starts_with("evt_") && id.len() == 36, "webhook-id {id}");
    assert_eq!(header(first, "webhook-id"), Some(id), "one id across attempts");
    assert_eq!(header(second, "content-type"), Some("application/json"));
    // Sent over mTLS, presenting the gateway's identity.
    assert_eq!(
        second.client_cert.as_ref().unwrap().sha256_fingerprint,
        sallyport::tls::Identity::load(&f.client_cert, &f.client_key)
            .unwrap()
            .facts
            .sha256_fingerprint
    );

    // The reference implementation accepts the signature and gives back the payload…
    let payload = reference_verify(&python, second, &second.body).unwrap();
    assert_eq!(payload["type"], "delivery.dead_lettered");
    let data = &payload["data"];
    assert_eq!(data["dataflow"], "flaky");
    assert_eq!(data["class"], "unavailable", "{payload}");
    assert_eq!(data["status"], 502);
    assert_eq!(data["attempts"], 1);
    assert!(data["idempotencyKey"].as_str().unwrap().starts_with("sp_"));
    assert!(payload["timestamp"].as_str().unwrap().ends_with('Z'));
    // …metadata only: no profile id, no payload.
    let body = String::from_utf8_lossy(&second.body);
    assert!(!body.contains("p0") && !body.contains("s1"), "{body}");
    // …and refuses a body that was changed on the way.
    let tampered = body.replace("flaky", "other");
    let refused = reference_verify(&python, second, tampered.as_bytes()).unwrap_err();
    assert!(refused.contains("WebhookVerificationError"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificate_files_are_announced_as_certificate_rotated() {
    let s = IssuingCa::new("Events Test CA");
    s.client("gw", "gw-first");
    let first = sallyport::tls::Identity::load(&s.path("gw.pem"), &s.path("gw.key")).unwrap();
    let hook = Receiver::start(
        &s.path("rx.pem"),
        &s.path("rx.key"),
        &s.path("ca.pem"),
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await
    .unwrap();
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n{}",
        events_table(s.dir.path(), &hook)
    );
    let cfg = Config::from_toml(&text, Path::new("events.toml"), s.dir.path()).unwrap();
    let core = Core::from_config(&cfg).unwrap();
    let (events, sender) = Events::from_config(&cfg, &core).unwrap();
    let expiry = events.watch_certificates(core.identities(), vec![30, 7], Duration::from_secs(3600));
    let watcher = tokio::spawn(core.clone().watch(Duration::from_millis(100)));

    // Renewed on disk, as cert-manager or a Vault agent does it: the watcher swaps it in.
    s.client("gw", "gw-renewed");
    let renewed = sallyport::tls::Identity::load(&s.path("gw.pem"), &s.path("gw.key")).unwrap();
    wait_until("certificate.rotated", Duration::from_secs(10), || {
        !events_of(&hook, "certificate.rotated").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // polled again: no repeat
    let got = events_of(&hook, "certificate.rotated");
    assert_eq!(got.len(), 1, "{got:?}");
    let (r, event) = &got[0];
    let data = &event["data"];
    assert_eq!(data["identity"], "default");
    assert_eq!(data["subject"], "gw-renewed");
    assert_eq!(data["oldFingerprint"], first.facts.sha256_fingerprint.as_str());
    assert_eq!(data["newFingerprint"], renewed.facts.sha256_fingerprint.as_str());
    assert_ne!(data["oldFingerprint"], data["newFingerprint"]);
    let not_after = time::OffsetDateTime::parse(
        data["notAfter"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(not_after, renewed.facts.not_after);
    // The event itself went out presenting the renewed certificate.
    assert_eq!(
        r.client_cert.as_ref().unwrap().sha256_fingerprint,
        renewed.facts.sha256_fingerprint
    );
    let python = tokio::task::spawn_blocking(reference_python).await.unwrap();
    reference_verify(&python, r, &r.body).unwrap();
    for t in [watcher, expiry] {
        t.abort();
    }
    if let Some(t) = sender {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_within_30_days_of_expiry_is_announced_once() {
    let tmp = tempfile::tempdir().unwrap();
    // 10 days left: past the 30-day threshold, not the 7-day one.
    let f = pki::init(
        tmp.path(),
        &InitOptions {
            days: 10,
            ..InitOptions::default()
        },
    )
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
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n{}",
        events_table(tmp.path(), &hook)
    );
    let cfg = Config::from_toml(&text, Path::new("events.toml"), tmp.path()).unwrap();
    let core = Core::from_config(&cfg).unwrap();
    let (events, sender) = Events::from_config(&cfg, &core).unwrap();
    // Checked every 50 ms: many checks, one event.
    let expiry = events.watch_certificates(
        core.identities(),
        sallyport::events::cert_expiry_days(&cfg),
        Duration::from_millis(50),
    );
    wait_until("certificate.expiring", Duration::from_secs(10), || {
        !events_of(&hook, "certificate.expiring").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    expiry.abort();
    if let Some(t) = sender {
        t.abort();
    }
    let got = events_of(&hook, "certificate.expiring");
    assert_eq!(got.len(), 1, "{got:?}");
    let data = &got[0].1["data"];
    let facts = sallyport::tls::Identity::load(&f.client_cert, &f.client_key)
        .unwrap()
        .facts;
    assert_eq!(data["identity"], "default");
    assert_eq!(data["fingerprint"], facts.sha256_fingerprint.as_str());
    assert_eq!(data["thresholdDays"], 30);
    let days = data["daysLeft"].as_i64().unwrap();
    assert!((9..=10).contains(&days), "{data}");
    assert!(data["notAfter"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_events_sends_the_expiry_event_of_its_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let f = pki::init(
        tmp.path(),
        &InitOptions {
            days: 5,
            ..InitOptions::default()
        },
    )
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
    let (public, admin) = (free_port(), free_port());
    let cfg = tmp.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n\
             [store]\nurl = \"sqlite://s.db\"\n[public]\nlisten = \"127.0.0.1:{public}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            events_table(tmp.path(), &hook)
        ),
    )
    .unwrap();
    let _gateway = spawn_sallyport(&["serve", "--config", cfg.to_str().unwrap()], &[], public).await;
    wait_until("certificate.expiring from serve", Duration::from_secs(15), || {
        !events_of(&hook, "certificate.expiring").is_empty()
    })
    .await;
    let got = events_of(&hook, "certificate.expiring");
    assert_eq!(got.len(), 1);
    // 5 days left: the tightest threshold reached is the one announced.
    assert_eq!(got[0].1["data"]["thresholdDays"], 7);
    assert!(got[0].0.client_cert.is_some());
}

#[tokio::test]
async fn config_check_refuses_a_bad_events_table_with_the_key_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    // The identity's files, which the [identity] table below names.
    pki::init(tmp.path(), &InitOptions::default()).unwrap();
    std::fs::write(tmp.path().join("events.secret"), SECRET).unwrap();
    let check = |name: &str, events: &str| {
        let path = tmp.path().join(name);
        std::fs::write(
            &path,
            format!("[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[events]\n{events}"),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
            .args(["config", "check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let secret = "signing_secret_file = \"events.secret\"\n";

    let (code, err) = check(
        "ok.toml",
        &format!("webhook = \"https://events.example/in\"\n{secret}"),
    );
    assert_eq!(code, Some(0), "{err}");

    let (code, err) = check(
        "http.toml",
        &format!("webhook = \"http://events.example/in\"\n{secret}"),
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("events.webhook: scheme must be https when mtls = true"),
        "{err}"
    );
    let (code, err) = check("garbage.toml", &format!("webhook = \"not a url\"\n{secret}"));
    assert_eq!(code, Some(2));
    assert!(err.contains("events.webhook: 'not a url' is not a URL"), "{err}");

    let (code, err) = check(
        "unknown.toml",
        &format!("webhook = \"https://events.example/in\"\n{secret}retries = 3\n"),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown field `retries`"), "{err}");

    let (code, err) = check("unsigned.toml", "webhook = \"https://events.example/in\"\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("events: set signing_secret_env, signing_secret_file or signing_secret_ref"),
        "{err}"
    );

    let (code, err) = check(
        "weak.toml",
        "webhook = \"https://events.example/in\"\nsigning_secret_env = \"SALLYPORT_TEST_UNSET_SECRET\"\ntimeout = \"5m\"\n",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("events.signing_secret:"), "{err}");
    assert!(err.contains("events.timeout:"), "{err}");
    assert!(!err.contains(SECRET));
}
