//! Per-dataflow client identities: each receiver sees only the certificate meant for it, and
//! the CSR flow lets a receiver's own CA (here made by the `openssl` CLI) sign the gateway's
//! key, which never leaves the gateway.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::pki::{CertAuthority, LeafSpec};
use sallyport::receiver::{ClientAuth, Receiver};
use serde_json::json;
use support::*;

fn write(dir: &Path, name: &str, pem: &sallyport::pki::Pem) {
    std::fs::write(dir.join(format!("{name}.pem")), &pem.cert).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &pem.key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_receiver_sees_only_its_own_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let servers = CertAuthority::new("Servers CA", 7).unwrap();
    std::fs::write(d.join("servers-ca.pem"), &servers.cert_pem).unwrap();
    write(d, "rx", &servers.issue(&LeafSpec::localhost_server(7)).unwrap());
    let (ca_a, ca_b) = (
        CertAuthority::new("Receiver A CA", 7).unwrap(),
        CertAuthority::new("Receiver B CA", 7).unwrap(),
    );
    std::fs::write(d.join("ca-a.pem"), &ca_a.cert_pem).unwrap();
    std::fs::write(d.join("ca-b.pem"), &ca_b.cert_pem).unwrap();
    write(
        d,
        "id-a",
        &ca_a
            .issue(&LeafSpec::client("gw-for-a", vec![], vec![], 7))
            .unwrap(),
    );
    write(
        d,
        "id-b",
        &ca_b
            .issue(&LeafSpec::client("gw-for-b", vec![], vec![], 7))
            .unwrap(),
    );
    let rx_a = Receiver::start(
        &d.join("rx.pem"),
        &d.join("rx.key"),
        &d.join("ca-a.pem"),
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await
    .unwrap();
    let rx_b = Receiver::start(
        &d.join("rx.pem"),
        &d.join("rx.key"),
        &d.join("ca-b.pem"),
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await
    .unwrap();
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identities.a]\ncert = \"id-a.pem\"\nkey = \"id-a.key\"\n\
         [identities.b]\ncert = \"id-b.pem\"\nkey = \"id-b.key\"\n[store]\nurl = \"sqlite://ids.db\"\n\
         [[segments]]\nid = \"s1\"\nname = \"S\"\n\
         [[dataflows]]\nname = \"to-a\"\nendpoint = \"{}\"\nca = \"servers-ca.pem\"\nidentity = \"a\"\nsegments = [\"s1\"]\n\
         [[dataflows]]\nname = \"to-b\"\nendpoint = \"{}\"\nca = \"servers-ca.pem\"\nidentity = \"b\"\nsegments = [\"s1\"]\n",
        rx_a.url("/in"),
        rx_b.url("/in")
    );
    let cfg = Config::from_toml(&text, Path::new("ids.toml"), d).unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let workers = engine.spawn_workers();
    // Four rounds: the first opens connections, the later ones reuse them (keep-alive).
    for round in 0..4 {
        let batch: Vec<u8> = (round * 10..round * 10 + 10)
            .map(|i| {
                json!({"profileId": format!("p{i}"), "segments": [{"id": "s1", "status": "realized"}]})
                    .to_string()
                    + "\n"
            })
            .collect::<String>()
            .into_bytes();
        engine.ingest(&batch).await.unwrap();
        let want = (round + 1) * 10;
        wait_until("a round of deliveries", Duration::from_secs(15), || {
            rx_a.received().len() == want && rx_b.received().len() == want
        })
        .await;
    }
    workers.iter().for_each(|w| w.abort());
    let cn = |r: &sallyport::receiver::Received| r.client_cert.as_ref().unwrap().subject_cn.clone().unwrap();
    assert!(rx_a.received().iter().all(|r| cn(r) == "gw-for-a"));
    assert!(rx_b.received().iter().all(|r| cn(r) == "gw-for-b"));
    assert!(
        rx_a.connections() < 40,
        "keep-alive: {} connections for 40 requests",
        rx_a.connections()
    );
    assert_eq!(engine.stats().failed, 0);
    let m = engine.metrics_text().await;
    assert!(
        m.contains("sallyport_client_cert_expiry_seconds{identity=\"a\"}") && m.contains("{identity=\"b\"}"),
        "{m}"
    );
}

fn sallyport(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_signed_by_the_receivers_openssl_ca_then_delivery_to_nginx() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bank = OpensslPki::new(d, "bank");
    let nginx = nginx_mtls(d, &bank.server, &bank.server_key, &bank.ca);
    let cfg_path = d.join("gw.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identities.bank]\ncert = \"bank-id.pem\"\nkey = \"bank-id.key\"\n\
             [pki]\nkey_dir = \"keys\"\n[store]\nurl = \"sqlite://gw.db\"\n[[segments]]\nid = \"s1\"\nname = \"S\"\n\
             [[dataflows]]\nname = \"bank\"\nendpoint = \"{}\"\nca = \"{}\"\nidentity = \"bank\"\nsegments = [\"s1\"]\n",
            nginx.url("/profiles"),
            bank.ca.display()
        ),
    )
    .unwrap();
    let cfg = cfg_path.to_str().unwrap();
    let (code, out) = sallyport(&[
        "pki",
        "csr",
        "--config",
        cfg,
        "--identity",
        "bank",
        "--cn",
        "gw-bank",
        "--san",
        "dns:gw.bank.example,uri:spiffe://bank/gw",
        "--out",
        d.join("gw.csr").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let pending = d.join("keys/bank.pending.key");
    assert_eq!(
        std::fs::metadata(&pending).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    let ca = bank.ca.to_str().unwrap().to_owned();
    let ca_key = bank.ca_key.to_str().unwrap().to_owned();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "gw.csr",
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "5",
            "-copy_extensions",
            "copy",
            "-extfile",
            "client.ext",
            "-out",
            "signed.pem",
        ],
        d,
    );

    // A certificate for another key (the receiver's own client cert) is refused.
    let (code, out) = sallyport(&[
        "pki",
        "install",
        "--config",
        cfg,
        "--identity",
        "bank",
        bank.client.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("refused") && out.contains("does not match"), "{out}");
    assert!(!d.join("bank-id.pem").exists());

    let (code, out) = sallyport(&[
        "pki",
        "install",
        "--config",
        cfg,
        "--identity",
        "bank",
        d.join("signed.pem").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(!pending.exists(), "the pending key moved into place");
    let id = sallyport::tls::Identity::load(&d.join("bank-id.pem"), &d.join("bank-id.key")).unwrap();
    assert_eq!(id.facts.sans.dns, ["gw.bank.example"]);
    assert_eq!(id.facts.sans.uri, ["spiffe://bank/gw"]);

    let engine = Engine::open(&Config::load(&cfg_path).unwrap()).await.unwrap();
    let workers = engine.spawn_workers();
    engine.ingest(&s1_profiles(0, 3)).await.unwrap();
    wait_until("3 deliveries to nginx", Duration::from_secs(15), || {
        engine.stats().delivered == 3
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    assert_eq!(engine.stats().failed, 0);
    let log = std::fs::read_to_string(nginx.dir.join("logs/access.log")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("POST /profiles") && l.contains(" 200 "))
            .count(),
        3,
        "{log}"
    );
}
