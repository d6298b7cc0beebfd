//! One delivery core for the whole program: every part that connects out — the sidecar, the
//! alert webhook, `verify`, `cert fetch` — presents the identity the one registry has in force
//! (renewed on disk, or after SIGHUP) and connects through the one connector (egress policy,
//! pinned source address).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use sallyport::alerts::Alerts;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::pki::CertAuthority;
use sallyport::receiver::{Action, ClientAuth, Receiver};
use serde_json::Value;
use support::*;

/// What these tests need of an [`IssuingCa`]: receivers trusting a chosen client CA.
trait Setup {
    async fn receiver(&self, client_ca: &str, status: StatusCode) -> Receiver;
    fn write(&self, name: &str, text: &str) -> PathBuf;
}

impl Setup for IssuingCa {
    /// A receiver requiring a client certificate from the CA in `client_ca`, answering
    /// `status` and closing each connection: every request shows the certificate presented
    /// on a new connection.
    async fn receiver(&self, client_ca: &str, status: StatusCode) -> Receiver {
        Receiver::start_with(
            &self.path("rx.pem"),
            &self.path("rx.key"),
            &self.path(client_ca),
            ClientAuth::Required,
            Arc::new(move |_| Action::Respond(status, vec![("connection", "close".into())])),
        )
        .await
        .unwrap()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn last_cn(rx: &Receiver) -> Option<String> {
    rx.received()
        .last()
        .and_then(|r| r.client_cert.as_ref())
        .and_then(|c| c.subject_cn.clone())
}

/// `verify URL --config CFG --dataflow DF --json`: its exit code and report.
async fn verify_dataflow(url: &str, cfg: &std::path::Path, dataflow: &str) -> (Option<i32>, Value) {
    let out = sallyport(&[
        "verify",
        url,
        "--config",
        cfg.to_str().unwrap(),
        "--dataflow",
        dataflow,
        "--json",
    ])
    .await;
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), report)
}

async fn sallyport(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .output()
        .await
        .unwrap()
}

