//! The running export engine: ingest (parse → apply + trigger → durable outbox, in one
//! transaction) and one delivery worker per dataflow (claim a batch → build payloads from the
//! latest state → send concurrently through the delivery client → record outcomes).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::payload;
use super::spec::{Catalog, DataflowSpec};
use super::trigger::evaluate;
use super::update::{parse_ndjson, LineError};
use crate::config::Config;
use crate::delivery::{settings_for_dataflow, DeliveryClient, OutboundRequest};
use crate::store::{self, now_ms, Completion, OutboxItem, Store, StoreError};

/// Rows claimed per round trip to the store.
const BATCH: usize = 512;
/// How long a claimed row stays leased to this worker.
const LEASE_MS: i64 = 30_000;
/// Longest wait between retries of a failing delivery.
const MAX_BACKOFF_MS: i64 = 5 * 60_000;

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
    wake: Notify,
}

struct Inner {
    store: Arc<dyn Store>,
    catalog: Catalog,
    flows: Vec<Arc<Flow>>,
}

/// The export engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dataflows", &self.inner.flows.len())
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
        let store = {
            let cfg = cfg.clone();
            blocking(move || store::open(&cfg)).await?
        };
        let catalog = Catalog::from_config(cfg);
        let mut flows = Vec::new();
        for df in &cfg.dataflows {
            let (name, segs, now) = (df.name.clone(), df.segments.clone(), now_ms());
            let s = store.clone();
            let (times, fresh) = blocking(move || s.sync_mappings(&name, &segs, now)).await?;
            for seg in fresh {
                let (s, name) = (store.clone(), df.name.clone());
                let seg2 = seg.clone();
                let n = blocking(move || s.backfill(&name, &seg2, now)).await?;
                if n > 0 {
                    tracing::info!(dataflow = %df.name, segment = %seg, profiles = n, "backfill queued");
                }
            }
            let settings = settings_for_dataflow(cfg, df, None).map_err(EngineError::Setup)?;
            let endpoint = url::Url::parse(&df.endpoint).map_err(|e| EngineError::Setup(e.to_string()))?;
            flows.push(Arc::new(Flow {
                spec: DataflowSpec::from_config(df, &times),
                client: DeliveryClient::new(settings),
                endpoint,
                wake: Notify::new(),
            }));
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                catalog,
                flows,
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
            inner.store.apply_updates(&updates, &mut |p, u| {
                let change = p.apply(u, &now);
                inner
                    .flows
                    .iter()
                    .filter_map(|f| evaluate(&f.spec, p, &change).map(|t| (f.spec.name.clone(), t)))
                    .collect()
            })
        })
        .await?;
        for f in &self.inner.flows {
            f.wake.notify_one();
        }
        Ok(report)
    }

    /// Deliveries waiting, all dataflows.
    pub async fn pending(&self) -> Result<u64, EngineError> {
        let s = self.inner.store.clone();
        blocking(move || s.pending(None)).await
    }

    /// The store, for inspection.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// Start one delivery worker per dataflow. They run until the tasks are aborted.
    pub fn spawn_workers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.inner
            .flows
            .iter()
            .map(|f| tokio::spawn(worker(self.inner.clone(), f.clone())))
            .collect()
    }
}

async fn worker(inner: Arc<Inner>, flow: Arc<Flow>) {
    loop {
        let (s, name) = (inner.store.clone(), flow.spec.name.clone());
        let items = match blocking(move || s.claim(&name, BATCH, now_ms(), LEASE_MS)).await {
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
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            continue;
        }
        let mut set = JoinSet::new();
        for item in items {
            let (flow, catalog_inner) = (flow.clone(), inner.clone());
            set.spawn(async move { deliver(&flow, &catalog_inner.catalog, item).await });
        }
        let mut results = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(c) = r {
                results.push(c);
            }
        }
        let s = inner.store.clone();
        if let Err(e) = blocking(move || s.complete(&results)).await {
            // The leases expire and the rows are claimed again: at-least-once, never lost.
            tracing::error!(dataflow = %flow.spec.name, error = %e, "recording outcomes failed");
        }
    }
}

async fn deliver(flow: &Flow, catalog: &Catalog, item: OutboxItem) -> Completion {
    let body = payload::build(&flow.spec, catalog, &item.profile, &item.segments);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let req = OutboundRequest {
        method: Method::POST,
        url: flow.endpoint.clone(),
        headers,
        body: serde_json::to_vec(&body).unwrap_or_default().into(),
    };
    let error = match flow.client.send(req).await {
        Ok(d) => match d.error() {
            None => {
                return Completion::Delivered {
                    id: item.id,
                    version: item.version,
                }
            }
            Some(e) => e,
        },
        Err(e) => e,
    };
    tracing::warn!(dataflow = %flow.spec.name, kind = %error.kind(), attempt = item.attempts + 1, "delivery failed");
    let backoff = (1000i64 << item.attempts.min(16)).min(MAX_BACKOFF_MS);
    Completion::Failed {
        id: item.id,
        retry_at: now_ms() + backoff,
        error: error.to_string(),
    }
}
