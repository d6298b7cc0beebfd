//! Seeing the gateway: `/metrics` read by the `prometheus_client` Python package's parsers,
//! the status page and its login, and `sallyport status` (traces: tests/telemetry.rs).
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use sallyport::receiver::{Action, ClientAuth};
use support::*;

const TOKEN: &str = "observe-admin-token-8c2e";

/// The Python with `prometheus_client` and `opentelemetry-proto` (scripts/observe-tools.sh).
fn python() -> String {
    let out = std::process::Command::new("scripts/observe-tools.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Two dataflows: `rx` delivers, `bad` is refused (400, no retries) until `healthy` is set.
struct Setup {
    pki: RcgenPki,
    cfg: std::path::PathBuf,
    admin: u16,
    _ok: sallyport::receiver::Receiver,
    bad: sallyport::receiver::Receiver,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn setup(extra: &str) -> Setup {
    let pki = RcgenPki::new();
    let ok = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (bad, healthy) = pki
        .receiver_failing_until_healthy(Action::Respond(StatusCode::BAD_REQUEST, vec![]))
        .await;
    let (public, admin) = (free_port(), free_port());
    let f = &pki.files;
    let cfg = pki.dir.path().join("observe.toml");
    let flow = |name: &str, url: &str| {
        format!(
            "[[dataflows]]\nname = \"{name}\"\nendpoint = \"{url}\"\nca = \"{}\"\nsegments = [\"s1\"]\n\
             no_retry_on_4xx = true\nquery = \"source=gw&api_key=query-secret-77\"\n",
            f.ca_cert.display()
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
             [public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             token_env = \"OBSERVE_ADMIN_TOKEN\"\n[store]\nurl = \"sqlite://observe.db\"\n{extra}\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n{}{}",
            f.client_cert.display(),
            f.client_key.display(),
            flow("rx", &ok.url("/in")),
            flow("bad", &bad.url("/in?tenant=acme")),
        ),
    )
    .unwrap();
    Setup {
        pki,
        cfg,
        admin,
        _ok: ok,
        bad,
        healthy,
    }
}

async fn serve(s: &Setup) -> tokio::process::Child {
    spawn_sallyport(
        &["serve", "--config", s.cfg.to_str().unwrap()],
        &[("OBSERVE_ADMIN_TOKEN", TOKEN), ("RUST_LOG", "warn")],
        s.admin,
    )
    .await
}

/// GET `/metrics` with `accept`, parsed by the Python parser for `format`.
async fn scrape(admin: u16, accept: &str, format: &str) -> serde_json::Value {
    let (ct, text) = get_metrics(admin, TOKEN, accept).await;
    assert!(
        ct.starts_with(if format == "openmetrics" {
            "application/openmetrics-text"
        } else {
            "text/plain"
        }),
        "{ct}"
    );
    let mut py = std::process::Command::new(python())
        .arg("tests/observe/parse_metrics.py")
        .arg(format)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(&text).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{format} parser refused /metrics: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&text)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample<'a>(
    parsed: &'a serde_json::Value,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a serde_json::Value> {
    parsed["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_prometheus_client_and_keep_every_series_name() {
    let s = setup("").await;
    let _gw = serve(&s).await;
    let admin = format!("http://127.0.0.1:{}", s.admin);
    let (st, b) = http(
        "POST",
        &format!("{admin}/v1/profiles"),
        Some(TOKEN),
        &s1_profiles(0, 5),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let mut parsed = serde_json::Value::Null;
    for _ in 0..200 {
        parsed = scrape(s.admin, "text/plain", "prometheus").await;
        let delivered = sample(
            &parsed,
            "sallyport_deliveries_total",
            &[("dataflow", "rx"), ("outcome", "delivered")],
        );
        let dead = sample(&parsed, "sallyport_dead_letters_total", &[("dataflow", "bad")]);
        if delivered.map(|d| d[2] == 5.0) == Some(true) && dead.map(|d| d[2] == 5.0) == Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every series the hand-written exposition had, by the same names and labels.
    for (name, labels) in [
        (
            "sallyport_deliveries_total",
            vec![("dataflow", "rx"), ("outcome", "delivered")],
        ),
        (
            "sallyport_deliveries_total",
            vec![("dataflow", "bad"), ("outcome", "dead_letter")],
        ),
        (
            "sallyport_deliveries_total",
            vec![("dataflow", "bad"), ("outcome", "retry")],
        ),
        (
            "sallyport_delivery_errors_total",
            vec![("dataflow", "bad"), ("kind", "http_status")],
        ),
        ("sallyport_dead_letters_total", vec![("dataflow", "bad")]),
        ("sallyport_outbox_pending", vec![("dataflow", "rx")]),
        (
            "sallyport_delivery_attempt_seconds_bucket",
            vec![("dataflow", "rx"), ("le", "0.005")],
        ),
        (
            "sallyport_delivery_attempt_seconds_bucket",
            vec![("dataflow", "rx"), ("le", "+Inf")],
        ),
        ("sallyport_delivery_attempt_seconds_sum", vec![("dataflow", "rx")]),
        (
            "sallyport_delivery_attempt_seconds_count",
            vec![("dataflow", "rx")],
        ),
        ("sallyport_ingest_to_delivered_seconds", vec![("quantile", "0.5")]),
        (
            "sallyport_ingest_to_delivered_seconds",
            vec![("quantile", "0.99")],
        ),
        (
            "sallyport_client_cert_expiry_seconds",
            vec![("identity", "default")],
        ),
        ("sallyport_dataflow_paused", vec![("dataflow", "rx")]),
        ("sallyport_dataflow_held", vec![("dataflow", "rx")]),
    ] {
        assert!(
            sample(&parsed, name, &labels).is_some(),
            "{name} {labels:?} missing: {parsed}"
        );
    }
    assert_eq!(
        sample(
            &parsed,
            "sallyport_deliveries_total",
            &[("dataflow", "rx"), ("outcome", "delivered")]
        )
        .unwrap()[2],
        5.0
    );
    assert_eq!(
        parsed["families"]["sallyport_delivery_attempt_seconds"],
        "histogram"
    );
    // The same series in OpenMetrics, as a scraper asking for it gets them.
    let om = scrape(
        s.admin,
        "application/openmetrics-text; version=1.0.0",
        "openmetrics",
    )
    .await;
    assert_eq!(om["families"]["sallyport_deliveries"], "counter");
    assert!(sample(
        &om,
        "sallyport_deliveries_total",
        &[("dataflow", "rx"), ("outcome", "delivered")]
    )
    .is_some());
    assert!(sample(
        &om,
        "sallyport_delivery_attempt_seconds_bucket",
        &[("dataflow", "rx"), ("le", "+Inf")]
    )
    .is_some());
    drop(s.pki);
}

/// Until `bad` has a dead letter (its receiver refuses), then make its receiver healthy.
async fn dead_letter_then_heal(s: &Setup, admin: &str) {
    let (st, b) = http(
        "POST",
        &format!("{admin}/v1/profiles"),
        Some(TOKEN),
        &s1_profiles(100, 2),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let mut found = false;
    for _ in 0..200 {
        let (_, b) = http(
            "GET",
            &format!("{admin}/v1/dead-letters?dataflow=bad"),
            Some(TOKEN),
            b"",
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        if v["deadLetters"].as_array().is_some_and(|a| !a.is_empty()) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(found, "no dead letter for 'bad'");
    assert!(!s.bad.received().is_empty());
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium() {
    let root = env!("CARGO_MANIFEST_DIR");
    let s = setup("").await;
    let _gw = serve(&s).await;
    let admin = format!("http://127.0.0.1:{}", s.admin);
    dead_letter_then_heal(&s, &admin).await;
    // The page is not on the public listener's side of anything: no cookie, no page.
    let (st, b) = http("GET", &format!("{admin}/ui"), None, b"").await;
    assert_eq!(st, 303, "{b}");
    let (st, _) = http("POST", &format!("{admin}/ui/logout"), None, b"csrf=x").await;
    assert_eq!(st, 401);
    let screenshot = format!("{root}/target/ui-status.png");
    let out = tokio::process::Command::new("node")
        .arg("tests/browser/status_page.mjs")
        .current_dir(root)
        .env("ADMIN", &admin)
        .env("TOKEN", TOKEN)
        .env("DATAFLOW", "rx")
        .env("SCREENSHOT", &screenshot)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "the browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 0);
    // The replay was audited as an operator's (API) replay.
    let (_, b) = http("GET", &format!("{admin}/v1/overview"), Some(TOKEN), b"").await;
    let o: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert!(
        o["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["trigger"] == "replay:api" && a["outcome"] == "replay_delivered"),
        "{b}"
    );
    assert!(!b.contains(TOKEN) && !b.contains("query-secret-77"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_the_same_facts() {
    let s = setup("").await;
    let _gw = serve(&s).await;
    let admin = format!("http://127.0.0.1:{}", s.admin);
    dead_letter_then_heal(&s, &admin).await;
    let run = |json: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"));
        c.args(["status", "--config", s.cfg.to_str().unwrap()])
            .env("OBSERVE_ADMIN_TOKEN", TOKEN);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let out = run(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().next().unwrap().starts_with("DATAFLOW"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("bad ") && l.contains("refused=")),
        "{text}"
    );
    assert!(
        text.contains("DEAD_LETTER") && text.contains("IDENTITY"),
        "{text}"
    );
    assert!(!text.contains(TOKEN));
    let out = run(true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = v["dataflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "bad")
        .unwrap();
    assert!(bad["dead"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["identities"][0]["role"], "current");
    // Without the token the command says so instead of printing anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["status", "--config", s.cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
