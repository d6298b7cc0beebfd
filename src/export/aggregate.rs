//! Aggregation: which profiles travel in one request, as the Destination SDK's aggregation
//! policies decide it. Pure: no I/O.
//!
//! Each profile becomes one or more entries, each under an aggregation key: with
//! `include_segment_id`, one entry per mapped segment it has a status in (its
//! `segmentMembership` narrowed to that segment; with `include_segment_status`, the status is
//! part of the key); with `include_identity`, one entry per identity group it has identities
//! in (its `identityMap` narrowed to the group; `one_identity_per_group` makes each namespace
//! a group); with `split_user_by_id`, one entry per identity. Entries are then grouped by key —
//! keys in the order they first appear, entries in profile order — and each group is cut into
//! requests of at most `max` entries (docs/design-notes.md, "Aggregation and templates").

use serde_json::{json, Map, Value};

use crate::config::AggregationKey;

/// What the profiles of one request share; `input.aggregationKey` in a template.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct GroupKey {
    pub segment_id: Option<String>,
    pub segment_status: Option<String>,
    pub identity_namespaces: Option<Vec<String>>,
}

impl GroupKey {
    /// As a template reads it: only the parts the policy groups by.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(s) = &self.segment_id {
            m.insert("segmentId".into(), json!(s));
            m.insert("segmentNamespace".into(), json!("ups"));
            m.insert("segmentAlias".into(), json!(s));
        }
        if let Some(s) = &self.segment_status {
            m.insert("segmentStatus".into(), json!(s));
        }
        if let Some(ns) = &self.identity_namespaces {
            m.insert("identityNamespaces".into(), json!(ns));
        }
        Value::Object(m)
    }

    /// A stable text form, for idempotency keys.
    pub fn canonical(&self) -> String {
        self.to_json().to_string()
    }
}

/// The entries one profile makes. `view` is the profile as a template sees it
/// (`attributes`, `identityMap`, `segmentMembership.ups`); `mapped` the dataflow's segments.
pub fn entries(
    view: &Value,
    policy: &AggregationKey,
    split_user_by_id: bool,
    mapped: &[String],
) -> Vec<(GroupKey, Value)> {
    let mut out = vec![(GroupKey::default(), view.clone())];
    if policy.include_segment_id {
        let ups = view["segmentMembership"]["ups"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        out = out
            .into_iter()
            .flat_map(|(key, v)| {
                ups.iter()
                    .filter(|(id, _)| mapped.iter().any(|m| m == *id))
                    .map(|(id, entry)| {
                        let mut v = v.clone();
                        v["segmentMembership"] = json!({ "ups": { id.clone(): entry.clone() } });
                        let mut k = key.clone();
                        k.segment_id = Some(id.clone());
                        if policy.include_segment_status {
                            k.segment_status = entry["status"].as_str().map(str::to_owned);
                        }
                        (k, v)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    if policy.include_identity {
        out = out
            .into_iter()
            .flat_map(|(key, v)| {
                let ids = v["identityMap"].as_object().cloned().unwrap_or_default();
                let groups: Vec<Vec<String>> = if policy.one_identity_per_group {
                    ids.keys().map(|k| vec![k.clone()]).collect()
                } else {
                    policy.groups.clone()
                };
                groups
                    .into_iter()
                    .filter_map(|group| {
                        let narrowed: Map<String, Value> = group
                            .iter()
                            .filter_map(|ns| ids.get(ns).map(|v| (ns.clone(), v.clone())))
                            .filter(|(_, v)| v.as_array().is_some_and(|a| !a.is_empty()))
                            .collect();
                        if narrowed.is_empty() {
                            return None;
                        }
                        let mut v = v.clone();
                        v["identityMap"] = Value::Object(narrowed);
                        let mut k = key.clone();
                        k.identity_namespaces = Some(group);
                        Some((k, v))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    if split_user_by_id {
        out = out
            .into_iter()
            .flat_map(|(key, v)| {
                let ids = v["identityMap"].as_object().cloned().unwrap_or_default();
                let singles: Vec<(String, Value)> = ids
                    .iter()
                    .flat_map(|(ns, list)| {
                        list.as_array()
                            .into_iter()
                            .flatten()
                            .map(move |id| (ns.clone(), id.clone()))
                    })
                    .collect();
                if singles.is_empty() {
                    return vec![(key, v)];
                }
                singles
                    .into_iter()
                    .map(|(ns, id)| {
                        let mut one = v.clone();
                        one["identityMap"] = json!({ ns: [id] });
                        (key.clone(), one)
                    })
                    .collect()
            })
            .collect();
    }
    out
}

/// One planned request: its key and its entries, each with the index of the profile (row) it
/// came from.
#[derive(Debug, Clone)]
pub struct Planned {
    pub key: GroupKey,
    pub members: Vec<(usize, Value)>,
}

/// Group the entries of `profiles` (in order; each with its entries) by key, keys in the order
/// they first appear, and cut each group into requests of at most `max` entries.
pub fn plan(profiles: Vec<Vec<(GroupKey, Value)>>, max: usize) -> Vec<Planned> {
    let max = max.max(1);
    let mut order: Vec<GroupKey> = Vec::new();
    let mut groups: std::collections::HashMap<GroupKey, Vec<(usize, Value)>> = Default::default();
    for (row, list) in profiles.into_iter().enumerate() {
        for (key, v) in list {
            let g = groups.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                Vec::new()
            });
            g.push((row, v));
        }
    }
    let mut out = Vec::new();
    for key in order {
        let Some(members) = groups.remove(&key) else {
            continue;
        };
        let mut members = members.into_iter().peekable();
        while members.peek().is_some() {
            out.push(Planned {
                key: key.clone(),
                members: members.by_ref().take(max).collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(segment: bool, status: bool, identity: bool, groups: &[&[&str]]) -> AggregationKey {
        AggregationKey {
            include_segment_id: segment,
            include_segment_status: status,
            include_identity: identity,
            one_identity_per_group: false,
            groups: groups
                .iter()
                .map(|g| g.iter().map(|s| (*s).to_owned()).collect())
                .collect(),
        }
    }

    #[test]
    fn a_request_holds_at_most_max_entries_in_profile_order() {
        let views: Vec<Vec<(GroupKey, Value)>> = (0..10)
            .map(|i| entries(&json!({"n": i}), &AggregationKey::default(), false, &[]))
            .collect();
        let planned = plan(views, 7);
        let sizes: Vec<usize> = planned.iter().map(|p| p.members.len()).collect();
        assert_eq!(sizes, [7, 3], "10 profiles at 7 per request");
        assert_eq!(planned[1].members[0].1["n"], 7);
    }

    #[test]
    fn split_user_by_id_makes_one_entry_per_identity() {
        let v = json!({"identityMap": {"email": [{"id": "a"}, {"id": "b"}], "phone": [{"id": "1"}]}});
        let e = entries(&v, &AggregationKey::default(), true, &[]);
        let ids: Vec<Value> = e.iter().map(|(_, v)| v["identityMap"].clone()).collect();
        assert_eq!(
            ids,
            [
                json!({"email": [{"id": "a"}]}),
                json!({"email": [{"id": "b"}]}),
                json!({"phone": [{"id": "1"}]})
            ]
        );
        let _ = key(false, false, false, &[]);
    }
}
