//! The running export engine: ingest (parse → apply + trigger → durable outbox, in one
//! transaction) and one delivery worker per dataflow (claim a batch → build payloads from the
//! latest state → send concurrently through the delivery client → record outcomes).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;

use http::{HeaderMap, HeaderValue, Method};
use serde::Serialize;
use tokio::sync::Notify;

use super::payload;
use super::spec::{Catalog, DataflowSpec};
use super::trigger::evaluate;
use super::update::{parse_ndjson, LineError};
use crate::audit::{payload_sha256, AuditRecord, Outcome};
use crate::config::Config;
use crate::delivery::retry::Verdict;
use crate::delivery::{Core, DeliveryClient, DeliveryError, ErrorKind, OutboundRequest, PeerInfo, Session};
use crate::store::{self, now_ms, AttemptError, Completion, OutboxItem, Store, StoreError};

/// How often an instance on a shared store looks for dataflow changes made elsewhere.
const DATAFLOW_POLL: Duration = Duration::from_secs(2);
/// Rows claimed per round trip to the store.
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The outcome of one ingest batch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub accepted: usize,
    pub rejected: usize,
    pub errors: Vec<LineError>,
}

struct Flow {
    spec: DataflowSpec,
    client: DeliveryClient,
    endpoint: url::Url,
    /// `host:port` of the endpoint, as audit records name it.
    destination: String,
    counters: crate::metrics::FlowCounters,
    wake: Notify,
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
}

/// The ingest-to-delivered latency histogram (microseconds).
struct Stats {
    latency_us: Mutex<Histogram<u64>>,
}

