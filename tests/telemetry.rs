//! Traces reach a real OTLP/HTTP receiver: `sallyport serve` with `[telemetry]` posts its spans
//! as protobuf to tests/telemetry/otlp_receiver.py, which decodes them with the
//! `opentelemetry-proto` package (no OpenTelemetry Collector can be installed from the package
//! registries reachable here). The spans carry the HTTP client conventions and the TLS facts,
//! the audit record carries the attempt's trace id, and no secret appears in any export.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::BufRead as _;
use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use sallyport::receiver::ClientAuth;
use serde_json::Value;
use support::*;

const ADMIN_TOKEN: &str = "telemetry-admin-token-61b0";
const BEARER: &str = "bearer-secret-5d2a9c";
const QUERY_SECRET: &str = "query-secret-91f3e7";
const COLLECTOR_TOKEN: &str = "collector-token-0c44";
const APP_TOKEN: &str = "app-token-3e8b17";
const ROUTE_QUERY_SECRET: &str = "route-query-secret-a90d";
/// The environment of every `sallyport` run here (the CLI validates the config too).
const ENVS: &[(&str, &str)] = &[
    ("TEL_ADMIN_TOKEN", ADMIN_TOKEN),
    ("TEL_BEARER", BEARER),
    ("TEL_COLLECTOR_AUTH", "Bearer collector-token-0c44"),
    ("RUST_LOG", "warn"),
];

