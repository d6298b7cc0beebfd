//! The export engine: profile updates in, one JSON object per changed profile out to every
//! dataflow, as Adobe Experience Platform's HTTP API destination does.
//!
//! Pure parts (no I/O, golden-tested): [`trigger`] (when to export), [`payload`] (what to
//! export), [`spec`] (dataflow and catalog views), over the profile model of
//! [`crate::profile`]. [`engine`] joins them to the store and the delivery core.
//!
//! Must never: export an unmapped attribute, drop an accepted update, or deliver a profile's
//! changes out of order.

pub mod aggregate;
pub mod engine;
pub mod payload;
pub mod spec;
pub mod template;
pub mod trigger;

pub use engine::{DeliveryStats, Engine, IngestReport};
