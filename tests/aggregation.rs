//! The Destination SDK's documented aggregation key examples, reproduced: the same profiles,
//! the same aggregation key and the same template give exactly the documented requests
//! (message-format page, "Include aggregation key in your template", as of 2026-12).
#![allow(clippy::unwrap_used)]

use sallyport::config::AggregationKey;
use sallyport::export::aggregate::{entries, plan};
use sallyport::export::template::{context, Template};
use serde_json::{json, Value};

/// Render every planned request of `profiles` under `policy` with `template`.
fn requests(
    profiles: &[Value],
    policy: &AggregationKey,
    split: bool,
    mapped: &[&str],
    template: &str,
) -> Vec<Value> {
    let mapped: Vec<String> = mapped.iter().map(|s| (*s).to_owned()).collect();
    let per_profile = profiles
        .iter()
        .map(|p| entries(p, policy, split, &mapped))
        .collect();
    let planned = plan(per_profile, 1000);
    let sample = context(vec![profiles[0].clone()], planned[0].key.to_json(), "d", &[]);
    let t = Template::compile("doc.j2", template.to_owned(), true, &sample).unwrap();
    planned
        .iter()
        .map(|p| {
            let ctx = context(
                p.members.iter().map(|(_, v)| v.clone()).collect(),
                p.key.to_json(),
                "d",
                &[],
            );
            serde_json::from_slice(&t.render(&ctx).unwrap()).unwrap()
        })
        .collect()
}

fn first_name(name: &str, ups: Value) -> Value {
    json!({"attributes": {"firstName": {"value": name}}, "identityMap": {}, "segmentMembership": {"ups": ups}})
}

#[test]
fn grouped_by_audience_id_as_documented() {
    let (a, b) = (
        "788d8874-8007-4253-92b7-ee6b6c20c6f3",
        "8f812592-3f06-416b-bd50-e7831848a31a",
    );
    let q = |t: &str| json!({"lastQualificationTime": t, "status": "realized"});
    let profiles = [
        first_name("Hermione", json!({ a: q("2020-11-20T13:15:49Z") })),
        first_name("Harry", json!({ a: q("2020-11-20T13:15:49Z") })),
        first_name("Tom", json!({ b: q("2021-02-20T12:00:00Z") })),
        first_name(
            "Jerry",
            json!({ a: q("2020-11-20T13:15:49Z"), b: q("2021-02-20T12:00:00Z") }),
        ),
    ];
    let policy = AggregationKey {
        include_segment_id: true,
        ..AggregationKey::default()
    };
    // The documented template, with the key the documented output shows ("firstName"; the
    // page's template writes "first_name" but its results say "firstName").
    let template = r#"{
    "audienceId": "{{ input.aggregationKey.segmentId }}",
    "profiles": [
        {% for profile in input.profiles %}
        {
            "firstName": "{{ profile.attributes.firstName.value }}"
        }{% if not loop.last %},{% endif %}
        {% endfor %}
    ]
}"#;
    let got = requests(&profiles, &policy, false, &[a, b], template);
    assert_eq!(
        got,
        [
            json!({"audienceId": a, "profiles": [{"firstName": "Hermione"}, {"firstName": "Harry"}, {"firstName": "Jerry"}]}),
            json!({"audienceId": b, "profiles": [{"firstName": "Tom"}, {"firstName": "Jerry"}]}),
        ]
    );
}

