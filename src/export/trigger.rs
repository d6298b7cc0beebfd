//! When a profile is exported to a dataflow — exactly as the HTTP API destination doc says:
//! a mapped segment's status changes; the identity map changes; or any write to a mapped
//! attribute, even with the same value. Writes to unmapped attributes alone do not trigger.
//!
//! Identity and attribute triggers export only profiles that belong (realized or exiting) to
//! at least one mapped segment: a dataflow exports the members of its audiences, and a
//! profile that never qualified is not one of them. A segment status change always exports,
//! including `exited`, which is how a receiver learns a profile left.

use super::spec::DataflowSpec;
use crate::profile::state::{Change, Profile};
pub use crate::profile::trigger::{Reasons, Trigger};

/// Decide whether `change` (already applied to `profile`) exports the profile to `df`.
pub fn evaluate(df: &DataflowSpec, profile: &Profile, change: &Change) -> Option<Trigger> {
    let mut t = Trigger::default();
    for s in &change.segments_changed {
        if df.segments.contains_key(s) {
            t.reasons = t.reasons | Reasons::SEGMENT;
            t.segments.push(s.clone());
        }
    }
    let member = || profile.belongs_to_any(df.segments.keys());
    if change.identity_changed && member() {
        t.reasons = t.reasons | Reasons::IDENTITY;
    }
    let mapped_written = change.written.iter().any(|w| {
        df.attributes
            .iter()
            .any(|a| w.starts_with(&a.source) || a.source.starts_with(w))
    });
    if mapped_written && member() {
        t.reasons = t.reasons | Reasons::ATTRIBUTE;
    }
    (!t.reasons.is_empty()).then_some(t)
}
