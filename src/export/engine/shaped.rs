//! Requests shaped by an aggregation policy or a message template: the claimed rows of a
//! round become entries, the entries are grouped into requests (`export::aggregate`), each
//! request's body is rendered (`export::template`, or the payloads as a JSON array), sent
//! under a key derived from its members, and each row completes when every request that
//! carried it has (docs/design-notes.md, "Aggregation and templates").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use serde_json::Value;

use super::attempt::{attempt_error, Flow, Sent};
use super::health::Transition;
use super::worker::Done;
use super::Inner;
use crate::audit::{AuditRecord, Outcome};
use crate::config::{Aggregation, AggregationKey, Dataflow};
use crate::delivery::retry::{jitter, Verdict};
use crate::delivery::{DeliveryError, ErrorKind, Session};
use crate::export::aggregate::{entries, plan, GroupKey};
use crate::export::template::{context, payload_of_view, profile_view, Template};
use crate::store::{now_ms, AttemptError, Completion, OutboxItem};

/// How a dataflow shapes its requests (absent: one profile per request, the payload as is).
pub(super) struct Shaping {
    policy: AggregationKey,
    split_user_by_id: bool,
    /// Entries per request, at most.
    pub(super) max: usize,
    /// Configurable aggregation: (how long a batch may wait, how many entries fill one).
    pub(super) configurable: Option<(Duration, usize)>,
    template: Option<Template>,
    pub(super) content_type: HeaderValue,
    mapped: Vec<String>,
    names: Vec<(String, String)>,
}

impl Shaping {
    /// The dataflow's shaping, its template compiled (`source`: the template's name in errors
    /// and its text); `None` when it sends one payload per request.
    pub(super) fn new(
        df: &Dataflow,
        template: Option<(String, String)>,
        names: Vec<(String, String)>,
    ) -> Result<Option<Shaping>, String> {
        let content_type = df.content_type.as_deref().unwrap_or("application/json");
        let json = crate::config::is_json_content_type(content_type);
        let content_type = HeaderValue::from_str(content_type).map_err(|e| format!("content_type: {e}"))?;
        let (policy, split_user_by_id, max, configurable) = match &df.aggregation {
            Aggregation::None if template.is_none() => return Ok(None),
            Aggregation::None => (AggregationKey::default(), false, 1, None),
            Aggregation::BestEffort {
                max_users_per_request,
                split_user_by_id,
                aggregation_key,
            } => (
                aggregation_key.clone(),
                *split_user_by_id,
                *max_users_per_request as usize,
                None,
            ),
            Aggregation::Configurable {
                max_batch_age,
                max_events_in_batch,
                aggregation_key,
            } => {
                let age = crate::config::parse_duration(max_batch_age)?;
                let n = *max_events_in_batch as usize;
                (aggregation_key.clone(), false, n, Some((age, n)))
            }
        };
        let template = match template {
            None => None,
            Some((name, source)) => {
                let sample = crate::export::template::sample_context(df, &names, 2);
                Some(Template::compile(&name, source, json, &sample)?)
            }
        };
        Ok(Some(Shaping {
            policy,
            split_user_by_id,
            max: max.max(1),
            configurable,
            template,
            content_type,
            mapped: df.segments.clone(),
            names,
        }))
    }

    /// The body of one request of `views` under `key`.
    /// On failure: why, and what the body was to be made from (the template's context).
    pub(super) fn body(
        &self,
        flow_name: &str,
        views: Vec<Value>,
        key: &GroupKey,
    ) -> Result<Vec<u8>, (String, Value)> {
        match &self.template {
            Some(t) => {
                let ctx = context(views, key.to_json(), flow_name, &self.names);
                t.render(&ctx).map_err(|e| (e.0, ctx))
            }
            None => {
                let payloads: Vec<Value> = views.iter().map(payload_of_view).collect();
                serde_json::to_vec(&payloads).map_err(|e| (e.to_string(), Value::Array(payloads)))
            }
        }
    }

    /// The entries of one claimed row.
    pub(super) fn entries_of(&self, view: &Value) -> Vec<(GroupKey, Value)> {
        entries(view, &self.policy, self.split_user_by_id, &self.mapped)
    }
}

/// The claimed rows of one round, and what their requests came to so far.
pub(super) struct Round {
    inner: Arc<Inner>,
    done: tokio::sync::mpsc::Sender<Done>,
    rows: Mutex<Vec<Row>>,
}

