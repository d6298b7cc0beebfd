//! A batch of profile updates planned in memory before a store writes it: each update applied
//! in order to its profile's latest state, and the deliveries they trigger coalesced (one row
//! per dataflow and profile, whatever number of updates touched it).

use std::collections::{HashMap, HashSet};

use super::state::Profile;
use super::trigger::Trigger;
use super::update::ProfileUpdate;

/// The deliveries one update triggers: (dataflow, why).
pub type Enqueues = Vec<(String, Trigger)>;

/// A batch of updates merged in memory, ready to write: each touched profile once (with the
/// segments whose membership it must write, each once, in the order first seen), and each
/// (dataflow, profile) to enqueue once (its trigger naming each segment once).
pub(crate) struct PlannedBatch {
    pub profiles: Vec<(Profile, Vec<String>)>,
    pub enqueues: Vec<((String, String), Trigger)>,
}

/// Apply `updates` in order to the profiles `load` returns (a fresh one when it returns
/// `None`), coalescing the deliveries they trigger. Both stores write the result.
///
/// Runs under the store's writer, so its cost is linear in the batch's events: membership is
/// tested in sets, never by scanning what was collected so far (one profile may be named by
/// thousands of updates carrying thousands of segments each).
pub(crate) fn plan_batch(
    updates: Vec<ProfileUpdate>,
    load: &mut dyn FnMut(&str) -> Option<Profile>,
    apply: &mut dyn FnMut(&mut Profile, ProfileUpdate) -> Enqueues,
) -> PlannedBatch {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut profiles: Vec<(Profile, Vec<String>)> = Vec::new();
    // Beside `profiles`: the segments each has in its list.
    let mut touched_sets: Vec<HashSet<String>> = Vec::new();
    let mut queued: HashMap<(String, String), usize> = HashMap::new();
    let mut enqueues: Vec<((String, String), Trigger)> = Vec::new();
    // Beside `enqueues`: the segments each trigger names.
    let mut trigger_sets: Vec<HashSet<String>> = Vec::new();
    for u in updates {
        let i = match index.get(&u.profile_id) {
            Some(i) => *i,
            None => {
                let p = load(&u.profile_id).unwrap_or_else(|| Profile::new(&u.profile_id));
                profiles.push((p, Vec::new()));
                touched_sets.push(HashSet::new());
                index.insert(u.profile_id.clone(), profiles.len() - 1);
                profiles.len() - 1
            }
        };
        let (p, touched) = &mut profiles[i];
        let seen = &mut touched_sets[i];
        for s in &u.segments {
            if !seen.contains(&s.id) {
                seen.insert(s.id.clone());
                touched.push(s.id.clone());
            }
        }
        let profile_id = u.profile_id.clone();
        for (df, t) in apply(p, u) {
            let key = (df, profile_id.clone());
            let j = match queued.get(&key) {
                Some(j) => *j,
                None => {
                    queued.insert(key.clone(), enqueues.len());
                    enqueues.push((key, Trigger::default()));
                    trigger_sets.push(HashSet::new());
                    enqueues.len() - 1
                }
            };
            let row = &mut enqueues[j].1;
            row.reasons = row.reasons | t.reasons;
            for s in t.segments {
                if trigger_sets[j].insert(s.clone()) {
                    row.segments.push(s);
                }
            }
        }
    }
    PlannedBatch { profiles, enqueues }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::trigger::Reasons;
    use serde_json::json;

    fn update(profile: &str, segments: &[(&str, &str)]) -> ProfileUpdate {
        let segs: Vec<_> = segments
            .iter()
            .map(|(id, status)| json!({"id": id, "status": status}))
            .collect();
        serde_json::from_value(json!({"profileId": profile, "segments": segs})).expect("valid update")
    }

    /// What the export engine's trigger evaluation does for a dataflow mapping every segment.
    fn apply(p: &mut Profile, u: ProfileUpdate) -> Enqueues {
        let change = p.apply(u, "2026-01-01T00:00:00Z");
        if change.segments_changed.is_empty() {
            return Vec::new();
        }
        vec![(
            "d".to_owned(),
            Trigger {
                reasons: Reasons::SEGMENT,
                segments: change.segments_changed,
            },
        )]
    }

    #[test]
    fn one_profile_named_by_many_updates_is_planned_once_with_each_segment_once() {
        // 40 updates of one profile, 500 segment events each, overlapping by half: 10,500
        // distinct segments, every one seen more than once, some twice in one update.
        let mut updates = Vec::new();
        for n in 0..40 {
            let ids: Vec<String> = (n * 250..n * 250 + 500).map(|i| format!("s{i}")).collect();
            let mut events: Vec<(&str, &str)> = ids.iter().map(|s| (s.as_str(), "realized")).collect();
            events.push((ids[0].as_str(), "exited"));
            updates.push(update("p", &events));
        }
        updates.push(update("q", &[("s1", "realized"), ("s1", "exiting")]));
        let planned = plan_batch(updates, &mut |_| None, &mut apply);

        let ids: Vec<&str> = planned.profiles.iter().map(|(p, _)| p.id.as_str()).collect();
        assert_eq!(ids, ["p", "q"]);
        let expected: Vec<String> = (0..40 * 250 + 250).map(|i| format!("s{i}")).collect();
        let (p, touched) = &planned.profiles[0];
        assert_eq!(touched, &expected, "each segment once, in the order first seen");
        assert_eq!(p.segments.len(), expected.len());
        // The last event for s250 (first of update 1) was its `exited`.
        assert_eq!(
            p.segments["s250"].status,
            crate::profile::update::SegmentStatus::Exited
        );
        assert_eq!(
            p.segments["s251"].status,
            crate::profile::update::SegmentStatus::Realized
        );

        let keys: Vec<(&str, &str)> = planned
            .enqueues
            .iter()
            .map(|((d, p), _)| (d.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            keys,
            [("d", "p"), ("d", "q")],
            "one delivery per dataflow and profile"
        );
        assert_eq!(planned.enqueues[0].1.segments, expected);
        assert_eq!(planned.enqueues[0].1.reasons, Reasons::SEGMENT);
        // One update naming a segment twice triggers it once.
        assert_eq!(planned.enqueues[1].1.segments, ["s1"]);
    }
}
