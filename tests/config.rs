//! Config and TLS-material inputs: the documented example parses, and every bad input gives
//! its own clear error naming the file, key and reason (table-driven).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use sallyport::config::{Config, ConfigError};
use sallyport::tls::{pem, Identity, TlsError};
use support::*;

/// A directory laid out like the repository: config/ beside certs/ with a dev PKI.
fn repo_like() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("config")).unwrap();
    sallyport::pki::init(&tmp.path().join("certs"), &Default::default()).unwrap();
    tmp
}

#[test]
fn the_documented_example_config_is_valid() {
    let tmp = repo_like();
    let text = std::fs::read_to_string("config/sallyport.toml").unwrap();
    let cfg = Config::from_toml(
        &text,
        Path::new("config/sallyport.toml"),
        &tmp.path().join("config"),
    )
    .unwrap();
    let df = cfg.dataflow("local-receiver").unwrap();
    assert!(df.mtls);
    assert_eq!(df.timeout(), std::time::Duration::from_secs(2));
    let d = cfg.dataflow_destination(df).unwrap();
    assert_eq!(d.timeout, std::time::Duration::from_secs(2));
    assert_eq!(d.headers.len(), 2);
    assert_eq!(
        d.query,
        vec![("source".into(), "sallyport".into()), ("v".into(), "1".into())]
    );
}

const GOOD_PREFIX: &str = r#"
[identity]
cert = "../certs/gateway.pem"
key = "../certs/gateway.key"
[[segments]]
id = "s1"
name = "Segment one"
"#;

fn dataflow(extra: &str) -> String {
    format!("{GOOD_PREFIX}\n[[dataflows]]\nname = \"d\"\nendpoint = \"https://rx.example/in\"\n{extra}\n")
}

