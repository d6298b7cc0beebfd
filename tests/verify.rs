//! `sallyport verify` against real servers: each failure mode shows up in the right check.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use sallyport::receiver::{ClientAuth, Receiver};
use serde_json::Value;
use support::*;

/// Run `verify --json` and return (exit code, check name → status).
async fn verify(url: &str, cert: &Path, key: &Path, ca: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec![
        "verify".to_owned(),
        url.to_owned(),
        "--client-cert".into(),
        cert.display().to_string(),
        "--client-key".into(),
        key.display().to_string(),
        "--ca".into(),
        ca.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(&args)
        .output()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), v)
}

fn status<'a>(v: &'a Value, name: &str) -> &'a str {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map_or("missing", |c| c["status"].as_str().unwrap())
}

fn detail(v: &Value, name: &str) -> String {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map_or(String::new(), |c| c["detail"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rustls_receiver_requiring_client_certs_passes_every_check() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (code, v) = verify(
        &rx.url("/in"),
        &f.client_cert,
        &f.client_key,
        &f.ca_cert,
        &["--send-test", "--allow", "127.0.0.0/8"],
    )
    .await;
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    for check in [
        "dns",
        "tcp_connect",
        "tls_handshake",
        "server_certificate",
        "client_cert_requested",
        "mtls_only",
        "client_cert_accepted",
        "foreign_cert_refused",
        "send_test",
    ] {
        assert_eq!(status(&v, check), "pass", "{check}: {v:#}");
    }
    assert!(
        detail(&v, "client_cert_requested").contains("our issuer is listed"),
        "{v:#}"
    );
    assert!(detail(&v, "tls_handshake").contains("TLSv1_3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_server_that_requests_but_does_not_require_fails_mtls_only() {
    let tmp = tempfile::tempdir().unwrap();
    let p = OpensslPki::new(tmp.path(), "sv");
    let srv = openssl_s_server(tmp.path(), &p.server, &p.server_key, &p.ca, Some("-verify"), &[]);
    let (code, v) = verify(&srv.url("/"), &p.client, &p.client_key, &p.ca, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(status(&v, "client_cert_requested"), "pass");
    assert_eq!(status(&v, "mtls_only"), "fail", "{v:#}");
    assert!(detail(&v, "mtls_only").contains("endpoint is not mTLS-only"));
}

fn nginx_block(p: &OpensslPki, mode: &str) -> String {
    format!(
        "server {{ listen 127.0.0.1:PORT ssl; ssl_certificate {}; ssl_certificate_key {};\n\
         ssl_client_certificate {}; ssl_verify_client {mode};\n location / {{ return 200 \"ok\"; }} }}",
        p.server.display(),
        p.server_key.display(),
        p.ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_with_ssl_verify_client_on_passes_and_optional_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let p = OpensslPki::new(tmp.path(), "ng");
    let on = nginx(tmp.path(), &nginx_block(&p, "on"));
    let (code, v) = verify(&on.url("/"), &p.client, &p.client_key, &p.ca, &[]).await;
    assert_eq!(code, 0, "{v:#}");
    // nginx completes the handshake and refuses the certless request with HTTP 400.
    assert!(detail(&v, "mtls_only").contains("HTTP 400"), "{v:#}");
    assert_eq!(status(&v, "foreign_cert_refused"), "pass", "{v:#}");

    let optional = nginx(tmp.path(), &nginx_block(&p, "optional"));
    let (code, v) = verify(&optional.url("/"), &p.client, &p.client_key, &p.ca, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(status(&v, "mtls_only"), "fail", "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tls_server_fails_the_certificate_request_check() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let rx = pki.receiver(ClientAuth::NotRequested, StatusCode::OK).await;
    let (code, v) = verify(&rx.url("/"), &f.client_cert, &f.client_key, &f.ca_cert, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(status(&v, "client_cert_requested"), "fail");
    assert_eq!(status(&v, "mtls_only"), "fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_misnamed_server_certificates_fail_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = sallyport::pki::CertAuthority::new("Verify CA", 7).unwrap();
    let write = |name: &str, pem: &sallyport::pki::Pem| {
        let (c, k) = (
            tmp.path().join(format!("{name}.pem")),
            tmp.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, &pem.cert).unwrap();
        std::fs::write(&k, &pem.key).unwrap();
        (c, k)
    };
    std::fs::write(tmp.path().join("ca.pem"), &ca.cert_pem).unwrap();
    let ca_path = tmp.path().join("ca.pem");
    let (cc, ck) = write(
        "client",
        &ca.issue(&sallyport::pki::LeafSpec::client("gw", vec![], vec![], 7))
            .unwrap(),
    );
    let mut expired = sallyport::pki::LeafSpec::localhost_server(7);
    expired.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(20);
    expired.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let (sc, sk) = write("expired", &ca.issue(&expired).unwrap());
    let rx = Receiver::start(&sc, &sk, &ca_path, ClientAuth::Required, StatusCode::OK)
        .await
        .unwrap();
    let (code, v) = verify(&rx.url("/"), &cc, &ck, &ca_path, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(status(&v, "server_certificate"), "fail");
    assert!(detail(&v, "server_certificate").contains("expired"), "{v:#}");

    let mut misnamed = sallyport::pki::LeafSpec::localhost_server(7);
    misnamed.dns = vec!["elsewhere.example".into()];
    misnamed.ips = vec![];
    let (sc, sk) = write("misnamed", &ca.issue(&misnamed).unwrap());
    let rx = Receiver::start(&sc, &sk, &ca_path, ClientAuth::Required, StatusCode::OK)
        .await
        .unwrap();
    let (code, v) = verify(&rx.url("/"), &cc, &ck, &ca_path, &[]).await;
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(status(&v, "server_certificate"), "fail", "{v:#}");
    assert!(
        detail(&v, "server_certificate").contains("does not name this host"),
        "{v:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_1_only_server_fails_the_handshake_check() {
    let tmp = tempfile::tempdir().unwrap();
    let p = OpensslPki::new(tmp.path(), "old");
    let srv = openssl_s_server(
        tmp.path(),
        &p.server,
        &p.server_key,
        &p.ca,
        None,
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
    );
    let (code, v) = verify(&srv.url("/"), &p.client, &p.client_key, &p.ca, &[]).await;
    assert_eq!(code, 1);
    assert_eq!(status(&v, "tls_handshake"), "fail");
    assert!(detail(&v, "tls_handshake").contains("TLS 1.0/1.1"), "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_within_the_budget() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let _keep = std::thread::spawn(move || {
        let _held: Vec<_> = l.incoming().take(3).collect();
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
    // What the command costs when nothing makes it wait (start, load the PKI, connection
    // refused at once), measured now, on this machine's current load.
    let closed = free_port();
    let t = std::time::Instant::now();
    let (code, _) = verify(
        &format!("https://localhost:{closed}/"),
        &f.client_cert,
        &f.client_key,
        &f.ca_cert,
        &["--timeout", "500ms"],
    )
    .await;
    let baseline = t.elapsed();
    assert_eq!(code, 1);

    let t = std::time::Instant::now();
    let (code, v) = verify(
        &format!("https://localhost:{port}/"),
        &f.client_cert,
        &f.client_key,
        &f.ca_cert,
        &["--timeout", "500ms"],
    )
    .await;
    let elapsed = t.elapsed();
    assert_eq!(code, 1);
    assert_eq!(status(&v, "tcp_connect"), "pass");
    assert!(
        detail(&v, "tls_handshake").contains("no TLS handshake within 500ms"),
        "{v:#}"
    );
    // Within the budget: the one handshake that never completes costs the 500 ms asked for,
    // give or take. Without the budget the wait would be the default 2 s
    // (`delivery::DEFAULT_TIMEOUT`) or the server's 5 s hold, at least 1.5 s more than this;
    // 700 ms of slack over 500 ms leaves that out while allowing for a busy machine.
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < baseline + Duration::from_millis(1200),
        "took {elapsed:?} against a baseline of {baseline:?} for a 500 ms budget"
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["verify", "http://x.example/"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