struct Row {
    id: i64,
    version: i64,
    attempts: u32,
    profile_id: String,
    enqueued_at: i64,
    /// Requests carrying this row that have not come back yet.
    waiting: usize,
    verdict: RowVerdict,
}

/// What a row comes to, by precedence: a retry (some part must go again, counted) over a
/// requeue (paused: again, uncounted) over parked (in a dead letter) over delivered.
#[derive(Debug, Clone, PartialEq)]
enum RowVerdict {
    Delivered,
    Parked,
    Requeue(i64),
    Retry(i64, AttemptError),
}

impl RowVerdict {
    fn rank(&self) -> u8 {
        match self {
            RowVerdict::Delivered => 0,
            RowVerdict::Parked => 1,
            RowVerdict::Requeue(_) => 2,
            RowVerdict::Retry(..) => 3,
        }
    }
}

/// One request: its key, its entries (with their row's index in the round) and the round.
pub(super) struct Request {
    round: Arc<Round>,
    key: GroupKey,
    members: Vec<(usize, Value)>,
}

/// Plan the requests of one round of claimed `items`. Rows that make no entry (with a segment
/// key, a profile in no mapped segment) have nothing to send and complete at once.
pub(super) async fn plan_round(
    inner: &Arc<Inner>,
    flow: &Flow,
    shaping: &Shaping,
    items: Vec<OutboxItem>,
    done: &tokio::sync::mpsc::Sender<Done>,
) -> Vec<Request> {
    let mut per_row = Vec::with_capacity(items.len());
    let mut rows = Vec::with_capacity(items.len());
    for item in items {
        let view = profile_view(
            &flow.spec,
            &inner.catalog,
            &item.profile,
            &item.segments,
            item.identity_map_json.as_deref(),
        );
        per_row.push(shaping.entries_of(&view));
        rows.push(Row {
            id: item.id,
            version: item.version,
            attempts: item.attempts,
            profile_id: item.profile.id.clone(),
            enqueued_at: item.enqueued_at,
            waiting: 0,
            verdict: RowVerdict::Delivered,
        });
    }
    let planned = plan(per_row, shaping.max);
    // A row waits for each request that carries it (once, however many of its entries —
    // one per identity, say — the request holds).
    for p in &planned {
        let mut carried: Vec<usize> = p.members.iter().map(|(r, _)| *r).collect();
        carried.sort_unstable();
        carried.dedup();
        for r in carried {
            rows[r].waiting += 1;
        }
    }
    let empty: Vec<(i64, i64)> = rows
        .iter()
        .filter(|r| r.waiting == 0)
        .map(|r| (r.id, r.version))
        .collect();
    for (id, version) in empty {
        if done
            .send((Some(Completion::Delivered { id, version }), None))
            .await
            .is_err()
        {
            return Vec::new();
        }
    }
    let round = Arc::new(Round {
        inner: inner.clone(),
        done: done.clone(),
        rows: Mutex::new(rows),
    });
    planned
        .into_iter()
        .map(|p| Request {
            round: round.clone(),
            key: p.key,
            members: p.members,
        })
        .collect()
}

