//! The HTTP API destination's export rules, as pure functions: triggers and payloads, with
//! golden files for the doc's worked example.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use sallyport::export::payload;
use sallyport::export::spec::{AttributeMap, Catalog, DataflowSpec, MappedSegment, SegmentInfo};
use sallyport::export::trigger::{evaluate, Reasons};
use sallyport::profile::state::{split_path, Profile};
use sallyport::profile::update::ProfileUpdate;
use serde_json::{json, Value};

const DELOREAN: &str = "seg-delorean-owners";
const BTTF: &str = "seg-watched-back-to-the-future";
const SCIFI: &str = "seg-science-fiction-fans";
const OTHER_POLICY: &str = "seg-other-merge-policy";
const MAPPED_2: &str = "seg-mapped-two";
const MAPPED_3: &str = "seg-mapped-three";

fn catalog() -> Catalog {
    let info = |name: &str, policy: &str, c: i64| SegmentInfo {
        name: name.into(),
        merge_policy: policy.into(),
        created_at: Some(c),
        updated_at: Some(c + 5000),
    };
    let mut c = Catalog::default();
    c.segments.insert(
        DELOREAN.into(),
        info("Customer with DeLorean Cars", "mp-default", 1648553325000),
    );
    c.segments
        .insert(MAPPED_2.into(), info("Mapped two", "mp-default", 1648553325000));
    c.segments
        .insert(MAPPED_3.into(), info("Mapped three", "mp-default", 1648553325000));
    c.segments.insert(
        BTTF.into(),
        info("Watched Back to the Future", "mp-default", 1648553300000),
    );
    c.segments.insert(
        SCIFI.into(),
        info("Science fiction fans", "mp-default", 1648553300000),
    );
    c.segments.insert(
        OTHER_POLICY.into(),
        info("Other merge policy", "mp-other", 1648553300000),
    );
    c
}

fn spec(names: bool, timestamps: bool) -> DataflowSpec {
    let mapped = MappedSegment {
        mapping_created_at: 1649856570000,
        mapping_updated_at: 1649856570000,
    };
    DataflowSpec {
        name: "http-api".into(),
        attributes: vec![
            AttributeMap {
                source: split_path("personalEmail.address"),
                target: split_path("person.email"),
            },
            AttributeMap {
                source: split_path("person.name.firstName"),
                target: split_path("firstName"),
            },
        ],
        segments: [DELOREAN, MAPPED_2, MAPPED_3]
            .iter()
            .map(|s| (s.to_string(), mapped))
            .collect::<BTreeMap<_, _>>(),
        include_segment_names: names,
        include_segment_timestamps: timestamps,
    }
}

fn update(v: Value) -> ProfileUpdate {
    serde_json::from_value(v).unwrap()
}

/// A profile in two unmapped segments of the mapped segment's merge policy and one of
/// another, then qualifying for one of the three mapped segments.
fn worked_example() -> (Profile, sallyport::profile::state::Change) {
    let mut p = Profile::new("p-1");
    p.apply(
        update(json!({
            "profileId": "p-1",
            "identityMap": {
                "ecid": [{"id": "14575006536349286404619648085736425115"}, {"id": "66478888669296734530114754794777368480"}],
                "email_lc_sha256": [{"id": "655332b5fa2aea4498bf7a290cff017cb4"}]
            },
            "attributes": {"personalEmail": {"address": "yourstruly@adobe.con"}, "person": {"name": {"firstName": "Doc", "lastName": "Brown"}}},
            "segments": [
                {"id": BTTF, "status": "realized", "lastQualificationTime": "2022-01-02T23:37:33Z"},
                {"id": SCIFI, "status": "realized", "lastQualificationTime": "2022-01-05T10:00:00Z"},
                {"id": OTHER_POLICY, "status": "realized", "lastQualificationTime": "2022-01-06T10:00:00Z"}
            ]
        })),
        "2022-01-01T00:00:00Z",
    );
    let change = p.apply(
        update(json!({"profileId": "p-1", "segments": [
            {"id": DELOREAN, "status": "realized", "lastQualificationTime": "2022-01-11T21:24:39Z"}
        ]})),
        "2022-01-01T00:00:00Z",
    );
    (p, change)
}

fn golden(name: &str, actual: &Value) {
    let path = format!("tests/golden/{name}.json");
    if std::env::var_os("SALLYPORT_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(actual).unwrap() + "\n").unwrap();
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        actual,
        &want,
        "payload differs from {path}:\n{}",
        serde_json::to_string_pretty(actual).unwrap()
    );
}

#[test]
fn worked_example_exports_exactly_the_doc_segments() {
    let (p, change) = worked_example();
    let df = spec(false, false);
    let t = evaluate(&df, &p, &change).expect("a mapped segment's status changed");
    assert_eq!(t.segments, vec![DELOREAN]);
    let body = payload::build(&df, &catalog(), &p, &t.segments);
    let ups = body["segmentMembership"]["ups"].as_object().unwrap();
    let mut ids: Vec<&str> = ups.keys().map(String::as_str).collect();
    ids.sort();
    // The mapped segment that triggered, plus the two unmapped ones of its merge policy;
    // not the one of another merge policy, not the mapped ones the profile has no status for.
    assert_eq!(ids, vec![DELOREAN, SCIFI, BTTF]);
    golden("worked-example", &body);
}

