//! A destination's CA bundle file is watched like an identity: replaced on disk, it is used
//! for the next connection without a restart; a broken one is refused with a log line and
//! deliveries go on with the old trust.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use sallyport::config::Config;
use sallyport::delivery::{Core, ErrorKind, OutboundRequest};
use sallyport::receiver::{Action, ClientAuth, Receiver};
use support::*;

/// A receiver whose server certificate comes from `server_ca` and which requires client
/// certificates from `client_ca`; each answer closes its connection, so every request shows
/// what a new connection does.
async fn receiver(server_ca: &IssuingCa, client_ca: &IssuingCa) -> Receiver {
    Receiver::start_with(
        &server_ca.path("rx.pem"),
        &server_ca.path("rx.key"),
        &client_ca.path("ca.pem"),
        ClientAuth::Required,
        Arc::new(|_| Action::Respond(StatusCode::OK, vec![("connection", "close".into())])),
    )
    .await
    .unwrap()
}

/// Replace `path` as a deployment tool does: write aside, rename over.
fn replace(path: &std::path::Path, text: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataflows_ca_bundle_replaced_on_disk_is_used_for_the_next_connection() {
    let ours = IssuingCa::new("Trust Reload Old CA");
    let new_ca = IssuingCa::new("Trust Reload New CA");
    ours.client("gw", "gw");
    // The receiver moved to a server certificate from a CA the dataflow does not trust yet.
    let rx = receiver(&new_ca, &ours).await;
    let bundle = ours.path("receiver-ca.pem");
    std::fs::copy(ours.path("ca.pem"), &bundle).unwrap();
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n\
         [store]\nurl = \"sqlite://t.db\"\n\
         [[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"receiver-ca.pem\"\n",
        rx.url("/in")
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("t.toml"), ours.dir.path()).unwrap();
    let core = Core::from_config(&cfg).unwrap();
    let dest = cfg.dataflow_destination(cfg.dataflow("rx").unwrap()).unwrap();
    let client = core.destination(&dest).unwrap();
    let watcher = tokio::spawn(core.clone().watch(Duration::from_millis(100)));
    let post = || OutboundRequest {
        method: http::Method::POST,
        url: url::Url::parse(&rx.url("/in")).unwrap(),
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from_static(b"{}"),
    };

    let err = client.send(post()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ServerCertificate, "{err}");
    assert!(rx.received().is_empty());

    // The new CA is added to the bundle on disk: the next connection trusts it.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(ours.path("ca.pem")).unwrap(),
        std::fs::read_to_string(new_ca.path("ca.pem")).unwrap()
    );
    replace(&bundle, both.as_bytes());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.send(post()).await {
            Ok(d) if d.status == StatusCode::OK => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the new bundle was not used: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken bundle is refused; deliveries go on with the trust in force.
    replace(&bundle, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        let d = client.send(post()).await.unwrap();
        assert_eq!(d.status, StatusCode::OK);
    }
    // And a destination made after the refusal gets the trust in force, not the broken file.
    let again = core.destination(&dest).unwrap();
    assert_eq!(again.send(post()).await.unwrap().status, StatusCode::OK);
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_trusts_a_routes_new_bundle_without_a_restart_and_logs_a_broken_one() {
    let ours = IssuingCa::new("Sidecar Trust Old CA");
    let new_ca = IssuingCa::new("Sidecar Trust New CA");
    ours.client("gw", "gw");
    let rx = receiver(&new_ca, &ours).await;
    let bundle = ours.path("route-ca.pem");
    std::fs::copy(ours.path("ca.pem"), &bundle).unwrap();
    let port = free_port();
    let cfg = ours.path("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
             [store]\nurl = \"sqlite://sc.db\"\n[sidecar]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"route-ca.pem\"\n",
            rx.url("/")
        ),
    )
    .unwrap();
    let log = ours.path("sidecar.log");
    let _child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["sidecar", "--config", cfg.to_str().unwrap()])
        .env("SALLYPORT_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_for_port(port))
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/rx/in");

    let (status, body) = http("POST", &url, None, b"{}").await;
    assert_eq!(status, 502, "{body}");
    assert!(rx.received().is_empty());

    // The route's bundle now holds the receiver's new CA: reachable within the 2 s poll.
    replace(&bundle, &std::fs::read(new_ca.path("ca.pem")).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http("POST", &url, None, b"{}").await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} {body} after the bundle changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Garbage: refused with a log line naming the file; requests go on with the old trust.
    replace(&bundle, b"this is not a CA bundle\n");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !log_text().contains("refused the new CA bundle") {
        assert!(
            std::time::Instant::now() < deadline,
            "no log line for the broken bundle: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(log_text().contains("route-ca.pem"), "{}", log_text());
    for _ in 0..3 {
        let (status, body) = http("POST", &url, None, b"{}").await;
        assert_eq!(status, 200, "{body}");
    }
}
