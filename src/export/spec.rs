//! What the engine needs to know about a dataflow and the segment catalog, derived from
//! config (and from the store for mapping times).

use std::collections::{BTreeMap, HashMap};

use crate::config::{Config, Dataflow};
use crate::profile::state::split_path;
use crate::profile::update::rfc3339_to_unix_ms;
pub use crate::profile::MappedSegment;

/// One segment in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub name: String,
    pub merge_policy: String,
    /// UNIX ms.
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
}

/// The segment catalog.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub segments: HashMap<String, SegmentInfo>,
}

impl Catalog {
    pub fn from_config(cfg: &Config) -> Self {
        Catalog {
            segments: cfg
                .segments
                .iter()
                .map(|s| {
                    (
                        s.id.clone(),
                        SegmentInfo {
                            name: s.name.clone(),
                            merge_policy: s.merge_policy.clone(),
                            created_at: s.created_at.as_deref().and_then(rfc3339_to_unix_ms),
                            updated_at: s.updated_at.as_deref().and_then(rfc3339_to_unix_ms),
                        },
                    )
                })
                .collect(),
        }
    }

    /// A segment's merge policy: the catalog's, else the profile's own.
    pub fn merge_policy<'a>(&'a self, segment: &str, profile_policy: &'a str) -> &'a str {
        self.segments
            .get(segment)
            .map_or(profile_policy, |s| s.merge_policy.as_str())
    }
}

/// A mapped attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeMap {
    pub source: Vec<String>,
    pub target: Vec<String>,
}

/// A dataflow as the trigger evaluator and payload builder see it.
#[derive(Debug, Clone)]
pub struct DataflowSpec {
    pub name: String,
    pub attributes: Vec<AttributeMap>,
    pub segments: BTreeMap<String, MappedSegment>,
    pub include_segment_names: bool,
    pub include_segment_timestamps: bool,
}

impl DataflowSpec {
    /// From config; mapping times come from the store (see `Store::sync_mappings`).
    pub fn from_config(df: &Dataflow, mapping_times: &HashMap<String, MappedSegment>) -> Self {
        DataflowSpec {
            name: df.name.clone(),
            attributes: df
                .attributes
                .iter()
                .map(|a| AttributeMap {
                    source: split_path(&a.source),
                    target: split_path(&a.target),
                })
                .collect(),
            segments: df
                .segments
                .iter()
                .map(|s| (s.clone(), mapping_times.get(s).copied().unwrap_or_default()))
                .collect(),
            include_segment_names: df.include_segment_names,
            include_segment_timestamps: df.include_segment_timestamps,
        }
    }
}
