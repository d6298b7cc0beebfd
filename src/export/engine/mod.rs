//! The running export engine: ingest (parse → apply + trigger → durable outbox, in one
//! transaction) and one delivery worker per dataflow (claim a batch → build payloads from the
//! latest state → send concurrently through the delivery client → record outcomes).
//!
//! Rooms: this file is the engine's face (open, ingest, stats, replay, metrics); [`dataflows`]
//! the dataflow definitions (config and API-managed) and their sync between instances;
//! [`worker`] the claimer, couriers and completer of one dataflow; [`attempt`] one delivery
//! attempt: the request, its signature and idempotency key, and its audit record.

mod attempt;
mod dataflows;
mod health;
mod ingest;
mod shaped;
mod worker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;

use serde::Serialize;

use super::spec::Catalog;
use super::trigger::evaluate;
use crate::audit::{Outcome, ReplayTrigger};
use crate::config::Config;
use crate::delivery::Core;
use crate::profile::update::{LineError, ProfileUpdate};
use crate::store::{self, AttemptError, DeadLetterFilter, Store, StoreError};

pub use attempt::idempotency_key;
use attempt::{attempt_error, Flow};
use dataflows::build_flow;
pub use dataflows::DataflowChange;
pub use health::{pause_data, resumed_data, DataflowStatus};
pub use ingest::{IngestSession, PartlyStored};
pub use shaped::{preview, Preview};
use worker::worker;

/// How often an instance on a shared store looks for dataflow changes made elsewhere.
const DATAFLOW_POLL: Duration = Duration::from_secs(2);

/// How often the engine reads pauses set elsewhere (the CLI, another instance).
const PAUSE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
    #[error("no dead letter {0}")]
    NoDeadLetter(i64),
    #[error("no dataflow named '{0}'")]
    UnknownDataflow(String),
    #[error("dead letter {id}: dataflow '{dataflow}' is not configured")]
    NoDataflow { id: i64, dataflow: String },
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The outcome of one ingest batch. `errors` lists the first rejected lines (at most
/// [`crate::profile::update::MAX_REPORTED_ERRORS`]); `errors_omitted` counts the rest, so the
/// answer stays small whatever the body.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestReport {
    pub accepted: usize,
    /// Every rejected line.
    pub rejected: usize,
    pub errors: Vec<LineError>,
    /// Rejected lines not listed in `errors`.
    pub errors_omitted: usize,
}

struct Inner {
    store: Arc<dyn Store>,
    catalog: Catalog,
    /// The dataflows now (config ones, then API-managed ones).
    flows: std::sync::RwLock<Vec<Arc<Flow>>>,
    /// The config the engine was opened with (API-managed dataflows are checked against it).
    cfg: Config,
    /// Running workers by dataflow, once `spawn_workers` was called.
    workers: Mutex<Option<std::collections::HashMap<String, tokio::task::AbortHandle>>>,
    stats: Stats,
    /// The delivery core: identities (rotation, hot reload) and egress policy.
    core: Core,
    /// API-managed dataflows running here, as stored (name → JSON); on a shared store this
    /// is compared with the database to pick up other instances' changes.
    api_known: Mutex<std::collections::HashMap<String, String>>,
    /// Stored dataflows this instance could not run (name → JSON), so a bad one is logged
    /// once per change, not on every poll.
    api_rejected: Mutex<std::collections::HashMap<String, String>>,
    /// Where operational events go (logged only until [`Engine::set_events`]).
    events: std::sync::RwLock<crate::events::Events>,
}

/// The ingest-to-delivered latency histogram (microseconds).
struct Stats {
    latency_us: Mutex<Histogram<u64>>,
}

/// One dataflow's outcome counters (for alert rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutcomeTotals {
    pub dataflow: String,
    pub attempts: u64,
    pub failures: u64,
    pub dead: u64,
}

/// A snapshot of [`Engine::stats`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStats {
    pub delivered: u64,
    /// Failed attempts (each retry counts).
    pub failed: u64,
    /// Deliveries parked as dead letters.
    pub dead: u64,
    /// Ingest-to-delivered latency percentiles, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// How one dead letter's replay went, in a bulk replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Delivered: the dead letter is gone.
    Delivered,
    /// Failed again: it stays, with this attempt added.
    Failed(AttemptError),
    /// Not replayed: purged (or replayed by someone else) meanwhile.
    Gone,
    /// Not replayed: its dataflow is not configured any more.
    NoDataflow(String),
}