/// Deliver one request (`probe`: as the breaker's probe). Its audit record (and a dead letter
/// when it failed for good) goes to the completer; each of its rows completes when its last
/// request has come back.
pub(super) async fn deliver(
    flow: &Flow,
    shaping: &Shaping,
    req: Request,
    session: &Session,
    probe: bool,
) -> Option<Transition> {
    let Request { round, key, members } = req;
    let (carried, views): (Vec<usize>, Vec<Value>) = members.into_iter().unzip();
    let (ids, attempt, profiles) = {
        let rows = round.rows.lock().unwrap_or_else(|p| p.into_inner());
        let mut parts: Vec<(i64, i64)> = carried.iter().map(|r| (rows[*r].id, rows[*r].version)).collect();
        parts.sort_unstable();
        let attempt = carried.iter().map(|r| rows[*r].attempts).max().unwrap_or(0) + 1;
        let mut profiles: Vec<&str> = carried.iter().map(|r| rows[*r].profile_id.as_str()).collect();
        profiles.dedup();
        (parts, attempt, members_summary(&profiles))
    };
    let key_text = batch_key(&flow.spec.name, &ids, &key);
    let (body, sent) = match shaping.body(&flow.spec.name, views, &key) {
        Ok(body) => {
            let body = Bytes::from(body);
            let sent = flow.send(Some(session), &key_text, body.clone(), attempt).await;
            (body, sent)
        }
        Err((why, input)) => {
            // Nothing was sent. The dead letter keeps the template's input for inspection.
            (
                Bytes::from(serde_json::to_vec(&input).unwrap_or_default()),
                Sent::failed(DeliveryError::new(
                    ErrorKind::InvalidRequest,
                    format!("rendering the template failed: {why}"),
                )),
            )
        }
    };
    let now = now_ms();
    let (transition, paused) = flow.health.observe(sent.result.as_ref().map(|_| ()), probe, now);
    let (row_verdict, outcome, dead) = match &sent.result {
        Ok(()) => (RowVerdict::Delivered, Outcome::Delivered, None),
        Err(error) => {
            tracing::warn!(dataflow = %flow.spec.name, kind = %error.kind(), attempt, "delivery failed");
            let record = attempt_error(attempt, error);
            if paused {
                (RowVerdict::Requeue(now), Outcome::Retry, None)
            } else {
                match flow.client.retry().decide(attempt, error, jitter()) {
                    Verdict::RetryAfter(after) => (
                        RowVerdict::Retry(now + after.as_millis() as i64, record),
                        Outcome::Retry,
                        None,
                    ),
                    Verdict::GiveUp => (
                        RowVerdict::Parked,
                        Outcome::DeadLetter,
                        Some(Completion::DeadBatch {
                            dataflow: flow.spec.name.clone(),
                            members: profiles.clone(),
                            idempotency_key: key_text.clone(),
                            payload: body.to_vec(),
                            attempts: attempt,
                            error: record,
                        }),
                    ),
                }
            }
        }
    };
    let audit: AuditRecord<'static> = flow.audit_record(&profiles, &key_text, &body, attempt, outcome, &sent);
    if round.done.send((dead, Some(audit))).await.is_err() {
        return transition;
    }
    round.finish(&carried, row_verdict).await;
    transition
}

impl Round {
    /// The request carrying rows `carried` came back with `verdict`: rows with nothing more in
    /// flight complete.
    async fn finish(&self, carried: &[usize], verdict: RowVerdict) {
        let mut complete = Vec::new();
        {
            let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
            // A row's entries sit together in a request (planning keeps profile order), so
            // one look back skips its repeats.
            let mut last = None;
            for r in carried {
                if last == Some(*r) {
                    continue;
                }
                last = Some(*r);
                let row = &mut rows[*r];
                if verdict.rank() > row.verdict.rank() {
                    row.verdict = verdict.clone();
                }
                row.waiting = row.waiting.saturating_sub(1);
                if row.waiting == 0 {
                    complete.push(match &row.verdict {
                        RowVerdict::Delivered => (
                            Completion::Delivered {
                                id: row.id,
                                version: row.version,
                            },
                            Some(row.enqueued_at),
                        ),
                        RowVerdict::Parked => (
                            Completion::Parked {
                                id: row.id,
                                version: row.version,
                            },
                            None,
                        ),
                        RowVerdict::Requeue(at) => (
                            Completion::Requeue {
                                id: row.id,
                                retry_at: *at,
                            },
                            None,
                        ),
                        RowVerdict::Retry(at, error) => (
                            Completion::Failed {
                                id: row.id,
                                retry_at: *at,
                                error: error.clone(),
                            },
                            None,
                        ),
                    });
                }
            }
        }
        for (c, delivered_from) in complete {
            if let Some(enqueued_at) = delivered_from {
                self.inner.stats.record(&c, enqueued_at);
            }
            if self.done.send((Some(c), None)).await.is_err() {
                return;
            }
        }
    }
}

/// Who was in a request, for its audit record and dead letter: the profile ids when few,
/// else their count and a hash of them.
fn members_summary(profiles: &[&str]) -> String {
    let joined = profiles.join(",");
    if profiles.len() <= 10 && joined.len() <= 400 {
        return joined;
    }
    let mut sorted = profiles.to_vec();
    sorted.sort_unstable();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in &sorted {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p.as_bytes());
    }
    format!(
        "{} profiles, sha256:{}",
        profiles.len(),
        crate::audit::hex(&ctx.finish().as_ref()[..16])
    )
}