#[test]
fn grouped_by_identity_namespace_groups_as_documented() {
    let profiles = [
        json!({"attributes": {}, "segmentMembership": {"ups": {}}, "identityMap": {
            "email": [{"id": "e1@example.com"}, {"id": "e2@example.com"}],
            "phone": [{"id": "+40744111222"}],
            "IDFA": [{"id": "AEBE52E7-03EE-455A-B3C4-E57283966239"}],
            "GAID": [{"id": "e4fe9bde-caa0-47b6-908d-ffba3fa184f2"}]}}),
        json!({"attributes": {}, "segmentMembership": {"ups": {}}, "identityMap": {
            "email": [{"id": "e3@example.com"}],
            "phone": [{"id": "+40744333444"}, {"id": "+40744555666"}],
            "IDFA": [{"id": "134GHU45-34HH-GHJ7-K0H8-LHN665998NN0"}],
            "GAID": [{"id": "47bh00i9-8jv6-334n-lll8-nb7f24sghg76"}]}}),
    ];
    let policy = AggregationKey {
        include_identity: true,
        groups: vec![
            vec!["email".into(), "phone".into()],
            vec!["GAID".into(), "IDFA".into()],
        ],
        ..AggregationKey::default()
    };
    // The documented template, verbatim.
    let template = r#"{
            "profiles": [
            {% for profile in input.profiles %}
            {
                {% for ns in input.aggregationKey.identityNamespaces %}
                "{{ns}}": [
                    {% for id in profile.identityMap[ns] %}
                    "{{id.id}}"{% if not loop.last %},{% endif %}
                    {% endfor %}
                ]{% if not loop.last %},{% endif %}
                {% endfor %}
            }{% if not loop.last %},{% endif %}
            {% endfor %}
        ]
}"#;
    let got = requests(&profiles, &policy, false, &[], template);
    assert_eq!(
        got,
        [
            json!({"profiles": [
                {"email": ["e1@example.com", "e2@example.com"], "phone": ["+40744111222"]},
                {"email": ["e3@example.com"], "phone": ["+40744333444", "+40744555666"]}]}),
            json!({"profiles": [
                {"IDFA": ["AEBE52E7-03EE-455A-B3C4-E57283966239"], "GAID": ["e4fe9bde-caa0-47b6-908d-ffba3fa184f2"]},
                {"IDFA": ["134GHU45-34HH-GHJ7-K0H8-LHN665998NN0"], "GAID": ["47bh00i9-8jv6-334n-lll8-nb7f24sghg76"]}]}),
        ]
    );
}

#[test]
fn segment_status_and_split_by_id_as_the_render_template_example_groups() {
    // Two profiles, three segments (one exited), five identities in two groups, split by id:
    // six requests, each identity its own entry (render-template API example).
    let ups = json!({
        "segmentid1": {"lastQualificationTime": "2021-10-26T17:41:55Z", "status": "realized"},
        "segmentid3": {"lastQualificationTime": "2021-10-26T17:41:55Z", "status": "exited"},
        "segmentid2": {"lastQualificationTime": "2021-10-26T17:41:55Z", "status": "realized"}});
    let profile = |s: &str| {
        json!({"attributes": {"key": {"value": "string"}}, "segmentMembership": {"ups": ups},
            "identityMap": {
                "amazon_channel": [{"id": format!("amazon_channel-{s}")}],
                "named_user_id": [{"id": format!("named_user_id-{s}")}],
                "channel": [{"id": format!("channel-{s}")}],
                "android_channel": [{"id": format!("android_channel-{s}")}],
                "ios_channel": [{"id": format!("ios_channel-{s}")}]}})
    };
    let policy = AggregationKey {
        include_segment_id: true,
        include_segment_status: true,
        include_identity: true,
        groups: vec![
            vec![
                "android_channel".into(),
                "amazon_channel".into(),
                "ios_channel".into(),
                "channel".into(),
            ],
            vec!["named_user_id".into()],
        ],
        ..AggregationKey::default()
    };
    let mapped: Vec<String> = ["segmentid1", "segmentid2", "segmentid3"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let per_profile = [profile("a"), profile("b")]
        .iter()
        .map(|p| entries(p, &policy, true, &mapped))
        .collect();
    let planned = plan(per_profile, 1000);
    let mut shapes: Vec<(String, String, usize, usize)> = planned
        .iter()
        .map(|p| {
            let k = p.key.to_json();
            // Every entry: one identity, the key's segment only.
            for (_, v) in &p.members {
                let ids = v["identityMap"].as_object().unwrap();
                assert_eq!(ids.len(), 1);
                assert_eq!(ids.values().next().unwrap().as_array().unwrap().len(), 1);
                let ups = v["segmentMembership"]["ups"].as_object().unwrap();
                assert_eq!(ups.keys().collect::<Vec<_>>(), [k["segmentId"].as_str().unwrap()]);
            }
            (
                k["segmentId"].as_str().unwrap().to_owned(),
                k["segmentStatus"].as_str().unwrap().to_owned(),
                k["identityNamespaces"].as_array().unwrap().len(),
                p.members.len(),
            )
        })
        .collect();
    shapes.sort();
    assert_eq!(
        shapes,
        [
            ("segmentid1".into(), "realized".into(), 1, 2),
            ("segmentid1".into(), "realized".into(), 4, 8),
            ("segmentid2".into(), "realized".into(), 1, 2),
            ("segmentid2".into(), "realized".into(), 4, 8),
            ("segmentid3".into(), "exited".into(), 1, 2),
            ("segmentid3".into(), "exited".into(), 4, 8),
        ]
    );
}

// ---- end to end, through the engine, to real mTLS receivers ----

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use sallyport::config::Config;
use sallyport::export::Engine;
use sallyport::receiver::{ClientAuth, Receiver};
use support::*;

const SEG: &str = "s1";

/// A config with dataflow `rx` to `url` (its extra keys in `df`), more TOML in `tables`.
fn config(pki: &RcgenPki, url: &str, df: &str, tables: &str) -> Config {
    let f = &pki.files;
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n[store]\nurl = \"sqlite://agg.db\"\n\
         [[segments]]\nid = \"{SEG}\"\nname = \"Segment one\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{url}\"\nca = \"{}\"\n\
         segments = [\"{SEG}\"]\nattributes = [{{ source = \"name\", target = \"firstName\" }}]\n{df}\n{tables}\n",
        f.client_cert.display(),
        f.client_key.display(),
        f.ca_cert.display()
    );
    Config::from_toml(&text, std::path::Path::new("t.toml"), pki.dir.path()).unwrap()
}