/// POST through the sidecar until the receiver names `cn`, or fail after `limit`.
async fn until_presented(port: u16, rx: &Receiver, cn: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (status, body) = http("POST", &format!("http://127.0.0.1:{port}/rx/in"), None, b"{}").await;
        assert_eq!(status, 200, "{body}");
        if last_cn(rx).as_deref() == Some(cn) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sidecar still presents {:?}, not {cn}",
            last_cn(rx)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_presents_a_renewed_certificate_and_sighup_reloads_without_ending_it() {
    let s = IssuingCa::new("One Core Test CA");
    s.client("gw", "gw-first");
    let rx = s.receiver("ca.pem", StatusCode::OK).await;
    let port = free_port();
    let cfg = s.write(
        "sidecar.toml",
        &format!(
            "[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n[egress]\nallow = [\"127.0.0.0/8\"]\n\
             [store]\nurl = \"sqlite://sc.db\"\n[sidecar]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sidecar.routes]]\nprefix = \"/rx\"\nupstream = \"{}\"\nca = \"ca.pem\"\n",
            rx.url("/")
        ),
    );
    let mut child = spawn_sallyport(&["sidecar", "--config", cfg.to_str().unwrap()], &[], port).await;
    until_presented(port, &rx, "gw-first", Duration::from_secs(5)).await;

    // Renewed on disk: the next new upstream connection presents it, no restart.
    s.client("gw", "gw-renewed");
    until_presented(port, &rx, "gw-renewed", Duration::from_secs(15)).await;

    // SIGHUP reloads too, and the sidecar goes on serving (the signal's default would end it).
    s.client("gw", "gw-after-hup");
    let pid = child.id().unwrap().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    until_presented(port, &rx, "gw-after-hup", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the sidecar ended after SIGHUP"
    );
    let (status, _) = http("POST", &format!("http://127.0.0.1:{port}/rx/in"), None, b"{}").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_webhook_presents_the_identity_in_force_after_a_rotation() {
    let s = IssuingCa::new("One Core Test CA");
    s.client("gw", "gw-first");
    let hook = s.receiver("ca.pem", StatusCode::OK).await;
    let failing = s.receiver("ca.pem", StatusCode::BAD_GATEWAY).await;
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n\
         [store]\nurl = \"sqlite://alerts.db\"\n\
         [alerts]\nwebhook = \"{}\"\nca = \"ca.pem\"\nwindow = \"30s\"\ninterval = \"100ms\"\nmin_attempts = 2\n\
         [[segments]]\nid = \"s1\"\nname = \"S\"\n\
         [[dataflows]]\nname = \"flaky\"\nendpoint = \"{}\"\nca = \"ca.pem\"\nsegments = [\"s1\"]\nmax_attempts = 1\n",
        hook.url("/alerts"),
        failing.url("/in")
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("alerts.toml"), s.dir.path()).unwrap();
    let engine = Engine::open(&cfg).await.unwrap();
    let alerts = tokio::spawn(
        Alerts::from_config(&cfg, engine.core())
            .unwrap()
            .run(engine.clone()),
    );
    // The certificate has 20 days left: the 30-day expiry alert fires at once, with it.
    wait_until("the expiry alert", Duration::from_secs(10), || {
        !hook.received().is_empty()
    })
    .await;
    assert_eq!(last_cn(&hook).as_deref(), Some("gw-first"));

    // Rotated: the registry reloads it (as its watcher does), and the next alert presents it.
    s.client("gw", "gw-rotated");
    assert!(engine.identity_store().unwrap().reload(false).unwrap());
    let workers = engine.spawn_workers();
    engine.ingest(&s1_profiles(0, 3)).await.unwrap();
    wait_until("the failure alerts", Duration::from_secs(15), || {
        hook.received().len() >= 3
    })
    .await;
    alerts.abort();
    workers.iter().for_each(|w| w.abort());
    let seen: Vec<(String, String)> = hook
        .received()
        .iter()
        .map(|r| {
            let rule = serde_json::from_slice::<Value>(&r.body).unwrap()["rule"]
                .as_str()
                .unwrap()
                .to_owned();
            let cn = r.client_cert.as_ref().unwrap().subject_cn.clone().unwrap();
            (rule, cn)
        })
        .collect();
    for (rule, cn) in &seen[1..] {
        assert_eq!(cn, "gw-rotated", "the {rule} alert: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_a_dataflow_presents_that_dataflows_own_identity() {
    let s = IssuingCa::new("One Core Test CA");
    s.client("gw", "gw-default");
    // The receiver trusts only its own CA, which issued the dataflow's named identity.
    let theirs = CertAuthority::new("Receiver's Own CA", 30).unwrap();
    s.write("their-ca.pem", &theirs.cert_pem);
    s.client_from(&theirs, "for-them", "gw-for-them");
    let rx = s.receiver("their-ca.pem", StatusCode::OK).await;
    let cfg = s.write(
        "verify.toml",
        &format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n\
             [identities.theirs]\ncert = \"for-them.pem\"\nkey = \"for-them.key\"\n[store]\nurl = \"sqlite://v.db\"\n\
             [[dataflows]]\nname = \"them\"\nendpoint = \"{}\"\nca = \"ca.pem\"\nidentity = \"theirs\"\n",
            rx.url("/in")
        ),
    );
    let (code, v) = verify_dataflow(&rx.url("/in"), &cfg, "them").await;
    let accepted = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "client_cert_accepted")
        .unwrap();
    assert_eq!(accepted["status"], "pass", "{v:#}");
    assert_eq!(code, Some(0), "{v:#}");
    assert!(rx
        .received()
        .iter()
        .filter_map(|r| r.client_cert.as_ref())
        .all(|c| c.subject_cn.as_deref() == Some("gw-for-them")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_cert_fetch_connect_from_the_pinned_source_address() {
    let s = IssuingCa::new("One Core Test CA");
    s.client("gw", "gw-pinned");
    let rx = s.receiver("ca.pem", StatusCode::OK).await;
    let (public, admin) = (free_port(), free_port());
    let cfg = s.write(
        "pinned.toml",
        &format!(
            "[egress]\nsource_ips = [\"127.0.0.2\"]\nallow = [\"127.0.0.0/8\"]\n\
             [identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n[store]\nurl = \"sqlite://p.db\"\n\
             [public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"ca.pem\"\n",
            rx.url("/in")
        ),
    );
    let (code, v) = verify_dataflow(&rx.url("/in"), &cfg, "rx").await;
    assert_eq!(code, Some(0), "{v:#}");
    // The report names the source address and finds it in the published egress list.
    assert_eq!(v["diagnostics"]["source_address"], "127.0.0.2", "{v:#}");
    assert_eq!(
        v["diagnostics"]["egress_list"],
        serde_json::json!(["127.0.0.2"]),
        "{v:#}"
    );
    assert_eq!(v["diagnostics"]["source_in_egress_list"], true, "{v:#}");
    let peers = rx.peers();
    assert!(!peers.is_empty());
    assert!(
        peers.iter().all(|p| p.ip().to_string() == "127.0.0.2"),
        "verify connected from {peers:?}"
    );

    // cert fetch, through nginx in front of the gateway's public listener: nginx logs the
    // address each connection came from.
    let _gateway = spawn_sallyport(&["serve", "--config", cfg.to_str().unwrap()], &[], public).await;
    let proxy = nginx(
        s.dir.path(),
        &format!(
            "log_format peer '$remote_addr';\n\
             server {{ listen 127.0.0.1:PORT; access_log {}/peers.log peer;\n\
             location / {{ proxy_pass http://127.0.0.1:{public}; }} }}",
            s.dir.path().display()
        ),
    );
    let out = sallyport(&[
        "cert",
        "fetch",
        &format!("http://127.0.0.1:{}", proxy.port),
        "--config",
        cfg.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gw-pinned"));
    let log = std::fs::read_to_string(s.path("peers.log")).unwrap();
    assert!(!log.trim().is_empty());
    assert!(
        log.lines().all(|l| l.trim() == "127.0.0.2"),
        "cert fetch connected from: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_makes_no_connection_to_an_address_the_policy_denies() {
    let s = IssuingCa::new("One Core Test CA");
    s.client("gw", "gw");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if conn.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    // Only 10.0.0.0/8 is allowed: localhost (a special range) is refused.
    let url = format!("https://localhost:{port}/in");
    let cfg = s.write(
        "denied.toml",
        &format!(
            "[egress]\nallow = [\"10.0.0.0/8\"]\n[identity]\ncert = \"gw.pem\"\nkey = \"gw.key\"\n\
             [store]\nurl = \"sqlite://d.db\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{url}\"\nca = \"ca.pem\"\n"
        ),
    );
    let (code, v) = verify_dataflow(&url, &cfg, "rx").await;
    assert_eq!(code, Some(1), "{v:#}");
    let dns = &v["checks"][0];
    assert_eq!(dns["name"], "dns");
    assert_eq!(dns["status"], "fail");
    assert!(
        dns["detail"]
            .as_str()
            .unwrap()
            .contains("denied by egress policy"),
        "{v:#}"
    );
    assert_eq!(v["diagnostics"]["failure"]["class"], "network", "{v:#}");
    assert!(
        v["diagnostics"]["failure"]["fix"]
            .as_str()
            .unwrap()
            .contains("[egress] allow"),
        "{v:#}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "verify connected: {v:#}");
}