/// The counts of a bulk replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySummary {
    /// Dead letters sent again.
    pub replayed: usize,
    pub delivered: usize,
    pub failed: usize,
    /// Selected but not sent (gone meanwhile, or their dataflow is not configured).
    pub skipped: usize,
}

/// The export engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dataflows", &self.inner.flows().len())
            .finish()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, EngineError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

impl Engine {
    /// Open the store, record each dataflow's mapped segments, and backfill the newly mapped
    /// ones (every profile already in such a segment is exported once).
    pub async fn open(cfg: &Config) -> Result<Engine, EngineError> {
        let core = Core::from_config(cfg).map_err(EngineError::Setup)?;
        Self::open_with(cfg, core).await
    }

    /// [`Engine::open`], delivering through `core` (shared with the sidecar and alerts of
    /// the same process, so one watcher rotates every identity).
    pub async fn open_with(cfg: &Config, core: Core) -> Result<Engine, EngineError> {
        let store = {
            let cfg = cfg.clone();
            blocking(move || store::open(&cfg)).await?
        };
        let catalog = Catalog::from_config(cfg);
        let mut flows = Vec::new();
        for df in &cfg.dataflows {
            let destination = cfg.dataflow_destination(df).map_err(EngineError::Setup)?;
            flows.push(Arc::new(build_flow(cfg, &store, &core, df, destination).await?));
        }
        let saved = {
            let s = store.clone();
            blocking(move || s.api_dataflows()).await?
        };
        let mut api_known = std::collections::HashMap::new();
        let mut api_rejected = std::collections::HashMap::new();
        for (name, json) in saved {
            match serde_json::from_str::<crate::config::Dataflow>(&json) {
                Ok(df) if cfg.dataflow(&df.name).is_none() => {
                    // What the database holds is checked like what the API is sent; one
                    // that cannot run is skipped, never a reason not to start.
                    let built = match dataflows::stored_destination(cfg, &df) {
                        Ok(d) => build_flow(cfg, &store, &core, &df, d).await,
                        Err(issues) => Err(EngineError::Setup(issues.join("; "))),
                    };
                    match built {
                        Ok(flow) => {
                            flows.push(Arc::new(flow));
                            api_known.insert(name, json);
                        }
                        Err(e) => {
                            tracing::error!(dataflow = %name, error = %e, "a stored API-managed dataflow cannot run here; skipped");
                            api_rejected.insert(name, json);
                        }
                    }
                }
                Ok(_) => {
                    tracing::warn!(dataflow = %name, "an API-managed dataflow has the name of a configured one; the config wins")
                }
                Err(e) => {
                    tracing::error!(dataflow = %name, error = %e, "a stored API-managed dataflow does not parse; skipped")
                }
            }
        }

        let histogram =
            Histogram::new_with_bounds(1, 3_600_000_000, 2).map_err(|e| EngineError::Setup(e.to_string()))?;
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                catalog,
                flows: std::sync::RwLock::new(flows),
                cfg: cfg.clone(),
                workers: Mutex::new(None),
                core,
                stats: Stats {
                    latency_us: Mutex::new(histogram),
                },
                api_known: Mutex::new(api_known),
                api_rejected: Mutex::new(api_rejected),
                events: Default::default(),
            }),
        })
    }

    /// Parse an NDJSON batch and store the valid updates with their triggered deliveries, in
    /// groups as [`Engine::ingest_session`] does. Returns once they are durable.
    pub async fn ingest(&self, ndjson: &[u8]) -> Result<IngestReport, EngineError> {
        let mut session = self.ingest_session();
        session.feed(ndjson).await.map_err(|p| p.error)?;
        session.finish().await.map_err(|p| p.error)
    }

    /// Store parsed updates (in one transaction) with the deliveries they trigger; returns once
    /// they are durable.
    async fn store_updates(&self, updates: Vec<(usize, ProfileUpdate)>) -> Result<(), EngineError> {
        if updates.is_empty() {
            return Ok(());
        }
        let updates: Vec<_> = updates.into_iter().map(|(_, u)| u).collect();
        let inner = self.inner.clone();
        blocking(move || {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            inner.store.apply_updates(updates, &mut |p, u| {
                let change = p.apply(u, &now);
                inner
                    .flows()
                    .iter()
                    .filter_map(|f| evaluate(&f.spec, p, &change).map(|t| (f.spec.name.clone(), t)))
                    .collect()
            })
        })
        .await?;
        for f in &self.inner.flows() {
            f.wake.notify_one();
        }
        Ok(())
    }

    /// Deliveries waiting, all dataflows.
    pub async fn pending(&self) -> Result<u64, EngineError> {
        let s = self.inner.store.clone();
        blocking(move || s.pending(None)).await
    }

    /// Deliveries so far and their ingest-to-delivered latency.
    pub fn stats(&self) -> DeliveryStats {
        let totals = self.outcome_totals();
        let s = &self.inner.stats;
        let h = s.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |us: u64| us as f64 / 1000.0;
        DeliveryStats {
            delivered: totals.iter().map(|t| t.attempts - t.failures).sum(),
            failed: totals.iter().map(|t| t.failures).sum(),
            dead: totals.iter().map(|t| t.dead).sum(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    /// Re-send a dead letter with its original idempotency key (fresh signature timestamp).
    /// Delivered → removed; failed → the attempt is added to its history (and its class
    /// becomes that attempt's). The audit record names `trigger`.
    pub async fn replay_dead_letter(
        &self,
        id: i64,
        trigger: ReplayTrigger,
    ) -> Result<Result<(), AttemptError>, EngineError> {
        let s = self.inner.store.clone();
        let dl = blocking(move || s.dead_letter(id))
            .await?
            .ok_or(EngineError::NoDeadLetter(id))?;
        let flow = self
            .inner
            .flows()
            .iter()
            .find(|f| f.spec.name == dl.dataflow)
            .cloned()
            .ok_or_else(|| EngineError::NoDataflow {
                id,
                dataflow: dl.dataflow.clone(),
            })?;
        let s = self.inner.store.clone();
        let body = Bytes::from(dl.payload);
        let sent = flow
            .send(None, &dl.idempotency_key, body.clone(), dl.attempts + 1)
            .await;
        let outcome = if sent.result.is_ok() {
            Outcome::ReplayDelivered
        } else {
            Outcome::ReplayFailed
        };
        let mut audit = flow.audit_record(
            &dl.profile_id,
            &dl.idempotency_key,
            &body,
            dl.attempts + 1,
            outcome,
            &sent,
        );
        audit.trigger = Some(trigger.as_str().into());
        let a = s.clone();
        blocking(move || a.append_audit(&[audit])).await?;
        match sent.result {
            Ok(()) => {
                blocking(move || s.remove_dead_letter(id)).await?;
                Ok(Ok(()))
            }
            Err(e) => {
                let record = attempt_error(dl.attempts + 1, &e);
                let r = record.clone();
                blocking(move || s.dead_letter_failed(id, &r)).await?;
                Ok(Err(record))
            }
        }
    }

    /// Replay every dead letter `filter` selects (at most `filter.limit`), oldest first, one
    /// at a time, calling `each` after each one. Letters are read from the store a page at a
    /// time, so a long dead-letter queue is never loaded whole. A letter purged meanwhile or
    /// whose dataflow is gone is skipped; a store failure stops the run.
    pub async fn replay_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        trigger: ReplayTrigger,
        mut each: impl FnMut(i64, &Replayed),
    ) -> Result<ReplaySummary, EngineError> {
        const PAGE: usize = 100;
        let mut summary = ReplaySummary::default();
        let mut page = DeadLetterFilter {
            limit: PAGE,
            ..filter.clone()
        };
        loop {
            let left = filter.limit.saturating_sub(summary.replayed + summary.skipped);
            if left == 0 {
                break;
            }
            page.limit = left.min(PAGE);
            let s = self.inner.store.clone();
            let q = page.clone();
            let ids: Vec<i64> = blocking(move || s.dead_letters_where(&q))
                .await?
                .iter()
                .map(|d| d.id)
                .collect();
            let Some(last) = ids.last() else { break };
            // Failed replays stay dead letters: go on after this page, not from the start.
            page.after_id = Some(*last);
            for id in ids {
                let replayed = match self.replay_dead_letter(id, trigger).await {
                    Ok(Ok(())) => {
                        summary.replayed += 1;
                        summary.delivered += 1;
                        Replayed::Delivered
                    }
                    Ok(Err(e)) => {
                        summary.replayed += 1;
                        summary.failed += 1;
                        Replayed::Failed(e)
                    }
                    Err(EngineError::NoDeadLetter(_)) => {
                        summary.skipped += 1;
                        Replayed::Gone
                    }
                    Err(EngineError::NoDataflow { dataflow, .. }) => {
                        summary.skipped += 1;
                        Replayed::NoDataflow(dataflow)
                    }
                    Err(e) => return Err(e),
                };
                each(id, &replayed);
            }
        }
        Ok(summary)
    }

    /// The gateway's client identities, for the public endpoints and the reload watcher.
    pub fn identity_store(&self) -> Option<Arc<crate::tls::creds::IdentityStore>> {
        self.identity_named(crate::tls::creds::DEFAULT)
    }

    /// A named identity (`default` is the gateway's own).
    pub fn identity_named(&self, name: &str) -> Option<Arc<crate::tls::creds::IdentityStore>> {
        self.inner.core.identities().get(Some(name)).cloned()
    }

    /// Every identity by name.
    pub fn identities(&self) -> Vec<(String, Arc<crate::tls::creds::IdentityStore>)> {
        self.inner
            .core
            .identities()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The delivery core the engine sends through.
    pub fn core(&self) -> &Core {
        &self.inner.core
    }

    /// Prometheus text for `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.metrics_text_as(crate::metrics::Format::Prometheus).await
    }

    /// `/metrics` in `format` (OpenMetrics or the Prometheus text format).
    pub async fn metrics_text_as(&self, format: crate::metrics::Format) -> String {
        let flows = self.inner.flows();
        let statuses = self.dataflow_statuses().await.unwrap_or_default();
        let snaps: Vec<crate::metrics::FlowSnapshot<'_>> = flows
            .iter()
            .map(|f| {
                let status = statuses.iter().find(|s| s.dataflow == f.spec.name);
                crate::metrics::FlowSnapshot {
                    name: &f.spec.name,
                    counters: &f.counters,
                    pending: status.map_or(0, |s| s.pending),
                    token_requests: f.client.token_requests(),
                    state: status.map(|s| s.state),
                }
            })
            .collect();
        let s = self.stats();
        crate::metrics::render_as(
            format,
            &snaps,
            &self.cert_expiry_seconds(),
            s.p50_ms / 1000.0,
            s.p99_ms / 1000.0,
        )
    }

    /// Every dataflow's live counters (the status page reads what `/metrics` reads).
    pub fn flow_counters(&self) -> Vec<(String, crate::metrics::CountersSnapshot)> {
        self.inner
            .flows()
            .iter()
            .map(|f| (f.spec.name.clone(), f.counters.snapshot()))
            .collect()
    }

    /// Per identity: seconds until its presented certificate expires (negative once expired).
    pub fn cert_expiry_seconds(&self) -> Vec<(String, i64)> {
        self.inner
            .core
            .identities()
            .iter()
            .map(|(k, c)| (k.clone(), c.expiry_seconds()))
            .collect()
    }

    /// Per dataflow: attempts, failed attempts and dead letters so far.
    pub fn outcome_totals(&self) -> Vec<OutcomeTotals> {
        self.inner
            .flows()
            .iter()
            .map(|f| {
                let (attempts, failures) = f.counters.attempts_and_failures();
                OutcomeTotals {
                    dataflow: f.spec.name.clone(),
                    attempts,
                    failures,
                    dead: f.counters.dead.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Forget the latency samples so far (benchmarks measure phases separately).
    pub fn reset_stats(&self) {
        self.inner
            .stats
            .latency_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reset();
    }

    /// Send operational events (pauses, resumptions, dead letters) to `events`.
    pub fn set_events(&self, events: crate::events::Events) {
        *self.inner.events.write().unwrap_or_else(|p| p.into_inner()) = events;
    }

    /// The store, for inspection.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// Start one delivery worker per dataflow. They run until the tasks are aborted.
    pub fn spawn_workers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut running = std::collections::HashMap::new();
        let handles: Vec<_> = self
            .inner
            .flows()
            .into_iter()
            .map(|f| {
                let h = tokio::spawn(worker(self.inner.clone(), f.clone()));
                running.insert(f.spec.name.clone(), h.abort_handle());
                h
            })
            .collect();
        *self.inner.workers.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
        let mut handles = handles;
        // Pauses set by the CLI or another instance reach the running dataflows.
        let engine = self.clone();
        handles.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(PAUSE_POLL).await;
                if let Err(e) = engine.sync_pauses().await {
                    tracing::warn!(error = %e, "reading dataflow pauses failed");
                }
            }
        }));
        if self.inner.store.shared() {
            // Other instances may change API-managed dataflows: poll for their changes.
            let engine = self.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(DATAFLOW_POLL).await;
                    if let Err(e) = engine.sync_api_dataflows().await {
                        tracing::warn!(error = %e, "reading shared dataflows failed");
                    }
                }
            }));
        }
        handles
    }
}

impl Inner {
    fn events(&self) -> crate::events::Events {
        self.events.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn flows(&self) -> Vec<Arc<Flow>> {
        self.flows
            .read()
            .map(|f| f.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}