/// The Python with `opentelemetry-proto` (scripts/observe-tools.sh).
fn python() -> String {
    let out = std::process::Command::new("scripts/observe-tools.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The OTLP receiver writing spans to `out`, and its port. Killed when dropped.
fn otlp_receiver(out: &std::path::Path) -> (std::process::Child, u16) {
    let mut child = std::process::Command::new(python())
        .arg("tests/telemetry/otlp_receiver.py")
        .arg(out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("receiver said {line:?}"));
    (child, port)
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spans(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first audit record that `pick` accepts, read with `sallyport audit export` (polled:
/// a record follows the receiver's answer).
async fn audit_record(cfg: &std::path::Path, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
            .args(["audit", "export", "--config", cfg.to_str().unwrap()])
            .envs(ENVS.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let found = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["record"].clone())
            .find(|r| pick(r));
        if let Some(r) = found {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "no such record in {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/metrics` as OpenMetrics text.
async fn openmetrics(admin: u16) -> String {
    let (_, body) = get_metrics(admin, ADMIN_TOKEN, "application/openmetrics-text; version=1.0.0").await;
    String::from_utf8_lossy(&body).into_owned()
}

/// Ingest one profile through `serve`'s admin API on `admin` and wait until `rx` has it.
async fn ingest_one_and_wait(admin: u16, rx: &sallyport::receiver::Receiver) {
    let (code, body) = http(
        "POST",
        &format!("http://127.0.0.1:{admin}/v1/profiles"),
        Some(ADMIN_TOKEN),
        &s1_profiles(0, 1),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_until("the delivery", Duration::from_secs(20), || {
        !rx.received().is_empty()
    })
    .await;
}

/// The delivered audit record of dataflow `rx`.
async fn delivered_record(cfg: &std::path::Path) -> Value {
    audit_record(cfg, |r| r["dataflow"] == "rx" && r["outcome"] == "delivered").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_conventions_tls_facts_and_no_secret() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let spans_file = pki.dir.path().join("spans.jsonl");
    let (collector, otlp_port) = otlp_receiver(&spans_file);
    let _collector = Killed(collector);
    let (public, admin, sidecar) = (free_port(), free_port(), free_port());
    let f = &pki.files;
    let cfg = pki.dir.path().join("telemetry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
             [public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             token_env = \"TEL_ADMIN_TOKEN\"\n[store]\nurl = \"sqlite://telemetry.db\"\n\
             [secrets.collector]\nenv = \"TEL_COLLECTOR_AUTH\"\n\
             [telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp_port}/v1/traces\"\n\
             service_name = \"sallyport-under-test\"\nheaders = {{ x-tenant = \"acme\" }}\n\
             header_secrets = {{ authorization = \"collector\" }}\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n\
             [[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\nsegments = [\"s1\"]\n\
             query = \"source=gw&api_key={QUERY_SECRET}\"\n\
             auth = {{ kind = \"bearer\", token_env = \"TEL_BEARER\" }}\n\
             [sidecar]\nlisten = \"127.0.0.1:{sidecar}\"\n\
             [[sidecar.routes]]\nprefix = \"/app\"\nupstream = \"{}\"\nca = \"{}\"\n\
             query = \"sig={ROUTE_QUERY_SECRET}\"\n",
            f.client_cert.display(),
            f.client_key.display(),
            rx.url("/in"),
            f.ca_cert.display(),
            rx.url("/up"),
            f.ca_cert.display(),
        ),
    )
    .unwrap();
    let mut serve = spawn_sallyport(&["serve", "--config", cfg.to_str().unwrap()], ENVS, admin).await;

    ingest_one_and_wait(admin, &rx).await;
    // The receiver did get the secrets: they are real, and only the spans must lack them.
    let got = &rx.received()[0];
    assert!(
        got.path_and_query.contains(QUERY_SECRET),
        "{}",
        got.path_and_query
    );
    assert!(got.headers.iter().any(|(_, v)| v.contains(BEARER)));
    let delivered = delivered_record(&cfg).await;
    // OpenMetrics scrapes carry the attempt's trace id as the latency bucket's exemplar.
    let metrics = openmetrics(admin).await;
    let exemplar = format!("trace_id=\"{}\"", delivered["traceId"].as_str().unwrap());
    assert!(metrics.contains(&exemplar), "{exemplar} not in {metrics}");

    // A sidecar request: the app's own Authorization and query go upstream, not into a span.
    let (code, _) = http(
        "GET",
        &format!("http://127.0.0.1:{sidecar}/app/items?app_token={APP_TOKEN}"),
        Some(APP_TOKEN),
        b"",
    )
    .await;
    assert_eq!(code, 200);
    let proxied = audit_record(&cfg, |r| r["outcome"] == "proxied").await;
    // The status page's facts count the route's attempt.
    let (code, overview) = http(
        "GET",
        &format!("http://127.0.0.1:{admin}/v1/overview"),
        Some(ADMIN_TOKEN),
        b"",
    )
    .await;
    assert_eq!(code, 200, "{overview}");
    let overview: Value = serde_json::from_str(&overview).unwrap();
    let route = &overview["sidecarRoutes"][0];
    assert_eq!(
        (
            route["prefix"].as_str(),
            route["attempts"].as_u64(),
            route["failed"].as_u64()
        ),
        (Some("/app"), Some(1), Some(0)),
        "{route}"
    );

    // SIGTERM: the gateway stops and sends what its exporter still holds.
    let pid = serve.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exited = tokio::time::timeout(Duration::from_secs(20), serve.wait()).await;
    assert!(matches!(exited, Ok(Ok(s)) if s.success()), "{exited:?}");

    let all = spans(&spans_file);
    assert!(!all.is_empty(), "no span reached the receiver");
    for s in &all {
        assert_eq!(s["resource"]["service.name"], "sallyport-under-test", "{s}");
    }
    let ingest = all
        .iter()
        .find(|s| s["name"] == "POST /v1/profiles")
        .unwrap_or_else(|| panic!("no ingest span in {all:?}"));
    let a = &ingest["attributes"];
    assert_eq!(ingest["kind"], 2, "a server span: {ingest}");
    assert_eq!(a["http.request.method"], "POST");
    assert_eq!(a["http.route"], "/v1/profiles");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["sallyport.ingest.accepted"], 1);
    assert_eq!(a["sallyport.ingest.rejected"], 0);

    let attempt = all
        .iter()
        .find(|s| s["attributes"]["sallyport.dataflow"] == "rx")
        .unwrap_or_else(|| panic!("no attempt span in {all:?}"));
    let a = &attempt["attributes"];
    assert_eq!(attempt["name"], "POST");
    assert_eq!(attempt["kind"], 3, "a client span: {attempt}");
    assert_eq!(a["http.request.method"], "POST");
    let endpoint = url::Url::parse(&rx.url("/in")).unwrap();
    let (host, port) = (endpoint.host_str().unwrap(), endpoint.port().unwrap());
    assert_eq!(a["server.address"], host);
    assert_eq!(a["server.port"], i64::from(port));
    assert_eq!(
        a["url.full"],
        format!("https://{host}:{port}/in?source=REDACTED&api_key=REDACTED")
    );
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["http.request.resend_count"], 0);
    assert!(a.get("error.type").is_none(), "{attempt}");
    assert!(
        matches!(a["tls.protocol.version"].as_str(), Some("1.2" | "1.3")),
        "{attempt}"
    );
    assert!(a["tls.cipher"].as_str().unwrap().starts_with("TLS_"), "{attempt}");
    let der = sallyport::tls::pem::load_certs(&f.server_cert).unwrap();
    let fingerprint = sallyport::tls::facts::CertFacts::from_der(&der[0])
        .unwrap()
        .sha256_fingerprint
        .replace(':', "");
    assert_eq!(a["tls.server.hash.sha256"], fingerprint.as_str());
    assert_eq!(a["sallyport.tls.client_certificate_requested"], true);
    assert_eq!(a["sallyport.tls.client_certificate_presented"], true);
    assert_eq!(attempt["status"]["code"], 0, "unset: {attempt}");

    let via_sidecar = all
        .iter()
        .find(|s| s["attributes"].get("sallyport.route").is_some())
        .unwrap_or_else(|| panic!("no sidecar span in {all:?}"));
    let a = &via_sidecar["attributes"];
    assert_eq!(via_sidecar["name"], "GET");
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(
        a["url.full"],
        format!("https://{host}:{port}/up/items?app_token=REDACTED&sig=REDACTED")
    );
    assert_eq!(a["tls.server.hash.sha256"], fingerprint.as_str());
    assert_eq!(proxied["traceId"], via_sidecar["traceId"], "{proxied}");
    assert_ne!(via_sidecar["traceId"], attempt["traceId"]);

    // The audit record names the attempt's trace.
    assert_eq!(delivered["traceId"], attempt["traceId"], "{delivered}");
    assert_eq!(attempt["traceId"].as_str().unwrap().len(), 32);

    // No secret anywhere in what was exported: decoded spans and raw protobuf bodies.
    let decoded = std::fs::read_to_string(&spans_file).unwrap();
    let raw = std::fs::read(spans_file.with_extension("jsonl.raw")).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    for secret in [
        BEARER,
        QUERY_SECRET,
        ADMIN_TOKEN,
        COLLECTOR_TOKEN,
        APP_TOKEN,
        ROUTE_QUERY_SECRET,
        "Bearer",
    ] {
        assert!(!decoded.contains(secret), "{secret} in the spans: {decoded}");
        assert!(!raw.contains(secret), "{secret} in an export body");
    }
    // The collector's own credentials went as a header, from [secrets].
    let headers = std::fs::read_to_string(spans_file.with_extension("jsonl.headers")).unwrap();
    let first: Value = serde_json::from_str(headers.lines().next().unwrap()).unwrap();
    let h = |name: &str| {
        first["headers"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str().unwrap().to_owned())
    };
    assert_eq!(h("authorization"), Some(format!("Bearer {COLLECTOR_TOKEN}")));
    assert_eq!(h("x-tenant").as_deref(), Some("acme"));
    assert_eq!(h("content-type").as_deref(), Some("application/x-protobuf"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_telemetry_no_trace_id_is_recorded() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (public, admin) = (free_port(), free_port());
    let f = &pki.files;
    let cfg = pki.dir.path().join("plain.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
             [public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             token_env = \"TEL_ADMIN_TOKEN\"\n[store]\nurl = \"sqlite://plain.db\"\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n\
             [[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\nsegments = [\"s1\"]\n",
            f.client_cert.display(),
            f.client_key.display(),
            rx.url("/in"),
            f.ca_cert.display(),
        ),
    )
    .unwrap();
    let serve = spawn_sallyport(&["serve", "--config", cfg.to_str().unwrap()], ENVS, admin).await;
    ingest_one_and_wait(admin, &rx).await;
    let delivered = delivered_record(&cfg).await;
    drop(serve);
    assert!(delivered.get("traceId").is_none(), "{delivered}");
}
