//! The `sallyport` binary as an operator uses it: exit codes, messages, `--json`, files.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;

use http::StatusCode;
use sallyport::receiver::ClientAuth;
use support::*;
use tokio::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sallyport"))
}

async fn run(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn every_subcommand_has_help() {
    for cmd in [
        "serve", "sidecar", "cert", "verify", "pki", "audit", "dlq", "ingest", "demo", "send", "config",
    ] {
        let (code, out, _) = run(&[cmd, "--help"]).await;
        assert_eq!(code, 0, "{cmd} --help");
        assert!(out.contains("Usage:"), "{cmd}: {out}");
    }
}

#[tokio::test]
async fn bad_config_exits_2_with_file_key_and_reason_and_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("s.toml");
    std::fs::write(
        &cfg,
        "[[dataflows]]\nname = \"acme\"\nendpoint = \"http://acme.example/in\"\nmtls = false\n",
    )
    .unwrap();
    let (code, _, err) = run(&["config", "check", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("s.toml") && err.contains("dataflows[0].endpoint: scheme must be https"),
        "{err}"
    );
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    let (code, _, err) = run(&["config", "check", "--config", "/nonexistent/s.toml"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/s.toml: cannot read"), "{err}");
}

#[tokio::test]
async fn pki_init_writes_private_keys_0600_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();
    let (code, out, err) = run(&[
        "pki",
        "init",
        "--dir",
        d,
        "--cn",
        "gw.acme",
        "--dns",
        "gw.acme.example",
        "--uri",
        "spiffe://acme/gw",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gateway.pem"));
    for key in ["ca.key", "receiver.key", "gateway.key"] {
        let mode = std::fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let id = sallyport::tls::Identity::load(&dir.join("gateway.pem"), &dir.join("gateway.key")).unwrap();
    assert_eq!(id.facts.subject_cn.as_deref(), Some("gw.acme"));
    assert_eq!(id.facts.sans.dns, ["gw.acme.example"]);
    assert_eq!(id.facts.sans.uri, ["spiffe://acme/gw"]);
    let (code, _, err) = run(&["pki", "init", "--dir", d]).await;
    assert_eq!(code, 2);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, _) = run(&["pki", "init", "--dir", d, "--force"]).await;
    assert_eq!(code, 0);
    let (code, out, _) = run(&[
        "cert",
        "show",
        dir.join("gateway.pem").to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["subjectCn"], "sallyport-gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_and_reports_json() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let url = rx.url("/hook");
    let args = [
        "send",
        &url,
        "--client-cert",
        f.client_cert.to_str().unwrap(),
        "--client-key",
        f.client_key.to_str().unwrap(),
        "--ca",
        f.ca_cert.to_str().unwrap(),
        "--allow",
        "127.0.0.1",
        "-H",
        "x-tenant: acme",
        "--data",
        r#"{"p":1}"#,
        "--json",
    ];
    let (code, out, err) = run(&args).await;
    assert_eq!(code, 0, "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["status"], 200);
    assert_eq!(v["peer"]["clientCertRequested"], true);
    assert_eq!(v["peer"]["serverCertificate"]["subjectCn"], "localhost");
    assert!(v["error"].is_null());
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "POST");
    assert!(got[0].headers.iter().any(|(k, v)| k == "x-tenant" && v == "acme"));
    assert!(got[0]
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_refuses_a_receiver_that_is_not_mtls_only_unless_told() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::NotRequested, StatusCode::OK).await;
    let url = rx.url("/hook");
    let mut args = vec![
        "send",
        &url,
        "--client-cert",
        f.client_cert.to_str().unwrap(),
        "--client-key",
        f.client_key.to_str().unwrap(),
        "--ca",
        f.ca_cert.to_str().unwrap(),
        "--allow",
        "127.0.0.1",
        "--data",
        "{}",
    ];
    let (code, _, err) = run(&args).await;
    assert_eq!(code, 1);
    assert!(err.contains("did not request a client certificate"), "{err}");
    assert!(rx.received().is_empty());

    args.push("--json");
    let (code, out, _) = run(&args).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "mtls_not_requested");
    assert_eq!(v["error"]["retryable"], false);

    args.push("--allow-no-client-auth");
    let (code, out, _) = run(&args).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(rx.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reports_a_non_2xx_answer_as_a_failure() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki
        .receiver(ClientAuth::Required, StatusCode::SERVICE_UNAVAILABLE)
        .await;
    let url = rx.url("/hook");
    let (code, _, err) = run(&[
        "send",
        &url,
        "--client-cert",
        f.client_cert.to_str().unwrap(),
        "--client-key",
        f.client_key.to_str().unwrap(),
        "--ca",
        f.ca_cert.to_str().unwrap(),
        "--allow",
        "127.0.0.1",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("503"), "{err}");
}

#[tokio::test]
async fn send_usage_errors_exit_2() {
    let (code, _, err) = run(&["send", "http://example.com/"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("scheme must be https"), "{err}");
    let (code, _, err) = run(&["send", "https://example.com/"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--client-cert"), "{err}");
}

#[tokio::test]
async fn ingest_reports_rejected_lines_with_their_numbers_and_stores_the_rest() {
    let pki = RcgenPki::new();
    let d = pki.dir.path();
    std::fs::write(
        d.join("s.toml"),
        "[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[store]\nurl = \"sqlite://s.db\"\n\
         [[segments]]\nid = \"s1\"\nname = \"S\"\n[[dataflows]]\nname = \"d\"\nendpoint = \"https://localhost:9/\"\n\
         ca = \"ca.pem\"\nsegments = [\"s1\"]\n",
    )
    .unwrap();
    // 12,001 lines: read in pieces and stored in groups of 5,000; the bad line is in the
    // third group, the last line has no newline.
    let line = |i: usize| {
        format!("{{\"profileId\":\"p{i}\",\"segments\":[{{\"id\":\"s1\",\"status\":\"realized\"}}]}}")
    };
    let mut input: Vec<String> = (0..12_000).map(line).collect();
    input.insert(11_000, "{oops".to_owned());
    std::fs::write(d.join("in.ndjson"), input.join("\n")).unwrap();
    let cfg = d.join("s.toml");
    let input = d.join("in.ndjson");
    let (code, out, err) = run(&[
        "ingest",
        "--config",
        cfg.to_str().unwrap(),
        input.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1, "{out} {err}");
    assert!(
        out.contains("accepted 12000 update(s), rejected 1; 12000 deliveries pending"),
        "{out}"
    );
    assert!(err.contains("in.ndjson:11001: invalid update"), "{err}");
}

#[tokio::test]
async fn ingest_lists_the_first_100_rejected_lines_and_counts_the_rest() {
    let pki = RcgenPki::new();
    let d = pki.dir.path();
    std::fs::write(
        d.join("s.toml"),
        "[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n[store]\nurl = \"sqlite://s.db\"\n",
    )
    .unwrap();
    std::fs::write(d.join("bad.ndjson"), "x\n".repeat(150)).unwrap();
    let (cfg, input) = (d.join("s.toml"), d.join("bad.ndjson"));
    let (cfg, input) = (cfg.to_str().unwrap(), input.to_str().unwrap());
    let (code, out, err) = run(&["ingest", "--config", cfg, input]).await;
    assert_eq!(code, 1, "{out} {err}");
    assert!(out.contains("accepted 0 update(s), rejected 150"), "{out}");
    assert_eq!(err.matches("bad.ndjson:").count(), 101, "{err}");
    assert!(err.contains("bad.ndjson:100: invalid update"), "{err}");
    assert!(!err.contains("bad.ndjson:101:"), "{err}");
    assert!(
        err.contains("50 more rejected line(s) not listed (the first 100 are)"),
        "{err}"
    );
    let (code, out, _) = run(&["ingest", "--config", cfg, "--json", input]).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["rejected"].as_u64(), v["errorsOmitted"].as_u64()),
        (Some(150), Some(50))
    );
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(100));
}

#[tokio::test]
async fn demo_runs_a_real_mtls_delivery() {
    let (code, out, err) = run(&["demo", "--profiles", "3"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("the receiver got 3 JSON object(s)"), "{out}");
    assert!(
        out.contains("seen by the receiver: CN=sallyport-gateway"),
        "{out}"
    );
    assert!(out.contains("refused as it must be"), "{out}");
    assert!(out.contains("the plain receiver got 0 request(s)"), "{out}");
}
