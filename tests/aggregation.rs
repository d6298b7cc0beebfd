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
