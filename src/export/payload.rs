//! The JSON object exported for one profile, in the HTTP API destination's shape:
//! mapped attributes at their target paths, `segmentMembership.ups`, and the whole
//! `identityMap`. Pure: no I/O.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::profile::Profile;
use super::spec::{Catalog, DataflowSpec};

/// Build the payload. `triggering` are the mapped segments whose status change caused the
/// export (empty for identity/attribute triggers and backfill of none).
///
/// `segmentMembership.ups` holds every mapped segment the profile has a status for, plus the
/// unmapped segments the profile belongs to that share the merge policy of the mapped
/// segment that triggered the export. When no segment triggered it, the merge policies of
/// the mapped segments the profile belongs to stand in.
pub fn build(df: &DataflowSpec, catalog: &Catalog, profile: &Profile, triggering: &[String]) -> Value {
    let mut out = Map::new();
    for a in &df.attributes {
        if let Some(v) = profile.attribute(&a.source) {
            set_path(&mut out, &a.target, v.clone());
        }
    }

    let policy_sources: Vec<&String> = if triggering.iter().any(|s| df.segments.contains_key(s)) {
        triggering
            .iter()
            .filter(|s| df.segments.contains_key(*s))
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

    let mut ups = Map::new();
    for (id, m) in &profile.segments {
        let mapped = df.segments.get(id);
        let include = mapped.is_some()
            || (m.status.is_member() && policies.contains(catalog.merge_policy(id, &profile.merge_policy)));
        if !include {
            continue;
        }
        let mut entry = Map::new();
        entry.insert("lastQualificationTime".into(), json!(m.last_qualification_time));
        entry.insert("status".into(), json!(m.status.as_str()));
        let info = catalog.segments.get(id);
        if df.include_segment_names && mapped.is_some() {
            if let Some(info) = info {
                entry.insert("name".into(), json!(info.name));
            }
        }
        if df.include_segment_timestamps {
            if let Some(t) = info.and_then(|i| i.created_at) {
                entry.insert("createdAt".into(), json!(t));
            }
            if let Some(t) = info.and_then(|i| i.updated_at) {
                entry.insert("updatedAt".into(), json!(t));
            }
            if let Some(m) = mapped {
                entry.insert("mappingCreatedAt".into(), json!(m.mapping_created_at));
                entry.insert("mappingUpdatedAt".into(), json!(m.mapping_updated_at));
            }
        }
        ups.insert(id.clone(), Value::Object(entry));
    }
    out.insert("segmentMembership".into(), json!({ "ups": ups }));
    out.insert("identityMap".into(), Value::Object(profile.identity_map.clone()));
    Value::Object(out)
}

fn set_path(root: &mut Map<String, Value>, path: &[String], v: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = root;
    for p in parents {
        let slot = cur.entry(p.clone()).or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        cur = next;
    }
    cur.insert(last.clone(), v);
}
