//! `sallyport serve` as a process: admin API (deny by default, bearer token), NDJSON ingest
//! over HTTP, real mTLS deliveries, metrics — and no accepted update lost to `kill -9`.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use sallyport::receiver::{Action, ClientAuth, Receiver};
use serde_json::json;
use support::*;
use tokio::process::{Child, Command};

const TOKEN: &str = "test-admin-token-5f1c";

struct Gateway {
    child: Child,
    admin: String,
    public: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn write_config(
    pki: &RcgenPki,
    endpoint: &str,
    extra_df: &str,
    token: bool,
) -> (std::path::PathBuf, u16, u16) {
    let (public, admin) = (free_port(), free_port());
    let f = &pki.files;
    let cfg = pki.dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n[public]\nlisten = \"127.0.0.1:{public}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n{}\n[store]\nurl = \"sqlite://serve.db\"\n\
             [[segments]]\nid = \"s1\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{endpoint}\"\n\
             ca = \"{}\"\nsegments = [\"s1\"]\nattributes = [{{ source = \"n\", target = \"n\" }}]\n{extra_df}\n",
            f.client_cert.display(),
            f.client_key.display(),
            if token { "token_env = \"SALLYPORT_TEST_ADMIN_TOKEN\"" } else { "" },
            f.ca_cert.display()
        ),
    )
    .unwrap();
    (cfg, public, admin)
}

async fn start(cfg: &std::path::Path, public: u16, admin: u16) -> Gateway {
    let child = Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("SALLYPORT_TEST_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let gw = Gateway {
        child,
        admin: format!("http://127.0.0.1:{admin}"),
        public: format!("http://127.0.0.1:{public}"),
    };
    tokio::task::spawn_blocking(move || wait_for_port(admin))
        .await
        .unwrap();
    gw
}

fn ndjson(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        out += &json!({"profileId": format!("p{i}"), "attributes": {"n": i},
                       "segments": [{"id": "s1", "status": "realized"}]})
        .to_string();
        out.push('\n');
    }
    out.into_bytes()
}