/// A request's idempotency key: the same for the same members at the same versions under the
/// same aggregation key (so a retry of the same batch reads as one to the receiver), new for
/// any other.
fn batch_key(dataflow: &str, members: &[(i64, i64)], key: &GroupKey) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"batch");
    for part in [dataflow.as_bytes(), key.canonical().as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    for (id, version) in members {
        ctx.update(&id.to_be_bytes());
        ctx.update(&version.to_be_bytes());
    }
    format!("sp_{}", crate::audit::hex(&ctx.finish().as_ref()[..16]))
}

/// A dataflow's mapped segments with their catalog names (the id when the catalog has none).
pub(super) fn segment_names(cfg: &crate::config::Config, df: &Dataflow) -> Vec<(String, String)> {
    df.segments
        .iter()
        .map(|id| {
            let name = cfg
                .segments
                .iter()
                .find(|s| &s.id == id)
                .map_or(id.clone(), |s| s.name.clone());
            (id.clone(), name)
        })
        .collect()
}

/// Hand a planned request back unsent (the dataflow paused or is held): its rows go back in
/// line at `retry_at`, uncounted.
pub(super) async fn release(req: Request, retry_at: i64) {
    let Request { round, members, .. } = req;
    let carried: Vec<usize> = members.into_iter().map(|(r, _)| r).collect();
    round.finish(&carried, RowVerdict::Requeue(retry_at)).await;
}

/// One request as it would be sent: its aggregation key, how many entries it holds, and its
/// body (or why it cannot be rendered).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Preview {
    pub aggregation_key: Value,
    pub profiles: usize,
    pub content_type: String,
    /// The body as text (bodies are JSON or text; anything else is shown lossily).
    pub body: Option<String>,
    pub error: Option<String>,
}

/// What dataflow `df` would send for `ndjson` profile updates (each applied to a fresh
/// profile), or for sample profiles made from its mapping when `None`: the requests its
/// aggregation makes, each rendered by its template. Nothing is stored or sent.
pub fn preview(
    cfg: &crate::config::Config,
    df: &Dataflow,
    ndjson: Option<&[u8]>,
) -> Result<Vec<Preview>, String> {
    let catalog = crate::export::spec::Catalog::from_config(cfg);
    let spec = crate::export::spec::DataflowSpec::from_config(df, &Default::default());
    let names = segment_names(cfg, df);
    let template = cfg.dataflow_template(df)?;
    let shaping = match Shaping::new(df, template, names.clone())? {
        Some(s) => s,
        // One payload per request, as the HTTP API destination sends it.
        None => Shaping {
            policy: AggregationKey::default(),
            split_user_by_id: false,
            max: 1,
            configurable: None,
            template: None,
            content_type: HeaderValue::from_static("application/json"),
            mapped: df.segments.clone(),
            names,
        },
    };
    let views: Vec<Value> = match ndjson {
        None => crate::export::template::sample_views(df, 2),
        Some(bytes) => {
            let parsed = crate::profile::update::parse_ndjson(bytes);
            if let Some(e) = parsed.errors.first() {
                return Err(format!("profiles, line {}: {}", e.line, e.reason));
            }
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            parsed
                .updates
                .into_iter()
                .map(|(_, u)| {
                    let mut p = crate::profile::state::Profile::new(&u.profile_id);
                    let change = p.apply(u, &now);
                    let triggering: Vec<String> = change
                        .segments_changed
                        .iter()
                        .filter(|s| df.segments.contains(s))
                        .cloned()
                        .collect();
                    profile_view(&spec, &catalog, &p, &triggering, None)
                })
                .collect()
        }
    };
    let per_row = views.iter().map(|v| shaping.entries_of(v)).collect();
    let single = shaping.template.is_none() && shaping.max == 1 && df.aggregation.is_none();
    Ok(plan(per_row, shaping.max)
        .into_iter()
        .map(|p| {
            let members: Vec<Value> = p.members.into_iter().map(|(_, v)| v).collect();
            let count = members.len();
            let rendered = if single {
                serde_json::to_vec(&payload_of_view(&members[0])).map_err(|e| e.to_string())
            } else {
                shaping.body(&df.name, members, &p.key).map_err(|(why, _)| why)
            };
            let (body, error) = match rendered {
                Ok(b) => (Some(String::from_utf8_lossy(&b).into_owned()), None),
                Err(e) => (None, Some(e)),
            };
            Preview {
                aggregation_key: p.key.to_json(),
                profiles: count,
                content_type: shaping.content_type.to_str().unwrap_or_default().to_owned(),
                body,
                error,
            }
        })
        .collect())
}
