//! One delivery attempt: the payload built from the latest state, the signed request under
//! its idempotency key, the verdict (delivered, retry, dead letter) and the audit record.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use tokio::sync::Notify;

use super::health::{Health, Transition};
use crate::audit::{payload_sha256, AuditRecord, Outcome};
use crate::delivery::retry::{jitter, Verdict};
use crate::delivery::{DeliveryClient, DeliveryError, ErrorKind, OutboundRequest, PeerInfo, Session};
use crate::export::payload;
use crate::export::spec::{Catalog, DataflowSpec};
use crate::store::{now_ms, AttemptError, Completion, OutboxItem};

/// One dataflow's runtime.
pub(super) struct Flow {
    pub(super) spec: DataflowSpec,
    pub(super) client: DeliveryClient,
    pub(super) endpoint: url::Url,
    /// `host:port` of the endpoint, as audit records name it.
    pub(super) destination: String,
    pub(super) counters: crate::metrics::FlowCounters,
    pub(super) wake: Notify,
    pub(super) health: Health,
    /// Aggregation and template, when the dataflow shapes its requests.
    pub(super) shaping: Option<super::shaped::Shaping>,
}

/// Deliver one claimed item (`probe`: as the breaker's probe while paused). Returns what to
/// record, the audit record, and the pause state this attempt changed, if any.
pub(super) async fn deliver(
    flow: &Flow,
    catalog: &Catalog,
    item: OutboxItem,
    session: &Session,
    probe: bool,
) -> (Completion, AuditRecord<'static>, Option<Transition>) {
    let key = idempotency_key(&flow.spec.name, item.id, item.version);
    let attempt = item.attempts + 1;
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        payload::to_vec_with(
            &flow.spec,
            catalog,
            &item.profile,
            &item.segments,
            item.identity_map_json.as_deref(),
        )
    }));
    let (body, sent) = match built {
        Ok(body) => {
            let body = Bytes::from(body);
            let sent = flow.send(Some(session), &key, body.clone(), attempt).await;
            (body, sent)
        }
        Err(panic) => {
            let why = crate::delivery::panic_message(panic.as_ref());
            (
                Bytes::new(),
                Sent::internal(format!("building the payload failed: {why}")),
            )
        }
    };
    let now = now_ms();
    let (transition, paused) = flow.health.observe(sent.result.as_ref().map(|_| ()), probe, now);
    let completion = match &sent.result {
        Ok(()) => Completion::Delivered {
            id: item.id,
            version: item.version,
        },
        Err(error) => {
            tracing::warn!(dataflow = %flow.spec.name, kind = %error.kind(), attempt, "delivery failed");
            let record = attempt_error(attempt, error);
            if paused {
                // Paused: back in line, uncounted; a pause never makes a dead letter.
                return (
                    Completion::Requeue {
                        id: item.id,
                        retry_at: now,
                    },
                    flow.audit_record(&item.profile.id, &key, &body, attempt, Outcome::Retry, &sent),
                    transition,
                );
            }
            match flow.client.retry().decide(attempt, error, jitter()) {
                Verdict::RetryAfter(after) => Completion::Failed {
                    id: item.id,
                    retry_at: now_ms() + after.as_millis() as i64,
                    error: record,
                },
                Verdict::GiveUp => Completion::Dead {
                    id: item.id,
                    version: item.version,
                    idempotency_key: key.clone(),
                    payload: body.to_vec(),
                    error: record,
                },
            }
        }
    };
    let outcome = match completion {
        Completion::Delivered { .. } => Outcome::Delivered,
        Completion::Failed { .. } => Outcome::Retry,
        Completion::Dead { .. } => Outcome::DeadLetter,
        Completion::Requeue { .. } => Outcome::Retry,
        Completion::Parked { .. } | Completion::DeadBatch { .. } => Outcome::DeadLetter,
    };
    let audit = flow.audit_record(&item.profile.id, &key, &body, attempt, outcome, &sent);
    (completion, audit, transition)
}

pub(super) fn attempt_error(attempt: u32, e: &DeliveryError) -> AttemptError {
    AttemptError {
        at: now_ms(),
        attempt,
        kind: e.kind().as_str().to_owned(),
        status: e.status(),
        message: e.to_string(),
    }
}

/// What one attempt came to.
pub(super) struct Sent {
    pub(super) result: Result<(), DeliveryError>,
    status: Option<u16>,
    peer: Option<Arc<PeerInfo>>,
    latency_ms: f64,
    /// The attempt span's trace id, when traces are on.
    trace_id: Option<String>,
}

impl Sent {
    /// An attempt that failed before anything was sent.
    pub(super) fn failed(error: DeliveryError) -> Sent {
        Sent {
            result: Err(error),
            status: None,
            peer: None,
            latency_ms: 0.0,
            trace_id: None,
        }
    }

    /// An attempt that failed inside the gateway, before or while sending.
    fn internal(message: String) -> Sent {
        Sent {
            result: Err(DeliveryError::new(ErrorKind::Internal, message)),
            status: None,
            peer: None,
            latency_ms: 0.0,
            trace_id: None,
        }
    }
}

