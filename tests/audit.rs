//! The audit log as an operator and an auditor meet it: one record per attempt, `audit verify`
//! names the exact record that was edited, deleted or reordered, and no configured secret
//! appears anywhere in the log or its export.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::receiver::{Action, ClientAuth, Receiver};
use serde_json::json;
use support::*;

const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const AUDIT_KEY: &str = "audit-key-do-not-log-7c1e9b";

/// Deliver 4 profiles to a receiver that fails the first two requests: 6 attempts audited.
async fn audited_log(pki: &RcgenPki) -> (PathBuf, PathBuf) {
    let f = &pki.files;
    let rx = Receiver::start_with(
        &f.server_cert,
        &f.server_key,
        &f.ca_cert,
        ClientAuth::Required,
        std::sync::Arc::new(|n| {
            if n < 2 {
                Action::Respond(StatusCode::INTERNAL_SERVER_ERROR, vec![])
            } else {
                Action::Respond(StatusCode::OK, vec![])
            }
        }),
    )
    .await
    .unwrap();
    let dir = pki.dir.path();
    std::fs::write(dir.join("signing.secret"), SIGNING).unwrap();
    std::fs::write(dir.join("audit.key"), AUDIT_KEY).unwrap();
    let cfg_path = dir.join("audit.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n[store]\nurl = \"sqlite://audit.db\"\n[audit]\nkey_file = \"audit.key\"\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\n\
             segments = [\"s1\"]\nsigning_secret_file = \"signing.secret\"\n",
            f.client_cert.display(),
            f.client_key.display(),
            rx.url("/in"),
            f.ca_cert.display()
        ),
    )
    .unwrap();
    let engine = Engine::open(&Config::load(&cfg_path).unwrap()).await.unwrap();
    let workers = engine.spawn_workers();
    let mut batch = String::new();
    for i in 0..4 {
        batch += &(json!({"profileId": format!("p{i}"), "segments": [{"id": "s1", "status": "realized"}]})
            .to_string()
            + "\n");
    }
    engine.ingest(batch.as_bytes()).await.unwrap();
    let store = engine.store();
    wait_until("6 audited attempts", Duration::from_secs(15), || {
        store.audit_records(0, 100).unwrap().len() == 6 && store.pending(None).unwrap() == 0
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    (cfg_path, dir.join("audit.db"))
}

fn sallyport(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(cfg: &Path) -> (i32, String) {
    let (code, out, err) = sallyport(&["audit", "verify", "--config", cfg.to_str().unwrap()]);
    (code, out + &err)
}

fn sql(db: &Path, stmt: &str) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(stmt)
        .unwrap();
}

fn copy_db(db: &Path, cfg: &Path, name: &str) -> PathBuf {
    // Each tampering runs on its own copy of the database and config.
    let dir = db.parent().unwrap();
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(&format!(
            "VACUUM INTO '{}'",
            dir.join(format!("{name}.db")).display()
        ))
        .unwrap();
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("sqlite://audit.db", &format!("sqlite://{name}.db"));
    let c = dir.join(format!("{name}.toml"));
    std::fs::write(&c, text).unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_recorded_and_the_untouched_log_verifies() {
    let pki = RcgenPki::new();
    let (cfg, _) = audited_log(&pki).await;
    let (code, out) = verify(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("6 record(s) verified in 1 chain(s) (hash chain and HMAC)"),
        "{out}"
    );
    let (code, export, err) = sallyport(&["audit", "export", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "audit export failed: {err}");
    let records: Vec<serde_json::Value> = export.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 6);
    let outcomes: Vec<&str> = records
        .iter()
        .map(|r| r["record"]["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "retry").count(), 2);
    assert_eq!(outcomes.iter().filter(|o| **o == "delivered").count(), 4);
    let r = &records[5]["record"];
    assert_eq!(r["resolvedIp"], "127.0.0.1");
    assert_eq!(r["httpStatus"], 200);
    assert_eq!(r["payloadSha256"].as_str().unwrap().len(), 64);
    assert!(r["peerCertSha256"].as_str().unwrap().contains(':'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_found_at_the_exact_record() {
    let pki = RcgenPki::new();
    let (cfg, db) = audited_log(&pki).await;

    let c = copy_db(&db, &cfg, "edited");
    sql(
        &c.with_extension("db"),
        "UPDATE audit SET record = replace(record, '\"attempt\":1', '\"attempt\":7') WHERE seq = 3",
    );
    let (code, out) = verify(&c);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("broken at record 3") && out.contains("edited"),
        "{out}"
    );

    let c = copy_db(&db, &cfg, "deleted");
    sql(&c.with_extension("db"), "DELETE FROM audit WHERE seq = 4");
    let (code, out) = verify(&c);
    assert_eq!(code, 1);
    assert!(
        out.contains("broken at record 4") && out.contains("missing"),
        "{out}"
    );

    let c = copy_db(&db, &cfg, "reordered");
    sql(
        &c.with_extension("db"),
        "UPDATE audit SET seq = -2 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 5; UPDATE audit SET seq = 5 WHERE seq = -2;",
    );
    let (code, out) = verify(&c);
    assert_eq!(code, 1);
    assert!(out.contains("broken at record 2"), "{out}");

    // Rewritten consistently (hashes recomputed) by someone without the audit key.
    let c = copy_db(&db, &cfg, "rewritten");
    let conn = rusqlite::Connection::open(c.with_extension("db")).unwrap();
    let rows: Vec<(i64, String, Option<String>)> = conn
        .prepare("SELECT seq, record, mac FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let unkeyed = sallyport::audit::Chain::new(None);
    let mut prev = sallyport::audit::GENESIS.to_owned();
    for (seq, record, mac) in rows {
        let record = if seq == 2 {
            record.replace("\"attempt\":1", "\"attempt\":9")
        } else {
            record
        };
        let hash = sallyport::audit::Chain::hash(seq, &prev, &record);
        conn.execute(
            "UPDATE audit SET record = ?2, prev = ?3, hash = ?4, mac = ?5 WHERE seq = ?1",
            rusqlite::params![
                seq,
                record,
                prev,
                hash,
                if seq == 2 { unkeyed.mac(&hash) } else { mac }
            ],
        )
        .unwrap();
        prev = hash;
    }
    drop(conn);
    let (code, out) = verify(&c);
    assert_eq!(code, 1);
    assert!(
        out.contains("broken at record 2") && out.contains("HMAC"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_appears_in_the_log_or_its_export() {
    let pki = RcgenPki::new();
    let (cfg, db) = audited_log(&pki).await;
    let (code, export, err) = sallyport(&["audit", "export", "--config", cfg.to_str().unwrap()]);
    // The export searched below is the whole log, not an error's empty output.
    assert_eq!(code, 0, "audit export failed: {err}");
    let records = export
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("record").is_some())
        .count();
    assert_eq!(records, 6, "{export}");
    let mut everything = std::fs::read(&db).unwrap();
    if let Ok(wal) = std::fs::read(db.with_extension("db-wal")) {
        everything.extend(wal);
    }
    everything.extend(export.as_bytes());
    let haystack = String::from_utf8_lossy(&everything);
    for secret in [SIGNING, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", AUDIT_KEY] {
        assert!(
            !haystack.contains(secret),
            "secret found in the audit store or export"
        );
    }
    // The gateway's private key, searched for by what only this key has: the first PEM line
    // (and any prefix of it) is the PKCS#8 P-256 header every such key shares, so it would
    // find any key, or none of this one's. Every later line holds bytes of this key alone;
    // the private scalar is searched for raw, in hex and in base64.
    use base64::Engine as _;
    let key = std::fs::read_to_string(&pki.files.client_key).unwrap();
    let lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(lines.len() >= 2, "a PEM body of {} line(s)", lines.len());
    for line in &lines[1..] {
        assert!(!haystack.contains(line), "a line of the private key's PEM found");
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(lines.concat())
        .unwrap();
    // ECPrivateKey (RFC 5915) inside the PKCS#8: version 1, then the 32-byte private key.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("a P-256 PKCS#8 key")
        + 5;
    let scalar = &der[at..at + 32];
    let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
    let forms = [
        hex.clone(),
        hex.to_uppercase(),
        base64::engine::general_purpose::STANDARD.encode(scalar),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(scalar),
    ];
    for (i, form) in forms.iter().enumerate() {
        assert!(
            !haystack.contains(form.as_str()),
            "the private key's scalar found (form {i}: hex, HEX, base64, base64url)"
        );
    }
    assert!(
        !everything.windows(32).any(|w| w == scalar),
        "the private key's scalar found in raw bytes"
    );
}
