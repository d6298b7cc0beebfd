//! A batch of profile updates planned in memory before a store writes it: each update applied
//! in order to its profile's latest state, and the deliveries they trigger coalesced (one row
//! per dataflow and profile, whatever number of updates touched it).

use std::collections::HashMap;

use super::state::Profile;
use super::trigger::Trigger;
use super::update::ProfileUpdate;

/// The deliveries one update triggers: (dataflow, why).
pub type Enqueues = Vec<(String, Trigger)>;

/// A batch of updates merged in memory, ready to write: each touched profile once (with the
/// segments whose membership it must write), and each (dataflow, profile) to enqueue once.
pub(crate) struct PlannedBatch {
    pub profiles: Vec<(Profile, Vec<String>)>,
    pub enqueues: Vec<((String, String), Trigger)>,
}

/// Apply `updates` in order to the profiles `load` returns (a fresh one when it returns
/// `None`), coalescing the deliveries they trigger. Both stores write the result.
pub(crate) fn plan_batch(
    updates: Vec<ProfileUpdate>,
    load: &mut dyn FnMut(&str) -> Option<Profile>,
    apply: &mut dyn FnMut(&mut Profile, ProfileUpdate) -> Enqueues,
) -> PlannedBatch {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut profiles: Vec<(Profile, Vec<String>)> = Vec::new();
    let mut queued: HashMap<(String, String), usize> = HashMap::new();
    let mut enqueues: Vec<((String, String), Trigger)> = Vec::new();
    for u in updates {
        let i = match index.get(&u.profile_id) {
            Some(i) => *i,
            None => {
                let p = load(&u.profile_id).unwrap_or_else(|| Profile::new(&u.profile_id));
                profiles.push((p, Vec::new()));
                index.insert(u.profile_id.clone(), profiles.len() - 1);
                profiles.len() - 1
            }
        };
        let (p, touched) = &mut profiles[i];
        for s in &u.segments {
            if !touched.contains(&s.id) {
                touched.push(s.id.clone());
            }
        }
        let profile_id = u.profile_id.clone();
        for (df, t) in apply(p, u) {
            let key = (df, profile_id.clone());
            match queued.get(&key) {
                Some(j) => enqueues[*j].1.absorb(&t),
                None => {
                    queued.insert(key.clone(), enqueues.len());
                    enqueues.push((key, t));
                }
            }
        }
    }
    PlannedBatch { profiles, enqueues }
}
