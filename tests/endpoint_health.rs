//! Endpoint health against real receivers: a receiver that is down pauses the dataflow instead
//! of burning its queue into dead letters, a probe resumes it, a rejected client certificate
//! pauses it at once, a `Retry-After` holds the whole dataflow, and a pause outlives `kill -9`.
//! Pauses and resumptions reach the `[events]` webhook, signed (checked with the reference
//! Standard Webhooks library).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use sallyport::config::Config;
use sallyport::events::Events;
use sallyport::export::Engine;
use sallyport::receiver::{Action, ClientAuth, Receiver};
use serde_json::{json, Value};
use support::events::*;
use support::*;

const SEG: &str = "s1";

fn config(pki: &RcgenPki, url: &str, extra_df: &str, tables: &str) -> Config {
    let f = &pki.files;
    let store = if tables.contains("[store]") {
        ""
    } else {
        "[store]\nurl = \"sqlite://health.db\"\n"
    };
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n{store}\
         {tables}\n[[segments]]\nid = \"{SEG}\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{url}\"\nca = \"{}\"\n\
         segments = [\"{SEG}\"]\nattributes = [{{ source = \"n\", target = \"n\" }}]\n{extra_df}\n",
        f.client_cert.display(),
        f.client_key.display(),
        f.ca_cert.display()
    );
    Config::from_toml(&text, std::path::Path::new("t.toml"), pki.dir.path()).unwrap()
}

fn profiles(from: usize, n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in from..from + n {
        out += &json!({"profileId": format!("p{i}"), "attributes": {"n": i},
                       "segments": [{"id": SEG, "status": "realized"}]})
        .to_string();
        out.push('\n');
    }
    out.into_bytes()
}

/// The distinct profiles (by their `n` attribute) among the requests a receiver got.
fn distinct(requests: &[sallyport::receiver::Received]) -> std::collections::BTreeSet<i64> {
    requests
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter_map(|v| v["n"].as_i64())
        .collect()
}

async fn status(engine: &Engine) -> Value {
    let all = engine.dataflow_statuses().await.unwrap();
    serde_json::to_value(&all[0]).unwrap()
}

/// Start `[events]` for `engine`'s config on its own runtime task.
fn start_events(cfg: &Config, engine: &Engine) {
    let (events, _task) = Events::from_config(cfg, engine.core()).unwrap();
    engine.set_events(events);
}

