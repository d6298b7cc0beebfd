//! Why a profile is exported to a dataflow: the reasons a change raised (the export engine's
//! `trigger::evaluate` decides them), coalesced when one row is triggered twice.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Why a profile is exported (bit set; coalesced triggers OR together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reasons(pub u8);

impl Reasons {
    pub const SEGMENT: Reasons = Reasons(1);
    pub const IDENTITY: Reasons = Reasons(2);
    pub const ATTRIBUTE: Reasons = Reasons(4);
    pub const BACKFILL: Reasons = Reasons(8);

    pub fn contains(self, other: Reasons) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Reasons {
    type Output = Reasons;
    fn bitor(self, rhs: Reasons) -> Reasons {
        Reasons(self.0 | rhs.0)
    }
}

/// A decision to export: why, and which mapped segments' status changes caused it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trigger {
    pub reasons: Reasons,
    pub segments: Vec<String>,
}

impl Trigger {
    /// Coalesce `other` (a later trigger of the same row) into this one: each segment named
    /// once, in the order first seen. Linear in both lists (a row queued for long may have
    /// gathered many segments).
    pub fn absorb(&mut self, other: &Trigger) {
        self.reasons = self.reasons | other.reasons;
        let mut seen: HashSet<String> = HashSet::with_capacity(self.segments.len() + other.segments.len());
        self.segments.retain(|s| seen.insert(s.clone()));
        for s in &other.segments {
            if seen.insert(s.clone()) {
                self.segments.push(s.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorbing_names_each_segment_once_in_first_seen_order() {
        let seg = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut t = Trigger {
            reasons: Reasons::SEGMENT,
            segments: seg(&["a", "b", "a"]),
        };
        t.absorb(&Trigger {
            reasons: Reasons::IDENTITY,
            segments: seg(&["c", "b", "c", "d"]),
        });
        assert_eq!(t.segments, seg(&["a", "b", "c", "d"]));
        assert_eq!(t.reasons, Reasons::SEGMENT | Reasons::IDENTITY);
    }
}