#[test]
fn each_bad_config_names_key_and_reason() {
    let tmp = repo_like();
    let base = tmp.path().join("config");
    std::env::remove_var("SALLYPORT_TEST_UNSET_TOKEN");
    let cases: Vec<(String, &str, &str)> = vec![
        (dataflow("endpoint2 = 1"), "line 12, column 1", "unknown field `endpoint2`"),
        ("[[dataflows]\n".into(), "line 1", ""),
        (
            format!("{GOOD_PREFIX}[[dataflows]]\nname=\"d\"\nendpoint=\"http://rx.example/\"\n"),
            "dataflows[0].endpoint",
            "scheme must be https when mtls = true",
        ),
        (
            format!("{GOOD_PREFIX}[[dataflows]]\nname=\"d\"\nendpoint=\"https://u:p@rx.example/\"\n"),
            "dataflows[0].endpoint",
            "user:password@",
        ),
        (
            format!("{GOOD_PREFIX}[[dataflows]]\nname=\"d\"\nendpoint=\"not a url\"\n"),
            "dataflows[0].endpoint",
            "is not a URL",
        ),
        (dataflow("timeout = \"2 parsecs\""), "dataflows[0].timeout", "not a duration"),
        (dataflow("timeout = \"5m\""), "dataflows[0].timeout", "outside"),
        (dataflow("headers = \"bad name:v\""), "dataflows[0].headers", "valid header name"),
        (dataflow("headers = { x-a = \"v\\r\\nInjected: 1\" }"), "dataflows[0].headers", "control character"),
        (dataflow("headers = \"host:evil.example\""), "dataflows[0].headers", "cannot be overridden"),
        (dataflow("query = \"a=1&b\""), "dataflows[0].query", "not name=value"),
        (dataflow("ca = \"../certs/missing.pem\""), "dataflows[0].ca", "does not exist"),
        (dataflow("segments = [\"nope\"]"), "dataflows[0].segments[0]", "not in the [[segments]] catalog"),
        (dataflow("auth = { kind = \"bearer\" }"), "dataflows[0].auth.token", "token_env or token_file is required"),
        (
            dataflow("auth = { kind = \"bearer\", token_env = \"SALLYPORT_TEST_UNSET_TOKEN\" }"),
            "dataflows[0].auth.token",
            "SALLYPORT_TEST_UNSET_TOKEN is not set",
        ),
        (
            dataflow(
                "auth = { kind = \"oauth2_client_credentials\", token_url = \"https://a.example/t?x=1&y=2\", \
                 client_id = \"c\", client_secret_file = \"../certs/ca.pem\" }",
            ),
            "dataflows[0].auth.token_url",
            "at most one query parameter",
        ),
        (dataflow("auth = { kind = \"magic\" }"), "line", "unknown variant `magic`"),
        (
            "[[dataflows]]\nname=\"d\"\nendpoint=\"https://rx.example/\"\n".to_string(),
            "dataflows[0].mtls",
            "needs an [identity]",
        ),
        (
            format!("{GOOD_PREFIX}[[dataflows]]\nname=\"d\"\nendpoint=\"https://a.example/\"\n[[dataflows]]\nname=\"d\"\nendpoint=\"https://b.example/\"\n"),
            "dataflows[1].name",
            "used by another dataflow",
        ),
        ("[store]\nurl = \"mysql://x\"\n".into(), "store.url", "must start with sqlite://"),
        (
            "[store]\nurl = \"postgres://u:hunter2@db.example/x\"\n".into(),
            "store.url",
            "holds a password; use store.password_env",
        ),
        (
            "[store]\nurl = \"postgres://u@db.example/x?password=hunter2\"\n".into(),
            "store.url",
            "holds a password; use store.password_env",
        ),
        (
            "[store]\nurl = \"postgres://u@db.example/x?sslmode=disable&Pass%77ord=hunter2\"\n".into(),
            "store.url",
            "holds a password; use store.password_env",
        ),
        (
            "[store]\nurl = \"postgresql://u:hunter2@db1.example:5432,db2.example:5432/x\"\n".into(),
            "store.url",
            "holds a password; use store.password_env",
        ),
        (
            "[store]\nurl = \"mysql://db.example/x?user=u&password=hunter2\"\n".into(),
            "store.url",
            "must start with sqlite://",
        ),
        ("[store]\nlease = \"10ms\"\n".into(), "store.lease", "from 1s to 1h"),
        ("[store]\npool_size = 0\n".into(), "store.pool_size", "from 1 to 64"),
        ("[store]\nschema = \"a;drop\"\n".into(), "store.schema", "letters, digits or '_'"),
        (
            "[store]\nurl = \"postgres://db.example/x\"\npassword_env = \"SALLYPORT_TEST_UNSET_TOKEN\"\n".into(),
            "store.password",
            "SALLYPORT_TEST_UNSET_TOKEN is not set",
        ),
        (
            "[identity]\ncert = \"../certs/nope.pem\"\nkey = \"../certs/gateway.key\"\n".into(),
            "identity.cert",
            "does not exist",
        ),
        (
            "[[segments]]\nid = \"s\"\nname = \"n\"\ncreated_at = \"yesterday\"\n".into(),
            "segments[0].created_at",
            "not an RFC 3339 time",
        ),
        (
            "[telemetry]\notlp_endpoint = \"grpc://127.0.0.1:4317\"\n".into(),
            "telemetry.otlp_endpoint",
            "http:// or https://",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://u:hunter2@127.0.0.1:4318/v1/traces\"\n".into(),
            "telemetry.otlp_endpoint",
            "holds credentials",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces?key=1\"\n".into(),
            "telemetry.otlp_endpoint",
            "no query",
        ),
        (
            "[telemetry]\nservice_name = \"x\"\nheaders = { x-a = \"b\" }\n".into(),
            "telemetry.otlp_endpoint",
            "is required",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n\
             header_secrets = { authorization = \"nope\" }\n"
                .into(),
            "telemetry.header_secrets.authorization",
            "not declared in [secrets]",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\ntimeout = \"5m\"\n".into(),
            "telemetry.timeout",
            "between 100ms and 60s",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n\
             headers = { content-type = \"x\" }\n"
                .into(),
            "telemetry.headers.content-type",
            "set by the exporter",
        ),
    ];
    for (text, key, reason) in cases {
        let err = Config::from_toml(&text, Path::new("bad.toml"), &base).expect_err(&text);
        let msg = err.to_string();
        assert!(!msg.contains("hunter2"), "a password in an error: {msg}");
        assert!(msg.starts_with("bad.toml: "), "file not named: {msg}");
        assert!(
            msg.contains(key) && msg.contains(reason),
            "expected '{key}: {reason}' in:\n{msg}\nfor:\n{text}"
        );
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let tmp = repo_like();
    let text = dataflow("timeout = \"nope\"\nquery = \"x\"\nheaders = \"a\"");
    let err = Config::from_toml(&text, Path::new("bad.toml"), &tmp.path().join("config")).unwrap_err();
    let ConfigError::Invalid { issues, .. } = &err else {
        panic!("{err}")
    };
    let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "dataflows[0].timeout",
            "dataflows[0].headers",
            "dataflows[0].query"
        ]
    );
}

#[test]
fn every_bad_pem_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = RcgenPki::new();
    let f = &pki.files;
    let write = |name: &str, text: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let not_pem = write("not-pem.txt", b"hello, I am not a certificate\n");
    let empty = write("empty.pem", b"");
    let bad_b64 = write(
        "bad-b64.pem",
        b"-----BEGIN CERTIFICATE-----\n!!!notbase64!!!\n-----END CERTIFICATE-----\n",
    );
    let not_x509 = write(
        "not-x509.pem",
        b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    );
    let encrypted = d.join("enc.key");
    let out = std::process::Command::new("openssl")
        .args([
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-passout",
            "pass:secret",
            "-in",
        ])
        .arg(&f.client_key)
        .arg("-out")
        .arg(&encrypted)
        .output()
        .unwrap();
    assert!(out.status.success());

    let cert_err = |p: &Path| pem::load_certs(p).unwrap_err();
    let key_err = |p: &Path| pem::load_key(p).unwrap_err();
    let cases: Vec<(TlsError, &str)> = vec![
        (cert_err(&not_pem), "no CERTIFICATE block found"),
        (cert_err(&empty), "no CERTIFICATE block found"),
        (cert_err(&bad_b64), "not PEM"),
        (cert_err(&not_x509), "is not valid X.509"),
        (cert_err(&d.join("missing.pem")), "cannot read"),
        (cert_err(&f.client_key), "no CERTIFICATE block found"),
        (key_err(&not_pem), "no private key found"),
        (key_err(&f.client_cert), "no private key found"),
        (key_err(&encrypted), "the private key is encrypted"),
        (
            Identity::load(&f.client_cert, &f.server_key).unwrap_err(),
            "does not match the certificate",
        ),
    ];
    for (err, want) in cases {
        let msg = err.to_string();
        assert!(msg.contains(want), "expected '{want}' in '{msg}'");
        assert!(
            msg.contains(tmp.path().to_str().unwrap()) || msg.contains(pki.dir.path().to_str().unwrap()),
            "file not named: {msg}"
        );
    }
}

