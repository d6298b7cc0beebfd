//! The JSON object exported for one profile, in the HTTP API destination's shape:
//! mapped attributes at their target paths, `segmentMembership.ups`, and the whole
//! `identityMap`. Pure: no I/O.
//!
//! The payload is a view that borrows from the profile and serializes straight to bytes (no
//! intermediate `serde_json::Value` tree, no copy of the identity map). Keys come out sorted
//! at every level, as a `serde_json::Value` would write them.

use std::collections::{BTreeMap, BTreeSet};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::spec::{Catalog, DataflowSpec};
use crate::profile::state::Profile;

/// One profile's payload for one dataflow, ready to serialize.
#[derive(Debug)]
pub struct Payload<'a> {
    root: BTreeMap<&'a str, Node<'a>>,
}

#[derive(Debug)]
enum Node<'a> {
    Value(&'a Value),
    Object(BTreeMap<&'a str, Node<'a>>),
    Ups(BTreeMap<&'a str, UpsEntry<'a>>),
    Identities(&'a serde_json::Map<String, Value>),
    /// An identity map already serialized as canonical JSON (sorted keys).
    Raw(&'a serde_json::value::RawValue),
}

/// One `segmentMembership.ups` entry; fields in sorted key order.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct UpsEntry<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<i64>,
    last_qualification_time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mapping_created_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mapping_updated_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<i64>,
}

/// Build the payload. `triggering` are the mapped segments whose status change caused the
/// export (empty for identity/attribute triggers and backfill of none).
///
/// `segmentMembership.ups` holds every mapped segment the profile has a status for, plus the
/// unmapped segments the profile belongs to that share the merge policy of the mapped
/// segment that triggered the export. When no segment triggered it, the merge policies of
/// the mapped segments the profile belongs to stand in.
pub fn view<'a>(
    df: &'a DataflowSpec,
    catalog: &'a Catalog,
    profile: &'a Profile,
    triggering: &[String],
) -> Payload<'a> {
    view_with(df, catalog, profile, triggering, None)
}

/// [`view`], with the identity map given as stored JSON instead of `profile.identity_map`.
fn view_with<'a>(
    df: &'a DataflowSpec,
    catalog: &'a Catalog,
    profile: &'a Profile,
    triggering: &[String],
    identity_map_json: Option<&'a serde_json::value::RawValue>,
) -> Payload<'a> {
    let mut root = BTreeMap::new();
    for a in &df.attributes {
        if let Some(v) = profile.attribute(&a.source) {
            set_path(&mut root, &a.target, v);
        }
    }

    let policy_sources: Vec<&String> = if triggering.iter().any(|s| df.segments.contains_key(s)) {
        triggering
            .iter()
            .filter_map(|s| df.segments.get_key_value(s).map(|(k, _)| k))
            .collect()
    } else {
        df.segments
            .keys()
            .filter(|s| profile.segments.get(*s).is_some_and(|m| m.status.is_member()))
            .collect()
    };
    let policies: BTreeSet<&str> = policy_sources
        .into_iter()
        .map(|s| catalog.merge_policy(s, &profile.merge_policy))
        .collect();

    let mut ups = BTreeMap::new();
    for (id, m) in &profile.segments {
        let mapped = df.segments.get(id);
        let include = mapped.is_some()
            || (m.status.is_member() && policies.contains(catalog.merge_policy(id, &profile.merge_policy)));
        if !include {
            continue;
        }
        let info = catalog.segments.get(id);
        let stamps = df.include_segment_timestamps;
        ups.insert(
            id.as_str(),
            UpsEntry {
                created_at: info.and_then(|i| i.created_at).filter(|_| stamps),
                last_qualification_time: &m.last_qualification_time,
                mapping_created_at: mapped.map(|m| m.mapping_created_at).filter(|_| stamps),
                mapping_updated_at: mapped.map(|m| m.mapping_updated_at).filter(|_| stamps),
                name: info
                    .map(|i| i.name.as_str())
                    .filter(|_| df.include_segment_names && mapped.is_some()),
                status: m.status.as_str(),
                updated_at: info.and_then(|i| i.updated_at).filter(|_| stamps),
            },
        );
    }
    let mut membership = BTreeMap::new();
    membership.insert("ups", Node::Ups(ups));
    root.insert("segmentMembership", Node::Object(membership));
    let identities = match identity_map_json {
        Some(raw) => Node::Raw(raw),
        None => Node::Identities(&profile.identity_map),
    };
    root.insert("identityMap", identities);
    Payload { root }
}

