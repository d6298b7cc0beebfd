//! Dataflow definitions while the engine runs: API-managed ones added, replaced and removed
//! (validated against the config, persisted, backfilled), picked up from other instances on a
//! shared store, and each one's runtime built through the delivery core.

use std::sync::Arc;

use tokio::sync::Notify;

use super::attempt::Flow;
use super::{blocking, worker, Engine, EngineError};
use crate::config::{Config, Dataflow, DestinationConfig};
use crate::delivery::Core;
use crate::export::spec::DataflowSpec;
use crate::store::{now_ms, Store};

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

impl Engine {
    /// Add or replace an API-managed dataflow: validated against the config, persisted,
    /// its newly mapped segments backfilled, its worker (re)started when workers run.
    pub async fn put_dataflow(&self, df: crate::config::Dataflow) -> Result<(), DataflowChange> {
        if self.inner.cfg.dataflow(&df.name).is_some() {
            return Err(DataflowChange::Conflict(format!(
                "'{}' is defined in the config file; change it there",
                df.name
            )));
        }
        let destination = stored_destination(&self.inner.cfg, &df).map_err(DataflowChange::Invalid)?;
        let flow = Arc::new(
            build_flow(
                &self.inner.cfg,
                &self.inner.store,
                &self.inner.core,
                &df,
                destination,
            )
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
            let built = match stored_destination(&self.inner.cfg, &df) {
                Ok(d) => build_flow(&self.inner.cfg, &self.inner.store, &self.inner.core, &df, d).await,
                Err(issues) => Err(EngineError::Setup(issues.join("; "))),
            };
            match built {
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

/// A dataflow from the admin API or the database, checked by the rules of its origin (secrets
/// only from `[secrets]`, a CA only inside `[admin] dataflow_ca_dir` or inline) and made a
/// destination; every problem, keyed `dataflow.…`, when it cannot run.
pub(super) fn stored_destination(cfg: &Config, df: &Dataflow) -> Result<DestinationConfig, Vec<String>> {
    cfg.stored_dataflow(df)
        .map_err(|issues| issues.iter().map(ToString::to_string).collect())
}

/// Build one dataflow's runtime: its delivery client (made by the core from `destination`,
/// before anything is written), then its mapped segments recorded and the newly mapped ones
/// backfilled.
pub(super) async fn build_flow(
    cfg: &Config,
    store: &Arc<dyn Store>,
    core: &Core,
    df: &Dataflow,
    destination: DestinationConfig,
) -> Result<Flow, EngineError> {
    let client = core.destination(&destination).map_err(EngineError::Setup)?;
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
    let endpoint = destination
        .endpoint
        .ok_or_else(|| EngineError::Setup(format!("dataflow {}: no endpoint", df.name)))?;
    let settings = df
        .health_settings()
        .map_err(|issues| EngineError::Setup(format!("dataflow {}: {issues:?}", df.name)))?;
    let template = cfg.dataflow_template(df).map_err(EngineError::Setup)?;
    let names = super::shaped::segment_names(cfg, df);
    let shaping = super::shaped::Shaping::new(df, template, names)
        .map_err(|e| EngineError::Setup(format!("dataflow {}: {e}", df.name)))?;
    let (s, name) = (store.clone(), df.name.clone());
    let paused = blocking(move || s.pauses())
        .await?
        .into_iter()
        .find(|p| p.dataflow == name);
    Ok(Flow {
        spec: DataflowSpec::from_config(df, &times),
        client,
        destination: crate::delivery::destination(&endpoint),
        endpoint,
        counters: Default::default(),
        wake: Notify::new(),
        health: super::health::Health::new(&df.name, &settings, paused),
        shaping,
    })
}
