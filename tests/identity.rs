//! The gateway's identity: the public certificate endpoints, `cert fetch`, hot reload while
//! deliveries run, and rotation to a `next` certificate published ahead of use.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::receiver::{Action, ClientAuth, Receiver};
use serde_json::{json, Value};
use support::*;

/// What these tests need of an [`IssuingCa`]: a receiver, and a config around it.
trait Setup {
    async fn receiver(&self) -> Receiver;
    fn config(&self, identity_extra: &str, endpoint: &str, extra: &str) -> String;
}

impl Setup for IssuingCa {
    async fn receiver(&self) -> Receiver {
        // Every answer closes the connection, so each delivery makes a new one and shows
        // which certificate is presented now.
        Receiver::start_with(
            &self.path("rx.pem"),
            &self.path("rx.key"),
            &self.path("ca.pem"),
            ClientAuth::Required,
            Arc::new(|_| Action::Respond(StatusCode::OK, vec![("connection", "close".into())])),
        )
        .await
        .unwrap()
    }

    fn config(&self, identity_extra: &str, endpoint: &str, extra: &str) -> String {
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"current.pem\"\nkey = \"current.key\"\n{identity_extra}\n\
             [store]\nurl = \"sqlite://id.db\"\n{extra}\n[[segments]]\nid = \"s1\"\nname = \"S\"\n\
             [[dataflows]]\nname = \"rx\"\nendpoint = \"{endpoint}\"\nca = \"ca.pem\"\nsegments = [\"s1\"]\n"
        )
    }
}

fn cns(rx: &Receiver) -> Vec<String> {
    rx.received()
        .iter()
        .map(|r| r.client_cert.as_ref().unwrap().subject_cn.clone().unwrap())
        .collect()
}

async fn serve(s: &IssuingCa, identity_extra: &str) -> (tokio::process::Child, u16) {
    let (public, admin) = (free_port(), free_port());
    let text = s.config(
        identity_extra,
        "https://localhost:9/in",
        &format!("[public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\""),
    );
    let cfg = s.path("serve.toml");
    std::fs::write(&cfg, text).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(public))
        .await
        .unwrap();
    (child, public)
}

