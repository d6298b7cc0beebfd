//! Operational events: what an operator must hear about without reading metrics — a dataflow
//! paused or resumed, a delivery parked as a dead letter, a client certificate expiring or
//! rotated. Each is logged, and sent to the `[events]` webhook when one is configured.
//!
//! Emitting never blocks the caller: events wait in a bounded queue for the sender task, and
//! when it is full the event is logged and counted as dropped (the audit log, not the event
//! stream, is the record of deliveries).

use serde::Serialize;

/// The kinds of event, named as the webhook's `type` field carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EventType {
    #[serde(rename = "dataflow.paused")]
    DataflowPaused,
    #[serde(rename = "dataflow.resumed")]
    DataflowResumed,
    #[serde(rename = "delivery.dead_lettered")]
    DeliveryDeadLettered,
    #[serde(rename = "certificate.expiring")]
    CertificateExpiring,
    #[serde(rename = "certificate.rotated")]
    CertificateRotated,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::DataflowPaused => "dataflow.paused",
            EventType::DataflowResumed => "dataflow.resumed",
            EventType::DeliveryDeadLettered => "delivery.dead_lettered",
            EventType::CertificateExpiring => "certificate.expiring",
            EventType::CertificateRotated => "certificate.rotated",
        }
    }
}

/// One event, in the Standard Webhooks payload shape (`type`, `timestamp`, `data`).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Metadata only: names, counts, classes, times — never a payload or a secret.
    pub data: serde_json::Value,
}

/// Where events go. Cheap to clone; the default only logs.
#[derive(Debug, Clone, Default)]
pub struct Events {
    queue: Option<tokio::sync::mpsc::Sender<Event>>,
}

impl Events {
    /// Events that are logged and also queued for a sender reading `queue`.
    pub fn with_queue(queue: tokio::sync::mpsc::Sender<Event>) -> Self {
        Events { queue: Some(queue) }
    }

    /// Log the event and queue it for the webhook, if any.
    pub fn emit(&self, kind: EventType, data: serde_json::Value) {
        tracing::info!(event = kind.as_str(), data = %data, "operational event");
        let Some(queue) = &self.queue else { return };
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        if queue
            .try_send(Event {
                kind,
                timestamp,
                data,
            })
            .is_err()
        {
            tracing::warn!(
                event = kind.as_str(),
                "event queue full or closed; event not sent"
            );
        }
    }
}