fn config_result(pki: &RcgenPki, df: &str) -> Result<Config, sallyport::config::ConfigError> {
    let f = &pki.files;
    let text = format!(
        "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[segments]]\nid = \"{SEG}\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"https://127.0.0.1:9/in\"\n\
         ca = \"{}\"\nsegments = [\"{SEG}\"]\nattributes = [{{ source = \"name\", target = \"firstName\" }}]\n{df}\n",
        f.client_cert.display(),
        f.client_key.display(),
        f.ca_cert.display()
    );
    Config::from_toml(&text, std::path::Path::new("t.toml"), pki.dir.path())
}

fn updates(from: usize, n: usize, with_name: bool) -> Vec<u8> {
    let mut out = String::new();
    for i in from..from + n {
        let mut v = json!({"profileId": format!("p{i}"), "segments": [{"id": SEG, "status": "realized"}],
                           "identityMap": {"email": [{"id": format!("u{i}@example.com")}]}});
        if with_name {
            v["attributes"] = json!({"name": format!("N{i}")});
        }
        out += &(v.to_string() + "\n");
    }
    out.into_bytes()
}

const USERS_TEMPLATE: &str = r#"{"segment": "{{ input.aggregationKey.segmentId }}", "users": [
{%- for p in input.profiles %}{"name": "{{ p.attributes.firstName.value }}", "email": "{{ p.identityMap.email[0].id }}"}{% if not loop.last %},{% endif %}{% endfor -%}
]}"#;