/// A webhook receiver for events, over mTLS with the test PKI.
async fn hook(pki: &RcgenPki) -> Receiver {
    pki.receiver(ClientAuth::Required, StatusCode::OK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_ten_seconds_pauses_the_dataflow_and_loses_nothing() {
    let python = tokio::task::spawn_blocking(reference_python).await.unwrap();
    let pki = RcgenPki::new();
    let down_until = Instant::now() + Duration::from_secs(10);
    // 503 for ten seconds (no Retry-After: the breaker, not a hold, must deal with it), then 200.
    let ok = Arc::new(Mutex::new(Vec::new()));
    let seen = ok.clone();
    let rx = pki
        .receiver_with(move |_| {
            if Instant::now() < down_until {
                Action::Respond(StatusCode::SERVICE_UNAVAILABLE, vec![])
            } else {
                seen.lock().unwrap().push(Instant::now());
                Action::Respond(StatusCode::OK, vec![])
            }
        })
        .await;
    let events = hook(&pki).await;
    let cfg = config(&pki, &rx.url("/in"), "", &events_table(pki.dir.path(), &events));
    let engine = Engine::open(&cfg).await.unwrap();
    start_events(&cfg, &engine);
    let workers = engine.spawn_workers();

    // Steady load: 20 profiles every 100 ms for 12 s, through the outage and past it.
    let mut paused_seen = false;
    let total = 120 * 20;
    for round in 0..120 {
        engine.ingest(&profiles(round * 20, 20)).await.unwrap();
        paused_seen |= status(&engine).await["state"] == "paused";
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(paused_seen, "the dataflow paused while the receiver was down");
    let store = engine.store();
    wait_until("every profile delivered", Duration::from_secs(60), || {
        store.pending(None).unwrap() == 0
    })
    .await;
    workers.iter().for_each(|w| w.abort());

    // Nothing lost, nothing dead-lettered: every profile reached the receiver while it
    // answered 200 (the last answer for each was a 200: the outbox is empty and no dead letter).
    assert!(store.dead_letters(None, 10).unwrap().is_empty());
    assert_eq!(distinct(&rx.received()).len(), total);
    assert_eq!(status(&engine).await["state"], "running");
    // No attempt succeeded before the receiver came back, and the first came within the
    // probe schedule's reach (probes at 1, 2, 4, 8 s, capped at 10 s) after it did.
    let first_ok = ok.lock().unwrap()[0];
    assert!(first_ok >= down_until);
    assert!(
        first_ok - down_until < Duration::from_secs(11),
        "{:?}",
        first_ok - down_until
    );

    // The pause and the resumption reached the webhook, signed.
    wait_until("both events", Duration::from_secs(10), || {
        !events_of(&events, "dataflow.resumed").is_empty()
    })
    .await;
    let paused = events_of(&events, "dataflow.paused");
    assert_eq!(paused.len(), 1, "one pause for one outage");
    let (req, body) = &paused[0];
    assert_eq!(body["data"]["dataflow"], "rx");
    assert_eq!(body["data"]["reason"], "breaker");
    assert_eq!(body["data"]["class"], "unavailable");
    assert_eq!(reference_verify(&python, req, &req.body).unwrap(), *body);
    let (req, body) = &events_of(&events, "dataflow.resumed")[0];
    assert_eq!(body["data"]["by"], "probe");
    assert!(reference_verify(&python, req, &req.body).is_ok());
}

/// Bind a receiver trusting `client_ca` on `addr`, waiting for the old one to let the port go.
async fn receiver_on(addr: SocketAddr, pki: &RcgenPki, client_ca: &std::path::Path) -> Receiver {
    let f = &pki.files;
    for _ in 0..100 {
        let ok = Arc::new(move |_| Action::Respond(StatusCode::OK, vec![]));
        if let Ok(r) = Receiver::start_on(
            addr,
            &f.server_cert,
            &f.server_key,
            client_ca,
            ClientAuth::Required,
            ok,
        )
        .await
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never came free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_client_certificate_pauses_at_once_and_resuming_after_the_fix_delivers_the_queue() {
    let pki = RcgenPki::new();
    let other = RcgenPki::new();
    // The receiver trusts another CA for client certificates: it refuses ours with an alert.
    let wrong = Receiver::start(
        &pki.files.server_cert,
        &pki.files.server_key,
        &other.files.ca_cert,
        ClientAuth::Required,
        StatusCode::OK,
    )
    .await
    .unwrap();
    let addr = wrong.addr;
    let events = hook(&pki).await;
    // Probes an hour apart: this test watches what the first refusal does on its own.
    let cfg = config(
        &pki,
        &wrong.url("/in"),
        "breaker = { probe_interval = \"1h\", max_probe_interval = \"1h\" }",
        &events_table(pki.dir.path(), &events),
    );
    let engine = Engine::open(&cfg).await.unwrap();
    start_events(&cfg, &engine);
    let workers = engine.spawn_workers();
    engine.ingest(&profiles(0, 1)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&engine).await["state"] != "paused" {
        assert!(Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = status(&engine).await;
    assert_eq!(st["pause"]["class"], "certificate", "{st}");
    assert_eq!(st["pause"]["reason"], "breaker");
    // Paused after the first refusal. (In TLS 1.3 the receiver's reset can overtake its alert,
    // about one connection in ten here, and that attempt reads as a broken connection —
    // class unavailable, which alone does not pause; the next refusal does.)
    let tried = wrong.connections();
    assert!(tried <= 2, "{tried} connections before the pause");

    // Paused: more profiles queue, nothing is sent, nothing becomes a dead letter.
    engine.ingest(&profiles(1, 4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(wrong.connections(), tried);
    let store = engine.store();
    assert_eq!(store.pending(None).unwrap(), 5);
    assert!(store.dead_letters(None, 10).unwrap().is_empty());

    // Trust fixed on the receiver's side, same address; the operator resumes.
    drop(wrong);
    let fixed = receiver_on(addr, &pki, &pki.files.ca_cert).await;
    assert!(engine.resume_dataflow("rx").await.unwrap());
    wait_until("the queue delivered", Duration::from_secs(15), || {
        distinct(&fixed.received()).len() == 5
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    assert!(store.dead_letters(None, 10).unwrap().is_empty());
    wait_until("both events", Duration::from_secs(10), || {
        !events_of(&events, "dataflow.resumed").is_empty()
    })
    .await;
    let paused = events_of(&events, "dataflow.paused");
    assert_eq!(paused[0].1["data"]["class"], "certificate");
    assert_eq!(
        events_of(&events, "dataflow.resumed")[0].1["data"]["by"],
        "operator"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_holds_the_whole_dataflow() {
    let pki = RcgenPki::new();
    let (rx, arrivals) = pki
        .timed_receiver(|n| {
            if n == 0 {
                Action::Respond(StatusCode::TOO_MANY_REQUESTS, vec![("retry-after", "2".into())])
            } else {
                Action::Respond(StatusCode::OK, vec![])
            }
        })
        .await;
    let engine = Engine::open(&config(&pki, &rx.url("/in"), "", "")).await.unwrap();
    let workers = engine.spawn_workers();
    engine.ingest(&profiles(0, 1)).await.unwrap();
    wait_until("the 429", Duration::from_secs(10), || {
        !arrivals.lock().unwrap().is_empty()
    })
    .await;
    // Other profiles arrive while the dataflow is held: none of them may go out before the
    // receiver's two seconds are over.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&engine).await["state"], "held");
    engine.ingest(&profiles(1, 10)).await.unwrap();
    wait_until("every profile", Duration::from_secs(15), || {
        distinct(&rx.received()).len() == 11 && engine.store().pending(None).unwrap() == 0
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    let arrivals = arrivals.lock().unwrap().clone();
    let first = arrivals[0];
    for (i, t) in arrivals.iter().enumerate().skip(1) {
        assert!(
            *t - first >= Duration::from_secs(2),
            "request {i} came {:?} after the 429",
            *t - first
        );
    }
    assert!(engine.store().dead_letters(None, 10).unwrap().is_empty());
}

// ---- `sallyport serve` as a process ----

const TOKEN: &str = "test-admin-token-health";

async fn serve(cfg: &std::path::Path, admin: u16) -> ServeProcess {
    serve_process(cfg, admin, TOKEN).await
}

fn cli(args: &[&str]) -> (bool, String) {
    sallyport_cli(args)
}

fn cli_status(cfg: &str) -> Value {
    let (ok, out) = cli(&["dataflow", "status", "--config", cfg, "--json"]);
    assert!(ok, "{out}");
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_from_the_cli_outlives_kill_9_with_its_queue() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let (public, admin) = (free_port(), free_port());
    let tables = format!(
        "[public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         token_env = \"SALLYPORT_TEST_ADMIN_TOKEN\"\n"
    );
    let f = &pki.files;
    let path = pki.dir.path().join("health.toml");
    std::fs::write(
        &path,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n[store]\nurl = \"sqlite://health.db\"\n\
             {tables}\n[[segments]]\nid = \"{SEG}\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\n\
             segments = [\"{SEG}\"]\nattributes = [{{ source = \"n\", target = \"n\" }}]\n",
            f.client_cert.display(),
            f.client_key.display(),
            rx.url("/in"),
            f.ca_cert.display()
        ),
    )
    .unwrap();
    let cfg = path.to_str().unwrap();
    let admin_url = format!("http://127.0.0.1:{admin}");
    let gw = serve(&path, admin).await;

    // Paused from the command line while serve runs; serve takes it within a second.
    let (ok, out) = cli(&[
        "dataflow",
        "pause",
        "rx",
        "--config",
        cfg,
        "--message",
        "receiver deploy",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&["dataflow", "pause", "nope", "--config", cfg]);
    assert!(!ok && out.contains("no dataflow named 'nope'"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, b) = http(
            "GET",
            &format!("{admin_url}/v1/dataflows/rx/status"),
            Some(TOKEN),
            b"",
        )
        .await;
        if serde_json::from_str::<Value>(&b).unwrap()["state"] == "paused" {
            break;
        }
        assert!(Instant::now() < deadline, "serve never took the pause: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, _) = http(
        "POST",
        &format!("{admin_url}/v1/profiles"),
        Some(TOKEN),
        &profiles(0, 20),
    )
    .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(rx.received().is_empty(), "nothing is sent while paused");

    // kill -9, restart: still paused, the queue intact.
    drop(gw);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = cli_status(cfg);
    assert_eq!(
        (st["state"].as_str(), st["pending"].as_u64()),
        (Some("paused"), Some(20)),
        "{st}"
    );
    assert_eq!(st["pause"]["message"], "receiver deploy");
    let _gw = serve(&path, admin).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.received().is_empty(), "still paused after the restart");
    let (_, b) = http("GET", &format!("{admin_url}/v1/status"), Some(TOKEN), b"").await;
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["dataflows"][0]["state"], "paused", "{v}");
    assert_eq!(v["dataflows"][0]["pending"], 20);

    // Resumed over the admin API: everything queued goes out.
    let (s, b) = http(
        "POST",
        &format!("{admin_url}/v1/dataflows/rx/resume"),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_until("the queue delivered", Duration::from_secs(15), || {
        distinct(&rx.received()).len() == 20
    })
    .await;
    // The outcomes are recorded just after the receiver answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = cli_status(cfg);
        if st["pending"].as_u64() == Some(0) {
            assert_eq!(st["state"], "running");
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _) = http(
        "POST",
        &format!("{admin_url}/v1/dataflows/nope/pause"),
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = http("POST", &format!("{admin_url}/v1/dataflows/rx/pause"), None, b"").await;
    assert_eq!(s, 401, "pausing needs the admin token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_settings_are_checked() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    let issues = |extra: &str| {
        let text = format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
             [[segments]]\nid = \"{SEG}\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"https://127.0.0.1:1/in\"\n\
             ca = \"{}\"\nsegments = [\"{SEG}\"]\n{extra}\n",
            f.client_cert.display(),
            f.client_key.display(),
            f.ca_cert.display()
        );
        Config::from_toml(&text, std::path::Path::new("t.toml"), pki.dir.path())
            .map(|c| {
                c.validate()
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| e.to_string())
    };
    assert_eq!(issues("rate_limit = { per_second = 100 }\nmax_in_flight = 8"), "");
    assert!(issues("max_in_flight = 0").contains("max_in_flight"));
    assert!(issues("rate_limit = { per_second = 0 }").contains("rate_limit.per_second"));
    assert!(issues("breaker = { failure_ratio = 1.5 }").contains("breaker.failure_ratio"));
    assert!(issues("breaker = { probe_interval = \"soon\" }").contains("breaker.probe_interval"));
    assert!(issues("retry_schedule = [\"1s\", \"later\"]").contains("retry_schedule[1]"));
    assert!(issues("retry_schedule = [\"1s\"]\nmax_attempts = 5").contains("not both"));
    assert_eq!(
        issues("retry_schedule = [\"1s\", \"10s\", \"1m\", \"10m\", \"1h\"]"),
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_and_an_in_flight_cap_pace_the_receiver() {
    let pki = RcgenPki::new();
    let (rx, arrivals) = pki
        .timed_receiver(|_| Action::Respond(StatusCode::OK, vec![]))
        .await;
    // Ten requests a second, no burst beyond one, at most two connections.
    let engine = Engine::open(&config(
        &pki,
        &rx.url("/in"),
        "rate_limit = { per_second = 10, burst = 1 }\nmax_in_flight = 2",
        "",
    ))
    .await
    .unwrap();
    let workers = engine.spawn_workers();
    engine.ingest(&profiles(0, 21)).await.unwrap();
    wait_until("every profile", Duration::from_secs(15), || {
        distinct(&rx.received()).len() == 21
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    let arrivals = arrivals.lock().unwrap().clone();
    // 21 requests at 10/s with no burst: the last comes two seconds after the first at least.
    let spread = arrivals[20] - arrivals[0];
    assert!(spread >= Duration::from_millis(1900), "{spread:?}");
    assert!(rx.connections() <= 2, "{} connections", rx.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_postgresql_share_a_pause() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let schema = support::pg::PgSchema::new();
    let on = |instance: &str| {
        config(
            &pki,
            &rx.url("/in"),
            "",
            &format!(
                "[store]\nurl = \"{}\"\nschema = \"{}\"\ninstance = \"{instance}\"\n",
                schema.url, schema.name
            ),
        )
    };
    let a = Engine::open(&on("a")).await.unwrap();
    let b = Engine::open(&on("b")).await.unwrap();
    let (wa, wb) = (a.spawn_workers(), b.spawn_workers());
    let state = |e: &Engine| {
        let e = e.clone();
        async move { status(&e).await["state"].as_str().unwrap().to_owned() }
    };
    a.pause_dataflow("rx", Some("deploy".into())).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(&b).await != "paused" {
        assert!(Instant::now() < deadline, "b never saw a's pause");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.ingest(&profiles(0, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.received().is_empty(), "neither instance delivers while paused");
    assert!(b.resume_dataflow("rx").await.unwrap());
    wait_until("the queue delivered", Duration::from_secs(15), || {
        distinct(&rx.received()).len() == 10
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(&a).await != "running" {
        assert!(Instant::now() < deadline, "a never saw b's resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wa.iter().chain(wb.iter()).for_each(|w| w.abort());
}
