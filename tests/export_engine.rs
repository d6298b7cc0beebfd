//! The export engine end to end: NDJSON in, durable outbox, real mTLS deliveries out to a
//! receiver that requires the gateway's certificate.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::receiver::{ClientAuth, Receiver};
use serde_json::{json, Value};
use support::*;

const SEG: &str = "5b998cb9-9488-4ec3-8d95-fa8338ced490";
const SEG2: &str = "7d5c5f4b-0000-4ec3-8d95-fa8338ced491";

struct Setup {
    pki: RcgenPki,
    rx: Receiver,
}

async fn setup() -> Setup {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    Setup { pki, rx }
}

fn config(s: &Setup, segments: &[&str], db: &str) -> Config {
    let f = &s.pki.files;
    let text = format!(
        r#"
[egress]
allow = ["127.0.0.0/8"]
[identity]
cert = "{cert}"
key = "{key}"
[store]
url = "sqlite://{db}"
[[segments]]
id = "{SEG}"
name = "First name equals John"
[[segments]]
id = "{SEG2}"
name = "Second"
[[dataflows]]
name = "rx"
endpoint = "{url}"
ca = "{ca}"
attributes = [{{ source = "person.name.firstName", target = "firstName" }}]
segments = {segs}
"#,
        cert = f.client_cert.display(),
        key = f.client_key.display(),
        ca = f.ca_cert.display(),
        url = s.rx.url("/profiles"),
        segs = serde_json::to_string(segments).unwrap(),
    );
    Config::from_toml(&text, std::path::Path::new("test.toml"), s.pki.dir.path()).unwrap()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bodies(rx: &Receiver) -> Vec<Value> {
    rx.received()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

fn line(v: Value) -> String {
    v.to_string() + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_in_one_json_per_changed_profile_out() {
    let s = setup().await;
    let engine = Engine::open(&config(&s, &[SEG], "a.db")).await.unwrap();
    let workers = engine.spawn_workers();
    let mut batch = String::new();
    for i in 0..20 {
        batch += &line(
            json!({"profileId": format!("p{i}"), "identityMap": {"ecid": [{"id": format!("{i}")}]},
            "attributes": {"person": {"name": {"firstName": format!("J{i}"), "lastName": "secret"}}},
            "segments": [{"id": SEG, "status": "realized", "lastQualificationTime": "2026-11-25T10:00:00Z"}]}),
        );
    }
    // Not a member of any mapped segment: not exported.
    batch += &line(json!({"profileId": "outsider", "attributes": {"person": {"name": {"firstName": "X"}}}}));
    let report = engine.ingest(batch.as_bytes()).await.unwrap();
    assert_eq!((report.accepted, report.rejected), (21, 0));
    wait_for("20 deliveries", || s.rx.received().len() >= 20).await;
    wait_for("an empty outbox", || engine.store().pending(None).unwrap() == 0).await;
    let got = bodies(&s.rx);
    assert_eq!(got.len(), 20);
    for b in &got {
        assert_eq!(b["segmentMembership"]["ups"][SEG]["status"], "realized");
        assert!(b["firstName"].as_str().unwrap().starts_with('J'));
        assert!(
            !b.to_string().contains("secret"),
            "unmapped attribute exported: {b}"
        );
    }
    for r in s.rx.received() {
        assert_eq!(
            r.client_cert.as_ref().unwrap().subject_cn.as_deref(),
            Some("sallyport-gateway")
        );
    }
    workers.iter().for_each(|w| w.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_changed_twice_before_delivery_is_sent_once_with_its_latest_state() {
    let s = setup().await;
    let engine = Engine::open(&config(&s, &[SEG], "b.db")).await.unwrap();
    // No workers yet: both changes wait in the outbox.
    engine
        .ingest(
            line(
                json!({"profileId": "p", "attributes": {"person": {"name": {"firstName": "Old"}}},
            "segments": [{"id": SEG, "status": "realized"}]}),
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    engine
        .ingest(
            line(json!({"profileId": "p", "attributes": {"person": {"name": {"firstName": "New"}}}}))
                .as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(engine.pending().await.unwrap(), 1);
    let workers = engine.spawn_workers();
    wait_for("one delivery", || !s.rx.received().is_empty()).await;
    wait_for("an empty outbox", || engine.store().pending(None).unwrap() == 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // give a wrong second send time to show up
    let got = bodies(&s.rx);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["firstName"], "New");
    workers.iter().for_each(|w| w.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataflow_changed_between_ingest_and_delivery_sends_what_the_new_mapping_builds() {
    let s = setup().await;
    let queued = {
        // Queued (payload built) while segment names are off and firstName goes to firstName.
        let engine = Engine::open(&config(&s, &[SEG], "m.db")).await.unwrap();
        engine
            .ingest(
                line(
                    json!({"profileId": "p", "attributes": {"person": {"name": {"firstName": "J"}}},
                "segments": [{"id": SEG, "status": "realized"}]}),
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        engine.pending().await.unwrap()
    };
    assert_eq!(queued, 1);
    let mut cfg = config(&s, &[SEG], "m.db");
    cfg.dataflows[0].include_segment_names = true;
    cfg.dataflows[0].attributes[0].target = "person.givenName".into();
    let engine = Engine::open(&cfg).await.unwrap();
    let workers = engine.spawn_workers();
    wait_for("one delivery", || !s.rx.received().is_empty()).await;
    let got = bodies(&s.rx);
    assert_eq!(got[0]["person"]["givenName"], "J", "{}", got[0]);
    assert!(got[0].get("firstName").is_none(), "{}", got[0]);
    assert_eq!(
        got[0]["segmentMembership"]["ups"][SEG]["name"], "First name equals John",
        "{}",
        got[0]
    );
    workers.iter().for_each(|w| w.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newly_mapped_segment_backfills_every_qualified_profile_exactly_once() {
    let s = setup().await;
    let dir = s.pki.dir.path().to_owned();
    {
        // SEG2 is not mapped yet: qualifying for it exports nothing.
        let engine = Engine::open(&config(&s, &[SEG], "c.db")).await.unwrap();
        // Enough members for several claim batches, so the next batch is claimed while the
        // last deliveries of the one before are still in flight.
        let mut batch = String::new();
        for i in 0..1500 {
            let status = if i % 5 == 0 { "exited" } else { "realized" };
            batch += &line(
                json!({"profileId": format!("p{i}"), "identityMap": {"ecid": [{"id": format!("{i}")}]},
                "segments": [{"id": SEG2, "status": status}]}),
            );
        }
        engine.ingest(batch.as_bytes()).await.unwrap();
        assert_eq!(engine.pending().await.unwrap(), 0);
    }
    assert!(dir.join("c.db").exists());
    let engine = Engine::open(&config(&s, &[SEG, SEG2], "c.db")).await.unwrap();
    assert_eq!(
        engine.pending().await.unwrap(),
        1200,
        "the 1200 members, not the 300 that exited"
    );
    let workers = engine.spawn_workers();
    wait_for("1200 deliveries", || s.rx.received().len() >= 1200).await;
    wait_for("an empty outbox", || engine.store().pending(None).unwrap() == 0).await;
    workers.iter().for_each(|w| w.abort());
    drop(engine);
    // Opening again with the same mapping does not backfill again.
    let engine = Engine::open(&config(&s, &[SEG, SEG2], "c.db")).await.unwrap();
    assert_eq!(engine.pending().await.unwrap(), 0);
    let mut ids: Vec<String> = bodies(&s.rx)
        .iter()
        .map(|b| b["identityMap"]["ecid"][0]["id"].to_string())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((n, ids.len()), (1200, 1200), "each profile exactly once");
}

#[tokio::test]
async fn bad_lines_are_reported_and_good_lines_still_accepted() {
    let s = setup().await;
    let engine = Engine::open(&config(&s, &[SEG], "d.db")).await.unwrap();
    let ten_mb = format!(
        "{{\"profileId\":\"big\",\"attributes\":{{\"x\":\"{}\"}}}}",
        "y".repeat(10 * 1024 * 1024)
    );
    let batch = format!(
        "{}{{not json\n{}{}{ten_mb}\n{}",
        line(json!({"profileId": "ok1", "segments": [{"id": SEG, "status": "realized"}]})),
        line(json!({"profileId": "x", "segments": [{"id": SEG, "status": "qualified"}]})),
        line(json!({"identityMap": {}})),
        line(json!({"profileId": "ok2", "segments": [{"id": SEG, "status": "realized"}]})),
    );
    let r = engine.ingest(batch.as_bytes()).await.unwrap();
    assert_eq!((r.accepted, r.rejected), (2, 4));
    let lines: Vec<usize> = r.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 5]);
    assert!(r.errors[1].reason.contains("unknown variant `qualified`"));
    assert!(r.errors[2].reason.contains("missing field `profileId`"));
    assert!(r.errors[3].reason.contains("the limit is"));
    assert_eq!(engine.pending().await.unwrap(), 2);
    assert!(engine.store().profile("ok2").unwrap().is_some());
}

#[tokio::test]
async fn a_body_of_bad_lines_gets_a_bounded_answer_with_the_true_counts() {
    let s = setup().await;
    let engine = Engine::open(&config(&s, &[SEG], "amp.db")).await.unwrap();
    // 1 MiB of `x\n`: 524,288 bad lines, then one good one.
    let mut body = b"x\n".repeat(512 * 1024);
    body.extend_from_slice(
        line(json!({"profileId": "ok", "segments": [{"id": SEG, "status": "realized"}]})).as_bytes(),
    );
    let r = engine.ingest(&body).await.unwrap();
    assert_eq!((r.accepted, r.rejected), (1, 512 * 1024));
    assert_eq!(r.errors.len(), 100, "the first 100 rejected lines are listed");
    assert_eq!(r.errors_omitted, 512 * 1024 - 100, "the rest are counted");
    assert_eq!(
        r.errors.iter().map(|e| e.line).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    let answer = serde_json::to_string(&r).unwrap();
    assert!(answer.len() < 16 * 1024, "{} bytes", answer.len());
    assert!(
        answer.contains("\"errorsOmitted\":524188"),
        "camelCase like the API: {answer}"
    );
    assert_eq!(engine.pending().await.unwrap(), 1);
}

#[tokio::test]
async fn an_update_with_too_many_segment_events_is_rejected_with_the_limit_named() {
    let s = setup().await;
    let engine = Engine::open(&config(&s, &[SEG], "segs.db")).await.unwrap();
    let events = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"id": format!("seg-{i}"), "status": "realized"}))
            .collect()
    };
    let batch = line(json!({"profileId": "many", "segments": events(10_001)}))
        + &line(json!({"profileId": "most", "segments": events(10_000)}));
    let r = engine.ingest(batch.as_bytes()).await.unwrap();
    assert_eq!((r.accepted, r.rejected), (1, 1));
    assert_eq!(r.errors[0].line, 1);
    assert_eq!(
        r.errors[0].reason,
        "segments has 10001 events; the limit is 10000 per update"
    );
    assert!(engine.store().profile("many").unwrap().is_none());
    assert_eq!(
        engine.store().profile("most").unwrap().unwrap().segments.len(),
        10_000
    );
}

#[tokio::test]
async fn one_profile_in_many_updates_with_repeated_segments_is_stored_and_queued_once() {
    let s = setup().await;
    let engine = Engine::open(&config(&s, &[SEG, SEG2], "dup.db")).await.unwrap();
    // 30 updates of one profile, 2,000 segment events each, overlapping by half, the mapped
    // segments among them, one of them flipping within an update.
    let mut batch = String::new();
    for n in 0..30usize {
        let mut events: Vec<Value> = (n * 1000..n * 1000 + 2000)
            .map(|i| json!({"id": format!("seg-{i}"), "status": "realized"}))
            .collect();
        events.push(json!({"id": SEG, "status": "realized"}));
        events.push(json!({"id": SEG2, "status": "exiting"}));
        events.push(json!({"id": SEG, "status": "exited"}));
        batch += &line(json!({"profileId": "p", "segments": events}));
    }
    let r = engine.ingest(batch.as_bytes()).await.unwrap();
    assert_eq!((r.accepted, r.rejected), (30, 0));
    let p = engine.store().profile("p").unwrap().unwrap();
    assert_eq!(p.segments.len(), 29 * 1000 + 2000 + 2);
    assert_eq!(p.segments[SEG].status.as_str(), "exited");
    assert_eq!(p.segments[SEG2].status.as_str(), "exiting");
    assert_eq!(engine.pending().await.unwrap(), 1, "one delivery for the profile");
    let claimed = engine
        .store()
        .claim("rx", 10, sallyport::store::now_ms(), 30_000)
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].segments, [SEG, SEG2], "each mapped segment named once");
}