/// The payload as a JSON value.
pub fn build(df: &DataflowSpec, catalog: &Catalog, profile: &Profile, triggering: &[String]) -> Value {
    serde_json::to_value(view(df, catalog, profile, triggering)).unwrap_or(Value::Null)
}

/// The payload as the bytes sent.
pub fn to_vec(df: &DataflowSpec, catalog: &Catalog, profile: &Profile, triggering: &[String]) -> Vec<u8> {
    to_vec_with(df, catalog, profile, triggering, None)
}

/// [`to_vec`], with the identity map as stored JSON (see `OutboxItem::identity_map_json`).
pub fn to_vec_with(
    df: &DataflowSpec,
    catalog: &Catalog,
    profile: &Profile,
    triggering: &[String],
    identity_map_json: Option<&serde_json::value::RawValue>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    // Writing to a Vec fails only if a map key is not a string, which cannot happen here.
    let _ = serde_json::to_writer(
        &mut out,
        &view_with(df, catalog, profile, triggering, identity_map_json),
    );
    out
}

/// Place `v` at `path`; a later path through an earlier leaf replaces it, and the other way
/// round (mapping order decides, as config order does).
fn set_path<'a>(root: &mut BTreeMap<&'a str, Node<'a>>, path: &'a [String], v: &'a Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = root;
    for p in parents {
        let slot = cur
            .entry(p.as_str())
            .or_insert_with(|| Node::Object(BTreeMap::new()));
        if !matches!(slot, Node::Object(_)) {
            *slot = Node::Object(BTreeMap::new());
        }
        let Node::Object(next) = slot else { return };
        cur = next;
    }
    cur.insert(last.as_str(), Node::Value(v));
}

impl Serialize for Payload<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.root.serialize(s)
    }
}

impl Serialize for Node<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Value(v) => v.serialize(s),
            Node::Object(m) => m.serialize(s),
            Node::Ups(m) => m.serialize(s),
            Node::Raw(r) => r.serialize(s),
            Node::Identities(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m.iter() {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::spec::{AttributeMap, MappedSegment, SegmentInfo};
    use crate::profile::state::Membership;
    use crate::profile::update::SegmentStatus;
    use serde_json::json;

    #[test]
    fn the_bytes_sent_are_the_sorted_key_json_of_the_value() {
        let mut p = Profile::new("p");
        p.attributes = json!({"person": {"name": {"firstName": "J", "z": 1}, "email": "e"}})
            .as_object()
            .cloned()
            .unwrap_or_default();
        p.identity_map = json!({"zz": [{"id": "1"}], "ecid": [{"id": "2", "primary": true}]})
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (id, st) in [("s2", SegmentStatus::Realized), ("s1", SegmentStatus::Exiting)] {
            p.segments.insert(
                id.into(),
                Membership {
                    status: st,
                    last_qualification_time: "t".into(),
                },
            );
        }
        let df = DataflowSpec {
            name: "df".into(),
            attributes: [("person.name.firstName", "b.first"), ("person.email", "a")]
                .iter()
                .map(|(s, t)| AttributeMap {
                    source: s.split('.').map(str::to_owned).collect(),
                    target: t.split('.').map(str::to_owned).collect(),
                })
                .collect(),
            segments: [("s1".to_owned(), MappedSegment::default())].into(),
            include_segment_names: true,
            include_segment_timestamps: true,
        };
        let mut catalog = Catalog::default();
        catalog.segments.insert(
            "s1".into(),
            SegmentInfo {
                name: "One".into(),
                merge_policy: "default".into(),
                created_at: Some(5),
                updated_at: None,
            },
        );
        let bytes = to_vec(&df, &catalog, &p, &["s1".to_owned()]);
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            serde_json::to_string(&value).unwrap_or_default()
        );
        assert_eq!(value["b"]["first"], "J");
        assert_eq!(value["a"], "e");
        assert_eq!(value["segmentMembership"]["ups"]["s1"]["name"], "One");
        assert_eq!(value["segmentMembership"]["ups"]["s1"]["createdAt"], 5);
        assert!(value["segmentMembership"]["ups"]["s1"].get("updatedAt").is_none());
        assert_eq!(value["segmentMembership"]["ups"]["s2"]["status"], "realized");
        assert_eq!(value["identityMap"]["ecid"][0]["primary"], true);
    }
}