fn bodies(rx: &Receiver) -> Vec<Value> {
    rx.received()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_sends_ten_per_request_rendered_by_the_template() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let df = format!(
        "aggregation = {{ kind = \"best_effort\", max_users_per_request = 10, aggregation_key = {{ include_segment_id = true }} }}\n\
         template_inline = '''{USERS_TEMPLATE}'''"
    );
    let engine = Engine::open(&config(&pki, &rx.url("/in"), &df, ""))
        .await
        .unwrap();
    engine.ingest(&updates(0, 25, true)).await.unwrap();
    let workers = engine.spawn_workers();
    let store = engine.store();
    wait_until("every row delivered", Duration::from_secs(15), || {
        store.pending(None).unwrap() == 0
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    let got = bodies(&rx);
    let mut sizes: Vec<usize> = got.iter().map(|b| b["users"].as_array().unwrap().len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [5, 10, 10], "25 profiles, 10 per request");
    assert!(got.iter().all(|b| b["segment"] == SEG));
    let names: std::collections::BTreeSet<String> = got
        .iter()
        .flat_map(|b| b["users"].as_array().unwrap().clone())
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 25, "every profile, once");
    // One key per request, and one audit record per request naming its members.
    let keys: std::collections::BTreeSet<String> = rx
        .received()
        .iter()
        .map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "idempotency-key")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(keys.len(), 3);
    let audit = store.audit_records(0, 100).unwrap();
    assert_eq!(audit.len(), 3, "an attempt is a request");
    assert!(
        audit.iter().any(|r| r.record.contains("\"profileId\":\"p0,p1,")),
        "{}",
        audit[0].record
    );
    assert!(rx.received().iter().all(|r| r
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_error_at_render_time_sends_nothing_and_parks_the_batch_while_other_dataflows_deliver() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let other = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let df = format!(
        "aggregation = {{ kind = \"best_effort\", max_users_per_request = 10, aggregation_key = {{ include_segment_id = true }} }}\ntemplate_inline = '''{USERS_TEMPLATE}'''"
    );
    // A second dataflow, plain, to another receiver.
    let tables = format!(
        "[[dataflows]]\nname = \"plain\"\nendpoint = \"{}\"\nca = \"{}\"\nsegments = [\"{SEG}\"]\n",
        other.url("/in"),
        pki.files.ca_cert.display()
    );
    let engine = Engine::open(&config(&pki, &rx.url("/in"), &df, &tables))
        .await
        .unwrap();
    // Strict templates: a profile without the attribute the template prints fails to render.
    engine.ingest(&updates(0, 3, false)).await.unwrap();
    let workers = engine.spawn_workers();
    let store = engine.store();
    wait_until("the plain dataflow's deliveries", Duration::from_secs(15), || {
        other.received().len() == 3
    })
    .await;
    wait_until("a dead letter", Duration::from_secs(15), || {
        !store.dead_letters(None, 10).unwrap().is_empty()
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    assert!(rx.received().is_empty(), "nothing sent for the failed rendering");
    let dead = store.dead_letters(None, 10).unwrap();
    assert_eq!(dead.len(), 1, "one dead letter for the batch: {dead:?}");
    assert_eq!(dead[0].class.as_str(), "internal");
    assert!(
        dead[0].errors[0].message.contains("rx.template:"),
        "{:?}",
        dead[0].errors
    );
    assert_eq!(dead[0].profile_id, "p0,p1,p2");
    assert_eq!(store.pending(Some("rx")).unwrap(), 0);
    let audit = store.audit_records(0, 100).unwrap();
    assert!(audit
        .iter()
        .any(|r| r.record.contains("\"outcome\":\"dead_letter\"") && r.record.contains("invalid_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurable_batches_wait_for_age_or_size() {
    let pki = RcgenPki::new();
    let rx = pki.receiver(ClientAuth::Required, StatusCode::OK).await;
    let template = USERS_TEMPLATE.replace("{{ input.aggregationKey.segmentId }}", "all");
    let df = format!(
        "aggregation = {{ kind = \"configurable\", max_batch_age = \"2s\", max_events_in_batch = 50 }}\n\
         template_inline = '''{template}'''"
    );
    let engine = Engine::open(&config(&pki, &rx.url("/in"), &df, ""))
        .await
        .unwrap();
    let workers = engine.spawn_workers();
    // Fewer than a batch: held until the oldest has waited two seconds.
    let started = Instant::now();
    engine.ingest(&updates(0, 20, true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(rx.received().is_empty(), "a small batch waits");
    wait_until("the aged batch", Duration::from_secs(10), || {
        rx.received().len() == 1
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(bodies(&rx)[0]["users"].as_array().unwrap().len(), 20);
    // A full batch goes at once.
    engine.ingest(&updates(100, 50, true)).await.unwrap();
    wait_until("the full batch", Duration::from_secs(1), || {
        rx.received().len() == 2
    })
    .await;
    workers.iter().for_each(|w| w.abort());
    assert_eq!(bodies(&rx)[1]["users"].as_array().unwrap().len(), 50);
}

#[test]
fn a_broken_template_file_is_refused_at_load_with_its_line() {
    let pki = RcgenPki::new();
    std::fs::create_dir_all(pki.dir.path().join("templates")).unwrap();
    std::fs::write(
        pki.dir.path().join("templates/acme.j2"),
        "{\n  \"users\": [\n  {% for p in input.profiles %}{{ p.attributes.firstName.value }{% endfor %}\n]}\n",
    )
    .unwrap();
    let refused = |df: &str| format!("{:?}", config_result(&pki, df).unwrap_err());
    let e = refused("template = \"templates/acme.j2\"");
    assert!(
        e.contains("dataflows[0].template") && e.contains("templates/acme.j2:3: syntax error"),
        "{e}"
    );
    let e = refused("template_inline = '{\"a\": \"{{ env.HOME }}\"}'");
    assert!(e.contains("unknown variable 'env'"), "{e}");
    // Reading a part of the aggregation key the dataflow does not group by fails at load too.
    let e = refused("template_inline = '{\"a\": \"{{ input.aggregationKey.segmentId }}\"}'");
    assert!(e.contains("segmentId") && e.contains("undefined"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_batches_in_flight_loses_nothing_and_repeats_only_under_the_same_key() {
    let pki = RcgenPki::new();
    let f = &pki.files;
    // A slow receiver, so batches are in flight when the gateway is killed.
    let rx = pki
        .receiver_with(|_| sallyport::receiver::Action::Delay(Duration::from_millis(300), StatusCode::OK))
        .await;
    let (public, admin) = (free_port(), free_port());
    let path = pki.dir.path().join("agg.toml");
    std::fs::write(
        &path,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n[store]\nurl = \"sqlite://agg.db\"\n\
             [public]\nlisten = \"127.0.0.1:{public}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken_env = \"SALLYPORT_TEST_ADMIN_TOKEN\"\n\
             [[segments]]\nid = \"{SEG}\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"{}\"\nca = \"{}\"\n\
             segments = [\"{SEG}\"]\nattributes = [{{ source = \"n\", target = \"n\" }}]\nmax_in_flight = 4\n\
             aggregation = {{ kind = \"best_effort\", max_users_per_request = 10 }}\n",
            f.client_cert.display(),
            f.client_key.display(),
            rx.url("/in"),
            f.ca_cert.display()
        ),
    )
    .unwrap();
    let token = "agg-token";
    let gw = serve_process(&path, admin, token).await;
    let mut body = String::new();
    for i in 0..300 {
        body += &(json!({"profileId": format!("p{i}"), "attributes": {"n": i},
                         "segments": [{"id": SEG, "status": "realized"}]})
        .to_string()
            + "\n");
    }
    let (s, _) = http(
        "POST",
        &format!("http://127.0.0.1:{admin}/v1/profiles"),
        Some(token),
        body.as_bytes(),
    )
    .await;
    assert_eq!(s, 200);
    wait_until("batches in flight", Duration::from_secs(10), || {
        rx.received().len() >= 6
    })
    .await;
    drop(gw); // SIGKILL, with requests in flight and outcomes unrecorded
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _gw = serve_process(&path, admin, token).await;
    // Every profile reaches the receiver.
    let seen = |rx: &Receiver| -> std::collections::BTreeMap<i64, std::collections::BTreeSet<String>> {
        let mut by_profile = std::collections::BTreeMap::<i64, std::collections::BTreeSet<String>>::new();
        for r in rx.received() {
            let key = r
                .headers
                .iter()
                .find(|(k, _)| k == "idempotency-key")
                .unwrap()
                .1
                .clone();
            let arr: Vec<Value> = serde_json::from_slice(&r.body).unwrap();
            for p in arr {
                by_profile
                    .entry(p["n"].as_i64().unwrap())
                    .or_default()
                    .insert(key.clone());
            }
        }
        by_profile
    };
    wait_until("every profile", Duration::from_secs(30), || {
        seen(&rx).len() == 300
    })
    .await;
    // A profile sent twice was sent in the same batch under the same key: the receiver can
    // drop the repeat.
    let by_profile = seen(&rx);
    let repeated: Vec<_> = by_profile.iter().filter(|(_, keys)| keys.len() > 1).collect();
    assert!(
        repeated.is_empty(),
        "profiles sent under more than one key: {repeated:?}"
    );
}

#[test]
fn template_sample_and_render_show_what_would_be_sent() {
    let pki = RcgenPki::new();
    let path = pki.dir.path().join("t.toml");
    let f = &pki.files;
    std::fs::write(
        &path,
        format!(
            "[egress]\nallow = [\"127.0.0.0/8\"]\n[identity]\ncert = \"{}\"\nkey = \"{}\"\n\
             [[segments]]\nid = \"{SEG}\"\nname = \"S\"\n[[dataflows]]\nname = \"rx\"\nendpoint = \"https://127.0.0.1:9/in\"\n\
             ca = \"{}\"\nsegments = [\"{SEG}\"]\nattributes = [{{ source = \"person.name\", target = \"firstName\" }}]\n\
             aggregation = {{ kind = \"best_effort\", max_users_per_request = 10, aggregation_key = {{ include_segment_id = true }} }}\n\
             template_inline = '''{USERS_TEMPLATE}'''\n",
            f.client_cert.display(),
            f.client_key.display(),
            f.ca_cert.display()
        ),
    )
    .unwrap();
    let cfg = path.to_str().unwrap();
    let (ok, samples) = sallyport_cli(&[
        "template",
        "sample",
        "--config",
        cfg,
        "--dataflow",
        "rx",
        "--count",
        "3",
    ]);
    assert!(ok, "{samples}");
    assert_eq!(samples.lines().count(), 3);
    let first: Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert_eq!(first["attributes"]["person"]["name"], "name-1");
    let file = pki.dir.path().join("samples.ndjson");
    std::fs::write(&file, samples.replace("\"exited\"", "\"realized\"")).unwrap();
    let (ok, out) = sallyport_cli(&[
        "template",
        "render",
        "--config",
        cfg,
        "--dataflow",
        "rx",
        "--profiles",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}");
    let requests: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(requests.len(), 1, "{out}");
    let body: Value = serde_json::from_str(requests[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["segment"], SEG);
    assert_eq!(
        body["users"][2],
        json!({"name": "name-3", "email": "user3@example.com"})
    );
    let (ok, out) = sallyport_cli(&["template", "render", "--config", cfg, "--dataflow", "nope"]);
    assert!(!ok && out.contains("no dataflow named 'nope'"), "{out}");
}