#[test]
fn segment_names_and_timestamps_when_enabled() {
    let (p, change) = worked_example();
    let df = spec(true, true);
    let t = evaluate(&df, &p, &change).unwrap();
    let body = payload::build(&df, &catalog(), &p, &t.segments);
    let ups = &body["segmentMembership"]["ups"];
    assert_eq!(ups[DELOREAN]["name"], "Customer with DeLorean Cars");
    assert_eq!(ups[DELOREAN]["createdAt"], 1648553325000i64);
    assert_eq!(ups[DELOREAN]["mappingCreatedAt"], 1649856570000i64);
    // Names belong to mapped segments only.
    assert!(ups[BTTF].get("name").is_none());
    golden("worked-example-names-timestamps", &body);
}

#[test]
fn only_mapped_attributes_at_their_target_paths() {
    let (p, change) = worked_example();
    let df = spec(false, false);
    let body = payload::build(&df, &catalog(), &p, &evaluate(&df, &p, &change).unwrap().segments);
    assert_eq!(body["person"], json!({"email": "yourstruly@adobe.con"}));
    assert_eq!(body["firstName"], "Doc");
    assert!(body.get("personalEmail").is_none());
    assert!(
        body.to_string().find("Brown").is_none(),
        "unmapped lastName leaked"
    );
    assert_eq!(body["identityMap"]["ecid"].as_array().unwrap().len(), 2);
}

fn member() -> Profile {
    let mut p = Profile::new("p");
    p.apply(
        update(json!({"profileId":"p","identityMap":{"ecid":[{"id":"1"}]},
            "attributes":{"person":{"name":{"firstName":"J"}},"loyalty":{"points":1}},
            "segments":[{"id": DELOREAN, "status":"realized"}]})),
        "2022-01-01T00:00:00Z",
    );
    p
}

fn trigger_for(p: &mut Profile, v: Value) -> Option<Reasons> {
    let change = p.apply(update(v), "2022-01-02T00:00:00Z");
    evaluate(&spec(false, false), p, &change).map(|t| t.reasons)
}

#[test]
fn trigger_mapped_segment_null_to_realized() {
    let mut p = Profile::new("p");
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","segments":[{"id": MAPPED_2, "status":"realized"}]}),
    );
    assert_eq!(r, Some(Reasons::SEGMENT));
}

#[test]
fn trigger_mapped_segment_realized_to_exiting_to_exited() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","segments":[{"id": DELOREAN, "status":"exiting"}]}),
    );
    assert_eq!(r, Some(Reasons::SEGMENT));
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","segments":[{"id": DELOREAN, "status":"exited"}]}),
    );
    assert_eq!(
        r,
        Some(Reasons::SEGMENT),
        "exited is exported so the receiver learns of it"
    );
}

#[test]
fn no_trigger_when_a_mapped_segment_status_repeats() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","segments":[{"id": DELOREAN, "status":"realized"}]}),
    );
    assert_eq!(r, None);
}

#[test]
fn no_trigger_for_an_unmapped_segment_change() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","segments":[{"id": BTTF, "status":"realized"}]}),
    );
    assert_eq!(r, None);
}

#[test]
fn trigger_identity_map_change() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","identityMap":{"ecid":[{"id":"1"},{"id":"2"}]}}),
    );
    assert_eq!(r, Some(Reasons::IDENTITY));
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","identityMap":{"ecid":[{"id":"1"},{"id":"2"}]}}),
    );
    assert_eq!(r, None, "the same identity map is not a change");
}

#[test]
fn trigger_mapped_attribute_write() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","attributes":{"person":{"name":{"firstName":"Jo"}}}}),
    );
    assert_eq!(r, Some(Reasons::ATTRIBUTE));
}

#[test]
fn trigger_mapped_attribute_overwritten_with_the_same_value() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","attributes":{"person":{"name":{"firstName":"J"}}}}),
    );
    assert_eq!(r, Some(Reasons::ATTRIBUTE));
}

#[test]
fn trigger_mapped_attribute_deleted_through_its_parent() {
    let mut p = member();
    let r = trigger_for(&mut p, json!({"profileId":"p","attributes":{"person":null}}));
    assert_eq!(r, Some(Reasons::ATTRIBUTE));
}

#[test]
fn no_trigger_for_an_unmapped_attribute_write() {
    let mut p = member();
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","attributes":{"loyalty":{"points":2},"person":{"name":{"lastName":"X"}}}}),
    );
    assert_eq!(r, None);
}

#[test]
fn no_trigger_for_profiles_outside_every_mapped_segment() {
    let mut p = Profile::new("p");
    let r = trigger_for(
        &mut p,
        json!({"profileId":"p","attributes":{"person":{"name":{"firstName":"J"}}},"identityMap":{"ecid":[{"id":"9"}]}}),
    );
    assert_eq!(r, None);
}