/// A key that names one delivery of one profile state: the same across retries and
/// replays, different for each new state (the outbox row's version).
pub fn idempotency_key(dataflow: &str, row: i64, version: i64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [dataflow.as_bytes(), &row.to_be_bytes(), &version.to_be_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let d = ctx.finish();
    format!("sp_{}", crate::audit::hex(&d.as_ref()[..16]))
}

impl Flow {
    /// One signed POST of `body` under `key` (over `session`'s connection, else the pool) as
    /// attempt number `attempt`; `Err` for anything but a 2xx.
    pub(super) async fn send(&self, session: Option<&Session>, key: &str, body: Bytes, attempt: u32) -> Sent {
        match crate::delivery::catch_panic(self.send_unguarded(session, key, body, attempt)).await {
            Ok(sent) => sent,
            Err(why) => {
                tracing::error!(dataflow = %self.spec.name, panic = %why, "a delivery attempt failed inside the gateway");
                Sent::internal(format!("the attempt failed inside the gateway: {why}"))
            }
        }
    }

    async fn send_unguarded(&self, session: Option<&Session>, key: &str, body: Bytes, attempt: u32) -> Sent {
        let started = std::time::Instant::now();
        // The attempt's span, when traces are on (checked before anything is built).
        let span = crate::telemetry::HttpSpan::client(
            "sallyport.dataflow",
            &self.spec.name,
            &self.client,
            &Method::POST,
            &self.endpoint,
        );
        let trace_id = span.as_ref().map(|s| s.trace_id().to_owned());
        let req = match self.request(key, body) {
            Ok(r) => r,
            Err(e) => {
                let sent = Sent {
                    result: Err(e),
                    status: None,
                    peer: None,
                    latency_ms: 0.0,
                    trace_id,
                };
                end_span(span, attempt, &sent);
                return sent;
            }
        };
        let sent = match session {
            Some(s) => s.send(&self.client, req).await,
            None => self.client.send(req).await,
        };
        let (result, status, peer) = match sent {
            Ok(d) => (d.error().map_or(Ok(()), Err), Some(d.status.as_u16()), d.peer),
            Err(e) => (Err(e), None, None),
        };
        let sent = Sent {
            result,
            status,
            peer,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            trace_id,
        };
        end_span(span, attempt, &sent);
        sent
    }

    fn request(&self, key: &str, body: Bytes) -> Result<OutboundRequest, DeliveryError> {
        let invalid = |e: http::header::InvalidHeaderValue| {
            DeliveryError::new(ErrorKind::InvalidRequest, e.to_string())
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            match &self.shaping {
                Some(s) => s.content_type.clone(),
                None => HeaderValue::from_static("application/json"),
            },
        );
        let key_value = HeaderValue::from_str(key).map_err(invalid)?;
        headers.insert("idempotency-key", key_value.clone());
        if let Some(signer) = self.client.signer() {
            let ts = now_ms() / 1000;
            headers.insert("webhook-id", key_value);
            headers.insert("webhook-timestamp", HeaderValue::from(ts));
            headers.insert(
                "webhook-signature",
                HeaderValue::from_str(&signer.sign(key, ts, &body)).map_err(invalid)?,
            );
        }
        Ok(OutboundRequest {
            method: Method::POST,
            url: self.endpoint.clone(),
            headers,
            body,
        })
    }

    /// The audit record of one attempt: who, where, what (by hash), how it went.
    pub(super) fn audit_record(
        &self,
        profile_id: &str,
        key: &str,
        body: &[u8],
        attempt: u32,
        outcome: Outcome,
        sent: &Sent,
    ) -> AuditRecord<'static> {
        let (resolved_ip, source_ip, peer_cert_sha256) = PeerInfo::audit_facts(sent.peer.as_deref());
        AuditRecord {
            at: now_ms(),
            dataflow: self.spec.name.clone().into(),
            destination: self.destination.clone().into(),
            resolved_ip: resolved_ip.map(Into::into),
            source_ip: source_ip.map(Into::into),
            profile_id: profile_id.to_owned().into(),
            payload_sha256: payload_sha256(body).into(),
            idempotency_key: key.to_owned().into(),
            attempt,
            outcome,
            error_kind: sent.result.as_ref().err().map(DeliveryError::kind),
            http_status: sent.status,
            latency_ms: sent.latency_ms,
            peer_cert_sha256: peer_cert_sha256.map(Into::into),
            auth: self.client.auth_kind().into(),
            trigger: None,
            trace_id: sent.trace_id.clone().map(Into::into),
        }
    }
}

/// End an attempt's span with what the attempt came to.
fn end_span(span: Option<crate::telemetry::HttpSpan>, attempt: u32, sent: &Sent) {
    if let Some(span) = span {
        span.end(crate::telemetry::HttpOutcome {
            resend_count: attempt.saturating_sub(1),
            status: sent.status,
            peer: sent.peer.as_deref(),
            error: sent.result.as_ref().err().map(DeliveryError::kind),
        });
    }
}
