//! Operational events: what an operator must hear about without reading metrics — a dataflow
//! paused or resumed, a delivery parked as a dead letter, a client certificate expiring or
//! rotated. Each is logged, and sent to the `[events]` webhook when one is configured.
//!
//! Emitting never blocks the caller: events wait in a bounded queue for the sender task, and
//! when it is full the event is logged and not sent (the audit log, not the event stream, is
//! the record of deliveries).
//!
//! The sender POSTs each event as JSON through the delivery core (so the webhook presents the
//! identity in force and passes the egress policy like every destination), signed with
//! Standard Webhooks headers: `webhook-id` (`evt_` and 32 random hex digits, the same across
//! the attempts for one event), `webhook-timestamp` and `webhook-signature`, fresh per
//! attempt. A failed attempt is tried again with backoff, up to `[events] max_attempts`.
//!
//! Event data is metadata only (names, counts, classes, times, fingerprints): never a payload,
//! a profile or a secret.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde::Serialize;

use crate::config::Config;
use crate::delivery::retry::{jitter, Verdict};
use crate::delivery::{Core, DeliveryClient, DeliveryError, ErrorKind, OutboundRequest};
use crate::tls::creds::{Identities, Rotation};

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
    /// The events of a validated config: with `[events]`, a sender task (spawned here, on the
    /// current runtime) POSTs each one to the webhook, a client of `core`; without, events
    /// are only logged and there is no task.
    pub fn from_config(
        cfg: &Config,
        core: &Core,
    ) -> Result<(Events, Option<tokio::task::JoinHandle<()>>), String> {
        let (Some(events), Some(dest)) = (&cfg.events, cfg.events_destination()) else {
            return Ok((Events::default(), None));
        };
        let dest = dest?;
        let url = dest.endpoint.clone().ok_or("events: no webhook URL")?;
        let client = core.destination(&dest)?;
        if client.signer().is_none() {
            return Err("events: a signing secret is required".into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(events.queue.max(1));
        let task = tokio::spawn(send_all(rx, client, url));
        Ok((Events::with_queue(tx), Some(task)))
    }

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

/// Send each queued event, in order, until every [`Events`] holding the queue is dropped.
async fn send_all(mut rx: tokio::sync::mpsc::Receiver<Event>, client: DeliveryClient, url: url::Url) {
    while let Some(event) = rx.recv().await {
        send_one(&client, &url, &event).await;
    }
}

/// POST one event, retrying by the destination's policy; failures are logged (type, id,
/// error kind and status: never the body or the secret).
async fn send_one(client: &DeliveryClient, url: &url::Url, event: &Event) {
    let body = match serde_json::to_vec(event) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            tracing::error!(event = event.kind.as_str(), error = %e, "an event could not be serialised");
            return;
        }
    };
    let id = event_id();
    let mut attempt = 1;
    loop {
        let result = match request(client, url, &id, body.clone()) {
            Ok(req) => client.send(req).await.and_then(|d| d.error().map_or(Ok(()), Err)),
            Err(e) => Err(e),
        };
        let Err(error) = result else {
            tracing::debug!(event = event.kind.as_str(), id = %id, attempt, "event sent");
            return;
        };
        match client.retry().decide(attempt, &error, jitter()) {
            Verdict::RetryAfter(after) => {
                // A long Retry-After would hold up every event behind this one.
                let after = after.min(client.retry().cap);
                tracing::info!(event = event.kind.as_str(), id = %id, attempt, kind = %error.kind(),
                    status = ?error.status(), retry_in_ms = after.as_millis() as u64,
                    "the events webhook did not take an event; trying again");
                tokio::time::sleep(after).await;
                attempt += 1;
            }
            Verdict::GiveUp => {
                tracing::warn!(event = event.kind.as_str(), id = %id, attempt, kind = %error.kind(),
                    status = ?error.status(), "the events webhook did not take an event; giving it up");
                return;
            }
        }
    }
}

