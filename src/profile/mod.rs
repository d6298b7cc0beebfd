//! The profile model the export engine and the stores share: updates as they arrive
//! ([`update`], NDJSON), merged state and what a change touched ([`state`]), why a profile is
//! exported ([`trigger`]), and a batch planned in memory before it is written ([`batch`]).
//! Pure code, no I/O.

pub mod batch;
pub mod state;
pub mod trigger;
pub mod update;

/// A mapped segment with the times its mapping was made and last changed (UNIX ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MappedSegment {
    pub mapping_created_at: i64,
    pub mapping_updated_at: i64,
}