#[test]
fn expired_identity_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = sallyport::pki::CertAuthority::new("CA", 7).unwrap();
    let mut spec = sallyport::pki::LeafSpec::client("old-gateway", vec![], vec![], 7);
    spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let pem = ca.issue(&spec).unwrap();
    let (c, k) = (tmp.path().join("c.pem"), tmp.path().join("c.key"));
    std::fs::write(&c, pem.cert).unwrap();
    std::fs::write(&k, pem.key).unwrap();
    let msg = Identity::load(&c, &k).unwrap_err().to_string();
    assert!(msg.contains("'old-gateway' expired at"), "{msg}");
}

#[test]
fn pkcs8_sec1_and_pkcs1_rsa_keys_all_load() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = OpensslPki::new(d, "k");
    // PKCS#8 EC (what OpensslPki writes).
    Identity::load(&pki.client, &pki.client_key).unwrap();
    // SEC1 EC.
    let sec1 = d.join("sec1.key");
    let out = std::process::Command::new("openssl")
        .args(["ec", "-in"])
        .arg(&pki.client_key)
        .arg("-out")
        .arg(&sec1)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(std::fs::read_to_string(&sec1)
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    Identity::load(&pki.client, &sec1).unwrap();
    // PKCS#1 RSA: a fresh RSA key and certificate.
    let rsa_key = d.join("rsa.key");
    let rsa_cert = d.join("rsa.pem");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl genrsa -traditional -out {k} 2048 && openssl req -x509 -new -key {k} -subj /CN=rsa -days 2 -out {c}",
            k = rsa_key.display(),
            c = rsa_cert.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(&rsa_key)
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let id = Identity::load(&rsa_cert, &rsa_key).unwrap();
    assert_eq!(id.facts.subject_cn.as_deref(), Some("rsa"));
}

#[test]
fn cert_facts_match_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(tmp.path(), "facts");
    let certs = pem::load_certs(&pki.server).unwrap();
    let facts = sallyport::tls::CertFacts::from_der(&certs[0]).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-serial", "-in"])
        .arg(&pki.server)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // A SHA-256 fingerprint is 32 bytes: 64 hex digits and 31 colons (an empty one is
    // contained in anything).
    assert_eq!(facts.sha256_fingerprint.len(), 95, "{}", facts.sha256_fingerprint);
    assert!(!facts.serial.is_empty());
    assert!(
        text.contains(&facts.sha256_fingerprint),
        "{text} vs {}",
        facts.sha256_fingerprint
    );
    assert!(
        text.to_lowercase().contains(&facts.serial.replace(':', "")),
        "{text} vs {}",
        facts.serial
    );
    assert_eq!(facts.subject_cn.as_deref(), Some("localhost"));
    assert_eq!(facts.sans.dns, ["localhost"]);
    assert_eq!(facts.sans.ip, ["127.0.0.1"]);
    assert_eq!(facts.issuer, "CN=facts Test CA");
}

#[test]
fn the_documented_sidecar_config_is_valid() {
    let tmp = repo_like();
    let text = std::fs::read_to_string("config/sidecar.toml").unwrap();
    let cfg = Config::from_toml(
        &text,
        Path::new("config/sidecar.toml"),
        &tmp.path().join("config"),
    )
    .unwrap();
    let sc = cfg.sidecar.unwrap();
    assert_eq!(sc.routes[0].prefix, "/acme");
    assert!(sc.listen.ip().is_loopback());
}

#[test]
fn store_urls_are_redacted_in_userinfo_and_query() {
    let redacted = |url: &str| {
        sallyport::config::StoreConfig {
            url: url.into(),
            ..Default::default()
        }
        .redacted_url()
    };
    let r =
        redacted("postgres://u@db.example:5432/x?sslmode=require&password=hunter2&application_name=a%20b");
    assert!(!r.contains("hunter2"), "{r}");
    assert!(
        r.contains("sslmode=require") && r.contains("password=REDACTED") && r.contains("db.example:5432/x"),
        "{r}"
    );
    let r = redacted("postgres://u:hunter2@db.example/x?PASSWORD=hunter2");
    assert!(!r.contains("hunter2"), "{r}");
    assert_eq!(redacted("postgres://u@db.example/x"), "postgres://u@db.example/x");
    assert_eq!(redacted("sqlite://var/sallyport.db"), "sqlite://var/sallyport.db");
}