/// One signed POST of `body` (a fresh timestamp and signature per attempt, one id per event).
fn request(
    client: &DeliveryClient,
    url: &url::Url,
    id: &str,
    body: Bytes,
) -> Result<OutboundRequest, DeliveryError> {
    let invalid =
        |e: http::header::InvalidHeaderValue| DeliveryError::new(ErrorKind::InvalidRequest, e.to_string());
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(signer) = client.signer() {
        let ts = crate::store::now_ms() / 1000;
        headers.insert("webhook-id", HeaderValue::from_str(id).map_err(invalid)?);
        headers.insert("webhook-timestamp", HeaderValue::from(ts));
        headers.insert(
            "webhook-signature",
            HeaderValue::from_str(&signer.sign(id, ts, &body)).map_err(invalid)?,
        );
    }
    Ok(OutboundRequest {
        method: Method::POST,
        url: url.clone(),
        headers,
        body,
    })
}

/// `evt_` and 128 random bits in hex: unique per event.
fn event_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No system randomness: still unique within the process.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&crate::store::now_ms().to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
    }
    format!("evt_{}", crate::audit::hex(&bytes))
}

/// The `certificate.expiring` thresholds in days: `[events] cert_expiry_days`, else the
/// default (the events are then logged only).
pub fn cert_expiry_days(cfg: &Config) -> Vec<i64> {
    cfg.events
        .as_ref()
        .map_or_else(crate::config::default_event_cert_days, |e| {
            e.cert_expiry_days.clone()
        })
}

/// How often the presented certificates are checked against `cert_expiry_days` by `serve`
/// and `sidecar`.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

impl Events {
    /// Certificate events for every identity of `identities`: `certificate.rotated` whenever
    /// the registry swaps in a new presented certificate (its watcher reloads renewed files),
    /// and `certificate.expiring` when a presented certificate is within one of
    /// `thresholds` days of expiry — checked now and then every `every`, sent once per
    /// certificate and threshold (the tightest one reached). The returned task runs the
    /// expiry checks until aborted.
    pub fn watch_certificates(
        &self,
        identities: &Arc<Identities>,
        thresholds: Vec<i64>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let events = self.clone();
        identities.on_rotation(Arc::new(move |name: &str, r: &Rotation| {
            events.emit(EventType::CertificateRotated, rotated_data(name, r));
        }));
        let (events, identities) = (self.clone(), identities.clone());
        tokio::spawn(async move {
            let mut sent = HashSet::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                events.check_expiry(&identities, &thresholds, &mut sent);
            }
        })
    }

    /// One expiry check; `sent` holds (fingerprint, threshold) pairs already announced.
    fn check_expiry(&self, identities: &Identities, thresholds: &[i64], sent: &mut HashSet<(String, i64)>) {
        let now = time::OffsetDateTime::now_utc();
        for (name, store) in identities.iter() {
            if store.spiffe_source().is_some() {
                // SVIDs live hours and the agent renews them; a feed that stops renewing is
                // logged as an error by the feed itself.
                continue;
            }
            let facts = store.presented().facts;
            let left = facts.not_after - now;
            let Some(threshold) = thresholds
                .iter()
                .copied()
                .filter(|t| left < time::Duration::days(*t))
                .min()
            else {
                continue;
            };
            if sent.insert((facts.sha256_fingerprint.clone(), threshold)) {
                self.emit(
                    EventType::CertificateExpiring,
                    serde_json::json!({
                        "identity": name,
                        "subject": facts.display_name(),
                        "fingerprint": facts.sha256_fingerprint,
                        "notAfter": rfc3339(facts.not_after),
                        "daysLeft": left.whole_days(),
                        "thresholdDays": threshold,
                    }),
                );
            }
        }
    }
}

fn rotated_data(name: &str, r: &Rotation) -> serde_json::Value {
    serde_json::json!({
        "identity": name,
        "subject": r.new.display_name(),
        "oldFingerprint": r.old_fingerprint,
        "newFingerprint": r.new.sha256_fingerprint,
        "notAfter": rfc3339(r.new.not_after),
    })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
