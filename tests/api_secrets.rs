//! Dataflows defined through the admin API, or written straight into a shared database, may
//! name credentials only from `[secrets]` and a CA file only inside `[admin] dataflow_ca_dir`:
//! whoever holds the admin token (or can write to the database) must not be able to send a
//! secret or a file of the process to a receiver of their choosing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use sallyport::receiver::ClientAuth;
use serde_json::json;
use support::*;

const TOKEN: &str = "admin-token-for-api-secrets";
/// Stands for every secret the process holds that no dataflow should ever carry.
const AUDIT_KEY: &str = "audit-hmac-key-that-must-stay-home";
const ACME_TOKEN: &str = "acme-bearer-token-declared-in-secrets";

fn config(pki: &RcgenPki, admin: u16) -> std::path::PathBuf {
    let cfg = pki.dir.path().join("api.toml");
    std::fs::create_dir_all(pki.dir.path().join("cas")).unwrap();
    std::fs::copy(&pki.files.ca_cert, pki.dir.path().join("cas/receiver-ca.pem")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n\
             [public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken_env = \"API_TEST_ADMIN_TOKEN\"\n\
             dataflow_ca_dir = \"cas\"\n[audit]\nkey_env = \"API_TEST_AUDIT_KEY\"\n[secrets.acme]\nenv = \"API_TEST_ACME_TOKEN\"\n\
             [store]\nurl = \"sqlite://api.db\"\n[[segments]]\nid = \"s1\"\nname = \"S\"\n"
        ),
    )
    .unwrap();
    cfg
}

async fn serve(cfg: &std::path::Path, admin: u16) -> tokio::process::Child {
    let envs = [
        ("API_TEST_ADMIN_TOKEN", TOKEN),
        ("API_TEST_AUDIT_KEY", AUDIT_KEY),
        ("API_TEST_ACME_TOKEN", ACME_TOKEN),
    ];
    spawn_sallyport(&["serve", "--config", cfg.to_str().unwrap()], &envs, admin).await
}

/// Ingest three profiles in segment s1 through the admin API.
async fn ingest(admin: u16) {
    let (status, body) = http(
        "POST",
        &format!("http://127.0.0.1:{admin}/v1/profiles"),
        Some(TOKEN),
        &s1_profiles(0, 3),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

fn dataflow(name: &str, endpoint: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut df = json!({"name": name, "endpoint": endpoint, "segments": ["s1"]});
    for (k, v) in extra.as_object().unwrap() {
        df[k] = v.clone();
    }
    df.to_string().into_bytes()
}

fn authorizations(rx: &sallyport::receiver::Receiver) -> Vec<String> {
    rx.received()
        .iter()
        .flat_map(|r| {
            r.headers
                .iter()
                .filter(|(k, _)| k == "authorization")
                .map(|(_, v)| v.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_dataflow_names_secrets_and_ca_files_only_from_what_the_config_declares() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let admin = free_port();
    let cfg = config(&pki, admin);
    let _gw = serve(&cfg, admin).await;
    let put = |name: &'static str, body: Vec<u8>| async move {
        http(
            "PUT",
            &format!("http://127.0.0.1:{admin}/v1/dataflows/{name}"),
            Some(TOKEN),
            &body,
        )
        .await
    };
    let ca = json!("receiver-ca.pem");
    for (extra, says) in [
        // Any variable or file of the process, sent as a bearer token: refused.
        (
            json!({"ca": ca, "auth": {"kind": "bearer", "token_env": "API_TEST_AUDIT_KEY"}}),
            "use token_ref",
        ),
        (
            json!({"ca": ca, "auth": {"kind": "bearer", "token_file": "/etc/hostname"}}),
            "use token_ref",
        ),
        (
            json!({"ca": ca, "signing_secret_env": "API_TEST_ADMIN_TOKEN"}),
            "use signing_secret_ref",
        ),
        (
            json!({"ca": ca, "auth": {"kind": "bearer", "token_ref": "nope"}}),
            "not declared in [secrets]",
        ),
        // A CA file outside the configured directory: refused.
        (json!({"ca": pki.files.ca_cert}), "inside [admin] dataflow_ca_dir"),
        (json!({"ca": "../gateway.key"}), "inside [admin] dataflow_ca_dir"),
    ] {
        let (status, body) = put("evil", dataflow("evil", &rx.url("/in"), extra.clone())).await;
        assert_eq!(status, 422, "{extra}: {body}");
        assert!(body.contains(says), "{extra}: {body}");
    }
    // What the config declares is fine: a named secret, a CA file in the directory.
    let (status, body) = put(
        "acme",
        dataflow(
            "acme",
            &rx.url("/in"),
            json!({"ca": ca, "auth": {"kind": "bearer", "token_ref": "acme"}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    ingest(admin).await;
    wait_until("the acme deliveries", Duration::from_secs(10), || {
        rx.received().len() == 3
    })
    .await;
    let seen = authorizations(&rx);
    assert!(
        seen.iter().all(|a| a == &format!("Bearer {ACME_TOKEN}")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataflow_written_into_the_database_is_held_to_the_same_rules_and_never_stops_start_up() {
    let pki = RcgenPki::new();
    let evil_rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let good_rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let admin = free_port();
    let cfg = config(&pki, admin);
    // Rows as someone with write access to the database would add them, before start-up.
    {
        let mut config = sallyport::config::Config::parse_unvalidated(&cfg).unwrap();
        // Writing rows needs no audit chain (the variable is set for the gateway only).
        config.audit.key_env = None;
        let store = sallyport::store::open(&config).unwrap();
        let evil = dataflow(
            "evil",
            &evil_rx.url("/in"),
            json!({"ca": "receiver-ca.pem", "auth": {"kind": "bearer", "token_env": "API_TEST_AUDIT_KEY"}}),
        );
        let good = dataflow(
            "good",
            &good_rx.url("/in"),
            json!({"ca_pem": std::fs::read_to_string(&pki.files.ca_cert).unwrap(),
                   "auth": {"kind": "bearer", "token_ref": "acme"}}),
        );
        for (name, body) in [("evil", evil), ("good", good)] {
            let df: sallyport::config::Dataflow = serde_json::from_slice(&body).unwrap();
            store
                .save_api_dataflow(name, &serde_json::to_string(&df).unwrap())
                .unwrap();
        }
    }
    let _gw = serve(&cfg, admin).await;
    ingest(admin).await;
    wait_until("the good dataflow's deliveries", Duration::from_secs(10), || {
        good_rx.received().len() == 3
    })
    .await;
    assert!(authorizations(&good_rx)
        .iter()
        .all(|a| a == &format!("Bearer {ACME_TOKEN}")));
    // The evil one was refused: its receiver saw nothing, and the audit key went nowhere.
    assert!(evil_rx.received().is_empty(), "{:?}", authorizations(&evil_rx));
}
