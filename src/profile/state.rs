//! Merged profile state and what an update changed in it. Pure: no I/O.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::update::{ProfileUpdate, SegmentStatus};

/// A profile's membership in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub status: SegmentStatus,
    /// RFC 3339, as received.
    pub last_qualification_time: String,
}

/// The merged state of one profile.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profile {
    pub id: String,
    pub merge_policy: String,
    pub identity_map: Map<String, Value>,
    pub attributes: Map<String, Value>,
    pub segments: BTreeMap<String, Membership>,
}

/// What one update did to a profile — the input of trigger evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// Every attribute path the update wrote (leaves, deletions included), even with the old
    /// value: the doc counts any write to a mapped attribute as a trigger.
    pub written: Vec<Vec<String>>,
    pub identity_changed: bool,
    /// Segments whose status changed (including from none).
    pub segments_changed: Vec<String>,
}

impl Profile {
    pub fn new(id: &str) -> Self {
        Profile {
            id: id.to_owned(),
            merge_policy: "default".into(),
            ..Default::default()
        }
    }

    /// Apply an update; `now` is used for segment events without a qualification time. The
    /// update's values move into the profile: nothing is copied.
    pub fn apply(&mut self, u: ProfileUpdate, now: &str) -> Change {
        let mut change = Change::default();
        if let Some(m) = u.merge_policy_id {
            self.merge_policy = m;
        }
        if let Some(map) = u.identity_map {
            if map != self.identity_map {
                change.identity_changed = true;
                self.identity_map = map;
            }
        }
        if let Some(attrs) = u.attributes {
            let mut path = Vec::new();
            merge(&mut self.attributes, attrs, &mut path, &mut change.written);
        }
        for ev in u.segments {
            let t = ev.last_qualification_time.unwrap_or_else(|| now.to_owned());
            let old = self.segments.insert(
                ev.id.clone(),
                Membership {
                    status: ev.status,
                    last_qualification_time: t,
                },
            );
            if old.map(|m| m.status) != Some(ev.status) {
                change.segments_changed.push(ev.id);
            }
        }
        change
    }

    /// The attribute at a dotted path, if present and not null.
    pub fn attribute(&self, path: &[String]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut cur = self.attributes.get(first)?;
        for k in rest {
            cur = cur.as_object()?.get(k)?;
        }
        (!cur.is_null()).then_some(cur)
    }

    /// True when the profile belongs (realized or exiting) to any of `segments`.
    pub fn belongs_to_any<'a>(&self, mut segments: impl Iterator<Item = &'a String>) -> bool {
        segments.any(|s| self.segments.get(s).is_some_and(|m| m.status.is_member()))
    }
}

/// Deep-merge `src` into `dst`, recording every leaf path written.
fn merge(
    dst: &mut Map<String, Value>,
    src: Map<String, Value>,
    path: &mut Vec<String>,
    written: &mut Vec<Vec<String>>,
) {
    for (k, v) in src {
        path.push(k.clone());
        match v {
            Value::Null => {
                dst.remove(&k);
                written.push(path.clone());
            }
            Value::Object(sub) if !sub.is_empty() => {
                let slot = dst.entry(k).or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(d) = slot {
                    merge(d, sub, path, written);
                }
            }
            other => {
                dst.insert(k, other);
                written.push(path.clone());
            }
        }
        path.pop();
    }
}

/// Split a dotted path (validated by config: no empty parts).
pub fn split_path(p: &str) -> Vec<String> {
    p.split('.').map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update(v: Value) -> ProfileUpdate {
        serde_json::from_value(v).expect("valid update")
    }

    #[test]
    fn deep_merge_records_leaf_writes_including_same_value_and_deletes() {
        let mut p = Profile::new("p");
        p.apply(
            update(
                json!({"profileId":"p","attributes":{"person":{"name":{"firstName":"J","lastName":"K"}}}}),
            ),
            "t",
        );
        let c = p.apply(
            update(
                json!({"profileId":"p","attributes":{"person":{"name":{"firstName":"J","lastName":null}}}}),
            ),
            "t",
        );
        assert_eq!(
            c.written,
            vec![
                split_path("person.name.firstName"),
                split_path("person.name.lastName")
            ]
        );
        assert_eq!(
            p.attributes,
            json!({"person":{"name":{"firstName":"J"}}})
                .as_object()
                .cloned()
                .unwrap_or_default()
        );
        assert!(!c.identity_changed && c.segments_changed.is_empty());
    }

    #[test]
    fn segment_status_changes_are_detected_only_on_change() {
        let mut p = Profile::new("p");
        let ev = |s: &str| update(json!({"profileId":"p","segments":[{"id":"s1","status":s}]}));
        assert_eq!(p.apply(ev("realized"), "t").segments_changed, vec!["s1"]);
        assert!(p.apply(ev("realized"), "t").segments_changed.is_empty());
        assert_eq!(p.apply(ev("exiting"), "t").segments_changed, vec!["s1"]);
        assert_eq!(p.apply(ev("exited"), "t").segments_changed, vec!["s1"]);
    }
}