/// Why an API change to a dataflow was refused.
#[derive(Debug, thiserror::Error)]
pub enum DataflowChange {
    #[error("{0}")]
    Conflict(String),
    #[error("invalid dataflow: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("store: {0}")]
    Store(String),
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
            flows.push(Arc::new(build_flow(&store, cfg, &core, df).await?));
        }
        let saved = {
            let s = store.clone();
            blocking(move || s.api_dataflows()).await?
        };
        let mut api_known = std::collections::HashMap::new();
        for (name, json) in saved {
            match serde_json::from_str::<crate::config::Dataflow>(&json) {
                Ok(df) if cfg.dataflow(&df.name).is_none() => {
                    flows.push(Arc::new(build_flow(&store, cfg, &core, &df).await?));
                    api_known.insert(name, json);
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
                api_rejected: Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// Parse an NDJSON batch and store the valid updates with their triggered deliveries.
    /// Returns once they are durable.
    pub async fn ingest(&self, ndjson: &[u8]) -> Result<IngestReport, EngineError> {
        let parsed = parse_ndjson(ndjson);
        let report = IngestReport {
            accepted: parsed.updates.len(),
            rejected: parsed.errors.len(),
            errors: parsed.errors,
        };
        if parsed.updates.is_empty() {
            return Ok(report);
        }
        let updates: Vec<_> = parsed.updates.into_iter().map(|(_, u)| u).collect();
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
        Ok(report)
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
    /// Delivered → removed; failed → the attempt is added to its history.
    pub async fn replay_dead_letter(&self, id: i64) -> Result<Result<(), AttemptError>, EngineError> {
        let s = self.inner.store.clone();
        let dl = blocking(move || s.dead_letter(id))
            .await?
            .ok_or_else(|| EngineError::Setup(format!("no dead letter {id}")))?;
        let flow = self
            .inner
            .flows()
            .iter()
            .find(|f| f.spec.name == dl.dataflow)
            .cloned()
            .ok_or_else(|| {
                EngineError::Setup(format!(
                    "dead letter {id}: dataflow '{}' is not configured",
                    dl.dataflow
                ))
            })?;
        let s = self.inner.store.clone();
        let body = Bytes::from(dl.payload);
        let sent = flow.send(None, &dl.idempotency_key, body.clone()).await;
        let outcome = if sent.result.is_ok() {
            Outcome::ReplayDelivered
        } else {
            Outcome::ReplayFailed
        };
        let audit = flow.audit_record(
            &dl.profile_id,
            &dl.idempotency_key,
            &body,
            dl.attempts + 1,
            outcome,
            &sent,
        );
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
        let flows = self.inner.flows();
        let mut pending = Vec::new();
        for f in &flows {
            let (s, name) = (self.inner.store.clone(), f.spec.name.clone());
            pending.push(blocking(move || s.pending(Some(&name))).await.unwrap_or(0));
        }
        let snaps: Vec<crate::metrics::FlowSnapshot<'_>> = flows
            .iter()
            .zip(pending)
            .map(|(f, pending)| crate::metrics::FlowSnapshot {
                name: &f.spec.name,
                counters: &f.counters,
                pending,
                token_requests: f.client.token_requests(),
            })
            .collect();
        let s = self.stats();
        crate::metrics::render(
            &snaps,
            &self.cert_expiry_seconds(),
            s.p50_ms / 1000.0,
            s.p99_ms / 1000.0,
        )
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

    /// Add or replace an API-managed dataflow: validated against the config, persisted,
    /// its newly mapped segments backfilled, its worker (re)started when workers run.
    pub async fn put_dataflow(&self, df: crate::config::Dataflow) -> Result<(), DataflowChange> {
        if self.inner.cfg.dataflow(&df.name).is_some() {
            return Err(DataflowChange::Conflict(format!(
                "'{}' is defined in the config file; change it there",
                df.name
            )));
        }
        let mut candidate = self.inner.cfg.clone();
        candidate.dataflows.push(df.clone());
        let issues: Vec<String> = candidate
            .validate()
            .into_iter()
            .filter(|i| {
                i.key
                    .starts_with(&format!("dataflows[{}]", candidate.dataflows.len() - 1))
            })
            .map(|i| {
                i.to_string().replacen(
                    &format!("dataflows[{}]", candidate.dataflows.len() - 1),
                    "dataflow",
                    1,
                )
            })
            .collect();
        if !issues.is_empty() {
            return Err(DataflowChange::Invalid(issues));
        }
        let flow = Arc::new(
            build_flow(&self.inner.store, &candidate, &self.inner.core, &df)
                .await
                .map_err(|e| DataflowChange::Invalid(vec![e.to_string()]))?,
        );
        let json = serde_json::to_string(&df).map_err(|e| DataflowChange::Invalid(vec![e.to_string()]))?;
        let (s, name, j) = (self.inner.store.clone(), df.name.clone(), json.clone());
        blocking(move || s.save_api_dataflow(&name, &j))
            .await
            .map_err(|e| DataflowChange::Store(e.to_string()))?;
        self.install_flow(&df.name, Some((flow, json)));
        Ok(())
    }

    /// Run `flow` as dataflow `name` (replacing any running one), or stop it (`None`).
    fn install_flow(&self, name: &str, flow: Option<(Arc<Flow>, String)>) {
        if let Ok(mut flows) = self.inner.flows.write() {
            flows.retain(|f| f.spec.name != name);
            if let Some((f, _)) = &flow {
                flows.push(f.clone());
            }
        }
        {
            let mut known = self.inner.api_known.lock().unwrap_or_else(|p| p.into_inner());
            match &flow {
                Some((_, json)) => known.insert(name.to_owned(), json.clone()),
                None => known.remove(name),
            };
        }
        self.restart_worker(name, flow.map(|(f, _)| f));
    }

    /// Pick up API-managed dataflows that another instance created, changed or deleted in a
    /// shared store. Returns how many changed here.
    pub async fn sync_api_dataflows(&self) -> Result<usize, EngineError> {
        let stored: std::collections::HashMap<String, String> =
            self.api_dataflows().await?.into_iter().collect();
        let known = self
            .inner
            .api_known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut changed = 0;
        for name in known.keys().filter(|n| !stored.contains_key(*n)) {
            tracing::info!(dataflow = %name, "dataflow deleted by another instance");
            self.install_flow(name, None);
            changed += 1;
        }
        for (name, json) in stored {
            if known.get(&name) == Some(&json) || self.inner.cfg.dataflow(&name).is_some() {
                continue;
            }
            {
                let mut rejected = self.inner.api_rejected.lock().unwrap_or_else(|p| p.into_inner());
                if rejected.get(&name) == Some(&json) {
                    continue;
                }
                // Remembered now; forgotten below if it runs.
                rejected.insert(name.clone(), json.clone());
            }
            let df = match serde_json::from_str::<crate::config::Dataflow>(&json) {
                Ok(df) => df,
                Err(e) => {
                    tracing::error!(dataflow = %name, error = %e, "a stored API-managed dataflow does not parse; skipped");
                    continue;
                }
            };
            let mut candidate = self.inner.cfg.clone();
            candidate.dataflows.push(df.clone());
            match build_flow(&self.inner.store, &candidate, &self.inner.core, &df).await {
                Ok(flow) => {
                    self.inner
                        .api_rejected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                    tracing::info!(dataflow = %name, "dataflow changed by another instance");
                    self.install_flow(&name, Some((Arc::new(flow), json)));
                    changed += 1;
                }
                Err(e) => {
                    tracing::error!(dataflow = %name, error = %e, "a dataflow changed by another instance cannot run here")
                }
            }
        }
        Ok(changed)
    }

    /// Remove an API-managed dataflow: its worker stops, its queued deliveries and segment
    /// mappings are dropped (mapping it again backfills again).
    pub async fn delete_dataflow(&self, name: &str) -> Result<bool, DataflowChange> {
        if self.inner.cfg.dataflow(name).is_some() {
            return Err(DataflowChange::Conflict(format!(
                "'{name}' is defined in the config file; remove it there"
            )));
        }
        let (s, n) = (self.inner.store.clone(), name.to_owned());
        let existed = blocking(move || s.delete_api_dataflow(&n))
            .await
            .map_err(|e| DataflowChange::Store(e.to_string()))?;
        self.install_flow(name, None);
        Ok(existed)
    }

    /// API-managed dataflows as stored (JSON), by name.
    pub async fn api_dataflows(&self) -> Result<Vec<(String, String)>, EngineError> {
        let s = self.inner.store.clone();
        blocking(move || s.api_dataflows()).await
    }

    fn restart_worker(&self, name: &str, flow: Option<Arc<Flow>>) {
        let mut guard = self.inner.workers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(running) = guard.as_mut() else { return };
        if let Some(h) = running.remove(name) {
            h.abort();
        }
        if let Some(f) = flow {
            let h = tokio::spawn(worker(self.inner.clone(), f));
            running.insert(name.to_owned(), h.abort_handle());
        }
    }
}

/// Deliveries in flight per dataflow: that many couriers, each sending one at a time over a
/// connection of its own, as a proxy's keep-alive pool would hold them.
const IN_FLIGHT: usize = 64;

/// Outcomes recorded per store transaction, at most. An ingest holds the writer for a whole
/// batch, so outcomes get the writer only between ingest batches: at 1,024 per transaction
/// they fell behind the deliveries while ingest ran flat out, and the rows they kept leased
/// (20,000 and more) made every claim step over them. Each outcome row is small; a large
/// transaction costs less per row.
const OUTCOME_BATCH: usize = 8192;

/// Build one dataflow's runtime: record its mapped segments (backfilling the newly mapped
/// ones), its delivery client with the right identity, retry policy and signer.
async fn build_flow(
    store: &Arc<dyn Store>,
    cfg: &Config,
    core: &Core,
    df: &crate::config::Dataflow,
) -> Result<Flow, EngineError> {
    let (name, segs, now) = (df.name.clone(), df.segments.clone(), now_ms());
    let s = store.clone();
    let (times, fresh) = blocking(move || s.sync_mappings(&name, &segs, now)).await?;
    for seg in fresh {
        let (s, name, seg2) = (store.clone(), df.name.clone(), seg.clone());
        let n = blocking(move || s.backfill(&name, &seg2, now)).await?;
        if n > 0 {
            tracing::info!(dataflow = %df.name, segment = %seg, profiles = n, "backfill queued");
        }
    }
    let destination = cfg.dataflow_destination(df).map_err(EngineError::Setup)?;
    let client = core.destination(&destination).map_err(EngineError::Setup)?;
    let endpoint = destination
        .endpoint
        .ok_or_else(|| EngineError::Setup(format!("dataflow {}: no endpoint", df.name)))?;
    Ok(Flow {
        spec: DataflowSpec::from_config(df, &times),
        client,
        destination: crate::delivery::destination(&endpoint),
        endpoint,
        counters: Default::default(),
        wake: Notify::new(),
    })
}

impl Inner {
    fn flows(&self) -> Vec<Arc<Flow>> {
        self.flows
            .read()
            .map(|f| f.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// One dataflow's pipeline: a claimer leases due rows and hands each to a courier, which
/// delivers it; a completer records outcomes in batches. A row stays leased from claim to
/// completion, so a profile never has two deliveries in flight. The couriers stop when the
/// claimer does, after the delivery each holds.
async fn worker(inner: Arc<Inner>, flow: Arc<Flow>) {
    let (done_tx, done_rx) =
        tokio::sync::mpsc::channel::<(Completion, AuditRecord<'static>)>(OUTCOME_BATCH * 2);
    let completer = tokio::spawn(complete_loop(inner.clone(), flow.clone(), done_rx));
    let mut couriers = Couriers {
        queues: Vec::new(),
        idle: Arc::default(),
        freed: Arc::default(),
        inner: inner.clone(),
        flow: flow.clone(),
        done: done_tx,
    };
    let lease_ms = i64::try_from(inner.cfg.store.lease().as_millis()).unwrap_or(30_000);
    let claim = || {
        let (s, name) = (inner.store.clone(), flow.spec.name.clone());
        tokio::task::spawn_blocking(move || s.claim(&name, BATCH, now_ms(), lease_ms))
    };
    // The claim of the next batch, started while the current one's last deliveries go out.
    let mut next = None;
    loop {
        let claimed = match next.take() {
            Some(handle) => handle.await,
            None => claim().await,
        };
        let items = match claimed.map_err(EngineError::from).and_then(|r| Ok(r?)) {
            Ok(items) => items,
            Err(e) => {
                tracing::error!(dataflow = %flow.spec.name, error = %e, "claiming deliveries failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if items.is_empty() {
            tokio::select! {
                _ = flow.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        // A full batch means more are probably due. Claim them while the last IN_FLIGHT of
        // this one go out, so the connections are not left idle during the claim (which
        // takes about as long as a round of deliveries). Claimed rows stay leased, so the
        // early claim never returns a row of this batch; it is at most IN_FLIGHT deliveries
        // ahead, far inside the lease.
        let prefetch_at = if items.len() == BATCH {
            Some(items.len().saturating_sub(IN_FLIGHT))
        } else {
            None
        };
        for (i, item) in items.into_iter().enumerate() {
            if Some(i) == prefetch_at {
                next = Some(claim());
            }
            if !couriers.dispatch(item).await {
                return;
            }
        }
        if completer.is_finished() {
            tracing::error!(dataflow = %flow.spec.name, "completion writer stopped");
            return;
        }
    }
}

/// A dataflow's couriers: up to [`IN_FLIGHT`] tasks, each delivering one item at a time over
/// a connection of its own (a lane, driven in the courier's task). They start as the load
/// needs them, and the one idle most recently gets the next item, so a light load keeps
/// using the same few connections.
struct Couriers {
    /// Each courier's queue (one item at most).
    queues: Vec<tokio::sync::mpsc::Sender<OutboxItem>>,
    /// Idle couriers, the most recently idle last.
    idle: Arc<Mutex<Vec<usize>>>,
    /// A courier became idle.
    freed: Arc<Notify>,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    done: tokio::sync::mpsc::Sender<(Completion, AuditRecord<'static>)>,
}

impl Couriers {
    /// Hand `item` to an idle courier, starting one when none is idle and fewer than
    /// [`IN_FLIGHT`] run, or else waiting for one. `false` when the couriers have stopped
    /// (the completer is gone).
    async fn dispatch(&mut self, mut item: OutboxItem) -> bool {
        loop {
            let notify = self.freed.clone();
            let freed = notify.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let courier = match idle {
                Some(i) => i,
                None if self.queues.len() < IN_FLIGHT => self.start(None),
                // A courier that ended early (it cannot, short of a panic) is replaced, so
                // the dataflow never runs out of couriers and waits forever.
                None => match self.queues.iter().position(|q| q.is_closed()) {
                    Some(dead) => self.start(Some(dead)),
                    None => {
                        freed.await;
                        continue;
                    }
                },
            };
            // An idle courier's queue is empty; a closed one has stopped for good.
            match self.queues[courier].try_send(item) {
                Ok(()) => return true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => item = back,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
    }

    /// Start a courier, new or in place of the one at `replace`.
    fn start(&mut self, replace: Option<usize>) -> usize {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let index = match replace {
            Some(i) => {
                self.queues[i] = tx;
                i
            }
            None => {
                self.queues.push(tx);
                self.queues.len() - 1
            }
        };
        tokio::spawn(courier(
            index,
            rx,
            self.idle.clone(),
            self.freed.clone(),
            self.inner.clone(),
            self.flow.clone(),
            self.done.clone(),
        ));
        index
    }
}

/// Deliver the items handed to courier `index`, one at a time, over its own connection
/// (driven in this task); after each, report idle. Stops when its queue closes.
async fn courier(
    index: usize,
    mut work: tokio::sync::mpsc::Receiver<OutboxItem>,
    idle: Arc<Mutex<Vec<usize>>>,
    freed: Arc<Notify>,
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    done: tokio::sync::mpsc::Sender<(Completion, AuditRecord<'static>)>,
) {
    let session = Session::new();
    let run = async {
        while let Some(item) = work.recv().await {
            let enqueued_at = item.enqueued_at;
            let (c, audit) = deliver(&flow, &inner.catalog, item, &session).await;
            // Latency ends when the receiver answered, not when the outcome is committed.
            inner.stats.record(&c, enqueued_at);
            if done.send((c, audit)).await.is_err() {
                return;
            }
            idle.lock().unwrap_or_else(|p| p.into_inner()).push(index);
            freed.notify_one();
        }
    };
    session.run(run).await;
}

async fn complete_loop(
    inner: Arc<Inner>,
    flow: Arc<Flow>,
    mut rx: tokio::sync::mpsc::Receiver<(Completion, AuditRecord<'static>)>,
) {
    let mut buf = Vec::with_capacity(OUTCOME_BATCH);
    // Rows stay leased while their outcomes gather.
    while crate::batch::recv_batch(&mut rx, &mut buf, OUTCOME_BATCH).await > 0 {
        let mut results = Vec::with_capacity(buf.len());
        let mut audit = Vec::with_capacity(buf.len());
        for (c, a) in buf.drain(..) {
            flow.counters.record(a.outcome, a.error_kind, a.latency_ms);
            results.push(c);
            audit.push(a);
        }
        let s = inner.store.clone();
        if let Err(e) = blocking(move || s.complete(&results, &audit)).await {
            // The leases expire and the rows are claimed again: at-least-once, never lost.
            tracing::error!(dataflow = %flow.spec.name, error = %e, "recording outcomes failed");
        }
    }
}

impl Stats {
    /// Outcome counts live per dataflow (`Flow::counters`); this keeps the latency.
    fn record(&self, c: &Completion, enqueued_at: i64) {
        if let Completion::Delivered { .. } = c {
            let us = ((now_ms() - enqueued_at).max(0) as u64)
                .saturating_mul(1000)
                .max(1);
            if let Ok(mut h) = self.latency_us.lock() {
                h.saturating_record(us);
            }
        }
    }
}

async fn deliver(
    flow: &Flow,
    catalog: &Catalog,
    item: OutboxItem,
    session: &Session,
) -> (Completion, AuditRecord<'static>) {
    let body: Bytes = payload::to_vec_with(
        &flow.spec,
        catalog,
        &item.profile,
        &item.segments,
        item.identity_map_json.as_deref(),
    )
    .into();
    let key = idempotency_key(&flow.spec.name, item.id, item.version);
    let attempt = item.attempts + 1;
    let sent = flow.send(Some(session), &key, body.clone()).await;
    let completion = match &sent.result {
        Ok(()) => Completion::Delivered {
            id: item.id,
            version: item.version,
        },
        Err(error) => {
            tracing::warn!(dataflow = %flow.spec.name, kind = %error.kind(), attempt, "delivery failed");
            let record = attempt_error(attempt, error);
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
    };
    let audit = flow.audit_record(&item.profile.id, &key, &body, attempt, outcome, &sent);
    (completion, audit)
}

fn attempt_error(attempt: u32, e: &DeliveryError) -> AttemptError {
    AttemptError {
        at: now_ms(),
        attempt,
        kind: e.kind().as_str().to_owned(),
        status: e.status(),
        message: e.to_string(),
    }
}

/// What one attempt came to.
struct Sent {
    result: Result<(), DeliveryError>,
    status: Option<u16>,
    peer: Option<Arc<PeerInfo>>,
    latency_ms: f64,
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

/// A uniform value in [0, 1) for backoff jitter (no need for a cryptographic source).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

impl Flow {
    /// One signed POST of `body` under `key` (over `session`'s connection, else the pool);
    /// `Err` for anything but a 2xx.
    async fn send(&self, session: Option<&Session>, key: &str, body: Bytes) -> Sent {
        let started = std::time::Instant::now();
        let req = match self.request(key, body) {
            Ok(r) => r,
            Err(e) => {
                return Sent {
                    result: Err(e),
                    status: None,
                    peer: None,
                    latency_ms: 0.0,
                }
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
        Sent {
            result,
            status,
            peer,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }

    fn request(&self, key: &str, body: Bytes) -> Result<OutboundRequest, DeliveryError> {
        let invalid = |e: http::header::InvalidHeaderValue| {
            DeliveryError::new(ErrorKind::InvalidRequest, e.to_string())
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
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
    fn audit_record(
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
        }
    }
}