/// Wait until every `sallyport_outbox_pending` gauge in `/metrics` reads 0.
async fn drained_all(metrics: &str) {
    for _ in 0..200 {
        let (_, m) = http("GET", metrics, Some(TOKEN), b"").await;
        let gauges: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("sallyport_outbox_pending{"))
            .collect();
        if !gauges.is_empty() && gauges.iter().all(|l| l.ends_with(" 0")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the outbox never drained");
}

fn profiles_seen(rx: &Receiver) -> std::collections::BTreeSet<i64> {
    rx.received()
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
        .filter_map(|v| v["n"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_over_the_admin_api_delivers_and_counts() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (cfg, public, admin) = write_config(&pki, &rx.url("/in"), "", true);
    let gw = start(&cfg, public, admin).await;

    let (s, _) = http("POST", &format!("{}/v1/profiles", gw.admin), None, &ndjson(1)).await;
    assert_eq!(s, 401, "no token");
    let (s, _) = http(
        "POST",
        &format!("{}/v1/profiles", gw.admin),
        Some("wrong"),
        &ndjson(1),
    )
    .await;
    assert_eq!(s, 401, "wrong token");

    let mut body = ndjson(25);
    body.extend_from_slice(b"{not json\n");
    let (s, b) = http("POST", &format!("{}/v1/profiles", gw.admin), Some(TOKEN), &body).await;
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(25), Some(1))
    );
    assert_eq!(v["errors"][0]["line"], 26);
    wait_until("25 deliveries", Duration::from_secs(20), || {
        profiles_seen(&rx).len() == 25
    })
    .await;

    let (s, b) = http("GET", &format!("{}/healthz", gw.public), None, b"").await;
    assert_eq!((s, b.contains("ok")), (200, true));
    let (s, b) = http("GET", &format!("{}/v1/dataflows/rx", gw.admin), Some(TOKEN), b"").await;
    assert_eq!(s, 200);
    assert!(b.contains("\"mtls\":true"), "{b}");
    // Metrics are admin-only and count what was delivered.
    let (s, _) = http("GET", &format!("{}/metrics", gw.admin), None, b"").await;
    assert_eq!(s, 401);
    let mut delivered = false;
    for _ in 0..100 {
        let (_, m) = http("GET", &format!("{}/metrics", gw.admin), Some(TOKEN), b"").await;
        if m.contains("sallyport_deliveries_total{dataflow=\"rx\",outcome=\"delivered\"} 25") {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered);
}

/// `raw` (a whole HTTP/1.1 request, or its head) written to `addr` in pieces of `piece` bytes,
/// each sent on its own; the status line's code and the body of the answer.
async fn raw_request(addr: &str, raw: &[u8], piece: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    for chunk in raw.chunks(piece) {
        tcp.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_body_is_parsed_as_its_pieces_arrive_and_one_too_large_is_refused() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (cfg, public, admin) = write_config(&pki, &rx.url("/in"), "", true);
    let gw = start(&cfg, public, admin).await;

    // Chunked, in 7-byte chunks written apart: lines arrive split at every point, and the
    // last one has no newline.
    let mut body = ndjson(20);
    body.extend_from_slice(b"{broken\n");
    body.extend_from_slice(&ndjson(21)[ndjson(20).len()..]);
    body.pop();
    let mut raw = format!(
        "POST /v1/profiles HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {TOKEN}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(7) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let (s, b) = raw_request(&gw.admin, &raw, 64).await;
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(21), Some(1)),
        "{v}"
    );
    assert_eq!(v["errors"][0]["line"], 21);
    wait_until("21 deliveries", Duration::from_secs(20), || {
        profiles_seen(&rx).len() == 21
    })
    .await;

    // A declared length over the limit is refused before any of the body is read.
    let raw = format!(
        "POST /v1/profiles HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        64 * 1024 * 1024 + 1
    );
    let (s, b) = raw_request(&gw.admin, raw.as_bytes(), usize::MAX).await;
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("larger than 67108864 bytes"), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_one_group_is_stored_whole_with_true_line_numbers() {
    let pki = RcgenPki::new();
    let (cfg, public, admin) = write_config(&pki, "https://localhost:9/in", "", true);
    let gw = start(&cfg, public, admin).await;
    let (s, _) = http(
        "POST",
        &format!("{}/v1/dataflows/rx/pause", gw.admin),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 200);
    // 12,000 updates: stored in groups of 5,000 as the body is parsed; a bad line in the
    // second group keeps its number.
    let mut body = ndjson(7_000);
    body.extend_from_slice(b"{broken\n");
    let rest = ndjson(12_000);
    let cut = rest
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(6_999)
        .unwrap()
        .0
        + 1;
    body.extend_from_slice(&rest[cut..]);
    let (s, b) = http("POST", &format!("{}/v1/profiles", gw.admin), Some(TOKEN), &body).await;
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(12_000), Some(1)),
        "{v}"
    );
    assert_eq!(v["errors"][0]["line"], 7_001);
    let (_, b) = http("GET", &format!("{}/v1/status", gw.admin), Some(TOKEN), b"").await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["dataflows"][0]["pending"], 12_000, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_bad_lines_gets_a_small_answer_with_the_true_counts() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (cfg, public, admin) = write_config(&pki, &rx.url("/in"), "", true);
    let gw = start(&cfg, public, admin).await;
    // 4 MiB of `x\n`: two million bad lines (each used to become an error in the answer).
    let lines = 2 * 1024 * 1024;
    let body = b"x\n".repeat(lines);
    let (s, b) = http("POST", &format!("{}/v1/profiles", gw.admin), Some(TOKEN), &body).await;
    assert_eq!(s, 400, "nothing accepted");
    assert!(b.len() < 16 * 1024, "the answer is {} bytes", b.len());
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["accepted"], 0);
    assert_eq!(v["rejected"].as_u64(), Some(lines as u64));
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(100));
    assert_eq!(v["errors"][99]["line"], 100);
    assert_eq!(v["errorsOmitted"].as_u64(), Some(lines as u64 - 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_over_the_admin_api_list_show_replay_and_purge() {
    let pki = RcgenPki::new();
    let (rx, healthy) = pki
        .receiver_failing_until_healthy(Action::Respond(StatusCode::SERVICE_UNAVAILABLE, vec![]))
        .await;
    let (cfg, public, admin) = write_config(&pki, &rx.url("/in"), "max_attempts = 1", true);
    let gw = start(&cfg, public, admin).await;
    let (s, _) = http(
        "POST",
        &format!("{}/v1/profiles", gw.admin),
        Some(TOKEN),
        &ndjson(2),
    )
    .await;
    assert_eq!(s, 200);
    let mut list = serde_json::Value::Null;
    for _ in 0..200 {
        let (_, b) = http("GET", &format!("{}/v1/dead-letters", gw.admin), Some(TOKEN), b"").await;
        list = serde_json::from_str(&b).unwrap();
        if list["deadLetters"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<i64> = list["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    let (s, b) = http(
        "GET",
        &format!("{}/v1/dead-letters/{}", gw.admin, ids[0]),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        b.contains("\"kind\":\"http_status\"") && !b.contains("\"payload\""),
        "{b}"
    );
    healthy.store(true, Ordering::SeqCst);
    let (s, b) = http(
        "POST",
        &format!("{}/v1/dead-letters/{}/replay", gw.admin, ids[0]),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = http(
        "DELETE",
        &format!("{}/v1/dead-letters/{}", gw.admin, ids[1]),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 200);
    let (_, b) = http("GET", &format!("{}/v1/dead-letters", gw.admin), Some(TOKEN), b"").await;
    assert!(b.contains("\"deadLetters\":[]"), "{b}");
    // The replay above was answered 200; the purged letter is gone without being sent again.
    assert_eq!(rx.received().len(), 3, "two failed first attempts and one replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_refuses_everything() {
    let pki = RcgenPki::new();
    let (cfg, public, admin) = write_config(&pki, "https://localhost:9/", "", false);
    let gw = start(&cfg, public, admin).await;
    let (s, b) = http(
        "POST",
        &format!("{}/v1/profiles", gw.admin),
        Some(TOKEN),
        &ndjson(1),
    )
    .await;
    assert_eq!(s, 403);
    assert!(b.contains("no admin token is configured"), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_accepted_is_lost_to_kill_9() {
    let pki = RcgenPki::new();
    // Until told otherwise the receiver sits on every request for 60 s, far past the 2 s
    // delivery timeout and past the kill below: no delivery can be acknowledged (answered 2xx)
    // before the kill, so every accepted profile is at risk and must reach the receiver again
    // from the restarted instance. (The receiver records a request when it arrives, before its
    // delay: arrival is "seen", never "acknowledged".)
    let (rx, healthy) = pki
        .receiver_failing_until_healthy(Action::Delay(Duration::from_secs(60), StatusCode::OK))
        .await;
    let (cfg, public, admin) =
        write_config(&pki, &rx.url("/in"), "timeout = \"2s\"\nmax_attempts = 10", true);
    let mut gw = start(&cfg, public, admin).await;
    let (s, b) = http(
        "POST",
        &format!("{}/v1/profiles", gw.admin),
        Some(TOKEN),
        &ndjson(200),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Accepted; deliveries are in flight (the receiver holds them). Kill without warning.
    wait_until("deliveries in flight", Duration::from_secs(10), || {
        !rx.received().is_empty()
    })
    .await;
    gw.child.kill().await.unwrap();
    // Requests the dead process had already written may still be read from the sockets:
    // wait until nothing more arrives, so that everything recorded from here on was sent by
    // the restarted instance.
    let mut seen_before_kill = rx.received().len();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rx.received().len();
        if now == seen_before_kill {
            break;
        }
        seen_before_kill = now;
    }
    // At most one in-flight window (64) reached the receiver before the kill: the rest existed
    // only in the store.
    let before = profiles_seen(&rx);
    assert!(
        !before.is_empty() && before.len() <= 64,
        "{} seen before the kill",
        before.len()
    );

    healthy.store(true, Ordering::SeqCst);
    let _gw = start(&cfg, public, admin).await;
    let after = || -> std::collections::BTreeSet<i64> {
        rx.received()[seen_before_kill..]
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .filter_map(|v| v["n"].as_i64())
            .collect()
    };
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while after().len() < 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Seen before the kill is not delivered: those requests were cut off unanswered.
    let missing: Vec<i64> = (0..200).filter(|n| !after().contains(n)).collect();
    let in_flight_lost: Vec<&i64> = missing.iter().filter(|n| before.contains(n)).collect();
    assert!(
        waited.is_ok() && missing.is_empty(),
        "{} accepted profiles never received after the restart ({} of them were in flight at the kill): {missing:?}",
        missing.len(),
        in_flight_lost.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataflows_managed_over_the_admin_api_backfill_persist_and_delete() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let rx2 = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (cfg, public, admin) = write_config(&pki, &rx.url("/in"), "", true);
    let gw = start(&cfg, public, admin).await;
    let url = |p: &str| format!("{}{p}", gw.admin);
    let (s, _) = http("POST", &url("/v1/profiles"), Some(TOKEN), &ndjson(5)).await;
    assert_eq!(s, 200);
    wait_until("5 deliveries to rx", Duration::from_secs(10), || {
        profiles_seen(&rx).len() == 5
    })
    .await;

    let body = |name: &str, endpoint: &str| {
        // The CA inline: an API-defined dataflow names no file outside [admin] dataflow_ca_dir.
        json!({"name": name, "endpoint": endpoint, "ca_pem": std::fs::read_to_string(&pki.files.ca_cert).unwrap(), "segments": ["s1"],
               "attributes": [{"source": "n", "target": "n"}]})
        .to_string()
    };
    // Invalid: the key is named, nothing is created.
    let (s, b) = http(
        "PUT",
        &url("/v1/dataflows/bad"),
        Some(TOKEN),
        body("bad", "http://x.example/").as_bytes(),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("dataflow.endpoint: scheme must be https"), "{b}");
    // A configured dataflow is changed in the config file, not here.
    let (s, _) = http(
        "PUT",
        &url("/v1/dataflows/rx"),
        Some(TOKEN),
        body("rx", &rx2.url("/in")).as_bytes(),
    )
    .await;
    assert_eq!(s, 409);

    // Newly mapped: every profile already in s1 is exported to the new receiver once.
    let (s, b) = http(
        "PUT",
        &url("/v1/dataflows/second"),
        Some(TOKEN),
        body("second", &rx2.url("/in")).as_bytes(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_until("backfill to rx2", Duration::from_secs(10), || {
        profiles_seen(&rx2).len() == 5
    })
    .await;
    let (_, b) = http("GET", &url("/v1/dataflows"), Some(TOKEN), b"").await;
    assert!(
        b.contains("\"name\":\"second\"") && b.contains("\"source\":\"api\""),
        "{b}"
    );

    // Persisted across a restart, without a second backfill. (Wait until every delivery is
    // acknowledged first: after a kill, unacknowledged ones are rightly sent again.)
    let mut drained = false;
    for _ in 0..200 {
        let (_, m) = http("GET", &url("/metrics"), Some(TOKEN), b"").await;
        if m.contains("sallyport_outbox_pending{dataflow=\"second\"} 0")
            && m.contains("sallyport_outbox_pending{dataflow=\"rx\"} 0")
        {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(drained);
    drop(gw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gw = start(&cfg, public, admin).await;
    let url = |p: &str| format!("{}{p}", gw.admin);
    let (_, b) = http("GET", &url("/v1/dataflows/second"), Some(TOKEN), b"").await;
    assert!(b.contains("\"source\":\"api\""), "{b}");
    // Evidence that the restarted engine is past any backfill: one new profile reaches rx2 and
    // nothing is left pending. A backfill queued at start would be older in the outbox
    // (claimed in order) and delivered first; one queued later would still be pending.
    let one =
        json!({"profileId": "p50", "attributes": {"n": 50}, "segments": [{"id": "s1", "status": "realized"}]})
            .to_string() + "\n";
    let (s, _) = http("POST", &url("/v1/profiles"), Some(TOKEN), one.as_bytes()).await;
    assert_eq!(s, 200);
    wait_until("p50 to rx2", Duration::from_secs(10), || {
        profiles_seen(&rx2).contains(&50)
    })
    .await;
    drained_all(&url("/metrics")).await;
    assert_eq!(rx2.received().len(), 5 + 1, "no second backfill after a restart");

    // New updates go to both; after DELETE, only to the configured one.
    let (s, _) = http("POST", &url("/v1/profiles"), Some(TOKEN), &ndjson(6)).await;
    assert_eq!(s, 200);
    // All six (five re-exports: `n` is mapped, and each line writes it) to the API-managed
    // one before it is deleted, so none is still in flight after.
    wait_until("profile 5 to both", Duration::from_secs(10), || {
        rx2.received().len() >= 5 + 1 + 6 && profiles_seen(&rx).contains(&5)
    })
    .await;
    let (s, _) = http("DELETE", &url("/v1/dataflows/second"), Some(TOKEN), b"").await;
    assert_eq!(s, 200);
    let before = rx2.received().len();
    let more: Vec<u8> = (100..103)
        .map(|i| json!({"profileId": format!("p{i}"), "attributes": {"n": i}, "segments": [{"id": "s1", "status": "realized"}]}).to_string() + "\n")
        .collect::<String>()
        .into_bytes();
    http("POST", &url("/v1/profiles"), Some(TOKEN), &more).await;
    wait_until(
        "the configured dataflow still delivers",
        Duration::from_secs(10),
        || profiles_seen(&rx).contains(&102),
    )
    .await;
    // Every dataflow the engine runs has nothing pending: had the deleted one still been
    // mapped, its rows for p100..p102 (queued with rx's) would have been delivered by now.
    drained_all(&url("/metrics")).await;
    assert_eq!(
        rx2.received().len(),
        before,
        "a deleted dataflow receives nothing new"
    );
    let (s, _) = http("DELETE", &url("/v1/dataflows/rx"), Some(TOKEN), b"").await;
    assert_eq!(s, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_over_the_admin_api_filter_by_class_and_replay_in_bulk() {
    let pki = RcgenPki::new();
    let (rx, healthy) = pki
        .receiver_failing_until_healthy(Action::Respond(StatusCode::SERVICE_UNAVAILABLE, vec![]))
        .await;
    let refusing = pki.receiver(ClientAuth::Required, StatusCode::NOT_FOUND).await;
    // Every profile goes to `rx` (503 until healthy: unavailable) and to `b` (404: refused).
    let b = format!(
        "max_attempts = 1\n[[dataflows]]\nname = \"b\"\nendpoint = \"{}\"\nca = \"{}\"\nsegments = [\"s1\"]\nmax_attempts = 1\n",
        refusing.url("/in"),
        pki.files.ca_cert.display()
    );
    let (cfg, public, admin) = write_config(&pki, &rx.url("/in"), &b, true);
    let gw = start(&cfg, public, admin).await;
    let (s, _) = http(
        "POST",
        &format!("{}/v1/profiles", gw.admin),
        Some(TOKEN),
        &ndjson(2),
    )
    .await;
    assert_eq!(s, 200);
    let get = |query: &str| {
        let url = format!("{}/v1/dead-letters{query}", gw.admin);
        async move {
            let (s, b) = http("GET", &url, Some(TOKEN), b"").await;
            (s, serde_json::from_str::<serde_json::Value>(&b).unwrap())
        }
    };
    let letters = |v: &serde_json::Value| -> Vec<(String, String)> {
        v["deadLetters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let s = |k: &str| d[k].as_str().unwrap().to_owned();
                (s("dataflow"), s("class"))
            })
            .collect()
    };
    for _ in 0..200 {
        if letters(&get("").await.1).len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unavailable = || ("rx".to_owned(), "unavailable".to_owned());
    let refused = || ("b".to_owned(), "refused".to_owned());
    let (s, v) = get("?class=unavailable").await;
    assert_eq!((s, letters(&v)), (200, vec![unavailable(), unavailable()]));
    let (s, v) = get("?class=refused&dataflow=b&since=10m").await;
    assert_eq!((s, letters(&v)), (200, vec![refused(), refused()]));
    let (s, v) = get("?since=2000-01-01T00:00:00Z&limit=1").await;
    assert_eq!((s, letters(&v).len()), (200, 1));

    // Bad filters are refused with a JSON error that says what is wrong.
    let (s, v) = get("?class=flaky").await;
    assert_eq!(s, 400);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused, unavailable, certificate, policy, internal"),
        "{v}"
    );
    let (s, v) = get("?since=soon").await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("since"), "{v}");
    let (s, _) = get("?colour=red").await;
    assert_eq!(s, 400);
    let replay = format!("{}/v1/dead-letters/replay", gw.admin);
    let (s, b) = http("POST", &replay, Some(TOKEN), b"").await;
    assert_eq!(s, 400, "a bulk replay needs filters or all=true: {b}");
    let (s, _) = http("POST", &format!("{replay}?class=flaky"), Some(TOKEN), b"").await;
    assert_eq!(s, 400);
    let (s, _) = http("POST", &replay, None, br#"{"class":"unavailable"}"#).await;
    assert_eq!(s, 401);
    assert_eq!(letters(&get("").await.1).len(), 4, "nothing replayed yet");

    // The unavailable ones are replayed (filters in a JSON body) and delivered.
    healthy.store(true, Ordering::SeqCst);
    let (s, b) = http("POST", &replay, Some(TOKEN), br#"{"class":"unavailable"}"#).await;
    assert_eq!(s, 200, "{b}");
    let counts: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        counts,
        json!({"replayed": 2, "delivered": 2, "failed": 0, "skipped": 0})
    );
    assert_eq!(letters(&get("").await.1), vec![refused(), refused()]);
    // A refused one fails again (filters in the query) and stays.
    let (s, b) = http(
        "POST",
        &format!("{replay}?class=refused&limit=1"),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let counts: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        counts,
        json!({"replayed": 1, "delivered": 0, "failed": 1, "skipped": 0})
    );
    assert_eq!(letters(&get("").await.1), vec![refused(), refused()]);

    // The audit chain holds the three replays with their trigger, and verifies.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sallyport"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = cli(&["audit", "export"]);
    assert!(out.status.success());
    let triggers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .filter_map(|r| Some(format!("{} {}", r["outcome"].as_str()?, r["trigger"].as_str()?)))
        .collect();
    assert_eq!(
        triggers,
        [
            "replay_delivered replay:api",
            "replay_delivered replay:api",
            "replay_failed replay:api"
        ]
    );
    let out = cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
