//! PKCS#12 identities made by `openssl pkcs12 -export` (OpenSSL 3's defaults: PBES2 with
//! AES-256-CBC, PBKDF2-SHA256): imported as PEM by `pki import`, or read directly with
//! `p12 = …`, they deliver to nginx requiring a client certificate.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const PASSWORD: &str = "correct horse battery staple";

/// `openssl pkcs12 -export` of the client certificate, its key and the CA, with `PASSWORD`.
fn export_p12(p: &OpensslPki, out: &Path) {
    let status = Command::new("openssl")
        .args(["pkcs12", "-export", "-in"])
        .arg(&p.client)
        .arg("-inkey")
        .arg(&p.client_key)
        .arg("-certfile")
        .arg(&p.ca)
        .args(["-name", "gateway", "-passout", "env:P12_TEST_PASSWORD", "-out"])
        .arg(out)
        .env("P12_TEST_PASSWORD", PASSWORD)
        .status()
        .unwrap();
    assert!(status.success());
    // OpenSSL 3's default, not the legacy RC2/3DES form.
    let info = Command::new("openssl")
        .args([
            "pkcs12",
            "-info",
            "-noout",
            "-passin",
            "env:P12_TEST_PASSWORD",
            "-in",
        ])
        .arg(out)
        .env("P12_TEST_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stderr);
    assert!(text.contains("AES-256-CBC") && text.contains("PBKDF2"), "{text}");
}

fn sallyport(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_identity_imported_from_pkcs12_delivers_to_nginx() {
    let tmp = tempfile::tempdir().unwrap();
    let p = OpensslPki::new(tmp.path(), "pk");
    let p12 = tmp.path().join("gateway.p12");
    export_p12(&p, &p12);
    let rx = nginx_mtls(tmp.path(), &p.server, &p.server_key, &p.ca);
    let (cert, key) = (tmp.path().join("gw.pem"), tmp.path().join("gw.key"));
    let import = [
        "pki",
        "import",
        "--p12",
        p12.to_str().unwrap(),
        "--password-env",
        "GW_P12",
        "--out-cert",
        cert.to_str().unwrap(),
        "--out-key",
        key.to_str().unwrap(),
    ];

    // A wrong password: a clear error, and the password is not in it.
    let (code, out, err) = sallyport(&import, &[("GW_P12", "not the password")]);
    assert_eq!(code, 1, "{out} {err}");
    assert!(err.contains("wrong password"), "{err}");
    assert!(!err.contains("not the password") && !out.contains("not the password"));
    assert!(!key.exists() && !cert.exists());

    let (code, out, err) = sallyport(&import, &[("GW_P12", PASSWORD)]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.contains("pk-client") && out.contains("2 certificate(s)"),
        "{out}"
    );
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key file mode {mode:o}");
    }

    let url = rx.url("/in");
    let (code, out, err) = sallyport(
        &[
            "send",
            &url,
            "--client-cert",
            cert.to_str().unwrap(),
            "--client-key",
            key.to_str().unwrap(),
            "--ca",
            p.ca.to_str().unwrap(),
            "--allow",
            "127.0.0.1",
            "--data",
            "{}",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], 200, "{v:#}");
}

#[test]
fn an_identity_may_read_a_pkcs12_file_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let p = OpensslPki::new(tmp.path(), "direct");
    let p12 = tmp.path().join("gateway.p12");
    export_p12(&p, &p12);
    let rx = nginx_mtls(tmp.path(), &p.server, &p.server_key, &p.ca);
    let url = rx.url("/in");
    let cfg = tmp.path().join("p12.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[store]\nurl = \"sqlite://p.db\"\n\
             [identity]\np12 = \"gateway.p12\"\np12_password_env = \"GW_P12\"\n\
             [[dataflows]]\nname = \"rx\"\nendpoint = \"{url}\"\nca = \"{}\"\n",
            p.ca.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = sallyport(&["config", "check", "--config", cfg], &[("GW_P12", PASSWORD)]);
    assert_eq!(code, 0, "{out} {err}");
    let send = [
        "send",
        &url,
        "--config",
        cfg,
        "--dataflow",
        "rx",
        "--data",
        "{}",
        "--json",
    ];
    let (code, out, err) = sallyport(&send, &[("GW_P12", PASSWORD)]);
    assert_eq!(code, 0, "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], 200, "{v:#}");

    let (code, out, err) = sallyport(&send, &[("GW_P12", "hunter2-nope")]);
    assert_ne!(code, 0, "{out} {err}");
    // `--json` reports the error on standard output.
    assert!(out.contains("wrong password"), "{out} {err}");
    assert!(!out.contains("hunter2-nope") && !err.contains("hunter2-nope"));
}