fn leaf_pem(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    text[..end].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adobe_shape_endpoint_pages_over_current_and_next() {
    let s = IssuingCa::new("Identity Test CA");
    s.client("current", "gw-current");
    s.client("next", "gw-next");
    let (_child, port) = serve(
        &s,
        "next_cert = \"next.pem\"\nnext_key = \"next.key\"\nswitch_at = \"2099-01-01T00:00:00Z\"",
    )
    .await;
    let base = format!("http://127.0.0.1:{port}/data/core/mtls/v1/certificate/public-certificate");

    let (st, body) = http("GET", &format!("{base}?page=0&limit=1"), None, b"").await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["total"], 2);
    assert_eq!(v["count"], 1);
    let r = &v["results"][0];
    assert_eq!(r["certCommonName"], "gw-current");
    assert_eq!(
        r["publicCertificate"].as_str().unwrap(),
        leaf_pem(&s.path("current.pem"))
    );
    let facts = sallyport::tls::CertFacts::from_der(
        &sallyport::tls::pem::load_certs(&s.path("current.pem")).unwrap()[0],
    )
    .unwrap();
    let expiry = time::OffsetDateTime::parse(
        r["expiryDate"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(expiry.unix_timestamp(), facts.not_after.unix_timestamp());
    assert_eq!(
        v["_links"]["next"],
        json!({"href": "/data/core/mtls/v1/certificate/public-certificate?page=1&limit=1", "templated": false})
    );
    assert!(v["_links"]["prev"].is_null());
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["_links", "count", "results", "total"]);

    let (_, body) = http("GET", &format!("{base}?page=1&limit=1"), None, b"").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["results"][0]["certCommonName"], "gw-next");
    assert!(v["_links"]["next"].is_null());
    assert_eq!(
        v["_links"]["prev"],
        json!({"href": "/data/core/mtls/v1/certificate/public-certificate?page=0&limit=1", "templated": false})
    );

    for bad in ["page=x", "page=-1", "limit=0", "limit=101", "limit=ten"] {
        let (st, body) = http("GET", &format!("{base}?{bad}"), None, b"").await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());
    }

    let (_, body) = http(
        "GET",
        &format!("http://127.0.0.1:{port}/v1/certificate"),
        None,
        b"",
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let certs = v["certificates"].as_array().unwrap();
    assert_eq!(
        (certs[0]["role"].as_str(), certs[1]["role"].as_str()),
        (Some("current"), Some("next"))
    );
    assert_eq!(certs[0]["sans"]["dns"], json!(["gw-current.example"]));
    assert_eq!(certs[0]["issuer"], "CN=Identity Test CA, O=Sallyport dev PKI");
    assert!(certs[0]["sha256Fingerprint"].as_str().unwrap().len() == 95);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_fetch_writes_a_pem_that_openssl_reads_back() {
    let s = IssuingCa::new("Identity Test CA");
    s.client("current", "gw-current");
    let (_child, port) = serve(&s, "").await;
    let out_pem = s.path("fetched.pem");
    let fetch = |extra: &'static [&'static str]| {
        let url = format!("http://127.0.0.1:{port}");
        let out_pem = out_pem.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
                .args(["cert", "fetch", &url, "--out", out_pem.to_str().unwrap()])
                .args(extra)
                .output()
                .await
                .unwrap()
        }
    };
    // Over plain http a trust bundle is written only when the operator says so.
    let refused = fetch(&[]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--insecure-http"));
    assert!(!out_pem.exists(), "nothing written without --insecure-http");
    let out = fetch(&["--insecure-http"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("gw-current") && stdout.contains("days left"),
        "{stdout}"
    );
    let o = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-ext", "subjectAltName", "-in"])
        .arg(&out_pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("CN = gw-current") || text.contains("CN=gw-current"),
        "{text}"
    );
    assert!(text.contains("DNS:gw-current.example"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_switches_new_connections_and_refuses_a_corrupt_file() {
    let s = IssuingCa::new("Identity Test CA");
    s.client("current", "gw-old");
    let rx = s.receiver().await;
    let cfg = Config::from_toml(
        &s.config("", &rx.url("/in"), ""),
        Path::new("id.toml"),
        s.dir.path(),
    )
    .unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let workers = engine.spawn_workers();
    let watcher = tokio::spawn(engine.identity_store().unwrap().watch(Duration::from_millis(50)));
    engine.ingest(&s1_profiles(0, 5)).await.unwrap();
    wait_until("5 deliveries", Duration::from_secs(10), || {
        rx.received().len() == 5
    })
    .await;

    s.client("current", "gw-new");
    let store = engine.identity_store().unwrap();
    wait_until("the reload", Duration::from_secs(10), || {
        store.presented().facts.subject_cn.as_deref() == Some("gw-new")
    })
    .await;
    engine.ingest(&s1_profiles(5, 5)).await.unwrap();
    wait_until("10 deliveries", Duration::from_secs(10), || {
        rx.received().len() == 10
    })
    .await;

    // A corrupt replacement is refused; deliveries go on with the last good identity.
    std::fs::write(
        s.path("current.pem"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let generation = store.generation();
    // Six polls' worth; the positive evidence that the watcher got past the bad file (rather
    // than dying on it) is that it picks up the good one written after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.presented().facts.subject_cn.as_deref(), Some("gw-new"));
    assert_eq!(store.generation(), generation, "a refused file is no reload");
    engine.ingest(&s1_profiles(10, 5)).await.unwrap();
    wait_until("15 deliveries", Duration::from_secs(10), || {
        rx.received().len() == 15
    })
    .await;
    // A good file after the bad one is picked up: the watcher lives on.
    s.client("current", "gw-newest");
    wait_until(
        "the reload after the refused file",
        Duration::from_secs(10),
        || store.presented().facts.subject_cn.as_deref() == Some("gw-newest"),
    )
    .await;
    engine.ingest(&s1_profiles(15, 5)).await.unwrap();
    wait_until("20 deliveries", Duration::from_secs(10), || {
        rx.received().len() == 20
    })
    .await;
    watcher.abort();
    workers.iter().for_each(|w| w.abort());

    let seen = cns(&rx);
    assert!(seen[..5].iter().all(|c| c == "gw-old"), "{seen:?}");
    assert!(seen[5..15].iter().all(|c| c == "gw-new"), "{seen:?}");
    assert!(seen[15..].iter().all(|c| c == "gw-newest"), "{seen:?}");
    assert_eq!(engine.stats().failed, 0, "no delivery failed across the reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_next_ahead_and_switches_at_the_set_time() {
    let s = IssuingCa::new("Identity Test CA");
    s.client("current", "gw-current");
    s.client("next", "gw-next");
    let rx = s.receiver().await;
    let switch = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let at = switch
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let extra = format!("next_cert = \"next.pem\"\nnext_key = \"next.key\"\nswitch_at = \"{at}\"");
    let cfg = Config::from_toml(
        &s.config(&extra, &rx.url("/in"), ""),
        Path::new("id.toml"),
        s.dir.path(),
    )
    .unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let store = engine.identity_store().unwrap();
    let roles = |store: &sallyport::tls::creds::IdentityStore| -> Vec<String> {
        store
            .published()
            .iter()
            .map(|(r, id)| format!("{r:?}:{}", id.facts.subject_cn.clone().unwrap()))
            .collect()
    };
    assert_eq!(
        roles(&store),
        ["Current:gw-current", "Next:gw-next"],
        "next is published ahead of use"
    );
    let workers = engine.spawn_workers();
    engine.ingest(&s1_profiles(0, 3)).await.unwrap();
    wait_until("3 deliveries", Duration::from_secs(10), || {
        rx.received().len() == 3
    })
    .await;
    wait_until("the switch time", Duration::from_secs(10), || {
        time::OffsetDateTime::now_utc() > switch
    })
    .await;
    engine.ingest(&s1_profiles(3, 3)).await.unwrap();
    wait_until("6 deliveries", Duration::from_secs(10), || {
        rx.received().len() == 6
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    let seen = cns(&rx);
    assert_eq!(
        seen,
        [
            "gw-current",
            "gw-current",
            "gw-current",
            "gw-next",
            "gw-next",
            "gw-next"
        ]
    );
    assert_eq!(
        roles(&store),
        ["Current:gw-next"],
        "after the switch the old certificate is no longer published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_listener_can_serve_tls_and_cert_fetch_verifies_it() {
    let s = IssuingCa::new("Identity Test CA");
    s.client("current", "gw-current");
    let (public, admin) = (free_port(), free_port());
    let text = s.config(
        "",
        "https://localhost:9/in",
        &format!(
            "[public]\nlisten = \"127.0.0.1:{public}\"\ntls_cert = \"rx.pem\"\ntls_key = \"rx.key\"\n[admin]\nlisten = \"127.0.0.1:{admin}\""
        ),
    );
    let cfg = s.path("tls.toml");
    std::fs::write(&cfg, text).unwrap();
    let _child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(public))
        .await
        .unwrap();
    let run = |ca: Option<&Path>| {
        let mut args = vec![
            "cert".to_owned(),
            "fetch".into(),
            format!("https://localhost:{public}"),
            "--json".into(),
        ];
        if let Some(ca) = ca {
            args.extend(["--ca".into(), ca.display().to_string()]);
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
            .args(&args)
            .output()
            .unwrap()
    };
    let ok = run(Some(&s.path("ca.pem")));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let v: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["certificates"][0]["subjectCn"], "gw-current");
    // Without the CA, the listener's certificate is not trusted: cert fetch refuses.
    let refused = run(None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
